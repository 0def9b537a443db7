//! `tasks.burn(n)`: a fixed amount of CPU work, `n` thousand rounds of a loop (~1 µs per
//! thousand on this machine), however the worker's thread is shared; the CPU-bound task
//! of the tenant fair-scheduling tests and benchmark, which returns when it started and
//! finished (unix ms, the guest's 1 ms clock) so start latency is measured by the task.
use serde::Serialize;
use taskhost_sdk::task;

#[derive(Serialize)]
struct Ran {
    started_ms: u64,
    finished_ms: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[task]
fn burn(n: u64) -> Ran {
    let started_ms = unix_ms();
    let mut acc = 0u64;
    for i in 0..n.saturating_mul(1000) {
        acc = std::hint::black_box(acc.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
    std::hint::black_box(acc);
    Ran { started_ms, finished_ms: unix_ms() }
}
