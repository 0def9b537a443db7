//! `taskhost inspect …` and `taskhost events`: what `celery inspect` and `celery events`
//! do, against taskhost and Celery workers alike (the same pidbox and celeryev bytes).

use super::serve::BrokerArgs;
use super::{current_thread_runtime, CliError};
use crate::protocol::events::decode_event_message;
use anyhow::anyhow;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InspectMethod {
    Ping,
    Active,
    Reserved,
    Scheduled,
    Stats,
    Registered,
    #[value(name = "active_queues", alias = "active-queues")]
    ActiveQueues,
    Revoked,
    #[value(name = "query_task", alias = "query-task")]
    QueryTask,
    Clock,
    Conf,
}

impl InspectMethod {
    fn command(self) -> &'static str {
        match self {
            InspectMethod::Ping => "ping",
            InspectMethod::Active => "active",
            InspectMethod::Reserved => "reserved",
            InspectMethod::Scheduled => "scheduled",
            InspectMethod::Stats => "stats",
            InspectMethod::Registered => "registered",
            InspectMethod::ActiveQueues => "active_queues",
            InspectMethod::Revoked => "revoked",
            InspectMethod::QueryTask => "query_task",
            InspectMethod::Clock => "clock",
            InspectMethod::Conf => "conf",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    pub method: InspectMethod,
    /// Task ids, for query_task.
    pub ids: Vec<String>,
    /// Ask only these nodes (comma-separated node names).
    #[arg(short = 'd', long, value_delimiter = ',')]
    pub destination: Option<Vec<String>>,
    /// Seconds to wait for replies [default: 1, as Celery].
    #[arg(short, long, default_value_t = 1.0)]
    pub timeout: f64,
    /// One JSON object: node name → reply.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

pub fn inspect(args: InspectArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (url, _) = args.broker.urls(file);
    let timeout = super::seconds(args.timeout, "--timeout")?;
    let mut arguments = Map::new();
    match args.method {
        InspectMethod::QueryTask if args.ids.is_empty() => return Err(CliError::usage(anyhow!("query_task needs task ids"))),
        InspectMethod::QueryTask => {
            arguments.insert("ids".into(), Value::from(args.ids.clone()));
        }
        InspectMethod::Registered => {
            arguments.insert("taskinfoitems".into(), Value::Array(Vec::new()));
        }
        InspectMethod::Conf => {
            arguments.insert("with_defaults".into(), Value::Bool(false));
        }
        _ => {}
    }
    let limit = args.destination.as_ref().map(Vec::len);
    let rt = current_thread_runtime()?;
    let replies = rt.block_on(async {
        let broker = super::connect_broker(&url).await?;
        crate::observe::inspect::broadcast(broker.as_ref(), args.method.command(), arguments, args.destination.clone(), timeout, limit)
            .await
            .map_err(CliError::failed)
    })?;
    if replies.is_empty() {
        return Err(CliError::failed(anyhow!("no nodes replied within {:.1} s", timeout.as_secs_f64())));
    }
    if args.json {
        let object: Map<String, Value> = replies.into_iter().collect();
        println!("{}", Value::Object(object));
        return Ok(());
    }
    for (node, reply) in &replies {
        let (status, body) = match reply.get("error") {
            Some(e) => ("ERROR", e.clone()),
            None => ("OK", reply.get("ok").cloned().unwrap_or_else(|| reply.clone())),
        };
        println!("->  {node}: {status}");
        let text = match &body {
            Value::String(s) => s.clone(),
            Value::Array(items) if items.is_empty() => "- empty -".into(),
            Value::Array(items) if items.iter().all(Value::is_string) => {
                items.iter().filter_map(Value::as_str).map(|s| format!("* {s}")).collect::<Vec<_>>().join("\n")
            }
            other => serde_json::to_string_pretty(other).unwrap_or_default(),
        };
        for line in text.lines() {
            println!("        {line}");
        }
    }
    println!();
    println!("{} node{} online.", replies.len(), if replies.len() == 1 { "" } else { "s" });
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// One JSON object per event, as sent.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many seconds (default: follow until interrupted).
    #[arg(long)]
    pub duration: Option<f64>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// An event as `celery events --dump` prints it: node, time, type, then its fields.
fn human_line(event: &Map<String, Value>) -> String {
    let get = |k: &str| event.get(k).cloned().unwrap_or(Value::Null);
    let host = get("hostname").as_str().unwrap_or("?").to_string();
    // As Celery's dump: `heartbeat`, `online`, `task succeeded`.
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("?");
    let kind = kind.strip_prefix("worker-").unwrap_or(kind).replace('-', " ");
    let when = get("timestamp")
        .as_f64()
        .and_then(|t| chrono::DateTime::from_timestamp_micros((t * 1e6) as i64))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
        .unwrap_or_default();
    let skip = ["hostname", "type", "timestamp", "utcoffset", "pid", "clock", "local_received"];
    let fields: Vec<String> = event
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={}", match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }))
        .collect();
    format!("{host} [{when}] {kind}: {}", fields.join(", "))
}

pub fn events(args: EventsArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (url, _) = args.broker.urls(file);
    let stop_after = super::seconds_flag(args.duration, "--duration")?;
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let broker = super::connect_broker(&url).await?;
        let mut stream = broker.event_stream().await.map_err(CliError::failed)?;
        eprintln!("-> taskhost events: following events on {} (Ctrl-C to stop)", super::serve::redact(&url));
        let deadline = async {
            match stop_after {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let raw = tokio::select! {
                raw = stream.recv() => match raw {
                    Some(raw) => raw,
                    None => return Err(CliError::failed(anyhow!("the event stream ended"))),
                },
                _ = &mut deadline => return Ok(()),
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let events = match decode_event_message(&raw) {
                Ok(events) => events,
                Err(e) => {
                    tracing::debug!("undecodable event message: {e}");
                    continue;
                }
            };
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            for event in events {
                let line = if args.json { Value::Object(event).to_string() } else { human_line(&event) };
                // The reader went away (`| head`): done, not an error.
                if writeln!(out, "{line}").is_err() {
                    return Ok(());
                }
            }
            if out.flush().is_err() {
                return Ok(());
            }
        }
    })
}
