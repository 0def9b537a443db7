//! `tasks.echo(value)`: returns its argument unchanged.
use taskhost_sdk::task;

#[task]
fn echo(value: serde_json::Value) -> serde_json::Value {
    value
}
