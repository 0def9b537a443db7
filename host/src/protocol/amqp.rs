//! Celery messages on AMQP 0-9-1: the parts of kombu's envelope that travel as AMQP basic
//! properties, headers table and body, and the envelope a delivery becomes again.

use super::{Envelope, ProtocolError};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Map, Value};

/// A message as AMQP carries it: the body's own bytes, and what kombu puts in the basic
/// properties (headers as JSON; the transport types them as py-amqp does).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AmqpParts {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub headers: Map<String, Value>,
    /// 2 (persistent) for tasks, 1 for events and control replies.
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// A per-message TTL in milliseconds, as a decimal string (Celery derives it from `expires`).
    pub expiration: Option<String>,
}

/// Where a delivery came from, which its envelope records in `delivery_info`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeliveryInfo<'a> {
    pub tag: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub redelivered: bool,
}

fn text(properties: &Map<String, Value>, key: &str) -> Option<String> {
    match properties.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl AmqpParts {
    /// The AMQP parts of an envelope as taskhost builds them (the Redis layout): the body
    /// base64-decoded, the AMQP properties lifted out of `properties`.
    pub fn from_envelope(raw: &[u8]) -> Result<AmqpParts, ProtocolError> {
        let env = Envelope::parse(raw)?;
        let body = match env.properties.get("body_encoding").and_then(Value::as_str) {
            Some("base64") | None => env.body_bytes()?,
            Some("utf-8") | Some("utf8") => env.body.clone().into_bytes(),
            Some(other) => return Err(ProtocolError::BodyEncoding(other.to_string())),
        };
        let p = &env.properties;
        Ok(AmqpParts {
            body,
            content_type: env.content_type.clone(),
            content_encoding: env.content_encoding.clone(),
            headers: env.headers.clone(),
            delivery_mode: p.get("delivery_mode").and_then(Value::as_u64).map(|m| m.clamp(1, 2) as u8),
            priority: p.get("priority").and_then(Value::as_u64).map(|n| n.min(255) as u8),
            correlation_id: text(p, "correlation_id"),
            reply_to: text(p, "reply_to"),
            expiration: text(p, "expiration"),
        })
    }

    /// The envelope a delivery becomes, so the worker reads AMQP and Redis messages alike:
    /// base64 body, the delivery's tag and `delivery_info`, redelivery marked as
    /// [`super::mark_redelivered`] marks it.
    pub fn to_envelope(&self, info: &DeliveryInfo<'_>) -> Vec<u8> {
        let mut properties = Map::new();
        if let Some(id) = &self.correlation_id {
            properties.insert("correlation_id".into(), json!(id));
        }
        if let Some(to) = &self.reply_to {
            properties.insert("reply_to".into(), json!(to));
        }
        if let Some(mode) = self.delivery_mode {
            properties.insert("delivery_mode".into(), json!(mode));
        }
        properties.insert("priority".into(), json!(self.priority.unwrap_or(0)));
        if let Some(ttl) = &self.expiration {
            properties.insert("expiration".into(), json!(ttl));
        }
        properties.insert("body_encoding".into(), json!("base64"));
        properties.insert("delivery_tag".into(), json!(info.tag));
        let mut delivery_info = json!({"exchange": info.exchange, "routing_key": info.routing_key});
        let mut headers = self.headers.clone();
        if info.redelivered {
            delivery_info["redelivered"] = json!(true);
            headers.insert("redelivered".into(), json!(true));
        }
        properties.insert("delivery_info".into(), delivery_info);
        let envelope = json!({
            "body": BASE64.encode(&self.body),
            "content-encoding": self.content_encoding,
            "content-type": self.content_type,
            "headers": headers,
            "properties": properties,
        });
        serde_json::to_vec(&envelope).expect("an envelope of JSON values serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_envelope() -> Vec<u8> {
        let body = BASE64.encode(br#"[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#);
        json!({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"lang": "py", "task": "tasks.add", "id": "t1", "eta": null, "retries": 0, "timelimit": [null, 5.5]},
               "properties": {"correlation_id": "t1", "reply_to": "oid", "delivery_mode": 2, "priority": 7,
                              "body_encoding": "base64", "delivery_tag": "redis-tag",
                              "delivery_info": {"exchange": "", "routing_key": "celery"}}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn an_envelope_travels_as_amqp_parts_and_comes_back_the_same_message() {
        let parts = AmqpParts::from_envelope(&task_envelope()).unwrap();
        assert!(parts.body.starts_with(b"[[2, 3], {}"));
        assert_eq!(parts.headers["timelimit"], json!([null, 5.5]));
        assert_eq!((parts.delivery_mode, parts.priority), (Some(2), Some(7)));
        assert_eq!((parts.correlation_id.as_deref(), parts.reply_to.as_deref()), (Some("t1"), Some("oid")));
        let info = DeliveryInfo { tag: "3.17", exchange: "", routing_key: "celery", redelivered: false };
        let back = Envelope::parse(&parts.to_envelope(&info)).unwrap();
        let original = Envelope::parse(&task_envelope()).unwrap();
        assert_eq!(back.body_bytes().unwrap(), original.body_bytes().unwrap());
        assert_eq!(back.headers, original.headers);
        assert_eq!(back.delivery_tag(), Some("3.17"));
        assert_eq!(back.priority(), 7);
        assert_eq!(back.routing_key(), Some("celery"));
        let decoded = crate::protocol::decode(&parts.to_envelope(&info)).unwrap();
        assert_eq!(decoded.headers.task, "tasks.add");
    }

    #[test]
    fn a_redelivery_is_marked_as_a_restored_redis_message_is() {
        let parts = AmqpParts::from_envelope(&task_envelope()).unwrap();
        let info = DeliveryInfo { tag: "1.1", exchange: "", routing_key: "celery", redelivered: true };
        let env = Envelope::parse(&parts.to_envelope(&info)).unwrap();
        assert_eq!(env.headers["redelivered"], json!(true));
        assert_eq!(env.properties["delivery_info"]["redelivered"], json!(true));
    }

    #[test]
    fn a_body_in_another_encoding_is_refused_not_guessed() {
        let raw = json!({"body": "x", "properties": {"body_encoding": "rot13"}}).to_string();
        assert_eq!(AmqpParts::from_envelope(raw.as_bytes()), Err(ProtocolError::BodyEncoding("rot13".into())));
    }
}
