//! `taskhost serve`: a small supervisor that keeps one single-threaded worker process per
//! core alive (`-p`), or with `-p 1` the worker itself.

use super::{current_thread_runtime, CliError};
use crate::backend::{self, DEFAULT_RESULT_EXPIRES};
use crate::broker;
use crate::registry::{Registry, WATCH_INTERVAL};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::worker::{Worker, WorkerConfig, DEFAULT_PREFETCH_MULTIPLIER};
use anyhow::{anyhow, Context as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Used when neither `--broker` nor `TASKHOST_BROKER` is given.
pub const DEFAULT_BROKER: &str = "redis://127.0.0.1:6379/0";

#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Broker URL: redis://[user:pass@]host:port/db or rediss:// (TLS).
    #[arg(long, env = "TASKHOST_BROKER", default_value = DEFAULT_BROKER)]
    pub broker: String,
    /// Result backend URL (default: the broker's).
    #[arg(long, env = "TASKHOST_RESULT_BACKEND")]
    pub result_backend: Option<String>,
}

impl BrokerArgs {
    pub fn backend_url(&self) -> &str {
        self.result_backend.as_deref().unwrap_or(&self.broker)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory of `<task>@<version>.wasm` components (watched for changes).
    #[arg(long, env = "TASKHOST_PLUGINS", default_value = "./plugins")]
    pub plugins: PathBuf,
    /// Queues to consume, comma-separated.
    #[arg(short = 'Q', long, value_delimiter = ',', default_value = "celery")]
    pub queues: Vec<String>,
    /// Sandboxes running at once, per worker process.
    #[arg(short, long, default_value_t = 32)]
    pub concurrency: usize,
    /// Worker processes (default: one per core).
    #[arg(short, long)]
    pub processes: Option<usize>,
    /// Messages held per sandbox slot (Celery's worker_prefetch_multiplier).
    #[arg(long, default_value_t = DEFAULT_PREFETCH_MULTIPLIER)]
    pub prefetch_multiplier: usize,
    /// Seconds a taken message may stay unacked before any consumer restores it.
    #[arg(long, default_value_t = 3600.0)]
    pub visibility_timeout: f64,
    /// Seconds running tasks get to finish on shutdown before they are requeued.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// Seconds results are kept (Celery's result_expires); 0 keeps them forever.
    #[arg(long, default_value_t = DEFAULT_RESULT_EXPIRES.as_secs_f64())]
    pub result_expires: f64,
    /// Store STARTED before running a task (Celery's task_track_started).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub track_started: bool,
    /// Node name, name@host (default taskhost@<hostname>).
    #[arg(short = 'n', long)]
    pub hostname: Option<String>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Set by the supervisor on the processes it starts.
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
}

fn positive(v: f64, flag: &str) -> Result<Duration, CliError> {
    if v.is_finite() && v >= 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(CliError::usage(anyhow!("{flag} must be a non-negative number of seconds")))
    }
}

fn node_name(args: &ServeArgs) -> String {
    let base = args.hostname.clone().unwrap_or_else(|| {
        let host = hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
        format!("taskhost@{host}")
    });
    match args.worker_index {
        None => base,
        Some(i) => match base.split_once('@') {
            Some((name, host)) => format!("{name}-{i}@{host}"),
            None => format!("{base}-{i}"),
        },
    }
}

pub fn run(args: ServeArgs) -> Result<(), CliError> {
    if args.queues.iter().any(|q| q.is_empty()) {
        return Err(CliError::usage(anyhow!("-Q: queue names must not be empty")));
    }
    if args.concurrency == 0 {
        return Err(CliError::usage(anyhow!("--concurrency must be at least 1")));
    }
    let processes = args.processes.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if args.worker_index.is_none() && processes > 1 {
        return supervise(&args, processes);
    }
    serve_here(args, processes)
}

fn banner(args: &ServeArgs, registry: &Registry, processes: usize, node: &str) {
    let mut text = format!(
        "taskhost {} — {node}\n  broker:      {}\n  results:     {}\n  plugins:     {}\n  concurrency: {} sandboxes × {processes} process(es), prefetch {} each\n  queues:      {}\n  tasks:\n",
        env!("CARGO_PKG_VERSION"),
        redact(&args.broker.broker),
        redact(args.broker.backend_url()),
        args.plugins.display(),
        args.concurrency,
        args.concurrency * args.prefetch_multiplier.max(1),
        args.queues.join(", "),
    );
    for tv in registry.all() {
        text.push_str(&format!("    . {}@{}\n", tv.name, tv.version));
    }
    print!("{text}");
}

/// Hides a password in a URL for display.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn serve_here(args: ServeArgs, processes: usize) -> Result<(), CliError> {
    let node = node_name(&args);
    let visibility = positive(args.visibility_timeout, "--visibility-timeout")?;
    let grace = positive(args.shutdown_grace, "--shutdown-grace")?;
    let expires = positive(args.result_expires, "--result-expires")?;
    let runtime = Arc::new(
        Runtime::new(RuntimeConfig { max_instances: args.concurrency as u32 + 4, ..Default::default() })
            .map_err(CliError::usage)?,
    );
    let registry = Registry::open(&args.plugins, runtime.clone()).map_err(CliError::usage)?;
    let rt = current_thread_runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let broker: Arc<dyn broker::Broker> = broker::connect(&args.broker.broker)
            .await
            .with_context(|| format!("connecting to broker {}", redact(&args.broker.broker)))
            .map_err(CliError::Usage)?
            .into();
        let backend: Arc<dyn backend::ResultBackend> =
            backend::connect(args.broker.backend_url(), (!expires.is_zero()).then_some(expires))
                .await
                .with_context(|| format!("connecting to result backend {}", redact(args.broker.backend_url())))
                .map_err(CliError::Usage)?
                .into();
        if args.worker_index.is_none() {
            banner(&args, &registry, processes, &node);
        }
        let _watch = registry.watch(WATCH_INTERVAL);
        let cfg = WorkerConfig {
            node_name: node.clone(),
            queues: args.queues.clone(),
            concurrency: args.concurrency,
            prefetch_multiplier: args.prefetch_multiplier,
            visibility_timeout: visibility,
            shutdown_grace: grace,
            track_started: args.track_started,
        };
        tracing::info!(node = %node, queues = %args.queues.join(","), "worker ready");
        let worker = Worker::new(cfg, registry.clone(), runtime.clone(), broker, backend);
        let stats = worker.run(shutdown_signal()).await;
        tracing::info!(node = %node, processed = stats.processed, succeeded = stats.succeeded, failed = stats.failed, "worker stopped");
        Ok(())
    })
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once (cold shutdown:
/// held messages come back after the visibility timeout).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested: finishing running tasks (signal again to quit now)");
    tokio::task::spawn_local(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: quitting now; held messages return after the visibility timeout");
        std::process::exit(1);
    });
}

/// Starts `processes` workers and restarts any that dies until asked to stop.
fn supervise(args: &ServeArgs, processes: usize) -> Result<(), CliError> {
    let exe = std::env::current_exe().context("locating the taskhost binary").map_err(CliError::Usage)?;
    // The banner comes from here, after a first look at the plugins.
    {
        let runtime = Arc::new(Runtime::new(RuntimeConfig { max_instances: 1, ..Default::default() }).map_err(CliError::usage)?);
        let registry = Registry::open(&args.plugins, runtime).map_err(CliError::usage)?;
        banner(args, &registry, processes, &node_name(args));
    }
    let rt = current_thread_runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let spawn = |i: usize| {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("serve")
                .arg("--plugins")
                .arg(&args.plugins)
                .args(["-Q", &args.queues.join(",")])
                .args(["-c", &args.concurrency.to_string()])
                .args(["-p", "1", "--worker-index", &i.to_string()])
                .args(["--prefetch-multiplier", &args.prefetch_multiplier.to_string()])
                .args(["--visibility-timeout", &args.visibility_timeout.to_string()])
                .args(["--shutdown-grace", &args.shutdown_grace.to_string()])
                .args(["--result-expires", &args.result_expires.to_string()])
                .args(["--track-started", &args.track_started.to_string()])
                .args(["--broker", &args.broker.broker])
                .args(["--result-backend", args.broker.backend_url()]);
            if let Some(h) = &args.hostname {
                cmd.args(["--hostname", h]);
            }
            // Own process group: a terminal Ctrl-C reaches only the supervisor, which forwards one SIGTERM.
            cmd.process_group(0).kill_on_drop(false).spawn()
        };
        let mut children = Vec::new();
        for i in 0..processes {
            children.push(Some(spawn(i).context("starting a worker process").map_err(CliError::Failed)?));
        }
        let stop = shutdown_signal();
        tokio::pin!(stop);
        let mut stopping = false;
        loop {
            if stopping {
                for child in children.iter_mut().flatten() {
                    if let Some(pid) = child.id() {
                        // SAFETY: plain kill(2) on our own child's pid.
                        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    }
                }
                for child in children.iter_mut().flatten() {
                    let _ = child.wait().await;
                }
                return Ok(());
            }
            let waits = children.iter_mut().enumerate().filter_map(|(i, c)| c.as_mut().map(|c| (i, c))).map(|(i, c)| {
                Box::pin(async move { (i, c.wait().await) })
            });
            let any_exit = futures::future::select_all(waits);
            let exited = tokio::select! {
                _ = &mut stop => { stopping = true; None }
                ((i, status), _, _) = any_exit => Some((i, status)),
            };
            if let Some((i, status)) = exited {
                tracing::warn!(worker = i, "worker process exited ({status:?}); restarting in 1 s");
                children[i] = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
                children[i] = Some(spawn(i).context("restarting a worker process").map_err(CliError::Failed)?);
            }
        }
    })
}
