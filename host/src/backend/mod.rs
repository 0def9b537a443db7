//! Results in Celery's layout: store (never overwriting a SUCCESS), read, and wait the
//! way Celery clients do (subscribe, read once, wait for the ready-state notification).

mod redis;
pub mod rpc;
pub mod sql;
mod sqlite;

pub use self::redis::RedisBackend;
pub use self::sql::SqlBackend;
pub use self::sqlite::SqliteBackend;

use crate::canvas::ChordEntry;
use crate::protocol::ResultRecord;
use async_trait::async_trait;
use std::time::Duration;

/// Celery's `result_expires` default: one day.
pub const DEFAULT_RESULT_EXPIRES: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("result backend connection: {0}")]
    Connection(String),
    #[error("result backend command failed: {0}")]
    Command(String),
    #[error("no ready result for task {task_id} within {}s", timeout.as_secs_f64())]
    Timeout { task_id: String, timeout: Duration },
    #[error("stored result for task {task_id} is not a Celery record: {reason}")]
    Corrupt { task_id: String, reason: String },
    #[error("unsupported result backend URL {0:?} (expected sqlite://PATH, redis://, rediss://, sentinel://, postgresql://, mysql://, rpc://)")]
    UnsupportedUrl(String),
}

impl BackendError {
    /// The same error for each of several callers whose records went in one call.
    pub fn shared(&self) -> BackendError {
        match self {
            BackendError::Connection(m) => BackendError::Connection(m.clone()),
            other => BackendError::Command(other.to_string()),
        }
    }
}

/// Notices (channel and payload) of records already written whose waiters have not been
/// told yet: what [`ResultBackend::store_many_notifying_later`] hands back.
#[derive(Debug, Default)]
pub struct LateNotices(Vec<(String, String)>);

impl LateNotices {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

#[async_trait]
pub trait ResultBackend: Send + Sync {
    /// Writes a record and notifies waiters. Returns false (and writes nothing) when the
    /// task already has a SUCCESS, so a duplicate run never overwrites it.
    /// `custom_state` names the state of a `State::Custom` record.
    async fn store(&self, record: &ResultRecord, custom_state: Option<&str>) -> Result<bool, BackendError>;

    /// Writes several records in order, as [`ResultBackend::store`] would one by one,
    /// in as few round trips or transactions as the backend allows. One flag per record.
    async fn store_many(&self, records: &[(ResultRecord, Option<String>)]) -> Result<Vec<bool>, BackendError>;

    /// As [`ResultBackend::store_many`], except that the notices of the records it creates
    /// may be left unsent and handed back, for the next call to send ahead of its own
    /// writes in the same round trip: `earlier` goes out first, before anything this call
    /// writes, and is emptied once the server has answered for it — on an error after that
    /// too, so that it is never sent again behind a later notice of the same key. Left as
    /// it was, it may or may not have gone out, and is sent again (the same notice twice,
    /// nothing newer in between). Backends without notices to defer write as `store_many`
    /// does and hand back none.
    async fn store_many_notifying_later(
        &self,
        earlier: &mut LateNotices,
        records: &[(ResultRecord, Option<String>)],
    ) -> Result<(Vec<bool>, LateNotices), BackendError> {
        debug_assert!(earlier.is_empty(), "only a backend that defers notices hands them back");
        Ok((self.store_many(records).await?, LateNotices::default()))
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultRecord>, BackendError>;

    /// Waits for a ready state (SUCCESS, FAILURE, REVOKED); `None` waits forever.
    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultRecord, BackendError>;

    /// Whether chords are joined as members finish ([`ResultBackend::chord_join`]). Where
    /// not (the SQL backends, as Celery's), whoever publishes a chord also publishes a
    /// `celery.chord_unlock` task that polls its members and sends the callback.
    fn native_join(&self) -> bool {
        true
    }

    /// Deletes expired results (`celery.backend_cleanup`); how many. Backends whose
    /// records expire by themselves have nothing to do.
    async fn cleanup(&self) -> Result<u64, BackendError> {
        Ok(0)
    }

    /// Declares a chord of `size` members (what Celery's producer does before the last one).
    async fn chord_init(&self, group_id: &str, size: u64) -> Result<(), BackendError>;

    /// Adds one member's outcome to its chord. Exactly one caller — the one whose entry
    /// completes the chord — gets every entry, ordered by group index, and a claim token.
    async fn chord_join(
        &self,
        group_id: &str,
        group_index: u64,
        entry: &ChordEntry,
    ) -> Result<Option<(Vec<ChordEntry>, String)>, BackendError>;

    /// Clears a chord after its callback was published (or failed), if `token` still holds it.
    async fn chord_done(&self, group_id: &str, token: &str) -> Result<(), BackendError>;
}

/// [`ResultBackend::wait`] for backends with nothing to subscribe to: reads the record
/// until it is ready, pausing `first`, then `grow` times longer each time, up to `most`.
pub(crate) async fn poll_until_ready<B: ResultBackend + ?Sized>(
    backend: &B,
    task_id: &str,
    timeout: Option<Duration>,
    first: Duration,
    grow: f64,
    most: Duration,
) -> Result<ResultRecord, BackendError> {
    let started = std::time::Instant::now();
    let mut pause = first;
    loop {
        if let Some(record) = backend.get(task_id).await? {
            if record.status.is_ready() {
                return Ok(record);
            }
        }
        if let Some(t) = timeout {
            if started.elapsed() >= t {
                return Err(BackendError::Timeout { task_id: task_id.into(), timeout: t });
            }
        }
        tokio::time::sleep(pause).await;
        pause = pause.mul_f64(grow).min(most);
    }
}

/// Seconds chord bookkeeping lives (Celery's default result expiry).
pub const CHORD_EXPIRES: u64 = 86_400;

/// Opens the backend a URL names, reading results under `key_prefix` (Redis; the embedded
/// backend keeps every tenant's results in one file and ignores it).
pub async fn connect_prefixed(url: &str, expires: Option<Duration>, key_prefix: &str) -> Result<Box<dyn ResultBackend>, BackendError> {
    if crate::broker::is_redis_url(url) {
        Ok(Box::new(RedisBackend::connect(url, expires).await?.with_key_prefix(key_prefix)))
    } else {
        connect(url, expires).await
    }
}

/// How a worker opens its backend: connections for its concurrency, and Celery's
/// `result_extended` columns where a SQL backend creates its tables.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    pub pool_size: u32,
    pub extended: bool,
}

impl Default for Sizing {
    fn default() -> Self {
        Sizing { pool_size: 4, extended: false }
    }
}

/// Opens the backend a URL names.
pub async fn connect(url: &str, expires: Option<Duration>) -> Result<Box<dyn ResultBackend>, BackendError> {
    connect_sized(url, expires, Sizing::default()).await
}

/// Opens the backend a URL names, sized for a worker.
pub async fn connect_sized(url: &str, expires: Option<Duration>, sizing: Sizing) -> Result<Box<dyn ResultBackend>, BackendError> {
    if sql::is_sql_url(url) {
        Ok(Box::new(SqlBackend::connect(url, expires, sizing.pool_size, sizing.extended).await?))
    } else if crate::broker::is_redis_url(url) {
        Ok(Box::new(RedisBackend::connect(url, expires).await?))
    } else if crate::broker::is_sqlite_url(url) {
        Ok(Box::new(SqliteBackend::open(url, expires)?))
    } else if rpc::is_rpc_url(url) {
        Ok(Box::new(rpc::RpcBackend::connect(url).await?))
    } else {
        Err(BackendError::UnsupportedUrl(url.to_string()))
    }
}
