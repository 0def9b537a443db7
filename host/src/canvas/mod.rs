//! Workflow bookkeeping in Celery's format, pure: the next chain step, link and errback
//! messages, chord results and errors, built from the signatures a message embeds.

use crate::protocol::{parse_time, Embed, ExceptionInfo, OutgoingTask, Signature, TaskHeaders};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value};

/// The message, id and links a finished task hands on.
#[derive(Debug, Clone, PartialEq)]
pub struct Lineage<'a> {
    pub headers: &'a TaskHeaders,
    /// Node name, as `origin`.
    pub origin: &'a str,
}

fn seconds(v: &Value) -> Option<TimeDelta> {
    // Checked all the way: a countdown of 1e300 from a producer is "never", not a panic.
    v.as_f64()
        .filter(|s| *s >= 0.0)
        .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
        .and_then(|d| TimeDelta::from_std(d).ok())
}

fn time_option(v: Option<&Value>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match v? {
        Value::String(s) => parse_time(s).ok().map(|t| t.to_utc()),
        other => seconds(other).map(|d| now + d),
    }
}

/// A message for `sig`, as `sig.apply_async()` would publish it, with `lead` prepended to
/// its args unless the signature is immutable.
pub fn message_for(sig: &Signature, lead: Option<Value>, parent: &Lineage<'_>, default_queue: &str) -> OutgoingTask {
    let now = Utc::now();
    let o = &sig.options;
    let mut args = Vec::with_capacity(sig.args.len() + 1);
    if let (Some(v), false) = (lead, sig.immutable) {
        args.push(v);
    }
    args.extend(sig.args.iter().cloned());
    let queue = o
        .get("queue")
        .and_then(|q| q.as_str().map(str::to_string).or_else(|| q.get("name").and_then(Value::as_str).map(str::to_string)))
        .or_else(|| o.get("routing_key").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| default_queue.to_string());
    let eta = time_option(o.get("eta"), now).or_else(|| o.get("countdown").and_then(seconds).map(|d| now + d));
    let mut embed = Embed::default();
    if let Some(Value::Array(links)) = o.get("link") {
        embed.callbacks = Some(links.iter().filter_map(|l| serde_json::from_value(l.clone()).ok()).collect());
    }
    if let Some(Value::Array(links)) = o.get("link_error") {
        embed.errbacks = Some(links.iter().filter_map(|l| serde_json::from_value(l.clone()).ok()).collect());
    }
    let mut extra_headers = Map::new();
    if let Some(Value::Object(h)) = o.get("headers") {
        extra_headers.extend(h.clone());
    }
    // A step runs as its parent's tenant, whatever its signature says; no other header may
    // carry the name anywhere inside it, where the fair fetch's scan for it could be misled.
    if let Some(tenant) = &parent.headers.tenant {
        extra_headers.retain(|k, v| k != crate::tenant::TENANT_HEADER && !v.to_string().contains(crate::tenant::TENANT_HEADER));
        extra_headers.insert(crate::tenant::TENANT_HEADER.into(), Value::from(tenant.clone()));
    }
    OutgoingTask {
        task: sig.task.clone(),
        id: o.get("task_id").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        args,
        kwargs: sig.kwargs.clone(),
        embed,
        queue,
        priority: crate::protocol::priority_from(o.get("priority")),
        eta,
        expires: time_option(o.get("expires"), now),
        retries: 0,
        root_id: parent.headers.root_id.clone().or_else(|| Some(parent.headers.id.clone())),
        parent_id: Some(parent.headers.id.clone()),
        group: o.get("group_id").and_then(Value::as_str).map(str::to_string),
        group_index: o.get("group_index").and_then(Value::as_u64),
        time_limit: (o.get("time_limit").and_then(Value::as_f64), o.get("soft_time_limit").and_then(Value::as_f64)),
        ignore_result: o.get("ignore_result").and_then(Value::as_bool).unwrap_or(false),
        origin: parent.origin.to_string(),
        extra_headers,
    }
}

/// The next chain step after a success: the *last* embedded signature (Celery stores the
/// rest of a chain reversed), carrying the remaining steps (`[]` when none are left).
pub fn next_chain_step(embed: &Embed, result: &Value, parent: &Lineage<'_>, default_queue: &str) -> Option<OutgoingTask> {
    let chain = embed.chain.as_ref()?;
    let (next, rest) = chain.split_last()?;
    let mut msg = message_for(next, Some(result.clone()), parent, default_queue);
    msg.embed.chain = Some(rest.to_vec());
    Some(msg)
}

/// Whether a success publishes anything: a chain step or a link callback
/// ([`next_chain_step`], [`callbacks`]).
pub fn has_followers(embed: &Embed) -> bool {
    embed.chain.as_ref().is_some_and(|c| !c.is_empty()) || embed.callbacks.as_ref().is_some_and(|c| !c.is_empty())
}

/// Link callbacks after a success, each with the result prepended.
pub fn callbacks(embed: &Embed, result: &Value, parent: &Lineage<'_>, default_queue: &str) -> Vec<OutgoingTask> {
    embed.callbacks.iter().flatten().map(|sig| message_for(sig, Some(result.clone()), parent, default_queue)).collect()
}

/// Errbacks after a failure: each a one-member group with the failed task's id first.
pub fn errbacks(embed: &Embed, parent: &Lineage<'_>, default_queue: &str) -> Vec<OutgoingTask> {
    embed
        .errbacks
        .iter()
        .flatten()
        .map(|sig| {
            let mut msg = message_for(sig, Some(Value::from(parent.headers.id.clone())), parent, default_queue);
            msg.group = Some(uuid::Uuid::new_v4().to_string());
            msg.group_index = Some(0);
            msg
        })
        .collect()
}

/// Ids of the chain steps that will never run once a step fails.
pub fn remaining_chain_ids(embed: &Embed) -> Vec<String> {
    embed
        .chain
        .iter()
        .flatten()
        .filter_map(|s| s.options.get("task_id").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// `AsyncResult.as_tuple()` of a child, as listed in a record's `children`.
pub fn child_tuple(id: &str) -> Value {
    serde_json::json!([[id, null], null])
}

/// One member's entry in a chord join, as Celery's Redis backend stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordEntry {
    pub task_id: String,
    pub state: String,
    /// The return value, or the exception dict for a failure.
    pub result: Value,
}

impl ChordEntry {
    /// `[1, "<tid>", "<state>", <result>]`.
    pub fn encode(&self) -> String {
        serde_json::json!([1, self.task_id, self.state, self.result]).to_string()
    }

    pub fn decode(text: &str) -> Option<ChordEntry> {
        let v: Value = serde_json::from_str(text).ok()?;
        let a = v.as_array()?;
        Some(ChordEntry {
            task_id: a.get(1)?.as_str()?.to_string(),
            state: a.get(2)?.as_str()?.to_string(),
            result: a.get(3).cloned().unwrap_or(Value::Null),
        })
    }
}

/// The chord callback's outcome once every member is in: the ordered results, or the
/// ChordError naming the first failed member.
pub fn chord_outcome(entries: &[ChordEntry]) -> Result<Vec<Value>, ExceptionInfo> {
    if let Some(failed) = entries.iter().find(|e| e.state == "FAILURE" || e.state == "REVOKED") {
        let why = serde_json::from_value::<ExceptionInfo>(failed.result.clone())
            .map(|e| e.repr())
            .unwrap_or_else(|_| failed.result.to_string());
        return Err(ExceptionInfo::new(
            "celery.exceptions",
            "ChordError",
            format!("Dependency {} raised {why}", failed.task_id),
        ));
    }
    Ok(entries.iter().map(|e| e.result.clone()).collect())
}

/// A workflow submitted from the CLI (`taskhost send --workflow`), in JSON:
/// `{"chain": [step, …]}`, `{"group": [step, …]}` or `{"chord": {"header": [step, …], "body": step}}`,
/// a step being `{"task": "tasks.add", "args": [2, 2], "kwargs": {}, "options": {…}}`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Workflow {
    Chain(Vec<Signature>),
    Group(Vec<Signature>),
    Chord { header: Vec<Signature>, body: Signature },
}

/// The shape a user should have written, for error messages.
const STEP_SHAPE: &str = r#"{"task": "tasks.add", "args": [1, 2]}"#;

impl Workflow {
    /// Parses a workflow, saying in the user's terms what shape was expected where:
    /// `chain step 2: missing "task"` rather than a type name from this crate.
    pub fn parse(text: &str) -> Result<Workflow, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let kinds = r#"one key, "chain", "group" or "chord""#;
        let Some(object) = value.as_object().filter(|o| o.len() == 1) else {
            return Err(format!("expected an object with {kinds}, got {}", shorten(&value)));
        };
        let (kind, body) = object.iter().next().expect("one key");
        let steps = |what: &str, v: &Value| -> Result<Vec<Signature>, String> {
            let Some(list) = v.as_array() else {
                return Err(format!("{what} must be a list of steps like {STEP_SHAPE}, got {}", shorten(v)));
            };
            list.iter().enumerate().map(|(i, s)| step(&format!("{what} step {}", i + 1), s)).collect()
        };
        match kind.as_str() {
            "chain" => Ok(Workflow::Chain(steps("\"chain\"", body)?)),
            "group" => Ok(Workflow::Group(steps("\"group\"", body)?)),
            "chord" => {
                let shape = format!(r#""chord" must be {{"header": [steps…], "body": step}}, a step being {STEP_SHAPE}"#);
                let Some(parts) = body.as_object() else {
                    return Err(format!("{shape}; got {}", shorten(body)));
                };
                if let Some(extra) = parts.keys().find(|k| *k != "header" && *k != "body") {
                    return Err(format!("{shape}; unexpected key \"{extra}\""));
                }
                let header = parts.get("header").ok_or_else(|| format!("{shape}; \"header\" is missing"))?;
                let callback = parts.get("body").ok_or_else(|| format!("{shape}; \"body\" is missing"))?;
                Ok(Workflow::Chord { header: steps("chord \"header\"", header)?, body: step("chord \"body\"", callback)? })
            }
            other => Err(format!("expected {kinds}, got \"{other}\"")),
        }
    }
}

fn step(what: &str, v: &Value) -> Result<Signature, String> {
    if !v.is_object() {
        return Err(format!("{what} must be an object like {STEP_SHAPE}, got {}", shorten(v)));
    }
    if !v.get("task").is_some_and(Value::is_string) {
        return Err(format!("{what} needs \"task\", a task name such as \"tasks.add\""));
    }
    serde_json::from_value(v.clone()).map_err(|e| format!("{what}: {e} (expected {STEP_SHAPE})"))
}

/// A value as the user wrote it, cut short.
fn shorten(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// What to publish for a workflow, and what to wait on.
#[derive(Debug, Clone)]
pub struct Plan {
    pub messages: Vec<OutgoingTask>,
    /// Result ids whose values are the workflow's result (one, or a group's members).
    pub results: Vec<String>,
    /// A chord's group id and size, to declare before publishing its members.
    pub chord: Option<(String, u64)>,
    /// Whether the result is a list (a group) rather than one value.
    pub is_group: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkflowError {
    #[error("a {0} needs at least one step")]
    Empty(&'static str),
}

fn frozen(mut sig: Signature) -> (Signature, String) {
    let id = sig
        .options
        .get("task_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    sig.options.insert("task_id".into(), Value::from(id.clone()));
    (sig, id)
}

/// Turns a workflow into the messages Celery's client would publish for it.
pub fn plan(workflow: Workflow, origin: &str, default_queue: &str) -> Result<Plan, WorkflowError> {
    let root = TaskHeaders::default();
    let lineage = Lineage { headers: &root, origin };
    let first_message = |sig: &Signature| {
        let mut m = message_for(sig, None, &lineage, default_queue);
        m.root_id = Some(m.id.clone());
        m.parent_id = None;
        m
    };
    // Group members (a chord's header too): one message each, tagged with the group.
    let members = |sigs: &[Signature], gid: &str| -> Vec<OutgoingTask> {
        sigs.iter()
            .enumerate()
            .map(|(i, sig)| {
                let mut m = first_message(sig);
                m.group = Some(gid.to_string());
                m.group_index = Some(i as u64);
                m
            })
            .collect()
    };
    match workflow {
        Workflow::Chain(steps) => {
            let mut steps: Vec<(Signature, String)> = steps.into_iter().map(frozen).collect();
            if steps.is_empty() {
                return Err(WorkflowError::Empty("chain"));
            }
            let last_id = steps.last().map(|(_, id)| id.clone()).unwrap_or_default();
            let (first, _) = steps.remove(0);
            let mut msg = first_message(&first);
            // Celery embeds the rest reversed: the next step is the last element.
            msg.embed.chain = Some(steps.into_iter().rev().map(|(s, _)| s).collect());
            Ok(Plan { messages: vec![msg], results: vec![last_id], chord: None, is_group: false })
        }
        Workflow::Group(group) => {
            if group.is_empty() {
                return Err(WorkflowError::Empty("group"));
            }
            let gid = uuid::Uuid::new_v4().to_string();
            let messages = members(&group, &gid);
            let results = messages.iter().map(|m| m.id.clone()).collect();
            Ok(Plan { messages, results, chord: None, is_group: true })
        }
        Workflow::Chord { header, body } => {
            if header.is_empty() {
                return Err(WorkflowError::Empty("chord header"));
            }
            let gid = uuid::Uuid::new_v4().to_string();
            let (mut body, body_id) = frozen(body);
            body.options.insert("group_id".into(), Value::from(gid.clone()));
            let mut messages = members(&header, &gid);
            for m in &mut messages {
                m.embed.chord = Some(body.clone());
            }
            let size = messages.len() as u64;
            Ok(Plan { messages, results: vec![body_id], chord: Some((gid, size)), is_group: false })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_errors_name_the_shape_expected_where() {
        let err = |text: &str| Workflow::parse(text).unwrap_err();
        assert_eq!(err(r#"{"chord": 1}"#), r#""chord" must be {"header": [steps…], "body": step}, a step being {"task": "tasks.add", "args": [1, 2]}; got 1"#);
        assert_eq!(err(r#"{"chain": {"task": "x"}}"#), r#""chain" must be a list of steps like {"task": "tasks.add", "args": [1, 2]}, got {"task":"x"}"#);
        assert_eq!(err(r#"{"chain": [{"task": "a"}, {"args": [1]}]}"#), r#""chain" step 2 needs "task", a task name such as "tasks.add""#);
        assert_eq!(err(r#"{"group": [{"task": "a", "args": 3}]}"#), r#""group" step 1: invalid type: integer `3`, expected a sequence (expected {"task": "tasks.add", "args": [1, 2]})"#);
        assert_eq!(err(r#"{"chord": {"header": [{"task": "a"}]}}"#), r#""chord" must be {"header": [steps…], "body": step}, a step being {"task": "tasks.add", "args": [1, 2]}; "body" is missing"#);
        assert_eq!(err(r#"{"pipeline": []}"#), r#"expected one key, "chain", "group" or "chord", got "pipeline""#);
        assert_eq!(err("[1]"), r#"expected an object with one key, "chain", "group" or "chord", got [1]"#);
        assert!(err("{").starts_with("not valid JSON"));
        assert!(matches!(Workflow::parse(r#"{"chord": {"header": [{"task": "a"}], "body": {"task": "b"}}}"#), Ok(Workflow::Chord { .. })));
    }

    fn sig(task: &str, args: Value, options: Value) -> Signature {
        serde_json::from_value(serde_json::json!({"task": task, "args": args, "kwargs": {}, "options": options,
            "subtask_type": null, "immutable": false}))
        .unwrap()
    }

    fn headers() -> TaskHeaders {
        TaskHeaders { task: "tasks.add".into(), id: "be74".into(), root_id: Some("be74".into()), ..Default::default() }
    }

    #[test]
    fn chain_pops_the_last_step_and_prepends_the_result() {
        // chain(add.s(2, 2), mul.s(10), add.s(1)) embeds [add.s(1), mul.s(10)].
        let embed = Embed {
            chain: Some(vec![
                sig("tasks.add", serde_json::json!([1]), serde_json::json!({"task_id": "c3"})),
                sig("tasks.mul", serde_json::json!([10]), serde_json::json!({"task_id": "c2", "priority": 3})),
            ]),
            ..Default::default()
        };
        let h = headers();
        let parent = Lineage { headers: &h, origin: "w@h" };
        let next = next_chain_step(&embed, &Value::from(4), &parent, "celery").unwrap();
        assert_eq!(next.task, "tasks.mul");
        assert_eq!(next.id, "c2");
        assert_eq!(next.args, vec![Value::from(4), Value::from(10)]);
        assert_eq!(next.parent_id.as_deref(), Some("be74"));
        assert_eq!(next.root_id.as_deref(), Some("be74"));
        assert_eq!(next.priority, 3);
        assert_eq!(next.embed.chain.as_ref().unwrap().len(), 1);
        assert_eq!(remaining_chain_ids(&embed), ["c3", "c2"]);
        let last = Embed { chain: Some(vec![]), ..Default::default() };
        assert!(next_chain_step(&last, &Value::Null, &parent, "celery").is_none());
    }

    #[test]
    fn a_step_runs_as_its_parents_tenant_and_no_header_of_it_names_another() {
        let s = sig(
            "tasks.add",
            serde_json::json!([1]),
            serde_json::json!({"headers": {"a": {"taskhost_tenant": "victim"}, "taskhost_tenant": "victim", "keep": 1}}),
        );
        let mut h = headers();
        h.tenant = Some("acme".into());
        let parent = Lineage { headers: &h, origin: "w@h" };
        let msg = message_for(&s, None, &parent, "celery");
        assert_eq!(msg.extra_headers.get("taskhost_tenant"), Some(&Value::from("acme")));
        assert_eq!(msg.extra_headers.get("keep"), Some(&Value::from(1)));
        assert!(msg.extra_headers.get("a").is_none(), "{:?}", msg.extra_headers);
        let encoded = String::from_utf8(crate::protocol::encode_task(&msg)).unwrap();
        assert_eq!(encoded.matches("taskhost_tenant").count(), 1, "{encoded}");
    }

    #[test]
    fn immutable_signatures_keep_their_args_and_errbacks_get_the_failed_id() {
        let mut s = sig("tasks.mul", serde_json::json!([2]), serde_json::json!({}));
        let h = headers();
        let parent = Lineage { headers: &h, origin: "w@h" };
        s.immutable = true;
        assert_eq!(message_for(&s, Some(Value::from(9)), &parent, "celery").args, vec![Value::from(2)]);
        s.immutable = false;
        let embed = Embed { errbacks: Some(vec![s]), ..Default::default() };
        let eb = &errbacks(&embed, &parent, "celery")[0];
        assert_eq!(eb.args, vec![Value::from("be74"), Value::from(2)]);
        assert_eq!(eb.group_index, Some(0));
        assert!(eb.group.is_some());
    }

    #[test]
    fn workflows_plan_like_celerys_client() {
        let wf: Workflow = serde_json::from_str(
            r#"{"chain": [{"task": "tasks.add", "args": [2, 2]}, {"task": "tasks.mul", "args": [10]}, {"task": "tasks.add", "args": [1]}]}"#,
        )
        .unwrap();
        let p = plan(wf, "gen1@h", "celery").unwrap();
        assert_eq!(p.messages.len(), 1);
        let chain = p.messages[0].embed.chain.as_ref().unwrap();
        assert_eq!(chain.iter().map(|s| s.task.as_str()).collect::<Vec<_>>(), ["tasks.add", "tasks.mul"]);
        assert_eq!(p.results, [chain[0].options["task_id"].as_str().unwrap()]);
        assert_eq!(p.messages[0].root_id.as_deref(), Some(p.messages[0].id.as_str()));

        let wf: Workflow = serde_json::from_str(
            r#"{"chord": {"header": [{"task": "tasks.add", "args": [1, 1]}, {"task": "tasks.add", "args": [2, 2]}], "body": {"task": "tasks.tsum"}}}"#,
        )
        .unwrap();
        let p = plan(wf, "gen1@h", "celery").unwrap();
        let (gid, size) = p.chord.clone().unwrap();
        assert_eq!(size, 2);
        assert!(p.messages.iter().all(|m| m.group.as_deref() == Some(gid.as_str())));
        assert_eq!(p.messages[1].group_index, Some(1));
        assert_eq!(p.messages[0].embed.chord.as_ref().unwrap().options["group_id"], Value::from(gid));
        assert_eq!(serde_json::from_str::<Workflow>(r#"{"group": []}"#).map(|w| plan(w, "o", "celery").unwrap_err()).unwrap(), WorkflowError::Empty("group"));
        assert!(serde_json::from_str::<Workflow>(r#"{"pipeline": []}"#).is_err());
    }

    #[test]
    fn chord_entries_and_errors_match_celery() {
        let ok = ChordEntry { task_id: "a".into(), state: "SUCCESS".into(), result: Value::from(2) };
        assert_eq!(ok.encode(), r#"[1,"a","SUCCESS",2]"#);
        assert_eq!(ChordEntry::decode(r#"[1, "a", "SUCCESS", 2]"#), Some(ok.clone()));
        assert_eq!(chord_outcome(&[ok.clone()]).unwrap(), vec![Value::from(2)]);
        let bad = ChordEntry {
            task_id: "b".into(),
            state: "FAILURE".into(),
            result: serde_json::json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}),
        };
        let err = chord_outcome(&[ok, bad]).unwrap_err();
        assert_eq!(err.message(), "Dependency b raised ValueError('boom')");
        assert_eq!(err.exc_type, "ChordError");
    }
}
