//! The worker against a real redis-server and the real Python Celery client (and a real
//! Python Celery worker, to prove that what `taskhost send` publishes is Celery's format).

use crate::support::*;
use std::time::{Duration, Instant};

#[test]
fn python_send_task_gets_results_with_args_and_kwargs() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "4"]);
    assert_eq!(interop(&redis.url(), &["add"]), "5");
    assert_eq!(interop(&redis.url(), &["kwargs"]), "8");
}

#[test]
fn python_sees_failures_time_limits_and_state_changes() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "4"]);
    assert_eq!(interop(&redis.url(), &["fail"]), "TaskFailed: the disk is full");
    assert!(interop(&redis.url(), &["time_limit"]).starts_with("TimeLimitExceeded"));
    assert_eq!(interop(&redis.url(), &["states"]), "PENDING -> STARTED -> SUCCESS");
}

#[test]
fn python_countdown_and_expires_are_honoured() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "4"]);
    let took: f64 = interop(&redis.url(), &["countdown"]).parse().unwrap();
    assert!(took >= 1.4, "ran after {took}s");
    assert_eq!(interop(&redis.url(), &["expires"]), "TaskRevokedError: expired");
    // Parked, not held: nothing sits in unacked while it waits.
    let id = interop(&redis.url(), &["send", "tasks.add", "[1, 1]", "celery", "0"]);
    assert!(!id.is_empty());
}

#[test]
fn a_thousand_python_tasks_all_complete() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "16"]);
    let out = interop(&redis.url(), &["many", "1000"]);
    assert!(out.starts_with("1000 tasks in"), "{out}");
    let unacked: usize = redis.query(redis::cmd("HLEN").arg("unacked"));
    assert_eq!(unacked, 0, "every message acked");
}

#[test]
fn queue_and_priority_route_to_the_worker_serving_that_queue() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-Q", "media_heavy"]);
    let elsewhere = interop(&redis.url(), &["send", "tasks.add", "[1, 2]", "celery", "0"]);
    let here = interop(&redis.url(), &["send", "tasks.add", "[3, 4]", "media_heavy", "5"]);
    assert_eq!(interop(&redis.url(), &["wait", &here, "10"]), "7");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(interop(&redis.url(), &["state", &elsewhere]), "PENDING");
    let waiting: usize = redis.query(redis::cmd("LLEN").arg("celery"));
    assert_eq!(waiting, 1, "the celery-queue task is untouched");
}

#[test]
fn higher_priority_drains_first_under_backlog() {
    let redis = RedisServer::start();
    let mut ids = Vec::new();
    for priority in ["9", "6", "3", "0"] {
        for _ in 0..3 {
            let out = send(&redis.url(), &["tasks.noop", "--priority", priority]);
            ids.push((priority, stdout(&out)));
        }
    }
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "1", "--prefetch-multiplier", "1"]);
    let mut finished: Vec<(String, &str)> = ids
        .iter()
        .map(|(p, id)| {
            let r = wait_status(&redis.url(), id, "SUCCESS", Duration::from_secs(10));
            (r["date_done"].as_str().unwrap().to_string(), *p)
        })
        .collect();
    finished.sort();
    let order: Vec<&str> = finished.iter().map(|(_, p)| *p).collect();
    assert_eq!(order, ["0", "0", "0", "3", "3", "3", "6", "6", "6", "9", "9", "9"]);
}

fn kill_dash_9_loses_nothing(url: &str) {
    let mut worker = WorkerProcess::start(url, &["-c", "4"]);
    let ids: Vec<String> = (0..12).map(|_| stdout(&send(url, &["tasks.sleep", "--args", "[400]"]))).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = ids.iter().filter(|id| record(url, id)["status"] == "STARTED").count();
    assert!(started > 0, "tasks should be running when the worker is killed");
    worker.signal(libc::SIGKILL);
    worker.wait(Duration::from_secs(5));
    // Past the visibility timeout the next worker's sweeps restore them (its first, or,
    // as holds are recorded in whole seconds rounded up, the one after).
    std::thread::sleep(Duration::from_millis(1200));
    let _next = WorkerProcess::start(url, &["-c", "8", "--visibility-timeout", "1"]);
    for id in &ids {
        let r = wait_status(url, id, "SUCCESS", Duration::from_secs(20));
        assert_eq!(r["result"], 400);
    }
}

#[test]
fn kill_dash_9_with_tasks_in_flight_loses_nothing() {
    let redis = RedisServer::start();
    kill_dash_9_loses_nothing(&redis.url());
    let unacked: usize = redis.query(redis::cmd("HLEN").arg("unacked"));
    assert_eq!(unacked, 0);
}

#[test]
fn kill_dash_9_on_the_embedded_broker_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    kill_dash_9_loses_nothing(&format!("sqlite://{}", dir.path().join("taskhost.db").display()));
}

#[test]
fn the_embedded_broker_is_the_default_and_shared_by_processes() {
    let dir = tempfile::tempdir().unwrap();
    let in_dir = |args: &[&str]| {
        std::process::Command::new(taskhost_bin())
            .args(args)
            .current_dir(dir.path())
            .env("TASKHOST_CACHE_DIR", cache_dir())
            .env_remove("TASKHOST_BROKER")
            .env_remove("TASKHOST_RESULT_BACKEND")
            .output()
            .unwrap()
    };
    let mut worker = std::process::Command::new(taskhost_bin())
        .args(["serve", "-p", "2", "--plugins"])
        .arg(plugins_dir())
        .current_dir(dir.path())
        .env("TASKHOST_CACHE_DIR", cache_dir())
        .env_remove("TASKHOST_BROKER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = in_dir(&["send", "tasks.add", "--args", "[2, 3]", "--wait", "--timeout", "20"]);
    assert_eq!(stdout(&out), "5", "{}", stderr(&out));
    assert!(dir.path().join("taskhost.db").exists(), "sqlite://./taskhost.db is the default");
    let ids: Vec<String> = (0..50).map(|i| stdout(&in_dir(&["send", "tasks.add", "--args", &format!("[{i}, 1]")]))).collect();
    for (i, id) in ids.iter().enumerate() {
        let r = in_dir(&["result", id, "--wait", "--timeout", "20"]);
        assert_eq!(stdout(&r), (i + 1).to_string(), "{}", stderr(&r));
    }
    // A taskhost.toml in the directory is read; flags still win over it.
    std::fs::write(dir.path().join("taskhost.toml"), "broker = \"sqlite://./other.db\"\n").unwrap();
    let queued = in_dir(&["send", "tasks.noop"]);
    assert!(queued.status.success(), "{}", stderr(&queued));
    assert!(dir.path().join("other.db").exists(), "taskhost.toml chose the broker");
    std::fs::write(dir.path().join("taskhost.toml"), "brokr = 1\n").unwrap();
    let bad = in_dir(&["send", "tasks.noop"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).starts_with("error: config taskhost.toml: unknown field `brokr`"), "{}", stderr(&bad));

    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let status = worker.wait().unwrap();
    assert!(status.success(), "supervisor exit {status:?}");
    let mut banner = String::new();
    std::io::Read::read_to_string(worker.stdout.as_mut().unwrap(), &mut banner).unwrap();
    assert!(banner.contains("sqlite://./taskhost.db"), "{banner}");
    assert!(banner.contains("× 2 process(es)"), "{banner}");
    assert!(banner.contains("send tasks.add --args '[2, 3]' --wait"), "{banner}");
}

#[test]
fn sigterm_finishes_running_tasks_and_returns_the_rest() {
    let redis = RedisServer::start();
    let mut worker = WorkerProcess::start(&redis.url(), &["-c", "2", "--shutdown-grace", "10"]);
    let ids: Vec<String> = (0..6).map(|_| stdout(&send(&redis.url(), &["tasks.sleep", "--args", "[600]"]))).collect();
    std::thread::sleep(Duration::from_millis(250));
    worker.signal(libc::SIGTERM);
    let status = worker.wait(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?}\n{}", worker.log_text());
    let done: Vec<&String> = ids.iter().filter(|id| record(&redis.url(), id)["status"] == "SUCCESS").collect();
    assert_eq!(done.len(), 2, "the two running tasks finished:\n{}", worker.log_text());
    let queued: usize = redis.query(redis::cmd("LLEN").arg("celery"));
    let unacked: usize = redis.query(redis::cmd("HLEN").arg("unacked"));
    assert_eq!((queued, unacked), (4, 0), "the held rest went back to the queue");

    // Past the grace period a running task is stopped and requeued, not failed.
    let mut worker = WorkerProcess::start(&redis.url(), &["-c", "1", "--shutdown-grace", "0.3", "-Q", "slow"]);
    let slow = stdout(&send(&redis.url(), &["tasks.sleep", "--args", "[10000]", "-Q", "slow"]));
    wait_status(&redis.url(), &slow, "STARTED", Duration::from_secs(5));
    let t0 = Instant::now();
    worker.signal(libc::SIGTERM);
    assert!(worker.wait(Duration::from_secs(8)).success());
    // Not waited for (it would take 10 s): stopped after the 0.3 s grace. The drain also
    // waits out the fetch in flight (a `BRPOP` of up to 1 s, never abandoned), and beside
    // the parallel suite this debug build once took 2.02 s in all.
    assert!(t0.elapsed() < Duration::from_secs(5), "drain took {:?}", t0.elapsed());
    let requeued: usize = redis.query(redis::cmd("LLEN").arg("slow"));
    assert_eq!(requeued, 1, "the stopped task is back on its queue");
}

#[test]
fn poison_messages_are_dead_lettered_and_the_worker_keeps_going() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &[]);
    let _: () = redis.query(redis::cmd("LPUSH").arg("celery").arg("this is not json"));
    let pickle = r#"{"body": "gAR9", "content-type": "application/x-python-serialize", "content-encoding": "binary", "headers": {"task": "tasks.add", "id": "pickled-1"}, "properties": {"delivery_tag": "tag-pickle", "body_encoding": "base64", "priority": 0}}"#;
    let _: () = redis.query(redis::cmd("LPUSH").arg("celery").arg(pickle));
    let unknown = stdout(&send(&redis.url(), &["tasks.nope"]));
    let ok = send(&redis.url(), &["tasks.add", "--args", "[2, 2]", "--wait", "--timeout", "10"]);
    assert_eq!(stdout(&ok), "4", "{}", stderr(&ok));
    let failed = wait_status(&redis.url(), &unknown, "FAILURE", Duration::from_secs(5));
    assert_eq!(failed["result"]["exc_type"], "NotRegistered");
    assert_eq!(failed["result"]["exc_module"], "celery.exceptions");

    let letters: Vec<String> = redis.query(redis::cmd("LRANGE").arg("taskhost.dlq").arg(0).arg(-1));
    let letters: Vec<serde_json::Value> = letters.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let reasons: Vec<&str> = letters.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    assert_eq!(letters.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("undecodable message: envelope is not JSON")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("application/x-python-serialize")), "{reasons:?}");
    assert!(reasons.contains(&"no component serves task tasks.nope"), "{reasons:?}");
    assert!(letters.iter().any(|l| l["message"] == "this is not json"), "the original message is kept");
    let unacked: usize = redis.query(redis::cmd("HLEN").arg("unacked"));
    assert_eq!(unacked, 0);
}

#[test]
fn retries_requeue_the_same_id_until_they_succeed_or_run_out() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &[]);
    let ok = send(&redis.url(), &["tasks.flaky", "--args", "[2]", "--wait", "--timeout", "10"]);
    assert_eq!(stdout(&ok), "2", "{}", stderr(&ok));
    let out = send(&redis.url(), &["tasks.flaky", "--args", "[9]", "--wait", "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("MaxRetriesExceededError: Can't retry tasks.flaky["), "{}", stderr(&out));
}

#[test]
fn taskhost_send_is_accepted_by_a_real_python_celery_worker() {
    let redis = RedisServer::start();
    let mut celery = std::process::Command::new(python())
        .args(["-m", "celery", "-A", "tasks", "worker", "-P", "solo", "-c", "1", "--without-mingle", "--without-gossip", "-l", "warning"])
        .current_dir(python_dir().join("../../examples"))
        .env("BROKER", redis.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = run_bounded(
        std::process::Command::new(taskhost_bin()).args([
            "send", "tasks.add", "--args", "[2, 3]", "--wait", "--timeout", "60", "--broker", &redis.url(),
        ]),
        Duration::from_secs(90),
    );
    let echo = run_bounded(
        std::process::Command::new(taskhost_bin()).args([
            "send", "tasks.echo", "--kwargs", r#"{"value": {"a": [1, null]}}"#, "--priority", "5", "--wait", "--timeout", "30",
            "--broker", &redis.url(),
        ]),
        Duration::from_secs(60),
    );
    let _ = celery.kill();
    let _ = celery.wait();
    assert_eq!(stdout(&out), "5", "{}", stderr(&out));
    assert_eq!(stdout(&echo), r#"{"a":[1,null]}"#, "{}", stderr(&echo));
}

#[test]
fn the_worker_survives_a_redis_restart() {
    let redis = RedisServer::start();
    let port = redis.port;
    let _worker = WorkerProcess::start(&redis.url(), &[]);
    let first = send(&redis.url(), &["tasks.add", "--args", "[1, 1]", "--wait", "--timeout", "10"]);
    assert_eq!(stdout(&first), "2");
    drop(redis);
    std::thread::sleep(Duration::from_millis(1500));
    let redis = RedisServer::start_on(port);
    let again = send(&redis.url(), &["tasks.add", "--args", "[2, 2]", "--wait", "--timeout", "20"]);
    assert_eq!(stdout(&again), "4", "{}", stderr(&again));
}

#[test]
fn acl_users_and_tls_connections_work() {
    // An ACL user with a password; the default user switched off.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut acl = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--user", "worker", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("redis://worker:s3cret@127.0.0.1:{port}/0");
    {
        let _worker = WorkerProcess::start(&url, &[]);
        let out = send(&url, &["tasks.add", "--args", "[20, 1]", "--wait", "--timeout", "10"]);
        assert_eq!(stdout(&out), "21", "{}", stderr(&out));
        let denied = send(&format!("redis://worker:wrong@127.0.0.1:{port}/0"), &["tasks.noop"]);
        assert_eq!(denied.status.code(), Some(2));
        assert!(stderr(&denied).contains("connecting to broker redis://worker:***@127.0.0.1"), "{}", stderr(&denied));
    }
    let _ = acl.kill();
    let _ = acl.wait();

    // TLS with a private CA, trusted through TASKHOST_TLS_CA_FILE.
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let ok = std::process::Command::new("openssl").args(args).current_dir(d).output().unwrap();
        assert!(ok.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&ok.stderr));
    };
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=taskhost test CA"]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"]);
    let tls_port = free_port();
    let mut tls = std::process::Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &tls_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-cert-file", "server.pem", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let ca = d.join("ca.pem");
    let run = |args: &[&str]| {
        let mut all = vec!["send", "--broker", &url];
        all.extend_from_slice(args);
        std::process::Command::new(taskhost_bin()).args(&all).env("TASKHOST_TLS_CA_FILE", &ca).output().unwrap()
    };
    let untrusted = send(&url, &["tasks.noop"]);
    assert_eq!(untrusted.status.code(), Some(2), "an unknown CA is refused");
    let mut worker = std::process::Command::new(taskhost_bin())
        .args(["serve", "-p", "1", "--broker", &url, "--plugins"])
        .arg(plugins_dir())
        .env("TASKHOST_TLS_CA_FILE", &ca)
        .env("TASKHOST_CACHE_DIR", cache_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = run(&["tasks.add", "--args", "[40, 2]", "--wait", "--timeout", "20"]);
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = tls.kill();
    let _ = tls.wait();
    assert_eq!(stdout(&out), "42", "{}", stderr(&out));
}

#[test]
fn the_celery_comparison_benchmark_runs_in_smoke_size() {
    // Not a timed test: it checks that `make bench` works end to end, at a tiny scale.
    let out_dir = tempfile::tempdir().unwrap();
    let root = python_dir().join("../..");
    let out = run_bounded(
        std::process::Command::new(python())
            .arg(root.join("bench/run.py"))
            .args(["--scale", "0.002", "--taskhost"])
            .arg(taskhost_bin())
            .arg("--plugins")
            .arg(plugins_dir())
            .arg("--python-plugins")
            .arg(plugins_dir().parent().unwrap().join("python-plugins"))
            // The I/O scenario's HTTP peer, built beside the binary under test (`make test`).
            .arg("--slow-server")
            .arg(taskhost_bin().with_file_name("slow-server"))
            .arg("--out")
            .arg(out_dir.path())
            .env("TASKHOST_CACHE_DIR", cache_dir()),
        // Its Python scenario compiles py.noop from an empty cache, by the debug build.
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("celery prefork -c 2") && table.contains("taskhost -p"), "{table}");
    assert!(table.contains("a's throughput with fairness on") && table.contains("no-op drain over 10 tenants"), "{table}");
    assert!(table.contains("Python tasks:") && table.contains("taskhost / celery:"), "{table}");
    assert!(table.contains("Events: no-op drain") && table.contains("events on, a reader following"), "{table}");
    let written: Vec<std::path::PathBuf> = std::fs::read_dir(out_dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    let json_path = written.iter().find(|p| p.extension().is_some_and(|e| e == "json")).expect("a JSON of results");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    assert_eq!(json["systems"].as_object().unwrap().len(), 3);
    let chart = std::fs::read_to_string(json_path.with_extension("svg")).expect("a chart beside the JSON");
    assert!(chart.starts_with("<svg") || chart.starts_with("<?xml"), "{}", &chart[..chart.len().min(200)]);
    assert!(chart.contains("taskhost"), "the chart names taskhost");
}

#[test]
fn every_ack_reaches_the_broker_when_batches_fill_while_a_flush_is_in_flight() {
    // Prefetch 256 (= the ack batch): a batch can fill, and flush on its own, while the
    // background flush is still waiting on Redis. Overlapping flushes once dropped tags.
    let redis = RedisServer::start();
    let url = redis.url();
    let _worker = WorkerProcess::start(&url, &["-c", "64"]);
    let sent = send(&url, &["tasks.noop", "--count", "20000", "--ignore-result"]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
        let queued: usize = redis.query(redis::cmd("LLEN").arg("celery"));
        let unacked: usize = redis.query(redis::cmd("HLEN").arg("unacked"));
        if (queued, unacked) == (0, 0) { Ok(()) } else { Err(format!("not every message run and acked: {queued} queued, {unacked} unacked")) }
    });
}
