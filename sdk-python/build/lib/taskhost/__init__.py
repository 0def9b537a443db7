"""taskhost's Python SDK: a Celery task written as a function, built into a sandboxed
component with `taskhost build app.py --task NAME --version SEMVER`.

    from taskhost import task, Retry

    @task
    def add(x, y):
        return x + y

    @task(bind=True)            # the first parameter receives the Context
    def fetch(ctx, url):
        ctx.log(f"fetching {url}")
        ...

Arguments come from the Celery message's args and kwargs, bound to the parameters by
name as a Celery worker binds them. The return value is the task's JSON result.
`raise Retry(countdown=5)` asks for a retry, `raise Reject("why")` dead-letters the
message; any other exception is the task's FAILURE, with its type, message and
traceback.
"""

import inspect
import json
import traceback

__all__ = ["task", "Context", "Retry", "Reject"]

# Registered tasks: name -> (function, bind).
_tasks = {}


class Retry(Exception):
    """Run the task again later: after `countdown` seconds, or as its manifest says."""

    def __init__(self, reason="retry requested", countdown=None):
        super().__init__(reason)
        self.reason = str(reason)
        self.countdown = None if countdown is None else float(countdown)


class Reject(Exception):
    """Give the message up: it is dead-lettered with `reason`, never retried."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = str(reason)


def task(fn=None, *, name=None, bind=False):
    """Registers a function as a task. `name`: the Celery task name it serves (default:
    whatever name it is built as); `bind`: hand it a `Context` as its first argument."""

    def register(f):
        _tasks[name or f.__name__] = (f, bind)
        return f

    return register(fn) if fn is not None else register


class Context:
    """What a bound task knows of its message, and what the worker lets it do."""

    def __init__(self, info):
        self.id = info.id
        self.name = info.name
        self.version = info.version
        self.retries = info.retries
        self.queue = info.queue
        self.eta = info.eta
        self.parent_id = info.parent_id
        self.root_id = info.root_id
        self.hard_limit_ms = info.hard_limit_ms
        self.soft_limit_ms = info.soft_limit_ms

    def log(self, message, level="info"):
        """A log line attributed to this task in the worker's log."""
        from wit_world.imports import host

        host.log(getattr(host.LogLevel, level.upper()), str(message))

    def update_state(self, state="PROGRESS", meta=None):
        """Celery's update_state: a custom state with JSON metadata, readable by clients."""
        from wit_world.imports import host

        host.set_progress(state, json.dumps(meta if meta is not None else {}))

    def remaining_ms(self):
        """Milliseconds left before the soft time limit (the hard one if none is set)."""
        from wit_world.imports import host

        return host.remaining_ms()

    def is_revoked(self):
        """True once the task has been revoked; stop soon after."""
        from wit_world.imports import host

        return host.is_revoked()

    def send_task(self, name, args=(), kwargs=None, queue=None, countdown=None, priority=None, version=None):
        """Publishes a follow-up task (granted by the manifest's `[grants] send_tasks`);
        returns its id. Raises PermissionError when the worker refuses it."""
        from componentize_py_types import Err
        from wit_world.imports import host, types

        options = types.SendOptions(queue=queue, countdown=None if countdown is None else float(countdown),
                                    priority=priority, version=version)
        try:
            return host.send_task(name, json.dumps(list(args)), json.dumps(kwargs or {}), options)
        except Err as refused:
            raise PermissionError(refused.value) from None

    def config(self, key):
        """A configuration value or secret the manifest grants (`[grants] config`), or None."""
        from componentize_py_types import Err
        from wit_world.imports import store

        try:
            return store.get(key)
        except Err as e:
            raise KeyError(f"{key}: {e.value}") from None


def _pick(name):
    """The registered task serving `name`: the only one, or the one registered under the
    name or its last dotted part."""
    if len(_tasks) == 1:
        return next(iter(_tasks.values()))
    for candidate in (name, name.rsplit(".", 1)[-1]):
        if candidate in _tasks:
            return _tasks[candidate]
    raise LookupError(f"no @task serves {name!r} in this component (it has {sorted(_tasks)})")


def _run(info, args_json, kwargs_json):
    """The component's `run`: binds the message's arguments, calls the task, maps its ending."""
    from componentize_py_types import Err
    from wit_world.imports import types

    try:
        fn, bind = _pick(info.name)
        args = json.loads(args_json)
        kwargs = json.loads(kwargs_json)
        positional = ([Context(info)] if bind else []) + list(args)
        try:
            bound = inspect.signature(fn).bind(*positional, **kwargs)
        except TypeError as e:
            raise TypeError(f"{info.name}() {e}") from None
        return json.dumps(fn(*bound.args, **bound.kwargs))
    except Retry as r:
        raise Err(types.TaskError_Retry(types.RetryRequest(reason=r.reason, countdown=r.countdown)))
    except Reject as r:
        raise Err(types.TaskError_Reject(r.reason))
    except Exception as e:
        # Celery's client re-raises it by class and message; the traceback is the result's.
        cls = type(e)
        raise Err(types.TaskError_Exception(types.ExceptionInfo(
            name=cls.__qualname__, module=cls.__module__, message=str(e), traceback=traceback.format_exc())))
