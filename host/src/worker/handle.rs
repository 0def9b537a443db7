//! One message from decode to a sandbox slot: tenant, version, revoke/expiry/ETA checks,
//! rate limits and tenant admission, memory and sandbox permits.

use super::*;

impl Worker {
    pub(super) async fn handle(self: Rc<Self>, delivery: Rc<Delivery>, mut in_progress: InProgress) {
        // Boxed: moved from the decode into this future's state and on through it, the
        // 700 bytes of it were copied at each move.
        let decoded = protocol::decode(&delivery.raw).map(Box::new);
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
                if matches!(e, protocol::ProtocolError::TooLarge { .. }) {
                    // Reading it took a few copies of it: give that memory back now.
                    drop(delivery);
                    crate::alloc::release_free_memory();
                }
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
        if self.cfg.result_extended {
            decoded.queue = Some(delivery.queue.clone());
        }
        let decoded = decoded;
        let h = &decoded.headers;
        let _reserved = self.on_received(&delivery, &decoded);
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("id", h.id.as_str());
            span.record("task", h.task.as_str());
            if let Some(t) = &h.tenant {
                span.record("tenant", t.as_str());
            }
        }
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
                Ok(()) => {
                    self.on_parked(&decoded, eta);
                    self.ack_without_outcome(&delivery).await
                }
                Err(e) => {
                    tracing::warn!(id = %h.id, "parking ETA message failed, returning it: {e}");
                    self.restore(&delivery).await;
                }
            }
            return;
        }
        if builtins::is_builtin(&h.task) {
            self.run_builtin(&delivery, &decoded).await;
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
        // A `rate_limit` command's rate stands in for the manifest's.
        let rate_limit = self.rate_overrides.borrow().get(&h.task).copied().unwrap_or(task.manifest.rate_limit);
        if let Some(limit) = rate_limit {
            let scope = task.manifest.rate_limit_scope.unwrap_or(crate::registry::RateLimitScope::Worker);
            let wait = self.rate_limits.reserve(self.broker.as_ref(), &h.task, limit, scope).await;
            if !wait.is_zero() {
                self.on_rate_limit_wait(&delivery.queue, &h.task, wait);
            }
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
        // The message's own limits win, as Celery's do; else a `time_limit` command's.
        let asked = match h.time_limit {
            (None, None) => self.time_overrides.borrow().get(&h.task).copied().unwrap_or((None, None)),
            given => given,
        };
        let mut limits = limits_for(&task, asked, &self.runtime.config().ceilings);
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
            tracing::info!(task = %h.task, id = %h.id, outcome = "revoked", "{reason} before it ran; skipped");
            self.skip_unrun(&delivery, &decoded, reason, ignore_result).await;
            return;
        }
        in_progress.waiting(false);
        self.execute(&delivery, &decoded, &task, &limits, grants, ignore_result, permit, &mut in_progress).await;
    }
}
