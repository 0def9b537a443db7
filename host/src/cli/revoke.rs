//! `taskhost revoke`: revoke tasks on every worker, like `app.control.revoke` — a queued
//! task is skipped, `--terminate` stops a running one; remembered across worker restarts.

use super::serve::BrokerArgs;
use super::{current_thread_runtime, CliError};
use crate::worker::REVOKE_LIFETIME;
use anyhow::anyhow;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// Task ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Also stop the task if it is running (within an epoch tick).
    #[arg(long)]
    pub terminate: bool,
    /// Signal name sent with --terminate, for Celery workers sharing the broker.
    #[arg(long, default_value = "SIGTERM")]
    pub signal: String,
    /// Seconds the revoke is remembered [default: 10800, Celery's].
    #[arg(long)]
    pub expires: Option<f64>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

pub fn run(args: RevokeArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (broker_url, backend_url) = args.broker.urls(file);
    let lifetime = match args.expires {
        Some(s) if !(s.is_finite() && s > 0.0) => return Err(CliError::usage(anyhow!("--expires must be positive"))),
        Some(s) => Duration::try_from_secs_f64(s).map_err(|_| CliError::usage(anyhow!("--expires {s} is too large")))?,
        None => REVOKE_LIFETIME,
    };
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let broker = super::connect_broker(&broker_url).await?;
        let results = super::connect_backend(&backend_url, None).await?;
        crate::worker::revoke_everywhere(broker.as_ref(), results.as_ref(), &args.ids, args.terminate, &args.signal, lifetime)
            .await
            .map_err(CliError::Failed)?;
        for id in &args.ids {
            println!("revoked {id}{}", if args.terminate { " (terminate)" } else { "" });
        }
        Ok(())
    })
}
