//! Embedded transport: one SQLite file (WAL) shared by every taskhost process on the
//! machine. Same semantics as Redis: priority bands, unacked with a visibility timeout,
//! parked ETA messages, dead letters. Taking a message is one `BEGIN IMMEDIATE`
//! transaction, so two consumers never take the same row.

use super::{Broker, BrokerError, DeadLetter, Delivery};
use crate::protocol::{band_for_priority, mark_redelivered, PRIORITY_BANDS};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Waiting writers retry this long before a command fails ("database is locked").
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// With nothing queued, polls start this fast and slow down to the cap: SQLite cannot
/// block on a queue, and these bound the idle latency and the idle cost.
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(20);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    band INTEGER NOT NULL,
    body BLOB NOT NULL,
    taken_at REAL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages(queue, band, id) WHERE taken_at IS NULL;
CREATE INDEX IF NOT EXISTS messages_taken ON messages(taken_at) WHERE taken_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS scheduled (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    band INTEGER NOT NULL,
    body BLOB NOT NULL,
    due REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS scheduled_due ON scheduled(due);
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS results_expiry ON results(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    letter_id TEXT,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS control (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS replies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked (
    task_id TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chords (
    group_id TEXT PRIMARY KEY,
    size INTEGER,
    claim TEXT,
    done INTEGER NOT NULL DEFAULT 0,
    claim_until REAL
);
CREATE TABLE IF NOT EXISTS chord_entries (
    group_id TEXT NOT NULL,
    member TEXT NOT NULL,
    idx INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (group_id, member)
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS beat_ticks (
    entry TEXT PRIMARY KEY,
    due_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_slots (
    key TEXT PRIMARY KEY,
    tat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS task_owners (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (hour, tenant, task, metric)
);
";

/// Records a beat tick unless one as late is recorded: ?1 entry, ?2 due ms; one row
/// changed means this caller claimed it.
const CLAIM_TICK: &str = "INSERT INTO beat_ticks (entry, due_ms) VALUES (?1, ?2)
     ON CONFLICT(entry) DO UPDATE SET due_ms = excluded.due_ms WHERE beat_ticks.due_ms < excluded.due_ms";
const INSERT_MESSAGE: &str = "INSERT INTO messages (queue, band, body) VALUES (?1, ?2, ?3)";

/// How often a control stream looks for new broadcasts: the revoke latency on SQLite.
const CONTROL_POLL: Duration = Duration::from_millis(25);
/// Broadcasts and replies older than this are deleted.
const CONTROL_KEEP_SECS: f64 = 3600.0;
/// Events are for live readers: older ones are deleted.
const EVENTS_KEEP_SECS: f64 = 60.0;

/// The file a `sqlite://` URL names: `sqlite://./taskhost.db`, `sqlite:///abs/path.db`.
pub fn path_from_url(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    (!rest.is_empty()).then(|| PathBuf::from(rest))
}

pub(crate) use crate::protocol::unix_now as now_secs;

/// One connection to the database file, used from the blocking pool.
#[derive(Clone)]
pub struct Db(Arc<Mutex<Connection>>);

impl Db {
    /// Opens (creating if need be) the database file. Its directory must exist: a typo
    /// in a URL should not quietly create a directory tree somewhere.
    pub fn open(path: &Path) -> Result<Db, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(format!("directory {} does not exist (create it, or fix the sqlite:// path)", dir.display()));
            }
        }
        let conn = Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| e.to_string())?;
        // Several processes (a supervisor's workers) open a new file at once. Switching
        // to WAL and creating the schema take locks SQLite's busy handler does not wait
        // for in every case, so the set-up is retried on "database is locked".
        let started = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            match set_up(&conn) {
                Ok(()) => break,
                Err(e) if is_busy(&e) && started.elapsed() < BUSY_TIMEOUT => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        Ok(Db(Arc::new(Mutex::new(conn))))
    }

    /// Runs `f` on the blocking pool with the connection.
    pub async fn call<R, F>(&self, f: F) -> Result<R, rusqlite::Error>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .unwrap_or_else(|e| Err(rusqlite::Error::ToSqlConversionFailure(format!("database task failed: {e}").into())))
    }
}

/// WAL: readers never block the writer; NORMAL sync: durable across a process crash
/// (the case that matters here), one fsync per checkpoint, not per commit.
fn set_up(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    // Files made before chord claims expired lack the column.
    let has_claim_until: bool =
        conn.query_row("SELECT COUNT(*) FROM pragma_table_info('chords') WHERE name = 'claim_until'", [], |r| r.get::<_, i64>(0))? > 0;
    if !has_claim_until {
        conn.execute_batch("ALTER TABLE chords ADD COLUMN claim_until REAL")?;
    }
    Ok(())
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

pub(super) fn err(e: rusqlite::Error) -> BrokerError {
    BrokerError::Command(e.to_string())
}

pub struct SqliteBroker {
    db: Db,
}

impl SqliteBroker {
    pub fn open(url: &str) -> Result<Self, BrokerError> {
        let path = path_from_url(url).ok_or_else(|| BrokerError::UnsupportedUrl(url.to_string()))?;
        Ok(SqliteBroker { db: Db::open(&path).map_err(BrokerError::Connection)? })
    }

    async fn take(&self, queues: Vec<String>, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut out = Vec::new();
                {
                    let mut select = tx.prepare_cached(
                        "SELECT id, body FROM messages WHERE queue = ?1 AND band = ?2 AND taken_at IS NULL ORDER BY id LIMIT ?3",
                    )?;
                    let mut mark = tx.prepare_cached("UPDATE messages SET taken_at = ?1 WHERE id = ?2")?;
                    let now = now_secs();
                    'bands: for band in PRIORITY_BANDS {
                        for q in &queues {
                            let room = max - out.len();
                            let rows: Vec<(i64, Vec<u8>)> = select
                                .query_map(params![q, band, room as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                                .collect::<Result<_, _>>()?;
                            for (id, body) in rows {
                                mark.execute(params![now, id])?;
                                out.push(Delivery { tag: Some(id.to_string()), queue: q.clone(), raw: body, charge: None });
                            }
                            if out.len() >= max {
                                break 'bands;
                            }
                        }
                    }
                }
                tx.commit()?;
                Ok(out)
            })
            .await
            .map_err(err)
    }

    /// Follows a table of `(seq, body)` rows (broadcasts, events): every row added from
    /// now on, polled every [`CONTROL_POLL`], until the receiver is dropped.
    async fn follow_table(&self, table: &'static str) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        let mut cursor: i64 = self
            .db
            .call(move |conn| conn.query_row(&format!("SELECT COALESCE(MAX(seq), 0) FROM {table}"), [], |r| r.get(0)))
            .await
            .map_err(err)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let db = self.db.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CONTROL_POLL).await;
                if tx.is_closed() {
                    return;
                }
                let after = cursor;
                let rows: Result<Vec<(i64, Vec<u8>)>, _> = db
                    .call(move |conn| {
                        let mut q = conn.prepare_cached(&format!("SELECT seq, body FROM {table} WHERE seq > ?1 ORDER BY seq"))?;
                        let rows = q.query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))?;
                        rows.collect()
                    })
                    .await;
                match rows {
                    Ok(rows) => {
                        for (seq, body) in rows {
                            cursor = seq;
                            if tx.send(body).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::warn!("reading {table} failed: {e}"),
                }
            }
        });
        Ok(rx)
    }
}

impl SqliteBroker {
    /// Runs `sql` once per message id in one transaction; `?1` is the id and, with
    /// `with_now`, `?2` the current time.
    async fn for_each_id(&self, tags: &[String], sql: &'static str, with_now: bool) -> Result<(), BrokerError> {
        let ids = ids(tags);
        if ids.is_empty() {
            return Ok(());
        }
        self.db
            .call(move |conn| {
                let tx = conn.transaction()?;
                {
                    let now = now_secs();
                    let mut stmt = tx.prepare_cached(sql)?;
                    for id in ids {
                        if with_now {
                            stmt.execute(params![id, now])?;
                        } else {
                            stmt.execute([id])?;
                        }
                    }
                }
                tx.commit()
            })
            .await
            .map_err(err)
    }
}

fn ids(tags: &[String]) -> Vec<i64> {
    tags.iter().filter_map(|t| t.parse().ok()).collect()
}

#[async_trait]
impl Broker for SqliteBroker {
    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        if max == 0 || queues.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let mut pause = POLL_MIN;
        loop {
            let got = self.take(queues.to_vec(), max).await?;
            if !got.is_empty() || started.elapsed() >= wait {
                return Ok(got);
            }
            tokio::time::sleep(pause.min(wait.saturating_sub(started.elapsed()))).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    async fn ack(&self, tags: &[String]) -> Result<(), BrokerError> {
        self.for_each_id(tags, "DELETE FROM messages WHERE id = ?1", false).await
    }

    async fn restore(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let Some(id) = delivery.tag.as_deref().and_then(|t| t.parse::<i64>().ok()) else { return Ok(()) };
        let body = mark_redelivered(&delivery.raw).unwrap_or_else(|| delivery.raw.clone());
        // Its id is older than everything still queued in its band: it is served next.
        self.db
            .call(move |conn| {
                conn.execute("UPDATE messages SET taken_at = NULL, body = ?1 WHERE id = ?2 AND taken_at IS NOT NULL", params![body, id])
            })
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn touch(&self, tags: &[String]) -> Result<(), BrokerError> {
        self.for_each_id(tags, "UPDATE messages SET taken_at = ?2 WHERE id = ?1 AND taken_at IS NOT NULL", true).await
    }

    async fn restore_expired(&self, visibility: Duration) -> Result<usize, BrokerError> {
        let ceiling = now_secs() - visibility.as_secs_f64();
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let expired: Vec<(i64, Vec<u8>)> = {
                    let mut q = tx.prepare("SELECT id, body FROM messages WHERE taken_at IS NOT NULL AND taken_at < ?1")?;
                    let rows = q.query_map([ceiling], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    rows.collect::<Result<_, _>>()?
                };
                for (id, body) in &expired {
                    let body = mark_redelivered(body).unwrap_or_else(|| body.clone());
                    tx.execute("UPDATE messages SET taken_at = NULL, body = ?1 WHERE id = ?2", params![body, id])?;
                }
                tx.commit()?;
                Ok(expired.len())
            })
            .await
            .map_err(err)
    }

    async fn publish(&self, queue: &str, priority: u8, raw: &[u8]) -> Result<(), BrokerError> {
        let (queue, body, band) = (queue.to_string(), raw.to_vec(), band_for_priority(priority));
        self.db
            .call(move |conn| {
                conn.prepare_cached(INSERT_MESSAGE)?
                    .execute(params![queue, band, body])
            })
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn publish_many(&self, queue: &str, priority: u8, raws: &[Vec<u8>]) -> Result<(), BrokerError> {
        let (queue, bodies, band) = (queue.to_string(), raws.to_vec(), band_for_priority(priority));
        self.db
            .call(move |conn| {
                let tx = conn.transaction()?;
                {
                    let mut ins = tx.prepare_cached(INSERT_MESSAGE)?;
                    for body in bodies {
                        ins.execute(params![queue, band, body])?;
                    }
                }
                tx.commit()
            })
            .await
            .map_err(err)
    }

    async fn schedule(&self, queue: &str, priority: u8, raw: &[u8], due: DateTime<Utc>) -> Result<(), BrokerError> {
        let (queue, body, band) = (queue.to_string(), raw.to_vec(), band_for_priority(priority));
        let due = due.timestamp_micros() as f64 / 1e6;
        self.db
            .call(move |conn| {
                conn.execute("INSERT INTO scheduled (queue, band, body, due) VALUES (?1, ?2, ?3, ?4)", params![queue, band, body, due])
            })
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn move_due(&self) -> Result<usize, BrokerError> {
        self.db
            .call(|conn| {
                let now = now_secs();
                // Cheap check first: most calls find nothing and take no write lock.
                let any: Option<i64> =
                    conn.query_row("SELECT id FROM scheduled WHERE due <= ?1 LIMIT 1", [now], |r| r.get(0)).optional()?;
                if any.is_none() {
                    return Ok(0);
                }
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                // Ids below every queued one put them at the front, earliest due first.
                let lowest: i64 = tx.query_row("SELECT COALESCE(MIN(id), 0) FROM messages", [], |r| r.get(0))?;
                let moved = tx.execute(
                    "INSERT INTO messages (id, queue, band, body)
                     SELECT ?2 - ROW_NUMBER() OVER (ORDER BY due DESC, id DESC), queue, band, body
                     FROM scheduled WHERE due <= ?1",
                    params![now, lowest],
                )?;
                tx.execute("DELETE FROM scheduled WHERE due <= ?1", [now])?;
                tx.commit()?;
                Ok(moved)
            })
            .await
            .map_err(err)
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        let json = serde_json::to_string(letter).expect("dead letter serializes");
        let letter_id = letter.letter_id.clone();
        self.db
            .call(move |conn| conn.execute("INSERT INTO dead_letters (letter_id, record) VALUES (?1, ?2)", [letter_id, json]))
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn newest_dead_letters(&self, limit: usize) -> Result<(Vec<DeadLetter>, usize), BrokerError> {
        let (rows, total): (Vec<String>, i64) = self
            .db
            .call(move |conn| {
                let total = conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))?;
                let mut q = conn.prepare("SELECT record FROM (SELECT id, record FROM dead_letters ORDER BY id DESC LIMIT ?1) ORDER BY id")?;
                let rows = q.query_map([limit as i64], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
                Ok((rows, total))
            })
            .await
            .map_err(err)?;
        Ok((rows.iter().filter_map(|r| serde_json::from_str(r).ok()).collect(), total as usize))
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError> {
        let rows: Vec<String> = self
            .db
            .call(|conn| {
                let mut q = conn.prepare("SELECT record FROM dead_letters ORDER BY id")?;
                let rows = q.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .await
            .map_err(err)?;
        Ok(rows.iter().filter_map(|r| serde_json::from_str(r).ok()).collect())
    }

    async fn remove_dead_letter(&self, letter_id: &str) -> Result<bool, BrokerError> {
        let id = letter_id.to_string();
        self.db
            .call(move |conn| conn.execute("DELETE FROM dead_letters WHERE letter_id = ?1", [id]))
            .await
            .map(|n| n > 0)
            .map_err(err)
    }

    async fn broadcast(&self, raw: &[u8]) -> Result<(), BrokerError> {
        let body = raw.to_vec();
        self.db
            .call(move |conn| {
                let now = now_secs();
                conn.execute("DELETE FROM control WHERE created < ?1", [now - CONTROL_KEEP_SECS])?;
                conn.execute("INSERT INTO control (body, created) VALUES (?1, ?2)", params![body, now])
            })
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn control_stream(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        self.follow_table("control").await
    }

    async fn publish_event(&self, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError> {
        let (routing_key, body) = (routing_key.to_string(), raw.to_vec());
        self.db
            .call(move |conn| {
                let now = now_secs();
                conn.execute("DELETE FROM events WHERE created < ?1", [now - EVENTS_KEEP_SECS])?;
                conn.execute("INSERT INTO events (routing_key, body, created) VALUES (?1, ?2, ?3)", params![routing_key, body, now])
            })
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn event_stream(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        self.follow_table("events").await
    }

    async fn declare_reply_queue(&self, _routing_key: &str) -> Result<(), BrokerError> {
        // Replies are rows keyed by routing key: nothing to bind.
        Ok(())
    }

    async fn take_replies(&self, routing_key: &str, wait: Duration) -> Result<Vec<Vec<u8>>, BrokerError> {
        let deadline = Instant::now() + wait;
        loop {
            let key = routing_key.to_string();
            let rows: Vec<Vec<u8>> = self
                .db
                .call(move |conn| {
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let rows = {
                        let mut q = tx.prepare_cached("SELECT body FROM replies WHERE routing_key = ?1 ORDER BY id")?;
                        let rows = q.query_map([&key], |r| r.get(0))?;
                        rows.collect::<Result<Vec<Vec<u8>>, _>>()?
                    };
                    tx.execute("DELETE FROM replies WHERE routing_key = ?1", [&key])?;
                    tx.commit()?;
                    Ok(rows)
                })
                .await
                .map_err(err)?;
            if !rows.is_empty() || Instant::now() >= deadline {
                return Ok(rows);
            }
            tokio::time::sleep(CONTROL_POLL).await;
        }
    }

    async fn remove_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError> {
        let key = routing_key.to_string();
        self.db.call(move |conn| conn.execute("DELETE FROM replies WHERE routing_key = ?1", [key])).await.map(|_| ()).map_err(err)
    }

    async fn queue_lengths(&self, queues: &[String]) -> Result<Vec<u64>, BrokerError> {
        let queues = queues.to_vec();
        self.db
            .call(move |conn| {
                let mut q = conn.prepare_cached("SELECT COUNT(*) FROM messages WHERE queue = ?1 AND taken_at IS NULL")?;
                queues.iter().map(|name| q.query_row([name], |r| r.get::<_, i64>(0)).map(|n| n as u64)).collect()
            })
            .await
            .map_err(err)
    }

    async fn reply(&self, exchange: &str, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError> {
        let (exchange, routing_key, body) = (exchange.to_string(), routing_key.to_string(), raw.to_vec());
        self.db
            .call(move |conn| {
                let now = now_secs();
                conn.execute("DELETE FROM replies WHERE created < ?1", [now - CONTROL_KEEP_SECS])?;
                conn.execute(
                    "INSERT INTO replies (exchange, routing_key, body, created) VALUES (?1, ?2, ?3, ?4)",
                    params![exchange, routing_key, body, now],
                )
            })
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn remember_revoked(&self, ids: &[String], until: DateTime<Utc>) -> Result<(), BrokerError> {
        let ids = ids.to_vec();
        let until = until.timestamp_micros() as f64 / 1e6;
        self.db
            .call(move |conn| {
                let tx = conn.transaction()?;
                for id in ids {
                    tx.execute(
                        "INSERT INTO revoked (task_id, until) VALUES (?1, ?2) ON CONFLICT(task_id) DO UPDATE SET until = MAX(until, excluded.until)",
                        params![id, until],
                    )?;
                }
                tx.commit()
            })
            .await
            .map_err(err)
    }

    async fn revoked(&self) -> Result<Vec<String>, BrokerError> {
        self.db
            .call(|conn| {
                let now = now_secs();
                conn.execute("DELETE FROM revoked WHERE until < ?1", [now])?;
                let mut q = conn.prepare("SELECT task_id FROM revoked")?;
                let rows = q.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .await
            .map_err(err)
    }

    async fn reserve_rate_slot(&self, key: &str, interval: Duration) -> Result<Duration, BrokerError> {
        let key = key.to_string();
        let interval = interval.as_secs_f64();
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = now_secs();
                let tat: f64 = tx
                    .query_row("SELECT tat FROM rate_slots WHERE key = ?1", [&key], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0.0);
                let start = now.max(tat);
                tx.execute(
                    "INSERT INTO rate_slots (key, tat) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET tat = excluded.tat",
                    params![key, start + interval],
                )?;
                tx.commit()?;
                Ok(Duration::try_from_secs_f64((start - now).max(0.0)).unwrap_or(Duration::MAX))
            })
            .await
            .map_err(err)
    }

    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let (name, holder, ttl) = (name.to_string(), holder.to_string(), ttl.as_secs_f64());
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = now_secs();
                let current: Option<(String, f64)> = tx
                    .query_row("SELECT holder, until FROM leases WHERE name = ?1", [&name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let mine = match current {
                    Some((h, until)) if h != holder && until > now => false,
                    _ => {
                        tx.execute(
                            "INSERT INTO leases (name, holder, until) VALUES (?1, ?2, ?3)
                             ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, until = excluded.until",
                            params![name, holder, now + ttl],
                        )?;
                        true
                    }
                };
                tx.commit()?;
                Ok(mine)
            })
            .await
            .map_err(err)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.db
            .call(move |conn| conn.execute("DELETE FROM leases WHERE name = ?1 AND holder = ?2", [name, holder]))
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn claim_tick(&self, entry: &str, due: DateTime<Utc>) -> Result<bool, BrokerError> {
        let (entry, due) = (entry.to_string(), due.timestamp_millis());
        self.db
            .call(move |conn| {
                Ok(conn.execute(CLAIM_TICK, params![entry, due])? == 1)
            })
            .await
            .map_err(err)
    }

    async fn claim_tick_and_publish(
        &self,
        entry: &str,
        due: DateTime<Utc>,
        queue: &str,
        priority: u8,
        raw: &[u8],
    ) -> Result<bool, BrokerError> {
        let (entry, due) = (entry.to_string(), due.timestamp_millis());
        let (queue, body, band) = (queue.to_string(), raw.to_vec(), band_for_priority(priority));
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let changed = tx.execute(CLAIM_TICK, params![entry, due])?;
                if changed == 1 {
                    tx.execute(INSERT_MESSAGE, params![queue, band, body])?;
                }
                tx.commit()?;
                Ok(changed == 1)
            })
            .await
            .map_err(err)
    }

    async fn last_tick(&self, entry: &str) -> Result<Option<DateTime<Utc>>, BrokerError> {
        let entry = entry.to_string();
        let ms: Option<i64> = self
            .db
            .call(move |conn| conn.query_row("SELECT due_ms FROM beat_ticks WHERE entry = ?1", [entry], |r| r.get(0)).optional())
            .await
            .map_err(err)?;
        Ok(ms.and_then(DateTime::from_timestamp_millis))
    }

    async fn claim_task_ids(&self, claims: &[(String, String)], ttl: Duration) -> Result<Vec<Option<String>>, BrokerError> {
        let (claims, ttl) = (claims.to_vec(), ttl.as_secs_f64());
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = now_secs();
                let mut owners = Vec::with_capacity(claims.len());
                for (id, tenant) in &claims {
                    let current: Option<String> = tx
                        .query_row("SELECT tenant FROM task_owners WHERE id = ?1 AND until > ?2", params![id, now], |r| r.get(0))
                        .optional()?;
                    if let Some(owner) = current.filter(|o| o != tenant) {
                        owners.push(Some(owner));
                        continue;
                    }
                    tx.execute(
                        "INSERT INTO task_owners (id, tenant, until) VALUES (?1, ?2, ?3)
                         ON CONFLICT(id) DO UPDATE SET tenant = excluded.tenant, until = excluded.until",
                        params![id, tenant, now + ttl],
                    )?;
                    owners.push(None);
                }
                tx.commit()?;
                Ok(owners)
            })
            .await
            .map_err(err)
    }

    async fn add_usage(&self, rows: &[crate::tenant::meter::UsageRow]) -> Result<(), BrokerError> {
        let rows = rows.to_vec();
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                {
                    let mut add = tx.prepare_cached(
                        "INSERT INTO usage (hour, tenant, task, metric, value) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT(hour, tenant, task, metric) DO UPDATE SET value = value + excluded.value",
                    )?;
                    let mut max = tx.prepare_cached(
                        "INSERT INTO usage (hour, tenant, task, metric, value) VALUES (?1, ?2, ?3, 'memory_high_water', ?4)
                         ON CONFLICT(hour, tenant, task, metric) DO UPDATE SET value = max(value, excluded.value)",
                    )?;
                    for row in &rows {
                        for (metric, value) in row.counts.sums() {
                            add.execute(params![row.hour, row.tenant, row.task, metric, value])?;
                        }
                        max.execute(params![row.hour, row.tenant, row.task, row.counts.memory_high_water as f64])?;
                    }
                }
                tx.commit()
            })
            .await
            .map_err(err)
    }

    async fn queued(&self, queues: &[String]) -> Result<Vec<Vec<u8>>, BrokerError> {
        let queues = queues.to_vec();
        self.db
            .call(move |conn| {
                let mut out = Vec::new();
                for table in ["messages", "scheduled"] {
                    let mut stmt = conn.prepare(&format!("SELECT body FROM {table} WHERE queue = ?1"))?;
                    for q in &queues {
                        let rows = stmt.query_map([q], |r| r.get::<_, Vec<u8>>(0))?;
                        for row in rows {
                            out.push(row?);
                        }
                    }
                }
                Ok(out)
            })
            .await
            .map_err(err)
    }

    async fn usage(&self, since_hour: i64) -> Result<Vec<crate::tenant::meter::UsageRow>, BrokerError> {
        let cells: Vec<(i64, String, String, String, f64)> = self
            .db
            .call(move |conn| {
                let mut q = conn.prepare("SELECT hour, tenant, task, metric, value FROM usage WHERE hour >= ?1 ORDER BY hour, tenant, task")?;
                let cells = q.query_map([since_hour], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
                cells.collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(err)?;
        Ok(crate::tenant::meter::rows_from_cells(cells))
    }
}
