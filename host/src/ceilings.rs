//! The operator's ceilings: the most any manifest or message may ask of a worker (time,
//! memory, retries, component size, compile cost), their defaults and the clamping rules.
//!
//! A manifest above a ceiling does not load (its error names the ceiling); a message
//! above one is clamped to it. Neither can raise a limit past what the operator set.

use std::time::Duration;

/// Most any task may run, whatever its manifest or message says (1 h).
pub const DEFAULT_MAX_TIME_LIMIT: Duration = Duration::from_secs(3600);
/// Largest memory cap a manifest may ask for: all a wasm32 memory can address.
pub const DEFAULT_MAX_TASK_MEMORY: u64 = 4 << 30;
/// Highest `max_retries` a manifest may set: every retry is another run on the fleet.
pub const DEFAULT_RETRIES_CEILING: u32 = 100;
/// Highest `max_sent_tasks` a manifest may set: follow-ups per run.
pub const DEFAULT_SENT_TASKS_CEILING: u32 = 1000;
/// Highest `max_http_requests` a manifest may set: requests per run.
pub const DEFAULT_HTTP_REQUESTS_CEILING: u32 = 1000;
/// Highest `max_http_response_bytes` a manifest may set: response bytes per run.
pub const DEFAULT_HTTP_RESPONSE_BYTES_CEILING: u64 = 256 << 20;
/// Largest component file loaded; a bigger one is refused before it is read.
pub const DEFAULT_MAX_COMPONENT_SIZE: u64 = 64 << 20;
/// Memory one compile may use (resident); a compile bomb is stopped there.
pub const DEFAULT_COMPILE_MEMORY: u64 = 2 << 30;
/// Time one compile may take.
pub const DEFAULT_COMPILE_TIMEOUT: Duration = Duration::from_secs(120);
/// Tasks whose memory cap is above this run on a thread of their own: one bulk-memory
/// instruction over their whole memory cannot be interrupted and would stall every
/// other task of the process for as long as it takes (~3.7 s per GiB measured).
pub const DEFAULT_ISOLATE_MEMORY_ABOVE: u64 = 128 << 20;
/// Resolution of the clocks a guest sees unless its manifest asks for precise clocks and
/// the operator allows them: coarse enough that timing a sibling's cache or branch
/// behaviour takes far more samples than a task gets.
pub const DEFAULT_CLOCK_RESOLUTION: Duration = Duration::from_millis(1);

/// What the operator allows at most. One per worker process, read by the runtime
/// (memory, compiles, clocks), the registry (manifests) and the worker (messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Ceilings {
    /// Hard time limit ceiling; a soft limit is capped at it too.
    pub max_time_limit: Duration,
    /// Memory cap ceiling per task.
    pub max_task_memory: u64,
    /// Memory all sandboxes of one worker process may hold at once: each task reserves
    /// its cap before it starts, and waits (holding no sandbox) while the budget is spent.
    pub max_process_memory: u64,
    pub max_retries: u32,
    pub max_sent_tasks: u32,
    pub max_http_requests: u32,
    pub max_http_response_bytes: u64,
    pub max_component_size: u64,
    pub compile_memory: u64,
    pub compile_timeout: Duration,
    pub isolate_memory_above: u64,
    pub clock_resolution: Duration,
    /// Whether a manifest's `precise_clocks = true` is honoured.
    pub allow_precise_clocks: bool,
    /// Whether symbolic links in the plugins directory are followed.
    pub allow_symlinks: bool,
    /// Host directories a manifest may grant (and whether writable); none by default:
    /// a component's author does not decide what of the worker's disk it reaches.
    pub dirs: Vec<AllowedDir>,
    /// Task names (patterns with `*`) any follow-up must also match; `None`: whatever
    /// the manifests grant.
    pub send_tasks: Option<Vec<String>>,
    /// Origins any `[grants] http` must be among; `None`: whatever the manifests grant.
    pub http: Option<Vec<crate::runtime::Origin>>,
    /// host:port pairs any `[grants] tcp` must be among; `None`: whatever the manifests grant.
    pub tcp: Option<Vec<crate::runtime::TcpTarget>>,
}

/// A directory tree the operator lets manifests grant.
#[derive(Debug, Clone, PartialEq)]
pub struct AllowedDir {
    pub path: std::path::PathBuf,
    pub writable: bool,
}

impl std::str::FromStr for AllowedDir {
    type Err = String;
    /// `/srv/reports` (read and write) or `/srv/reports:ro`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, writable) = match s.rsplit_once(':') {
            Some((p, "ro")) => (p, false),
            Some((p, "rw")) => (p, true),
            _ => (s, true),
        };
        if !path.starts_with('/') {
            return Err(format!("{path:?} is not an absolute path"));
        }
        Ok(AllowedDir { path: path.into(), writable })
    }
}

impl std::fmt::Display for AllowedDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), if self.writable { "rw" } else { "ro" })
    }
}

impl Default for Ceilings {
    fn default() -> Self {
        Ceilings {
            max_time_limit: DEFAULT_MAX_TIME_LIMIT,
            max_task_memory: DEFAULT_MAX_TASK_MEMORY,
            max_process_memory: default_process_memory(1),
            max_retries: DEFAULT_RETRIES_CEILING,
            max_sent_tasks: DEFAULT_SENT_TASKS_CEILING,
            max_http_requests: DEFAULT_HTTP_REQUESTS_CEILING,
            max_http_response_bytes: DEFAULT_HTTP_RESPONSE_BYTES_CEILING,
            max_component_size: DEFAULT_MAX_COMPONENT_SIZE,
            compile_memory: DEFAULT_COMPILE_MEMORY,
            compile_timeout: DEFAULT_COMPILE_TIMEOUT,
            isolate_memory_above: DEFAULT_ISOLATE_MEMORY_ABOVE,
            clock_resolution: DEFAULT_CLOCK_RESOLUTION,
            allow_precise_clocks: false,
            allow_symlinks: false,
            dirs: Vec::new(),
            send_tasks: None,
            http: None,
            tcp: None,
        }
    }
}

/// The memory this machine (or the container's cgroup, if less) has, shared out between
/// `processes` worker processes (at least 256 MiB each): together they cannot promise
/// their sandboxes more than there is.
pub fn default_process_memory(processes: usize) -> u64 {
    let total = physical_memory().unwrap_or(8 << 30).min(cgroup_memory_limit().unwrap_or(u64::MAX));
    (total / processes.max(1) as u64).max(256 << 20)
}

/// The cgroup's memory limit: v2 `memory.max`, else v1 `memory.limit_in_bytes`.
fn cgroup_memory_limit() -> Option<u64> {
    ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
}

/// `MemTotal` from /proc/meminfo, in bytes.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl Ceilings {
    /// A time limit a message asked for, in seconds, as a duration no longer than the
    /// ceiling. `None` for a value that is not a positive finite number (ignored, as a
    /// garbled header should not change how a task runs).
    pub fn clamp_message_time(&self, secs: f64) -> Option<Duration> {
        if !(secs > 0.0 && secs.is_finite()) {
            return None;
        }
        Some(Duration::try_from_secs_f64(secs).map_or(self.max_time_limit, |d| d.min(self.max_time_limit)))
    }
}

/// `deadline + limit` without overflow: a limit past what `Instant` can hold is as good
/// as never reached, so it saturates at a far-off instant instead.
pub fn deadline_after(start: std::time::Instant, limit: Duration) -> std::time::Instant {
    start.checked_add(limit).unwrap_or_else(|| {
        // About 30 years ahead is representable on every platform we run on.
        start + Duration::from_secs(30 * 365 * 86_400)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_time_limits_are_clamped_to_the_ceiling() {
        let c = Ceilings { max_time_limit: Duration::from_secs(2), ..Default::default() };
        assert_eq!(c.clamp_message_time(1.5), Some(Duration::from_millis(1500)));
        assert_eq!(c.clamp_message_time(1e9), Some(Duration::from_secs(2)));
        assert_eq!(c.clamp_message_time(1e19), Some(Duration::from_secs(2)));
        assert_eq!(c.clamp_message_time(1e300), Some(Duration::from_secs(2)));
        assert_eq!(c.clamp_message_time(f64::INFINITY), None);
        assert_eq!(c.clamp_message_time(f64::NAN), None);
        assert_eq!(c.clamp_message_time(-1.0), None);
        assert_eq!(c.clamp_message_time(0.0), None);
    }

    #[test]
    fn deadlines_saturate_instead_of_overflowing() {
        let now = std::time::Instant::now();
        assert!(deadline_after(now, Duration::MAX) > now + Duration::from_secs(365 * 86_400));
        assert_eq!(deadline_after(now, Duration::from_secs(1)), now + Duration::from_secs(1));
    }

    #[test]
    fn process_memory_is_shared_between_processes() {
        assert!(default_process_memory(1) >= default_process_memory(2));
        assert!(default_process_memory(10_000) >= 256 << 20);
    }
}
