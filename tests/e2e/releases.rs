//! Releases from CI: signed publish to the broker, workers that follow it, trust.toml
//! refusals from the attacker's side, rollout shares, automatic rollback, rollback, yank.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A key pair from `taskhost keygen` and a trust.toml trusting it for `patterns`.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new(patterns: &str) -> Keys {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ci", "stranger"] {
            let out = taskhost(&["keygen", "--name", name, "--out", dir.path().to_str().unwrap()]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        let public = std::fs::read_to_string(dir.path().join("ci.pub")).unwrap();
        std::fs::write(
            dir.path().join("trust.toml"),
            format!("[[key]]\nname = \"ci\"\npublic_key = \"{}\"\ntasks = [{patterns}]\n", public.trim()),
        )
        .unwrap();
        Keys { dir }
    }
    fn key(&self) -> String {
        self.dir.path().join("ci.key").display().to_string()
    }
    fn stranger(&self) -> String {
        self.dir.path().join("stranger.key").display().to_string()
    }
    fn trust(&self) -> String {
        self.dir.path().join("trust.toml").display().to_string()
    }
}

fn publish(broker: &str, component: &Path, task: &str, version: &str, key: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["publish", component.to_str().unwrap(), "--task", task, "--version", version, "--key", key, "--json"];
    args.extend_from_slice(extra);
    cli(broker, &args)
}

fn follower(broker: &str, keys: &Keys) -> (WorkerProcess, tempfile::TempDir) {
    let cache = tempfile::tempdir().unwrap();
    let w = WorkerProcess::start_with_plugins(broker, cache.path(), &["-c", "8", "--registry", "broker", "--trust", &keys.trust()]);
    (w, cache)
}

fn releases(broker: &str) -> serde_json::Value {
    let out = cli(broker, &["releases", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

/// Waits until `key` is ready on `workers` live workers.
fn wait_ready(broker: &str, key: &str, workers: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = releases(broker);
        let row = all.as_array().unwrap().iter().find(|r| format!("{}@{}", r["task"].as_str().unwrap(), r["version"].as_str().unwrap()) == key).cloned();
        if row.as_ref().is_some_and(|r| r["ready_on"].as_array().unwrap().len() >= workers) {
            return;
        }
        assert!(Instant::now() < deadline, "{key} never ready on {workers} workers: {all}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_value(broker: &str, task: &str, extra: &[&str]) -> String {
    let mut args = vec![task, "--wait", "--timeout", "30"];
    args.extend_from_slice(extra);
    let out = send(broker, &args);
    if out.status.success() {
        stdout(&out).trim().to_string()
    } else {
        format!("{} {} (failed)", stdout(&out).trim(), stderr(&out).trim())
    }
}

fn version_component(v: u32) -> PathBuf {
    plugin(&format!("tasks.version@{v}.0.0.wasm"))
}

#[test]
fn a_publish_reaches_every_following_worker_and_a_republish_is_checked() {
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"tasks.*\"");
    let (w1, _c1) = follower(&broker, &keys);
    let (w2, _c2) = follower(&broker, &keys);

    let out = publish(&broker, &version_component(1), "tasks.version", "1.0.0", &keys.key(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let published: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((published["status"].as_str(), published["activated"].as_bool()), (Some("published"), Some(true)));
    wait_ready(&broker, "tasks.version@1.0.0", 2);
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");

    // The same digest again: a no-op. Other bytes under the same name and version: refused.
    let again = publish(&broker, &version_component(1), "tasks.version", "1.0.0", &keys.key(), &[]);
    assert!(again.status.success() && stdout(&again).contains("already-published"), "{}", stdout(&again));
    let other = publish(&broker, &version_component(2), "tasks.version", "1.0.0", &keys.key(), &[]);
    assert_eq!(other.status.code(), Some(2), "{}", stdout(&other));
    assert!(stderr(&other).contains("already published with another component"), "{}", stderr(&other));

    // Not a component: refused before anything is uploaded.
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), b"\0asm\x0d\0\x01\0garbage").unwrap();
    let bad = publish(&broker, junk.path(), "tasks.version", "9.0.0", &keys.key(), &[]);
    assert_eq!(bad.status.code(), Some(2), "{}", stdout(&bad));

    // A second version is staged until activated; --activate serves it on both workers.
    let started = Instant::now();
    let out = publish(&broker, &version_component(2), "tasks.version", "2.0.0", &keys.key(), &["--activate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_ready(&broker, "tasks.version@2.0.0", 2);
    eprintln!("publish → ready on 2 workers: {:?}", started.elapsed());
    for _ in 0..6 {
        assert_eq!(run_value(&broker, "tasks.version", &[]), "\"2.0.0\"");
    }
    assert!(w1.log_text().contains("release fetched") && w2.log_text().contains("release fetched"));

    // A worker started afterwards picks up the active release.
    let (_w3, _c3) = follower(&broker, &keys);
    wait_ready(&broker, "tasks.version@2.0.0", 3);

    // The audit log has every step, with who did it.
    let audit = stdout(&cli(&broker, &["releases", "--audit"]));
    assert!(audit.matches("publish").count() >= 2 && audit.contains("activate"), "{audit}");
}

#[test]
fn unsigned_tampered_and_wrongly_signed_components_are_refused_everywhere() {
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"tasks.*\"");

    // Signed by a key trust.toml does not list.
    let out = publish(&broker, &version_component(1), "tasks.version", "1.0.0", &keys.stranger(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Signed by the trusted key, but for a name it may not publish.
    let out = publish(&broker, &version_component(1), "media.version", "1.0.0", &keys.key(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Signed by the trusted key, then one byte flipped in the registry.
    let out = publish(&broker, &version_component(2), "tasks.other", "1.0.0", &keys.key(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let blob: Vec<u8> = redis.query(redis::cmd("GET").arg("taskhost.release.wasm.tasks.other@1.0.0"));
    let at = blob.len() / 2;
    let flipped = [blob[at] ^ 1];
    let _: i64 = redis.query(redis::cmd("SETRANGE").arg("taskhost.release.wasm.tasks.other@1.0.0").arg(at).arg(&flipped[..]));

    // A release key that would be a path outside the plugins dir.
    let _: i64 = redis.query(redis::cmd("HSET").arg("taskhost.release.digest").arg("../escape@1.0.0").arg("00"));
    let _: i64 = redis.query(redis::cmd("HSET").arg("taskhost.release.signed").arg("../escape@1.0.0").arg("{}"));

    let (w, cache) = follower(&broker, &keys);
    w.wait_for_log("not fetched", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    let log = w.log_text();
    assert!(log.contains("a key trust.toml does not list"), "{log}");
    assert!(log.contains("does not trust for task media.version"), "{log}");
    assert!(log.contains("differ from the signed digest"), "{log}");
    assert!(log.contains("is not task@version; ignored"), "{log}");
    // Nothing refused was written, inside the plugins dir or beside it.
    let written: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(written.iter().all(|n| !n.to_string_lossy().ends_with(".wasm")), "{written:?}");
    assert!(!cache.path().parent().unwrap().join("escape@1.0.0.wasm").exists());
    for task in ["tasks.version", "media.version", "tasks.other"] {
        let v = run_value(&broker, task, &[]);
        assert!(v.contains("NotRegistered"), "{task} ran: {v}");
    }
    let refused: serde_json::Value = releases(&broker);
    assert!(refused.as_array().unwrap().iter().all(|r| r["ready_on"].as_array().unwrap().is_empty()), "{refused}");
    // The count of refusals, as the worker reports it (also in `celery inspect stats`).
    let listing = stdout(&cli(&broker, &["releases"]));
    let count: u64 = listing
        .lines()
        .find_map(|l| l.strip_suffix(" refused under trust.toml")?.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no refusal count in:\n{listing}"));
    assert!(count >= 2, "the stranger's key and the name not trusted: {listing}");

    // A plugins dir under the same trust.toml: unsigned and tampered files are refused too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.add@1.0.0.wasm"), dir.path().join("tasks.add@1.0.0.wasm")).unwrap();
    let dir_target = format!("dir:{}", dir.path().display());
    let out = taskhost(&[
        "publish", version_component(1).to_str().unwrap(), "--task", "tasks.version", "--version", "1.0.0",
        "--key", &keys.key(), "--registry", &dir_target,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Into a directory too, a name and version hold one component.
    let other = taskhost(&[
        "publish", version_component(2).to_str().unwrap(), "--task", "tasks.version", "--version", "1.0.0",
        "--key", &keys.key(), "--registry", &dir_target,
    ]);
    assert_eq!(other.status.code(), Some(2), "{}", stdout(&other));
    let wasm = dir.path().join("tasks.version@1.0.0.wasm");
    let mut bytes = std::fs::read(&wasm).unwrap();
    let n = bytes.len() - 10;
    bytes[n] ^= 0x40;
    std::fs::write(&wasm, bytes).unwrap();
    let plain = WorkerProcess::start_with_plugins(&broker, dir.path(), &["--trust", &keys.trust()]);
    plain.wait_for_log("tasks.version@1.0.0.wasm", Duration::from_secs(20));
    let log = plain.log_text();
    assert!(log.contains("unsigned"), "{log}");
    assert!(log.contains("differs from the one signed"), "{log}");
}

#[test]
fn a_revoked_key_stops_its_releases_loading() {
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"tasks.*\"");
    let out = publish(&broker, &version_component(1), "tasks.version", "1.0.0", &keys.key(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (w, _cache) = follower(&broker, &keys);
    wait_ready(&broker, "tasks.version@1.0.0", 1);
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");
    let trust = std::fs::read_to_string(keys.trust()).unwrap();
    std::fs::write(keys.trust(), format!("{trust}revoked = true\n")).unwrap();
    w.wait_for_log("which trust.toml marks revoked", Duration::from_secs(10));
    let v = run_value(&broker, "tasks.version", &[]);
    assert!(v.contains("NotRegistered"), "{v}");
}

/// Starts `taskhost rollout <args>` and returns once `taskhost releases` shows `reaching`
/// (a share) and the followers have had time to read it.
fn start_rollout(broker: &str, args: &[&str], reaching: &str) -> std::process::Child {
    let child = std::process::Command::new(taskhost_bin())
        .arg("rollout")
        .args(args)
        .args(["--broker", broker])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !releases(broker).to_string().contains(reaching) {
        assert!(Instant::now() < deadline, "the rollout never reached {reaching}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(600));
    child
}

/// Sends `count` tasks through a Python Celery client; (values → count, failures).
fn tally(broker: &str, task: &str, count: usize, args_cycle: &str) -> serde_json::Value {
    serde_json::from_str(&interop(broker, &["tally", task, &count.to_string(), args_cycle])).unwrap()
}

#[test]
fn a_rollout_step_sends_its_share_and_rollback_and_yank_return_the_old_version() {
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"*\"");
    let (_w1, _c1) = follower(&broker, &keys);
    let (_w2, _c2) = follower(&broker, &keys);
    assert!(publish(&broker, &version_component(1), "tasks.version", "1.0.0", &keys.key(), &[]).status.success());
    assert!(publish(&broker, &version_component(2), "tasks.version", "2.0.0", &keys.key(), &[]).status.success());
    wait_ready(&broker, "tasks.version@2.0.0", 2);
    // Staged: still 1.0.0.
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");

    let mut rollout =
        start_rollout(&broker, &["tasks.version", "2.0.0", "--steps", "10,100", "--interval", "300s"], "active 10%");
    let counts = tally(&broker, "tasks.version", 2000, "[[]]");
    let new = counts["values"]["\"2.0.0\""].as_u64().unwrap_or(0) as f64;
    let old = counts["values"]["\"1.0.0\""].as_u64().unwrap_or(0) as f64;
    assert_eq!(new + old, 2000.0, "{counts}");
    let pct = new * 100.0 / 2000.0;
    eprintln!("rollout 10%: {pct:.1}% of 2000 tasks on 2.0.0");
    assert!((7.0..=13.0).contains(&pct), "{pct}% on the new version: {counts}");

    // Rollback stops the rollout (the rollout command sees the change and stops too):
    // everything on 1.0.0 again.
    let out = cli(&broker, &["rollback", "tasks.version"]);
    assert!(out.status.success() && stdout(&out).contains("tasks.version@1.0.0"), "{}{}", stdout(&out), stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = rollout.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the rollout command kept going after the rollback");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    assert!(releases(&broker).to_string().contains("active 100%"));
    std::thread::sleep(Duration::from_millis(600));
    let counts = tally(&broker, "tasks.version", 200, "[[]]");
    assert_eq!(counts["values"]["\"1.0.0\""], 200, "{counts}");

    // A version requirement wins over the rollout state; yanking dead-letters what needs only it.
    assert_eq!(run_value(&broker, "tasks.version", &["--version", "^2"]), "\"2.0.0\"");
    let out = cli(&broker, &["yank", "tasks.version", "2.0.0", "--reason", "CVE-2026-0001"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(600));
    let v = run_value(&broker, "tasks.version", &["--version", "^2"]);
    assert!(v.contains("VersionYanked") && v.contains("CVE-2026-0001"), "{v}");
    let dlq = stdout(&cli(&broker, &["dlq", "list"]));
    assert!(dlq.contains("yanked"), "{dlq}");
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");
    // A rollout state nobody can read (a broker writer's junk) changes nothing: the state
    // read before stays, and the yanked or staged versions do not start serving.
    let _: i64 = redis.query(redis::cmd("HSET").arg("taskhost.release.rollout").arg("tasks.version").arg("{junk"));
    let _: i64 = redis.query(redis::cmd("INCR").arg("taskhost.release.generation"));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");
    let audit = stdout(&cli(&broker, &["releases", "--audit", "tasks.version"]));
    for action in ["publish", "rollout", "rollback", "yank"] {
        assert!(audit.contains(action), "{action} missing from the audit log:\n{audit}");
    }
}

#[test]
fn a_version_failing_half_its_tasks_is_rolled_back_on_its_own() {
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"*\"");
    let (_w1, _c1) = follower(&broker, &keys);
    let (_w2, _c2) = follower(&broker, &keys);
    // tasks.flaky(n) asks for n retries: with max_retries 5 both inputs succeed, with 0
    // the input 1 fails — the same code, a bad manifest: a version failing 50%.
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("good.toml"), dir.path().join("bad.toml"));
    std::fs::write(&good, "max_retries = 5\n").unwrap();
    std::fs::write(&bad, "max_retries = 0\n").unwrap();
    let flaky = plugin("tasks.flaky@1.0.0.wasm");
    let g = good.to_str().unwrap();
    let b = bad.to_str().unwrap();
    assert!(publish(&broker, &flaky, "tasks.canary", "1.0.0", &keys.key(), &["--manifest", g]).status.success());
    let out = publish(&broker, &flaky, "tasks.canary", "2.0.0", &keys.key(), &["--manifest", b]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_ready(&broker, "tasks.canary@2.0.0", 2);

    let rollout = start_rollout(
        &broker,
        &["tasks.canary", "2.0.0", "--steps", "50,100", "--interval", "60s", "--min-samples", "20", "--max-failure-rate", "5%"],
        "active 50%",
    );
    let started = Instant::now();
    let counts = tally(&broker, "tasks.canary", 300, "[[0], [1]]");
    assert!(counts["failed"].as_u64().unwrap() > 0, "{counts}");
    let out = rollout.wait_with_output().unwrap();
    eprintln!("rolled back {:?} after the tasks started", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rolled back"), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(600));
    let after = tally(&broker, "tasks.canary", 100, "[[0], [1]]");
    assert_eq!(after["failed"], 0, "the old version serves everything again: {after}");
    let audit = stdout(&cli(&broker, &["releases", "--audit"]));
    assert!(audit.contains("automatic"), "{audit}");
}

#[test]
fn a_registry_outage_leaves_workers_serving_and_the_embedded_broker_publishes_too() {
    // The registry on a Redis of its own; the broker is the embedded SQLite file.
    let registry = RedisServer::start();
    let registry_url = registry.url();
    let dir = tempfile::tempdir().unwrap();
    let broker = format!("sqlite://{}", dir.path().join("taskhost.db").display());
    let keys = Keys::new("\"tasks.*\"");
    let out = taskhost(&[
        "publish", version_component(1).to_str().unwrap(), "--task", "tasks.version", "--version", "1.0.0",
        "--key", &keys.key(), "--registry", &registry.url(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cache = tempfile::tempdir().unwrap();
    let w = WorkerProcess::start_with_plugins(&broker, cache.path(), &["--registry", &registry.url(), "--trust", &keys.trust()]);
    w.wait_for_log("release fetched", Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while run_value(&broker, "tasks.version", &[]) != "\"1.0.0\"" {
        assert!(Instant::now() < deadline, "never served: {}", w.log_text());
    }
    // A staged release reaches the cache but must not serve, before or after a restart.
    let out = taskhost(&[
        "publish", version_component(2).to_str().unwrap(), "--task", "tasks.version", "--version", "2.0.0",
        "--key", &keys.key(), "--registry", &registry.url(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cache.path().join("tasks.version@2.0.0.wasm").exists() {
        assert!(Instant::now() < deadline, "2.0.0 never fetched: {}", w.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");
    drop(registry);
    w.wait_for_log("release registry unreachable, serving what is loaded", Duration::from_secs(30));
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");
    // Restarted while the registry is still down: it serves from its plugins dir (the cache).
    drop(w);
    let w = WorkerProcess::start_with_plugins(&broker, cache.path(), &["--registry", &registry_url, "--trust", &keys.trust()]);
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");
    w.wait_for_log("release registry unreachable", Duration::from_secs(20));
    drop(w);

    // The embedded broker as the registry.
    let out = publish(&broker, &version_component(2), "tasks.version", "2.0.0", &keys.key(), &["--activate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cache2 = tempfile::tempdir().unwrap();
    let _w2 = WorkerProcess::start_with_plugins(&broker, cache2.path(), &["--registry", "broker", "--trust", &keys.trust()]);
    wait_ready(&broker, "tasks.version@2.0.0", 1);
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"2.0.0\"");
}

#[test]
fn the_ci_example_script_builds_signs_and_publishes() {
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"tasks.*\"");
    let key_text = std::fs::read_to_string(keys.key()).unwrap();
    let script = workspace_root().join("examples/ci/publish.sh");
    let out = run_bounded(
        std::process::Command::new("bash")
            .arg(&script)
            .env("TASKHOST", taskhost_bin())
            .env("TASKHOST_SIGNING_KEY", key_text.trim())
            .env("TASKHOST_BROKER", &broker)
            .env("CRATE", "plugin-echo")
            .env("TASK", "tasks.echo")
            .env("VERSION", "1.2.3"),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let published: serde_json::Value = serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(published["status"], "published");
    let (_w, _cache) = follower(&broker, &keys);
    wait_ready(&broker, "tasks.echo@1.2.3", 1);
    let row = releases(&broker)[0].clone();
    assert_eq!((row["task"].as_str(), row["version"].as_str()), (Some("tasks.echo"), Some("1.2.3")));
}

/// A `docker-registry` (CNCF Distribution, from Debian's package) on a free port, storing
/// under a temporary directory; killed on drop.
struct OciRegistry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OciRegistry {
    fn start() -> Option<OciRegistry> {
        let exe = ["/usr/bin/docker-registry", "/usr/local/bin/docker-registry"].into_iter().find(|p| Path::new(p).exists())?;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(exe)
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(OciRegistry { child, port, _dir: dir })
    }

    /// GET a path with an Accept header; the body.
    fn get(&self, path: &str, accept: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nAccept: {accept}\r\n\r\n", self.port).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_release_pushed_to_an_oci_registry_is_pulled_verified_and_served() {
    let Some(oci) = OciRegistry::start() else {
        eprintln!("SKIPPED: docker-registry is not installed (apt-get install docker-registry; make test-deps installs it)");
        return;
    };
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"tasks.*\"");
    let target = format!("oci+http://127.0.0.1:{}/taskhost", oci.port);
    let out = publish(&broker, &version_component(1), "tasks.version", "1.0.0", &keys.key(), &["--registry", &target]);
    assert!(out.status.success(), "{}", stderr(&out));
    let published: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(published["registry"], format!("{target}/tasks.version:1.0.0"));

    // The CNCF Wasm artifact layout, the signed release beside it; no bytes on the broker.
    let manifest: serde_json::Value =
        serde_json::from_str(&oci.get("/v2/taskhost/tasks.version/manifests/1.0.0", "application/vnd.oci.image.manifest.v1+json")).unwrap();
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.wasm.config.v0+json", "{manifest}");
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1, "{manifest}");
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");
    let sha = release_sha256(&version_component(1));
    assert_eq!(manifest["layers"][0]["digest"], format!("sha256:{sha}"));
    assert!(manifest["annotations"]["dev.taskhost.release"].as_str().unwrap().contains(&sha));
    let stored: i64 = redis.query(redis::cmd("STRLEN").arg("taskhost.release.wasm.tasks.version@1.0.0"));
    assert_eq!(stored, 0);

    let (_w1, _c1) = follower(&broker, &keys);
    let (_w2, _c2) = follower(&broker, &keys);
    wait_ready(&broker, "tasks.version@1.0.0", 2);
    assert_eq!(run_value(&broker, "tasks.version", &[]), "\"1.0.0\"");

    // The same bytes again: a no-op; other bytes under the same tag: refused.
    let again = publish(&broker, &version_component(1), "tasks.version", "1.0.0", &keys.key(), &["--registry", &target]);
    assert!(again.status.success(), "{}", stderr(&again));
    let other = publish(&broker, &version_component(2), "tasks.version", "1.0.0", &keys.key(), &["--registry", &target]);
    assert_eq!(other.status.code(), Some(2), "{}", stdout(&other));
    assert!(stderr(&other).contains("already holds another component"), "{}", stderr(&other));
}

fn release_sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn gc_deletes_only_what_nothing_needs_or_requires() {
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"tasks.*\"");
    for (v, file) in [("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 1)] {
        let out = publish(&broker, &version_component(file), "tasks.version", v, &keys.key(), &["--activate"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Staged, newer than the active 3.0.0: kept for its rollout.
    assert!(publish(&broker, &version_component(2), "tasks.version", "4.0.0", &keys.key(), &[]).status.success());
    // A queued message (no worker runs) requires 1.0.0: kept while it waits.
    let out = send(&broker, &["tasks.version", "--version", "=1.0.0"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let dry = cli(&broker, &["gc", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(stdout(&dry).contains("0 release(s) would delete"), "{}", stdout(&dry));
    let _: i64 = redis.query(redis::cmd("DEL").arg("celery"));
    let dry = cli(&broker, &["gc", "--dry-run"]);
    assert!(stdout(&dry).contains("would delete tasks.version@1.0.0"), "{}", stdout(&dry));
    let kept = |key: &str| releases(&broker).as_array().unwrap().iter().any(|r| format!("{}@{}", r["task"].as_str().unwrap(), r["version"].as_str().unwrap()) == key);
    assert!(kept("tasks.version@1.0.0"), "a dry run deletes nothing");

    let out = cli(&broker, &["gc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("deleted tasks.version@1.0.0"), "{}", stdout(&out));
    assert!(!kept("tasks.version@1.0.0"));
    // Active (3.0.0), the rollback target (2.0.0) and the staged one (4.0.0) stay.
    for key in ["tasks.version@2.0.0", "tasks.version@3.0.0", "tasks.version@4.0.0"] {
        assert!(kept(key), "{key} was deleted");
    }
    let exists: i64 = redis.query(redis::cmd("EXISTS").arg("taskhost.release.wasm.tasks.version@1.0.0"));
    assert_eq!(exists, 0, "the bytes went too");
    assert!(stdout(&cli(&broker, &["releases", "--audit"])).contains("gc"));
}

#[test]
fn a_release_above_the_workers_size_ceiling_is_never_fetched_nor_written() {
    let redis = RedisServer::start();
    let broker = redis.url();
    let keys = Keys::new("\"tasks.*\"");
    let out = publish(&broker, &version_component(1), "tasks.version", "1.0.0", &keys.key(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cache = tempfile::tempdir().unwrap();
    let w = WorkerProcess::start_with_plugins(
        &broker,
        cache.path(),
        &["--registry", "broker", "--trust", &keys.trust(), "--max-component-size", "1000"],
    );
    w.wait_for_log("above this worker's max_component_size", Duration::from_secs(20));
    let written: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(written.iter().all(|n| !n.to_string_lossy().contains("tasks.version")), "{written:?}");
    let v = run_value(&broker, "tasks.version", &[]);
    assert!(v.contains("NotRegistered"), "{v}");
}
