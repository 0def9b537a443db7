//! Outbound HTTP for tasks granted `[grants] http`: a small blocking client on
//! `wasi:http/outgoing-handler`. While a request waits, the task's sandbox holds no thread.
//!
//! ```ignore
//! let resp = taskhost_sdk::http::get("https://api.example.com/v1/items")?;
//! let items: Vec<Item> = resp.json()?;
//! let created = taskhost_sdk::http::Request::post("https://api.example.com/v1/items")
//!     .header("authorization", &format!("Bearer {token}"))
//!     .json(&item)?
//!     .send()?;
//! ```
//!
//! A request to an origin the manifest does not grant fails with an [`HttpError`] naming
//! the grant that would allow it. Redirects are returned as they are, not followed.

use std::fmt;
use std::time::Duration;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{self as wasi, ErrorCode, Fields, OutgoingBody, OutgoingRequest, RequestOptions};
use wasip2::io::streams::StreamError;

/// Why a request did not produce a response (or its whole body).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpError(pub String);

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpError {}

fn describe(code: &ErrorCode) -> String {
    match code {
        // The host puts the reason for a denial here, in words.
        ErrorCode::InternalError(Some(message)) => message.clone(),
        ErrorCode::HttpResponseBodySize(Some(n)) => {
            format!("the response body is larger than this run may read ({n} bytes; max_http_response_bytes)")
        }
        other => format!("{other:?}"),
    }
}

/// A response, its body read in full.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (any case), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub fn text(&self) -> Result<&str, HttpError> {
        std::str::from_utf8(&self.body).map_err(|e| HttpError(format!("response body is not UTF-8: {e}")))
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError(format!("response body is not the JSON expected: {e}")))
    }
}

/// A request being built; [`Request::send`] sends it.
#[derive(Debug, Clone)]
pub struct Request {
    method: wasi::Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

/// GET `url` and read the whole response.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

impl Request {
    pub fn new(method: &str, url: &str) -> Request {
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => wasi::Method::Get,
            "HEAD" => wasi::Method::Head,
            "POST" => wasi::Method::Post,
            "PUT" => wasi::Method::Put,
            "DELETE" => wasi::Method::Delete,
            "PATCH" => wasi::Method::Patch,
            "OPTIONS" => wasi::Method::Options,
            other => wasi::Method::Other(other.to_string()),
        };
        Request { method, url: url.to_string(), headers: Vec::new(), body: Vec::new(), timeout: None }
    }

    pub fn get(url: &str) -> Request {
        Request::new("GET", url)
    }

    pub fn post(url: &str) -> Request {
        Request::new("POST", url)
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// A JSON body, with `content-type: application/json`.
    pub fn json(self, value: &impl serde::Serialize) -> Result<Request, HttpError> {
        let body = serde_json::to_vec(value).map_err(|e| HttpError(format!("request body is not JSON-serializable: {e}")))?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// Longest wait for the connection, the first response byte, and between bytes (each);
    /// the task's own time limit ends every request in any case.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the whole response.
    pub fn send(self) -> Result<Response, HttpError> {
        let (scheme, authority, path) = split_url(&self.url)?;
        let mut headers = self.headers.clone();
        // A length rather than chunked encoding: some servers refuse chunked bodies.
        if !self.body.is_empty() && !headers.iter().any(|(n, _)| n == "content-length") {
            headers.push(("content-length".into(), self.body.len().to_string().into_bytes()));
        }
        let headers = Fields::from_list(&headers).map_err(|e| HttpError(format!("request headers refused: {e:?}")))?;
        let request = OutgoingRequest::new(headers);
        let bad = |what: &str| HttpError(format!("{what} of {:?} refused", self.url));
        request.set_method(&self.method).map_err(|()| bad("method"))?;
        request.set_scheme(Some(&scheme)).map_err(|()| bad("scheme"))?;
        request.set_authority(Some(authority)).map_err(|()| bad("authority"))?;
        request.set_path_with_query(Some(&path)).map_err(|()| bad("path"))?;
        let options = self.timeout.map(|t| {
            let ns = t.as_nanos().min(u64::MAX as u128) as u64;
            let options = RequestOptions::new();
            let _ = options.set_connect_timeout(Some(ns));
            let _ = options.set_first_byte_timeout(Some(ns));
            let _ = options.set_between_bytes_timeout(Some(ns));
            options
        });
        let body = request.body().map_err(|()| HttpError("request body unavailable".into()))?;
        let pending = outgoing_handler::handle(request, options).map_err(|e| HttpError(describe(&e)))?;
        // The body is written after `handle`: the host reads it as it goes.
        let written = write_body(&body, &self.body);
        let finished = OutgoingBody::finish(body, None);
        let response = loop {
            if let Some(outcome) = pending.get() {
                break outcome;
            }
            pending.subscribe().block();
        };
        let response = match response {
            Ok(Ok(r)) => r,
            Ok(Err(code)) => return Err(HttpError(describe(&code))),
            Err(()) => return Err(HttpError("the response was already taken".into())),
        };
        written?;
        finished.map_err(|e| HttpError(describe(&e)))?;
        let status = response.status();
        let headers = response.headers().entries();
        let incoming = response.consume().map_err(|()| HttpError("response body unavailable".into()))?;
        let stream = incoming.stream().map_err(|()| HttpError("response body unavailable".into()))?;
        let mut body = Vec::new();
        loop {
            match stream.blocking_read(64 << 10) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    let why = match wasi::http_error_code(&e) {
                        Some(code) => describe(&code),
                        // wasmtime 48 hands some body errors over as text only.
                        None => {
                            let text = e.to_debug_string();
                            let first = text.lines().next().unwrap_or_default().to_string();
                            if first.contains("body size") {
                                format!("{first} (the most this run may read; max_http_response_bytes)")
                            } else {
                                first
                            }
                        }
                    };
                    return Err(HttpError(format!("reading the response body: {why}")));
                }
            }
        }
        drop(stream);
        let _ = wasi::IncomingBody::finish(incoming);
        Ok(Response { status, headers, body })
    }
}

fn write_body(body: &OutgoingBody, bytes: &[u8]) -> Result<(), HttpError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let stream = body.write().map_err(|()| HttpError("request body unavailable".into()))?;
    // blocking-write-and-flush takes at most 4096 bytes a call.
    for chunk in bytes.chunks(4096) {
        stream
            .blocking_write_and_flush(chunk)
            .map_err(|e| HttpError(format!("writing the request body: {e:?}")))?;
    }
    Ok(())
}

/// `https://host[:port]/path?query` → scheme, authority, path with query.
fn split_url(url: &str) -> Result<(wasi::Scheme, &str, String), HttpError> {
    let bad = || HttpError(format!("{url:?} is not an http:// or https:// URL"));
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => wasi::Scheme::Https,
        "http" => wasi::Scheme::Http,
        _ => return Err(bad()),
    };
    // The fragment is the client's own; it never goes on the wire.
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return Err(bad());
    }
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    Ok((scheme, authority, path))
}
