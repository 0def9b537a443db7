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
        TaskError::Exception { name, module, message, .. } => guest_exception(name, module, message),
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

/// Exceptions of `builtins` a guest may name as such: a client constructs them with the
/// message and nothing else happens. Not `SystemExit`, `KeyboardInterrupt` or the like,
/// whose raising in a client would do more than report a failure.
const BUILTIN_EXCEPTIONS: &[&str] = &[
    "ArithmeticError", "AssertionError", "AttributeError", "BlockingIOError", "BrokenPipeError", "BufferError",
    "ChildProcessError", "ConnectionAbortedError", "ConnectionError", "ConnectionRefusedError", "ConnectionResetError",
    "EOFError", "Exception", "FileExistsError", "FileNotFoundError", "FloatingPointError", "ImportError",
    "IndexError", "InterruptedError", "IsADirectoryError", "KeyError", "LookupError", "MemoryError",
    "ModuleNotFoundError", "NameError", "NotADirectoryError", "NotImplementedError", "OSError", "OverflowError",
    "PermissionError", "ProcessLookupError", "RecursionError", "ReferenceError", "RuntimeError", "TimeoutError",
    "TypeError", "UnboundLocalError", "ValueError", "ZeroDivisionError",
];
/// Where an exception class of the guest's own is stored: a module no client imports, so
/// Celery's client makes up a class of that name (it never imports a module to resolve one).
pub const GUEST_EXCEPTION_MODULE: &str = "taskhost.guest";

/// The exception a guest raised, as a Python client may see it: a standard exception as
/// itself, any other under [`GUEST_EXCEPTION_MODULE`], a name that is not one as `TaskFailed`.
fn guest_exception(name: &str, module: &str, message: &str) -> ExceptionInfo {
    if module == "builtins" && BUILTIN_EXCEPTIONS.contains(&name) {
        return ExceptionInfo::new("builtins", name, message);
    }
    let dotted_identifier = !name.is_empty()
        && name.split('.').all(|part| {
            part.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_') && part.chars().all(|c| c.is_alphanumeric() || c == '_')
        });
    if dotted_identifier {
        ExceptionInfo::new(GUEST_EXCEPTION_MODULE, name, message)
    } else {
        ExceptionInfo::new(TASKHOST_MODULE, "TaskFailed", format!("{name}: {message}"))
    }
}

/// Most of a guest's stderr kept in a traceback: its last bytes, where a failure says why.
pub const TRACEBACK_STDERR_BYTES: usize = 4 << 10;

/// A traceback-like text for the record: where it ran, what happened, the end of what
/// the guest wrote to stderr.
pub fn traceback_for(task: &str, version: &str, error: &TaskError, stderr: &str) -> String {
    let mut text = format!("taskhost: {task}@{version} ended: {error}");
    if let TaskError::Exception { traceback, .. } = error {
        // The guest's own traceback says where; its stderr would repeat it.
        text.push('\n');
        text.push_str(traceback);
        return text;
    }
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
        let exception = |name: &str, module: &str| {
            exception_for(&TaskError::Exception { name: name.into(), module: module.into(), message: "boom".into(), traceback: "".into() })
        };
        assert_eq!(exception("ValueError", "builtins").repr(), "ValueError('boom')");
        assert_eq!(exception("ValueError", "builtins").exc_module, "builtins");
        // What a client could do more with than report: not as builtins.
        assert_eq!(exception("SystemExit", "builtins").exc_module, GUEST_EXCEPTION_MODULE);
        assert_eq!(exception("Popen", "subprocess").exc_module, GUEST_EXCEPTION_MODULE);
        assert_eq!(exception("InvoiceError", "app.errors").exc_type, "InvoiceError");
        assert_eq!(exception("not a name()", "builtins").exc_type, "TaskFailed");
        let e = exception_for(&TaskError::MemoryLimit { cap: 10, requested: 20 });
        assert_eq!(e.repr(), "MemoryError('memory limit of 10 bytes exceeded (wanted 20 bytes)')");
    }
}
