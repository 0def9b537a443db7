//! The PostgreSQL and MySQL/MariaDB result backends against the servers on this machine,
//! each test in a database of its own: Celery's tables, Python clients and workers reading
//! and writing the same rows, chords through `celery.chord_unlock`, expiry, and outages.

use crate::support::*;
use std::process::Command;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Server {
    Postgres,
    MariaDb,
}

/// A database created for one test and dropped after it.
pub struct TestDb {
    server: Server,
    name: String,
}

impl TestDb {
    /// A fresh database, or `None` (with the reason printed) where the server is not here.
    pub fn create(server: Server) -> Option<TestDb> {
        let name = format!("taskhost_{}_{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let db = TestDb { server, name };
        match db.admin(&format!("CREATE DATABASE {}", db.name)) {
            Ok(_) => Some(db),
            Err(why) => {
                eprintln!("SKIPPED: no {server:?} server to test against on 127.0.0.1 ({why}); `make test-deps` installs one");
                None
            }
        }
    }

    fn admin(&self, sql: &str) -> Result<String, String> {
        Self::run(self.server, None, sql)
    }

    /// Runs SQL in this test's database; its output rows, tab-separated.
    fn query(&self, sql: &str) -> String {
        Self::run(self.server, Some(&self.name), sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn run(server: Server, db: Option<&str>, sql: &str) -> Result<String, String> {
        let mut cmd = match server {
            Server::Postgres => {
                let mut c = Command::new("psql");
                c.args(["-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-tA", "-d", db.unwrap_or("postgres"), "-c", sql]);
                c
            }
            Server::MariaDb => {
                let mut c = Command::new("mysql");
                c.args(["-h", "127.0.0.1", "-u", "root", "-N", "-B"]);
                if let Some(db) = db {
                    c.arg(db);
                }
                c.args(["-e", sql]);
                c
            }
        };
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The URL taskhost takes.
    pub fn url(&self) -> String {
        match self.server {
            Server::Postgres => format!("postgresql://postgres@127.0.0.1:5432/{}", self.name),
            Server::MariaDb => format!("mysql://root@127.0.0.1:3306/{}", self.name),
        }
    }

    /// The same database as a Celery app names it (`db+` and the SQLAlchemy driver).
    fn celery_url(&self) -> String {
        match self.server {
            Server::Postgres => format!("db+postgresql+psycopg://postgres@127.0.0.1:5432/{}", self.name),
            Server::MariaDb => format!("db+mysql+pymysql://root@127.0.0.1:3306/{}", self.name),
        }
    }

    /// Everything a client can see of the tables' layout, to compare two databases by.
    fn layout(&self) -> String {
        match self.server {
            Server::Postgres => [
                self.query(
                    "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable, column_default \
                     FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
                ),
                self.query("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname"),
                self.query("SELECT sequence_name, data_type, start_value, increment FROM information_schema.sequences ORDER BY 1"),
                self.query(
                    "SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint \
                     WHERE connamespace = 'public'::regnamespace ORDER BY conname",
                ),
            ]
            .join("\n"),
            Server::MariaDb => [
                self.query("SHOW CREATE TABLE celery_taskmeta"),
                self.query("SHOW CREATE TABLE celery_tasksetmeta"),
                self.query("SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() ORDER BY 1"),
            ]
            .join("\n")
            .replace(&self.name, "<db>"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = self.admin(&format!("DROP DATABASE IF EXISTS {}", self.name));
    }
}

/// `interop.py <args>` with Celery's result backend pointed at `db`.
fn interop_on(broker: &str, db: &TestDb, extended: bool, args: &[&str]) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(python_dir().join("interop.py")).args(args).env("BROKER", broker).env("RESULT_BACKEND", db.celery_url());
    if extended {
        cmd.env("RESULT_EXTENDED", "1");
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "interop.py {args:?} on {:?} failed:\n{so}\n{se}", db.server);
    so.trim().to_string()
}

fn celery_reads_what_taskhost_stores(server: Server) {
    let Some(db) = TestDb::create(server) else { return };
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["--result-backend", &db.url(), "--result-extended", "-c", "8"]);
    assert_eq!(interop_on(&redis.url(), &db, true, &["add"]), "5");
    assert_eq!(interop_on(&redis.url(), &db, true, &["kwargs"]), "8");
    assert_eq!(interop_on(&redis.url(), &db, true, &["fail"]), "TaskFailed: the disk is full");
    // Chords go through the `celery.chord_unlock` Celery's producer sends with a SQL backend.
    assert_eq!(interop_on(&redis.url(), &db, true, &["canvas"]), "chain 40, 42; group; chord 90; link 12");
    assert_eq!(interop_on(&redis.url(), &db, true, &["canvas_errors"]), "chain failure propagated; ChordError; errback called");
    assert_eq!(interop_on(&redis.url(), &db, true, &["sql_results"]), "group saved and restored; meta read");
    // The rows are Celery's: JSON bytes in `result`, naive UTC in `date_done`.
    let row = match server {
        Server::Postgres => db.query("SELECT status, convert_from(result, 'UTF8') FROM celery_taskmeta WHERE result = '5'::bytea LIMIT 1"),
        Server::MariaDb => db.query("SELECT status, CAST(result AS CHAR) FROM celery_taskmeta WHERE result = '5' LIMIT 1").replace('\t', "|"),
    };
    assert_eq!(row, "SUCCESS|5");
    let unlocks: u64 = redis.query(redis::cmd("HLEN").arg("unacked"));
    assert_eq!(unlocks, 0, "nothing left unacked");
}

#[test]
fn celery_clients_read_results_groups_and_chords_taskhost_stores_on_postgresql() {
    celery_reads_what_taskhost_stores(Server::Postgres);
}

#[test]
fn celery_clients_read_results_groups_and_chords_taskhost_stores_on_mariadb() {
    celery_reads_what_taskhost_stores(Server::MariaDb);
}

fn tables_match_sqlalchemys(server: Server) {
    // Celery creates the extended columns whether or not `result_extended` is on.
    let (Some(celerys), Some(ours)) = (TestDb::create(server), TestDb::create(server)) else { return };
    let redis = RedisServer::start();
    interop_on(&redis.url(), &celerys, false, &["celery_tables", &celerys.celery_url(), "0"]);
    block_on(async {
        taskhost::backend::SqlBackend::connect(&ours.url(), None, 1, false).await.unwrap();
    });
    assert_eq!(ours.layout(), celerys.layout(), "{server:?} tables differ from SQLAlchemy's");
}

#[test]
fn taskhosts_tables_are_the_ones_sqlalchemy_creates_on_postgresql() {
    tables_match_sqlalchemys(Server::Postgres);
}

#[test]
fn taskhosts_tables_are_the_ones_sqlalchemy_creates_on_mariadb() {
    tables_match_sqlalchemys(Server::MariaDb);
}

fn success_is_final_and_old_rows_expire(server: Server) {
    use taskhost::backend::ResultBackend;
    use taskhost::protocol::{ExceptionInfo, ResultRecord, State};
    let Some(db) = TestDb::create(server) else { return };
    block_on(async {
        let b = taskhost::backend::SqlBackend::connect(&db.url(), Some(Duration::from_secs(3600)), 2, false).await.unwrap();
        let ok = ResultRecord::success("t-1", serde_json::json!({"v": [1, "two"]}));
        assert!(b.store(&ok, None).await.unwrap());
        let late_failure = ResultRecord::failure("t-1", &ExceptionInfo::new("builtins", "ValueError", "late"), None);
        assert!(!b.store(&late_failure, None).await.unwrap(), "a FAILURE overwrote a SUCCESS");
        let got = b.get("t-1").await.unwrap().unwrap();
        assert_eq!((got.status, got.result.clone()), (State::Success, serde_json::json!({"v": [1, "two"]})));
        // In one batch: STARTED then SUCCESS of a new task, then a retry of a finished one.
        let batch = vec![
            (ResultRecord::started("t-2", 1, "h"), None),
            (ResultRecord::success("t-2", serde_json::json!(2)), None),
            (ResultRecord::retry("t-1", None, None), None),
            (ResultRecord::custom("t-3", serde_json::json!({"done": 3})), Some("PROGRESS".to_string())),
        ];
        assert_eq!(b.store_many(&batch).await.unwrap(), vec![true, true, false, true]);
        assert_eq!(b.get("t-2").await.unwrap().unwrap().result, 2);
        assert_eq!(b.get("t-3").await.unwrap().unwrap().status, State::Custom);
        assert!(b.get("never").await.unwrap().is_none());
        let failed = ResultRecord::failure("t-4", &ExceptionInfo::new("builtins", "KeyError", "'sku'"), Some("Traceback…".into()));
        assert!(b.store(&failed, None).await.unwrap());
        let got = b.get("t-4").await.unwrap().unwrap();
        let exc = got.exception().unwrap();
        assert_eq!((exc.exc_module.as_str(), exc.exc_type.as_str(), exc.message()), ("builtins", "KeyError", "'sku'".to_string()));
        assert_eq!(got.traceback.as_deref(), Some("Traceback…"));
        // Two days old: past the hour's expiry, and `celery.backend_cleanup` deletes it.
        let aged = match server {
            Server::Postgres => "UPDATE celery_taskmeta SET date_done = now() - interval '2 days' WHERE task_id = 't-1'",
            Server::MariaDb => "UPDATE celery_taskmeta SET date_done = NOW() - INTERVAL 2 DAY WHERE task_id = 't-1'",
        };
        db.query(aged);
        assert_eq!(b.cleanup().await.unwrap(), 1);
        assert!(b.get("t-1").await.unwrap().is_none());
        assert!(b.get("t-2").await.unwrap().is_some());
    });
}

#[test]
fn a_success_is_never_overwritten_and_expired_rows_are_deleted_on_postgresql() {
    success_is_final_and_old_rows_expire(Server::Postgres);
}

#[test]
fn a_success_is_never_overwritten_and_expired_rows_are_deleted_on_mariadb() {
    success_is_final_and_old_rows_expire(Server::MariaDb);
}

fn taskhost_reads_a_python_workers_rows(server: Server) {
    let Some(db) = TestDb::create(server) else { return };
    let redis = RedisServer::start();
    let mut celery = Command::new(python())
        .args(["-m", "celery", "-A", "tasks", "worker", "-P", "solo", "-c", "1", "--without-mingle", "--without-gossip", "-l", "warning"])
        .current_dir(python_dir().join("../../examples"))
        .env("BROKER", redis.url())
        .env("RESULT_BACKEND", db.celery_url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let id = interop_on(&redis.url(), &db, false, &["send", "tasks.add", "[4, 5]", "celery", "0"]);
    let out = run_bounded(
        Command::new(taskhost_bin()).args(["result", &id, "--wait", "--timeout", "60", "--broker", &redis.url(), "--result-backend", &db.url()]),
        Duration::from_secs(90),
    );
    // A chord from taskhost's CLI, joined by the Python worker running its chord_unlock.
    let chord = r#"{"chord": {"header": [{"task": "tasks.add", "args": [1, 1]}, {"task": "tasks.add", "args": [2, 2]}], "body": {"task": "tasks.tsum"}}}"#;
    let joined = run_bounded(
        Command::new(taskhost_bin()).args([
            "send", "--workflow", chord, "--wait", "--timeout", "60", "--broker", &redis.url(), "--result-backend", &db.url(),
        ]),
        Duration::from_secs(90),
    );
    let _ = celery.kill();
    let _ = celery.wait();
    assert_eq!(stdout(&out), "9", "{}", stderr(&out));
    assert_eq!(stdout(&joined), "6", "{}", stderr(&joined));
}

#[test]
fn taskhost_reads_rows_a_python_worker_stored_on_postgresql() {
    taskhost_reads_a_python_workers_rows(Server::Postgres);
}

#[test]
fn taskhost_reads_rows_a_python_worker_stored_on_mariadb() {
    taskhost_reads_a_python_workers_rows(Server::MariaDb);
}

#[test]
fn a_chord_sent_from_taskhost_is_joined_by_chord_unlock_on_a_sql_backend() {
    let Some(db) = TestDb::create(Server::Postgres) else { return };
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["--result-backend", &db.url()]);
    let chord = r#"{"chord": {"header": [{"task": "tasks.add", "args": [1, 1]}, {"task": "tasks.add", "args": [2, 2]}, {"task": "tasks.add", "args": [3, 3]}], "body": {"task": "tasks.tsum"}}}"#;
    let out = send(&redis.url(), &["--workflow", chord, "--wait", "--timeout", "30", "--result-backend", &db.url()]);
    assert_eq!(stdout(&out), "12", "{}", stderr(&out));
    let failing = r#"{"chord": {"header": [{"task": "tasks.add", "args": [1, 1]}, {"task": "tasks.fail", "args": ["member broke"]}], "body": {"task": "tasks.tsum"}}}"#;
    let out = send(&redis.url(), &["--workflow", failing, "--wait", "--timeout", "30", "--result-backend", &db.url()]);
    assert!(stdout(&out).contains("ChordError") || stderr(&out).contains("ChordError"), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("member broke") || stderr(&out).contains("member broke"), "{}\n{}", stdout(&out), stderr(&out));
}

#[test]
fn an_unreachable_or_refusing_database_is_a_clear_error_at_start() {
    let redis = RedisServer::start();
    let cases = [
        (format!("postgresql://postgres@127.0.0.1:{}/x", free_port()), "Connection refused"),
        ("postgresql://no_such_role@127.0.0.1:5432/postgres".to_string(), "no_such_role"),
        ("mysql://no_such_user:wrong@127.0.0.1:3306/x".to_string(), "Access denied"),
    ];
    for (url, says) in cases {
        for processes in ["1", "2"] {
            let out = run_bounded(
                Command::new(taskhost_bin())
                    .args(["serve", "-p", processes, "--broker", &redis.url(), "--result-backend", &url, "--plugins"])
                    .arg(plugins_dir())
                    .env("TASKHOST_CACHE_DIR", cache_dir()),
                Duration::from_secs(60),
            );
            let err = stderr(&out);
            assert!(!out.status.success(), "serve -p {processes} started on {url}");
            assert!(err.contains("connecting to result backend") && err.contains(says), "serve -p {processes} on {url} said:\n{err}");
            assert!(!err.contains("wrong"), "the password was shown: {err}");
        }
    }
    // A state store that is not there stops serve the same way.
    let nowhere = format!("postgresql://postgres@127.0.0.1:{}/x", free_port());
    for processes in ["1", "2"] {
        let out = run_bounded(
            Command::new(taskhost_bin())
                .args(["serve", "-p", processes, "--broker", &redis.url(), "--state", &nowhere, "--plugins"])
                .arg(plugins_dir())
                .env("TASKHOST_CACHE_DIR", cache_dir()),
            Duration::from_secs(60),
        );
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains("Connection refused"), "serve -p {processes} --state {nowhere} said:\n{err}");
    }
}

#[test]
fn results_wait_in_held_messages_while_the_database_is_locked() {
    let Some(db) = TestDb::create(Server::Postgres) else { return };
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&redis.url(), &["--result-backend", &db.url(), "--track-started", "false"]);
    let warm = send(&redis.url(), &["tasks.add", "--args", "[1, 1]", "--wait", "--timeout", "20", "--result-backend", &db.url()]);
    assert_eq!(stdout(&warm), "2", "{}", stderr(&warm));
    // An exclusive lock for 4 s: every result write waits behind it.
    let mut locker = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", &db.name, "-c"])
        .arg("BEGIN; LOCK TABLE celery_taskmeta IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT;")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut conn = redis.client().get_connection().unwrap();
    let ids = enqueue(&mut conn, "tasks.add", &serde_json::json!([20, 22]), 50);
    std::thread::sleep(Duration::from_millis(1500));
    let held: u64 = redis.query(redis::cmd("HLEN").arg("unacked"));
    assert!(held > 0, "messages whose results could not be written were acked");
    locker.wait().unwrap();
    poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let n: u64 = db.query(&format!("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS' AND task_id IN ('{}')", ids.join("','"))).parse().unwrap();
        let held: u64 = redis.query(redis::cmd("HLEN").arg("unacked"));
        if n == 50 && held == 0 { Ok(()) } else { Err(format!("{n} of 50 stored, {held} held after the lock")) }
    });
}

/// Redis carries the messages; PostgreSQL (`--state`) holds beat's lease and ticks, the
/// parked ETA messages and the dead letters; the CLI finds them there too.
#[test]
fn with_state_on_postgresql_beat_eta_and_dead_letters_live_in_the_database() {
    let Some(db) = TestDb::create(Server::Postgres) else { return };
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("schedule.toml");
    std::fs::write(&schedule, "[[entry]]\nname = \"sum\"\ntask = \"tasks.add\"\nevery = \"1s\"\nargs = [20, 22]\n").unwrap();
    let state = db.url();
    let worker = WorkerProcess::start(
        &redis.url(),
        &["--state", &state, "--result-backend", &state, "--beat", "--schedule", schedule.to_str().unwrap()],
    );
    worker.wait_for_log("beat: sent", Duration::from_secs(10));
    assert_eq!(db.query("SELECT entry FROM taskhost_beat_ticks"), "sum");
    assert_eq!(db.query("SELECT name FROM taskhost_leases"), "beat");
    // A countdown parks the message in PostgreSQL, not on Redis, until it is due.
    let out = send(&redis.url(), &["tasks.add", "--args", "[1, 2]", "--countdown", "3", "--state", &state, "--result-backend", &state]);
    let id = stdout(&out);
    poll_until(Duration::from_secs(3), Duration::from_millis(50), || match db.query("SELECT count(*) FROM taskhost_parked") {
        one if one == "1" => Ok(()),
        n => Err(format!("the countdown message was never parked in PostgreSQL: {n} parked")),
    });
    let on_redis: bool = redis.query(redis::cmd("EXISTS").arg("taskhost.scheduled"));
    assert!(!on_redis, "parked on Redis too");
    let r = taskhost(&["result", &id, "--wait", "--timeout", "15", "--broker", &redis.url(), "--result-backend", &state]);
    assert_eq!(stdout(&r), "3", "{}", stderr(&r));
    assert_eq!(db.query("SELECT count(*) FROM taskhost_parked"), "0");
    // An unknown task is dead-lettered into PostgreSQL; `dlq` reads and replays it there.
    let out = send(&redis.url(), &["tasks.nope", "--state", &state, "--result-backend", &state]);
    let lost = stdout(&out);
    poll_until(Duration::from_secs(10), Duration::from_millis(50), || match db.query("SELECT count(*) FROM taskhost_dead_letters") {
        one if one == "1" => Ok(()),
        n => Err(format!("{n} dead letters in PostgreSQL, not 1")),
    });
    let listed = taskhost(&["dlq", "list", "--broker", &redis.url(), "--state", &state]);
    assert!(stdout(&listed).contains(&lost), "{}\n{}", stdout(&listed), stderr(&listed));
    let without = taskhost(&["dlq", "list", "--broker", &redis.url()]);
    assert!(!stdout(&without).contains(&lost), "the letter is on Redis too: {}", stdout(&without));
    // Beat's sums went on running all along.
    let sent = worker.log_text().lines().find(|l| l.contains("beat: sent")).and_then(|l| l.split("id=").nth(1)).unwrap().split_whitespace().next().unwrap().to_string();
    let r = taskhost(&["result", &sent, "--wait", "--timeout", "10", "--broker", &redis.url(), "--result-backend", &state]);
    assert_eq!(stdout(&r), "42", "{}", stderr(&r));
}
