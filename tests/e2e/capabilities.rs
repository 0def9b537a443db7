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

#[test]
fn components_built_against_wit_0_2_0_still_load_and_run() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/wit-0.2.0");
    for file in ["tasks.add@1.0.0.wasm", "tasks.fail@1.0.0.wasm", "tasks.fanout@1.0.0.wasm"] {
        let text = String::from_utf8_lossy(&std::fs::read(fixtures.join(file)).unwrap()).to_string();
        assert!(text.contains("taskhost:task/types@0.2.0") && !text.contains("taskhost:task/types@0.3.0"), "{file} is not a 0.2.0 build");
    }
    let registry = Registry::open(&fixtures, runtime()).unwrap();
    let run = |name: &str, args: &str| -> TaskRun {
        let tv = registry.resolve(name, None).expect(name);
        let input = TaskInput { name: name.into(), args: args.into(), kwargs: "{}".into(), ..Default::default() };
        block_on(runtime().run(&tv.component, "1.0.0", input, &tv.limits(), Arc::default()))
    };
    assert_eq!(run("tasks.add", "[2, 3]").result, Ok("5".into()));
    // Its `fail` comes through 0.2.0's task-error.
    assert!(matches!(run("tasks.fail", "[\"no\"]").result, Err(TaskError::Fail { .. })));
    // send-task through host@0.2.0.
    let (run, sent) = fanout_in(&registry, "[2]");
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert_eq!(sent.len(), 2);
}

/// Runs `tasks.fanout` of `registry` with its manifest's grants; the follow-ups it sent.
fn fanout_in(registry: &Registry, args: &str) -> (TaskRun, Vec<SentTask>) {
    let tv = registry.resolve("tasks.fanout", None).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let control = Arc::new(RunControl::default().with_sent_tasks(tx).with_grants(tv.grants()));
    let input = TaskInput { name: "tasks.fanout".into(), args: args.into(), kwargs: "{}".into(), ..Default::default() };
    let run = block_on(registry.runtime().run(&tv.component, "1.0.0", input, &tv.limits(), control));
    let mut sent = Vec::new();
    while let Ok(t) = rx.try_recv() {
        sent.push(t);
    }
    (run, sent)
}

/// [`fanout_in`] the example plugins, under its own manifest.
fn fanout(args: &str) -> (TaskRun, Vec<SentTask>) {
    fanout_in(&Registry::open(plugins_dir(), runtime()).unwrap(), args)
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

/// A plugins dir holding `tasks.hostile` and `files.wordcount`, both granted `dirs`,
/// opened by a runtime whose operator allows `allowed`.
fn with_dirs(dirs_toml: &str, allowed: &[taskhost::ceilings::AllowedDir]) -> (tempfile::TempDir, Arc<Registry>) {
    let plugins = tempfile::tempdir().unwrap();
    for (file, task) in [("tasks.hostile@1.0.0.wasm", "tasks.hostile@1.0.0"), ("files.wordcount@1.0.0.wasm", "files.wordcount@1.0.0")] {
        std::fs::copy(plugin(file), plugins.path().join(file)).unwrap();
        std::fs::write(plugins.path().join(format!("{task}.toml")), format!("[grants]\ndirs = {dirs_toml}\n")).unwrap();
    }
    let rt = runtime_with(taskhost::ceilings::Ceilings { dirs: allowed.to_vec(), ..Default::default() });
    let registry = Registry::open(plugins.path(), rt).unwrap();
    (plugins, registry)
}

fn call(registry: &Registry, name: &str, args: serde_json::Value) -> Result<serde_json::Value, TaskError> {
    let tv = registry.resolve(name, None).unwrap();
    let control = Arc::new(RunControl::default().with_grants(tv.grants()));
    let input = TaskInput { name: name.into(), args: args.to_string(), kwargs: "{}".into(), ..Default::default() };
    let rt = registry.runtime();
    block_on(rt.run(&tv.component, "1.0.0", input, &tv.limits(), control)).result.map(|j| serde_json::from_str(&j).unwrap())
}

#[test]
fn a_granted_directory_is_readable_and_nothing_above_it_is() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("report.txt"), "three little words").unwrap();
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("secret.txt"), "not yours").unwrap();
    std::os::unix::fs::symlink(secret.path().join("secret.txt"), data.path().join("link.txt")).unwrap();
    let allowed = [data.path().to_str().unwrap().parse().unwrap()];
    let spec = format!(r#"[{{ host = "{}", guest = "/reports", mode = "ro" }}]"#, data.path().display());
    let (_plugins, registry) = with_dirs(&spec, &allowed);

    assert_eq!(call(&registry, "files.wordcount", serde_json::json!(["/reports/report.txt"])), Ok(serde_json::json!(3)));
    let read = |path: &str| call(&registry, "tasks.hostile", serde_json::json!(["read", 0, path])).unwrap();
    assert_eq!(read("/reports/report.txt")["read"], "three little words");
    // Out of the directory by `..`, by an absolute path, by a link: all refused.
    let outside = format!("/reports/../{}/secret.txt", secret.path().display());
    for path in [outside.as_str(), "/etc/passwd", "/reports/link.txt", "/reports/../../etc/passwd"] {
        let got = read(path);
        assert!(got.get("read").is_none(), "{path} was read: {got}");
        assert!(got["error"].is_string(), "{path}: {got}");
    }
    // Read-only: writing is refused and leaves nothing on the host.
    let wrote = call(&registry, "tasks.hostile", serde_json::json!(["write", 0, "/reports/new.txt"])).unwrap();
    assert!(wrote["error"].is_string(), "{wrote}");
    assert!(!data.path().join("new.txt").exists());
}

#[test]
fn a_directory_is_granted_only_inside_what_the_operator_allows() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("report.txt"), "a b").unwrap();
    let rw = format!(r#"[{{ host = "{}", guest = "/data", mode = "rw" }}]"#, data.path().display());
    // No operator allowance: the manifest's grant is dropped at load.
    let (_p, registry) = with_dirs(&rw, &[]);
    assert!(registry.resolve("tasks.hostile", None).unwrap().grants().dirs.is_empty());
    let got = call(&registry, "tasks.hostile", serde_json::json!(["read", 0, "/data/report.txt"])).unwrap();
    assert!(got["error"].is_string(), "{got}");
    // Allowed read-only: granted read-only even though the manifest asks rw.
    let ro = [format!("{}:ro", data.path().display()).parse().unwrap()];
    let (_p, registry) = with_dirs(&rw, &ro);
    assert_eq!(call(&registry, "tasks.hostile", serde_json::json!(["read", 0, "/data/report.txt"])).unwrap()["read"], "a b");
    let wrote = call(&registry, "tasks.hostile", serde_json::json!(["write", 0, "/data/out.txt"])).unwrap();
    assert!(wrote["error"].is_string(), "{wrote}");
    // Allowed read-write: the write lands on the host.
    let rw_allowed = [data.path().to_str().unwrap().parse().unwrap()];
    let (_p, registry) = with_dirs(&rw, &rw_allowed);
    let wrote = call(&registry, "tasks.hostile", serde_json::json!(["write", 0, "/data/out.txt"])).unwrap();
    assert_eq!(wrote["wrote"], "/data/out.txt", "{wrote}");
    assert_eq!(std::fs::read_to_string(data.path().join("out.txt")).unwrap(), "written by a task");
}

#[test]
fn a_task_reads_only_the_secrets_its_manifest_grants() {
    let plugins = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.hostile@1.0.0.wasm"), plugins.path().join("tasks.hostile@1.0.0.wasm")).unwrap();
    std::fs::write(plugins.path().join("tasks.hostile@1.0.0.toml"), "[grants]\nconfig = [\"API_TOKEN\", \"ABSENT\"]\n").unwrap();
    let secrets: std::collections::BTreeMap<String, String> =
        [("API_TOKEN", "s3cret-value"), ("SMTP_PASSWORD", "hunter2")].map(|(k, v)| (k.to_string(), v.to_string())).into();
    let rt = custom_runtime(taskhost::runtime::RuntimeConfig { max_instances: 4, secrets: Arc::new(secrets), ..Default::default() });
    let registry = Registry::open(plugins.path(), rt).unwrap();
    let read = |name: &str| call(&registry, "tasks.hostile", serde_json::json!(["config", 0, name])).unwrap();
    assert_eq!(read("API_TOKEN"), serde_json::json!({"len": 12}));
    assert_eq!(read("ABSENT"), serde_json::json!({"missing": true}));
    assert_eq!(
        read("SMTP_PASSWORD"),
        serde_json::json!({"error": "config \"SMTP_PASSWORD\" denied: not granted (a manifest grants it with [grants] config = [\"SMTP_PASSWORD\"])"})
    );
}

#[test]
fn a_worker_hands_granted_secrets_from_its_file_and_environment_and_never_logs_them() {
    let (dir, broker) = {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("taskhost.db").display());
        (dir, url)
    };
    let plugins = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.hostile@1.0.0.wasm"), plugins.path().join("tasks.hostile@1.0.0.wasm")).unwrap();
    std::fs::write(plugins.path().join("tasks.hostile@1.0.0.toml"), "[grants]\nconfig = [\"API_TOKEN\", \"FROM_ENV\"]\n").unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(&secrets, "API_TOKEN = \"file-secret-1234\"\nSMTP_PASSWORD = \"file-secret-5678\"\n").unwrap();
    let mut worker = WorkerProcess::start_with_env(
        &broker,
        plugins.path(),
        &["--secrets", secrets.to_str().unwrap()],
        &[("TASKHOST_SECRET_FROM_ENV", "env-secret-9999")],
    );
    let ask = |name: &str| stdout(&send(&broker, &["tasks.hostile", "--args", &format!("[\"config\", 0, \"{name}\"]"), "--wait", "--timeout", "20"]));
    assert_eq!(ask("API_TOKEN"), r#"{"len":16}"#);
    assert_eq!(ask("FROM_ENV"), r#"{"len":15}"#);
    assert!(ask("SMTP_PASSWORD").contains("denied: not granted"));
    worker.wait_for_log("config read denied", Duration::from_secs(5));
    worker.signal(libc::SIGTERM);
    worker.wait(Duration::from_secs(20));
    let log = worker.log_text();
    assert!(log.contains("grant_denials=1"), "the denial is counted: {log}");
    assert!(log.contains("name=\"SMTP_PASSWORD\""), "{log}");
    for value in ["file-secret-1234", "file-secret-5678", "env-secret-9999"] {
        assert!(!log.contains(value), "a secret value reached the log");
    }
}

#[test]
fn the_operator_caps_which_follow_ups_any_manifest_may_send() {
    let rt = runtime_with(taskhost::ceilings::Ceilings { send_tasks: Some(vec!["tasks.mul".into()]), ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.fanout@1.0.0.wasm"), dir.path().join("tasks.fanout@1.0.0.wasm")).unwrap();
    // The manifest grants tasks.* (wider than the operator's tasks.mul).
    std::fs::write(dir.path().join("tasks.fanout@1.0.0.toml"), "[grants]\nsend_tasks = [\"tasks.*\"]\n").unwrap();
    let registry = Registry::open(dir.path(), rt).unwrap();
    let run = |target: &str| {
        let (run, sent) = fanout_in(&registry, &format!("[1, \"{target}\"]"));
        (run.result, sent.into_iter().next())
    };
    let (denied, sent) = run("tasks.add");
    assert!(sent.is_none());
    assert_eq!(
        denied,
        Err(TaskError::Fail {
            message: r#"send-task to "tasks.add" denied: this worker's operator does not allow it ([grants] send_tasks in taskhost.toml, --allow-send)"#.into()
        })
    );
    let (ok, sent) = run("tasks.mul");
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(sent.map(|t| t.name), Some("tasks.mul".to_string()));
}

#[test]
fn a_granted_directory_swapped_for_a_link_after_load_is_not_opened() {
    let root = tempfile::tempdir().unwrap();
    let sub = root.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("ok.txt"), "fine").unwrap();
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("ok.txt"), "not yours").unwrap();
    let allowed = [root.path().to_str().unwrap().parse().unwrap()];
    let spec = format!(r#"[{{ host = "{}", guest = "/data", mode = "ro" }}]"#, sub.display());
    let (_plugins, registry) = with_dirs(&spec, &allowed);
    let read = || call(&registry, "tasks.hostile", serde_json::json!(["read", 0, "/data/ok.txt"])).unwrap();
    assert_eq!(read()["read"], "fine");
    // Someone with write access beside it (another task's rw grant, a local user) swaps
    // the granted directory for a link to somewhere else.
    std::fs::rename(&sub, root.path().join("old")).unwrap();
    std::os::unix::fs::symlink(secret.path(), &sub).unwrap();
    let got = read();
    assert!(got.get("read").is_none(), "followed the swapped-in link: {got}");
}

#[test]
fn follow_ups_are_bounded_in_size_each_and_per_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.hostile@1.0.0.wasm"), dir.path().join("tasks.hostile@1.0.0.wasm")).unwrap();
    std::fs::write(dir.path().join("tasks.hostile@1.0.0.toml"), "max_sent_tasks = 1000\n[grants]\nsend_tasks = [\"tasks.add\"]\n").unwrap();
    let registry = Registry::open(dir.path(), runtime()).unwrap();
    let tv = registry.resolve("tasks.hostile", None).unwrap();
    let send = |bytes: u64| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let control = Arc::new(RunControl::default().with_sent_tasks(tx).with_grants(tv.grants()));
        let args = serde_json::json!(["send", bytes]).to_string();
        let input = TaskInput { name: "tasks.hostile".into(), args, kwargs: "{}".into(), ..Default::default() };
        let run = block_on(runtime().run(&tv.component, "1.0.0", input, &tv.limits(), control));
        let mut handed_over = 0;
        while rx.try_recv().is_ok() {
            handed_over += 1;
        }
        (serde_json::from_str::<serde_json::Value>(&run.result.unwrap()).unwrap(), handed_over)
    };
    // One follow-up above 64 KiB of arguments: refused.
    let (report, handed_over) = send(70_000);
    assert_eq!(handed_over, 0);
    assert_eq!(report["error"], "send-task: args-json is 70004 bytes, above 65536", "{report}");
    // Many below it: refused once the run's 1 MiB is spent (60,015 bytes each).
    let (report, handed_over) = send(60_000);
    assert_eq!((report["sent"].as_u64(), handed_over), (Some(17), 17), "{report}");
    assert_eq!(report["error"], "send-task: this run's follow-ups would exceed 1048576 bytes of arguments", "{report}");
}

#[test]
fn follow_ups_with_bad_options_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.hostile@1.0.0.wasm"), dir.path().join("tasks.hostile@1.0.0.wasm")).unwrap();
    std::fs::write(dir.path().join("tasks.hostile@1.0.0.toml"), "[grants]\nsend_tasks = [\"tasks.add\"]\n").unwrap();
    let registry = Registry::open(dir.path(), runtime()).unwrap();
    let tv = registry.resolve("tasks.hostile", None).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let control = Arc::new(RunControl::default().with_sent_tasks(tx).with_grants(tv.grants()));
    let input = TaskInput { name: "tasks.hostile".into(), args: r#"["sendopt"]"#.into(), kwargs: "{}".into(), ..Default::default() };
    let run = block_on(registry.runtime().run(&tv.component, "1.0.0", input, &tv.limits(), control));
    let said: Vec<String> = serde_json::from_str(&run.result.unwrap()).unwrap();
    assert!(rx.try_recv().is_err(), "a follow-up with a bad option was published");
    assert_eq!(said[0], "send-task: priority must be 0 to 9");
    assert_eq!(said[1], "send-task: countdown must be a non-negative number of seconds");
    assert_eq!(said[2], "send-task: countdown must be a non-negative number of seconds");
    assert!(said[3].starts_with("send-task: version \"not a semver\" is not a semver requirement"), "{}", said[3]);
    assert_eq!(said[4], r#"send-task: "q\r\nFLUSHALL" is not a queue name"#);
    assert!(said[5].contains("is not a queue name"), "{}", said[5]);
    assert_eq!(said[6], r#"send-task: "" is not a queue name"#);
}
