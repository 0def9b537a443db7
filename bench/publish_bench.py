"""make bench's release scenario: from `taskhost publish` returning to every worker serving
the new version, over 20 publishes of a ~2 MB component, two workers following the broker.

Each publish is a new version with its own digest (the thumbnail component with a custom
section padding it to 2 MB and naming the round), so every worker fetches 2 MB, checks
the signature and digests, and compiles it from nothing (no compile-cache hit): the code
compiled is the thumbnail's ~600 KB; the padding is fetched and hashed but not compiled.
"Serving" is the worker's own readiness report on the broker, sent as soon as the version
has loaded; with --activate the version takes new tasks from that moment.
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


def padded(component: bytes, round_no: int, size: int) -> bytes:
    """The component with a custom section (id 0, valid anywhere in a component) making it
    `size` bytes and its digest unique to the round."""
    name = f"taskhost-bench-round-{round_no}".encode()
    body_len = max(0, size - len(component) - 16 - len(name))
    payload = leb128(len(name)) + name + bytes(body_len)
    return component + b"\x00" + leb128(len(payload)) + payload


def run_publish(h, taskhost, plugins, scale, progress):
    rds = h.Redis()
    rounds = max(3, int(ROUNDS * min(scale, 1.0)))
    base = (Path(plugins) / "media.thumbnail@1.4.0.wasm").read_bytes()
    workers = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            with progress.step("releases: two workers following the broker"):
                subprocess.run([taskhost, "keygen", "--name", "bench", "--out", str(tmp)], check=True, capture_output=True)
                public = (tmp / "bench.pub").read_text().strip()
                (tmp / "trust.toml").write_text(f'[[key]]\nname = "bench"\npublic_key = "{public}"\ntasks = ["bench.*"]\n')
                for i in range(2):
                    cache = tmp / f"cache{i}"
                    cache.mkdir()
                    log = open(tmp / f"worker{i}.log", "w")
                    workers.append(subprocess.Popen(
                        [taskhost, "serve", "-p", "1", "-c", "8", "-n", f"bench{i}@localhost", "--plugins", str(cache),
                         "--broker", rds.url, "--registry", "broker", "--trust", str(tmp / "trust.toml")],
                        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn",
                                                                    "TASKHOST_CACHE_DIR": str(tmp / f"compiled{i}")}))
                deadline = time.time() + 30
                while len(rds.r.hgetall("taskhost.release.ready")) < 2:
                    if time.time() > deadline:
                        raise SystemExit("the release bench's workers never reported")
                    time.sleep(0.05)
            latencies, publish_s = [], []
            with progress.step(f"releases: {rounds} publishes of a {SIZE >> 20} MB component, publish → both workers ready"):
                for i in range(rounds):
                    component = tmp / f"round{i}.wasm"
                    component.write_bytes(padded(base, i, SIZE))
                    version = f"1.0.{i}"
                    t0 = time.time()
                    subprocess.run([taskhost, "publish", str(component), "--task", "bench.publish", "--version", version,
                                    "--key", str(tmp / "bench.key"), "--broker", rds.url, "--activate", "--json"],
                                   check=True, capture_output=True)
                    returned = time.time()
                    publish_s.append(returned - t0)
                    key = f"bench.publish@{version}"
                    while True:
                        reports = [json.loads(v.decode().split("\x1f", 1)[1]) for v in rds.r.hgetall("taskhost.release.ready").values()]
                        if len(reports) >= 2 and all(key in r["ready"] for r in reports):
                            break
                        if time.time() - returned > 120:
                            raise SystemExit(f"{key} never ready on both workers")
                        time.sleep(0.005)
                    latencies.append(time.time() - returned)
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait()
            rds.stop()
    return {
        "rounds": rounds,
        "component_bytes": SIZE,
        "code_bytes": len(base),
        "ready_p50_s": statistics.median(latencies),
        "ready_max_s": max(latencies),
        "publish_command_p50_s": statistics.median(publish_s),
    }


def report_publish(p):
    print("\nReleases")
    print(f"  {p['rounds']} publishes of a {p['component_bytes'] / 2**20:.0f} MB component ({p['code_bytes'] // 1024} KB of it code), "
          "two workers following the broker")
    print(f"  publish returned -> both workers serving: p50 {1000 * p['ready_p50_s']:.0f} ms, max {1000 * p['ready_max_s']:.0f} ms")
    print(f"  the publish command itself (checks by compiling, signs, uploads): p50 {1000 * p['publish_command_p50_s']:.0f} ms")
