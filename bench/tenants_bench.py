"""make bench's tenant scenarios, and the flood acceptance test's driver (tests/e2e/tenants.rs
runs `python bench/tenants_bench.py flood ... --json`).

flood: tenant a queues a flood of 5 ms tasks (tasks.burn(5000)) through a worker of 2
processes x 16 sandboxes with fair dispatch on; once the worker is busy, b sends 100 of
the same. Each burn returns when it started and finished (its own clock), so b's start
latency is measured by the tasks: start - the moment b's messages were pushed. a's
throughput is what left its queues over a window before b arrived; the same run with
fairness off (the same tenants, no weights: arrival order) is the baseline. Messages are
real Celery client bytes: one is sent with Celery, then copied with fresh ids (and task
names spread over --names components, queues over --queues) and pushed in batches.

drain: `taskhost bench drain` of no-op tasks spread over 10 tenants, with fairness on
(equal weights), with the policy but no weights (metering, claims), and with no policy,
alternating, on one Redis.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BURN = 5000  # tasks.burn(5000): ~5 ms of CPU


def celery_template(app, r, task, args, tenant, ignore_result=False):
    """One message exactly as Celery's client writes it, taken back off a scratch queue."""
    queue = f"template.{uuid.uuid4().hex}"
    result = app.send_task(task, args=args, queue=queue, headers={"taskhost_tenant": tenant}, ignore_result=ignore_result)
    raw = r.rpop(queue)
    env = json.loads(raw)
    return raw.decode(), result.id, env["properties"]["delivery_tag"]


def push_copies(r, template, count, names=None, queues=("celery",), batch=1000):
    """Pushes `count` copies of a Celery message, each with its own id and delivery tag, the
    task name cycling through `names` and the queue through `queues`; returns the ids."""
    raw, tid, tag = template
    base_name = json.loads(raw)["headers"]["task"]
    ids = []
    pipe = r.pipeline(transaction=False)
    for i in range(count):
        new_id, new_tag = str(uuid.uuid4()), str(uuid.uuid4())
        m = raw.replace(tid, new_id).replace(tag, new_tag)
        if names:
            m = m.replace(f'"{base_name}"', f'"{names[i % len(names)]}"')
        pipe.lpush(queues[i % len(queues)], m)
        ids.append(new_id)
        if len(pipe) >= batch:
            pipe.execute()
    pipe.execute()
    return ids


def named_plugins(plugins, names):
    """A plugins dir where tasks.burn is also every one of `names` (hard links: one compile)."""
    tmp = Path(tempfile.mkdtemp(prefix="taskhost-flood-"))
    src = Path(plugins) / "tasks.burn@1.0.0.wasm"
    for name in ["tasks.burn", *names]:
        dst = tmp / f"{name}@1.0.0.wasm"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return tmp


def remaining(r, queues, tenant):
    """a's messages not yet run: in kombu's lists, sorted into its fair lists, or held."""
    n = sum(r.llen(q) for q in queues) + sum(r.llen(f"taskhost.fair:{q}\x1f{tenant}") for q in queues)
    return n + r.hlen("unacked")


def wait_ready(app, nodes, proc, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"taskhost serve exited with {proc.returncode}")
        try:
            if len(app.control.inspect(timeout=0.5).ping() or {}) >= nodes:
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit("taskhost serve did not become ready")


def flood(taskhost, plugins, url, a_tasks, b_tasks=100, fair=True, processes=2, concurrency=16, names=1, queues=1,
          window=3.0, b_timeout=20.0):
    import redis
    from celery import Celery

    r = redis.Redis.from_url(url)
    r.flushdb()
    app = Celery("flood", broker=url, backend=url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    queue_names = ["celery"] + [f"bulk{i}" for i in range(1, queues)]
    task_names = [f"flood.t{i}" for i in range(names)] if names > 1 else None
    tmp = Path(tempfile.mkdtemp(prefix="taskhost-flood-policy-"))
    policy = tmp / "tenants.toml"
    weight = "weight = 1\n" if fair else ""
    policy.write_text(f"[tenants.a]\n{weight}[tenants.b]\n{weight}")
    plugin_dir = named_plugins(plugins, task_names) if task_names else Path(plugins)
    cmd = [taskhost, "serve", "--plugins", str(plugin_dir), "-p", str(processes), "-c", str(concurrency), "--broker", url,
           "-Q", ",".join(queue_names), "--tenants", str(policy), "--track-started", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    out = {"fair": fair, "a_tasks": a_tasks, "b_tasks": b_tasks, "processes": processes, "concurrency": concurrency,
           "names": names, "queues": queues, "burn": BURN}
    try:
        wait_ready(app, processes, proc)
        # a's flood: Celery's bytes, ignore_result as a bulk producer would send them.
        a_template = celery_template(app, r, "tasks.burn", (BURN,), "a", ignore_result=True)
        start = time.time()
        push_copies(r, a_template, a_tasks, task_names, queue_names)
        out["a_enqueue_s"] = time.time() - start
        # The worker at full speed on a's flood; then a's throughput over a window.
        time.sleep(1.0)
        before, t0 = remaining(r, queue_names, "a"), time.time()
        time.sleep(window)
        after, t1 = remaining(r, queue_names, "a"), time.time()
        out["a_per_s"] = (before - after) / (t1 - t0)
        # b's tasks all at once, on the default queue.
        b_template = celery_template(app, r, "tasks.burn", (BURN,), "b")
        sent = time.time()
        ids = push_copies(r, b_template, b_tasks, None, ["celery"])
        ran = {}
        deadline = sent + b_timeout
        while len(ran) < len(ids) and time.time() < deadline:
            keys = [f"celery-task-meta-{i}" for i in ids if i not in ran]
            for i, v in zip([i for i in ids if i not in ran], r.mget(keys)):
                if v is not None:
                    meta = json.loads(v)
                    if meta.get("status") != "SUCCESS":
                        raise SystemExit(f"b's task {i} ended {meta.get('status')}: {meta.get('result')}")
                    ran[i] = meta["result"]
            time.sleep(0.01)
        starts = sorted(v["started_ms"] / 1000 - sent for v in ran.values())
        out["b_done"] = len(ran)
        if starts:
            out["b_first_start_ms"] = starts[0] * 1000
            out["b_start_p50_ms"] = statistics.median(starts) * 1000
            out["b_start_p99_ms"] = starts[max(0, int(len(starts) * 0.99) - 1)] * 1000
        if len(ran) == len(ids):
            out["b_all_done_ms"] = (max(v["finished_ms"] for v in ran.values()) / 1000 - sent) * 1000
        out["a_left"] = remaining(r, queue_names, "a")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        r.flushdb()
        shutil.rmtree(tmp, ignore_errors=True)
        if task_names:
            shutil.rmtree(plugin_dir, ignore_errors=True)
    return out


def process_cpu_s(pid):
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain_rates(taskhost, plugins, url, count, rounds, tenants=10, redis_pid=None):
    """tasks/s of `bench drain` per setting, alternating the settings in each round, and
    the CPU µs per task of the drain's processes (queueing included) and of redis-server."""
    import redis
    import resource

    r = redis.Redis.from_url(url)
    tmp = Path(tempfile.mkdtemp(prefix="taskhost-drain-policy-"))
    fair = tmp / "fair.toml"
    fair.write_text("".join(f"[tenants.t{i}]\nweight = 1\n" for i in range(tenants)))
    plain = tmp / "plain.toml"
    plain.write_text("".join(f"[tenants.t{i}]\n" for i in range(tenants)))
    settings = {"no policy": [], "policy, no weights": ["--tenants", str(plain)], "fair, equal weights": ["--tenants", str(fair)]}
    rates = {k: [] for k in settings}
    worker_us = {k: [] for k in settings}
    redis_us = {k: [] for k in settings}
    for _ in range(rounds):
        for label, extra in settings.items():
            r.flushdb()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            redis_before = process_cpu_s(redis_pid) if redis_pid else 0.0
            got = subprocess.run([taskhost, "bench", "drain", "--plugins", plugins, "--broker", url, "--count", str(count),
                                  "--spread-tenants", str(tenants), "--json", *extra],
                                 check=True, capture_output=True, text=True).stdout
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            rates[label].append(json.loads(got)["tasks_per_sec"])
            worker_us[label].append((after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / count * 1e6)
            if redis_pid:
                redis_us[label].append((process_cpu_s(redis_pid) - redis_before) / count * 1e6)
    r.flushdb()
    shutil.rmtree(tmp, ignore_errors=True)
    return {k: {"runs": v, "median_per_s": statistics.median(v), "drain_cpu_us_per_task": statistics.median(worker_us[k]),
                **({"redis_cpu_us_per_task": statistics.median(redis_us[k])} if redis_pid else {})}
            for k, v in rates.items()}


def run_tenants(h, taskhost, plugins, scale, progress):
    """h: the run.py helpers (Redis, ...)."""
    rds = h.Redis()
    out = {}
    # A smoke run (make test) only checks the scenarios work: small floods, one round.
    smoke = scale < 0.1
    a_tasks = max(500, int(100_000 * scale))
    window, rounds = (1.0, 1) if smoke else (3.0, 3)
    names = min(1000, a_tasks)
    try:
        with progress.step(f"tenants: flood of {a_tasks} 5-ms tasks, then 100 of another tenant, fair"):
            out["flood_fair"] = flood(taskhost, plugins, rds.url, a_tasks, window=window)
        with progress.step("tenants: the same flood in arrival order (no weights)"):
            out["flood_fifo"] = flood(taskhost, plugins, rds.url, a_tasks, fair=False, window=window, b_timeout=5.0)
        with progress.step(f"tenants: flood over {names} task names and two queues, fair"):
            out["flood_spread"] = flood(taskhost, plugins, rds.url, a_tasks, names=names, queues=2, window=window)
        count = max(1000, int(100_000 * scale))
        with progress.step(f"tenants: no-op drain of {count} over 10 tenants, fairness on / policy only / off, {rounds} round(s)"):
            out["drain"] = drain_rates(taskhost, plugins, rds.url, count, rounds, redis_pid=rds.proc.pid)
    finally:
        rds.stop()
    return out


def report_tenants(t):
    print("\nTenants")
    if any(k.startswith("flood") for k in t):
        print("  a floods 5-ms tasks through 2 processes x 16 sandboxes; then b sends 100 at once")
        print(f"  {'run':34}{'a tasks':>9}{'a tasks/s':>11}{'b first ms':>12}{'b p50 ms':>10}{'b p99 ms':>10}{'b all ms':>10}{'b done':>8}")
    for key, label in [("flood_fair", "fair (weights 1/1)"), ("flood_fifo", "arrival order (no weights)"),
                       ("flood_spread", "fair, a over many names, 2 queues")]:
        f = t.get(key)
        if not f:
            continue
        if f.get("names", 1) > 1:
            label = f"fair, a over {f['names']} names, {f['queues']} queues"
        cell = lambda k: f"{f[k]:.0f}" if k in f else "-"
        print(f"  {label:34}{f['a_tasks']:>9}{f['a_per_s']:>11.0f}{cell('b_first_start_ms'):>12}{cell('b_start_p50_ms'):>10}"
              f"{cell('b_start_p99_ms'):>10}{cell('b_all_done_ms'):>10}{f['b_done']:>8}")
    if "flood_fair" in t and "flood_fifo" in t:
        print(f"  a's throughput with fairness on: {100 * t['flood_fair']['a_per_s'] / t['flood_fifo']['a_per_s']:.0f}% of arrival order's")
    d = t.get("drain")
    if d:
        off = d["no policy"]["median_per_s"]
        print("  no-op drain over 10 tenants (median of alternating runs; CPU µs per task: the drain's processes, "
              "which also queue the tasks, + redis):")
        for k, v in d.items():
            cpu = f"{v['drain_cpu_us_per_task']:.1f} + {v.get('redis_cpu_us_per_task', float('nan')):.1f}"
            print(f"    {k:22}{v['median_per_s']:>9.0f}/s {100 * v['median_per_s'] / off:>5.0f}%   CPU {cpu}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flood", help="one flood run against a Redis; prints its figures")
    f.add_argument("--taskhost", required=True)
    f.add_argument("--plugins", required=True)
    f.add_argument("--broker", required=True, help="a Redis URL this run may flush")
    f.add_argument("--a-tasks", type=int, default=100_000)
    f.add_argument("--b-tasks", type=int, default=100)
    f.add_argument("--names", type=int, default=1, help="spread a's flood over this many task names")
    f.add_argument("--queues", type=int, default=1, help="spread a's flood over this many queues")
    f.add_argument("--processes", type=int, default=2)
    f.add_argument("--concurrency", type=int, default=16)
    f.add_argument("--fifo", action="store_true", help="no weights: arrival order")
    f.add_argument("--json", action="store_true")
    d = sub.add_parser("drain", help="the no-op drain over 10 tenants, fairness on / policy only / off")
    d.add_argument("--taskhost", required=True)
    d.add_argument("--plugins", required=True)
    d.add_argument("--broker", required=True, help="a Redis URL this run may flush")
    d.add_argument("--redis-pid", type=int, help="redis-server's pid, to report its CPU per task")
    d.add_argument("--count", type=int, default=100_000)
    d.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "drain":
        report_tenants({"drain": drain_rates(args.taskhost, args.plugins, args.broker, args.count, args.rounds,
                                             redis_pid=args.redis_pid)})
    if args.cmd == "flood":
        got = flood(args.taskhost, args.plugins, args.broker, args.a_tasks, args.b_tasks, fair=not args.fifo,
                    processes=args.processes, concurrency=args.concurrency, names=args.names, queues=args.queues)
        if args.json:
            print(json.dumps(got))
        else:
            report_tenants({"flood_fair" if not args.fifo else "flood_fifo": got})


if __name__ == "__main__":
    main()
