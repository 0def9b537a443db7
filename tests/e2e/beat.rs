//! `taskhost beat`: every tick fires once cluster-wide — two instances, a killed leader,
//! a restart — and `serve --beat` runs the schedule beside the workers.

use crate::support::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

struct Beat {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Beat {
    fn start(broker: &str, schedule: &std::path::Path) -> Beat {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("beat.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(taskhost_bin())
            .args(["beat", "--broker", broker, "--schedule"])
            .arg(schedule)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Beat { child, log, _dir: dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_leading(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains("beat: leading") {
            assert!(Instant::now() < deadline, "never led:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let _ = self.child.wait();
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn schedule(dir: &std::path::Path, every: &str) -> std::path::PathBuf {
    let path = dir.join("schedule.toml");
    std::fs::write(
        &path,
        format!("[[entry]]\nname = \"tick\"\ntask = \"tasks.noop\"\nevery = \"{every}\"\nqueue = \"beat\"\n"),
    )
    .unwrap();
    path
}

/// The ticks of the messages beat queued, oldest first, from Redis.
fn ticks(redis: &RedisServer) -> Vec<String> {
    let items: Vec<Vec<u8>> = redis.query(redis::cmd("LRANGE").arg("beat").arg(0).arg(-1));
    let mut ticks: Vec<String> = items
        .iter()
        .map(|raw| {
            let envelope = taskhost::protocol::Envelope::parse(raw).unwrap();
            envelope.headers["taskhost_beat"]["tick"].as_str().unwrap().to_string()
        })
        .collect();
    ticks.sort();
    ticks
}

fn assert_each_tick_once(ticks: &[String]) {
    let unique: BTreeSet<&String> = ticks.iter().collect();
    assert_eq!(unique.len(), ticks.len(), "a tick fired twice: {ticks:?}");
}

/// Ticks `step_ms` apart with none missing.
fn assert_consecutive(ticks: &[String], step_ms: i64) {
    let times: Vec<i64> =
        ticks.iter().map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()).collect();
    assert!(times.windows(2).all(|w| w[1] - w[0] == step_ms), "ticks not consecutive: {ticks:?}");
}

#[test]
fn two_beats_fire_each_tick_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = schedule(dir.path(), "1s");
    let a = Beat::start(&redis.url(), &path);
    let b = Beat::start(&redis.url(), &path);
    std::thread::sleep(Duration::from_millis(4500));
    drop(a);
    drop(b);
    let t = ticks(&redis);
    assert_each_tick_once(&t);
    assert_consecutive(&t, 1000);
    assert!((4..=6).contains(&t.len()), "{t:?}");
}

#[test]
fn a_follower_takes_over_when_the_leader_dies() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = schedule(dir.path(), "1s");
    let mut leader = Beat::start(&redis.url(), &path);
    leader.wait_leading(Duration::from_secs(5));
    let follower = Beat::start(&redis.url(), &path);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!follower.log().contains("beat: leading"), "only one leads:\n{}", follower.log());
    let before = ticks(&redis).len();
    leader.kill(libc::SIGKILL);
    let killed = Instant::now();
    follower.wait_leading(Duration::from_secs(8));
    assert!(killed.elapsed() <= Duration::from_millis(6500), "took over after {:?}", killed.elapsed());
    std::thread::sleep(Duration::from_millis(2500));
    let t = ticks(&redis);
    assert_each_tick_once(&t);
    assert_consecutive(&t, 1000);
    assert!(t.len() >= before + 2, "the follower kept the schedule: {t:?}");
}

#[test]
fn a_restart_neither_skips_nor_double_fires() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = schedule(dir.path(), "3s");
    let mut first = Beat::start(&redis.url(), &path);
    first.wait_leading(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!ticks(&redis).is_empty(), "an interval entry fires at first start");
    first.kill(libc::SIGTERM);
    let again = Beat::start(&redis.url(), &path);
    again.wait_leading(Duration::from_secs(8));
    std::thread::sleep(Duration::from_millis(6500));
    let t = ticks(&redis);
    assert_each_tick_once(&t);
    // Consecutive ticks, 3 s apart: nothing skipped across the restart.
    assert!(t.len() >= 3, "{t:?}");
    assert_consecutive(&t, 3000);
}

#[test]
fn serve_with_beat_runs_scheduled_tasks_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("taskhost.db").display());
    let path = dir.path().join("schedule.toml");
    std::fs::write(&path, "[[entry]]\nname = \"sum\"\ntask = \"tasks.add\"\nevery = \"1s\"\nargs = [20, 22]\n").unwrap();
    let worker = WorkerProcess::start(&url, &["--beat", "--schedule", path.to_str().unwrap()]);
    worker.wait_for_log("beat: sent", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(2200));
    let text = worker.log_text();
    let sent = text.matches("beat: sent").count();
    assert!((2..=4).contains(&sent), "sent {sent} in ~2 s:\n{text}");
    // What beat sent ran: the result store has successes of tasks.add.
    let id = text.lines().find(|l| l.contains("beat: sent")).and_then(|l| l.split("id=").nth(1)).unwrap().split_whitespace().next().unwrap();
    let r = taskhost(&["result", id, "--wait", "--timeout", "10", "--broker", &url]);
    assert_eq!(stdout(&r), "42", "{}", stderr(&r));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[entry]]\nname = \"x\"\ntask = \"t\"\n").unwrap();
    let out = taskhost(&["serve", "--broker", &url, "--beat", "--schedule", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("entry \"x\": give exactly one of `every` or `cron`"), "{}", stderr(&out));
}

/// Runs SQL on a SQLite file through Python's sqlite3 (the test machine's Python).
fn sqlite_exec(db: &std::path::Path, sql: &str) -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); r = c.execute(sys.argv[2]).fetchall(); c.commit(); print(r)"])
        .arg(db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_tick_whose_message_never_reached_the_broker_is_not_recorded_and_goes_out_later() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("taskhost.db");
    let url = format!("sqlite://{}", db.display());
    // Creates the schema.
    assert!(cli(&url, &["dlq", "list"]).status.success());
    // Every message insert fails, as on a full disk.
    sqlite_exec(&db, "CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk full'); END");
    let path = dir.path().join("schedule.toml");
    std::fs::write(&path, "[[entry]]\nname = \"sum\"\ntask = \"tasks.add\"\nevery = \"1s\"\nargs = [1, 2]\n").unwrap();
    let log = dir.path().join("beat.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut beat = std::process::Command::new(taskhost_bin())
        .args(["beat", "--schedule", path.to_str().unwrap(), "--broker", &url])
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !read().contains("tick not sent after 5 attempts") {
        assert!(std::time::Instant::now() < deadline, "{}", read());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sqlite_exec(&db, "SELECT COUNT(*) FROM beat_ticks"), "[(0,)]", "a tick was recorded without its message");
    sqlite_exec(&db, "DROP TRIGGER refuse");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !read().contains("beat: sent") {
        assert!(std::time::Instant::now() < deadline, "{}", read());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = read().matches("beat: sent").count();
    let queued: String = sqlite_exec(&db, "SELECT COUNT(*) FROM messages");
    let recorded = sqlite_exec(&db, "SELECT COUNT(*) FROM beat_ticks");
    unsafe { libc::kill(beat.id() as i32, libc::SIGTERM) };
    let _ = beat.wait();
    assert_eq!(recorded, "[(1,)]");
    assert!(queued.trim_start_matches("[(").trim_end_matches(",)]").parse::<usize>().unwrap() >= sent, "{queued} < {sent}");
}
