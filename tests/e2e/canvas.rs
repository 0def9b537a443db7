//! Workflows: chains, groups and chords from Python's Celery client on Redis, and from
//! `taskhost send --workflow` on the embedded broker across two worker processes.

use crate::support::*;

#[test]
fn python_chain_group_chord_and_links() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["-c", "8"]);
    assert_eq!(interop(&redis.url(), &["canvas"]), "chain 40, 42; group; chord 90; link 12");
    assert_eq!(interop(&redis.url(), &["canvas_errors"]), "chain failure propagated; ChordError; errback called");
}

#[test]
fn python_chord_joins_across_two_worker_processes() {
    let redis = RedisServer::start();
    let _a = WorkerProcess::start(&redis.url(), &["-c", "2"]);
    let _b = WorkerProcess::start(&redis.url(), &["-c", "2"]);
    assert_eq!(interop(&redis.url(), &["canvas"]), "chain 40, 42; group; chord 90; link 12");
}

#[test]
fn cli_workflows_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("taskhost.db").display());
    let _a = WorkerProcess::start(&url, &["-c", "4"]);
    let _b = WorkerProcess::start(&url, &["-c", "4"]);
    let flow = |json: &str| taskhost(&["send", "--broker", &url, "--wait", "--timeout", "20", "--workflow", json]);

    let chain = flow(r#"{"chain": [{"task": "tasks.add", "args": [2, 2]}, {"task": "tasks.mul", "args": [10]}, {"task": "tasks.add", "args": [2]}]}"#);
    assert_eq!(stdout(&chain), "42", "{}", stderr(&chain));
    let group = flow(r#"{"group": [{"task": "tasks.add", "args": [1, 1]}, {"task": "tasks.mul", "args": [3, 3]}, {"task": "tasks.echo", "args": ["x"]}]}"#);
    assert_eq!(stdout(&group), r#"[2,9,"x"]"#, "{}", stderr(&group));
    let header: Vec<String> = (0..20).map(|i| format!(r#"{{"task": "tasks.add", "args": [{i}, {i}]}}"#)).collect();
    let chord = flow(&format!(r#"{{"chord": {{"header": [{}], "body": {{"task": "tasks.tsum"}}}}}}"#, header.join(",")));
    assert_eq!(stdout(&chord), "380", "{}", stderr(&chord));

    let failed = flow(r#"{"chord": {"header": [{"task": "tasks.add", "args": [1, 1]}, {"task": "tasks.fail", "args": ["member broke"]}], "body": {"task": "tasks.tsum"}}}"#);
    assert_eq!(failed.status.code(), Some(1));
    assert!(stderr(&failed).contains("ChordError: Dependency"), "{}", stderr(&failed));
    assert!(stderr(&failed).contains("raised TaskFailed('member broke')"), "{}", stderr(&failed));

    let bad = flow(r#"{"pipeline": []}"#);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(stderr(&bad), r#"error: --workflow: expected one key, "chain", "group" or "chord", got "pipeline""#);
}
