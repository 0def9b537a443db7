"""py.add(x, y): the sum, as the Rust tasks.add returns it."""
from taskhost import task


@task
def add(x, y):
    return x + y
