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
        ready: registry.all().iter().map(|tv| (format!("{}@{}", tv.name, tv.version), tv.component.digest.clone())).collect(),
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

/// One look: if anything changed, fetch what is new and apply rollout and yank states.
pub async fn sync_once(registry: &Arc<Registry>, store: &dyn ReleaseStore, seen: &mut Option<u64>) -> Result<(), String> {
    let generation = store.generation().await.map_err(|e| e.to_string())?;
    if *seen == Some(generation) {
        return Ok(());
    }
    let releases = store.list().await.map_err(|e| e.to_string())?;
    let mut wrote = false;
    for r in releases.iter().filter(|r| r.yanked.is_none()) {
        match fetch_into(registry.dir(), store, &r.key, &r.signed, &r.digest).await {
            Ok(true) => wrote = true,
            Ok(false) => {}
            Err(e) => tracing::warn!(release = %r.key, "not fetched: {e}"),
        }
    }
    let rollouts: HashMap<String, RolloutState> = store
        .rollouts()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|(task, json)| match serde_json::from_str(&json) {
            Ok(state) => Some((task, state)),
            Err(e) => {
                tracing::warn!(task = %task, "rollout state unreadable, ignored: {e}");
                None
            }
        })
        .collect();
    let yanked = releases.iter().filter_map(|r| r.yanked.clone().map(|why| (r.key.clone(), why))).collect();
    registry.set_release_state(rollouts, yanked);
    if wrote {
        let r = Arc::clone(registry);
        // Load now rather than at the next directory look.
        let _ = tokio::task::spawn_blocking(move || r.rescan(false)).await;
    }
    *seen = Some(generation);
    Ok(())
}

/// Writes a release into `dir` unless its component is there with the same digest: the
/// manifest and the signed record first, the component last, each by rename, so a look
/// at the directory never sees a component without its signature.
async fn fetch_into(dir: &Path, store: &dyn ReleaseStore, key: &str, signed: &str, digest: &str) -> Result<bool, String> {
    let record = SignedRelease::parse(signed.as_bytes()).and_then(|s| s.unverified_record()).map_err(|e| e.to_string())?;
    if record.key() != key || key.contains(['/', '\\']) || key.starts_with('.') {
        return Err(format!("record names {} under key {key}", record.key()));
    }
    let wasm = dir.join(format!("{key}.wasm"));
    if let Ok(existing) = tokio::fs::read(&wasm).await {
        if super::release::sha256_hex(&existing) == digest {
            return Ok(false);
        }
    }
    let component = store.component(key).await.map_err(|e| e.to_string())?.ok_or("component bytes missing")?;
    let manifest = store.manifest(key).await.map_err(|e| e.to_string())?;
    let toml = wasm.with_extension("toml");
    match manifest {
        Some(m) => write_atomic(&toml, &m).await?,
        None => match tokio::fs::remove_file(&toml).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", toml.display())),
        },
    }
    write_atomic(&super::release_path(&wasm), signed.as_bytes()).await?;
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
