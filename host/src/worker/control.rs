//! Remote control for one worker node: Celery's pidbox commands (`revoke`, `ping`,
//! `registered`, `stats`, `active`, `active_queues`, `revoked`, …) and the revoked set.

use super::{monitor, Worker};
use crate::protocol::{decode_control, encode_reply, ControlRequest, ResultRecord, State};
use chrono::Utc;
use serde_json::{json, Value};
use super::HashSet;
use std::rc::Rc;
use std::time::Duration;

/// How long a revoke is remembered (Celery's 3 h `REVOKE_EXPIRES`).
pub const REVOKE_LIFETIME: Duration = Duration::from_secs(3 * 3600);
/// How often the persisted revoked set is re-read (revokes from workers' restarts and
/// from broadcasts this node missed).
const REVOKED_REFRESH: Duration = Duration::from_secs(5);

/// Revokes tasks on every worker, as `app.control.revoke` does: remembered on the broker
/// for `lifetime` (so restarting workers skip them too), broadcast (a running task stops
/// with `terminate`), and REVOKED stored at once for those that have not started.
pub async fn revoke_everywhere(
    broker: &dyn crate::broker::Broker,
    backend: &dyn crate::backend::ResultBackend,
    ids: &[String],
    terminate: bool,
    signal: &str,
    lifetime: Duration,
) -> anyhow::Result<()> {
    let until = Utc::now() + chrono::TimeDelta::from_std(lifetime).unwrap_or(chrono::TimeDelta::MAX);
    broker.remember_revoked(ids, until).await?;
    let mut arguments = serde_json::Map::new();
    arguments.insert("task_id".into(), json!(ids));
    arguments.insert("terminate".into(), Value::from(terminate));
    arguments.insert("signal".into(), Value::from(signal));
    crate::observe::inspect::send(broker, "revoke", arguments, None).await?;
    for id in ids {
        if not_started(backend.get(id).await?.as_ref()) {
            backend.store(&ResultRecord::revoked(id, "revoked"), None).await?;
        }
    }
    Ok(())
}

/// Whether a task with this stored record has not started: Celery 5.5+ stores REVOKED
/// at once for such a task when it is revoked.
fn not_started(current: Option<&ResultRecord>) -> bool {
    current.is_none_or(|r| matches!(r.status, State::Pending | State::Received | State::Retry | State::Rejected))
}

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

    async fn on_control(&self, req: ControlRequest) {
        let now = crate::protocol::unix_now();
        if !req.is_for(&self.cfg.node_name) || req.is_expired(now) {
            return;
        }
        if let Some(c) = req.clock {
            self.events.seen_clock(c);
        }
        tracing::debug!(method = %req.method, "control request");
        let reply = match req.method.as_str() {
            "revoke" => self.control_revoke(&req).await,
            "ping" => json!({"ok": "pong"}),
            "registered" => Value::from(self.registry.task_names()),
            "stats" => self.control_stats(),
            "active_queues" => Value::from(
                self.queues
                    .borrow()
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
                self.running.borrow().values().map(|r| r.info(&self.cfg.node_name, self.pid)).collect::<Vec<_>>(),
            ),
            "reserved" => Value::from(
                self.reserved.borrow().values().map(|r| monitor::held_info(&r.delivery, &self.cfg.node_name, self.pid)).collect::<Vec<_>>(),
            ),
            "scheduled" => {
                let now = Utc::now();
                let mut scheduled = self.scheduled.borrow_mut();
                scheduled.retain(|_, (due, _)| *due > now);
                Value::from(
                    scheduled
                        .values()
                        .map(|(due, delivery)| {
                            let info = monitor::held_info(delivery, &self.cfg.node_name, self.pid);
                            let priority = info["delivery_info"]["priority"].clone();
                            json!({"eta": due.to_rfc3339(), "priority": priority, "request": info})
                        })
                        .collect::<Vec<_>>(),
                )
            }
            "query_task" => self.control_query_task(&req),
            "clock" => json!({"clock": self.events.tick()}),
            "conf" => self.control_conf(),
            "rate_limit" => self.control_rate_limit(&req),
            "time_limit" => self.control_time_limit(&req),
            "pool_grow" => self.control_pool(&req, true),
            "pool_shrink" => self.control_pool(&req, false),
            "add_consumer" => self.control_add_consumer(&req),
            "cancel_consumer" => self.control_cancel_consumer(&req),
            "shutdown" => {
                tracing::warn!("shutdown requested by a remote control command");
                self.shutdown_requested.send_replace(true);
                // Celery raises WorkerShutdown here: no reply.
                return;
            }
            "heartbeat" => {
                self.heartbeat_now.notify_one();
                Value::Null
            }
            "enable_events" => {
                let changed = self.events.set_task_events(true);
                if changed {
                    tracing::info!("task events enabled by a remote control command");
                }
                json!({"ok": if changed { "task events enabled" } else { "task events already enabled" }})
            }
            "disable_events" => {
                let changed = self.events.set_task_events(false);
                if changed {
                    tracing::info!("task events disabled by a remote control command");
                }
                json!({"ok": if changed { "task events disabled" } else { "task events already disabled" }})
            }
            "revoked" => {
                let mut ids: HashSet<String> = self.revoked.borrow().clone();
                ids.extend(self.revoked_here.borrow().keys().cloned());
                Value::from(ids.into_iter().collect::<Vec<_>>())
            }
            other => json!({"error": format!("No such control command: {other}")}),
        };
        if let Some(reply_to) = &req.reply_to {
            let raw = encode_reply(&self.cfg.node_name, reply, req.ticket.as_deref(), reply_to, self.events.tick());
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
            "clock": self.events.clock().to_string(),
            "uptime": self.started.elapsed().as_secs(),
            "pool": {"implementation": "taskhost (wasm sandboxes)", "max-concurrency": self.pool_size.get(),
                     "processes": [self.pid], "max-tasks-per-child": "N/A", "put-guarded-by-semaphore": false,
                     "timeouts": [0, 0]},
            "prefetch_count": self.prefetch_limit(),
            "taskhost": {"grant_denials": stats.grant_denials, "dead_lettered": stats.dead_lettered,
                         "releases_refused": self.registry.refused_count()},
            "broker": self.broker_info(),
            "rusage": rusage(),
            "task_events": self.events.task_events(),
            "sw_ident": "taskhost", "sw_ver": env!("CARGO_PKG_VERSION"),
        })
    }

    /// The `broker` block of `stats`, as kombu's `connection.info()` names it.
    fn broker_info(&self) -> Value {
        let url = &self.cfg.broker_url;
        let transport = url.split_once("://").map_or("sqlite", |(scheme, _)| scheme);
        let hostname = url.split_once("://").map(|(_, rest)| rest.rsplit('@').next().unwrap_or(rest)).unwrap_or("");
        let (host, port) = match transport {
            "redis" | "rediss" => {
                let hp = hostname.split('/').next().unwrap_or("");
                match hp.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), p.parse::<u16>().ok()),
                    None => (hp.to_string(), Some(6379)),
                }
            }
            _ => (hostname.to_string(), None),
        };
        json!({"transport": transport, "hostname": host, "port": port, "virtual_host": Value::Null,
               "ssl": transport == "rediss", "heartbeat": 0.0, "insist": false, "login_method": Value::Null,
               "uri_prefix": Value::Null, "connect_timeout": 4, "transport_options": {}})
    }

    fn control_conf(&self) -> Value {
        json!({
            "broker_url": self.cfg.broker_url.clone(),
            "task_queues": self.queues.borrow().clone(),
            "worker_concurrency": self.pool_size.get(),
            "worker_prefetch_multiplier": self.cfg.prefetch_multiplier,
            "worker_send_task_events": self.events.task_events(),
            "task_track_started": self.cfg.track_started,
            "task_acks_late": true,
            "broker_transport_options": {"visibility_timeout": self.cfg.visibility_timeout.as_secs_f64()},
            "worker_hijack_root_logger": false,
        })
    }

    fn control_query_task(&self, req: &ControlRequest) -> Value {
        let ids = match req.id_list("ids") {
            ids if ids.is_empty() => req.task_ids(),
            ids => ids,
        };
        let mut out = serde_json::Map::new();
        for id in ids {
            if let Some(r) = self.running.borrow().get(&id) {
                out.insert(id.clone(), json!(["active", r.info(&self.cfg.node_name, self.pid)]));
            } else if let Some(r) = self.reserved.borrow().get(&id) {
                out.insert(id.clone(), json!(["reserved", monitor::held_info(&r.delivery, &self.cfg.node_name, self.pid)]));
            } else if let Some((_, delivery)) = self.scheduled.borrow().get(&id).filter(|(due, _)| *due > Utc::now()) {
                out.insert(id.clone(), json!(["scheduled", monitor::held_info(delivery, &self.cfg.node_name, self.pid)]));
            }
        }
        Value::Object(out)
    }

    fn known_task(&self, name: &str) -> bool {
        self.registry.task_names().iter().any(|n| n == name)
    }

    fn control_rate_limit(&self, req: &ControlRequest) -> Value {
        let Some(task) = req.arguments.get("task_name").and_then(Value::as_str) else {
            return json!({"error": "rate_limit needs task_name"});
        };
        if !self.known_task(task) {
            return json!({"error": "unknown task"});
        }
        // Celery's forms: "10/s", "100/m", "1000/h", a bare number (per second), or
        // none/0/"" to lift the limit.
        let rate = match req.arguments.get("rate_limit") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => None,
            Some(Value::Number(n)) => Some(format!("{n}/s")),
            Some(Value::String(s)) if s.trim().is_empty() || s.trim() == "0" => None,
            Some(Value::String(s)) if !s.contains('/') => Some(format!("{}/s", s.trim())),
            Some(Value::String(s)) => Some(s.trim().to_string()),
            Some(other) => return json!({"error": format!("Invalid rate limit string: {other}")}),
        };
        match rate {
            None => {
                self.rate_overrides.borrow_mut().insert(task.to_string(), None);
                tracing::info!(task, "rate limit lifted by a remote control command");
                json!({"ok": "rate limit disabled successfully"})
            }
            Some(text) => match text.parse::<crate::registry::RateLimit>() {
                Ok(limit) => {
                    self.rate_overrides.borrow_mut().insert(task.to_string(), Some(limit));
                    tracing::info!(task, rate = %text, "rate limit set by a remote control command");
                    json!({"ok": "new rate limit set successfully"})
                }
                Err(e) => json!({"error": format!("Invalid rate limit string: {e}")}),
            },
        }
    }

    fn control_time_limit(&self, req: &ControlRequest) -> Value {
        let Some(task) = req.arguments.get("task_name").and_then(Value::as_str) else {
            return json!({"error": "time_limit needs task_name"});
        };
        if !self.known_task(task) {
            return json!({"error": "unknown task"});
        }
        let seconds = |key: &str| req.arguments.get(key).and_then(Value::as_f64).filter(|s| s.is_finite() && *s > 0.0);
        let (hard, soft) = (seconds("hard"), seconds("soft"));
        self.time_overrides.borrow_mut().insert(task.to_string(), (hard, soft));
        tracing::info!(task, ?hard, ?soft, "time limits set by a remote control command");
        json!({"ok": "time limits set successfully"})
    }

    fn control_pool(&self, req: &ControlRequest, grow: bool) -> Value {
        let n = req.arguments.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 10_000) as usize;
        if grow {
            // Slots still owed to an earlier shrink are cancelled first.
            let owed = self.shrink_owed.get().min(n);
            self.shrink_owed.set(self.shrink_owed.get() - owed);
            self.slots.add_permits(n - owed);
            self.pool_size.set(self.pool_size.get() + n);
            tracing::info!(concurrency = self.pool_size.get(), "pool grown by a remote control command");
            return json!({"ok": "pool will grow"});
        }
        let n = n.min(self.pool_size.get().saturating_sub(1));
        if n == 0 {
            return json!({"error": "pool cannot shrink below one sandbox"});
        }
        self.pool_size.set(self.pool_size.get() - n);
        // Idle slots go at once; busy ones as their tasks end.
        let gone = self.slots.forget_permits(n);
        self.shrink_owed.set(self.shrink_owed.get() + (n - gone));
        tracing::info!(concurrency = self.pool_size.get(), "pool shrunk by a remote control command");
        json!({"ok": "pool will shrink"})
    }

    fn control_add_consumer(&self, req: &ControlRequest) -> Value {
        let Some(queue) = req.arguments.get("queue").and_then(Value::as_str).filter(|q| !q.is_empty()) else {
            return json!({"error": "add_consumer needs queue"});
        };
        let mut queues = self.queues.borrow_mut();
        if !queues.iter().any(|q| q == queue) {
            queues.push(queue.to_string());
            tracing::info!(queue, "now consuming from a queue added by a remote control command");
        }
        json!({"ok": format!("add consumer {queue}")})
    }

    fn control_cancel_consumer(&self, req: &ControlRequest) -> Value {
        let Some(queue) = req.arguments.get("queue").and_then(Value::as_str) else {
            return json!({"error": "cancel_consumer needs queue"});
        };
        let mut queues = self.queues.borrow_mut();
        if queues.len() == 1 && queues[0] == queue {
            return json!({"error": "cannot stop consuming from the last queue"});
        }
        queues.retain(|q| q != queue);
        tracing::info!(queue, "no longer consuming from a queue, by a remote control command");
        json!({"ok": format!("no longer consuming from {queue}")})
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
        if not_started(current.as_ref()) {
            // Through the result flusher: behind any notice it owes for this task.
            self.store_detached(ResultRecord::revoked(id, "revoked"));
        }
    }
}

/// `getrusage(RUSAGE_SELF)`: this process, all its threads; `None` if the call fails.
fn own_rusage() -> Option<libc::rusage> {
    // SAFETY: getrusage writes into the zeroed struct passed.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    (unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) } == 0).then_some(r)
}

fn secs(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// User and system CPU this process (all its threads) has used so far, in seconds.
pub fn own_cpu_seconds() -> f64 {
    own_rusage().map_or(0.0, |r| secs(r.ru_utime) + secs(r.ru_stime))
}

/// `getrusage(RUSAGE_SELF)` as Celery's `stats` reports it.
fn rusage() -> Value {
    let Some(r) = own_rusage() else {
        return Value::from("N/A");
    };
    json!({"utime": secs(r.ru_utime), "stime": secs(r.ru_stime), "maxrss": r.ru_maxrss, "ixrss": r.ru_ixrss,
           "idrss": r.ru_idrss, "isrss": r.ru_isrss, "minflt": r.ru_minflt, "majflt": r.ru_majflt, "nswap": r.ru_nswap,
           "inblock": r.ru_inblock, "oublock": r.ru_oublock, "msgsnd": r.ru_msgsnd, "msgrcv": r.ru_msgrcv,
           "nsignals": r.ru_nsignals, "nvcsw": r.ru_nvcsw, "nivcsw": r.ru_nivcsw})
}
