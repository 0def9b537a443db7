//! The clocks a guest sees: the host's wall and monotonic clocks rounded down to a
//! resolution (1 ms by default), so one tenant's task cannot time another's finely.

use std::time::{Duration, Instant, SystemTime};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

fn floor_nanos(nanos: u128, step: u128) -> u128 {
    if step <= 1 {
        nanos
    } else {
        nanos - nanos % step
    }
}

/// Unix time, rounded down to `resolution`.
pub(super) struct CoarseWallClock {
    resolution: Duration,
}

impl CoarseWallClock {
    pub(super) fn new(resolution: Duration) -> Self {
        CoarseWallClock { resolution: resolution.max(Duration::from_nanos(1)) }
    }
}

impl HostWallClock for CoarseWallClock {
    fn resolution(&self) -> Duration {
        self.resolution
    }

    fn now(&self) -> Duration {
        let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let nanos = floor_nanos(since.as_nanos(), self.resolution.as_nanos());
        Duration::new((nanos / 1_000_000_000) as u64, (nanos % 1_000_000_000) as u32)
    }
}

/// Nanoseconds since the instance started, rounded down to `resolution`.
pub(super) struct CoarseMonotonicClock {
    initial: Instant,
    resolution: u64,
}

impl CoarseMonotonicClock {
    pub(super) fn new(resolution: Duration) -> Self {
        let resolution = u64::try_from(resolution.as_nanos()).unwrap_or(u64::MAX).max(1);
        CoarseMonotonicClock { initial: Instant::now(), resolution }
    }
}

impl HostMonotonicClock for CoarseMonotonicClock {
    fn resolution(&self) -> u64 {
        self.resolution
    }

    fn now(&self) -> u64 {
        let nanos = self.initial.elapsed().as_nanos();
        u64::try_from(floor_nanos(nanos, self.resolution as u128)).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_multiples_of_the_resolution() {
        let mono = CoarseMonotonicClock::new(Duration::from_millis(1));
        let wall = CoarseWallClock::new(Duration::from_millis(1));
        for _ in 0..1000 {
            assert_eq!(mono.now() % 1_000_000, 0);
            assert_eq!(wall.now().subsec_nanos() % 1_000_000, 0);
        }
        assert_eq!(mono.resolution(), 1_000_000);
        assert_eq!(wall.resolution(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(3));
        assert!(mono.now() >= 2_000_000, "the clock still moves");
    }
}
