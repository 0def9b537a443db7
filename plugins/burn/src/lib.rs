//! `tasks.burn(n)`: a fixed amount of CPU work, `n` thousand rounds of a loop (~1 µs per
//! thousand on this machine), however the worker's thread is shared; the CPU-bound task
//! of the tenant fair-scheduling tests.
use taskhost_sdk::task;

#[task]
fn burn(n: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..n.saturating_mul(1000) {
        acc = std::hint::black_box(acc.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
    acc
}
