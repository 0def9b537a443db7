//! `tasks.fail(message)`: always fails with `message`.
use taskhost_sdk::{task, TaskError};

#[task]
fn fail(message: String) -> Result<(), TaskError> {
    Err(TaskError::fail(message))
}
