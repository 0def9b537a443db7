//! `tasks.fanout(n)`: sends `n` follow-up `tasks.add(i, i)` and returns their ids; its
//! manifest grants it `tasks.add` and nothing else.
use taskhost_sdk::{task, Context, SendOptions, TaskError};

#[task]
fn fanout(ctx: &Context, n: u32, target: Option<String>) -> Result<Vec<String>, TaskError> {
    let target = target.unwrap_or_else(|| "tasks.add".into());
    (0..n)
        .map(|i| ctx.send_task(&target, &(i, i), &(), &SendOptions::default()).map_err(TaskError::fail))
        .collect()
}
