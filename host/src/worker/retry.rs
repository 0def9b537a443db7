//! Retry policy: when a retried task runs next (countdown, or the manifest's delay with
//! exponential backoff, cap and full jitter, as Celery's `retry_backoff` does).

use crate::registry::{Backoff, Manifest};
use std::time::Duration;

/// Celery's `default_retry_delay`.
pub const DEFAULT_RETRY_DELAY: f64 = 180.0;
/// Celery's `retry_backoff_max`.
pub const DEFAULT_BACKOFF_MAX: f64 = 600.0;
/// Celery's `max_retries`.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// Longest retry delay honoured (a year): larger countdowns are clamped, not trusted.
pub const MAX_RETRY_DELAY: f64 = 365.0 * 86_400.0;

/// Seconds until the next attempt. `retries` is how many retries already happened;
/// `unit` is a uniform random number in [0, 1) for jitter.
pub fn retry_delay(manifest: &Manifest, countdown: Option<f64>, retries: u32, unit: f64) -> Duration {
    if let Some(c) = countdown.filter(|c| c.is_finite() && *c >= 0.0) {
        return Duration::from_secs_f64(c.min(MAX_RETRY_DELAY));
    }
    let factor = match manifest.retry_backoff {
        None | Some(Backoff::Enabled(false)) => None,
        Some(Backoff::Enabled(true)) => Some(1.0),
        Some(Backoff::Factor(f)) => Some(f.max(0.0)),
    };
    let secs = match factor {
        None => manifest.default_retry_delay.unwrap_or(DEFAULT_RETRY_DELAY),
        Some(f) => {
            let max = manifest.retry_backoff_max.unwrap_or(DEFAULT_BACKOFF_MAX);
            let exp = (f * 2f64.powi(retries.min(62) as i32)).min(max);
            if manifest.retry_jitter.unwrap_or(true) {
                (exp * unit).floor()
            } else {
                exp
            }
        }
    };
    Duration::from_secs_f64(secs.clamp(0.0, MAX_RETRY_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(text: &str) -> Manifest {
        Manifest::parse(text).unwrap()
    }

    #[test]
    fn countdown_wins() {
        assert_eq!(retry_delay(&m(""), Some(2.5), 7, 0.5), Duration::from_millis(2500));
        assert_eq!(retry_delay(&m(""), Some(1e30), 0, 0.5), Duration::from_secs_f64(MAX_RETRY_DELAY), "clamped");
    }

    #[test]
    fn default_delay_is_celerys_or_the_manifests() {
        assert_eq!(retry_delay(&m(""), None, 0, 0.5), Duration::from_secs(180));
        assert_eq!(retry_delay(&m("default_retry_delay = 3"), None, 4, 0.5), Duration::from_secs(3));
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let no_jitter = m("retry_backoff = 2\nretry_backoff_max = 20\nretry_jitter = false");
        let delays: Vec<u64> = (0..6).map(|r| retry_delay(&no_jitter, None, r, 0.0).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 20, 20]);
        let jitter = m("retry_backoff = true");
        assert_eq!(retry_delay(&jitter, None, 3, 0.5), Duration::from_secs(4));
        assert_eq!(retry_delay(&jitter, None, 3, 0.0), Duration::ZERO);
    }
}
