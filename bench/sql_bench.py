"""make bench's SQL-backend scenario: a no-op drain with every result stored in PostgreSQL
(Celery's celery_taskmeta), Celery prefork -c 2 against taskhost on the same Redis broker
and the same database, in one run. The database is made for the run and dropped after it.
"""
import os
import sys
import subprocess
import time
import uuid

from side_by_side import report_side_by_side

PG = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-tA"]


def psql(db, sql):
    return subprocess.run(PG + ["-d", db, "-c", sql], check=True, capture_output=True, text=True).stdout.strip()


def stored(db):
    try:
        return int(psql(db, "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'") or 0)
    except subprocess.CalledProcessError:
        return 0  # the table is not there yet


def drain_to_sql(h, rds, db, count):
    """Moves the pre-filled queue under the consumed name, then times until every result is a row."""
    start = time.time()
    rds.r.rename("bench.fill", "bench")
    while True:
        if rds.r.llen("bench") == 0 and rds.r.hlen("unacked") == 0 and stored(db) >= count:
            break
        time.sleep(0.05)
    return count / (time.time() - start)


def run_sql(h, taskhost, plugins, scale, progress):
    db = f"taskhost_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        psql("postgres", f"CREATE DATABASE {db}")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"SQL scenario skipped: no PostgreSQL on 127.0.0.1:5432 ({e})")
        return {"skipped": str(e)}
    rds = h.Redis()
    app = h.celery_app(rds.url)
    ready = h.celery_ready(app)
    celery_url = f"db+postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    cores = os.cpu_count() or 1
    systems = [
        ("celery prefork -c 2", h.Worker("celery-prefork", [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "prefork",
                                                            "-c", "2", "-Q", "bench", "-l", "warning", "--without-mingle",
                                                            "--without-gossip"],
                                          env={"BROKER": rds.url, "RESULT_BACKEND": celery_url}, cwd=h.EXAMPLES),
         max(200, int(5000 * scale))),
        (f"taskhost -p {cores} -c 32", h.Worker("taskhost", [taskhost, "serve", "--plugins", plugins, "-p", str(cores), "-c", "32",
                                                             "-Q", "bench", "--broker", rds.url, "--result-backend",
                                                             f"postgresql://postgres@127.0.0.1:5432/{db}", "--track-started", "false"],
                                                env={"RUST_LOG": "warn"}),
         max(1000, int(100_000 * scale))),
    ]
    out = {"database": "PostgreSQL " + psql("postgres", "SHOW server_version"), "systems": {}}
    try:
        for label, worker, count in systems:
            rds.r.flushdb()
            with progress.step(f"SQL results: drain of {count} no-ops, results in PostgreSQL: {label}"):
                worker.start(ready)
                try:
                    psql(db, "DELETE FROM celery_taskmeta")
                except subprocess.CalledProcessError:
                    pass
                h.fill(taskhost, rds.url, "bench.fill", count, ignore_result=False)
                rate = drain_to_sql(h, rds, db, count)
                worker.stop()
            out["systems"][label] = {"count": count, "drain_results_per_s": rate}
    finally:
        rds.stop()
        psql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    return out


def report_sql(s):
    if "skipped" in s:
        print(f"\nSQL result backend: skipped ({s['skipped']})")
        return
    report_side_by_side(f"\nSQL result backend ({s['database']}): no-op drain with every result a celery_taskmeta row",
                        s["systems"], "drain_results_per_s", 20)
