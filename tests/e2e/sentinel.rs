//! Redis Sentinel: a primary, a replica and three sentinels on loopback, started here;
//! the worker and Celery's own client follow the master through a failover.

use crate::chaos::{assert_drained, duplicates, runs_per_task, stored, wait_stored, RUN_LOG};
use crate::support::*;
use std::time::{Duration, Instant};

const MASTER: &str = "taskhost-main";

/// Three sentinels watching one master, killed on drop.
struct Sentinels {
    ports: Vec<u16>,
    children: Vec<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    /// Starts three sentinels on `primary` (quorum 2, down after 1.5 s) and waits until
    /// each knows the replica and the two others, so a failover can be authorised.
    fn start(primary: u16) -> Sentinels {
        let dir = tempfile::tempdir().unwrap();
        let mut sentinels = Sentinels { ports: Vec::new(), children: Vec::new(), _dir: tempfile::tempdir().unwrap() };
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            // Sentinel rewrites its file as it learns, so each has its own, writable.
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1500\nsentinel failover-timeout {MASTER} 10000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            let child = std::process::Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (make test-deps installs it) runs as a sentinel");
            sentinels.ports.push(port);
            sentinels.children.push(child);
        }
        sentinels._dir = dir;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sentinels.ready() {
            assert!(Instant::now() < deadline, "the sentinels did not find each other and the replica in 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        sentinels
    }

    fn ask<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        redis::cmd("SENTINEL").arg(args).query(&mut conn)
    }

    fn ready(&self) -> bool {
        self.ports.iter().all(|&port| {
            let quorum = Self::ask::<String>(port, &["CKQUORUM", MASTER]).is_ok_and(|r| r.starts_with("OK 3"));
            let replicas = Self::ask::<Vec<std::collections::HashMap<String, String>>>(port, &["REPLICAS", MASTER])
                .is_ok_and(|r| r.iter().any(|rep| rep.get("flags").is_some_and(|f| f == "slave")));
            quorum && replicas
        })
    }

    /// The master's port as the first sentinel to answer names it.
    fn master_port(&self) -> Option<u16> {
        self.ports
            .iter()
            .find_map(|&port| Self::ask::<Option<(String, u16)>>(port, &["GET-MASTER-ADDR-BY-NAME", MASTER]).ok().flatten().map(|(_, p)| p))
    }

    /// The URL kombu takes (its master_name goes in transport options).
    fn celery_url(&self) -> String {
        self.ports.iter().map(|p| format!("sentinel://127.0.0.1:{p}/0")).collect::<Vec<_>>().join(";")
    }

    /// The URL taskhost takes: kombu's, naming the master on it.
    fn url(&self) -> String {
        format!("{}?master_name={MASTER}", self.celery_url())
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `interop.py` through the sentinels, as a Celery app configured for Sentinel is.
fn celery_through(sentinels: &Sentinels, args: &[&str]) -> String {
    interop_with(&[("BROKER", &sentinels.celery_url()), ("SENTINEL_MASTER", MASTER)], args)
}

fn wait_replicated(replica: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info: String = replica.query(redis::cmd("INFO").arg("replication"));
        if info.contains("master_link_status:up") {
            return;
        }
        assert!(Instant::now() < deadline, "the replica never synced:\n{info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The primary killed (SIGKILL) mid-drain: the sentinels promote the replica, the worker
/// follows it without a restart, and every task that Redis had acknowledged (replicated,
/// as `WAIT` confirms) ends with its result. Celery's client finds the new master too.
#[test]
fn the_worker_follows_a_sentinel_failover_and_every_replicated_task_ends_stored() {
    const TASKS: usize = 3000;
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(primary.port);
    wait_replicated(&replica);
    let sentinels = Sentinels::start(primary.port);
    assert_eq!(sentinels.master_port(), Some(primary.port));

    let worker = WorkerProcess::start_with_env(
        &sentinels.url(),
        &plugins_dir(),
        &["-c", "8", "--visibility-timeout", "5"],
        &[("RUST_LOG", RUN_LOG)],
    );
    assert_eq!(celery_through(&sentinels, &["add"]), "5", "Celery → Sentinel → taskhost → Sentinel → Celery");

    let mut conn = primary.client().get_connection().unwrap();
    let ids = enqueue(&mut conn, "tasks.sleep", &serde_json::json!([10]), TASKS);
    let replicas: usize = redis::cmd("WAIT").arg(1).arg(5000).query(&mut conn).unwrap();
    assert_eq!(replicas, 1, "the replica acknowledged the messages");
    std::thread::sleep(Duration::from_millis(1500));
    let left: usize = redis::cmd("LLEN").arg("celery").query(&mut conn).unwrap();
    assert!(left > 500, "the drain was nearly over before the failover ({left} left)");
    drop(conn);
    primary.crash();
    let killed = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(60);
    while sentinels.master_port() != Some(replica.port) {
        assert!(Instant::now() < deadline, "the sentinels never promoted the replica (master {:?})", sentinels.master_port());
        std::thread::sleep(Duration::from_millis(100));
    }
    let promoted = killed.elapsed();
    let mut conn = replica.client().get_connection().unwrap();
    // Consuming again on the new master: its queue shrinks.
    let at_promotion: usize = redis::cmd("LLEN").arg("celery").query(&mut conn).unwrap();
    let following = Instant::now();
    while at_promotion > 0 && redis::cmd("LLEN").arg("celery").query::<usize>(&mut conn).unwrap() >= at_promotion {
        assert!(following.elapsed() < Duration::from_secs(30), "the worker never consumed from the new master:\n{}", worker.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    let resumed = following.elapsed();
    // The `add` above and every task enqueued.
    let drained = wait_stored(&mut conn, TASKS + 1, Duration::from_secs(120), &worker);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored(&mut conn), (TASKS + 1, TASKS + 1), "(results, SUCCESS) on the new master");
    assert_drained(&mut conn);
    let log = worker.log_text();
    assert!(log.contains("Redis Sentinel names a new master"), "the worker never said it moved:\n{log}");
    let runs = runs_per_task(&log);
    assert!(ids.iter().all(|id| runs.contains_key(id)), "a task never ran");
    eprintln!(
        "sentinel failover: replica promoted {:.1} s after the kill, consuming from it {:.0} ms later, all stored {:.1} s after that; duplicates {:?}",
        promoted.as_secs_f64(),
        resumed.as_secs_f64() * 1000.0,
        drained.as_secs_f64(),
        duplicates(&runs)
    );
    assert_eq!(celery_through(&sentinels, &["add"]), "5", "Celery's client on the new master");
    // Remote control rides pub/sub, which the worker resubscribed on the new master.
    assert!(celery_through(&sentinels, &["inspect"]).starts_with("taskhost"));
}
