//! Release operations from CI and operators: publish, rollout with its failure-rate gate
//! and automatic rollback, rollback, yank and gc — each one appended to the audit log.

use super::release::{ReleaseRecord, SignedRelease};
use super::rollout::{AuditEntry, ReadyReport, RolloutState};
use crate::broker::releases::{PutOutcome, ReleaseStore, StoredRelease};
use crate::broker::BrokerError;
use semver::Version;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseOpError {
    #[error("{0}")]
    Store(#[from] BrokerError),
    #[error("{key} is already published with another component (sha256 {existing}); publish a new version")]
    Conflict { key: String, existing: String },
    #[error("no release {0} in the registry")]
    NoSuchRelease(String),
    #[error("{0} is yanked")]
    Yanked(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Interrupted(String),
    #[error("workers not ready for {key} after {waited:?}: {missing}")]
    NotReady { key: String, waited: Duration, missing: String },
}

/// What `publish` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Published {
    Stored { activated: bool },
    AlreadyPublished,
}

fn audit_text(entry: &AuditEntry) -> String {
    serde_json::to_string(entry).expect("an audit entry always encodes")
}

async fn audit(store: &dyn ReleaseStore, entry: AuditEntry) -> Result<(), BrokerError> {
    store.append_audit(&audit_text(&entry)).await
}

/// Rollout states by task.
pub async fn rollouts(store: &dyn ReleaseStore) -> Result<HashMap<String, RolloutState>, BrokerError> {
    Ok(store.rollouts().await?.into_iter().filter_map(|(t, s)| serde_json::from_str(&s).ok().map(|s| (t, s))).collect())
}

async fn set_state(store: &dyn ReleaseStore, task: &str, state: &RolloutState) -> Result<(), BrokerError> {
    store.set_rollout(task, Some(&serde_json::to_string(state).expect("a state always encodes"))).await
}

/// Stores a signed release (its bytes too, unless `location` says where they are). The
/// first release of a task becomes its active version; a later one waits for `taskhost
/// rollout` unless `activate` is set.
pub async fn publish(
    store: &dyn ReleaseStore,
    signed: &SignedRelease,
    record: &ReleaseRecord,
    component: &[u8],
    manifest: Option<&[u8]>,
    activate: bool,
    location: Option<&str>,
) -> Result<Published, ReleaseOpError> {
    let key = record.key();
    let stored = StoredRelease {
        key: key.clone(),
        signed: signed.to_json(),
        digest: record.component_sha256.clone(),
        yanked: None,
        location: location.map(str::to_string),
    };
    // Bytes that live elsewhere (an OCI registry) are not kept on the broker too.
    let here: &[u8] = if location.is_some() { &[] } else { component };
    match store.put(&stored, here, manifest).await? {
        PutOutcome::AlreadyPublished => return Ok(Published::AlreadyPublished),
        PutOutcome::Conflict { existing } => return Err(ReleaseOpError::Conflict { key, existing }),
        PutOutcome::Stored => {}
    }
    let version = Version::parse(&record.version).map_err(|e| ReleaseOpError::Refused(e.to_string()))?;
    let states = rollouts(store).await?;
    let activated = match states.get(&record.task) {
        None => true,
        Some(_) => activate,
    };
    let detail = format!("sha256 {} ({} bytes), world {}, key {}", &record.component_sha256[..12], record.size, record.world, record.key_id);
    audit(store, AuditEntry::now("publish", &record.task, Some(&version), &record.publisher, detail)).await?;
    if activated {
        let previous = states.get(&record.task).map(|s| s.stable.clone());
        set_state(store, &record.task, &RolloutState { previous, ..RolloutState::only(version.clone()) }).await?;
        audit(store, AuditEntry::now("activate", &record.task, Some(&version), &record.publisher, "100% of new tasks")).await?;
    }
    Ok(Published::Stored { activated })
}

/// A staged rollout of one version.
#[derive(Debug, Clone)]
pub struct RolloutPlan {
    pub task: String,
    pub version: Version,
    /// Percent of new tasks at each step, ending at 100.
    pub steps: Vec<f64>,
    pub interval: Duration,
    /// Roll back once the candidate's failure rate exceeds the stable version's by more than
    /// this many percentage points.
    pub max_failure_rate: f64,
    /// Outcomes of the candidate needed before its failure rate is judged.
    pub min_samples: u64,
    /// How long to wait for every live worker to have the candidate ready.
    pub ready_timeout: Duration,
    pub by: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RolloutOutcome {
    Completed,
    AlreadyActive,
    RolledBack { reason: String },
}

/// Live workers, and those of them without `key` (with `digest`) loaded.
pub async fn readiness(store: &dyn ReleaseStore, key: &str, digest: &str) -> Result<(usize, Vec<String>), BrokerError> {
    let reports = store.ready().await?;
    let mut missing: Vec<String> = reports
        .iter()
        .filter(|(_, r)| {
            serde_json::from_str::<ReadyReport>(r).map_or(true, |r| r.ready.get(key).is_none_or(|d| d != digest))
        })
        .map(|(w, _)| w.clone())
        .collect();
    missing.sort();
    Ok((reports.len(), missing))
}

fn release_of<'a>(releases: &'a [StoredRelease], key: &str) -> Result<&'a StoredRelease, ReleaseOpError> {
    let r = releases.iter().find(|r| r.key == key).ok_or_else(|| ReleaseOpError::NoSuchRelease(key.to_string()))?;
    if r.yanked.is_some() {
        return Err(ReleaseOpError::Yanked(key.to_string()));
    }
    Ok(r)
}

/// Runs a rollout to its end (or its automatic rollback), reporting each change.
pub async fn rollout(
    store: &dyn ReleaseStore,
    plan: &RolloutPlan,
    mut progress: impl FnMut(&str),
) -> Result<RolloutOutcome, ReleaseOpError> {
    let key = format!("{}@{}", plan.task, plan.version);
    let releases = store.list().await?;
    let digest = release_of(&releases, &key)?.digest.clone();
    let states = rollouts(store).await?;
    let current = states.get(&plan.task).cloned();
    let Some(current) = current.filter(|s| s.stable != plan.version) else {
        if states.get(&plan.task).is_some_and(|s| s.stable == plan.version && s.candidate.is_none()) {
            return Ok(RolloutOutcome::AlreadyActive);
        }
        // Nothing serves yet: the version becomes active at once.
        set_state(store, &plan.task, &RolloutState::only(plan.version.clone())).await?;
        audit(store, AuditEntry::now("rollout", &plan.task, Some(&plan.version), &plan.by, "first active version: 100%")).await?;
        return Ok(RolloutOutcome::Completed);
    };
    let stable = current.stable.clone();

    let started = Instant::now();
    loop {
        let (live, missing) = readiness(store, &key, &digest).await?;
        if live > 0 && missing.is_empty() {
            progress(&format!("{live} live worker(s) have {key} ready"));
            break;
        }
        if started.elapsed() >= plan.ready_timeout {
            let missing = if live == 0 { "no live worker follows the registry".to_string() } else { missing.join(", ") };
            return Err(ReleaseOpError::NotReady { key, waited: plan.ready_timeout, missing });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let back_to_stable = RolloutState { previous: current.previous.clone(), ..RolloutState::only(stable.clone()) };
    match run_steps(store, plan, &key, &current, &mut progress).await {
        Ok(Some(reason)) => {
            set_state(store, &plan.task, &back_to_stable).await?;
            audit(store, AuditEntry::now("rollback", &plan.task, Some(&plan.version), &plan.by, format!("automatic: {reason}"))).await?;
            progress(&format!("rolled back: {reason}"));
            return Ok(RolloutOutcome::RolledBack { reason });
        }
        Ok(None) => {}
        Err(e @ ReleaseOpError::Interrupted(_)) => return Err(e),
        Err(e) => {
            // A candidate is never left at a partial share by a failed rollout.
            if set_state(store, &plan.task, &back_to_stable).await.is_ok() {
                let _ = audit(store, AuditEntry::now("rollback", &plan.task, Some(&plan.version), &plan.by, format!("rollout failed: {e}"))).await;
            }
            return Err(e);
        }
    }
    let done = RolloutState { previous: Some(stable.clone()), ..RolloutState::only(plan.version.clone()) };
    set_state(store, &plan.task, &done).await?;
    audit(store, AuditEntry::now("rollout", &plan.task, Some(&plan.version), &plan.by, format!("100% of new tasks (was {stable})")))
        .await?;
    progress(&format!("{key}: 100% of new tasks"));
    Ok(RolloutOutcome::Completed)
}

/// A step holds at most this many intervals while too few of the candidate's outcomes
/// have come in to judge it; then the rollout gives up and returns to the stable version.
const MAX_STEP_HOLD: u32 = 10;

/// Runs the partial steps; `Some(reason)` when the candidate must be rolled back.
async fn run_steps(
    store: &dyn ReleaseStore,
    plan: &RolloutPlan,
    key: &str,
    current: &RolloutState,
    progress: &mut impl FnMut(&str),
) -> Result<Option<String>, ReleaseOpError> {
    let stable = &current.stable;
    let stable_key = format!("{}@{}", plan.task, stable);
    for &share in &plan.steps {
        if share >= 100.0 {
            break;
        }
        let state = RolloutState { stable: stable.clone(), candidate: Some(plan.version.clone()), share, previous: current.previous.clone() };
        set_state(store, &plan.task, &state).await?;
        audit(store, AuditEntry::now("rollout", &plan.task, Some(&plan.version), &plan.by, format!("{share}% of new tasks"))).await?;
        progress(&format!("{key}: {share}% of new tasks"));
        let base = store.outcomes().await?;
        let step_started = Instant::now();
        let mut judged = false;
        loop {
            let elapsed = step_started.elapsed();
            if elapsed >= plan.interval && judged {
                break;
            }
            if elapsed >= plan.interval * MAX_STEP_HOLD {
                return Ok(Some(format!(
                    "fewer than {} outcomes of {key} in {:?}: too little traffic to judge it",
                    plan.min_samples,
                    plan.interval * MAX_STEP_HOLD
                )));
            }
            tokio::time::sleep(Duration::from_millis(250).min(plan.interval)).await;
            // Someone else (rollback, yank, another rollout) changed the state: stop here.
            if rollouts(store).await?.get(&plan.task) != Some(&state) {
                return Err(ReleaseOpError::Interrupted(format!("the rollout state of {} was changed by another command; stopped", plan.task)));
            }
            let now = store.outcomes().await?;
            let delta = |k: &str| {
                let (a, b) = now.get(k).copied().unwrap_or_default();
                let (a0, b0) = base.get(k).copied().unwrap_or_default();
                (a.saturating_sub(a0), b.saturating_sub(b0))
            };
            let (c_ok, c_failed) = delta(key);
            let (s_ok, s_failed) = delta(&stable_key);
            if c_ok + c_failed < plan.min_samples.max(1) {
                continue;
            }
            judged = true;
            let rate = |ok: u64, failed: u64| if ok + failed == 0 { 0.0 } else { failed as f64 * 100.0 / (ok + failed) as f64 };
            let (c_rate, s_rate) = (rate(c_ok, c_failed), rate(s_ok, s_failed));
            if c_rate > s_rate + plan.max_failure_rate {
                return Ok(Some(format!(
                    "{key} failed {c_rate:.1}% of {} tasks against {s_rate:.1}% of {} on {stable} (limit +{}%)",
                    c_ok + c_failed,
                    s_ok + s_failed,
                    plan.max_failure_rate
                )));
            }
        }
    }
    Ok(None)
}

/// Stops a rollout in progress (back to the stable version), or returns to the version
/// that was active before the last completed one. Returns the version now active.
pub async fn rollback(store: &dyn ReleaseStore, task: &str, by: &str) -> Result<Version, ReleaseOpError> {
    let states = rollouts(store).await?;
    let state = states.get(task).ok_or_else(|| ReleaseOpError::NoSuchRelease(format!("{task} (no active release)")))?;
    let (next, detail) = match (&state.candidate, &state.previous) {
        (Some(c), _) => (RolloutState { previous: state.previous.clone(), ..RolloutState::only(state.stable.clone()) }, format!("stopped the rollout of {c}")),
        (None, Some(p)) => (RolloutState::only(p.clone()), format!("from {}", state.stable)),
        (None, None) => return Err(ReleaseOpError::Refused(format!("{task}: no earlier version to roll back to"))),
    };
    set_state(store, task, &next).await?;
    audit(store, AuditEntry::now("rollback", task, Some(&next.stable), by, detail)).await?;
    Ok(next.stable)
}

/// Yanks a release: it serves nothing more; messages requiring only it are dead-lettered.
/// If it was active, the version before it (or the newest other) becomes active.
pub async fn yank(store: &dyn ReleaseStore, task: &str, version: &Version, reason: &str, by: &str) -> Result<(), ReleaseOpError> {
    let key = format!("{task}@{version}");
    if !store.yank(&key, reason).await? {
        return Err(ReleaseOpError::NoSuchRelease(key));
    }
    audit(store, AuditEntry::now("yank", task, Some(version), by, reason)).await?;
    let states = rollouts(store).await?;
    if let Some(state) = states.get(task) {
        let releases = store.list().await?;
        let others: Vec<Version> = releases
            .iter()
            .filter(|r| r.yanked.is_none())
            .filter_map(|r| r.key.rsplit_once('@').filter(|(t, _)| *t == task).and_then(|(_, v)| Version::parse(v).ok()))
            .collect();
        let next = if state.candidate.as_ref() == Some(version) {
            Some(RolloutState { previous: state.previous.clone(), ..RolloutState::only(state.stable.clone()) })
        } else if state.stable == *version {
            // Only back to an older version: never one that was staged and not rolled out.
            let fallback = state
                .previous
                .clone()
                .filter(|p| others.contains(p) && p < version)
                .or_else(|| others.iter().filter(|v| *v < version).max().cloned());
            match fallback {
                Some(v) => Some(RolloutState::only(v)),
                None => {
                    // The state stays on the yanked version, which serves nothing: a newer
                    // staged release is not activated by a yank.
                    audit(store, AuditEntry::now("yank", task, Some(version), by, "no older version: nothing serves until a rollout")).await?;
                    return Ok(());
                }
            }
        } else {
            None
        };
        if let Some(next) = next {
            set_state(store, task, &next).await?;
            audit(store, AuditEntry::now("activate", task, Some(&next.stable), by, format!("after the yank of {version}"))).await?;
        }
    }
    Ok(())
}

/// `task@version` split, if the version is semver.
fn key_parts(key: &str) -> Option<(&str, Version)> {
    let (task, version) = key.rsplit_once('@')?;
    Some((task, Version::parse(version).ok()?))
}

/// The releases still needed, by key: per task under a rollout its stable version, the
/// candidate, the version a rollback returns to and anything newer (staged); per task
/// without one, its newest. Yanked releases are never among them. What followers fetch and
/// what gc keeps.
pub(crate) fn kept_releases(releases: &[StoredRelease], states: &HashMap<String, RolloutState>) -> HashSet<String> {
    let live: Vec<(&str, &str, Version)> =
        releases.iter().filter(|r| r.yanked.is_none()).filter_map(|r| key_parts(&r.key).map(|(t, v)| (r.key.as_str(), t, v))).collect();
    let mut newest: HashMap<&str, &Version> = HashMap::new();
    for (_, t, v) in &live {
        if newest.get(t).is_none_or(|n| v > *n) {
            newest.insert(*t, v);
        }
    }
    live.iter()
        .filter(|(_, t, v)| match states.get(*t) {
            Some(s) => *v >= s.stable || s.previous.as_ref() == Some(v) || s.candidate.as_ref() == Some(v),
            None => newest.get(t) == Some(&v),
        })
        .map(|(key, _, _)| key.to_string())
        .collect()
}

/// Deletes from the registry the releases of `task` (or of every task) that nothing needs
/// any more: not kept (above) and not matched by `required`, the version requirements of
/// the messages still queued. Yanked releases stay: their record is what turns a message
/// requiring them into a dead letter with the reason. Returns the keys deleted (or that
/// would be, with `dry_run`).
pub async fn gc(
    store: &dyn ReleaseStore,
    task: Option<&str>,
    required: &[(String, semver::VersionReq)],
    dry_run: bool,
    by: &str,
) -> Result<Vec<String>, ReleaseOpError> {
    let states = rollouts(store).await?;
    let releases = store.list().await?;
    let kept = kept_releases(&releases, &states);
    let mut gone = Vec::new();
    for r in releases.iter().filter(|r| r.yanked.is_none() && !kept.contains(&r.key)) {
        let Some((t, v)) = key_parts(&r.key) else { continue };
        if task.is_some_and(|only| only != t) || required.iter().any(|(rt, req)| rt == t && req.matches(&v)) {
            continue;
        }
        if !dry_run {
            store.delete(&r.key).await?;
            audit(store, AuditEntry::now("gc", t, Some(&v), by, "deleted from the registry")).await?;
        }
        gone.push(r.key.clone());
    }
    Ok(gone)
}
