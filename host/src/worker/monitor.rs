//! What the worker tells its watchers at each step of a task: Celery events, the metrics
//! `/metrics` serves, the dashboard's recent tasks; worker heartbeats and the report file.

use super::*;
use crate::observe::metrics::{exception_label, PluginInfo, ProcessMetrics, MEMORY_BUCKETS, QUEUE_WAIT_BUCKETS, RUNTIME_BUCKETS};
use crate::observe::report::{self, RecentTask, WorkerReport};
use crate::protocol::events::{result_repr, truncated, TaskEvent, RESULT_REPR_MAX};

/// Distinct `exception` labels kept per task series.
const MAX_EXCEPTION_LABELS: usize = 32;

/// Longest traceback an event carries.
const TRACEBACK_MAX: usize = 8 * 1024;


fn unix_nanos() -> u64 {
    Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0) as u64
}

/// Most parked messages `inspect scheduled` lists per process (each is kept in memory).
const SCHEDULED_LISTED: usize = 1_000;

/// A message received and not yet started: what `inspect reserved` lists. Only the
/// message is kept (shared, not copied); it is decoded again if someone asks.
pub(super) struct Reserved {
    pub delivery: Rc<Delivery>,
    pub received: Instant,
}

/// Celery's `Request.info()` of a message held here and not running.
pub(super) fn held_info(delivery: &Delivery, node: &str, pid: u32) -> serde_json::Value {
    message_info(delivery, false, None, node, pid)
}

/// Celery's `Request.info()` of a message held here, running (`started_unix`) or not.
pub(super) fn message_info(delivery: &Delivery, acknowledged: bool, started_unix: Option<f64>, node: &str, pid: u32) -> serde_json::Value {
    match protocol::decode(&delivery.raw) {
        Ok(d) => RunningTask::request_info(
            &d.headers.id,
            &d.headers.task,
            &d.args_json,
            &d.kwargs_json,
            &delivery.queue,
            d.priority,
            d.headers.redelivered,
            acknowledged,
            started_unix,
            node,
            pid,
        ),
        Err(_) => serde_json::Value::Null,
    }
}

/// Takes a message off the reserved list however its handling leaves the admission stage.
pub(super) struct ReservedGuard<'a> {
    worker: &'a Worker,
    id: &'a str,
}

impl Drop for ReservedGuard<'_> {
    fn drop(&mut self) {
        self.worker.reserved.borrow_mut().remove(self.id);
    }
}

impl Worker {
    fn recent(&self, id: &str, update: impl FnOnce(&mut RecentTask)) {
        if self.cfg.report_dir.is_some() {
            if let Some(t) = self.recent.borrow_mut().get_mut(id) {
                update(t);
            }
        }
    }

    pub(super) fn on_received<'a>(&'a self, delivery: &Rc<Delivery>, decoded: &'a Decoded) -> ReservedGuard<'a> {
        let h = &decoded.headers;
        self.metrics.borrow_mut().series(&delivery.queue, &h.task).received += 1;
        if self.events.task_events() {
            self.events.task(&TaskEvent::Received {
                uuid: &h.id,
                name: &h.task,
                // The producer's reprs where it sent them (an app may hide secrets there),
                // cut as Celery cuts them.
                args: truncated(h.argsrepr.clone().unwrap_or_else(|| protocol::args_repr(&decoded.args())), RESULT_REPR_MAX),
                kwargs: truncated(h.kwargsrepr.clone().unwrap_or_else(|| protocol::kwargs_repr(&decoded.kwargs())), RESULT_REPR_MAX),
                root_id: h.root_id.as_deref(),
                parent_id: h.parent_id.as_deref(),
                retries: h.retries,
                eta: h.eta.map(|e| e.to_rfc3339()),
                expires: h.expires.map(|e| e.to_rfc3339()),
            });
        }
        if self.cfg.report_dir.is_some() {
            self.recent.borrow_mut().push(RecentTask {
                id: h.id.clone(),
                name: h.task.clone(),
                version: None,
                state: "RECEIVED".into(),
                queue: delivery.queue.clone(),
                tenant: h.tenant.clone(),
                worker: self.cfg.node_name.clone(),
                received: crate::protocol::unix_now(),
                started: None,
                runtime: None,
                error: None,
            });
        }
        self.reserved.borrow_mut().insert(h.id.clone(), Reserved { delivery: delivery.clone(), received: Instant::now() });
        ReservedGuard { worker: self, id: &h.id }
    }

    /// An ETA message parked on the broker by this node: `inspect scheduled` lists it
    /// until its time comes.
    pub(super) fn on_parked(&self, decoded: &Decoded, eta: chrono::DateTime<Utc>) {
        let Some(reserved) = self.reserved.borrow_mut().remove(&decoded.headers.id) else { return };
        let mut scheduled = self.scheduled.borrow_mut();
        if scheduled.len() >= SCHEDULED_LISTED {
            let now = Utc::now();
            scheduled.retain(|_, (due, _)| *due > now);
        }
        // Past the cap a parked message is still parked, only not listed here.
        if scheduled.len() < SCHEDULED_LISTED {
            scheduled.insert(decoded.headers.id.clone(), (eta, reserved.delivery));
        }
    }

    pub(super) fn on_started(&self, delivery: &Delivery, decoded: &Decoded, version: &str) {
        let h = &decoded.headers;
        let waited = self.reserved.borrow_mut().remove(&h.id).map(|r| r.received.elapsed());
        {
            let mut metrics = self.metrics.borrow_mut();
            let series = metrics.series(&delivery.queue, &h.task);
            series.started += 1;
            if let Some(w) = waited {
                series.queue_wait.observe(QUEUE_WAIT_BUCKETS, w.as_secs_f64());
            }
        }
        self.events.task(&TaskEvent::Started { uuid: &h.id });
        if self.tracer.is_some() {
            self.span_starts.borrow_mut().insert(h.id.clone(), unix_nanos());
        }
        self.recent(&h.id, |t| {
            t.state = "STARTED".into();
            t.started = Some(crate::protocol::unix_now());
            t.version = Some(version.to_string());
        });
    }

    /// What every run feeds whatever its outcome: version, memory, limits hit, denials.
    pub(super) fn on_run_end(&self, queue: &str, task: &str, version: &str, run: &TaskRun) {
        let outcome = match &run.result {
            Ok(_) => "succeeded",
            Err(TaskError::Retry { .. }) => "retried",
            Err(TaskError::Revoked) => "revoked",
            Err(TaskError::Reject { .. }) => "rejected",
            Err(_) => "failed",
        };
        let mut metrics = self.metrics.borrow_mut();
        let series = metrics.series(queue, task);
        match series.runs.get_mut(version) {
            Some(outcomes) => match outcomes.get_mut(outcome) {
                Some(count) => *count += 1,
                None => {
                    outcomes.insert(outcome.to_string(), 1);
                }
            },
            None => {
                series.runs.insert(version.to_string(), [(outcome.to_string(), 1)].into_iter().collect());
            }
        }
        if run.memory_high_water > 0 {
            series.memory_high_water.observe(MEMORY_BUCKETS, run.memory_high_water as f64);
        }
        match &run.result {
            Err(TaskError::TimeLimit { .. }) => series.time_limit_hits += 1,
            Err(TaskError::MemoryLimit { .. }) => series.memory_limit_hits += 1,
            _ => {}
        }
        series.grant_denials += u64::from(run.denials);
    }

    pub(super) fn on_succeeded(&self, queue: &str, decoded: &Decoded, value: &serde_json::Value, runtime: Duration) {
        let h = &decoded.headers;
        {
            let mut metrics = self.metrics.borrow_mut();
            let series = metrics.series(queue, &h.task);
            series.succeeded += 1;
            series.runtime.observe(RUNTIME_BUCKETS, runtime.as_secs_f64());
        }
        self.end_span(queue, decoded, "SUCCESS", None);
        if self.events.task_events() {
            self.events.task(&TaskEvent::Succeeded { uuid: &h.id, result: result_repr(value), runtime: runtime.as_secs_f64() });
        }
        self.recent(&h.id, |t| {
            t.state = "SUCCESS".into();
            t.runtime = Some(runtime.as_secs_f64());
        });
    }

    pub(super) fn on_failed(&self, queue: &str, decoded: &Decoded, exc: &ExceptionInfo, traceback: &str) {
        let h = &decoded.headers;
        let repr = exc.repr();
        self.end_span(queue, decoded, "FAILURE", Some(repr.clone()));
        {
            let mut metrics = self.metrics.borrow_mut();
            let failed = &mut metrics.series(queue, &h.task).failed;
            // Exception names can come from guest code: a few dozen per task, then `_other`.
            let mut label = exception_label(&repr);
            if failed.len() >= MAX_EXCEPTION_LABELS && !failed.contains_key(&label) {
                label = crate::observe::metrics::OVERFLOW_NAME.to_string();
            }
            *failed.entry(label).or_default() += 1;
        }
        if self.events.task_events() {
            let traceback = truncated(traceback.to_string(), TRACEBACK_MAX);
            self.events.task(&TaskEvent::Failed { uuid: &h.id, exception: truncated(repr.clone(), RESULT_REPR_MAX), traceback });
        }
        self.recent(&h.id, |t| {
            t.state = "FAILURE".into();
            t.runtime = t.started.map(|s| (crate::protocol::unix_now() - s).max(0.0));
            t.error = Some(repr);
        });
    }

    pub(super) fn on_retried(&self, queue: &str, decoded: &Decoded, reason: &str) {
        let h = &decoded.headers;
        self.metrics.borrow_mut().series(queue, &h.task).retried += 1;
        self.end_span(queue, decoded, "RETRY", None);
        if self.events.task_events() {
            let exception = truncated(format!("Retry({})", protocol::python_repr(&serde_json::Value::from(reason))), RESULT_REPR_MAX);
            self.events.task(&TaskEvent::Retried { uuid: &h.id, exception, traceback: String::new() });
        }
        self.recent(&h.id, |t| {
            t.state = "RETRY".into();
            t.error = Some(reason.to_string());
        });
    }

    pub(super) fn on_revoked(&self, queue: &str, decoded: &Decoded, terminated: bool, expired: bool) {
        let h = &decoded.headers;
        self.metrics.borrow_mut().series(queue, &h.task).revoked += 1;
        self.end_span(queue, decoded, "REVOKED", None);
        let signum = terminated.then_some(libc::SIGTERM);
        self.events.task(&TaskEvent::Revoked { uuid: &h.id, terminated, signum, expired });
        self.recent(&h.id, |t| t.state = "REVOKED".into());
    }

    pub(super) fn on_rejected(&self, queue: &str, decoded: &Decoded) {
        let h = &decoded.headers;
        self.metrics.borrow_mut().series(queue, &h.task).rejected += 1;
        self.events.task(&TaskEvent::Rejected { uuid: &h.id, requeue: false });
    }

    pub(super) fn on_sent(&self, queue: &str, task: &str) {
        self.metrics.borrow_mut().series(queue, task).sent += 1;
    }

    pub(super) fn on_dead_letter(&self, queue: &str, task: Option<&str>) {
        self.metrics.borrow_mut().series(queue, task.unwrap_or("unknown")).dead_letters += 1;
    }

    pub(super) fn on_rate_limit_wait(&self, queue: &str, task: &str, waited: Duration) {
        let mut metrics = self.metrics.borrow_mut();
        let series = metrics.series(queue, task);
        series.rate_limit_waits += 1;
        series.rate_limit_wait_seconds += waited.as_secs_f64();
    }

    /// The task's `run/<task>` span ends (if it started here and spans are exported).
    fn end_span(&self, queue: &str, decoded: &Decoded, state: &str, error: Option<String>) {
        let Some(tracer) = &self.tracer else { return };
        let h = &decoded.headers;
        let Some(start) = self.span_starts.borrow_mut().remove(&h.id) else { return };
        tracer.finish(&crate::observe::otlp::TaskSpan {
            parent: h.traceparent.as_deref().and_then(crate::observe::otlp::parse_traceparent),
            task: &h.task,
            task_id: &h.id,
            queue,
            state,
            retries: h.retries,
            hostname: &self.cfg.node_name,
            start_unix_nanos: start,
            end_unix_nanos: unix_nanos(),
            error,
        });
    }

    pub(super) async fn span_exporter(self: Rc<Self>) {
        if let Some(tracer) = &self.tracer {
            tracer.run().await;
        }
    }

    /// Task events waiting in the sink go out in batches until the worker stops.
    pub(super) async fn event_flusher(self: Rc<Self>) {
        loop {
            self.events.wait_for_batch().await;
            self.events.flush(self.broker.as_ref()).await;
        }
    }

    pub(super) async fn send_worker_event(&self, kind: &'static str) {
        if !self.cfg.heartbeat {
            return;
        }
        let (active, processed) = (self.running.borrow().len(), self.stats.borrow().processed);
        self.events.worker(self.broker.as_ref(), kind, active, processed).await;
    }

    /// `worker-heartbeat` every [`HEARTBEAT_FREQ`] (and at once on a `heartbeat` command).
    pub(super) async fn heartbeats(self: Rc<Self>) {
        let mut every = tokio::time::interval(crate::observe::events::HEARTBEAT_FREQ);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = self.heartbeat_now.notified() => {}
            }
            self.send_worker_event("worker-heartbeat").await;
        }
    }

    fn report(&self) -> WorkerReport {
        let stats = self.stats.borrow();
        let (hits, misses) = crate::runtime::compile_cache_counts();
        let plugins = self
            .registry
            .all()
            .iter()
            .map(|tv| PluginInfo { name: tv.name.clone(), version: tv.version.to_string(), digest: tv.component.digest.clone() })
            .collect();
        WorkerReport {
            node: self.cfg.node_name.clone(),
            pid: self.pid,
            started_at: self.started_unix,
            written_at: crate::protocol::unix_now(),
            concurrency: self.pool_size.get(),
            queues: self.queues.borrow().clone(),
            task_events: self.events.task_events(),
            processed: stats.processed,
            succeeded: stats.succeeded,
            failed: stats.failed,
            metrics: ProcessMetrics {
                node: self.cfg.node_name.clone(),
                active: self.running.borrow().len(),
                tasks: self.metrics.borrow().clone(),
                plugins,
                releases_refused: self.registry.refused_count(),
                compile_cache_hits: hits,
                compile_cache_misses: misses,
            },
            recent: self.recent.borrow().to_vec(),
        }
    }

    /// Rewrites this process's report for the `--http` listener every second.
    pub(super) async fn report_writer(self: Rc<Self>) {
        let Some(dir) = self.cfg.report_dir.clone() else { return };
        let mut every = tokio::time::interval(report::REPORT_INTERVAL);
        loop {
            every.tick().await;
            if let Err(e) = report::write_report(&dir, &self.report()) {
                tracing::debug!("writing the worker report failed: {e}");
            }
        }
    }

    pub(super) fn remove_report(&self) {
        if let Some(dir) = &self.cfg.report_dir {
            let _ = std::fs::remove_file(report::report_path(dir, self.pid));
        }
    }
}
