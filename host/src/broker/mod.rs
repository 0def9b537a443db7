//! `trait Broker`: the few verbs every transport offers — fetch, ack, restore, publish,
//! schedule, dead-letter — and the URL that picks a transport (and, optionally, a state store).

pub mod amqp;
mod redis;
mod redis_conn;
pub mod releases;
pub mod sqlite;
pub mod state;

pub use self::redis::RedisBroker;
pub use self::redis_conn::{
    is_sentinel_url, manager as redis_manager, Endpoint as RedisEndpoint, RedisConn, RESPONSE_TIMEOUT as REDIS_RESPONSE_TIMEOUT,
    SENTINEL_MASTER_ENV, TLS_CA_ENV,
};
pub use self::sqlite::SqliteBroker;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One message taken from a queue and held (unacked) until acked or restored.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The key acks use (kombu's `delivery_tag`); `None` if the message had none,
    /// in which case it is not recorded as unacked and must be dead-lettered.
    pub tag: Option<String>,
    pub queue: String,
    /// The envelope exactly as it was on the queue.
    pub raw: Vec<u8>,
    /// What fair dispatch charged the message's tenant for it (its estimated CPU seconds),
    /// where it was handed out fairly; the worker puts the charge right once it has run.
    pub charge: Option<f64>,
}

/// A message that will never run, kept with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Names this letter for `dlq show/replay`.
    #[serde(default)]
    pub letter_id: String,
    pub id: Option<String>,
    pub task: Option<String>,
    pub queue: String,
    pub reason: String,
    pub time: DateTime<Utc>,
    /// The original envelope (lossy UTF-8 if it was not text).
    pub message: String,
}

/// Fair dispatch across tenants: each tenant's weight, and the queues bound to a tenant
/// (a message there is that tenant's whatever its header says).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fairness {
    pub weights: Vec<(String, f64)>,
    pub bound: std::collections::HashMap<String, String>,
    /// Tenants' `max_concurrency`: no more of their messages are handed out than they
    /// have free slots ([`tenant_slot_lease`]), so a capped tenant's backlog stays queued
    /// on the broker instead of waiting in a worker's prefetch.
    pub caps: Vec<(String, u32)>,
}

/// The lease that is a tenant's concurrency slot `i` (the Redis fair-fetch script counts
/// them by this name).
pub fn tenant_slot_lease(tenant: &str, i: u32) -> String {
    format!("tenant.{tenant}.slot.{i}")
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker connection: {0}")]
    Connection(String),
    #[error("broker command failed: {0}")]
    Command(String),
    #[error("unsupported broker URL {0:?} (expected sqlite://PATH, redis://, rediss://, sentinel://, amqp://, amqps://)")]
    UnsupportedUrl(String),
}

#[async_trait]
pub trait Broker: Send + Sync {
    /// Takes up to `max` messages, priority band first (0 before 9), then in `queues`
    /// order, recording each as unacked. Waits up to `wait` if all queues are empty.
    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError>;

    /// As [`Broker::fetch`]; where dispatch is fair, it also stops handing out (after at
    /// least one message) once the charges reach `budget` CPU-seconds, so a worker holds
    /// no more work than it will start soon and a tenant arriving later is not queued
    /// behind it.
    async fn fetch_within(&self, queues: &[String], max: usize, budget: f64, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let _ = budget;
        self.fetch(queues, max, wait).await
    }

    /// Forgets held messages: they are done.
    async fn ack(&self, tags: &[String]) -> Result<(), BrokerError>;

    /// Returns a held message to the front of its queue (served next), marked redelivered.
    async fn restore(&self, delivery: &Delivery) -> Result<(), BrokerError>;

    /// Refreshes held messages so no visibility sweep restores them while they run.
    async fn touch(&self, tags: &[String]) -> Result<(), BrokerError>;

    /// Returns to their queues the messages held longer than `visibility` (crashed
    /// consumers). Returns how many; a no-op while another consumer holds the sweep lock.
    async fn restore_expired(&self, visibility: Duration) -> Result<usize, BrokerError>;

    /// Appends a message to the back of `queue` in `priority`'s band.
    async fn publish(&self, queue: &str, priority: u8, raw: &[u8]) -> Result<(), BrokerError>;

    /// Appends many messages at once, in order (one round trip or transaction).
    async fn publish_many(&self, queue: &str, priority: u8, raws: &[Vec<u8>]) -> Result<(), BrokerError> {
        for raw in raws {
            self.publish(queue, priority, raw).await?;
        }
        Ok(())
    }

    /// Parks a message until `due`; [`Broker::move_due`] puts it back on its queue.
    async fn schedule(&self, queue: &str, priority: u8, raw: &[u8], due: DateTime<Utc>) -> Result<(), BrokerError>;

    /// Moves parked messages whose time has come to the front of their queues.
    async fn move_due(&self) -> Result<usize, BrokerError>;

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError>;

    /// Dead letters, oldest first.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError>;

    /// Deletes one dead letter; false if it was not there.
    async fn remove_dead_letter(&self, letter_id: &str) -> Result<bool, BrokerError>;

    /// The newest `limit` dead letters, newest last, and how many there are in all.
    async fn newest_dead_letters(&self, limit: usize) -> Result<(Vec<DeadLetter>, usize), BrokerError> {
        let mut all = self.dead_letters().await?;
        let total = all.len();
        all.drain(..total.saturating_sub(limit));
        Ok((all, total))
    }

    /// Broadcasts a control request to every worker (kombu's pidbox fanout).
    async fn broadcast(&self, raw: &[u8]) -> Result<(), BrokerError>;

    /// Control requests broadcast from now on, until the receiver is dropped.
    async fn control_stream(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError>;

    /// Pushes a reply to a control request onto the caller's reply queue.
    async fn reply(&self, exchange: &str, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError>;

    /// Publishes a message on Celery's `celeryev` exchange under `routing_key`.
    async fn publish_event(&self, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError>;

    /// Every event message published from now on.
    async fn event_stream(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError>;

    /// Makes replies to control requests carrying this `reply_to` routing key collectable.
    async fn declare_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError>;

    /// Takes the replies waiting for `routing_key`, waiting up to `wait` for a first one.
    async fn take_replies(&self, routing_key: &str, wait: Duration) -> Result<Vec<Vec<u8>>, BrokerError>;

    /// Drops a reply queue and what is left in it.
    async fn remove_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError>;

    /// Messages ready on each queue (not those taken, nor those parked until an ETA).
    async fn queue_lengths(&self, queues: &[String]) -> Result<Vec<u64>, BrokerError>;

    /// Remembers revoked task ids until `until`, across worker restarts.
    async fn remember_revoked(&self, ids: &[String], until: DateTime<Utc>) -> Result<(), BrokerError>;

    /// Task ids revoked and not yet past their lifetime.
    async fn revoked(&self) -> Result<Vec<String>, BrokerError>;

    /// Reserves the next start of a rate limit shared by every worker (one start per
    /// `interval`); returns how long the caller must wait before starting.
    async fn reserve_rate_slot(&self, key: &str, interval: Duration) -> Result<Duration, BrokerError>;

    /// Takes or renews the lease `name` for `holder` for `ttl`; false while someone else holds it.
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError>;

    /// Gives the lease up if `holder` has it, so a successor need not wait for it to lapse.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError>;

    /// Records that the periodic `entry` ran for its tick `due`; false (record unchanged)
    /// if that tick or a later one was already recorded — so each tick fires once.
    async fn claim_tick(&self, entry: &str, due: DateTime<Utc>) -> Result<bool, BrokerError>;

    /// The last tick recorded for `entry`.
    async fn last_tick(&self, entry: &str) -> Result<Option<DateTime<Utc>>, BrokerError>;

    /// [`claim_tick`](Broker::claim_tick) and publishing the tick's message as one step:
    /// either both happen or neither, so a send that fails never leaves a tick recorded
    /// (and lost). Whether this caller claimed the tick (and its message went out).
    async fn claim_tick_and_publish(
        &self,
        entry: &str,
        due: DateTime<Utc>,
        queue: &str,
        priority: u8,
        raw: &[u8],
    ) -> Result<bool, BrokerError>;

    /// Records each (task id, tenant) for `ttl` unless another tenant owns that id already;
    /// returns, per claim, that other owner. A task id names one tenant's result.
    async fn claim_task_ids(&self, claims: &[(String, String)], ttl: Duration) -> Result<Vec<Option<String>>, BrokerError>;

    /// Turns fair dispatch across tenants on (by weight, in CPU time) or off for this
    /// consumer's fetches from `queues` (off: what was sorted out of them goes back).
    /// Transports without it say so; their fetches stay in arrival order.
    async fn set_fairness(&self, fairness: Option<&Fairness>, queues: &[String]) -> Result<(), BrokerError> {
        let _ = (fairness, queues);
        Err(BrokerError::Command("fair scheduling across tenants needs the Redis broker".into()))
    }

    /// Each tenant's recent CPU seconds per task, which fair dispatch charges them when it
    /// hands a task out, and per tenant what its tasks really used beyond those charges
    /// (over its weight), added to its virtual time.
    async fn report_costs(&self, costs: &[(String, f64)], corrections: &[(String, f64)]) -> Result<(), BrokerError> {
        let _ = (costs, corrections);
        Ok(())
    }

    /// Adds metered usage to the per-hour sums every worker shares (high-water: the maximum).
    async fn add_usage(&self, rows: &[crate::tenant::meter::UsageRow]) -> Result<(), BrokerError>;

    /// The per-hour sums from `since_hour` (unix seconds / 3600) on.
    async fn usage(&self, since_hour: i64) -> Result<Vec<crate::tenant::meter::UsageRow>, BrokerError>;

    /// Every message held for `queues`: waiting (every band, fair-sorted ones too), unacked,
    /// and parked until its ETA — what `taskhost gc` reads version requirements from.
    async fn queued(&self, queues: &[String]) -> Result<Vec<Vec<u8>>, BrokerError>;
}

/// Puts a dead letter's original message back on its queue, then drops the letter.
pub async fn replay(broker: &dyn Broker, letter: &DeadLetter) -> Result<(), BrokerError> {
    let priority = crate::protocol::Envelope::parse(letter.message.as_bytes()).map_or(0, |e| e.priority());
    broker.publish(&letter.queue, priority, letter.message.as_bytes()).await?;
    broker.remove_dead_letter(&letter.letter_id).await?;
    Ok(())
}

/// Whether a URL names a Redis server (`redis://`, `rediss://`, `redis+unix://`), or the
/// master of a Sentinel-watched group (`sentinel://`).
pub fn is_redis_url(url: &str) -> bool {
    url.starts_with("redis://")
        || url.starts_with("rediss://")
        || url.starts_with("redis+unix://")
        || is_sentinel_url(url)
}

/// Whether a URL names the embedded broker's file (`sqlite://`).
pub fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite://")
}

/// Opens the transport a URL names; with `TASKHOST_STATE` set (`--state`), beside the store
/// it names, which then holds the coordination state instead of the transport. RabbitMQ
/// has no place for that state: beside it the store is `--state`, or else the result
/// backend (`TASKHOST_RESULT_BACKEND`, which `serve` and the CLI set from their flags).
///
/// A RabbitMQ transport without either is returned alone: publishing works (`send`), and
/// whatever needs state says so; `serve` refuses to start that way ([`state_store_for`]).
pub async fn connect(url: &str) -> Result<Box<dyn Broker>, BrokerError> {
    let transport = connect_transport(url).await?;
    match state_store_for(url) {
        Ok(Some(state_url)) => Ok(Box::new(state::SplitBroker { transport, store: state::connect_store(&state_url).await? })),
        _ => Ok(transport),
    }
}

/// The state store a broker URL is paired with: `--state`, or beside RabbitMQ the result
/// backend; `None` where the transport keeps its own. An error for RabbitMQ with neither.
pub fn state_store_for(url: &str) -> Result<Option<String>, BrokerError> {
    if let Some(state_url) = std::env::var(state::STATE_ENV).ok().filter(|s| !s.is_empty()) {
        return Ok(Some(state_url));
    }
    if !amqp::is_amqp_url(url) {
        return Ok(None);
    }
    match std::env::var(state::RESULT_BACKEND_ENV).ok().filter(|s| state::is_state_url(s)) {
        Some(backend) => Ok(Some(backend)),
        None => Err(BrokerError::UnsupportedUrl(format!(
            "{} needs a state store for ETA parking, dead letters, leases and revokes: --state redis://… or \
             postgresql://…, or a Redis or PostgreSQL result backend",
            redact_url(url)
        ))),
    }
}

/// Hides a password in a URL for display.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Opens the transport a URL names, holding its own coordination state.
pub async fn connect_transport(url: &str) -> Result<Box<dyn Broker>, BrokerError> {
    if is_redis_url(url) {
        Ok(Box::new(RedisBroker::connect(url).await?))
    } else if is_sqlite_url(url) {
        Ok(Box::new(SqliteBroker::open(url)?))
    } else if amqp::is_amqp_url(url) {
        Ok(Box::new(amqp::AmqpBroker::connect(url).await?))
    } else {
        Err(BrokerError::UnsupportedUrl(url.to_string()))
    }
}
