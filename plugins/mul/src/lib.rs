//! `tasks.mul(x, y)`: the product of two integers.
use taskhost_sdk::{task, TaskError};

#[task]
fn mul(x: i64, y: i64) -> Result<i64, TaskError> {
    x.checked_mul(y).ok_or_else(|| TaskError::fail("integer overflow"))
}
