"""make bench's soak scenario: the worker's resident memory over 10 million no-op tasks
and then 100,000 thumbnails on one Redis, the queue topped up as fast as it drains. Flat
means the median of each fifth of the run (after the first tenth) is within 10% of the
first fifth's; single samples also swing with the work in flight, reported beside it.
"""
import statistics
import subprocess
import time


def soak_phase(h, taskhost, rds, worker_pid, task, args, queue, total, batch):
    """Keeps `queue` topped up until `total` were sent and all ran; RSS samples over it."""
    samples, sent, last_sample = [], 0, 0.0
    start = time.time()
    while True:
        queued, held = rds.r.llen(queue), rds.r.hlen("unacked")
        now = time.time()
        # Sampled before topping up: with slow tasks the top-up runs almost every turn.
        if now - last_sample >= 1.0:
            last_sample = now
            samples.append({"t": round(now - start, 1), "done": sent - queued - held, "rss_mb": h.rss_kb(worker_pid) / 1024})
        if sent < total and queued < batch:
            k = min(batch, total - sent)
            h.fill(taskhost, rds.url, queue, k, task=task, args=args)
            sent += k
            continue
        if sent >= total and queued == 0 and held == 0:
            break
        time.sleep(0.05)
    took = time.time() - start
    samples.append({"t": round(took, 1), "done": total, "rss_mb": h.rss_kb(worker_pid) / 1024})
    # The first tenth warms up (allocator arenas, compiled code paged in, pools filled).
    warm = [s for s in samples if s["done"] >= total // 10] or samples
    # Single samples swing with the work in flight (64 sandboxes each decoding an image);
    # the trend is the median of each fifth of the run.
    fifths = [statistics.median(s["rss_mb"] for s in warm[i * len(warm) // 5:(i + 1) * len(warm) // 5] or warm)
              for i in range(5)]
    first, last = fifths[0], fifths[-1]
    highest = max(s["rss_mb"] for s in warm)
    return {"task": task, "count": total, "seconds": took, "per_s": total / took, "rss_fifths_median_mb": fifths,
            "rss_max_mb": highest, "rss_min_mb": min(s["rss_mb"] for s in warm),
            "end_vs_warm_pct": 100 * (last - first) / first, "flat": max(abs(f - first) for f in fifths) <= 0.1 * first,
            "samples": samples}


def run_soak(h, taskhost, plugins, scale, progress):
    import os

    noops = max(10_000, int(10_000_000 * scale))
    thumbs = max(1_000, int(100_000 * scale))
    cores = os.cpu_count() or 1
    rds = h.Redis()
    cmd = [taskhost, "serve", "--plugins", plugins, "-p", str(cores), "-c", "32", "-Q", "celery,media_heavy",
           "--broker", rds.url, "--track-started", "false"]
    worker = subprocess.Popen(cmd, env={**os.environ, "RUST_LOG": "warn"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([taskhost, "send", "tasks.noop", "--broker", rds.url, "--wait", "--timeout", "60"],
                       check=True, capture_output=True)
        out = {"processes": cores, "concurrency": 32}
        with progress.step(f"soak: {noops:,} no-op tasks, RSS sampled every second"):
            out["noop"] = soak_phase(h, taskhost, rds, worker.pid, "tasks.noop", "[]", "celery", noops, 200_000)
        # 480x360: small enough for one command-line argument (128 KiB).
        image = h.test_image(480, 360, 3)
        with progress.step(f"soak: {thumbs:,} thumbnails (480x360 PNG → 128 px)"):
            out["thumbnail"] = soak_phase(h, taskhost, rds, worker.pid, "media.thumbnail", f'["{image}", 128]',
                                          "media_heavy", thumbs, 500)
        out["redis_used_memory_mb"] = rds.r.info("memory")["used_memory"] / 2**20
        return out
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        rds.stop()


def report_soak(s):
    print(f"\nSoak: worker RSS (supervisor + {s['processes']} processes), median of each fifth after the first tenth")
    for key in ("noop", "thumbnail"):
        p = s[key]
        fifths = " ".join(f"{f:.0f}" for f in p["rss_fifths_median_mb"])
        print(f"  {p['task']:17}{p['count']:>11,} in {p['seconds']:>6.0f} s ({p['per_s']:>7.0f}/s)   "
              f"RSS {fifths} MB ({p['end_vs_warm_pct']:+.1f}%; samples {p['rss_min_mb']:.0f}–{p['rss_max_mb']:.0f})   "
              f"{'flat' if p['flat'] else 'NOT flat'}")
