//! taskhost: a Celery-compatible task worker whose tasks are sandboxed WebAssembly components.
//!
//! Module map (arrows are "calls"):
//!
//! ```text
//! cli ──► worker ──► runtime      wasmtime engine, sandbox, limits (the only wasmtime user)
//!   │        ├─────► registry     components on disk, versions, hot swap, signed releases,
//!   │        │                    rollout state, the follower of the broker's release store
//!   │        ├─────► broker       trait Broker + transports (Redis, SQLite, RabbitMQ); ReleaseStore
//!   │        │                    (releases on Redis/SQLite); StateStore (coordination state on
//!   │        │                    Redis or PostgreSQL beside a transport: always beside RabbitMQ)
//!   │        └─────► backend      Celery-format results (Redis, SQLite, PostgreSQL/MySQL tables)
//!   └──────────────► protocol     Celery message protocol v2 (kombu's envelope, its AMQP parts),
//!                                 pure encode/decode
//! worker ──► canvas               chain / group / chord bookkeeping (pure)
//! cli ──► beat ──► broker          periodic tasks: lease, persisted ticks
//! worker ──► tenant               tenant identity, policy (tenants.toml), metering
//! observe: tracing setup shared by all; ceilings: the operator's limits, read by
//! runtime (memory, compiles, clocks), registry (manifests) and worker (messages).
//! ```

pub mod alloc;
pub mod backend;
pub mod beat;
pub mod broker;
pub mod canvas;
pub mod ceilings;
pub mod cli;
#[doc(hidden)]
pub mod fuzzing;
pub mod observe;
pub mod protocol;
pub mod registry;
pub mod runtime;
pub mod tenant;
pub mod worker;
