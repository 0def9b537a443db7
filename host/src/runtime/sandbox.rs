//! One task's store data: a deny-by-default WASI context, captured stdio, the memory
//! limiter, deadlines, and the `taskhost:task/host` imports the guest may call.
//!
//! What the sandbox grants, all of it: no preopened directories, no environment
//! variables, no arguments, no sockets (TCP, UDP and name lookup are switched off, not
//! merely address-filtered), an empty stdin, stdout/stderr captured up to a cap, the
//! host's random source, and wall and monotonic clocks rounded to a resolution (1 ms by
//! default; exact only where a manifest asks and the operator allows).

use super::bindings::taskhost::task::host::{Host, LogLevel};
use super::clocks::{CoarseMonotonicClock, CoarseWallClock};
use super::limits::MemoryLimiter;
use super::output::CappedPipe;
use super::{cap_text, RunControl};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Most host `log` bytes kept per task; further lines are counted, not emitted.
pub const MAX_LOG_BYTES: usize = 64 * 1024;
/// Most `set-progress` updates per task; a guest calling it in a loop gets the first ones.
pub const MAX_PROGRESS_UPDATES: u32 = 1_000;
/// Largest `set-progress` metadata accepted.
pub const MAX_PROGRESS_BYTES: usize = 64 * 1024;
/// Longest `set-progress` state name kept (Celery's are words such as "PROGRESS").
pub const MAX_PROGRESS_STATE_BYTES: usize = 256;
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
    pub logs_dropped: u64,
    progress_sent: u32,
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
    ) -> Self {
        let mut builder = WasiCtx::builder();
        if let Some(resolution) = clock_resolution {
            builder.wall_clock(CoarseWallClock::new(resolution)).monotonic_clock(CoarseMonotonicClock::new(resolution));
        }
        builder
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        TaskState {
            wasi: builder.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_cap),
            control,
            deadlines,
            task_id: task_id.to_string(),
            task_name: task_name.to_string(),
            log_bytes: 0,
            logs_dropped: 0,
            progress_sent: 0,
        }
    }
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl Host for TaskState {
    fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        let message = cap_text(message, MAX_LOG_LINE_BYTES);
        if self.log_bytes + message.len() > MAX_LOG_BYTES {
            self.logs_dropped += 1;
            return Ok(());
        }
        self.log_bytes += message.len();
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
            tracing::warn!(task_id = %self.task_id, "set-progress meta is not JSON; ignored");
            return Ok(());
        }
        self.progress_sent += 1;
        let state = cap_text(state, MAX_PROGRESS_STATE_BYTES);
        if let Some(sink) = &self.control.progress {
            let _ = sink.send(Progress { task_id: self.task_id.clone(), state, meta });
        }
        Ok(())
    }

    fn remaining_ms(&mut self) -> wasmtime::Result<u64> {
        let until = self.deadlines.soft.min(self.deadlines.hard);
        Ok(until.saturating_duration_since(Instant::now()).as_millis() as u64)
    }

    fn is_revoked(&mut self) -> wasmtime::Result<bool> {
        Ok(self.control.is_revoked())
    }
}
