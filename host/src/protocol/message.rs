//! Task messages: kombu's Redis envelope (base64 body, headers, properties) around a
//! Celery protocol v2 body `[args, kwargs, embed]`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::io::Read;

/// kombu joins a queue name and its priority band with these two bytes.
pub const BAND_SEP: &str = "\x06\x16";
/// The four priority bands of a queue, in the order they are served (0 first).
pub const PRIORITY_BANDS: [u8; 4] = [0, 3, 6, 9];

/// The band a priority falls in: the largest of 0/3/6/9 not above it.
pub fn band_for_priority(priority: u8) -> u8 {
    match priority {
        0..=2 => 0,
        3..=5 => 3,
        6..=8 => 6,
        _ => 9,
    }
}

/// A message's `priority` property as kombu reads it: a count, clamped to 255; 0 when
/// absent or not a count.
pub fn priority_from(value: Option<&Value>) -> u8 {
    value.and_then(Value::as_u64).map_or(0, |p| p.min(255) as u8)
}

/// The Redis list holding `queue`'s messages of `priority`.
pub fn list_for_priority(queue: &str, priority: u8) -> String {
    match band_for_priority(priority) {
        0 => queue.to_string(),
        band => format!("{queue}{BAND_SEP}{band}"),
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("envelope is not JSON: {0}")]
    Envelope(String),
    #[error("unsupported content type {0:?} (only application/json is accepted)")]
    ContentType(String),
    #[error("unsupported body encoding {0:?}")]
    BodyEncoding(String),
    #[error("body is not valid base64: {0}")]
    Base64(String),
    #[error("unsupported compression {0:?}")]
    Compression(String),
    #[error("body does not decompress: {0}")]
    Decompress(String),
    #[error("message of {size} bytes is larger than the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("body is not [args, kwargs, embed] JSON: {0}")]
    Body(String),
    #[error("message has no {0} header (protocol v1 messages are not supported)")]
    MissingHeader(&'static str),
    #[error("header {name} is invalid: {reason}")]
    BadHeader { name: &'static str, reason: String },
}

/// kombu's Redis envelope; unknown keys are kept so re-publishing loses nothing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub body: String,
    #[serde(rename = "content-encoding", default)]
    pub content_encoding: Option<String>,
    #[serde(rename = "content-type", default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub headers: Map<String, Value>,
    #[serde(default)]
    pub properties: Map<String, Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Envelope {
    /// The whole envelope, every header and property kept (for re-publishing).
    pub fn parse(raw: &[u8]) -> Result<Envelope, ProtocolError> {
        serde_json::from_slice(raw).map_err(|e| ProtocolError::Envelope(e.to_string()))
    }

    pub fn delivery_tag(&self) -> Option<&str> {
        self.properties.get("delivery_tag").and_then(Value::as_str)
    }

    pub fn priority(&self) -> u8 {
        priority_from(self.properties.get("priority"))
    }

    pub fn routing_key(&self) -> Option<&str> {
        self.properties.get("delivery_info").and_then(|d| d.get("routing_key")).and_then(Value::as_str)
    }

    /// The body's bytes (base64, as kombu's Redis transport always encodes it).
    pub fn body_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        BASE64.decode(self.body.as_bytes()).map_err(|e| ProtocolError::Base64(e.to_string()))
    }
}

/// The envelope with kombu's redelivery marks set (`headers.redelivered` and
/// `properties.delivery_info.redelivered`); `None` if it is not a JSON object.
pub fn mark_redelivered(raw: &[u8]) -> Option<Vec<u8>> {
    let mut env: Value = serde_json::from_slice(raw).ok()?;
    let obj = env.as_object_mut()?;
    if let Some(Value::Object(h)) = obj.get_mut("headers") {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    if let Some(Value::Object(p)) = obj.get_mut("properties") {
        match p.get_mut("delivery_info") {
            Some(Value::Object(d)) => {
                d.insert("redelivered".into(), Value::Bool(true));
            }
            _ => {
                p.insert("delivery_info".into(), serde_json::json!({"redelivered": true}));
            }
        }
    }
    serde_json::to_vec(&env).ok()
}

/// A signature as Celery embeds it (`add.s(2, 2)`): chain steps, callbacks, chord bodies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Signature {
    pub task: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    #[serde(default)]
    pub options: Map<String, Value>,
    #[serde(default)]
    pub subtask_type: Option<String>,
    #[serde(default)]
    pub immutable: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The third element of the body: workflow links.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Embed {
    #[serde(default)]
    pub callbacks: Option<Vec<Signature>>,
    #[serde(default)]
    pub errbacks: Option<Vec<Signature>>,
    #[serde(default)]
    pub chain: Option<Vec<Signature>>,
    #[serde(default)]
    pub chord: Option<Signature>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The protocol v2 headers a worker acts on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskHeaders {
    pub task: String,
    pub id: String,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub group_index: Option<u64>,
    pub retries: u32,
    pub eta: Option<DateTime<FixedOffset>>,
    pub expires: Option<DateTime<FixedOffset>>,
    /// `[hard, soft]` seconds.
    pub time_limit: (Option<f64>, Option<f64>),
    /// `None` from `send_task`, which means "the task's default".
    pub ignore_result: Option<bool>,
    /// taskhost's own header: a semver requirement for the component.
    pub version_req: Option<String>,
    /// taskhost's own header: the tenant the producer says the message is for.
    pub tenant: Option<String>,
    pub shadow: Option<String>,
    pub redelivered: bool,
    /// W3C trace context a traced producer put in the headers (opentelemetry's Celery
    /// instrumentation injects it at the top level).
    pub traceparent: Option<String>,
    /// The producer's reprs of the arguments, for display only (events, logs): Celery
    /// lets an app hide secrets there (`apply_async(argsrepr=…)`).
    pub argsrepr: Option<String>,
    pub kwargsrepr: Option<String>,
}

/// A decoded task message: what the worker acts on. The full envelope (every header
/// kept) is parsed only when needed, with [`Envelope::parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// `properties.priority`, 0 (first) to 255.
    pub priority: u8,
    pub headers: TaskHeaders,
    /// Positional args as the message carries them: JSON array text. The guest takes
    /// the text as it is, so the values are built only on paths that need them.
    pub args_json: String,
    /// Keyword args: JSON object text.
    pub kwargs_json: String,
    pub embed: Embed,
    /// The queue it was taken from (Celery's `delivery_info.routing_key`), where the
    /// consumer records it (for extended results); not part of the message.
    pub queue: Option<String>,
    /// `properties.reply_to`: the client's queue, where the `rpc://` backend sends results.
    pub reply_to: Option<String>,
}

impl Decoded {
    pub fn args(&self) -> Vec<Value> {
        serde_json::from_str(&self.args_json).unwrap_or_default()
    }

    pub fn kwargs(&self) -> Map<String, Value> {
        serde_json::from_str(&self.kwargs_json).unwrap_or_default()
    }
}

/// Protocol v2 body, borrowed: each part is kept as its JSON text.
type WireBody<'a> = (&'a RawValue, &'a RawValue, Option<&'a RawValue>);

/// The workflow keys of an embed, unparsed. A plain task's embed names them all as null:
/// recognising that here skips building `Embed` through its catch-all map.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedKeys<'a> {
    #[serde(default, borrow)]
    callbacks: Raw<'a>,
    #[serde(default, borrow)]
    errbacks: Raw<'a>,
    #[serde(default, borrow)]
    chain: Raw<'a>,
    #[serde(default, borrow)]
    chord: Raw<'a>,
}

fn decode_embed(raw: Option<&RawValue>) -> Result<Embed, ProtocolError> {
    let Some(raw) = raw else { return Ok(Embed::default()) };
    if let Ok(keys) = serde_json::from_str::<Option<EmbedKeys>>(raw.get()) {
        if keys.is_none_or(|k| [k.callbacks, k.errbacks, k.chain, k.chord].iter().all(Option::is_none)) {
            return Ok(Embed::default());
        }
    }
    serde_json::from_str::<Option<Embed>>(raw.get())
        .map(Option::unwrap_or_default)
        .map_err(|e| ProtocolError::Body(e.to_string()))
}

fn decode_body(body: &[u8]) -> Result<(String, String, Embed), ProtocolError> {
    let text = std::str::from_utf8(body).map_err(|e| ProtocolError::Body(e.to_string()))?;
    let (args, kwargs, embed): WireBody = serde_json::from_str(text).map_err(|e| ProtocolError::Body(e.to_string()))?;
    if !args.get().starts_with('[') {
        return Err(ProtocolError::Body(format!("args must be a JSON array, got {}", args.get())));
    }
    if !kwargs.get().starts_with('{') {
        return Err(ProtocolError::Body(format!("kwargs must be a JSON object, got {}", kwargs.get())));
    }
    for (what, raw) in [("args", args.get()), ("kwargs", kwargs.get())] {
        let depth = nesting_depth(raw);
        if depth > MAX_NESTING {
            return Err(ProtocolError::Body(format!("{what} nest {depth} levels deep, past the recursion limit of {MAX_NESTING}")));
        }
    }
    Ok((args.get().to_string(), kwargs.get().to_string(), decode_embed(embed)?))
}

/// Deepest nesting arguments may have: serde_json's own recursion limit, which a guest
/// parsing them would hit anyway (taken as raw text, they are not parsed here).
const MAX_NESTING: usize = 128;

/// How deep the arrays and objects of a JSON text nest (strings skipped).
fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

type Raw<'a> = Option<&'a RawValue>;

/// A raw value that is `null` or a string without escapes, read without a parser (most
/// headers are: ids, names, times). The envelope's parse has checked it is JSON, and such
/// a literal's content is the text between its quotes. `None` for anything else.
fn plain_str(raw: &str) -> Option<Option<&str>> {
    if raw == "null" {
        return Some(None);
    }
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(Some(inner))
}

/// A raw value read as a string or null, by [`plain_str`] where it can be, else by a
/// parser; `None` if it is neither.
fn read_str(raw: &RawValue) -> Option<Option<Cow<'_, str>>> {
    match plain_str(raw.get()) {
        Some(plain) => Some(plain.map(Cow::Borrowed)),
        None => serde_json::from_str::<Option<Cow<str>>>(raw.get()).ok(),
    }
}

/// A string header acted on only when it is one (as [`lenient`]).
fn lenient_str<'a>(v: Raw<'a>) -> Option<Cow<'a, str>> {
    read_str(v?).flatten()
}

/// A count written as plain digits (as Celery writes `retries` and `priority`), read
/// without a parser; `None` for anything else, which the caller parses as before.
fn plain_count(v: Raw) -> Option<u64> {
    let text = v?.get();
    let plain = !text.is_empty() && text.len() < 20 && text.bytes().all(|b| b.is_ascii_digit());
    plain.then(|| text.parse().ok()).flatten()
}

fn header_str(v: Raw, name: &'static str) -> Result<Option<String>, ProtocolError> {
    let Some(v) = v else { return Ok(None) };
    match read_str(v) {
        Some(s) => Ok(s.map(Cow::into_owned)),
        None => Err(ProtocolError::BadHeader { name, reason: format!("expected a string, got {}", v.get()) }),
    }
}

fn header_time(v: Raw, name: &'static str) -> Result<Option<DateTime<FixedOffset>>, ProtocolError> {
    match header_str(v, name)? {
        None => Ok(None),
        Some(text) => parse_time(&text)
            .map(Some)
            .map_err(|reason| ProtocolError::BadHeader { name, reason }),
    }
}

/// A header that is acted on only when it has the expected type (as Celery does).
fn lenient<'a, T: Deserialize<'a>>(v: Raw<'a>) -> Option<T> {
    v.and_then(|v| serde_json::from_str(v.get()).ok())
}

/// ISO-8601 as Python writes it; a naive time is taken as UTC (Celery's default).
pub fn parse_time(text: &str) -> Result<DateTime<FixedOffset>, String> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                .map(|n| n.and_utc().fixed_offset())
        })
        .map_err(|e| format!("{text:?} is not an ISO-8601 time: {e}"))
}

fn header_limit(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64).filter(|s| *s > 0.0 && s.is_finite())
}

/// The envelope as the worker reads it: borrowed from the message, headers it does not
/// act on skipped unparsed (building every header as a JSON map was a sixth of a worker's
/// time per no-op task).
#[derive(Deserialize)]
struct WireEnvelope<'a> {
    #[serde(borrow)]
    body: Cow<'a, str>,
    #[serde(rename = "content-type", default, borrow)]
    content_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    headers: WireHeaders<'a>,
    #[serde(default, borrow)]
    properties: WireProperties<'a>,
}

#[derive(Deserialize, Default)]
struct WireHeaders<'a> {
    #[serde(borrow)]
    task: Raw<'a>,
    #[serde(borrow)]
    id: Raw<'a>,
    #[serde(borrow)]
    root_id: Raw<'a>,
    #[serde(borrow)]
    parent_id: Raw<'a>,
    #[serde(borrow)]
    group: Raw<'a>,
    #[serde(borrow)]
    group_index: Raw<'a>,
    #[serde(borrow)]
    retries: Raw<'a>,
    #[serde(borrow)]
    eta: Raw<'a>,
    #[serde(borrow)]
    expires: Raw<'a>,
    #[serde(borrow)]
    timelimit: Raw<'a>,
    #[serde(borrow)]
    ignore_result: Raw<'a>,
    #[serde(borrow)]
    taskhost_version: Raw<'a>,
    #[serde(borrow)]
    taskhost_tenant: Raw<'a>,
    #[serde(borrow)]
    shadow: Raw<'a>,
    #[serde(borrow)]
    redelivered: Raw<'a>,
    #[serde(borrow)]
    compression: Raw<'a>,
    #[serde(borrow)]
    traceparent: Raw<'a>,
    #[serde(borrow)]
    argsrepr: Raw<'a>,
    #[serde(borrow)]
    kwargsrepr: Raw<'a>,
}

#[derive(Deserialize, Default)]
struct WireProperties<'a> {
    #[serde(borrow)]
    body_encoding: Raw<'a>,
    #[serde(borrow)]
    priority: Raw<'a>,
    #[serde(borrow)]
    reply_to: Raw<'a>,
}

impl TaskHeaders {
    fn from_wire(h: &WireHeaders) -> Result<TaskHeaders, ProtocolError> {
        let task = header_str(h.task, "task")?.ok_or(ProtocolError::MissingHeader("task"))?;
        let id = header_str(h.id, "id")?.ok_or(ProtocolError::MissingHeader("id"))?;
        let retries = match (h.retries, plain_count(h.retries)) {
            (None, _) => 0,
            (Some(_), Some(r)) => r.min(u32::MAX as u64) as u32,
            (Some(v), None) => serde_json::from_str::<Option<u64>>(v.get())
                .map(|r| r.unwrap_or(0).min(u32::MAX as u64) as u32)
                .map_err(|_| ProtocolError::BadHeader { name: "retries", reason: format!("expected a count, got {}", v.get()) })?,
        };
        // Celery sends `[null, null]` unless a limit is set: no values built for that.
        let unset = h.timelimit.is_none_or(|t| matches!(t.get(), "[null,null]" | "[null, null]" | "null"));
        let time_limit = match lenient::<Vec<Value>>(h.timelimit.filter(|_| !unset)) {
            Some(pair) => (header_limit(pair.first()), header_limit(pair.get(1))),
            None => (None, None),
        };
        Ok(TaskHeaders {
            task,
            id,
            root_id: header_str(h.root_id, "root_id")?,
            parent_id: header_str(h.parent_id, "parent_id")?,
            group: header_str(h.group, "group")?,
            group_index: lenient(h.group_index),
            retries,
            eta: header_time(h.eta, "eta")?,
            expires: header_time(h.expires, "expires")?,
            time_limit,
            ignore_result: lenient(h.ignore_result),
            version_req: header_str(h.taskhost_version, "taskhost_version")?,
            tenant: header_str(h.taskhost_tenant, "taskhost_tenant")?,
            shadow: header_str(h.shadow, "shadow")?,
            redelivered: lenient(h.redelivered).unwrap_or(false),
            // Only for tracing: a malformed one is ignored, never a reason to refuse the task.
            traceparent: lenient_str(h.traceparent).map(Cow::into_owned),
            argsrepr: lenient_str(h.argsrepr).map(Cow::into_owned),
            kwargsrepr: lenient_str(h.kwargsrepr).map(Cow::into_owned),
        })
    }
}

/// Largest message (and decompressed body) a worker decodes; larger ones are dead-lettered
/// unread, so a hostile producer cannot make a worker hold gigabytes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Decodes one list element as popped from Redis.
pub fn decode(raw: &[u8]) -> Result<Decoded, ProtocolError> {
    if raw.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge { size: raw.len(), limit: MAX_MESSAGE_BYTES });
    }
    // One UTF-8 check of the whole message, then a `str` parse: `from_slice` re-checks
    // every borrowed string and raw header, which made the envelope parse 25% slower.
    let text = std::str::from_utf8(raw).map_err(|e| ProtocolError::Envelope(e.to_string()))?;
    let envelope: WireEnvelope = serde_json::from_str(text).map_err(|e| ProtocolError::Envelope(e.to_string()))?;
    let content_type = envelope.content_type.as_deref().unwrap_or("");
    if content_type != "application/json" {
        return Err(ProtocolError::ContentType(content_type.to_string()));
    }
    let body_encoding: Cow<str> = lenient_str(envelope.properties.body_encoding).unwrap_or(Cow::Borrowed("base64"));
    let mut body = match &*body_encoding {
        "base64" => BASE64.decode(envelope.body.as_bytes()).map_err(|e| ProtocolError::Base64(e.to_string()))?,
        other => return Err(ProtocolError::BodyEncoding(other.to_string())),
    };
    match lenient_str(envelope.headers.compression).as_deref() {
        None => {}
        // kombu labels zlib data "application/x-gzip"; both names mean zlib here.
        Some("application/x-gzip" | "zlib") => {
            // A small body may inflate to any size (a zlib bomb): no further than the limit.
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(&body[..])
                .take(MAX_MESSAGE_BYTES as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| ProtocolError::Decompress(e.to_string()))?;
            if out.len() > MAX_MESSAGE_BYTES {
                return Err(ProtocolError::Decompress(format!("it inflates past the {MAX_MESSAGE_BYTES}-byte limit")));
            }
            body = out;
        }
        Some(other) => return Err(ProtocolError::Compression(other.to_string())),
    }
    // Headers first: a protocol v1 message (no task header, a dict body) says so.
    let headers = TaskHeaders::from_wire(&envelope.headers)?;
    let (args_json, kwargs_json, embed) = decode_body(&body)?;
    let priority = match plain_count(envelope.properties.priority) {
        Some(p) => p.min(255) as u8,
        None => priority_from(lenient::<Value>(envelope.properties.priority).as_ref()),
    };
    let reply_to = lenient_str(envelope.properties.reply_to).filter(|r| !r.is_empty()).map(Cow::into_owned);
    Ok(Decoded { priority, headers, args_json, kwargs_json, embed, queue: None, reply_to })
}

/// A task to publish: what `send_task`/`apply_async` would put on the wire.
#[derive(Debug, Clone, Default)]
pub struct OutgoingTask {
    pub task: String,
    pub id: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub embed: Embed,
    pub queue: String,
    pub priority: u8,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub retries: u32,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub group_index: Option<u64>,
    pub time_limit: (Option<f64>, Option<f64>),
    pub ignore_result: bool,
    pub origin: String,
    /// Extra top-level headers (e.g. `taskhost_version`), kept when re-publishing.
    pub extra_headers: Map<String, Value>,
}

fn iso(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// Python's `repr` of a JSON value (`None`, `True`, `'text'`, `[1, 2]`, `{'k': 1}`).
pub fn python_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(items) => format!("[{}]", items.iter().map(python_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("'{k}': {}", python_repr(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `argsrepr`-style text of positional args: a Python tuple.
pub fn args_repr(args: &[Value]) -> String {
    match args.len() {
        1 => format!("({},)", python_repr(&args[0])),
        _ => format!("({})", args.iter().map(python_repr).collect::<Vec<_>>().join(", ")),
    }
}

pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    python_repr(&Value::Object(kwargs.clone()))
}

/// Encodes a task as the list element `LPUSH`ed to its queue.
pub fn encode_task(t: &OutgoingTask) -> Vec<u8> {
    let body = serde_json::to_vec(&(&t.args, &t.kwargs, &t.embed)).expect("JSON values serialize");
    let mut headers = t.extra_headers.clone();
    let root = t.root_id.clone().unwrap_or_else(|| t.id.clone());
    for (k, v) in [
        ("lang", Value::from("py")),
        ("task", Value::from(t.task.clone())),
        ("id", Value::from(t.id.clone())),
        ("shadow", Value::Null),
        ("eta", t.eta.as_ref().map_or(Value::Null, |e| Value::from(iso(e)))),
        ("expires", t.expires.as_ref().map_or(Value::Null, |e| Value::from(iso(e)))),
        ("group", t.group.clone().map_or(Value::Null, Value::from)),
        ("group_index", t.group_index.map_or(Value::Null, Value::from)),
        ("retries", Value::from(t.retries)),
        ("timelimit", serde_json::json!([t.time_limit.0, t.time_limit.1])),
        ("root_id", Value::from(root)),
        ("parent_id", t.parent_id.clone().map_or(Value::Null, Value::from)),
        ("argsrepr", Value::from(args_repr(&t.args))),
        ("kwargsrepr", Value::from(kwargs_repr(&t.kwargs))),
        ("origin", Value::from(t.origin.clone())),
        ("ignore_result", Value::from(t.ignore_result)),
    ] {
        headers.entry(k.to_string()).or_insert(v);
    }
    // Values a re-publish must change even when carried over in extra_headers.
    for (k, v) in [
        ("task", Value::from(t.task.clone())),
        ("id", Value::from(t.id.clone())),
        ("retries", Value::from(t.retries)),
        ("eta", t.eta.as_ref().map_or(Value::Null, |e| Value::from(iso(e)))),
        ("parent_id", t.parent_id.clone().map_or(Value::Null, Value::from)),
    ] {
        headers.insert(k.to_string(), v);
    }
    headers.remove("redelivered");
    let mut properties = Map::new();
    properties.insert("correlation_id".into(), Value::from(t.id.clone()));
    properties.insert("reply_to".into(), Value::Null);
    properties.insert("delivery_mode".into(), Value::from(2));
    properties.insert("delivery_info".into(), serde_json::json!({"exchange": "", "routing_key": t.queue}));
    properties.insert("priority".into(), Value::from(t.priority));
    properties.insert("body_encoding".into(), Value::from("base64"));
    properties.insert("delivery_tag".into(), Value::from(uuid::Uuid::new_v4().to_string()));
    let envelope = Envelope {
        body: BASE64.encode(body),
        content_encoding: Some("utf-8".into()),
        content_type: Some("application/json".into()),
        headers,
        properties,
        extra: Map::new(),
    };
    serde_json::to_vec(&envelope).expect("envelope serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_measured_outside_strings() {
        assert_eq!(nesting_depth("[1, [2, {\"a\": [3]}]]"), 4);
        assert_eq!(nesting_depth("[\"[[[[\\\"[[\"]"), 1);
        assert_eq!(nesting_depth("[]"), 1);
    }

    /// `add.delay(2, 3)` as captured from Celery 5.7 (celery-wire.md §1).
    const CAPTURED: &str = r#"{"body": "W1syLCAzXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d",
 "content-encoding": "utf-8", "content-type": "application/json",
 "headers": {"lang": "py", "task": "tasks.add", "id": "513c83cc-0000", "shadow": null, "eta": null,
   "expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null],
   "root_id": "513c83cc-0000", "parent_id": null, "argsrepr": "(2, 3)", "kwargsrepr": "{}",
   "origin": "gen15243@vm", "ignore_result": false, "replaced_task_nesting": 0,
   "stamped_headers": null, "stamps": {}},
 "properties": {"correlation_id": "513c83cc-0000", "reply_to": "34e2033c-5cab-3722",
   "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"},
   "priority": 0, "body_encoding": "base64", "delivery_tag": "83745a5f-0000"}}"#;

    #[test]
    fn decodes_a_captured_celery_message() {
        let d = decode(CAPTURED.as_bytes()).unwrap();
        assert_eq!(d.headers.task, "tasks.add");
        assert_eq!(d.headers.id, "513c83cc-0000");
        assert_eq!(d.headers.root_id.as_deref(), Some("513c83cc-0000"));
        assert_eq!(d.headers.ignore_result, Some(false));
        assert_eq!(d.args(), vec![Value::from(2), Value::from(3)]);
        assert_eq!(d.args_json, "[2, 3]", "args reach the guest as the client wrote them");
        assert!(d.kwargs().is_empty());
        assert_eq!(d.embed, Embed::default());
        let envelope = Envelope::parse(CAPTURED.as_bytes()).unwrap();
        assert_eq!(envelope.delivery_tag(), Some("83745a5f-0000"));
        assert_eq!(envelope.routing_key(), Some("celery"));
        assert_eq!(envelope.headers["stamps"], serde_json::json!({}), "unknown headers are kept");
    }

    #[test]
    fn decodes_zlib_bodies_labelled_gzip_and_options() {
        use flate2::write::ZlibEncoder;
        use std::io::Write;
        let body = br#"[[1], {"y": 7}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
        let mut z = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(body).unwrap();
        let env = serde_json::json!({
            "body": BASE64.encode(z.finish().unwrap()), "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"task": "tasks.add", "id": "x", "compression": "application/x-gzip", "retries": 2,
                        "eta": "2026-11-24T17:01:46.843993+00:00", "expires": "2026-11-24T17:02:46.843993+00:00",
                        "timelimit": [10, 5], "ignore_result": null, "taskhost_version": "^1.2"},
            "properties": {"priority": 5, "delivery_tag": "t", "body_encoding": "base64"}
        });
        let d = decode(env.to_string().as_bytes()).unwrap();
        assert_eq!(d.args(), vec![Value::from(1)]);
        assert_eq!(d.kwargs()["y"], 7);
        assert_eq!(d.headers.retries, 2);
        assert_eq!(d.headers.time_limit, (Some(10.0), Some(5.0)));
        assert_eq!(d.headers.ignore_result, None);
        assert_eq!(d.headers.version_req.as_deref(), Some("^1.2"));
        assert_eq!(d.headers.eta.unwrap().to_rfc3339(), "2026-11-24T17:01:46.843993+00:00");
        assert_eq!(d.priority, 5);
    }

    #[test]
    fn embeds_with_links_or_unknown_keys_are_parsed_in_full() {
        let message = |embed: &str| {
            let body = format!(r#"[[1], {{}}, {embed}]"#);
            let m = format!(
                r#"{{"body": "{}", "content-type": "application/json", "headers": {{"task": "t", "id": "i"}}, "properties": {{}}}}"#,
                BASE64.encode(body)
            );
            decode(m.as_bytes()).unwrap().embed
        };
        assert_eq!(message("null"), Embed::default());
        assert_eq!(message(r#"{"callbacks": null, "errbacks": null, "chain": null, "chord": null}"#), Embed::default());
        let linked = message(r#"{"chain": [{"task": "t2", "args": [], "kwargs": {}, "options": {}}], "chord": null, "x-mine": 1}"#);
        assert_eq!(linked.chain.as_ref().map(|c| c[0].task.as_str()), Some("t2"));
        assert_eq!(linked.extra["x-mine"], 1, "unknown embed keys are kept for re-publishing");
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        assert!(matches!(decode(b"not json"), Err(ProtocolError::Envelope(_))));
        let not_utf8 = decode(b"{\"body\": \"\xff\"}").unwrap_err().to_string();
        assert!(not_utf8.starts_with("envelope is not JSON: invalid utf-8"), "{not_utf8}");
        let pickle = r#"{"body": "gAR9", "content-type": "application/x-python-serialize", "headers": {}, "properties": {}}"#;
        assert_eq!(
            decode(pickle.as_bytes()).unwrap_err().to_string(),
            "unsupported content type \"application/x-python-serialize\" (only application/json is accepted)"
        );
        let bad64 = r#"{"body": "%%%", "content-type": "application/json", "headers": {}, "properties": {}}"#;
        assert!(matches!(decode(bad64.as_bytes()), Err(ProtocolError::Base64(_))));
        let v1 = format!(
            r#"{{"body": "{}", "content-type": "application/json", "headers": {{}}, "properties": {{}}}}"#,
            BASE64.encode(r#"[[], {}, {}]"#)
        );
        assert_eq!(
            decode(v1.as_bytes()).unwrap_err().to_string(),
            "message has no task header (protocol v1 messages are not supported)"
        );
        let not_body = format!(
            r#"{{"body": "{}", "content-type": "application/json", "headers": {{"task": "t", "id": "i"}}, "properties": {{}}}}"#,
            BASE64.encode(r#"{"args": []}"#)
        );
        assert!(matches!(decode(not_body.as_bytes()), Err(ProtocolError::Body(_))));
        let body_error = |body: &str| {
            let m = format!(
                r#"{{"body": "{}", "content-type": "application/json", "headers": {{"task": "t", "id": "i"}}, "properties": {{}}}}"#,
                BASE64.encode(body)
            );
            decode(m.as_bytes()).unwrap_err().to_string()
        };
        assert_eq!(body_error(r#"[{"a": 1}, {}, null]"#), "body is not [args, kwargs, embed] JSON: args must be a JSON array, got {\"a\": 1}");
        assert_eq!(body_error(r#"[[], [], null]"#), "body is not [args, kwargs, embed] JSON: kwargs must be a JSON object, got []");
        assert!(body_error(r#"[[], {}, {"chain": 5}]"#).starts_with("body is not [args, kwargs, embed] JSON"));
        let bad_header = |headers: &str| {
            let m = format!(
                r#"{{"body": "{}", "content-type": "application/json", "headers": {headers}, "properties": {{}}}}"#,
                BASE64.encode(r#"[[], {}, {}]"#)
            );
            decode(m.as_bytes()).unwrap_err().to_string()
        };
        assert_eq!(bad_header(r#"{"task": 7, "id": "i"}"#), "header task is invalid: expected a string, got 7");
        assert_eq!(
            bad_header(r#"{"task": "t", "id": "i", "retries": "x"}"#),
            "header retries is invalid: expected a count, got \"x\""
        );
        assert!(bad_header(r#"{"task": "t", "id": "i", "eta": "soon"}"#).starts_with("header eta is invalid"));
        // Headers acted on only when well-typed, as Celery does: the message still runs.
        let lax = format!(
            r#"{{"body": "{}", "content-type": "application/json", "properties": {{"priority": "high"}},
                "headers": {{"task": "t", "id": "i", "retries": null, "group_index": "x", "timelimit": 5,
                             "ignore_result": "yes", "redelivered": 1, "stamps": {{"a": [1]}}}}}}"#,
            BASE64.encode(r#"[[], {}, {}]"#)
        );
        let d = decode(lax.as_bytes()).unwrap();
        assert_eq!((d.headers.retries, d.headers.group_index, d.priority), (0, None, 0));
        assert_eq!((d.headers.time_limit, d.headers.ignore_result, d.headers.redelivered), ((None, None), None, false));
    }

    #[test]
    fn headers_with_escapes_or_odd_numbers_read_as_a_parser_reads_them() {
        let m = format!(
            r#"{{"body": "{}", "content-type": "application/json", "properties": {{"priority": 300, "reply_to": "r\u00e9"}},
                "headers": {{"task": "t\"q", "id": "i\\d", "retries": 3, "argsrepr": "(\"x\",)", "root_id": null,
                             "timelimit": [null, 2.5]}}}}"#,
            BASE64.encode(r#"[[], {}, {}]"#)
        );
        let d = decode(m.as_bytes()).unwrap();
        assert_eq!((d.headers.task.as_str(), d.headers.id.as_str()), ("t\"q", "i\\d"));
        assert_eq!((d.headers.retries, d.priority, d.reply_to.as_deref()), (3, 255, Some("ré")));
        assert_eq!((d.headers.argsrepr.as_deref(), d.headers.root_id.as_deref()), (Some("(\"x\",)"), None));
        assert_eq!(d.headers.time_limit, (None, Some(2.5)));
        assert_eq!(plain_str(r#""plain""#), Some(Some("plain")));
        assert_eq!((plain_str("null"), plain_str(r#""a\"b""#), plain_str("7")), (Some(None), None, None));
    }

    #[test]
    fn encoded_tasks_decode_back_and_look_like_celery() {
        let t = OutgoingTask {
            task: "tasks.add".into(),
            id: "abc".into(),
            args: vec![Value::from(2), Value::from("x")],
            kwargs: serde_json::json!({"y": true}).as_object().unwrap().clone(),
            queue: "other".into(),
            priority: 5,
            eta: Some(DateTime::parse_from_rfc3339("2026-11-24T17:01:46.843993+00:00").unwrap().to_utc()),
            origin: "gen1@box".into(),
            ..Default::default()
        };
        let raw = encode_task(&t);
        let d = decode(&raw).unwrap();
        assert_eq!(d.headers.id, "abc");
        assert_eq!(d.headers.root_id.as_deref(), Some("abc"));
        let envelope = Envelope::parse(&raw).unwrap();
        assert_eq!(envelope.headers["argsrepr"], "(2, 'x')");
        assert_eq!(envelope.headers["kwargsrepr"], "{'y': True}");
        assert_eq!(envelope.headers["eta"], "2026-11-24T17:01:46.843993+00:00");
        assert_eq!(d.priority, 5);
        assert_eq!(envelope.priority(), 5);
        assert_eq!(envelope.routing_key(), Some("other"));
        assert_eq!(d.embed, Embed::default());
        let body: Value = serde_json::from_slice(&BASE64.decode(&envelope.body).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!([[2, "x"], {"y": true}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
        );
    }

    #[test]
    fn redelivered_marks_are_set_and_the_rest_kept() {
        let marked = mark_redelivered(CAPTURED.as_bytes()).unwrap();
        let v: Value = serde_json::from_slice(&marked).unwrap();
        assert_eq!(v["headers"]["redelivered"], true);
        assert_eq!(v["properties"]["delivery_info"]["redelivered"], true);
        assert_eq!(v["properties"]["delivery_info"]["routing_key"], "celery");
        assert_eq!(v["properties"]["delivery_tag"], "83745a5f-0000");
        assert!(mark_redelivered(b"[1]").is_none());
    }

    #[test]
    fn priorities_map_to_kombu_bands() {
        let lists: Vec<String> = [0u8, 2, 3, 5, 6, 8, 9, 200].iter().map(|p| list_for_priority("q", *p)).collect();
        assert_eq!(lists, ["q", "q", "q\x06\x163", "q\x06\x163", "q\x06\x166", "q\x06\x166", "q\x06\x169", "q\x06\x169"]);
    }
}
