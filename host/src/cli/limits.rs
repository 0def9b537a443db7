//! The operator's ceilings on the command line and in `taskhost.toml`'s `[limits]`
//! table, resolved (flags > file > defaults) and validated once into `Ceilings`.

use super::config::FileConfig;
use super::CliError;
use crate::ceilings::{default_process_memory, AllowedDir, Ceilings};
use crate::registry::ByteSize;
use anyhow::anyhow;
use serde::Deserialize;
use std::time::Duration;

/// Largest memory a wasm32 task can address: a higher ceiling would mean nothing.
const WASM32_MEMORY: u64 = 4 << 30;

/// `[limits]` in `taskhost.toml`; every key optional, unknown keys rejected.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_time_limit: Option<f64>,
    pub max_task_memory: Option<ByteSize>,
    pub max_process_memory: Option<ByteSize>,
    pub max_retries: Option<u32>,
    pub max_sent_tasks: Option<u32>,
    pub max_http_requests: Option<u32>,
    pub max_http_response_bytes: Option<ByteSize>,
    pub max_component_size: Option<ByteSize>,
    pub compile_memory: Option<ByteSize>,
    pub compile_timeout: Option<f64>,
    pub isolate_memory_above: Option<ByteSize>,
    pub clock_resolution: Option<f64>,
    pub allow_precise_clocks: Option<bool>,
    pub allow_symlinks: Option<bool>,
}

/// Ceilings as flags; each overrides the file's `[limits]` key of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitArgs {
    /// Longest hard time limit any manifest or message may set, seconds [default: 3600].
    #[arg(long, value_name = "SECS")]
    pub max_time_limit: Option<f64>,
    /// Largest memory cap a manifest may set per task [default: 4GiB].
    #[arg(long, value_name = "SIZE")]
    pub max_task_memory: Option<ByteSize>,
    /// Memory the sandboxes of one worker process may hold at once; tasks wait for room
    /// [default: the machine's memory divided by the worker processes].
    #[arg(long, value_name = "SIZE")]
    pub max_process_memory: Option<ByteSize>,
    /// Highest max_retries a manifest may set [default: 100].
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// Highest max_sent_tasks (follow-ups per run) a manifest may set [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_sent_tasks: Option<u32>,
    /// Highest max_http_requests (HTTP requests per run) a manifest may set [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_http_requests: Option<u32>,
    /// Highest max_http_response_bytes (response bytes per run) a manifest may set [default: 256MiB].
    #[arg(long, value_name = "SIZE")]
    pub max_http_response_bytes: Option<ByteSize>,
    /// Largest component file loaded [default: 64MiB].
    #[arg(long, value_name = "SIZE")]
    pub max_component_size: Option<ByteSize>,
    /// Memory one component's compile may use, in its own process [default: 2GiB].
    #[arg(long, value_name = "SIZE")]
    pub compile_memory: Option<ByteSize>,
    /// Time one component's compile may take, seconds [default: 120].
    #[arg(long, value_name = "SECS")]
    pub compile_timeout: Option<f64>,
    /// Tasks with a larger memory cap run on a thread of their own [default: 128MiB].
    #[arg(long, value_name = "SIZE")]
    pub isolate_memory_above: Option<ByteSize>,
    /// Resolution of the clocks guests see, seconds [default: 0.001].
    #[arg(long, value_name = "SECS")]
    pub clock_resolution: Option<f64>,
    /// Honour a manifest's `precise_clocks = true`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_precise_clocks: Option<bool>,
    /// Follow symbolic links in the plugins directory.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_symlinks: Option<bool>,
    /// A host directory manifests may grant (`/srv/reports`, or `/srv/reports:ro` for
    /// read-only); repeat for more. Replaces taskhost.toml's `[grants] dirs` [default: none].
    #[arg(long = "allow-dir", value_name = "PATH[:ro]")]
    pub allow_dirs: Vec<AllowedDir>,
    /// A task name (or pattern with `*`) follow-ups may be sent to, on top of each
    /// manifest's own grant; repeat for more; an empty value allows none. Replaces
    /// taskhost.toml's `[grants] send_tasks` [default: whatever manifests grant].
    #[arg(long = "allow-send", value_name = "PATTERN")]
    pub allow_sends: Vec<String>,
    /// An origin (`https://api.example.com`) manifests may grant HTTP requests to; repeat
    /// for more; an empty value allows none. Replaces taskhost.toml's `[grants] http`
    /// [default: whatever manifests grant].
    #[arg(long = "allow-http", value_name = "ORIGIN")]
    pub allow_http: Vec<String>,
    /// A host:port manifests may grant TCP connects to; repeat for more; an empty value
    /// allows none. Replaces taskhost.toml's `[grants] tcp` [default: whatever manifests grant].
    #[arg(long = "allow-tcp", value_name = "HOST:PORT")]
    pub allow_tcp: Vec<String>,
}

/// `[grants]` in `taskhost.toml`: the most any manifest's grants may reach.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrantsFile {
    /// Directories manifests may grant: `"/srv/reports"` or `"/srv/reports:ro"`.
    #[serde(default)]
    pub dirs: Vec<String>,
    /// Task names (patterns with `*`) follow-ups may go to, whatever manifests grant.
    pub send_tasks: Option<Vec<String>>,
    /// Origins manifests may grant HTTP requests to.
    pub http: Option<Vec<String>>,
    /// host:port pairs manifests may grant TCP connects to.
    pub tcp: Option<Vec<String>>,
}

/// The operator's list for a network grant: the flags if any were given (an empty value
/// allowing none), else the file's list, else no cap; each entry parsed.
fn network_cap<T: std::str::FromStr<Err = String>>(flags: &[String], file: Option<&Vec<String>>, key: &str) -> Result<Option<Vec<T>>, CliError> {
    let listed: Option<Vec<&String>> = if flags.is_empty() {
        file.map(|l| l.iter().collect())
    } else {
        Some(flags.iter().filter(|f| !f.is_empty()).collect())
    };
    listed
        .map(|l| l.into_iter().map(|e| e.parse::<T>().map_err(|e| CliError::usage(anyhow!("[grants] {key}: {e}")))).collect())
        .transpose()
}

fn secs(v: f64, name: &str) -> Result<Duration, CliError> {
    if v > 0.0 && v.is_finite() {
        Duration::try_from_secs_f64(v).map_err(|_| CliError::usage(anyhow!("{name} = {v} is too large")))
    } else {
        Err(CliError::usage(anyhow!("{name} must be a positive number of seconds, got {v}")))
    }
}

impl LimitArgs {
    /// Flags > `[limits]` > defaults, validated. `processes` shares the machine's
    /// memory out for the default `max_process_memory`.
    pub fn resolve(&self, file: &FileConfig, processes: usize) -> Result<Ceilings, CliError> {
        let f = file.limits.clone().unwrap_or_default();
        let d = Ceilings::default();
        let c = Ceilings {
            max_time_limit: match self.max_time_limit.or(f.max_time_limit) {
                Some(v) => secs(v, "max_time_limit")?,
                None => d.max_time_limit,
            },
            max_task_memory: self.max_task_memory.or(f.max_task_memory).map_or(d.max_task_memory, |b| b.0),
            max_process_memory: self
                .max_process_memory
                .or(f.max_process_memory)
                .map_or_else(|| default_process_memory(processes), |b| b.0),
            max_retries: self.max_retries.or(f.max_retries).unwrap_or(d.max_retries),
            max_sent_tasks: self.max_sent_tasks.or(f.max_sent_tasks).unwrap_or(d.max_sent_tasks),
            max_http_requests: self.max_http_requests.or(f.max_http_requests).unwrap_or(d.max_http_requests),
            max_http_response_bytes: self
                .max_http_response_bytes
                .or(f.max_http_response_bytes)
                .map_or(d.max_http_response_bytes, |b| b.0),
            max_component_size: self.max_component_size.or(f.max_component_size).map_or(d.max_component_size, |b| b.0),
            compile_memory: self.compile_memory.or(f.compile_memory).map_or(d.compile_memory, |b| b.0),
            compile_timeout: match self.compile_timeout.or(f.compile_timeout) {
                Some(v) => secs(v, "compile_timeout")?,
                None => d.compile_timeout,
            },
            isolate_memory_above: self
                .isolate_memory_above
                .or(f.isolate_memory_above)
                .map_or(d.isolate_memory_above, |b| b.0),
            clock_resolution: match self.clock_resolution.or(f.clock_resolution) {
                Some(v) => secs(v, "clock_resolution")?,
                None => d.clock_resolution,
            },
            allow_precise_clocks: self.allow_precise_clocks.or(f.allow_precise_clocks).unwrap_or(false),
            allow_symlinks: self.allow_symlinks.or(f.allow_symlinks).unwrap_or(false),
            dirs: if self.allow_dirs.is_empty() {
                let listed = file.grants.as_ref().map(|g| g.dirs.clone()).unwrap_or_default();
                listed
                    .iter()
                    .map(|d| d.parse::<AllowedDir>().map_err(|e| CliError::usage(anyhow!("[grants] dirs: {e}"))))
                    .collect::<Result<_, _>>()?
            } else {
                self.allow_dirs.clone()
            },
            send_tasks: if self.allow_sends.is_empty() {
                file.grants.as_ref().and_then(|g| g.send_tasks.clone())
            } else {
                Some(self.allow_sends.iter().filter(|p| !p.is_empty()).cloned().collect())
            },
            http: network_cap(&self.allow_http, file.grants.as_ref().and_then(|g| g.http.as_ref()), "http")?,
            tcp: network_cap(&self.allow_tcp, file.grants.as_ref().and_then(|g| g.tcp.as_ref()), "tcp")?,
        };
        if c.max_task_memory > WASM32_MEMORY || c.max_task_memory < (1 << 20) {
            return Err(CliError::usage(anyhow!(
                "max_task_memory must be between 1MiB and 4GiB (all a wasm32 task can address), got {}",
                ByteSize(c.max_task_memory)
            )));
        }
        for (name, value) in [("max_process_memory", c.max_process_memory), ("compile_memory", c.compile_memory)] {
            if value < (1 << 20) {
                return Err(CliError::usage(anyhow!("{name} must be at least 1MiB, got {}", ByteSize(value))));
            }
        }
        Ok(c)
    }
}

/// The flags that hand resolved ceilings to a child process (a worker, the precompile).
pub fn child_flags(c: &Ceilings) -> Vec<String> {
    vec![
        format!("--max-time-limit={}", c.max_time_limit.as_secs_f64()),
        format!("--max-task-memory={}", c.max_task_memory),
        format!("--max-process-memory={}", c.max_process_memory),
        format!("--max-retries={}", c.max_retries),
        format!("--max-sent-tasks={}", c.max_sent_tasks),
        format!("--max-http-requests={}", c.max_http_requests),
        format!("--max-http-response-bytes={}", c.max_http_response_bytes),
        format!("--max-component-size={}", c.max_component_size),
        format!("--compile-memory={}", c.compile_memory),
        format!("--compile-timeout={}", c.compile_timeout.as_secs_f64()),
        format!("--isolate-memory-above={}", c.isolate_memory_above),
        format!("--clock-resolution={}", c.clock_resolution.as_secs_f64()),
        format!("--allow-precise-clocks={}", c.allow_precise_clocks),
        format!("--allow-symlinks={}", c.allow_symlinks),
    ]
    .into_iter()
    .chain(c.dirs.iter().map(|d| format!("--allow-dir={d}")))
    .chain(match &c.send_tasks {
        None => Vec::new(),
        Some(allowed) if allowed.is_empty() => vec!["--allow-send=".to_string()],
        Some(allowed) => allowed.iter().map(|p| format!("--allow-send={p}")).collect(),
    })
    .chain(match &c.http {
        None => Vec::new(),
        Some(allowed) if allowed.is_empty() => vec!["--allow-http=".to_string()],
        Some(allowed) => allowed.iter().map(|o| format!("--allow-http={o}")).collect(),
    })
    .chain(match &c.tcp {
        None => Vec::new(),
        Some(allowed) if allowed.is_empty() => vec!["--allow-tcp=".to_string()],
        Some(allowed) => allowed.iter().map(|t| format!("--allow-tcp={t}")).collect(),
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        limits: LimitArgs,
    }

    #[test]
    fn flags_beat_the_file_and_round_trip_to_children() {
        let file: FileConfig =
            toml::from_str("[limits]\nmax_time_limit = 60\nmax_task_memory = \"1GiB\"\nallow_symlinks = true").unwrap();
        let args = Cmd::parse_from([
            "x", "--max-time-limit", "5", "--max-process-memory", "2GiB", "--allow-dir", "/srv/a:ro", "--allow-send", "tasks.*",
        ])
        .limits;
        let c = args.resolve(&file, 2).unwrap();
        assert_eq!(c.max_time_limit, Duration::from_secs(5));
        assert_eq!(c.max_task_memory, 1 << 30);
        assert_eq!(c.max_process_memory, 2 << 30);
        assert!(c.allow_symlinks);
        assert_eq!(c.dirs, vec![AllowedDir { path: "/srv/a".into(), writable: false }]);
        assert_eq!(c.send_tasks, Some(vec!["tasks.*".to_string()]));
        let none = Cmd::parse_from(["x", "--allow-send", ""]).limits.resolve(&FileConfig::default(), 1).unwrap();
        assert_eq!(none.send_tasks, Some(vec![]));
        let again = Cmd::parse_from(std::iter::once("x".to_string()).chain(child_flags(&none))).limits;
        assert_eq!(again.resolve(&FileConfig::default(), 1).unwrap().send_tasks, Some(vec![]));
        let again = Cmd::parse_from(std::iter::once("x".to_string()).chain(child_flags(&c))).limits;
        assert_eq!(again.resolve(&FileConfig::default(), 2).unwrap(), c);
    }

    #[test]
    fn nonsense_ceilings_are_refused() {
        let file = FileConfig::default();
        let err = |argv: &[&str]| {
            let args = Cmd::parse_from(std::iter::once("x").chain(argv.iter().copied())).limits;
            match args.resolve(&file, 1) {
                Err(CliError::Usage(e)) => e.to_string(),
                other => panic!("expected a usage error, got {other:?}"),
            }
        };
        assert_eq!(err(&["--max-time-limit", "0"]), "max_time_limit must be a positive number of seconds, got 0");
        assert_eq!(err(&["--max-time-limit", "1e30"]), "max_time_limit = 1000000000000000000000000000000 is too large");
        assert_eq!(
            err(&["--max-task-memory", "8GiB"]),
            "max_task_memory must be between 1MiB and 4GiB (all a wasm32 task can address), got 8GiB"
        );
        let unknown = toml::from_str::<FileConfig>("[limits]\nmax_memory = 1").unwrap_err();
        assert!(unknown.message().starts_with("unknown field `max_memory`"), "{}", unknown.message());
    }
}
