"""Python Celery client scenarios run against a taskhost worker (driven by tests/e2e/interop.rs).

Usage: BROKER=redis://... python interop.py SCENARIO [ARGS...]; prints results, exits
non-zero when an expectation fails.
"""
import json
import os
import sys
import time

from celery import Celery
from celery.result import AsyncResult

broker = os.environ["BROKER"]
app = Celery("interop", broker=broker, backend=os.environ.get("RESULT_BACKEND", broker))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
if os.environ.get("RESULT_EXTENDED"):
    app.conf.result_extended = True
if os.environ.get("SENTINEL_MASTER"):
    # sentinel:// URLs: kombu and Celery's backend take the master's name as an option.
    app.conf.broker_transport_options = {"master_name": os.environ["SENTINEL_MASTER"]}
    app.conf.result_backend_transport_options = {"master_name": os.environ["SENTINEL_MASTER"]}


def check(cond, message):
    if not cond:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def add():
    result = app.send_task("tasks.add", (2, 3)).get(timeout=10)
    check(result == 5, f"tasks.add(2, 3) returned {result!r}")
    print(result)


def kwargs():
    result = app.send_task("tasks.add", args=[1], kwargs={"y": 7}).get(timeout=10)
    check(result == 8, f"tasks.add(1, y=7) returned {result!r}")
    echoed = app.send_task("tasks.echo", kwargs={"value": {"nested": [1, "two", None]}}).get(timeout=10)
    check(echoed == {"nested": [1, "two", None]}, f"echo returned {echoed!r}")
    print(result)


def send(task, args, queue, priority):
    """Publishes and prints the id without waiting."""
    r = app.send_task(task, json.loads(args), queue=queue, priority=int(priority))
    print(r.id)


def later(task, args, countdown):
    """Publishes with a countdown (seconds) and prints the id without waiting."""
    print(app.send_task(task, json.loads(args), countdown=float(countdown)).id)


def wait(task_id, timeout):
    print(json.dumps(AsyncResult(task_id, app=app).get(timeout=float(timeout))))


def state(task_id):
    print(AsyncResult(task_id, app=app).state)


def fail():
    # A Rust task may also fail as a standard Python exception, which the client re-raises.
    try:
        app.send_task("tasks.fail", ("'sku'",), {"kind": "KeyError"}).get(timeout=10)
        check(False, "tasks.fail(kind=KeyError) did not raise")
    except KeyError as exc:
        check(exc.args == ("'sku'",), f"KeyError args {exc.args!r}")
    r = app.send_task("tasks.fail", ("the disk is full",))
    try:
        r.get(timeout=10)
    except Exception as exc:  # the rebuilt exception
        check(str(exc) == "the disk is full", f"str(exc) is {str(exc)!r}")
        check(r.state == "FAILURE", f"state is {r.state}")
        print(f"{type(exc).__name__}: {exc}")
        return
    check(False, "tasks.fail did not raise")


def time_limit():
    r = app.send_task("tasks.spin")
    try:
        r.get(timeout=10)
    except Exception as exc:
        from billiard.exceptions import TimeLimitExceeded

        check(isinstance(exc, TimeLimitExceeded), f"raised {type(exc)!r}")
        print(f"{type(exc).__name__}: {exc}")
        return
    check(False, "tasks.spin did not raise")


def states():
    # A short countdown keeps it PENDING long enough to be seen before a worker takes it.
    r = app.send_task("tasks.sleep", (400,), countdown=0.3)
    seen = []
    deadline = time.time() + 10
    while time.time() < deadline:
        s = r.state
        if not seen or seen[-1] != s:
            seen.append(s)
        if s == "SUCCESS":
            break
        time.sleep(0.01)
    check(seen == ["PENDING", "STARTED", "SUCCESS"], f"states seen: {seen}")
    check(r.get(timeout=1) == 400, "result")
    print(" -> ".join(seen))


def many(count):
    count = int(count)
    started = time.time()
    results = [app.send_task("tasks.add", (i, i)) for i in range(count)]
    values = [r.get(timeout=60) for r in results]
    check(values == [2 * i for i in range(count)], "wrong sums")
    print(f"{count} tasks in {time.time() - started:.2f}s")


def countdown():
    sent = time.time()
    r = app.send_task("tasks.add", (20, 22), countdown=1.5)
    value = r.get(timeout=10)
    took = time.time() - sent
    check(value == 42, f"value {value}")
    check(took >= 1.4, f"ran after {took:.2f}s, before its countdown")
    print(f"{took:.2f}")


def expires():
    r = app.send_task("tasks.add", (1, 2), countdown=2, expires=1)
    try:
        r.get(timeout=10)
    except Exception as exc:
        check(r.state == "REVOKED", f"state {r.state}")
        print(f"{type(exc).__name__}: {exc}")
        return
    check(False, "expired task ran")


def revoke_terminate():
    r = app.send_task("tasks.sleep", (20000,))
    deadline = time.time() + 10
    while r.state != "STARTED":
        check(time.time() < deadline, f"never started: {r.state}")
        time.sleep(0.02)
    asked = time.time()
    app.control.revoke(r.id, terminate=True)
    try:
        r.get(timeout=10)
    except Exception as exc:
        took = time.time() - asked
        check(r.state == "REVOKED", f"state {r.state}")
        check(type(exc).__name__ == "TaskRevokedError", f"raised {type(exc)!r}")
        print(f"{type(exc).__name__}: {exc} after {took:.3f}s")
        return
    check(False, "revoked task returned a result")


def revoke_queued():
    r = app.send_task("tasks.add", (1, 1), countdown=1)
    app.control.revoke(r.id)
    try:
        r.get(timeout=10)
    except Exception as exc:
        check(r.state == "REVOKED", f"state {r.state}")
        print(f"{type(exc).__name__}: {exc}")
        return
    check(False, "revoked task ran")


def inspect():
    i = app.control.inspect(timeout=1.5)
    pong = i.ping() or {}
    nodes = sorted(n for n in pong if n.startswith("taskhost"))
    check(nodes, f"no taskhost node answered ping: {pong}")
    registered = i.registered() or {}
    check("tasks.add" in registered.get(nodes[0], []), f"registered: {registered}")
    stats = i.stats() or {}
    check(nodes[0] in stats and "pool" in stats[nodes[0]], f"stats: {stats}")
    queues = i.active_queues() or {}
    check(any(q["name"] == "celery" for q in queues.get(nodes[0], [])), f"active_queues: {queues}")
    print(" ".join(nodes))


def canvas():
    from celery import chain, chord, group

    s = app.signature
    check(chain(s("tasks.add", (2, 2)), s("tasks.mul", (10,)))().get(timeout=10) == 40, "chain")
    three = chain(s("tasks.add", (2, 2)), s("tasks.mul", (10,)), s("tasks.add", (2,)))()
    check(three.get(timeout=10) == 42, "three-step chain")
    check(three.parent.get(timeout=1) == 40, "chain parent result")
    g = group(s("tasks.add", (i, i)) for i in range(10))()
    check(g.get(timeout=10) == [2 * i for i in range(10)], "group")
    c = chord(group(s("tasks.add", (i, i)) for i in range(10)), s("tasks.tsum"))()
    check(c.get(timeout=10) == 90, "chord")
    linked = s("tasks.add", (2, 2)).apply_async(link=s("tasks.mul", (3,)).set(task_id="link-cb-1"))
    check(linked.get(timeout=10) == 4, "linked task")
    from celery.result import AsyncResult as R
    check(R("link-cb-1", app=app).get(timeout=10) == 12, "link callback")
    print("chain 40, 42; group; chord 90; link 12")


def canvas_errors():
    from celery import chain, chord, group

    s = app.signature
    failing = chain(s("tasks.fail", ("step one broke",)), s("tasks.add", (1,)).set(task_id="never-runs-1"))()
    try:
        failing.get(timeout=10)
        check(False, "failed chain returned")
    except Exception as exc:
        check(str(exc) == "step one broke", f"chain error {exc!r}")
    from celery.result import AsyncResult as R
    check(R("never-runs-1", app=app).state == "FAILURE", "remaining chain step marked FAILURE")
    bad = chord([s("tasks.add", (1, 1)), s("tasks.fail", ("member broke",))], s("tasks.tsum"))()
    try:
        bad.get(timeout=10)
        check(False, "failed chord returned")
    except Exception as exc:
        # Celery's client raises the failed member's error first (it checks the parents).
        check("member broke" in str(exc), f"chord error text {exc}")
    deadline = time.time() + 10
    while bad.state != "FAILURE":
        check(time.time() < deadline, f"chord callback state {bad.state}")
        time.sleep(0.05)
    check(type(bad.result).__name__ == "ChordError", f"callback result {bad.result!r}")
    check("member broke" in str(bad.result), f"ChordError text {bad.result}")
    eb = s("tasks.echo").set(task_id="errback-1")
    s("tasks.fail", ("x",)).apply_async(link_error=eb, task_id="failed-with-errback")
    got = R("errback-1", app=app).get(timeout=10)
    check(got == "failed-with-errback", f"errback got {got!r}")
    print("chain failure propagated; ChordError; errback called")


def python_tasks():
    """Tasks written in Python (examples/python, built with taskhost build): results,
    bound arguments, a bundled library, and failures as a Celery client sees them."""
    got = app.send_task("py.add", (2, 40)).get(timeout=120)
    check(got == 42, f"py.add(2, 40) returned {got!r}")
    got = app.send_task("py.add", args=[1], kwargs={"y": 2}).get(timeout=30)
    check(got == 3, f"py.add(1, y=2) returned {got!r}")
    got = app.send_task("py.wordcount", ("the cat and the hat",), {"top": 1}).get(timeout=120)
    check(got == {"words": 5, "top": [["the", 2]]}, f"py.wordcount returned {got!r}")
    html = app.send_task("py.report", ("Q1 <sales>", [{"name": "a&b", "amount": 1.5}, {"name": "c", "amount": 2}])).get(timeout=120)
    check("<h1>Q1 &lt;sales&gt;</h1>" in html and "a&amp;b" in html and "<th>3.50</th>" in html, f"py.report rendered {html!r}")
    # Raised as a Celery worker's would be: the same class, the same message.
    failed = app.send_task("py.fail", ("boom",))
    try:
        failed.get(timeout=120)
        check(False, "py.fail did not raise")
    except ValueError as e:
        check(str(e) == "boom" and type(e) is ValueError, f"py.fail raised {e!r}")
    check(failed.state == "FAILURE", f"py.fail ended {failed.state}")
    check('fail.py", line' in (failed.traceback or "") and "ValueError: boom" in failed.traceback,
          f"py.fail's traceback: {failed.traceback!r}")
    missing = app.send_task("py.add", (1,))
    try:
        missing.get(timeout=30)
        check(False, "py.add(1) did not raise")
    except TypeError as e:
        check(str(e) == "py.add() missing a required argument: 'y'", f"py.add(1) raised {e!r}")
    # An exception class of the task's own: a class of that name, never one the client resolves.
    custom = app.send_task("py.fail", ("late",), {"kind": "InvoiceError"})
    try:
        custom.get(timeout=30)
        check(False, "py.fail(kind=InvoiceError) did not raise")
    except Exception as e:
        check(type(e).__name__ == "InvoiceError" and str(e) == "late", f"py.fail(kind=InvoiceError) raised {e!r}")
    print("python tasks: results, kwargs, jinja2, failures")


def tally(task, count, args_cycle="[[]]"):
    """Sends COUNT tasks (args taken in turn from ARGS_CYCLE) and prints how many returned
    each value and how many failed, as JSON: what a rollout test counts."""
    cycle = json.loads(args_cycle)
    results = [app.send_task(task, tuple(cycle[i % len(cycle)])) for i in range(int(count))]
    values, failed = {}, 0
    for r in results:
        try:
            v = json.dumps(r.get(timeout=120))
            values[v] = values.get(v, 0) + 1
        except Exception:
            failed += 1
    print(json.dumps({"values": values, "failed": failed}))


def sql_results():
    """On a SQL result backend (RESULT_BACKEND=db+postgresql://… or db+mysql+pymysql://…): a
    group saved to celery_tasksetmeta and restored, and with RESULT_EXTENDED the extended
    columns as Celery's DatabaseBackend reads them."""
    from celery import group
    from celery.result import GroupResult

    s = app.signature
    g = group(s("tasks.add", (i, i)) for i in range(5))()
    g.save()
    restored = GroupResult.restore(g.id, app=app)
    check(restored is not None, "saved group not restored")
    check(restored.get(timeout=30) == [0, 2, 4, 6, 8], f"restored group {restored!r}")
    r = app.send_task("tasks.add", (2, 3))
    check(r.get(timeout=10) == 5, "tasks.add")
    meta = app.backend.get_task_meta(r.id)
    check(meta["status"] == "SUCCESS" and meta["date_done"] is not None, f"meta {meta!r}")
    if os.environ.get("RESULT_EXTENDED"):
        check(meta.get("name") == "tasks.add", f"extended name {meta.get('name')!r}")
        check(meta.get("args") == [2, 3] and meta.get("kwargs") == {}, f"extended args {meta.get('args')!r} {meta.get('kwargs')!r}")
        check(meta.get("retries") == 0 and meta.get("queue") == "celery", f"extended retries/queue {meta!r}")
        check((meta.get("worker") or "").startswith("taskhost@"), f"extended worker {meta.get('worker')!r}")
    print("group saved and restored; meta read")


def celery_tables(url, extended):
    """Creates Celery's own tables at URL (SQLAlchemy's DDL), for comparison with taskhost's."""
    own = Celery("ddl", broker="memory://", backend=url)
    own.conf.result_extended = extended == "1"
    own.backend._create_tables()
    print("created")


SCENARIOS = {f.__name__: f for f in [canvas, canvas_errors, add, kwargs, send, later, wait, state, fail, time_limit, states, many, countdown, expires,
                                     revoke_terminate, revoke_queued, inspect, python_tasks, tally, sql_results, celery_tables]}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])
