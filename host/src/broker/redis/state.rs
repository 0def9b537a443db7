//! Redis as the state store beside another transport (RabbitMQ): the Redis broker's own
//! coordination state, plus ETA messages parked here and published on that transport.

use super::{cmd_err, RedisBroker, BEAT_TICKS};
use crate::broker::state::StateStore;
use crate::broker::{Broker, BrokerError, DeadLetter};
use crate::tenant::meter::UsageRow;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use std::time::Duration;

/// Messages parked for another transport: score = due (ms), member =
/// `<uuid> SEP <queue> SEP <priority> SEP <envelope>` (JSON never holds a raw 0x1f).
const PARKED: &str = "taskhost.parked";
const SEP: char = '\x1f';
/// How long a mover's claim on due messages keeps others off them: a mover that dies
/// between claiming and publishing leaves them to the next after this.
const CLAIM_MS: i64 = 60_000;
const MOVE_BATCH: usize = 500;

/// Claims due parked messages: pushes their score past the claim window and returns them.
/// KEYS[1] = parked; ARGV: now (ms), claimed until (ms), batch.
static CLAIM_DUE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], m) end
return due
"#,
    )
});

/// (queue, priority, envelope) of a parked member.
fn split_member(member: &[u8]) -> Option<(String, u8, Vec<u8>)> {
    let text = std::str::from_utf8(member).ok()?;
    let mut fields = text.splitn(4, SEP);
    let (_id, queue, priority, raw) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    Some((queue.to_string(), priority.parse().ok()?, raw.as_bytes().to_vec()))
}

fn member(queue: &str, priority: u8, raw: &[u8]) -> Vec<u8> {
    let mut m = format!("{}{SEP}{queue}{SEP}{priority}{SEP}", uuid::Uuid::new_v4()).into_bytes();
    m.extend_from_slice(raw);
    m
}

#[async_trait]
impl StateStore for RedisBroker {
    async fn park(&self, queue: &str, priority: u8, raw: &[u8], due: DateTime<Utc>) -> Result<(), BrokerError> {
        self.conn().zadd::<_, _, _, ()>(PARKED, member(queue, priority, raw), due.timestamp_millis()).await.map_err(cmd_err)
    }

    async fn move_due(&self, transport: &dyn Broker) -> Result<usize, BrokerError> {
        let mut moved = 0;
        loop {
            let now = Utc::now().timestamp_millis();
            let claimed: Vec<Vec<u8>> = CLAIM_DUE
                .key(PARKED)
                .arg(now)
                .arg(now + CLAIM_MS)
                .arg(MOVE_BATCH)
                .invoke_async(&mut self.conn())
                .await
                .map_err(cmd_err)?;
            if claimed.is_empty() {
                return Ok(moved);
            }
            let n = claimed.len();
            // Each member read once: (member, queue, priority), and the envelopes beside them.
            let mut heads = Vec::with_capacity(n);
            let mut raws = Vec::with_capacity(n);
            for member in claimed {
                match split_member(&member) {
                    Some((queue, priority, raw)) => {
                        heads.push((member, queue, priority));
                        raws.push(raw);
                    }
                    None => {
                        tracing::warn!("a parked entry is not queue/priority/envelope; dropped");
                        self.conn().zrem::<_, _, ()>(PARKED, &member).await.map_err(cmd_err)?;
                    }
                }
            }
            let mut start = 0;
            while start < heads.len() {
                // Runs of one queue and priority go out together, in due order.
                let (queue, priority) = (&heads[start].1, heads[start].2);
                let end = heads[start..].iter().position(|(_, q, p)| q != queue || *p != priority).map_or(heads.len(), |i| start + i);
                if let Err(e) = transport.publish_many(queue, priority, &raws[start..end]).await {
                    // Due again at once for the next pass, not after the claim window.
                    let mut back = redis::pipe();
                    for (member, _, _) in &heads[start..] {
                        back.zadd(PARKED, member, now).ignore();
                    }
                    let _ = back.query_async::<()>(&mut self.conn()).await;
                    return Err(e);
                }
                let sent: Vec<&Vec<u8>> = heads[start..end].iter().map(|(member, _, _)| member).collect();
                self.conn().zrem::<_, _, ()>(PARKED, sent).await.map_err(cmd_err)?;
                moved += end - start;
                start = end;
            }
            if n < MOVE_BATCH {
                return Ok(moved);
            }
        }
    }

    async fn parked(&self, queues: &[String]) -> Result<Vec<Vec<u8>>, BrokerError> {
        let all: Vec<Vec<u8>> = self.conn().zrange(PARKED, 0, -1).await.map_err(cmd_err)?;
        Ok(all.iter().filter_map(|m| split_member(m)).filter(|(q, _, _)| queues.contains(q)).map(|(_, _, raw)| raw).collect())
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        Broker::dead_letter(self, letter).await
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError> {
        Broker::dead_letters(self).await
    }
    async fn newest_dead_letters(&self, limit: usize) -> Result<(Vec<DeadLetter>, usize), BrokerError> {
        Broker::newest_dead_letters(self, limit).await
    }
    async fn remove_dead_letter(&self, letter_id: &str) -> Result<bool, BrokerError> {
        Broker::remove_dead_letter(self, letter_id).await
    }
    async fn remember_revoked(&self, ids: &[String], until: DateTime<Utc>) -> Result<(), BrokerError> {
        Broker::remember_revoked(self, ids, until).await
    }
    async fn revoked(&self) -> Result<Vec<String>, BrokerError> {
        Broker::revoked(self).await
    }
    async fn reserve_rate_slot(&self, key: &str, interval: Duration) -> Result<Duration, BrokerError> {
        Broker::reserve_rate_slot(self, key, interval).await
    }
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        Broker::lease(self, name, holder, ttl).await
    }
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        Broker::release_lease(self, name, holder).await
    }
    async fn claim_tick(&self, entry: &str, due: DateTime<Utc>) -> Result<bool, BrokerError> {
        Broker::claim_tick(self, entry, due).await
    }
    async fn last_tick(&self, entry: &str) -> Result<Option<DateTime<Utc>>, BrokerError> {
        Broker::last_tick(self, entry).await
    }

    /// Claims the tick, then publishes; a publish that fails puts the previous tick back,
    /// so the tick is claimed again next time rather than lost.
    async fn claim_tick_and_publish(
        &self,
        entry: &str,
        due: DateTime<Utc>,
        transport: &dyn Broker,
        queue: &str,
        priority: u8,
        raw: &[u8],
    ) -> Result<bool, BrokerError> {
        let before: Option<i64> = self.conn().hget(BEAT_TICKS, entry).await.map_err(cmd_err)?;
        if !Broker::claim_tick(self, entry, due).await? {
            return Ok(false);
        }
        if let Err(e) = transport.publish(queue, priority, raw).await {
            let mut conn = self.conn();
            let undone: Result<(), _> = match before {
                Some(ms) => conn.hset(BEAT_TICKS, entry, ms).await,
                None => conn.hdel(BEAT_TICKS, entry).await,
            };
            if let Err(undo) = undone {
                tracing::warn!(entry, "could not take back a tick whose message was not sent: {undo}");
            }
            return Err(e);
        }
        Ok(true)
    }
    async fn claim_task_ids(&self, claims: &[(String, String)], ttl: Duration) -> Result<Vec<Option<String>>, BrokerError> {
        Broker::claim_task_ids(self, claims, ttl).await
    }
    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), BrokerError> {
        Broker::add_usage(self, rows).await
    }
    async fn usage(&self, since_hour: i64) -> Result<Vec<UsageRow>, BrokerError> {
        Broker::usage(self, since_hour).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_member_keeps_its_queue_priority_and_envelope() {
        let raw = br#"{"body": "e30=", "headers": {"task": "a\u001fb"}}"#;
        let m = member("media\u{6}heavy", 7, raw);
        assert_eq!(split_member(&m), Some(("media\u{6}heavy".to_string(), 7, raw.to_vec())));
        assert_eq!(split_member(b"no separators"), None);
    }
}
