//! `taskhost result`: read (or wait for) a task's result from the result backend.

use super::serve::BrokerArgs;
use super::{current_thread_runtime, CliError};

#[derive(Debug, clap::Args)]
pub struct ResultArgs {
    /// Task id.
    pub id: String,
    /// Wait until the task is ready.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait (default: forever).
    #[arg(long, requires = "wait")]
    pub timeout: Option<f64>,
    /// Print the whole stored record as JSON, whatever its state.
    #[arg(long)]
    pub json: bool,
    /// Read the result under this key prefix (a tenant's `result_prefix`; Celery's
    /// `global_keyprefix`).
    #[arg(long, value_name = "PREFIX")]
    pub key_prefix: Option<String>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

pub fn run(args: ResultArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (_, backend_url) = args.broker.urls(file);
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let backend = match &args.key_prefix {
            None => super::connect_backend(&backend_url, None).await?,
            Some(prefix) => crate::backend::connect_prefixed(&backend_url, None, &crate::tenant::celery_key_prefix(prefix))
                .await
                .map_err(CliError::usage)?,
        };
        let record = if args.wait {
            let timeout = super::seconds_flag(args.timeout, "--timeout")?;
            Some(backend.wait(&args.id, timeout).await.map_err(CliError::failed)?)
        } else {
            backend.get(&args.id).await.map_err(CliError::failed)?
        };
        let Some(record) = record else {
            if args.json {
                println!("{}", serde_json::json!({"status": "PENDING", "result": null, "task_id": args.id}));
                return Ok(());
            }
            return Err(super::send::not_ready(&args.id, crate::protocol::State::Pending));
        };
        if args.json {
            println!("{}", record.to_json(None));
            return Ok(());
        }
        let name = record.extended.get("name").and_then(|n| n.as_str()).unwrap_or("").to_string();
        super::send::print_outcome(if name.is_empty() { "" } else { &name }, &record)
    })
}
