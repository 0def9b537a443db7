//! `taskhost plugins list`: what a plugins directory serves — name, version, digest, limits;
//! `taskhost plugins compile`: fills the compile cache (serve runs it before its workers).

use super::CliError;
use crate::registry::{ByteSize, Registry};
use super::limits::LimitArgs;
use crate::ceilings::Ceilings;
use crate::runtime::{Runtime, RuntimeConfig};
use std::io::Read as _;
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
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Compile every component into the compile cache ($TASKHOST_CACHE_DIR), on all cores.
    Compile {
        #[arg(long, env = "TASKHOST_PLUGINS")]
        plugins: Option<PathBuf>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Compile the component on stdin into the compile cache: the child process a worker
    /// compiles in, held to the compile ceilings.
    #[command(hide = true)]
    CompileOne {
        #[command(flatten)]
        limits: LimitArgs,
    },
}

pub fn run(cmd: PluginsCommand, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (plugins, json, limits) = match cmd {
        PluginsCommand::List { plugins, json, limits } => (plugins, json, limits),
        PluginsCommand::Compile { plugins, limits } => {
            return compile(file.plugins(plugins.as_deref()), limits.resolve(file, 1)?)
        }
        PluginsCommand::CompileOne { limits } => return compile_one(limits.resolve(file, 1)?),
    };
    let dir = file.plugins(plugins.as_deref());
    let all = open(dir.clone(), limits.resolve(file, 1)?)?.all();
    eprintln!("{}: {} loaded", crate::registry::describe_dir(&dir), all.len());
    if !json {
        println!("{:<22} {:<9} {:<14} {:<12} {:>8} {:>8} {:>9}  {}", "TASK", "VERSION", "DIGEST", "QUEUE", "HARD", "SOFT", "MEMORY", "RETRIES");
    }
    for tv in all {
        let limits = tv.limits();
        let queue = tv.manifest.queue.clone().unwrap_or_else(|| "celery".into());
        let retries = tv.manifest.max_retries.unwrap_or(crate::worker::retry::DEFAULT_MAX_RETRIES);
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

/// Loads every component of `dir`, compiling what the cache lacks in child processes
/// held to the compile ceilings (one per core at once).
fn open(dir: PathBuf, ceilings: Ceilings) -> Result<Arc<Registry>, CliError> {
    let runtime = Arc::new(
        Runtime::new(RuntimeConfig {
            max_instances: 1,
            ceilings,
            compiler: std::env::current_exe().ok(),
            ..Default::default()
        })
        .map_err(CliError::usage)?,
    );
    Registry::open(dir, runtime).map_err(CliError::usage)
}

fn compile_one(ceilings: Ceilings) -> Result<(), CliError> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin().take(ceilings.max_component_size + 1), &mut bytes)
        .map_err(CliError::failed)?;
    if bytes.len() as u64 > ceilings.max_component_size {
        return Err(CliError::failed(anyhow::anyhow!("component above max_component_size")));
    }
    // On every core: with the per-digest lock (runtime/compile.rs) one compile serves all
    // of a machine's worker processes, and a new release is ready sooner (589 KB of
    // thumbnail: 1.13 s on one core of this machine, ~0.55 s on two).
    let runtime = Runtime::new(RuntimeConfig { max_instances: 1, ceilings, parallel_compilation: true, ..Default::default() })
        .map_err(CliError::usage)?;
    runtime.compile_into_cache(&bytes).map_err(CliError::failed)
}

/// Compiles what the cache lacks, saying on stderr what it is doing: a large component
/// takes many seconds, and a silent terminal looks hung.
fn compile(dir: PathBuf, ceilings: Ceilings) -> Result<(), CliError> {
    let started = std::time::Instant::now();
    eprintln!("compiling {} (cached ones are only mapped)…", crate::registry::describe_dir(&dir));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut said = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let secs = started.elapsed().as_secs();
                if secs >= said + 5 {
                    said = secs;
                    eprintln!("  … still compiling ({secs} s)");
                }
            }
        })
    };
    let opened = open(dir, ceilings);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ticker.join();
    let all = opened?.all();
    for tv in &all {
        let how = if tv.component.from_cache { "cached".to_string() } else { format!("compiled in {:.1} s", tv.load_time.as_secs_f64()) };
        eprintln!("  {}@{}  {how}", tv.name, tv.version);
    }
    let compiled = all.iter().filter(|tv| !tv.component.from_cache).count();
    println!(
        "{} components: {compiled} compiled, {} already cached ({:.1} s)",
        all.len(),
        all.len() - compiled,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
