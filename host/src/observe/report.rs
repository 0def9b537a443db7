//! What each worker process of a `serve` reports to its `--http` listener: a JSON file
//! per process, rewritten every second, holding its metrics and its recent tasks.

use super::metrics::ProcessMetrics;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a worker rewrites its report.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// A report older than this is from a process that is gone or stuck.
pub const REPORT_STALE: Duration = Duration::from_secs(5);
/// Tasks each process keeps for the dashboard.
pub const RECENT_TASKS: usize = 200;

/// A task as the dashboard lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecentTask {
    pub id: String,
    pub name: String,
    pub version: Option<String>,
    /// Celery's state names: RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED.
    pub state: String,
    pub queue: String,
    pub tenant: Option<String>,
    pub worker: String,
    /// Unix seconds.
    pub received: f64,
    pub started: Option<f64>,
    /// Seconds.
    pub runtime: Option<f64>,
    pub error: Option<String>,
}

/// The newest tasks, oldest dropped first.
#[derive(Debug, Default)]
pub struct RecentTasks {
    tasks: VecDeque<RecentTask>,
}

impl RecentTasks {
    pub fn push(&mut self, task: RecentTask) {
        if self.tasks.len() >= RECENT_TASKS {
            self.tasks.pop_front();
        }
        self.tasks.push_back(task);
    }

    /// The newest entry for `id`, if it is still kept.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut RecentTask> {
        self.tasks.iter_mut().rev().find(|t| t.id == id)
    }

    pub fn to_vec(&self) -> Vec<RecentTask> {
        self.tasks.iter().cloned().collect()
    }
}

/// One worker process's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub node: String,
    pub pid: u32,
    /// Unix seconds.
    pub started_at: f64,
    pub written_at: f64,
    pub concurrency: usize,
    pub queues: Vec<String>,
    pub task_events: bool,
    pub processed: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub metrics: ProcessMetrics,
    pub recent: Vec<RecentTask>,
}

impl WorkerReport {
    pub fn is_fresh(&self, now_unix: f64) -> bool {
        now_unix - self.written_at <= REPORT_STALE.as_secs_f64()
    }
}

pub fn report_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("worker-{pid}.json"))
}

/// Writes a report atomically (temp file, rename): a reader never sees half of one.
pub fn write_report(dir: &Path, report: &WorkerReport) -> std::io::Result<()> {
    let path = report_path(dir, report.pid);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(report).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, &path)
}

/// Every report in `dir`; files long stale (their process died without removing them)
/// are deleted.
pub fn read_reports(dir: &Path, now_unix: f64) -> Vec<WorkerReport> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else { continue };
        match serde_json::from_slice::<WorkerReport>(&bytes) {
            Ok(r) if now_unix - r.written_at > 60.0 => {
                let _ = std::fs::remove_file(&path);
            }
            Ok(r) => out.push(r),
            Err(e) => tracing::debug!("unreadable worker report {}: {e}", path.display()),
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node).then(a.pid.cmp(&b.pid)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_long_stale_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = WorkerReport { node: "a@vm".into(), pid: 1, written_at: 1000.0, ..Default::default() };
        let old = WorkerReport { node: "b@vm".into(), pid: 2, written_at: 900.0, ..Default::default() };
        write_report(dir.path(), &fresh).unwrap();
        write_report(dir.path(), &old).unwrap();
        let got = read_reports(dir.path(), 1003.0);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].node, "a@vm");
        assert!(got[0].is_fresh(1003.0));
        assert!(!got[0].is_fresh(1010.0));
        assert!(!report_path(dir.path(), 2).exists());
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let mut r = RecentTasks::default();
        for i in 0..RECENT_TASKS + 5 {
            r.push(RecentTask {
                id: i.to_string(),
                name: "t".into(),
                version: None,
                state: "RECEIVED".into(),
                queue: "celery".into(),
                tenant: None,
                worker: "w".into(),
                received: 0.0,
                started: None,
                runtime: None,
                error: None,
            });
        }
        assert!(r.get_mut("0").is_none());
        assert!(r.get_mut(&(RECENT_TASKS + 4).to_string()).is_some());
        assert_eq!(r.to_vec().len(), RECENT_TASKS);
    }
}
