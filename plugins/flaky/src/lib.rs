//! `tasks.flaky(n)`: asks for a retry until `retries >= n`, then returns `retries`.
use taskhost_sdk::{task, Context, TaskError};

#[task]
fn flaky(ctx: &Context, n: u32) -> Result<u32, TaskError> {
    if ctx.retries() >= n {
        Ok(ctx.retries())
    } else {
        Err(TaskError::retry_in(format!("attempt {} of {}", ctx.retries() + 1, n + 1), 0.1))
    }
}
