"""The example tasks written for Python Celery, for side-by-side benchmarks and interop.

Same names and behaviour as the taskhost components in plugins/:
    BROKER=redis://127.0.0.1:6379/0 celery -A tasks worker -P prefork -c 2   (from examples/)
"""
import base64
import io
import os
import time

from celery import Celery

broker = os.environ.get("BROKER", "redis://127.0.0.1:6379/0")
app = Celery("tasks", broker=broker, backend=os.environ.get("RESULT_BACKEND", broker))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])


@app.task(name="tasks.add")
def add(x, y):
    return x + y


@app.task(name="tasks.mul")
def mul(x, y):
    return x * y


@app.task(name="tasks.tsum")
def tsum(values):
    return sum(values)


@app.task(name="tasks.echo")
def echo(value):
    return value


@app.task(name="tasks.noop")
def noop():
    return None


@app.task(name="tasks.sleep")
def sleep(ms):
    time.sleep(ms / 1000)
    return ms


@app.task(name="media.thumbnail")
def thumbnail(image, size=128):
    """Decode a base64 PNG/JPEG, fit it in size×size, return base64 PNG (needs Pillow)."""
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(image)))
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@app.task(name="http.fetch")
def http_fetch(url):
    """GET url; status, body length and sha256, as the http.fetch component returns them.
    Redirects are returned, not followed, as there."""
    import hashlib
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=30) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    return {"status": status, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
