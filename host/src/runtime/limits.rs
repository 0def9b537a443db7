//! Per-task resource accounting: the memory cap (summed over a component's linear
//! memories), table growth, and a record of any growth the sandbox refused.

use wasmtime::ResourceLimiter;

/// Table elements one task may grow to: generous for function tables, far below abuse.
const MAX_TABLE_ELEMENTS: usize = 100_000;

pub(super) struct MemoryLimiter {
    cap: u64,
    in_use: u64,
    /// Total bytes that were asked for when growth was refused.
    pub(super) refused: Option<u64>,
}

impl MemoryLimiter {
    pub(super) fn new(cap: u64) -> Self {
        MemoryLimiter { cap, in_use: 0, refused: None }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let after = self.in_use + (desired.saturating_sub(current)) as u64;
        if after > self.cap {
            self.refused = Some(after);
            return Ok(false);
        }
        self.in_use = after;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
