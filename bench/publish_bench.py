"""make bench's release scenario: from `taskhost publish` returning to every worker serving
the new version, over 20 publishes of a ~2 MB component, two workers following the broker.

Each publish is a new version with its own digest (the thumbnail component with a custom
section padding it to 2 MB and naming the round), so every worker fetches 2 MB, checks
the signature and digests, and compiles it from nothing (no compile-cache hit): the code
compiled is the thumbnail's ~600 KB; the padding is fetched and hashed but not compiled.
"Serving" is each worker process's own readiness report on the broker, sent as soon as the
version has loaded; with --activate the version takes new tasks from that moment. Two
layouts: one machine (`serve -p 2`: the processes share the compile cache, one compiles on
both cores, the other maps the result), and two workers with caches of their own (two
machines, simulated here on the same two cores, so each compiles with half of them).
"""
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SIZE = 2 << 20
ROUNDS = 20


def leb128(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def padded(component: bytes, round_no: str, size: int) -> bytes:
    """The component with a custom section (id 0, valid anywhere in a component) making it
    `size` bytes and its digest unique to the round."""
    name = f"taskhost-bench-round-{round_no}".encode()
    body_len = max(0, size - len(component) - 16 - len(name))
    payload = leb128(len(name)) + name + bytes(body_len)
    return component + b"\x00" + leb128(len(payload)) + payload


def serve(taskhost, rds, tmp, name, plugins, cache, processes):
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen(
        [taskhost, "serve", "-p", str(processes), "-c", "8", "-n", f"{name}@localhost", "--plugins", str(plugins),
         "--broker", rds.url, "--registry", "broker", "--trust", str(tmp / "trust.toml")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn", "TASKHOST_CACHE_DIR": str(cache)})


def publish_rounds(taskhost, rds, tmp, base, layout, rounds, workers, names):
    """Publishes `rounds` new versions; per round, seconds from publish returning to
    `workers` readiness reports naming it."""
    latencies, publish_s = [], []
    for i in range(rounds):
        component = tmp / f"{layout}-round{i}.wasm"
        component.write_bytes(padded(base, f"{layout}-{i}", SIZE))
        version = f"1.0.{i}"
        t0 = time.time()
        subprocess.run([taskhost, "publish", str(component), "--task", f"bench.{layout}", "--version", version,
                        "--key", str(tmp / "bench.key"), "--broker", rds.url, "--activate", "--json"],
                       check=True, capture_output=True)
        returned = time.time()
        publish_s.append(returned - t0)
        key = f"bench.{layout}@{version}"
        while True:
            reports = [json.loads(v.decode().split("\x1f", 1)[1]) for k, v in rds.r.hgetall("taskhost.release.ready").items()
                       if k.decode().startswith(names)]
            if sum(key in r["ready"] for r in reports) >= workers:
                break
            if time.time() - returned > 120:
                raise SystemExit(f"{key} never ready on {workers} workers")
            time.sleep(0.005)
        latencies.append(time.time() - returned)
    return {"ready_s": latencies, "ready_p50_s": statistics.median(latencies), "ready_max_s": max(latencies),
            "publish_command_p50_s": statistics.median(publish_s)}


def run_publish(h, taskhost, plugins, scale, progress):
    rds = h.Redis()
    rounds = max(3, int(ROUNDS * min(scale, 1.0)))
    base = (Path(plugins) / "media.thumbnail@1.4.0.wasm").read_bytes()
    out = {"rounds": rounds, "component_bytes": SIZE, "code_bytes": len(base)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([taskhost, "keygen", "--name", "bench", "--out", str(tmp)], check=True, capture_output=True)
        public = (tmp / "bench.pub").read_text().strip()
        (tmp / "trust.toml").write_text(f'[[key]]\nname = "bench"\npublic_key = "{public}"\ntasks = ["bench.*"]\n')
        # One machine: `serve -p 2`, two worker processes sharing a plugins dir and compile cache.
        # Two machines (simulated on these same cores): two workers with caches of their own.
        layouts = [("one", "one machine, serve -p 2 (shared cache)", [("m", 2)]),
                   ("two", "two workers, own caches (2 machines on these cores)", [("a", 1), ("b", 1)])]
        try:
            for layout, label, members in layouts:
                with progress.step(f"releases: {rounds} publishes of a {SIZE >> 20} MB component, {label}"):
                    procs = []
                    for name, processes in members:
                        (tmp / f"plugins-{name}").mkdir()
                        procs.append(serve(taskhost, rds, tmp, name, tmp / f"plugins-{name}", tmp / f"cache-{name}", processes))
                    try:
                        deadline = time.time() + 30
                        # Reports from this layout's processes only (a stopped one may report once more).
                        names = tuple(f"{name}" for name, _ in members)
                        while sum(k.decode().startswith(names) for k in rds.r.hgetall("taskhost.release.ready")) < 2:
                            if time.time() > deadline:
                                raise SystemExit("the release bench's workers never reported")
                            time.sleep(0.05)
                        out[layout] = {"label": label, **publish_rounds(taskhost, rds, tmp, base, layout, rounds, 2, names)}
                    finally:
                        for p in procs:
                            p.terminate()
                        for p in procs:
                            p.wait()
        finally:
            rds.stop()
    return out


def report_publish(p):
    print("\nReleases")
    print(f"  {p['rounds']} publishes of a {p['component_bytes'] / 2**20:.0f} MB component ({p['code_bytes'] // 1024} KB of it code, "
          "compiled from nothing each time): publish returned -> both worker processes serving it")
    for layout in ("one", "two"):
        r = p.get(layout)
        if r:
            print(f"  {r['label']:52} p50 {1000 * r['ready_p50_s']:>5.0f} ms  max {1000 * r['ready_max_s']:>5.0f} ms"
                  f"   (publish command p50 {1000 * r['publish_command_p50_s']:.0f} ms)")
