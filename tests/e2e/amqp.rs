//! RabbitMQ: the AMQP transport through `trait Broker`, and the real worker beside Python
//! Celery clients on it — each test in a vhost of its own, made and removed with
//! `rabbitmqctl` (skipped, saying why, where RabbitMQ or rabbitmqctl is absent).

use crate::support::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use taskhost::broker::{self, Broker};
use taskhost::protocol::{decode, encode_task, OutgoingTask};

/// A vhost on the machine's RabbitMQ (127.0.0.1:5672, guest/guest), deleted on drop.
pub struct Vhost {
    name: String,
}

fn rabbitmqctl(args: &[&str]) -> Option<std::process::Output> {
    std::process::Command::new("rabbitmqctl").args(args).output().ok()
}

impl Vhost {
    pub fn create() -> Option<Vhost> {
        if std::net::TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(2)).is_err() {
            eprintln!("SKIPPED: no RabbitMQ on 127.0.0.1:5672");
            return None;
        }
        let name = format!("taskhost-test-{}", uuid::Uuid::new_v4().simple());
        match rabbitmqctl(&["add_vhost", &name]) {
            Some(out) if out.status.success() => {}
            Some(out) => {
                eprintln!("SKIPPED: rabbitmqctl add_vhost failed: {}", String::from_utf8_lossy(&out.stderr));
                return None;
            }
            None => {
                eprintln!("SKIPPED: no rabbitmqctl to make a vhost with");
                return None;
            }
        }
        let vhost = Vhost { name };
        let out = rabbitmqctl(&["set_permissions", "-p", &vhost.name, "guest", ".*", ".*", ".*"]).unwrap();
        assert!(out.status.success(), "set_permissions: {}", String::from_utf8_lossy(&out.stderr));
        Some(vhost)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    /// `rabbitmqctl list_queues -p <vhost> <columns…>`, one row of tab-separated columns each.
    pub fn list_queues(&self, columns: &[&str]) -> Vec<Vec<String>> {
        let mut args = vec!["list_queues", "-q", "--no-table-headers", "-p", &self.name];
        args.extend_from_slice(columns);
        let out = rabbitmqctl(&args).unwrap();
        assert!(out.status.success(), "list_queues: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split('\t').map(|c| c.trim().to_string()).collect()).collect()
    }

    /// (ready, unacked) on one queue.
    pub fn counts(&self, queue: &str) -> (u64, u64) {
        self.list_queues(&["name", "messages_ready", "messages_unacknowledged"])
            .into_iter()
            .find(|row| row[0] == queue)
            .map_or((0, 0), |row| (row[1].parse().unwrap(), row[2].parse().unwrap()))
    }

    /// Cuts every client connection to this vhost, as a broker restart would.
    pub fn close_connections(&self) {
        let out = rabbitmqctl(&["close_all_connections", "-p", &self.name, "test: connections cut"]).unwrap();
        assert!(out.status.success(), "close_all_connections: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.name]);
    }
}

fn message(name: &str) -> Vec<u8> {
    encode_task(&OutgoingTask { task: name.into(), id: uuid::Uuid::new_v4().to_string(), queue: "q".into(), ..Default::default() })
}

fn task_of(raw: &[u8]) -> String {
    decode(raw).unwrap().headers.task
}

/// Fetches until `n` messages came (deliveries arrive as RabbitMQ pushes them, so one
/// fetch may hold fewer than are ready), or panics after 10 s.
async fn fetch_n(b: &dyn Broker, queue: &str, n: usize, max: usize) -> Vec<broker::Delivery> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} messages came", got.len());
        got.extend(b.fetch(&[queue.to_string()], max, Duration::from_millis(200)).await.unwrap());
    }
    got
}

#[test]
fn messages_go_out_in_order_are_acked_once_and_an_acked_one_never_returns() {
    let Some(vhost) = Vhost::create() else { return };
    block_on(async {
        let b = broker::connect_transport(&vhost.url()).await.unwrap();
        for i in 0..5 {
            b.publish("q", 0, &message(&format!("t{i}"))).await.unwrap();
        }
        let got = fetch_n(b.as_ref(), "q", 5, 10).await;
        let names: Vec<String> = got.iter().map(|d| task_of(&d.raw)).collect();
        assert_eq!(names, ["t0", "t1", "t2", "t3", "t4"]);
        assert!(got.iter().all(|d| d.queue == "q" && d.tag.is_some()));
        assert_eq!(vhost.counts("q"), (0, 5), "(ready, unacked) while held");
        b.ack(&got.iter().filter_map(|d| d.tag.clone()).collect::<Vec<_>>()).await.unwrap();
        drop(b);
        let other = broker::connect_transport(&vhost.url()).await.unwrap();
        assert!(other.fetch(&["q".into()], 10, Duration::from_millis(300)).await.unwrap().is_empty());
        assert_eq!(vhost.counts("q"), (0, 0));
    });
}

#[test]
fn a_restored_message_is_rejected_with_requeue_and_comes_back_marked_redelivered() {
    let Some(vhost) = Vhost::create() else { return };
    block_on(async {
        let b = broker::connect_transport(&vhost.url()).await.unwrap();
        b.publish("q", 0, &message("a")).await.unwrap();
        let first = fetch_n(b.as_ref(), "q", 1, 1).await.pop().unwrap();
        assert!(!decode(&first.raw).unwrap().headers.redelivered);
        b.restore(&first).await.unwrap();
        let again = fetch_n(b.as_ref(), "q", 1, 1).await.pop().unwrap();
        assert_eq!(task_of(&again.raw), "a");
        assert!(decode(&again.raw).unwrap().headers.redelivered, "marked redelivered");
        assert_eq!(decode(&again.raw).unwrap().headers.id, decode(&first.raw).unwrap().headers.id);
    });
}

/// The connection cut under a consumer holding messages: RabbitMQ requeues them, the
/// transport reconnects on its next call, and the old deliveries' acks are dropped rather
/// than acking whatever the new connection numbered the same.
#[test]
fn a_cut_connection_requeues_what_was_held_and_stale_acks_touch_nothing() {
    let Some(vhost) = Vhost::create() else { return };
    block_on(async {
        let b = broker::connect_transport(&vhost.url()).await.unwrap();
        for i in 0..3 {
            b.publish("q", 0, &message(&format!("m{i}"))).await.unwrap();
        }
        let held = fetch_n(b.as_ref(), "q", 3, 10).await;
        vhost.close_connections();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stale: Vec<String> = held.iter().filter_map(|d| d.tag.clone()).collect();
        // The first call after the cut may report it; the worker retries.
        let _ = b.ack(&stale).await;
        let mut back = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while back.len() < 3 {
            assert!(Instant::now() < deadline, "{} of 3 came back after the cut", back.len());
            match b.fetch(&["q".into()], 10, Duration::from_millis(200)).await {
                Ok(got) => back.extend(got),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert!(back.iter().all(|d| decode(&d.raw).unwrap().headers.redelivered), "requeued, so redelivered");
        b.ack(&stale).await.unwrap();
        assert_eq!(vhost.counts("q"), (0, 3), "stale acks acked none of the new deliveries");
        b.ack(&back.iter().filter_map(|d| d.tag.clone()).collect::<Vec<_>>()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(vhost.counts("q"), (0, 0));
    });
}

/// `?max_priority=10` declares queues with `x-max-priority` (Celery's
/// `task_queue_max_priority`): on RabbitMQ the highest priority goes first, as Celery's
/// workers see it there (on Redis kombu serves priority 0 first).
#[test]
fn with_max_priority_the_highest_priority_goes_first() {
    let Some(vhost) = Vhost::create() else { return };
    block_on(async {
        let url = format!("{}?max_priority=10", vhost.url());
        let b = broker::connect_transport(&url).await.unwrap();
        for (name, p) in [("p0", 0), ("p9", 9), ("p5", 5)] {
            b.publish("q", p, &message(name)).await.unwrap();
        }
        let mut order = Vec::new();
        for _ in 0..3 {
            let d = fetch_n(b.as_ref(), "q", 1, 1).await.pop().unwrap();
            order.push(task_of(&d.raw));
            b.ack(&[d.tag.unwrap()]).await.unwrap();
        }
        assert_eq!(order, ["p9", "p5", "p0"]);
        let args = vhost.list_queues(&["name", "arguments"]);
        assert!(args.iter().any(|r| r[0] == "q" && r[1].contains("x-max-priority")), "{args:?}");
    });
}

#[test]
fn quorum_queues_are_declared_where_configured_and_classic_elsewhere() {
    let Some(vhost) = Vhost::create() else { return };
    block_on(async {
        let url = format!("{}?quorum=media_heavy", vhost.url());
        let b = broker::connect_transport(&url).await.unwrap();
        b.publish("media_heavy", 0, &message("q1")).await.unwrap();
        b.publish("celery", 0, &message("c1")).await.unwrap();
        let got = fetch_n(b.as_ref(), "media_heavy", 1, 4).await;
        assert_eq!(task_of(&got[0].raw), "q1");
        let types: HashSet<(String, String)> =
            vhost.list_queues(&["name", "type"]).into_iter().map(|r| (r[0].clone(), r[1].clone())).collect();
        assert!(types.contains(&("media_heavy".into(), "quorum".into())), "{types:?}");
        assert!(types.contains(&("celery".into(), "classic".into())), "{types:?}");
    });
}

/// A queue Celery declared first (here with `x-max-priority`) is used as it is: taskhost,
/// configured without priorities, neither fails on it with 406 nor re-declares it.
#[test]
fn a_queue_declared_otherwise_by_someone_else_is_used_as_it_is() {
    let Some(vhost) = Vhost::create() else { return };
    block_on(async {
        let theirs = broker::connect_transport(&format!("{}?max_priority=5", vhost.url())).await.unwrap();
        theirs.publish("celery", 0, &message("first")).await.unwrap();
        let ours = broker::connect_transport(&vhost.url()).await.unwrap();
        ours.publish("celery", 0, &message("second")).await.unwrap();
        let got = fetch_n(ours.as_ref(), "celery", 2, 4).await;
        assert_eq!(got.iter().map(|d| task_of(&d.raw)).collect::<Vec<_>>(), ["first", "second"]);
    });
}

/// Ten transports sharing one queue: RabbitMQ hands each delivery to one of them.
#[test]
fn consumers_sharing_a_queue_never_get_one_delivery_twice() {
    let Some(vhost) = Vhost::create() else { return };
    block_on(async {
        const N: usize = 600;
        let publisher = broker::connect_transport(&vhost.url()).await.unwrap();
        let raws: Vec<Vec<u8>> = (0..N).map(|i| message(&format!("m{i}"))).collect();
        publisher.publish_many("shared", 0, &raws).await.unwrap();
        let mut consumers = Vec::new();
        for _ in 0..3 {
            consumers.push(broker::connect_transport(&vhost.url()).await.unwrap());
        }
        let takes = consumers.iter().map(|c| async move {
            let mut took = Vec::new();
            loop {
                let got = c.fetch(&["shared".into()], 7, Duration::from_millis(500)).await.unwrap();
                if got.is_empty() {
                    return took;
                }
                c.ack(&got.iter().filter_map(|d| d.tag.clone()).collect::<Vec<_>>()).await.unwrap();
                took.extend(got.iter().map(|d| task_of(&d.raw)));
            }
        });
        let all: Vec<Vec<String>> = futures::future::join_all(takes).await;
        let total: usize = all.iter().map(Vec::len).sum();
        let distinct: HashSet<&String> = all.iter().flatten().collect();
        assert_eq!((total, distinct.len()), (N, N), "(taken, distinct)");
        assert!(all.iter().filter(|t| !t.is_empty()).count() >= 2, "the work was shared");
    });
}

/// Without a state store (no --state, no Redis or PostgreSQL result backend) the worker
/// refuses to start on RabbitMQ, saying what it needs.
#[test]
fn serving_on_rabbitmq_without_a_state_store_says_what_is_missing() {
    let Some(vhost) = Vhost::create() else { return };
    let out = run_bounded(
        std::process::Command::new(taskhost_bin())
            .args(["serve", "--broker", &vhost.url(), "--result-backend", "sqlite:///tmp/never.db", "--plugins"])
            .arg(plugins_dir())
            .env("TASKHOST_CACHE_DIR", cache_dir())
            .env_remove("TASKHOST_STATE")
            .env_remove("TASKHOST_RESULT_BACKEND"),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("needs a state store") && err.contains("--state"), "{err}");
    assert!(!err.contains("guest:guest"), "the password is not printed: {err}");
}

fn interop_amqp(vhost: &Vhost, results: &str, args: &[&str]) -> String {
    interop_with(&[("BROKER", &vhost.url()), ("RESULT_BACKEND", results)], args)
}

/// The interop: unmodified Celery clients publish to RabbitMQ (declaring the
/// queue as kombu does), the worker runs the tasks, and the clients read the results
/// from Redis, which also holds the worker's state.
#[test]
fn python_celery_clients_on_rabbitmq_get_results_failures_and_canvas() {
    let Some(vhost) = Vhost::create() else { return };
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&vhost.url(), &["-c", "4", "--result-backend", &redis.url()]);
    assert_eq!(interop_amqp(&vhost, &redis.url(), &["add"]), "5");
    assert_eq!(interop_amqp(&vhost, &redis.url(), &["kwargs"]), "8");
    assert_eq!(interop_amqp(&vhost, &redis.url(), &["fail"]), "TaskFailed: the disk is full");
    assert_eq!(interop_amqp(&vhost, &redis.url(), &["canvas"]), "chain 40, 42; group; chord 90; link 12");
    let out = interop_amqp(&vhost, &redis.url(), &["many", "300"]);
    assert!(out.starts_with("300 tasks in"), "{out}");
    assert_eq!(vhost.counts("celery"), (0, 0), "(ready, unacked) once drained");
}

/// Remote control over the `celery.pidbox` fanout exchange and reply queues: `inspect`
/// from a Python client reaches the worker, and a revoke broadcast is obeyed.
#[test]
fn celery_inspect_and_revoke_reach_the_worker_over_rabbitmq() {
    let Some(vhost) = Vhost::create() else { return };
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&vhost.url(), &["-c", "4", "--result-backend", &redis.url()]);
    assert!(interop_amqp(&vhost, &redis.url(), &["inspect"]).starts_with("taskhost@"));
    assert_eq!(interop_amqp(&vhost, &redis.url(), &["revoke_queued"]), "TaskRevokedError: revoked");
}

/// Celery on RabbitMQ holds an ETA message unacked in the worker until it is due (and a
/// long one hits `consumer_timeout`). Here a 3-hour countdown is parked in the state store
/// and acked at once: nothing is held. Its parked copy's ETA and due time are then set to
/// now, standing in for the 3 hours, and it runs once.
#[test]
fn a_three_hour_eta_holds_no_unacked_message_and_runs_once() {
    let Some(vhost) = Vhost::create() else { return };
    let redis = RedisServer::start();
    let worker = WorkerProcess::start_with_env(
        &vhost.url(),
        &plugins_dir(),
        &["-c", "4", "--result-backend", &redis.url()],
        &[("RUST_LOG", crate::chaos::RUN_LOG)],
    );
    let id = interop_amqp(&vhost, &redis.url(), &["later", "tasks.add", "[40, 2]", &(3 * 3600).to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let parked: usize = redis.query(redis::cmd("ZCARD").arg("taskhost.parked"));
        if parked == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never parked:\n{}", worker.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vhost.counts("celery"), (0, 0), "(ready, unacked) while the ETA waits");
    // Three hours on: the parked copy's ETA and due time become now.
    let members: Vec<String> = redis.query(redis::cmd("ZRANGE").arg("taskhost.parked").arg(0).arg(-1));
    let (prefix, envelope) = members[0].rsplit_once('\u{1f}').unwrap();
    let mut envelope: serde_json::Value = serde_json::from_str(envelope).unwrap();
    envelope["headers"]["eta"] = serde_json::json!(chrono::Utc::now().to_rfc3339());
    let due_now = format!("{prefix}\u{1f}{envelope}");
    let _: () = redis.query(redis::cmd("ZREM").arg("taskhost.parked").arg(&members[0]));
    let _: () = redis.query(redis::cmd("ZADD").arg("taskhost.parked").arg(0).arg(&due_now));
    assert_eq!(interop_amqp(&vhost, &redis.url(), &["wait", &id, "20"]), "42");
    std::thread::sleep(Duration::from_millis(500));
    let runs = crate::chaos::runs_per_task(&worker.log_text()).get(&id).copied().unwrap_or(0);
    assert_eq!(runs, 1, "ran once");
    assert_eq!(vhost.counts("celery"), (0, 0));
}

/// The worker's connections cut twice mid-drain (`rabbitmqctl close_all_connections`, as a
/// RabbitMQ restart does to clients): it reconnects, re-declares and resumes; every task
/// ends with a result (acks-late: what it held was requeued), and the duplicates that
/// requeue causes are counted and bounded by what it held.
#[test]
fn cutting_the_workers_connections_mid_drain_loses_nothing() {
    const TASKS: usize = 2000;
    let Some(vhost) = Vhost::create() else { return };
    let redis = RedisServer::start();
    let worker = WorkerProcess::start_with_env(
        &vhost.url(),
        &plugins_dir(),
        &["-c", "8", "--result-backend", &redis.url()],
        &[("RUST_LOG", crate::chaos::RUN_LOG)],
    );
    let sent = send(&vhost.url(), &["tasks.sleep", "--args", "[5]", "--count", &TASKS.to_string()]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    let stored = || redis.query::<Vec<String>>(redis::cmd("KEYS").arg("celery-task-meta-*")).len();
    for _ in 0..2 {
        let before = stored();
        let deadline = Instant::now() + Duration::from_secs(30);
        while stored() < before + 200 {
            assert!(Instant::now() < deadline, "the drain stalled at {}:\n{}", stored(), worker.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        vhost.close_connections();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while stored() < TASKS {
        assert!(Instant::now() < deadline, "{} of {TASKS} results after the cuts:\n{}", stored(), worker.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vhost.counts("celery"), (0, 0), "(ready, unacked) once drained");
    let log = worker.log_text();
    assert!(log.contains("RabbitMQ connection lost; reconnecting"), "no reconnect was logged:\n{log}");
    let (twice, _) = crate::chaos::duplicates(&crate::chaos::runs_per_task(&log));
    eprintln!("connections cut twice under {TASKS} tasks: {twice} ran twice");
    // Each cut requeues at most what the worker held: its prefetch (8 × 4) and as many settling.
    assert!(twice <= 2 * 2 * 32, "{twice} tasks ran more than once");
}

/// Celery's `rpc://` result backend: the worker sends each result to the reply queue of
/// the client that sent the task (`reply_to`, `correlation_id` = task id), and
/// `AsyncResult.get()` in that client reads results and re-raises failures. The worker's
/// own state is in Redis (`--state`), since rpc:// keeps nothing.
#[test]
fn python_clients_with_the_rpc_backend_get_results_from_their_reply_queue() {
    let Some(vhost) = Vhost::create() else { return };
    let redis = RedisServer::start();
    let _worker = WorkerProcess::start(&vhost.url(), &["-c", "4", "--result-backend", "rpc://", "--state", &redis.url()]);
    assert_eq!(interop_amqp(&vhost, "rpc://", &["add"]), "5");
    assert_eq!(interop_amqp(&vhost, "rpc://", &["kwargs"]), "8");
    assert_eq!(interop_amqp(&vhost, "rpc://", &["fail"]), "TaskFailed: the disk is full");
    let out = interop_amqp(&vhost, "rpc://", &["many", "200"]);
    assert!(out.starts_with("200 tasks in"), "{out}");
}
