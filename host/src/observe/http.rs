//! The `serve --http` listener: `/metrics` for every worker process of the serve,
//! `/healthz`, `/readyz`, and the dashboard with its JSON API and token-guarded actions.

use super::metrics::{render, ProcessView};
use super::report::{read_reports, WorkerReport};
use crate::backend::ResultBackend;
use crate::broker::Broker;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

const DASHBOARD: &str = include_str!("dashboard.html");
/// Seconds of throughput the dashboard charts.
const THROUGHPUT_SECONDS: usize = 300;
/// Largest request body read (rate-limit form).
const MAX_BODY: usize = 64 * 1024;
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Dead letters the dashboard lists (the newest).
const DEAD_LETTERS_LISTED: usize = 100;

pub struct HttpConfig {
    pub addr: SocketAddr,
    /// The operator's token; one is made up when none is given.
    pub token: Option<String>,
    /// Where the worker processes write their reports.
    pub report_dir: PathBuf,
    pub broker_url: String,
    pub backend_url: String,
    /// The queues the workers were started on (more may be added by control commands).
    pub queues: Vec<String>,
}

/// Why the listener will not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("--http {0} is reachable from other machines: it needs --http-token (or TASKHOST_HTTP_TOKEN)")]
    TokenRequired(SocketAddr),
    #[error("--http-token must be at least 16 characters")]
    WeakToken,
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

struct State {
    token: String,
    /// Reads need the token too (the listener is reachable beyond this machine).
    guard_reads: bool,
    report_dir: PathBuf,
    broker_url: String,
    backend_url: String,
    /// Connected on first use and again after a failure: the listener starts (and
    /// `/readyz` says what is down) while the broker is unreachable.
    broker: RefCell<Option<Rc<dyn Broker>>>,
    backend: RefCell<Option<Rc<dyn ResultBackend>>>,
    queues: Vec<String>,
    throughput: RefCell<Throughput>,
}

impl State {
    async fn broker(&self) -> Result<Rc<dyn Broker>, String> {
        if let Some(b) = self.broker.borrow().clone() {
            return Ok(b);
        }
        let b: Rc<dyn Broker> = crate::broker::connect(&self.broker_url).await.map_err(|e| e.to_string())?.into();
        *self.broker.borrow_mut() = Some(b.clone());
        Ok(b)
    }

    async fn backend(&self) -> Result<Rc<dyn ResultBackend>, String> {
        if let Some(b) = self.backend.borrow().clone() {
            return Ok(b);
        }
        let b: Rc<dyn ResultBackend> = crate::backend::connect(&self.backend_url, None).await.map_err(|e| e.to_string())?.into();
        *self.backend.borrow_mut() = Some(b.clone());
        Ok(b)
    }
}

/// Whether a Host header names this machine: with reads open on loopback, a page on
/// another origin must not read them through DNS rebinding.
fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else { return true };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host }),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[derive(Default)]
struct Throughput {
    /// Per process (pid): its last (succeeded, failed) totals.
    last: HashMap<u32, (u64, u64)>,
    seconds: VecDeque<(i64, u64, u64)>,
}

impl Throughput {
    fn sample(&mut self, reports: &[WorkerReport], now: i64) {
        let (mut succeeded, mut failed) = (0, 0);
        for r in reports {
            let (s0, f0) = self.last.get(&r.pid).copied().unwrap_or((r.succeeded, r.failed));
            succeeded += r.succeeded.saturating_sub(s0);
            failed += r.failed.saturating_sub(f0);
            self.last.insert(r.pid, (r.succeeded, r.failed));
        }
        self.seconds.push_back((now, succeeded, failed));
        while self.seconds.len() > THROUGHPUT_SECONDS {
            self.seconds.pop_front();
        }
    }
}


/// Whether a request may act: its bearer token (or `?token=`) is the listener's.
fn authorized(req: &Request<hyper::body::Incoming>, token: &str) -> bool {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let query = req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| kv.strip_prefix("token=")).map(percent_decode)
    });
    [bearer, query].into_iter().flatten().any(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A query value or path segment decoded (`+` is a space, as form encoding writes it).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", serde_json::to_vec(value).expect("JSON serializes"))
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = json_response(StatusCode::UNAUTHORIZED, &json!({"error": "token required"}));
    r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    r
}

/// Whether the listener may start: beyond loopback only with a token, and a token long
/// enough not to be guessed.
pub fn check_access(addr: SocketAddr, token: Option<&str>) -> Result<(), HttpError> {
    match token {
        Some(t) if t.len() < 16 => Err(HttpError::WeakToken),
        None if !addr.ip().is_loopback() => Err(HttpError::TokenRequired(addr)),
        _ => Ok(()),
    }
}

/// Starts listening; the returned future serves until dropped. The token in use (given
/// or made up) is returned so the caller can print the dashboard's address.
pub async fn start(cfg: HttpConfig) -> Result<(String, impl std::future::Future<Output = ()>), HttpError> {
    check_access(cfg.addr, cfg.token.as_deref())?;
    let loopback = cfg.addr.ip().is_loopback();
    let token = cfg.token.clone().unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
    let listener = tokio::net::TcpListener::bind(cfg.addr).await.map_err(|e| HttpError::Bind(cfg.addr, e))?;
    let state = Rc::new(State {
        token: token.clone(),
        guard_reads: !loopback,
        report_dir: cfg.report_dir,
        broker_url: cfg.broker_url,
        backend_url: cfg.backend_url,
        broker: RefCell::default(),
        backend: RefCell::default(),
        queues: cfg.queues,
        throughput: RefCell::default(),
    });
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let serving = async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            let Ok(permit) = connections.clone().acquire_owned().await else { return };
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!("http accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = every.tick() => {
                    let reports = read_reports(&state.report_dir, crate::protocol::unix_now());
                    state.throughput.borrow_mut().sample(&reports, chrono::Utc::now().timestamp());
                    continue;
                }
            };
            let state = state.clone();
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(&state, req).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                if let Err(e) = served.await {
                    tracing::debug!("http connection ended: {e}");
                }
                drop(permit);
            });
        }
    };
    Ok((token, serving))
}

async fn route(state: &State, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/healthz" {
        return respond(StatusCode::OK, "text/plain", "ok\n");
    }
    let ok = authorized(&req, &state.token);
    let is_action = method == Method::POST;
    if (is_action || state.guard_reads) && !ok {
        return unauthorized();
    }
    if !state.guard_reads && !ok && !loopback_host(req.headers().get(header::HOST).and_then(|h| h.to_str().ok())) {
        return json_response(StatusCode::FORBIDDEN, &json!({"error": "this listener answers only to localhost names"}));
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::GET, [""]) => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        (Method::GET, ["metrics"]) => metrics(state).await,
        (Method::GET, ["readyz"]) => readyz(state).await,
        (Method::GET, ["api", "overview"]) => json_response(StatusCode::OK, &overview(state).await),
        (Method::POST, ["api", "dead-letters", id, "replay"]) => replay(state, &percent_decode(id)).await,
        (Method::POST, ["api", "tasks", id, "revoke"]) => {
            let terminate = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "terminate=true" || kv == "terminate=1"));
            revoke(state, &percent_decode(id), terminate).await
        }
        (Method::POST, ["api", "rate-limit"]) => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return json_response(StatusCode::PAYLOAD_TOO_LARGE, &json!({"error": "body too large"})),
            };
            rate_limit(state, &body).await
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

/// Every queue worth a depth: those served at start, those workers consume now.
fn known_queues(state: &State, reports: &[WorkerReport]) -> Vec<String> {
    let mut queues = state.queues.clone();
    for r in reports.iter().filter(|r| r.is_fresh(crate::protocol::unix_now())) {
        for q in &r.queues {
            if !queues.contains(q) {
                queues.push(q.clone());
            }
        }
    }
    queues
}

async fn queue_depths(state: &State, queues: &[String]) -> Vec<(String, u64)> {
    let lengths = match state.broker().await {
        Ok(b) => b.queue_lengths(queues).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match lengths {
        Ok(lengths) => queues.iter().cloned().zip(lengths).collect(),
        Err(e) => {
            *state.broker.borrow_mut() = None;
            tracing::warn!("reading queue lengths failed: {e}");
            Vec::new()
        }
    }
}

async fn metrics(state: &State) -> Response<Full<Bytes>> {
    let now = crate::protocol::unix_now();
    let reports = read_reports(&state.report_dir, now);
    let views: Vec<ProcessView<'_>> = reports.iter().map(|r| ProcessView { metrics: &r.metrics, up: r.is_fresh(now) }).collect();
    let depths = queue_depths(state, &known_queues(state, &reports)).await;
    respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", render(&views, &depths))
}

async fn readyz(state: &State) -> Response<Full<Bytes>> {
    let mut failing = Vec::new();
    let broker = match state.broker().await {
        Ok(b) => b.queue_lengths(&state.queues).await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = broker {
        *state.broker.borrow_mut() = None;
        failing.push(format!("broker: {e}"));
    }
    let backend = match state.backend().await {
        Ok(b) => b.get("taskhost-readyz-probe").await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = backend {
        *state.backend.borrow_mut() = None;
        failing.push(format!("result backend: {e}"));
    }
    let now = crate::protocol::unix_now();
    let reports = read_reports(&state.report_dir, now);
    let live: Vec<&WorkerReport> = reports.iter().filter(|r| r.is_fresh(now)).collect();
    if live.is_empty() {
        failing.push("no worker process is reporting yet".into());
    } else if live.iter().any(|r| r.metrics.plugins.is_empty()) {
        failing.push("a worker process has no components loaded".into());
    }
    if failing.is_empty() {
        json_response(StatusCode::OK, &json!({"ready": true, "workers": live.len()}))
    } else {
        json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"ready": false, "failing": failing}))
    }
}

async fn overview(state: &State) -> Value {
    let now = crate::protocol::unix_now();
    let reports = read_reports(&state.report_dir, now);
    let workers: Vec<Value> = reports
        .iter()
        .map(|r| {
            json!({"hostname": r.node, "pid": r.pid, "alive": r.is_fresh(now), "active": r.metrics.active,
                   "processed": r.processed, "concurrency": r.concurrency, "queues": r.queues,
                   "events": r.task_events, "uptime_s": (now - r.started_at).max(0.0)})
        })
        .collect();
    let queues: Vec<Value> =
        queue_depths(state, &known_queues(state, &reports)).await.into_iter().map(|(name, depth)| json!({"name": name, "depth": depth})).collect();
    let throughput: Vec<Value> = state
        .throughput
        .borrow()
        .seconds
        .iter()
        .map(|(t, s, f)| json!({"t": t, "succeeded": s, "failed": f}))
        .collect();
    let mut tasks: Vec<&super::report::RecentTask> = reports.iter().flat_map(|r| r.recent.iter()).collect();
    tasks.sort_by(|a, b| b.received.total_cmp(&a.received));
    tasks.truncate(200);
    let mut plugins: std::collections::BTreeMap<(String, String, String), usize> = Default::default();
    for r in reports.iter().filter(|r| r.is_fresh(now)) {
        for p in &r.metrics.plugins {
            *plugins.entry((p.name.clone(), p.version.clone(), p.digest.clone())).or_default() += 1;
        }
    }
    let plugins: Vec<Value> = plugins
        .into_iter()
        .map(|((name, version, digest), workers)| json!({"name": name, "version": version, "digest": digest, "workers": workers}))
        .collect();
    let letters = match state.broker().await {
        Ok(b) => b.newest_dead_letters(DEAD_LETTERS_LISTED).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let (dead_letters, dead_letters_total): (Vec<Value>, usize) = match letters {
        Ok((letters, total)) => (
            letters
                .iter()
                .rev()
                .map(|l| json!({"letter_id": l.letter_id, "task": l.task, "id": l.id, "queue": l.queue, "reason": l.reason, "time": l.time}))
                .collect(),
            total,
        ),
        Err(e) => {
            tracing::warn!("reading dead letters failed: {e}");
            (Vec::new(), 0)
        }
    };
    json!({"generated_at": now, "workers": workers, "queues": queues, "throughput": throughput, "tasks": tasks,
           "plugins": plugins, "dead_letters": dead_letters, "dead_letters_total": dead_letters_total})
}

async fn replay(state: &State, letter_id: &str) -> Response<Full<Bytes>> {
    let broker = match state.broker().await {
        Ok(b) => b,
        Err(e) => return json_response(StatusCode::BAD_GATEWAY, &json!({"error": e})),
    };
    let letters = match broker.dead_letters().await {
        Ok(l) => l,
        Err(e) => return json_response(StatusCode::BAD_GATEWAY, &json!({"error": e.to_string()})),
    };
    let Some(letter) = letters.iter().find(|l| l.letter_id == letter_id) else {
        return json_response(StatusCode::NOT_FOUND, &json!({"error": format!("no dead letter {letter_id}")}));
    };
    match crate::broker::replay(broker.as_ref(), letter).await {
        Ok(()) => {
            tracing::info!(letter = letter_id, queue = %letter.queue, "dead letter replayed from the dashboard");
            json_response(StatusCode::OK, &json!({"ok": format!("replayed {letter_id} onto {}", letter.queue)}))
        }
        Err(e) => json_response(StatusCode::BAD_GATEWAY, &json!({"error": e.to_string()})),
    }
}

async fn revoke(state: &State, task_id: &str, terminate: bool) -> Response<Full<Bytes>> {
    let ids = [task_id.to_string()];
    let lifetime = crate::worker::REVOKE_LIFETIME;
    let (broker, backend) = match (state.broker().await, state.backend().await) {
        (Ok(b), Ok(r)) => (b, r),
        (Err(e), _) | (_, Err(e)) => return json_response(StatusCode::BAD_GATEWAY, &json!({"error": e})),
    };
    match crate::worker::revoke_everywhere(broker.as_ref(), backend.as_ref(), &ids, terminate, "SIGTERM", lifetime).await {
        Ok(()) => {
            tracing::info!(id = task_id, terminate, "revoked from the dashboard");
            json_response(StatusCode::OK, &json!({"ok": format!("revoked {task_id}")}))
        }
        Err(e) => json_response(StatusCode::BAD_GATEWAY, &json!({"error": format!("{e:#}")})),
    }
}

async fn rate_limit(state: &State, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(Value::Object(form)) = serde_json::from_slice::<Value>(body) else {
        return json_response(StatusCode::BAD_REQUEST, &json!({"error": "expected {\"task\": …, \"rate\": …}"}));
    };
    let Some(task) = form.get("task").and_then(Value::as_str).filter(|t| !t.is_empty()) else {
        return json_response(StatusCode::BAD_REQUEST, &json!({"error": "task is required"}));
    };
    let mut arguments = serde_json::Map::new();
    arguments.insert("task_name".into(), Value::from(task));
    arguments.insert("rate_limit".into(), form.get("rate").cloned().unwrap_or(Value::Null));
    let broker = match state.broker().await {
        Ok(b) => b,
        Err(e) => return json_response(StatusCode::BAD_GATEWAY, &json!({"error": e})),
    };
    let replies =
        match super::inspect::broadcast(broker.as_ref(), "rate_limit", arguments, None, Duration::from_secs(1), None).await {
            Ok(r) => r,
            Err(e) => return json_response(StatusCode::BAD_GATEWAY, &json!({"error": e.to_string()})),
        };
    let errors: Vec<String> =
        replies.iter().filter_map(|(node, r)| r.get("error").and_then(Value::as_str).map(|e| format!("{node}: {e}"))).collect();
    if replies.is_empty() {
        json_response(StatusCode::BAD_GATEWAY, &json!({"error": "no worker answered"}))
    } else if errors.is_empty() {
        tracing::info!(task, "rate limit changed from the dashboard");
        json_response(StatusCode::OK, &json!({"ok": format!("rate limit of {task} set on {} worker(s)", replies.len())}))
    } else {
        json_response(StatusCode::BAD_REQUEST, &json!({"error": errors.join("; ")}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("abc%2"), "abc%2");
        assert_eq!(percent_decode("%41%42"), "AB");
    }

    #[test]
    fn only_local_names_read_an_open_listener() {
        for ok in [None, Some("127.0.0.1:9808"), Some("localhost"), Some("LOCALHOST:1"), Some("[::1]:9808"), Some("127.0.0.2")] {
            assert!(loopback_host(ok), "{ok:?}");
        }
        for bad in [Some("evil.example"), Some("evil.example:9808"), Some("10.0.0.1:9808"), Some("localhost.evil.example"), Some("")] {
            assert!(!loopback_host(bad), "{bad:?}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret-token-1234", b"secret-token-1234"));
        assert!(!constant_time_eq(b"secret-token-1234", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-1234", b"secret-token-1235"));
    }
}
