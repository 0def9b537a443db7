//! `TaskError`: how a task ends without a result — fail, retry later, or reject
//! to the dead-letter queue. Any `std::error::Error` converts into a failure via `?`.

use std::fmt;

/// How a task can end without a result.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskError {
    /// FAILURE with this message; `AsyncResult.get()` raises it.
    Fail(String),
    /// RETRY: run again later with `retries + 1`; `countdown` in seconds, or the
    /// manifest's retry policy when `None`.
    Retry { reason: String, countdown: Option<f64> },
    /// Dead-letter the message with this reason; never retried.
    Reject(String),
    /// FAILURE as a Python exception of this class: a Celery client's `get()` raises
    /// `ValueError(message)` for `name = "ValueError"`, `module = "builtins"` (the worker
    /// keeps `builtins` for the standard exceptions only; any other class reaches the
    /// client as one of that name).
    Exception { name: String, module: String, message: String },
}

impl TaskError {
    pub fn fail(message: impl Into<String>) -> Self {
        TaskError::Fail(message.into())
    }

    /// Retry after the manifest's default delay (and backoff).
    pub fn retry(reason: impl Into<String>) -> Self {
        TaskError::Retry { reason: reason.into(), countdown: None }
    }

    /// Retry after `seconds`.
    pub fn retry_in(reason: impl Into<String>, seconds: f64) -> Self {
        TaskError::Retry { reason: reason.into(), countdown: Some(seconds) }
    }

    pub fn reject(reason: impl Into<String>) -> Self {
        TaskError::Reject(reason.into())
    }

    /// FAILURE as the standard Python exception `name` (`"ValueError"`, `"KeyError"`, …).
    pub fn exception(name: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError::Exception { name: name.into(), module: "builtins".into(), message: message.into() }
    }

    pub(crate) fn into_wit(self) -> crate::bindings::taskhost::task::types::TaskError {
        use crate::bindings::taskhost::task::types::{ExceptionInfo, RetryRequest, TaskError as Wit};
        match self {
            TaskError::Fail(m) => Wit::Fail(m),
            TaskError::Retry { reason, countdown } => Wit::Retry(RetryRequest { reason, countdown }),
            TaskError::Reject(r) => Wit::Reject(r),
            TaskError::Exception { name, module, message } => {
                let traceback = format!("{name}: {message}");
                Wit::Exception(ExceptionInfo { name, module, message, traceback })
            }
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Fail(m) => write!(f, "{m}"),
            TaskError::Retry { reason, countdown: Some(s) } => write!(f, "retry in {s}s: {reason}"),
            TaskError::Retry { reason, countdown: None } => write!(f, "retry: {reason}"),
            TaskError::Reject(r) => write!(f, "rejected: {r}"),
            TaskError::Exception { name, message, .. } => write!(f, "{name}: {message}"),
        }
    }
}

// Deliberately not `std::error::Error`, so that this blanket conversion stays coherent.
impl<E: std::error::Error> From<E> for TaskError {
    fn from(e: E) -> Self {
        TaskError::Fail(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::taskhost::task::types::TaskError as Wit;

    #[test]
    fn an_exception_reaches_the_host_by_class_and_module() {
        match TaskError::exception("KeyError", "'sku'").into_wit() {
            Wit::Exception(e) => assert_eq!((e.name.as_str(), e.module.as_str(), e.message.as_str()), ("KeyError", "builtins", "'sku'")),
            other => panic!("{other:?}"),
        }
        assert_eq!(TaskError::exception("KeyError", "'sku'").to_string(), "KeyError: 'sku'");
    }
}
