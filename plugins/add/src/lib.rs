//! `tasks.add(x, y)`: the sum of two integers.
use taskhost_sdk::{task, TaskError};

#[task]
fn add(x: i64, y: i64) -> Result<i64, TaskError> {
    x.checked_add(y).ok_or_else(|| TaskError::fail("integer overflow"))
}
