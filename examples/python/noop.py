"""py.noop(): nothing, as a Python task — what the sandbox and the worker cost per task."""
from taskhost import task


@task
def noop():
    return None
