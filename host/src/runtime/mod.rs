//! The sandbox: one wasmtime `Engine` with pooled instances and an epoch ticker, and
//! `Runtime::run`, which runs one task in a fresh `Store` and maps every trap to a `TaskError`.
//!
//! Only this module names wasmtime types; the rest of the host sees `LoadedComponent`,
//! `TaskInput`, `TaskLimits`, `RunControl` and `TaskRun`.

mod bindings;
mod cache;
mod clocks;
mod compile;
mod footprint;
mod grants;
mod limits;
mod net;
mod outbound;
mod output;
mod sandbox;

pub use compile::CHILD_ARGS as COMPILER_CHILD_ARGS;
pub use footprint::Footprint;
pub use grants::{glob as name_matches, within as grants_within, DirGrant, Grants, SentTask, DEFAULT_MAX_SENT_TASKS};
pub use net::{Origin, TcpTarget};
pub use outbound::{DEFAULT_MAX_HTTP_REQUESTS, DEFAULT_MAX_HTTP_RESPONSE_BYTES};
pub use output::Captured;
pub use sandbox::{
    Progress, MAX_LOG_BYTES, MAX_LOG_LINE_BYTES, MAX_PROGRESS_BYTES, MAX_PROGRESS_STATE_BYTES, MAX_PROGRESS_UPDATES,
};

use crate::ceilings::{deadline_after, Ceilings};
use bindings::{AnyTaskPre, TaskInfo};
use sandbox::{Deadlines, TaskState};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline};

/// 1 ms: a hard limit fires at most one tick late, a run's first slice on the worker's
/// own thread lasts at most this long (plus [`FIRST_SLICE_GRACE`], see [`Runtime::run`]),
/// and a CPU-bound guest yields to its siblings this often. At 10 ms, a no-op's round-trip
/// p99 beside four hostile guests was 23–25 ms, against 7–10 ms at 1 ms.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// A run that meets its first epoch tick this soon after it started goes on to the next
/// tick instead of yielding: a yield sends the run to the guest thread (see
/// [`Runtime::run`]), a hop that cost a no-op which happened to start just before a tick
/// more than the no-op itself. A CPU-bound guest holds the worker's thread at most one
/// tick plus this before it moves.
const FIRST_SLICE_GRACE: Duration = Duration::from_micros(250);
/// The hard limit of a task for which neither the message nor the manifest sets one:
/// no task may hold a sandbox forever.
pub const DEFAULT_HARD_LIMIT: Duration = Duration::from_secs(300);
/// Memory cap of a task whose manifest sets none.
pub const DEFAULT_MEMORY_LIMIT: u64 = 128 << 20;
/// Largest JSON result kept: results live in the broker's memory and in every client's.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 1 << 20;
/// Guest stdout and stderr kept per task, each.
pub const DEFAULT_OUTPUT_CAP: usize = 64 << 10;
/// Longest failure message, reject or retry reason kept from a guest; the rest is cut
/// with a marker. They are stored twice (message and traceback) and logged.
pub const MAX_GUEST_TEXT: usize = 8 << 10;
/// Longest exception class or module name kept from a guest.
const MAX_EXCEPTION_NAME: usize = 256;
/// Bytes a guest may hand the host in one call, its result included (wasmtime's
/// "hostcall fuel", 128 MiB by default): the largest result kept plus room for a
/// failure's text; a bigger transfer traps before the host copies it.
fn hostcall_budget(max_result_bytes: usize) -> usize {
    max_result_bytes.max(DEFAULT_OUTPUT_CAP) + (64 << 10)
}

/// Keeps at most `max` bytes of `text` (cut on a character boundary) and says how much
/// was cut: what a guest hands over is stored and logged, so it must be bounded.
pub fn cap_text(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = text.len() - cut;
    text.truncate(cut);
    text.push_str(&format!("… [truncated {dropped} bytes]"));
    text
}

/// How the engine is sized; one per process.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Sandboxes that may exist at once (the pool is sized for this many).
    pub max_instances: u32,
    /// The operator's ceilings: memory per task, compile limits, clocks, isolation.
    pub ceilings: Ceilings,
    /// Where compiled components are cached; `None` compiles in memory every time.
    pub cache_dir: Option<PathBuf>,
    /// The `taskhost` binary to compile components in, as a child process held to
    /// `ceilings.compile_memory` and `compile_timeout`; `None` compiles in this process
    /// (tests, `taskhost run`). Needs `cache_dir`: the child hands its work over there.
    pub compiler: Option<PathBuf>,
    pub max_result_bytes: usize,
    pub output_cap: usize,
    /// Values tasks may read through `wasi:config`, each only where its manifest grants
    /// the name. Never logged, never part of an error.
    pub secrets: Arc<std::collections::BTreeMap<String, String>>,
    /// Meter each run's CPU with the thread's CPU clock (a system call, ~0.4 µs, at either
    /// end of every poll), as tenants' quotas and usage need; otherwise the time the
    /// thread spent in the run's polls, by the monotonic clock (equal unless the machine is
    /// oversubscribed, and 20× cheaper).
    pub meter_cpu: bool,
    /// Compile a component's functions on all cores. Off in worker processes: there is one
    /// per core already, and compiling on the loading thread lets it hand the compiler's
    /// memory back afterwards (idle workers stayed at 75–130 MB after a cold start).
    pub parallel_compilation: bool,
    /// Instantiate nothing: every run succeeds at once with `null`. Only for `bench drain
    /// --without-sandbox`, which measures what the worker costs around its sandboxes;
    /// `serve` never sets it.
    pub without_guests: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 64,
            ceilings: Ceilings::default(),
            cache_dir: default_cache_dir(),
            compiler: None,
            secrets: Arc::default(),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            output_cap: DEFAULT_OUTPUT_CAP,
            meter_cpu: false,
            parallel_compilation: true,
            without_guests: false,
        }
    }
}

/// SHA-256 of a component's bytes, hex: how components are known in the cache, in
/// logs and in remembered load failures.
pub fn digest(bytes: &[u8]) -> String {
    cache::digest(bytes)
}

/// `$TASKHOST_CACHE_DIR`, else `$XDG_CACHE_HOME/taskhost`, else `~/.cache/taskhost`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TASKHOST_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("taskhost"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("taskhost"))
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot set up the wasm engine: {0}")]
    Engine(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("component does not fit the taskhost:task world (0.3.0, 0.2.0 or 0.1.0): {0}")]
    Incompatible(String),
    /// The compile ran past `compile_timeout`: perhaps a bomb, perhaps a busy machine.
    #[error("{0}")]
    CompileTimeout(String),
    /// The host could not compile at all (no compiler process, no cache): says nothing
    /// about the component.
    #[error("{0}")]
    Host(String),
    /// One instance needs more of the sandbox pool than any sandbox can have.
    #[error("component can never run here: {0}")]
    TooLarge(String),
}

/// Everything the guest is told about the message it runs.
#[derive(Debug, Clone, Default)]
pub struct TaskInput {
    pub id: String,
    pub name: String,
    pub retries: u32,
    pub queue: String,
    pub eta: Option<String>,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    /// JSON array.
    pub args: String,
    /// JSON object.
    pub kwargs: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskLimits {
    pub hard: Duration,
    pub soft: Option<Duration>,
    pub memory: u64,
    /// Exact clocks instead of ones rounded to the operator's resolution.
    pub precise_clocks: bool,
}

impl Default for TaskLimits {
    fn default() -> Self {
        TaskLimits { hard: DEFAULT_HARD_LIMIT, soft: None, memory: DEFAULT_MEMORY_LIMIT, precise_clocks: false }
    }
}

/// The worker's handle on a running task: revoke it, receive its progress updates and
/// the follow-ups it sends, and what it is granted.
#[derive(Default)]
pub struct RunControl {
    /// Set by a plain revoke: the guest sees it through `is-revoked` and may stop.
    flagged: AtomicBool,
    /// Set by revoke with terminate (or a shutdown past its grace): the host stops it.
    terminated: AtomicBool,
    wake: tokio::sync::Notify,
    /// Whether the task's progress updates are kept for the worker (else dropped).
    keeps_progress: bool,
    /// Updates not yet taken, oldest first. A queue here rather than a channel: a channel
    /// allocated per task (~2.5 KB) though most tasks never report progress.
    progress: std::sync::Mutex<Vec<Progress>>,
    progress_arrived: tokio::sync::Notify,
    sent: Option<tokio::sync::mpsc::UnboundedSender<SentTask>>,
    grants: Arc<Grants>,
}

impl RunControl {
    /// A control that keeps the task's progress updates, for [`RunControl::take_progress`].
    pub fn keeping_progress() -> Self {
        RunControl { keeps_progress: true, ..Default::default() }
    }

    pub(crate) fn report_progress(&self, update: Progress) {
        if self.keeps_progress {
            self.progress.lock().unwrap_or_else(|p| p.into_inner()).push(update);
            self.progress_arrived.notify_one();
        }
    }

    /// The progress updates reported since the last call, oldest first.
    pub fn take_progress(&self) -> Vec<Progress> {
        std::mem::take(&mut *self.progress.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves once an update has been reported since the last time it resolved.
    pub async fn progress_reported(&self) {
        self.progress_arrived.notified().await
    }

    /// Where the follow-ups the task sends go; without a sink `send-task` is refused.
    pub fn with_sent_tasks(mut self, sink: tokio::sync::mpsc::UnboundedSender<SentTask>) -> Self {
        self.sent = Some(sink);
        self
    }

    /// What the task may reach (nothing by default).
    pub fn with_grants(mut self, grants: Arc<Grants>) -> Self {
        self.grants = grants;
        self
    }

    /// Stops the task at its next epoch tick or host wait (within about one tick).
    pub fn revoke(&self) {
        self.flagged.store(true, Ordering::SeqCst);
        self.terminated.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    /// Tells the guest it has been revoked (`is-revoked`) without stopping it.
    pub fn flag_revoked(&self) {
        self.flagged.store(true, Ordering::SeqCst);
    }

    /// What the guest's `is-revoked` returns.
    pub fn is_revoked(&self) -> bool {
        self.flagged.load(Ordering::SeqCst)
    }

    pub fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::SeqCst)
    }

    async fn terminated(&self) {
        loop {
            let notified = self.wake.notified();
            if self.is_terminated() {
                return;
            }
            notified.await;
        }
    }
}

/// How a task ended without a result. Guest-chosen endings and sandbox endings alike:
/// the worker maps each to a Celery state; none of them is an error of the worker.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TaskError {
    #[error("{message}")]
    Fail { message: String },
    /// An exception the guest raised (a Python task's), as it names it; the worker decides
    /// which module a client may resolve it in.
    #[error("{name}: {message}")]
    Exception { name: String, module: String, message: String, traceback: String },
    #[error("retry requested: {reason}")]
    Retry { reason: String, countdown: Option<f64> },
    #[error("rejected: {reason}")]
    Reject { reason: String },
    #[error("hard time limit ({}s) exceeded", limit.as_secs_f64())]
    TimeLimit { limit: Duration },
    #[error("memory limit of {cap} bytes exceeded (wanted {requested} bytes)")]
    MemoryLimit { cap: u64, requested: u64 },
    #[error("revoked while running")]
    Revoked,
    #[error("result of {size} bytes exceeds the {limit}-byte limit")]
    ResultTooLarge { size: usize, limit: usize },
    #[error("result is not valid JSON: {reason}")]
    InvalidResult { reason: String },
    #[error("{message}{}", stderr_suffix(guest_stderr))]
    Trap { message: String, guest_stderr: String },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; guest stderr: {stderr}")
    }
}

/// Components this process loaded from the compile cache, and those it had to compile.
static COMPILE_CACHE_HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static COMPILE_CACHE_MISSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// (hits, misses) of the compile cache in this process so far.
pub fn compile_cache_counts() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (COMPILE_CACHE_HITS.load(Relaxed), COMPILE_CACHE_MISSES.load(Relaxed))
}

/// One run's outcome and what the guest printed.
#[derive(Debug)]
pub struct TaskRun {
    /// JSON text on success.
    pub result: Result<String, TaskError>,
    pub elapsed: Duration,
    /// Time to create the instance, if it got that far.
    pub instantiate: Option<Duration>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub logs_dropped: u64,
    /// Requests the guest made that its grants did not allow (each logged with its name).
    pub denials: u32,
    /// Time the worker's thread spent in this run (instantiation, guest code and the host
    /// calls it made), measured around every poll: CPU time where `meter_cpu` is set.
    pub cpu: Duration,
    /// The most linear memory the run held at once, bytes.
    pub memory_high_water: u64,
    /// Memory held × time, byte-seconds.
    pub memory_byte_seconds: f64,
}

impl TaskRun {
    /// The outcome of a run with no guest (`RuntimeConfig::without_guests`).
    fn without_guest() -> TaskRun {
        TaskRun::without_instance(Ok("null".into()), Duration::ZERO)
    }

    /// A run the host could not carry out (no thread for it, say).
    fn host_failure(message: String, started: Instant) -> TaskRun {
        TaskRun::without_instance(Err(TaskError::Trap { message, guest_stderr: String::new() }), started.elapsed())
    }

    /// A run that never had an instance: nothing printed, metered or held.
    fn without_instance(result: Result<String, TaskError>, elapsed: Duration) -> TaskRun {
        TaskRun {
            result,
            elapsed,
            instantiate: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            logs_dropped: 0,
            denials: 0,
            cpu: Duration::ZERO,
            memory_high_water: 0,
            memory_byte_seconds: 0.0,
        }
    }
}

/// CPU time this thread has used so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec passed and nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A future whose polls are timed: the time a run used its thread, however many other
/// runs share the thread between its polls. By the thread's CPU clock where `cpu_clock`
/// (see `RuntimeConfig::meter_cpu`), else by the monotonic clock.
struct Metered<'a, F> {
    inner: std::pin::Pin<&'a mut F>,
    spent: &'a mut Duration,
    cpu_clock: bool,
}

impl<F: std::future::Future> std::future::Future for Metered<'_, F> {
    type Output = F::Output;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        if self.cpu_clock {
            let started = thread_cpu();
            let polled = self.inner.as_mut().poll(cx);
            *self.spent += thread_cpu().saturating_sub(started);
            polled
        } else {
            let started = Instant::now();
            let polled = self.inner.as_mut().poll(cx);
            *self.spent += started.elapsed();
            polled
        }
    }
}

/// The thread every worker process's longer runs continue on (see [`Runtime::run`]): one
/// per process, started on first use and kept for the process's life (a runtime may not
/// be dropped from async code, and runs may still be on it when the worker stops).
fn guest_thread() -> &'static tokio::runtime::Handle {
    static GUESTS: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    GUESTS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("taskhost-guests")
            .enable_all()
            .build()
            .expect("starting the guest thread");
        let handle = rt.handle().clone();
        std::mem::forget(rt);
        handle
    })
}

/// Stops a spawned task when dropped.
struct StopOnDrop(tokio::task::AbortHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A compiled, linked component ready to instantiate.
#[derive(Clone)]
pub struct LoadedComponent {
    pre: AnyTaskPre<TaskState>,
    pub digest: String,
    /// Whether the compiled form came from the on-disk cache.
    pub from_cache: bool,
    /// What one instance takes from the sandbox pool.
    pub footprint: Footprint,
    /// The taskhost world version it was built against (`0.3.0`).
    pub world: String,
}

/// The version of the taskhost host interface a component imports, or, if it imports
/// none, the newest world whose export shape it has.
fn world_of(component: &Component, engine: &Engine, pre: &AnyTaskPre<TaskState>) -> String {
    let imported = component.component_type().imports(engine).find_map(|(name, _)| {
        name.strip_prefix("taskhost:task/host@").map(str::to_string)
    });
    imported.unwrap_or_else(|| match pre {
        AnyTaskPre::Current(_) => "0.3.0".to_string(),
        AnyTaskPre::V0_2(_) => "0.2.0".to_string(),
    })
}

/// Why the epoch callback stopped a guest.
#[derive(Debug, thiserror::Error)]
enum Interrupt {
    #[error("hard time limit reached")]
    TimeLimit,
    #[error("revoked")]
    Revoked,
}

/// Advances the engine's epoch every [`EPOCH_TICK`] while any guest runs, and sleeps
/// (parked, no wake-ups) once none has for a few ticks: at 1 ms the ticks alone cost an
/// idle worker ~2% of a core.
struct EpochTicker {
    shared: Arc<TickerShared>,
}

struct TickerShared {
    stop: AtomicBool,
    /// Runs holding a [`Ticking`] guard.
    running: std::sync::atomic::AtomicUsize,
    /// Set by the ticker just before it parks; whoever starts a run then wakes it.
    parked: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

/// Idle ticks after which the ticker parks.
const TICKS_BEFORE_PARKING: u32 = 10;

impl EpochTicker {
    fn start(engine: &Engine) -> Self {
        let shared = Arc::new(TickerShared {
            stop: AtomicBool::new(false),
            running: Default::default(),
            parked: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let (engine, ticker) = (engine.clone(), shared.clone());
        let handle = std::thread::Builder::new()
            .name("taskhost-epoch".into())
            .spawn(move || {
                let mut idle = 0;
                while !ticker.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    if ticker.running.load(Ordering::SeqCst) > 0 {
                        idle = 0;
                        continue;
                    }
                    idle += 1;
                    if idle >= TICKS_BEFORE_PARKING {
                        ticker.parked.store(true, Ordering::SeqCst);
                        // Checked after saying so: a run starting in between either sees
                        // `parked` and wakes this thread, or is seen here.
                        if ticker.running.load(Ordering::SeqCst) == 0 && !ticker.stop.load(Ordering::Relaxed) {
                            std::thread::park();
                        }
                        ticker.parked.store(false, Ordering::SeqCst);
                        idle = 0;
                    }
                }
            })
            .expect("spawning the epoch thread");
        let _ = shared.thread.set(handle.thread().clone());
        EpochTicker { shared }
    }

    /// Keeps the ticker going for as long as the guard lives.
    fn ticking(&self) -> Ticking {
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst) {
            if let Some(t) = self.shared.thread.get() {
                t.unpark();
            }
        }
        Ticking(self.shared.clone())
    }
}

/// A run in progress, for the epoch ticker.
struct Ticking(Arc<TickerShared>);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.shared.thread.get() {
            t.unpark();
        }
    }
}

/// Bytes of each pooled memory and table kept mapped between tasks: at most this much
/// per sandbox slot stays resident (64 KiB measured as fast as 4 MiB for small tasks).
const KEEP_RESIDENT: usize = 256 << 10;

/// [`KEEP_RESIDENT`] where the kernel can say which pages a task dirtied (PAGEMAP_SCAN,
/// Linux 6.7+), else 0: without it wasmtime would memset the lowest bytes of every memory
/// after every task, touched or not, while a Rust guest's stack sits near 1 MiB.
fn keep_resident() -> usize {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if has_pagemap_scan(&release) {
        KEEP_RESIDENT
    } else {
        0
    }
}

/// Whether a Linux release string (`6.18.44-fc`, `5.15.0-91-generic`) is 6.7 or newer.
fn has_pagemap_scan(release: &str) -> bool {
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (6, 7)
}

/// The wasm engine of one process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<TaskState>,
    cache: cache::CompileCache,
    config: RuntimeConfig,
    /// The pool's room, which runs take before they instantiate.
    permits: footprint::PoolPermits,
    ticker: EpochTicker,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let n = config.max_instances.max(1);
        let keep_resident = keep_resident();
        let mut pool = PoolingAllocationConfig::new();
        // Per component: a Rust wasip2 component has one main module plus a few shims; a
        // Python one (componentize-py) 14 core instances. Runs wait for room in these
        // (`footprint::PoolPermits`) rather than fail when a burst of large ones fills them.
        pool.total_component_instances(n)
            .total_core_instances(n * footprint::CORE_INSTANCES_PER_COMPONENT)
            .total_memories(n * footprint::MEMORIES_PER_SANDBOX)
            .total_tables(n * footprint::TABLES_PER_SANDBOX)
            .total_stacks(n)
            .max_core_instances_per_component(footprint::CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(footprint::MEMORIES_PER_COMPONENT)
            .max_tables_per_component(footprint::TABLES_PER_COMPONENT)
            .table_elements(limits::MAX_TABLE_ELEMENTS)
            .max_memory_size(config.ceilings.max_task_memory as usize)
            // Decommits are not batched (wasmtime's default of 1): since slots are reset in
            // place below, batching no longer speeds up small tasks (measured equal), and a
            // batch of 64 held up to 64 large tasks' memory resident (~100 MB per worker
            // after a burst of thumbnails) and put a 3 ms flush into instantiation p99.
            // Reset a freed slot's dirty pages in place (found with the PAGEMAP_SCAN ioctl
            // on Linux ≥ 6.7) instead of unmapping them: the next task in that slot takes
            // no page faults. Measured on tasks.noop: 48k → 103k instantiate+call/s per
            // process. Pages beyond the first KEEP_RESIDENT bytes are still decommitted.
            .linear_memory_keep_resident(keep_resident)
            .table_keep_resident(keep_resident)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut cfg = Config::new();
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .parallel_compilation(config.parallel_compilation)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        bindings::taskhost::task::host::add_to_linker::<TaskState, HasSelf<TaskState>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        bindings::v0_2::taskhost::task::host::add_to_linker::<TaskState, HasSelf<TaskState>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        bindings::v0_1::taskhost::task::host::add_to_linker::<TaskState, HasSelf<TaskState>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        bindings::wasi::config::store::add_to_linker::<TaskState, HasSelf<TaskState>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        // Name lookups again, through the gate: only granted TCP host names resolve.
        linker.allow_shadowing(true);
        sandbox::add_gated_lookup_to_linker(&mut linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        linker.allow_shadowing(false);
        let cache = cache::CompileCache::new(&engine, config.cache_dir.clone());
        let ticker = EpochTicker::start(&engine);
        let permits = footprint::PoolPermits::new(n);
        Ok(Runtime { engine, linker, cache, config, permits, ticker })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Compiles (or maps from the cache) and links a component. CPU-heavy on a cache miss:
    /// call it off the async thread.
    pub fn load(&self, bytes: &[u8]) -> Result<LoadedComponent, LoadError> {
        let digest = cache::digest(bytes);
        let (component, from_cache): (Component, bool) = match &self.config.compiler {
            Some(exe) if self.config.cache_dir.is_some() => {
                compile::in_child(exe, &self.config.ceilings, &self.cache, &self.engine, bytes, &digest)?
            }
            _ => self.cache.load(&self.engine, bytes, &digest).map_err(|e| LoadError::Compile(format!("{e:#}")))?,
        };
        if from_cache {
            COMPILE_CACHE_HITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            COMPILE_CACHE_MISSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::alloc::release_free_memory();
        }
        let footprint = Footprint::of(bytes, &component).map_err(LoadError::Compile)?;
        if let Some(why) = footprint.never_fits() {
            return Err(LoadError::TooLarge(why));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Incompatible(format!("{e:#}")))?;
        let pre = AnyTaskPre::new(pre).map_err(|e| LoadError::Incompatible(format!("{e:#}")))?;
        let world = world_of(&component, &self.engine, &pre);
        Ok(LoadedComponent { pre, digest, from_cache, footprint, world })
    }

    /// Compiles `bytes` into the compile cache and nothing more: what the compiler child
    /// process does (see `config.compiler`).
    pub fn compile_into_cache(&self, bytes: &[u8]) -> Result<(), LoadError> {
        let digest = cache::digest(bytes);
        self.cache.load(&self.engine, bytes, &digest).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        Ok(())
    }

    /// Runs one task in a fresh instance. Never panics on account of the guest.
    /// Takes the input by value: its strings move into what the guest is handed.
    ///
    /// A task whose memory cap is above `ceilings.isolate_memory_above` runs on a thread
    /// of its own: wasm's bulk-memory instructions (`memory.fill`, `memory.copy`) cannot
    /// be interrupted, and one over a few GiB would hold the worker's thread, and every
    /// task on it, for seconds. Below that cap one instruction blocks the worker for at
    /// most the time to fill that much memory (README, Security).
    pub async fn run(
        self: &Arc<Self>,
        component: &LoadedComponent,
        version: &str,
        input: TaskInput,
        limits: &TaskLimits,
        control: Arc<RunControl>,
    ) -> TaskRun {
        if self.config.without_guests {
            return TaskRun::without_guest();
        }
        if self.memory_cap(limits) > self.config.ceilings.isolate_memory_above {
            return self.run_on_own_thread(component, version, input, limits, control).await;
        }
        let started = Instant::now();
        let (runtime, component, version, limits) = (self.clone(), component.clone(), version.to_string(), *limits);
        let mut run: Pin<Box<dyn Future<Output = TaskRun> + Send>> =
            Box::pin(async move { runtime.run_here(&component, &version, input, &limits, control).await });
        // The first slice runs here: most tasks end within it, and pay nothing more. Outside
        // tokio's cooperative budget: the worker polls its handlings from one tokio task,
        // whose budget (128 operations) the pool's semaphores used up every ~30 runs, so
        // one no-op in 25 came back pending and paid the hop to the guest thread
        // (`Runtime::run` 31k/s against the bare loop's 68k/s per process). The slice is
        // bounded by the epoch tick, so it cannot starve the worker's other futures.
        if let Poll::Ready(done) = futures::poll!(tokio::task::unconstrained(run.as_mut())) {
            return done;
        }
        // One still running (computing past an epoch tick, or waiting on I/O or for room
        // in the pool) goes on on the guest thread. Run here, a guest computing for long
        // takes this thread a slice at a time, and each broker reply a neighbour waits
        // for (fetch, result, ack) waited behind every such slice: a no-op's round trip
        // went from ~2 ms to ~45 ms beside four guests flooding host calls.
        // Dropped (revoked by the worker, cut short at shutdown), the run stops there too,
        // as it did when it ran here: the guest is dropped with its store and pool room.
        // In the task's span, as its logs are on this thread (id, task, queue, tenant).
        let running = guest_thread().spawn(tracing::Instrument::instrument(run, tracing::Span::current()));
        let _stop_with_this = StopOnDrop(running.abort_handle());
        match running.await {
            Ok(done) => done,
            Err(e) => TaskRun::host_failure(format!("the task's run on the guest thread failed: {e}"), started),
        }
    }

    fn memory_cap(&self, limits: &TaskLimits) -> u64 {
        limits.memory.min(self.config.ceilings.max_task_memory)
    }

    async fn run_on_own_thread(
        self: &Arc<Self>,
        component: &LoadedComponent,
        version: &str,
        input: TaskInput,
        limits: &TaskLimits,
        control: Arc<RunControl>,
    ) -> TaskRun {
        let started = Instant::now();
        let (done, outcome) = tokio::sync::oneshot::channel();
        let (runtime, component, version, limits) = (self.clone(), component.clone(), version.to_string(), *limits);
        let spawned = std::thread::Builder::new().name("taskhost-large".into()).spawn(move || {
            let run = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(runtime.run_here(&component, &version, input, &limits, control)),
                Err(e) => TaskRun::host_failure(format!("cannot start the task's own runtime: {e}"), started),
            };
            let _ = done.send(run);
        });
        if let Err(e) = spawned {
            return TaskRun::host_failure(format!("cannot start a thread for a large-memory task: {e}"), started);
        }
        outcome
            .await
            .unwrap_or_else(|_| TaskRun::host_failure("the task's thread ended without an outcome".into(), started))
    }

    async fn run_here(
        &self,
        component: &LoadedComponent,
        version: &str,
        input: TaskInput,
        limits: &TaskLimits,
        control: Arc<RunControl>,
    ) -> TaskRun {
        // Room in the pool first (held until the store, declared after, is gone); the
        // task's time starts once it has it.
        let _room = self.permits.take(&component.footprint).await;
        let _ticking = self.ticker.ticking();
        let started = Instant::now();
        let hard = deadline_after(started, limits.hard);
        let soft = limits.soft.map_or(hard, |s| deadline_after(started, s).min(hard));
        let stdout = output::CappedPipe::new(self.config.output_cap);
        let stderr = output::CappedPipe::new(self.config.output_cap);
        let precise = limits.precise_clocks && self.config.ceilings.allow_precise_clocks;
        let state = TaskState::new(
            &input.id,
            &input.name,
            self.memory_cap(limits),
            &stdout,
            &stderr,
            control.clone(),
            Deadlines { soft, hard },
            (!precise).then_some(self.config.ceilings.clock_resolution),
            self.config.secrets.clone(),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(hostcall_budget(self.config.max_result_bytes));
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |ctx| {
            let state = ctx.data();
            if state.control.is_terminated() {
                return Err(wasmtime::Error::new(Interrupt::Revoked));
            }
            let now = Instant::now();
            if now >= state.deadlines.hard {
                return Err(wasmtime::Error::new(Interrupt::TimeLimit));
            }
            if now.saturating_duration_since(started) < FIRST_SLICE_GRACE {
                return Ok(UpdateDeadline::Continue(1));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        let TaskInput { id, name, retries, queue, eta, parent_id, root_id, args, kwargs } = input;
        let info = TaskInfo {
            id,
            name,
            version: version.to_string(),
            retries,
            queue,
            eta,
            hard_limit_ms: u64::try_from(limits.hard.as_millis()).unwrap_or(u64::MAX),
            soft_limit_ms: limits.soft.map(|s| u64::try_from(s.as_millis()).unwrap_or(u64::MAX)),
            parent_id,
            root_id,
        };

        // A guest blocked in a host wait (a sleep, say) reaches no epoch check, so the
        // deadline and revocation are also raced here; dropping the call cancels it.
        let mut instantiate = None;
        let mut cpu = Duration::ZERO;
        let raced: Result<wasmtime::Result<Result<String, bindings::TaskError>>, Interrupt> = {
            let call = component.pre.run(&mut store, &info, &args, &kwargs, || instantiate = Some(started.elapsed()));
            let call = std::pin::pin!(call);
            let call = Metered { inner: call, spent: &mut cpu, cpu_clock: self.config.meter_cpu };
            // Biased, the call first: a task that ends in its first poll (most do) never
            // arms the deadline timer or the revoke waiter.
            tokio::select! {
                biased;
                res = call => Ok(res),
                _ = tokio::time::sleep_until(hard.into()) => Err(Interrupt::TimeLimit),
                _ = control.terminated() => Err(Interrupt::Revoked),
            }
        };

        let stderr_text = stderr.take();
        let result = match raced {
            Err(interrupt) => Err(interrupted(interrupt, limits)),
            Ok(Err(error)) => Err(classify(error, store.data(), limits, &stderr_text, hostcall_budget(self.config.max_result_bytes))),
            Ok(Ok(Err(guest))) => Err(match guest {
                bindings::TaskError::Fail(message) => TaskError::Fail { message: cap_text(message, MAX_GUEST_TEXT) },
                bindings::TaskError::Retry(r) => {
                    TaskError::Retry { reason: cap_text(r.reason, MAX_GUEST_TEXT), countdown: r.countdown }
                }
                bindings::TaskError::Reject(reason) => TaskError::Reject { reason: cap_text(reason, MAX_GUEST_TEXT) },
                bindings::TaskError::Exception(e) => TaskError::Exception {
                    name: cap_text(e.name, MAX_EXCEPTION_NAME),
                    module: cap_text(e.module, MAX_EXCEPTION_NAME),
                    message: cap_text(e.message, MAX_GUEST_TEXT),
                    traceback: cap_text(e.traceback, MAX_GUEST_TEXT),
                },
            }),
            Ok(Ok(Ok(json))) => self.check_result(json),
        };
        TaskRun {
            result,
            elapsed: started.elapsed(),
            instantiate,
            stdout: stdout.take(),
            stderr: stderr_text,
            logs_dropped: store.data().logs_dropped,
            denials: store.data().gate.denials(),
            cpu,
            memory_high_water: store.data().limiter.high_water(),
            memory_byte_seconds: store.data().limiter.byte_seconds(Instant::now()),
        }
    }

    /// The bare sandbox loop, for benchmarks: instantiate and call with no limits,
    /// no capture and no deadline bookkeeping. Returns the instantiate time.
    pub async fn run_bare(&self, component: &LoadedComponent, input: &TaskInput) -> Result<Duration, String> {
        let _room = self.permits.take(&component.footprint).await;
        let _ticking = self.ticker.ticking();
        let started = Instant::now();
        let far = started + DEFAULT_HARD_LIMIT;
        let pipe = output::CappedPipe::new(0);
        let state = TaskState::new(
            &input.id,
            &input.name,
            self.config.ceilings.max_task_memory,
            &pipe,
            &pipe,
            Arc::new(RunControl::default()),
            Deadlines { soft: far, hard: far },
            None,
            Arc::default(),
        );
        let mut store = Store::new(&self.engine, state);
        store.set_epoch_deadline(u64::MAX / 2);
        let info = TaskInfo {
            id: input.id.clone(),
            name: input.name.clone(),
            version: String::new(),
            retries: 0,
            queue: input.queue.clone(),
            eta: None,
            hard_limit_ms: DEFAULT_HARD_LIMIT.as_millis() as u64,
            soft_limit_ms: None,
            parent_id: None,
            root_id: None,
        };
        let mut instantiate = None;
        let ran = component.pre.run(&mut store, &info, &input.args, &input.kwargs, || instantiate = Some(started.elapsed())).await;
        match ran {
            Ok(Ok(_)) => Ok(instantiate.unwrap_or_default()),
            Ok(Err(e)) => Err(format!("task failed: {e:?}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    fn check_result(&self, json: String) -> Result<String, TaskError> {
        if json.len() > self.config.max_result_bytes {
            return Err(TaskError::ResultTooLarge { size: json.len(), limit: self.config.max_result_bytes });
        }
        match serde_json::from_str::<serde::de::IgnoredAny>(&json) {
            Ok(_) => Ok(json),
            Err(e) => Err(TaskError::InvalidResult { reason: e.to_string() }),
        }
    }
}

fn interrupted(interrupt: Interrupt, limits: &TaskLimits) -> TaskError {
    match interrupt {
        Interrupt::TimeLimit => TaskError::TimeLimit { limit: limits.hard },
        Interrupt::Revoked => TaskError::Revoked,
    }
}

/// Last bytes of the guest's stderr: a Rust guest's panic message lands there.
const STDERR_TAIL: usize = 1024;

fn classify(error: wasmtime::Error, state: &TaskState, limits: &TaskLimits, stderr: &Captured, budget: usize) -> TaskError {
    if let Some(interrupt) = error.downcast_ref::<Interrupt>() {
        return interrupted(
            match interrupt {
                Interrupt::TimeLimit => Interrupt::TimeLimit,
                Interrupt::Revoked => Interrupt::Revoked,
            },
            limits,
        );
    }
    if let Some(requested) = state.limiter.refused {
        return TaskError::MemoryLimit { cap: limits.memory, requested };
    }
    let text = stderr.text.trim();
    let mut cut = text.len().saturating_sub(STDERR_TAIL);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let guest_stderr = text[cut..]
        .lines()
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect::<Vec<_>>()
        .join("\n");
    let message = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None if format!("{error:#}").contains("fuel allocated for hostcalls") => {
            format!("the guest handed the host more than {budget} bytes in one call (result, failure text, log line or output write)")
        }
        None => format!("{error:#}"),
    };
    TaskError::Trap { message, guest_stderr }
}

#[cfg(test)]
mod tests {
    use super::has_pagemap_scan;

    #[test]
    fn slots_stay_resident_only_on_kernels_with_pagemap_scan() {
        assert!(has_pagemap_scan("6.18.44-fc-v657\n"));
        assert!(has_pagemap_scan("6.7.0"));
        assert!(has_pagemap_scan("7.0.1-arch1"));
        assert!(!has_pagemap_scan("6.6.30-generic"));
        assert!(!has_pagemap_scan("5.15.0-91-generic"));
        assert!(!has_pagemap_scan(""));
    }
}
