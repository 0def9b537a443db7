//! Per-task resource accounting: the memory cap (summed over a component's linear
//! memories), table growth, a record of any growth refused, and the memory a run held
//! over time (its high-water mark and byte-seconds) for metering.

use std::time::Instant;
use wasmtime::ResourceLimiter;

/// Table elements one task may grow a table to: generous for function tables (a large
/// Python component has ~10,000), far below abuse. The pool's table slots are sized to it.
pub(super) const MAX_TABLE_ELEMENTS: usize = 20_000;

pub(super) struct MemoryLimiter {
    cap: u64,
    in_use: u64,
    /// Total bytes that were asked for when growth was refused.
    pub(super) refused: Option<u64>,
    /// Byte-seconds held up to `since` (memories only grow within a run).
    byte_seconds: f64,
    since: Option<Instant>,
}

impl MemoryLimiter {
    pub(super) fn new(cap: u64) -> Self {
        MemoryLimiter { cap, in_use: 0, refused: None, byte_seconds: 0.0, since: None }
    }

    /// The most memory the run held at once (it never shrinks within a run).
    pub(super) fn high_water(&self) -> u64 {
        self.in_use
    }

    /// Memory × time the run held, in byte-seconds, up to `end`.
    pub(super) fn byte_seconds(&self, end: Instant) -> f64 {
        let tail = self.since.map_or(0.0, |since| end.saturating_duration_since(since).as_secs_f64() * self.in_use as f64);
        self.byte_seconds + tail
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let after = self.in_use + (desired.saturating_sub(current)) as u64;
        if after > self.cap {
            self.refused = Some(after);
            return Ok(false);
        }
        let now = Instant::now();
        if let Some(since) = self.since {
            self.byte_seconds += now.saturating_duration_since(since).as_secs_f64() * self.in_use as f64;
        }
        self.since = Some(now);
        self.in_use = after;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
