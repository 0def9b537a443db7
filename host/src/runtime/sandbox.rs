//! One task's store data: a deny-by-default WASI context, captured stdio, the memory
//! limiter, deadlines, and the `taskhost:task/host` imports the guest may call.
//!
//! What the sandbox grants by default, all of it: no preopened directories (only those a
//! task's grants name, see `grants.rs`), no environment variables, no arguments, no
//! network (TCP and name lookup are switched on only for a run granted `tcp`, and then
//! filtered by `outbound.rs`; UDP never; `wasi:http` requests go through the same gate
//! and are refused unless `http` grants the origin), an empty stdin, stdout/stderr captured up to a cap, the
//! host's random source, and wall and monotonic clocks rounded to a resolution (1 ms by
//! default; exact only where a manifest asks and the operator allows).

use super::bindings::taskhost::task::host::{Host, LogLevel};
use super::bindings::taskhost::task::types::SendOptions;
use super::bindings::v0_1::taskhost::task::host as host_v0_1;
use super::bindings::v0_2::taskhost::task::host as host_v0_2;
use super::bindings::wasi::config::store as config_store;
use super::grants::SentTask;
use super::clocks::{CoarseMonotonicClock, CoarseWallClock};
use super::limits::MemoryLimiter;
use super::outbound::{socket_check, Gate};
use super::output::CappedPipe;
use super::{cap_text, RunControl};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Most host `log` bytes kept per task; further lines are counted, not emitted.
pub const MAX_LOG_BYTES: usize = 64 * 1024;
/// Most host `log` lines emitted per task: each is written out synchronously, and
/// thousands of tiny ones held the worker's thread for ~100 ms (other tasks' latency).
pub const MAX_LOG_LINES: u32 = 1_000;
/// Most `set-progress` updates per task; a guest calling it in a loop gets the first ones.
pub const MAX_PROGRESS_UPDATES: u32 = 1_000;
/// Largest `set-progress` metadata accepted.
pub const MAX_PROGRESS_BYTES: usize = 64 * 1024;
/// Longest `set-progress` state name kept (Celery's are words such as "PROGRESS").
pub const MAX_PROGRESS_STATE_BYTES: usize = 256;
/// Most host resources (streams, pollables, requests, …) a task may hold at once. Each
/// lives in host memory, outside the guest's memory cap: wasmtime's default (1,000,000)
/// would let one task hold ~100 MB of the host's. Real tasks hold tens.
pub const MAX_RESOURCES: usize = 10_000;
/// Longest single `log` line kept; the rest of a longer line is cut with a marker.
pub const MAX_LOG_LINE_BYTES: usize = 8 * 1024;

/// A custom state a task published (Celery's `update_state`).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub task_id: String,
    pub state: String,
    /// JSON text.
    pub meta: String,
}

pub(super) struct Deadlines {
    pub soft: Instant,
    pub hard: Instant,
}

pub(super) struct TaskState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: MemoryLimiter,
    pub control: Arc<RunControl>,
    pub deadlines: Deadlines,
    task_id: String,
    task_name: String,
    log_bytes: usize,
    log_lines: u32,
    pub logs_dropped: u64,
    progress_sent: u32,
    tasks_sent: u32,
    /// The run's network grants and allowances; counts every refusal of the run.
    pub gate: Gate,
    http: WasiHttpCtx,
    secrets: Arc<BTreeMap<String, String>>,
    clock_resolution: Option<Duration>,
    /// Bytes of follow-ups (args and kwargs) this run has handed over.
    sent_bytes: usize,
}

impl TaskState {
    pub fn new(
        task_id: &str,
        task_name: &str,
        memory_cap: u64,
        stdout: &CappedPipe,
        stderr: &CappedPipe,
        control: Arc<RunControl>,
        deadlines: Deadlines,
        clock_resolution: Option<Duration>,
        secrets: Arc<BTreeMap<String, String>>,
    ) -> Self {
        let mut builder = WasiCtx::builder();
        if let Some(resolution) = clock_resolution {
            builder.wall_clock(CoarseWallClock::new(resolution)).monotonic_clock(CoarseMonotonicClock::new(resolution));
        }
        for dir in &control.grants.dirs {
            let perms = if dir.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
            // The path was checked against the operator's allowance at load, resolved. A
            // link put in its place since (by another task with a writable parent grant,
            // say) would now lead elsewhere: the path must still resolve to itself.
            if std::fs::canonicalize(&dir.host).ok().as_deref() != Some(dir.host.as_path()) {
                tracing::warn!(task_id, dir = %dir.host.display(), "granted directory now resolves elsewhere; not opened for this run");
                continue;
            }
            // Opened per task through cap-std: `..` and links cannot leave it.
            if let Err(e) = builder.preopened_dir(&dir.host, &dir.guest, perms) {
                tracing::warn!(task_id, dir = %dir.host.display(), "granted directory not available to this run: {e:#}");
            }
        }
        let gate = Gate::new(control.grants.clone(), task_id, task_name, deadlines.hard);
        let tcp = !control.grants.tcp.is_empty();
        builder
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(tcp)
            .allow_udp(false)
            .allow_ip_name_lookup(tcp);
        if tcp {
            builder.socket_addr_check(socket_check(gate.shared()));
        }
        TaskState {
            wasi: builder.build(),
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_RESOURCES);
                table
            },
            limiter: MemoryLimiter::new(memory_cap),
            control,
            deadlines,
            task_id: task_id.to_string(),
            task_name: task_name.to_string(),
            log_bytes: 0,
            log_lines: 0,
            logs_dropped: 0,
            progress_sent: 0,
            tasks_sent: 0,
            gate,
            http: WasiHttpCtx::new(),
            secrets,
            clock_resolution,
            sent_bytes: 0,
        }
    }
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for TaskState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.gate }
    }
}

impl Host for TaskState {
    fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        let message = cap_text(message, MAX_LOG_LINE_BYTES);
        if self.log_bytes + message.len() > MAX_LOG_BYTES || self.log_lines >= MAX_LOG_LINES {
            self.logs_dropped += 1;
            return Ok(());
        }
        self.log_bytes += message.len();
        self.log_lines += 1;
        // The human log format escapes control characters (see observe), so a guest's
        // newline cannot start a line of its own.
        let (id, name) = (&self.task_id, &self.task_name);
        match level {
            LogLevel::Trace => tracing::trace!(target: "task", task_id = %id, task = %name, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "task", task_id = %id, task = %name, "{message}"),
            LogLevel::Info => tracing::info!(target: "task", task_id = %id, task = %name, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "task", task_id = %id, task = %name, "{message}"),
            LogLevel::Error => tracing::error!(target: "task", task_id = %id, task = %name, "{message}"),
        }
        Ok(())
    }

    fn set_progress(&mut self, state: String, meta: String) -> wasmtime::Result<()> {
        if self.progress_sent >= MAX_PROGRESS_UPDATES || meta.len() > MAX_PROGRESS_BYTES {
            return Ok(());
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&meta).is_err() {
            if self.logs_dropped == 0 {
                tracing::warn!(task_id = %self.task_id, "set-progress meta is not JSON; ignored");
            }
            self.logs_dropped += 1;
            return Ok(());
        }
        self.progress_sent += 1;
        let state = cap_text(state, MAX_PROGRESS_STATE_BYTES);
        self.control.report_progress(Progress { task_id: self.task_id.clone(), state, meta });
        Ok(())
    }

    fn remaining_ms(&mut self) -> wasmtime::Result<u64> {
        let until = self.deadlines.soft.min(self.deadlines.hard);
        let left = until.saturating_duration_since(Instant::now()).as_millis() as u64;
        // No finer than the clocks: a countdown is a clock too.
        let step = self.clock_resolution.map_or(1, |r| (r.as_millis() as u64).max(1));
        Ok(left - left % step)
    }

    fn is_revoked(&mut self) -> wasmtime::Result<bool> {
        Ok(self.control.is_revoked())
    }

    fn send_task(
        &mut self,
        name: String,
        args_json: String,
        kwargs_json: String,
        options: SendOptions,
    ) -> wasmtime::Result<Result<String, String>> {
        Ok(self.check_send(&name, &args_json, &kwargs_json, &options).and_then(|()| {
            let id = uuid::Uuid::new_v4().to_string();
            let sink = self.control.sent.as_ref().ok_or("send-task is not available here: no worker publishes follow-ups")?;
            let sent = SentTask {
                id: id.clone(),
                name,
                args: args_json,
                kwargs: kwargs_json,
                queue: options.queue,
                countdown: options.countdown,
                priority: options.priority,
                version: options.version,
            };
            sink.send(sent).map_err(|_| "send-task is no longer possible: the worker stopped listening".to_string())?;
            self.tasks_sent += 1;
            Ok(id)
        }))
    }
}

/// Longest task name a follow-up may carry.
const MAX_TASK_NAME: usize = 256;
/// Largest args or kwargs of a follow-up (each), as JSON text.
const MAX_SENT_ARGS_BYTES: usize = 64 << 10;
/// Follow-up bytes one run may hand over in all: what waits in host memory for the
/// broker stays bounded however many follow-ups the manifest allows.
const MAX_SENT_BYTES_PER_RUN: usize = 1 << 20;

impl TaskState {
    fn deny(&self, name: &str, what: &str) {
        self.gate.deny(name, what)
    }

    /// Why a `send-task` request is refused, if it is: not granted, over the run's
    /// allowance, or malformed. A refusal is the guest's error, never a trap.
    fn check_send(&mut self, name: &str, args: &str, kwargs: &str, options: &SendOptions) -> Result<(), String> {
        let grants = self.control.grants.clone();
        if !grants.may_send(name) {
            self.deny(name, "send-task denied: not granted");
            return Err(format!(
                "send-task to {name:?} denied: not granted (a manifest grants it with [grants] send_tasks = [{name:?}])"
            ));
        }
        if !grants.operator_allows_send(name) {
            self.deny(name, "send-task denied: not allowed by the operator");
            return Err(format!(
                "send-task to {name:?} denied: this worker's operator does not allow it ([grants] send_tasks in taskhost.toml, --allow-send)"
            ));
        }
        if self.tasks_sent >= grants.max_sent_tasks {
            self.deny(name, "send-task denied: allowance spent");
            return Err(format!(
                "send-task to {name:?} denied: this run already sent {} tasks, all its manifest allows (max_sent_tasks)",
                self.tasks_sent
            ));
        }
        if name.is_empty() || name.len() > MAX_TASK_NAME || name.chars().any(char::is_control) {
            return Err(format!("send-task: {name:?} is not a task name"));
        }
        let json = |text: &str, what: &str, object: bool| -> Result<(), String> {
            if text.len() > MAX_SENT_ARGS_BYTES {
                return Err(format!("send-task: {what} is {} bytes, above {MAX_SENT_ARGS_BYTES}", text.len()));
            }
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v) if (object && v.is_object()) || (!object && v.is_array()) => Ok(()),
                Ok(_) => Err(format!("send-task: {what} must be a JSON {}", if object { "object" } else { "array" })),
                Err(e) => Err(format!("send-task: {what} is not JSON: {e}")),
            }
        };
        json(args, "args-json", false)?;
        json(kwargs, "kwargs-json", true)?;
        if options.priority.is_some_and(|p| p > 9) {
            return Err("send-task: priority must be 0 to 9".into());
        }
        if options.countdown.is_some_and(|c| !(c.is_finite() && c >= 0.0)) {
            return Err("send-task: countdown must be a non-negative number of seconds".into());
        }
        if let Some(queue) = &options.queue {
            if queue.is_empty() || queue.len() > MAX_TASK_NAME || queue.chars().any(char::is_control) {
                return Err(format!("send-task: {:?} is not a queue name", cap_text(queue.clone(), 64)));
            }
        }
        if let Some(req) = &options.version {
            semver::VersionReq::parse(req).map_err(|e| format!("send-task: version {req:?} is not a semver requirement: {e}"))?;
        }
        // Counted only once the follow-up is accepted.
        let bytes = args.len() + kwargs.len() + name.len() + options.queue.as_ref().map_or(0, String::len);
        if self.sent_bytes + bytes > MAX_SENT_BYTES_PER_RUN {
            return Err(format!("send-task: this run's follow-ups would exceed {MAX_SENT_BYTES_PER_RUN} bytes of arguments"));
        }
        self.sent_bytes += bytes;
        Ok(())
    }
}

/// `wasi:config/store`: the worker's secrets, each readable only where the manifest
/// grants its name. A name not granted is an error that names the grant, and is logged
/// (the name, never a value).
impl config_store::Host for TaskState {
    fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<String>, config_store::Error>> {
        if !self.control.grants.config.iter().any(|n| *n == key) {
            self.deny(&key, "config read denied: not granted");
            return Ok(Err(config_store::Error::Upstream(format!(
                "config {key:?} denied: not granted (a manifest grants it with [grants] config = [{key:?}])"
            ))));
        }
        Ok(Ok(self.secrets.get(&key).cloned()))
    }

    fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, config_store::Error>> {
        let granted = self.control.grants.config.iter();
        Ok(Ok(granted.filter_map(|n| self.secrets.get(n).map(|v| (n.clone(), v.clone()))).collect()))
    }
}

/// The methods an older world's `host` interface shares with the current one, each
/// passed on to it (its `log-level` mapped case by case).
macro_rules! older_host_methods {
    ($host:ident) => {
        fn log(&mut self, level: $host::LogLevel, message: String) -> wasmtime::Result<()> {
            let level = match level {
                $host::LogLevel::Trace => LogLevel::Trace,
                $host::LogLevel::Debug => LogLevel::Debug,
                $host::LogLevel::Info => LogLevel::Info,
                $host::LogLevel::Warn => LogLevel::Warn,
                $host::LogLevel::Error => LogLevel::Error,
            };
            Host::log(self, level, message)
        }

        fn set_progress(&mut self, state: String, meta: String) -> wasmtime::Result<()> {
            Host::set_progress(self, state, meta)
        }

        fn remaining_ms(&mut self) -> wasmtime::Result<u64> {
            Host::remaining_ms(self)
        }

        fn is_revoked(&mut self) -> wasmtime::Result<bool> {
            Host::is_revoked(self)
        }
    };
}

/// Components built against 0.2.0 call the same host through its own interface.
impl host_v0_2::Host for TaskState {
    older_host_methods!(host_v0_2);

    fn send_task(
        &mut self,
        name: String,
        args_json: String,
        kwargs_json: String,
        options: super::bindings::v0_2::taskhost::task::types::SendOptions,
    ) -> wasmtime::Result<Result<String, String>> {
        let options =
            SendOptions { queue: options.queue, countdown: options.countdown, priority: options.priority, version: options.version };
        Host::send_task(self, name, args_json, kwargs_json, options)
    }
}

/// Components built against 0.1.0 call the same host through its older interface.
impl host_v0_1::Host for TaskState {
    older_host_methods!(host_v0_1);
}

/// `wasi:sockets/ip-name-lookup` behind the gate: a name the run's TCP grants do not
/// name is refused (`access-denied`) before any query leaves the host.
struct GatedLookup;

impl wasmtime::component::HasData for GatedLookup {
    type Data<'a> = GatedLookupView<'a>;
}

struct GatedLookupView<'a> {
    sockets: wasmtime_wasi::sockets::WasiSocketsCtxView<'a>,
    gate: Arc<super::outbound::GateShared>,
}

/// Name lookups and socket creation through the gate (each shadows wasmtime-wasi's own).
pub(super) fn add_gated_lookup_to_linker(linker: &mut wasmtime::component::Linker<TaskState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::sockets::WasiSocketsView;
    lookup::add_to_linker::<TaskState, GatedLookup>(linker, |state| {
        let gate = state.gate.shared();
        GatedLookupView { sockets: state.sockets(), gate }
    })?;
    create_socket::add_to_linker::<TaskState, GatedLookup>(linker, |state| {
        let gate = state.gate.shared();
        GatedLookupView { sockets: state.sockets(), gate }
    })
}

use wasmtime_wasi::p2::bindings::sockets::tcp_create_socket as create_socket;

/// At most `MAX_SOCKETS_PER_RUN` sockets a run: each is a descriptor of the worker
/// process, created before any address is checked.
impl create_socket::Host for GatedLookupView<'_> {
    fn create_tcp_socket(
        &mut self,
        family: wasmtime_wasi::p2::bindings::sockets::network::IpAddressFamily,
    ) -> Result<wasmtime::component::Resource<wasmtime_wasi::p2::bindings::sockets::tcp::TcpSocket>, wasmtime_wasi::p2::SocketError> {
        if !self.gate.may_create_socket() {
            return Err(SocketErrorCode::NewSocketLimit.into());
        }
        create_socket::Host::create_tcp_socket(&mut self.sockets, family)
    }
}

use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup as lookup;
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode as SocketErrorCode, IpAddress, Network};

impl lookup::Host for GatedLookupView<'_> {
    fn resolve_addresses(
        &mut self,
        network: wasmtime::component::Resource<Network>,
        name: String,
    ) -> Result<wasmtime::component::Resource<lookup::ResolveAddressStream>, wasmtime_wasi::p2::SocketError> {
        if !self.gate.may_look_up(&name) {
            return Err(SocketErrorCode::AccessDenied.into());
        }
        lookup::Host::resolve_addresses(&mut self.sockets, network, name)
    }
}

impl lookup::HostResolveAddressStream for GatedLookupView<'_> {
    fn resolve_next_address(
        &mut self,
        stream: wasmtime::component::Resource<lookup::ResolveAddressStream>,
    ) -> Result<Option<IpAddress>, wasmtime_wasi::p2::SocketError> {
        lookup::HostResolveAddressStream::resolve_next_address(&mut self.sockets, stream)
    }

    fn subscribe(
        &mut self,
        stream: wasmtime::component::Resource<lookup::ResolveAddressStream>,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        lookup::HostResolveAddressStream::subscribe(&mut self.sockets, stream)
    }

    fn drop(&mut self, stream: wasmtime::component::Resource<lookup::ResolveAddressStream>) -> wasmtime::Result<()> {
        lookup::HostResolveAddressStream::drop(&mut self.sockets, stream)
    }
}

/// Error conversion for the lookup above, as wasmtime-wasi does it.
impl wasmtime_wasi::p2::bindings::sockets::network::Host for GatedLookupView<'_> {
    fn convert_error_code(&mut self, error: wasmtime_wasi::p2::SocketError) -> wasmtime::Result<SocketErrorCode> {
        wasmtime_wasi::p2::bindings::sockets::network::Host::convert_error_code(&mut self.sockets, error)
    }

    fn network_error_code(
        &mut self,
        err: wasmtime::component::Resource<wasmtime_wasi::p2::bindings::sockets::network::Error>,
    ) -> wasmtime::Result<Option<SocketErrorCode>> {
        wasmtime_wasi::p2::bindings::sockets::network::Host::network_error_code(&mut self.sockets, err)
    }
}

impl wasmtime_wasi::p2::bindings::sockets::network::HostNetwork for GatedLookupView<'_> {
    fn drop(&mut self, network: wasmtime::component::Resource<Network>) -> wasmtime::Result<()> {
        wasmtime_wasi::p2::bindings::sockets::network::HostNetwork::drop(&mut self.sockets, network)
    }
}
