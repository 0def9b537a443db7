//! `tasks.alloc(bytes)`: allocates and touches `bytes` bytes; beyond the memory cap it traps.
use taskhost_sdk::task;

#[task]
fn alloc(bytes: usize) -> usize {
    let mut v = vec![0u8; bytes];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v).len()
}
