//! RabbitMQ (AMQP 0-9-1) transport on lapin, declaring what kombu declares for Celery:
//! consume with `basic.qos`, ack or reject-with-requeue, publish with confirms, pidbox, events.
//!
//! Coordination state (ETA parking, dead letters, leases, revoked ids, beat ticks) has no
//! place in RabbitMQ: this transport always runs beside a [`super::state::StateStore`].

use super::{Broker, BrokerError, DeadLetter, Delivery};
use crate::protocol::amqp::{AmqpParts, DeliveryInfo};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::Confirmation;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Celery's task exchange type: a direct exchange named as the queue.
const PIDBOX_EXCHANGE: &str = "celery.pidbox";
const REPLY_EXCHANGE: &str = "reply.celery.pidbox";
const EVENT_EXCHANGE: &str = "celeryev";
/// How long connecting (TCP and the AMQP handshake) may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a URL names a RabbitMQ server (`amqp://`, `amqps://`, `pyamqp://`).
pub fn is_amqp_url(url: &str) -> bool {
    url.starts_with("amqp://") || url.starts_with("amqps://") || url.starts_with("pyamqp://")
}

/// What taskhost reads from the broker URL beyond what lapin does: how queues it creates
/// are declared. Queues that exist already are used as they were declared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueOptions {
    /// `?max_priority=N`: queues created with `x-max-priority` (Celery's
    /// `task_queue_max_priority`), so the `priority` property orders delivery.
    pub max_priority: Option<u8>,
    /// `?quorum=a,b` (or `*`): queues created as quorum queues (`x-queue-type: quorum`);
    /// others are classic, as kombu declares them by default.
    pub quorum: Vec<String>,
}

impl QueueOptions {
    fn is_quorum(&self, queue: &str) -> bool {
        self.quorum.iter().any(|q| q == "*" || q == queue)
    }

    /// The `queue.declare` arguments for a task queue taskhost creates.
    fn arguments(&self, queue: &str) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(p) = self.max_priority {
            args.insert("x-max-priority".into(), AMQPValue::LongInt(i32::from(p)));
        }
        if self.is_quorum(queue) {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        args
    }
}

/// The lapin URI and the queue options of a broker URL. kombu's URL forms are accepted:
/// `pyamqp://`, and the vhost as the path with `//` (or nothing) meaning `/`.
pub fn parse_url(url: &str) -> Result<(String, QueueOptions), BrokerError> {
    let normalized = url.strip_prefix("pyamqp://").map_or_else(|| url.to_string(), |rest| format!("amqp://{rest}"));
    let mut parsed = url::Url::parse(&normalized).map_err(|e| BrokerError::UnsupportedUrl(format!("{url}: {e}")))?;
    let mut options = QueueOptions::default();
    let mut kept = Vec::new();
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "max_priority" => {
                let p: u8 = v.parse().map_err(|_| BrokerError::UnsupportedUrl(format!("{url}: max_priority must be 0-255")))?;
                options.max_priority = Some(p);
            }
            "quorum" => options.quorum.extend(v.split(',').filter(|q| !q.is_empty()).map(str::to_string)),
            _ => kept.push((k.into_owned(), v.into_owned())),
        }
    }
    let path = parsed.path().to_string();
    let vhost = match path.strip_prefix('/').unwrap_or(&path) {
        "" => "/".to_string(),
        v => percent_decode(v),
    };
    parsed.set_path(&format!("/{}", percent_encode(&vhost)));
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok((parsed.to_string(), options))
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Everything but RFC 3986's unreserved characters, as a vhost in a URL path is written.
const VHOST_ESCAPED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, VHOST_ESCAPED).to_string()
}

/// A JSON header value as py-amqp types it: str `S`, int `I` (or 64-bit past i32),
/// float `d`, bool `t`, None `V`, list `A`, dict `F`.
pub fn to_amqp_value(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => match i32::try_from(i) {
                Ok(small) => AMQPValue::LongInt(small),
                Err(_) => AMQPValue::LongLongInt(i),
            },
            // Past i64 (a u64) or a float: AMQP's tables have no unsigned 64-bit type py-amqp reads.
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(items.iter().map(to_amqp_value).collect::<Vec<_>>())),
        Value::Object(map) => AMQPValue::FieldTable(to_field_table(map)),
    }
}

pub fn to_field_table(map: &serde_json::Map<String, Value>) -> FieldTable {
    let mut table = BTreeMap::new();
    for (k, v) in map {
        // A key longer than a short string cannot travel; Celery's never are.
        if let Ok(key) = ShortString::try_new(k.as_str()) {
            table.insert(key, to_amqp_value(v));
        }
    }
    FieldTable::from(table)
}

/// An AMQP field value as JSON (what the worker reads headers as).
pub fn to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            serde_json::Number::from_f64(f64::from(d.value) / 10f64.powi(i32::from(d.scale))).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(table_to_json(t)),
        AMQPValue::Void => Value::Null,
    }
}

fn table_to_json(t: &FieldTable) -> serde_json::Map<String, Value> {
    t.inner().iter().map(|(k, v)| (k.as_str().to_string(), to_json(v))).collect()
}

/// The basic properties of a message's AMQP parts.
fn properties_of(parts: &AmqpParts) -> BasicProperties {
    let mut p = BasicProperties::default().with_headers(to_field_table(&parts.headers));
    if let Some(t) = &parts.content_type {
        p = p.with_content_type(t.as_str().into());
    }
    if let Some(e) = &parts.content_encoding {
        p = p.with_content_encoding(e.as_str().into());
    }
    p = p.with_delivery_mode(parts.delivery_mode.unwrap_or(2)).with_priority(parts.priority.unwrap_or(0));
    if let Some(id) = &parts.correlation_id {
        p = p.with_correlation_id(id.as_str().into());
    }
    if let Some(to) = &parts.reply_to {
        p = p.with_reply_to(to.as_str().into());
    }
    if let Some(ttl) = &parts.expiration {
        p = p.with_expiration(ttl.as_str().into());
    }
    p
}

/// The AMQP parts of a received message.
fn parts_of(properties: &BasicProperties, body: Vec<u8>) -> AmqpParts {
    AmqpParts {
        body,
        content_type: properties.content_type().as_ref().map(|s| s.as_str().to_string()),
        content_encoding: properties.content_encoding().as_ref().map(|s| s.as_str().to_string()),
        headers: properties.headers().as_ref().map(table_to_json).unwrap_or_default(),
        delivery_mode: *properties.delivery_mode(),
        priority: *properties.priority(),
        correlation_id: properties.correlation_id().as_ref().map(|s| s.as_str().to_string()),
        reply_to: properties.reply_to().as_ref().map(|s| s.as_str().to_string()),
        expiration: properties.expiration().as_ref().map(|s| s.as_str().to_string()),
    }
}

fn conn_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Connection(format!("RabbitMQ: {e}"))
}

fn bad_envelope(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Command(format!("cannot send this message over AMQP: {e}"))
}

/// A task queue's declarations, as kombu's `Queue(name, Exchange(name), routing_key=name)`:
/// a durable direct exchange, the queue, and the binding. A queue that exists with other
/// arguments (declared by someone else, say with `x-max-priority`) answers 406
/// PRECONDITION_FAILED, which closes the channel it came on: so the queue is declared on a
/// channel of its own, and on a 406 the existing queue is used as it was declared.
async fn declare_task_queue(connection: &Connection, channel: &Channel, queue: &str, options: &QueueOptions) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare(queue.into(), ExchangeKind::Direct, durable, FieldTable::default()).await.map_err(conn_err)?;
    let own = connection.create_channel().await.map_err(conn_err)?;
    let declare = QueueDeclareOptions { durable: true, ..Default::default() };
    match own.queue_declare(queue.into(), declare, options.arguments(queue)).await {
        Ok(_) => {
            let _ = own.close(200, "OK".into()).await;
        }
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
            tracing::info!(queue, "queue exists with other arguments; using it as it was declared");
        }
        Err(e) => return Err(conn_err(e)),
    }
    channel.queue_bind(queue.into(), queue.into(), queue.into(), QueueBindOptions::default(), FieldTable::default()).await.map_err(conn_err)?;
    Ok(())
}

/// Closes a connection that failed, waiting at most a second: a close-ok that never comes
/// on a dead socket must not hold the session lock (and every fetch and ack) behind it.
async fn close_briefly(connection: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, "OK".into())).await;
}

/// A delivery, or why the consumer it came from ended.
type Incoming = Result<(String, lapin::message::Delivery), String>;

/// One connection's worth of state: a generation number that delivery tags carry, so an
/// ack for a message of a connection since lost (which RabbitMQ requeued) is dropped
/// instead of acking an unrelated message of the new one.
struct Session {
    generation: u64,
    connection: Connection,
    /// Consumers, qos, acks and rejects.
    consume: Channel,
    /// Publishes, in confirm mode.
    publish: Channel,
    incoming_tx: mpsc::UnboundedSender<Incoming>,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
    consuming: Mutex<HashSet<String>>,
    declared: Mutex<HashSet<String>>,
}

impl Session {
    fn tag(&self, delivery_tag: u64) -> String {
        format!("{}.{delivery_tag}", self.generation)
    }

    fn own(&self, tag: &str) -> Option<u64> {
        delivery_tag_of(tag, self.generation)
    }
}

/// The AMQP delivery tag of a tag string, if it belongs to connection `generation`.
fn delivery_tag_of(tag: &str, generation: u64) -> Option<u64> {
    let (g, n) = tag.split_once('.')?;
    (g.parse::<u64>().ok()? == generation).then_some(())?;
    n.parse().ok()
}

pub struct AmqpBroker {
    uri: String,
    options: QueueOptions,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    generations: AtomicU64,
    /// `basic.qos` prefetch: the first fetch's size (concurrency × multiplier, as Celery
    /// sets it), 0 until then.
    prefetch: AtomicU16,
}

impl AmqpBroker {
    /// Connects once, so a wrong URL, refused login or missing vhost is reported at start.
    pub async fn connect(url: &str) -> Result<AmqpBroker, BrokerError> {
        let (uri, options) = parse_url(url)?;
        let broker = AmqpBroker {
            uri,
            options,
            session: tokio::sync::Mutex::new(None),
            generations: AtomicU64::new(0),
            prefetch: AtomicU16::new(0),
        };
        broker.session().await?;
        Ok(broker)
    }

    async fn open_connection(&self) -> Result<Connection, BrokerError> {
        let properties = ConnectionProperties::default().with_connection_name("taskhost".into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.uri, properties)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(conn_err(e)),
            Err(_) => Err(conn_err(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        }
    }

    /// The live session, connecting (and setting qos and confirms up) if there is none.
    async fn session(&self) -> Result<Arc<Session>, BrokerError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if s.connection.status().connected() && s.consume.status().connected() && s.publish.status().connected() {
                return Ok(s.clone());
            }
        }
        if let Some(old) = slot.take() {
            tracing::warn!("RabbitMQ connection lost; reconnecting (unacked messages go back to their queues)");
            close_briefly(&old.connection).await;
        }
        let connection = self.open_connection().await?;
        let consume = connection.create_channel().await.map_err(conn_err)?;
        let publish = connection.create_channel().await.map_err(conn_err)?;
        publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(conn_err)?;
        let prefetch = self.prefetch.load(Ordering::Relaxed);
        if prefetch > 0 {
            self.apply_qos(&consume, prefetch).await?;
        }
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            connection,
            consume,
            publish,
            incoming_tx,
            incoming: tokio::sync::Mutex::new(incoming),
            consuming: Mutex::default(),
            declared: Mutex::default(),
        });
        *slot = Some(session.clone());
        Ok(session)
    }

    /// The current session if its connection still stands (one that fell is forgotten).
    async fn live_session(&self) -> Option<Arc<Session>> {
        let s = self.session.lock().await.clone()?;
        if s.connection.status().connected() && s.consume.status().connected() {
            return Some(s);
        }
        self.forget(&s).await;
        None
    }

    /// Drops a session an operation failed on, so the next one reconnects.
    async fn forget(&self, failed: &Arc<Session>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, failed)) {
            tracing::warn!("RabbitMQ connection lost; reconnecting (unacked messages go back to their queues)");
            *slot = None;
            close_briefly(&failed.connection).await;
        }
    }

    async fn apply_qos(&self, channel: &Channel, prefetch: u16) -> Result<(), BrokerError> {
        // Celery's global qos; quorum queues refuse it, and take it per consumer instead.
        let global = self.options.quorum.is_empty();
        channel.basic_qos(prefetch, BasicQosOptions { global }).await.map_err(conn_err)
    }

    async fn ensure_declared(&self, s: &Session, queue: &str) -> Result<(), BrokerError> {
        if s.declared.lock().expect("declared set").contains(queue) {
            return Ok(());
        }
        declare_task_queue(&s.connection, &s.publish, queue, &self.options).await?;
        s.declared.lock().expect("declared set").insert(queue.to_string());
        Ok(())
    }

    async fn ensure_consuming(&self, s: &Arc<Session>, queues: &[String], max: usize) -> Result<(), BrokerError> {
        if self.prefetch.load(Ordering::Relaxed) == 0 {
            let prefetch = max.clamp(1, usize::from(u16::MAX)) as u16;
            self.apply_qos(&s.consume, prefetch).await?;
            self.prefetch.store(prefetch, Ordering::Relaxed);
        }
        for queue in queues {
            if s.consuming.lock().expect("consumer set").contains(queue) {
                continue;
            }
            self.ensure_declared(s, queue).await?;
            let tag = format!("taskhost-{}-{queue}", std::process::id());
            let mut consumer =
                s.consume.basic_consume(queue.as_str().into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default()).await.map_err(conn_err)?;
            s.consuming.lock().expect("consumer set").insert(queue.clone());
            let (tx, queue) = (s.incoming_tx.clone(), queue.clone());
            tokio::spawn(async move {
                while let Some(next) = consumer.next().await {
                    let item = next.map(|d| (queue.clone(), d)).map_err(|e| e.to_string());
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                }
                let _ = tx.send(Err(format!("the consumer of {queue} was cancelled")));
            });
        }
        Ok(())
    }

    async fn fetch_from(&self, s: &Arc<Session>, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        self.ensure_consuming(s, queues, max).await?;
        let mut incoming = s.incoming.lock().await;
        let mut got = Vec::new();
        let first = if wait.is_zero() {
            incoming.try_recv().ok()
        } else {
            match tokio::time::timeout(wait, incoming.recv()).await {
                Ok(item) => item,
                Err(_) => return Ok(got),
            }
        };
        let Some(first) = first else { return Ok(got) };
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let (queue, d) = item.map_err(conn_err)?;
            let tag = s.tag(d.delivery_tag);
            let info = DeliveryInfo { tag: &tag, exchange: d.exchange.as_str(), routing_key: d.routing_key.as_str(), redelivered: d.redelivered };
            let raw = parts_of(&d.properties, d.data).to_envelope(&info);
            got.push(Delivery { tag: Some(tag), queue, raw, charge: None });
            if got.len() < max {
                next = incoming.try_recv().ok();
            }
        }
        Ok(got)
    }

    /// Publishes and waits for RabbitMQ's confirm: a message counts as sent once the broker
    /// has taken responsibility for it.
    async fn publish_parts(&self, exchange: &str, routing_key: &str, parts: &AmqpParts) -> Result<(), BrokerError> {
        let s = self.session().await?;
        self.publish_all(&s, exchange, routing_key, std::slice::from_ref(parts)).await
    }

    async fn publish_all(&self, s: &Arc<Session>, exchange: &str, routing_key: &str, all: &[AmqpParts]) -> Result<(), BrokerError> {
        let result = async {
            let mut confirms = Vec::with_capacity(all.len());
            for parts in all {
                let confirm = s
                    .publish
                    .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), &parts.body, properties_of(parts))
                    .await
                    .map_err(conn_err)?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                match confirm.await.map_err(conn_err)? {
                    Confirmation::Ack(_) | Confirmation::NotRequested => {}
                    Confirmation::Nack(_) => return Err(BrokerError::Command(format!("RabbitMQ refused a message for {exchange:?}/{routing_key:?}"))),
                }
            }
            Ok(())
        }
        .await;
        if matches!(result, Err(BrokerError::Connection(_))) {
            self.forget(s).await;
        }
        result
    }

    /// Declares an exchange once per connection.
    async fn declare_exchange(&self, s: &Arc<Session>, name: &str, kind: ExchangeKind, durable: bool) -> Result<(), BrokerError> {
        let key = format!("exchange:{name}");
        if s.declared.lock().expect("declared set").contains(&key) {
            return Ok(());
        }
        let options = ExchangeDeclareOptions { durable, ..Default::default() };
        if let Err(e) = s.publish.exchange_declare(name.into(), kind, options, FieldTable::default()).await {
            self.forget(s).await;
            return Err(conn_err(e));
        }
        s.declared.lock().expect("declared set").insert(key);
        Ok(())
    }

    /// Publishes on an exchange of pidbox or events, declared first as Celery declares it.
    async fn publish_on(&self, exchange: &str, kind: ExchangeKind, durable: bool, routing_key: &str, parts: &AmqpParts) -> Result<(), BrokerError> {
        let s = self.session().await?;
        self.declare_exchange(&s, exchange, kind, durable).await?;
        self.publish_all(&s, exchange, routing_key, std::slice::from_ref(parts)).await
    }

    /// Sends a result record to a client's reply queue as Celery's `rpc://` backend does:
    /// default exchange, routing key = the queue, `correlation_id` = the task id,
    /// non-persistent, an empty headers table, and nothing declared.
    pub async fn send_reply(&self, reply_to: &str, correlation_id: &str, json: Vec<u8>) -> Result<(), BrokerError> {
        let parts = AmqpParts {
            body: json,
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            delivery_mode: Some(1),
            priority: Some(0),
            correlation_id: Some(correlation_id.to_string()),
            ..Default::default()
        };
        self.publish_parts("", reply_to, &parts).await
    }

    fn no_state(what: &str) -> BrokerError {
        BrokerError::Command(format!("{what} needs a state store beside RabbitMQ (--state, or a Redis or PostgreSQL result backend)"))
    }
}

/// An exclusive, auto-deleted queue bound to `exchange`, consumed without acks on a
/// connection of its own, forwarded to the returned receiver for as long as it is held.
/// The connection is re-made (and everything re-declared) whenever it is lost.
fn subscribe(uri: String, exchange: &'static str, kind: ExchangeKind, durable: bool, queue: String, binding: &'static str, args: FieldTable) -> mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        while !tx.is_closed() {
            let run = async {
                let properties = ConnectionProperties::default().with_connection_name(format!("taskhost {exchange}").into());
                let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&uri, properties))
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                let ch = connection.create_channel().await.map_err(|e| e.to_string())?;
                let options = ExchangeDeclareOptions { durable, ..Default::default() };
                ch.exchange_declare(exchange.into(), kind.clone(), options, FieldTable::default()).await.map_err(|e| e.to_string())?;
                let q = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
                ch.queue_declare(queue.as_str().into(), q, args.clone()).await.map_err(|e| e.to_string())?;
                ch.queue_bind(queue.as_str().into(), exchange.into(), binding.into(), QueueBindOptions::default(), FieldTable::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
                let mut consumer = ch.basic_consume(queue.as_str().into(), "".into(), no_ack, FieldTable::default()).await.map_err(|e| e.to_string())?;
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        next = consumer.next() => match next {
                            Some(Ok(d)) => {
                                n += 1;
                                let tag = n.to_string();
                                let info = DeliveryInfo { tag: &tag, exchange: d.exchange.as_str(), routing_key: d.routing_key.as_str(), redelivered: false };
                                if tx.send(parts_of(&d.properties, d.data).to_envelope(&info)).is_err() {
                                    let _ = connection.close(200, "OK".into()).await;
                                    return Ok(());
                                }
                            }
                            Some(Err(e)) => return Err(e.to_string()),
                            None => return Err("consumer cancelled".to_string()),
                        },
                        _ = tx.closed() => {
                            let _ = connection.close(200, "OK".into()).await;
                            return Ok(());
                        }
                    }
                }
            };
            match run.await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(exchange, "RabbitMQ subscription lost ({e}); resubscribing in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    rx
}

/// `x-expires` / `x-message-ttl` as Celery sets them on pidbox and event queues.
fn expiring(expires_ms: i32, ttl_ms: i32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(expires_ms));
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl_ms));
    args
}

fn reply_queue_name(routing_key: &str) -> String {
    format!("{routing_key}.{REPLY_EXCHANGE}")
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        if max == 0 || queues.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.session().await?;
        let result = self.fetch_from(&s, queues, max, wait).await;
        if result.is_err() {
            self.forget(&s).await;
        }
        result
    }

    /// Acks for deliveries of a connection since lost are dropped: RabbitMQ requeued those.
    async fn ack(&self, tags: &[String]) -> Result<(), BrokerError> {
        let Some(s) = self.live_session().await else { return Ok(()) };
        // Sent together (each is one frame to the connection's I/O thread), not one by one.
        let acks = tags.iter().filter_map(|t| s.own(t)).map(|n| s.consume.basic_ack(n, BasicAckOptions::default()));
        let failed = futures::future::join_all(acks).await.into_iter().find_map(Result::err);
        if let Some(e) = failed {
            self.forget(&s).await;
            return Err(conn_err(e));
        }
        Ok(())
    }

    /// `basic.reject` with requeue, as Celery requeues: RabbitMQ puts the message back in
    /// its place and delivers it again marked redelivered.
    async fn restore(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let Some(s) = self.live_session().await else { return Ok(()) };
        let Some(n) = delivery.tag.as_deref().and_then(|t| s.own(t)) else { return Ok(()) };
        if let Err(e) = s.consume.basic_reject(n, BasicRejectOptions { requeue: true }).await {
            self.forget(&s).await;
            return Err(conn_err(e));
        }
        Ok(())
    }

    /// RabbitMQ holds a delivery for as long as the connection lives: nothing to refresh.
    async fn touch(&self, _tags: &[String]) -> Result<(), BrokerError> {
        Ok(())
    }

    /// RabbitMQ requeues a lost connection's deliveries itself.
    async fn restore_expired(&self, _visibility: Duration) -> Result<usize, BrokerError> {
        Ok(0)
    }

    /// As Celery's client: the queue declared, then published to the default exchange with
    /// the queue's name as routing key. The priority travels in the `priority` property.
    async fn publish(&self, queue: &str, priority: u8, raw: &[u8]) -> Result<(), BrokerError> {
        self.publish_many(queue, priority, &[raw.to_vec()]).await
    }

    async fn publish_many(&self, queue: &str, priority: u8, raws: &[Vec<u8>]) -> Result<(), BrokerError> {
        let mut all = Vec::with_capacity(raws.len());
        for raw in raws {
            let mut parts = AmqpParts::from_envelope(raw).map_err(bad_envelope)?;
            parts.priority = Some(priority);
            all.push(parts);
        }
        let s = self.session().await?;
        if let Err(e) = self.ensure_declared(&s, queue).await {
            self.forget(&s).await;
            return Err(e);
        }
        self.publish_all(&s, "", queue, &all).await
    }

    async fn schedule(&self, _queue: &str, _priority: u8, _raw: &[u8], _due: DateTime<Utc>) -> Result<(), BrokerError> {
        Err(Self::no_state("parking an ETA message"))
    }

    async fn move_due(&self) -> Result<usize, BrokerError> {
        Ok(0)
    }

    async fn dead_letter(&self, _letter: &DeadLetter) -> Result<(), BrokerError> {
        Err(Self::no_state("a dead letter"))
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError> {
        Err(Self::no_state("the dead letters"))
    }

    async fn remove_dead_letter(&self, _letter_id: &str) -> Result<bool, BrokerError> {
        Err(Self::no_state("the dead letters"))
    }

    /// kombu's pidbox: a request on the `celery.pidbox` fanout exchange reaches every worker.
    async fn broadcast(&self, raw: &[u8]) -> Result<(), BrokerError> {
        let parts = AmqpParts::from_envelope(raw).map_err(bad_envelope)?;
        self.publish_on(PIDBOX_EXCHANGE, ExchangeKind::Fanout, false, "", &parts).await
    }

    async fn control_stream(&self) -> Result<mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        let queue = format!("{}.{PIDBOX_EXCHANGE}", uuid::Uuid::new_v4());
        Ok(subscribe(self.uri.clone(), PIDBOX_EXCHANGE, ExchangeKind::Fanout, false, queue, "", expiring(10_000, 300_000)))
    }

    async fn reply(&self, exchange: &str, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError> {
        let mut parts = AmqpParts::from_envelope(raw).map_err(bad_envelope)?;
        parts.delivery_mode = Some(1);
        let exchange = if exchange.is_empty() { REPLY_EXCHANGE } else { exchange };
        self.publish_on(exchange, ExchangeKind::Direct, false, routing_key, &parts).await
    }

    async fn publish_event(&self, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError> {
        let mut parts = AmqpParts::from_envelope(raw).map_err(bad_envelope)?;
        parts.delivery_mode = Some(1);
        self.publish_on(EVENT_EXCHANGE, ExchangeKind::Topic, true, routing_key, &parts).await
    }

    async fn event_stream(&self) -> Result<mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        let queue = format!("{EVENT_EXCHANGE}.{}", uuid::Uuid::new_v4());
        Ok(subscribe(self.uri.clone(), EVENT_EXCHANGE, ExchangeKind::Topic, true, queue, "#", expiring(60_000, 5_000)))
    }

    async fn declare_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError> {
        let s = self.session().await?;
        self.declare_exchange(&s, REPLY_EXCHANGE, ExchangeKind::Direct, false).await?;
        let queue = reply_queue_name(routing_key);
        let result = async {
            let q = QueueDeclareOptions { auto_delete: true, ..Default::default() };
            s.publish.queue_declare(queue.as_str().into(), q, expiring(10_000, 300_000)).await.map_err(conn_err)?;
            s.publish
                .queue_bind(queue.as_str().into(), REPLY_EXCHANGE.into(), routing_key.into(), QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(conn_err)
        }
        .await;
        if result.is_err() {
            self.forget(&s).await;
        }
        result
    }

    async fn take_replies(&self, routing_key: &str, wait: Duration) -> Result<Vec<Vec<u8>>, BrokerError> {
        let s = self.session().await?;
        let queue = reply_queue_name(routing_key);
        let deadline = tokio::time::Instant::now() + wait;
        let mut replies = Vec::new();
        loop {
            let got = s.publish.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await;
            match got {
                Ok(Some(m)) => {
                    let d = m.delivery;
                    let info = DeliveryInfo { tag: "0", exchange: d.exchange.as_str(), routing_key: d.routing_key.as_str(), redelivered: false };
                    replies.push(parts_of(&d.properties, d.data).to_envelope(&info));
                }
                Ok(None) if !replies.is_empty() || tokio::time::Instant::now() >= deadline => return Ok(replies),
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    self.forget(&s).await;
                    return Err(conn_err(e));
                }
            }
        }
    }

    async fn remove_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError> {
        let s = self.session().await?;
        if let Err(e) = s.publish.queue_delete(reply_queue_name(routing_key).as_str().into(), QueueDeleteOptions::default()).await {
            self.forget(&s).await;
            return Err(conn_err(e));
        }
        Ok(())
    }

    /// Messages ready on each queue (a passive declare's count); 0 for a queue not declared.
    async fn queue_lengths(&self, queues: &[String]) -> Result<Vec<u64>, BrokerError> {
        let s = self.session().await?;
        let mut lengths = Vec::with_capacity(queues.len());
        for queue in queues {
            // A passive declare of a missing queue closes its channel: one channel each.
            let probe = s.connection.create_channel().await.map_err(conn_err)?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            match probe.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                Ok(q) => {
                    lengths.push(u64::from(q.message_count()));
                    let _ = probe.close(200, "OK".into()).await;
                }
                Err(_) => lengths.push(0),
            }
        }
        Ok(lengths)
    }

    async fn remember_revoked(&self, _ids: &[String], _until: DateTime<Utc>) -> Result<(), BrokerError> {
        Err(Self::no_state("remembering revoked tasks"))
    }

    async fn revoked(&self) -> Result<Vec<String>, BrokerError> {
        Err(Self::no_state("the revoked set"))
    }

    async fn reserve_rate_slot(&self, _key: &str, _interval: Duration) -> Result<Duration, BrokerError> {
        Err(Self::no_state("a shared rate limit"))
    }

    async fn lease(&self, _name: &str, _holder: &str, _ttl: Duration) -> Result<bool, BrokerError> {
        Err(Self::no_state("a lease"))
    }

    async fn release_lease(&self, _name: &str, _holder: &str) -> Result<(), BrokerError> {
        Err(Self::no_state("a lease"))
    }

    async fn claim_tick(&self, _entry: &str, _due: DateTime<Utc>) -> Result<bool, BrokerError> {
        Err(Self::no_state("a beat tick"))
    }

    async fn last_tick(&self, _entry: &str) -> Result<Option<DateTime<Utc>>, BrokerError> {
        Err(Self::no_state("a beat tick"))
    }

    async fn claim_tick_and_publish(&self, _entry: &str, _due: DateTime<Utc>, _queue: &str, _priority: u8, _raw: &[u8]) -> Result<bool, BrokerError> {
        Err(Self::no_state("a beat tick"))
    }

    async fn claim_task_ids(&self, _claims: &[(String, String)], _ttl: Duration) -> Result<Vec<Option<String>>, BrokerError> {
        Err(Self::no_state("task ownership"))
    }

    async fn add_usage(&self, _rows: &[crate::tenant::meter::UsageRow]) -> Result<(), BrokerError> {
        Err(Self::no_state("usage metering"))
    }

    async fn usage(&self, _since_hour: i64) -> Result<Vec<crate::tenant::meter::UsageRow>, BrokerError> {
        Err(Self::no_state("usage metering"))
    }

    /// Messages waiting in RabbitMQ cannot be read without taking them.
    async fn queued(&self, _queues: &[String]) -> Result<Vec<Vec<u8>>, BrokerError> {
        Err(BrokerError::Command("messages waiting in RabbitMQ cannot be listed without consuming them".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;
    use serde_json::json;

    #[test]
    fn kombu_urls_become_lapin_uris_with_the_vhost_spelled_out() {
        let (uri, options) = parse_url("amqp://guest:guest@localhost:5672//").unwrap();
        assert_eq!(uri, "amqp://guest:guest@localhost:5672/%2F");
        assert_eq!(options, QueueOptions::default());
        assert_eq!(parse_url("pyamqp://u:p@h/").unwrap().0, "amqp://u:p@h/%2F");
        assert_eq!(parse_url("amqp://u:p@h:5672/prod").unwrap().0, "amqp://u:p@h:5672/prod");
        assert_eq!(parse_url("amqp://u:p@h:5672/a%2Fb").unwrap().0, "amqp://u:p@h:5672/a%2Fb");
        let (uri, options) = parse_url("amqps://h/v?heartbeat=30&max_priority=10&quorum=celery,media").unwrap();
        assert_eq!(uri, "amqps://h/v?heartbeat=30");
        assert_eq!(options.max_priority, Some(10));
        assert!(options.is_quorum("media") && !options.is_quorum("other"));
        assert!(parse_url("amqp://h/v?max_priority=high").is_err());
    }

    #[test]
    fn headers_are_typed_as_py_amqp_types_them_and_read_back_alike() {
        let headers = json!({"retries": 0, "big": 1099511627776i64, "timelimit": [10.5, null], "ignore_result": true,
                             "task": "tasks.add", "stamps": {}, "nested": {"a": [1, null]}});
        let table = to_field_table(headers.as_object().unwrap());
        let inner = table.inner();
        assert_eq!(inner.get("retries"), Some(&AMQPValue::LongInt(0)));
        assert_eq!(inner.get("big"), Some(&AMQPValue::LongLongInt(1099511627776)));
        assert_eq!(inner.get("ignore_result"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(inner.get("task"), Some(&AMQPValue::LongString(LongString::from("tasks.add"))));
        assert_eq!(
            inner.get("timelimit"),
            Some(&AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Double(10.5), AMQPValue::Void])))
        );
        assert_eq!(Value::Object(table_to_json(&table)), headers);
    }

    #[test]
    fn rabbitmqs_own_types_read_as_json_too() {
        assert_eq!(to_json(&AMQPValue::Timestamp(1796134467)), json!(1796134467u64));
        assert_eq!(to_json(&AMQPValue::ShortString("x".into())), json!("x"));
        assert_eq!(to_json(&AMQPValue::Float(f32::NAN)), Value::Null);
    }

    #[test]
    fn tags_of_a_lost_connection_are_not_this_ones() {
        assert_eq!(delivery_tag_of("3.17", 3), Some(17));
        assert_eq!(delivery_tag_of("2.17", 3), None);
        assert_eq!(delivery_tag_of("0b7c5f2e-redis-tag", 3), None);
        assert_eq!(delivery_tag_of("3.x", 3), None);
    }
}
