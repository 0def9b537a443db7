"""`make bench`: taskhost and Celery side by side on one machine, in one run.

Starts its own redis-server on a free port, runs each scenario against Celery
(examples/tasks.py with -P prefork -c 2 and -P threads -c 8) and taskhost (one process per
core), prints one table with both figures and the ratio, and writes the figures as JSON
under bench/results/, with an SVG chart of them beside it (bench/chart.py). Counts scale
with --scale (CI runs a tiny smoke version). Each scenario's start and end go to stderr.

`run.py --chart-only bench/results/X.json` only redraws X.svg from X.json (no bench run,
and no package beyond the standard library needed).
"""
import argparse
import base64
import contextlib
import datetime
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from chart import write_chart
from io_bench import report_io, run_io
from publish_bench import report_publish, run_publish
from events_bench import report_events, run_events
from python_bench import report_python, run_python
from soak_bench import report_soak, run_soak
from sql_bench import report_sql, run_sql
from amqp_bench import report_amqp, run_amqp
from tenants_bench import report_tenants, run_tenants

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, wrapper=(), options=()):
        """`wrapper`: a command the server runs under (valgrind, say); `options`: more of
        redis-server's arguments."""
        import redis  # here, like celery and PIL, so that --chart-only needs none of them

        self.port = free_port()
        self.proc = subprocess.Popen(
            [*wrapper, "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.r = redis.Redis(port=self.port)
        for _ in range(200 if not wrapper else 2000):
            try:
                self.r.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise SystemExit("redis-server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def process_tree(pid):
    """A process and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return out


def memory_kb(p, field):
    """One field of /proc/<pid>/smaps_rollup (Rss, Pss, ...) in KiB; 0 if the process is gone."""
    try:
        with open(f"/proc/{p}/smaps_rollup") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_kb(pid):
    """Resident set of a process and its descendants, in KiB (shared pages counted in each)."""
    return sum(memory_kb(p, "Rss") for p in process_tree(pid))


def memory_figures(pid, when):
    """RSS of the whole tree, of its largest process, and PSS (shared pages split), in MB."""
    tree = process_tree(pid)
    rss = [memory_kb(p, "Rss") for p in tree]
    return {f"{when}_rss_mb": sum(rss) / 1024, f"{when}_rss_largest_process_mb": max(rss) / 1024,
            f"{when}_pss_mb": sum(memory_kb(p, "Pss") for p in tree) / 1024, f"{when}_processes": len(tree)}


class Worker:
    """A worker under test: started, measured, stopped."""

    def __init__(self, name, cmd, env=None, cwd=None):
        self.name, self.cmd, self.env, self.cwd = name, cmd, env, cwd
        self.proc = None

    def start(self, ready, settle=0.5):
        """Starts the worker and waits until `ready()`, then `settle` seconds more."""
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env={**os.environ, **(self.env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not ready():
            if time.time() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{self.name} did not become ready")
            time.sleep(0.05)
        time.sleep(settle)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Progress:
    """Numbered start and end lines on stderr, so a long `make bench` shows where it is."""

    def __init__(self, total):
        self.total, self.started = total, 0

    @contextlib.contextmanager
    def step(self, label):
        self.started += 1
        tag = f"[{self.started}/{self.total}]"
        print(f"{tag} {label} …", file=sys.stderr, flush=True)
        start = time.monotonic()
        yield
        print(f"{tag} … done in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def celery_app(url):
    from celery import Celery

    app = Celery("bench", broker=url, backend=url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    return app


def celery_ready(app):
    """A readiness check for Worker.start: some worker answers Celery's ping."""

    def ready():
        try:
            return bool(app.control.inspect(timeout=0.5).ping())
        except Exception:
            return False

    return ready


def run_header(args):
    """What every results file starts with: the machine, the date, the scale."""
    return {"machine": {"cores": os.cpu_count() or 1, "platform": platform.platform(), "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "scale": args.scale}


def fill(taskhost, url, queue, count, task="tasks.noop", ignore_result=True, args="[]"):
    """Pre-queues `count` messages on `queue` with taskhost's producer (fast, Celery's format)."""
    cmd = [taskhost, "send", task, "--args", args, "--broker", url, "-Q", queue, "--count", str(count)]
    if ignore_result:
        cmd.append("--ignore-result")
    subprocess.run(cmd, check=True, capture_output=True)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """User + system CPU time used so far by these processes (0 for any that is gone)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / CLOCK_TICKS


def drain(rds, worker_queue, fill_queue, count, results, worker_pid=None):
    """Moves the pre-filled list under the consumed name at once, then times the drain.
    Returns tasks/s and, per task, the CPU microseconds the worker processes and
    redis-server spent (where the time goes, beside how fast it went)."""
    baseline = rds.r.dbsize()
    workers = process_tree(worker_pid) if worker_pid else []
    cpu_before = cpu_seconds(workers), cpu_seconds([rds.proc.pid])
    idle_before = machine_idle()
    start = time.time()
    rds.r.rename(fill_queue, worker_queue)
    while True:
        if rds.r.llen(worker_queue) == 0 and rds.r.hlen("unacked") == 0:
            if not results or rds.r.dbsize() >= baseline - 1 + count:
                break
        time.sleep(0.005)
    took = time.time() - start
    cpu_after = cpu_seconds(workers), cpu_seconds([rds.proc.pid])
    idle_after = machine_idle()
    per_task_us = [(a - b) / count * 1e6 for a, b in zip(cpu_after, cpu_before)]
    idle = (idle_after[0] - idle_before[0]) / max(1, idle_after[1] - idle_before[1])
    return count / took, {"worker_cpu_us_per_task": per_task_us[0], "redis_cpu_us_per_task": per_task_us[1],
                          "idle_share": idle}


def worker_floor(taskhost, plugins, rds, count, rounds=2):
    """The worker's CPU per no-op with its sandboxes and without any (`bench drain
    --without-sandbox`: fetch, decode, checks and ack, no guest), alternating, on the same
    Redis: what the worker costs around the sandbox, and what the sandbox costs inside it."""
    runs = {"with_sandbox": [], "without_sandbox": []}
    for _ in range(rounds):
        for key, flag in (("with_sandbox", []), ("without_sandbox", ["--without-sandbox"])):
            rds.r.flushdb()
            got = json.loads(subprocess.run([taskhost, "bench", "drain", "--plugins", plugins, "--broker", rds.url,
                                             "--count", str(count), "--json", *flag],
                                            check=True, capture_output=True, text=True).stdout)
            runs[key].append(got)
    rds.r.flushdb()
    return {key: {"tasks_per_sec": [r["tasks_per_sec"] for r in rs],
                  "worker_cpu_us_per_task": [r["worker_cpu_us_per_task"] for r in rs]} for key, rs in runs.items()}


def machine_idle():
    """(idle + iowait ticks, all ticks) of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is counted in user)
    return ticks[3] + ticks[4], sum(ticks[:8])


def round_trip(app, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        app.send_task("tasks.noop").get(timeout=30)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def thumbnails(app, n, image):
    start = time.time()
    pending = [app.send_task("media.thumbnail", (image, 128), queue="media_heavy") for _ in range(n)]
    for r in pending:
        r.get(timeout=300)
    return n / (time.time() - start)


def test_image(width=1024, height=768, step=4):
    """A PNG (base64) of `width` x `height` with a pixel set every `step`."""
    from PIL import Image

    img = Image.new("RGB", (width, height))
    px = img.load()
    for x in range(0, width, step):
        for y in range(0, height, step):
            px[x, y] = (x % 256, y % 256, (x * y) % 256)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--taskhost", default=str(ROOT / "target/release/taskhost"))
    ap.add_argument("--plugins", default=str(ROOT / "dist/plugins"))
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every count (0.01 for a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--chart-only", metavar="JSON", help="only redraw the SVG chart of this results file")
    ap.add_argument("--slow-server", default=str(ROOT / "target/release/slow-server"),
                    help="the I/O scenario's HTTP peer (cargo build --release -p slow-server)")
    ap.add_argument("--only-io", action="store_true", help="run only the I/O scenario (http.fetch against a 1-s server)")
    ap.add_argument("--python-plugins", default=str(ROOT / "dist/python-plugins"),
                    help="the Python example components (make plugins builds them with componentize-py)")
    ap.add_argument("--only-python", action="store_true", help="run only the Python-task scenario (py.noop against Celery)")
    ap.add_argument("--only-publish", action="store_true",
                    help="run only the release scenario (publish -> every following worker serving, 20 rounds)")
    ap.add_argument("--only-events", action="store_true",
                    help="run only the events scenario (the no-op drain with Celery task events off and on)")
    ap.add_argument("--only-soak", action="store_true",
                    help="run only the memory soak (10 million no-op tasks, then 100,000 thumbnails; RSS sampled)")
    ap.add_argument("--only-sql", action="store_true",
                    help="run only the SQL-backend scenario (results in PostgreSQL, taskhost against Celery)")
    ap.add_argument("--only-amqp", action="store_true",
                    help="run only the RabbitMQ scenario (the no-op drain with RabbitMQ as the broker, taskhost against Celery)")
    ap.add_argument("--only-tenants", action="store_true",
                    help="run only the tenant scenarios (a flood and a late tenant; the drain with fairness on and off)")
    args = ap.parse_args()
    if args.chart_only:
        print(f"written {write_chart(args.chart_only)}")
        return
    n = lambda base: max(10, int(base * args.scale))
    cores = os.cpu_count() or 1
    python = sys.executable
    h = sys.modules[__name__]
    # One scenario alone: (asked for, its key, how it runs, its steps, how it reports).
    alone = [
        (args.only_io, "io", lambda p: run_io(h, args.taskhost, args.plugins, args.slow_server, args.scale, p), 7, report_io),
        (args.only_python, "python", lambda p: run_python(h, args.taskhost, args.python_plugins, args.scale, p), 6,
         report_python),
        (args.only_publish, "publish", lambda p: run_publish(h, args.taskhost, args.plugins, args.scale, p), 2,
         report_publish),
        (args.only_tenants, "tenants", lambda p: run_tenants(h, args.taskhost, args.plugins, args.scale, p), 4,
         report_tenants),
        (args.only_events, "events", lambda p: run_events(h, args.taskhost, args.plugins, args.scale, p), 1, report_events),
        (args.only_soak, "soak", lambda p: run_soak(h, args.taskhost, args.plugins, args.scale, p), 2, report_soak),
        (args.only_sql, "sql", lambda p: run_sql(h, args.taskhost, args.plugins, args.scale, p), 2, report_sql),
        (args.only_amqp, "amqp", lambda p: run_amqp(h, args.taskhost, args.plugins, args.scale, p), 2, report_amqp),
    ]
    for asked, key, run, steps, report_one in alone:
        if asked:
            results = run_header(args)
            results[key] = run(Progress(steps))
            report_one(results[key])
            save(results, args, f"{key}-")
            return
    rds = Redis()
    url = rds.url
    app = celery_app(url)
    image = test_image()
    results = {**run_header(args), "systems": {}}
    ready_celery = celery_ready(app)

    systems = [
        ("celery prefork -c 2", Worker("celery-prefork", [python, "-m", "celery", "-A", "tasks", "worker", "-P", "prefork",
                                                          "-c", "2", "-Q", "celery,bench,media_heavy", "-l", "warning",
                                                          "--without-mingle", "--without-gossip"],
                                        env={"BROKER": url}, cwd=EXAMPLES), ready_celery),
        ("celery threads -c 8", Worker("celery-threads", [python, "-m", "celery", "-A", "tasks", "worker", "-P", "threads",
                                                          "-c", "8", "-Q", "celery,bench,media_heavy", "-l", "warning",
                                                          "--without-mingle", "--without-gossip"],
                                        env={"BROKER": url}, cwd=EXAMPLES), ready_celery),
        (f"taskhost -p {cores} -c 32", Worker("taskhost", [args.taskhost, "serve", "--plugins", args.plugins, "-p", str(cores),
                                                           "-c", "32", "-Q", "celery,bench,media_heavy", "--broker", url,
                                                           "--track-started", "false"],
                                              env={"RUST_LOG": "warn"}), ready_celery),
    ]

    # Two enqueue rates and the ceiling; per system, its start and five measures; taskhost's sustained drain.
    progress = Progress(3 + 6 * len(systems) + 1 + 1 + 7 + 4 + 6 + 2 + 1 + 2 + 2)

    # Enqueue rate from one producer: the Python client, and taskhost's CLI producer.
    count = n(5000)
    with progress.step("enqueue, python celery client"):
        start = time.time()
        for _ in range(count):
            app.send_task("tasks.noop", queue="enqueue.py", ignore_result=True)
        py_rate = count / (time.time() - start)
    with progress.step("enqueue, taskhost send --count (batched)"):
        start = time.time()
        fill(args.taskhost, url, "enqueue.th", count)
        th_rate = count / (time.time() - start)
    results["enqueue"] = {"python celery client": py_rate, "taskhost send --count (batched)": th_rate}
    rds.r.flushdb()

    with progress.step("sandbox ceiling: taskhost bench runtime"):
        ceiling = json.loads(subprocess.run([args.taskhost, "bench", "runtime", "--plugins", args.plugins, "--processes",
                                             str(cores), "--seconds", str(max(1.0, 3 * min(args.scale, 1.0))), "--json"],
                                            check=True, capture_output=True, text=True).stdout)
    results["sandbox_ceiling"] = ceiling

    for label, worker, ready in systems:
        is_taskhost = worker.name == "taskhost"
        fig = {}
        rds.r.flushdb()
        with progress.step(f"start worker: {label}"):
            worker.start(ready)
        fig.update(memory_figures(worker.proc.pid, "idle"))
        drain_n = n(100_000 if is_taskhost else 20_000)
        with progress.step(f"drain, results ignored: {label}"):
            fill(args.taskhost, url, "bench.fill", drain_n)
            fig["drain_ignored_per_s"], fig["drain_ignored_cpu"] = drain(rds, "bench", "bench.fill", drain_n,
                                                                         results=False, worker_pid=worker.proc.pid)
        rds.r.flushdb()
        with progress.step(f"drain, results stored: {label}"):
            fill(args.taskhost, url, "bench.fill", drain_n, ignore_result=False)
            fig["drain_results_per_s"], fig["drain_results_cpu"] = drain(rds, "bench", "bench.fill", drain_n,
                                                                         results=True, worker_pid=worker.proc.pid)
        rds.r.flushdb()
        with progress.step(f"round trip, python client: {label}"):
            p50, p99 = round_trip(app, n(1000))
        fig["round_trip_p50_ms"], fig["round_trip_p99_ms"] = p50, p99
        # The same measure from taskhost's Rust client, which adds far less of its own.
        with progress.step(f"round trip, rust client: {label}"):
            native = json.loads(subprocess.run([args.taskhost, "bench", "roundtrip", "--broker", url, "--count",
                                                str(n(1000)), "--json"], check=True, capture_output=True, text=True).stdout)
        fig["native_round_trip_p50_ms"], fig["native_round_trip_p99_ms"] = native["p50_ms"], native["p99_ms"]
        with progress.step(f"media.thumbnail: {label}"):
            fig["thumbnails_per_s"] = thumbnails(app, n(200), image)
        if is_taskhost:
            fig["rss_before_1m_mb"] = rss_kb(worker.proc.pid) / 1024
            big = n(1_000_000)
            rds.r.flushdb()
            with progress.step(f"sustained drain of {big} tasks: {label}"):
                fill(args.taskhost, url, "bench.fill", big)
                fig["sustained_per_s"], _ = drain(rds, "bench", "bench.fill", big, results=False)
            fig["sustained_count"] = big
        fig.update(memory_figures(worker.proc.pid, "after"))
        worker.stop()
        results["systems"][label] = fig
    with progress.step("the worker's own cost: bench drain with and without a sandbox"):
        results["worker_floor"] = worker_floor(args.taskhost, args.plugins, rds, n(100_000))
    rds.stop()
    # I/O-bound tasks: a Redis of its own, the same machine, right after.
    results["io"] = run_io(sys.modules[__name__], args.taskhost, args.plugins, args.slow_server, args.scale, progress)
    # Tenants: a flood and a late tenant; what fairness costs the drain.
    results["tenants"] = run_tenants(sys.modules[__name__], args.taskhost, args.plugins, args.scale, progress)
    # Tasks written in Python against Celery's native no-op.
    results["python"] = run_python(sys.modules[__name__], args.taskhost, args.python_plugins, args.scale, progress)
    # Releases: publish -> every following worker serving.
    results["publish"] = run_publish(sys.modules[__name__], args.taskhost, args.plugins, args.scale, progress)
    # Celery events: what they cost the drain.
    results["events"] = run_events(sys.modules[__name__], args.taskhost, args.plugins, args.scale, progress)
    # Results in PostgreSQL (Celery's database backend) against Celery on the same database.
    results["sql"] = run_sql(sys.modules[__name__], args.taskhost, args.plugins, args.scale, progress)
    # RabbitMQ as the broker, against Celery on the same server.
    results["amqp"] = run_amqp(sys.modules[__name__], args.taskhost, args.plugins, args.scale, progress)

    report(results)
    report_io(results["io"])
    report_tenants(results["tenants"])
    report_python(results["python"])
    report_publish(results["publish"])
    report_events(results["events"])
    report_sql(results["sql"])
    report_amqp(results["amqp"])
    save(results, args)


def save(results, args, prefix=""):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    day = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    path = out / f"{prefix}{day}-{commit or 'nogit'}{'-dirty' if dirty else ''}-scale{args.scale}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {path}")
    if "systems" in results:
        print(f"written {write_chart(path)}")


def report(res):
    systems = res["systems"]
    names = list(systems)
    th = [k for k in names if k.startswith("taskhost")][0]
    celery = [k for k in names if k.startswith("celery")]
    rows = [
        ("drain, results ignored (tasks/s)", "drain_ignored_per_s", True),
        ("drain, results stored (tasks/s)", "drain_results_per_s", True),
        ("round trip p50, python client (ms)", "round_trip_p50_ms", False),
        ("round trip p99, python client (ms)", "round_trip_p99_ms", False),
        ("round trip p50, rust client (ms)", "native_round_trip_p50_ms", False),
        ("round trip p99, rust client (ms)", "native_round_trip_p99_ms", False),
        ("media.thumbnail (images/s)", "thumbnails_per_s", True),
        ("idle RSS, all processes (MB)", "idle_rss_mb", False),
        ("idle RSS, largest process (MB)", "idle_rss_largest_process_mb", False),
        ("idle PSS, all processes (MB)", "idle_pss_mb", False),
        ("RSS after the run, all (MB)", "after_rss_mb", False),
        ("RSS after, largest process (MB)", "after_rss_largest_process_mb", False),
    ]
    print(f"\nmachine: {res['machine']['cores']} cores, {res['machine']['platform']}; scale {res['scale']}")
    head = f"{'scenario':34}" + "".join(f"{n:>22}" for n in names) + f"{'taskhost / best celery':>24}"
    print(head)
    print("-" * len(head))
    for label, key, higher in rows:
        vals = [systems[n].get(key) for n in names]
        best = max if higher else min
        cel = best(systems[c][key] for c in celery)
        ratio = systems[th][key] / cel if higher else cel / systems[th][key]
        print(f"{label:34}" + "".join(f"{v:>22.1f}" for v in vals) + f"{ratio:>23.1f}×")
    e = res["enqueue"]
    print(f"\nenqueue, one producer: python celery client {e['python celery client']:.0f}/s, "
          f"taskhost send --count (batched) {e['taskhost send --count (batched)']:.0f}/s")
    c = res["sandbox_ceiling"]
    print(f"sandbox ceiling ({c['processes']} processes): bare {c['bare']['tasks_per_sec']:.0f}/s, "
          f"Runtime::run {c['taskhost']['tasks_per_sec']:.0f}/s; worker drain = "
          f"{100 * systems[th]['drain_ignored_per_s'] / c['bare']['tasks_per_sec']:.0f}% of the bare ceiling")
    # Where a no-op task's time goes: the bare loop's CPU per task against what the worker
    # processes and redis-server spent per task in the drain.
    bare_us = c["processes"] / c["bare"]["tasks_per_sec"] * 1e6
    print(f"CPU per task in the drain (results ignored), in µs: bare sandbox loop {bare_us:.1f}; " + "; ".join(
        f"{n}: worker {systems[n]['drain_ignored_cpu']['worker_cpu_us_per_task']:.1f} + "
        f"redis {systems[n]['drain_ignored_cpu']['redis_cpu_us_per_task']:.1f}" for n in names))
    # The issue-23 figures: what the worker adds to the sandbox, the drain against what this
    # layout allows (every core busy with nothing but the bare sandbox and Redis's share),
    # and how close the results drain comes to the ignored one.
    t = systems[th]
    ign, stored = t["drain_ignored_cpu"], t.get("drain_results_cpu")
    overhead = ign["worker_cpu_us_per_task"] - bare_us
    limit = res["machine"]["cores"] / ((bare_us + ign["redis_cpu_us_per_task"]) / 1e6)
    print(f"worker overhead per no-op task: {ign['worker_cpu_us_per_task']:.1f} - {bare_us:.1f} (bare) = "
          f"{overhead:.1f} µs (target ≤ 5); limit of this layout: {res['machine']['cores']} cores ÷ "
          f"({bare_us:.1f} + {ign['redis_cpu_us_per_task']:.1f} µs) = {limit:,.0f}/s; drain "
          f"{t['drain_ignored_per_s']:,.0f}/s = {100 * t['drain_ignored_per_s'] / limit:.0f}% of it (target ≥ 85%)")
    if stored and "idle_share" in stored:
        print(f"results stored: drain {t['drain_results_per_s']:,.0f}/s = "
              f"{100 * t['drain_results_per_s'] / t['drain_ignored_per_s']:.0f}% of the ignored drain (target ≥ 80%); "
              f"cores idle {100 * stored['idle_share']:.1f}% (target ≤ 5%; ignored drain "
              f"{100 * ign.get('idle_share', 0):.1f}%); CPU per task worker {stored['worker_cpu_us_per_task']:.1f} + "
              f"redis {stored['redis_cpu_us_per_task']:.1f} µs")
        # What the CPU alone allows: with every core busy in both drains, stored/ignored is
        # the ratio of their CPU per task; the idle between the two takes the rest.
        cpu = lambda d: d["worker_cpu_us_per_task"] + d["redis_cpu_us_per_task"]
        cap = cpu(ign) / cpu(stored) if cpu(stored) > 0 else float("nan")
        print(f"results stored: the CPU per task alone caps that at {cpu(ign):.1f} / {cpu(stored):.1f} µs = "
              f"{100 * cap:.0f}%; at the idle measured, {100 * cap * (1 - stored['idle_share']) / max(1e-9, 1 - ign.get('idle_share', 0)):.0f}%")
    if "worker_floor" in res:
        f = res["worker_floor"]
        mean = lambda xs: sum(xs) / len(xs)
        with_us, without_us = (mean(f[k]["worker_cpu_us_per_task"]) for k in ("with_sandbox", "without_sandbox"))
        print(f"bench drain, alternating: worker CPU per no-op {with_us:.1f} µs with the sandbox, {without_us:.1f} µs "
              f"with none ({mean(f['without_sandbox']['tasks_per_sec']):,.0f}/s): the worker's own cost with no sandbox "
              f"at all is {without_us:.1f} µs (overhead target ≤ 5), and the sandbox costs {with_us - without_us:.1f} µs "
              f"inside the worker against {bare_us:.1f} µs in the bare loop")
    if "sustained_per_s" in t:
        print(f"sustained: {t['sustained_count']} tasks at {t['sustained_per_s']:.0f}/s "
              f"({t['sustained_per_s'] * 60 / 1e6:.2f}M/min); RSS {t['rss_before_1m_mb']:.1f} MB → {t['after_rss_mb']:.1f} MB")


if __name__ == "__main__":
    main()
