//! Celery's remote control (kombu pidbox) messages: broadcast requests such as `revoke`,
//! `ping` and `registered`, and the replies a worker pushes to the caller's reply queue.

use super::message::{Envelope, ProtocolError};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The fanout exchange control requests go to, and the reply exchange.
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub exchange: String,
    pub routing_key: String,
}

/// One broadcast control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRequest {
    pub method: String,
    #[serde(default)]
    pub arguments: Map<String, Value>,
    /// Node names, or none for every node.
    #[serde(default)]
    pub destination: Option<Vec<String>>,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub matcher: Option<String>,
    #[serde(default)]
    pub ticket: Option<String>,
    #[serde(default)]
    pub reply_to: Option<ReplyTo>,
    /// Unix time after which the request is dropped (from the envelope headers).
    #[serde(skip)]
    pub expires: Option<f64>,
    /// The sender's Lamport clock (from the envelope headers).
    #[serde(skip)]
    pub clock: Option<u64>,
}

fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl ControlRequest {
    /// Whether `node` should act on this request.
    pub fn is_for(&self, node: &str) -> bool {
        if let Some(dest) = &self.destination {
            return dest.iter().any(|d| d == node);
        }
        if let Some(pattern) = &self.pattern {
            // Celery's default matcher is a glob; a regex matcher is treated as a glob of
            // the same text, which covers the common literal and `.*` cases.
            let glob = if self.matcher.as_deref() == Some("pcre") { pattern.replace(".*", "*") } else { pattern.clone() };
            return glob_match(&glob, node);
        }
        true
    }

    pub fn is_expired(&self, now_unix: f64) -> bool {
        self.expires.is_some_and(|e| e < now_unix)
    }

    /// Task ids named by `revoke`'s `task_id` argument (one id or a list).
    pub fn task_ids(&self) -> Vec<String> {
        self.id_list("task_id")
    }

    /// The ids an argument names: one string or a list of them (Celery accepts both).
    pub fn id_list(&self, argument: &str) -> Vec<String> {
        match self.arguments.get(argument) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        }
    }
}

/// Decodes a pidbox envelope as published on `/<db>.celery.pidbox`.
pub fn decode_control(raw: &[u8]) -> Result<ControlRequest, ProtocolError> {
    let envelope = Envelope::parse(raw)?;
    let body = envelope.body_bytes()?;
    let mut req: ControlRequest = serde_json::from_slice(&body).map_err(|e| ProtocolError::Body(e.to_string()))?;
    req.expires = envelope.headers.get("expires").and_then(Value::as_f64);
    req.clock = envelope.headers.get("clock").and_then(Value::as_u64);
    Ok(req)
}

fn envelope(body: &Value, headers: Map<String, Value>, exchange: &str, routing_key: &str) -> Vec<u8> {
    envelope_raw(&serde_json::to_vec(body).expect("JSON serializes"), headers, exchange, routing_key)
}

/// kombu's envelope around a JSON body already serialized (base64, non-persistent).
pub(super) fn envelope_raw(body: &[u8], headers: Map<String, Value>, exchange: &str, routing_key: &str) -> Vec<u8> {
    let mut properties = Map::new();
    properties.insert("delivery_mode".into(), Value::from(1));
    properties.insert("delivery_info".into(), serde_json::json!({"exchange": exchange, "routing_key": routing_key}));
    properties.insert("priority".into(), Value::from(0));
    properties.insert("body_encoding".into(), Value::from("base64"));
    properties.insert("delivery_tag".into(), Value::from(uuid::Uuid::new_v4().to_string()));
    let env = Envelope {
        body: BASE64.encode(body),
        content_encoding: Some("utf-8".into()),
        content_type: Some("application/json".into()),
        headers,
        properties,
        extra: Map::new(),
    };
    serde_json::to_vec(&env).expect("envelope serializes")
}

/// A broadcast request as `app.control.broadcast` publishes it.
pub fn encode_control(req: &ControlRequest, clock: u64, expires_unix: Option<f64>) -> Vec<u8> {
    let mut headers = Map::new();
    headers.insert("clock".into(), Value::from(clock));
    if let Some(e) = expires_unix {
        headers.insert("expires".into(), Value::from(e));
    }
    envelope(&serde_json::to_value(req).expect("request serializes"), headers, PIDBOX_EXCHANGE, "")
}

/// A reply `{node: reply}` for the caller's reply queue.
pub fn encode_reply(node: &str, reply: Value, ticket: Option<&str>, reply_to: &ReplyTo, clock: u64) -> Vec<u8> {
    let mut headers = Map::new();
    if let Some(t) = ticket {
        headers.insert("ticket".into(), Value::from(t));
    }
    headers.insert("clock".into(), Value::from(clock));
    let mut body = Map::new();
    body.insert(node.to_string(), reply);
    envelope(&Value::Object(body), headers, &reply_to.exchange, &reply_to.routing_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_captured_ping_and_revoke() {
        let body = r#"{"method": "ping", "arguments": {}, "destination": null, "pattern": null, "matcher": null, "ticket": "ef554c80", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "4f6273ff"}}"#;
        let raw = serde_json::json!({"body": BASE64.encode(body), "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"clock": 1, "expires": 1795539834.342105},
            "properties": {"delivery_mode": 2, "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""}, "priority": 0, "body_encoding": "base64", "delivery_tag": "x"}});
        let req = decode_control(raw.to_string().as_bytes()).unwrap();
        assert_eq!(req.method, "ping");
        assert_eq!(req.reply_to.as_ref().unwrap().routing_key, "4f6273ff");
        assert_eq!(req.expires, Some(1795539834.342105));
        assert!(req.is_expired(1795539835.0));
        assert!(req.is_for("w1@vm"));

        let revoke = ControlRequest {
            method: "revoke".into(),
            arguments: serde_json::json!({"task_id": ["a1", "a2"], "terminate": true, "signal": "SIGTERM"}).as_object().unwrap().clone(),
            destination: Some(vec!["taskhost@box".into()]),
            pattern: None,
            matcher: None,
            ticket: None,
            reply_to: None,
            expires: None,
            clock: None,
        };
        let back = decode_control(&encode_control(&revoke, 3, None)).unwrap();
        assert_eq!(back.task_ids(), ["a1", "a2"]);
        assert!(back.is_for("taskhost@box"));
        assert!(!back.is_for("other@box"));
    }

    #[test]
    fn patterns_select_nodes() {
        let mut req = decode_control(&encode_control(
            &ControlRequest {
                method: "ping".into(),
                arguments: Map::new(),
                destination: None,
                pattern: Some("taskhost-*@*".into()),
                matcher: None,
                ticket: None,
                reply_to: None,
                expires: None,
                clock: None,
            },
            1,
            None,
        ))
        .unwrap();
        assert!(req.is_for("taskhost-0@vm"));
        assert!(!req.is_for("celery@vm"));
        req.pattern = Some("taskhost.*".into());
        req.matcher = Some("pcre".into());
        assert!(req.is_for("taskhost-1@vm"));
    }

    #[test]
    fn replies_are_node_keyed() {
        let raw = encode_reply("w1@vm", serde_json::json!({"ok": "pong"}), Some("t"), &ReplyTo { exchange: REPLY_EXCHANGE.into(), routing_key: "k".into() }, 2);
        let env: Envelope = serde_json::from_slice(&raw).unwrap();
        let body: Value = serde_json::from_slice(&BASE64.decode(env.body).unwrap()).unwrap();
        assert_eq!(body, serde_json::json!({"w1@vm": {"ok": "pong"}}));
        assert_eq!(env.headers["ticket"], "t");
    }
}
