//! `taskhost run`: one task, eagerly, in this process (Celery's always-eager), for
//! tests and debugging. Retries re-run at once, up to the manifest's `max_retries`.

use super::{current_thread_runtime, CliError};
use crate::registry::Registry;
use crate::runtime::{RunControl, Runtime, RuntimeConfig, TaskError, TaskInput};
use anyhow::{anyhow, Context as _};
use semver::VersionReq;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::limits::LimitArgs;
use crate::worker::retry::DEFAULT_MAX_RETRIES;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Task name, e.g. `tasks.add`.
    pub task: String,
    /// Positional arguments, a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// Semver requirement for the component version, e.g. "^1.2" (default: newest).
    #[arg(long = "version", value_name = "REQ")]
    pub version_req: Option<VersionReq>,
    /// Directory of `<task>@<version>.wasm` components.
    #[arg(long, env = "TASKHOST_PLUGINS")]
    pub plugins: Option<PathBuf>,
    /// Hard time limit in seconds (overrides the manifest).
    #[arg(long)]
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds (overrides the manifest).
    #[arg(long)]
    pub soft_time_limit: Option<f64>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Secrets the task may read where its manifest grants the name (see `serve --secrets`).
    #[arg(long, env = "TASKHOST_SECRETS", value_name = "FILE")]
    pub secrets: Option<PathBuf>,
}

fn check_json(text: &str, what: &str, want_array: bool) -> Result<(), CliError> {
    let value: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("--{what} is not valid JSON")).map_err(CliError::Usage)?;
    let ok = if want_array { value.is_array() } else { value.is_object() };
    if !ok {
        let kind = if want_array { "array" } else { "object" };
        return Err(CliError::usage(anyhow!("--{what} must be a JSON {kind}, got {value}")));
    }
    Ok(())
}

fn positive_secs(value: Option<f64>, flag: &str) -> Result<Option<Duration>, CliError> {
    match value {
        Some(s) if !(s > 0.0 && s.is_finite()) => Err(CliError::usage(anyhow!("{flag} must be a positive number of seconds"))),
        other => Ok(other.map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))),
    }
}

pub fn run(args: RunArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    check_json(&args.args, "args", true)?;
    check_json(&args.kwargs, "kwargs", false)?;
    let hard = positive_secs(args.time_limit, "--time-limit")?;
    let soft = positive_secs(args.soft_time_limit, "--soft-time-limit")?;

    let ceilings = args.limits.resolve(file, 1)?;
    let (hard, soft) = (hard.map(|h| h.min(ceilings.max_time_limit)), soft.map(|s| s.min(ceilings.max_time_limit)));
    let runtime = Arc::new(
        Runtime::new(RuntimeConfig {
            max_instances: 4,
            ceilings,
            compiler: std::env::current_exe().ok(),
            secrets: Arc::new(super::secrets::load(args.secrets.as_deref())?),
            ..Default::default()
        })
        .map_err(CliError::usage)?,
    );
    let registry =
        Registry::open_for_task(file.plugins(args.plugins.as_deref()), runtime.clone(), &args.task).map_err(CliError::usage)?;
    let task = registry.resolve(&args.task, args.version_req.as_ref()).map_err(|e| match e {
        crate::registry::RegistryError::UnknownTask { .. } => {
            CliError::usage(anyhow!("{e} (searched {})", crate::registry::describe_dir(registry.dir())))
        }
        other => CliError::usage(other),
    })?;
    let mut limits = task.limits();
    if let Some(hard) = hard {
        limits.hard = hard;
    }
    if soft.is_some() {
        limits.soft = soft;
    }
    let max_retries = task.manifest.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);

    let rt = current_thread_runtime()?;
    let mut input = TaskInput {
        id: uuid::Uuid::new_v4().to_string(),
        name: task.name.clone(),
        queue: task.manifest.queue.clone().unwrap_or_else(|| "celery".into()),
        args: args.args,
        kwargs: args.kwargs,
        ..Default::default()
    };
    input.root_id = Some(input.id.clone());
    let version = task.version.to_string();
    loop {
        // Follow-ups are shown, not run: there is no broker here to publish them to.
        let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
        let control = RunControl::default().with_sent_tasks(sent_tx).with_grants(task.grants());
        let run = rt.block_on(runtime.run(&task.component, &version, input.clone(), &limits, Arc::new(control)));
        while let Ok(sent) = sent_rx.try_recv() {
            eprintln!("[{} sent] {} [{}] args {} kwargs {} (not run by `taskhost run`)", task.name, sent.name, sent.id, sent.args, sent.kwargs);
        }
        for (stream, captured) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
            if !captured.text.is_empty() {
                eprint!("[{} {stream}] {}", task.name, captured.text);
                if !captured.text.ends_with('\n') {
                    eprintln!();
                }
            }
            if captured.dropped > 0 {
                eprintln!("[{} {stream}] … {} more bytes dropped (output cap)", task.name, captured.dropped);
            }
        }
        match run.result {
            Ok(json) => {
                println!("{json}");
                return Ok(());
            }
            Err(TaskError::Retry { reason, .. }) if input.retries < max_retries => {
                eprintln!("retry {} of {max_retries}: {reason}", input.retries + 1);
                input.retries += 1;
            }
            Err(TaskError::Retry { reason, .. }) => {
                return Err(CliError::failed(anyhow!(
                    "task {} failed: max retries ({max_retries}) exceeded; last reason: {reason}",
                    task.name
                )))
            }
            Err(e) => return Err(CliError::failed(anyhow!("task {} failed: {e}", task.name))),
        }
    }
}
