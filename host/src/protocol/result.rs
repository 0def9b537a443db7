//! Celery's result-backend records (`celery-task-meta-<id>`): states, and exceptions as
//! `{exc_type, exc_message, exc_module}` so that Python's `AsyncResult.get()` re-raises them.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Pending,
    Received,
    Started,
    Success,
    Failure,
    Retry,
    Revoked,
    Rejected,
    /// Custom states published by tasks (`set-progress`) read back as this.
    #[serde(other)]
    Custom,
}

impl State {
    /// Celery's READY_STATES: a client stops waiting on these.
    pub fn is_ready(self) -> bool {
        matches!(self, State::Success | State::Failure | State::Revoked)
    }
}

/// An exception as Celery serializes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    pub exc_type: String,
    pub exc_message: Vec<Value>,
    pub exc_module: String,
}

impl ExceptionInfo {
    pub fn new(module: &str, name: &str, message: impl Into<Value>) -> Self {
        ExceptionInfo { exc_type: name.into(), exc_message: vec![message.into()], exc_module: module.into() }
    }

    /// `ValueError('boom')`-style text, as events and chord errors show it.
    pub fn repr(&self) -> String {
        let args: Vec<String> = self
            .exc_message
            .iter()
            .map(|v| match v {
                Value::String(s) => format!("'{s}'"),
                other => other.to_string(),
            })
            .collect();
        format!("{}({})", self.exc_type, args.join(", "))
    }

    pub fn message(&self) -> String {
        match self.exc_message.as_slice() {
            [Value::String(s)] => s.clone(),
            [single] => single.to_string(),
            [] => String::new(),
            many => Value::Array(many.to_vec()).to_string(),
        }
    }
}

/// One `celery-task-meta-<id>` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub status: State,
    /// The task's return value, an exception dict, or state metadata.
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub traceback: Option<String>,
    #[serde(default)]
    pub children: Vec<Value>,
    #[serde(default)]
    pub date_done: Option<String>,
    pub task_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parent_id: Option<String>,
    /// Extended fields (`result_extended`): name, args, kwargs, worker, retries, queue.
    #[serde(flatten)]
    pub extended: Map<String, Value>,
    /// Where the record is kept: the tenant's key prefix before `celery-task-meta-` (Celery's
    /// `result_backend_transport_options={"global_keyprefix": ...}`). Not part of the record.
    #[serde(skip)]
    pub key_prefix: Option<String>,
    /// The client queue the `rpc://` backend sends the record to (the task message's
    /// `reply_to`). Not part of the record.
    #[serde(skip)]
    pub reply_to: Option<String>,
    /// Follows the STARTED the worker stored for its task (`--track-started`): the key
    /// most likely exists, and a backend may skip trying to create it. A hint only: a key
    /// that is gone is written all the same. Not part of the record.
    #[serde(skip)]
    pub replaces_started: bool,
}

fn now_iso() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

impl ResultRecord {
    fn new(task_id: &str, status: State, result: Value) -> Self {
        ResultRecord {
            status,
            result,
            traceback: None,
            children: Vec::new(),
            date_done: status.is_ready().then(now_iso),
            task_id: task_id.to_string(),
            group_id: None,
            parent_id: None,
            extended: Map::new(),
            key_prefix: None,
            reply_to: None,
            replaces_started: false,
        }
    }

    pub fn started(task_id: &str, pid: u32, hostname: &str) -> Self {
        Self::new(task_id, State::Started, serde_json::json!({"pid": pid, "hostname": hostname}))
    }

    pub fn success(task_id: &str, value: Value) -> Self {
        Self::new(task_id, State::Success, value)
    }

    pub fn failure(task_id: &str, exc: &ExceptionInfo, traceback: Option<String>) -> Self {
        let mut r = Self::new(task_id, State::Failure, serde_json::to_value(exc).expect("exception serializes"));
        r.traceback = traceback;
        r
    }

    pub fn retry(task_id: &str, exc: Option<&ExceptionInfo>, traceback: Option<String>) -> Self {
        let value = exc.map_or(Value::Null, |e| serde_json::to_value(e).expect("exception serializes"));
        let mut r = Self::new(task_id, State::Retry, value);
        r.traceback = traceback;
        r
    }

    /// REVOKED with Celery's reason: "terminated", "revoked" or "expired".
    pub fn revoked(task_id: &str, reason: &str) -> Self {
        Self::new(
            task_id,
            State::Revoked,
            serde_json::to_value(ExceptionInfo::new("celery.exceptions", "TaskRevokedError", reason)).expect("serializes"),
        )
    }

    /// A custom state from the task (`update_state(state, meta)`).
    pub fn custom(task_id: &str, meta: Value) -> Self {
        Self::new(task_id, State::Custom, meta)
    }

    /// The exception, when this record holds one.
    pub fn exception(&self) -> Option<ExceptionInfo> {
        if matches!(self.status, State::Failure | State::Revoked | State::Retry) {
            serde_json::from_value(self.result.clone()).ok()
        } else {
            None
        }
    }

    /// The record as stored. Written straight from the struct, so in Celery's key order
    /// (status, result, traceback, children, date_done, task_id); only a custom state
    /// goes through a `Value` to have its name put in.
    pub fn to_json(&self, custom_state: Option<&str>) -> String {
        match (self.status, custom_state) {
            (State::Custom, Some(state)) => {
                let mut v = serde_json::to_value(self).expect("record serializes");
                v["status"] = Value::from(state);
                v.to_string()
            }
            _ => serde_json::to_string(self).expect("record serializes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_records_parse() {
        let success: ResultRecord = serde_json::from_str(r#"{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "date_done": "2026-11-24T17:02:08.330098+00:00", "task_id": "513c83cc"}"#).unwrap();
        assert_eq!(success.status, State::Success);
        assert_eq!(success.result, 5);
        assert!(success.date_done.is_some());
        let failure: ResultRecord = serde_json::from_str(r#"{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}, "traceback": "Traceback…", "children": [], "date_done": "x", "task_id": "3948b9b1", "parent_id": "p"}"#).unwrap();
        let exc = failure.exception().unwrap();
        assert_eq!(exc.repr(), "ValueError('boom')");
        assert_eq!(failure.parent_id.as_deref(), Some("p"));
        let custom: ResultRecord = serde_json::from_str(r#"{"status": "PROGRESS", "result": {"done": 3}, "task_id": "t"}"#).unwrap();
        assert_eq!(custom.status, State::Custom);
    }

    #[test]
    fn records_serialize_in_celery_layout() {
        let r = ResultRecord::failure("t1", &ExceptionInfo::new("taskhost", "TaskFailed", "boom"), None);
        let v: Value = serde_json::from_str(&r.to_json(None)).unwrap();
        assert_eq!(v["status"], "FAILURE");
        assert_eq!(v["result"], serde_json::json!({"exc_type": "TaskFailed", "exc_message": ["boom"], "exc_module": "taskhost"}));
        assert!(v["date_done"].is_string());
        assert!(v.get("group_id").is_none());
        let text = r.to_json(None);
        let at = |key: &str| text.find(&format!("\"{key}\":")).unwrap();
        let order = ["status", "result", "traceback", "children", "date_done", "task_id"].map(at);
        assert!(order.windows(2).all(|w| w[0] < w[1]), "keys not in Celery's order: {text}");
        let started: Value = serde_json::from_str(&ResultRecord::started("t", 7, "w@h").to_json(None)).unwrap();
        assert_eq!(started["date_done"], Value::Null);
        assert_eq!(started["result"]["hostname"], "w@h");
        let p: Value = serde_json::from_str(&ResultRecord::custom("t", serde_json::json!({"n": 1})).to_json(Some("PROGRESS"))).unwrap();
        assert_eq!(p["status"], "PROGRESS");
    }
}
