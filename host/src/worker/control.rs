//! Remote control for one worker node: Celery's pidbox commands (`revoke`, `ping`,
//! `registered`, `stats`, `active`, `active_queues`, `revoked`, …) and the revoked set.

use super::Worker;
use crate::protocol::{decode_control, encode_reply, ControlRequest, ResultRecord, State};
use chrono::Utc;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Duration;

/// How long a revoke is remembered (Celery's 3 h `REVOKE_EXPIRES`).
pub const REVOKE_LIFETIME: Duration = Duration::from_secs(3 * 3600);
/// How often the persisted revoked set is re-read (revokes from workers' restarts and
/// from broadcasts this node missed).
const REVOKED_REFRESH: Duration = Duration::from_secs(5);

impl Worker {
    /// Loads the persisted revoked set, then follows control broadcasts.
    pub(super) async fn listen_control(self: Rc<Self>) {
        let mut stream = loop {
            match self.broker.control_stream().await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!("control channel unavailable, retrying: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut refresh = tokio::time::interval(REVOKED_REFRESH);
        loop {
            tokio::select! {
                raw = stream.recv() => {
                    let Some(raw) = raw else { return };
                    match decode_control(&raw) {
                        Ok(req) => self.on_control(req).await,
                        Err(e) => tracing::debug!("ignoring undecodable control message: {e}"),
                    }
                }
                _ = refresh.tick() => self.refresh_revoked().await,
            }
        }
    }

    pub(super) async fn refresh_revoked(&self) {
        match self.broker.revoked().await {
            Ok(ids) => {
                let mut set = self.revoked.borrow_mut();
                set.clear();
                set.extend(ids);
                let now = std::time::Instant::now();
                self.revoked_here.borrow_mut().retain(|_, until| *until > now);
            }
            Err(e) => tracing::warn!("reading revoked tasks failed: {e}"),
        }
    }

    fn tick_clock(&self) -> u64 {
        let c = self.clock.get() + 1;
        self.clock.set(c);
        c
    }

    async fn on_control(&self, req: ControlRequest) {
        let now = Utc::now().timestamp_micros() as f64 / 1e6;
        if !req.is_for(&self.cfg.node_name) || req.is_expired(now) {
            return;
        }
        tracing::debug!(method = %req.method, "control request");
        let reply = match req.method.as_str() {
            "revoke" => self.control_revoke(&req).await,
            "ping" => json!({"ok": "pong"}),
            "registered" => Value::from(self.registry.task_names()),
            "stats" => self.control_stats(),
            "active_queues" => Value::from(
                self.cfg
                    .queues
                    .iter()
                    .map(|q| {
                        json!({"name": q, "exchange": {"name": q, "type": "direct", "durable": true, "auto_delete": false},
                               "routing_key": q, "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
                               "alias": null, "queue_arguments": null, "binding_arguments": null, "bindings": [],
                               "consumer_arguments": null, "expires": null, "message_ttl": null, "max_length": null,
                               "max_length_bytes": null, "max_priority": null})
                    })
                    .collect::<Vec<_>>(),
            ),
            "active" => Value::from(
                self.running.borrow().iter().map(|(id, r)| r.info(id, &self.cfg.node_name, self.pid)).collect::<Vec<_>>(),
            ),
            "reserved" | "scheduled" => json!([]),
            "revoked" => {
                let mut ids: HashSet<String> = self.revoked.borrow().clone();
                ids.extend(self.revoked_here.borrow().keys().cloned());
                Value::from(ids.into_iter().collect::<Vec<_>>())
            }
            "heartbeat" | "enable_events" | "disable_events" => json!({"ok": "ignored: taskhost sends no events yet"}),
            other => json!({"error": format!("No such control command: {other}")}),
        };
        if let Some(reply_to) = &req.reply_to {
            let raw = encode_reply(&self.cfg.node_name, reply, req.ticket.as_deref(), reply_to, self.tick_clock());
            if let Err(e) = self.broker.reply(&reply_to.exchange, &reply_to.routing_key, &raw).await {
                tracing::warn!("control reply failed: {e}");
            }
        }
    }

    fn control_stats(&self) -> Value {
        let stats = self.stats();
        json!({
            "total": stats.per_task,
            "pid": self.pid,
            "clock": self.clock.get(),
            "uptime": self.started.elapsed().as_secs(),
            "pool": {"implementation": "taskhost (wasm sandboxes)", "max-concurrency": self.cfg.concurrency,
                     "processes": [self.pid], "max-tasks-per-child": "N/A", "put-guarded-by-semaphore": false,
                     "timeouts": [0, 0]},
            "prefetch_count": self.cfg.prefetch_limit(),
            "taskhost": {"grant_denials": stats.grant_denials, "dead_lettered": stats.dead_lettered,
                         "releases_refused": self.registry.refused_count()},
            "broker": {"transport": "taskhost"},
            "sw_ident": "taskhost", "sw_ver": env!("CARGO_PKG_VERSION"),
        })
    }

    async fn control_revoke(&self, req: &ControlRequest) -> Value {
        let ids = req.task_ids();
        let terminate = req.arguments.get("terminate").and_then(Value::as_bool).unwrap_or(false);
        let until_here = std::time::Instant::now() + REVOKE_LIFETIME;
        self.revoked_here.borrow_mut().extend(ids.iter().map(|id| (id.clone(), until_here)));
        let until = Utc::now() + chrono::TimeDelta::from_std(REVOKE_LIFETIME).expect("3 h fits");
        if let Err(e) = self.broker.remember_revoked(&ids, until).await {
            tracing::warn!("persisting revokes failed: {e}");
        }
        let mut terminated = Vec::new();
        for id in &ids {
            let running = self.running.borrow().get(id).map(|r| r.control.clone());
            match running {
                Some(control) if terminate => {
                    control.revoke();
                    terminated.push(id.clone());
                }
                // A plain revoke does not stop a running task: its guest sees `is-revoked`.
                Some(control) => control.flag_revoked(),
                None => self.mark_revoked_if_waiting(id).await,
            }
        }
        tracing::info!(ids = ?ids, terminate, "revoked");
        if terminate {
            if terminated.is_empty() {
                json!({"ok": "terminate: tasks unknown"})
            } else {
                json!({"ok": format!("terminate: {}", terminated.join(", "))})
            }
        } else {
            let names: Vec<String> = ids.iter().map(|i| format!("'{i}'")).collect();
            json!({"ok": format!("tasks {{{}}} flagged as revoked", names.join(", "))})
        }
    }

    /// Celery 5.5+: a revoke stores REVOKED at once for a task that has not started.
    async fn mark_revoked_if_waiting(&self, id: &str) {
        let current = self.backend.get(id).await.ok().flatten();
        let waiting = match &current {
            None => true,
            Some(r) => matches!(r.status, State::Pending | State::Received | State::Retry | State::Rejected),
        };
        if waiting {
            let _ = self.backend.store(&ResultRecord::revoked(id, "revoked"), None).await;
        }
    }
}
