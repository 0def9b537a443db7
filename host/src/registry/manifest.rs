//! A component's manifest, `<task>@<version>.toml`: per-task defaults (queue, limits,
//! retry policy, rate limit, acks) parsed once, validated once, unknown keys rejected.

use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// Per-task defaults; every field is optional and falls back to Celery's default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Queue `taskhost send` uses when none is given.
    pub queue: Option<String>,
    /// Hard time limit, seconds.
    pub time_limit: Option<f64>,
    /// Soft time limit, seconds: what the guest's `remaining-ms` counts down to.
    pub soft_time_limit: Option<f64>,
    /// Memory cap: bytes, or a string such as "64MiB".
    pub memory_limit: Option<ByteSize>,
    /// Retries before FAILURE (Celery default 3); `-1`-style "forever" is not offered.
    pub max_retries: Option<u32>,
    /// Seconds before a retry that names no countdown (Celery default 180).
    pub default_retry_delay: Option<f64>,
    /// Exponential backoff: `true` (factor 1 s) or a factor in seconds.
    pub retry_backoff: Option<Backoff>,
    /// Cap on the backoff delay, seconds (Celery default 600).
    pub retry_backoff_max: Option<f64>,
    /// Randomise backoff delays (Celery default true).
    pub retry_jitter: Option<bool>,
    /// Sandbox endings that retry instead of failing: "trap", "time_limit", "memory_limit".
    #[serde(default)]
    pub autoretry: Vec<AutoRetry>,
    /// "10/s", "100/m", "1000/h".
    pub rate_limit: Option<RateLimit>,
    /// Whether `rate_limit` counts per worker process (Celery's way) or across the cluster.
    pub rate_limit_scope: Option<RateLimitScope>,
    /// Acknowledge after the result is stored (default true) or before running.
    pub acks_late: Option<bool>,
    /// Store no result at all.
    pub ignore_result: Option<bool>,
    /// Exact clocks (nanoseconds) instead of the operator's coarse ones; honoured only
    /// where the operator sets `allow_precise_clocks`.
    pub precise_clocks: Option<bool>,
    /// Follow-up tasks one run may send with `send-task` (default 100).
    pub max_sent_tasks: Option<u32>,
    /// HTTP requests one run may make (default 50).
    pub max_http_requests: Option<u32>,
    /// Response body bytes one run may read over all its requests (default 10MiB).
    pub max_http_response_bytes: Option<ByteSize>,
    /// What the task may reach beyond its arguments; absent means nothing.
    #[serde(default)]
    pub grants: GrantsTable,
}

/// A manifest's `[grants]` table. Only what is named is allowed; unknown keys are errors,
/// so a grant this worker does not implement yet is refused rather than ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsTable {
    /// Task names (`*` matches any run of characters) `send-task` may publish.
    #[serde(default)]
    pub send_tasks: Vec<String>,
    /// Host directories the task sees, each at a guest path.
    #[serde(default)]
    pub dirs: Vec<DirSpec>,
    /// Names of the worker's secrets the task may read through `wasi:config`.
    #[serde(default)]
    pub config: Vec<String>,
    /// Origins (`https://api.example.com`, `http://127.0.0.1:8080`) `wasi:http` requests
    /// may go to.
    #[serde(default)]
    pub http: Vec<crate::runtime::Origin>,
    /// host:port pairs (`smtp.example.com:587`) `wasi:sockets` may connect to.
    #[serde(default)]
    pub tcp: Vec<crate::runtime::TcpTarget>,
}

/// `{ host = "/srv/reports", guest = "/reports", mode = "ro" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSpec {
    pub host: std::path::PathBuf,
    pub guest: String,
    #[serde(default)]
    pub mode: DirMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirMode {
    #[default]
    Ro,
    Rw,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("{0}")]
    Parse(String),
    #[error("{field} must be a positive number of seconds, got {value}")]
    NotPositive { field: &'static str, value: f64 },
    #[error("soft_time_limit ({soft}s) must be below time_limit ({hard}s)")]
    SoftAboveHard { soft: f64, hard: f64 },
    #[error("{field} = {value} is above this worker's ceiling of {ceiling} (taskhost.toml [limits] {setting})")]
    AboveCeiling { field: &'static str, value: String, ceiling: String, setting: &'static str },
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| ManifestError::Parse(e.message().to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        for (field, value) in [
            ("time_limit", self.time_limit),
            ("soft_time_limit", self.soft_time_limit),
            ("retry_backoff_max", self.retry_backoff_max),
        ] {
            if let Some(v) = value {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(ManifestError::NotPositive { field, value: v });
                }
            }
        }
        if let Some(v) = self.default_retry_delay {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(ManifestError::NotPositive { field: "default_retry_delay", value: v });
            }
        }
        if let Some(bad) = self.grants.send_tasks.iter().find(|p| p.is_empty() || p.chars().any(char::is_whitespace)) {
            return Err(ManifestError::Parse(format!("[grants] send_tasks: {bad:?} is not a task name or pattern")));
        }
        if let Some(bad) = self.grants.config.iter().find(|n| n.is_empty() || n.chars().any(|c| c.is_whitespace() || c.is_control())) {
            return Err(ManifestError::Parse(format!("[grants] config: {bad:?} is not a name")));
        }
        for dir in &self.grants.dirs {
            if !dir.host.is_absolute() || !dir.guest.starts_with('/') {
                return Err(ManifestError::Parse(format!(
                    "[grants] dirs: host {:?} and guest {:?} must both be absolute paths",
                    dir.host.display().to_string(),
                    dir.guest
                )));
            }
        }
        if let (Some(soft), Some(hard)) = (self.soft_time_limit, self.time_limit) {
            if soft >= hard {
                return Err(ManifestError::SoftAboveHard { soft, hard });
            }
        }
        Ok(())
    }

    /// Checks every limit against the operator's ceilings: a manifest may lower a
    /// limit, never raise one past its ceiling.
    pub fn check_ceilings(&self, c: &crate::ceilings::Ceilings) -> Result<(), ManifestError> {
        let max_time = c.max_time_limit.as_secs_f64();
        for (field, value) in [("time_limit", self.time_limit), ("soft_time_limit", self.soft_time_limit)] {
            if let Some(v) = value.filter(|v| *v > max_time) {
                return Err(ManifestError::AboveCeiling {
                    field,
                    value: format!("{v}s"),
                    ceiling: format!("{max_time}s"),
                    setting: "max_time_limit",
                });
            }
        }
        if let Some(m) = self.memory_limit {
            for (ceiling, setting) in [(c.max_task_memory, "max_task_memory"), (c.max_process_memory, "max_process_memory")] {
                if m.0 > ceiling {
                    return Err(ManifestError::AboveCeiling {
                        field: "memory_limit",
                        value: m.to_string(),
                        ceiling: ByteSize(ceiling).to_string(),
                        setting,
                    });
                }
            }
        }
        if let Some(n) = self.max_sent_tasks.filter(|n| *n > c.max_sent_tasks) {
            return Err(ManifestError::AboveCeiling {
                field: "max_sent_tasks",
                value: n.to_string(),
                ceiling: c.max_sent_tasks.to_string(),
                setting: "max_sent_tasks",
            });
        }
        if let Some(n) = self.max_http_requests.filter(|n| *n > c.max_http_requests) {
            return Err(ManifestError::AboveCeiling {
                field: "max_http_requests",
                value: n.to_string(),
                ceiling: c.max_http_requests.to_string(),
                setting: "max_http_requests",
            });
        }
        if let Some(b) = self.max_http_response_bytes.filter(|b| b.0 > c.max_http_response_bytes) {
            return Err(ManifestError::AboveCeiling {
                field: "max_http_response_bytes",
                value: b.to_string(),
                ceiling: ByteSize(c.max_http_response_bytes).to_string(),
                setting: "max_http_response_bytes",
            });
        }
        if let Some(r) = self.max_retries.filter(|r| *r > c.max_retries) {
            return Err(ManifestError::AboveCeiling {
                field: "max_retries",
                value: r.to_string(),
                ceiling: c.max_retries.to_string(),
                setting: "max_retries",
            });
        }
        Ok(())
    }

    /// The hard limit, if set (validated finite and positive; `None` past `Duration`'s range).
    pub fn hard_limit(&self) -> Option<Duration> {
        self.time_limit.and_then(|s| Duration::try_from_secs_f64(s).ok())
    }

    pub fn soft_limit(&self) -> Option<Duration> {
        self.soft_time_limit.and_then(|s| Duration::try_from_secs_f64(s).ok())
    }
}

/// A byte count written as an integer or as "512KiB", "64MiB", "1GiB", "10MB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("invalid size {s:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => return Err(format!("unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB, KB, MB, GB)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 30 && n % (1 << 30) == 0 {
            write!(f, "{}GiB", n >> 30)
        } else if n >= 1 << 20 && n % (1 << 20) == 0 {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n % (1 << 10) == 0 {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}B")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Backoff {
    Enabled(bool),
    Factor(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoRetry {
    Trap,
    TimeLimit,
    MemoryLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitScope {
    Worker,
    Cluster,
}

/// At most `count` task starts per `per`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl std::str::FromStr for RateLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate limit {s:?} (expected e.g. \"10/s\", \"100/m\", \"1000/h\")");
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(bad());
        }
        Ok(RateLimit { count, per })
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_manifest_parses() {
        let m = Manifest::parse(
            r#"
            queue = "media_heavy"
            time_limit = 30
            soft_time_limit = 25.5
            memory_limit = "256MiB"
            max_retries = 5
            default_retry_delay = 2
            retry_backoff = true
            retry_backoff_max = 60
            retry_jitter = false
            autoretry = ["trap", "time_limit"]
            rate_limit = "10/s"
            rate_limit_scope = "cluster"
            acks_late = false
            ignore_result = true
            "#,
        )
        .unwrap();
        assert_eq!(m.queue.as_deref(), Some("media_heavy"));
        assert_eq!(m.hard_limit(), Some(Duration::from_secs(30)));
        assert_eq!(m.memory_limit, Some(ByteSize(256 << 20)));
        assert_eq!(m.rate_limit, Some(RateLimit { count: 10, per: Duration::from_secs(1) }));
        assert_eq!(m.autoretry, vec![AutoRetry::Trap, AutoRetry::TimeLimit]);
        assert_eq!(m.retry_backoff, Some(Backoff::Enabled(true)));
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let err = |text: &str| Manifest::parse(text).unwrap_err().to_string();
        assert_eq!(
            err("queue = \"q\"\ntimeout = 3"),
            "unknown field `timeout`, expected one of `queue`, `time_limit`, `soft_time_limit`, `memory_limit`, `max_retries`, `default_retry_delay`, `retry_backoff`, `retry_backoff_max`, `retry_jitter`, `autoretry`, `rate_limit`, `rate_limit_scope`, `acks_late`, `ignore_result`, `precise_clocks`, `max_sent_tasks`, `max_http_requests`, `max_http_response_bytes`, `grants`"
        );
        assert_eq!(
            err("[grants]\nhttps = [\"https://api.example.com\"]"),
            "unknown field `https`, expected one of `send_tasks`, `dirs`, `config`, `http`, `tcp`"
        );
        assert_eq!(
            err("[grants]\nhttp = [\"https://api.example.com/v1\"]"),
            "\"https://api.example.com/v1\" is not an origin such as \"https://api.example.com\" (an origin has no path, query, user or wildcard)"
        );
        assert_eq!(
            err("[grants]\ntcp = [\"smtp.example.com\"]"),
            "\"smtp.example.com\" is not a host:port such as \"smtp.example.com:587\" (the port is missing)"
        );
        assert_eq!(
            err("[grants]\ndirs = [{ host = \"srv\", guest = \"/r\" }]"),
            "[grants] dirs: host \"srv\" and guest \"/r\" must both be absolute paths"
        );
        assert_eq!(
            err("[grants]\ndirs = [{ host = \"/srv\", guest = \"/r\", mode = \"rwx\" }]"),
            "unknown variant `rwx`, expected `ro` or `rw`"
        );
        assert_eq!(err("[grants]\nsend_tasks = [\"\"]"), "[grants] send_tasks: \"\" is not a task name or pattern");
        assert_eq!(err("time_limit = 0"), "time_limit must be a positive number of seconds, got 0");
        assert_eq!(err("time_limit = 1\nsoft_time_limit = 2"), "soft_time_limit (2s) must be below time_limit (1s)");
        assert_eq!(
            err("rate_limit = \"10/day\""),
            "invalid rate limit \"10/day\" (expected e.g. \"10/s\", \"100/m\", \"1000/h\")"
        );
        assert_eq!(
            err("memory_limit = \"12 parsecs\""),
            "unknown size unit \"parsecs\" in \"12 parsecs\" (use B, KiB, MiB, GiB, KB, MB, GB)"
        );
        assert_eq!(
            err("autoretry = [\"always\"]"),
            "unknown variant `always`, expected one of `trap`, `time_limit`, `memory_limit`"
        );
    }

    #[test]
    fn limits_above_the_operator_ceilings_are_refused_by_name() {
        use crate::ceilings::Ceilings;
        let c = Ceilings {
            max_time_limit: Duration::from_secs(600),
            max_task_memory: 1 << 30,
            max_process_memory: 2 << 30,
            max_retries: 10,
            ..Default::default()
        };
        let err = |text: &str| Manifest::parse(text).unwrap().check_ceilings(&c).unwrap_err().to_string();
        assert_eq!(
            err("time_limit = 1e30"),
            "time_limit = 1000000000000000000000000000000s is above this worker's ceiling of 600s (taskhost.toml [limits] max_time_limit)"
        );
        assert_eq!(
            err("time_limit = 700\nsoft_time_limit = 650"),
            "time_limit = 700s is above this worker's ceiling of 600s (taskhost.toml [limits] max_time_limit)"
        );
        assert_eq!(
            err("memory_limit = \"4GiB\""),
            "memory_limit = 4GiB is above this worker's ceiling of 1GiB (taskhost.toml [limits] max_task_memory)"
        );
        assert_eq!(
            err("max_retries = 4000000000"),
            "max_retries = 4000000000 is above this worker's ceiling of 10 (taskhost.toml [limits] max_retries)"
        );
        assert_eq!(
            err("max_sent_tasks = 4294967295"),
            "max_sent_tasks = 4294967295 is above this worker's ceiling of 1000 (taskhost.toml [limits] max_sent_tasks)"
        );
        assert_eq!(
            err("max_http_requests = 5000"),
            "max_http_requests = 5000 is above this worker's ceiling of 1000 (taskhost.toml [limits] max_http_requests)"
        );
        assert_eq!(
            err("max_http_response_bytes = \"1GiB\""),
            "max_http_response_bytes = 1GiB is above this worker's ceiling of 256MiB (taskhost.toml [limits] max_http_response_bytes)"
        );
        assert!(Manifest::parse("time_limit = 600\nmemory_limit = \"1GiB\"\nmax_retries = 10").unwrap().check_ceilings(&c).is_ok());
        // Past Duration's range: no limit from the manifest rather than a panic.
        assert_eq!(Manifest::parse("time_limit = 1e30").unwrap().hard_limit(), None);
    }

    #[test]
    fn byte_sizes_round_trip() {
        for (text, n) in [("64MiB", 64 << 20), ("1GiB", 1 << 30), ("4096", 4096), ("10MB", 10_000_000)] {
            assert_eq!(text.parse::<ByteSize>().unwrap(), ByteSize(n));
        }
        assert_eq!(ByteSize(32 << 20).to_string(), "32MiB");
    }
}
