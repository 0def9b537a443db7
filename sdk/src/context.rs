//! The task's view of its own run: identity, logging, progress, time left and revocation,
//! each a thin call into the host imports of `wit/task.wit`.

use crate::bindings::taskhost::task::host;
use crate::bindings::taskhost::task::types::TaskInfo;
use std::time::Duration;

pub use host::LogLevel;

/// Handed to a task that takes a `&Context` parameter.
pub struct Context {
    info: TaskInfo,
}

impl Context {
    pub(crate) fn new(info: TaskInfo) -> Self {
        Context { info }
    }

    pub fn id(&self) -> &str {
        &self.info.id
    }
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// Version of the component running this task.
    pub fn version(&self) -> &str {
        &self.info.version
    }
    /// How many retries already happened (0 on the first run).
    pub fn retries(&self) -> u32 {
        self.info.retries
    }
    pub fn queue(&self) -> &str {
        &self.info.queue
    }
    pub fn eta(&self) -> Option<&str> {
        self.info.eta.as_deref()
    }
    pub fn parent_id(&self) -> Option<&str> {
        self.info.parent_id.as_deref()
    }
    pub fn root_id(&self) -> Option<&str> {
        self.info.root_id.as_deref()
    }

    pub fn log(&self, level: LogLevel, message: &str) {
        host::log(level, message)
    }
    pub fn info(&self, message: &str) {
        host::log(LogLevel::Info, message)
    }
    pub fn warn(&self, message: &str) {
        host::log(LogLevel::Warn, message)
    }

    /// Publishes a custom state with metadata, like Celery's `update_state(state, meta)`.
    pub fn set_progress(&self, state: &str, meta: &impl serde::Serialize) {
        let meta = serde_json::to_string(meta).unwrap_or_else(|_| "null".into());
        host::set_progress(state, &meta)
    }

    /// Time left before the soft limit (the hard one when no soft limit is set).
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(host::remaining_ms())
    }

    /// True once the task has been revoked: stop soon.
    pub fn is_revoked(&self) -> bool {
        host::is_revoked()
    }
}
