//! `tasks.deadline()`: reports what the guest sees of its limits — `remaining-ms` (time
//! to the soft limit, else the hard one) and the limits in its task info.
use taskhost_sdk::{task, Context};

#[task]
fn deadline(ctx: &Context) -> serde_json::Value {
    serde_json::json!({"remaining_ms": ctx.remaining().as_millis() as u64, "revoked": ctx.is_revoked()})
}
