//! What a task may do beyond its arguments, only through grants: follow-up tasks
//! (`send-task`, granted by `[grants] send_tasks`), and the 0.1.0 world still served.

use crate::support::*;
use std::sync::Arc;
use std::time::Duration;
use taskhost::registry::Registry;
use taskhost::runtime::{RunControl, SentTask, TaskError, TaskInput, TaskRun};

fn fixture(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/wit-0.1.0").join(file)
}

#[test]
fn components_built_against_wit_0_1_0_still_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["tasks.add@1.0.0.wasm", "tasks.watch@1.0.0.wasm"] {
        let bytes = std::fs::read(fixture(file)).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("taskhost:task/types@0.1.0") && !text.contains("taskhost:task/types@0.2.0"), "{file} is not a 0.1.0 build");
        std::fs::write(dir.path().join(file), bytes).unwrap();
    }
    let registry = Registry::open(dir.path(), runtime()).unwrap();
    let run = |name: &str, args: &str| -> TaskRun {
        let tv = registry.resolve(name, None).expect(name);
        let input = TaskInput { name: name.into(), args: args.into(), kwargs: "{}".into(), ..Default::default() };
        block_on(runtime().run(&tv.component, "1.0.0", input, &tv.limits(), Arc::default()))
    };
    assert_eq!(run("tasks.add", "[2, 3]").result, Ok("5".into()));
    // This one calls the 0.1.0 host interface (remaining-ms, is-revoked).
    assert_eq!(run("tasks.watch", "[30]").result, Ok("\"finished\"".into()));
}

/// Runs `tasks.fanout` with its manifest's grants; the follow-ups it sent.
fn fanout(args: &str) -> (TaskRun, Vec<SentTask>) {
    let registry = Registry::open(plugins_dir(), runtime()).unwrap();
    let tv = registry.resolve("tasks.fanout", None).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let control = Arc::new(RunControl::default().with_sent_tasks(tx).with_grants(tv.grants()));
    let input = TaskInput { name: "tasks.fanout".into(), args: args.into(), kwargs: "{}".into(), ..Default::default() };
    let run = block_on(runtime().run(&tv.component, "1.0.0", input, &tv.limits(), control));
    let mut sent = Vec::new();
    while let Ok(t) = rx.try_recv() {
        sent.push(t);
    }
    (run, sent)
}

#[test]
fn a_task_sends_the_follow_ups_its_manifest_grants() {
    let (run, sent) = fanout("[3]");
    let ids: Vec<String> = serde_json::from_str(&run.result.expect("fanout succeeds")).unwrap();
    assert_eq!(ids, sent.iter().map(|t| t.id.clone()).collect::<Vec<_>>());
    assert_eq!(sent.iter().map(|t| (t.name.as_str(), t.args.as_str())).collect::<Vec<_>>(), [
        ("tasks.add", "[0,0]"),
        ("tasks.add", "[1,1]"),
        ("tasks.add", "[2,2]")
    ]);
}

#[test]
fn sending_an_ungranted_task_or_more_than_allowed_is_refused_inside_the_guest() {
    let (run, sent) = fanout(r#"[1, "tasks.payroll"]"#);
    assert!(sent.is_empty());
    assert_eq!(
        run.result,
        Err(TaskError::Fail {
            message: r#"send-task to "tasks.payroll" denied: not granted (a manifest grants it with [grants] send_tasks = ["tasks.payroll"])"#.into()
        })
    );
    // Its manifest allows 5 per run.
    let (run, sent) = fanout("[7]");
    assert_eq!(sent.len(), 5);
    assert_eq!(
        run.result,
        Err(TaskError::Fail {
            message: r#"send-task to "tasks.add" denied: this run already sent 5 tasks, all its manifest allows (max_sent_tasks)"#.into()
        })
    );
    // No grant at all by default: a RunControl built without grants denies everything.
    let registry = Registry::open(plugins_dir(), runtime()).unwrap();
    let tv = registry.resolve("tasks.fanout", None).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let input = TaskInput { name: "tasks.fanout".into(), args: "[1]".into(), kwargs: "{}".into(), ..Default::default() };
    let run = block_on(runtime().run(&tv.component, "1.0.0", input, &tv.limits(), Arc::new(RunControl::default().with_sent_tasks(tx))));
    assert!(matches!(&run.result, Err(TaskError::Fail { message }) if message.contains("not granted")), "{:?}", run.result);
}

#[test]
fn follow_ups_carry_their_lineage_and_python_reads_them() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &[]);
    let script = r#"
import os, sys
from celery import Celery
app = Celery("t", broker=os.environ["BROKER"], backend=os.environ["BROKER"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
parent = app.send_task("tasks.fanout", (3,))
ids = parent.get(timeout=30)
values = [app.AsyncResult(i).get(timeout=30) for i in ids]
children = [c.id for c in (parent.children or [])]
print(parent.id)
print(",".join(ids))
print(values)
print(children == ids)
"#;
    let out = run_bounded(
        std::process::Command::new(python()).args(["-c", script]).env("BROKER", redis.url()),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[2], "[0, 2, 4]", "{text}");
    assert_eq!(lines[3], "True", "the parent's result lists its follow-ups as children: {text}");
    let parent = lines[0];
    for id in lines[1].split(',') {
        let r = record(&redis.url(), id);
        assert_eq!(r["parent_id"], parent, "{r}");
    }
}
