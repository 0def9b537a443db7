//! Celery's built-in tasks the worker runs itself, not in a sandbox: `celery.chord_unlock`
//! (chords on backends without a native join) and `celery.backend_cleanup` (result expiry).

use super::*;
use crate::canvas::ChordEntry;
use serde_json::Value;

/// Celery's `result_chord_retry_interval` default: how long a chord_unlock waits between polls.
pub const CHORD_UNLOCK_INTERVAL: f64 = 1.0;
pub const CHORD_UNLOCK: &str = "celery.chord_unlock";
pub const BACKEND_CLEANUP: &str = "celery.backend_cleanup";

/// Whether a task name is one of the built-ins this worker runs natively.
pub fn is_builtin(task: &str) -> bool {
    task == CHORD_UNLOCK || task == BACKEND_CLEANUP
}

/// A chord_unlock's arguments as Celery's `fallback_chord_unlock` sends them:
/// `(group_id, callback)` and `{"result": [[[id, parent], null], …], "interval", "max_retries"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordUnlock {
    pub group_id: String,
    pub callback: crate::protocol::Signature,
    pub members: Vec<String>,
    pub interval: f64,
    pub max_retries: Option<u32>,
}

impl ChordUnlock {
    pub fn parse(args: &[Value], kwargs: &serde_json::Map<String, Value>) -> Result<ChordUnlock, String> {
        let group_id = args.first().and_then(Value::as_str).ok_or("chord_unlock needs the group id as its first argument")?;
        let callback = args.get(1).ok_or("chord_unlock needs the callback signature as its second argument")?;
        let callback: crate::protocol::Signature =
            serde_json::from_value(callback.clone()).map_err(|e| format!("chord_unlock's callback is not a signature: {e}"))?;
        let results = kwargs.get("result").and_then(Value::as_array).ok_or("chord_unlock needs the members as kwargs.result")?;
        // Each is an AsyncResult's `as_tuple()`: `[[id, parent], null]`.
        let members = results
            .iter()
            .map(|r| r.get(0).and_then(|t| t.get(0)).and_then(Value::as_str).map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("chord_unlock's kwargs.result is not a list of result tuples")?;
        Ok(ChordUnlock {
            group_id: group_id.to_string(),
            callback,
            members,
            interval: kwargs.get("interval").and_then(Value::as_f64).unwrap_or(CHORD_UNLOCK_INTERVAL),
            max_retries: kwargs.get("max_retries").and_then(Value::as_u64).map(|n| n.min(u32::MAX as u64) as u32),
        })
    }

    /// The message Celery's producer sends next to a chord's header, due `countdown` seconds on.
    pub fn message(&self, countdown: f64, origin: &str, queue: &str, priority: u8) -> OutgoingTask {
        let id = uuid::Uuid::new_v4().to_string();
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("interval".into(), Value::Null);
        kwargs.insert("max_retries".into(), self.max_retries.map_or(Value::Null, Value::from));
        kwargs.insert("result".into(), Value::Array(self.members.iter().map(|m| canvas::child_tuple(m)).collect()));
        let callback = serde_json::to_value(&self.callback).expect("signatures serialize");
        OutgoingTask {
            task: CHORD_UNLOCK.to_string(),
            id: id.clone(),
            args: vec![Value::from(self.group_id.clone()), callback],
            kwargs,
            embed: Default::default(),
            queue: queue.to_string(),
            priority,
            eta: chrono::TimeDelta::try_milliseconds((countdown * 1000.0) as i64).map(|d| Utc::now() + d),
            expires: None,
            retries: 0,
            root_id: Some(id),
            parent_id: None,
            group: None,
            group_index: None,
            time_limit: (None, None),
            ignore_result: true,
            origin: origin.to_string(),
            extra_headers: Default::default(),
        }
    }
}

impl Worker {
    /// Runs a built-in task; its message is settled when this returns.
    /// Boxed: inline, its state (~4 KB) made every message's handling future larger.
    pub(super) fn run_builtin<'a>(&'a self, delivery: &'a Delivery, decoded: &'a Decoded) -> futures::future::LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let h = &decoded.headers;
            self.stats.borrow_mut().processed += 1;
            match h.task.as_str() {
                CHORD_UNLOCK => self.chord_unlock(delivery, decoded).await,
                BACKEND_CLEANUP => {
                    match self.backend.cleanup().await {
                        Ok(n) => tracing::info!(id = %h.id, rows = n, "backend_cleanup deleted expired results"),
                        Err(e) => tracing::warn!(id = %h.id, "backend_cleanup failed: {e}"),
                    }
                    self.ack(delivery).await;
                }
                other => unreachable!("{other} is not a built-in task"),
            }
        })
    }

    /// Celery's `unlock_chord`: while a member is not ready, polls again `interval` seconds
    /// later (a retry of this message); once all are, publishes the callback with their
    /// results in order, or stores its FAILURE (ChordError) if one failed.
    async fn chord_unlock(&self, delivery: &Delivery, decoded: &Decoded) {
        let h = &decoded.headers;
        let unlock = match ChordUnlock::parse(&decoded.args(), &decoded.kwargs()) {
            Ok(u) => u,
            Err(reason) => {
                tracing::warn!(id = %h.id, "{reason}");
                self.fail_unrunnable(delivery, decoded, "celery.exceptions", "ChordError", reason, true).await;
                return;
            }
        };
        let mut entries = Vec::with_capacity(unlock.members.len());
        let mut pending = None;
        for id in &unlock.members {
            match self.backend.get(id).await {
                Ok(Some(record)) if record.status.is_ready() => {
                    let state = serde_json::to_value(record.status).ok().and_then(|s| s.as_str().map(str::to_string)).unwrap_or_default();
                    entries.push(ChordEntry { task_id: id.clone(), state, result: record.result });
                }
                Ok(_) => {
                    pending = Some(format!("member {id} is not ready"));
                    break;
                }
                Err(e) => {
                    pending = Some(format!("reading member {id}: {e}"));
                    break;
                }
            }
        }
        let lineage = canvas::Lineage { headers: h, origin: &self.cfg.node_name };
        let callback_id = unlock.callback.options.get("task_id").and_then(Value::as_str).map(str::to_string);
        if let Some(why) = pending {
            if unlock.max_retries.is_some_and(|max| h.retries >= max) {
                let exc = ExceptionInfo::new(
                    "celery.exceptions",
                    "ChordError",
                    format!("chord_unlock could not be retried: MaxRetriesExceededError (after {} polls; {why})", h.retries),
                );
                self.fail_chord_callback(decoded, &unlock, callback_id, &exc).await;
                self.ack(delivery).await;
                return;
            }
            // Celery's `self.retry(countdown=interval)`: the same message, one retry more.
            let mut again = unlock.message(unlock.interval, &self.cfg.node_name, &delivery.queue, decoded.priority);
            again.id = h.id.clone();
            again.root_id = h.root_id.clone().or_else(|| Some(h.id.clone()));
            again.retries = h.retries + 1;
            again.kwargs = decoded.kwargs();
            again.extra_headers = crate::protocol::Envelope::parse(&delivery.raw).map(|e| e.headers).unwrap_or_default();
            tracing::debug!(group = %unlock.group_id, retries = again.retries, "chord not ready: {why}");
            if self.publish_task(&again).await {
                self.ack_without_outcome(delivery).await;
            } else {
                self.restore(delivery).await;
            }
            return;
        }
        match canvas::chord_outcome(&entries) {
            Ok(results) => {
                let mut msg = canvas::message_for(&unlock.callback, Some(Value::Array(results)), &lineage, DEFAULT_QUEUE);
                msg.group = Some(unlock.group_id.clone());
                msg.group_index = None;
                tracing::info!(group = %unlock.group_id, callback = %msg.task, id = %msg.id, "chord complete");
                if !self.publish_task(&msg).await {
                    self.restore(delivery).await;
                    return;
                }
            }
            Err(exc) => self.fail_chord_callback(decoded, &unlock, callback_id, &exc).await,
        }
        self.ack(delivery).await;
    }

    async fn fail_chord_callback(&self, decoded: &Decoded, unlock: &ChordUnlock, callback_id: Option<String>, exc: &ExceptionInfo) {
        let id = callback_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        tracing::info!(group = %unlock.group_id, callback = %id, "chord failed: {}", exc.message());
        let mut record = ResultRecord::failure(&id, exc, Some(format!("taskhost: {}", exc.message())));
        record.group_id = Some(unlock.group_id.clone());
        if self.may_write_result_for(decoded, &id).await {
            self.store(record, None).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_celerys_fallback_chord_unlock_sends() {
        // As captured from Celery 5.7 with a database result backend.
        let args: Vec<Value> = serde_json::from_str(
            r#"["b9b0cc28", {"task": "tasks.tsum", "args": [], "kwargs": {}, "options": {"task_id": "ecb2d699", "reply_to": "b1cf", "group_id": "b9b0cc28"}, "subtask_type": null, "immutable": false}]"#,
        )
        .unwrap();
        let kwargs: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"interval": null, "max_retries": null, "result": [[["10a6", null], null], [["36aa", null], null]], "_chord_unlock_exchange_type": "direct"}"#,
        )
        .unwrap();
        let u = ChordUnlock::parse(&args, &kwargs).unwrap();
        assert_eq!(u.group_id, "b9b0cc28");
        assert_eq!(u.callback.task, "tasks.tsum");
        assert_eq!(u.members, vec!["10a6", "36aa"]);
        assert_eq!(u.interval, 1.0);
        assert_eq!(u.max_retries, None);
        let m = u.message(1.0, "me", "celery", 0);
        assert_eq!(m.task, CHORD_UNLOCK);
        assert!(m.eta.is_some());
        assert_eq!(ChordUnlock::parse(&m.args, &m.kwargs).unwrap().members, u.members);
    }

    #[test]
    fn malformed_unlocks_are_refused_with_reasons() {
        assert!(ChordUnlock::parse(&[], &Default::default()).unwrap_err().contains("group id"));
        let args = vec![Value::from("g"), serde_json::json!({"task": "t"})];
        assert!(ChordUnlock::parse(&args, &Default::default()).unwrap_err().contains("kwargs.result"));
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("result".into(), serde_json::json!([1, 2]));
        assert!(ChordUnlock::parse(&args, &kwargs).unwrap_err().contains("result tuples"));
    }
}
