//! The worker's periodic chores: due ETA messages, visibility refresh and sweeps, fairness
//! and tenant leases, and metering flushed to the broker.

use super::*;

impl Worker {
    pub(super) async fn housekeeping(self: Rc<Self>) {
        let touch_every = (self.cfg.visibility_timeout / 4).min(Duration::from_secs(60)).max(Duration::from_millis(100));
        // A message whose holder died waits at most half the timeout more to come back.
        let sweep_every = (self.cfg.visibility_timeout / 2).clamp(Duration::from_secs(1), SWEEP_INTERVAL);
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
            // The sweep below would restore this worker's own held messages if their
            // refresh had failed (an outage longer than the visibility timeout), and they
            // would run twice: so each sweep follows a refresh that got through.
            let sweep_due = last_sweep.is_none_or(|t| t.elapsed() >= sweep_every);
            let mut touched = false;
            if last_touch.elapsed() >= touch_every || sweep_due {
                last_touch = Instant::now();
                let tags: Vec<String> = self.held.borrow().iter().cloned().collect();
                match self.broker.touch(&tags).await {
                    Ok(()) => touched = true,
                    Err(e) => tracing::warn!("refreshing held messages failed: {e}"),
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
            if sweep_due && touched {
                last_sweep = Some(Instant::now());
                match self.broker.restore_expired(self.cfg.visibility_timeout).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(restored = n, "restored messages past the visibility timeout"),
                    Err(e) => tracing::warn!("visibility sweep failed: {e}"),
                }
            }
        }
    }

    /// Adds a run to this process's usage sums, under its tenant and task.
    pub(super) fn meter_run(&self, h: &crate::protocol::TaskHeaders, run: &crate::runtime::TaskRun, charged: Option<f64>) {
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
    pub(super) async fn flush_usage(&self) {
        let rows = self.meter.borrow_mut().take();
        if rows.is_empty() {
            return;
        }
        if let Err(e) = self.broker.add_usage(&rows).await {
            tracing::warn!("storing metered usage failed, kept for the next flush: {e}");
            self.meter.borrow_mut().restore(rows);
        }
    }
}
