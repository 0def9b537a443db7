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

Redis runs under callgrind too and is counted from the worker's start: a change to a script
or to how the worker batches its commands must be counted on both sides. `--results`
stores results (else the messages say ignore_result). Redis keeps `unacked_index` as a
skiplist here (`zset-max-listpack-entries 0`), as it does in `make bench`'s drains, which
hold hundreds: at `-c 2` the index stays under 128 entries, a listpack, and every insert
walked it parsing each score with `strtod` (fractional scores, as before 2026-12-05): the
same binary's Redis counted 91,503 instructions a task with a listpack and 83,524 with a
skiplist, results ignored, and 109,602 against 96,065 with them stored (which hold more),
cost the timed drains never pay. Redis counts from before that date are not comparable.

`--floor` also counts the worker through `bench drain`'s worker process (`-c 2`, the same
64 MiB pool), with its sandboxes and with none (`--without-sandbox`: every run succeeds at
once, no guest instantiated): the difference is what a sandbox executes inside the worker,
to set beside `Runtime::run`'s count in `bench runtime`'s loop.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from run import Redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def callgrind_total(path):
    with open(path) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    sys.exit(f"callgrind wrote no totals in {path}")


def total_instructions(binary, count, plugins, results, log_level, keep):
    """Callgrind's instruction totals (worker, redis-server) for one serve -p 1 that drains
    `count` no-ops. Both run under callgrind, so that they keep their native pace against
    each other (a Redis slowed alone changed how the worker fetches, and what Redis did per
    message); Redis's count starts after the sends."""
    outs = [tempfile.NamedTemporaryFile(prefix=f"callgrind.{who}.", delete=False).name for who in ("worker", "redis")]
    callgrind = lambda out: ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--log-file=/dev/null"]
    rds = Redis(wrapper=callgrind(outs[1]), options=("--zset-max-listpack-entries", "0"))
    try:
        r, url = rds.r, rds.url
        send = [binary, "send", "tasks.noop", "--count", str(count), "-Q", "bench", "--broker", url]
        subprocess.run(send + ([] if results else ["--ignore-result"]), check=True, stdout=subprocess.DEVNULL)
        serve = [binary, "serve", "--plugins", plugins, "-p", "1", "-c", "2", "--max-task-memory", "64MiB",
                 "-Q", "bench", "--without-heartbeat", "--track-started", "false", "--broker", url]
        if results:
            serve += ["--result-backend", url]
        subprocess.run(["callgrind_control", "-z", str(rds.proc.pid)], check=True, stdout=subprocess.DEVNULL)
        # At `warn`, as `make bench` runs its workers: the task's log span is then off.
        worker = subprocess.Popen([*callgrind(outs[0]), *serve], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "RUST_LOG": log_level})
        deadline = time.time() + 900
        while r.llen("bench") or r.hlen("unacked") or (results and r.dbsize() < count):
            if worker.poll() is not None or time.time() > deadline:
                sys.exit(f"{binary}: the worker stopped or stalled before draining {count}")
            time.sleep(0.2)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=300)
        if r.exists("taskhost.dlq"):
            sys.exit(f"{binary}: the no-ops were dead-lettered, not run: {r.lindex('taskhost.dlq', 0)!r:.300}")
        rds.stop()
        return callgrind_total(outs[0]), callgrind_total(outs[1])
    finally:
        rds.stop()
        for out in outs:
            if keep:
                print(f"kept {out} ({count} tasks)", file=sys.stderr)
            elif os.path.exists(out):
                os.unlink(out)


def drain_instructions(binary, count, plugins, without_sandbox):
    """Callgrind's instruction total for one `bench drain` worker process (what `bench drain`
    starts per core) that drains `count` no-ops from a private Redis, and exits once idle."""
    out = tempfile.NamedTemporaryFile(prefix="callgrind.drain.", delete=False).name
    rds = Redis()
    try:
        r, url = rds.r, rds.url
        subprocess.run([binary, "send", "tasks.noop", "--count", str(count), "-Q", "bench.drain", "--ignore-result",
                        "--broker", url], check=True, stdout=subprocess.DEVNULL)
        child = [binary, "bench", "drain", "--child", "--broker", url, "-c", "2", "--max-task-memory", "64MiB",
                 "--plugins", plugins] + (["--without-sandbox"] if without_sandbox else [])
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--log-file=/dev/null",
                               *child], capture_output=True, text=True, timeout=900, env={**os.environ, "RUST_LOG": "warn"})
        if done.returncode != 0:
            sys.exit(f"{binary}: bench drain's worker failed: {done.stderr[-500:]}")
        processed = json.loads(done.stdout)["processed"]
        if processed != count or r.exists("taskhost.dlq"):
            sys.exit(f"{binary}: bench drain's worker finished {processed} of {count} no-ops (dead letters: {r.llen('taskhost.dlq')})")
        return callgrind_total(out)
    finally:
        rds.stop()
        os.unlink(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=3000)
    ap.add_argument("--plugins", default=os.path.join(ROOT, "dist", "plugins"))
    ap.add_argument("--results", action="store_true", help="store results (else ignore_result)")
    ap.add_argument("--keep", action="store_true", help="keep callgrind's files (for callgrind_annotate)")
    ap.add_argument("--floor", action="store_true", help="also count bench drain's worker with its sandboxes and "
                    "without any (--without-sandbox)")
    ap.add_argument("--log-level", default="warn", help="the worker's RUST_LOG (make bench's is warn; at info the "
                    "task's log span costs ~9,000 instructions a task)")
    args = ap.parse_args()
    # The no-op alone, compiled under valgrind first: the compile cache is keyed by the CPU's
    # features, which valgrind reports differently, so a natively filled cache does not serve it.
    with tempfile.TemporaryDirectory(prefix="noop-plugins.") as plugins:
        for name in os.listdir(args.plugins):
            if name.startswith("tasks.noop@"):
                shutil.copy(os.path.join(args.plugins, name), plugins)
        for binary in args.binaries:
            subprocess.run(["valgrind", "--tool=none", "--trace-children=yes", "--log-file=/dev/null", binary,
                            "plugins", "compile", "--plugins", plugins], check=True, stdout=subprocess.DEVNULL)
        for binary in args.binaries:
            small, large = (total_instructions(binary, n, plugins, args.results, args.log_level, args.keep)
                            for n in (args.small, args.large))
            worker, redis = ((b - a) / (args.large - args.small) for a, b in zip(small, large))
            print(f"{binary}: {worker:,.0f} instructions of the worker and {redis:,.0f} of redis-server per no-op task")
            if args.floor:
                with_sandbox, without = (
                    (drain_instructions(binary, args.large, plugins, bare) - drain_instructions(binary, args.small, plugins, bare))
                    / (args.large - args.small)
                    for bare in (False, True))
                print(f"{binary}: bench drain's worker, {with_sandbox:,.0f} instructions per no-op with its sandboxes and "
                      f"{without:,.0f} without any: {with_sandbox - without:,.0f} for a sandbox inside the worker")


if __name__ == "__main__":
    main()
