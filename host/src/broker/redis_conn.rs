//! Connections to Redis: TLS trust, TCP keepalive so a silent peer is noticed, and a
//! shared handle that starts over on a fresh connection when a reply never comes.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Environment variable naming a PEM file of CA certificates to trust for `rediss://`
/// (the default trust store is the Mozilla roots; `#insecure` on the URL skips checks).
pub const TLS_CA_ENV: &str = "TASKHOST_TLS_CA_FILE";

/// How long a reply may take before the connection is taken for dead. Redis answers in
/// microseconds; what takes seconds is a connection into a black hole.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(6);

/// TCP settings for every connection: keepalive probes after 5 s of silence, and data
/// (or probes) unacknowledged for 10 s end the connection. Without them a connection
/// whose peer vanished (no FIN, no RST) looks alive for the kernel's 2 hours, and an
/// idle subscription on it never hears another message.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(5)).with_interval(Duration::from_secs(2));
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(Duration::from_secs(10))
}

/// A client for `url`, trusting the CA in `$TASKHOST_TLS_CA_FILE` for TLS if set.
pub fn client(url: &str) -> Result<redis::Client, RedisError> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?.set_tcp_settings(tcp_settings());
    match std::env::var_os(TLS_CA_ENV) {
        Some(path) if url.starts_with("rediss://") => {
            let root_cert = std::fs::read(&path).map_err(|e| {
                RedisError::from((redis::ErrorKind::InvalidClientConfig, "cannot read TLS CA file", e.to_string()))
            })?;
            redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) })
        }
        _ => redis::Client::open(info),
    }
}

/// Connects with automatic reconnection. Each attempt retries briefly (0.1 + 0.2 + 0.4 s);
/// callers (the worker's loops) keep retrying with their own backoff after that.
///
/// With a `response_timeout`, a command without a reply in that time fails, and the
/// handle moves every later command to a new connection (see [`RedisConn`]).
pub async fn manager(url: &str, response_timeout: Option<Duration>) -> Result<RedisConn, RedisError> {
    let client = client(url)?;
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(1))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(response_timeout);
    let first = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
    Ok(RedisConn {
        current: first.clone(),
        generation: 0,
        shared: Arc::new(Shared { client, config, slot: Mutex::new((0, first)) }),
    })
}

/// A Redis connection shared by clones, as `ConnectionManager` is, that also gives up
/// on a connection whose replies stopped coming.
///
/// `ConnectionManager` reconnects when the connection reports itself dropped, but a
/// response timeout leaves it on the same connection: behind a black hole (packets
/// dropped, no RST) every later command would wait out the timeout too, until the
/// kernel gives up on the socket. Here the first timeout puts a new lazily-connecting
/// manager in the shared slot; each clone taken afterwards uses it. Commands already in
/// flight on the old one finish or time out there.
pub struct RedisConn {
    current: ConnectionManager,
    generation: u64,
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// (generation, manager): the connection new clones use.
    slot: Mutex<(u64, ConnectionManager)>,
}

impl Clone for RedisConn {
    fn clone(&self) -> Self {
        let (generation, current) = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        RedisConn { current, generation, shared: self.shared.clone() }
    }
}

impl RedisConn {
    fn after<T>(&self, result: &RedisResult<T>) {
        let Err(e) = result else { return };
        if !e.is_timeout() {
            return;
        }
        let mut slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        // Only the first timeout on a connection replaces it.
        if slot.0 != self.generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.shared.client.clone(), self.shared.config.clone()) {
            Ok(fresh) => {
                tracing::warn!("no reply from Redis in time ({e}); moving to a new connection");
                *slot = (self.generation + 1, fresh);
            }
            Err(e) => tracing::warn!("cannot replace a Redis connection that stopped replying: {e}"),
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.current.req_packed_command(cmd).await;
            self.after(&result);
            result
        })
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.current.req_packed_commands(pipeline, offset, count).await;
            self.after(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.current.get_db()
    }
}
