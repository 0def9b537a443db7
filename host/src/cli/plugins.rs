//! `taskhost plugins list`: what a plugins directory serves — name, version, digest, limits;
//! `taskhost plugins compile`: fills the compile cache (serve runs it before its workers).

use super::CliError;
use crate::registry::{ByteSize, Registry};
use crate::runtime::{Runtime, RuntimeConfig};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, clap::Subcommand)]
pub enum PluginsCommand {
    /// List loaded components; invalid files are reported on stderr.
    List {
        #[arg(long, env = "TASKHOST_PLUGINS")]
        plugins: Option<PathBuf>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compile every component into the compile cache ($TASKHOST_CACHE_DIR), on all cores.
    Compile {
        #[arg(long, env = "TASKHOST_PLUGINS")]
        plugins: Option<PathBuf>,
    },
}

pub fn run(cmd: PluginsCommand, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (plugins, json) = match cmd {
        PluginsCommand::List { plugins, json } => (plugins, json),
        PluginsCommand::Compile { plugins } => return compile(file.plugins(plugins.as_deref())),
    };
    let all = open(file.plugins(plugins.as_deref()))?.all();
    if !json {
        println!("{:<22} {:<9} {:<14} {:<12} {:>8} {:>8} {:>9}  {}", "TASK", "VERSION", "DIGEST", "QUEUE", "HARD", "SOFT", "MEMORY", "RETRIES");
    }
    for tv in all {
        let limits = tv.limits();
        let queue = tv.manifest.queue.clone().unwrap_or_else(|| "celery".into());
        let retries = tv.manifest.max_retries.unwrap_or(super::run::DEFAULT_MAX_RETRIES);
        if json {
            let row = serde_json::json!({
                "task": tv.name, "version": tv.version.to_string(), "digest": tv.component.digest,
                "queue": queue, "time_limit": limits.hard.as_secs_f64(),
                "soft_time_limit": limits.soft.map(|s| s.as_secs_f64()), "memory_limit": limits.memory,
                "max_retries": retries, "rate_limit": tv.manifest.rate_limit.map(|r| r.to_string()),
                "acks_late": tv.manifest.acks_late.unwrap_or(true), "size": tv.size,
            });
            println!("{row}");
        } else {
            println!(
                "{:<22} {:<9} {:<14} {:<12} {:>7}s {:>8} {:>9}  {}",
                tv.name,
                tv.version,
                &tv.component.digest[..12],
                queue,
                limits.hard.as_secs_f64(),
                limits.soft.map_or("-".to_string(), |s| format!("{}s", s.as_secs_f64())),
                ByteSize(limits.memory).to_string(),
                retries
            );
        }
    }
    Ok(())
}

/// Loads every component of `dir`, compiling (on all cores) what the cache lacks.
fn open(dir: PathBuf) -> Result<Arc<Registry>, CliError> {
    let runtime = Arc::new(Runtime::new(RuntimeConfig { max_instances: 1, ..Default::default() }).map_err(CliError::usage)?);
    Registry::open(dir, runtime).map_err(CliError::usage)
}

fn compile(dir: PathBuf) -> Result<(), CliError> {
    let all = open(dir)?.all();
    let compiled = all.iter().filter(|tv| !tv.component.from_cache).count();
    println!("{} components: {compiled} compiled, {} already cached", all.len(), all.len() - compiled);
    Ok(())
}
