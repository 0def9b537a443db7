//! Components on disk: `<dir>/<task-name>@<semver>.wasm` with an optional manifest
//! `<task-name>@<semver>.toml`; several versions per task, semver resolution, hot swap.
//!
//! A rescan (polled, see [`WATCH_INTERVAL`]) loads new or changed files and drops
//! vanished ones. Running tasks hold an `Arc` of the version they started on, so a
//! removed or replaced version finishes its in-flight work. An invalid file is logged
//! once per change and the rest keep serving; a file that fails to load never unloads
//! the build it was meant to replace. Only regular files are read, within size caps.

pub mod follow;
pub mod manifest;
pub mod oci;
pub mod publish;
pub mod release;
pub mod rollout;

pub use manifest::{AutoRetry, Backoff, ByteSize, Manifest, ManifestError, RateLimit, RateLimitScope};

use crate::ceilings::Ceilings;
use crate::runtime::{DirGrant, Grants, LoadedComponent, Runtime, TaskLimits, DEFAULT_HARD_LIMIT, DEFAULT_MAX_SENT_TASKS, DEFAULT_MEMORY_LIMIT};
use semver::{Version, VersionReq};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// 300 ms: a new version is serving within the promised 1 s even if the first look
/// catches the file half-written.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(300);
/// Largest manifest read.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// One loaded version of one task.
pub struct TaskVersion {
    pub name: String,
    pub version: Version,
    pub manifest: Manifest,
    pub component: LoadedComponent,
    pub path: PathBuf,
    pub size: u64,
    /// How long reading, compiling (or mapping) and linking it took.
    pub load_time: Duration,
    limits: TaskLimits,
    grants: Arc<Grants>,
    /// `name@version`, made once: outcomes are counted under it for every task run.
    key: String,
}

impl TaskVersion {
    /// Limits from the manifest, or the defaults, within the operator's ceilings.
    pub fn limits(&self) -> TaskLimits {
        self.limits
    }

    /// What its manifest grants each run.
    pub fn grants(&self) -> Arc<Grants> {
        self.grants.clone()
    }

    /// `task@version`, as releases are named.
    pub fn key(&self) -> String {
        self.key.clone()
    }
}

fn limits_within(manifest: &Manifest, ceilings: &Ceilings) -> TaskLimits {
    let hard = manifest.hard_limit().unwrap_or(DEFAULT_HARD_LIMIT).min(ceilings.max_time_limit);
    TaskLimits {
        hard,
        soft: manifest.soft_limit().map(|s| s.min(hard)),
        memory: manifest.memory_limit.map_or(DEFAULT_MEMORY_LIMIT, |b| b.0).min(ceilings.max_task_memory),
        precise_clocks: manifest.precise_clocks.unwrap_or(false),
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    #[error("no component serves task {name}")]
    UnknownTask { name: String },
    #[error("task {name}: no loaded version matches {req} (loaded: {loaded})")]
    NoMatchingVersion { name: String, req: String, loaded: String },
    #[error("task {name}: every version matching {req} was yanked: {reason}")]
    Yanked { name: String, req: String, reason: String },
    #[error("plugins directory {} does not exist", dir.display())]
    Missing { dir: PathBuf },
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
    #[error("{} is a symbolic link; links are not followed unless the operator sets allow_symlinks", .0.display())]
    Symlink(PathBuf),
    #[error("{} is not a regular file", .0.display())]
    NotRegular(PathBuf),
    #[error("{} is {size} bytes, above this worker's ceiling of {max} (max_component_size)", path.display())]
    TooLarge { path: PathBuf, size: u64, max: ByteSize },
    #[error("{0} (remembered for this digest; not compiled again)")]
    Remembered(String),
    #[error("refused under {trust}: {refusal}")]
    Refused { trust: String, refusal: release::Refusal },
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
    release: Option<(u64, Option<SystemTime>)>,
}

/// `<dir>/<task>@<version>.release.json` beside `<task>@<version>.wasm`.
pub fn release_path(wasm: &Path) -> PathBuf {
    wasm.with_extension("release.json")
}

/// How a registry treats signatures.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// trust.toml: only releases signed by a key it trusts for the task's name load.
    pub trust: Option<PathBuf>,
    /// Load unsigned components too (development; loudly warned). Signed ones are still
    /// verified when a trust file is given.
    pub allow_unsigned: bool,
}

/// The trust file as last read, and the stamp that tells when to read it again.
#[derive(Default)]
struct TrustState {
    trust: Option<Arc<release::Trust>>,
    stamp: Option<(u64, u64, Option<SystemTime>)>,
}

type Versions = BTreeMap<Version, Arc<TaskVersion>>;

#[derive(Default)]
struct State {
    tasks: BTreeMap<String, Versions>,
    stamps: HashMap<PathBuf, Stamp>,
    /// Files being loaded now, with the stamp being loaded and the task they name.
    loading: HashMap<PathBuf, (Stamp, String)>,
    /// Components that failed to compile or link, by digest: a copy under another name,
    /// or the same bytes touched again, fails at once instead of compiling again.
    failed: HashMap<String, String>,
}

pub struct Registry {
    dir: PathBuf,
    runtime: Arc<Runtime>,
    state: RwLock<State>,
    /// Loads running at once (one per core): each compiles on its thread or child.
    load_slots: (Mutex<usize>, Condvar),
    /// Load only the versions of this task (`taskhost run`: compile nothing it will not run).
    only: Option<String>,
    policy: TrustPolicy,
    trust: RwLock<TrustState>,
    /// Components refused under the trust file since start.
    refused: AtomicU64,
    /// Rollout state per task, as the release follower last read it from the broker.
    rollouts: RwLock<HashMap<String, rollout::RolloutState>>,
    /// Yanked releases (`task@version`) and why.
    yanked: RwLock<HashMap<String, String>>,
    /// (succeeded, failed) per `task@version` since the follower last took them.
    outcomes: Mutex<crate::worker::HashMap<String, (u64, u64)>>,
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

/// Length, inode and mtime through symlinks: a mounted secret or config map swaps the
/// link's target rather than writing the file.
fn followed_stamp(path: &Path) -> Option<(u64, u64, Option<SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.ino(), meta.modified().ok()))
}

fn stamp_of(path: &Path) -> std::io::Result<(u64, Option<SystemTime>)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.len(), meta.modified().ok()))
}

/// Reads a file of the plugins directory: a regular file only (never a FIFO or a device,
/// whose open or read could block the loader), a symlink only where allowed, at most
/// `max` bytes. Checked on the opened file, so a swap after the check changes nothing.
fn read_plugin_file(path: &Path, max: u64, allow_symlinks: bool) -> Result<Vec<u8>, FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_NONBLOCK;
    if !allow_symlinks {
        if std::fs::symlink_metadata(path)?.file_type().is_symlink() {
            return Err(FileError::Symlink(path.to_path_buf()));
        }
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            FileError::Symlink(path.to_path_buf())
        } else {
            FileError::Io(e)
        }
    })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(FileError::NotRegular(path.to_path_buf()));
    }
    if meta.len() > max {
        return Err(FileError::TooLarge { path: path.to_path_buf(), size: meta.len(), max: ByteSize(max) });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // A file still growing is read up to the cap and no further.
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(FileError::TooLarge { path: path.to_path_buf(), size: bytes.len() as u64, max: ByteSize(max) });
    }
    Ok(bytes)
}

/// The directories a manifest asks for that the operator allows: each must exist and lie
/// inside a directory the operator lists; a writable grant under a read-only one is
/// granted read-only. What is dropped is reported at load; the task runs without it.
fn effective_dirs(asked: &[manifest::DirSpec], allowed: &[crate::ceilings::AllowedDir], file: &Path) -> Vec<DirGrant> {
    asked
        .iter()
        .filter_map(|spec| {
            let shown = spec.host.display();
            let Some(host) = spec.host.canonicalize().ok().filter(|p| p.is_dir()) else {
                tracing::warn!(file = %file.display(), "[grants] dirs: {shown} is not an existing directory; not granted");
                return None;
            };
            let roots = allowed.iter().filter(|a| a.path.canonicalize().is_ok_and(|root| host.starts_with(root)));
            let Some(writable_root) = roots.map(|a| a.writable).max() else {
                tracing::warn!(
                    file = %file.display(),
                    "[grants] dirs: {shown} is not inside a directory the operator allows (taskhost.toml [grants] dirs, --allow-dir); not granted"
                );
                return None;
            };
            let writable = spec.mode == manifest::DirMode::Rw;
            if writable && !writable_root {
                tracing::warn!(file = %file.display(), "[grants] dirs: {shown} granted read-only: the operator allows it read-only");
            }
            Some(DirGrant { host, guest: spec.guest.clone(), writable: writable && writable_root })
        })
        .collect()
}

/// The network grants a manifest asks for that the operator's list (if any) also names;
/// what is dropped is reported at load and the task runs without it. A loopback, private
/// or link-local address named literally is granted only where the operator's list names
/// it too: a component's author does not decide what of the worker's network it reaches
/// (the cloud metadata address, the broker).
fn within_operator<T: PartialEq + Clone + std::fmt::Display>(
    asked: &[T],
    allowed: &Option<Vec<T>>,
    private_literal: impl Fn(&T) -> bool,
    key: &str,
    file: &Path,
) -> Vec<T> {
    asked
        .iter()
        .filter(|a| {
            let ok = match allowed {
                Some(allowed) => allowed.contains(a),
                None => !private_literal(a),
            };
            if !ok {
                let why = if allowed.is_none() { "a non-public address is granted only where the operator allows it" } else { "not allowed by the operator" };
                tracing::warn!(file = %file.display(), "[grants] {key}: \"{a}\": {why} (taskhost.toml [grants] {key}, --allow-{key}); not granted");
            }
            ok
        })
        .cloned()
        .collect()
}

/// Queues the manifests in `dir` name (`queue = "media_heavy"`), sorted, without loading
/// any component: what a worker given no `-Q` serves besides `celery`.
pub fn manifest_queues(dir: &Path) -> Vec<String> {
    let mut queues = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "toml") || !path.with_extension("wasm").exists() {
            continue;
        }
        let Ok(bytes) = read_plugin_file(&path, MAX_MANIFEST_BYTES, false) else { continue };
        if let Ok(Some(queue)) = Manifest::parse(&String::from_utf8_lossy(&bytes)).map(|m| m.queue) {
            queues.insert(queue);
        }
    }
    queues.into_iter().collect()
}

/// What a plugins directory holds, for messages: "dist/plugins (19 components)", or why
/// it holds none — with the way out when it is a folder of crates (`./plugins` in a
/// checkout of this repository holds the example components' sources).
pub fn describe_dir(dir: &Path) -> String {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    let components = entries.iter().filter(|p| p.extension().is_some_and(|e| e == "wasm")).count();
    if components > 0 {
        return format!("{} ({components} component{})", dir.display(), if components == 1 { "" } else { "s" });
    }
    let crates = entries.iter().filter(|p| p.join("Cargo.toml").is_file()).count();
    if crates > 0 {
        format!(
            "{}: no components (<task>@<version>.wasm), but {crates} Rust crate(s): build them with `make plugins` \
             and use --plugins dist/plugins",
            dir.display()
        )
    } else {
        format!("{}: no components (<task>@<version>.wasm)", dir.display())
    }
}

impl Registry {
    /// Opens `dir` and loads what is there now.
    pub fn open(dir: impl Into<PathBuf>, runtime: Arc<Runtime>) -> Result<Arc<Registry>, RegistryError> {
        Self::open_with(dir.into(), runtime, None, TrustPolicy::default())
    }

    /// Opens `dir` and loads the versions of `task` there, nothing else.
    pub fn open_for_task(dir: impl Into<PathBuf>, runtime: Arc<Runtime>, task: &str) -> Result<Arc<Registry>, RegistryError> {
        Self::open_with(dir.into(), runtime, Some(task.to_string()), TrustPolicy::default())
    }

    /// Opens `dir` (all tasks, or only `only`) under a trust policy.
    pub fn open_with(
        dir: PathBuf,
        runtime: Arc<Runtime>,
        only: Option<String>,
        policy: TrustPolicy,
    ) -> Result<Arc<Registry>, RegistryError> {
        if !dir.exists() {
            return Err(RegistryError::Missing { dir });
        }
        if !dir.is_dir() {
            return Err(RegistryError::Dir { dir, reason: "not a directory".into() });
        }
        let slots = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut trust = TrustState::default();
        if let Some(path) = &policy.trust {
            let loaded = release::Trust::load(path).map_err(|e| RegistryError::Dir { dir: path.clone(), reason: e.to_string() })?;
            trust = TrustState { trust: Some(Arc::new(loaded)), stamp: followed_stamp(path) };
        }
        let registry = Arc::new(Registry {
            dir,
            runtime,
            state: RwLock::default(),
            load_slots: (Mutex::new(slots), Condvar::new()),
            only,
            policy,
            trust: RwLock::new(trust),
            refused: AtomicU64::new(0),
            rollouts: RwLock::default(),
            yanked: RwLock::default(),
            outcomes: Mutex::default(),
        });
        registry.scan()?;
        Ok(registry)
    }

    /// The engine its components were compiled for.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ceilings(&self) -> &Ceilings {
        &self.runtime.config().ceilings
    }

    /// Brings the loaded set in line with the directory and waits for every load it
    /// started. Compiles on other threads: from async code run it with `spawn_blocking`.
    pub fn scan(self: &Arc<Self>) -> Result<ScanReport, RegistryError> {
        self.rescan(true)
    }

    /// One look at the directory. Each changed file loads on a thread of its own, so a
    /// slow compile (a bomb, say) holds up only its own file; with `wait` false the
    /// loads finish in the background and a later look sees them done.
    pub(crate) fn rescan(self: &Arc<Self>, wait: bool) -> Result<ScanReport, RegistryError> {
        self.reread_trust();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| RegistryError::Dir { dir: self.dir.clone(), reason: e.to_string() })?;
        let mut report = ScanReport::default();
        let mut present: HashMap<PathBuf, Stamp> = HashMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "wasm") {
                continue;
            }
            if let Some(only) = &self.only {
                let name = path.file_name().and_then(|n| n.to_str()).and_then(|n| parse_file_name(n).ok());
                if name.is_none_or(|(name, _)| name != *only) {
                    continue;
                }
            }
            let Ok(wasm) = stamp_of(&path) else { continue };
            let manifest = stamp_of(&path.with_extension("toml")).ok();
            let release = stamp_of(&release_path(&path)).ok();
            present.insert(path, Stamp { wasm, manifest, release });
        }

        let mut started = Vec::new();
        {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            for (path, stamp) in &present {
                let busy = state.loading.get(path).is_some_and(|(s, _)| s == stamp);
                if busy || state.stamps.get(path) == Some(stamp) {
                    continue;
                }
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| parse_file_name(n).ok())
                    .map(|(name, _)| name)
                    .unwrap_or_default();
                state.loading.insert(path.clone(), (stamp.clone(), name));
                started.push((path.clone(), stamp.clone()));
            }
            let vanished: Vec<PathBuf> = state.stamps.keys().filter(|p| !present.contains_key(*p)).cloned().collect();
            for path in vanished {
                state.stamps.remove(&path);
                Self::remove_path(&mut state, &path, &mut report);
            }
        }
        for (name, version) in &report.removed {
            tracing::info!(task = %name, version = %version, "component unloaded; in-flight tasks finish on it");
        }

        let mut threads = Vec::new();
        for (path, stamp) in started {
            let registry = Arc::clone(self);
            let this_path = path.clone();
            let spawned = std::thread::Builder::new().name("taskhost-load".into()).spawn(move || {
                let mut report = ScanReport::default();
                let result = {
                    let _slot = registry.load_slot();
                    registry.load_file(&path)
                };
                registry.install(path, stamp, result, &mut report);
                report
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::error!("cannot start a loader thread: {e}");
                    // Not loading after all: a later look tries again.
                    let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                    state.loading.remove(&this_path);
                }
            }
        }
        if wait {
            for t in threads {
                if let Ok(r) = t.join() {
                    report.added.extend(r.added);
                    report.removed.extend(r.removed);
                    report.invalid.extend(r.invalid);
                }
            }
        }
        Ok(report)
    }

    fn load_slot(&self) -> impl Drop + '_ {
        struct Slot<'a>(&'a (Mutex<usize>, Condvar));
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                self.0 .1.notify_one();
            }
        }
        let (count, freed) = &self.load_slots;
        let mut free = count.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Slot(&self.load_slots)
    }

    /// Puts one file's load outcome in place. A file that fails to load never takes
    /// down the version it replaces: a half-written copy over a serving file, or a bad
    /// build, leaves the earlier build serving until a good one arrives.
    fn install(&self, path: PathBuf, stamp: Stamp, result: Result<TaskVersion, FileError>, report: &mut ScanReport) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        // Only the load of the newest stamp seen counts: an older load that finishes
        // after a newer one must not put the older build back.
        if !state.loading.get(&path).is_some_and(|(s, _)| *s == stamp) {
            return;
        }
        state.loading.remove(&path);
        if std::fs::symlink_metadata(&path).is_err() {
            // Gone while it loaded: a later look has already unloaded it, or will.
            return;
        }
        state.stamps.insert(path.clone(), stamp);
        match result {
            Ok(tv) => {
                Self::remove_path(&mut state, &path, report);
                tracing::debug!(task = %tv.name, version = %tv.version, digest = &tv.component.digest[..12], cached = tv.component.from_cache, footprint = ?tv.component.footprint, "component loaded");
                report.added.push((tv.name.clone(), tv.version.clone()));
                state.tasks.entry(tv.name.clone()).or_default().insert(tv.version.clone(), Arc::new(tv));
            }
            Err(e @ FileError::Refused { .. }) => {
                // Never keep serving a build the trust file no longer accepts.
                Self::remove_path(&mut state, &path, report);
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(file = %path.display(), "component refused: {e}");
                report.invalid.push((path, e.to_string()));
            }
            Err(e) if self.policy.trust.is_some() => {
                // Under a trust file the earlier build is not kept either: it was verified
                // against files that are no longer there (or a trust file that changed).
                Self::remove_path(&mut state, &path, report);
                tracing::warn!(file = %path.display(), "component not loaded (and no earlier build kept under the trust file): {e}");
                report.invalid.push((path, e.to_string()));
            }
            Err(e) => {
                let serving = state.tasks.values().flat_map(|vs| vs.values()).any(|tv| tv.path == path);
                if serving {
                    tracing::warn!(file = %path.display(), "component not loaded, the build loaded earlier keeps serving: {e}");
                } else {
                    tracing::warn!(file = %path.display(), "component not loaded: {e}");
                }
                report.invalid.push((path, e.to_string()));
            }
        }
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
        let started = std::time::Instant::now();
        let file_name = path.file_name().and_then(|n| n.to_str()).ok_or(FileError::BadName)?;
        let (name, version) = parse_file_name(file_name)?;
        let ceilings = self.ceilings();
        let manifest_path = path.with_extension("toml");
        // Both files read once, and the signature checked over exactly those bytes before
        // anything in them is parsed or compiled.
        let manifest_bytes = match read_plugin_file(&manifest_path, MAX_MANIFEST_BYTES, ceilings.allow_symlinks) {
            Ok(bytes) => Some(bytes),
            Err(FileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let bytes = read_plugin_file(path, ceilings.max_component_size, ceilings.allow_symlinks)?;
        self.verify_release(path, &name, &version, &bytes, manifest_bytes.as_deref())?;
        let manifest = match &manifest_bytes {
            Some(bytes) => Manifest::parse(&String::from_utf8_lossy(bytes))
                .and_then(|m| m.check_ceilings(ceilings).map(|()| m))
                .map_err(|source| FileError::Manifest { path: manifest_path.clone(), source })?,
            None => Manifest::default(),
        };
        if manifest.precise_clocks == Some(true) && !ceilings.allow_precise_clocks {
            tracing::warn!(file = %path.display(), "precise_clocks asked for but not allowed (allow_precise_clocks); the task gets coarse clocks");
        }
        let digest = crate::runtime::digest(&bytes);
        if let Some(reason) = self.state.read().unwrap_or_else(|p| p.into_inner()).failed.get(&digest) {
            return Err(FileError::Remembered(reason.clone()));
        }
        let component = self.runtime.load(&bytes).inspect_err(|e| {
            // Only what the bytes decide is remembered: a timeout on a busy machine or a
            // host fault (no compiler process, no cache) may pass.
            if !matches!(e, crate::runtime::LoadError::CompileTimeout(_) | crate::runtime::LoadError::Host(_)) {
                self.state.write().unwrap_or_else(|p| p.into_inner()).failed.insert(digest.clone(), e.to_string());
            }
        })?;
        let limits = limits_within(&manifest, ceilings);
        let grants = Arc::new(Grants {
            send_tasks: manifest.grants.send_tasks.clone(),
            max_sent_tasks: manifest.max_sent_tasks.unwrap_or(DEFAULT_MAX_SENT_TASKS),
            dirs: effective_dirs(&manifest.grants.dirs, &ceilings.dirs, path),
            config: manifest.grants.config.clone(),
            operator_send_tasks: ceilings.send_tasks.clone(),
            http: within_operator(&manifest.grants.http, &ceilings.http, crate::runtime::Origin::is_private_literal, "http", path),
            max_http_requests: manifest.max_http_requests.unwrap_or(crate::runtime::DEFAULT_MAX_HTTP_REQUESTS),
            max_http_response_bytes: manifest
                .max_http_response_bytes
                .map_or(crate::runtime::DEFAULT_MAX_HTTP_RESPONSE_BYTES, |b| b.0),
            tcp: within_operator(&manifest.grants.tcp, &ceilings.tcp, crate::runtime::TcpTarget::is_private_literal, "tcp", path),
        });
        if let Some(allowed) = &ceilings.send_tasks {
            for pattern in manifest.grants.send_tasks.iter().filter(|p| !crate::runtime::grants_within(p, allowed)) {
                tracing::warn!(file = %path.display(), "[grants] send_tasks: {pattern:?} reaches beyond what the operator allows; each follow-up must match both");
            }
        }
        Ok(TaskVersion {
            key: format!("{name}@{version}"),
            name,
            version,
            manifest,
            component,
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            load_time: started.elapsed(),
            limits,
            grants,
        })
    }

    /// Reads the trust file again if it changed; every component is then checked again
    /// (a revoked key's releases stop loading). An unreadable new version keeps the old.
    fn reread_trust(&self) {
        let Some(path) = &self.policy.trust else { return };
        let stamp = followed_stamp(path);
        if self.trust.read().unwrap_or_else(|p| p.into_inner()).stamp == stamp {
            return;
        }
        match release::Trust::load(path) {
            Ok(trust) => {
                tracing::info!(trust = %path.display(), "trust file changed: checking every component again");
                *self.trust.write().unwrap_or_else(|p| p.into_inner()) = TrustState { trust: Some(Arc::new(trust)), stamp };
                self.state.write().unwrap_or_else(|p| p.into_inner()).stamps.clear();
            }
            Err(e) => {
                tracing::error!("{e}; keeping the trust file read before");
                self.trust.write().unwrap_or_else(|p| p.into_inner()).stamp = stamp;
            }
        }
    }

    /// Checks a component against the trust file: its signed release record must name
    /// these bytes. Without a trust file nothing is checked.
    fn verify_release(
        &self,
        path: &Path,
        name: &str,
        version: &Version,
        bytes: &[u8],
        manifest: Option<&[u8]>,
    ) -> Result<(), FileError> {
        let Some(trust) = self.current_trust() else { return Ok(()) };
        let refused = |refusal| FileError::Refused { trust: trust.path.display().to_string(), refusal };
        let signed = match read_plugin_file(&release_path(path), release::MAX_RELEASE_BYTES, self.ceilings().allow_symlinks) {
            Ok(b) => Some(release::SignedRelease::parse(&b).map_err(refused)?),
            Err(FileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if signed.is_none() && self.policy.allow_unsigned {
            tracing::warn!(file = %path.display(), "UNSIGNED component loaded (--allow-unsigned): for development only");
            return Ok(());
        }
        trust.verify(name, version, bytes, manifest, signed.as_ref()).map(|_| ()).map_err(refused)
    }

    /// The trust file as last read, if the registry has one.
    fn current_trust(&self) -> Option<Arc<release::Trust>> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).trust.clone()
    }

    /// Checks bytes about to be written into the plugins dir as a load would (the follower
    /// writes nothing that would be refused). Without a trust file: the record, unverified.
    pub fn check_release(
        &self,
        name: &str,
        version: &Version,
        component: &[u8],
        manifest: Option<&[u8]>,
        signed: &release::SignedRelease,
    ) -> Result<(), release::Refusal> {
        let Some(trust) = self.current_trust() else { return Ok(()) };
        trust.verify(name, version, component, manifest, Some(signed)).map(|_| ()).inspect_err(|_| {
            self.refused.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// The largest component this worker loads (`max_component_size`).
    pub fn max_component_size(&self) -> u64 {
        self.ceilings().max_component_size
    }

    /// The rollout states and yanked releases in force.
    pub fn release_state(&self) -> (HashMap<String, rollout::RolloutState>, HashMap<String, String>) {
        (
            self.rollouts.read().unwrap_or_else(|p| p.into_inner()).clone(),
            self.yanked.read().unwrap_or_else(|p| p.into_inner()).clone(),
        )
    }

    /// Components refused under the trust file since start.
    pub fn refused_count(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Replaces the rollout states and yanked releases (from the broker's release store).
    pub fn set_release_state(&self, rollouts: HashMap<String, rollout::RolloutState>, yanked: HashMap<String, String>) {
        *self.rollouts.write().unwrap_or_else(|p| p.into_inner()) = rollouts;
        *self.yanked.write().unwrap_or_else(|p| p.into_inner()) = yanked;
    }

    /// Counts a finished run of `task` for the rollout's failure-rate gate.
    pub fn record_outcome(&self, task: &TaskVersion, succeeded: bool) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up before a key is made: this runs for every task.
        let e = match outcomes.get_mut(task.key.as_str()) {
            Some(e) => e,
            None => outcomes.entry(task.key()).or_default(),
        };
        if succeeded {
            e.0 += 1
        } else {
            e.1 += 1
        }
    }

    /// The outcome counts since the last call.
    pub fn take_outcomes(&self) -> Vec<(String, u64, u64)> {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        outcomes.drain().map(|(k, (ok, failed))| (k, ok, failed)).collect()
    }

    /// Whether a file naming task `name` is being loaded right now: a message for it
    /// is better held a moment than dead-lettered as unknown.
    pub fn is_loading(&self, name: &str) -> bool {
        self.state.read().unwrap_or_else(|p| p.into_inner()).loading.values().any(|(_, n)| n == name)
    }

    /// The newest version of `name`, or the newest matching `req`.
    pub fn resolve(&self, name: &str, req: Option<&VersionReq>) -> Result<Arc<TaskVersion>, RegistryError> {
        self.resolve_for(name, req, "")
    }

    /// The version task `task_id` of `name` runs on: the newest matching `req` if the
    /// message has one; else, while a rollout is on, the stable version or the candidate
    /// (by the id's bucket); else the newest. Yanked releases serve nothing.
    pub fn resolve_for(&self, name: &str, req: Option<&VersionReq>, task_id: &str) -> Result<Arc<TaskVersion>, RegistryError> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let yanked = self.yanked.read().unwrap_or_else(|p| p.into_inner());
        // Yanked versions are unloaded (the follower removes their files): the yank list
        // says why nothing matches.
        let yanked_error = || {
            let reason = yanked.iter().find_map(|(key, why)| {
                let (task, v) = key.rsplit_once('@')?;
                let v = Version::parse(v).ok()?;
                (task == name && req.is_none_or(|r| r.matches(&v))).then_some(why)
            })?;
            Some(RegistryError::Yanked {
                name: name.to_string(),
                req: req.map_or_else(|| "*".to_string(), |r| r.to_string()),
                reason: reason.clone(),
            })
        };
        let Some(versions) = state.tasks.get(name) else {
            return Err(yanked_error().unwrap_or_else(|| RegistryError::UnknownTask { name: name.to_string() }));
        };
        // Without a yank (the usual case) no key is formatted for every task resolved.
        let yank_of = |v: &Version| if yanked.is_empty() { None } else { yanked.get(&format!("{name}@{v}")) };
        let mut live = versions.iter().rev().filter(|(v, _)| yank_of(v).is_none());
        let found = match req {
            None => match self.rollouts.read().unwrap_or_else(|p| p.into_inner()).get(name) {
                // Under a rollout nothing above the stable version serves but the candidate
                // picked: not a staged release, not a rolled-back one.
                Some(r) => [r.pick(task_id), &r.stable]
                    .into_iter()
                    .find_map(|v| versions.get(v).filter(|_| yank_of(v).is_none()))
                    .or_else(|| versions.iter().rev().find(|(v, _)| *v <= &r.stable && yank_of(v).is_none()).map(|(_, tv)| tv)),
                None => live.next().map(|(_, tv)| tv),
            },
            Some(req) => live.find(|(v, _)| req.matches(v)).map(|(_, tv)| tv),
        };
        match found {
            Some(tv) => Ok(tv.clone()),
            None => Err(yanked_error().unwrap_or_else(|| RegistryError::NoMatchingVersion {
                name: name.to_string(),
                req: req.map(|r| r.to_string()).unwrap_or_default(),
                loaded: versions.keys().map(|v| v.to_string()).collect::<Vec<_>>().join(", "),
            })),
        }
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

    /// Rescans every `interval` until the returned handle is dropped or aborted. A look
    /// never waits for the loads it starts, so a file that takes long to compile does
    /// not keep the next one from being seen.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let registry = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let r = Arc::clone(&registry);
                match tokio::task::spawn_blocking(move || r.rescan(false)).await {
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
