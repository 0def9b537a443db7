//! The consume → execute → ack loop of one worker process: prefetch bounded by the
//! messages it holds, N sandboxes at once, acks after the outcome is stored, ETA parking,
//! expiry, retries, dead letters, visibility refresh and sweeps, and a graceful drain.
//!
//! Single-threaded by design (see design.md, process model): everything here runs on
//! one `LocalSet`, so shared state is `Rc`/`RefCell`, never a lock.

mod control;
pub mod outcome;
pub mod rate;
pub mod retry;
mod tenancy;

pub use control::REVOKE_LIFETIME;

use crate::backend::{BackendError, ResultBackend};
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
use std::collections::{HashMap, HashSet};
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
/// kombu sweeps every 100 s (`unacked_restore_interval` 10 × throttle 10).
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
}

impl WorkerConfig {
    pub fn prefetch_limit(&self) -> usize {
        (self.concurrency * self.prefetch_multiplier.max(1)).max(1)
    }
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
    /// Records waiting for the result flusher.
    queued_results: RefCell<Vec<QueuedResult>>,
    result_queued: Notify,
    ack_queued: Notify,
    in_progress: Cell<usize>,
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
    /// Lamport clock for control replies.
    clock: Cell<u64>,
    started: Instant,
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

/// A task running here: its control handle and what `inspect active` shows.
struct RunningTask {
    control: Arc<RunControl>,
    name: String,
    queue: String,
    priority: u8,
    redelivered: bool,
    acknowledged: bool,
    /// JSON text, as handed to the guest.
    args: String,
    kwargs: String,
    started_unix: f64,
}

impl RunningTask {
    fn info(&self, id: &str, node: &str, pid: u32) -> serde_json::Value {
        let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "id": id, "name": self.name, "type": self.name, "args": parse(&self.args), "kwargs": parse(&self.kwargs),
            "hostname": node, "time_start": self.started_unix, "acknowledged": self.acknowledged,
            "delivery_info": {"exchange": "", "routing_key": self.queue, "priority": self.priority,
                              "redelivered": self.redelivered},
            "worker_pid": pid,
        })
    }
}

/// Counts a message in `in_progress` (against prefetch) from its fetch until its
/// handling ends, however it ends; and what fair dispatch charged for it in
/// `waiting_charge_ns` while it waits to start (not while it waits for its turn).
struct InProgress {
    worker: Rc<Worker>,
    charge_ns: u64,
    waiting: bool,
}

impl InProgress {
    fn new(worker: &Rc<Worker>, charge: Option<f64>) -> Self {
        worker.in_progress.set(worker.in_progress.get() + 1);
        let charge_ns = charge.map_or(0, |c| (c.max(0.0) * 1e9) as u64);
        worker.waiting_charge_ns.set(worker.waiting_charge_ns.get() + charge_ns);
        InProgress { worker: worker.clone(), charge_ns, waiting: true }
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
        self.worker.in_progress.set(self.worker.in_progress.get() - 1);
        self.worker.slot_freed.notify_one();
    }
}

/// A record waiting for the result flusher, and where its outcome goes.
struct QueuedResult {
    record: ResultRecord,
    custom_state: Option<String>,
    done: tokio::sync::oneshot::Sender<Result<bool, BackendError>>,
}

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
            queued_results: RefCell::default(),
            result_queued: Notify::new(),
            ack_queued: Notify::new(),
            in_progress: Cell::new(0),
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
            clock: Cell::new(0),
            started: Instant::now(),
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
        let (stop_tx, stop_rx) = watch::channel(false);
        // Joined, not raced: a fetch in flight is never cancelled, because a BRPOP
        // abandoned on the server would still pop (and lose) the next message.
        let ((), tasks) = tokio::join!(
            async {
                shutdown.await;
                // No new task starts from here on; held ones go back as they reach a slot.
                self.draining.send_replace(true);
                let _ = stop_tx.send(true);
                self.slot_freed.notify_one();
            },
            self.clone().consume(stop_rx)
        );
        self.drain(tasks).await;
        // Every handling has ended, so no record is waiting for the result flusher.
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
        self.stats()
    }

    /// Fetches while there is room and runs what it fetched. Handlings are polled here,
    /// not spawned: a `LocalSet` runs up to 61 tasks before the runtime looks at its
    /// sockets again, which put ~3 ms between asking for more messages and getting
    /// them, longer than the default prefetch lasts when tasks take microseconds (the
    /// cores sat 15% idle in the no-op drain). Yielding every few handlings
    /// ([`HANDLED_PER_TURN_FETCHING`]) lets the broker's replies in that much sooner.
    async fn consume(self: Rc<Self>, mut stop: watch::Receiver<bool>) -> Handlings {
        let mut handlings = Handlings::new();
        let mut queues = self.cfg.queues.clone();
        let mut backoff = Duration::from_millis(100);
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut fetching: Option<Pin<Box<dyn Future<Output = Result<Vec<Delivery>, BrokerError>>>>> = None;
        let mut handled_this_turn = 0;
        loop {
            let stopping = *stop.borrow();
            if fetching.is_none() {
                if stopping {
                    break;
                }
                let room = self.cfg.prefetch_limit().saturating_sub(self.in_progress.get());
                // Refill in batches: fetching one message each time one finishes would cost
                // a broker round trip per task. An idle worker (nothing held) fetches at once.
                let low_water = (self.cfg.prefetch_limit() / 2).max(1);
                let idle = self.in_progress.get() == 0;
                let mut wanted = room > 0 && (room >= low_water || idle);
                // Under fair dispatch, no more than a little work waits here: what waits
                // here was handed out in the order of its turn, and a tenant arriving now
                // would queue behind all of it.
                let mut budget = f64::INFINITY;
                if self.fair.get() {
                    let waiting = Duration::from_nanos(self.waiting_charge_ns.get());
                    wanted &= idle || waiting < FAIR_LOOKAHEAD / 2;
                    budget = FAIR_LOOKAHEAD.saturating_sub(waiting).as_secs_f64();
                }
                if wanted && retry_at.is_none() {
                    let (broker, keys) = (self.broker.clone(), queues.clone());
                    fetching = Some(Box::pin(async move { broker.fetch_within(&keys, room, budget, FETCH_WAIT).await }));
                }
            }
            // A fetch in flight is never dropped, only awaited: a BRPOP abandoned on the
            // server would still pop (and lose) the next message.
            tokio::select! {
                got = async { fetching.as_mut().expect("guarded").await }, if fetching.is_some() => {
                    fetching = None;
                    match got {
                        Ok(deliveries) => {
                            backoff = Duration::from_millis(100);
                            for d in deliveries {
                                if let Some(tag) = &d.tag {
                                    self.held.borrow_mut().insert(tag.clone());
                                }
                                handlings.push(self.clone().handling(d));
                            }
                            // Round robin across queues, as kombu does.
                            if queues.len() > 1 {
                                queues.rotate_left(1);
                            }
                        }
                        Err(e) => {
                            tracing::warn!("fetch failed, retrying in {:?}: {e}", backoff);
                            retry_at = Some(tokio::time::Instant::now() + backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                Some(()) = handlings.next(), if !handlings.is_empty() => {
                    handled_this_turn += 1;
                    let per_turn = if fetching.is_some() { HANDLED_PER_TURN_FETCHING } else { HANDLED_PER_TURN };
                    if handled_this_turn >= per_turn {
                        handled_this_turn = 0;
                        tokio::task::yield_now().await;
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                    retry_at = None;
                }
                // A handling waiting for its rate-limit turn frees its slot without ending.
                _ = self.slot_freed.notified() => {}
                _ = stop.changed(), if !stopping => {}
            }
        }
        handlings
    }

    /// One message's handling, as `consume` and `drain` poll it: counted while it lasts.
    /// A panic in it is caught and the message dead-lettered with the reason: handing it
    /// back would only run into the same panic at every redelivery, forever.
    fn handling(self: Rc<Self>, delivery: Delivery) -> Pin<Box<dyn Future<Output = ()>>> {
        let counted = InProgress::new(&self, delivery.charge);
        let delivery = Rc::new(delivery);
        let worker = self.clone();
        let caught = std::panic::AssertUnwindSafe(self.handle(delivery.clone(), counted)).catch_unwind();
        Box::pin(async move {
            if let Err(payload) = caught.await {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                worker.after_panic(&delivery, &what).await;
            }
        })
    }

    /// What a panicked handling leaves: no running entry, a dead letter with the reason,
    /// a FAILURE for the task, and the message acked (or handed back if no letter could
    /// be written, so it is never lost).
    async fn after_panic(&self, delivery: &Delivery, what: &str) {
        let decoded = protocol::decode(&delivery.raw).ok();
        if let Some(d) = &decoded {
            self.running.borrow_mut().remove(&d.headers.id);
        }
        let reason = format!("the worker panicked handling this message: {what}");
        tracing::error!(queue = %delivery.queue, id = ?decoded.as_ref().map(|d| &d.headers.id), "{reason}; dead-lettered");
        if !self.dead_letter(delivery, decoded.as_ref(), reason.clone()).await {
            self.restore(delivery).await;
            return;
        }
        if let Some(d) = &decoded {
            if d.headers.ignore_result != Some(true) {
                let exc = ExceptionInfo::new(outcome::TASKHOST_MODULE, "WorkerPanic", reason.as_str());
                let mut record = ResultRecord::failure(&d.headers.id, &exc, Some(format!("taskhost: {reason}")));
                link_fields(&mut record, d);
                self.store(&record, None).await;
            }
        }
        {
            let mut stats = self.stats.borrow_mut();
            stats.processed += 1;
            stats.failed += 1;
        }
        self.ack(delivery).await;
    }

    /// Makes the shutdown skip its grace period: running tasks are stopped and requeued
    /// at once. For a worker whose supervisor is gone, which must hand back what it holds
    /// and exit promptly rather than run on unsupervised.
    pub fn hurry(&self) {
        self.hurried.set(true);
        self.hurry_now.notify_one();
    }

    async fn drain(&self, mut handlings: Handlings) {
        let grace = if self.hurried.get() { Duration::ZERO } else { self.cfg.shutdown_grace };
        tracing::info!(in_progress = self.in_progress.get(), grace = ?grace, "draining: no new messages; waiting for running tasks");
        self.draining.send_replace(true);
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = handlings.next() => if next.is_none() { break },
                _ = async { tokio::select! { _ = &mut deadline => {}, _ = self.hurry_now.notified() => {} } }, if !self.killing.get() => {
                    tracing::warn!(running = self.running.borrow().len(), "grace period over: stopping running tasks and requeueing them");
                    self.killing.set(true);
                    for running in self.running.borrow().values() {
                        running.control.revoke();
                    }
                }
            }
        }
        let restored = self.stats.borrow().restored_on_shutdown;
        tracing::info!(restored, "drained");
    }

    async fn housekeeping(self: Rc<Self>) {
        let touch_every = (self.cfg.visibility_timeout / 4).min(Duration::from_secs(60)).max(Duration::from_millis(100));
        let mut last_touch = Instant::now();
        let mut last_sweep: Option<Instant> = None;
        let mut last_usage_flush = Instant::now();
        let mut last_slot_renewal = Instant::now();
        let mut tick = tokio::time::interval(MOVE_DUE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match self.broker.move_due().await {
                    Ok(n) if n >= 500 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!("moving due ETA messages failed: {e}");
                        break;
                    }
                }
            }
            if last_touch.elapsed() >= touch_every {
                last_touch = Instant::now();
                let tags: Vec<String> = self.held.borrow().iter().cloned().collect();
                if let Err(e) = self.broker.touch(&tags).await {
                    tracing::warn!("refreshing held messages failed: {e}");
                }
            }
            self.keep_fairness().await;
            if last_slot_renewal.elapsed() >= tenancy::TENANT_LEASE_RENEW {
                last_slot_renewal = Instant::now();
                self.renew_tenant_slots().await;
            }
            if last_usage_flush.elapsed() >= USAGE_FLUSH_INTERVAL {
                last_usage_flush = Instant::now();
                self.flush_usage().await;
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_INTERVAL) {
                last_sweep = Some(Instant::now());
                match self.broker.restore_expired(self.cfg.visibility_timeout).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(restored = n, "restored messages past the visibility timeout"),
                    Err(e) => tracing::warn!("visibility sweep failed: {e}"),
                }
            }
        }
    }

    async fn handle(self: Rc<Self>, delivery: Rc<Delivery>, mut in_progress: InProgress) {
        let decoded = protocol::decode(&delivery.raw);
        if let (None, Ok(d)) = (&delivery.tag, &decoded) {
            // Not recorded as unacked by the broker: running it would break at-least-once.
            tracing::warn!(queue = %delivery.queue, "message without a delivery_tag dead-lettered");
            let _ = self.dead_letter(&delivery, Some(d), "message has no properties.delivery_tag".into()).await;
            return;
        }
        let mut decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(queue = %delivery.queue, "undecodable message dead-lettered: {e}");
                let kept = self.dead_letter(&delivery, None, format!("undecodable message: {e}")).await;
                self.settle(&delivery, kept, true).await;
                return;
            }
        };
        // Whose it is: a queue bound to a tenant decides, else the header. From here on the
        // header holds the tenant decided, so retries, follow-ups and canvas steps carry it.
        let policy = self.tenants.current();
        match policy.identify(&delivery.queue, decoded.headers.tenant.take()) {
            Ok(tenant) => decoded.headers.tenant = tenant,
            Err(e) => {
                tracing::warn!(queue = %delivery.queue, id = %decoded.headers.id, "message dead-lettered: {e}");
                let kept = self.dead_letter(&delivery, Some(&decoded), e.to_string()).await;
                self.settle(&delivery, kept, true).await;
                return;
            }
        }
        let decoded = decoded;
        let h = &decoded.headers;
        if self.failpoint_panic.as_deref() == Some(h.task.as_str()) {
            panic!("failpoint TASKHOST_FAILPOINT_PANIC_TASK={}", h.task);
        }
        let now = Utc::now();
        let mut resolved = self.registry.resolve_for(&h.task, None, &h.id);
        if resolved.is_err() && self.registry.is_loading(&h.task) {
            // Its component is being compiled: better a moment's wait than a dead letter.
            let give_up = Instant::now() + self.runtime.config().ceilings.compile_timeout + Duration::from_secs(1);
            while self.registry.is_loading(&h.task) && Instant::now() < give_up && !*self.draining.borrow() {
                tokio::time::sleep(LOADING_POLL).await;
            }
            if *self.draining.borrow() {
                self.restore_on_shutdown(&delivery).await;
                return;
            }
            resolved = self.registry.resolve_for(&h.task, None, &h.id);
        }
        let ignore_result = h
            .ignore_result
            .or_else(|| resolved.as_ref().ok().and_then(|tv| tv.manifest.ignore_result))
            .unwrap_or(false);
        let _result_scope = match self.tenant_result_scope(&policy, &delivery, &decoded, ignore_result).await {
            Some(scope) => scope,
            None => return,
        };

        if self.is_revoked(&h.id) {
            tracing::info!(task = %h.task, id = %h.id, "revoked before it ran; skipped");
            self.skip_unrun(&delivery, &decoded, "revoked", ignore_result).await;
            return;
        }
        if h.expires.is_some_and(|e| e.to_utc() <= now) {
            tracing::info!(task = %h.task, id = %h.id, "expired before it ran; revoked");
            self.skip_unrun(&delivery, &decoded, "expired", ignore_result).await;
            return;
        }
        if let Some(eta) = h.eta.map(|e| e.to_utc()).filter(|e| *e > now + ETA_SLACK) {
            // Parked on the broker, not held here: an ETA past the visibility timeout
            // can never run twice, and a restart forgets nothing.
            match self.broker.schedule(&delivery.queue, decoded.priority, &delivery.raw, eta).await {
                Ok(()) => self.ack(&delivery).await,
                Err(e) => {
                    tracing::warn!(id = %h.id, "parking ETA message failed, returning it: {e}");
                    self.restore(&delivery).await;
                }
            }
            return;
        }
        let requirement = match h.version_req.as_deref().map(semver::VersionReq::parse) {
            None => None,
            Some(Ok(req)) => Some(req),
            Some(Err(e)) => {
                let reason = format!("header taskhost_version is not a semver requirement: {e}");
                self.fail_unrunnable(&delivery, &decoded, "taskhost", "BadVersionRequirement", reason, ignore_result).await;
                return;
            }
        };
        // Without a version requirement the newest version resolved above is the one to run.
        let found = match &requirement {
            None => resolved,
            Some(req) => self.registry.resolve_for(&h.task, Some(req), &h.id),
        };
        let task = match found {
            Ok(tv) => tv,
            Err(e @ crate::registry::RegistryError::Yanked { .. }) => {
                tracing::warn!(task = %h.task, id = %h.id, "{e}");
                self.fail_unrunnable(&delivery, &decoded, "taskhost", "VersionYanked", e.to_string(), ignore_result).await;
                return;
            }
            Err(e) => {
                tracing::warn!(task = %h.task, id = %h.id, "{e}");
                self.fail_unrunnable(&delivery, &decoded, "celery.exceptions", "NotRegistered", e.to_string(), ignore_result).await;
                return;
            }
        };

        // Waiting its turn (rate limits, tenant slots) is not work waiting for a sandbox.
        in_progress.waiting(false);
        if let Some(limit) = task.manifest.rate_limit {
            let scope = task.manifest.rate_limit_scope.unwrap_or(crate::registry::RateLimitScope::Worker);
            let wait = self.rate_limits.reserve(self.broker.as_ref(), &h.task, limit, scope).await;
            // A drain hands it back at once instead of waiting out its turn.
            if !wait.is_zero() && self.wait_turn(wait).await {
                self.restore_on_shutdown(&delivery).await;
                return;
            }
        }
        let tenant = policy.tenant(h.tenant.as_deref().unwrap_or(crate::tenant::DEFAULT_TENANT));
        if let Some(why) = tenant.and_then(|t| t.refuses(&h.task, &task.component.digest)) {
            tracing::warn!(task = %h.task, id = %h.id, tenant = ?h.tenant, "{why}");
            self.fail_unrunnable(&delivery, &decoded, "taskhost", "TaskNotAllowed", why, ignore_result).await;
            return;
        }
        let mut limits = limits_for(&task, h.time_limit, &self.runtime.config().ceilings);
        if let Some(cap) = tenant.and_then(|t| t.memory_limit) {
            limits.memory = limits.memory.min(cap.0);
        }
        // The tenant's grants ceiling over the component's grants (shared when it changes nothing).
        let grants = match tenant.and_then(|t| t.cap_grants(&task.grants())) {
            Some(capped) => Arc::new(capped),
            None => task.grants(),
        };
        // The tenant's rate, quota and cluster-wide slots, before any sandbox is taken.
        let _tenant_slot = match tenant {
            None => None,
            Some(spec) => {
                let name = h.tenant.as_deref().unwrap_or(crate::tenant::DEFAULT_TENANT);
                match self.admit_tenant(&delivery, &decoded, name, spec).await {
                    tenancy::Admission::Run(slot) => slot,
                    tenancy::Admission::Held => return,
                    tenancy::Admission::Drained => {
                        self.restore_on_shutdown(&delivery).await;
                        return;
                    }
                }
            }
        };
        in_progress.waiting(true);
        let mut draining = self.draining.subscribe();
        // Memory first, then a sandbox: a task waiting for the budget holds no sandbox.
        let wanted = limits.memory.div_ceil(MIB).min(self.memory_budget_mib) as u32;
        let permit = tokio::select! {
            biased;
            _ = draining.wait_for(|d| *d) => None,
            permits = async {
                let memory = self.memory_budget.acquire_many(wanted).await.ok()?;
                let slot = self.slots.acquire().await.ok()?;
                Some((memory, slot))
            } => permits,
        };
        let Some(permit) = permit.filter(|_| !*self.draining.borrow()) else {
            self.restore_on_shutdown(&delivery).await;
            return;
        };
        // Revoked or expired while it waited for its turn or a slot.
        let expired = h.expires.is_some_and(|e| e.to_utc() <= Utc::now());
        if self.is_revoked(&h.id) || expired {
            let reason = if expired { "expired" } else { "revoked" };
            tracing::info!(task = %h.task, id = %h.id, "{reason} before it ran; skipped");
            self.skip_unrun(&delivery, &decoded, reason, ignore_result).await;
            return;
        }
        in_progress.waiting(false);
        self.execute(&delivery, &decoded, &task, &limits, grants, ignore_result, permit).await;
    }


    /// Runs the task in a sandbox held by `slot`, which is given back as soon as the
    /// sandbox is gone: storing the outcome and acking need no sandbox, and holding the
    /// slot through them kept the next tasks waiting on result writes (results drain 8%
    /// slower).
    async fn execute(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        task: &Arc<TaskVersion>,
        limits: &TaskLimits,
        grants: Arc<crate::runtime::Grants>,
        ignore_result: bool,
        slot: (tokio::sync::SemaphorePermit<'_>, tokio::sync::SemaphorePermit<'_>),
    ) {
        let h = &decoded.headers;
        let acks_late = task.manifest.acks_late.unwrap_or(true);
        if !acks_late {
            self.ack(delivery).await;
        }
        if self.cfg.track_started && !ignore_result {
            let mut started = ResultRecord::started(&h.id, self.pid, &self.cfg.node_name);
            link_fields(&mut started, decoded);
            self.store(&started, None).await;
        }
        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let mut control = RunControl::with_progress(progress_tx);
        // A channel for follow-ups only where some are granted: most tasks send none,
        // and a channel per task cost the no-op drain ~3% (68.4k → 70.5k/s without it, 5
        // alternating pairs of 200k drains).
        let mut sent_rx = None;
        if !grants.send_tasks.is_empty() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<SentTask>();
            control = control.with_sent_tasks(tx);
            sent_rx = Some(rx);
        }
        let control = Arc::new(control.with_grants(grants));
        let mut sent_ids = Vec::new();
        // Follow-ups being published, polled beside the run: a slow broker must not
        // keep the run from its time limit or a revoke.
        // Made only where follow-ups are granted (an allocation per task otherwise).
        let mut publishing: Option<FuturesUnordered<Pin<Box<dyn Future<Output = Option<String>> + '_>>>> =
            sent_rx.is_some().then(FuturesUnordered::new);
        let input = TaskInput {
            id: h.id.clone(),
            name: h.task.clone(),
            retries: h.retries,
            queue: delivery.queue.clone(),
            eta: h.eta.map(|e| e.to_rfc3339()),
            parent_id: h.parent_id.clone(),
            root_id: h.root_id.clone(),
            args: decoded.args_json.clone(),
            kwargs: decoded.kwargs_json.clone(),
        };
        self.running.borrow_mut().insert(
            h.id.clone(),
            RunningTask {
                control: control.clone(),
                name: h.task.clone(),
                queue: delivery.queue.clone(),
                priority: decoded.priority,
                redelivered: h.redelivered,
                acknowledged: !acks_late,
                args: input.args.clone(),
                kwargs: input.kwargs.clone(),
                started_unix: Utc::now().timestamp_micros() as f64 / 1e6,
            },
        );
        let version = task.version.to_string();
        let run = {
            // Boxed: wasmtime's instantiate/call futures are large, and inline they would
            // make every spawned `handle` future large too (memcpy'd on spawn and poll).
            let mut running = Box::pin(self.runtime.run(&task.component, &version, input, limits, control));
            loop {
                tokio::select! {
                    biased;
                    run = &mut running => break run,
                    Some(p) = progress_rx.recv() => self.store_progress(p, ignore_result).await,
                    // Published as soon as asked, as Celery's apply_async inside a task is.
                    Some(t) = async { sent_rx.as_mut()?.recv().await }, if sent_rx.is_some() => {
                        if let Some(p) = publishing.as_mut() {
                            p.push(Box::pin(self.publish_sent(t, decoded)));
                        }
                    }
                    Some(published) = async { publishing.as_mut()?.next().await },
                        if publishing.as_ref().is_some_and(|p| !p.is_empty()) => sent_ids.extend(published),
                }
            }
        };
        while let Ok(p) = progress_rx.try_recv() {
            self.store_progress(p, ignore_result).await;
        }
        if let (Some(rx), Some(p)) = (sent_rx.as_mut(), publishing.as_mut()) {
            while let Ok(t) = rx.try_recv() {
                p.push(Box::pin(self.publish_sent(t, decoded)));
            }
            while let Some(published) = p.next().await {
                sent_ids.extend(published);
            }
        }
        drop(publishing);
        self.running.borrow_mut().remove(&h.id);
        drop(slot);
        self.meter_run(h, &run, delivery.charge);
        if self.killing.get() && run.result == Err(TaskError::Revoked) {
            if acks_late {
                // Stopped by the shutdown, not by a user: it runs again elsewhere.
                self.restore_on_shutdown(delivery).await;
            } else if !ignore_result {
                // Acked before it ran (at most once): nothing to requeue; say what happened.
                let mut record = ResultRecord::revoked(&h.id, "terminated");
                link_fields(&mut record, decoded);
                self.store(&record, None).await;
            }
            return;
        }
        Box::pin(self.finish(delivery, decoded, task, run, sent_ids, ignore_result, acks_late)).await;
    }

    /// Adds a run to this process's usage sums, under its tenant and task.
    fn meter_run(&self, h: &crate::protocol::TaskHeaders, run: &crate::runtime::TaskRun, charged: Option<f64>) {
        use crate::tenant::meter::{Outcome, Run};
        let outcome = match &run.result {
            Ok(_) => Outcome::Succeeded,
            Err(TaskError::Retry { .. }) => Outcome::Retried,
            Err(TaskError::Reject { .. }) => Outcome::Rejected,
            Err(_) => Outcome::Failed,
        };
        let tenant = h.tenant.as_deref().unwrap_or(crate::tenant::DEFAULT_TENANT);
        let metered = Run {
            outcome,
            cpu: run.cpu,
            wall: run.elapsed,
            memory_high_water: run.memory_high_water,
            memory_byte_seconds: run.memory_byte_seconds,
        };
        self.meter.borrow_mut().record(Utc::now().timestamp(), tenant, &h.task, &metered);
        let mut costs = self.tenant_costs.borrow_mut();
        let cpu = run.cpu.as_secs_f64();
        // What fair dispatch charged for it is put right with what it used (a message
        // that came otherwise, by BRPOP or before fairness, was charged nothing).
        let extra = cpu - charged.unwrap_or(0.0);
        match costs.get_mut(tenant) {
            Some((avg, pending)) => {
                *pending += extra;
                *avg = 0.8 * *avg + 0.2 * cpu;
            }
            None => {
                costs.insert(tenant.to_string(), (cpu, extra));
            }
        }
    }

    /// Hands the usage metered here to the broker; kept for the next flush if it fails.
    async fn flush_usage(&self) {
        let rows = self.meter.borrow_mut().take();
        if rows.is_empty() {
            return;
        }
        if let Err(e) = self.broker.add_usage(&rows).await {
            tracing::warn!("storing metered usage failed, kept for the next flush: {e}");
            self.meter.borrow_mut().restore(rows);
        }
    }

    /// Publishes a follow-up a task sent (`send-task`): its parent is that task, its root
    /// the task's root. With no queue named it goes where its own manifest routes it, if
    /// this worker knows the task, else to `celery`. Its id, if the broker took it (only
    /// those are listed as the task's children).
    async fn publish_sent(&self, sent: SentTask, decoded: &Decoded) -> Option<String> {
        let h = &decoded.headers;
        let queue = sent.queue.clone().unwrap_or_else(|| {
            self.registry
                .resolve(&sent.name, None)
                .ok()
                .and_then(|tv| tv.manifest.queue.clone())
                .unwrap_or_else(|| DEFAULT_QUEUE.to_string())
        });
        let mut extra_headers = serde_json::Map::new();
        if let Some(req) = &sent.version {
            extra_headers.insert("taskhost_version".into(), serde_json::Value::from(req.clone()));
        }
        // A follow-up is the sender's tenant's: it cannot launder work into another's.
        if let Some(tenant) = &h.tenant {
            extra_headers.insert(crate::tenant::TENANT_HEADER.into(), serde_json::Value::from(tenant.clone()));
        }
        let eta = sent
            .countdown
            .and_then(|c| Duration::try_from_secs_f64(c).ok())
            .and_then(|d| chrono::TimeDelta::from_std(d).ok())
            .and_then(|d| Utc::now().checked_add_signed(d));
        let msg = OutgoingTask {
            task: sent.name.clone(),
            id: sent.id.clone(),
            args: serde_json::from_str(&sent.args).unwrap_or_default(),
            kwargs: serde_json::from_str(&sent.kwargs).unwrap_or_default(),
            queue,
            priority: sent.priority.unwrap_or(0),
            eta,
            root_id: Some(h.root_id.clone().unwrap_or_else(|| h.id.clone())),
            parent_id: Some(h.id.clone()),
            origin: self.cfg.node_name.clone(),
            extra_headers,
            ..Default::default()
        };
        if !self.publish_task(&msg).await {
            tracing::error!(task = %h.task, id = %h.id, sent = ?msg.task, sent_id = %msg.id, "follow-up lost: the broker never took it");
            return None;
        }
        tracing::info!(task = %h.task, id = %h.id, sent = ?msg.task, sent_id = %msg.id, queue = ?msg.queue, "follow-up sent");
        Some(sent.id)
    }

    async fn finish(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        task: &TaskVersion,
        run: TaskRun,
        sent_ids: Vec<String>,
        ignore_result: bool,
        acks_late: bool,
    ) {
        let h = &decoded.headers;
        {
            let mut stats = self.stats.borrow_mut();
            stats.processed += 1;
            stats.grant_denials += u64::from(run.denials);
            match stats.per_task.get_mut(&h.task) {
                Some(count) => *count += 1,
                None => {
                    stats.per_task.insert(h.task.clone(), 1);
                }
            }
        }
        if !run.stdout.text.is_empty() || !run.stderr.text.is_empty() {
            tracing::debug!(task = %h.task, id = %h.id, stdout = %run.stdout.text, stderr = %run.stderr.text, "guest output");
        }
        let error = match run.result {
            Ok(json) => {
                let value: serde_json::Value = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
                tracing::debug!(task = %h.task, id = %h.id, elapsed = ?run.elapsed, "succeeded: {json}");
                self.stats.borrow_mut().succeeded += 1;
                self.registry.record_outcome(task, true);
                // Celery's order: next chain step and links first, then the SUCCESS naming them.
                let mut children: Vec<serde_json::Value> = sent_ids.iter().map(|id| canvas::child_tuple(id)).collect();
                children.extend(self.hand_on(decoded, &value).await);
                let stored = ignore_result || {
                    let mut record = ResultRecord::success(&h.id, value.clone());
                    record.children = children;
                    link_fields(&mut record, decoded);
                    self.store(&record, None).await
                };
                self.chord_member_done(decoded, "SUCCESS", value).await;
                self.settle(delivery, stored, acks_late).await;
                return;
            }
            Err(e) => e,
        };
        // Only failures name the version (in their traceback).
        let version = task.version.to_string();
        let retry_reason = match &error {
            TaskError::Retry { reason, countdown } => Some((reason.clone(), *countdown)),
            TaskError::Trap { .. } if task.manifest.autoretry.contains(&AutoRetry::Trap) => Some((error.to_string(), None)),
            TaskError::TimeLimit { .. } if task.manifest.autoretry.contains(&AutoRetry::TimeLimit) => {
                Some((error.to_string(), None))
            }
            TaskError::MemoryLimit { .. } if task.manifest.autoretry.contains(&AutoRetry::MemoryLimit) => {
                Some((error.to_string(), None))
            }
            _ => None,
        };
        let max_retries = task
            .manifest
            .max_retries
            .unwrap_or(retry::DEFAULT_MAX_RETRIES)
            .min(self.runtime.config().ceilings.max_retries);
        if let Some((reason, countdown)) = retry_reason {
            if h.retries < max_retries {
                self.retry(delivery, decoded, task, &reason, countdown, ignore_result, acks_late).await;
                return;
            }
            let exc = outcome::max_retries_exceeded(
                &h.task,
                &h.id,
                &protocol::args_repr(&decoded.args()),
                &protocol::kwargs_repr(&decoded.kwargs()),
            );
            let traceback = format!("taskhost: {}@{version}: retries exhausted ({max_retries}); last: {reason}", h.task);
            tracing::warn!(task = %h.task, id = %h.id, "{}", exc.message());
            // The outcome is stored either way; a lost letter is logged by broker_op.
            let _ = self.dead_letter(delivery, Some(decoded), format!("max retries ({max_retries}) exceeded: {reason}")).await;
            self.registry.record_outcome(task, false);
            self.fail(delivery, decoded, &exc, traceback, ignore_result, acks_late).await;
            return;
        }
        if error == TaskError::Revoked {
            tracing::info!(task = %h.task, id = %h.id, "terminated by revoke");
            let mut record = ResultRecord::revoked(&h.id, "terminated");
            link_fields(&mut record, decoded);
            let stored = ignore_result || self.store(&record, None).await;
            self.chord_member_done(decoded, "REVOKED", record.result.clone()).await;
            self.settle(delivery, stored, acks_late).await;
            return;
        }
        tracing::info!(task = %h.task, id = %h.id, elapsed = ?run.elapsed, "failed: {error}");
        if let TaskError::Reject { reason } = &error {
            // The outcome is stored either way; a lost letter is logged by broker_op.
            let _ = self.dead_letter(delivery, Some(decoded), format!("rejected by the task: {reason}")).await;
        }
        let exc = outcome::exception_for(&error);
        let traceback = outcome::traceback_for(&h.task, &version, &error, &run.stderr.text);
        self.registry.record_outcome(task, false);
        self.fail(delivery, decoded, &exc, traceback, ignore_result, acks_late).await;
    }

    async fn fail(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        exc: &ExceptionInfo,
        traceback: String,
        ignore_result: bool,
        acks_late: bool,
    ) {
        self.stats.borrow_mut().failed += 1;
        // The rest of a chain never runs: each of its ids reads the same failure, stored
        // first so that a client woken by this task's FAILURE already sees them.
        for id in canvas::remaining_chain_ids(&decoded.embed) {
            if !self.may_write_result_for(decoded, &id).await {
                continue;
            }
            let mut step = ResultRecord::failure(&id, exc, Some(traceback.clone()));
            step.parent_id = Some(decoded.headers.id.clone());
            self.store(&step, None).await;
        }
        let mut record = ResultRecord::failure(&decoded.headers.id, exc, Some(traceback.clone()));
        link_fields(&mut record, decoded);
        let stored = ignore_result || self.store(&record, None).await;
        let lineage = canvas::Lineage { headers: &decoded.headers, origin: &self.cfg.node_name };
        for errback in canvas::errbacks(&decoded.embed, &lineage, DEFAULT_QUEUE) {
            self.publish_task(&errback).await;
        }
        let exc_value = serde_json::to_value(exc).expect("exception serializes");
        self.chord_member_done(decoded, "FAILURE", exc_value).await;
        self.settle(delivery, stored, acks_late).await;
    }

    /// After an outcome: with acks-late, ack once it is stored, or hand the message back
    /// if it could not be stored (so it runs again instead of staying held forever).
    /// Without acks-late it was acked before running and there is nothing left to do.
    async fn settle(&self, delivery: &Delivery, stored: bool, acks_late: bool) {
        match (acks_late, stored) {
            (false, _) => {}
            (true, true) => self.ack(delivery).await,
            (true, false) => self.restore(delivery).await,
        }
    }

    /// Publishes the next chain step and link callbacks after a success; their ids as
    /// `children` tuples.
    async fn hand_on(&self, decoded: &Decoded, value: &serde_json::Value) -> Vec<serde_json::Value> {
        let lineage = canvas::Lineage { headers: &decoded.headers, origin: &self.cfg.node_name };
        let mut children = Vec::new();
        let next = canvas::next_chain_step(&decoded.embed, value, &lineage, DEFAULT_QUEUE);
        for msg in next.into_iter().chain(canvas::callbacks(&decoded.embed, value, &lineage, DEFAULT_QUEUE)) {
            self.publish_task(&msg).await;
            children.push(canvas::child_tuple(&msg.id));
        }
        children
    }

    /// A chord member's outcome joins its chord; the member that completes it publishes
    /// the callback with every result in order, or fails it with ChordError.
    async fn chord_member_done(&self, decoded: &Decoded, state: &str, result: serde_json::Value) {
        let h = &decoded.headers;
        let (Some(group), Some(callback)) = (&h.group, &decoded.embed.chord) else { return };
        let entry = canvas::ChordEntry { task_id: h.id.clone(), state: state.to_string(), result };
        let joined = match self.backend.chord_join(group, h.group_index.unwrap_or(0), &entry).await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(group = %group, id = %h.id, "chord join failed: {e}");
                return;
            }
        };
        let Some((entries, token)) = joined else { return };
        let lineage = canvas::Lineage { headers: h, origin: &self.cfg.node_name };
        match canvas::chord_outcome(&entries) {
            Ok(results) => {
                let mut msg = canvas::message_for(callback, Some(serde_json::Value::Array(results)), &lineage, DEFAULT_QUEUE);
                msg.group = Some(group.clone());
                msg.group_index = None;
                tracing::info!(group = %group, callback = %msg.task, id = %msg.id, "chord complete");
                self.publish_task(&msg).await;
            }
            Err(exc) => {
                let id = callback
                    .options
                    .get("task_id")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                tracing::info!(group = %group, callback = %id, "chord failed: {}", exc.message());
                let mut record = ResultRecord::failure(&id, &exc, Some(format!("taskhost: {}", exc.message())));
                record.group_id = Some(group.clone());
                record.key_prefix = self.result_prefixes.borrow().get(&h.id).map(|(p, _)| p.clone()).filter(|p| !p.is_empty());
                if self.may_write_result_for(decoded, &id).await {
                    self.store(&record, None).await;
                }
            }
        }
        if let Err(e) = self.backend.chord_done(group, &token).await {
            tracing::warn!(group = %group, "clearing chord state failed: {e}");
        }
    }

    /// Publishes a task this worker creates (chain step, link, errback, chord callback).
    /// Whether the broker took it (retried through outages, up to `STORE_GIVE_UP`).
    async fn publish_task(&self, msg: &OutgoingTask) -> bool {
        let raw = encode_task(msg);
        match msg.eta.filter(|eta| *eta > Utc::now() + ETA_SLACK) {
            Some(eta) => self.broker_op("publish", || self.broker.schedule(&msg.queue, msg.priority, &raw, eta)).await,
            None => self.broker_op("publish", || self.broker.publish(&msg.queue, msg.priority, &raw)).await,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn retry(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        task: &TaskVersion,
        reason: &str,
        countdown: Option<f64>,
        ignore_result: bool,
        acks_late: bool,
    ) {
        let h = &decoded.headers;
        let delay = retry::retry_delay(&task.manifest, countdown, h.retries, rand::random::<f64>());
        let eta = chrono::TimeDelta::from_std(delay)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
            .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
        let priority = decoded.priority;
        let next = OutgoingTask {
            task: h.task.clone(),
            id: h.id.clone(),
            args: decoded.args(),
            kwargs: decoded.kwargs(),
            embed: decoded.embed.clone(),
            queue: delivery.queue.clone(),
            priority,
            eta: Some(eta),
            expires: h.expires.map(|e| e.to_utc()),
            retries: h.retries + 1,
            root_id: h.root_id.clone(),
            parent_id: Some(h.id.clone()),
            group: h.group.clone(),
            group_index: h.group_index,
            time_limit: h.time_limit,
            ignore_result,
            origin: self.cfg.node_name.clone(),
            // Every header the message came with (stamps, custom ones) goes on the retry.
            extra_headers: crate::protocol::Envelope::parse(&delivery.raw).map(|e| e.headers).unwrap_or_default(),
        };
        let raw = encode_task(&next);
        let published = if delay.is_zero() {
            self.broker.publish(&delivery.queue, priority, &raw).await
        } else {
            self.broker.schedule(&delivery.queue, priority, &raw, eta).await
        };
        if let Err(e) = published {
            if acks_late {
                tracing::warn!(id = %h.id, "could not requeue the retry, returning the message instead: {e}");
                self.restore(delivery).await;
            } else {
                // Acked before it ran: the only copy was the one we failed to publish.
                let exc = ExceptionInfo::new(outcome::TASKHOST_MODULE, "RetryLost", format!("retry could not be queued: {e}"));
                self.fail(delivery, decoded, &exc, format!("taskhost: {e}"), ignore_result, false).await;
            }
            return;
        }
        self.stats.borrow_mut().retried += 1;
        tracing::info!(task = %h.task, id = %h.id, retries = h.retries + 1, "retry in {:?}: {reason}", delay);
        if !ignore_result {
            let exc = ExceptionInfo::new(outcome::TASKHOST_MODULE, "RetryRequested", reason);
            let mut record = ResultRecord::retry(&h.id, Some(&exc), Some(format!("retry {} requested: {reason}", h.retries + 1)));
            link_fields(&mut record, decoded);
            self.store(&record, None).await;
        }
        // The retry is queued: this delivery is done whether or not RETRY was stored.
        self.settle(delivery, true, acks_late).await;
    }

    /// REVOKED (`revoked` or `expired`) for a message that will not run; a chord it
    /// belongs to counts it as failed, as Celery does.
    async fn skip_unrun(&self, delivery: &Delivery, decoded: &Decoded, reason: &str, ignore_result: bool) {
        self.stats.borrow_mut().processed += 1;
        let mut record = ResultRecord::revoked(&decoded.headers.id, reason);
        link_fields(&mut record, decoded);
        let stored = ignore_result || self.store(&record, None).await;
        self.chord_member_done(decoded, "REVOKED", record.result.clone()).await;
        self.settle(delivery, stored, true).await;
    }

    /// FAILURE plus a dead letter for a message that cannot run here at all.
    async fn fail_unrunnable(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        module: &str,
        exc_type: &str,
        reason: String,
        ignore_result: bool,
    ) {
        self.stats.borrow_mut().processed += 1;
        if !self.dead_letter(delivery, Some(decoded), reason.clone()).await {
            self.restore(delivery).await;
            return;
        }
        let exc = ExceptionInfo::new(module, exc_type, reason.as_str());
        self.fail(delivery, decoded, &exc, format!("taskhost: {reason}"), ignore_result, true).await;
    }

    async fn store_progress(&self, p: Progress, ignore_result: bool) {
        if ignore_result {
            return;
        }
        let meta: serde_json::Value = serde_json::from_str(&p.meta).unwrap_or(serde_json::Value::Null);
        self.store(&ResultRecord::custom(&p.task_id, meta), Some(&p.state)).await;
    }

    /// Stores a record, retrying through broker outages; false if it never got through.
    async fn store(&self, record: &ResultRecord, custom_state: Option<&str>) -> bool {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store_batched(record, custom_state).await {
                Ok(_) => return true,
                Err(e @ (BackendError::Connection(_) | BackendError::Command(_))) if started.elapsed() < STORE_GIVE_UP => {
                    tracing::warn!(id = %record.task_id, "storing result failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(id = %record.task_id, "giving up storing result; message stays unacked: {e}");
                    return false;
                }
            }
        }
    }

    /// Queues a record for the result flusher, which writes every record queued in one
    /// turn with one backend call, and waits for this one's outcome.
    async fn store_batched(&self, record: &ResultRecord, custom_state: Option<&str>) -> Result<bool, BackendError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let mut record = record.clone();
        if record.key_prefix.is_none() {
            // Its tenant's prefix: the task's own, or (a chain's remaining steps) its parent's.
            let prefixes = self.result_prefixes.borrow();
            let prefix = prefixes.get(&record.task_id).or_else(|| record.parent_id.as_ref().and_then(|p| prefixes.get(p)));
            record.key_prefix = prefix.map(|(p, _)| p.clone()).filter(|p| !p.is_empty());
        }
        self.queued_results.borrow_mut().push(QueuedResult {
            record,
            custom_state: custom_state.map(str::to_string),
            done,
        });
        self.result_queued.notify_one();
        outcome.await.unwrap_or_else(|_| Err(BackendError::Connection("the result write was abandoned".into())))
    }

    async fn result_flusher(self: Rc<Self>) {
        loop {
            self.result_queued.notified().await;
            // Let the other handlings of this turn queue theirs: one call writes them all.
            tokio::task::yield_now().await;
            loop {
                let batch: Vec<QueuedResult> = {
                    let mut queued = self.queued_results.borrow_mut();
                    let n = queued.len().min(RESULT_BATCH);
                    queued.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let (records, waiting): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|q| ((q.record, q.custom_state), q.done)).unzip();
                match self.backend.store_many(&records).await {
                    Ok(written) => {
                        for (done, w) in waiting.into_iter().zip(written) {
                            let _ = done.send(Ok(w));
                        }
                    }
                    Err(e) => {
                        for done in waiting {
                            let _ = done.send(Err(e.shared()));
                        }
                    }
                }
            }
        }
    }

    async fn broker_op<F, Fut>(&self, what: &str, op: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), BrokerError>>,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match op().await {
                Ok(()) => return true,
                Err(e) if started.elapsed() < STORE_GIVE_UP => {
                    tracing::warn!("{what} failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!("giving up on {what}: {e}");
                    return false;
                }
            }
        }
    }

    /// Queues an ack; the ack flusher sends queued acks together (one transaction for
    /// many messages instead of one each), right after the tasks that queued them yield.
    async fn ack(&self, delivery: &Delivery) {
        let Some(tag) = &delivery.tag else { return };
        self.pending_acks.borrow_mut().push(tag.clone());
        if self.pending_acks.borrow().len() >= ACK_BATCH {
            self.flush_acks().await;
        } else {
            self.ack_queued.notify_one();
        }
    }

    async fn flush_acks(&self) {
        // Each flush takes the tags it sends, so two flushes in flight (the flusher and an
        // `ack` that filled a batch) never send or forget each other's. Tags go back to the
        // queue if the broker never took them or the flush is cut short (shutdown aborts
        // the flusher): the final flush sends them.
        let taken = AcksInFlight { worker: self, tags: std::mem::take(&mut *self.pending_acks.borrow_mut()) };
        if taken.tags.is_empty() {
            return;
        }
        if self.broker_op("ack", || self.broker.ack(&taken.tags)).await {
            let mut held = self.held.borrow_mut();
            for tag in &taken.tags {
                held.remove(tag);
            }
            taken.sent();
        }
    }

    async fn ack_flusher(self: Rc<Self>) {
        loop {
            self.ack_queued.notified().await;
            // Let the other tasks that finished in this turn queue theirs too.
            tokio::task::yield_now().await;
            self.flush_acks().await;
        }
    }

    /// Hands a message back because the worker is stopping, and counts it.
    async fn restore_on_shutdown(&self, delivery: &Delivery) {
        self.restore(delivery).await;
        self.stats.borrow_mut().restored_on_shutdown += 1;
    }

    async fn restore(&self, delivery: &Delivery) {
        if self.broker_op("restore", || self.broker.restore(delivery)).await {
            if let Some(tag) = &delivery.tag {
                self.held.borrow_mut().remove(tag);
            }
        }
    }

    /// Records a dead letter; false if the broker never took it (the caller then keeps
    /// the message rather than acking it away).
    async fn dead_letter(&self, delivery: &Delivery, decoded: Option<&Decoded>, reason: String) -> bool {
        self.stats.borrow_mut().dead_lettered += 1;
        let letter = DeadLetter {
            letter_id: uuid::Uuid::new_v4().to_string(),
            id: decoded.map(|d| d.headers.id.clone()),
            task: decoded.map(|d| d.headers.task.clone()),
            queue: delivery.queue.clone(),
            reason,
            time: Utc::now(),
            message: String::from_utf8_lossy(&delivery.raw).into_owned(),
        };
        self.broker_op("dead-letter", || self.broker.dead_letter(&letter)).await
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
fn link_fields(record: &mut ResultRecord, decoded: &Decoded) {
    record.group_id = decoded.headers.group.clone();
    record.parent_id = decoded.headers.parent_id.clone();
}
