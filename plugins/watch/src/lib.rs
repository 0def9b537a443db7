//! `tasks.watch(ms)`: a cooperative long task — works in 10 ms steps for up to `ms`,
//! stopping early once `is-revoked` turns true or its soft limit is near; returns why it stopped.
use taskhost_sdk::{task, Context};

#[task]
fn watch(ctx: &Context, ms: u64) -> String {
    let mut waited = 0;
    while waited < ms {
        if ctx.is_revoked() {
            return format!("revoked after {waited} ms");
        }
        if ctx.remaining().as_millis() < 20 {
            return format!("soft limit after {waited} ms");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 10;
    }
    "finished".to_string()
}
