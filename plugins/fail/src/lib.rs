//! `tasks.fail(message, kind=None)`: always fails with `message`; with `kind`, as that
//! standard Python exception (`"KeyError"`), which a Celery client re-raises as such.
use taskhost_sdk::{task, TaskError};

#[task]
fn fail(message: String, kind: Option<String>) -> Result<(), TaskError> {
    Err(match kind {
        Some(kind) => TaskError::exception(kind, message),
        None => TaskError::fail(message),
    })
}
