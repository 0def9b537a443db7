//! `taskhost beat`: send periodic tasks from a schedule file; one instance leads
//! cluster-wide, others wait and take over.

use super::serve::{shutdown_signal, BrokerArgs};
use super::{current_thread_runtime, CliError};
use crate::beat;
use anyhow::{anyhow, Context as _};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, clap::Args)]
pub struct BeatArgs {
    /// Schedule file: [[entry]] tables with name, task, every or cron, args, kwargs, queue.
    #[arg(long)]
    pub schedule: PathBuf,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

pub fn load_schedule(path: &Path) -> Result<Vec<beat::Entry>, CliError> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading schedule {}", path.display()))
        .map_err(CliError::Usage)?;
    beat::parse(&text).map_err(|e| CliError::usage(anyhow!("schedule {}: {e}", path.display())))
}

pub fn holder_name() -> String {
    let host = hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
    format!("beat-{}@{host}", std::process::id())
}

pub fn run(args: BeatArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let entries = load_schedule(&args.schedule)?;
    let (url, _) = args.broker.urls(file);
    for e in &entries {
        println!("beat entry {}: {} {}", e.name, e.task, e.describe());
    }
    let rt = current_thread_runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let stop = shutdown_signal();
        let b = super::connect_broker(&url).await?;
        let holder = holder_name();
        tracing::info!(holder = %holder, entries = entries.len(), "beat: started");
        beat::run(entries, b.as_ref(), &holder, &holder, stop).await;
        tracing::info!("beat: stopped");
        Ok(())
    })
}
