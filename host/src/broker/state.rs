//! Coordination state kept apart from the transport: `trait StateStore` (leases, beat ticks,
//! rate slots, revoked ids, task owners, usage, parked ETA messages, dead letters), its
//! PostgreSQL store, and `SplitBroker`, a transport's messages beside a store's state.

use super::{Broker, BrokerError, DeadLetter, Delivery, Fairness};
use crate::tenant::meter::UsageRow;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::str::FromStr as _;
use std::time::Duration;

/// Where a deployment's state goes when not on the broker: `TASKHOST_STATE` (or `--state`).
pub const STATE_ENV: &str = "TASKHOST_STATE";
/// Parked messages moved to their queues per transaction.
const MOVE_BATCH: i64 = 1000;

/// The state every worker, beat and CLI of a deployment shares, without the messages.
#[async_trait]
pub trait StateStore: Send + Sync {
    async fn park(&self, queue: &str, priority: u8, raw: &[u8], due: DateTime<Utc>) -> Result<(), BrokerError>;
    /// Publishes parked messages that are due on `transport`, then forgets them (a failed
    /// publish keeps them parked).
    async fn move_due(&self, transport: &dyn Broker) -> Result<usize, BrokerError>;
    /// Parked messages for these queues (for `gc`'s version scan).
    async fn parked(&self, queues: &[String]) -> Result<Vec<Vec<u8>>, BrokerError>;
    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError>;
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError>;
    async fn newest_dead_letters(&self, limit: usize) -> Result<(Vec<DeadLetter>, usize), BrokerError>;
    async fn remove_dead_letter(&self, letter_id: &str) -> Result<bool, BrokerError>;
    async fn remember_revoked(&self, ids: &[String], until: DateTime<Utc>) -> Result<(), BrokerError>;
    async fn revoked(&self) -> Result<Vec<String>, BrokerError>;
    async fn reserve_rate_slot(&self, key: &str, interval: Duration) -> Result<Duration, BrokerError>;
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError>;
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError>;
    async fn claim_tick(&self, entry: &str, due: DateTime<Utc>) -> Result<bool, BrokerError>;
    async fn last_tick(&self, entry: &str) -> Result<Option<DateTime<Utc>>, BrokerError>;
    /// Claims the tick and publishes its message on `transport` in one transaction of the
    /// store: a publish that fails leaves the tick unclaimed.
    async fn claim_tick_and_publish(
        &self,
        entry: &str,
        due: DateTime<Utc>,
        transport: &dyn Broker,
        queue: &str,
        priority: u8,
        raw: &[u8],
    ) -> Result<bool, BrokerError>;
    async fn claim_task_ids(&self, claims: &[(String, String)], ttl: Duration) -> Result<Vec<Option<String>>, BrokerError>;
    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), BrokerError>;
    async fn usage(&self, since_hour: i64) -> Result<Vec<UsageRow>, BrokerError>;
}

/// The result backend's URL, where a transport without state of its own (RabbitMQ) keeps
/// it when no `--state` is given.
pub const RESULT_BACKEND_ENV: &str = "TASKHOST_RESULT_BACKEND";

/// Whether a URL names a store [`connect_store`] opens.
pub fn is_state_url(url: &str) -> bool {
    super::is_redis_url(url) || crate::backend::sql::Dialect::of_url(url).is_some_and(|(d, _)| d == crate::backend::sql::Dialect::Postgres)
}

pub async fn connect_store(url: &str) -> Result<Box<dyn StateStore>, BrokerError> {
    if super::is_redis_url(url) {
        Ok(Box::new(super::RedisBroker::connect(url).await?))
    } else if is_state_url(url) {
        Ok(Box::new(PgState::connect(url).await?))
    } else {
        Err(BrokerError::UnsupportedUrl(format!("{url} (the state store takes redis:// or postgresql://)")))
    }
}

/// A transport for messages, and a store for everything else.
pub struct SplitBroker {
    pub transport: Box<dyn Broker>,
    pub store: Box<dyn StateStore>,
}

#[async_trait]
impl Broker for SplitBroker {
    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        self.transport.fetch(queues, max, wait).await
    }
    async fn fetch_within(&self, queues: &[String], max: usize, budget: f64, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        self.transport.fetch_within(queues, max, budget, wait).await
    }
    async fn ack(&self, tags: &[String]) -> Result<(), BrokerError> {
        self.transport.ack(tags).await
    }
    async fn restore(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        self.transport.restore(delivery).await
    }
    async fn touch(&self, tags: &[String]) -> Result<(), BrokerError> {
        self.transport.touch(tags).await
    }
    async fn restore_expired(&self, visibility: Duration) -> Result<usize, BrokerError> {
        self.transport.restore_expired(visibility).await
    }
    async fn publish(&self, queue: &str, priority: u8, raw: &[u8]) -> Result<(), BrokerError> {
        self.transport.publish(queue, priority, raw).await
    }
    async fn publish_many(&self, queue: &str, priority: u8, raws: &[Vec<u8>]) -> Result<(), BrokerError> {
        self.transport.publish_many(queue, priority, raws).await
    }
    async fn schedule(&self, queue: &str, priority: u8, raw: &[u8], due: DateTime<Utc>) -> Result<(), BrokerError> {
        self.store.park(queue, priority, raw, due).await
    }
    async fn move_due(&self) -> Result<usize, BrokerError> {
        self.store.move_due(self.transport.as_ref()).await
    }
    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        self.store.dead_letter(letter).await
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError> {
        self.store.dead_letters().await
    }
    async fn remove_dead_letter(&self, letter_id: &str) -> Result<bool, BrokerError> {
        self.store.remove_dead_letter(letter_id).await
    }
    async fn newest_dead_letters(&self, limit: usize) -> Result<(Vec<DeadLetter>, usize), BrokerError> {
        self.store.newest_dead_letters(limit).await
    }
    async fn broadcast(&self, raw: &[u8]) -> Result<(), BrokerError> {
        self.transport.broadcast(raw).await
    }
    async fn control_stream(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        self.transport.control_stream().await
    }
    async fn reply(&self, exchange: &str, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError> {
        self.transport.reply(exchange, routing_key, raw).await
    }
    async fn publish_event(&self, routing_key: &str, raw: &[u8]) -> Result<(), BrokerError> {
        self.transport.publish_event(routing_key, raw).await
    }
    async fn event_stream(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, BrokerError> {
        self.transport.event_stream().await
    }
    async fn declare_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError> {
        self.transport.declare_reply_queue(routing_key).await
    }
    async fn take_replies(&self, routing_key: &str, wait: Duration) -> Result<Vec<Vec<u8>>, BrokerError> {
        self.transport.take_replies(routing_key, wait).await
    }
    async fn remove_reply_queue(&self, routing_key: &str) -> Result<(), BrokerError> {
        self.transport.remove_reply_queue(routing_key).await
    }
    async fn queue_lengths(&self, queues: &[String]) -> Result<Vec<u64>, BrokerError> {
        self.transport.queue_lengths(queues).await
    }
    async fn remember_revoked(&self, ids: &[String], until: DateTime<Utc>) -> Result<(), BrokerError> {
        self.store.remember_revoked(ids, until).await
    }
    async fn revoked(&self) -> Result<Vec<String>, BrokerError> {
        self.store.revoked().await
    }
    async fn reserve_rate_slot(&self, key: &str, interval: Duration) -> Result<Duration, BrokerError> {
        self.store.reserve_rate_slot(key, interval).await
    }
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        self.store.lease(name, holder, ttl).await
    }
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        self.store.release_lease(name, holder).await
    }
    async fn claim_tick(&self, entry: &str, due: DateTime<Utc>) -> Result<bool, BrokerError> {
        self.store.claim_tick(entry, due).await
    }
    async fn last_tick(&self, entry: &str) -> Result<Option<DateTime<Utc>>, BrokerError> {
        self.store.last_tick(entry).await
    }
    async fn claim_tick_and_publish(
        &self,
        entry: &str,
        due: DateTime<Utc>,
        queue: &str,
        priority: u8,
        raw: &[u8],
    ) -> Result<bool, BrokerError> {
        self.store.claim_tick_and_publish(entry, due, self.transport.as_ref(), queue, priority, raw).await
    }
    async fn claim_task_ids(&self, claims: &[(String, String)], ttl: Duration) -> Result<Vec<Option<String>>, BrokerError> {
        self.store.claim_task_ids(claims, ttl).await
    }
    /// Fair dispatch sorts messages inside the transport (Redis), so it stays there.
    async fn set_fairness(&self, fairness: Option<&Fairness>, queues: &[String]) -> Result<(), BrokerError> {
        self.transport.set_fairness(fairness, queues).await
    }
    async fn report_costs(&self, costs: &[(String, f64)], corrections: &[(String, f64)]) -> Result<(), BrokerError> {
        self.transport.report_costs(costs, corrections).await
    }
    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), BrokerError> {
        self.store.add_usage(rows).await
    }
    async fn usage(&self, since_hour: i64) -> Result<Vec<UsageRow>, BrokerError> {
        self.store.usage(since_hour).await
    }
    async fn queued(&self, queues: &[String]) -> Result<Vec<Vec<u8>>, BrokerError> {
        let mut all = self.transport.queued(queues).await?;
        all.extend(self.store.parked(queues).await?);
        Ok(all)
    }
}

/// The state in PostgreSQL tables of taskhost's own (`taskhost_*`), times on the server's clock.
pub struct PgState {
    pool: sqlx::PgPool,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS taskhost_parked (id BIGSERIAL PRIMARY KEY, queue TEXT NOT NULL, priority SMALLINT NOT NULL, \
     body BYTEA NOT NULL, due TIMESTAMPTZ NOT NULL)",
    "CREATE INDEX IF NOT EXISTS taskhost_parked_due ON taskhost_parked (due)",
    "CREATE TABLE IF NOT EXISTS taskhost_dead_letters (id BIGSERIAL PRIMARY KEY, letter_id TEXT NOT NULL, record TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS taskhost_dead_letters_letter ON taskhost_dead_letters (letter_id)",
    "CREATE TABLE IF NOT EXISTS taskhost_revoked (task_id TEXT PRIMARY KEY, until TIMESTAMPTZ NOT NULL)",
    "CREATE TABLE IF NOT EXISTS taskhost_rate_slots (key TEXT PRIMARY KEY, tat TIMESTAMPTZ NOT NULL)",
    "CREATE TABLE IF NOT EXISTS taskhost_leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until TIMESTAMPTZ NOT NULL)",
    "CREATE TABLE IF NOT EXISTS taskhost_beat_ticks (entry TEXT PRIMARY KEY, due TIMESTAMPTZ NOT NULL)",
    "CREATE TABLE IF NOT EXISTS taskhost_task_owners (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, until TIMESTAMPTZ NOT NULL)",
    "CREATE TABLE IF NOT EXISTS taskhost_usage (hour BIGINT NOT NULL, tenant TEXT NOT NULL, task TEXT NOT NULL, metric TEXT NOT NULL, \
     value DOUBLE PRECISION NOT NULL, PRIMARY KEY (hour, tenant, task, metric))",
];

fn err(e: sqlx::Error) -> BrokerError {
    if crate::backend::sql::is_connection_error(&e) {
        BrokerError::Connection(format!("state store: {e}"))
    } else {
        BrokerError::Command(format!("state store: {e}"))
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PgState {
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let (_, sqlx_url) = crate::backend::sql::Dialect::of_url(url).ok_or_else(|| BrokerError::UnsupportedUrl(url.to_string()))?;
        let opts = sqlx::postgres::PgConnectOptions::from_str(&sqlx_url).map_err(|e| BrokerError::Connection(e.to_string()))?;
        crate::backend::sql::probe::<sqlx::PgConnection>(&opts).await.map_err(|e| BrokerError::Connection(e.to_string()))?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| BrokerError::Connection(e.to_string()))?;
        let mut tx = pool.begin().await.map_err(err)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('taskhost.state'))").execute(&mut *tx).await.map_err(err)?;
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&mut *tx).await.map_err(err)?;
        }
        tx.commit().await.map_err(err)?;
        Ok(PgState { pool })
    }
}

const CLAIM_TICK: &str = "INSERT INTO taskhost_beat_ticks (entry, due) VALUES ($1, $2) ON CONFLICT (entry) DO UPDATE \
                          SET due = EXCLUDED.due WHERE taskhost_beat_ticks.due < EXCLUDED.due";

#[async_trait]
impl StateStore for PgState {
    async fn park(&self, queue: &str, priority: u8, raw: &[u8], due: DateTime<Utc>) -> Result<(), BrokerError> {
        sqlx::query("INSERT INTO taskhost_parked (queue, priority, body, due) VALUES ($1, $2, $3, $4)")
            .bind(queue)
            .bind(i16::from(priority))
            .bind(raw)
            .bind(due)
            .execute(&self.pool)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn move_due(&self, transport: &dyn Broker) -> Result<usize, BrokerError> {
        let mut moved = 0;
        loop {
            let mut tx = self.pool.begin().await.map_err(err)?;
            // Taken under row locks other movers skip: each message goes out from one of them.
            let due: Vec<(String, i16, Vec<u8>)> = sqlx::query_as(
                "DELETE FROM taskhost_parked WHERE id IN (SELECT id FROM taskhost_parked WHERE due <= now() \
                 ORDER BY due, id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING queue, priority, body",
            )
            .bind(MOVE_BATCH)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
            if due.is_empty() {
                return Ok(moved);
            }
            let n = due.len();
            // Runs of one queue and priority go out together, in due order.
            let mut start = 0;
            while start < n {
                let (queue, priority) = (&due[start].0, due[start].1);
                let end = (start..n).find(|&i| &due[i].0 != queue || due[i].1 != priority).unwrap_or(n);
                let raws: Vec<Vec<u8>> = due[start..end].iter().map(|(_, _, b)| b.clone()).collect();
                // A failed publish rolls the delete back (the transaction is dropped).
                transport.publish_many(queue, priority.clamp(0, 255) as u8, &raws).await?;
                start = end;
            }
            tx.commit().await.map_err(err)?;
            moved += n;
            if (n as i64) < MOVE_BATCH {
                return Ok(moved);
            }
        }
    }

    async fn parked(&self, queues: &[String]) -> Result<Vec<Vec<u8>>, BrokerError> {
        sqlx::query_scalar("SELECT body FROM taskhost_parked WHERE queue = ANY($1) ORDER BY due, id")
            .bind(queues)
            .fetch_all(&self.pool)
            .await
            .map_err(err)
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        let json = serde_json::to_string(letter).expect("dead letter serializes");
        sqlx::query("INSERT INTO taskhost_dead_letters (letter_id, record) VALUES ($1, $2)")
            .bind(&letter.letter_id)
            .bind(json)
            .execute(&self.pool)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT record FROM taskhost_dead_letters ORDER BY id").fetch_all(&self.pool).await.map_err(err)?;
        Ok(rows.iter().filter_map(|r| serde_json::from_str(r).ok()).collect())
    }

    async fn newest_dead_letters(&self, limit: usize) -> Result<(Vec<DeadLetter>, usize), BrokerError> {
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM taskhost_dead_letters").fetch_one(&self.pool).await.map_err(err)?;
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT record FROM (SELECT id, record FROM taskhost_dead_letters ORDER BY id DESC LIMIT $1) newest ORDER BY id",
        )
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        Ok((rows.iter().filter_map(|r| serde_json::from_str(r).ok()).collect(), total as usize))
    }

    async fn remove_dead_letter(&self, letter_id: &str) -> Result<bool, BrokerError> {
        let done = sqlx::query("DELETE FROM taskhost_dead_letters WHERE letter_id = $1").bind(letter_id).execute(&self.pool).await.map_err(err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn remember_revoked(&self, ids: &[String], until: DateTime<Utc>) -> Result<(), BrokerError> {
        sqlx::query(
            "INSERT INTO taskhost_revoked (task_id, until) SELECT unnest($1::text[]), $2 ON CONFLICT (task_id) \
             DO UPDATE SET until = GREATEST(taskhost_revoked.until, EXCLUDED.until)",
        )
        .bind(ids)
        .bind(until)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        Ok(())
    }

    async fn revoked(&self) -> Result<Vec<String>, BrokerError> {
        sqlx::query("DELETE FROM taskhost_revoked WHERE until < now()").execute(&self.pool).await.map_err(err)?;
        sqlx::query_scalar("SELECT task_id FROM taskhost_revoked").fetch_all(&self.pool).await.map_err(err)
    }

    /// GCRA on the server's clock: the slot is the later of now and the key's theoretical
    /// arrival time, which moves one interval on.
    async fn reserve_rate_slot(&self, key: &str, interval: Duration) -> Result<Duration, BrokerError> {
        let wait: f64 = sqlx::query_scalar(
            "INSERT INTO taskhost_rate_slots AS s (key, tat) VALUES ($1, now() + make_interval(secs => $2)) \
             ON CONFLICT (key) DO UPDATE SET tat = GREATEST(s.tat, now()) + make_interval(secs => $2) \
             RETURNING EXTRACT(EPOCH FROM (s.tat - now()))::float8 - $2",
        )
        .bind(key)
        .bind(secs(interval))
        .fetch_one(&self.pool)
        .await
        .map_err(err)?;
        Ok(Duration::try_from_secs_f64(wait.max(0.0)).unwrap_or(Duration::MAX))
    }

    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let done = sqlx::query(
            "INSERT INTO taskhost_leases AS l (name, holder, until) VALUES ($1, $2, now() + make_interval(secs => $3)) \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until \
             WHERE l.holder = EXCLUDED.holder OR l.until <= now()",
        )
        .bind(name)
        .bind(holder)
        .bind(secs(ttl))
        .execute(&self.pool)
        .await
        .map_err(err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        sqlx::query("DELETE FROM taskhost_leases WHERE name = $1 AND holder = $2").bind(name).bind(holder).execute(&self.pool).await.map_err(err)?;
        Ok(())
    }

    async fn claim_tick(&self, entry: &str, due: DateTime<Utc>) -> Result<bool, BrokerError> {
        let done = sqlx::query(CLAIM_TICK).bind(entry).bind(due).execute(&self.pool).await.map_err(err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn last_tick(&self, entry: &str) -> Result<Option<DateTime<Utc>>, BrokerError> {
        sqlx::query_scalar("SELECT due FROM taskhost_beat_ticks WHERE entry = $1").bind(entry).fetch_optional(&self.pool).await.map_err(err)
    }

    async fn claim_tick_and_publish(
        &self,
        entry: &str,
        due: DateTime<Utc>,
        transport: &dyn Broker,
        queue: &str,
        priority: u8,
        raw: &[u8],
    ) -> Result<bool, BrokerError> {
        let mut tx = self.pool.begin().await.map_err(err)?;
        let claimed = sqlx::query(CLAIM_TICK).bind(entry).bind(due).execute(&mut *tx).await.map_err(err)?.rows_affected() == 1;
        if !claimed {
            return Ok(false);
        }
        // The row stays locked while the message goes out: another beat waits, then sees
        // the tick claimed; a publish that fails drops the transaction and the claim.
        transport.publish(queue, priority, raw).await?;
        tx.commit().await.map_err(err)?;
        Ok(true)
    }

    async fn claim_task_ids(&self, claims: &[(String, String)], ttl: Duration) -> Result<Vec<Option<String>>, BrokerError> {
        let mut tx = self.pool.begin().await.map_err(err)?;
        let mut owners = Vec::with_capacity(claims.len());
        for (id, tenant) in claims {
            let taken = sqlx::query(
                "INSERT INTO taskhost_task_owners AS o (id, tenant, until) VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (id) DO UPDATE SET tenant = EXCLUDED.tenant, until = EXCLUDED.until \
                 WHERE o.tenant = EXCLUDED.tenant OR o.until <= now()",
            )
            .bind(id)
            .bind(tenant)
            .bind(secs(ttl))
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected()
                == 1;
            if taken {
                owners.push(None);
            } else {
                let owner: Option<String> =
                    sqlx::query_scalar("SELECT tenant FROM taskhost_task_owners WHERE id = $1").bind(id).fetch_optional(&mut *tx).await.map_err(err)?;
                owners.push(owner);
            }
        }
        tx.commit().await.map_err(err)?;
        Ok(owners)
    }

    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), BrokerError> {
        let mut tx = self.pool.begin().await.map_err(err)?;
        for row in rows {
            for (metric, value) in row.counts.sums() {
                sqlx::query(
                    "INSERT INTO taskhost_usage AS u (hour, tenant, task, metric, value) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (hour, tenant, task, metric) DO UPDATE SET value = u.value + EXCLUDED.value",
                )
                .bind(row.hour)
                .bind(&row.tenant)
                .bind(&row.task)
                .bind(metric)
                .bind(value)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            }
            sqlx::query(
                "INSERT INTO taskhost_usage AS u (hour, tenant, task, metric, value) VALUES ($1, $2, $3, 'memory_high_water', $4) \
                 ON CONFLICT (hour, tenant, task, metric) DO UPDATE SET value = GREATEST(u.value, EXCLUDED.value)",
            )
            .bind(row.hour)
            .bind(&row.tenant)
            .bind(&row.task)
            .bind(row.counts.memory_high_water as f64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    async fn usage(&self, since_hour: i64) -> Result<Vec<UsageRow>, BrokerError> {
        let cells: Vec<(i64, String, String, String, f64)> =
            sqlx::query_as("SELECT hour, tenant, task, metric, value FROM taskhost_usage WHERE hour >= $1 ORDER BY hour, tenant, task")
                .bind(since_hour)
                .fetch_all(&self.pool)
                .await
                .map_err(err)?;
        Ok(crate::tenant::meter::rows_from_cells(cells))
    }
}
