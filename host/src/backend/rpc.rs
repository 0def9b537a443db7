//! Celery's `rpc://` result backend: each record goes to the reply queue of the client
//! that sent the task (its `reply_to`), on the RabbitMQ broker; nothing is kept to read back.

use super::{BackendError, ResultBackend};
use crate::broker::amqp::AmqpBroker;
use crate::canvas::ChordEntry;
use crate::protocol::ResultRecord;
use async_trait::async_trait;
use std::time::Duration;

/// How a worker names `rpc://` internally: the broker URL it replies over, after `rpc+`.
pub const SCHEME: &str = "rpc+";

/// Whether a result backend URL is `rpc://` (as given) or its internal `rpc+amqp://…` form.
pub fn is_rpc_url(url: &str) -> bool {
    url == "rpc:" || url.starts_with("rpc://") || url.starts_with(SCHEME)
}

/// The internal form of a result backend URL: `rpc://` (as Celery spells it) becomes
/// `rpc+<broker>`, since it replies over the broker; any other URL is kept.
pub fn over_broker(backend: String, broker: &str) -> String {
    if is_rpc_url(&backend) && !backend.starts_with(SCHEME) {
        format!("{SCHEME}{broker}")
    } else {
        backend
    }
}

pub struct RpcBackend {
    broker: AmqpBroker,
}

fn unreadable() -> BackendError {
    BackendError::Command("rpc:// results go to the client that sent the task; there is nothing to read back".into())
}

impl RpcBackend {
    /// `rpc+amqp://…`: replies go over that broker.
    pub async fn connect(url: &str) -> Result<RpcBackend, BackendError> {
        let broker_url = url.strip_prefix(SCHEME).filter(|b| crate::broker::amqp::is_amqp_url(b)).ok_or_else(|| {
            BackendError::UnsupportedUrl(format!("{url} (rpc:// needs a RabbitMQ broker: amqp:// or amqps://)"))
        })?;
        let broker = AmqpBroker::connect(broker_url).await.map_err(|e| BackendError::Connection(e.to_string()))?;
        Ok(RpcBackend { broker })
    }
}

#[async_trait]
impl ResultBackend for RpcBackend {
    /// A record of a task sent without `reply_to` has nowhere to go (as with Celery) and
    /// counts as stored.
    async fn store(&self, record: &ResultRecord, custom_state: Option<&str>) -> Result<bool, BackendError> {
        let Some(reply_to) = record.reply_to.as_deref() else { return Ok(true) };
        let json = record.to_json(custom_state).into_bytes();
        self.broker.send_reply(reply_to, &record.task_id, json).await.map_err(|e| match e {
            crate::broker::BrokerError::Connection(m) => BackendError::Connection(m),
            other => BackendError::Command(other.to_string()),
        })?;
        Ok(true)
    }

    async fn store_many(&self, records: &[(ResultRecord, Option<String>)]) -> Result<Vec<bool>, BackendError> {
        let mut stored = Vec::with_capacity(records.len());
        for (record, state) in records {
            stored.push(self.store(record, state.as_deref()).await?);
        }
        Ok(stored)
    }

    async fn get(&self, _task_id: &str) -> Result<Option<ResultRecord>, BackendError> {
        Err(unreadable())
    }

    async fn wait(&self, _task_id: &str, _timeout: Option<Duration>) -> Result<ResultRecord, BackendError> {
        Err(unreadable())
    }

    fn native_join(&self) -> bool {
        false
    }

    async fn chord_init(&self, _group_id: &str, _size: u64) -> Result<(), BackendError> {
        Err(BackendError::Command("chords need a result backend that keeps results (Redis or a database), not rpc://".into()))
    }

    async fn chord_join(&self, _group_id: &str, _group_index: u64, _entry: &ChordEntry) -> Result<Option<(Vec<ChordEntry>, String)>, BackendError> {
        Err(BackendError::Command("chords need a result backend that keeps results (Redis or a database), not rpc://".into()))
    }

    async fn chord_done(&self, _group_id: &str, _token: &str) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rpc_urls_are_recognised_in_both_forms() {
        assert!(super::is_rpc_url("rpc://"));
        assert!(super::is_rpc_url("rpc+amqp://guest:guest@h/v"));
        assert!(!super::is_rpc_url("redis://h/0"));
    }

    #[test]
    fn rpc_names_the_broker_it_replies_over() {
        let broker = "amqp://g:g@h/v";
        assert_eq!(super::over_broker("rpc://".into(), broker), "rpc+amqp://g:g@h/v");
        assert_eq!(super::over_broker("rpc://localhost".into(), broker), "rpc+amqp://g:g@h/v");
        assert_eq!(super::over_broker("rpc+amqp://g:g@h/v".into(), "amqp://other"), "rpc+amqp://g:g@h/v");
        assert_eq!(super::over_broker("redis://h/0".into(), broker), "redis://h/0");
    }
}
