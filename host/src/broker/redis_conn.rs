//! Connections to Redis: TLS trust, TCP keepalive so a silent peer is noticed, the master
//! Redis Sentinel names, and a shared handle that moves on when a connection fails.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    redis::io::tcp::TcpSettings::default().set_nodelay(true).set_keepalive(keepalive).set_user_timeout(Duration::from_secs(10))
}

/// Environment variable naming the master Sentinel watches, for `sentinel://` URLs that
/// carry no `?master_name=` (kombu's `master_name` transport option).
pub const SENTINEL_MASTER_ENV: &str = "TASKHOST_SENTINEL_MASTER";

/// Sentinel's own port, kombu's default for `sentinel://` addresses without one.
const SENTINEL_PORT: u16 = 26379;

/// A burst of failed commands asks the sentinels once, not once per command.
const LOOKUP_INTERVAL: Duration = Duration::from_millis(100);

/// Whether a URL names Redis through Sentinel (`sentinel://h1:26379;sentinel://h2:26379`).
pub fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("sentinel://")
}

/// A `sentinel://` URL as kombu reads it: every `;`-separated address is a sentinel; the
/// first one's user, password and database are the master's.
#[derive(Debug, PartialEq)]
pub struct SentinelUrl {
    pub sentinels: Vec<(String, u16)>,
    pub master_name: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Parses a `sentinel://` URL. The master's name comes from `?master_name=` on any of
/// the addresses, else from `$TASKHOST_SENTINEL_MASTER`.
pub fn parse_sentinel_url(url: &str) -> Result<SentinelUrl, String> {
    parse_sentinel_url_with(url, std::env::var(SENTINEL_MASTER_ENV).ok())
}

fn parse_sentinel_url_with(url: &str, master_from_env: Option<String>) -> Result<SentinelUrl, String> {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let mut sentinels = Vec::new();
    let mut master_name = None;
    let mut first: Option<url::Url> = None;
    for part in url.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let shown = super::redact_url(part);
        if !is_sentinel_url(part) {
            return Err(format!("{shown}: every address of a sentinel URL is sentinel://host[:port]"));
        }
        let parsed = url::Url::parse(part).map_err(|e| format!("{shown}: {e}"))?;
        let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("{shown}: no host"))?;
        sentinels.push((host.trim_start_matches('[').trim_end_matches(']').to_string(), parsed.port().unwrap_or(SENTINEL_PORT)));
        if let Some((_, name)) = parsed.query_pairs().find(|(k, _)| k == "master_name") {
            master_name = Some(name.into_owned());
        }
        first.get_or_insert(parsed);
    }
    let first = first.ok_or_else(|| "an empty sentinel URL".to_string())?;
    let db = match first.path().trim_matches('/') {
        "" => 0,
        path => path.parse().map_err(|_| format!("database {path:?} in a sentinel URL is not a number"))?,
    };
    let master_name = master_name.or(master_from_env).filter(|m| !m.is_empty()).ok_or_else(|| {
        format!(
            "{}: which master? Add ?master_name=NAME (kombu's master_name transport option) or set {SENTINEL_MASTER_ENV}",
            super::redact_url(url)
        )
    })?;
    Ok(SentinelUrl {
        sentinels,
        master_name,
        db,
        username: Some(decode(first.username())).filter(|u| !u.is_empty()),
        password: first.password().map(decode),
    })
}

/// Where connections go: one server, or whichever server the sentinels name master now.
#[derive(Clone)]
pub enum Endpoint {
    Server(redis::Client),
    Sentinel(Arc<SentinelMaster>),
}

/// The master of one Sentinel-watched group, looked up anew when connections fail.
pub struct SentinelMaster {
    sentinels: tokio::sync::Mutex<Sentinel>,
    master_name: String,
    node: SentinelNodeConnectionInfo,
    last_lookup: Mutex<Option<Instant>>,
}

impl Endpoint {
    /// The endpoint a `redis://`, `rediss://`, `redis+unix://` or `sentinel://` URL names.
    pub fn for_url(url: &str) -> Result<Endpoint, RedisError> {
        if !is_sentinel_url(url) {
            return Ok(Endpoint::Server(client(url)?));
        }
        let parsed = parse_sentinel_url(url).map_err(|e| RedisError::from((ErrorKind::InvalidClientConfig, "bad sentinel URL", e)))?;
        let addresses: Vec<redis::ConnectionInfo> = parsed
            .sentinels
            .iter()
            .map(|(host, port)| {
                use redis::IntoConnectionInfo;
                redis::ConnectionAddr::Tcp(host.clone(), *port).into_connection_info().map(|i| i.set_tcp_settings(tcp_settings()))
            })
            .collect::<RedisResult<_>>()?;
        let mut settings = redis::RedisConnectionInfo::default().set_db(parsed.db);
        if let Some(user) = &parsed.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &parsed.password {
            settings = settings.set_password(password);
        }
        Ok(Endpoint::Sentinel(Arc::new(SentinelMaster {
            sentinels: tokio::sync::Mutex::new(Sentinel::build(addresses)?),
            master_name: parsed.master_name,
            node: SentinelNodeConnectionInfo::default().set_redis_connection_info(settings).set_tcp_settings(tcp_settings()),
            last_lookup: Mutex::new(None),
        })))
    }

    /// A client for the server to use now: the one server, or the master the sentinels
    /// name (checked to call itself master).
    pub async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Endpoint::Server(client) => Ok(client.clone()),
            Endpoint::Sentinel(master) => master.lookup().await,
        }
    }

    /// A pub/sub connection to the server to use now.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        self.client().await?.get_async_pubsub().await
    }
}

impl SentinelMaster {
    async fn lookup(&self) -> RedisResult<redis::Client> {
        *self.last_lookup.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.sentinels.lock().await.async_master_for(&self.master_name, Some(&self.node)).await
    }

    /// A client for the master if it is no longer at `current`; None while it is, while
    /// the sentinels cannot say, or when another lookup ran moments ago.
    async fn moved_from(&self, current: &str) -> Option<redis::Client> {
        {
            let last = self.last_lookup.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < LOOKUP_INTERVAL) {
                return None;
            }
        }
        match self.lookup().await {
            Ok(client) if client.get_connection_info().addr().to_string() != current => Some(client),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!("Redis Sentinel has no master for {} yet: {e}", self.master_name);
                None
            }
        }
    }
}

/// Errors after which the master may have moved: the connection failed, or the server
/// turned replica, is loading, or lost its master.
fn may_mean_failover(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading))
        || e.code() == Some("UNBLOCKED")
}

/// A client for `url`, trusting the CA in `$TASKHOST_TLS_CA_FILE` for TLS if set.
pub fn client(url: &str) -> Result<redis::Client, RedisError> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?.set_tcp_settings(tcp_settings());
    match std::env::var_os(TLS_CA_ENV) {
        Some(path) if url.starts_with("rediss://") => {
            let root_cert = std::fs::read(&path)
                .map_err(|e| RedisError::from((redis::ErrorKind::InvalidClientConfig, "cannot read TLS CA file", e.to_string())))?;
            redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) })
        }
        _ => redis::Client::open(info),
    }
}

/// Connects with automatic reconnection. Each attempt retries briefly (0.1 + 0.2 + 0.4 s);
/// callers (the worker's loops) keep retrying with their own backoff after that.
///
/// With a `response_timeout`, a command without a reply in that time fails, and the
/// handle moves every later command to a new connection (see [`RedisConn`]). Through
/// Sentinel, a failed command also asks the sentinels whether the master moved.
pub async fn manager(url: &str, response_timeout: Option<Duration>) -> Result<RedisConn, RedisError> {
    let endpoint = Endpoint::for_url(url)?;
    let client = endpoint.client().await?;
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(1))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(response_timeout);
    let first = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
    Ok(RedisConn {
        current: first.clone(),
        generation: 0,
        shared: Arc::new(Shared {
            endpoint,
            config,
            generation: AtomicU64::new(0),
            slot: Mutex::new(Slot { generation: 0, manager: first, client }),
        }),
    })
}

/// A Redis connection shared by clones, as `ConnectionManager` is, that also gives up
/// on a connection whose replies stopped coming, and follows a master that moved.
///
/// `ConnectionManager` reconnects when the connection reports itself dropped, but a
/// response timeout leaves it on the same connection: behind a black hole (packets
/// dropped, no RST) every later command would wait out the timeout too, until the
/// kernel gives up on the socket. And it reconnects to the address it started with,
/// which after a Sentinel failover is a dead server or a read-only replica. Here such a
/// failure puts a new lazily-connecting manager in the shared slot (on the same server,
/// or on the new master); every handle moves to it at its next command. Commands
/// already in flight on the old one finish or fail there.
pub struct RedisConn {
    current: ConnectionManager,
    generation: u64,
    shared: Arc<Shared>,
}

struct Shared {
    endpoint: Endpoint,
    config: ConnectionManagerConfig,
    /// The slot's generation, read on every command without taking the lock.
    generation: AtomicU64,
    slot: Mutex<Slot>,
}

/// The connection handles use now, and the client (server) it was made for.
struct Slot {
    generation: u64,
    manager: ConnectionManager,
    client: redis::Client,
}

impl Clone for RedisConn {
    fn clone(&self) -> Self {
        let slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        RedisConn { current: slot.manager.clone(), generation: slot.generation, shared: self.shared.clone() }
    }
}

impl RedisConn {
    /// Moves this handle to the shared slot's connection if another handle replaced it.
    fn refresh(&mut self) {
        if self.shared.generation.load(Ordering::Acquire) != self.generation {
            *self = self.clone();
        }
    }

    async fn after<T>(&self, result: &RedisResult<T>) {
        let Err(e) = result else { return };
        let through_sentinel = matches!(self.shared.endpoint, Endpoint::Sentinel(_));
        if !e.is_timeout() && !(through_sentinel && may_mean_failover(e)) {
            return;
        }
        let current = {
            let slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
            // Only the first failure on a connection replaces it.
            if slot.generation != self.generation {
                return;
            }
            slot.client.clone()
        };
        let from = current.get_connection_info().addr().to_string();
        let moved = match &self.shared.endpoint {
            Endpoint::Sentinel(master) => master.moved_from(&from).await,
            Endpoint::Server(_) => None,
        };
        let client = match moved {
            Some(client) => client,
            None if e.is_timeout() => current,
            None => return,
        };
        let mut slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.generation != self.generation {
            return;
        }
        let to = client.get_connection_info().addr().to_string();
        match ConnectionManager::new_lazy_with_config(client.clone(), self.shared.config.clone()) {
            Ok(fresh) => {
                if to != from {
                    tracing::warn!("Redis Sentinel names a new master at {to} ({e}); following it");
                } else {
                    tracing::warn!("no reply from Redis in time ({e}); moving to a new connection");
                }
                *slot = Slot { generation: self.generation + 1, manager: fresh, client };
                self.shared.generation.store(self.generation + 1, Ordering::Release);
            }
            Err(e) => tracing::warn!("cannot replace a failed Redis connection: {e}"),
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.refresh();
            let result = self.current.req_packed_command(cmd).await;
            self.after(&result).await;
            result
        })
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.refresh();
            let result = self.current.req_packed_commands(pipeline, offset, count).await;
            self.after(&result).await;
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.current.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_is_read_as_kombu_reads_it() {
        let url = "sentinel://:s%3Acret@10.0.0.1:26380/3;sentinel://10.0.0.2;sentinel://[::1]:26381?master_name=queue-1";
        let parsed = parse_sentinel_url_with(url, None).unwrap();
        assert_eq!(
            parsed,
            SentinelUrl {
                sentinels: vec![("10.0.0.1".into(), 26380), ("10.0.0.2".into(), 26379), ("::1".into(), 26381)],
                master_name: "queue-1".into(),
                db: 3,
                username: None,
                password: Some("s:cret".into()),
            }
        );
        let with_user = parse_sentinel_url_with("sentinel://app:pw@h", Some("from-env".into())).unwrap();
        assert_eq!((with_user.username.as_deref(), with_user.password.as_deref()), (Some("app"), Some("pw")));
        assert_eq!(with_user.master_name, "from-env", "the environment names the master when the URL does not");
        let url_wins = parse_sentinel_url_with("sentinel://h?master_name=a", Some("b".into())).unwrap();
        assert_eq!(url_wins.master_name, "a");
    }

    #[test]
    fn a_sentinel_url_without_a_master_or_with_a_foreign_address_is_refused_without_its_password() {
        let no_master = parse_sentinel_url_with("sentinel://:hunter2@h:26379", None).unwrap_err();
        assert!(no_master.contains("master_name") && !no_master.contains("hunter2"), "{no_master}");
        let mixed = parse_sentinel_url_with("sentinel://h:26379;redis://:hunter2@h2:6379?master_name=m", None).unwrap_err();
        assert!(mixed.contains("sentinel://host") && !mixed.contains("hunter2"), "{mixed}");
        assert!(parse_sentinel_url_with("sentinel://h/x?master_name=m", None).unwrap_err().contains("not a number"));
        assert!(parse_sentinel_url_with(";", None).is_err());
    }

    #[test]
    fn failover_errors_are_told_from_command_errors() {
        let readonly = RedisError::from((ErrorKind::Server(ServerErrorKind::ReadOnly), "READONLY"));
        assert!(may_mean_failover(&readonly));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(may_mean_failover(&refused));
        let script = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "ERR in script"));
        assert!(!may_mean_failover(&script));
    }
}
