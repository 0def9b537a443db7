//! Which version of a task new messages get while releases roll out: the active (stable)
//! version, a candidate at a share of task ids, and the audit entries that record changes.

use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A task's rollout state as stored on the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The version that serves every message without a version requirement, but the
    /// candidate's share.
    pub stable: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<Version>,
    /// Percent of task ids (0–100) the candidate serves.
    #[serde(default)]
    pub share: f64,
    /// The stable version before the last completed rollout: `taskhost rollback` returns to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Version>,
}

impl RolloutState {
    pub fn only(stable: Version) -> RolloutState {
        RolloutState { stable, candidate: None, share: 0.0, previous: None }
    }

    /// The version a task id gets: the candidate for ids whose bucket falls under its share.
    pub fn pick(&self, task_id: &str) -> &Version {
        match &self.candidate {
            Some(c) if bucket(task_id) < self.share * 100.0 => c,
            _ => &self.stable,
        }
    }

    /// Share (percent) each version serves.
    pub fn shares(&self) -> Vec<(Version, f64)> {
        match &self.candidate {
            Some(c) if self.share >= 100.0 => vec![(c.clone(), 100.0)],
            Some(c) => vec![(self.stable.clone(), 100.0 - self.share), (c.clone(), self.share)],
            None => vec![(self.stable.clone(), 100.0)],
        }
    }
}

/// A task id's place in 0..10000, the same in every process: a task's retries keep their id
/// and so their version.
pub fn bucket(task_id: &str) -> f64 {
    let digest = Sha256::digest(task_id.as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (n % 10_000) as f64
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// RFC 3339.
    pub time: String,
    /// publish, rollout, rollback, yank, gc.
    pub action: String,
    pub task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Who did it (publisher, or the user running the command).
    pub by: String,
    pub detail: String,
}

impl AuditEntry {
    pub fn now(action: &str, task: &str, version: Option<&Version>, by: &str, detail: impl Into<String>) -> AuditEntry {
        AuditEntry {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            action: action.into(),
            task: task.into(),
            version: version.map(|v| v.to_string()),
            by: by.into(),
            detail: detail.into(),
        }
    }
}

/// What a worker process reports every second: the releases it has ready and what it refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadyReport {
    /// `task@version` → component digest, for every loaded version.
    pub ready: std::collections::BTreeMap<String, String>,
    /// Components refused under trust.toml since start.
    pub refused: u64,
    pub pid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_picks_about_that_share_of_ids_and_the_same_id_always_the_same_version() {
        let v1 = Version::new(1, 0, 0);
        let v2 = Version::new(2, 0, 0);
        let state = RolloutState { stable: v1.clone(), candidate: Some(v2.clone()), share: 10.0, previous: None };
        let ids: Vec<String> = (0..20_000).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        let new = ids.iter().filter(|id| *state.pick(id) == v2).count();
        let pct = new as f64 * 100.0 / ids.len() as f64;
        assert!((8.5..11.5).contains(&pct), "{pct}% on the candidate");
        // The bucket is SHA-256 of the id, the same in every process and release.
        assert_eq!(bucket("00000000-0000-0000-0000-000000000000"), 8868.0);
        let all = RolloutState { share: 100.0, ..state.clone() };
        assert!(ids.iter().all(|id| *all.pick(id) == v2));
        let none = RolloutState { share: 0.0, ..state };
        assert!(ids.iter().all(|id| *none.pick(id) == v1));
    }
}
