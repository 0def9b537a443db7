//! How each way a task can end maps to Celery's result states and exceptions, so that
//! Python's `AsyncResult.get()` raises something meaningful.

use crate::protocol::ExceptionInfo;
use crate::runtime::TaskError;

/// Exception module for taskhost's own failure types; Python synthesizes the classes
/// (`celery.exceptions.WasmTrap`), whose `str()` is the message.
pub const TASKHOST_MODULE: &str = "taskhost";

/// The exception stored for a task that ended with `error` (all but Retry/Revoked,
/// which have states of their own).
pub fn exception_for(error: &TaskError) -> ExceptionInfo {
    match error {
        TaskError::Fail { message } => ExceptionInfo::new(TASKHOST_MODULE, "TaskFailed", message.as_str()),
        TaskError::Reject { reason } => ExceptionInfo::new(TASKHOST_MODULE, "Rejected", reason.as_str()),
        TaskError::TimeLimit { limit } => {
            ExceptionInfo::new("billiard.exceptions", "TimeLimitExceeded", limit.as_secs_f64())
        }
        TaskError::MemoryLimit { .. } => ExceptionInfo::new("builtins", "MemoryError", error.to_string()),
        TaskError::Trap { .. } => ExceptionInfo::new(TASKHOST_MODULE, "WasmTrap", error.to_string()),
        TaskError::ResultTooLarge { .. } | TaskError::InvalidResult { .. } => {
            ExceptionInfo::new(TASKHOST_MODULE, "ResultError", error.to_string())
        }
        TaskError::Revoked => ExceptionInfo::new("celery.exceptions", "TaskRevokedError", "terminated"),
        TaskError::Retry { reason, .. } => ExceptionInfo::new(TASKHOST_MODULE, "RetryRequested", reason.as_str()),
    }
}

/// Most of a guest's stderr kept in a traceback: its last bytes, where a failure says why.
pub const TRACEBACK_STDERR_BYTES: usize = 4 << 10;

/// A traceback-like text for the record: where it ran, what happened, the end of what
/// the guest wrote to stderr.
pub fn traceback_for(task: &str, version: &str, error: &TaskError, stderr: &str) -> String {
    let mut text = format!("taskhost: {task}@{version} ended: {error}");
    if !stderr.is_empty() && !matches!(error, TaskError::Trap { .. }) {
        let mut cut = stderr.len().saturating_sub(TRACEBACK_STDERR_BYTES);
        while !stderr.is_char_boundary(cut) {
            cut += 1;
        }
        text.push_str("\nguest stderr:\n");
        if cut > 0 {
            text.push_str(&format!("[{cut} earlier bytes cut] …"));
        }
        text.push_str(&stderr[cut..]);
    }
    text
}

/// Celery's message for exhausted retries.
pub fn max_retries_exceeded(task: &str, id: &str, args: &str, kwargs: &str) -> ExceptionInfo {
    ExceptionInfo::new(
        "celery.exceptions",
        "MaxRetriesExceededError",
        format!("Can't retry {task}[{id}] args:{args} kwargs:{kwargs}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn errors_map_to_python_exceptions() {
        let e = exception_for(&TaskError::Fail { message: "boom".into() });
        assert_eq!((e.exc_module.as_str(), e.exc_type.as_str(), e.message()), ("taskhost", "TaskFailed", "boom".into()));
        let e = exception_for(&TaskError::TimeLimit { limit: Duration::from_secs(2) });
        assert_eq!(e.repr(), "TimeLimitExceeded(2.0)");
        assert_eq!(e.exc_module, "billiard.exceptions");
        let e = exception_for(&TaskError::MemoryLimit { cap: 10, requested: 20 });
        assert_eq!(e.repr(), "MemoryError('memory limit of 10 bytes exceeded (wanted 20 bytes)')");
    }
}
