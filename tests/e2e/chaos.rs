//! Chaos: worker processes killed (`kill -9`) and stopped past the visibility timeout
//! mid-drain, Redis crashing and coming back, and a fault proxy between worker and Redis
//! (resets, a black hole, latency) — every task ends stored; duplicates are counted.

use crate::fault_proxy::{Fault, FaultProxy};
use crate::support::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Logs each completed run (the worker's debug "succeeded" line) so runs can be counted.
pub const RUN_LOG: &str = "info,taskhost::worker::finish=debug";

/// Completed runs per task id, from a worker log written under [`RUN_LOG`].
pub fn runs_per_task(log: &str) -> HashMap<String, usize> {
    let mut runs = HashMap::new();
    for line in log.lines().filter(|l| l.contains("succeeded in")) {
        let Some((_, rest)) = line.split_once(" id=") else { continue };
        // The span writes it quoted (`task{… id="…"}`), the event bare.
        let id: String = rest.trim_start_matches('"').chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        assert!(!id.is_empty(), "no task id in {line:?}");
        *runs.entry(id).or_insert(0) += 1;
    }
    runs
}

/// Tasks run more than once, and the extra runs they took.
pub fn duplicates(runs: &HashMap<String, usize>) -> (usize, usize) {
    let twice: Vec<usize> = runs.values().filter(|n| **n > 1).copied().collect();
    (twice.len(), twice.iter().map(|n| n - 1).sum())
}

/// (results stored, of which SUCCESS) on a Redis backend.
pub fn stored(conn: &mut redis::Connection) -> (usize, usize) {
    let script = redis::Script::new(
        r#"local keys = redis.call('KEYS', 'celery-task-meta-*')
           local ok = 0
           for _, k in ipairs(keys) do
             local v = redis.call('GET', k)
             if v and string.find(v, '"status":%s*"SUCCESS"') then ok = ok + 1 end
           end
           return {#keys, ok}"#,
    );
    let (all, ok): (usize, usize) = script.invoke(conn).unwrap();
    (all, ok)
}

/// Waits until `want` results are stored, or panics with what is missing.
pub fn wait_stored(conn: &mut redis::Connection, want: usize, within: Duration, worker: &WorkerProcess) -> Duration {
    let started = Instant::now();
    loop {
        let (all, _) = stored(conn);
        if all >= want {
            return started.elapsed();
        }
        if started.elapsed() > within {
            let queued: usize = redis::cmd("LLEN").arg("celery").query(conn).unwrap();
            let unacked: usize = redis::cmd("HLEN").arg("unacked").query(conn).unwrap();
            let log = worker.log_text();
            let tail: Vec<&str> = log.lines().rev().filter(|l| !l.contains("succeeded in")).take(40).collect();
            panic!("{all} of {want} results stored after {within:?}; {queued} queued, {unacked} unacked; log tail:\n{}", tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After a run: nothing left queued, held or dead-lettered.
pub fn assert_drained(conn: &mut redis::Connection) {
    let queued: usize = redis::cmd("LLEN").arg("celery").query(conn).unwrap();
    let unacked: usize = redis::cmd("HLEN").arg("unacked").query(conn).unwrap();
    let index: usize = redis::cmd("ZCARD").arg("unacked_index").query(conn).unwrap();
    let dead: usize = redis::cmd("LLEN").arg("taskhost.dlq").query(conn).unwrap();
    assert_eq!((queued, unacked, index, dead), (0, 0, 0, 0), "(queued, unacked, unacked_index, dead letters) after the drain");
}

/// A pseudo-random number in `0..n` (the tests want spread, not cryptography).
fn random_below(n: u64) -> u64 {
    (uuid::Uuid::new_v4().as_u128() % n as u128) as u64
}

fn kill(pid: i32, signal: i32) {
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal} to {pid}");
}

/// Waits for a supervisor to have `n` worker processes; their pids.
fn children_up(worker: &WorkerProcess, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids = worker.children();
        if pids.len() == n {
            return pids;
        }
        assert!(Instant::now() < deadline, "{} of {n} worker processes up:\n{}", pids.len(), worker.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The issue's crash soak: 100,000 acks-late tasks through two worker processes, five
/// `kill -9`s at random points, then one process stopped (SIGSTOP) for longer than the
/// visibility timeout and resumed. Every task ends with a SUCCESS; the duplicates (runs
/// a killed or stopped process finished but never acked) are counted and bounded by
/// what those processes held.
#[test]
#[ignore = "a minute of both cores: make test runs it alone, after the rest"]
fn a_crash_soak_of_100k_tasks_through_kill_9_and_sigstop_stores_every_result() {
    const TASKS: usize = 100_000;
    const VISIBILITY: u64 = 5;
    let redis = RedisServer::start();
    let mut conn = redis.client().get_connection().unwrap();
    let worker = WorkerProcess::start_processes(
        2,
        &redis.url(),
        &plugins_dir(),
        &["-c", "16", "--visibility-timeout", &VISIBILITY.to_string()],
        &[("RUST_LOG", RUN_LOG)],
        Duration::from_secs(30),
    );
    children_up(&worker, 2);
    // Sent in ten waves a second apart, so the drain spans the whole of the chaos.
    let producer = {
        let client = redis.client();
        std::thread::spawn(move || {
            let mut conn = client.get_connection().unwrap();
            for _ in 0..10 {
                enqueue(&mut conn, "tasks.noop", &serde_json::json!([]), TASKS / 10);
                std::thread::sleep(Duration::from_millis(1000));
            }
        })
    };
    let started = Instant::now();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(300 + random_below(1200)));
        let pids = children_up(&worker, 2);
        kill(pids[random_below(2) as usize], libc::SIGKILL);
    }
    // Stopped, it holds its prefetched messages past the visibility timeout; the other
    // process restores and runs them. Resumed, it finishes and acks what it was running.
    std::thread::sleep(Duration::from_millis(1500));
    let stopped = children_up(&worker, 2)[random_below(2) as usize];
    kill(stopped, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(VISIBILITY + 4));
    kill(stopped, libc::SIGCONT);
    producer.join().unwrap();
    wait_stored(&mut conn, TASKS, Duration::from_secs(240), &worker);
    std::thread::sleep(Duration::from_secs(2)); // the last acks
    let (all, ok) = stored(&mut conn);
    assert_eq!((all, ok), (TASKS, TASKS), "(results, SUCCESS)");
    assert_drained(&mut conn);
    let log = worker.log_text();
    let runs = runs_per_task(&log);
    let (twice, extra) = duplicates(&runs);
    let restored: usize = log.lines().filter(|l| l.contains("restored messages past the visibility timeout")).count();
    eprintln!(
        "crash soak: {TASKS} tasks stored in {:.1}s through 5 kill -9 and a {}s SIGSTOP; {twice} ran twice ({extra} extra runs); \
         {} runs logged; {restored} visibility sweeps restored messages",
        (started.elapsed()).as_secs_f64(),
        VISIBILITY + 4,
        runs.values().sum::<usize>()
    );
    assert!(runs.len() >= TASKS, "runs logged for only {} tasks", runs.len());
    // Each kill loses at most what that process held (its prefetch, 16 × 4, and as many
    // run and waiting for their result write), the stop the same again; every other task
    // ran once.
    assert!(twice <= 6 * 2 * 64, "{twice} tasks ran more than once");
    assert!(restored >= 1, "nothing was restored after the SIGSTOP: the test did not test it");
}

/// Adds to `pipe` a run of `task(*args)` that a dead worker held from `queue` an hour past
/// its last refresh (kombu's `unacked` entry and its `unacked_index` score); the entry's
/// length.
fn held_by_a_dead_worker(pipe: &mut redis::Pipeline, task: &str, args: &serde_json::Value, queue: &str) -> usize {
    let message = celery_message(task, &uuid::Uuid::new_v4().to_string(), args);
    let envelope: serde_json::Value = serde_json::from_slice(&message).unwrap();
    let tag = envelope["properties"]["delivery_tag"].as_str().unwrap().to_string();
    let entry = format!(r#"[{}, "", "{queue}"]"#, String::from_utf8(message).unwrap());
    let len = entry.len();
    pipe.hset("unacked", &tag, entry).ignore().zadd("unacked_index", &tag, taskhost::protocol::unix_now() - 3600.0).ignore();
    len
}

/// A worker killed in the middle of a visibility sweep leaves the sweep's lock behind.
/// kombu's lock lasts 300 s whatever the visibility timeout, and no worker swept for
/// that long (a crash soak run found 262 messages held past 240 s); here the lock lapses
/// with the visibility timeout and the next worker restores everything.
#[test]
fn a_worker_killed_mid_sweep_holds_up_the_next_sweep_no_longer_than_the_visibility_timeout() {
    const HELD: usize = 20_000;
    const VISIBILITY: u64 = 2;
    let redis = RedisServer::start();
    let mut conn = redis.client().get_connection().unwrap();
    // Messages a dead worker held, an hour past their last refresh: the first sweep of a
    // new worker restores them one by one, which takes long enough to be killed in.
    let mut pipe = redis::pipe();
    for _ in 0..HELD {
        held_by_a_dead_worker(&mut pipe, "tasks.noop", &serde_json::json!([]), "celery");
    }
    pipe.query::<()>(&mut conn).unwrap();
    let visibility = VISIBILITY.to_string();
    let worker = WorkerProcess::start_with_env(&redis.url(), &plugins_dir(), &["-c", "8", "--visibility-timeout", &visibility], &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !redis.query::<bool>(redis::cmd("EXISTS").arg("unacked_mutex")) {
        assert!(Instant::now() < deadline, "no sweep started:\n{}", worker.log_text());
        std::thread::sleep(Duration::from_millis(2));
    }
    kill(worker.pid(), libc::SIGKILL);
    let lock_ms: i64 = redis.query(redis::cmd("PTTL").arg("unacked_mutex"));
    let left: usize = redis.query(redis::cmd("HLEN").arg("unacked"));
    assert!(lock_ms > 0 && left > 1000, "the kill did not land mid-sweep (lock {lock_ms} ms, {left} held): the test did not test it");
    assert!(lock_ms <= (VISIBILITY * 1000) as i64, "the dead sweeper's lock lasts {lock_ms} ms, past the {VISIBILITY} s visibility timeout");
    drop(worker);
    let next = WorkerProcess::start_with_env(&redis.url(), &plugins_dir(), &["-c", "8", "--visibility-timeout", &visibility], &[]);
    // A bound on losing nothing, not a speed: this debug-built worker runs at nice 10, and
    // beside the parallel suite's un-niced processes it has run ~120 tasks a second.
    wait_stored(&mut conn, HELD, Duration::from_secs(240), &next);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored(&mut conn), (HELD, HELD), "(results, SUCCESS)");
    assert_drained(&mut conn);
}

/// A dead worker held 64 messages of ~3.5 MiB (224 MiB in all): the next worker's sweep
/// puts every one back, once, without holding them all at once (it reads them a few MiB
/// at a time; read 200 at a time, its peak memory was several times their total).
#[test]
fn a_sweep_over_large_held_messages_stays_within_a_few_mib_of_them_at_a_time() {
    const HELD: usize = 64;
    let redis = RedisServer::start();
    let mut conn = redis.client().get_connection().unwrap();
    // In the body (base64) and in argsrepr: ~3.5 MiB a message.
    let args = serde_json::json!(["x".repeat(3 << 19)]);
    let mut total = 0;
    for _ in 0..HELD {
        // Held from a queue this worker does not consume, so what goes back stays there.
        let mut pipe = redis::pipe();
        total += held_by_a_dead_worker(&mut pipe, "tasks.noop", &args, "elsewhere");
        pipe.query::<()>(&mut conn).unwrap();
    }
    let total_mib = (total >> 20) as u64;
    assert!(total_mib >= 200, "held {total_mib} MiB in all");
    // The same worker with nothing to sweep, for its own peak.
    let idle_redis = RedisServer::start();
    let idle = WorkerProcess::start(&idle_redis.url(), &["-c", "2", "-Q", "celery"]);
    std::thread::sleep(Duration::from_secs(1));
    let (idle_peak, _) = memory_mib(idle.pid());
    drop(idle);
    let worker = WorkerProcess::start(&redis.url(), &["-c", "2", "-Q", "celery"]);
    poll_until(Duration::from_secs(120), Duration::from_millis(50), || {
        let (back, held): (usize, usize) =
            (redis.query(redis::cmd("LLEN").arg("elsewhere")), redis.query(redis::cmd("HLEN").arg("unacked")));
        if back == HELD && held == 0 { Ok(()) } else { Err(format!("{back} put back, {held} held:\n{}", worker.log_text())) }
    });
    let (peak, now) = memory_mib(worker.pid());
    eprintln!("worker memory across a sweep of {total_mib} MiB held: peak {peak} MiB, now {now} MiB; {idle_peak} MiB with none");
    // Read 4 MiB at a time, about ten copies of it at once (reading all 200 a round trip
    // took it from 62 to 1,289 MiB).
    assert!(peak < idle_peak + 64, "the sweep's worker peaked at {peak} MiB ({idle_peak} MiB with nothing held) over {total_mib} MiB held");
    let back: Vec<Vec<u8>> = (0..HELD).map(|_| redis.query(redis::cmd("RPOP").arg("elsewhere"))).collect();
    let ids: std::collections::HashSet<String> = back
        .iter()
        .map(|raw| taskhost::protocol::decode(raw).unwrap())
        .inspect(|d| assert!(d.headers.redelivered, "put back marked redelivered"))
        .map(|d| d.headers.id)
        .collect();
    assert_eq!(ids.len(), HELD, "each held message put back once");
}

/// `n` no-op messages on `celery` whose delivery tags are `tag-<id>`, so MONITOR's acks
/// name their tasks; their ids.
fn push_tagged(conn: &mut redis::Connection, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        let mut message: serde_json::Value = serde_json::from_slice(&celery_message("tasks.noop", id, &serde_json::json!([]))).unwrap();
        message["properties"]["delivery_tag"] = format!("tag-{id}").into();
        pipe.cmd("LPUSH").arg("celery").arg(message.to_string()).ignore();
    }
    pipe.query::<()>(conn).unwrap();
    ids
}

/// A message is acked only after its record's notice went out: a batch's notices ride
/// ahead of the next batch's writes, and the acks wait for them, through a drain and
/// through a SIGTERM with notices owed. A worker dying between the two would leave a
/// subscribed client waiting for a notice no redelivery sends. The results go through a
/// proxy adding 20 ms each way, so an ack not held back would reach Redis first. Read
/// off MONITOR: for every task, its PUBLISH comes before the HDEL that acks it. (Without
/// STARTED records: a SUCCESS over one goes through STORE, which publishes as it writes.)
#[test]
fn a_message_is_acked_only_after_its_results_notice_went_out() {
    const TASKS: usize = 2000;
    let redis = RedisServer::start();
    let slow = FaultProxy::start(redis.port);
    slow.set(Fault::Latency(Duration::from_millis(20)));
    let results = format!("redis://127.0.0.1:{}/0", slow.port);
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("monitor.log");
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "monitor"])
        .stdout(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("redis-cli (installed with redis-server)");
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.starts_with("OK") { Ok(()) } else { Err(format!("MONITOR not attached: {text:?}")) }
    });
    let mut conn = redis.client().get_connection().unwrap();
    let mut ids = push_tagged(&mut conn, TASKS);
    let mut worker = WorkerProcess::start(&redis.url(), &["-c", "8", "-Q", "celery", "--track-started", "false", "--result-backend", &results]);
    let left = |conn: &mut redis::Connection| -> (usize, usize) {
        (redis::cmd("LLEN").arg("celery").query(conn).unwrap(), redis::cmd("HLEN").arg("unacked").query(conn).unwrap())
    };
    poll_until(Duration::from_secs(120), Duration::from_millis(50), || match left(&mut conn) {
        (0, 0) => Ok(()),
        other => Err(format!("(queued, unacked) {other:?}")),
    });
    // Stopped mid-burst: what it owes then goes out before the acks held back for it.
    ids.extend(push_tagged(&mut conn, TASKS));
    poll_until(Duration::from_secs(60), Duration::from_millis(2), || match left(&mut conn).0 {
        n if n < TASKS * 3 / 4 => Ok(()),
        n => Err(format!("{n} still queued")),
    });
    worker.signal(libc::SIGTERM);
    assert!(worker.wait(Duration::from_secs(30)).success(), "{}", worker.log_text());
    std::thread::sleep(Duration::from_millis(200));
    let _ = monitor.kill();
    let _ = monitor.wait();

    let text = std::fs::read_to_string(&log_path).unwrap();
    let (mut published, mut acked) = (HashMap::new(), HashMap::new());
    for (at, line) in text.lines().enumerate() {
        // The SUCCESS notice, what a waiting client waits for (STARTED ones come first).
        if let Some((_, rest)) = line.split_once("\"PUBLISH\" \"celery-task-meta-").filter(|_| line.contains("SUCCESS")) {
            let id = rest.split('"').next().unwrap().to_string();
            published.entry(id).or_insert(at);
        } else if let Some((_, tags)) = line.split_once("\"HDEL\" \"unacked\" ") {
            for tag in tags.split(' ') {
                let id = tag.trim_matches('"').trim_start_matches("tag-").to_string();
                acked.entry(id).or_insert(at);
            }
        }
    }
    let (mut checked, mut not_run, mut unacked) = (0, 0, 0);
    for id in &ids {
        let stored: Option<String> = redis::cmd("GET").arg(format!("celery-task-meta-{id}")).query(&mut conn).unwrap();
        match (stored, published.get(id), acked.get(id)) {
            (Some(_), Some(p), Some(a)) => {
                assert!(p < a, "task {id} was acked (MONITOR line {a}) before its notice (line {p})");
                checked += 1;
            }
            // Never run: still queued, or handed back at the stop.
            (None, None, _) => not_run += 1,
            // Run and stored, left unacked: only if its notice never went out before the
            // worker stopped (which Redis, here throughout, does not cause).
            (Some(_), _, None) => unacked += 1,
            other => panic!("task {id}: (record, PUBLISH line, ack line) {other:?}"),
        }
    }
    let (queued, held) = left(&mut conn);
    eprintln!("acks after notices: {checked} checked; {not_run} not run, {unacked} left unacked; {queued} queued, {held} held");
    assert_eq!(queued + held, not_run + unacked, "every message not acked is still queued or held");
    assert_eq!(unacked, 0, "a stop with Redis up sends the notices owed, then the acks held back for them");
    assert!(checked > TASKS, "none of the second burst ran and was acked: {checked}");
}

/// `sqlite3` through the test Python: one query's rows as JSON.
fn sqlite_query(path: &std::path::Path, sql: &str) -> serde_json::Value {
    let script = "import json, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(json.dumps(c.execute(sys.argv[2]).fetchall()))";
    let out = run_bounded(std::process::Command::new(python()).args(["-c", script]).arg(path).arg(sql), Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The embedded broker under the same kills: worker processes die mid-transaction; the
/// file passes `PRAGMA integrity_check` and every task ends with a result.
#[test]
fn killing_worker_processes_on_the_embedded_broker_corrupts_nothing_and_loses_nothing() {
    const TASKS: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let broker = format!("sqlite://{}", db.display());
    let worker = WorkerProcess::start_processes(
        2,
        &broker,
        &plugins_dir(),
        &["-c", "16", "--visibility-timeout", "5"],
        &[("RUST_LOG", RUN_LOG)],
        Duration::from_secs(30),
    );
    children_up(&worker, 2);
    let sent = send(&broker, &["tasks.noop", "--count", &TASKS.to_string()]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200 + random_below(800)));
        let pids = children_up(&worker, 2);
        kill(pids[random_below(2) as usize], libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = sqlite_query(&db, "SELECT COUNT(*) FROM results WHERE status = 'SUCCESS'")[0][0].as_u64().unwrap();
        if done as usize >= TASKS {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of {TASKS} results after 180 s:\n{}", worker.log_text().lines().rev().take(30).collect::<Vec<_>>().join("\n"));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sqlite_query(&db, "PRAGMA integrity_check"), serde_json::json!([["ok"]]));
    let left = sqlite_query(&db, "SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM dead_letters)");
    assert_eq!(left, serde_json::json!([[0, 0]]), "(messages left, dead letters)");
    let (twice, extra) = duplicates(&runs_per_task(&worker.log_text()));
    eprintln!("embedded broker: {TASKS} tasks stored through 5 kill -9; {twice} ran twice ({extra} extra runs)");
    assert!(twice <= 5 * 64, "{twice} tasks ran more than once");
}

/// The nice value of every thread of `pid` (field 19 of each thread's stat).
fn thread_nices(pid: i32) -> Vec<i32> {
    let mut nices = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The fields after the command name's closing parenthesis start at field 3, state.
        if let Some(nice) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(16)) {
            nices.push(nice.parse().unwrap());
        }
    }
    assert!(!nices.is_empty(), "no threads read for {pid}");
    nices
}

/// Worker processes run 10 nice levels below their supervisor by default, in every thread
/// (the sandboxes' epoch ticker too), and so does one that replaces a killed one; with
/// `--worker-nice 0` they stay level; a single-process `serve` lowers itself (here by
/// taskhost.toml's `worker_nice`); a value the kernel cannot take is refused, as a flag
/// and in the file.
#[test]
fn worker_processes_run_below_the_supervisors_priority_restarted_ones_too() {
    let dir = tempfile::tempdir().unwrap();
    let broker = format!("sqlite://{}", dir.path().join("broker.db").display());
    let own = thread_nices(std::process::id() as i32)[0];
    let lowered = (own + 10).min(19);
    let worker = WorkerProcess::start_processes(2, &broker, &plugins_dir(), &["-c", "4"], &[], Duration::from_secs(30));
    let pids = children_up(&worker, 2);
    let supervisor = thread_nices(worker.pid());
    assert!(supervisor.iter().all(|n| *n == own), "the supervisor keeps its priority: {supervisor:?}");
    for pid in &pids {
        let nices = thread_nices(*pid);
        assert!(nices.len() >= 2, "a worker has its epoch thread: {nices:?}");
        assert!(nices.iter().all(|n| *n == lowered), "worker {pid}: {nices:?}, expected {lowered}");
    }
    kill(pids[0], libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    let replacement = loop {
        let now = worker.children();
        if let Some(new) = now.iter().find(|p| !pids.contains(p)) {
            break *new;
        }
        assert!(Instant::now() < deadline, "no worker replaced {}:
{}", pids[0], worker.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(thread_nices(replacement).iter().all(|n| *n == lowered), "the replacement: {:?}", thread_nices(replacement));
    drop(worker);

    let level = WorkerProcess::start_processes(2, &broker, &plugins_dir(), &["-c", "4", "--worker-nice", "0"], &[], Duration::from_secs(30));
    for pid in children_up(&level, 2) {
        assert!(thread_nices(pid).iter().all(|n| *n == own), "--worker-nice 0: {:?}", thread_nices(pid));
    }
    drop(level);

    // From taskhost.toml this time.
    let config = dir.path().join("taskhost.toml");
    std::fs::write(&config, "worker_nice = 3\n").unwrap();
    let config_flag = config.to_str().unwrap();
    let single = WorkerProcess::start_processes(1, &broker, &plugins_dir(), &["-c", "4", "--config", config_flag], &[], Duration::from_secs(30));
    let nices = thread_nices(single.pid());
    assert!(nices.iter().all(|n| *n == (own + 3).min(19)), "-p 1, worker_nice = 3: {nices:?}");
    drop(single);

    let refused = taskhost(&["serve", "--broker", &broker, "--worker-nice", "20"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--worker-nice"), "{}", stderr(&refused));
    std::fs::write(&config, "worker_nice = 20\n").unwrap();
    let refused = taskhost(&["serve", "--broker", &broker, "--config", config_flag]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("worker_nice = 20"), "{}", stderr(&refused));
}

/// Redis killed (SIGKILL) mid-drain and started again on its append-only file: the
/// worker is consuming again within 2 s of Redis accepting connections, and every task
/// Redis had acknowledged ends with its result, run once.
#[test]
fn a_redis_crash_and_restart_mid_drain_loses_nothing_and_consuming_resumes_within_2s() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let redis = RedisServer::start_persistent(port, data.path());
    let url = redis.url();
    let worker = WorkerProcess::start_with_env(&url, &plugins_dir(), &["-c", "8"], &[("RUST_LOG", RUN_LOG)]);
    let mut conn = redis.client().get_connection().unwrap();
    let ids = enqueue(&mut conn, "tasks.sleep", &serde_json::json!([10]), 3000);
    std::thread::sleep(Duration::from_millis(1500));
    let before: usize = redis::cmd("LLEN").arg("celery").query(&mut conn).unwrap();
    assert!(before > 500, "the drain was nearly over before the crash ({before} left)");
    drop(conn);
    redis.crash();
    std::thread::sleep(Duration::from_secs(3));
    let redis = RedisServer::start_persistent(port, data.path());
    let back = Instant::now();
    let mut conn = redis.client().get_connection().unwrap();
    // Consuming again: the queue shrinks.
    let after_restart: usize = loop {
        match redis::cmd("LLEN").arg("celery").query::<usize>(&mut conn) {
            Ok(n) => break n,
            Err(_) => std::thread::sleep(Duration::from_millis(10)), // still loading the file
        }
    };
    assert!(after_restart > 0 && after_restart <= before, "queue {after_restart} after the restart, {before} before the crash");
    let resumed = loop {
        let n: usize = redis::cmd("LLEN").arg("celery").query(&mut conn).unwrap();
        if n < after_restart {
            break back.elapsed();
        }
        assert!(back.elapsed() < Duration::from_secs(30), "the worker never consumed again:\n{}", worker.log_text());
        std::thread::sleep(Duration::from_millis(10));
    };
    wait_stored(&mut conn, ids.len(), Duration::from_secs(120), &worker);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored(&mut conn), (ids.len(), ids.len()), "(results, SUCCESS)");
    assert_drained(&mut conn);
    let runs = runs_per_task(&worker.log_text());
    eprintln!("redis crash: consuming again {:.0} ms after Redis was back; duplicates {:?}", resumed.as_secs_f64() * 1000.0, duplicates(&runs));
    assert!(resumed <= Duration::from_secs(2), "consuming resumed {resumed:?} after Redis returned");
    assert_eq!(duplicates(&runs), (0, 0), "(tasks run twice, extra runs)");
}

/// A fault proxy between worker and Redis: connections reset, 200 ms added each way, and
/// a 15 s black hole ending in resets. The worker notices the dead connection within
/// 10 s, reconnects after each fault, and every task ends stored, none run twice.
#[test]
fn through_resets_latency_and_a_black_hole_the_worker_notices_reconnects_and_loses_nothing() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port);
    let via_proxy = format!("redis://127.0.0.1:{}/0", proxy.port);
    // A low visibility timeout: a fetch whose reply the black hole swallowed was still
    // recorded by Redis, and those messages come back when it lapses.
    let worker = WorkerProcess::start_with_env(&via_proxy, &plugins_dir(), &["-c", "8", "--visibility-timeout", "10"], &[("RUST_LOG", RUN_LOG)]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 20 tasks of 50 ms every 200 ms, sent around the proxy, for as long as faults last.
    let producer = {
        let (client, stop) = (redis.client(), stop.clone());
        std::thread::spawn(move || {
            let mut conn = client.get_connection().unwrap();
            let mut ids = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ids.extend(enqueue(&mut conn, "tasks.sleep", &serde_json::json!([50]), 20));
                std::thread::sleep(Duration::from_millis(200));
            }
            ids
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        proxy.reset_all();
        std::thread::sleep(Duration::from_secs(1));
    }
    proxy.set(Fault::Latency(Duration::from_millis(200)));
    std::thread::sleep(Duration::from_secs(5));
    proxy.set(Fault::None);
    std::thread::sleep(Duration::from_secs(1));
    let logged_before = worker.log_text().len();
    proxy.set(Fault::BlackHole);
    let hole = Instant::now();
    let noticed = loop {
        let log = worker.log_text();
        if log[logged_before..].contains("no reply from Redis in time") {
            break hole.elapsed();
        }
        assert!(hole.elapsed() < Duration::from_secs(15), "no sign the worker noticed the black hole:\n{}", &log[logged_before..]);
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(15).saturating_sub(hole.elapsed()));
    // It heals as a middlebox that lost its state does: what was held in the hole is
    // gone and the connections from before it are reset.
    proxy.reset_all();
    proxy.set(Fault::None);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ids = producer.join().unwrap();
    let mut conn = redis.client().get_connection().unwrap();
    let drained = wait_stored(&mut conn, ids.len(), Duration::from_secs(90), &worker);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored(&mut conn), (ids.len(), ids.len()), "(results, SUCCESS)");
    assert_drained(&mut conn);
    let runs = runs_per_task(&worker.log_text());
    eprintln!(
        "fault proxy: {} tasks; black hole noticed after {:.1}s; all stored {:.1}s after the faults; duplicates {:?}",
        ids.len(),
        noticed.as_secs_f64(),
        drained.as_secs_f64(),
        duplicates(&runs)
    );
    assert!(noticed <= Duration::from_secs(10), "the black hole went unnoticed for {noticed:?}");
    assert_eq!(duplicates(&runs), (0, 0), "(tasks run twice, extra runs)");
}
