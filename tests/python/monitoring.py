"""Monitoring scenarios against taskhost workers with Celery's own tools (driven by
tests/e2e/monitoring.rs): real Flower's HTTP API, `celery control`, a traced producer.

Usage: BROKER=redis://... python monitoring.py SCENARIO [ARGS...]; exits non-zero when an
expectation fails.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from celery import Celery
from celery.result import AsyncResult

broker = os.environ["BROKER"]
app = Celery("monitoring", broker=broker, backend=broker)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])


def die_with_parent():
    """For a helper process: SIGTERM when this script dies, even by SIGKILL (a test's
    timeout), so no Flower or event reader outlives it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def check(cond, message):
    if not cond:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def http(method, url, form=None):
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(what, predicate, timeout=30.0, every=0.25):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError) as e:
            last = e
        time.sleep(every)
    check(False, f"{what} within {timeout}s (last: {last!r})")


def flower(port, node, log_path):
    """Starts Flower, checks it sees the taskhost worker, its tasks, and that a rate limit
    and a revoke sent through Flower take effect."""
    base = f"http://127.0.0.1:{port}"
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FLOWER_UNAUTHENTICATED_API="true", PYTHONPATH=here)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "flowerapp", "flower", f"--port={port}", "--address=127.0.0.1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=here, preexec_fn=die_with_parent,
        )
    try:
        workers = wait_for(
            "Flower lists the taskhost worker online",
            lambda: (lambda s: s if s.get(node) is True else None)(json.loads(http("GET", f"{base}/api/workers?status=true")[1])),
        )
        print("workers", json.dumps(workers))
        # Flower's controls act only on workers its inspector has heard from.
        wait_for("Flower inspected the worker", lambda: "stats" in json.loads(http("GET", f"{base}/api/workers")[1]).get(node, {}))
        # Flower turns task events on by broadcasting enable_events every few seconds.
        wait_for("task events enabled", lambda: app.control.inspect(destination=[node], timeout=1).stats().get(node, {}).get("task_events"))

        ok = app.send_task("tasks.add", (2, 3))
        bad = app.send_task("tasks.fail", ("boom",), kwargs={"kind": "ValueError"})
        check(ok.get(timeout=20) == 5, "tasks.add result")

        def seen():
            tasks = json.loads(http("GET", f"{base}/api/tasks")[1])
            a, b = tasks.get(ok.id), tasks.get(bad.id)
            if a and b and a.get("state") == "SUCCESS" and b.get("state") == "FAILURE":
                return a, b
            return None

        a, b = wait_for("Flower shows both tasks finished", seen)
        check(a["worker"] == node, f"worker of tasks.add: {a['worker']}")
        check(a["result"] == "5", f"result shown: {a['result']!r}")
        check(isinstance(a["runtime"], float) and a["runtime"] >= 0, f"runtime: {a['runtime']!r}")
        check(a["name"] == "tasks.add" and a["args"] == "(2, 3)", f"name/args: {a['name']} {a['args']}")
        check("ValueError" in (b.get("exception") or ""), f"exception shown: {b.get('exception')!r}")
        status, body = http("GET", f"{base}/api/task/info/{ok.id}")
        check(status == 200 and json.loads(body)["state"] == "SUCCESS", f"task info: {status} {body}")

        # Rate limit through Flower: 2/s spaces tasks.add starts 500 ms apart.
        status, body = http("POST", f"{base}/api/task/rate-limit/tasks.add", {"workername": node, "ratelimit": "2/s"})
        check(status == 200 and "new rate limit set successfully" in body, f"rate-limit: {status} {body}")
        started = time.time()
        results = [app.send_task("tasks.add", (i, i)) for i in range(5)]
        for r in results:
            r.get(timeout=30)
        spent = time.time() - started
        check(spent >= 1.8, f"5 tasks at 2/s finished in {spent:.2f}s: the rate limit did not apply")
        status, body = http("POST", f"{base}/api/task/rate-limit/tasks.add", {"workername": node, "ratelimit": "0"})
        check(status == 200 and "disabled" in body, f"rate-limit off: {status} {body}")

        # Revoke through Flower: a task waiting on its countdown never runs.
        later = app.send_task("tasks.add", (1, 1), countdown=4)
        time.sleep(0.5)
        status, body = http("POST", f"{base}/api/task/revoke/{later.id}", {"terminate": "false"})
        check(status == 200, f"revoke: {status} {body}")
        wait_for("the revoked task reads REVOKED", lambda: AsyncResult(later.id, app=app).state == "REVOKED", timeout=15)
        time.sleep(5)
        check(AsyncResult(later.id, app=app).state == "REVOKED", "the revoked task ran anyway")
        tasks = json.loads(http("GET", f"{base}/api/tasks")[1])
        print("flower ok", len(tasks))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def events_dump(seconds):
    """Runs `celery events --dump` while tasks run; prints what it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-b", broker, "events", "--dump"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
    try:
        time.sleep(2)
        r = app.send_task("tasks.add", (20, 22))
        check(r.get(timeout=20) == 42, "tasks.add result")
        time.sleep(float(seconds))
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    print(r.id)
    print(out)


def control(node):
    """`celery control`/app.control commands change a running taskhost worker."""
    ctl = app.control
    reply = ctl.broadcast("pool_grow", arguments={"n": 2}, destination=[node], reply=True, timeout=2)
    check(reply and reply[0][node] == {"ok": "pool will grow"}, f"pool_grow: {reply}")
    stats = ctl.inspect(destination=[node], timeout=2).stats()[node]
    check(stats["pool"]["max-concurrency"] == 3, f"after pool_grow 2 from 1: {stats['pool']}")
    reply = ctl.broadcast("pool_shrink", arguments={"n": 1}, destination=[node], reply=True, timeout=2)
    check(reply and reply[0][node] == {"ok": "pool will shrink"}, f"pool_shrink: {reply}")
    check(ctl.inspect(destination=[node], timeout=2).stats()[node]["pool"]["max-concurrency"] == 2, "after pool_shrink")

    reply = ctl.add_consumer("extra", destination=[node], reply=True, timeout=2)
    check(reply and reply[0][node] == {"ok": "add consumer extra"}, f"add_consumer: {reply}")
    queues = [q["name"] for q in ctl.inspect(destination=[node], timeout=2).active_queues()[node]]
    check("extra" in queues, f"active_queues after add_consumer: {queues}")
    check(app.send_task("tasks.add", (1, 2), queue="extra").get(timeout=20) == 3, "a task on the added queue ran")
    reply = ctl.cancel_consumer("extra", destination=[node], reply=True, timeout=2)
    check(reply and reply[0][node] == {"ok": "no longer consuming from extra"}, f"cancel_consumer: {reply}")
    time.sleep(1.5)  # a fetch already waiting on the old queues ends within its 1 s wait
    stranded = app.send_task("tasks.add", (1, 2), queue="extra")
    time.sleep(2)
    check(AsyncResult(stranded.id, app=app).state == "PENDING", "a task on a cancelled queue ran")

    reply = ctl.time_limit("tasks.sleep", soft=None, hard=0.5, destination=[node], reply=True, timeout=2)
    check(reply and reply[0][node] == {"ok": "time limits set successfully"}, f"time_limit: {reply}")
    slow = app.send_task("tasks.sleep", (3000,))
    try:
        slow.get(timeout=20)
        check(False, "tasks.sleep(3000) outlived a 0.5 s hard limit")
    except Exception as e:
        check("TimeLimitExceeded" in type(e).__name__ or "TimeLimit" in repr(e), f"time limit error: {e!r}")
    reply = ctl.rate_limit("tasks.nope", "1/s", destination=[node], reply=True, timeout=2)
    check(reply and reply[0][node] == {"error": "unknown task"}, f"rate_limit on an unknown task: {reply}")

    clock = ctl.broadcast("clock", destination=[node], reply=True, timeout=2)
    check(clock and clock[0][node]["clock"] > 0, f"clock: {clock}")
    conf = ctl.inspect(destination=[node], timeout=2).conf()
    check(conf and "broker_url" in conf[node] and "secret" not in conf[node]["broker_url"], f"conf: {conf}")
    held = app.send_task("tasks.add", (5, 5), countdown=30)
    time.sleep(1)
    query = ctl.inspect(destination=[node], timeout=2).query_task(held.id)
    check(query and held.id in query[node] and query[node][held.id][0] == "scheduled", f"query_task: {query}")
    ctl.revoke(held.id)
    ctl.shutdown(destination=[node])
    print("control ok")


def traced(count):
    """A producer instrumented with opentelemetry-instrumentation-celery sends tasks;
    prints each task id and the trace id its enqueueing span belongs to."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    CeleryInstrumentor().instrument()
    tracer = trace.get_tracer("monitoring")
    for i in range(int(count)):
        with tracer.start_as_current_span("enqueue") as span:
            r = app.send_task("tasks.add", (i, 1))
            trace_id = format(span.get_span_context().trace_id, "032x")
        check(r.get(timeout=20) == i + 1, "traced tasks.add result")
        print(r.id, trace_id)


SCENARIOS = {"flower": flower, "events_dump": events_dump, "control": control, "traced": traced}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])
