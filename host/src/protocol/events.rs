//! Celery's events, as Flower, `celery events` and celery-exporter consume them: task and
//! worker events as JSON objects, sent singly or batched (`task.multi`) in kombu envelopes.

use super::control::envelope_raw;
use super::message::ProtocolError;
use super::Envelope;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The fanout exchange events go to.
pub const EVENT_EXCHANGE: &str = "celeryev";
/// The routing key of a batch of task events (a JSON list).
pub const MULTI_ROUTING_KEY: &str = "task.multi";
/// Longest `result` repr an event carries (Celery's `resultrepr_maxsize`).
pub const RESULT_REPR_MAX: usize = 1024;

/// Fields every event carries besides its type.
#[derive(Debug, Clone, Serialize)]
pub struct Stamp<'a> {
    pub hostname: &'a str,
    /// Hours west of UTC, as Python's `time.timezone / 3600`.
    pub utcoffset: f64,
    pub pid: u32,
    /// Lamport clock.
    pub clock: u64,
    /// Unix seconds.
    pub timestamp: f64,
}

/// A task event's own fields, tagged with its `type`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum TaskEvent<'a> {
    #[serde(rename = "task-received")]
    Received {
        uuid: &'a str,
        name: &'a str,
        /// Python reprs: `"(2, 3)"`, `"{'y': 7}"`.
        args: String,
        kwargs: String,
        root_id: Option<&'a str>,
        parent_id: Option<&'a str>,
        retries: u32,
        eta: Option<String>,
        expires: Option<String>,
    },
    #[serde(rename = "task-started")]
    Started { uuid: &'a str },
    #[serde(rename = "task-succeeded")]
    Succeeded {
        uuid: &'a str,
        result: String,
        /// Seconds.
        runtime: f64,
    },
    #[serde(rename = "task-failed")]
    Failed { uuid: &'a str, exception: String, traceback: String },
    #[serde(rename = "task-retried")]
    Retried { uuid: &'a str, exception: String, traceback: String },
    #[serde(rename = "task-revoked")]
    Revoked { uuid: &'a str, terminated: bool, signum: Option<i32>, expired: bool },
    #[serde(rename = "task-rejected")]
    Rejected { uuid: &'a str, requeue: bool },
}

impl TaskEvent<'_> {
    pub fn type_name(&self) -> &'static str {
        match self {
            TaskEvent::Received { .. } => "task-received",
            TaskEvent::Started { .. } => "task-started",
            TaskEvent::Succeeded { .. } => "task-succeeded",
            TaskEvent::Failed { .. } => "task-failed",
            TaskEvent::Retried { .. } => "task-retried",
            TaskEvent::Revoked { .. } => "task-revoked",
            TaskEvent::Rejected { .. } => "task-rejected",
        }
    }
}

/// `worker-online`, `worker-heartbeat`, `worker-offline`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Seconds between heartbeats.
    pub freq: f64,
    pub active: usize,
    pub processed: u64,
    pub loadavg: [f64; 3],
    pub sw_ident: &'a str,
    pub sw_ver: &'a str,
    pub sw_sys: &'a str,
}

#[derive(Serialize)]
struct Stamped<'a, E: Serialize> {
    #[serde(flatten)]
    event: &'a E,
    #[serde(flatten)]
    stamp: &'a Stamp<'a>,
}

/// One event as JSON text, its type first.
pub fn event_json<E: Serialize>(event: &E, stamp: &Stamp<'_>) -> String {
    serde_json::to_string(&Stamped { event, stamp }).expect("events serialize")
}

/// The routing key of a single event: its type with `-` → `.` (`task.succeeded`).
pub fn routing_key(event_type: &str) -> String {
    event_type.replace('-', ".")
}

/// A kombu message for the `celeryev` exchange holding one event (JSON object text) or a
/// batch (JSON list text, routing key [`MULTI_ROUTING_KEY`]).
pub fn encode_event_message(hostname: &str, routing_key: &str, body_json: &[u8]) -> Vec<u8> {
    let mut headers = Map::new();
    headers.insert("hostname".into(), Value::from(hostname));
    envelope_raw(body_json, headers, EVENT_EXCHANGE, routing_key)
}

/// A batch's body: the events' JSON texts as one JSON list.
pub fn batch_json<S: AsRef<str>>(events: &[S]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + events.iter().map(|e| e.as_ref().len() + 1).sum::<usize>());
    out.push(b'[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e.as_ref().as_bytes());
    }
    out.push(b']');
    out
}

/// The events in a message from the `celeryev` exchange (a single event or a list), as
/// JSON objects; whatever is not an object is dropped.
pub fn decode_event_message(raw: &[u8]) -> Result<Vec<Map<String, Value>>, ProtocolError> {
    let envelope = Envelope::parse(raw)?;
    let body = envelope.body_bytes()?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| ProtocolError::Body(e.to_string()))?;
    Ok(match value {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .collect(),
        Value::Object(m) => vec![m],
        _ => Vec::new(),
    })
}

/// A result's repr as events carry it: at most [`RESULT_REPR_MAX`] characters.
pub fn result_repr(value: &Value) -> String {
    truncated(super::message::python_repr(value), RESULT_REPR_MAX)
}

/// `text` cut to `max` characters, `...` marking a cut (Celery's `saferepr` limit).
pub fn truncated(text: String, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Hours west of UTC for this host now (Python's `time.timezone / 3600`, DST included).
pub fn local_utcoffset() -> f64 {
    let offset = chrono::Local::now().offset().local_minus_utc();
    // `+ 0.0` turns UTC's -0.0 into the 0.0 Python sends.
    -(offset as f64) / 3600.0 + 0.0
}

/// A decoded event of any kind, for readers (`taskhost events`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AnyEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub timestamp: f64,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp<'static> {
        Stamp { hostname: "taskhost@box", utcoffset: 0.0, pid: 7, clock: 3, timestamp: 1795539730.5 }
    }

    #[test]
    fn a_task_event_has_celerys_fields() {
        let ev = TaskEvent::Succeeded { uuid: "u1", result: result_repr(&serde_json::json!("ok")), runtime: 0.25 };
        let v: Value = serde_json::from_str(&event_json(&ev, &stamp())).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "task-succeeded", "uuid": "u1", "result": "'ok'", "runtime": 0.25,
                "hostname": "taskhost@box", "utcoffset": 0.0, "pid": 7, "clock": 3, "timestamp": 1795539730.5})
        );
        assert_eq!(routing_key(ev.type_name()), "task.succeeded");
    }

    #[test]
    fn a_batch_round_trips_through_the_envelope() {
        let a = event_json(&TaskEvent::Started { uuid: "a" }, &stamp());
        let b = event_json(&TaskEvent::Revoked { uuid: "b", terminated: true, signum: Some(15), expired: false }, &stamp());
        let raw = encode_event_message("taskhost@box", MULTI_ROUTING_KEY, &batch_json(&[a, b]));
        let env = Envelope::parse(&raw).unwrap();
        assert_eq!(env.headers["hostname"], "taskhost@box");
        assert_eq!(env.properties["delivery_info"]["exchange"], EVENT_EXCHANGE);
        assert_eq!(env.properties["delivery_info"]["routing_key"], MULTI_ROUTING_KEY);
        let events = decode_event_message(&raw).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1]["signum"], 15);
        assert_eq!(events[0]["type"], "task-started");
    }

    #[test]
    fn long_results_are_cut_as_celery_cuts_them() {
        let long = "x".repeat(5000);
        let r = result_repr(&Value::from(long));
        assert_eq!(r.chars().count(), RESULT_REPR_MAX + 3);
        assert!(r.starts_with("'xxx") && r.ends_with("..."));
    }
}
