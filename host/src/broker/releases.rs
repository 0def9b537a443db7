//! Where releases live on the broker: signed records and component bytes, rollout state,
//! the audit log, workers' readiness and outcome counts — on Redis keys or SQLite tables.
//!
//! Records and states travel as opaque JSON text: `registry::release` gives them meaning.

use super::redis::cmd_err as redis_err;
use super::sqlite::err as sql_err;
use super::BrokerError;
use async_trait::async_trait;
use std::collections::HashMap;
use std::time::Duration;

/// One stored release, without its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRelease {
    /// `task@version`.
    pub key: String,
    /// The signed release as JSON text (`registry::release::SignedRelease`).
    pub signed: String,
    /// Hex SHA-256 of the component.
    pub digest: String,
    /// Why it was yanked, if it was.
    pub yanked: Option<String>,
    /// Where the component's bytes are when not here (`oci://host/repo/task:version`).
    pub location: Option<String>,
}

/// What [`ReleaseStore::put`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    Stored,
    /// The same digest was already published under this name and version: nothing changed.
    AlreadyPublished,
    /// Another digest holds this name and version.
    Conflict { existing: String },
}

#[async_trait]
pub trait ReleaseStore: Send + Sync {
    /// Stores a release unless its `task@version` exists (see [`PutOutcome`]).
    async fn put(&self, release: &StoredRelease, component: &[u8], manifest: Option<&[u8]>) -> Result<PutOutcome, BrokerError>;
    async fn list(&self) -> Result<Vec<StoredRelease>, BrokerError>;
    async fn component(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError>;
    /// The component's size, read before the bytes so an oversized one is never fetched.
    async fn component_len(&self, key: &str) -> Result<Option<u64>, BrokerError>;
    async fn manifest(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError>;
    /// Marks a release yanked; false if there is no such release.
    async fn yank(&self, key: &str, reason: &str) -> Result<bool, BrokerError>;
    /// Deletes a release and its bytes (`taskhost gc`).
    async fn delete(&self, key: &str) -> Result<(), BrokerError>;
    /// A number every change (publish, yank, delete, rollout) increases: followers poll it.
    async fn generation(&self) -> Result<u64, BrokerError>;
    /// Sets (or with `None` clears) a task's rollout state.
    async fn set_rollout(&self, task: &str, state: Option<&str>) -> Result<(), BrokerError>;
    async fn rollouts(&self) -> Result<HashMap<String, String>, BrokerError>;
    async fn append_audit(&self, entry: &str) -> Result<(), BrokerError>;
    /// The audit log, oldest first.
    async fn audit(&self) -> Result<Vec<String>, BrokerError>;
    /// A worker's report of what it has ready, kept for `ttl`.
    async fn report_ready(&self, worker: &str, report: &str, ttl: Duration) -> Result<(), BrokerError>;
    /// Live workers' reports.
    async fn ready(&self) -> Result<HashMap<String, String>, BrokerError>;
    /// Adds (release key, succeeded, failed) counts.
    async fn add_outcomes(&self, rows: &[(String, u64, u64)]) -> Result<(), BrokerError>;
    /// Per release key: (succeeded, failed) so far.
    async fn outcomes(&self) -> Result<HashMap<String, (u64, u64)>, BrokerError>;
}

/// The release store on the broker a URL names.
pub async fn connect(url: &str) -> Result<Box<dyn ReleaseStore>, BrokerError> {
    if super::is_redis_url(url) {
        let conn = super::redis_manager(url, Some(Duration::from_secs(10)))
            .await
            .map_err(|e| BrokerError::Connection(e.to_string()))?;
        Ok(Box::new(RedisReleases { conn }))
    } else if super::is_sqlite_url(url) {
        let path = super::sqlite::path_from_url(url).ok_or_else(|| BrokerError::UnsupportedUrl(url.to_string()))?;
        let db = super::sqlite::Db::open(&path).map_err(BrokerError::Connection)?;
        db.call(|conn| conn.execute_batch(SQLITE_SCHEMA)).await.map_err(sql_err)?;
        Ok(Box::new(SqliteReleases { db }))
    } else {
        Err(BrokerError::UnsupportedUrl(url.to_string()))
    }
}

const PREFIX: &str = "taskhost.release.";

struct RedisReleases {
    conn: super::RedisConn,
}

fn k(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// Stores a release unless its key is taken: returns 1 stored, 0 same digest, or the
/// other digest.
const PUT_SCRIPT: &str = r"
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  if existing == ARGV[2] then return 0 end
  return existing
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
if ARGV[5] == '1' then redis.call('SET', KEYS[4], ARGV[6]) end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[6], ARGV[1], ARGV[7]) end
redis.call('INCR', KEYS[5])
return 1
";

#[async_trait]
impl ReleaseStore for RedisReleases {
    async fn put(&self, release: &StoredRelease, component: &[u8], manifest: Option<&[u8]>) -> Result<PutOutcome, BrokerError> {
        let reply: redis::Value = redis::Script::new(PUT_SCRIPT)
            .key(k("digest"))
            .key(k("signed"))
            .key(k(&format!("wasm.{}", release.key)))
            .key(k(&format!("manifest.{}", release.key)))
            .key(k("generation"))
            .key(k("location"))
            .arg(&release.key)
            .arg(&release.digest)
            .arg(&release.signed)
            .arg(component)
            .arg(if manifest.is_some() { "1" } else { "0" })
            .arg(manifest.unwrap_or_default())
            .arg(release.location.as_deref().unwrap_or(""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_err)?;
        Ok(match reply {
            redis::Value::Int(1) => PutOutcome::Stored,
            redis::Value::Int(_) => PutOutcome::AlreadyPublished,
            other => PutOutcome::Conflict { existing: redis::from_redis_value(other).unwrap_or_default() },
        })
    }

    async fn list(&self) -> Result<Vec<StoredRelease>, BrokerError> {
        use redis::AsyncCommands;
        let mut conn = self.conn.clone();
        let digests: HashMap<String, String> = conn.hgetall(k("digest")).await.map_err(redis_err)?;
        let mut signed: HashMap<String, String> = conn.hgetall(k("signed")).await.map_err(redis_err)?;
        let mut yanked: HashMap<String, String> = conn.hgetall(k("yanked")).await.map_err(redis_err)?;
        let mut location: HashMap<String, String> = conn.hgetall(k("location")).await.map_err(redis_err)?;
        let mut out: Vec<StoredRelease> = digests
            .into_iter()
            .map(|(key, digest)| StoredRelease {
                signed: signed.remove(&key).unwrap_or_default(),
                yanked: yanked.remove(&key),
                location: location.remove(&key),
                key,
                digest,
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn component(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        use redis::AsyncCommands;
        self.conn.clone().get(k(&format!("wasm.{key}"))).await.map_err(redis_err)
    }

    async fn component_len(&self, key: &str) -> Result<Option<u64>, BrokerError> {
        use redis::AsyncCommands;
        let n: u64 = self.conn.clone().strlen(k(&format!("wasm.{key}"))).await.map_err(redis_err)?;
        Ok((n > 0).then_some(n))
    }

    async fn manifest(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        use redis::AsyncCommands;
        self.conn.clone().get(k(&format!("manifest.{key}"))).await.map_err(redis_err)
    }

    async fn yank(&self, key: &str, reason: &str) -> Result<bool, BrokerError> {
        use redis::AsyncCommands;
        let mut conn = self.conn.clone();
        let exists: bool = conn.hexists(k("digest"), key).await.map_err(redis_err)?;
        if exists {
            redis::pipe()
                .hset(k("yanked"), key, reason)
                .incr(k("generation"), 1)
                .query_async::<()>(&mut conn)
                .await
                .map_err(redis_err)?;
        }
        Ok(exists)
    }

    async fn delete(&self, key: &str) -> Result<(), BrokerError> {
        redis::pipe()
            .hdel(k("digest"), key)
            .hdel(k("signed"), key)
            .hdel(k("yanked"), key)
            .hdel(k("location"), key)
            .del(k(&format!("wasm.{key}")))
            .del(k(&format!("manifest.{key}")))
            .incr(k("generation"), 1)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(redis_err)
    }

    async fn generation(&self) -> Result<u64, BrokerError> {
        use redis::AsyncCommands;
        let g: Option<u64> = self.conn.clone().get(k("generation")).await.map_err(redis_err)?;
        Ok(g.unwrap_or(0))
    }

    async fn set_rollout(&self, task: &str, state: Option<&str>) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        match state {
            Some(s) => pipe.hset(k("rollout"), task, s),
            None => pipe.hdel(k("rollout"), task),
        };
        pipe.incr(k("generation"), 1).query_async::<()>(&mut self.conn.clone()).await.map_err(redis_err)
    }

    async fn rollouts(&self) -> Result<HashMap<String, String>, BrokerError> {
        use redis::AsyncCommands;
        self.conn.clone().hgetall(k("rollout")).await.map_err(redis_err)
    }

    async fn append_audit(&self, entry: &str) -> Result<(), BrokerError> {
        use redis::AsyncCommands;
        self.conn.clone().rpush(k("audit"), entry).await.map_err(redis_err)
    }

    async fn audit(&self) -> Result<Vec<String>, BrokerError> {
        use redis::AsyncCommands;
        self.conn.clone().lrange(k("audit"), 0, -1).await.map_err(redis_err)
    }

    async fn report_ready(&self, worker: &str, report: &str, ttl: Duration) -> Result<(), BrokerError> {
        // One hash of reports, each stamped with its expiry: `ready` drops the stale ones.
        let expires = super::sqlite::now_secs() + ttl.as_secs_f64();
        redis::pipe()
            .hset(k("ready"), worker, format!("{expires}\x1f{report}"))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(redis_err)
    }

    async fn ready(&self) -> Result<HashMap<String, String>, BrokerError> {
        use redis::AsyncCommands;
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn.hgetall(k("ready")).await.map_err(redis_err)?;
        let now = super::sqlite::now_secs();
        let mut live = HashMap::new();
        let mut stale = Vec::new();
        for (worker, value) in all {
            match value.split_once('\x1f') {
                Some((expires, report)) if expires.parse::<f64>().is_ok_and(|e| e > now) => {
                    live.insert(worker, report.to_string());
                }
                _ => stale.push(worker),
            }
        }
        if !stale.is_empty() {
            let _: Result<(), _> = conn.hdel(k("ready"), stale).await;
        }
        Ok(live)
    }

    async fn add_outcomes(&self, rows: &[(String, u64, u64)]) -> Result<(), BrokerError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, ok, failed) in rows {
            pipe.hincr(k("outcomes"), format!("{key}\x1fok"), *ok).ignore();
            pipe.hincr(k("outcomes"), format!("{key}\x1ffailed"), *failed).ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(redis_err)
    }

    async fn outcomes(&self) -> Result<HashMap<String, (u64, u64)>, BrokerError> {
        use redis::AsyncCommands;
        let all: HashMap<String, u64> = self.conn.clone().hgetall(k("outcomes")).await.map_err(redis_err)?;
        let mut out: HashMap<String, (u64, u64)> = HashMap::new();
        for (field, n) in all {
            if let Some((key, what)) = field.split_once('\x1f') {
                let e = out.entry(key.to_string()).or_default();
                if what == "ok" {
                    e.0 = n
                } else {
                    e.1 = n
                }
            }
        }
        Ok(out)
    }
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS releases (
    key TEXT PRIMARY KEY, signed TEXT NOT NULL, digest TEXT NOT NULL,
    component BLOB NOT NULL, manifest BLOB, yanked TEXT, location TEXT
);
CREATE TABLE IF NOT EXISTS release_generation (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL);
INSERT OR IGNORE INTO release_generation (id, n) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS release_rollouts (task TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS release_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS release_ready (worker TEXT PRIMARY KEY, report TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS release_outcomes (key TEXT PRIMARY KEY, ok INTEGER NOT NULL, failed INTEGER NOT NULL);
";

struct SqliteReleases {
    db: super::sqlite::Db,
}

const BUMP: &str = "UPDATE release_generation SET n = n + 1 WHERE id = 0";

#[async_trait]
impl ReleaseStore for SqliteReleases {
    async fn put(&self, release: &StoredRelease, component: &[u8], manifest: Option<&[u8]>) -> Result<PutOutcome, BrokerError> {
        let (release, component, manifest) = (release.clone(), component.to_vec(), manifest.map(<[u8]>::to_vec));
        self.db
            .call(move |conn| {
                use rusqlite::OptionalExtension;
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let existing: Option<String> =
                    tx.query_row("SELECT digest FROM releases WHERE key = ?1", [&release.key], |r| r.get(0)).optional()?;
                let outcome = match existing {
                    Some(d) if d == release.digest => PutOutcome::AlreadyPublished,
                    Some(d) => PutOutcome::Conflict { existing: d },
                    None => {
                        tx.execute(
                            "INSERT INTO releases (key, signed, digest, component, manifest, location) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            rusqlite::params![release.key, release.signed, release.digest, component, manifest, release.location],
                        )?;
                        tx.execute(BUMP, [])?;
                        PutOutcome::Stored
                    }
                };
                tx.commit()?;
                Ok(outcome)
            })
            .await
            .map_err(sql_err)
    }

    async fn list(&self) -> Result<Vec<StoredRelease>, BrokerError> {
        self.db
            .call(|conn| {
                let mut stmt = conn.prepare("SELECT key, signed, digest, yanked, location FROM releases ORDER BY key")?;
                let rows = stmt.query_map([], |r| {
                    Ok(StoredRelease { key: r.get(0)?, signed: r.get(1)?, digest: r.get(2)?, yanked: r.get(3)?, location: r.get(4)? })
                })?;
                rows.collect()
            })
            .await
            .map_err(sql_err)
    }

    async fn component(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let key = key.to_string();
        self.db
            .call(move |conn| {
                use rusqlite::OptionalExtension;
                conn.query_row("SELECT component FROM releases WHERE key = ?1", [key], |r| r.get(0)).optional()
            })
            .await
            .map_err(sql_err)
    }

    async fn component_len(&self, key: &str) -> Result<Option<u64>, BrokerError> {
        let key = key.to_string();
        self.db
            .call(move |conn| {
                use rusqlite::OptionalExtension;
                conn.query_row("SELECT length(component) FROM releases WHERE key = ?1", [key], |r| r.get::<_, i64>(0)).optional()
            })
            .await
            .map(|n| n.map(|n| n as u64))
            .map_err(sql_err)
    }

    async fn manifest(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let key = key.to_string();
        self.db
            .call(move |conn| {
                use rusqlite::OptionalExtension;
                conn.query_row("SELECT manifest FROM releases WHERE key = ?1", [key], |r| r.get::<_, Option<Vec<u8>>>(0))
                    .optional()
                    .map(Option::flatten)
            })
            .await
            .map_err(sql_err)
    }

    async fn yank(&self, key: &str, reason: &str) -> Result<bool, BrokerError> {
        let (key, reason) = (key.to_string(), reason.to_string());
        self.db
            .call(move |conn| {
                let n = conn.execute("UPDATE releases SET yanked = ?2 WHERE key = ?1", [key, reason])?;
                if n > 0 {
                    conn.execute(BUMP, [])?;
                }
                Ok(n > 0)
            })
            .await
            .map_err(sql_err)
    }

    async fn delete(&self, key: &str) -> Result<(), BrokerError> {
        let key = key.to_string();
        self.db
            .call(move |conn| {
                conn.execute("DELETE FROM releases WHERE key = ?1", [key])?;
                conn.execute(BUMP, []).map(|_| ())
            })
            .await
            .map_err(sql_err)
    }

    async fn generation(&self) -> Result<u64, BrokerError> {
        self.db
            .call(|conn| conn.query_row("SELECT n FROM release_generation WHERE id = 0", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
            .map_err(sql_err)
    }

    async fn set_rollout(&self, task: &str, state: Option<&str>) -> Result<(), BrokerError> {
        let (task, state) = (task.to_string(), state.map(str::to_string));
        self.db
            .call(move |conn| {
                match state {
                    Some(s) => conn.execute(
                        "INSERT INTO release_rollouts (task, state) VALUES (?1, ?2) ON CONFLICT(task) DO UPDATE SET state = ?2",
                        [task, s],
                    )?,
                    None => conn.execute("DELETE FROM release_rollouts WHERE task = ?1", [task])?,
                };
                conn.execute(BUMP, []).map(|_| ())
            })
            .await
            .map_err(sql_err)
    }

    async fn rollouts(&self) -> Result<HashMap<String, String>, BrokerError> {
        self.db
            .call(|conn| {
                let mut stmt = conn.prepare("SELECT task, state FROM release_rollouts")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await
            .map_err(sql_err)
    }

    async fn append_audit(&self, entry: &str) -> Result<(), BrokerError> {
        let entry = entry.to_string();
        self.db
            .call(move |conn| conn.execute("INSERT INTO release_audit (entry) VALUES (?1)", [entry]).map(|_| ()))
            .await
            .map_err(sql_err)
    }

    async fn audit(&self) -> Result<Vec<String>, BrokerError> {
        self.db
            .call(|conn| {
                let mut stmt = conn.prepare("SELECT entry FROM release_audit ORDER BY id")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .await
            .map_err(sql_err)
    }

    async fn report_ready(&self, worker: &str, report: &str, ttl: Duration) -> Result<(), BrokerError> {
        let (worker, report) = (worker.to_string(), report.to_string());
        let expires = super::sqlite::now_secs() + ttl.as_secs_f64();
        self.db
            .call(move |conn| {
                conn.execute(
                    "INSERT INTO release_ready (worker, report, expires) VALUES (?1, ?2, ?3)
                     ON CONFLICT(worker) DO UPDATE SET report = ?2, expires = ?3",
                    rusqlite::params![worker, report, expires],
                )
                .map(|_| ())
            })
            .await
            .map_err(sql_err)
    }

    async fn ready(&self) -> Result<HashMap<String, String>, BrokerError> {
        let now = super::sqlite::now_secs();
        self.db
            .call(move |conn| {
                conn.execute("DELETE FROM release_ready WHERE expires <= ?1", [now])?;
                let mut stmt = conn.prepare("SELECT worker, report FROM release_ready")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await
            .map_err(sql_err)
    }

    async fn add_outcomes(&self, rows: &[(String, u64, u64)]) -> Result<(), BrokerError> {
        if rows.is_empty() {
            return Ok(());
        }
        let rows = rows.to_vec();
        self.db
            .call(move |conn| {
                let tx = conn.transaction()?;
                for (key, ok, failed) in rows {
                    tx.execute(
                        "INSERT INTO release_outcomes (key, ok, failed) VALUES (?1, ?2, ?3)
                         ON CONFLICT(key) DO UPDATE SET ok = ok + ?2, failed = failed + ?3",
                        rusqlite::params![key, ok as i64, failed as i64],
                    )?;
                }
                tx.commit()
            })
            .await
            .map_err(sql_err)
    }

    async fn outcomes(&self) -> Result<HashMap<String, (u64, u64)>, BrokerError> {
        self.db
            .call(|conn| {
                let mut stmt = conn.prepare("SELECT key, ok, failed FROM release_outcomes")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))))?;
                rows.collect()
            })
            .await
            .map_err(sql_err)
    }
}
