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
    let BenchCommand::Runtime(args) = cmd;
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
    let measure = Duration::from_secs_f64(args.seconds);
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
                let run = runtime.run(&task.component, &version, &input, &limits, control.clone()).await;
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
