"""py.fail(message, kind="ValueError"): raises ValueError(message), or an exception class
of its own named `kind`, so clients see how a Python task's failure reaches them."""
from taskhost import task


@task
def fail(message="boom", kind="ValueError"):
    if kind == "ValueError":
        raise ValueError(message)
    raise type(kind, (Exception,), {})(message)
