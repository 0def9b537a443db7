//! Traces: a `run/<task>` consumer span per task, continuing the producer's W3C
//! `traceparent`, exported in batches as OTLP/HTTP JSON to `--otlp-endpoint`.
//!
//! Spans here are only ever finished ones with a remote parent, so this is an exporter,
//! not a tracing SDK: no context propagation inside the worker is needed.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::time::Duration;
use tokio::sync::Notify;

/// How often finished spans are sent.
const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Most spans in one request; spans past [`BUFFER_CAP`] are dropped while the collector is down.
const BATCH_MAX: usize = 512;
const BUFFER_CAP: usize = 20_000;
/// A collector that does not answer within this is skipped (spans dropped).
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// OTLP's `SPAN_KIND_CONSUMER`.
const KIND_CONSUMER: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("--otlp-endpoint {0}: expected http://HOST:PORT[/v1/traces] (https is not supported yet; use a local collector)")]
    BadEndpoint(String),
}

/// Where spans go: `http://host:port` (path `/v1/traces` added) or the full traces URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub authority: String,
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, OtlpError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| OtlpError::BadEndpoint(url.into()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || !authority.contains(':') {
            return Err(OtlpError::BadEndpoint(url.into()));
        }
        let path = match path.trim_end_matches('/') {
            "" => "/v1/traces".to_string(),
            p if p.ends_with("/v1/traces") => p.to_string(),
            p => format!("{p}/v1/traces"),
        };
        Ok(Endpoint { authority: authority.to_string(), path })
    }

    /// The full traces URL, as `parse` reads it back.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

/// The parent a producer gave: trace id and span id, lowercase hex.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceParent {
    pub trace_id: String,
    pub span_id: String,
    pub sampled: bool,
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; all-zero ids are invalid.
pub fn parse_traceparent(text: &str) -> Option<TraceParent> {
    let parts: Vec<&str> = text.trim().split('-').collect();
    let [version, trace_id, span_id, flags] = parts.as_slice() else { return None };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(version, 2) || *version == "ff" || !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
        return None;
    }
    if trace_id.bytes().all(|b| b == b'0') || span_id.bytes().all(|b| b == b'0') {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceParent { trace_id: trace_id.to_string(), span_id: span_id.to_string(), sampled: flags & 1 == 1 })
}

/// A finished task span.
pub struct TaskSpan<'a> {
    pub parent: Option<TraceParent>,
    pub task: &'a str,
    pub task_id: &'a str,
    pub queue: &'a str,
    pub state: &'a str,
    pub retries: u32,
    pub hostname: &'a str,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// The exception repr, for a failed task.
    pub error: Option<String>,
}

fn attr(key: &str, value: Value) -> Value {
    let v = match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({"intValue": n.to_string()}),
        Value::Bool(b) => json!({"boolValue": b}),
        Value::String(s) => json!({"stringValue": s}),
        other => json!({"stringValue": other.to_string()}),
    };
    json!({"key": key, "value": v})
}

/// One span as OTLP/JSON (ids in hex, times as decimal strings).
fn span_json(span: &TaskSpan<'_>) -> Value {
    let (trace_id, parent_span_id) = match &span.parent {
        Some(p) => (p.trace_id.clone(), p.span_id.clone()),
        None => (hex::encode(rand::random::<[u8; 16]>()), String::new()),
    };
    // Attributes as opentelemetry-instrumentation-celery sets them on its `run/` span.
    let mut attributes = vec![
        attr("celery.action", Value::from("run")),
        attr("celery.state", Value::from(span.state)),
        attr("messaging.message.id", Value::from(span.task_id)),
        attr("messaging.destination", Value::from(span.queue)),
        attr("celery.delivery_info", Value::from(format!("{{'exchange': '', 'routing_key': '{}'}}", span.queue))),
        attr("celery.hostname", Value::from(span.hostname)),
        attr("celery.task_name", Value::from(span.task)),
    ];
    if span.retries > 0 {
        attributes.push(attr("celery.retries", Value::from(span.retries)));
    }
    let status = match &span.error {
        Some(message) => json!({"code": 2, "message": message}),
        None => json!({"code": 0}),
    };
    json!({
        "traceId": trace_id,
        "spanId": hex::encode(rand::random::<[u8; 8]>()),
        "parentSpanId": parent_span_id,
        "name": format!("run/{}", span.task),
        "kind": KIND_CONSUMER,
        "startTimeUnixNano": span.start_unix_nanos.to_string(),
        "endTimeUnixNano": span.end_unix_nanos.to_string(),
        "attributes": attributes,
        "status": status,
    })
}

pub struct Exporter {
    endpoint: Endpoint,
    service: String,
    pending: RefCell<Vec<Value>>,
    queued: Notify,
}

impl Exporter {
    pub fn new(endpoint: Endpoint, service: &str) -> Exporter {
        Exporter { endpoint, service: service.to_string(), pending: RefCell::default(), queued: Notify::new() }
    }

    /// Queues a finished span (an unsampled parent's is dropped, as the SDK would).
    pub fn finish(&self, span: &TaskSpan<'_>) {
        if span.parent.as_ref().is_some_and(|p| !p.sampled) {
            return;
        }
        let mut pending = self.pending.borrow_mut();
        if pending.len() < BUFFER_CAP {
            pending.push(span_json(span));
        }
        if pending.len() >= BATCH_MAX {
            self.queued.notify_one();
        }
    }

    fn request_body(&self, spans: &[Value]) -> Vec<u8> {
        let body = json!({"resourceSpans": [{
            "resource": {"attributes": [attr("service.name", Value::from(self.service.as_str())),
                                        attr("telemetry.sdk.name", Value::from("taskhost"))]},
            "scopeSpans": [{"scope": {"name": "taskhost", "version": env!("CARGO_PKG_VERSION")}, "spans": spans}],
        }]});
        serde_json::to_vec(&body).expect("JSON serializes")
    }

    async fn post(&self, body: Vec<u8>) -> anyhow::Result<()> {
        let stream = tokio::net::TcpStream::connect(&self.endpoint.authority).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let connection = tokio::task::spawn_local(conn);
        let request = http::Request::post(self.endpoint.path.as_str())
            .header(http::header::HOST, self.endpoint.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let _ = response.into_body().collect().await;
        connection.abort();
        anyhow::ensure!(status.is_success(), "collector answered {status}");
        Ok(())
    }

    /// Sends what is queued: now and then every second, until dropped.
    pub async fn run(&self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EXPORT_INTERVAL) => {}
                _ = self.queued.notified() => {}
            }
            self.flush().await;
        }
    }

    pub async fn flush(&self) {
        loop {
            let batch: Vec<Value> = {
                let mut pending = self.pending.borrow_mut();
                let n = pending.len().min(BATCH_MAX);
                pending.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let posted = tokio::time::timeout(POST_TIMEOUT, self.post(self.request_body(&batch))).await;
            if let Err(e) = posted.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {POST_TIMEOUT:?}"))) {
                tracing::warn!(spans = batch.len(), "exporting spans to {}{} failed; dropped: {e:#}", self.endpoint.authority, self.endpoint.path);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_strictly() {
        let p = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(p.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id, "00f067aa0ba902b7");
        assert!(p.sampled);
        assert!(!parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().sampled);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::parse("http://127.0.0.1:4318").unwrap().path, "/v1/traces");
        assert_eq!(Endpoint::parse("http://c:4318/v1/traces").unwrap().path, "/v1/traces");
        assert_eq!(Endpoint::parse("http://c:4318/otlp/").unwrap().path, "/otlp/v1/traces");
        let e = Endpoint::parse("http://c:4318").unwrap();
        assert_eq!(Endpoint::parse(&e.url()).unwrap(), e);
        assert!(Endpoint::parse("https://c:4318").is_err());
        assert!(Endpoint::parse("http://c").is_err());
    }

    #[test]
    fn a_span_continues_its_parent() {
        let span = TaskSpan {
            parent: parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            task: "tasks.add",
            task_id: "t1",
            queue: "celery",
            state: "SUCCESS",
            retries: 0,
            hostname: "w@vm",
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            error: None,
        };
        let v = span_json(&span);
        assert_eq!(v["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(v["name"], "run/tasks.add");
        assert_eq!(v["kind"], 5);
        assert!(v["attributes"].as_array().unwrap().contains(&attr("messaging.message.id", Value::from("t1"))));
    }
}
