"""The Celery app an operator points Flower at (`celery -A flowerapp flower`): it names the
tasks taskhost runs, as a Python project's app module does, so Flower's task controls know them.
"""
import os

from celery import Celery

app = Celery("flowerapp", broker=os.environ["BROKER"], backend=os.environ["BROKER"])


@app.task(name="tasks.add")
def add(x, y):
    raise NotImplementedError("runs on taskhost")


@app.task(name="tasks.sleep")
def sleep(ms):
    raise NotImplementedError("runs on taskhost")
