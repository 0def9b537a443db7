//! Redis result backend: `celery-task-meta-<id>` written with SET EX + PUBLISH on the
//! channel of the same name, never over a stored SUCCESS.

use super::{BackendError, LateNotices, ResultBackend, CHORD_EXPIRES};
use crate::canvas::ChordEntry;
use crate::protocol::ResultRecord;
use async_trait::async_trait;
use futures::StreamExt;
use crate::broker::RedisConn;
use redis::{AsyncCommands, Script};
use std::time::Duration;

pub const KEY_PREFIX: &str = "celery-task-meta-";

/// Writes records in order, each skipped when its stored status is SUCCESS. KEYS are the
/// result keys, ARGV[1] the expiry seconds (0 = none), ARGV[1 + i] the record for
/// KEYS[i]. Returns 1 (written) or 0 per key. Only keys that already exist come here:
/// `write` creates new ones with SET NX, which costs Redis about half what this does.
/// A skipped record's key has its SUCCESS published again: the run that stored it may have
/// died between its SET NX and its PUBLISH, and this is its message's redelivery.
const STORE: &str = r#"
local ttl = tonumber(ARGV[1])
local written = {}
for i, key in ipairs(KEYS) do
  local record = ARGV[i + 1]
  -- The stored status from the record's head where it leads, as in taskhost's records and
  -- Celery's: most records here replace a STARTED, and reading and decoding all of it
  -- cost more than the write. Any other layout is decoded whole.
  local head = redis.call('GETRANGE', key, 0, 31)
  local done, cur = false, nil
  if head ~= '' then
    local status = string.match(head, '^{"status": ?"(%u+)"')
    if status then
      done = status == 'SUCCESS'
    else
      cur = redis.call('GET', key)
      local ok, rec = pcall(cjson.decode, cur)
      done = ok and type(rec) == 'table' and rec.status == 'SUCCESS'
    end
  end
  if done then
    redis.call('PUBLISH', key, cur or redis.call('GET', key))
    written[i] = 0
  else
    -- ARGV[1] as given: a Lua number would be formatted anew with snprintf on every call.
    if ttl > 0 then redis.call('SETEX', key, ARGV[1], record) else redis.call('SET', key, record) end
    redis.call('PUBLISH', key, record)
    written[i] = 1
  end
end
return written
"#;
/// Celery 5.7's chord join. KEYS: .j .t .s .d <gid key> .c;
/// ARGV: tid, entry, group_index, expiry, claim ttl, token. Returns the entries to the claimer.
const CHORD_JOIN: &str = r#"
if redis.call('GET', KEYS[6]) == 'done' then return false end
local member = ARGV[1] .. ':' .. ARGV[3]
if redis.call('SISMEMBER', KEYS[4], member) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  redis.call('SADD', KEYS[4], member)
end
local count = redis.call('ZCOUNT', KEYS[1], '-inf', '+inf')
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
local t = tonumber(redis.call('GET', KEYS[2]) or '0')
local s = tonumber(redis.call('GET', KEYS[3]) or '0')
if s > 0 and count == s + t then
  if redis.call('SET', KEYS[6], ARGV[6], 'NX', 'EX', ARGV[5]) then
    return redis.call('ZRANGE', KEYS[1], 0, -1)
  end
end
return false
"#;

/// KEYS: .j .t .s .d .c; ARGV: token.
const CHORD_DONE: &str = r#"
if redis.call('GET', KEYS[5]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[5], 'done', 'EX', 300)
  return 1
end
return 0
"#;

/// Seconds a fresh chord claim holds before another member may take over, and how long
/// the claimer extends it to while it publishes the callback (Celery 5.7's 6 s and 21 s).
const CHORD_CLAIM_TTL: u64 = 6;
const CHORD_CLAIM_EXTENDED: u64 = 21;

/// KEYS[1] .c; ARGV: token, seconds. Extends the claim only while it is ours.
const CHORD_EXTEND: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

/// `<tenant prefix>celery-task-meta-<id>`, the key a result is kept under and the channel
/// it is published on.
fn result_key(prefix: &str, task_id: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + KEY_PREFIX.len() + task_id.len());
    key.push_str(prefix);
    key.push_str(KEY_PREFIX);
    key.push_str(task_id);
    key
}

/// `PUBLISH <key> <record>`, sized up front.
fn publish_command(key: &str, json: &str) -> redis::Cmd {
    let mut notice = redis::Cmd::with_capacity(3, 7 + key.len() + json.len());
    notice.arg("PUBLISH").arg(key).arg(json);
    notice
}

/// An error reply read from a pipeline whose replies are all read (`ignore_errors`).
fn refusal(e: &redis::ServerError) -> BackendError {
    BackendError::Command(format!("{}: {}", e.code(), e.details().unwrap_or("")))
}

fn chord_key(group_id: &str, suffix: &str) -> String {
    format!("celery-taskset-meta-{group_id}{suffix}")
}

fn err(e: redis::RedisError) -> BackendError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        BackendError::Connection(e.to_string())
    } else {
        BackendError::Command(e.to_string())
    }
}

pub struct RedisBackend {
    endpoint: crate::broker::RedisEndpoint,
    conn: RedisConn,
    store: Script,
    chord_join: Script,
    chord_done: Script,
    expires: Option<Duration>,
    /// Prefix of the keys `get` and `wait` read (a tenant's `result_prefix`).
    key_prefix: String,
}

impl RedisBackend {
    pub async fn connect(url: &str, expires: Option<Duration>) -> Result<Self, BackendError> {
        let endpoint = crate::broker::RedisEndpoint::for_url(url).map_err(err)?;
        let conn = crate::broker::redis_manager(url, Some(crate::broker::REDIS_RESPONSE_TIMEOUT)).await.map_err(err)?;
        Ok(RedisBackend {
            endpoint,
            conn,
            store: Script::new(STORE),
            chord_join: Script::new(CHORD_JOIN),
            chord_done: Script::new(CHORD_DONE),
            expires,
            key_prefix: String::new(),
        })
    }

    /// Reads (`get`, `wait`) under this key prefix, as Celery's `global_keyprefix` does.
    pub fn with_key_prefix(mut self, prefix: &str) -> Self {
        self.key_prefix = prefix.to_string();
        self
    }

    /// Writes `records` in order: one pipeline of SET NX creates the keys that do not
    /// exist yet (each one atomically, so nothing can be overwritten), a second publishes
    /// those and hands the rest to STORE, which checks for a SUCCESS and writes in one
    /// atomic step. `earlier` notices lead the first pipeline. With `notify_later`, a batch
    /// that created every key it tried to skips the second round trip and hands its
    /// notices back instead, for the next call to lead with. Records that replace their
    /// task's STARTED go to STORE in the first pipeline, after `earlier` (whose notices
    /// include their STARTED's), unless this batch also creates their key.
    async fn write<'a>(
        &self,
        earlier: &mut LateNotices,
        records: impl Iterator<Item = (&'a ResultRecord, Option<&'a str>)>,
        notify_later: bool,
    ) -> Result<(Vec<bool>, LateNotices), BackendError> {
        let ttl = self.expires.map_or(0, |d| d.as_secs().max(1));
        let (mut entries, mut replacing): (Vec<(String, String)>, Vec<bool>) = records
            .map(|(record, custom_state)| {
                let prefix = record.key_prefix.as_deref().unwrap_or(&self.key_prefix);
                ((result_key(prefix, &record.task_id), record.to_json(custom_state)), record.replaces_started)
            })
            .unzip();
        if entries.is_empty() && earlier.is_empty() {
            return Ok((Vec::new(), LateNotices::default()));
        }
        if replacing.contains(&true) && replacing.contains(&false) {
            let creating: std::collections::HashSet<&str> =
                entries.iter().zip(&replacing).filter(|(_, r)| !**r).map(|((key, _), _)| key.as_str()).collect();
            for (r, (key, _)) in replacing.iter_mut().zip(&entries) {
                *r &= !creating.contains(key.as_str());
            }
        }
        // Each command sized up front and the expiry formatted once: a batch is ~100 records,
        // and growing six argument lists a record showed in the worker's profile.
        let ttl_text = (ttl > 0).then(|| ttl.to_string());
        let mut first = redis::Pipeline::with_capacity(earlier.len() + entries.len() + 1);
        // Every reply read, errors too: a NOSCRIPT from STORE is answered by loading it.
        first.ignore_errors();
        // The earlier batch's notices first: a record here for a key it created must follow
        // that creation's notice, as it follows it in the key.
        for (key, json) in &earlier.0 {
            first.add_command(publish_command(key, json));
        }
        let mut store = self.store.prepare_invoke();
        store.arg(ttl);
        let (mut creating_at, mut replacing_at) = (Vec::new(), Vec::new());
        for (i, (key, json)) in entries.iter().enumerate() {
            if replacing[i] {
                store.key(key).arg(json);
                replacing_at.push(i);
                continue;
            }
            let mut set = redis::Cmd::with_capacity(6, 3 + key.len() + json.len() + 4 + ttl_text.as_ref().map_or(0, String::len));
            set.arg("SET").arg(key.as_str()).arg(json.as_str());
            if let Some(ttl) = &ttl_text {
                set.arg("EX").arg(ttl.as_str());
            }
            set.arg("NX");
            first.add_command(set);
            creating_at.push(i);
        }
        if !replacing_at.is_empty() {
            first.invoke_script(&store);
        }
        let leading = earlier.len();
        let mut replies: Vec<redis::Value> = first.query_async(&mut self.conn.clone()).await.map_err(err)?;
        if replies.len() != leading + creating_at.len() + usize::from(!replacing_at.is_empty()) {
            return Err(BackendError::Command(format!("{} replies to a pipeline of {} records", replies.len(), entries.len())));
        }
        let refused = |replies: &[redis::Value]| {
            replies.iter().find_map(|r| match r {
                redis::Value::ServerError(e) => Some(refusal(e)),
                _ => None,
            })
        };
        // A notice Redis refused (BUSY behind a long script, say) is still owed.
        if let Some(e) = refused(&replies[..leading]) {
            return Err(e);
        }
        earlier.0.clear();
        let stored_reply = (!replacing_at.is_empty()).then(|| replies.pop().expect("counted"));
        let created = &replies[leading..];
        if let Some(e) = refused(created) {
            return Err(e);
        }
        let mut written = vec![false; entries.len()];
        for (&i, reply) in creating_at.iter().zip(created) {
            written[i] = !matches!(reply, redis::Value::Nil);
        }
        if let Some(reply) = stored_reply {
            let stored: Vec<i64> = match reply {
                redis::Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript) => {
                    store.invoke_async(&mut self.conn.clone()).await.map_err(err)?
                }
                redis::Value::ServerError(e) => return Err(refusal(&e)),
                other => redis::from_redis_value(other).map_err(|e| BackendError::Command(e.to_string()))?,
            };
            for (&i, w) in replacing_at.iter().zip(stored) {
                written[i] = w == 1;
            }
        }
        if notify_later && creating_at.iter().all(|&i| written[i]) {
            let created = creating_at.iter().map(|&i| std::mem::take(&mut entries[i])).collect();
            return Ok((written, LateNotices(created)));
        }

        let mut publish = redis::Pipeline::with_capacity(creating_at.len());
        let mut existing = self.store.prepare_invoke();
        existing.arg(ttl);
        let mut existing_at = Vec::new();
        for &i in &creating_at {
            let (key, json) = &entries[i];
            if written[i] {
                publish.add_command(publish_command(key, json)).ignore();
            } else {
                existing.key(key).arg(json);
                existing_at.push(i);
            }
        }
        // Publishes go first: a later record for a key this batch created must follow its
        // creation's notice, as it follows it in the key.
        if existing_at.len() < creating_at.len() {
            publish.query_async::<()>(&mut self.conn.clone()).await.map_err(err)?;
        }
        if !existing_at.is_empty() {
            let stored: Vec<i64> = existing.invoke_async(&mut self.conn.clone()).await.map_err(err)?;
            for (i, w) in existing_at.into_iter().zip(stored) {
                written[i] = w == 1;
            }
        }
        Ok((written, LateNotices::default()))
    }

    fn parse(task_id: &str, raw: &str) -> Result<ResultRecord, BackendError> {
        serde_json::from_str(raw).map_err(|e| BackendError::Corrupt { task_id: task_id.into(), reason: e.to_string() })
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    async fn store(&self, record: &ResultRecord, custom_state: Option<&str>) -> Result<bool, BackendError> {
        let (written, _) = self.write(&mut LateNotices::default(), std::iter::once((record, custom_state)), false).await?;
        Ok(written.first() == Some(&true))
    }

    async fn store_many(&self, records: &[(ResultRecord, Option<String>)]) -> Result<Vec<bool>, BackendError> {
        let records = records.iter().map(|(record, state)| (record, state.as_deref()));
        Ok(self.write(&mut LateNotices::default(), records, false).await?.0)
    }

    async fn store_many_notifying_later(
        &self,
        earlier: &mut LateNotices,
        records: &[(ResultRecord, Option<String>)],
    ) -> Result<(Vec<bool>, LateNotices), BackendError> {
        self.write(earlier, records.iter().map(|(record, state)| (record, state.as_deref())), true).await
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultRecord>, BackendError> {
        let raw: Option<String> = self.conn.clone().get(result_key(&self.key_prefix, task_id)).await.map_err(err)?;
        raw.map(|r| Self::parse(task_id, &r)).transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultRecord, BackendError> {
        let key = result_key(&self.key_prefix, task_id);
        // Subscribe before reading, as Celery does, so no notification falls in between.
        let mut pubsub = self.endpoint.pubsub().await.map_err(err)?;
        pubsub.subscribe(&key).await.map_err(err)?;
        if let Some(record) = self.get(task_id).await? {
            if record.status.is_ready() {
                return Ok(record);
            }
        }
        let mut messages = pubsub.on_message();
        let waiting = async {
            while let Some(msg) = messages.next().await {
                let payload: String = msg.get_payload().map_err(err)?;
                let record = Self::parse(task_id, &payload)?;
                if record.status.is_ready() {
                    return Ok(record);
                }
            }
            Err(BackendError::Connection("subscription closed".into()))
        };
        match timeout {
            None => waiting.await,
            Some(t) => tokio::time::timeout(t, waiting)
                .await
                .unwrap_or_else(|_| Err(BackendError::Timeout { task_id: task_id.into(), timeout: t })),
        }
    }

    async fn chord_init(&self, group_id: &str, size: u64) -> Result<(), BackendError> {
        redis::pipe()
            .del(chord_key(group_id, ".c"))
            .ignore()
            .set_ex(chord_key(group_id, ".s"), size, CHORD_EXPIRES)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(err)
    }

    async fn chord_join(
        &self,
        group_id: &str,
        group_index: u64,
        entry: &ChordEntry,
    ) -> Result<Option<(Vec<ChordEntry>, String)>, BackendError> {
        let token = uuid::Uuid::new_v4().to_string();
        let mut inv = self.chord_join.prepare_invoke();
        for suffix in [".j", ".t", ".s", ".d", "", ".c"] {
            inv.key(chord_key(group_id, suffix));
        }
        inv.arg(&entry.task_id).arg(entry.encode()).arg(group_index).arg(CHORD_EXPIRES).arg(CHORD_CLAIM_TTL).arg(&token);
        let got: Option<Vec<String>> = inv.invoke_async(&mut self.conn.clone()).await.map_err(err)?;
        if got.is_some() {
            Script::new(CHORD_EXTEND)
                .key(chord_key(group_id, ".c"))
                .arg(&token)
                .arg(CHORD_CLAIM_EXTENDED)
                .invoke_async::<i64>(&mut self.conn.clone())
                .await
                .map_err(err)?;
        }
        Ok(got.map(|items| (items.iter().filter_map(|i| ChordEntry::decode(i)).collect(), token)))
    }

    async fn chord_done(&self, group_id: &str, token: &str) -> Result<(), BackendError> {
        let mut inv = self.chord_done.prepare_invoke();
        for suffix in [".j", ".t", ".s", ".d", ".c"] {
            inv.key(chord_key(group_id, suffix));
        }
        inv.arg(token).invoke_async::<i64>(&mut self.conn.clone()).await.map_err(err)?;
        Ok(())
    }
}
