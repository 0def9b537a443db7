"""make bench's RabbitMQ scenario: the no-op drain with RabbitMQ as the broker, Celery
prefork -c 2 against taskhost on the same server, in one run, in a vhost made for the run
(rabbitmqctl) and deleted after it. taskhost keeps its state in a private redis-server.

A queue cannot be renamed on RabbitMQ as a Redis list is, so each system is started on a
pre-filled queue and timed from its first 5% to 95% of the queue consumed (ready count,
read by passive declares), which leaves out start-up and the last prefetch.
"""
import os
import subprocess
import sys
import time
import uuid

import amqp

from side_by_side import report_side_by_side


def rabbitmqctl(*args):
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True).stdout


def ready_count(channel, queue):
    try:
        return channel.queue_declare(queue, passive=True).message_count
    except amqp.exceptions.NotFound:
        return None


def timed_drain(url_vhost, queue, count, start_worker):
    """Messages per second between 5% and 95% of the queue consumed. The worker starts once
    the queue is being watched: started before, a fast one drained a small queue before the
    first look, and both ends of the span fell on one sample. Where a drain still goes from
    above 95% to below 5% between two looks, the rate is over the whole drain instead."""
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest", virtual_host=url_vhost)
    conn.connect()
    ch = conn.channel()
    low, high = count * 0.95, count * 0.05
    started = finished = None
    watched_from = time.time()
    start_worker()
    deadline = time.time() + 600
    while finished is None:
        n = ready_count(ch, queue)
        now = time.time()
        if n is not None and started is None and n <= low:
            started = (now, n)
        if n is not None and started is not None and n <= high:
            finished = (now, n)
        if now > deadline:
            raise SystemExit(f"the drain of {queue} did not finish: {n} left")
        time.sleep(0.01)
    conn.close()
    if finished[0] > started[0]:
        return (started[1] - finished[1]) / (finished[0] - started[0])
    return (count - finished[1]) / (finished[0] - watched_from)


def run_amqp(h, taskhost, plugins, scale, progress):
    vhost = f"taskhost-bench-{uuid.uuid4().hex[:8]}"
    try:
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"RabbitMQ scenario skipped: no RabbitMQ (rabbitmqctl) here ({e})")
        return {"skipped": str(e)}
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    rds = h.Redis()
    cores = os.cpu_count() or 1
    systems = [
        ("celery prefork -c 2", h.Worker("celery-prefork", [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "prefork",
                                                            "-c", "2", "-Q", "bench", "-l", "warning", "--without-mingle",
                                                            "--without-gossip"],
                                          env={"BROKER": url, "RESULT_BACKEND": rds.url}, cwd=h.EXAMPLES),
         max(500, int(10_000 * scale))),
        (f"taskhost -p {cores} -c 32", h.Worker("taskhost", [taskhost, "serve", "--plugins", plugins, "-p", str(cores), "-c", "32",
                                                             "-Q", "bench", "--broker", url, "--result-backend", rds.url,
                                                             "--track-started", "false"],
                                                env={"RUST_LOG": "warn"}),
         max(5000, int(200_000 * scale))),
    ]
    out = {"rabbitmq": rabbitmqctl("version").strip(), "systems": {}}
    try:
        for label, worker, count in systems:
            with progress.step(f"RabbitMQ: drain of {count} no-ops: {label}"):
                h.fill(taskhost, url, "bench", count)
                try:
                    rate = timed_drain(vhost, "bench", count, lambda: worker.start(lambda: True, settle=0))
                finally:
                    # A drain that failed leaves no worker behind on the machine.
                    if worker.proc is not None:
                        worker.stop()
            out["systems"][label] = {"count": count, "drain_per_s": rate}
    finally:
        rds.stop()
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)
    return out


def report_amqp(a):
    if "skipped" in a:
        print(f"\nRabbitMQ broker: skipped ({a['skipped']})")
        return
    report_side_by_side(f"\nRabbitMQ broker (RabbitMQ {a['rabbitmq']}): no-op drain, results ignored, 5%-95% of the queue",
                        a["systems"], "drain_per_s", 30)
