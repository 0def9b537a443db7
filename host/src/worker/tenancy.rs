//! The tenant stage of handling a message, between resolving its task and taking a
//! sandbox: its tenant's cluster-wide rate limit, CPU quota for the hour, and concurrency
//! across the cluster (a lease per running task on the broker, renewed while it runs).

use super::{Worker, DEFAULT_QUEUE};
use crate::broker::{Broker, Delivery};
use crate::protocol::Decoded;
use crate::registry::RateLimitScope;
use crate::tenant::TenantSpec;
use chrono::{TimeZone, Utc};
use std::cell::RefCell;
use super::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a tenant's concurrency slot stays taken without renewal: the slots of a
/// worker killed mid-task come back within this.
pub const TENANT_LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a worker renews the slots its running tasks hold.
pub(super) const TENANT_LEASE_RENEW: Duration = Duration::from_secs(3);
/// How often a message waiting for one of its tenant's slots looks again.
const SLOT_RETRY: Duration = Duration::from_millis(50);
/// How stale the cluster's usage for this hour may be when checking a CPU quota.
const USAGE_REFRESH: Duration = Duration::from_secs(2);

/// Slots held by tasks running here: lease name → holder, renewed by housekeeping.
pub(super) type HeldSlots = Rc<RefCell<HashMap<String, String>>>;

/// One of a tenant's concurrency slots, held while its task runs; given back on drop
/// (whatever path the handling takes).
pub(super) struct TenantSlot {
    broker: Arc<dyn Broker>,
    held: HeldSlots,
    name: String,
    holder: String,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.held.borrow_mut().remove(&self.name);
        let (broker, name, holder) = (self.broker.clone(), std::mem::take(&mut self.name), std::mem::take(&mut self.holder));
        tokio::task::spawn_local(async move {
            if let Err(e) = broker.release_lease(&name, &holder).await {
                tracing::debug!(lease = %name, "giving a tenant slot back failed; it lapses: {e}");
            }
        });
    }
}

/// What the tenant stage decided.
pub(super) enum Admission {
    /// Run it, holding this slot if the tenant's concurrency is capped.
    Run(Option<TenantSlot>),
    /// Parked until the tenant's quota allows (the message is acked here, kept on the broker).
    Held,
    /// A drain began while it waited: hand the message back.
    Drained,
}

/// Messages a process lets wait for a rate-limit turn beyond its prefetch.
pub(super) const TURN_WAITERS_MAX: usize = 1_000;

/// Per tenant, the local queue of messages waiting for one of its slots.
pub(super) type SlotQueues = RefCell<HashMap<String, Rc<tokio::sync::Mutex<()>>>>;

/// The cluster's CPU use per tenant in the current hour, as last read from the broker.
#[derive(Default)]
pub(super) struct UsageCache {
    read: Option<Instant>,
    hour: i64,
    cpu: HashMap<String, f64>,
}

impl Worker {
    /// Waits `wait` without counting against the prefetch, so other messages keep flowing;
    /// true if a drain began meanwhile. Past [`TURN_WAITERS_MAX`] waiting at once, a
    /// message waits on its prefetch slot instead: the worker then stops fetching, and the
    /// rest of a rate-limited flood stays on the broker rather than in this process.
    pub(super) async fn wait_turn(&self, wait: Duration) -> bool {
        let released = self.turn_waiters.get() < TURN_WAITERS_MAX;
        if released {
            self.turn_waiters.set(self.turn_waiters.get() + 1);
            self.in_progress.set(self.in_progress.get() - 1);
            self.slot_freed.notify_one();
        }
        let mut draining = self.draining.subscribe();
        let drained = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = draining.wait_for(|d| *d) => true,
        };
        if released {
            self.turn_waiters.set(self.turn_waiters.get() - 1);
            self.in_progress.set(self.in_progress.get() + 1);
        }
        drained
    }

    pub(super) async fn admit_tenant(&self, delivery: &Delivery, decoded: &Decoded, tenant: &str, spec: &TenantSpec) -> Admission {
        if let Some(limit) = spec.rate_limit {
            let wait = self.rate_limits.reserve(self.broker.as_ref(), &format!("tenant:{tenant}"), limit, RateLimitScope::Cluster).await;
            if !wait.is_zero() && self.wait_turn(wait).await {
                return Admission::Drained;
            }
        }
        if let Some(quota) = spec.cpu_quota {
            let used = self.tenant_cpu_this_hour(tenant).await;
            if used >= quota {
                return self.hold_until_next_hour(delivery, decoded, tenant, used, quota).await;
            }
        }
        let Some(slots) = spec.max_concurrency else { return Admission::Run(None) };
        // One holder per handling, not per task id: messages reusing an id must not share a slot.
        let holder = format!("{}:{}:{}", self.cfg.node_name, decoded.headers.id, uuid::Uuid::new_v4());
        // One message per tenant asks the broker at a time; the rest queue here in order
        // (counting against the prefetch, so a capped tenant's flood is bounded here).
        let turn = self.slot_queues.borrow_mut().entry(tenant.to_string()).or_default().clone();
        let _turn = turn.lock().await;
        loop {
            for i in 0..slots {
                let name = crate::broker::tenant_slot_lease(tenant, i);
                match self.broker.lease(&name, &holder, TENANT_LEASE_TTL).await {
                    Ok(true) => {
                        self.tenant_slots.borrow_mut().insert(name.clone(), holder.clone());
                        let slot = TenantSlot { broker: self.broker.clone(), held: self.tenant_slots.clone(), name, holder };
                        return Admission::Run(Some(slot));
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(tenant, "taking a tenant slot failed: {e}"),
                }
            }
            if self.wait_turn(SLOT_RETRY).await {
                return Admission::Drained;
            }
        }
    }

    /// Parks the message on the broker until the next clock hour and acks it here.
    async fn hold_until_next_hour(&self, delivery: &Delivery, decoded: &Decoded, tenant: &str, used: f64, quota: f64) -> Admission {
        let h = &decoded.headers;
        let hour = Utc::now().timestamp().div_euclid(3600);
        let due = Utc.timestamp_opt((hour + 1) * 3600, 0).single().unwrap_or_else(Utc::now);
        tracing::warn!(
            tenant, task = %h.task, id = %h.id, used_cpu_seconds = used, cpu_quota = quota, until = %due.to_rfc3339(),
            "tenant over its CPU quota for this hour: message held until the next"
        );
        let queue = if delivery.queue.is_empty() { DEFAULT_QUEUE } else { delivery.queue.as_str() };
        match self.broker.schedule(queue, decoded.priority, &delivery.raw, due).await {
            Ok(()) => {
                self.meter.borrow_mut().hold(Utc::now().timestamp(), tenant, &h.task);
                self.ack_without_outcome(delivery).await;
            }
            Err(e) => {
                tracing::warn!(id = %h.id, "holding the message failed, returning it: {e}");
                self.restore(delivery).await;
            }
        }
        Admission::Held
    }

    /// Sandbox CPU-seconds `tenant` used this hour across the cluster: what workers
    /// stored (re-read every few seconds) plus what this one has not flushed yet.
    async fn tenant_cpu_this_hour(&self, tenant: &str) -> f64 {
        let hour = Utc::now().timestamp().div_euclid(3600);
        let stale = {
            let cache = self.usage_cache.borrow();
            cache.hour != hour || cache.read.is_none_or(|t| t.elapsed() >= USAGE_REFRESH)
        };
        if stale {
            match self.broker.usage(hour).await {
                Ok(rows) => {
                    let mut cpu: HashMap<String, f64> = HashMap::default();
                    for row in rows.iter().filter(|r| r.hour == hour) {
                        *cpu.entry(row.tenant.clone()).or_default() += row.counts.cpu_seconds;
                    }
                    *self.usage_cache.borrow_mut() = UsageCache { read: Some(Instant::now()), hour, cpu };
                }
                Err(e) => tracing::warn!("reading tenants' usage failed; quotas use the last figures: {e}"),
            }
        }
        let stored = self.usage_cache.borrow().cpu.get(tenant).copied().unwrap_or(0.0);
        stored + self.meter.borrow().pending_cpu(hour, tenant)
    }

    /// Renews the slots of tasks running here (housekeeping, every few seconds).
    pub(super) async fn renew_tenant_slots(&self) {
        let held: Vec<(String, String)> = self.tenant_slots.borrow().iter().map(|(n, h)| (n.clone(), h.clone())).collect();
        for (name, holder) in held {
            match self.broker.lease(&name, &holder, TENANT_LEASE_TTL).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(lease = %name, "a tenant slot lapsed while its task ran (the worker was stalled past its lease)"),
                Err(e) => tracing::warn!(lease = %name, "renewing a tenant slot failed: {e}"),
            }
        }
    }
}

/// How long a task id stays its tenant's (Celery's default result expiry).
const OWNER_TTL: Duration = Duration::from_secs(86_400);
/// Most task-id claims sent in one call.
const CLAIM_BATCH: usize = 512;

/// A task-id claim waiting for the claim flusher.
pub(super) struct QueuedClaim {
    id: String,
    tenant: String,
    done: tokio::sync::oneshot::Sender<Result<Option<String>, String>>,
}

/// While a message is handled, its results go under its tenant's key prefix.
pub(super) struct ResultScope {
    worker: Rc<Worker>,
    id: Option<String>,
}

impl Drop for ResultScope {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            let mut prefixes = self.worker.result_prefixes.borrow_mut();
            if let Some((_, handlings)) = prefixes.get_mut(id) {
                *handlings -= 1;
                if *handlings == 0 {
                    prefixes.remove(id);
                }
            }
        }
    }
}

impl Worker {
    /// Claims `id` for `tenant` together with the other claims of this turn (one broker
    /// call for all of them); the other tenant that owns it, if one does.
    async fn claim_batched(&self, id: &str, tenant: &str) -> Result<Option<String>, String> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.queued_claims.borrow_mut().push(QueuedClaim { id: id.to_string(), tenant: tenant.to_string(), done });
        self.claim_queued.notify_one();
        outcome.await.unwrap_or_else(|_| Err("the claim was abandoned".into()))
    }

    /// Sends queued task-id claims in batches, as the result flusher does results.
    pub(super) async fn claim_flusher(self: Rc<Self>) {
        loop {
            self.claim_queued.notified().await;
            tokio::task::yield_now().await;
            loop {
                let batch: Vec<QueuedClaim> = {
                    let mut queued = self.queued_claims.borrow_mut();
                    let n = queued.len().min(CLAIM_BATCH);
                    queued.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let claims: Vec<(String, String)> = batch.iter().map(|c| (c.id.clone(), c.tenant.clone())).collect();
                match self.broker.claim_task_ids(&claims, OWNER_TTL).await {
                    Ok(owners) => {
                        for (claim, owner) in batch.into_iter().zip(owners) {
                            let _ = claim.done.send(Ok(owner));
                        }
                    }
                    Err(e) => {
                        for claim in batch {
                            let _ = claim.done.send(Err(e.to_string()));
                        }
                    }
                }
            }
        }
    }

    /// Registers the message's result prefix, and where its result shares the key space
    /// with other tenants' (no prefix, result stored), claims its task id for its tenant;
    /// `None` (the message dead-lettered, nothing stored) when the id already belongs to
    /// another tenant, whose result it would overwrite or reveal. A tenant with its own
    /// prefix, or a task storing no result, claims nothing: there is nothing to clash
    /// with, and a key per task would cost the broker memory and the drain time.
    pub(super) async fn tenant_result_scope(
        self: &Rc<Self>,
        policy: &crate::tenant::Policy,
        delivery: &Delivery,
        decoded: &Decoded,
        ignore_result: bool,
    ) -> Option<ResultScope> {
        if policy.tenants.is_empty() {
            return Some(ResultScope { worker: self.clone(), id: None });
        }
        let h = &decoded.headers;
        let tenant = h.tenant.as_deref().unwrap_or(crate::tenant::DEFAULT_TENANT);
        let prefix = policy.tenant(tenant).and_then(|t| t.result_prefix.as_deref()).map_or(String::new(), crate::tenant::celery_key_prefix);
        // Results are written by task id: two handlings of one id here must be one tenant's,
        // or one's result would land under the other's prefix.
        let clash = {
            let mut prefixes = self.result_prefixes.borrow_mut();
            match prefixes.get_mut(&h.id) {
                Some((theirs, _)) if *theirs != prefix => true,
                Some((_, handlings)) => {
                    *handlings += 1;
                    false
                }
                None => {
                    prefixes.insert(h.id.clone(), (prefix.clone(), 1));
                    false
                }
            }
        };
        if clash {
            let reason = format!("task id {:?} is being handled here for another tenant; refused for {tenant:?}", h.id);
            tracing::warn!(queue = %delivery.queue, "message dead-lettered: {reason}");
            let kept = self.dead_letter(delivery, Some(decoded), reason).await;
            self.settle(delivery, kept, true).await;
            return None;
        }
        let scope = ResultScope { worker: self.clone(), id: Some(h.id.clone()) };
        if !prefix.is_empty() || ignore_result {
            return Some(scope);
        }
        match self.claim_batched(&h.id, tenant).await {
            Ok(None) => {}
            Ok(Some(owner)) => {
                let reason = format!("task id {:?} already belongs to another tenant ({owner:?}); refused for {tenant:?}", h.id);
                tracing::warn!(queue = %delivery.queue, "message dead-lettered: {reason}");
                let kept = self.dead_letter(delivery, Some(decoded), reason).await;
                self.settle(delivery, kept, true).await;
                return None;
            }
            Err(e) => {
                tracing::warn!(id = %h.id, "claiming the task id for its tenant failed, returning the message: {e}");
                self.restore(delivery).await;
                return None;
            }
        }
        Some(scope)
    }

    /// Whether a record may be written for task id `id` on behalf of `decoded`'s tenant (a
    /// chain's remaining steps, a chord's callback: ids the message names, not its own):
    /// where results share the key space, the id is claimed first, and one of another
    /// tenant is left alone.
    pub(super) async fn may_write_result_for(&self, decoded: &Decoded, id: &str) -> bool {
        let policy = self.tenants.current();
        if policy.tenants.is_empty() {
            return true;
        }
        let tenant = decoded.headers.tenant.as_deref().unwrap_or(crate::tenant::DEFAULT_TENANT);
        if policy.tenant(tenant).is_some_and(|t| t.result_prefix.is_some()) {
            return true;
        }
        match self.claim_batched(id, tenant).await {
            Ok(None) => true,
            Ok(Some(owner)) => {
                tracing::warn!(id, tenant, owner = %owner, "not writing a result for a task id of another tenant");
                false
            }
            Err(e) => {
                tracing::warn!(id, "claiming a task id failed; its result is not written: {e}");
                false
            }
        }
    }
}

impl Worker {
    /// Hands the broker the current policy's fairness when the policy changed (at start
    /// and on reload), and the tenants' recent costs (every housekeeping tick).
    pub(super) async fn keep_fairness(&self) {
        let policy = self.tenants.current();
        let changed = !self.fairness_of.borrow().as_ref().is_some_and(|p| Arc::ptr_eq(p, &policy));
        if changed {
            *self.fairness_of.borrow_mut() = Some(policy.clone());
            let fairness = policy.fairness();
            match self.broker.set_fairness(fairness.as_ref(), &self.cfg.queues).await {
                Ok(()) if fairness.is_some() => {
                    self.fair.set(true);
                    tracing::info!(tenants = policy.tenants.len(), "fair dispatch across tenants on")
                }
                Ok(()) => self.fair.set(false),
                Err(e @ crate::broker::BrokerError::Connection(_)) => {
                    // The broker was unreachable: try again next tick.
                    tracing::warn!("handing the broker the tenants' fairness failed, retrying: {e}");
                    *self.fairness_of.borrow_mut() = None;
                }
                Err(e) => {
                    self.fair.set(false);
                    if fairness.is_some() {
                        tracing::warn!("tenants share workers in arrival order: {e}");
                    }
                }
            }
        }
        if self.fair.get() {
            let (costs, corrections): (Vec<(String, f64)>, Vec<(String, f64)>) = {
                let mut all = self.tenant_costs.borrow_mut();
                all.iter_mut()
                    .map(|(t, (avg, extra))| {
                        let weight = policy.tenant(t).and_then(|s| s.weight).unwrap_or(1.0);
                        let correction = std::mem::take(extra) / weight;
                        ((t.clone(), *avg), (t.clone(), correction))
                    })
                    .unzip()
            };
            let corrections: Vec<(String, f64)> = corrections.into_iter().filter(|(_, d)| *d != 0.0).collect();
            if let Err(e) = self.broker.report_costs(&costs, &corrections).await {
                tracing::debug!("reporting tenants' costs failed: {e}");
            }
        }
    }
}
