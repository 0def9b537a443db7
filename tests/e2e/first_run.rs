//! A new user's first hour, as the first-run review found it: each rough edge it hit,
//! named after what it guards.

use crate::support::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn embedded_broker() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("taskhost.db").display());
    (dir, url)
}

#[test]
fn processes_opening_a_new_embedded_broker_file_at_once_never_find_it_locked() {
    for round in 0..20 {
        let (_dir, broker) = embedded_broker();
        let children: Vec<_> = (0..3)
            .map(|_| {
                Command::new(taskhost_bin())
                    .args(["dlq", "list", "--broker", &broker])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && !err.contains("locked"), "round {round}: {err}");
        }
    }
}

#[test]
fn a_sqlite_url_in_a_missing_directory_is_refused_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let url = format!("sqlite://{}/x.db", missing.display());
    let out = taskhost(&["send", "tasks.add", "--args", "[1, 2]", "--broker", &url]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("directory {} does not exist", missing.display())), "{}", stderr(&out));
    assert!(!missing.exists(), "the directory was created");
}

/// Pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The fields after the command name's closing parenthesis: state, ppid, …
        let after = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            found.push(pid);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// `taskhost serve -p 2 <extra>` (a supervisor and two workers) logging to `log`.
fn supervisor(broker: &str, extra: &[&str], log: &std::path::Path) -> std::process::Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(taskhost_bin())
        .args(["serve", "-p", "2", "--broker", broker])
        .args(extra)
        .arg("--plugins")
        .arg(plugins_dir())
        .env("TASKHOST_CACHE_DIR", cache_dir())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

#[test]
fn workers_exit_with_their_killed_supervisor_and_hand_back_their_messages() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut supervisor = supervisor(&redis.url(), &["-c", "1"], &dir.path().join("serve.log"));
    let ids: Vec<String> =
        (0..6).map(|_| stdout(&send(&redis.url(), &["tasks.sleep", "--args", "[20000]"]))).collect();
    // Two running (one per worker), the rest held or queued.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids.iter().filter(|id| record(&redis.url(), id)["status"] == "STARTED").count() < 2 {
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(dir.path().join("serve.log")).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let workers = children_of(supervisor.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    supervisor.kill().unwrap();
    supervisor.wait().unwrap();
    let killed = Instant::now();
    while workers.iter().any(|w| alive(*w)) {
        assert!(killed.elapsed() < Duration::from_secs(3), "workers outlived their supervisor");
        std::thread::sleep(Duration::from_millis(20));
    }
    let exited_after = killed.elapsed();
    // Everything they held is back on the queue, nothing left unacked.
    let queued: usize = redis.query(redis::cmd("LLEN").arg("celery"));
    let unacked: usize = redis.query(redis::cmd("HLEN").arg("unacked"));
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert_eq!((queued, unacked), (6, 0), "{log}");
    assert!(exited_after < Duration::from_millis(1500), "workers took {exited_after:?} to exit");
    assert!(log.contains("the supervisor is gone"), "{log}");
}

#[test]
fn the_supervisor_says_how_a_worker_ended() {
    let (_dir, broker) = embedded_broker();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("serve.log");
    let mut supervisor = supervisor(&broker, &[], &log_path);
    let deadline = Instant::now() + Duration::from_secs(30);
    let worker = loop {
        let text = std::fs::read_to_string(&log_path).unwrap();
        if text.matches("worker ready").count() >= 2 {
            break children_of(supervisor.id())[0];
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap();
        if text.contains("worker process was killed by signal 9") {
            assert!(!text.contains("ExitStatus"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(supervisor.id() as i32, libc::SIGTERM) };
    supervisor.wait().unwrap();
}

#[test]
fn serve_without_queues_also_serves_the_queues_manifests_name() {
    let (_dir, broker) = embedded_broker();
    let worker = WorkerProcess::start(&broker, &[]);
    assert!(worker.log_text().contains("queues=celery,media_heavy"), "{}", worker.log_text());
    let out = send(&broker, &["tasks.add", "--args", "[2, 3]", "-Q", "media_heavy", "--wait", "--timeout", "20"]);
    assert_eq!(stdout(&out), "5", "{}", stderr(&out));
    // A queue nobody serves: the wait ends with a hint instead of hanging in silence.
    let out = send(&broker, &["tasks.add", "--args", "[2, 3]", "-Q", "nobody", "--wait", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("it waits in queue \"nobody\". Is a worker consuming that queue?"), "{}", stderr(&out));
}

#[test]
fn a_folder_of_crates_is_described_with_the_way_to_build_it() {
    let sources = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let out = taskhost(&["run", "tasks.add", "--args", "[1, 2]", "--plugins", sources.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.starts_with("error: no component serves task tasks.add (searched "), "{err}");
    assert!(err.contains("Rust crate(s): build them with `make plugins` and use --plugins dist/plugins"), "{err}");
    let out = taskhost(&["plugins", "list", "--plugins", sources.to_str().unwrap()]);
    assert!(stderr(&out).contains("no components (<task>@<version>.wasm)"), "{}", stderr(&out));
    let out = taskhost(&["plugins", "list", "--plugins", plugins_dir().to_str().unwrap()]);
    assert!(stderr(&out).contains(" components): "), "{}", stderr(&out));
}

#[test]
fn a_task_not_ready_yet_has_one_wording_and_its_own_exit_code() {
    let (_dir, broker) = embedded_broker();
    let never_served = stdout(&send(&broker, &["tasks.add", "--args", "[1, 2]"]));
    let out = cli(&broker, &["result", &never_served]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stderr(&out), format!("task {never_served} is not ready yet: PENDING"));
    let _worker = WorkerProcess::start(&broker, &[]);
    let sleeping = stdout(&send(&broker, &["tasks.sleep", "--args", "[3000]"]));
    wait_status(&broker, &sleeping, "STARTED", Duration::from_secs(20));
    let out = cli(&broker, &["result", &sleeping]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stderr(&out), format!("task {sleeping} is not ready yet: STARTED"));
}

#[test]
fn a_workers_stop_line_adds_up() {
    let (_dir, broker) = embedded_broker();
    let mut worker = WorkerProcess::start(&broker, &[]);
    let ids: Vec<String> = (0..4).map(|i| stdout(&send(&broker, &["tasks.add", "--args", &format!("[{i}, 1]")]))).collect();
    let unknown: Vec<String> = (0..2).map(|_| stdout(&send(&broker, &["tasks.nope"]))).collect();
    for id in &ids {
        wait_status(&broker, id, "SUCCESS", Duration::from_secs(20));
    }
    for id in &unknown {
        wait_status(&broker, id, "FAILURE", Duration::from_secs(20));
    }
    worker.signal(libc::SIGTERM);
    worker.wait(Duration::from_secs(20));
    let log = worker.log_text();
    assert!(log.contains("processed=6 succeeded=4 failed=2"), "{log}");
}

#[test]
fn plugins_compile_says_what_it_is_doing() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(taskhost_bin())
        .args(["plugins", "compile", "--plugins"])
        .arg(plugins_dir())
        .env("TASKHOST_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.starts_with("compiling "), "{err}");
    assert!(err.contains("tasks.add@1.0.0  compiled in "), "{err}");
    assert!(stdout(&out).contains("compiled, 0 already cached"), "{}", stdout(&out));
}

#[test]
fn the_example_producer_runs_against_make_runs_redis_mode() {
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &[]);
    let producer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/producer.py");
    let out = run_bounded(Command::new(python()).arg(producer).env("BROKER", redis.url()), Duration::from_secs(120));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("tasks.add(2, 3) = 5"), "{}", stdout(&out));
    // `make run BROKER=…` is what the README tells a user to start for it.
    let makefile = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Makefile")).unwrap();
    assert!(makefile.contains("$(if $(BROKER),--broker $(BROKER))"), "make run no longer takes BROKER");
}
