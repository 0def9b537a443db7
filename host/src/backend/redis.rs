//! Redis result backend: `celery-task-meta-<id>` written with SETEX + PUBLISH on the
//! channel of the same name, in one script that first refuses to overwrite a SUCCESS.

use super::{BackendError, ResultBackend};
use crate::protocol::ResultRecord;
use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use std::time::Duration;

pub const KEY_PREFIX: &str = "celery-task-meta-";

/// ARGV: record, expiry seconds (0 = none). Skips when the stored status is SUCCESS.
const STORE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, '"status": *"SUCCESS"') then return 0 end
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('SETEX', KEYS[1], ttl, ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#;

fn err(e: redis::RedisError) -> BackendError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        BackendError::Connection(e.to_string())
    } else {
        BackendError::Command(e.to_string())
    }
}

pub struct RedisBackend {
    client: redis::Client,
    conn: ConnectionManager,
    store: Script,
    expires: Option<Duration>,
}

impl RedisBackend {
    pub async fn connect(url: &str, expires: Option<Duration>) -> Result<Self, BackendError> {
        let client = crate::broker::redis_client(url).map_err(err)?;
        let conn = crate::broker::redis_manager(url, Some(Duration::from_secs(10))).await.map_err(err)?;
        Ok(RedisBackend { client, conn, store: Script::new(STORE), expires })
    }

    fn parse(task_id: &str, raw: &str) -> Result<ResultRecord, BackendError> {
        serde_json::from_str(raw).map_err(|e| BackendError::Corrupt { task_id: task_id.into(), reason: e.to_string() })
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    async fn store(&self, record: &ResultRecord, custom_state: Option<&str>) -> Result<bool, BackendError> {
        let ttl = self.expires.map_or(0, |d| d.as_secs().max(1));
        let written: i64 = self
            .store
            .key(format!("{KEY_PREFIX}{}", record.task_id))
            .arg(record.to_json(custom_state))
            .arg(ttl)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(err)?;
        Ok(written == 1)
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultRecord>, BackendError> {
        let raw: Option<String> = self.conn.clone().get(format!("{KEY_PREFIX}{task_id}")).await.map_err(err)?;
        raw.map(|r| Self::parse(task_id, &r)).transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultRecord, BackendError> {
        let key = format!("{KEY_PREFIX}{task_id}");
        // Subscribe before reading, as Celery does, so no notification falls in between.
        let mut pubsub = self.client.get_async_pubsub().await.map_err(err)?;
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
}
