#!/usr/bin/env python3
"""Instructions the worker executes per no-op task, counted by valgrind's callgrind: the same
count for the same binary and inputs however busy the machine is, where CPU time on this VM
drifts by tens of percent within minutes. For before/after comparisons of the worker's own
cost, beside (not instead of) `make bench`'s timed drains.

Runs `serve -p 1` (the worker in-process) under callgrind on a private Redis, twice per
binary: draining SMALL and then LARGE pre-queued no-ops. The difference over LARGE - SMALL
is the cost per task, start-up and shutdown cancelled out. Under valgrind the worker runs
`-c 2` with `--max-task-memory 64MiB`: valgrind cannot reserve the pool's address space for
more, so fetches come in batches of at most 8. `rep movsb`/`stosb` count as one instruction
and valgrind has no PAGEMAP_SCAN, so copies are undercounted and slot resets overcounted:
compare binaries with this, not against the timed figures.

    python3 bench/instructions.py target/release/taskhost /tmp/taskhost-before [--small 500 --large 3000]
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from run import Redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def total_instructions(binary, count, plugins, results):
    """Callgrind's instruction total for one serve -p 1 that drains `count` no-ops."""
    rds = Redis()
    out = tempfile.NamedTemporaryFile(prefix="callgrind.", delete=False).name
    try:
        r, url = rds.r, rds.url
        send = [binary, "send", "tasks.noop", "--count", str(count), "-Q", "bench", "--broker", url]
        subprocess.run(send + ([] if results else ["--ignore-result"]), check=True, stdout=subprocess.DEVNULL)
        serve = [binary, "serve", "--plugins", plugins, "-p", "1", "-c", "2", "--max-task-memory", "64MiB",
                 "-Q", "bench", "--without-heartbeat", "--track-started", "false", "--broker", url]
        if results:
            serve += ["--result-backend", url]
        worker = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *serve],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 900
        while r.llen("bench") or r.hlen("unacked") or (results and r.dbsize() < count):
            if worker.poll() is not None or time.time() > deadline:
                sys.exit(f"{binary}: the worker under valgrind stopped or stalled before draining {count}")
            time.sleep(0.2)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=300)
        with open(out) as f:
            for line in f:
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
        sys.exit(f"{binary}: callgrind wrote no totals")
    finally:
        rds.stop()
        if os.path.exists(out):
            os.unlink(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=3000)
    ap.add_argument("--plugins", default=os.path.join(ROOT, "dist", "plugins"))
    ap.add_argument("--results", action="store_true", help="store results (else ignore_result)")
    args = ap.parse_args()
    for binary in args.binaries:
        small = total_instructions(binary, args.small, args.plugins, args.results)
        large = total_instructions(binary, args.large, args.plugins, args.results)
        print(f"{binary}: {(large - small) / (args.large - args.small):,.0f} instructions per no-op task")


if __name__ == "__main__":
    main()
