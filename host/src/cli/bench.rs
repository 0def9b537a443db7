//! `taskhost bench runtime`: tasks/s and instantiate p50/p99 for one task on one thread
//! per process, side by side with the bare instantiate+call loop as a baseline.

use super::{current_thread_runtime, CliError};
use crate::registry::Registry;
use crate::runtime::{RunControl, Runtime, RuntimeConfig, TaskInput};
use anyhow::{anyhow, Context as _};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Instantiate+call loop of one task: the sandbox ceiling.
    Runtime(RuntimeBench),
    /// Drain rate of pre-queued no-op tasks through the real worker and a broker.
    Drain(DrainBench),
    /// Send→result latency of sequential no-op tasks against a running worker.
    Roundtrip(RoundtripBench),
}

#[derive(Debug, clap::Args)]
pub struct RoundtripBench {
    /// Broker (and result backend) of a running `taskhost serve`.
    #[arg(long, env = "TASKHOST_BROKER")]
    pub broker: String,
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    #[arg(short = 'Q', long, default_value = "celery")]
    pub queue: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DrainBench {
    #[arg(long, env = "TASKHOST_PLUGINS", default_value = "dist/plugins")]
    pub plugins: PathBuf,
    /// Broker URL (default: a fresh SQLite file in a temporary directory).
    #[arg(long)]
    pub broker: Option<String>,
    /// Tasks to queue and drain.
    #[arg(long, default_value_t = 20_000)]
    pub count: u64,
    /// Worker processes draining at once (default: one per core).
    #[arg(long)]
    pub processes: Option<usize>,
    /// Sandboxes per worker process.
    #[arg(short, long, default_value_t = 32)]
    pub concurrency: usize,
    /// Messages held per sandbox slot, as `serve --prefetch-multiplier`.
    #[arg(long, default_value_t = crate::worker::DEFAULT_PREFETCH_MULTIPLIER)]
    pub prefetch_multiplier: usize,
    /// Store results (default: tasks ignore results).
    #[arg(long)]
    pub results: bool,
    /// Serve under this tenants policy (what tenants cost: identity, task-id claims, metering).
    #[arg(long, value_name = "FILE")]
    pub tenants: Option<PathBuf>,
    /// Spread the tasks over this many tenants (header taskhost_tenant t0, t1, …).
    #[arg(long, value_name = "N")]
    pub spread_tenants: Option<usize>,
    /// Send Celery task events (as `serve -E`), to measure what they cost.
    #[arg(short = 'E', long)]
    pub events: bool,
    /// Run no sandbox: each task succeeds at once with `null`, so the drain measures what
    /// the worker itself costs per message (fetch, decode, checks, result, ack).
    #[arg(long)]
    pub without_sandbox: bool,
    /// Largest memory a task may have, which sizes the sandbox pool each process reserves
    /// [default: 4GiB]; a small one lets the drain run under valgrind.
    #[arg(long, value_name = "SIZE")]
    pub max_task_memory: Option<crate::registry::ByteSize>,
    /// How much lower the worker processes' CPU priority is than this command's, as
    /// `serve --worker-nice` (0-19).
    #[arg(long, value_name = "N", default_value_t = super::serve::DEFAULT_WORKER_NICE, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub worker_nice: u8,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Set on the worker processes this command starts.
    #[arg(long, hide = true)]
    pub child: bool,
}

/// One drain process's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainFigures {
    pub processed: u64,
    /// Unix seconds of the first and last task this process finished.
    pub first: f64,
    pub last: f64,
    /// CPU seconds (all its threads) the process spent from its first finished task to its
    /// last, and the tasks it finished in that time: its cost per task without start-up.
    pub cpu_seconds: f64,
    pub cpu_tasks: u64,
}

#[derive(Debug, clap::Args)]
pub struct RuntimeBench {
    #[arg(long, env = "TASKHOST_PLUGINS", default_value = "dist/plugins")]
    pub plugins: PathBuf,
    #[arg(long, default_value = "tasks.noop")]
    pub task: String,
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Seconds each loop is measured for (after a short warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Single-threaded processes running the loop at once (default: one per core).
    #[arg(long)]
    pub processes: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One loop's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoopFigures {
    pub tasks: u64,
    pub tasks_per_sec: f64,
    pub instantiate_p50_us: f64,
    pub instantiate_p99_us: f64,
    pub task_p50_us: f64,
    pub task_p99_us: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuntimeFigures {
    pub task: String,
    pub processes: usize,
    pub bare: LoopFigures,
    pub taskhost: LoopFigures,
}

pub fn run(cmd: BenchCommand, _file: &super::config::FileConfig) -> Result<(), CliError> {
    let args = match cmd {
        BenchCommand::Runtime(args) => args,
        BenchCommand::Drain(args) => return drain::run(args),
        BenchCommand::Roundtrip(args) => return roundtrip(args),
    };
    if !(args.seconds > 0.0) {
        return Err(CliError::usage(anyhow!("--seconds must be positive")));
    }
    let processes = args.processes.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let figures = if processes <= 1 { measure_here(&args)? } else { measure_in_children(&args, processes)? };
    if args.json {
        println!("{}", serde_json::to_string(&figures).map_err(CliError::failed)?);
    } else {
        print_table(&figures, args.seconds);
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn figures(count: u64, wall: Duration, mut inst: Vec<Duration>, mut total: Vec<Duration>) -> LoopFigures {
    inst.sort_unstable();
    total.sort_unstable();
    LoopFigures {
        tasks: count,
        tasks_per_sec: count as f64 / wall.as_secs_f64(),
        instantiate_p50_us: percentile(&inst, 0.50),
        instantiate_p99_us: percentile(&inst, 0.99),
        task_p50_us: percentile(&total, 0.50),
        task_p99_us: percentile(&total, 0.99),
    }
}

fn measure_here(args: &RuntimeBench) -> Result<RuntimeFigures, CliError> {
    let runtime = Arc::new(Runtime::new(RuntimeConfig { max_instances: 8, ..Default::default() }).map_err(CliError::usage)?);
    let registry = Registry::open(&args.plugins, runtime.clone()).map_err(CliError::usage)?;
    let task = registry.resolve(&args.task, None).map_err(CliError::usage)?;
    let limits = task.limits();
    let version = task.version.to_string();
    let input = TaskInput {
        id: "bench".into(),
        name: task.name.clone(),
        queue: "celery".into(),
        args: args.args.clone(),
        kwargs: "{}".into(),
        ..Default::default()
    };
    let measure = super::seconds_flag(Some(args.seconds), "--seconds")?.unwrap_or_default();
    let warmup = Duration::from_millis(300);
    let rt = current_thread_runtime()?;
    let control = Arc::new(RunControl::default());

    let bare = rt.block_on(async {
        let mut check = None;
        for phase in [warmup, measure] {
            let (mut inst, mut total) = (Vec::new(), Vec::new());
            let start = Instant::now();
            while start.elapsed() < phase {
                let t0 = Instant::now();
                let i = runtime.run_bare(&task.component, &input).await?;
                total.push(t0.elapsed());
                inst.push(i);
            }
            check = Some(figures(total.len() as u64, start.elapsed(), inst, total));
        }
        Ok::<_, String>(check.unwrap_or_default())
    });
    let bare = bare.map_err(|e| CliError::failed(anyhow!("bare loop: {e}")))?;

    let full = rt.block_on(async {
        let mut check = None;
        for phase in [warmup, measure] {
            let (mut inst, mut total) = (Vec::new(), Vec::new());
            let start = Instant::now();
            while start.elapsed() < phase {
                let run = runtime.run(&task.component, &version, input.clone(), &limits, control.clone()).await;
                if let Err(e) = run.result {
                    return Err(format!("{e}"));
                }
                total.push(run.elapsed);
                inst.push(run.instantiate.unwrap_or_default());
            }
            check = Some(figures(total.len() as u64, start.elapsed(), inst, total));
        }
        Ok(check.unwrap_or_default())
    });
    let taskhost = full.map_err(|e| CliError::failed(anyhow!("taskhost loop: {e}")))?;
    Ok(RuntimeFigures { task: task.name.clone(), processes: 1, bare, taskhost })
}

fn measure_in_children(args: &RuntimeBench, processes: usize) -> Result<RuntimeFigures, CliError> {
    let exe = std::env::current_exe().context("locating taskhost").map_err(CliError::failed)?;
    let children: Vec<_> = (0..processes)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["bench", "runtime", "--processes", "1", "--json", "--task", &args.task, "--args", &args.args])
                .arg("--plugins")
                .arg(&args.plugins)
                .args(["--seconds", &args.seconds.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .context("starting bench processes")
        .map_err(CliError::failed)?;
    let mut all = Vec::new();
    for child in children {
        let out = child.wait_with_output().map_err(CliError::failed)?;
        if !out.status.success() {
            return Err(CliError::failed(anyhow!("a bench process failed ({})", out.status)));
        }
        let f: RuntimeFigures = serde_json::from_slice(&out.stdout).map_err(CliError::failed)?;
        all.push(f);
    }
    // Throughputs add up; latencies are reported as the worst process's.
    let merge = |pick: fn(&RuntimeFigures) -> &LoopFigures| {
        let mut m = LoopFigures::default();
        for f in &all {
            let l = pick(f);
            m.tasks += l.tasks;
            m.tasks_per_sec += l.tasks_per_sec;
            m.instantiate_p50_us = m.instantiate_p50_us.max(l.instantiate_p50_us);
            m.instantiate_p99_us = m.instantiate_p99_us.max(l.instantiate_p99_us);
            m.task_p50_us = m.task_p50_us.max(l.task_p50_us);
            m.task_p99_us = m.task_p99_us.max(l.task_p99_us);
        }
        m
    };
    Ok(RuntimeFigures { task: args.task.clone(), processes, bare: merge(|f| &f.bare), taskhost: merge(|f| &f.taskhost) })
}

fn print_table(f: &RuntimeFigures, seconds: f64) {
    println!("bench runtime: {} — {} single-threaded process(es), {seconds} s per loop", f.task, f.processes);
    println!("{:<34} {:>10} {:>16} {:>16} {:>12} {:>12}", "loop", "tasks/s", "instantiate p50", "instantiate p99", "task p50", "task p99");
    for (name, l) in [("bare instantiate+call (baseline)", &f.bare), ("taskhost Runtime::run", &f.taskhost)] {
        println!(
            "{:<34} {:>10.0} {:>14.1}µs {:>14.1}µs {:>10.1}µs {:>10.1}µs",
            name, l.tasks_per_sec, l.instantiate_p50_us, l.instantiate_p99_us, l.task_p50_us, l.task_p99_us
        );
    }
    if f.bare.tasks_per_sec > 0.0 {
        println!("taskhost / baseline: {:.0}%", 100.0 * f.taskhost.tasks_per_sec / f.bare.tasks_per_sec);
    }
}

mod drain {
    //! `bench drain`: queue N no-op tasks, then let worker processes drain them.
    use super::*;
    use crate::backend;
    use crate::broker;
    use crate::protocol::{encode_task, OutgoingTask};
    use crate::worker::{Worker, WorkerConfig, DEFAULT_VISIBILITY_TIMEOUT};
    use std::cell::Cell;
    use std::rc::Rc;

    const QUEUE: &str = "bench.drain";
    /// A worker that finished nothing for this long after its last task has drained.
    const IDLE: Duration = Duration::from_millis(500);

    use crate::protocol::unix_now;

    pub fn run(args: DrainBench) -> Result<(), CliError> {
        if args.child {
            return child(&args);
        }
        ceilings(&args)?;
        let tmp = tempfile_dir()?;
        let url = args.broker.clone().unwrap_or_else(|| format!("sqlite://{}", tmp.join("bench.db").display()));
        let processes = args.processes.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let rt = current_thread_runtime()?;
        rt.block_on(async {
            let b = super::super::connect_broker(&url).await?;
            let mut task = OutgoingTask {
                task: "tasks.noop".into(),
                queue: QUEUE.into(),
                ignore_result: !args.results,
                origin: "bench".into(),
                ..Default::default()
            };
            // In batches: queueing is not what is measured, and a round trip per message
            // would add its CPU to the broker's per-task figures.
            let mut batch = Vec::with_capacity(1000);
            for i in 0..args.count {
                task.id = uuid::Uuid::new_v4().to_string();
                if let Some(n) = args.spread_tenants.filter(|n| *n > 0) {
                    task.extra_headers.insert(crate::tenant::TENANT_HEADER.into(), format!("t{}", i as usize % n).into());
                }
                batch.push(encode_task(&task));
                if batch.len() == 1000 || i + 1 == args.count {
                    b.publish_many(QUEUE, 0, &batch).await.map_err(CliError::failed)?;
                    batch.clear();
                }
            }
            Ok::<_, CliError>(())
        })?;
        let exe = std::env::current_exe().map_err(CliError::failed)?;
        let children: Vec<_> = (0..processes)
            .map(|_| {
                let mut cmd = std::process::Command::new(&exe);
                cmd.args(["bench", "drain", "--child", "--broker", &url, "-c", &args.concurrency.to_string()]);
                cmd.args(["--prefetch-multiplier", &args.prefetch_multiplier.to_string()]);
                if let Some(policy) = &args.tenants {
                    cmd.arg("--tenants").arg(policy);
                }
                if args.events {
                    cmd.arg("--events");
                }
                if args.without_sandbox {
                    cmd.arg("--without-sandbox");
                }
                if let Some(memory) = args.max_task_memory {
                    cmd.arg(format!("--max-task-memory={memory}"));
                }
                super::super::serve::start_lowered(&mut cmd, args.worker_nice);
                cmd
                    .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
                    .arg("--plugins")
                    .arg(&args.plugins)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()
            .map_err(CliError::failed)?;
        let mut reports = Vec::new();
        for c in children {
            let out = c.wait_with_output().map_err(CliError::failed)?;
            if !out.status.success() {
                return Err(CliError::failed(anyhow!("a drain process failed ({})", out.status)));
            }
            reports.push(serde_json::from_slice::<DrainFigures>(&out.stdout).map_err(CliError::failed)?);
        }
        let processed: u64 = reports.iter().map(|r| r.processed).sum();
        let first = reports.iter().filter(|r| r.processed > 0).map(|r| r.first).fold(f64::INFINITY, f64::min);
        let last = reports.iter().map(|r| r.last).fold(0.0, f64::max);
        let seconds = (last - first).max(1e-9);
        let rate = processed as f64 / seconds;
        let cpu_tasks: u64 = reports.iter().map(|r| r.cpu_tasks).sum();
        let cpu_us_per_task = reports.iter().map(|r| r.cpu_seconds).sum::<f64>() * 1e6 / cpu_tasks.max(1) as f64;
        let _ = std::fs::remove_dir_all(&tmp);
        if processed != args.count {
            return Err(CliError::failed(anyhow!("drained {processed} of {} tasks", args.count)));
        }
        if args.json {
            let out = serde_json::json!({"broker": url, "count": processed, "processes": processes,
                "concurrency": args.concurrency, "prefetch_multiplier": args.prefetch_multiplier, "results": args.results, "events": args.events,
                "without_sandbox": args.without_sandbox, "worker_nice": args.worker_nice, "seconds": seconds, "tasks_per_sec": rate,
                "worker_cpu_us_per_task": cpu_us_per_task});
            println!("{out}");
        } else {
            println!(
                "bench drain: {processed} no-op tasks ({}{}), {processes} process(es) × {} sandboxes on {}: {seconds:.2} s, {rate:.0} tasks/s, \
                 worker CPU {cpu_us_per_task:.1} µs a task",
                if args.results { "results stored" } else { "results ignored" },
                if args.without_sandbox { ", without a sandbox" } else { "" },
                args.concurrency,
                super::super::serve::redact(&url),
            );
        }
        Ok(())
    }

    /// The default ceilings, but for `--max-task-memory`.
    fn ceilings(args: &DrainBench) -> Result<crate::ceilings::Ceilings, CliError> {
        let mut ceilings = crate::ceilings::Ceilings::default();
        if let Some(memory) = args.max_task_memory {
            if !(1 << 20..=4 << 30).contains(&memory.0) {
                return Err(CliError::usage(anyhow!("--max-task-memory must be between 1MiB and 4GiB, got {memory}")));
            }
            ceilings.max_task_memory = memory.0;
        }
        Ok(ceilings)
    }

    fn tempfile_dir() -> Result<PathBuf, CliError> {
        let dir = std::env::temp_dir().join(format!("taskhost-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).map_err(CliError::failed)?;
        Ok(dir)
    }

    fn child(args: &DrainBench) -> Result<(), CliError> {
        let url = args.broker.clone().ok_or_else(|| CliError::usage(anyhow!("--broker is required")))?;
        let (runtime, registry) = super::super::serve::worker_sandboxes(
            &args.plugins,
            args.concurrency,
            &ceilings(&args)?,
            None,
            args.tenants.is_some(),
            crate::registry::TrustPolicy::default(),
            args.without_sandbox,
        )?;
        let rt = current_thread_runtime()?;
        let local = tokio::task::LocalSet::new();
        let figures = local.block_on(&rt, async {
            let b: Arc<dyn broker::Broker> = super::super::connect_broker(&url).await?.into();
            let r: Arc<dyn backend::ResultBackend> = super::super::connect_backend(&url, None).await?.into();
            let cfg = WorkerConfig {
                node_name: format!("bench-{}@localhost", std::process::id()),
                queues: vec![QUEUE.into()],
                concurrency: args.concurrency,
                prefetch_multiplier: args.prefetch_multiplier.max(1),
                visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
                shutdown_grace: Duration::from_secs(30),
                track_started: false,
                task_events: args.events,
                heartbeat: args.events,
                report_dir: None,
                broker_url: super::super::serve::redact(&url),
                otlp: None,
                result_extended: false,
            };
            let tenants = match &args.tenants {
                Some(path) => crate::tenant::PolicyHandle::open(path).map_err(CliError::usage)?,
                None => crate::tenant::PolicyHandle::none(),
            };
            let worker = Worker::with_tenants(cfg, registry, runtime, b, r, tenants);
            // When the first finished task was seen, and the last.
            let first = Rc::new(Cell::new(Mark::default()));
            let last = Rc::new(Cell::new(Mark::default()));
            let watcher = {
                let (worker, first, last) = (worker.clone(), first.clone(), last.clone());
                async move {
                    let mut seen = 0;
                    let mut idle_since = Instant::now();
                    loop {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let n = worker.stats().processed;
                        if n != seen {
                            let mark = Mark::now(n);
                            if seen == 0 {
                                first.set(mark);
                            }
                            seen = n;
                            last.set(mark);
                            idle_since = Instant::now();
                        } else if idle_since.elapsed() > IDLE && (seen > 0 || idle_since.elapsed() > IDLE * 10) {
                            return;
                        }
                    }
                }
            };
            let stats = worker.run(watcher).await;
            let (first, last) = (first.get(), last.get());
            Ok::<_, CliError>(DrainFigures {
                processed: stats.processed,
                first: first.unix,
                last: last.unix,
                cpu_seconds: last.cpu - first.cpu,
                cpu_tasks: last.tasks - first.tasks,
            })
        })?;
        println!("{}", serde_json::to_string(&figures).map_err(CliError::failed)?);
        Ok(())
    }

    /// A moment of a drain process: the time, the tasks finished so far and its CPU so far.
    #[derive(Clone, Copy, Default)]
    struct Mark {
        unix: f64,
        tasks: u64,
        cpu: f64,
    }

    impl Mark {
        fn now(tasks: u64) -> Mark {
            Mark { unix: unix_now(), tasks, cpu: crate::worker::own_cpu_seconds() }
        }
    }
}

/// Publishes `tasks.noop` and waits for its result, one at a time, as a client would.
fn roundtrip(args: RoundtripBench) -> Result<(), CliError> {
    use crate::protocol::{encode_task, OutgoingTask};
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let broker = super::connect_broker(&args.broker).await?;
        let backend = super::connect_backend(&args.broker, None).await?;
        let mut task = OutgoingTask { task: "tasks.noop".into(), queue: args.queue.clone(), origin: "bench".into(), ..Default::default() };
        let mut times = Vec::with_capacity(args.count);
        for i in 0..args.count + 20 {
            task.id = uuid::Uuid::new_v4().to_string();
            let t0 = Instant::now();
            broker.publish(&task.queue, 0, &encode_task(&task)).await.map_err(CliError::failed)?;
            backend.wait(&task.id, Some(Duration::from_secs(30))).await.map_err(CliError::failed)?;
            if i >= 20 {
                times.push(t0.elapsed());
            }
        }
        times.sort_unstable();
        let (p50, p99) = (percentile(&times, 0.5) / 1000.0, percentile(&times, 0.99) / 1000.0);
        if args.json {
            println!("{}", serde_json::json!({"count": args.count, "p50_ms": p50, "p99_ms": p99}));
        } else {
            println!("bench roundtrip: {} sequential tasks.noop, send → result: p50 {p50:.3} ms, p99 {p99:.3} ms", args.count);
        }
        Ok(())
    })
}
