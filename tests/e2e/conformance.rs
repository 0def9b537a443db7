//! One broker and result-backend conformance suite, run against every transport (the
//! embedded SQLite file, a private redis-server, RabbitMQ in a vhost of its own), through
//! `trait Broker` and `trait ResultBackend` only.

use crate::support::*;
use std::collections::HashSet;
use std::time::Duration;
use taskhost::backend;
use taskhost::broker::{self, Broker, DeadLetter};
use taskhost::protocol::{decode, encode_task, OutgoingTask, ResultRecord, State};

/// A broker URL for one test, with whatever keeps it alive.
enum Transport {
    Sqlite(tempfile::TempDir),
    Redis(RedisServer),
}

impl Transport {
    fn url(&self) -> String {
        match self {
            Transport::Sqlite(dir) => format!("sqlite://{}", dir.path().join("broker.db").display()),
            Transport::Redis(server) => server.url(),
        }
    }
}

fn sqlite() -> Transport {
    Transport::Sqlite(tempfile::tempdir().unwrap())
}

fn redis() -> Transport {
    Transport::Redis(RedisServer::start())
}

fn message(name: &str, priority: u8) -> Vec<u8> {
    encode_task(&OutgoingTask {
        task: name.into(),
        id: uuid::Uuid::new_v4().to_string(),
        queue: "q".into(),
        priority,
        ..Default::default()
    })
}

fn task_of(raw: &[u8]) -> String {
    decode(raw).unwrap().headers.task
}

/// `split:<transport URL>|<state URL>` is a transport beside a state store (`--state`).
async fn connect(url: &str) -> Box<dyn Broker> {
    match url.strip_prefix("split:").and_then(|rest| rest.split_once('|')) {
        Some((transport, state)) => Box::new(broker::state::SplitBroker {
            transport: broker::connect_transport(transport).await.unwrap(),
            store: broker::state::connect_store(state).await.unwrap(),
        }),
        None => broker::connect_transport(url).await.unwrap(),
    }
}

const WAIT: Duration = Duration::from_millis(50);

/// How long [`gather`] waits for more: RabbitMQ's deliveries pause between bursts, for
/// seconds while the machine is busy with the other tests (seen: 4 s).
const GATHER_WAIT: Duration = Duration::from_secs(30);

/// Fetches until `want` deliveries are in hand, or none came for [`GATHER_WAIT`]. A Redis
/// or SQLite fetch takes everything waiting at once; RabbitMQ pushes deliveries (as many
/// unacked as the first fetch asked for), and a fetch hands out those that have arrived.
/// With `ack`, each batch is acked as it comes, so RabbitMQ's prefetch window moves on.
async fn gather_acking(
    b: &dyn Broker,
    queue: &str,
    want: usize,
    ack: bool,
) -> Vec<broker::Delivery> {
    let mut got = Vec::new();
    let mut last = std::time::Instant::now();
    while got.len() < want && last.elapsed() < GATHER_WAIT {
        let more = b
            .fetch(
                &[queue.to_string()],
                want - got.len(),
                Duration::from_millis(500),
            )
            .await
            .unwrap();
        if more.is_empty() {
            continue;
        }
        if ack {
            b.ack(
                &more
                    .iter()
                    .filter_map(|d| d.tag.clone())
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        }
        last = std::time::Instant::now();
        got.extend(more);
    }
    got
}

async fn gather(b: &dyn Broker, queue: &str, want: usize) -> Vec<broker::Delivery> {
    gather_acking(b, queue, want, false).await
}

/// Whether a message moved when due goes to the front of its queue (Redis, SQLite). On
/// RabbitMQ it is published, behind what is waiting.
fn due_messages_jump_the_queue(url: &str) -> bool {
    !url.contains("amqp://")
}

async fn fifo_order(url: String) {
    let b = connect(&url).await;
    for i in 0..5 {
        b.publish("q", 0, &message(&format!("t{i}"), 0)).await.unwrap();
    }
    let got = gather(b.as_ref(), "q", 5).await;
    let names: Vec<String> = got.iter().map(|d| task_of(&d.raw)).collect();
    assert_eq!(names, ["t0", "t1", "t2", "t3", "t4"]);
    assert!(got.iter().all(|d| d.queue == "q" && d.tag.is_some()));
    assert!(b.fetch(&["q".into()], 10, WAIT).await.unwrap().is_empty(), "taken messages are not handed out again");
}

async fn priorities(url: String) {
    let b = connect(&url).await;
    for (name, p) in [("p9", 9), ("p0", 0), ("p5", 5), ("p3", 3), ("p7", 7), ("p1", 1)] {
        b.publish("q", p, &message(name, p)).await.unwrap();
    }
    let mut order = Vec::new();
    while let Some(d) = b.fetch(&["q".into()], 1, WAIT).await.unwrap().pop() {
        order.push(task_of(&d.raw));
    }
    assert_eq!(order, ["p0", "p1", "p5", "p3", "p7", "p9"], "band 0 first, FIFO within a band");
}

async fn queues_in_order_within_a_band(url: String) {
    let b = connect(&url).await;
    b.publish("b", 0, &message("b0", 0)).await.unwrap();
    b.publish("a", 9, &message("a9", 9)).await.unwrap();
    b.publish("a", 0, &message("a0", 0)).await.unwrap();
    let got = b.fetch(&["a".into(), "b".into()], 10, WAIT).await.unwrap();
    let names: Vec<(String, String)> = got.iter().map(|d| (d.queue.clone(), task_of(&d.raw))).collect();
    assert_eq!(
        names,
        [("a".into(), "a0".into()), ("b".into(), "b0".into()), ("a".into(), "a9".into())],
        "grouped by band, then by queue"
    );
}

async fn ack_forgets(url: String) {
    let b = connect(&url).await;
    b.publish("q", 0, &message("t", 0)).await.unwrap();
    let d = b.fetch(&["q".into()], 1, WAIT).await.unwrap().pop().unwrap();
    b.ack(&[d.tag.clone().unwrap()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.restore_expired(Duration::ZERO).await.unwrap(), 0);
    assert!(b.fetch(&["q".into()], 1, WAIT).await.unwrap().is_empty());
}

async fn redelivery_after_visibility_timeout(url: String) {
    let b = connect(&url).await;
    b.publish("q", 0, &message("first", 0)).await.unwrap();
    b.publish("q", 0, &message("second", 0)).await.unwrap();
    let d = b.fetch(&["q".into()], 1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(b.restore_expired(Duration::from_secs(1)).await.unwrap(), 0, "not yet past the timeout");
    // Redis records when a message was held in whole seconds, rounded up: 1 s may take 2.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(b.restore_expired(Duration::from_secs(1)).await.unwrap(), 1);
    let again = b.fetch(&["q".into()], 1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(task_of(&again.raw), "first", "restored messages are served next");
    let headers = decode(&again.raw).unwrap();
    assert!(headers.headers.redelivered, "marked redelivered");
    assert_eq!(headers.headers.id, decode(&d.raw).unwrap().headers.id);
}

/// Held 3 s with a 2 s visibility timeout, refreshed at 1.5 s: not restored. Unrefreshed
/// it would be, its hold time (whole seconds on Redis, rounded up) at most 1 s late.
async fn touch_keeps_running_messages(url: String) {
    let b = connect(&url).await;
    b.publish("q", 0, &message("long", 0)).await.unwrap();
    let d = b.fetch(&["q".into()], 1, WAIT).await.unwrap().pop().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.touch(&[d.tag.clone().unwrap()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b.restore_expired(Duration::from_secs(2)).await.unwrap(), 0);
}

async fn restore_puts_back_in_front(url: String) {
    let b = connect(&url).await;
    b.publish("q", 0, &message("a", 0)).await.unwrap();
    b.publish("q", 0, &message("b", 0)).await.unwrap();
    let a = b.fetch(&["q".into()], 1, WAIT).await.unwrap().pop().unwrap();
    b.restore(&a).await.unwrap();
    let next = b.fetch(&["q".into()], 1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(task_of(&next.raw), "a");
}

async fn scheduled_messages_wait_for_their_time(url: String) {
    let b = connect(&url).await;
    let due = chrono::Utc::now() + chrono::TimeDelta::milliseconds(300);
    b.schedule("q", 0, &message("later", 0), due).await.unwrap();
    b.publish("q", 0, &message("queued", 0)).await.unwrap();
    b.move_due().await.unwrap();
    let queued = b.fetch(&["q".into()], 1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(task_of(&queued.raw), "queued", "never early");
    b.restore(&queued).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(b.move_due().await.unwrap(), 1);
    let mut order = Vec::new();
    for _ in 0..2 {
        // One at a time, acked: RabbitMQ holds back more than the first fetch's one unacked.
        let d = gather_acking(b.as_ref(), "q", 1, true).await.pop().expect("both messages come");
        order.push(task_of(&d.raw));
    }
    if due_messages_jump_the_queue(&url) {
        assert_eq!(order, ["later", "queued"], "a due message is served next");
    } else {
        assert_eq!(order, ["queued", "later"], "a due message joins its queue, once");
    }
    assert_eq!(b.move_due().await.unwrap(), 0, "moved once");
}

async fn fetch_waits_for_a_message(url: String) {
    let b = connect(&url).await;
    let publisher = connect(&url).await;
    let late = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        publisher.publish("q", 0, &message("late", 0)).await.unwrap();
    };
    let queues = ["q".to_string()];
    let (got, ()) = tokio::join!(b.fetch(&queues, 4, Duration::from_secs(2)), late);
    let got = got.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(task_of(&got[0].raw), "late");
}

async fn dead_letters_round_trip(url: String) {
    let b = connect(&url).await;
    let letter = DeadLetter {
        letter_id: "letter-1".into(),
        id: Some("x".into()),
        task: Some("tasks.nope".into()),
        queue: "q".into(),
        reason: "no component serves task tasks.nope".into(),
        time: chrono::Utc::now(),
        message: "{}".into(),
    };
    b.dead_letter(&letter).await.unwrap();
    assert_eq!(b.dead_letters().await.unwrap(), vec![letter]);
    assert!(!b.remove_dead_letter("letter-2").await.unwrap());
    assert!(b.remove_dead_letter("letter-1").await.unwrap());
    assert!(b.dead_letters().await.unwrap().is_empty());
}

async fn results_round_trip(url: String) {
    let r = backend::connect(&url, None).await.unwrap();
    assert_eq!(r.get("missing").await.unwrap(), None);
    let started = ResultRecord::started("t1", 1, "w@h");
    assert!(r.store(&started, None).await.unwrap());
    assert_eq!(r.get("t1").await.unwrap().unwrap().status, State::Started);
    let success = ResultRecord::success("t1", serde_json::json!({"a": [1, 2]}));
    assert!(r.store(&success, None).await.unwrap());
    let got = r.get("t1").await.unwrap().unwrap();
    // MySQL's DATETIME keeps whole seconds (as with Celery's own rows): compare the rest.
    assert!(got.date_done.is_some());
    assert_eq!(ResultRecord { date_done: None, ..got }, ResultRecord { date_done: None, ..success });
    let failure = ResultRecord::failure("t1", &taskhost::protocol::ExceptionInfo::new("builtins", "ValueError", "late"), None);
    assert!(!r.store(&failure, None).await.unwrap(), "a SUCCESS is never overwritten");
    assert_eq!(r.get("t1").await.unwrap().unwrap().status, State::Success);
    let progress = ResultRecord::custom("t2", serde_json::json!({"done": 3}));
    r.store(&progress, Some("PROGRESS")).await.unwrap();
    assert_eq!(r.get("t2").await.unwrap().unwrap().status, State::Custom);

    // wait() returns once a ready state is stored by someone else.
    let writer = backend::connect(&url, None).await.unwrap();
    let late = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        writer.store(&ResultRecord::success("t2", serde_json::json!(7)), None).await.unwrap();
    };
    let (waited, ()) = tokio::join!(r.wait("t2", Some(Duration::from_secs(5))), late);
    assert_eq!(waited.unwrap().result, 7);
    let timeout = r.wait("never", Some(Duration::from_millis(100))).await.unwrap_err();
    assert_eq!(timeout.to_string(), "no ready result for task never within 0.1s");
}

async fn results_stored_together_keep_their_order_and_never_overwrite_success(url: String) {
    let r = backend::connect(&url, None).await.unwrap();
    let exc = taskhost::protocol::ExceptionInfo::new("builtins", "ValueError", "late");
    let batch = vec![
        (ResultRecord::started("b1", 1, "w@h"), None),
        (ResultRecord::success("b1", serde_json::json!(1)), None),
        (ResultRecord::failure("b1", &exc, None), None),
        (ResultRecord::custom("b2", serde_json::json!({"done": 1})), Some("PROGRESS".to_string())),
        (ResultRecord::success("b3", serde_json::json!("three")), None),
    ];
    let written = r.store_many(&batch).await.unwrap();
    assert_eq!(written, vec![true, true, false, true, true], "the FAILURE after a SUCCESS in the same batch is refused");
    assert_eq!(r.get("b1").await.unwrap().unwrap().result, 1);
    assert_eq!(r.get("b2").await.unwrap().unwrap().status, State::Custom);
    assert_eq!(r.get("b3").await.unwrap().unwrap().result, "three");
    assert!(r.store_many(&[]).await.unwrap().is_empty());
}

async fn results_expire(url: String) {
    let r = backend::connect(&url, Some(Duration::from_secs(1))).await.unwrap();
    r.store(&ResultRecord::success("short", serde_json::json!(1)), None).await.unwrap();
    assert!(r.get("short").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(r.get("short").await.unwrap(), None);
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite_transport {
            $(#[test] fn $case() { let t = super::sqlite(); crate::support::block_on(super::$case(t.url())); })*
        }
        mod redis_transport {
            $(#[test] fn $case() { let t = super::redis(); crate::support::block_on(super::$case(t.url())); })*
        }
    };
}

async fn parked_messages_go_out_once_when_due(url: String) {
    let b = connect(&url).await;
    let due = chrono::Utc::now() + chrono::TimeDelta::milliseconds(300);
    b.schedule("q", 0, &message("later", 0), due).await.unwrap();
    b.schedule("q", 0, &message("later too", 0), due).await.unwrap();
    assert_eq!(b.move_due().await.unwrap(), 0, "never early");
    assert!(b.fetch(&["q".into()], 1, WAIT).await.unwrap().is_empty());
    assert_eq!(b.queued(&["q".into()]).await.unwrap().len(), 2, "parked messages count as queued");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let other = connect(&url).await;
    let (a, c) = tokio::join!(b.move_due(), other.move_due());
    assert_eq!(a.unwrap() + c.unwrap(), 2, "each moved by one mover");
    let mut got: Vec<String> = b.fetch(&["q".into()], 4, WAIT).await.unwrap().iter().map(|d| task_of(&d.raw)).collect();
    got.sort();
    assert_eq!(got, vec!["later", "later too"]);
}

async fn leases_are_exclusive_until_released_or_lapsed(url: String) {
    let b = connect(&url).await;
    let ttl = Duration::from_millis(400);
    assert!(b.lease("beat", "a", ttl).await.unwrap());
    assert!(!b.lease("beat", "b", ttl).await.unwrap(), "held by a");
    assert!(b.lease("beat", "a", ttl).await.unwrap(), "a renews");
    b.release_lease("beat", "b").await.unwrap();
    assert!(!b.lease("beat", "b", ttl).await.unwrap(), "only the holder releases");
    b.release_lease("beat", "a").await.unwrap();
    assert!(b.lease("beat", "b", ttl).await.unwrap(), "released: b takes it");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b.lease("beat", "a", ttl).await.unwrap(), "lapsed: a takes it back");
}

async fn beat_ticks_are_claimed_once_and_never_backwards(url: String) {
    let b = connect(&url).await;
    let t0 = chrono::DateTime::from_timestamp_millis(1_800_000_000_000).unwrap();
    let t1 = t0 + chrono::TimeDelta::seconds(30);
    assert_eq!(b.last_tick("e").await.unwrap(), None);
    assert!(b.claim_tick("e", t0).await.unwrap());
    assert!(!b.claim_tick("e", t0).await.unwrap(), "the same tick twice");
    assert!(b.claim_tick_and_publish("e", t1, "q", 0, &message("tick", 0)).await.unwrap());
    assert!(!b.claim_tick_and_publish("e", t1, "q", 0, &message("tick", 0)).await.unwrap());
    assert!(!b.claim_tick("e", t0).await.unwrap(), "an older tick after a newer one");
    assert_eq!(b.last_tick("e").await.unwrap(), Some(t1));
    let got = b.fetch(&["q".into()], 4, WAIT).await.unwrap();
    assert_eq!(got.len(), 1, "the claimed tick's message went out once");
}

async fn revoked_ids_are_remembered_until_their_time(url: String) {
    let b = connect(&url).await;
    let soon = chrono::Utc::now() + chrono::TimeDelta::milliseconds(300);
    let later = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    b.remember_revoked(&["r1".into(), "r2".into()], soon).await.unwrap();
    b.remember_revoked(&["r2".into()], later).await.unwrap();
    let mut ids = b.revoked().await.unwrap();
    ids.sort();
    assert_eq!(ids, vec!["r1", "r2"]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.revoked().await.unwrap(), vec!["r2"]);
}

async fn cluster_rate_slots_space_starts(url: String) {
    let b = connect(&url).await;
    let every = Duration::from_millis(200);
    let first = b.reserve_rate_slot("tasks.add", every).await.unwrap();
    let second = b.reserve_rate_slot("tasks.add", every).await.unwrap();
    let third = b.reserve_rate_slot("tasks.add", every).await.unwrap();
    assert!(first < Duration::from_millis(50), "{first:?}");
    assert!(second > Duration::from_millis(120) && second <= every, "{second:?}");
    assert!(third > Duration::from_millis(320) && third <= 2 * every, "{third:?}");
    assert!(b.reserve_rate_slot("other", every).await.unwrap() < Duration::from_millis(50), "keys apart");
}

async fn task_ids_belong_to_one_tenant(url: String) {
    let b = connect(&url).await;
    let ttl = Duration::from_secs(60);
    let claims = vec![("id-1".to_string(), "acme".to_string()), ("id-2".to_string(), "acme".to_string())];
    assert_eq!(b.claim_task_ids(&claims, ttl).await.unwrap(), vec![None, None]);
    let rival = vec![("id-1".to_string(), "globex".to_string()), ("id-3".to_string(), "globex".to_string())];
    assert_eq!(b.claim_task_ids(&rival, ttl).await.unwrap(), vec![Some("acme".to_string()), None]);
    assert_eq!(b.claim_task_ids(&claims[..1], ttl).await.unwrap(), vec![None], "the owner again");
}

async fn usage_sums_and_keeps_the_high_water(url: String) {
    use taskhost::tenant::meter::{Usage, UsageRow};
    let b = connect(&url).await;
    let hour = chrono::Utc::now().timestamp() / 3600;
    let row = |runs, memory| UsageRow {
        hour,
        tenant: "acme".into(),
        task: "tasks.add".into(),
        counts: Usage { runs, memory_high_water: memory, ..Default::default() },
    };
    b.add_usage(&[row(2, 100)]).await.unwrap();
    b.add_usage(&[row(3, 50)]).await.unwrap();
    let got = b.usage(hour - 1).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].counts.runs, got[0].counts.memory_high_water), (5, 100));
    assert!(b.usage(hour + 1).await.unwrap().is_empty());
}

/// The coordination-state cases on every broker, and on Redis beside a state store of its
/// own (`--state`): another Redis database (the store RabbitMQ gets from a Redis result
/// backend), and PostgreSQL (skipped, saying why, where PostgreSQL is absent).
macro_rules! state_conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite_state {
            $(#[test] fn $case() { let t = super::sqlite(); crate::support::block_on(super::$case(t.url())); })*
        }
        mod redis_state {
            $(#[test] fn $case() { let t = super::redis(); crate::support::block_on(super::$case(t.url())); })*
        }
        mod redis_with_redis_state {
            $(#[test] fn $case() {
                let t = super::redis();
                let store = format!("{}1", t.url().trim_end_matches(char::is_numeric));
                crate::support::block_on(super::$case(format!("split:{}|{store}", t.url())));
            })*
        }
        mod redis_with_postgresql_state {
            $(#[test] fn $case() {
                let Some(db) = crate::sql_backends::TestDb::create(crate::sql_backends::Server::Postgres) else { return };
                let t = super::redis();
                crate::support::block_on(super::$case(format!("split:{}|{}", t.url(), db.url())));
            })*
        }
    };
}

state_conformance!(
    parked_messages_go_out_once_when_due,
    leases_are_exclusive_until_released_or_lapsed,
    beat_ticks_are_claimed_once_and_never_backwards,
    revoked_ids_are_remembered_until_their_time,
    cluster_rate_slots_space_starts,
    task_ids_belong_to_one_tenant,
    usage_sums_and_keeps_the_high_water,
    dead_letters_round_trip,
);

/// The result-backend cases on the SQL backends (each in a database of its own; skipped,
/// saying why, where the server is absent). Their rows stay until `backend_cleanup`, as
/// Celery's do, so `results_expire` is theirs in `sql_backends`.
macro_rules! sql_results_conformance {
    ($($case:ident),* $(,)?) => {
        mod postgresql_results {
            $(#[test] fn $case() {
                let Some(db) = crate::sql_backends::TestDb::create(crate::sql_backends::Server::Postgres) else { return };
                crate::support::block_on(super::$case(db.url()));
            })*
        }
        mod mariadb_results {
            $(#[test] fn $case() {
                let Some(db) = crate::sql_backends::TestDb::create(crate::sql_backends::Server::MariaDb) else { return };
                crate::support::block_on(super::$case(db.url()));
            })*
        }
    };
}

sql_results_conformance!(results_round_trip, results_stored_together_keep_their_order_and_never_overwrite_success);

/// The transport cases on RabbitMQ, each in a vhost of its own, with a private Redis as the
/// state store (`--state`) for the cases that park or dead-letter. Left out as not
/// RabbitMQ's contract: kombu's Redis priority bands (RabbitMQ serves the highest
/// `x-max-priority` first, `amqp::with_max_priority…`), the visibility timeout (RabbitMQ
/// requeues on a lost connection, `amqp::a_cut_connection…`), a restored message served
/// next (RabbitMQ requeues it in front, but may have pushed the next one to the client
/// already, its global prefetch being enforced late; `amqp::a_restored_message…`), and the
/// results cases (the result backend is another server, or `rpc://`).
macro_rules! amqp_conformance {
    ($($case:ident),* $(,)?) => {
        mod amqp_transport {
            $(#[test] fn $case() {
                let Some(vhost) = crate::amqp::Vhost::create() else { return };
                let state = crate::support::RedisServer::start();
                crate::support::block_on(super::$case(format!("split:{}|{}", vhost.url(), state.url())));
            })*
        }
    };
}

amqp_conformance!(
    fifo_order,
    ack_forgets,
    touch_keeps_running_messages,
    scheduled_messages_wait_for_their_time,
    fetch_waits_for_a_message,
    dead_letters_round_trip,
    two_consumer_processes_never_take_one_delivery_twice,
    a_large_fetch_takes_and_holds_every_message,
);

conformance!(
    fifo_order,
    priorities,
    results_stored_together_keep_their_order_and_never_overwrite_success,
    queues_in_order_within_a_band,
    ack_forgets,
    redelivery_after_visibility_timeout,
    touch_keeps_running_messages,
    restore_puts_back_in_front,
    scheduled_messages_wait_for_their_time,
    fetch_waits_for_a_message,
    dead_letters_round_trip,
    results_round_trip,
    results_expire,
    two_consumer_processes_never_take_one_delivery_twice,
    a_large_fetch_takes_and_holds_every_message,
    a_sweep_puts_back_every_expired_message_once,
);

/// A sweep over more held messages than it reads at a time (the Redis one reads 200 a
/// round trip): each one not acked goes back once, marked redelivered; acked ones never.
async fn a_sweep_puts_back_every_expired_message_once(url: String) {
    const HELD: usize = 1000;
    let b = connect(&url).await;
    let raws: Vec<Vec<u8>> = (0..HELD).map(|i| message(&format!("m{i}"), 0)).collect();
    b.publish_many("q", 0, &raws).await.unwrap();
    let got = gather(b.as_ref(), "q", HELD).await;
    assert_eq!(got.len(), HELD);
    let (acked, held): (Vec<_>, Vec<_>) = got.iter().enumerate().partition(|(i, _)| i % 4 == 0);
    let acked_tags: Vec<String> = acked.iter().map(|(_, d)| d.tag.clone().unwrap()).collect();
    b.ack(&acked_tags).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(b.restore_expired(Duration::from_secs(1)).await.unwrap(), held.len());
    assert_eq!(b.restore_expired(Duration::from_secs(1)).await.unwrap(), 0, "each goes back once");
    let back = gather(b.as_ref(), "q", HELD).await;
    let names: HashSet<String> = back.iter().map(|d| task_of(&d.raw)).collect();
    let want: HashSet<String> = held.iter().map(|(_, d)| task_of(&d.raw)).collect();
    assert_eq!((back.len(), &names), (held.len(), &want), "(put back, which)");
    assert!(back.iter().all(|d| decode(&d.raw).unwrap().headers.redelivered), "marked redelivered");
}

/// What else a Redis sweep meets in kombu's tables: a message held through a named
/// exchange goes back to the queue that exchange binds, an index entry whose message is
/// gone is dropped, and an entry that is not `[envelope, exchange, routing_key]` is left.
#[test]
fn a_redis_sweep_routes_named_exchanges_drops_dangling_tags_and_leaves_malformed_entries() {
    let server = RedisServer::start();
    let long_ago = taskhost::protocol::unix_now() - 3600.0;
    let via_exchange = message("routed", 0);
    server.query::<()>(redis::cmd("SADD").arg("_kombu.binding.jobs").arg("jobs\x06\x16\x06\x16routed_q"));
    server.query::<()>(redis::cmd("HSET").arg("unacked").arg("t-routed").arg(format!(
        r#"[{}, "jobs", "jobs"]"#,
        String::from_utf8(via_exchange).unwrap()
    )));
    server.query::<()>(redis::cmd("HSET").arg("unacked").arg("t-bad").arg("not an entry"));
    for tag in ["t-routed", "t-bad", "t-gone"] {
        server.query::<()>(redis::cmd("ZADD").arg("unacked_index").arg(long_ago).arg(tag));
    }
    block_on(async {
        let b = connect(&server.url()).await;
        assert_eq!(b.restore_expired(Duration::from_secs(1)).await.unwrap(), 1);
        let got = b.fetch(&["routed_q".into()], 2, WAIT).await.unwrap();
        assert_eq!(got.iter().map(|d| task_of(&d.raw)).collect::<Vec<_>>(), ["routed"]);
    });
    let index: Vec<String> = server.query(redis::cmd("ZRANGE").arg("unacked_index").arg(0).arg(-1));
    assert!(!index.contains(&"t-gone".to_string()), "a dangling tag is dropped: {index:?}");
    assert!(index.contains(&"t-bad".to_string()), "a malformed entry stays: {index:?}");
    let bad: Option<String> = server.query(redis::cmd("HGET").arg("unacked").arg("t-bad"));
    assert_eq!(bad.as_deref(), Some("not an entry"));
}

/// A Redis hold is recorded in `unacked_index` in whole seconds, rounded up: kept as an
/// integer in a small index (no `strtod` per entry at every insert), and never early.
/// Through each path that writes a score: the fetch script (plain and fair share its
/// argument), the record after a blocking wait, and a refresh.
#[test]
fn a_redis_hold_is_recorded_in_whole_seconds_never_early() {
    let server = RedisServer::start();
    let before = taskhost::protocol::unix_now();
    let tags = block_on(async {
        let b = connect(&server.url()).await;
        b.publish_many("q", 0, &(0..3).map(|i| message(&format!("m{i}"), 0)).collect::<Vec<_>>()).await.unwrap();
        let mut got = gather(b.as_ref(), "q", 3).await;
        b.touch(&[got[2].tag.clone().unwrap()]).await.unwrap();
        let publisher = connect(&server.url()).await;
        let late = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            publisher.publish("empty", 0, &message("late", 0)).await.unwrap();
        };
        let empty = ["empty".to_string()];
        let (woken, ()) = tokio::join!(b.fetch(&empty, 1, Duration::from_secs(2)), late);
        got.extend(woken.unwrap());
        got.into_iter().map(|d| d.tag.unwrap()).collect::<Vec<_>>()
    });
    assert_eq!(tags.len(), 4, "three fetched, one woken for");
    let after = taskhost::protocol::unix_now();
    let scores: Vec<(String, String)> = server.query(redis::cmd("ZRANGE").arg("unacked_index").arg(0).arg(-1).arg("WITHSCORES"));
    assert_eq!(scores.len(), tags.len());
    for (tag, score) in &scores {
        let whole: i64 = score.parse().unwrap_or_else(|_| panic!("{tag}: score {score:?} is not a whole number"));
        assert!(whole as f64 >= before && (whole as f64) < after + 1.0, "{tag}: held at {whole}, between {before} and {after}");
    }
    let encoding: String = server.query(redis::cmd("OBJECT").arg("ENCODING").arg("unacked_index"));
    assert!(["listpack", "ziplist"].contains(&encoding.as_str()), "a small index, where whole scores matter: {encoding}");
}

/// A prefetch of thousands (`-c 2000` × multiplier 4): every message taken is handed out
/// and held, none lost (the Redis fetch script once failed past ~4000 after popping them).
async fn a_large_fetch_takes_and_holds_every_message(url: String) {
    let b = connect(&url).await;
    let raws: Vec<Vec<u8>> = (0..9000).map(|i| message(&format!("m{i}"), 0)).collect();
    b.publish_many("q", 0, &raws).await.unwrap();
    let got = gather(b.as_ref(), "q", 8000).await;
    assert_eq!(got.len(), 8000);
    let names: HashSet<String> = got.iter().map(|d| task_of(&d.raw)).collect();
    assert_eq!(names.len(), 8000, "no message handed out twice");
    // Held, not lost: a restore puts every one back, and all 9000 then go out once each.
    for d in &got {
        b.restore(d).await.unwrap();
    }
    let back = gather_acking(b.as_ref(), "q", 9000, true).await;
    let distinct: HashSet<String> = back.iter().map(|d| task_of(&d.raw)).collect();
    assert_eq!(
        (back.len(), distinct.len()),
        (9000, 9000),
        "(taken, distinct)"
    );
}

/// Messages published for the two-process test.
const SHARED: usize = 2000;

async fn two_consumer_processes_never_take_one_delivery_twice(url: String) {
    let b = connect(&url).await;
    for i in 0..SHARED {
        b.publish("shared", (i % 10) as u8, &message(&format!("m{i}"), 0)).await.unwrap();
    }
    let spawn = || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "conformance::consumer_probe", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("CONFORMANCE_BROKER", &url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, c) = (spawn(), spawn());
    let mut seen = HashSet::new();
    let mut total = 0;
    for child in [a, c] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        // The harness prints "test … " on the first line without a newline.
        let taken: Vec<&str> = text.lines().filter_map(|l| l.split_once("took ").map(|(_, t)| t)).collect();
        assert!(!taken.is_empty(), "each consumer should take some: {text}");
        total += taken.len();
        seen.extend(taken.into_iter().map(str::to_string));
    }
    assert_eq!(total, SHARED, "every delivery taken exactly once in all");
    assert_eq!(seen.len(), SHARED, "no delivery taken twice");
}

#[test]
#[ignore = "a consumer process for two_consumer_processes_never_take_one_delivery_twice"]
fn consumer_probe() {
    let url = std::env::var("CONFORMANCE_BROKER").expect("CONFORMANCE_BROKER");
    block_on(async {
        let b = connect(&url).await;
        loop {
            let got = b.fetch(&["shared".into()], 7, Duration::from_millis(300)).await.unwrap();
            if got.is_empty() {
                break;
            }
            for d in &got {
                println!("took {}", decode(&d.raw).unwrap().headers.task);
            }
            b.ack(&got.iter().filter_map(|d| d.tag.clone()).collect::<Vec<_>>()).await.unwrap();
        }
    });
}

/// Redis publishes each record it writes on the key's channel, in the batch's order. A
/// record refused over a SUCCESS publishes that SUCCESS again (a redelivery may follow a
/// run that stored it and died before publishing), never the refused one. The batch mixes
/// keys it creates with keys that exist (the two take different paths in `write`).
#[test]
fn redis_results_are_published_in_order_and_a_refused_one_never() {
    let server = RedisServer::start();
    block_on(async {
        let r = backend::connect(&server.url(), None).await.unwrap();
        let exc = taskhost::protocol::ExceptionInfo::new("builtins", "ValueError", "late");
        r.store(&ResultRecord::started("old", 1, "w@h"), None).await.unwrap();
        r.store(&ResultRecord::success("done", serde_json::json!(0)), None).await.unwrap();

        let mut pubsub = server.client().get_async_pubsub().await.unwrap();
        for id in ["new", "old", "done"] {
            pubsub.subscribe(format!("celery-task-meta-{id}")).await.unwrap();
        }
        let batch = vec![
            (ResultRecord::started("new", 1, "w@h"), None),
            (ResultRecord::success("old", serde_json::json!(1)), None),
            (ResultRecord::failure("done", &exc, None), None),
            (ResultRecord::success("new", serde_json::json!(2)), None),
            (ResultRecord::failure("new", &exc, None), None),
        ];
        assert_eq!(r.store_many(&batch).await.unwrap(), vec![true, true, false, true, false]);

        let mut seen: Vec<(String, String)> = Vec::new();
        let mut messages = pubsub.on_message();
        while seen.len() < 5 {
            let msg = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut messages))
                .await
                .unwrap_or_else(|_| panic!("five notices, got {seen:?}"))
                .unwrap();
            let payload: String = msg.get_payload().unwrap();
            let record: serde_json::Value = serde_json::from_str(&payload).unwrap();
            let id = msg.get_channel_name().trim_start_matches("celery-task-meta-").to_string();
            seen.push((id, format!("{} {}", record["status"].as_str().unwrap(), record["result"])));
        }
        let extra = tokio::time::timeout(Duration::from_millis(300), futures::StreamExt::next(&mut messages)).await;
        assert!(extra.is_err(), "five notices only, then {:?}", extra.map(|m| m.map(|m| m.get_channel_name().to_string())));
        let of = |id: &str| seen.iter().filter(|(k, _)| k == id).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
        assert_eq!(of("new"), [r#"STARTED {"hostname":"w@h","pid":1}"#, "SUCCESS 2", "SUCCESS 2"], "{seen:?}");
        assert_eq!(of("old"), ["SUCCESS 1"], "{seen:?}");
        assert_eq!(of("done"), ["SUCCESS 0"], "the stored SUCCESS again, not the FAILURE: {seen:?}");
        assert_eq!(r.get("done").await.unwrap().unwrap().status, State::Success);
        assert_eq!(r.get("new").await.unwrap().unwrap().result, 2);
    });
}

/// Up to `n` result notices from `messages`, each within `within` of the last, as
/// "<task id> <status>".
async fn notices(messages: &mut (impl futures::Stream<Item = redis::Msg> + Unpin), n: usize, within: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let Ok(Some(msg)) = tokio::time::timeout(within, futures::StreamExt::next(messages)).await else { break };
        let record: serde_json::Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
        seen.push(format!("{} {}", msg.get_channel_name().trim_start_matches("celery-task-meta-"), record["status"].as_str().unwrap()));
    }
    seen
}

/// Calls of one command so far, from `INFO commandstats` (a blocking connection: callable
/// inside `block_on`).
fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut server.client().get_connection().unwrap()).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// Records that replace their task's STARTED (`--track-started`) skip `SET NX` and go to
/// STORE in the first round trip, behind the notices owed (their STARTED's among them): a
/// key's notices stay in order, a key gone meanwhile is written all the same, a SUCCESS is
/// never overwritten, a batch that also creates the key takes the long way, and a STORE
/// flushed from Redis's script cache is loaded again.
#[test]
fn redis_records_replacing_a_started_skip_set_nx_and_keep_their_order() {
    let server = RedisServer::start();
    block_on(async {
        // With an expiry: STORE then writes with SETEX, and `SET` counts only SET NX EX.
        let r = backend::connect(&server.url(), Some(Duration::from_secs(3600))).await.unwrap();
        let mut pubsub = server.client().get_async_pubsub().await.unwrap();
        for id in ["a", "b", "gone", "c"] {
            pubsub.subscribe(format!("celery-task-meta-{id}")).await.unwrap();
        }
        let mut messages = pubsub.on_message();
        let wait = Duration::from_secs(5);
        let replacing = |mut record: ResultRecord| {
            record.replaces_started = true;
            (record, None)
        };
        let exc = taskhost::protocol::ExceptionInfo::new("builtins", "ValueError", "no");

        // Not in Redis's script cache (a restarted Redis): loaded, and the key, never
        // created, is written all the same.
        redis::cmd("SCRIPT").arg("FLUSH").query::<()>(&mut server.client().get_connection().unwrap()).unwrap();
        let (written, _) = r.store_many_notifying_later(&mut Default::default(), &[replacing(ResultRecord::success("gone", serde_json::json!(3)))]).await.unwrap();
        assert_eq!(written, [true]);
        assert_eq!(notices(&mut messages, 1, wait).await, ["gone SUCCESS"]);
        assert_eq!(r.get("gone").await.unwrap().unwrap().result, 3);

        // In the pipeline that carries the STARTEDs' notices, after them.
        let started = [(ResultRecord::started("a", 1, "w@h"), None), (ResultRecord::started("b", 1, "w@h"), None)];
        let (_, mut owed) = r.store_many_notifying_later(&mut Default::default(), &started).await.unwrap();
        assert_eq!(owed.len(), 2);
        let (sets, scripts) = (command_calls(&server, "set"), command_calls(&server, "evalsha"));
        let batch = [replacing(ResultRecord::success("a", serde_json::json!(1))), replacing(ResultRecord::failure("b", &exc, None))];
        let (written, later) = r.store_many_notifying_later(&mut owed, &batch).await.unwrap();
        assert_eq!((written, later.len(), owed.len()), (vec![true, true], 0, 0));
        assert_eq!(command_calls(&server, "set"), sets, "no SET NX tried");
        assert_eq!(command_calls(&server, "evalsha"), scripts + 1, "STORE once, loaded");
        let seen = notices(&mut messages, 4, wait).await;
        let of = |id: &str| seen.iter().filter(|n| n.split(' ').next() == Some(id)).cloned().collect::<Vec<_>>();
        assert_eq!(of("a"), ["a STARTED", "a SUCCESS"], "{seen:?}");
        assert_eq!(of("b"), ["b STARTED", "b FAILURE"], "{seen:?}");

        let (written, _) = r.store_many_notifying_later(&mut Default::default(), &[replacing(ResultRecord::failure("a", &exc, None))]).await.unwrap();
        assert_eq!(written, [false], "never over a SUCCESS");
        assert_eq!(r.get("a").await.unwrap().unwrap().status, State::Success);
        assert_eq!(notices(&mut messages, 1, wait).await, ["a SUCCESS"], "the stored SUCCESS again");

        // The same batch creates the key: its STARTED's notice still comes first.
        let both = [(ResultRecord::started("c", 1, "w@h"), None), replacing(ResultRecord::success("c", serde_json::json!(4)))];
        let (written, later) = r.store_many_notifying_later(&mut Default::default(), &both).await.unwrap();
        assert_eq!((written, later.len()), (vec![true, true], 0));
        assert_eq!(notices(&mut messages, 2, wait).await, ["c STARTED", "c SUCCESS"]);
    });
}

/// Notices Redis refuses stay owed: behind a script run past `busy-reply-threshold`
/// every command is answered BUSY, and a notice counted as sent then would release acks
/// for a notice nobody got. Once the script is killed they go out.
#[test]
fn redis_notices_refused_by_a_busy_server_stay_owed() {
    let server = RedisServer::start();
    let mut admin = server.client().get_connection().unwrap();
    redis::cmd("CONFIG").arg("SET").arg("busy-reply-threshold").arg("50").query::<()>(&mut admin).unwrap();
    block_on(async {
        let r = backend::connect(&server.url(), None).await.unwrap();
        let mut pubsub = server.client().get_async_pubsub().await.unwrap();
        pubsub.subscribe("celery-task-meta-x").await.unwrap();
        let (_, mut owed) = r.store_many_notifying_later(&mut Default::default(), &[(ResultRecord::started("x", 1, "w@h"), None)]).await.unwrap();
        assert_eq!(owed.len(), 1);

        let mut spinning = server.client().get_connection().unwrap();
        let script = std::thread::spawn(move || redis::cmd("EVAL").arg("while true do end").arg(0).query::<()>(&mut spinning));
        std::thread::sleep(Duration::from_millis(300));
        let refused = r.store_many_notifying_later(&mut owed, &[]).await;
        assert!(matches!(&refused, Err(e) if e.to_string().contains("BUSY")), "{refused:?}");
        assert_eq!(owed.len(), 1, "still owed");

        redis::cmd("SCRIPT").arg("KILL").query::<()>(&mut admin).unwrap();
        assert!(script.join().unwrap().is_err(), "the script was killed");
        let (_, later) = r.store_many_notifying_later(&mut owed, &[]).await.unwrap();
        assert!(owed.is_empty() && later.is_empty());
        let msg = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut pubsub.on_message())).await.unwrap().unwrap();
        assert!(msg.get_payload::<String>().unwrap().contains("STARTED"));
    });
}

/// A stored SUCCESS is found however its record is laid out: taskhost's own (status first,
/// no spaces, read from the head alone), Celery's (status first after `": "`), and any other
/// order (decoded whole); a STARTED in either layout is replaced.
#[test]
fn redis_never_overwrites_a_success_in_any_layout() {
    let server = RedisServer::start();
    let raw = [
        ("ours", r#"{"status":"SUCCESS","result":1,"traceback":null,"children":[],"date_done":null,"task_id":"ours"}"#),
        ("celery", r#"{"status": "SUCCESS", "result": 2, "traceback": null, "children": [], "date_done": null, "task_id": "celery"}"#),
        ("reordered", r#"{"result": {"status": "STARTED"}, "task_id": "reordered", "status": "SUCCESS"}"#),
        ("celery_started", r#"{"status": "STARTED", "result": {"pid": 1}, "task_id": "celery_started"}"#),
        ("progress", r#"{"status":"PROGRESS","result":{"done":1},"task_id":"progress"}"#),
        ("nested", r#"{"result": {"status": "SUCCESS"}, "task_id": "nested", "status": "STARTED"}"#),
    ];
    for (id, record) in raw {
        server.query::<()>(redis::cmd("SET").arg(format!("celery-task-meta-{id}")).arg(record));
    }
    block_on(async {
        let r = backend::connect(&server.url(), None).await.unwrap();
        let exc = taskhost::protocol::ExceptionInfo::new("builtins", "ValueError", "late");
        let batch: Vec<_> = raw.iter().map(|(id, _)| (ResultRecord::failure(id, &exc, None), None)).collect();
        assert_eq!(r.store_many(&batch).await.unwrap(), vec![false, false, false, true, true, true]);
        for (id, status) in [("ours", State::Success), ("celery", State::Success), ("reordered", State::Success),
                             ("celery_started", State::Failure), ("progress", State::Failure), ("nested", State::Failure)] {
            assert_eq!(r.get(id).await.unwrap().unwrap().status, status, "{id}");
        }
    });
}

/// Notices the next call sends: a batch that created every key it wrote hands its notices
/// back unsent, and the next call sends them ahead of its own writes, so a key's notices
/// keep the order of its records. A batch that meets an existing key sends its own at
/// once (STORE publishes there, and must follow the creation's notice).
#[test]
fn redis_notices_handed_back_lead_the_next_write_in_order() {
    let server = RedisServer::start();
    block_on(async {
        let r = backend::connect(&server.url(), None).await.unwrap();
        let mut pubsub = server.client().get_async_pubsub().await.unwrap();
        for id in ["a", "b", "c"] {
            pubsub.subscribe(format!("celery-task-meta-{id}")).await.unwrap();
        }
        let mut messages = pubsub.on_message();
        let quiet = Duration::from_millis(300);

        let first = vec![(ResultRecord::started("a", 1, "w@h"), None), (ResultRecord::started("b", 1, "w@h"), None)];
        let (written, mut owed) = r.store_many_notifying_later(&mut Default::default(), &first).await.unwrap();
        assert_eq!((written, owed.len()), (vec![true, true], 2));
        assert_eq!(r.get("a").await.unwrap().unwrap().status, State::Started, "written at once");
        assert_eq!(notices(&mut messages, 1, quiet).await, Vec::<String>::new(), "the notices wait for the next call");

        let second = vec![(ResultRecord::success("a", serde_json::json!(1)), None), (ResultRecord::started("c", 1, "w@h"), None)];
        let (written, owed_after) = r.store_many_notifying_later(&mut owed, &second).await.unwrap();
        assert!(owed.is_empty(), "the notices carried are marked sent");
        assert_eq!((written, owed_after.len()), (vec![true, true], 0), "an existing key: this batch's go at once");
        let seen = notices(&mut messages, 4, Duration::from_secs(5)).await;
        assert_eq!(notices(&mut messages, 1, quiet).await, Vec::<String>::new(), "four notices only, after {seen:?}");
        let of = |id: &str| seen.iter().filter(|n| n.starts_with(id)).cloned().collect::<Vec<_>>();
        assert_eq!(of("a"), ["a STARTED", "a SUCCESS"], "{seen:?}");
        assert_eq!((of("b"), of("c")), (vec!["b STARTED".to_string()], vec!["c STARTED".to_string()]), "{seen:?}");

        // Notices owed and nothing new to write: they go alone.
        let (_, owed) =
            r.store_many_notifying_later(&mut Default::default(), &[(ResultRecord::success("c", serde_json::json!(3)), None)]).await.unwrap();
        assert_eq!(owed.len(), 0, "c exists: published by STORE");
        assert_eq!(notices(&mut messages, 1, Duration::from_secs(5)).await, ["c SUCCESS"]);
        let mut alone = server.client().get_async_pubsub().await.unwrap();
        alone.subscribe("celery-task-meta-d").await.unwrap();
        let (_, mut owed) =
            r.store_many_notifying_later(&mut Default::default(), &[(ResultRecord::success("d", serde_json::json!(4)), None)]).await.unwrap();
        assert_eq!(owed.len(), 1);
        let (written, later) = r.store_many_notifying_later(&mut owed, &[]).await.unwrap();
        assert!(written.is_empty() && later.is_empty() && owed.is_empty());
        let msg = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut alone.on_message())).await.unwrap().unwrap();
        assert!(msg.get_payload::<String>().unwrap().contains("SUCCESS"));
    });
}
