//! Results in the embedded SQLite file, in Celery's record layout; waiting polls
//! (1 ms rising to 20 ms), since SQLite has no notifications across processes.

use super::{BackendError, ResultBackend};
use crate::broker::sqlite::{now_secs, path_from_url, Db};
use crate::canvas::ChordEntry;
use crate::protocol::ResultRecord;
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use std::time::Duration;

/// Expired results are purged on one store in this many.
const PURGE_EVERY: u64 = 1000;
/// How long a chord claim holds: a claimer that dies before publishing the callback
/// gives the chord to the next member to join (its redelivered message) after this, as
/// the Redis backend's expiring claim key does (Celery 5.7's extended 21 s).
const CHORD_CLAIM_SECS: f64 = 21.0;

pub struct SqliteBackend {
    db: Db,
    expires: Option<Duration>,
    stores: std::sync::atomic::AtomicU64,
}

fn err(e: rusqlite::Error) -> BackendError {
    BackendError::Command(e.to_string())
}

impl SqliteBackend {
    pub fn open(url: &str, expires: Option<Duration>) -> Result<Self, BackendError> {
        let path = path_from_url(url).ok_or_else(|| BackendError::UnsupportedUrl(url.to_string()))?;
        let db = Db::open(&path).map_err(BackendError::Connection)?;
        Ok(SqliteBackend { db, expires, stores: Default::default() })
    }
}

/// A record as its row: task id, status, record JSON.
type ResultRow = (String, String, String);

fn row_for(record: &ResultRecord, custom_state: Option<&str>) -> ResultRow {
    let json = record.to_json(custom_state);
    let status: String = serde_json::from_str::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_default();
    (record.task_id.clone(), status, json)
}

impl SqliteBackend {
    /// Writes rows in one transaction: one commit (and one turn of the write lock the
    /// worker processes share) for a whole batch of records.
    async fn write_rows(&self, rows: Vec<ResultRow>) -> Result<Vec<bool>, BackendError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let expires_at = self.expires.map(|e| now_secs() + e.as_secs_f64());
        let count = rows.len() as u64;
        let before = self.stores.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        // As when each store counted itself: a purge when any of these is a multiple.
        let purge = (before..before + count).any(|n| n % PURGE_EVERY == 0);
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                if purge {
                    tx.execute("DELETE FROM results WHERE expires_at IS NOT NULL AND expires_at < ?1", [now_secs()])?;
                }
                let mut written = Vec::with_capacity(rows.len());
                {
                    // Never overwrite a SUCCESS, as Celery's backend checks before writing.
                    let mut upsert = tx.prepare_cached(
                        "INSERT INTO results (task_id, status, record, expires_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(task_id) DO UPDATE SET status = excluded.status, record = excluded.record,
                         expires_at = excluded.expires_at WHERE results.status != 'SUCCESS'",
                    )?;
                    for (task_id, status, json) in &rows {
                        written.push(upsert.execute(params![task_id, status, json, expires_at])? == 1);
                    }
                }
                tx.commit()?;
                Ok(written)
            })
            .await
            .map_err(err)
    }
}

#[async_trait]
impl ResultBackend for SqliteBackend {
    async fn store(&self, record: &ResultRecord, custom_state: Option<&str>) -> Result<bool, BackendError> {
        let rows = vec![row_for(record, custom_state)];
        Ok(self.write_rows(rows).await?.first().copied().unwrap_or(false))
    }

    async fn store_many(&self, records: &[(ResultRecord, Option<String>)]) -> Result<Vec<bool>, BackendError> {
        let rows = records.iter().map(|(record, state)| row_for(record, state.as_deref())).collect();
        self.write_rows(rows).await
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultRecord>, BackendError> {
        let id = task_id.to_string();
        let raw: Option<String> = self
            .db
            .call(move |conn| {
                conn.prepare_cached("SELECT record FROM results WHERE task_id = ?1 AND (expires_at IS NULL OR expires_at >= ?2)")?
                    .query_row(params![id, now_secs()], |r| r.get(0))
                    .optional()
            })
            .await
            .map_err(err)?;
        raw.map(|r| {
            serde_json::from_str(&r).map_err(|e| BackendError::Corrupt { task_id: task_id.into(), reason: e.to_string() })
        })
        .transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultRecord, BackendError> {
        super::poll_until_ready(self, task_id, timeout, Duration::from_millis(1), 2.0, Duration::from_millis(20)).await
    }

    async fn chord_init(&self, group_id: &str, size: u64) -> Result<(), BackendError> {
        let gid = group_id.to_string();
        self.db
            .call(move |conn| {
                conn.execute(
                    "INSERT INTO chords (group_id, size, claim, done) VALUES (?1, ?2, NULL, 0)
                     ON CONFLICT(group_id) DO UPDATE SET size = excluded.size, claim = NULL",
                    params![gid, size as i64],
                )
            })
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn chord_join(
        &self,
        group_id: &str,
        group_index: u64,
        entry: &ChordEntry,
    ) -> Result<Option<(Vec<ChordEntry>, String)>, BackendError> {
        let (gid, member, value) = (group_id.to_string(), format!("{}:{group_index}", entry.task_id), entry.encode());
        let token = uuid::Uuid::new_v4().to_string();
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let now = now_secs();
                // A claim past its time is no claim.
                let meta: Option<(Option<i64>, Option<String>, i64)> = tx
                    .query_row(
                        "SELECT size, CASE WHEN claim_until IS NULL OR claim_until >= ?2 THEN claim END, done FROM chords WHERE group_id = ?1",
                        params![gid, now],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                if meta.as_ref().is_some_and(|m| m.2 != 0) {
                    return Ok(None);
                }
                tx.execute(
                    "INSERT OR IGNORE INTO chord_entries (group_id, member, idx, value) VALUES (?1, ?2, ?3, ?4)",
                    params![gid, member, group_index as i64, value],
                )?;
                let count: i64 = tx.query_row("SELECT COUNT(*) FROM chord_entries WHERE group_id = ?1", [&gid], |r| r.get(0))?;
                let claimed = match meta {
                    Some((Some(size), None, _)) if count == size => {
                        tx.execute(
                            "UPDATE chords SET claim = ?1, claim_until = ?3 WHERE group_id = ?2",
                            params![token, gid, now + CHORD_CLAIM_SECS],
                        )?;
                        let mut q = tx.prepare("SELECT value FROM chord_entries WHERE group_id = ?1 ORDER BY idx")?;
                        let rows: Vec<String> = q.query_map([&gid], |r| r.get(0))?.collect::<Result<_, _>>()?;
                        Some(rows)
                    }
                    _ => None,
                };
                tx.commit()?;
                Ok(claimed.map(|rows| (rows.iter().filter_map(|r| ChordEntry::decode(r)).collect(), token)))
            })
            .await
            .map_err(err)
    }

    async fn chord_done(&self, group_id: &str, token: &str) -> Result<(), BackendError> {
        let (gid, token) = (group_id.to_string(), token.to_string());
        self.db
            .call(move |conn| {
                let tx = conn.transaction()?;
                let changed = tx.execute("UPDATE chords SET done = 1 WHERE group_id = ?1 AND claim = ?2", params![gid, token])?;
                if changed > 0 {
                    tx.execute("DELETE FROM chord_entries WHERE group_id = ?1", [&gid])?;
                }
                tx.commit()
            })
            .await
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> ChordEntry {
        ChordEntry { task_id: id.into(), state: "SUCCESS".into(), result: serde_json::json!(1) }
    }

    #[tokio::test]
    async fn a_dead_claimers_chord_goes_to_the_next_member_once_its_claim_expires() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let b = SqliteBackend::open(&url, None).unwrap();
        b.chord_init("g", 2).await.unwrap();
        assert!(b.chord_join("g", 0, &entry("a")).await.unwrap().is_none());
        let (entries, _token) = b.chord_join("g", 1, &entry("b")).await.unwrap().expect("the last member claims");
        assert_eq!(entries.len(), 2);
        // The claimer dies before chord_done; its message comes back and joins again.
        assert!(b.chord_join("g", 1, &entry("b")).await.unwrap().is_none(), "a live claim holds");
        b.db.call(|c| c.execute("UPDATE chords SET claim_until = 0 WHERE group_id = 'g'", [])).await.unwrap();
        let (again, token) = b.chord_join("g", 1, &entry("b")).await.unwrap().expect("an expired claim is taken over");
        assert_eq!(again.len(), 2);
        b.chord_done("g", &token).await.unwrap();
        assert!(b.chord_join("g", 1, &entry("b")).await.unwrap().is_none(), "a done chord stays done");
    }
}
