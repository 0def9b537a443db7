"""The example tasks in Python, for a real Celery worker: proves `taskhost send` speaks Celery.

Run: celery -A tasks worker (with BROKER set), from this directory.
"""
import os

from celery import Celery

broker = os.environ.get("BROKER", "redis://127.0.0.1:6379/0")
app = Celery("tasks", broker=broker, backend=broker)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])


@app.task(name="tasks.add")
def add(x, y):
    return x + y


@app.task(name="tasks.echo")
def echo(value):
    return value
