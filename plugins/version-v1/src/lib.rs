//! `tasks.version()`: returns the version of the component that ran it.
use taskhost_sdk::{task, Context};

#[task]
fn version(ctx: &Context) -> String {
    debug_assert_eq!(ctx.version(), env!("CARGO_PKG_VERSION"));
    env!("CARGO_PKG_VERSION").to_string()
}
