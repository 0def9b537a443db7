"""make bench's I/O scenario: http.fetch tasks against a local HTTP server that answers
after 1 s (bench/slow-server), taskhost against Celery's prefork and gevent pools running
the same task (examples/tasks.py), one after another on one Redis.

First the server is measured alone (slow-server check) at the concurrency each system
gets, so a slow server cannot pass for a slow worker. Each system's drain is timed from
the moment the pre-queued messages appear until every result is stored; its peak RSS is
sampled while it runs. Ideal = tasks / concurrency × 1 s.
"""
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

DELAY_S = 1.0


class SlowServer:
    def __init__(self, exe, port):
        self.exe, self.port = exe, port
        self.proc = subprocess.Popen([exe, "serve", str(port), str(int(DELAY_S * 1000))], stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("slow-server did not start")
        self.url = f"http://127.0.0.1:{port}/item"

    def check(self, count, concurrency):
        out = subprocess.run([self.exe, "check", str(self.port), str(count), str(concurrency)],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class PeakRss:
    """Samples the RSS of a process tree every 100 ms until stopped; keeps the peak."""

    def __init__(self, pid, rss_kb):
        self.pid, self.rss_kb, self.peak_kb = pid, rss_kb, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            self.peak_kb = max(self.peak_kb, self.rss_kb(self.pid))
            self.done.wait(0.1)

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak_kb / 1024


def fetch_plugins(plugins, origin):
    """A plugins dir with only http.fetch, granted the server's origin; 4 MiB a sandbox
    (the default 128 MiB cap would let the memory budget, not -c, bound concurrency)."""
    tmp = Path(tempfile.mkdtemp(prefix="taskhost-io-bench-"))
    (tmp / "http.fetch@1.0.0.wasm").write_bytes((Path(plugins) / "http.fetch@1.0.0.wasm").read_bytes())
    (tmp / "http.fetch@1.0.0.toml").write_text(
        f'time_limit = 60\nmemory_limit = "4MiB"\nmax_http_response_bytes = "1MiB"\n[grants]\nhttp = ["{origin}"]\n')
    return tmp


def run_io(h, taskhost, plugins, slow_server_exe, scale, progress):
    """h: the run.py helpers (Redis, Worker, fill, drain, rss_kb, memory_figures, ...)."""
    n = lambda base: max(10, int(base * scale))
    cores = os.cpu_count() or 1
    python = h.sys.executable
    rds = h.Redis()
    app = h.celery_app(rds.url)
    server = SlowServer(slow_server_exe, h.free_port())
    count = n(10_000)
    per_process = 1250
    th_concurrency = per_process * cores
    out = {"tasks": count, "delay_s": DELAY_S, "systems": {}}

    ready_celery = h.celery_ready(app)

    with progress.step(f"http server alone, {count} requests at {th_concurrency} and at 1000 concurrent"):
        out["server_alone"] = {str(c): server.check(count, c) for c in sorted({th_concurrency, 1000})}

    plugins_dir = fetch_plugins(plugins, f"http://127.0.0.1:{server.port}")
    celery_cmd = [python, "-m", "celery", "-A", "tasks", "worker", "-Q", "bench", "-l", "warning",
                  "--without-mingle", "--without-gossip"]
    systems = [
        (f"taskhost -p {cores} -c {per_process}", th_concurrency, count,
         h.Worker("taskhost", [taskhost, "serve", "--plugins", str(plugins_dir), "-p", str(cores), "-c", str(per_process),
                               "-Q", "bench", "--broker", rds.url, "--track-started", "false",
                               "--allow-http", f"http://127.0.0.1:{server.port}"], env={"RUST_LOG": "warn"})),
        ("celery gevent -c 1000", 1000, count,
         h.Worker("celery-gevent", celery_cmd + ["-P", "gevent", "-c", "1000"], env={"BROKER": rds.url}, cwd=h.EXAMPLES)),
        # At 2 tasks a second, 10,000 would take 80 minutes: prefork drains a sample.
        ("celery prefork -c 2", 2, n(40),
         h.Worker("celery-prefork", celery_cmd + ["-P", "prefork", "-c", "2"], env={"BROKER": rds.url}, cwd=h.EXAMPLES)),
    ]
    args = json.dumps([server.url])
    for label, concurrency, tasks, worker in systems:
        rds.r.flushdb()
        with progress.step(f"start worker: {label}"):
            worker.start(ready_celery)
        fig = {"concurrency": concurrency, "tasks": tasks}
        fig.update(h.memory_figures(worker.proc.pid, "idle"))
        with progress.step(f"{tasks} http.fetch (1 s each): {label}"):
            h.fill(taskhost, rds.url, "bench.fill", tasks, task="http.fetch", ignore_result=False, args=args)
            sampler = PeakRss(worker.proc.pid, h.rss_kb)
            start = time.time()
            rate, cpu = h.drain(rds, "bench", "bench.fill", tasks, results=True, worker_pid=worker.proc.pid)
            fig["seconds"] = time.time() - start
            fig["peak_rss_mb"] = sampler.stop()
        fig["per_s"], fig["cpu"] = rate, cpu
        fig["ideal_seconds"] = tasks / concurrency * DELAY_S
        # Every result must be a 200 of the 1 KiB body, else the figure means nothing.
        sample = [k for k in rds.r.scan_iter("celery-task-meta-*", count=1000)][:50]
        statuses = [json.loads(rds.r.get(k))["result"] for k in sample]
        bad = [s for s in statuses if not (isinstance(s, dict) and s.get("status") == 200 and s.get("length") == 1024)]
        fig["sampled_results_ok"] = len(statuses) - len(bad)
        if bad:
            fig["sampled_result_errors"] = bad[:3]
        fig.update(h.memory_figures(worker.proc.pid, "after"))
        worker.stop()
        out["systems"][label] = fig
    server.stop()
    rds.stop()
    return out


def report_io(io):
    systems = io["systems"]
    th = next(k for k in systems if k.startswith("taskhost"))
    gevent = next(k for k in systems if "gevent" in k)
    print(f"\nI/O: {io['tasks']} http.fetch tasks against a server answering after {io['delay_s']:.0f} s")
    for c, s in io["server_alone"].items():
        print(f"  server alone at {c} concurrent: {s['per_s']:.0f} requests/s ({s['failed']} failed)")
    print(f"  {'system':28}{'tasks':>8}{'conc.':>7}{'seconds':>10}{'ideal s':>9}{'tasks/s':>10}{'peak RSS MB':>13}{'results ok':>12}")
    for name, f in systems.items():
        print(f"  {name:28}{f['tasks']:>8}{f['concurrency']:>7}{f['seconds']:>10.1f}{f['ideal_seconds']:>9.1f}"
              f"{f['per_s']:>10.1f}{f['peak_rss_mb']:>13.1f}{f['sampled_results_ok']:>12}")
    t, g = systems[th], systems[gevent]
    waiting = (t["peak_rss_mb"] - t["idle_rss_mb"]) * 1024 / t["concurrency"]
    print(f"  taskhost: {t['seconds'] / t['ideal_seconds']:.2f}× ideal, {t['per_s'] / g['per_s']:.1f}× celery gevent's "
          f"throughput; ~{waiting:.0f} KiB of RSS per waiting sandbox ((peak − idle) / concurrency)")
