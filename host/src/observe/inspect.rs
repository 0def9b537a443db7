//! The caller's side of remote control, as `celery inspect/control` does it: broadcast a
//! command, collect the `{node: reply}` answers on a reply queue until a timeout.

use crate::broker::{Broker, BrokerError};
use crate::protocol::{encode_control, ControlRequest, Envelope, ReplyTo, REPLY_EXCHANGE};
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

/// Broadcasts `method` and returns each node's reply (node name, reply), in the order
/// they came. With `limit`, stops once that many nodes answered.
pub async fn broadcast(
    broker: &dyn Broker,
    method: &str,
    arguments: Map<String, Value>,
    destination: Option<Vec<String>>,
    timeout: Duration,
    limit: Option<usize>,
) -> Result<Vec<(String, Value)>, BrokerError> {
    let oid = uuid::Uuid::new_v4().to_string();
    let ticket = uuid::Uuid::new_v4().to_string();
    broker.declare_reply_queue(&oid).await?;
    let reply_to = ReplyTo { exchange: REPLY_EXCHANGE.into(), routing_key: oid.clone() };
    let request = request(method, arguments, destination, Some((ticket.clone(), reply_to)));
    let expires = crate::protocol::unix_now() + timeout.as_secs_f64();
    broker.broadcast(&encode_control(&request, 1, Some(expires))).await?;
    let deadline = Instant::now() + timeout;
    let mut replies = Vec::new();
    while Instant::now() < deadline && limit.is_none_or(|l| replies.len() < l) {
        let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(250));
        for raw in broker.take_replies(&oid, wait).await? {
            replies.extend(decode_reply(&raw, &ticket));
        }
    }
    let _ = broker.remove_reply_queue(&oid).await;
    Ok(replies)
}

/// A broadcast that wants no answer (`shutdown`, `revoke` without reply).
pub async fn send(broker: &dyn Broker, method: &str, arguments: Map<String, Value>, destination: Option<Vec<String>>) -> Result<(), BrokerError> {
    broker.broadcast(&encode_control(&request(method, arguments, destination, None), 1, None)).await
}

/// A broadcast request; with a ticket and reply queue when answers are wanted.
fn request(method: &str, arguments: Map<String, Value>, destination: Option<Vec<String>>, reply: Option<(String, ReplyTo)>) -> ControlRequest {
    let (ticket, reply_to) = reply.map_or((None, None), |(t, r)| (Some(t), Some(r)));
    ControlRequest { method: method.to_string(), arguments, destination, pattern: None, matcher: None, ticket, reply_to, expires: None, clock: None }
}

/// The `(node, reply)` pairs in one reply message, if it answers `ticket`.
fn decode_reply(raw: &[u8], ticket: &str) -> Vec<(String, Value)> {
    let Ok(envelope) = Envelope::parse(raw) else { return Vec::new() };
    if envelope.headers.get("ticket").and_then(Value::as_str).is_some_and(|t| t != ticket) {
        return Vec::new();
    }
    let Ok(body) = envelope.body_bytes() else { return Vec::new() };
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map.into_iter().collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode_reply;

    #[test]
    fn replies_for_another_ticket_are_ignored() {
        let to = ReplyTo { exchange: REPLY_EXCHANGE.into(), routing_key: "k".into() };
        let raw = encode_reply("w@vm", serde_json::json!({"ok": "pong"}), Some("t1"), &to, 1);
        assert_eq!(decode_reply(&raw, "t1"), vec![("w@vm".to_string(), serde_json::json!({"ok": "pong"}))]);
        assert!(decode_reply(&raw, "t2").is_empty());
    }
}
