//! `taskhost serve`: a small supervisor that keeps one single-threaded worker process per
//! core alive (`-p`), or with `-p 1` the worker itself.

use super::{current_thread_runtime, CliError};
use crate::backend::{self, DEFAULT_RESULT_EXPIRES};
use crate::broker;
use crate::registry::{Registry, WATCH_INTERVAL};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::worker::{Worker, WorkerConfig, DEFAULT_PREFETCH_MULTIPLIER, DEFAULT_VISIBILITY_TIMEOUT};
use super::config::FileConfig;
use super::limits::{child_flags, LimitArgs};
use crate::ceilings::Ceilings;
use anyhow::{anyhow, Context as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Broker URL: sqlite://PATH (embedded, the default: sqlite://./taskhost.db),
    /// redis://[user:pass@]host:port/db or rediss:// (TLS), sentinel://h1:26379;sentinel://h2:26379
    /// (Redis Sentinel's master; `?master_name=NAME`), amqp://user:pass@host:5672/vhost or
    /// amqps:// (RabbitMQ; `?max_priority=N`, `?quorum=queue,…` for queues it creates).
    #[arg(long, env = "TASKHOST_BROKER")]
    pub broker: Option<String>,
    /// Result backend URL (default: the broker's).
    #[arg(long, env = "TASKHOST_RESULT_BACKEND")]
    pub result_backend: Option<String>,
    /// Where leases, beat ticks, rate slots, revokes, ETA-parked messages and dead letters
    /// live instead of the broker: redis://… or postgresql://… [default: on the broker;
    /// beside RabbitMQ, the result backend].
    #[arg(long, env = "TASKHOST_STATE")]
    pub state: Option<String>,
}

impl BrokerArgs {
    /// Broker and result backend URLs after flags > env > file > defaults. A `--state` URL
    /// becomes `TASKHOST_STATE` for this process (which `broker::connect` reads) and the
    /// worker processes it starts.
    pub fn urls(&self, file: &FileConfig) -> (String, String) {
        if let Some(state) = &self.state {
            if std::env::var(crate::broker::state::STATE_ENV).ok().as_deref() != Some(state.as_str()) {
                // Read at start-up, before any thread: nothing else reads the environment yet.
                unsafe { std::env::set_var(crate::broker::state::STATE_ENV, state) };
            }
        }
        let broker = file.broker(self.broker.as_deref());
        // rpc:// replies over the broker: it is named by it from here on (worker processes
        // get the same URL).
        let backend = crate::backend::rpc::over_broker(file.result_backend(self.result_backend.as_deref(), &broker), &broker);
        // Beside RabbitMQ, which keeps no state, the state goes to the result backend
        // unless --state says otherwise: `broker::connect` reads it from here.
        if crate::broker::amqp::is_amqp_url(&broker)
            && std::env::var(crate::broker::state::RESULT_BACKEND_ENV).ok().as_deref() != Some(backend.as_str())
        {
            // As above: start-up, before any thread.
            unsafe { std::env::set_var(crate::broker::state::RESULT_BACKEND_ENV, &backend) };
        }
        (broker, backend)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory of `<task>@<version>.wasm` components, watched for changes [default: ./plugins].
    #[arg(long, env = "TASKHOST_PLUGINS")]
    pub plugins: Option<PathBuf>,
    /// Queues to consume, comma-separated [default: celery].
    #[arg(short = 'Q', long, value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// Sandboxes running at once, per worker process [default: 32].
    #[arg(short, long)]
    pub concurrency: Option<usize>,
    /// Worker processes [default: one per core].
    #[arg(short, long)]
    pub processes: Option<usize>,
    /// Messages held per sandbox slot, Celery's worker_prefetch_multiplier [default: 4].
    #[arg(long)]
    pub prefetch_multiplier: Option<usize>,
    /// How much lower than this command's own the worker processes' CPU priority is (nice
    /// increment, 0-19): a broker, the supervisor or a web app on the same machine then
    /// gets a core as soon as it wakes, instead of waiting behind task code [default: 10].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=19))]
    pub worker_nice: Option<u8>,
    /// Seconds a taken message may stay unacked before any consumer restores it [default: 3600].
    #[arg(long)]
    pub visibility_timeout: Option<f64>,
    /// Seconds running tasks get to finish on shutdown before they are requeued [default: 30].
    #[arg(long)]
    pub shutdown_grace: Option<f64>,
    /// Seconds results are kept, Celery's result_expires; 0 keeps them forever [default: 86400].
    #[arg(long)]
    pub result_expires: Option<f64>,
    /// Store STARTED before running a task, Celery's task_track_started [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pub track_started: Option<bool>,
    /// Celery's result_extended: results carry the task's name, args, kwargs, worker,
    /// retries and queue (a SQL backend's new table gets those columns).
    #[arg(long)]
    pub result_extended: bool,
    /// Node name, name@host [default: taskhost@<hostname>].
    #[arg(short = 'n', long)]
    pub hostname: Option<String>,
    /// Also run the periodic-task scheduler (needs --schedule).
    #[arg(long, requires = "schedule")]
    pub beat: bool,
    /// Schedule file for --beat.
    #[arg(long)]
    pub schedule: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Secrets tasks may read through wasi:config where their manifest grants the name:
    /// a TOML file of NAME = "value"; TASKHOST_SECRET_<NAME> variables add to it.
    #[arg(long, env = "TASKHOST_SECRETS", value_name = "FILE")]
    pub secrets: Option<PathBuf>,
    /// Tenants policy (tenants.toml): queues bound to tenants, the tasks each may run,
    /// memory and grants ceilings; re-read when it changes.
    #[arg(long, env = "TASKHOST_TENANTS", value_name = "FILE")]
    pub tenants: Option<PathBuf>,
    /// Follow a release registry: `broker` (this worker's broker), a redis:// or sqlite://
    /// URL, or `oci://…` (the same as `broker`: the index is on the broker, the bytes are
    /// pulled from where each release says). New releases are fetched into --plugins (the
    /// cache), verified, loaded.
    #[arg(long, env = "TASKHOST_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,
    /// trust.toml: which public keys may publish which task names. With it, every
    /// component (registry or plugins dir) must carry a release signed by such a key.
    #[arg(long, env = "TASKHOST_TRUST", value_name = "FILE")]
    pub trust: Option<PathBuf>,
    /// Also load unsigned components (development only).
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Send Celery task events from the start (Flower and `celery events` also turn them
    /// on with `enable_events`).
    #[arg(short = 'E', long)]
    pub events: bool,
    /// Send no worker-online/heartbeat/offline events.
    #[arg(long)]
    pub without_heartbeat: bool,
    /// Serve /metrics, /healthz, /readyz and the dashboard on this address
    /// (`127.0.0.1:9808`, or a port alone for 127.0.0.1). Off unless set.
    #[arg(long, env = "TASKHOST_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// Token the dashboard's actions need (and every request, when --http is not on
    /// loopback). Made up and logged when not given on loopback.
    #[arg(long, env = "TASKHOST_HTTP_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Export a `run/<task>` span per task (continuing a producer's `traceparent`) as
    /// OTLP/HTTP JSON to this collector: http://HOST:4318 or its full /v1/traces URL.
    #[arg(long, env = "TASKHOST_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Set by the supervisor: where worker processes write reports for --http.
    #[arg(long, hide = true)]
    pub report_dir: Option<PathBuf>,
    /// Set by the supervisor on the processes it starts.
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
}

/// `serve`'s settings after flags > env > file > defaults, validated once.
#[derive(Debug, Clone)]
struct Settings {
    plugins: PathBuf,
    queues: Vec<String>,
    concurrency: usize,
    processes: usize,
    prefetch_multiplier: usize,
    worker_nice: u8,
    visibility_timeout: Duration,
    shutdown_grace: Duration,
    result_expires: Duration,
    track_started: bool,
    result_extended: bool,
    hostname: Option<String>,
    broker: String,
    result_backend: String,
    worker_index: Option<usize>,
    /// Run beat in this process (single-process mode) or as a supervised child.
    schedule: Option<PathBuf>,
    ceilings: Ceilings,
    secrets: Option<PathBuf>,
    tenants: Option<PathBuf>,
    /// The release registry followed (a store URL).
    registry: Option<String>,
    trust: crate::registry::TrustPolicy,
    task_events: bool,
    heartbeat: bool,
    http: Option<std::net::SocketAddr>,
    http_token: Option<String>,
    report_dir: Option<PathBuf>,
    otlp: Option<crate::observe::otlp::Endpoint>,
}

impl Settings {
    fn resolve(args: ServeArgs, file: &FileConfig) -> Result<Settings, CliError> {
        let (broker, result_backend) = args.broker.urls(file);
        crate::broker::state_store_for(&broker).map_err(|e| CliError::usage(anyhow!("{e}")))?;
        let plugins = file.plugins(args.plugins.as_deref());
        // No -Q: `celery` and every queue a manifest names, so a component whose manifest
        // routes it to `media_heavy` is served out of the box.
        let queues = args.queues.or_else(|| file.queues.clone()).unwrap_or_else(|| {
            let mut queues = vec![crate::worker::DEFAULT_QUEUE.to_string()];
            queues.extend(crate::registry::manifest_queues(&plugins).into_iter().filter(|q| q != crate::worker::DEFAULT_QUEUE));
            queues
        });
        if queues.is_empty() || queues.iter().any(|q| q.is_empty()) {
            return Err(CliError::usage(anyhow!("-Q: queue names must not be empty")));
        }
        let concurrency = args.concurrency.or(file.concurrency).unwrap_or(32);
        if concurrency == 0 {
            return Err(CliError::usage(anyhow!("--concurrency must be at least 1")));
        }
        let processes = args
            .processes
            .or(file.processes)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        let ceilings = args.limits.resolve(file, processes)?;
        if let Some(path) = &args.tenants {
            // Checked here, so a bad file stops serve at once instead of every worker.
            crate::tenant::Policy::load(path).map_err(CliError::usage)?;
        }
        let registry = match &args.registry {
            Some(r) => Some(super::release::registry_url(r, &broker)?),
            None => None,
        };
        if registry.is_some() && !plugins.exists() {
            // A follower's plugins dir is its cache: a new machine starts with none.
            std::fs::create_dir_all(&plugins).with_context(|| format!("creating the plugins dir {}", plugins.display())).map_err(CliError::Usage)?;
        }
        let trust = args.trust.or_else(|| file.trust.clone());
        if let Some(path) = &trust {
            crate::registry::release::Trust::load(path).map_err(CliError::usage)?;
        }
        if registry.is_some() && trust.is_none() && !args.allow_unsigned {
            return Err(CliError::usage(anyhow!(
                "--registry needs --trust trust.toml (the keys allowed to publish), or --allow-unsigned for development"
            )));
        }
        if args.allow_unsigned && args.worker_index.is_none() {
            tracing::warn!("--allow-unsigned: UNSIGNED COMPONENTS WILL RUN. For development only; never in production.");
        }
        // Only the process that listens reads --http: a supervised worker inherits the
        // environment (TASKHOST_HTTP) but never serves it.
        let http = match (&args.http, args.worker_index) {
            (Some(addr), None) => Some(parse_http_addr(addr)?),
            _ => None,
        };
        if let Some(addr) = http {
            crate::observe::http::check_access(addr, args.http_token.as_deref()).map_err(CliError::usage)?;
        }
        let otlp = args.otlp_endpoint.as_deref().map(crate::observe::otlp::Endpoint::parse).transpose().map_err(CliError::usage)?;
        Ok(Settings {
            otlp,
            task_events: args.events,
            heartbeat: !args.without_heartbeat,
            http,
            http_token: args.http_token,
            report_dir: args.report_dir,
            ceilings,
            secrets: args.secrets,
            tenants: args.tenants,
            registry,
            trust: crate::registry::TrustPolicy { trust, allow_unsigned: args.allow_unsigned },
            plugins,
            queues,
            concurrency,
            processes,
            prefetch_multiplier: args.prefetch_multiplier.or(file.prefetch_multiplier).unwrap_or(DEFAULT_PREFETCH_MULTIPLIER),
            worker_nice: match args.worker_nice.or(file.worker_nice).unwrap_or(DEFAULT_WORKER_NICE) {
                n @ 0..=19 => n,
                n => return Err(CliError::usage(anyhow!("worker_nice = {n}: expected 0 to 19"))),
            },
            visibility_timeout: super::seconds(
                args.visibility_timeout.or(file.visibility_timeout).unwrap_or(DEFAULT_VISIBILITY_TIMEOUT.as_secs_f64()),
                "--visibility-timeout",
            )?,
            shutdown_grace: super::seconds(args.shutdown_grace.or(file.shutdown_grace).unwrap_or(30.0), "--shutdown-grace")?,
            result_expires: super::seconds(
                args.result_expires.or(file.result_expires).unwrap_or(DEFAULT_RESULT_EXPIRES.as_secs_f64()),
                "--result-expires",
            )?,
            track_started: args.track_started.or(file.track_started).unwrap_or(true),
            result_extended: args.result_extended,
            hostname: args.hostname.or_else(|| file.hostname.clone()),
            broker,
            result_backend,
            worker_index: args.worker_index,
            schedule: if args.beat { args.schedule } else { None },
        })
    }
}

/// `127.0.0.1:9808`, `[::1]:9808`, `0.0.0.0:9808`, or `9808` (loopback).
fn parse_http_addr(text: &str) -> Result<std::net::SocketAddr, CliError> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| CliError::usage(anyhow!("--http {text}: expected HOST:PORT (such as 127.0.0.1:9808) or a port")))
}

/// Exit status of a worker process stopped by a `shutdown` control command: its
/// supervisor does not start it again.
pub const CONTROL_SHUTDOWN_EXIT: i32 = 3;

/// A fresh directory for the worker processes' reports to the --http listener: a
/// random name, readable and writable by this user only (no one else can plant or read
/// reports there), removed when dropped.
fn make_report_dir() -> Result<tempfile::TempDir, CliError> {
    tempfile::Builder::new()
        .prefix("taskhost-http-")
        .tempdir()
        .context("creating the directory for worker reports")
        .map_err(CliError::Failed)
}

/// Starts the --http listener on the current `LocalSet`; logs where the dashboard is.
/// It stops when the handle is dropped.
async fn start_http(args: &Settings, addr: std::net::SocketAddr, report_dir: &std::path::Path) -> Result<AbortOnDrop, CliError> {
    let cfg = crate::observe::http::HttpConfig {
        addr,
        token: args.http_token.clone(),
        report_dir: report_dir.to_path_buf(),
        broker_url: args.broker.clone(),
        backend_url: args.result_backend.clone(),
        queues: args.queues.clone(),
    };
    let (token, serving) = crate::observe::http::start(cfg).await.map_err(|e| CliError::Usage(e.into()))?;
    if args.http_token.is_some() {
        tracing::info!("http: metrics on http://{addr}/metrics, dashboard on http://{addr}/ (token required)");
    } else {
        tracing::info!("http: metrics on http://{addr}/metrics, dashboard on http://{addr}/?token={token}");
    }
    Ok(AbortOnDrop(tokio::task::spawn_local(serving)))
}

/// A worker process's result-backend connections: enough for its result writes and
/// chord polls to proceed together, never more than its sandboxes.
fn backend_sizing(args: &Settings) -> crate::backend::Sizing {
    crate::backend::Sizing { pool_size: args.concurrency.clamp(2, 16) as u32, extended: args.result_extended }
}

fn node_name(args: &Settings) -> String {
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

pub fn run(args: ServeArgs, file: &FileConfig) -> Result<(), CliError> {
    let settings = Settings::resolve(args, file)?;
    if let Some(schedule) = &settings.schedule {
        // Fail at start on a bad schedule rather than in a restarting child.
        super::beat::load_schedule(schedule)?;
    }
    if settings.worker_index.is_none() && settings.processes > 1 {
        return supervise(&settings);
    }
    if settings.worker_index.is_none() {
        // One process, no supervisor: it is the worker. Before any thread starts, as
        // threads take their priority from the thread that makes them.
        lower_own_priority(settings.worker_nice).context("lowering the worker's CPU priority").map_err(CliError::Failed)?;
    }
    serve_here(settings)
}

fn banner(args: &Settings, tasks: &[String], node: &str) {
    let mut text = format!(
        "taskhost {} — {node}\n  broker:      {}\n  results:     {}\n  plugins:     {}\n  concurrency: {} sandboxes × {} process(es), prefetch {} each\n  queues:      {}\n  tasks:\n",
        env!("CARGO_PKG_VERSION"),
        redact(&args.broker),
        redact(&args.result_backend),
        crate::registry::describe_dir(&args.plugins),
        args.concurrency,
        args.processes,
        args.concurrency * args.prefetch_multiplier.max(1),
        args.queues.join(", "),
    );
    for task in tasks {
        text.push_str(&format!("    . {task}\n"));
    }
    let program = std::env::args().next().unwrap_or_else(|| "taskhost".into());
    let broker_flag = if args.broker == super::config::DEFAULT_BROKER { String::new() } else { format!(" --broker {}", shell_word(&redact(&args.broker))) };
    text.push_str(&format!(
        "  try, from another terminal in this directory:\n    {program} send tasks.add --args '[2, 3]' --wait{broker_flag}\n"
    ));
    print!("{text}");
}

pub use crate::broker::redact_url as redact;

/// `word` as a shell reads it back: single-quoted when it holds anything a shell would
/// act on (a Sentinel URL's `;` and `?`, a redacted password's `*`).
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:@%+=,-".contains(c);
    if word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A worker process's engine, sized for `concurrency` sandboxes, and its plugins.
/// Components are compiled in child processes held to the compile ceilings.
/// `without_guests` only for `bench drain --without-sandbox` (see `RuntimeConfig`).
pub(crate) fn worker_sandboxes(
    plugins: &std::path::Path,
    concurrency: usize,
    ceilings: &Ceilings,
    secrets: Option<&std::path::Path>,
    meter_cpu: bool,
    trust: crate::registry::TrustPolicy,
    without_guests: bool,
) -> Result<(Arc<Runtime>, Arc<Registry>), CliError> {
    // A few spare slots: a task's instance is torn down just after its slot is freed.
    let runtime = Arc::new(
        Runtime::new(RuntimeConfig {
            max_instances: concurrency as u32 + 4,
            parallel_compilation: false,
            ceilings: ceilings.clone(),
            compiler: std::env::current_exe().ok(),
            secrets: Arc::new(super::secrets::load(secrets)?),
            meter_cpu,
            without_guests,
            ..Default::default()
        })
        .map_err(CliError::usage)?,
    );
    let registry = Registry::open_with(plugins.to_path_buf(), runtime.clone(), None, trust).map_err(CliError::usage)?;
    Ok((runtime, registry))
}

/// Lifts this process's open-file limit to its hard limit: at `-c 1000`, sandboxes waiting
/// on HTTP or sockets hold a descriptor each, past the usual soft limit of 1024.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!("could not raise the open-file limit");
            }
        }
    }
}

fn serve_here(args: Settings) -> Result<(), CliError> {
    raise_open_file_limit();
    let node = node_name(&args);
    let (visibility, grace, expires) = (args.visibility_timeout, args.shutdown_grace, args.result_expires);
    let tenants = match &args.tenants {
        Some(path) => crate::tenant::PolicyHandle::open(path).map_err(CliError::usage)?,
        None => crate::tenant::PolicyHandle::none(),
    };
    let (runtime, registry) =
        worker_sandboxes(&args.plugins, args.concurrency, &args.ceilings, args.secrets.as_deref(), args.tenants.is_some(), args.trust.clone(), false)?;
    let default_tasks = args.ceilings.max_process_memory / crate::runtime::DEFAULT_MEMORY_LIMIT;
    if (args.concurrency as u64) > default_tasks && args.worker_index.unwrap_or(0) == 0 {
        tracing::warn!(
            "max_process_memory ({}) fits {default_tasks} tasks of the default 128MiB at once, fewer than -c {}: the rest wait for memory",
            crate::registry::ByteSize(args.ceilings.max_process_memory),
            args.concurrency
        );
    }
    if registry.all().is_empty() && args.worker_index.unwrap_or(0) == 0 {
        tracing::warn!("serving nothing yet: {}", crate::registry::describe_dir(&args.plugins));
    }
    let rt = current_thread_runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let broker: Arc<dyn broker::Broker> = super::connect_broker(&args.broker).await?.into();
        let backend: Arc<dyn backend::ResultBackend> =
            super::connect_backend_sized(&args.result_backend, (!expires.is_zero()).then_some(expires), backend_sizing(&args))
                .await?
                .into();
        if args.worker_index.is_none() {
            let tasks: Vec<String> = registry.all().iter().map(|tv| tv.key()).collect();
            banner(&args, &tasks, &node);
        }
        let _watch = registry.watch(WATCH_INTERVAL);
        // Keyed by pid too: two workers given the same node name still count as two.
        if args.registry.is_some() {
            // What the registry last said holds until it can be asked again.
            crate::registry::follow::restore_state(&registry);
        }
        let _follow = args.registry.clone().map(|url| {
            tokio::task::spawn_local(crate::registry::follow::follow_url(registry.clone(), url, format!("{node}#{}", std::process::id())))
        });
        // Alone (-p 1, unsupervised) this process serves --http itself; both go when
        // this returns.
        let own_http = match (args.http, args.worker_index) {
            (Some(addr), None) => {
                let dir = make_report_dir()?;
                Some((start_http(&args, addr, dir.path()).await?, dir))
            }
            _ => None,
        };
        let report_dir = args.report_dir.clone().or_else(|| own_http.as_ref().map(|(_, dir)| dir.path().to_path_buf()));
        let cfg = WorkerConfig {
            task_events: args.task_events,
            heartbeat: args.heartbeat,
            report_dir,
            broker_url: redact(&args.broker),
            otlp: args.otlp.clone(),
            node_name: node.clone(),
            queues: args.queues.clone(),
            concurrency: args.concurrency,
            prefetch_multiplier: args.prefetch_multiplier,
            visibility_timeout: visibility,
            shutdown_grace: grace,
            track_started: args.track_started,
            result_extended: args.result_extended,
        };
        let beat = match &args.schedule {
            Some(path) if args.worker_index.is_none() => {
                let entries = super::beat::load_schedule(path)?;
                let beat_broker = broker::connect(&args.broker).await.map_err(CliError::usage)?;
                let holder = super::beat::holder_name();
                Some(tokio::task::spawn_local(async move {
                    crate::beat::run(entries, beat_broker.as_ref(), &holder, &holder, std::future::pending()).await
                }))
            }
            _ => None,
        };
        let stop = shutdown_signal();
        tracing::info!(node = %node, queues = %args.queues.join(","), "worker ready");
        let worker = Worker::with_tenants(cfg, registry.clone(), runtime.clone(), broker, backend, tenants);
        let shutdown = {
            let worker = worker.clone();
            let supervised = args.worker_index.is_some();
            async move {
                tokio::select! {
                    _ = stop => {}
                    _ = orphaned(), if supervised => {
                        tracing::warn!("the supervisor is gone: returning held messages and exiting");
                        worker.hurry();
                    }
                }
            }
        };
        let stats = worker.clone().run(shutdown).await;
        if let Some(beat) = beat {
            beat.abort();
        }
        tracing::info!(
            node = %node,
            processed = stats.processed,
            succeeded = stats.succeeded,
            failed = stats.failed,
            grant_denials = stats.grant_denials,
            "worker stopped"
        );
        if worker.shut_down_by_control() && args.worker_index.is_some() {
            std::process::exit(CONTROL_SHUTDOWN_EXIT);
        }
        Ok(())
    })
}

/// The signal a worker process gets when its supervisor dies (`PR_SET_PDEATHSIG`).
const ORPHAN_SIGNAL: i32 = libc::SIGUSR2;

/// Resolves once this worker's supervisor is gone: the kernel signals it (see
/// [`ORPHAN_SIGNAL`]), and a look at the parent pid every second backs that up.
async fn orphaned() {
    use tokio::signal::unix::{signal, SignalKind};
    let supervisor = std::os::unix::process::parent_id();
    let mut signalled = signal(SignalKind::from_raw(ORPHAN_SIGNAL)).ok();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(()) = async { match signalled.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => return,
            _ = every.tick() => if std::os::unix::process::parent_id() != supervisor { return },
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once (cold shutdown:
/// held messages come back after the visibility timeout). The handlers are installed when
/// this is called, not when it is first polled: a SIGTERM that arrives after a process
/// said it was ready but before it awaited this would otherwise kill it outright.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(term), Ok(int)) = handlers else {
            std::future::pending::<()>().await;
            return;
        };
        stop_on(term, int).await
    }
}

async fn stop_on(mut term: tokio::signal::unix::Signal, mut int: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested: finishing running tasks (signal again to quit now)");
    let first = std::time::Instant::now();
    tokio::task::spawn_local(async move {
        // Process managers and terminals often deliver one stop twice at once: only a
        // signal a moment later means "quit now".
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if first.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        tracing::warn!("second signal: quitting now; held messages return after the visibility timeout");
        std::process::exit(1);
    });
}

/// Fills the compile cache in a short-lived child on all cores, so workers start by mapping
/// compiled code (shared page cache) instead of each compiling the same components into
/// private memory. Best effort: on failure every worker compiles what it needs itself.
fn precompile(exe: &std::path::Path, plugins: &std::path::Path, ceilings: &Ceilings) {
    let status = std::process::Command::new(exe)
        .args(["plugins", "compile", "--plugins"])
        .arg(plugins)
        .args(child_flags(ceilings))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        tracing::debug!("pre-compiling components failed ({status:?}); workers compile them");
    }
}

/// Has the kernel send `signal` to the child when this process dies (even by SIGKILL),
/// so no worker keeps consuming unsupervised; a child whose parent is already gone by
/// the time it starts does not start.
fn die_with_supervisor(cmd: &mut tokio::process::Command, signal: i32) {
    let supervisor = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != supervisor {
                // The supervisor is gone already (no allocation here: this runs after fork).
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// How much lower than `serve`'s own the worker processes' CPU priority is by default.
/// Measured with Redis on the same two cores (100k no-op drains, alternating): +12% with
/// results ignored and +18% with them stored, the cores' idle 13.6% -> 1.7% and 27.6% ->
/// 11.1%, because the broker no longer waits for a core behind task code between requests.
pub const DEFAULT_WORKER_NICE: u8 = 10;

/// Adds `by` to the calling thread's nice value (threads and processes started from it
/// inherit it). Async-signal-safe, so a `pre_exec` hook may call it between fork and exec.
pub(super) fn lower_own_priority(by: u8) -> std::io::Result<()> {
    if by == 0 {
        return Ok(());
    }
    // SAFETY: nice(2) and errno are async-signal-safe; -1 is also a valid new nice value,
    // so errno tells an error apart.
    unsafe {
        *libc::__errno_location() = 0;
        if libc::nice(by as libc::c_int) == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Has the started process run `by` nice levels below this one (see [`lower_own_priority`]).
pub(super) fn start_lowered(cmd: &mut std::process::Command, by: u8) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: lower_own_priority is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(move || lower_own_priority(by));
    }
}

/// "exited with status 2", "was killed by signal 9 (Killed)".
fn describe_exit(status: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => {
                // SAFETY: strsignal returns a pointer to a static or thread-local string.
                let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(sig)) }.to_string_lossy().into_owned();
                format!("was killed by signal {sig} ({name})")
            }
            (None, None) => format!("ended ({s})"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// Starts `processes` workers and restarts any that dies until asked to stop.
fn supervise(args: &Settings) -> Result<(), CliError> {
    let processes = args.processes;
    let exe = std::env::current_exe().context("locating the taskhost binary").map_err(CliError::Usage)?;
    // The banner comes from here, from file names only: the supervisor loads no
    // components and stays small; its workers report invalid files as they load them.
    {
        let entries = std::fs::read_dir(&args.plugins)
            .with_context(|| format!("cannot read plugins directory {}", args.plugins.display()))
            .map_err(CliError::Usage)?;
        let mut tasks: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| crate::registry::parse_file_name(n).ok()))
            .map(|(name, version)| format!("{name}@{version}"))
            .collect();
        tasks.sort();
        banner(args, &tasks, &node_name(args));
    }
    precompile(&exe, &args.plugins, &args.ceilings);
    let rt = current_thread_runtime()?;
    if crate::backend::sql::is_sql_url(&args.result_backend) {
        // Fails here, once and clearly, if the database is unreachable or refuses us, and
        // creates Celery's tables before the workers race to.
        let expires = (!args.result_expires.is_zero()).then_some(args.result_expires);
        let sizing = crate::backend::Sizing { pool_size: 1, extended: args.result_extended };
        rt.block_on(super::connect_backend_sized(&args.result_backend, expires, sizing))?;
    }
    if let Some(state) = std::env::var(crate::broker::state::STATE_ENV).ok().filter(|s| !s.is_empty()) {
        rt.block_on(crate::broker::state::connect_store(&state))
            .with_context(|| format!("connecting to state store {}", redact(&state)))
            .map_err(CliError::Usage)?;
    }
    let report_dir = match args.http {
        Some(_) => Some(make_report_dir()?),
        None => None,
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let stop = shutdown_signal();
        let _http = match (args.http, &report_dir) {
            (Some(addr), Some(dir)) => Some(start_http(args, addr, dir.path()).await?),
            _ => None,
        };
        let spawn = |i: usize| {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("serve")
                .arg("--plugins")
                .arg(&args.plugins)
                .args(["-Q", &args.queues.join(",")])
                .args(["-c", &args.concurrency.to_string()])
                .args(["-p", "1", "--worker-index", &i.to_string()])
                .args(["--prefetch-multiplier", &args.prefetch_multiplier.to_string()])
                .args(["--visibility-timeout", &args.visibility_timeout.as_secs_f64().to_string()])
                .args(["--shutdown-grace", &args.shutdown_grace.as_secs_f64().to_string()])
                .args(["--result-expires", &args.result_expires.as_secs_f64().to_string()])
                .args(["--track-started", &args.track_started.to_string()])
                .args(args.result_extended.then_some("--result-extended"))
                .args(["--broker", &args.broker])
                .args(["--result-backend", &args.result_backend])
                .args(child_flags(&args.ceilings));
            // The file's path only: secret values never go on a command line.
            if let Some(path) = &args.secrets {
                cmd.arg("--secrets").arg(path);
            }
            if let Some(path) = &args.tenants {
                cmd.arg("--tenants").arg(path);
            }
            if let Some(url) = &args.registry {
                cmd.args(["--registry", url]);
            }
            if let Some(path) = &args.trust.trust {
                cmd.arg("--trust").arg(path);
            }
            if args.trust.allow_unsigned {
                cmd.arg("--allow-unsigned");
            }
            if args.task_events {
                cmd.arg("--events");
            }
            if !args.heartbeat {
                cmd.arg("--without-heartbeat");
            }
            if let Some(dir) = &report_dir {
                cmd.arg("--report-dir").arg(dir.path());
            }
            if let Some(endpoint) = &args.otlp {
                cmd.args(["--otlp-endpoint", &endpoint.url()]);
            }
            if let Some(h) = &args.hostname {
                cmd.args(["--hostname", h]);
            }
            cmd.envs(crate::alloc::worker_env());
            // The supervisor listens; its workers only report.
            cmd.env_remove("TASKHOST_HTTP").env_remove("TASKHOST_HTTP_TOKEN");
            die_with_supervisor(&mut cmd, ORPHAN_SIGNAL);
            start_lowered(cmd.as_std_mut(), args.worker_nice);
            // Own process group: a terminal Ctrl-C reaches only the supervisor, which forwards one SIGTERM.
            cmd.process_group(0).kill_on_drop(false).spawn()
        };
        let spawn_beat = |path: &PathBuf| {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("beat").arg("--schedule").arg(path).args(["--broker", &args.broker]);
            die_with_supervisor(&mut cmd, libc::SIGTERM);
            cmd.process_group(0).kill_on_drop(false).spawn()
        };
        let spawn = |i: usize| match (&args.schedule, i == processes) {
            (Some(path), true) => spawn_beat(path),
            _ => spawn(i),
        };
        let total = processes + usize::from(args.schedule.is_some());
        let mut children = Vec::new();
        for i in 0..total {
            children.push(Some(spawn(i).context("starting a worker process").map_err(CliError::Failed)?));
        }
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
                if matches!(&status, Ok(s) if s.code() == Some(CONTROL_SHUTDOWN_EXIT)) {
                    tracing::warn!(worker = i, "worker process stopped by a shutdown command; not restarted");
                    children[i] = None;
                    if children.iter().all(Option::is_none) {
                        return Ok(());
                    }
                    continue;
                }
                tracing::warn!(worker = i, "worker process {}; restarting in 1 s", describe_exit(&status));
                children[i] = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
                children[i] = Some(spawn(i).context("restarting a worker process").map_err(CliError::Failed)?);
            }
        }
    })
}

/// Aborts a spawned task when dropped (the --http listener).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_banners_broker_is_quoted_where_a_shell_would_split_or_glob_it() {
        assert_eq!(super::shell_word("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(super::shell_word("sentinel://h:1;sentinel://h:2?master_name=m"), "'sentinel://h:1;sentinel://h:2?master_name=m'");
        assert_eq!(super::shell_word("redis://u:***@h/0"), "'redis://u:***@h/0'");
        assert_eq!(super::shell_word("it's"), r"'it'\''s'");
    }
}
