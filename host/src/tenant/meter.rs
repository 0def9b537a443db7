//! Metering: what each tenant's runs of each task used, per hour — sandbox CPU time,
//! wall time, memory high-water and memory × time, and outcomes — added up in the worker
//! and flushed to the broker, where `taskhost usage` reads every worker's sums.

use serde::{Deserialize, Serialize};
use crate::worker::HashMap;

/// Usage of one tenant's runs of one task within one hour (UTC, as unix seconds / 3600).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub hour: i64,
    pub tenant: String,
    pub task: String,
    pub counts: Usage,
}

/// Sums over runs; `memory_high_water` is the largest of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub runs: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub rejected: u64,
    /// Messages held back (over the tenant's CPU quota) rather than run.
    pub held: u64,
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    pub memory_byte_seconds: f64,
    pub memory_high_water: u64,
}

/// How a metered run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Retried,
    Rejected,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.runs += other.runs;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.retried += other.retried;
        self.rejected += other.rejected;
        self.held += other.held;
        self.cpu_seconds += other.cpu_seconds;
        self.wall_seconds += other.wall_seconds;
        self.memory_byte_seconds += other.memory_byte_seconds;
        self.memory_high_water = self.memory_high_water.max(other.memory_high_water);
    }

    /// The metric names and values as stored on the broker (high-water apart: a maximum).
    pub fn sums(&self) -> [(&'static str, f64); 9] {
        [
            ("held", self.held as f64),
            ("runs", self.runs as f64),
            ("succeeded", self.succeeded as f64),
            ("failed", self.failed as f64),
            ("retried", self.retried as f64),
            ("rejected", self.rejected as f64),
            ("cpu_seconds", self.cpu_seconds),
            ("wall_seconds", self.wall_seconds),
            ("memory_byte_seconds", self.memory_byte_seconds),
        ]
    }

    /// Sets one stored metric back (the inverse of [`Usage::sums`]).
    pub fn set(&mut self, metric: &str, value: f64) {
        match metric {
            "runs" => self.runs = value as u64,
            "succeeded" => self.succeeded = value as u64,
            "failed" => self.failed = value as u64,
            "retried" => self.retried = value as u64,
            "rejected" => self.rejected = value as u64,
            "held" => self.held = value as u64,
            "cpu_seconds" => self.cpu_seconds = value,
            "wall_seconds" => self.wall_seconds = value,
            "memory_byte_seconds" => self.memory_byte_seconds = value,
            "memory_high_water" => self.memory_high_water = value as u64,
            _ => {}
        }
    }
}

/// One run, as the worker measured it.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub outcome: Outcome,
    pub cpu: std::time::Duration,
    pub wall: std::time::Duration,
    pub memory_high_water: u64,
    pub memory_byte_seconds: f64,
}

/// Sums kept in one worker process until they are flushed: hour → tenant → task, looked up
/// by `&str` so that recording a run allocates nothing once its tenant and task are known.
#[derive(Debug, Default)]
pub struct Meter {
    pending: HashMap<i64, HashMap<String, HashMap<String, Usage>>>,
}

impl Meter {
    fn usage(&mut self, hour: i64, tenant: &str, task: &str) -> &mut Usage {
        let tenants = self.pending.entry(hour).or_default();
        if !tenants.contains_key(tenant) {
            tenants.insert(tenant.to_string(), HashMap::default());
        }
        let tasks = tenants.get_mut(tenant).expect("inserted above");
        if !tasks.contains_key(task) {
            tasks.insert(task.to_string(), Usage::default());
        }
        tasks.get_mut(task).expect("inserted above")
    }

    pub fn record(&mut self, unix_seconds: i64, tenant: &str, task: &str, run: &Run) {
        let u = self.usage(unix_seconds.div_euclid(3600), tenant, task);
        u.runs += 1;
        match run.outcome {
            Outcome::Succeeded => u.succeeded += 1,
            Outcome::Failed => u.failed += 1,
            Outcome::Retried => u.retried += 1,
            Outcome::Rejected => u.rejected += 1,
        }
        u.cpu_seconds += run.cpu.as_secs_f64();
        u.wall_seconds += run.wall.as_secs_f64();
        u.memory_byte_seconds += run.memory_byte_seconds;
        u.memory_high_water = u.memory_high_water.max(run.memory_high_water);
    }

    /// A message held back rather than run.
    pub fn hold(&mut self, unix_seconds: i64, tenant: &str, task: &str) {
        self.usage(unix_seconds.div_euclid(3600), tenant, task).held += 1;
    }

    /// CPU-seconds recorded for `tenant` in `hour` and not flushed yet.
    pub fn pending_cpu(&self, hour: i64, tenant: &str) -> f64 {
        let tasks = self.pending.get(&hour).and_then(|t| t.get(tenant));
        tasks.map_or(0.0, |tasks| tasks.values().map(|u| u.cpu_seconds).sum())
    }

    /// Everything recorded since the last take, to flush.
    pub fn take(&mut self) -> Vec<UsageRow> {
        let mut rows = Vec::new();
        for (hour, tenants) in self.pending.drain() {
            for (tenant, tasks) in tenants {
                for (task, counts) in tasks {
                    rows.push(UsageRow { hour, tenant: tenant.clone(), task, counts });
                }
            }
        }
        rows
    }

    /// Puts rows back after a failed flush, so they go with the next one.
    pub fn restore(&mut self, rows: Vec<UsageRow>) {
        for row in rows {
            self.usage(row.hour, &row.tenant, &row.task).add(&row.counts);
        }
    }
}

/// Rows from stored (hour, tenant, task, metric, value) cells, in hour, tenant, task order.
pub fn rows_from_cells(cells: impl IntoIterator<Item = (i64, String, String, String, f64)>) -> Vec<UsageRow> {
    let mut rows: std::collections::BTreeMap<(i64, String, String), Usage> = Default::default();
    for (hour, tenant, task, metric, value) in cells {
        rows.entry((hour, tenant, task)).or_default().set(&metric, value);
    }
    rows.into_iter().map(|((hour, tenant, task), counts)| UsageRow { hour, tenant, task, counts }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn runs_add_up_per_hour_tenant_and_task() {
        let mut m = Meter::default();
        let run = |outcome, ms| Run {
            outcome,
            cpu: Duration::from_millis(ms),
            wall: Duration::from_millis(2 * ms),
            memory_high_water: ms << 20,
            memory_byte_seconds: 1.5,
        };
        m.record(7200, "acme", "tasks.add", &run(Outcome::Succeeded, 10));
        m.record(7300, "acme", "tasks.add", &run(Outcome::Failed, 30));
        m.record(10800, "acme", "tasks.add", &run(Outcome::Succeeded, 5));
        let mut rows = m.take();
        rows.sort_by_key(|r| r.hour);
        assert_eq!(rows.len(), 2);
        let first = rows[0].counts;
        assert_eq!((rows[0].hour, first.runs, first.succeeded, first.failed), (2, 2, 1, 1));
        assert!((first.cpu_seconds - 0.040).abs() < 1e-9 && (first.wall_seconds - 0.080).abs() < 1e-9);
        assert_eq!(first.memory_high_water, 30 << 20);
        assert!(m.take().is_empty());
        m.restore(rows);
        assert_eq!(m.take().len(), 2);
    }
}
