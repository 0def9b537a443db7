//! Task semantics in production: revoke, inspect, ETA parking, time limits from headers,
//! rate limits, autoretry, dead-letter management, early acks, sandbox slots.

use crate::support::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// A plugins dir with copies of some built components and manifests of our own.
fn plugins_with(files: &[(&str, Option<&str>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (component, manifest) in files {
        std::fs::copy(plugin(component), dir.path().join(component)).unwrap();
        if let Some(text) = manifest {
            std::fs::write(dir.path().join(component.replace(".wasm", ".toml")), text).unwrap();
        }
    }
    dir
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("taskhost.db").display())
}

#[test]
fn python_revoke_terminate_and_revoke_queued_and_inspect() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "4"]);
    let out = interop(&redis.url(), &["revoke_terminate"]);
    assert!(out.starts_with("TaskRevokedError: terminated after"), "{out}");
    assert_eq!(interop(&redis.url(), &["revoke_queued"]), "TaskRevokedError: revoked");
    assert_eq!(interop(&redis.url(), &["inspect"]), "taskhost@vm".replace("vm", &hostname()));
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

fn revoke_survives_a_restart_and_terminates(url: &str) {
    // Revoked while no worker runs; the worker that starts later skips it.
    let queued = stdout(&send(url, &["tasks.add", "--args", "[1, 2]", "--countdown", "1"]));
    let out = cli(url, &["revoke", &queued]);
    assert_eq!(stdout(&out), format!("revoked {queued}"), "{}", stderr(&out));
    assert_eq!(record(url, &queued)["status"], "REVOKED", "readable as REVOKED at once");
    let _worker = WorkerProcess::start(url, &["-c", "2"]);
    std::thread::sleep(Duration::from_millis(1500));
    let r = record(url, &queued);
    assert_eq!(r["result"]["exc_message"], serde_json::json!(["revoked"]), "{r}");

    // --terminate stops a running task quickly and stores REVOKED terminated.
    let running = stdout(&send(url, &["tasks.sleep", "--args", "[20000]"]));
    wait_status(url, &running, "STARTED", Duration::from_secs(10));
    let asked = Instant::now();
    assert!(cli(url, &["revoke", &running, "--terminate"]).status.success());
    let r = wait_status(url, &running, "REVOKED", Duration::from_secs(5));
    assert!(asked.elapsed() < Duration::from_secs(1), "terminated after {:?}", asked.elapsed());
    assert_eq!(r["result"]["exc_message"], serde_json::json!(["terminated"]));
}

#[test]
fn revoke_on_redis() {
    let redis = RedisServer::start();
    revoke_survives_a_restart_and_terminates(&redis.url());
}

#[test]
fn revoke_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    revoke_survives_a_restart_and_terminates(&sqlite_url(dir.path()));
}

#[test]
fn a_task_due_in_three_hours_is_parked_on_the_broker_not_held() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["--visibility-timeout", "1"]);
    let id = stdout(&send(&redis.url(), &["tasks.add", "--args", "[1, 1]", "--countdown", "10800"]));
    std::thread::sleep(Duration::from_millis(1500));
    let parked: usize = redis.query(redis::cmd("ZCARD").arg("taskhost.scheduled"));
    let unacked: usize = redis.query(redis::cmd("HLEN").arg("unacked"));
    let queued: usize = redis.query(redis::cmd("LLEN").arg("celery"));
    assert_eq!((parked, unacked, queued), (1, 0, 0));
    assert_eq!(record(&redis.url(), &id)["status"], "PENDING", "never early");
    let due: Vec<(String, f64)> = redis.query(redis::cmd("ZRANGE").arg("taskhost.scheduled").arg(0).arg(-1).arg("WITHSCORES"));
    let in_hours = (due[0].1 / 1000.0 - chrono::Utc::now().timestamp() as f64) / 3600.0;
    assert!((2.99..3.01).contains(&in_hours), "due in {in_hours} h");
}

#[test]
fn the_message_time_limit_header_overrides_the_manifest() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &[]);
    let started = Instant::now();
    let out = send(&redis.url(), &["tasks.sleep", "--args", "[5000]", "--time-limit", "0.3", "--wait", "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("TimeLimitExceeded: 0.3"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[test]
fn rate_limited_tasks_are_spaced_and_do_not_block_others() {
    let plugins = plugins_with(&[
        ("tasks.noop@1.0.0.wasm", Some("rate_limit = \"10/s\"\n")),
        ("tasks.add@1.0.0.wasm", None),
    ]);
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start_with_plugins(&redis.url(), plugins.path(), &["-c", "4", "--prefetch-multiplier", "1"]);
    let limited: Vec<String> = (0..10).map(|_| stdout(&send(&redis.url(), &["tasks.noop"]))).collect();
    let add = send(&redis.url(), &["tasks.add", "--args", "[1, 1]", "--wait", "--timeout", "10"]);
    assert_eq!(stdout(&add), "2");
    let done_add = Instant::now();
    let times: Vec<f64> = limited
        .iter()
        .map(|id| {
            let r = wait_status(&redis.url(), id, "SUCCESS", Duration::from_secs(10));
            chrono::DateTime::parse_from_rfc3339(r["date_done"].as_str().unwrap()).unwrap().timestamp_micros() as f64 / 1e6
        })
        .collect();
    let spread = times.iter().cloned().fold(f64::MIN, f64::max) - times.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread >= 0.85, "10 starts at 10/s spread over {spread:.2}s");
    assert!(done_add.elapsed() > Duration::from_millis(300), "tasks.add finished while the limited ones still waited");
}

#[test]
fn a_cluster_wide_rate_limit_holds_across_worker_processes() {
    let plugins = plugins_with(&[("tasks.noop@1.0.0.wasm", Some("rate_limit = \"5/s\"\nrate_limit_scope = \"cluster\"\n"))]);
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let _a = WorkerProcess::start_with_plugins(&url, plugins.path(), &[]);
    let _b = WorkerProcess::start_with_plugins(&url, plugins.path(), &[]);
    let ids: Vec<String> = (0..10).map(|_| stdout(&send(&url, &["tasks.noop"]))).collect();
    let times: Vec<f64> = ids
        .iter()
        .map(|id| {
            let r = wait_status(&url, id, "SUCCESS", Duration::from_secs(15));
            chrono::DateTime::parse_from_rfc3339(r["date_done"].as_str().unwrap()).unwrap().timestamp_micros() as f64 / 1e6
        })
        .collect();
    let spread = times.iter().cloned().fold(f64::MIN, f64::max) - times.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread >= 1.7, "10 starts at 5/s across two workers spread over {spread:.2}s");
}

#[test]
fn autoretry_on_trap_then_max_retries_then_dead_letter() {
    let plugins = plugins_with(&[(
        "tasks.panic@1.0.0.wasm",
        Some("autoretry = [\"trap\"]\nmax_retries = 2\ndefault_retry_delay = 0\n"),
    )]);
    let redis = RedisServer::start();
    let worker = WorkerProcess::start_with_plugins(&redis.url(), plugins.path(), &[]);
    let out = send(&redis.url(), &["tasks.panic", "--args", "[\"again\"]", "--wait", "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("MaxRetriesExceededError"), "{}", stderr(&out));
    assert_eq!(worker.log_text().matches("retry in").count(), 2, "{}", worker.log_text());
    let list = cli(&redis.url(), &["dlq", "list"]);
    assert!(stdout(&list).contains("max retries (2) exceeded"), "{}", stdout(&list));
}

#[test]
fn dead_letters_can_be_listed_shown_replayed_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let plugins = plugins_with(&[("tasks.add@1.0.0.wasm", None)]);
    let _worker = WorkerProcess::start_with_plugins(&url, plugins.path(), &[]);
    let id = stdout(&send(&url, &["tasks.mul", "--args", "[6, 7]"]));
    wait_status(&url, &id, "FAILURE", Duration::from_secs(10));
    let list = cli(&url, &["dlq", "list"]);
    assert!(stdout(&list).contains(&format!("tasks.mul  {id}  no component serves task tasks.mul")), "{}", stdout(&list));
    let show = cli(&url, &["dlq", "show", &id]);
    let letter: serde_json::Value = serde_json::from_str(&stdout(&show)).unwrap();
    assert_eq!(letter["queue"], "celery");
    assert!(letter["message"].as_str().unwrap().contains("\"task\":\"tasks.mul\""));

    // Deploy the missing component (hot swap), then replay: the original message runs.
    std::fs::copy(plugin("tasks.mul@1.0.0.wasm"), plugins.path().join("tasks.mul@1.0.0.wasm")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let replay = cli(&url, &["dlq", "replay", &id]);
    assert!(replay.status.success(), "{}", stderr(&replay));
    // The earlier FAILURE is replaced by the run's SUCCESS.
    let r = wait_status(&url, &id, "SUCCESS", Duration::from_secs(10));
    assert_eq!(r["result"], 42);
    assert_eq!(stdout(&cli(&url, &["dlq", "list", "--json"])), "");

    let _ = stdout(&send(&url, &["tasks.nope"]));
    std::thread::sleep(Duration::from_millis(500));
    let purge = cli(&url, &["dlq", "purge", "--all"]);
    assert_eq!(stdout(&purge), "purged 1 dead letter(s)");
    let none = cli(&url, &["dlq", "replay", "no-such-letter"]);
    assert_eq!(none.status.code(), Some(2));
    assert_eq!(stderr(&none), "error: no dead letter no-such-letter");
}

#[test]
fn early_ack_means_a_lost_worker_loses_that_task_and_acks_late_does_not() {
    // acks_late = false: acknowledged before running, so a worker killed mid-run
    // does not run it again (at most once) — Celery's acks_late=False.
    let plugins = plugins_with(&[("tasks.sleep@1.0.0.wasm", Some("acks_late = false\n"))]);
    let redis = RedisServer::start();
    let mut worker = WorkerProcess::start_with_plugins(&redis.url(), plugins.path(), &[]);
    let id = stdout(&send(&redis.url(), &["tasks.sleep", "--args", "[2000]"]));
    wait_status(&redis.url(), &id, "STARTED", Duration::from_secs(10));
    worker.signal(libc::SIGKILL);
    worker.wait(Duration::from_secs(5));
    let (unacked, queued): (usize, usize) = (
        redis.query(redis::cmd("HLEN").arg("unacked")),
        redis.query(redis::cmd("LLEN").arg("celery")),
    );
    assert_eq!((unacked, queued), (0, 0), "an early-acked message is gone with its worker");
}

#[test]
fn a_sandbox_slot_is_free_again_while_its_result_is_still_being_written() {
    // One slot, results on a second Redis whose writes are paused: the first task's result
    // cannot be written, yet the second task takes the slot and runs. Its early ack (before
    // running) on the broker is what shows it started.
    let plugins = plugins_with(&[("tasks.noop@1.0.0.wasm", Some("acks_late = false\n"))]);
    let (broker, results) = (RedisServer::start(), RedisServer::start());
    let extra = ["-c", "1", "--track-started", "false", "--result-backend", &results.url()];
    let _worker = WorkerProcess::start_with_plugins(&broker.url(), plugins.path(), &extra);
    let () = results.query(redis::cmd("CLIENT").arg("PAUSE").arg(8000).arg("WRITE"));
    let paused_at = Instant::now();
    let ids: Vec<String> = (0..2).map(|_| stdout(&send(&broker.url(), &["tasks.noop"]))).collect();
    loop {
        let (unacked, queued): (usize, usize) = (
            broker.query(redis::cmd("HLEN").arg("unacked")),
            broker.query(redis::cmd("LLEN").arg("celery")),
        );
        if (unacked, queued) == (0, 0) {
            break;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(6),
            "the second task waited for the first one's result write: {unacked} unacked, {queued} queued"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(paused_at.elapsed() < Duration::from_secs(8), "both ran before the result store took writes again");
    for id in &ids {
        wait_status(&results.url(), id, "SUCCESS", Duration::from_secs(10));
    }
}

#[test]
fn the_guest_sees_its_soft_limit_and_a_plain_revoke() {
    let redis = RedisServer::start();
    let url = redis.url();
    let _worker = WorkerProcess::start(&url, &["-c", "4"]);
    let out = send(&url, &["tasks.deadline", "--soft-time-limit", "2", "--time-limit", "5", "--wait", "--timeout", "10"]);
    let seen: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|_| panic!("{}", stderr(&out)));
    let remaining = seen["remaining_ms"].as_u64().unwrap();
    assert!((1500..=2000).contains(&remaining), "remaining-ms counts down to the soft limit: {remaining}");
    assert_eq!(seen["revoked"], false);

    // A cooperative task stops itself at its soft limit, before the hard one.
    let out = send(&url, &["tasks.watch", "--args", "[5000]", "--soft-time-limit", "0.3", "--wait", "--timeout", "10"]);
    assert!(stdout(&out).starts_with("\"soft limit after"), "{} {}", stdout(&out), stderr(&out));

    // A plain revoke (no --terminate) of a running task is visible to it through is-revoked.
    let id = stdout(&send(&url, &["tasks.watch", "--args", "[5000]"]));
    wait_status(&url, &id, "STARTED", Duration::from_secs(10));
    assert!(cli(&url, &["revoke", &id]).status.success());
    let r = wait_status(&url, &id, "SUCCESS", Duration::from_secs(10));
    assert!(r["result"].as_str().unwrap().starts_with("revoked after"), "{r}");
}
