"""py.fail(message): raises ValueError(message), so clients see a Python task's failure."""
from taskhost import task


@task
def fail(message="boom"):
    raise ValueError(message)
