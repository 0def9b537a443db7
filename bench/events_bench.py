"""make bench's events scenario: what Celery events cost the no-op drain. Alternating
`taskhost bench drain` runs on one Redis: task events off, on (`-E`, nobody listening),
and on with a live reader following them (`taskhost events --json`, as Flower would).
"""
import json
import resource
import statistics
import subprocess

from tenants_bench import process_cpu_s


def drain_with_events(h, taskhost, plugins, count, rounds):
    rds = h.Redis()
    settings = {"events off": ([], False), "events on (-E)": (["--events"], False), "events on, a reader following": (["--events"], True)}
    rates = {k: [] for k in settings}
    worker_us = {k: [] for k in settings}
    redis_us = {k: [] for k in settings}
    try:
        for _ in range(rounds):
            for label, (extra, follow) in settings.items():
                rds.r.flushdb()
                reader = None
                if follow:
                    reader = subprocess.Popen([taskhost, "events", "--json", "--broker", rds.url],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                redis_before = process_cpu_s(rds.proc.pid)
                got = subprocess.run([taskhost, "bench", "drain", "--plugins", plugins, "--broker", rds.url,
                                      "--count", str(count), "--json", *extra],
                                     check=True, capture_output=True, text=True).stdout
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                rates[label].append(json.loads(got)["tasks_per_sec"])
                worker_us[label].append((after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / count * 1e6)
                redis_us[label].append((process_cpu_s(rds.proc.pid) - redis_before) / count * 1e6)
                if reader:
                    reader.terminate()
                    reader.wait(timeout=10)
    finally:
        rds.stop()
    return {k: {"runs": v, "median_per_s": statistics.median(v), "drain_cpu_us_per_task": statistics.median(worker_us[k]),
                "redis_cpu_us_per_task": statistics.median(redis_us[k])} for k, v in rates.items()}


def run_events(h, taskhost, plugins, scale, progress):
    count = max(1000, int(200_000 * scale))
    rounds = 1 if scale < 0.1 else 3
    with progress.step(f"events: no-op drain of {count}, task events off / on / on with a reader, {rounds} round(s)"):
        return {"drain": drain_with_events(h, taskhost, plugins, count, rounds), "count": count}


def report_events(e):
    d = e["drain"]
    off = d["events off"]["median_per_s"]
    print(f"\nEvents: no-op drain of {e['count']} (median of alternating runs; CPU µs per task: the drain's processes + redis)")
    for k, v in d.items():
        print(f"  {k:32}{v['median_per_s']:>9.0f}/s {100 * v['median_per_s'] / off:>5.0f}%   "
              f"CPU {v['drain_cpu_us_per_task']:.1f} + {v['redis_cpu_us_per_task']:.1f}")
