//! `tasks.noop()`: does nothing; the unit of the runtime benchmark.
use taskhost_sdk::task;

#[task]
fn noop() {}
