//! Periodic tasks: one beat instance at a time cluster-wide (a lease on the broker that a
//! follower takes over when it lapses), each entry's last tick persisted on the broker,
//! so neither a restart nor a second instance skips or double-fires a tick.

pub mod schedule;

pub use schedule::{parse, Entry, ScheduleError, When};

use crate::broker::Broker;
use crate::protocol::{encode_task, OutgoingTask};
use chrono::Utc;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

/// How long the leader's lease lasts; a follower takes over at most this long after the
/// leader dies.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// Ticks missed for at most this long (a failover, a restart) are still sent, one by
/// one; older misses collapse into one run, as Celery's beat does after downtime.
pub const CATCH_UP_WINDOW: Duration = Duration::from_secs(120);
/// How often the leader renews its lease and looks for due entries.
pub const BEAT_TICK: Duration = Duration::from_millis(200);
const LEASE_NAME: &str = "beat";

/// Runs the schedule until `shutdown` resolves. `holder` names this instance in the lease.
pub async fn run(entries: Vec<Entry>, broker: &dyn Broker, holder: &str, origin: &str, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut leading = false;
    let mut last_renew = tokio::time::Instant::now() - LEASE_TTL;
    // The tick each entry last fired for, as far as this instance knows.
    let mut seen: HashMap<String, chrono::DateTime<Utc>> = HashMap::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                if leading {
                    let _ = broker.release_lease(LEASE_NAME, holder).await;
                }
                return;
            }
            _ = tokio::time::sleep(BEAT_TICK) => {}
        }
        if last_renew.elapsed() >= Duration::from_secs(1) || !leading {
            match broker.lease(LEASE_NAME, holder, LEASE_TTL).await {
                Ok(now_leading) => {
                    if now_leading != leading {
                        if now_leading {
                            tracing::info!(holder, "beat: leading; sending periodic tasks");
                        } else {
                            tracing::warn!(holder, "beat: lost the lease; following");
                        }
                    }
                    leading = now_leading;
                    last_renew = tokio::time::Instant::now();
                }
                Err(e) => {
                    tracing::warn!("beat: lease check failed: {e}");
                    leading = false;
                }
            }
        }
        if !leading {
            continue;
        }
        let now = Utc::now();
        for entry in &entries {
            let Some(due) = entry.last_due(now) else { continue };
            if seen.get(&entry.name).is_some_and(|s| *s >= due) {
                continue;
            }
            let last = match broker.last_tick(&entry.name).await {
                Ok(last) => last,
                Err(e) => {
                    tracing::warn!(entry = %entry.name, "beat: reading last tick failed: {e}");
                    continue;
                }
            };
            let first_start = last.is_none();
            let window = chrono::TimeDelta::from_std(CATCH_UP_WINDOW).expect("fits");
            // The tick after the last one sent, if it is recent enough to catch up on.
            let due = match last.and_then(|l| entry.next_due(l)) {
                Some(next) if next < due && now - next <= window => next,
                _ => due,
            };
            if first_start && !entry.fires_on_first_start() {
                match broker.claim_tick(&entry.name, due).await {
                    Ok(true) => tracing::info!(entry = %entry.name, "beat: first start; cron entry waits for its next time"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(entry = %entry.name, "beat: claiming tick failed: {e}");
                        continue;
                    }
                }
            } else if !send(entry, broker, origin, due).await {
                // Neither recorded nor sent: the next turn tries this tick again.
                continue;
            }
            seen.insert(entry.name.clone(), due);
        }
    }
}

/// Claims the tick and sends its message in one broker step, retrying a few times; false
/// if the broker never took it (then the tick is not recorded either, and is tried again).
async fn send(entry: &Entry, broker: &dyn Broker, origin: &str, due: chrono::DateTime<Utc>) -> bool {
    let now = Utc::now();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "taskhost_beat".into(),
        serde_json::json!({"entry": entry.name, "tick": due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)}),
    );
    let id = uuid::Uuid::new_v4().to_string();
    let msg = OutgoingTask {
        task: entry.task.clone(),
        id: id.clone(),
        args: entry.args.clone(),
        kwargs: entry.kwargs.clone(),
        queue: entry.queue.clone(),
        priority: entry.priority,
        expires: entry.expires.and_then(|e| chrono::TimeDelta::from_std(e).ok()).map(|e| now + e),
        origin: origin.to_string(),
        extra_headers: extra,
        ..Default::default()
    };
    let raw = encode_task(&msg);
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=5 {
        match broker.claim_tick_and_publish(&entry.name, due, &entry.queue, entry.priority, &raw).await {
            Ok(true) => {
                tracing::info!(entry = %entry.name, task = %entry.task, id = %id, tick = %due, "beat: sent");
                return true;
            }
            // Another beat instance sent it.
            Ok(false) => return true,
            Err(e) if attempt < 5 => {
                tracing::warn!(entry = %entry.name, "beat: sending failed, retrying: {e}");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(e) => tracing::error!(entry = %entry.name, tick = %due, "beat: tick not sent after 5 attempts, not recorded either (tried again): {e}"),
        }
    }
    false
}
