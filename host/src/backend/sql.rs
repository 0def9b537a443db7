//! Results in Celery's SQLAlchemy tables (`celery_taskmeta`, `celery_tasksetmeta`) on
//! PostgreSQL or MySQL/MariaDB, written and read as Celery 5.7's DatabaseBackend does.

use super::{BackendError, ResultBackend};
use crate::canvas::ChordEntry;
use crate::protocol::{ResultRecord, State};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};
use std::str::FromStr as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a worker deletes expired rows (Celery's `celery.backend_cleanup` runs daily;
/// the worker does it itself, so no beat is needed for expiry).
const CLEANUP_EVERY: Duration = Duration::from_secs(300);
/// Waiting for a connection from the pool longer than this is an outage, not a queue.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Celery's extended-result columns, in its model's order.
const EXTENDED_COLUMNS: [&str; 6] = ["name", "args", "kwargs", "worker", "retries", "queue"];

/// Which server, and the SQL that differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    /// MySQL, or MariaDB (which has sequences, so SQLAlchemy gives its `id` one as on PostgreSQL).
    MySql,
}

impl Dialect {
    /// The dialect a result-backend URL names: `postgresql://`, `postgres://`, `mysql://`,
    /// `mariadb://`, each also with Celery's `db+` prefix and an SQLAlchemy `+driver`.
    pub fn of_url(url: &str) -> Option<(Dialect, String)> {
        let url = url.strip_prefix("db+").unwrap_or(url);
        let (scheme, rest) = url.split_once("://")?;
        let base = scheme.split('+').next().unwrap_or(scheme);
        match base {
            "postgresql" | "postgres" => Some((Dialect::Postgres, format!("postgres://{rest}"))),
            "mysql" | "mariadb" => Some((Dialect::MySql, format!("mysql://{rest}"))),
            _ => None,
        }
    }

    fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("${n}"),
            Dialect::MySql => "?".to_string(),
        }
    }
}

/// Whether a URL names a SQL result backend this module serves.
pub fn is_sql_url(url: &str) -> bool {
    Dialect::of_url(url).is_some()
}

enum Pool {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
}

/// The same statement code for either pool: the body is compiled once per database type.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Pg($p) => $body,
            Pool::My($p) => $body,
        }
    };
}

/// The statements, built once for the table as it is on the server.
struct Statements {
    /// PostgreSQL: one upsert that leaves a SUCCESS alone. MySQL: the plain insert.
    insert: String,
    /// MySQL only: the update of an existing row that is not a SUCCESS.
    update: String,
    select: String,
    cleanup_tasks: String,
    cleanup_groups: String,
}

pub struct SqlBackend {
    pool: Pool,
    dialect: Dialect,
    expires: Option<Duration>,
    /// Which optional columns the table has (then they are written and read).
    layout: Written,
    statements: Statements,
    last_cleanup: Mutex<Option<Instant>>,
}

/// Every statement here is built from this file's constants (the columns chosen among them),
/// never from a task's data (that is always bound).
fn audited(sql: &str) -> sqlx::AssertSqlSafe<&str> {
    sqlx::AssertSqlSafe(sql)
}

/// Whether an error is the connection's (worth retrying elsewhere), not the statement's.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_))
}

fn db_err(e: sqlx::Error) -> BackendError {
    if is_connection_error(&e) {
        BackendError::Connection(e.to_string())
    } else {
        BackendError::Command(e.to_string())
    }
}

/// One record as the columns Celery writes.
struct Row {
    task_id: String,
    status: String,
    result: Option<Vec<u8>>,
    date_done: Option<NaiveDateTime>,
    traceback: Option<String>,
    children: Option<Vec<u8>>,
    name: Option<String>,
    args: Option<Vec<u8>>,
    kwargs: Option<Vec<u8>>,
    worker: Option<String>,
    retries: Option<i32>,
    queue: Option<String>,
}

/// Celery's `date_done`: naive UTC (the column has no zone), as its `app.now()` stores it.
fn naive_utc(iso: &str) -> Option<NaiveDateTime> {
    DateTime::parse_from_rfc3339(iso).ok().map(|d| d.with_timezone(&Utc).naive_utc())
}

fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values serialize")
}

impl Row {
    /// The columns of a record, encoded with the JSON serializer as Celery's
    /// `_update_result` does: result, children, args and kwargs as JSON bytes.
    fn of(record: &ResultRecord, custom_state: Option<&str>) -> Row {
        let status = match (record.status, custom_state) {
            (State::Custom, Some(state)) => state.to_string(),
            (s, _) => serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        };
        let ext = &record.extended;
        let text = |k: &str| ext.get(k).and_then(Value::as_str).map(str::to_string);
        Row {
            task_id: record.task_id.clone(),
            status,
            result: Some(json_bytes(&record.result)),
            date_done: record.date_done.as_deref().and_then(naive_utc),
            traceback: record.traceback.clone(),
            children: (!record.children.is_empty()).then(|| json_bytes(&Value::Array(record.children.clone()))),
            name: text("name"),
            args: ext.get("args").map(json_bytes),
            kwargs: ext.get("kwargs").map(json_bytes),
            worker: text("worker"),
            retries: ext.get("retries").and_then(Value::as_i64).and_then(|r| i32::try_from(r).ok()),
            queue: text("queue"),
        }
    }
}

/// One connection first: a refused connection or login is told as the server told it
/// (a pool would retry until its timeout and say only that it timed out).
pub(crate) async fn probe<C: sqlx::Connection>(opts: &C::Options) -> Result<(), sqlx::Error> {
    let conn = C::connect_with(opts).await?;
    let _ = conn.close().await;
    Ok(())
}

/// What a server tells of the tables at connect time.
struct Layout {
    columns: Vec<String>,
    /// The `id` is drawn from `task_id_sequence` (SQLAlchemy's `Sequence`), not a default.
    id_from_sequence: bool,
}

impl SqlBackend {
    /// Connects with a pool of `pool_size` connections, creates Celery's tables where they
    /// are absent (with the DDL SQLAlchemy emits for them), and reads their layout.
    /// `extended`: write (and read) the `result_extended` columns, where the table has them.
    pub async fn connect(url: &str, expires: Option<Duration>, pool_size: u32, extended: bool) -> Result<Self, BackendError> {
        let (dialect, sqlx_url) = Dialect::of_url(url).ok_or_else(|| BackendError::UnsupportedUrl(url.to_string()))?;
        let pool_size = pool_size.max(1);
        let pool = match dialect {
            Dialect::Postgres => {
                let opts = sqlx::postgres::PgConnectOptions::from_str(&sqlx_url).map_err(|e| BackendError::Connection(e.to_string()))?;
                probe::<sqlx::PgConnection>(&opts).await.map_err(|e| BackendError::Connection(e.to_string()))?;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(pool_size)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(opts)
                    .await
                    .map_err(|e| BackendError::Connection(e.to_string()))?;
                Pool::Pg(pool)
            }
            Dialect::MySql => {
                let opts = sqlx::mysql::MySqlConnectOptions::from_str(&sqlx_url).map_err(|e| BackendError::Connection(e.to_string()))?;
                probe::<sqlx::MySqlConnection>(&opts).await.map_err(|e| BackendError::Connection(e.to_string()))?;
                let pool = sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(pool_size)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    // Celery's `_update_result` stores UTC; a session zone would shift DATETIMEs.
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::Executor::execute(conn, "SET time_zone = '+00:00'").await?;
                            Ok(())
                        })
                    })
                    .connect_with(opts)
                    .await
                    .map_err(|e| BackendError::Connection(e.to_string()))?;
                Pool::My(pool)
            }
        };
        let layout = ensure_tables(&pool, dialect).await?;
        let has = |c: &str| layout.columns.iter().any(|have| have == c);
        let written = Written { children: has("children"), extended: extended && EXTENDED_COLUMNS.iter().all(|c| has(c)) };
        let statements = statements(dialect, layout.id_from_sequence, written);
        Ok(SqlBackend { pool, dialect, expires, layout: written, statements, last_cleanup: Mutex::new(None) })
    }

    /// Deletes task and group rows older than the result expiry, as `celery.backend_cleanup`.
    pub async fn delete_expired(&self) -> Result<u64, BackendError> {
        let Some(expires) = self.expires else { return Ok(0) };
        let cutoff = (Utc::now() - chrono::TimeDelta::from_std(expires).unwrap_or(chrono::TimeDelta::MAX)).naive_utc();
        let s = &self.statements;
        on_pool!(&self.pool, p => {
            let tasks = sqlx::query(audited(&s.cleanup_tasks)).bind(cutoff).execute(p).await.map_err(db_err)?.rows_affected();
            let groups = sqlx::query(audited(&s.cleanup_groups)).bind(cutoff).execute(p).await.map_err(db_err)?.rows_affected();
            Ok(tasks + groups)
        })
    }

    async fn cleanup_if_due(&self) {
        if self.expires.is_none() {
            return;
        }
        {
            let mut last = self.last_cleanup.lock().expect("cleanup clock");
            if last.is_some_and(|t| t.elapsed() < CLEANUP_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        match self.delete_expired().await {
            Ok(n) if n > 0 => tracing::info!(rows = n, "deleted expired results"),
            Ok(_) => {}
            Err(e) => tracing::warn!("deleting expired results failed: {e}"),
        }
    }

    async fn write_rows(&self, rows: &[Row]) -> Result<Vec<bool>, BackendError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let s = &self.statements;
        let layout = self.layout;
        let written = on_pool!(&self.pool, p => {
            let mut tx = p.begin().await.map_err(db_err)?;
            let mut written = Vec::with_capacity(rows.len());
            for row in rows {
                let insert = bind_row(sqlx::query(audited(&s.insert)), row, layout, true);
                match insert.execute(&mut *tx).await {
                    Ok(done) => written.push(done.rows_affected() > 0),
                    // MySQL: the row is there; update it unless it is a SUCCESS (the
                    // update matches no row then). PostgreSQL's upsert never gets here.
                    Err(sqlx::Error::Database(e)) if e.kind() == sqlx::error::ErrorKind::UniqueViolation && self.dialect == Dialect::MySql => {
                        let update = bind_row(sqlx::query(audited(&s.update)), row, layout, false).bind(row.task_id.as_str());
                        written.push(update.execute(&mut *tx).await.map_err(db_err)?.rows_affected() > 0);
                    }
                    Err(e) => return Err(db_err(e)),
                }
            }
            tx.commit().await.map_err(db_err)?;
            written
        });
        self.cleanup_if_due().await;
        Ok(written)
    }
}

/// Binds a row's columns in the order [`statements`] lists them (`task_id` first on insert).
fn bind_row<'q, DB>(
    mut q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>,
    row: &'q Row,
    layout: Written,
    with_task_id: bool,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q [u8]>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<NaiveDateTime>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i32>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    if with_task_id {
        q = q.bind(row.task_id.as_str());
    }
    q = q
        .bind(row.status.as_str())
        .bind(row.result.as_deref())
        .bind(row.date_done)
        .bind(row.traceback.as_deref());
    if layout.children {
        q = q.bind(row.children.as_deref());
    }
    if layout.extended {
        q = q
            .bind(row.name.as_deref())
            .bind(row.args.as_deref())
            .bind(row.kwargs.as_deref())
            .bind(row.worker.as_deref())
            .bind(row.retries)
            .bind(row.queue.as_deref());
    }
    q
}

/// Which of Celery's optional columns the table has (and so are written and read).
#[derive(Debug, Clone, Copy)]
struct Written {
    /// Tables made before Celery 5.5 have no `children`.
    children: bool,
    /// `result_extended`'s name, args, kwargs, worker, retries, queue.
    extended: bool,
}

impl Written {
    /// The written columns after `task_id`, in bind order.
    fn columns(self) -> Vec<&'static str> {
        let mut cols = vec!["status", "result", "date_done", "traceback"];
        if self.children {
            cols.push("children");
        }
        if self.extended {
            cols.extend(EXTENDED_COLUMNS);
        }
        cols
    }
}

fn statements(dialect: Dialect, id_from_sequence: bool, layout: Written) -> Statements {
    let ph = |n: usize| dialect.placeholder(n);
    let names: Vec<&str> = std::iter::once("task_id").chain(layout.columns()).collect();
    let values: Vec<String> = (1..=names.len()).map(ph).collect();
    let (id_col, id_val) = match (dialect, id_from_sequence) {
        (_, false) => (String::new(), String::new()),
        (Dialect::Postgres, true) => ("id, ".to_string(), "nextval('task_id_sequence'), ".to_string()),
        (Dialect::MySql, true) => ("id, ".to_string(), "NEXT VALUE FOR task_id_sequence, ".to_string()),
    };
    let insert = match dialect {
        Dialect::Postgres => {
            let sets: Vec<String> = names[1..].iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
            format!(
                "INSERT INTO celery_taskmeta ({id_col}{}) VALUES ({id_val}{}) ON CONFLICT (task_id) DO UPDATE SET {} \
                 WHERE celery_taskmeta.status IS DISTINCT FROM 'SUCCESS'",
                names.join(", "),
                values.join(", "),
                sets.join(", ")
            )
        }
        Dialect::MySql => format!(
            "INSERT INTO celery_taskmeta ({id_col}{}) VALUES ({id_val}{})",
            names.join(", "),
            values.join(", ")
        ),
    };
    // MySQL's update binds the written columns, then the task id (placeholders are `?`).
    let update_sets: Vec<String> = names[1..].iter().map(|c| format!("{c} = ?")).collect();
    let update = format!(
        "UPDATE celery_taskmeta SET {} WHERE task_id = ? AND (status IS NULL OR status <> 'SUCCESS')",
        update_sets.join(", ")
    );
    let select_cols = layout.columns();
    let select = format!("SELECT {} FROM celery_taskmeta WHERE task_id = {}", select_cols.join(", "), ph(1));
    Statements {
        insert,
        update,
        select,
        cleanup_tasks: format!("DELETE FROM celery_taskmeta WHERE date_done < {}", ph(1)),
        cleanup_groups: format!("DELETE FROM celery_tasksetmeta WHERE date_done < {}", ph(1)),
    }
}

/// The DDL SQLAlchemy emits for Celery's models on this server (checked against
/// `metadata.create_all` on PostgreSQL 15 and MariaDB 10.11): a sequence for each `id`
/// where the server has sequences, else MySQL's AUTO_INCREMENT. The extended columns are
/// always there: Celery's `TaskExtended` extends the one table whether or not
/// `result_extended` is on.
fn ddl(dialect: Dialect, sequences: bool) -> Vec<String> {
    let (binary, datetime) = match dialect {
        Dialect::Postgres => ("BYTEA", "TIMESTAMP WITHOUT TIME ZONE"),
        Dialect::MySql => ("BLOB", "DATETIME"),
    };
    let id = if sequences { "id INTEGER NOT NULL" } else { "id INTEGER NOT NULL AUTO_INCREMENT" };
    let extended_cols = format!(
        "\tname VARCHAR(155), \n\targs {binary}, \n\tkwargs {binary}, \n\tworker VARCHAR(155), \n\tretries INTEGER, \n\tqueue VARCHAR(155), \n\tstamps {binary}, \n"
    );
    let mut out = Vec::new();
    if sequences {
        out.push("CREATE SEQUENCE task_id_sequence".to_string());
    }
    out.push(format!(
        "CREATE TABLE celery_taskmeta (\n\t{id}, \n\ttask_id VARCHAR(155), \n\tstatus VARCHAR(50), \n\tresult {binary}, \n\t\
         date_done {datetime}, \n\ttraceback TEXT, \n\tchildren {binary}, \n{extended_cols}\tPRIMARY KEY (id), \n\tUNIQUE (task_id)\n)"
    ));
    out.push("CREATE INDEX ix_celery_taskmeta_date_done ON celery_taskmeta (date_done)".to_string());
    if sequences {
        out.push("CREATE SEQUENCE taskset_id_sequence".to_string());
    }
    out.push(format!(
        "CREATE TABLE celery_tasksetmeta (\n\t{id}, \n\ttaskset_id VARCHAR(155), \n\tresult {binary}, \n\tdate_done {datetime}, \n\t\
         PRIMARY KEY (id), \n\tUNIQUE (taskset_id)\n)"
    ));
    out.push("CREATE INDEX ix_celery_tasksetmeta_date_done ON celery_tasksetmeta (date_done)".to_string());
    out
}

/// Creates the tables if absent, under a server-side lock so that worker processes
/// starting together do not race, then reads the task table's columns and id default.
async fn ensure_tables(pool: &Pool, dialect: Dialect) -> Result<Layout, BackendError> {
    let setup = |e: sqlx::Error| BackendError::Connection(format!("setting up Celery's tables: {e}"));
    match pool {
        Pool::Pg(p) => {
            let mut tx = p.begin().await.map_err(setup)?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('taskhost.celery_taskmeta'))").execute(&mut *tx).await.map_err(setup)?;
            let exists: Option<String> =
                sqlx::query_scalar("SELECT to_regclass('celery_taskmeta')::text").fetch_one(&mut *tx).await.map_err(setup)?;
            if exists.is_none() {
                for stmt in ddl(dialect, true) {
                    sqlx::query(audited(&stmt)).execute(&mut *tx).await.map_err(setup)?;
                }
            }
            let columns: Vec<(String, Option<String>)> = sqlx::query_as(
                "SELECT column_name::text, column_default::text FROM information_schema.columns \
                 WHERE table_name = 'celery_taskmeta' AND table_schema = current_schema()",
            )
            .fetch_all(&mut *tx)
            .await
            .map_err(setup)?;
            let sequence: Option<String> =
                sqlx::query_scalar("SELECT to_regclass('task_id_sequence')::text").fetch_one(&mut *tx).await.map_err(setup)?;
            tx.commit().await.map_err(setup)?;
            let id_default = columns.iter().any(|(c, d)| c == "id" && d.is_some());
            Ok(Layout { id_from_sequence: sequence.is_some() && !id_default, columns: columns.into_iter().map(|(c, _)| c).collect() })
        }
        Pool::My(p) => {
            let mut conn = p.acquire().await.map_err(setup)?;
            let _: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('taskhost.celery_taskmeta', 30)")
                .fetch_one(&mut *conn)
                .await
                .map_err(setup)?;
            let result = async {
                let version: String = sqlx::query_scalar("SELECT VERSION()").fetch_one(&mut *conn).await?;
                // SQLAlchemy gives MariaDB 10.3+ sequences (it has them), MySQL AUTO_INCREMENT.
                let sequences = version.contains("MariaDB") && mariadb_has_sequences(&version);
                let exists: Option<String> = sqlx::query_scalar(
                    "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'celery_taskmeta'",
                )
                .fetch_optional(&mut *conn)
                .await?;
                if exists.is_none() {
                    for stmt in ddl(dialect, sequences) {
                        sqlx::query(audited(&stmt)).execute(&mut *conn).await?;
                    }
                }
                let columns: Vec<(String, String)> = sqlx::query_as(
                    "SELECT CAST(COLUMN_NAME AS CHAR), CAST(EXTRA AS CHAR) FROM information_schema.COLUMNS \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'celery_taskmeta'",
                )
                .fetch_all(&mut *conn)
                .await?;
                let sequence: Option<String> = sqlx::query_scalar(
                    "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() \
                     AND TABLE_NAME = 'task_id_sequence' AND TABLE_TYPE = 'SEQUENCE'",
                )
                .fetch_optional(&mut *conn)
                .await?;
                let auto = columns.iter().any(|(c, extra)| c == "id" && extra.to_ascii_lowercase().contains("auto_increment"));
                Ok::<_, sqlx::Error>(Layout { id_from_sequence: sequence.is_some() && !auto, columns: columns.into_iter().map(|(c, _)| c).collect() })
            }
            .await;
            let _ = sqlx::query("SELECT RELEASE_LOCK('taskhost.celery_taskmeta')").execute(&mut *conn).await;
            result.map_err(setup)
        }
    }
}

/// MariaDB has sequences from 10.3 (`10.11.19-MariaDB-0+deb12u1`).
fn mariadb_has_sequences(version: &str) -> bool {
    let mut parts = version.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (10, 3)
}

/// A row read back as Celery's record.
fn record_of<R: sqlx::Row>(task_id: &str, row: &R, layout: Written) -> Result<ResultRecord, BackendError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<NaiveDateTime>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i32>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    usize: sqlx::ColumnIndex<R>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let corrupt = |reason: String| BackendError::Corrupt { task_id: task_id.to_string(), reason };
    let get = |e: sqlx::Error| corrupt(e.to_string());
    let status: Option<String> = row.try_get("status").map_err(get)?;
    let decode = |column: &str, bytes: Option<Vec<u8>>| -> Result<Value, BackendError> {
        match bytes {
            None => Ok(Value::Null),
            Some(b) if b.first() == Some(&0x80) => Err(corrupt(format!("{column} is a pickle, not JSON (result_serializer must be json)"))),
            Some(b) => serde_json::from_slice(&b).map_err(|e| corrupt(format!("{column} is not JSON: {e}"))),
        }
    };
    let mut record = Map::new();
    record.insert("status".into(), Value::from(status.unwrap_or_else(|| "PENDING".into())));
    record.insert("result".into(), decode("result", row.try_get("result").map_err(get)?)?);
    let traceback: Option<String> = row.try_get("traceback").map_err(get)?;
    record.insert("traceback".into(), traceback.map_or(Value::Null, Value::from));
    let children_value = if layout.children { decode("children", row.try_get("children").map_err(get)?)? } else { Value::Null };
    record.insert("children".into(), if children_value.is_null() { Value::Array(Vec::new()) } else { children_value });
    let date_done: Option<NaiveDateTime> = row.try_get("date_done").map_err(get)?;
    let date_done = date_done.map(|d| d.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Micros, false));
    record.insert("date_done".into(), date_done.map_or(Value::Null, Value::from));
    record.insert("task_id".into(), Value::from(task_id));
    if layout.extended {
        let name: Option<String> = row.try_get("name").map_err(get)?;
        let worker: Option<String> = row.try_get("worker").map_err(get)?;
        let queue: Option<String> = row.try_get("queue").map_err(get)?;
        let retries: Option<i32> = row.try_get("retries").map_err(get)?;
        record.insert("name".into(), name.map_or(Value::Null, Value::from));
        record.insert("args".into(), decode("args", row.try_get("args").map_err(get)?)?);
        record.insert("kwargs".into(), decode("kwargs", row.try_get("kwargs").map_err(get)?)?);
        record.insert("worker".into(), worker.map_or(Value::Null, Value::from));
        record.insert("retries".into(), retries.map_or(Value::Null, Value::from));
        record.insert("queue".into(), queue.map_or(Value::Null, Value::from));
    }
    serde_json::from_value(Value::Object(record)).map_err(|e| corrupt(e.to_string()))
}

#[async_trait]
impl ResultBackend for SqlBackend {
    async fn store(&self, record: &ResultRecord, custom_state: Option<&str>) -> Result<bool, BackendError> {
        let rows = [Row::of(record, custom_state)];
        Ok(self.write_rows(&rows).await?.first().copied().unwrap_or(false))
    }

    async fn store_many(&self, records: &[(ResultRecord, Option<String>)]) -> Result<Vec<bool>, BackendError> {
        let rows: Vec<Row> = records.iter().map(|(r, state)| Row::of(r, state.as_deref())).collect();
        self.write_rows(&rows).await
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultRecord>, BackendError> {
        let layout = self.layout;
        on_pool!(&self.pool, p => {
            let row = sqlx::query(audited(&self.statements.select)).bind(task_id).fetch_optional(p).await.map_err(db_err)?;
            row.map(|r| record_of(task_id, &r, layout)).transpose()
        })
    }

    /// Polls, as Celery's database backend does (there is no notification to wait on).
    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultRecord, BackendError> {
        super::poll_until_ready(self, task_id, timeout, Duration::from_millis(5), 1.5, Duration::from_millis(100)).await
    }

    fn native_join(&self) -> bool {
        false
    }

    async fn chord_init(&self, _group_id: &str, _size: u64) -> Result<(), BackendError> {
        Ok(())
    }

    /// Chords on a SQL backend are joined by `celery.chord_unlock`, as Celery's are.
    async fn chord_join(&self, _group_id: &str, _group_index: u64, _entry: &ChordEntry) -> Result<Option<(Vec<ChordEntry>, String)>, BackendError> {
        Ok(None)
    }

    async fn chord_done(&self, _group_id: &str, _token: &str) -> Result<(), BackendError> {
        Ok(())
    }

    async fn cleanup(&self) -> Result<u64, BackendError> {
        self.delete_expired().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_dialect_with_or_without_celerys_prefixes() {
        assert_eq!(Dialect::of_url("db+postgresql://u@h/db").unwrap(), (Dialect::Postgres, "postgres://u@h/db".into()));
        assert_eq!(Dialect::of_url("postgresql+psycopg://u@h/db").unwrap().0, Dialect::Postgres);
        assert_eq!(Dialect::of_url("db+mysql+pymysql://root@h:3306/x").unwrap(), (Dialect::MySql, "mysql://root@h:3306/x".into()));
        assert_eq!(Dialect::of_url("mariadb://h/x").unwrap().0, Dialect::MySql);
        assert!(Dialect::of_url("redis://h").is_none());
        assert!(Dialect::of_url("db+sqlite:///x").is_none());
    }

    #[test]
    fn mariadb_versions_with_sequences() {
        assert!(mariadb_has_sequences("10.11.19-MariaDB-0+deb12u1"));
        assert!(mariadb_has_sequences("11.4.2-MariaDB"));
        assert!(!mariadb_has_sequences("10.2.44-MariaDB"));
    }

    #[test]
    fn rows_encode_as_celerys_update_result() {
        let mut r = ResultRecord::success("t", serde_json::json!({"x": [1, 2]}));
        r.children = vec![serde_json::json!([["c", null], null])];
        let row = Row::of(&r, None);
        assert_eq!(row.status, "SUCCESS");
        assert_eq!(row.result.as_deref(), Some(&br#"{"x":[1,2]}"#[..]));
        assert!(row.date_done.is_some());
        assert_eq!(row.children.as_deref(), Some(&br#"[[["c",null],null]]"#[..]));
        let custom = Row::of(&ResultRecord::custom("t", serde_json::json!({"done": 3})), Some("PROGRESS"));
        assert_eq!(custom.status, "PROGRESS");
        assert_eq!(custom.date_done, None);
    }

    #[test]
    fn ddl_is_what_sqlalchemy_emits() {
        let pg = ddl(Dialect::Postgres, true);
        assert_eq!(pg[0], "CREATE SEQUENCE task_id_sequence");
        assert!(pg[1].starts_with("CREATE TABLE celery_taskmeta (\n\tid INTEGER NOT NULL, \n\ttask_id VARCHAR(155), "));
        assert!(pg[1].contains("result BYTEA") && pg[1].contains("date_done TIMESTAMP WITHOUT TIME ZONE"));
        let mysql = ddl(Dialect::MySql, false);
        assert!(mysql[0].contains("id INTEGER NOT NULL AUTO_INCREMENT") && mysql[0].contains("stamps BLOB"));
        assert_eq!(mysql.len(), 4);
    }
}
