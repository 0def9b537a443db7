//! The task's view of its own run: identity, logging, progress, time left, revocation and
//! follow-up tasks, each a thin call into the host imports of `wit/task.wit`.

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

    /// A configuration value or secret by name (`wasi:config`): `Ok(None)` where the worker
    /// has none by that name, an error where the manifest does not grant it
    /// (`[grants] config = ["NAME"]`).
    pub fn config(&self, name: &str) -> Result<Option<String>, String> {
        use crate::bindings::wasi::config::store::{self, Error};
        store::get(name).map_err(|e| match e {
            Error::Upstream(m) | Error::Io(m) => m,
        })
    }

    /// Sends a follow-up task, like Celery's `send_task` from inside a task: its parent is
    /// this task. `args` must serialize to a JSON array, `kwargs` to an object (`()` is
    /// read as "none"). Allowed only to names the manifest grants (`[grants] send_tasks`);
    /// returns the new task's id, or why the host refused.
    pub fn send_task(
        &self,
        name: &str,
        args: &impl serde::Serialize,
        kwargs: &impl serde::Serialize,
        options: &SendOptions,
    ) -> Result<String, String> {
        let args = json_or(args, "[]").map_err(|e| format!("send_task({name}): args: {e}"))?;
        let kwargs = json_or(kwargs, "{}").map_err(|e| format!("send_task({name}): kwargs: {e}"))?;
        host::send_task(name, &args, &kwargs, &options.to_wit())
    }
}

/// How [`Context::send_task`] publishes; every field optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendOptions {
    /// Queue; none: the target's manifest queue where the worker knows it, else `celery`.
    pub queue: Option<String>,
    /// Seconds before it may run.
    pub countdown: Option<f64>,
    /// 0 (first) to 9.
    pub priority: Option<u8>,
    /// Semver requirement on the target's component version, e.g. `"^1.2"`.
    pub version: Option<String>,
}

impl SendOptions {
    fn to_wit(&self) -> crate::bindings::taskhost::task::types::SendOptions {
        crate::bindings::taskhost::task::types::SendOptions {
            queue: self.queue.clone(),
            countdown: self.countdown,
            priority: self.priority,
            version: self.version.clone(),
        }
    }
}

/// `value` as JSON text, or `empty` where it serializes to null (`()`, `None`).
fn json_or(value: &impl serde::Serialize, empty: &str) -> Result<String, serde_json::Error> {
    Ok(match serde_json::to_value(value)? {
        serde_json::Value::Null => empty.to_string(),
        other => other.to_string(),
    })
}
