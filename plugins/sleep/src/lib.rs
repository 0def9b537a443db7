//! `tasks.sleep(ms)`: sleeps (holding no host thread) and returns `ms`.
use taskhost_sdk::task;

#[task]
fn sleep(ms: u64) -> u64 {
    std::thread::sleep(std::time::Duration::from_millis(ms));
    ms
}
