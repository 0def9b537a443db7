//! Rate limits per task name: "10/s" means one start every 100 ms, either per worker
//! process (Celery's way) or across the cluster through a slot reserved on the broker.

use crate::broker::Broker;
use crate::registry::{RateLimit, RateLimitScope};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// Spacing between starts under `limit` (Celery's token bucket holds one token: no bursts).
pub fn interval(limit: RateLimit) -> Duration {
    limit.per / limit.count
}

#[derive(Default)]
pub struct RateLimits {
    next_start: RefCell<HashMap<String, Instant>>,
}

impl RateLimits {
    /// How long the next start of `task` must wait; reserves that start.
    pub async fn reserve(&self, broker: &dyn Broker, task: &str, limit: RateLimit, scope: RateLimitScope) -> Duration {
        let every = interval(limit);
        match scope {
            RateLimitScope::Worker => {
                let now = Instant::now();
                let mut next = self.next_start.borrow_mut();
                let slot = next.get(task).copied().unwrap_or(now).max(now);
                next.insert(task.to_string(), slot + every);
                slot - now
            }
            RateLimitScope::Cluster => match broker.reserve_rate_slot(task, every).await {
                Ok(wait) => wait,
                Err(e) => {
                    // Falling back to the local limit keeps the rate bounded during an outage.
                    tracing::warn!(task, "cluster rate slot unavailable, limiting locally: {e}");
                    Box::pin(self.reserve(broker, task, limit, RateLimitScope::Worker)).await
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_spread_starts_evenly() {
        assert_eq!(interval("10/s".parse().unwrap()), Duration::from_millis(100));
        assert_eq!(interval("100/m".parse().unwrap()), Duration::from_millis(600));
        assert_eq!(interval("1000/h".parse().unwrap()), Duration::from_millis(3600));
    }
}
