//! The command line: clap structs, one file per subcommand, exit codes decided here.
//!
//! Exit codes: 0 success; 1 the task (or command) failed; 2 bad invocation or setup
//! (unknown task, unreadable plugins dir, invalid JSON), as clap does for usage errors;
//! 3 the task has no outcome yet (PENDING, STARTED, RETRY or a custom state).

mod beat;
mod bench;
mod build;
mod config;
mod dlq;
mod inspect;
mod limits;
mod plugins;
mod release;
mod result;
mod revoke;
mod run;
mod secrets;
mod usage;
mod send;
mod serve;

use crate::observe::{init_tracing, LogFormat};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "taskhost", version, about = "Celery-compatible task worker for sandboxed WebAssembly components")]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "TASKHOST_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Config file (default: ./taskhost.toml if present). Flags > env > file > defaults.
    #[arg(long, global = true, env = "TASKHOST_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one task eagerly in this process and print its JSON result.
    Run(run::RunArgs),
    /// Build a Python module of @task functions into a component (needs componentize-py).
    Build(build::BuildArgs),
    /// Consume tasks from the broker and run them (the worker).
    Serve(serve::ServeArgs),
    /// Publish a task, like Celery's send_task; --wait prints its result.
    Send(send::SendArgs),
    /// Read or wait for a task's result.
    Result(result::ResultArgs),
    /// Send periodic tasks from a schedule (one leader cluster-wide).
    Beat(beat::BeatArgs),
    /// Revoke tasks on every worker (a queued task is skipped; --terminate stops a running one).
    Revoke(revoke::RevokeArgs),
    /// What each tenant's tasks used (sandbox CPU, wall time, memory, outcomes), per hour.
    Usage(usage::UsageArgs),
    /// Ask workers (taskhost or Celery) what they are doing, as `celery inspect` does.
    Inspect(inspect::InspectArgs),
    /// Follow the Celery events workers send (`celery events --dump`); --json for raw events.
    Events(inspect::EventsArgs),
    /// The dead-letter queue: list, show, replay, purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Inspect the components in a plugins directory.
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Make an Ed25519 key pair for signing releases (NAME.key, NAME.pub).
    Keygen(release::KeygenArgs),
    /// Sign a component and publish it to the registry (the broker by default).
    Publish(release::PublishArgs),
    /// Releases: who published what when, which is active at what share, which workers have it.
    Releases(release::ReleasesArgs),
    /// Activate a version for a growing share of new tasks, rolling back on failures.
    Rollout(release::RolloutArgs),
    /// Stop a rollout, or return to the version active before the last one.
    Rollback(release::RollbackArgs),
    /// Withdraw a version: it serves nothing; messages requiring only it are dead-lettered.
    Yank(release::YankArgs),
    /// Delete releases nothing needs: not active, staged or the rollback target, and not
    /// required by a queued message.
    Gc(release::GcArgs),
}

/// A failure the CLI reports, with the exit code it maps to.
#[derive(Debug)]
pub enum CliError {
    /// The task or the command's work failed.
    Failed(anyhow::Error),
    /// Bad invocation or setup.
    Usage(anyhow::Error),
    /// The task is not ready yet: asking again later may succeed.
    NotReady(anyhow::Error),
}

impl CliError {
    pub fn usage(e: impl Into<anyhow::Error>) -> Self {
        CliError::Usage(e.into())
    }
    pub fn failed(e: impl Into<anyhow::Error>) -> Self {
        CliError::Failed(e.into())
    }
}

pub fn main() -> ExitCode {
    // wasmtime builds an error value when it tears down every task's fiber; with
    // RUST_BACKTRACE set, each would capture a backtrace (~10% of a no-op task's cost).
    // Library backtraces stay off unless asked for; panic backtraces are unaffected.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: first thing in main, before any thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info,wasmtime=warn,cranelift=warn",
        1 => "debug,wasmtime=info,cranelift=info",
        _ => "trace",
    };
    init_tracing(cli.log_format, level);
    // rediss:// needs one process-wide TLS crypto provider; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let outcome = config::FileConfig::load(cli.config.as_deref()).and_then(|file| match cli.command {
        Command::Run(args) => run::run(args, &file),
        Command::Build(args) => build::run(args),
        Command::Serve(args) => serve::run(args, &file),
        Command::Send(args) => send::run(args, &file),
        Command::Result(args) => result::run(args, &file),
        Command::Beat(args) => beat::run(args, &file),
        Command::Revoke(args) => revoke::run(args, &file),
        Command::Dlq(cmd) => dlq::run(cmd, &file),
        Command::Inspect(args) => inspect::inspect(args, &file),
        Command::Events(args) => inspect::events(args, &file),
        Command::Usage(args) => usage::run(args, &file),
        Command::Plugins(cmd) => plugins::run(cmd, &file),
        Command::Bench(cmd) => bench::run(cmd, &file),
        Command::Keygen(args) => release::keygen(args),
        Command::Publish(args) => release::publish(args, &file),
        Command::Releases(args) => release::releases(args, &file),
        Command::Rollout(args) => release::rollout(args, &file),
        Command::Rollback(args) => release::rollback(args, &file),
        Command::Yank(args) => release::yank(args, &file),
        Command::Gc(args) => release::gc(args, &file),
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Failed(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(CliError::Usage(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(CliError::NotReady(e)) => {
            eprintln!("{e:#}");
            ExitCode::from(3)
        }
    }
}

/// Connects to a broker; a failure is a setup error naming the (redacted) URL.
pub(crate) async fn connect_broker(url: &str) -> Result<Box<dyn crate::broker::Broker>, CliError> {
    use anyhow::Context as _;
    crate::broker::connect(url)
        .await
        .with_context(|| format!("connecting to broker {}", serve::redact(url)))
        .map_err(CliError::Usage)
}

/// Connects to a result backend; a failure is a setup error naming the (redacted) URL.
pub(crate) async fn connect_backend(
    url: &str,
    expires: Option<std::time::Duration>,
) -> Result<Box<dyn crate::backend::ResultBackend>, CliError> {
    use anyhow::Context as _;
    crate::backend::connect(url, expires)
        .await
        .with_context(|| format!("connecting to result backend {}", serve::redact(url)))
        .map_err(CliError::Usage)
}

/// [`connect_backend`] sized for a worker process.
pub(crate) async fn connect_backend_sized(
    url: &str,
    expires: Option<std::time::Duration>,
    sizing: crate::backend::Sizing,
) -> Result<Box<dyn crate::backend::ResultBackend>, CliError> {
    use anyhow::Context as _;
    crate::backend::connect_sized(url, expires, sizing)
        .await
        .with_context(|| format!("connecting to result backend {}", serve::redact(url)))
        .map_err(CliError::Usage)
}

/// A seconds value (`--shutdown-grace 2.5`) as a duration: negative, NaN or out-of-range
/// values are a usage error, never a panic.
pub(crate) fn seconds(v: f64, flag: &str) -> Result<std::time::Duration, CliError> {
    std::time::Duration::try_from_secs_f64(v)
        .map_err(|_| CliError::usage(anyhow::anyhow!("{flag} must be a non-negative number of seconds, got {v}")))
}

/// [`seconds`] for an optional flag (`--timeout`).
pub(crate) fn seconds_flag(value: Option<f64>, flag: &str) -> Result<Option<std::time::Duration>, CliError> {
    value.map(|v| seconds(v, flag)).transpose()
}

/// A single-threaded async runtime: one per process, as the process model wants.
pub(crate) fn current_thread_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CliError::usage)
}
