//! Components on disk: `<dir>/<task-name>@<semver>.wasm` with an optional manifest
//! `<task-name>@<semver>.toml`; several versions per task, semver resolution, hot swap.
//!
//! A rescan (polled, see [`WATCH_INTERVAL`]) loads new or changed files and drops
//! vanished ones. Running tasks hold an `Arc` of the version they started on, so a
//! removed or replaced version finishes its in-flight work. An invalid file is logged
//! once per change and the rest keep serving.

pub mod manifest;

pub use manifest::{AutoRetry, Backoff, ByteSize, Manifest, ManifestError, RateLimit, RateLimitScope};

use crate::runtime::{LoadedComponent, Runtime, TaskLimits, DEFAULT_HARD_LIMIT, DEFAULT_MEMORY_LIMIT};
use semver::{Version, VersionReq};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// 300 ms: a new version is serving within the promised 1 s even if the first look
/// catches the file half-written.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(300);

/// One loaded version of one task.
pub struct TaskVersion {
    pub name: String,
    pub version: Version,
    pub manifest: Manifest,
    pub component: LoadedComponent,
    pub path: PathBuf,
    pub size: u64,
}

impl TaskVersion {
    /// Limits from the manifest, or the defaults.
    pub fn limits(&self) -> TaskLimits {
        TaskLimits {
            hard: self.manifest.hard_limit().unwrap_or(DEFAULT_HARD_LIMIT),
            soft: self.manifest.soft_limit(),
            memory: self.manifest.memory_limit.map_or(DEFAULT_MEMORY_LIMIT, |b| b.0),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    #[error("no component serves task {name}")]
    UnknownTask { name: String },
    #[error("task {name}: no loaded version matches {req} (loaded: {loaded})")]
    NoMatchingVersion { name: String, req: String, loaded: String },
    #[error("cannot read plugins directory {dir}: {reason}")]
    Dir { dir: PathBuf, reason: String },
}

/// Why one file in the plugins directory is not serving.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("file name is not <task-name>@<semver>.wasm")]
    BadName,
    #[error("version {0:?} is not semver: {1}")]
    BadVersion(String, String),
    #[error("manifest {path}: {source}")]
    Manifest { path: PathBuf, source: ManifestError },
    #[error("memory_limit {limit} is above this worker's maximum of {max}")]
    MemoryAboveMax { limit: ByteSize, max: ByteSize },
    #[error("{0}")]
    Load(#[from] crate::runtime::LoadError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What one rescan changed.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub added: Vec<(String, Version)>,
    pub removed: Vec<(String, Version)>,
    pub invalid: Vec<(PathBuf, String)>,
}

/// Size and modification times of a component and its manifest: a change reloads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    wasm: (u64, Option<SystemTime>),
    manifest: Option<(u64, Option<SystemTime>)>,
}

type Versions = BTreeMap<Version, Arc<TaskVersion>>;

#[derive(Default)]
struct State {
    tasks: BTreeMap<String, Versions>,
    stamps: HashMap<PathBuf, Stamp>,
}

pub struct Registry {
    dir: PathBuf,
    runtime: Arc<Runtime>,
    state: RwLock<State>,
}

/// Splits `tasks.add@1.2.0.wasm` into `("tasks.add", "1.2.0")`.
pub fn parse_file_name(file_name: &str) -> Result<(String, Version), FileError> {
    let stem = file_name.strip_suffix(".wasm").ok_or(FileError::BadName)?;
    let (name, version) = stem.rsplit_once('@').ok_or(FileError::BadName)?;
    if name.is_empty() || name.contains(['/', '\\']) {
        return Err(FileError::BadName);
    }
    let version = Version::parse(version).map_err(|e| FileError::BadVersion(version.to_string(), e.to_string()))?;
    Ok((name.to_string(), version))
}

fn stamp_of(path: &Path) -> std::io::Result<(u64, Option<SystemTime>)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.len(), meta.modified().ok()))
}

impl Registry {
    /// Opens `dir` and loads what is there now.
    pub fn open(dir: impl Into<PathBuf>, runtime: Arc<Runtime>) -> Result<Arc<Registry>, RegistryError> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(RegistryError::Dir { dir, reason: "not a directory".into() });
        }
        let registry = Arc::new(Registry { dir, runtime, state: RwLock::default() });
        registry.scan()?;
        Ok(registry)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Brings the loaded set in line with the directory. Compiles on the calling
    /// thread: from async code run it with `spawn_blocking` (as [`Registry::watch`] does).
    pub fn scan(&self) -> Result<ScanReport, RegistryError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| RegistryError::Dir { dir: self.dir.clone(), reason: e.to_string() })?;
        let mut report = ScanReport::default();
        let mut present: HashMap<PathBuf, Stamp> = HashMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "wasm") {
                continue;
            }
            let Ok(wasm) = stamp_of(&path) else { continue };
            let manifest = stamp_of(&path.with_extension("toml")).ok();
            present.insert(path, Stamp { wasm, manifest });
        }

        let changed: Vec<(PathBuf, Stamp)> = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            present.iter().filter(|(p, s)| state.stamps.get(*p) != Some(s)).map(|(p, s)| (p.clone(), s.clone())).collect()
        };
        // Compile outside the lock: lookups keep being served meanwhile.
        let mut loaded = Vec::new();
        for (path, stamp) in changed {
            match self.load_file(&path) {
                Ok(tv) => loaded.push((path, stamp, Some(Arc::new(tv)))),
                Err(e) => {
                    tracing::warn!(file = %path.display(), "component not loaded: {e}");
                    report.invalid.push((path.clone(), e.to_string()));
                    loaded.push((path, stamp, None));
                }
            }
        }

        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        for (path, stamp, tv) in loaded {
            // A file that was serving and turned invalid stops serving.
            Self::remove_path(&mut state, &path, &mut report);
            state.stamps.insert(path, stamp);
            if let Some(tv) = tv {
                tracing::debug!(task = %tv.name, version = %tv.version, digest = &tv.component.digest[..12], cached = tv.component.from_cache, "component loaded");
                report.added.push((tv.name.clone(), tv.version.clone()));
                state.tasks.entry(tv.name.clone()).or_default().insert(tv.version.clone(), tv);
            }
        }
        let vanished: Vec<PathBuf> = state.stamps.keys().filter(|p| !present.contains_key(*p)).cloned().collect();
        for path in vanished {
            state.stamps.remove(&path);
            Self::remove_path(&mut state, &path, &mut report);
        }
        for (name, version) in &report.removed {
            tracing::info!(task = %name, version = %version, "component unloaded; in-flight tasks finish on it");
        }
        Ok(report)
    }

    fn remove_path(state: &mut State, path: &Path, report: &mut ScanReport) {
        let mut emptied = None;
        for (name, versions) in state.tasks.iter_mut() {
            if let Some(v) = versions.iter().find(|(_, tv)| tv.path == path).map(|(v, _)| v.clone()) {
                versions.remove(&v);
                report.removed.push((name.clone(), v));
                if versions.is_empty() {
                    emptied = Some(name.clone());
                }
                break;
            }
        }
        if let Some(name) = emptied {
            state.tasks.remove(&name);
        }
    }

    fn load_file(&self, path: &Path) -> Result<TaskVersion, FileError> {
        let file_name = path.file_name().and_then(|n| n.to_str()).ok_or(FileError::BadName)?;
        let (name, version) = parse_file_name(file_name)?;
        let manifest_path = path.with_extension("toml");
        let manifest = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => Manifest::parse(&text).map_err(|source| FileError::Manifest { path: manifest_path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => return Err(e.into()),
        };
        let max = self.runtime.config().max_memory_limit;
        if let Some(limit) = manifest.memory_limit {
            if limit.0 > max {
                return Err(FileError::MemoryAboveMax { limit, max: ByteSize(max) });
            }
        }
        let bytes = std::fs::read(path)?;
        let component = self.runtime.load(&bytes)?;
        Ok(TaskVersion { name, version, manifest, component, path: path.to_path_buf(), size: bytes.len() as u64 })
    }

    /// The newest version of `name`, or the newest matching `req`.
    pub fn resolve(&self, name: &str, req: Option<&VersionReq>) -> Result<Arc<TaskVersion>, RegistryError> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let versions = state.tasks.get(name).ok_or_else(|| RegistryError::UnknownTask { name: name.to_string() })?;
        let found = match req {
            None => versions.values().next_back(),
            Some(req) => versions.iter().rev().find(|(v, _)| req.matches(v)).map(|(_, tv)| tv),
        };
        found.cloned().ok_or_else(|| RegistryError::NoMatchingVersion {
            name: name.to_string(),
            req: req.map(|r| r.to_string()).unwrap_or_default(),
            loaded: versions.keys().map(|v| v.to_string()).collect::<Vec<_>>().join(", "),
        })
    }

    /// Every loaded version, by name then version.
    pub fn all(&self) -> Vec<Arc<TaskVersion>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.tasks.values().flat_map(|vs| vs.values().cloned()).collect()
    }

    /// Names of the tasks served.
    pub fn task_names(&self) -> Vec<String> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.tasks.keys().cloned().collect()
    }

    /// Rescans every `interval` until the returned handle is dropped or aborted.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let registry = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let r = Arc::clone(&registry);
                match tokio::task::spawn_blocking(move || r.scan()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("plugins rescan failed: {e}"),
                    Err(e) => tracing::error!("plugins rescan panicked: {e}"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_carry_task_and_semver() {
        let (name, v) = parse_file_name("media.thumbnail@1.4.0.wasm").unwrap();
        assert_eq!((name.as_str(), v.to_string().as_str()), ("media.thumbnail", "1.4.0"));
        let (name, v) = parse_file_name("a@b@2.0.0-rc.1.wasm").unwrap();
        assert_eq!((name.as_str(), v.to_string().as_str()), ("a@b", "2.0.0-rc.1"));
        assert!(matches!(parse_file_name("tasks.add.wasm"), Err(FileError::BadName)));
        assert!(matches!(parse_file_name("@1.0.0.wasm"), Err(FileError::BadName)));
        assert_eq!(
            parse_file_name("tasks.add@1.0.wasm").unwrap_err().to_string(),
            "version \"1.0\" is not semver: unexpected end of input while parsing minor version number"
        );
    }
}
