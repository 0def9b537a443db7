//! `taskhost send`: publish a task as a Celery client would (`send_task`), optionally
//! waiting for its result.

use super::serve::BrokerArgs;
use super::{current_thread_runtime, CliError};
use crate::backend::BackendError;
use crate::protocol::{encode_task, parse_time, OutgoingTask, ResultRecord, State};
use anyhow::{anyhow, Context as _};
use chrono::{TimeDelta, Utc};
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Task name, e.g. `tasks.add`.
    #[arg(required_unless_present = "workflow")]
    pub task: Option<String>,
    /// A workflow instead of one task, as JSON or @FILE: {"chain": [steps]}, {"group": [steps]}
    /// or {"chord": {"header": [steps], "body": step}}; a step is {"task", "args", "kwargs", "options"}.
    #[arg(long, conflicts_with_all = ["task", "count"])]
    pub workflow: Option<String>,
    /// Positional arguments, a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// Queue to publish to.
    #[arg(short = 'Q', long, default_value = "celery")]
    pub queue: String,
    /// Run no earlier than this many seconds from now.
    #[arg(long, conflicts_with = "eta")]
    pub countdown: Option<f64>,
    /// Run no earlier than this ISO-8601 time.
    #[arg(long)]
    pub eta: Option<String>,
    /// Do not run if still queued this many seconds after sending.
    #[arg(long)]
    pub expires: Option<f64>,
    /// 0 (served first) to 9 (served last), as Celery on Redis.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: u8,
    /// Task id (default: a new UUID).
    #[arg(long)]
    pub id: Option<String>,
    /// Tenant the task is for (header taskhost_tenant); a queue bound to a tenant in the
    /// worker's tenants.toml overrides it.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Component version requirement, e.g. "^1.2" (header taskhost_version).
    #[arg(long = "version", value_name = "REQ")]
    pub version_req: Option<semver::VersionReq>,
    /// Hard time limit, seconds (message header, overrides the manifest).
    #[arg(long)]
    pub time_limit: Option<f64>,
    /// Soft time limit, seconds.
    #[arg(long)]
    pub soft_time_limit: Option<f64>,
    /// Ask workers to store no result.
    #[arg(long)]
    pub ignore_result: bool,
    /// Send this many copies (new ids), as fast as possible; prints the rate.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Wait for the result and print it.
    #[arg(long, conflicts_with = "ignore_result")]
    pub wait: bool,
    /// Seconds to wait with --wait (default: forever).
    #[arg(long, requires = "wait")]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

fn json_arg(text: &str, flag: &str, array: bool) -> Result<Value, CliError> {
    let v: Value = serde_json::from_str(text).with_context(|| format!("--{flag} is not valid JSON")).map_err(CliError::Usage)?;
    if array && !v.is_array() || !array && !v.is_object() {
        return Err(CliError::usage(anyhow!("--{flag} must be a JSON {}, got {v}", if array { "array" } else { "object" })));
    }
    Ok(v)
}

fn origin() -> String {
    let host = hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
    format!("gen{}@{host}", std::process::id())
}

pub fn run(args: SendArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (broker_url, backend_url) = args.broker.urls(file);
    if let Some(spec) = &args.workflow {
        return send_workflow(&args, spec, &broker_url, &backend_url);
    }
    let task_name = args.task.clone().unwrap_or_default();
    let Value::Array(positional) = json_arg(&args.args, "args", true)? else { unreachable!() };
    let Value::Object(kwargs) = json_arg(&args.kwargs, "kwargs", false)? else { unreachable!() };
    let now = Utc::now();
    let secs = |v: f64, flag: &str| -> Result<TimeDelta, CliError> {
        if !(v.is_finite() && v >= 0.0) {
            return Err(CliError::usage(anyhow!("{flag} must be a non-negative number of seconds")));
        }
        Ok(Duration::try_from_secs_f64(v).ok().and_then(|d| TimeDelta::from_std(d).ok()).unwrap_or(TimeDelta::MAX))
    };
    let eta = match (&args.countdown, &args.eta) {
        (Some(c), _) => Some(now + secs(*c, "--countdown")?),
        (None, Some(text)) => Some(parse_time(text).map_err(|e| CliError::usage(anyhow!("--eta: {e}")))?.to_utc()),
        (None, None) => None,
    };
    let expires = args.expires.map(|e| secs(e, "--expires").map(|d| now + d)).transpose()?;
    let mut extra_headers = Map::new();
    if let Some(req) = &args.version_req {
        extra_headers.insert("taskhost_version".into(), Value::from(req.to_string()));
    }
    if let Some(tenant) = &args.tenant {
        extra_headers.insert(crate::tenant::TENANT_HEADER.into(), Value::from(tenant.clone()));
    }
    if args.count == 0 {
        return Err(CliError::usage(anyhow!("--count must be at least 1")));
    }
    let mut task = OutgoingTask {
        task: task_name.clone(),
        id: args.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        args: positional,
        kwargs,
        queue: args.queue.clone(),
        priority: args.priority,
        eta,
        expires,
        time_limit: (args.time_limit, args.soft_time_limit),
        ignore_result: args.ignore_result,
        origin: origin(),
        extra_headers,
        ..Default::default()
    };

    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let broker = super::connect_broker(&broker_url).await?;
        if args.count > 1 {
            // Batches of 1,000 per round trip: the producer is not what is being measured.
            let started = Instant::now();
            let mut left = args.count;
            while left > 0 {
                let batch: Vec<Vec<u8>> = (0..left.min(1000))
                    .map(|_| {
                        task.id = uuid::Uuid::new_v4().to_string();
                        encode_task(&task)
                    })
                    .collect();
                left -= batch.len() as u64;
                broker.publish_many(&task.queue, task.priority, &batch).await.map_err(CliError::failed)?;
            }
            let took = started.elapsed();
            eprintln!("sent {} tasks in {:.3}s ({:.0}/s)", args.count, took.as_secs_f64(), args.count as f64 / took.as_secs_f64());
            return Ok(());
        }
        broker.publish(&task.queue, task.priority, &encode_task(&task)).await.map_err(CliError::failed)?;
        if !args.wait {
            println!("{}", task.id);
            return Ok(());
        }
        let backend = super::connect_backend(&backend_url, None).await?;
        let record = wait_with_hint(backend.as_ref(), &task.id, &task.queue, args.timeout).await?;
        print_outcome(&task_name, &record)
    })
}

fn send_workflow(args: &SendArgs, spec: &str, broker_url: &str, backend_url: &str) -> Result<(), CliError> {
    let text = match spec.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}")).map_err(CliError::Usage)?,
        None => spec.to_string(),
    };
    let workflow = crate::canvas::Workflow::parse(&text).map_err(|e| CliError::usage(anyhow!("--workflow: {e}")))?;
    let plan = crate::canvas::plan(workflow, &origin(), &args.queue).map_err(|e| CliError::usage(anyhow!("--workflow: {e}")))?;
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let broker = super::connect_broker(broker_url).await?;
        let backend = super::connect_backend(backend_url, None).await?;
        if let Some((gid, size)) = &plan.chord {
            backend.chord_init(gid, *size).await.map_err(CliError::failed)?;
        }
        for msg in &plan.messages {
            broker.publish(&msg.queue, msg.priority, &encode_task(msg)).await.map_err(CliError::failed)?;
        }
        if let (Some((gid, _)), false) = (&plan.chord, backend.native_join()) {
            // As Celery's producer does for a backend without a native join: a
            // `celery.chord_unlock` a second on, polling the members until all are ready.
            let members: Vec<&crate::protocol::OutgoingTask> = plan.messages.iter().filter(|m| m.group.as_deref() == Some(gid.as_str())).collect();
            if let Some(callback) = members.first().and_then(|m| m.embed.chord.clone()) {
                let unlock = crate::worker::builtins::ChordUnlock {
                    group_id: gid.clone(),
                    members: members.iter().map(|m| m.id.clone()).collect(),
                    callback,
                    interval: crate::worker::builtins::CHORD_UNLOCK_INTERVAL,
                    max_retries: None,
                };
                // Celery routes it as the callback: its queue, else the header's.
                let queue = unlock.callback.options.get("queue").and_then(serde_json::Value::as_str).unwrap_or(&members[0].queue).to_string();
                let msg = unlock.message(1.0, &origin(), &queue, members[0].priority);
                broker.publish(&msg.queue, msg.priority, &encode_task(&msg)).await.map_err(CliError::failed)?;
            }
        }
        if !args.wait {
            for id in &plan.results {
                println!("{id}");
            }
            return Ok(());
        }
        let timeout = super::seconds_flag(args.timeout, "--timeout")?;
        let mut values = Vec::new();
        for id in &plan.results {
            let record = backend.wait(id, timeout).await.map_err(CliError::failed)?;
            if record.status != State::Success {
                return print_outcome("workflow", &record);
            }
            values.push(record.result);
        }
        if plan.is_group {
            println!("{}", Value::Array(values));
        } else {
            println!("{}", values.pop().unwrap_or(Value::Null));
        }
        Ok(())
    })
}

/// How long `--wait` waits before saying that no worker may be taking the task.
const HINT_AFTER: Duration = Duration::from_secs(10);

/// Waits for a task's outcome. If nothing, not even STARTED, shows up for
/// [`HINT_AFTER`], says on stderr which queue it waits in and how to serve that queue:
/// the usual cause is a worker not consuming it. A `--timeout` ends the wait with the
/// same hint.
async fn wait_with_hint(
    backend: &dyn crate::backend::ResultBackend,
    id: &str,
    queue: &str,
    timeout: Option<f64>,
) -> Result<ResultRecord, CliError> {
    let started = std::time::Instant::now();
    let limit = super::seconds_flag(timeout, "--timeout")?;
    let hint = || {
        format!(
            "no worker has started it; it waits in queue {queue:?}. Is a worker consuming that queue? \
             (`taskhost serve -Q {queue}`, or `serve` with no -Q, which serves `celery` and the queues manifests name)"
        )
    };
    let first = limit.map_or(HINT_AFTER, |l| l.min(HINT_AFTER));
    match backend.wait(id, Some(first)).await {
        Ok(record) => return Ok(record),
        Err(BackendError::Timeout { .. }) => {}
        Err(other) => return Err(CliError::failed(other)),
    }
    let untouched = matches!(backend.get(id).await, Ok(None));
    if limit.is_some_and(|l| started.elapsed() >= l) {
        let why = if untouched { hint() } else { "it has not finished".to_string() };
        return Err(CliError::NotReady(anyhow!("task {id}: gave up waiting after {}s: {why}", timeout.unwrap_or(0.0))));
    }
    if untouched {
        eprintln!("still waiting for task {id} after {}s: {}", HINT_AFTER.as_secs(), hint());
    }
    let rest = limit.map(|l| l.saturating_sub(started.elapsed()));
    backend.wait(id, rest).await.map_err(|e| match e {
        BackendError::Timeout { .. } => CliError::NotReady(anyhow!("task {id}: {e}")),
        other => CliError::failed(other),
    })
}

/// "task ID is not ready yet: STARTED" (exit 3).
pub fn not_ready(id: &str, state: State) -> CliError {
    let name = match state {
        State::Custom => "a custom state (set by the task)".to_string(),
        other => serde_json::to_value(other).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
    };
    CliError::NotReady(anyhow!("task {id} is not ready yet: {name}"))
}

/// Prints a ready record: the result on stdout, or the error on stderr with exit 1.
pub fn print_outcome(task: &str, record: &ResultRecord) -> Result<(), CliError> {
    match record.status {
        State::Success => {
            println!("{}", record.result);
            Ok(())
        }
        State::Failure | State::Revoked => {
            let what = record
                .exception()
                .map(|e| format!("{}: {}", e.exc_type, e.message()))
                .unwrap_or_else(|| record.result.to_string());
            let state = if record.status == State::Revoked { "was revoked" } else { "failed" };
            Err(CliError::failed(anyhow!("task {task} [{}] {state}: {what}", record.task_id)))
        }
        other => Err(not_ready(&record.task_id, other)),
    }
}
