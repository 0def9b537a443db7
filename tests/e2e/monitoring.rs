//! Monitoring with the tools Celery operators use: real Flower, `celery events`, `celery
//! control`, Prometheus scrapes of `--http`, the dashboard in headless chromium, JSON logs.

use crate::support::*;
use std::io::{Read, Write};
use std::time::Duration;

/// One HTTP/1.1 request to the listener on `port` (connection closed after), with the
/// given Host header and bearer token: status and body.
fn request(method: &str, port: u16, path: &str, host: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn http(method: &str, port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    request(method, port, path, "127.0.0.1", token)
}

/// A request with a Host header of the caller's choosing (no token).
fn http_with_host(method: &str, port: u16, path: &str, host: &str) -> (u16, String) {
    request(method, port, path, host, None)
}

fn monitoring(broker: &str, args: &[&str]) -> String {
    let out = run_bounded(
        std::process::Command::new(python()).arg(python_dir().join("monitoring.py")).args(args).env("BROKER", broker),
        Duration::from_secs(150),
    );
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "monitoring.py {args:?} failed:\n{so}\n{se}");
    so
}

/// A `serve` of several processes (WorkerProcess runs one), logging to a file.
struct Serve {
    child: KillOnDrop,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Serve {
    fn start(broker: &str, plugins: &std::path::Path, args: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(taskhost_bin())
            .args(["serve", "--broker", broker, "--plugins"])
            .arg(plugins)
            .args(args)
            .env("TASKHOST_CACHE_DIR", cache_dir())
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Serve { child: KillOnDrop(child), log, _dir: dir }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&self, needle: &str, count: usize, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while self.log_text().matches(needle).count() < count {
            assert!(std::time::Instant::now() < deadline, "serve log never showed {needle:?} ×{count}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn sent_id(out: &std::process::Output) -> String {
    assert!(out.status.success(), "send failed: {}", stderr(out));
    stdout(out).trim().lines().next().unwrap().to_string()
}

#[test]
fn flower_sees_taskhost_workers_and_tasks_and_its_controls_take_effect() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "1", "-n", "th-flower@box"]);
    let log = tempfile::NamedTempFile::new().unwrap();
    let port = free_port().to_string();
    // No -E: Flower's own enable_events broadcast turns task events on.
    let out = monitoring(&redis.url(), &["flower", &port, "th-flower@box", log.path().to_str().unwrap()]);
    assert!(out.contains("flower ok"), "{out}");
}

#[test]
fn celery_events_dump_prints_taskhost_events() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-E", "-n", "th-events@box"]);
    let out = monitoring(&redis.url(), &["events_dump", "2.5"]);
    let id = out.lines().next().unwrap().trim();
    for kind in ["task received", "task started", "task succeeded"] {
        let line = out.lines().find(|l| l.contains(kind) && l.contains(id)).unwrap_or_else(|| panic!("no {kind} for {id}:\n{out}"));
        assert!(line.starts_with("th-events@box ["), "{line}");
    }
    let succeeded = out.lines().find(|l| l.contains("task succeeded") && l.contains(id)).unwrap();
    assert!(succeeded.contains("result=42") && succeeded.contains("runtime="), "{succeeded}");
    assert!(out.lines().any(|l| l.starts_with("th-events@box [") && l.contains("heartbeat") && l.contains("sw_ident=taskhost")), "{out}");
}

#[test]
fn celery_control_commands_change_a_running_worker_and_shutdown_stops_it() {
    let redis = RedisServer::start();
    let mut worker = WorkerProcess::start(&redis.url(), &["-c", "1", "-n", "th-control@box"]);
    let out = monitoring(&redis.url(), &["control", "th-control@box"]);
    assert!(out.contains("control ok"), "{out}");
    let status = worker.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", worker.log_text());
    assert!(worker.log_text().contains("shutdown requested by a remote control command"));
}

#[test]
fn a_supervised_worker_stopped_by_shutdown_is_not_restarted() {
    let redis = RedisServer::start();
    let mut serve = Serve::start(&redis.url(), &plugins_dir(), &["-p", "2", "-n", "th-sup@box"]);
    serve.wait_for_log("worker ready", 2, Duration::from_secs(30));
    let script = "import os; from celery import Celery; Celery(broker=os.environ['BROKER']).control.shutdown()";
    let out = run_bounded(std::process::Command::new(python()).args(["-c", script]).env("BROKER", redis.url()), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.child.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "serve kept running after shutdown:\n{}", serve.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(!serve.log_text().contains("restarting"), "{}", serve.log_text());
}

#[test]
fn one_scrape_covers_every_worker_process_under_celery_exporters_names() {
    let redis = RedisServer::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // One message held per process, so that a backlog stays on the broker to be counted.
    let serve = Serve::start(
        &redis.url(),
        &plugins_dir(),
        &["-p", "2", "-c", "1", "--prefetch-multiplier", "1", "--http", &addr, "-n", "th-metrics@box"],
    );
    serve.wait_for_log("worker ready", 2, Duration::from_secs(30));
    assert_eq!(http("GET", port, "/healthz", None), (200, "ok\n".into()));
    for _ in 0..6 {
        let out = send(&redis.url(), &["tasks.add", "--args", "[1, 2]", "--wait"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = send(&redis.url(), &["tasks.fail", "--args", "[\"boom\"]", "--kwargs", "{\"kind\": \"ValueError\"}", "--wait"]);
    assert!(!out.status.success());
    // Two sleeps keep both processes busy; three more wait on the broker: the depth.
    for _ in 0..5 {
        sent_id(&send(&redis.url(), &["tasks.sleep", "--args", "[5000]"]));
    }
    let expected = [
        "celery_task_succeeded_total{name=\"tasks.add\",hostname=\"box\",queue_name=\"celery\"} 6\n",
        "# TYPE celery_task_succeeded_total counter",
        "celery_task_received_total{name=\"tasks.add\",hostname=\"box\",queue_name=\"celery\"} 6",
        "celery_task_started_total{name=\"tasks.add\",hostname=\"box\",queue_name=\"celery\"} 6",
        "celery_task_failed_total{name=\"tasks.fail\",hostname=\"box\",exception=\"ValueError\",queue_name=\"celery\"} 1",
        "celery_worker_up{hostname=\"box\"} 1",
        "celery_task_runtime_bucket{name=\"tasks.add\",hostname=\"box\",queue_name=\"celery\",le=\"+Inf\"} 6",
        "celery_task_runtime_count{name=\"tasks.add\",hostname=\"box\",queue_name=\"celery\"} 6",
        "celery_task_queue_wait_time_bucket{name=\"tasks.add\",hostname=\"box\",queue_name=\"celery\",le=\"1800\"} 6",
        "celery_queue_length{queue_name=\"celery\"} 3",
        "celery_worker_tasks_active{hostname=\"box\"} 2",
        "taskhost_task_runs_total{name=\"tasks.add\",version=\"1.0.0\",outcome=\"succeeded\",hostname=\"box\",queue_name=\"celery\"} 6",
        "taskhost_plugin_loaded{name=\"tasks.add\",version=\"1.0.0\",",
        "taskhost_worker_processes 2",
    ];
    // Reports are rewritten every second.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, text) = http("GET", port, "/metrics", None);
        assert_eq!(status, 200, "{text}");
        let missing: Vec<&&str> = expected.iter().filter(|l| !text.contains(**l)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "missing {missing:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = http("GET", port, "/readyz", None);
    assert_eq!(status, 200, "{body}");
    // Open reads on loopback answer only to local names (no DNS rebinding).
    assert_eq!(http_with_host("GET", port, "/metrics", "evil.example").0, 403);
    assert_eq!(http_with_host("GET", port, "/api/overview", "localhost:1234").0, 200);
}

#[test]
fn the_http_listener_needs_a_token_off_loopback_and_for_every_action() {
    let redis = RedisServer::start();
    // Bound beyond loopback without a token: refuses to start.
    let port = free_port();
    let out = run_bounded(
        std::process::Command::new(taskhost_bin())
            .args(["serve", "-p", "1", "--broker", &redis.url(), "--plugins", plugins_dir().to_str().unwrap()])
            .args(["--http", &format!("0.0.0.0:{port}")])
            .env("TASKHOST_CACHE_DIR", cache_dir()),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs --http-token"), "{}", stderr(&out));

    let token = "test-token-0123456789abcdef";
    let serve = Serve::start(
        &redis.url(),
        &plugins_dir(),
        &["-p", "1", "--http", &format!("0.0.0.0:{port}"), "--http-token", token, "-n", "th-token@box"],
    );
    serve.wait_for_log("worker ready", 1, Duration::from_secs(30));
    // A dead letter to act on: a task nobody serves.
    let id = sent_id(&send(&redis.url(), &["tasks.nobody"]));
    wait_status(&redis.url(), &id, "FAILURE", Duration::from_secs(15));
    let letters = || stdout(&cli(&redis.url(), &["dlq", "list", "--json"]));
    let letter: serde_json::Value = serde_json::from_str(letters().lines().next().unwrap()).unwrap();
    let letter_id = letter["letter_id"].as_str().unwrap().to_string();

    assert_eq!(http("GET", port, "/healthz", None).0, 200);
    for path in ["/metrics", "/api/overview", "/", "/readyz"] {
        assert_eq!(http("GET", port, path, None).0, 401, "{path} without a token");
        assert_eq!(http("GET", port, path, Some("wrong-token-0123456789")).0, 401, "{path} with a wrong token");
    }
    let replay = format!("/api/dead-letters/{letter_id}/replay");
    assert_eq!(http("POST", port, &replay, None).0, 401);
    // A task waiting on its countdown: a refused revoke leaves it PENDING.
    let parked = sent_id(&send(&redis.url(), &["tasks.add", "--args", "[1, 1]", "--countdown", "60"]));
    let revoke = format!("/api/tasks/{parked}/revoke");
    assert_eq!(http("POST", port, &revoke, None).0, 401);
    assert_eq!(http("POST", port, "/api/rate-limit", None).0, 401);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(record(&redis.url(), &parked)["status"], "PENDING", "a refused revoke still revoked");
    assert!(letters().contains(&letter_id), "a refused replay still changed the dead letters");
    // A page from another origin (DNS rebinding) reads nothing, token or not in the way.
    let (status, _) = http_with_host("GET", port, "/api/overview", "evil.example:80");
    assert_eq!(status, 401);

    assert_eq!(http("GET", port, "/metrics", Some(token)).0, 200);
    let (status, body) = http("POST", port, &replay, Some(token));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("replayed"), "{body}");
    assert!(!letters().contains(&letter_id), "the replayed letter is still listed");
    let (status, body) = http("POST", port, &revoke, Some(token));
    assert_eq!(status, 200, "{body}");
    assert_eq!(wait_status(&redis.url(), &parked, "REVOKED", Duration::from_secs(10))["status"], "REVOKED");
}

#[test]
fn taskhost_inspect_and_events_answer_for_taskhost_and_celery_workers_alike() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "1", "-n", "th-inspect@box"]);
    let py_dir = tempfile::tempdir().unwrap();
    let py_log = std::fs::File::create(py_dir.path().join("celery.log")).unwrap();
    let celery = std::process::Command::new(python())
        .args(["-m", "celery", "-A", "flowerapp", "worker", "-P", "solo", "-Q", "python_only", "-n", "py-inspect@box", "-E"])
        .current_dir(python_dir())
        .env("PYTHONPATH", python_dir())
        .env("BROKER", redis.url())
        .stdout(py_log.try_clone().unwrap())
        .stderr(py_log)
        .spawn()
        .unwrap();
    let _celery = KillOnDrop(celery);
    let inspect = |args: &[&str]| {
        let mut all = vec!["inspect"];
        all.extend_from_slice(args);
        cli(&redis.url(), &all)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = inspect(&["ping", "--json"]);
        let text = stdout(&out);
        if text.contains("py-inspect@box") && text.contains("th-inspect@box") {
            let pongs: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(pongs["th-inspect@box"], serde_json::json!({"ok": "pong"}));
            assert_eq!(pongs["py-inspect@box"], serde_json::json!({"ok": "pong"}));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "both nodes never answered ping: {text}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let registered: serde_json::Value = serde_json::from_str(&stdout(&inspect(&["registered", "--json"]))).unwrap();
    assert!(registered["py-inspect@box"].as_array().unwrap().iter().any(|t| t == "tasks.add"), "{registered}");
    assert!(registered["th-inspect@box"].as_array().unwrap().iter().any(|t| t == "tasks.add"), "{registered}");
    let human = stdout(&inspect(&["active_queues", "-d", "th-inspect@box"]));
    assert!(human.contains("->  th-inspect@box: OK") && human.contains("\"celery\"") && human.contains("1 node online."), "{human}");

    // One sandbox busy, the rest of what was sent held: active 1, reserved 2.
    let ids: Vec<String> = (0..3).map(|_| sent_id(&send(&redis.url(), &["tasks.sleep", "--args", "[1500]"]))).collect();
    std::thread::sleep(Duration::from_millis(500));
    let active: serde_json::Value = serde_json::from_str(&stdout(&inspect(&["active", "-d", "th-inspect@box", "--json"]))).unwrap();
    let reserved: serde_json::Value = serde_json::from_str(&stdout(&inspect(&["reserved", "-d", "th-inspect@box", "--json"]))).unwrap();
    let (active, reserved) = (active["th-inspect@box"].as_array().unwrap().clone(), reserved["th-inspect@box"].as_array().unwrap().clone());
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(reserved.len(), 2, "{reserved:?}");
    for r in active.iter().chain(&reserved) {
        assert!(ids.contains(&r["id"].as_str().unwrap().to_string()));
        assert_eq!(r["name"], "tasks.sleep");
        assert_eq!(r["args"], serde_json::json!([1500]));
        assert_eq!(r["delivery_info"]["routing_key"], "celery");
    }
    // Running: since when and acked late, as Celery's Request.info() says it.
    assert!(active[0]["time_start"].as_f64().is_some_and(|t| t > 1.7e9), "{active:?}");
    assert_eq!(active[0]["acknowledged"], false, "{active:?}");
    assert!(reserved.iter().all(|r| r["time_start"].is_null()), "{reserved:?}");

    // Both workers' heartbeats in `taskhost events`.
    let events = cli(&redis.url(), &["events", "--json", "--duration", "5"]);
    let lines: Vec<serde_json::Value> = stdout(&events).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    for node in ["th-inspect@box", "py-inspect@box"] {
        assert!(
            lines.iter().any(|e| e["type"] == "worker-heartbeat" && e["hostname"] == node),
            "no heartbeat from {node} in {} events",
            lines.len()
        );
    }
}

/// A child process stopped however the test ends: SIGTERM, then SIGKILL past 20 s.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.0.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn events_flow_on_the_embedded_broker_too() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("taskhost.db").display());
    let _worker = WorkerProcess::start(&url, &["-E", "-n", "th-sqlite@box"]);
    let events = std::process::Command::new(taskhost_bin())
        .args(["events", "--json", "--duration", "4", "--broker", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let id = sent_id(&send(&url, &["tasks.add", "--args", "[4, 5]"]));
    wait_status(&url, &id, "SUCCESS", Duration::from_secs(15));
    let out = events.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let succeeded = lines.iter().find(|e| e["type"] == "task-succeeded" && e["uuid"] == id.as_str()).expect("task-succeeded");
    assert_eq!(succeeded["result"], "9");
    assert_eq!(succeeded["hostname"], "th-sqlite@box");
    // Task events leave in batches after heartbeats sent at once, so arrival order is not
    // clock order; but no two events of one node share a Lamport time.
    let mut clocks: Vec<u64> = lines.iter().filter(|e| e["hostname"] == "th-sqlite@box").filter_map(|e| e["clock"].as_u64()).collect();
    let seen = clocks.len();
    clocks.sort_unstable();
    clocks.dedup();
    assert_eq!(clocks.len(), seen, "Lamport clocks repeat: {clocks:?}");
}

#[test]
fn json_task_lines_carry_id_name_version_queue_outcome_and_duration() {
    let redis = RedisServer::start();
    // Successes are logged at debug (one line a task would flood the log), failures at info.
    let worker = WorkerProcess::start_with_env(
        &redis.url(),
        &plugins_dir(),
        &["--log-format", "json", "-n", "th-json@box"],
        &[("RUST_LOG", "info,taskhost::worker=debug")],
    );
    let ok = sent_id(&send(&redis.url(), &["tasks.add", "--args", "[1, 1]"]));
    let bad = sent_id(&send(&redis.url(), &["tasks.fail", "--args", "[\"boom\"]"]));
    wait_status(&redis.url(), &ok, "SUCCESS", Duration::from_secs(15));
    wait_status(&redis.url(), &bad, "FAILURE", Duration::from_secs(15));
    worker.wait_for_log("\"outcome\":\"failed\"", Duration::from_secs(5));
    let lines: Vec<serde_json::Value> = worker.log_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    for (id, task, outcome) in [(&ok, "tasks.add", "succeeded"), (&bad, "tasks.fail", "failed")] {
        let line = lines.iter().find(|v| v["outcome"] == outcome && v["id"] == id.as_str()).expect("a JSON line for the task");
        assert_eq!(line["span"]["id"], id.as_str(), "{line}");
        assert_eq!(line["span"]["task"], task);
        assert_eq!(line["span"]["version"], "1.0.0");
        assert_eq!(line["span"]["queue"], "celery");
        assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    }
}

#[test]
fn the_dashboard_shows_tasks_and_replays_a_dead_letter_in_a_real_browser() {
    if !std::path::Path::new("/usr/bin/chromium").exists() || !std::path::Path::new("/usr/bin/chromedriver").exists() {
        panic!("chromium and chromedriver are needed (scripts/test-deps.sh installs them)");
    }
    let redis = RedisServer::start();
    let plugins = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.add@1.0.0.wasm"), plugins.path().join("tasks.add@1.0.0.wasm")).unwrap();
    let port = free_port();
    let serve = Serve::start(&redis.url(), plugins.path(), &["-p", "1", "--http", &format!("127.0.0.1:{port}"), "-n", "th-dash@box"]);
    serve.wait_for_log("worker ready", 1, Duration::from_secs(30));
    let log = serve.log_text();
    let url = log.lines().find_map(|l| l.split_whitespace().find(|w| w.contains("/?token="))).expect("the dashboard URL is logged").to_string();
    let shown = sent_id(&send(&redis.url(), &["tasks.add", "--args", "[2, 2]"]));
    wait_status(&redis.url(), &shown, "SUCCESS", Duration::from_secs(15));
    // tasks.mul is not served yet: dead-lettered; then it is, and the replay runs it.
    let lettered = sent_id(&send(&redis.url(), &["tasks.mul", "--args", "[3, 4]"]));
    wait_status(&redis.url(), &lettered, "FAILURE", Duration::from_secs(15));
    let letter: serde_json::Value =
        serde_json::from_str(stdout(&cli(&redis.url(), &["dlq", "list", "--json"])).lines().next().unwrap()).unwrap();
    std::fs::copy(plugin("tasks.mul@1.0.0.wasm"), plugins.path().join("tasks.mul@1.0.0.wasm")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !stdout(&cli(&redis.url(), &["inspect", "registered", "--json"])).contains("tasks.mul") {
        assert!(std::time::Instant::now() < deadline, "tasks.mul was never loaded");
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = run_bounded(
        std::process::Command::new(python())
            .arg(workspace_root().join("tests/e2e/browser/dashboard.py"))
            .args(["--url", &url, "--task-id", &shown, "--letter-id", letter["letter_id"].as_str().unwrap()])
            .args(["--replayed-task-id", &lettered, "--timeout", "60"]),
        Duration::from_secs(240),
    );
    assert!(out.status.success(), "{}\n{}\n{}", stdout(&out), stderr(&out), serve.log_text());
    assert!(stdout(&out).contains("dashboard ok"));
    assert_eq!(record(&redis.url(), &lettered)["result"], 12);
}

/// A local OTLP/HTTP receiver: the JSON bodies POSTed to /v1/traces.
fn otlp_receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream);
            let mut length = 0;
            let mut path = String::new();
            loop {
                let mut line = String::new();
                if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 {
                    break;
                }
                if path.is_empty() {
                    path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            if path == "/v1/traces" {
                if let Ok(v) = serde_json::from_slice(&body) {
                    seen.lock().unwrap().push(v);
                }
            }
            let _ = reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
        }
    });
    (port, bodies)
}

#[test]
fn a_traced_producers_trace_continues_into_a_run_span_exported_over_otlp() {
    let redis = RedisServer::start();
    let (port, bodies) = otlp_receiver();
    let endpoint = format!("http://127.0.0.1:{port}");
    let _worker = WorkerProcess::start(&redis.url(), &["--otlp-endpoint", &endpoint, "-n", "th-trace@box"]);
    let out = monitoring(&redis.url(), &["traced", "2"]);
    let sent: Vec<(String, String)> =
        out.lines().filter_map(|l| l.split_once(' ')).map(|(id, trace)| (id.to_string(), trace.to_string())).collect();
    assert_eq!(sent.len(), 2, "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans: Vec<serde_json::Value> = bodies
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|rs| rs["scopeSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|ss| ss["spans"].as_array().cloned().unwrap_or_default())
            .collect();
        if spans.len() >= 2 {
            break spans;
        }
        assert!(std::time::Instant::now() < deadline, "spans never arrived: {spans:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for (task_id, trace_id) in &sent {
        let span = spans
            .iter()
            .find(|s| s["attributes"].as_array().unwrap().iter().any(|a| a["key"] == "messaging.message.id" && a["value"]["stringValue"] == task_id.as_str()))
            .unwrap_or_else(|| panic!("no span for {task_id}: {spans:?}"));
        assert_eq!(span["traceId"], trace_id.as_str(), "the run span must continue the producer's trace");
        assert_eq!(span["name"], "run/tasks.add");
        assert_eq!(span["kind"], 5);
        assert_eq!(span["parentSpanId"].as_str().unwrap().len(), 16, "{span}");
        let attr = |k: &str| span["attributes"].as_array().unwrap().iter().find(|a| a["key"] == k).map(|a| a["value"].clone());
        assert_eq!(attr("celery.action"), Some(serde_json::json!({"stringValue": "run"})));
        assert_eq!(attr("celery.state"), Some(serde_json::json!({"stringValue": "SUCCESS"})));
        assert_eq!(attr("celery.task_name"), Some(serde_json::json!({"stringValue": "tasks.add"})));
    }
}
