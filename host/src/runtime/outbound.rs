//! A run's way out, as its grants allow: `wasi:http` requests sent by the host to a
//! granted origin at an address it resolved and checked itself, and TCP connects and name
//! lookups through `wasi:sockets` to granted host:port pairs. Everything else is refused.
//!
//! The check is on what the host connects to, never on what the guest says: the URI's
//! authority picks the origin, the host resolves it once and connects to the address it
//! checked (no second lookup to rebind), and the Host header is rewritten to the
//! authority. A granted *name* never reaches loopback, private or link-local addresses;
//! only a grant naming such an address literally does.

use super::grants::Grants;
use super::net::{is_public, Origin};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// Name lookups running at once in this process for the gate's own checks: each holds a
/// blocking thread until the resolver answers, even after its request gave up.
const MAX_CONCURRENT_LOOKUPS: usize = 16;
/// Sockets one run may create: each is a file descriptor of the worker process.
pub const MAX_SOCKETS_PER_RUN: u32 = 32;
/// Name lookups one run may ask for (its own through `wasi:sockets`, and the host's for
/// its connects and requests, each name once a run).
pub const MAX_LOOKUPS_PER_RUN: u32 = 64;
/// The most hyper buffers of a response's head (status line and headers).
const MAX_RESPONSE_HEAD: usize = 64 << 10;
/// The most of a request body buffered per write (wasmtime's default is 1 MiB).
const OUTGOING_BODY_CHUNK: usize = 64 << 10;

/// HTTP requests one run may make when its manifest does not say (`max_http_requests`).
pub const DEFAULT_MAX_HTTP_REQUESTS: u32 = 50;
/// Response body bytes one run may read in all, unless its manifest says
/// (`max_http_response_bytes`).
pub const DEFAULT_MAX_HTTP_RESPONSE_BYTES: u64 = 10 << 20;

/// What one run is granted of the network and what it has used; shared with the
/// socket checks, which outlive a borrow of the store.
pub(super) struct Gate {
    shared: Arc<GateShared>,
    requests: u32,
}

pub(super) struct GateShared {
    grants: Arc<Grants>,
    task_id: String,
    task_name: String,
    /// The run's hard deadline: no request outlives it.
    hard: Instant,
    /// Response body bytes the run may still read.
    body_left: AtomicU64,
    denials: AtomicU32,
    sockets: AtomicU32,
    lookups: AtomicU32,
    /// What the host resolved this run, each name once: a run's connects and requests to
    /// one name all go to addresses from one answer.
    resolved: std::sync::Mutex<std::collections::HashMap<(String, u16), Vec<SocketAddr>>>,
}

impl Gate {
    pub fn new(grants: Arc<Grants>, task_id: &str, task_name: &str, hard: Instant) -> Gate {
        let body_left = AtomicU64::new(grants.max_http_response_bytes);
        let shared = GateShared {
            grants,
            task_id: task_id.to_string(),
            task_name: task_name.to_string(),
            hard,
            body_left,
            denials: AtomicU32::new(0),
            sockets: AtomicU32::new(0),
            lookups: AtomicU32::new(0),
            resolved: Default::default(),
        };
        Gate { shared: Arc::new(shared), requests: 0 }
    }

    pub fn shared(&self) -> Arc<GateShared> {
        self.shared.clone()
    }

    /// Requests refused for want of a grant this run, HTTP, sockets, config and follow-ups alike.
    pub fn denials(&self) -> u32 {
        self.shared.denials.load(Ordering::Relaxed)
    }

    /// Records a refusal; see [`GateShared::deny`].
    pub fn deny(&self, name: &str, what: &str) {
        self.shared.deny(name, what)
    }

    /// Whether this request may go out, and to which granted origin; else the guest's error.
    fn admit(&mut self, uri: &http::Uri) -> Result<Origin, String> {
        let grants = &self.shared.grants;
        let origin = origin_of(uri).map_err(|e| {
            self.deny(&uri.to_string(), "http request denied: not a plain origin");
            format!("http request denied: {e}")
        })?;
        if !grants.http.contains(&origin) {
            self.deny(&origin.to_string(), "http request denied: origin not granted");
            return Err(format!(
                "http request to {origin} denied: not granted (a manifest grants it with [grants] http = [\"{origin}\"])"
            ));
        }
        if self.requests >= grants.max_http_requests {
            self.deny(&origin.to_string(), "http request denied: allowance spent");
            return Err(format!(
                "http request to {origin} denied: this run already made {} requests, all its manifest allows (max_http_requests)",
                self.requests
            ));
        }
        self.requests += 1;
        Ok(origin)
    }
}

impl GateShared {
    /// Counts a refusal and logs the first of the run (a guest asking in a loop must not
    /// flood the log); the name is quoted, so it cannot carry terminal escapes.
    pub fn deny(&self, name: &str, what: &str) {
        if self.denials.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(task_id = %self.task_id, task = %self.task_name, name = ?name, "{what} (further denials of this run counted, not logged)");
        }
    }

    /// Whether the guest may resolve `name` through `wasi:sockets/ip-name-lookup`: only the
    /// host names of its TCP grants (and address literals, which need no lookup). Anything
    /// else is refused before any query leaves the host, so a denial says nothing of
    /// whether the name exists and no data leaves through DNS.
    pub fn may_look_up(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        if !self.grants.tcp.iter().any(|t| t.host == name) {
            self.deny(&name, "name lookup denied: not a host the run's [grants] tcp names");
            return false;
        }
        if self.lookups.fetch_add(1, Ordering::Relaxed) >= MAX_LOOKUPS_PER_RUN {
            self.deny(&name, "name lookup denied: the run's lookups are spent");
            return false;
        }
        true
    }

    /// Whether the run may create one more socket.
    pub fn may_create_socket(&self) -> bool {
        if self.sockets.fetch_add(1, Ordering::Relaxed) >= MAX_SOCKETS_PER_RUN {
            self.deny("tcp", "socket denied: the run's sockets are spent");
            return false;
        }
        true
    }

    /// What `host` resolves to, once a run: the lookups of all runs of this process share a
    /// bound, and each name's answer is reused for the rest of the run.
    async fn resolve(&self, host: &str, port: u16, within: Duration) -> Result<Vec<SocketAddr>, String> {
        let key = (host.to_string(), port);
        if let Some(found) = self.resolved.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(found.clone());
        }
        if self.lookups.fetch_add(1, Ordering::Relaxed) >= MAX_LOOKUPS_PER_RUN {
            return Err("the run's name lookups are spent".into());
        }
        static LOOKUPS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
        let slots = LOOKUPS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_LOOKUPS))).clone();
        let permit = tokio::time::timeout(within, slots.acquire_owned())
            .await
            .map_err(|_| "name lookup timed out waiting for a resolver".to_string())?
            .map_err(|_| "name lookups closed".to_string())?;
        let (name, at) = key.clone();
        // The permit goes with the thread: a lookup the run stopped waiting for still
        // holds its slot until the resolver answers.
        let lookup = tokio::task::spawn_blocking(move || {
            let found = (name.as_str(), at).to_socket_addrs().map(|a| a.collect::<Vec<_>>());
            drop(permit);
            found
        });
        let found = match tokio::time::timeout(within, lookup).await {
            Err(_) => return Err("name lookup timed out".into()),
            Ok(Err(e)) => return Err(format!("name lookup failed: {e}")),
            Ok(Ok(Err(e))) => return Err(format!("name lookup failed: {e}")),
            Ok(Ok(Ok(addrs))) => addrs,
        };
        self.resolved.lock().unwrap_or_else(|p| p.into_inner()).insert(key, found.clone());
        Ok(found)
    }

    /// Whether a socket may be bound or connected there: an implicit bind, or a connect
    /// to a granted host:port at an address that name resolves to now and that is public
    /// (or that the grant names literally).
    async fn may_use_socket(self: Arc<Self>, addr: SocketAddr, used: SocketAddrUse) -> bool {
        match used {
            // The wildcard bind that precedes a connect.
            SocketAddrUse::TcpBind if addr.ip().is_unspecified() && addr.port() == 0 => return true,
            SocketAddrUse::TcpConnect => {}
            _ => {
                self.deny(&addr.to_string(), "socket use denied: only outbound TCP connects are granted");
                return false;
            }
        }
        for target in self.grants.tcp.iter().filter(|t| t.port == addr.port()) {
            if target.literal() == Some(addr.ip()) {
                return true;
            }
            if target.literal().is_none() && is_public(addr.ip()) {
                let left = self.hard.saturating_duration_since(Instant::now());
                if let Ok(addrs) = self.resolve(&target.host, target.port, left).await {
                    if addrs.iter().any(|a| a.ip() == addr.ip()) {
                        return true;
                    }
                }
            }
        }
        let why = if self.grants.tcp.iter().any(|t| t.port == addr.port() && t.literal().is_none()) && !is_public(addr.ip()) {
            "tcp connect denied: a loopback, private or link-local address is reached only through a grant naming it literally"
        } else {
            "tcp connect denied: not granted"
        };
        self.deny(&addr.to_string(), why);
        false
    }
}

/// The check `WasiCtxBuilder::socket_addr_check` runs on every bind and connect.
pub(super) fn socket_check(
    gate: Arc<GateShared>,
) -> impl Fn(SocketAddr, SocketAddrUse) -> Pin<Box<dyn Future<Output = bool> + Send + Sync>> + Send + Sync + 'static {
    // Spawned, so the check's future is Sync as wasmtime asks; dropped with the run, it stops.
    move |addr, used| {
        let check = wasmtime_wasi::runtime::spawn(gate.clone().may_use_socket(addr, used));
        Box::pin(check)
    }
}

/// Scheme, host and port of a request's URI; the port defaults by scheme.
fn origin_of(uri: &http::Uri) -> Result<Origin, String> {
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => return Err(format!("scheme {other:?} is not http or https")),
    };
    let authority = uri.authority().ok_or("the request names no host")?;
    if authority.as_str().contains('@') {
        return Err("user info in the authority is not sent".into());
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(Origin { https, host, port })
}

impl WasiHttpHooks for Gate {
    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        OUTGOING_BODY_CHUNK
    }

    // The guest gets these as error codes; the host logs them at debug, not once per
    // request at warn (a granted server that resets every connection would flood the log).
    fn p2_error_from_hyper(&mut self, err: &hyper::Error) -> wasmtime_wasi_http::p2::bindings::http::types::ErrorCode {
        tracing::debug!(task_id = %self.shared.task_id, "http: {err}");
        wasmtime_wasi_http::p2::bindings::http::types::ErrorCode::HttpProtocolError
    }

    fn p2_error_from_connect(&mut self, err: &std::io::Error) -> wasmtime_wasi_http::p2::bindings::http::types::ErrorCode {
        tracing::debug!(task_id = %self.shared.task_id, "http connect: {err}");
        wasmtime_wasi_http::p2::bindings::http::types::ErrorCode::ConnectionRefused
    }

    fn p2_error_from_tls(&mut self, err: &std::io::Error) -> wasmtime_wasi_http::p2::bindings::http::types::ErrorCode {
        tracing::debug!(task_id = %self.shared.task_id, "http tls: {err}");
        wasmtime_wasi_http::p2::bindings::http::types::ErrorCode::TlsProtocolError
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_done: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>), HttpError>> + Send>
    {
        match self.admit(request.uri()) {
            Err(refusal) => Box::new(async move { Err(HttpError::InternalError(Some(refusal))) }),
            Ok(origin) => Box::new(send(self.shared.clone(), origin, request, options)),
        }
    }
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

/// Resolves, checks, connects and sends; the response body counts against the run's
/// byte allowance and ends at its deadline.
async fn send(
    gate: Arc<GateShared>,
    origin: Origin,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<(http::Response<WasiBody>, IoFuture), HttpError> {
    let deadline = gate.hard;
    let left = || deadline.saturating_duration_since(Instant::now());
    let within = |asked: Option<Duration>| asked.unwrap_or(Duration::MAX).min(left());
    let connect_timeout = within(options.and_then(|o| o.connect_timeout));
    let first_byte_timeout = within(options.and_then(|o| o.first_byte_timeout));
    let between_bytes = options.and_then(|o| o.between_bytes_timeout);

    let addrs = resolve(&gate, &origin, connect_timeout).await?;
    let mut stream = None;
    let mut last_error = None;
    for addr in addrs {
        match tokio::time::timeout(within(options.and_then(|o| o.connect_timeout)), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last_error = Some(HttpError::Connect(e)),
            Err(_) => last_error = Some(HttpError::ConnectionTimeout),
        }
    }
    let stream = match (stream, last_error) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e),
        (None, None) => return Err(HttpError::DestinationNotFound),
    };
    let io: Box<dyn IoStream> = if origin.https {
        let config = tls_config().map_err(|e| HttpError::InternalError(Some(e.clone())))?;
        let name = match origin.literal() {
            Some(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
            None => rustls::pki_types::ServerName::try_from(origin.host.clone()).map_err(|_| HttpError::HttpRequestUriInvalid)?,
        };
        let tls = tokio::time::timeout(connect_timeout, tokio_rustls::TlsConnector::from(config).connect(name, stream))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)?
            .map_err(HttpError::Tls)?;
        Box::new(tls)
    } else {
        Box::new(stream)
    };
    let (mut sender, connection) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_RESPONSE_HEAD)
            .handshake::<_, WasiBody>(wasmtime_wasi_http::io::TokioIo::new(io)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)?
    .map_err(HttpError::from)?;
    // The connection runs beside the request, and stops when the response (or the
    // store that holds it) is dropped.
    let connection = wasmtime_wasi::runtime::spawn(connection);

    // What goes on the wire: the path alone, and a Host header that is the granted
    // origin's authority (normalised: no trailing dot, default port left out), whatever
    // the guest put there.
    let authority = origin.authority();
    let head_request = request.method() == http::Method::HEAD;
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    *request.uri_mut() = http::Uri::builder().path_and_query(path).build().map_err(|_| HttpError::HttpRequestUriInvalid)?;
    let host = http::HeaderValue::from_str(&authority).map_err(|_| HttpError::HttpRequestUriInvalid)?;
    request.headers_mut().remove(http::header::HOST);
    request.headers_mut().insert(http::header::HOST, host);

    let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)?
        .map_err(HttpError::from)?;
    // The head counts against the run's allowance as well as the body.
    let head: u64 = response.headers().iter().map(|(n, v)| (n.as_str().len() + v.len() + 4) as u64).sum();
    if gate.body_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(head)).is_err() {
        gate.body_left.store(0, Ordering::Relaxed);
        return Err(HttpError::HttpResponseBodySize(Some(gate.grants.max_http_response_bytes)));
    }
    let bodiless = head_request || matches!(response.status().as_u16(), 204 | 304);
    let announced = response.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let allowance = gate.body_left.load(Ordering::Relaxed);
    if !bodiless && announced.is_some_and(|n| n > allowance) {
        return Err(HttpError::HttpResponseBodySize(announced));
    }
    let response = response.map(|incoming| {
        CappedBody {
            incoming,
            gate: gate.clone(),
            deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
            idle: between_bytes.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        }
        .boxed_unsync()
    });
    let io: IoFuture = Box::new(async move {
        match connection.await {
            Ok(()) => Ok(()),
            Err(e) if e.is_timeout() => Err(HttpError::HttpResponseTimeout),
            Err(e) => Err(HttpError::from(e)),
        }
    });
    Ok((response, io))
}

/// PEM file of CA certificates tasks' `https` requests trust besides the Mozilla roots
/// (an internal API's private CA, say).
pub const HTTP_CA_ENV: &str = "TASKHOST_HTTP_CA_FILE";

/// One TLS client configuration per process: the Mozilla roots plus `$TASKHOST_HTTP_CA_FILE`.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, &'static String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
            if let Some(path) = std::env::var_os(HTTP_CA_ENV) {
                let certs = rustls::pki_types::CertificateDer::pem_file_iter(&path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{HTTP_CA_ENV}: cannot read {}: {e}", std::path::Path::new(&path).display()))?;
                for cert in certs {
                    roots.add(cert).map_err(|e| format!("{HTTP_CA_ENV}: {e}"))?;
                }
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("tls setup: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .as_ref()
        .cloned()
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> IoStream for T {}

/// The addresses to try for `origin`: the literal address a grant names, or what its name
/// resolves to now, public addresses only.
async fn resolve(gate: &GateShared, origin: &Origin, timeout: Duration) -> Result<Vec<SocketAddr>, HttpError> {
    if let Some(ip) = origin.literal() {
        return Ok(vec![SocketAddr::new(ip, origin.port)]);
    }
    let found = gate.resolve(&origin.host, origin.port, timeout).await.map_err(|e| {
        tracing::debug!(task_id = %gate.task_id, host = %origin.host, "{e}");
        HttpError::DnsError { rcode: Some(format!("{} could not be resolved", origin.host)), info_code: None }
    })?;
    let (public, private): (Vec<SocketAddr>, Vec<SocketAddr>) = found.into_iter().partition(|a| is_public(a.ip()));
    if public.is_empty() {
        if let Some(addr) = private.first() {
            // The address stays in the host's log: the guest learns nothing of the
            // network behind the name.
            tracing::warn!(task_id = %gate.task_id, host = %origin.host, address = %addr.ip(), "http request denied: the granted name resolves to a non-public address");
            gate.deny(&origin.to_string(), "http request denied: the granted name resolves to a non-public address");
            return Err(HttpError::InternalError(Some(format!(
                "http request to {origin} denied: {} resolves to a loopback, private or link-local address, which a granted name never reaches (grant the address itself, with the operator's allowance: [grants] http in taskhost.toml or --allow-http)",
                origin.host
            ))));
        }
        return Err(HttpError::DestinationNotFound);
    }
    Ok(public)
}

/// A response body read against the run's byte allowance, its deadline and the
/// between-bytes timeout the guest asked for.
struct CappedBody {
    incoming: hyper::body::Incoming,
    gate: Arc<GateShared>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.incoming).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(if e.is_timeout() { HttpError::HttpResponseTimeout } else { e.into() }))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    let spent = this.gate.body_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(n));
                    if spent.is_err() {
                        this.gate.body_left.store(0, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(HttpError::HttpResponseBodySize(Some(this.gate.grants.max_http_response_bytes)))));
                    }
                }
                if let Some((every, idle)) = &mut this.idle {
                    idle.as_mut().reset(tokio::time::Instant::now() + *every);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(HttpError::HttpResponseTimeout)));
                }
                if let Some((_, idle)) = &mut this.idle {
                    if idle.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout)));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_origin_is_the_uri_authority() {
        let o = origin_of(&"https://API.Example.com./x?y".parse().unwrap()).unwrap();
        assert_eq!(o, Origin { https: true, host: "api.example.com".into(), port: 443 });
        let o = origin_of(&"http://[::1]:8080/".parse().unwrap()).unwrap();
        assert_eq!(o, Origin { https: false, host: "::1".into(), port: 8080 });
        assert!(origin_of(&"http://user@evil.com/".parse().unwrap()).is_err());
        assert!(origin_of(&"/relative".parse().unwrap()).is_err());
    }
}
