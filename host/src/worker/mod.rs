//! The consume → execute → ack loop of one worker process: prefetch bounded by the
//! messages it holds, N sandboxes at once, acks after the outcome is stored, ETA parking,
//! expiry, retries, dead letters, visibility refresh and sweeps, and a graceful drain.
//!
//! Single-threaded by design (see design.md, process model): everything here runs on
//! one `LocalSet`, so shared state is `Rc`/`RefCell`, never a lock.

pub mod builtins;
mod consume;
mod control;
mod execute;
mod finish;
mod handle;
mod housekeeping;
mod monitor;
pub mod outcome;
pub mod rate;
pub mod retry;
mod tenancy;
mod writes;

pub use control::{own_cpu_seconds, revoke_everywhere, REVOKE_LIFETIME};

use crate::backend::{BackendError, LateNotices, ResultBackend};
use crate::broker::{Broker, BrokerError, DeadLetter, Delivery};
use crate::canvas;
use crate::ceilings::Ceilings;
use crate::protocol::{self, encode_task, Decoded, ExceptionInfo, OutgoingTask, ResultRecord};
use crate::registry::{AutoRetry, Registry, TaskVersion};
use crate::runtime::{Progress, RunControl, Runtime, SentTask, TaskError, TaskInput, TaskLimits, TaskRun};
use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, Semaphore};

/// Where workflow steps go when their signature names no queue (Celery's task_default_queue).
pub const DEFAULT_QUEUE: &str = "celery";
/// Celery's `worker_prefetch_multiplier`.
pub const DEFAULT_PREFETCH_MULTIPLIER: usize = 4;
/// kombu's `visibility_timeout` default.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a fetch blocks on empty queues: bounds how late a drain starts.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// Longest gap between visibility sweeps: kombu sweeps every 100 s
/// (`unacked_restore_interval` 10 × throttle 10); a shorter timeout sweeps at half of it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(100);
/// How often parked (ETA) messages are checked: the lateness bound of an ETA.
const MOVE_DUE_INTERVAL: Duration = Duration::from_millis(100);
/// Give up storing an outcome after this long; the message stays unacked and is
/// redelivered after the visibility timeout.
const STORE_GIVE_UP: Duration = Duration::from_secs(60);
/// Handlings that end before the worker yields to the runtime, which then reads the
/// broker's replies. While a fetch is out, few: its reply is what keeps the worker fed
/// (no-op drain: 16 → ~62k/s, 4 → ~65k/s, 1 → 58k/s). Otherwise more, so that result
/// writes leave in larger pipelines (yielding every 16 cut the results drain by 12%).
const HANDLED_PER_TURN: usize = 64;
/// Under fair dispatch, the CPU time of the work fetched and not yet started a worker
/// holds at most: a tenant arriving behind another's flood waits about this long for a
/// sandbox, beside the tasks already running.
const FAIR_LOOKAHEAD: Duration = Duration::from_millis(10);
const HANDLED_PER_TURN_FETCHING: usize = 4;
/// Most result records written in one backend call.
const RESULT_BATCH: usize = 256;
/// Most acks sent in one transaction.
const ACK_BATCH: usize = 256;
/// An ETA this close counts as due.
const ETA_SLACK: chrono::TimeDelta = chrono::TimeDelta::milliseconds(5);
/// The memory budget's unit.
const MIB: u64 = 1 << 20;
/// How often a message for a task whose component is still loading looks again.
const LOADING_POLL: Duration = Duration::from_millis(50);
/// How often metered usage goes to the broker (and once more at shutdown).
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// The worker's maps, keyed by task ids and names and looked up several times a task:
/// foldhash (seeded per process) rather than SipHash, which took ~2% of a no-op's CPU.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Messages being handled, polled by `consume` and then by `drain`.
type Handlings = FuturesUnordered<Pin<Box<dyn Future<Output = ()>>>>;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Node name, `name@host`, as Celery shows workers.
    pub node_name: String,
    pub queues: Vec<String>,
    /// Sandboxes running at once.
    pub concurrency: usize,
    pub prefetch_multiplier: usize,
    pub visibility_timeout: Duration,
    /// On shutdown, how long running tasks may finish before they are stopped and requeued.
    pub shutdown_grace: Duration,
    /// Write STARTED before running (Celery's `task_track_started`).
    pub track_started: bool,
    /// Send task events from the start (`-E`); `enable_events` turns them on later.
    pub task_events: bool,
    /// Send worker-online/heartbeat/offline events (Celery's default; `--without-heartbeat`).
    pub heartbeat: bool,
    /// Where this process writes its report for the `--http` listener, if one is on.
    pub report_dir: Option<std::path::PathBuf>,
    /// The broker's URL, password redacted (for `stats` and `conf`).
    pub broker_url: String,
    /// Where `run/<task>` spans go (OTLP/HTTP), if anywhere.
    pub otlp: Option<crate::observe::otlp::Endpoint>,
    /// Celery's `result_extended`: records carry the task's name, args, kwargs, worker,
    /// retries and queue.
    pub result_extended: bool,
}

/// Counts for the banner, `stats` and tests.
#[derive(Debug, Default, Clone)]
pub struct WorkerStats {
    pub processed: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub restored_on_shutdown: u64,
    /// Requests tasks made that their grants did not allow.
    pub grant_denials: u64,
    pub per_task: HashMap<String, u64>,
}

pub struct Worker {
    cfg: WorkerConfig,
    registry: Arc<Registry>,
    runtime: Arc<Runtime>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    slots: Semaphore,
    /// The process's memory budget in MiB (`ceilings.max_process_memory`): a task
    /// reserves its memory cap here before it takes a sandbox slot.
    memory_budget: Semaphore,
    /// Its size, the most one task may reserve.
    memory_budget_mib: u64,
    /// Tags of messages fetched and not yet acked or restored.
    held: RefCell<HashSet<String>>,
    pending_acks: RefCell<Vec<String>>,
    /// Acks held back until the result notices the result flusher owes have gone out:
    /// a message is acked only after its record's notice, so a worker dying in between
    /// never leaves a subscribed client waiting for a notice that no redelivery will send.
    acks_after_notices: RefCell<Vec<String>>,
    /// The result flusher holds notices of written records not sent yet (it sends them
    /// ahead of its next write, or alone if none comes).
    notices_owed: Cell<bool>,
    /// Told when the flusher owes no notices any more.
    notices_sent: Notify,
    /// Records waiting for the result flusher.
    queued_results: RefCell<Vec<QueuedResult>>,
    result_queued: Notify,
    ack_queued: Notify,
    in_progress: Cell<usize>,
    /// Messages whose sandbox is done, waiting for their outcome's write and ack: held
    /// (unacked) too, so bounded, but apart from the prefetch.
    settling: Cell<usize>,
    /// Messages waiting for a rate-limit turn without holding a prefetch slot.
    turn_waiters: Cell<usize>,
    slot_freed: Notify,
    /// What fair dispatch charged (ns of CPU) for the messages here waiting for a sandbox:
    /// fetches under fairness keep it below [`FAIR_LOOKAHEAD`].
    waiting_charge_ns: Cell<u64>,
    /// Fair dispatch is on for this worker's fetches.
    fair: Cell<bool>,
    draining: watch::Sender<bool>,
    /// Set once the grace period ends: a run stopped now is requeued, not REVOKED.
    killing: Cell<bool>,
    /// Set when the drain must not wait out the grace period (the supervisor is gone).
    hurried: Cell<bool>,
    hurry_now: Notify,
    running: RefCell<HashMap<String, RunningTask>>,
    /// Task ids revoked: the broker's persisted set (re-read periodically) and those
    /// received by broadcast (kept here for their lifetime even if persisting failed).
    revoked: RefCell<HashSet<String>>,
    revoked_here: RefCell<HashMap<String, Instant>>,
    rate_limits: rate::RateLimits,
    /// Celery events, and the Lamport clock events and control replies share.
    events: crate::observe::events::EventSink,
    /// Counts for `/metrics`.
    metrics: RefCell<crate::observe::metrics::TaskMetrics>,
    /// Tasks for the dashboard (kept only while reporting).
    recent: RefCell<crate::observe::report::RecentTasks>,
    /// Messages received and not yet started, by task id (`inspect reserved`).
    reserved: RefCell<HashMap<String, monitor::Reserved>>,
    /// ETA messages this node parked, by task id, with their due time (`inspect scheduled`).
    scheduled: RefCell<HashMap<String, (chrono::DateTime<Utc>, Rc<Delivery>)>>,
    /// The queues consumed now (`add_consumer`, `cancel_consumer`).
    queues: RefCell<Vec<String>>,
    /// Sandboxes allowed at once now (`pool_grow`, `pool_shrink`).
    pool_size: Cell<usize>,
    /// Busy slots a `pool_shrink` still has to take away as their tasks end.
    shrink_owed: Cell<usize>,
    /// Rate limits set by `rate_limit` commands, over the manifests' (None: no limit).
    rate_overrides: RefCell<HashMap<String, Option<crate::registry::RateLimit>>>,
    /// Time limits set by `time_limit` commands: (hard, soft) seconds.
    time_overrides: RefCell<HashMap<String, (Option<f64>, Option<f64>)>>,
    heartbeat_now: Notify,
    /// Span exporter (`--otlp-endpoint`), and when each running task started (unix ns).
    tracer: Option<crate::observe::otlp::Exporter>,
    span_starts: RefCell<HashMap<String, u64>>,
    /// Set by a `shutdown` command.
    shutdown_requested: watch::Sender<bool>,
    started: Instant,
    started_unix: f64,
    stats: RefCell<WorkerStats>,
    pid: u32,
    /// The operator's tenants policy (none: every tenant may run everything).
    tenants: Arc<crate::tenant::PolicyHandle>,
    /// Usage metered here and not yet flushed to the broker.
    meter: RefCell<crate::tenant::meter::Meter>,
    /// Tenant concurrency slots held by tasks running here.
    tenant_slots: tenancy::HeldSlots,
    slot_queues: tenancy::SlotQueues,
    usage_cache: RefCell<tenancy::UsageCache>,
    /// Each tenant's recent CPU seconds per task (a moving average), for fair dispatch, and
    /// what its runs used beyond that estimate since the last report.
    tenant_costs: RefCell<HashMap<String, (f64, f64)>>,
    /// The policy whose fairness the broker was last given.
    fairness_of: RefCell<Option<Arc<crate::tenant::Policy>>>,
    /// Task-id claims waiting for the claim flusher.
    queued_claims: RefCell<Vec<tenancy::QueuedClaim>>,
    claim_queued: Notify,
    /// Result key prefixes of tasks being handled here, by task id (their tenant's).
    /// (The prefix, "" for none, and how many handlings of the id are under way.)
    result_prefixes: RefCell<HashMap<String, (String, usize)>>,
    /// Debug builds only: a task name whose handling panics on purpose
    /// (`TASKHOST_FAILPOINT_PANIC_TASK`), so tests can check what a panic leaves behind.
    failpoint_panic: Option<String>,
}

/// A task running here: its control handle and what `inspect active` shows. The message
/// is shared, not copied (its name, queue and arguments were copied for every task, for
/// a listing that is rarely asked for); it is decoded again if someone asks.
struct RunningTask {
    control: Arc<RunControl>,
    delivery: Rc<Delivery>,
    acknowledged: bool,
    started_unix: f64,
}

impl RunningTask {
    fn info(&self, node: &str, pid: u32) -> serde_json::Value {
        monitor::message_info(&self.delivery, self.acknowledged, Some(self.started_unix), node, pid)
    }

    /// Celery's `Request.info()`: what `inspect active/reserved/scheduled` list.
    #[allow(clippy::too_many_arguments)]
    fn request_info(
        id: &str,
        name: &str,
        args: &str,
        kwargs: &str,
        queue: &str,
        priority: u8,
        redelivered: bool,
        acknowledged: bool,
        started_unix: Option<f64>,
        node: &str,
        pid: u32,
    ) -> serde_json::Value {
        let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "id": id, "name": name, "type": name, "args": parse(args), "kwargs": parse(kwargs),
            "hostname": node, "time_start": started_unix, "acknowledged": acknowledged,
            "delivery_info": {"exchange": "", "routing_key": queue, "priority": priority, "redelivered": redelivered},
            "worker_pid": pid,
        })
    }
}

/// Counts a message in `in_progress` (against prefetch) from its fetch until its sandbox
/// is done, then in `settling` (a bound of its own) until its handling ends, however it
/// ends; and what fair dispatch charged for it in `waiting_charge_ns` while it waits to
/// start (not while it waits for its turn).
struct InProgress {
    worker: Rc<Worker>,
    charge_ns: u64,
    waiting: bool,
    settling: bool,
}

impl InProgress {
    fn new(worker: &Rc<Worker>, charge: Option<f64>) -> Self {
        worker.in_progress.set(worker.in_progress.get() + 1);
        let charge_ns = charge.map_or(0, |c| (c.max(0.0) * 1e9) as u64);
        worker.waiting_charge_ns.set(worker.waiting_charge_ns.get() + charge_ns);
        InProgress { worker: worker.clone(), charge_ns, waiting: true, settling: false }
    }

    /// Its sandbox is done; only its outcome's write and ack remain. It stops counting
    /// against the prefetch (the next fetch need not wait for result writes) and counts
    /// against `settling` instead, which has a bound of its own.
    fn settling(&mut self) {
        if !self.settling {
            self.settling = true;
            self.worker.in_progress.set(self.worker.in_progress.get() - 1);
            self.worker.settling.set(self.worker.settling.get() + 1);
            self.worker.slot_freed.notify_one();
        }
    }

    /// Counts its charge as work waiting for a sandbox, or stops counting it.
    fn waiting(&mut self, waiting: bool) {
        if waiting != self.waiting && self.charge_ns > 0 {
            let total = self.worker.waiting_charge_ns.get();
            self.worker.waiting_charge_ns.set(if waiting { total + self.charge_ns } else { total - self.charge_ns });
        }
        self.waiting = waiting;
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.waiting(false);
        if self.settling {
            self.worker.settling.set(self.worker.settling.get() - 1);
        } else {
            self.worker.in_progress.set(self.worker.in_progress.get() - 1);
        }
        self.worker.slot_freed.notify_one();
    }
}

/// A record waiting for the result flusher, and where its outcome goes.
struct QueuedResult {
    record: ResultRecord,
    custom_state: Option<String>,
    done: tokio::sync::oneshot::Sender<StoreOutcome>,
}

/// Whether a queued record was written, or the error with the record, for the writer to
/// retry.
type StoreOutcome = Result<bool, (BackendError, ResultRecord)>;

/// Acks taken off the queue by one flush; handed back unless the broker took them.
struct AcksInFlight<'a> {
    worker: &'a Worker,
    tags: Vec<String>,
}

impl AcksInFlight<'_> {
    fn sent(mut self) {
        self.tags.clear();
    }
}

impl Drop for AcksInFlight<'_> {
    fn drop(&mut self) {
        if !self.tags.is_empty() {
            let mut pending = self.worker.pending_acks.borrow_mut();
            let newer = std::mem::replace(&mut *pending, std::mem::take(&mut self.tags));
            pending.extend(newer);
        }
    }
}

impl Worker {
    pub fn new(
        cfg: WorkerConfig,
        registry: Arc<Registry>,
        runtime: Arc<Runtime>,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
    ) -> Rc<Worker> {
        Self::with_tenants(cfg, registry, runtime, broker, backend, crate::tenant::PolicyHandle::none())
    }

    /// A worker serving under a tenants policy (`serve --tenants`).
    pub fn with_tenants(
        cfg: WorkerConfig,
        registry: Arc<Registry>,
        runtime: Arc<Runtime>,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        tenants: Arc<crate::tenant::PolicyHandle>,
    ) -> Rc<Worker> {
        let budget_mib = runtime.config().ceilings.max_process_memory.div_ceil(MIB).clamp(1, Semaphore::MAX_PERMITS as u64);
        let events = crate::observe::events::EventSink::new(&cfg.node_name, cfg.task_events);
        let (queues, pool_size) = (cfg.queues.clone(), cfg.concurrency.max(1));
        let tracer = cfg.otlp.clone().map(|e| crate::observe::otlp::Exporter::new(e, "taskhost"));
        Rc::new(Worker {
            slots: Semaphore::new(cfg.concurrency.max(1)),
            memory_budget: Semaphore::new(budget_mib as usize),
            memory_budget_mib: budget_mib,
            cfg,
            registry,
            runtime,
            broker,
            backend,
            held: RefCell::default(),
            pending_acks: RefCell::default(),
            acks_after_notices: RefCell::default(),
            notices_owed: Cell::new(false),
            notices_sent: Notify::new(),
            queued_results: RefCell::default(),
            result_queued: Notify::new(),
            ack_queued: Notify::new(),
            in_progress: Cell::new(0),
            settling: Cell::new(0),
            turn_waiters: Cell::new(0),
            slot_freed: Notify::new(),
            waiting_charge_ns: Cell::new(0),
            fair: Cell::new(false),
            draining: watch::channel(false).0,
            killing: Cell::new(false),
            hurried: Cell::new(false),
            hurry_now: Notify::new(),
            running: RefCell::default(),
            revoked: RefCell::default(),
            revoked_here: RefCell::default(),
            rate_limits: rate::RateLimits::default(),
            events,
            metrics: RefCell::default(),
            recent: RefCell::default(),
            reserved: RefCell::default(),
            scheduled: RefCell::default(),
            queues: RefCell::new(queues),
            pool_size: Cell::new(pool_size),
            shrink_owed: Cell::new(0),
            rate_overrides: RefCell::default(),
            time_overrides: RefCell::default(),
            heartbeat_now: Notify::new(),
            tracer,
            span_starts: RefCell::default(),
            shutdown_requested: watch::channel(false).0,
            started: Instant::now(),
            started_unix: crate::protocol::unix_now(),
            stats: RefCell::default(),
            pid: std::process::id(),
            tenants,
            meter: RefCell::default(),
            tenant_slots: Default::default(),
            slot_queues: Default::default(),
            usage_cache: Default::default(),
            result_prefixes: Default::default(),
            queued_claims: Default::default(),
            tenant_costs: Default::default(),
            fairness_of: Default::default(),
            claim_queued: Notify::new(),
            failpoint_panic: if cfg!(debug_assertions) { std::env::var("TASKHOST_FAILPOINT_PANIC_TASK").ok() } else { None },
        })
    }

    /// Messages held at most: the sandboxes allowed now (`pool_grow`/`pool_shrink` move
    /// it) times the prefetch multiplier, as Celery's prefetch count follows its pool.
    fn prefetch_limit(&self) -> usize {
        (self.pool_size.get() * self.cfg.prefetch_multiplier.max(1)).max(1)
    }

    /// Whether a `shutdown` control command stopped this worker.
    pub fn shut_down_by_control(&self) -> bool {
        *self.shutdown_requested.borrow()
    }

    pub fn stats(&self) -> WorkerStats {
        self.stats.borrow().clone()
    }

    fn is_revoked(&self, id: &str) -> bool {
        self.revoked.borrow().contains(id) || self.revoked_here.borrow().contains_key(id)
    }

    /// Revokes a running task (stops it within an epoch tick); false if it is not running here.
    pub fn terminate(&self, task_id: &str) -> bool {
        match self.running.borrow().get(task_id) {
            Some(running) => {
                running.control.revoke();
                true
            }
            None => false,
        }
    }

    /// Consumes until `shutdown` resolves, then drains. Must run inside a `LocalSet`.
    pub async fn run(self: Rc<Self>, shutdown: impl Future<Output = ()>) -> WorkerStats {
        self.refresh_revoked().await;
        self.keep_fairness().await;
        let housekeeping = tokio::task::spawn_local(self.clone().housekeeping());
        let control = tokio::task::spawn_local(self.clone().listen_control());
        let acks = tokio::task::spawn_local(self.clone().ack_flusher());
        let results = tokio::task::spawn_local(self.clone().result_flusher());
        let claims = tokio::task::spawn_local(self.clone().claim_flusher());
        let events = tokio::task::spawn_local(self.clone().event_flusher());
        let spans = tokio::task::spawn_local(self.clone().span_exporter());
        self.send_worker_event("worker-online").await;
        let heartbeats = tokio::task::spawn_local(self.clone().heartbeats());
        let report = tokio::task::spawn_local(self.clone().report_writer());
        let (stop_tx, stop_rx) = watch::channel(false);
        // Joined, not raced: a fetch in flight is never cancelled, because a BRPOP
        // abandoned on the server would still pop (and lose) the next message.
        let ((), tasks) = tokio::join!(
            async {
                let mut asked = self.shutdown_requested.subscribe();
                tokio::select! {
                    _ = shutdown => {}
                    _ = asked.wait_for(|a| *a) => tracing::warn!("shutdown requested by a remote control command"),
                }
                // No new task starts from here on; held ones go back as they reach a slot.
                self.draining.send_replace(true);
                let _ = stop_tx.send(true);
                self.slot_freed.notify_one();
            },
            self.clone().consume(stop_rx)
        );
        self.drain(tasks).await;
        // Every handling has ended, so no record is waiting for the result flusher; the
        // notices it still owes go out before the acks held back for them.
        self.wait_for_notices().await;
        results.abort();
        claims.abort();
        acks.abort();
        // Resolves once the flusher is dropped, so a flush it had in flight has handed
        // its tags back before the final flush.
        let _ = acks.await;
        self.flush_acks().await;
        housekeeping.abort();
        self.flush_usage().await;
        control.abort();
        events.abort();
        let _ = events.await;
        self.events.flush(self.broker.as_ref()).await;
        heartbeats.abort();
        self.send_worker_event("worker-offline").await;
        report.abort();
        self.remove_report();
        spans.abort();
        if let Some(tracer) = &self.tracer {
            tracer.flush().await;
        }
        self.stats()
    }
}

/// Manifest limits, overridden by the message's `timelimit` header as Celery does, but
/// never past the operator's ceiling: a producer cannot buy a task more time than that.
fn limits_for(task: &TaskVersion, header: (Option<f64>, Option<f64>), ceilings: &Ceilings) -> TaskLimits {
    let mut limits = task.limits();
    if let Some(hard) = header.0.and_then(|h| ceilings.clamp_message_time(h)) {
        limits.hard = hard;
    }
    if let Some(soft) = header.1.and_then(|s| ceilings.clamp_message_time(s)) {
        limits.soft = Some(soft);
    }
    limits
}

/// `group_id` and `parent_id`, as Celery adds them to records.
impl Worker {
    /// The fields a record takes from its message: group and parent, and with
    /// `result_extended` Celery's name, args, kwargs, worker, retries and queue.
    fn link_fields(&self, record: &mut ResultRecord, decoded: &Decoded) {
        // Wrong only for a task ended before it started (revoked, expired), whose key the
        // backend then creates all the same.
        record.replaces_started = self.cfg.track_started && record.status != protocol::State::Started;
        record.group_id = decoded.headers.group.clone();
        record.parent_id = decoded.headers.parent_id.clone();
        record.reply_to = decoded.reply_to.clone();
        if self.cfg.result_extended {
            let h = &decoded.headers;
            let ext = &mut record.extended;
            ext.insert("name".into(), h.task.clone().into());
            ext.insert("args".into(), decoded.args().into());
            ext.insert("kwargs".into(), decoded.kwargs().into());
            ext.insert("worker".into(), self.cfg.node_name.clone().into());
            ext.insert("retries".into(), h.retries.into());
            ext.insert("queue".into(), decoded.queue.clone().into());
        }
    }
}
