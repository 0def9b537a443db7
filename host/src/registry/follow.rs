//! A worker following the broker's releases: new ones are downloaded into the plugins dir
//! (the cache), verified and loaded; rollout and yank states are applied; readiness and
//! outcome counts are reported back every second.

use super::release::SignedRelease;
use super::rollout::{ReadyReport, RolloutState};
use super::Registry;
use crate::broker::releases::ReleaseStore;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the release generation is polled: a publish is seen within this.
pub const POLL: Duration = Duration::from_millis(200);
/// How often readiness and outcome counts are reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A worker not heard from for this long is no longer counted as live.
pub const READY_TTL: Duration = Duration::from_secs(5);

/// Connects to the release store at `url` (again every second while it cannot: the
/// plugins dir serves meanwhile) and follows it until dropped.
pub async fn follow_url(registry: Arc<Registry>, url: String, worker: String) {
    let mut warned = false;
    let store = loop {
        match crate::broker::releases::connect(&url).await {
            Ok(store) => break store,
            Err(e) => {
                if !warned {
                    tracing::warn!("release registry unreachable, serving what is loaded: {e}");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    follow(registry, store.into(), worker).await
}

/// Follows `store` until dropped. `worker` names this process in readiness reports.
pub async fn follow(registry: Arc<Registry>, store: Arc<dyn ReleaseStore>, worker: String) {
    let mut seen: Option<u64> = None;
    let mut last_report = Instant::now() - REPORT_EVERY;
    let mut reported = ReadyReport::default();
    let mut failing = false;
    loop {
        match sync_once(&registry, store.as_ref(), &mut seen).await {
            Ok(()) => {
                if failing {
                    tracing::info!("release registry reachable again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("release registry unreachable, serving what is loaded: {e}");
                }
                failing = true;
            }
        }
        // At once when what is loaded changed (a rollout waits on it), else every second.
        let now_ready = ready_report(&registry);
        if now_ready != reported || last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            report(&registry, store.as_ref(), &worker, &now_ready).await;
            reported = now_ready;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn ready_report(registry: &Registry) -> ReadyReport {
    ReadyReport {
        ready: registry.all().iter().map(|tv| (tv.key(), tv.component.digest.clone())).collect(),
        refused: registry.refused_count(),
        pid: std::process::id(),
    }
}

async fn report(registry: &Registry, store: &dyn ReleaseStore, worker: &str, ready: &ReadyReport) {
    let text = serde_json::to_string(ready).expect("a report always encodes");
    if let Err(e) = store.report_ready(worker, &text, READY_TTL).await {
        tracing::debug!("readiness report failed: {e}");
    }
    let outcomes = registry.take_outcomes();
    if let Err(e) = store.add_outcomes(&outcomes).await {
        tracing::debug!("outcome counts lost for this second: {e}");
    }
}

/// Where the last rollout and yank states read are kept in the plugins dir, so a worker
/// restarted while the registry is down serves what the registry last said.
pub const STATE_FILE: &str = ".taskhost-release-state.json";

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct SavedState {
    rollouts: HashMap<String, RolloutState>,
    yanked: HashMap<String, String>,
}

/// Applies the release state saved in the plugins dir, if any (before the first sync).
pub fn restore_state(registry: &Registry) {
    let path = registry.dir().join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<SavedState>(&bytes) {
            Ok(saved) => registry.set_release_state(saved.rollouts, saved.yanked),
            Err(e) => tracing::warn!(file = %path.display(), "saved release state unreadable, ignored: {e}"),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %path.display(), "saved release state unreadable, ignored: {e}"),
    }
}

/// A release key the follower may turn into file names: `task@semver`, no path in it.
fn safe_key(key: &str) -> Option<(String, semver::Version)> {
    if key.contains(['/', '\\', '\0']) || key.starts_with('.') {
        return None;
    }
    super::parse_file_name(&format!("{key}.wasm")).ok()
}

/// One look: if anything changed, fetch what is new and apply rollout and yank states.
pub async fn sync_once(registry: &Arc<Registry>, store: &dyn ReleaseStore, seen: &mut Option<u64>) -> Result<(), String> {
    let generation = store.generation().await.map_err(|e| e.to_string())?;
    if *seen == Some(generation) {
        return Ok(());
    }
    let releases = store.list().await.map_err(|e| e.to_string())?;
    let (mut rollouts, _) = registry.release_state();
    let stored = store.rollouts().await.map_err(|e| e.to_string())?;
    rollouts.retain(|task, _| stored.contains_key(task));
    for (task, json) in stored {
        match serde_json::from_str(&json) {
            Ok(state) => {
                rollouts.insert(task, state);
            }
            // The state in force stays: an unreadable one never lets the newest serve.
            Err(e) => tracing::warn!(task = %task, "rollout state unreadable, the one read before stays: {e}"),
        }
    }
    // The active version, its rollback target and newer (staged) ones: ready before a
    // rollout asks. Older versions stay on the registry.
    let wanted = super::publish::kept_releases(&releases, &rollouts);
    let mut wrote = false;
    for r in &releases {
        let Some((name, version)) = safe_key(&r.key) else {
            tracing::warn!(release = ?r.key, "release key is not task@version; ignored");
            continue;
        };
        if r.yanked.is_some() {
            wrote |= remove_from(registry.dir(), &r.key).await;
            continue;
        }
        if !wanted.contains(&r.key) {
            continue;
        }
        match fetch_into(registry, store, &name, &version, r).await {
            Ok(true) => wrote = true,
            Ok(false) => {}
            Err(e) => tracing::warn!(release = %r.key, "not fetched: {e}"),
        }
    }
    let yanked: HashMap<String, String> = releases.iter().filter_map(|r| r.yanked.clone().map(|why| (r.key.clone(), why))).collect();
    let saved = SavedState { rollouts, yanked };
    if let Ok(text) = serde_json::to_vec(&saved) {
        if let Err(e) = write_atomic(&registry.dir().join(STATE_FILE), &text).await {
            tracing::warn!("cannot save the release state: {e}");
        }
    }
    registry.set_release_state(saved.rollouts, saved.yanked);
    if wrote {
        let r = Arc::clone(registry);
        // Load now rather than at the next directory look.
        let _ = tokio::task::spawn_blocking(move || r.rescan(false)).await;
    }
    *seen = Some(generation);
    Ok(())
}

/// Removes a yanked release's files from the plugins dir; true if there were any.
async fn remove_from(dir: &Path, key: &str) -> bool {
    let wasm = dir.join(format!("{key}.wasm"));
    let mut removed = false;
    for path in [super::release_path(&wasm), wasm.with_extension("toml"), wasm] {
        if tokio::fs::remove_file(&path).await.is_ok() {
            removed = true;
        }
    }
    if removed {
        tracing::info!(release = %key, "yanked release removed from the plugins dir");
    }
    removed
}

/// Writes a release into the plugins dir unless the files there already are this signed
/// release. Everything is checked in memory first — size, digests, signature under the
/// trust file — and nothing that would be refused is written. The manifest and the
/// signed record go first and the component last, each by rename, so a look at the
/// directory never sees a component without its signature.
async fn fetch_into(
    registry: &Registry,
    store: &dyn ReleaseStore,
    name: &str,
    version: &semver::Version,
    release: &crate::broker::releases::StoredRelease,
) -> Result<bool, String> {
    let (key, signed_text) = (release.key.as_str(), release.signed.as_str());
    let signed = SignedRelease::parse(signed_text.as_bytes()).map_err(|e| e.to_string())?;
    let record = signed.unverified_record().map_err(|e| e.to_string())?;
    if record.key() != key {
        return Err(format!("record names {} under key {key}", record.key()));
    }
    let wasm = registry.dir().join(format!("{key}.wasm"));
    let release_file = super::release_path(&wasm);
    if tokio::fs::read(&release_file).await.is_ok_and(|b| b == signed_text.as_bytes()) && wasm.exists() {
        // This release's files are already here (the load checks they are intact).
        return Ok(false);
    }
    let max = registry.max_component_size();
    let component = match &release.location {
        Some(location) => super::oci::pull(location, max).await?,
        None => {
            match store.component_len(key).await.map_err(|e| e.to_string())? {
                Some(n) if n > max => return Err(format!("component is {n} bytes, above this worker's max_component_size ({max})")),
                Some(_) => {}
                None => return Err("component bytes missing".into()),
            }
            store.component(key).await.map_err(|e| e.to_string())?.ok_or("component bytes missing")?
        }
    };
    let manifest = store.manifest(key).await.map_err(|e| e.to_string())?;
    if component.len() as u64 > max || manifest.as_ref().is_some_and(|m| m.len() as u64 > super::MAX_MANIFEST_BYTES) {
        return Err("component or manifest above this worker's size limits".into());
    }
    if super::release::sha256_hex(&component) != record.component_sha256 {
        return Err("the component's bytes differ from the signed digest".into());
    }
    registry.check_release(name, version, &component, manifest.as_deref(), &signed).map_err(|e| format!("refused: {e}"))?;
    let toml = wasm.with_extension("toml");
    match manifest {
        Some(m) => write_atomic(&toml, &m).await?,
        None => match tokio::fs::remove_file(&toml).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", toml.display())),
        },
    }
    write_atomic(&release_file, signed_text.as_bytes()).await?;
    write_atomic(&wasm, &component).await?;
    tracing::info!(release = %key, "release fetched from the registry");
    Ok(true)
}

async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("release"),
        uuid::Uuid::new_v4().simple()
    ));
    tokio::fs::write(&tmp, bytes).await.map_err(|e| format!("{}: {e}", tmp.display()))?;
    tokio::fs::rename(&tmp, path).await.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })
}
