"""make bench's Python-task scenario: tasks written in Python (examples/python, built with
`taskhost build`) against Celery running the same no-op natively, one after the other on
one Redis.

- drain: 20,000 pre-queued no-ops, results ignored: taskhost's `py.noop` (each task a
  fresh sandboxed CPython instance) against Celery prefork -c <cores> running
  examples/tasks.py's `tasks.noop`;
- `taskhost bench runtime --task py.noop`: instantiate+call per second, one process;
- the component's size, its cold compile time (an empty compile cache) and the worker's
  RSS, idle and after the drain.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def run_python(h, taskhost, python_plugins, scale, progress):
    """h: the run.py helpers (Redis, Worker, fill, drain, memory_figures, ...)."""
    n = max(200, int(20_000 * scale))
    cores = os.cpu_count() or 1
    plugins = Path(python_plugins)
    component = plugins / "py.noop@1.0.0.wasm"
    out = {"tasks": n, "component_mb": component.stat().st_size / 1e6, "systems": {}}

    with progress.step("python: cold compile of py.noop (empty compile cache)"):
        cache = tempfile.mkdtemp(prefix="taskhost-py-cache-")
        start = time.time()
        # `run` compiles only the task it runs.
        subprocess.run([taskhost, "run", "py.noop", "--plugins", str(plugins)], check=True, capture_output=True,
                       env={**os.environ, "TASKHOST_CACHE_DIR": cache})
        out["cold_compile_and_run_s"] = time.time() - start
        out["compiled_mb"] = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file()) / 1e6
        shutil.rmtree(cache, ignore_errors=True)

    with progress.step("python: bench runtime --task py.noop (one process)"):
        got = subprocess.run([taskhost, "bench", "runtime", "--plugins", str(plugins), "--task", "py.noop", "--processes", "1",
                              "--seconds", str(max(1.0, 3 * min(scale, 1.0))), "--json"],
                             check=True, capture_output=True, text=True).stdout
        out["runtime"] = json.loads(got)

    # The worker serves py.noop alone: the other examples would only add compile time and RSS.
    noop_only = Path(tempfile.mkdtemp(prefix="taskhost-py-noop-"))
    shutil.copy(component, noop_only)
    rds = h.Redis()
    app = h.celery_app(rds.url)

    ready_celery = h.celery_ready(app)

    systems = [
        (f"taskhost -p {cores} -c 32, py.noop", "py.noop",
         h.Worker("taskhost", [taskhost, "serve", "--plugins", str(noop_only), "-p", str(cores), "-c", "32", "-Q", "bench",
                               "--broker", rds.url, "--track-started", "false"], env={"RUST_LOG": "warn"})),
        (f"celery prefork -c {cores}, tasks.noop", "tasks.noop",
         h.Worker("celery-prefork", [h.sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "prefork", "-c", str(cores),
                                     "-Q", "bench", "-l", "warning", "--without-mingle", "--without-gossip"],
                  env={"BROKER": rds.url}, cwd=h.EXAMPLES)),
    ]
    try:
        for label, task, worker in systems:
            rds.r.flushdb()
            with progress.step(f"python: start {label}"):
                worker.start(ready_celery)
            fig = h.memory_figures(worker.proc.pid, "idle")
            with progress.step(f"python: drain of {n} {task}, results ignored: {label}"):
                h.fill(taskhost, rds.url, "bench.fill", n, task=task)
                fig["drain_per_s"], fig["cpu"] = h.drain(rds, "bench", "bench.fill", n, results=False, worker_pid=worker.proc.pid)
            fig.update(h.memory_figures(worker.proc.pid, "after"))
            worker.stop()
            out["systems"][label] = fig
    finally:
        rds.stop()
        shutil.rmtree(noop_only, ignore_errors=True)
    return out


def report_python(p):
    print(f"\nPython tasks: {p['tasks']} no-ops drained, results ignored")
    print(f"  {'system':38}{'tasks/s':>10}{'idle RSS MB':>13}{'RSS after MB':>14}")
    for name, f in p["systems"].items():
        print(f"  {name:38}{f['drain_per_s']:>10.0f}{f['idle_rss_mb']:>13.1f}{f['after_rss_mb']:>14.1f}")
    th, cel = (next(v for k, v in p["systems"].items() if k.startswith(s)) for s in ("taskhost", "celery"))
    rt = p["runtime"]["taskhost"]
    print(f"  taskhost / celery: {th['drain_per_s'] / cel['drain_per_s']:.1f}x; bench runtime py.noop: "
          f"{rt['tasks_per_sec']:.0f} instantiate+call/s in one process (instantiate p50 {rt['instantiate_p50_us']:.0f} us)")
    print(f"  py.noop component {p['component_mb']:.1f} MB, compiled {p['compiled_mb']:.1f} MB, "
          f"cold compile + one run {p['cold_compile_and_run_s']:.1f} s")
