"""An unmodified Celery client using taskhost as its worker.

    pip install 'celery[redis]'
    taskhost serve --plugins dist/plugins --broker redis://127.0.0.1:6379/0   # one terminal
    python examples/producer.py                                              # another

Task names are the components' names (`tasks.add` is `dist/plugins/tasks.add@1.0.0.wasm`);
only the JSON serializer is accepted; results come back through the Redis result backend.
"""
import os

from celery import Celery, signature

broker = os.environ.get("BROKER", "redis://127.0.0.1:6379/0")
app = Celery("producer", broker=broker, backend=broker)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

# send_task needs no Python definition of the task.
print("tasks.add(2, 3) =", app.send_task("tasks.add", (2, 3)).get(timeout=10))
print("tasks.add(1, y=7) =", app.send_task("tasks.add", args=[1], kwargs={"y": 7}).get(timeout=10))

# Options work as with any Celery worker.
r = app.send_task("tasks.mul", (6, 7), countdown=1, priority=0, queue="celery")
print("tasks.mul(6, 7) after 1 s =", r.get(timeout=10))

# Ask for a component version with a header.
print("tasks.version ^1 =", app.send_task("tasks.version", headers={"taskhost_version": "^1"}).get(timeout=10))

# Failures re-raise on the client.
try:
    app.send_task("tasks.fail", ("out of coffee",)).get(timeout=10)
except Exception as exc:
    print(f"tasks.fail raised {type(exc).__name__}: {exc}")

# Signatures work too, e.g. add.s(2, 2).delay() without importing any task code.
print("signature =", signature("tasks.add", args=(2, 2), app=app).delay().get(timeout=10))
