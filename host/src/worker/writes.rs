//! Batched writes: result records through the result flusher, acks through the ack
//! flusher, broker operations retried through outages, hand-backs and dead letters.

use super::*;

impl Worker {
    /// Stores a record, retrying through broker outages; false if it never got through.
    /// The record moves into the result flusher's batch and comes back only with an error,
    /// so a write that goes through copies nothing. The flusher writes every record queued
    /// in one turn with one backend call.
    pub(super) async fn store(&self, record: ResultRecord, custom_state: Option<&str>) -> bool {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut record = self.with_result_prefix(record);
        loop {
            match self.queue_result(record, custom_state.map(str::to_string)).await {
                Ok(Ok(_)) => return true,
                Ok(Err((e @ (BackendError::Connection(_) | BackendError::Command(_)), back)))
                    if started.elapsed() < STORE_GIVE_UP =>
                {
                    tracing::warn!(id = %back.task_id, "storing result failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    record = back;
                }
                Ok(Err((e, back))) => {
                    tracing::error!(id = %back.task_id, "giving up storing result; message stays unacked: {e}");
                    return false;
                }
                // The flusher went away with the record: only at shutdown, after every
                // handling has ended, so this is not expected to happen.
                Err(_) => {
                    tracing::error!("a result write was abandoned; its message stays unacked");
                    return false;
                }
            }
        }
    }

    /// The record with its tenant's key prefix: the task's own, or (a chain's remaining
    /// steps) its parent's.
    fn with_result_prefix(&self, mut record: ResultRecord) -> ResultRecord {
        if record.key_prefix.is_none() {
            let prefixes = self.result_prefixes.borrow();
            let prefix = prefixes.get(&record.task_id).or_else(|| record.parent_id.as_ref().and_then(|p| prefixes.get(p)));
            record.key_prefix = prefix.map(|(p, _)| p.clone()).filter(|p| !p.is_empty());
        }
        record
    }

    /// Writes queued records, a batch a backend call, one call at a time. Where the backend
    /// hands notices back ([`ResultBackend::store_many_notifying_later`]), a batch's
    /// handlings go on as soon as their records are written, and its notices lead the next
    /// call: one round trip a batch instead of two. Acks wait for those notices.
    pub(super) async fn result_flusher(self: Rc<Self>) {
        let mut owed = LateNotices::default();
        let mut backoff = Duration::from_millis(50);
        loop {
            if owed.is_empty() && self.queued_results.borrow().is_empty() {
                self.result_queued.notified().await;
            }
            // Let the other handlings of this turn queue theirs: one call writes them all
            // (and carries the notices owed, which otherwise would go alone).
            tokio::task::yield_now().await;
            let batch: Vec<QueuedResult> = {
                let mut queued = self.queued_results.borrow_mut();
                let n = queued.len().min(RESULT_BATCH);
                queued.drain(..n).collect()
            };
            if batch.is_empty() && owed.is_empty() {
                continue;
            }
            let (records, waiting): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|q| ((q.record, q.custom_state), q.done)).unzip();
            let outcome = self.backend.store_many_notifying_later(&mut owed, &records).await;
            if owed.is_empty() {
                // What was owed has gone out (the backend empties it once answered, even if
                // the call failed after that). Every ack held back so far was for a record
                // whose notice was owed before this call: this batch's handlings are still
                // waiting for their outcome below.
                let released = std::mem::take(&mut *self.acks_after_notices.borrow_mut());
                if !released.is_empty() {
                    self.pending_acks.borrow_mut().extend(released);
                    self.ack_queued.notify_one();
                }
            }
            match outcome {
                Ok((written, later)) => {
                    backoff = Duration::from_millis(50);
                    owed = later;
                    for (done, w) in waiting.into_iter().zip(written) {
                        let _ = done.send(Ok(w));
                    }
                }
                Err(e) => {
                    for (done, (record, _)) in waiting.into_iter().zip(records) {
                        let _ = done.send(Err((e.shared(), record)));
                    }
                    if !owed.is_empty() {
                        tracing::warn!(notices = owed.len(), "sending result notices failed, retrying in {backoff:?}: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
            self.notices_owed.set(!owed.is_empty());
            if owed.is_empty() {
                self.notices_sent.notify_waiters();
            }
        }
    }

    /// Queues a record for the result flusher without waiting for it: written once, in its
    /// turn behind the records queued before it (so its notice follows theirs), and not
    /// retried. For writes made outside a message's handling.
    pub(super) fn store_detached(&self, record: ResultRecord) {
        drop(self.queue_result(self.with_result_prefix(record), None));
    }

    /// Queues a record for the result flusher; where its outcome comes.
    fn queue_result(&self, record: ResultRecord, custom_state: Option<String>) -> tokio::sync::oneshot::Receiver<StoreOutcome> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.queued_results.borrow_mut().push(QueuedResult { record, custom_state, done });
        self.result_queued.notify_one();
        outcome
    }

    /// At shutdown, once every handling has ended: waits (at most [`STORE_GIVE_UP`], or a
    /// second when hurried) for the result flusher to send the notices it owes. Acks still
    /// held back for them are not sent: those messages stay unacked and are redelivered,
    /// and their redelivery sends the notice.
    pub(super) async fn wait_for_notices(&self) {
        let limit = if self.hurried.get() { Duration::from_secs(1) } else { STORE_GIVE_UP };
        let waited = tokio::time::timeout(limit, async {
            while self.notices_owed.get() {
                self.notices_sent.notified().await;
            }
        });
        if waited.await.is_err() {
            let held_back = self.acks_after_notices.borrow().len();
            tracing::error!(held_back, "result notices never went out; their messages stay unacked and will be redelivered");
        }
    }

    pub(super) async fn broker_op<F, Fut>(&self, what: &str, op: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), BrokerError>>,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match op().await {
                Ok(()) => return true,
                Err(e) if started.elapsed() < STORE_GIVE_UP => {
                    tracing::warn!("{what} failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!("giving up on {what}: {e}");
                    return false;
                }
            }
        }
    }

    /// Queues the ack of a message whose outcome was stored (or needed none); the ack
    /// flusher sends queued acks together (one transaction for many messages instead of
    /// one each), right after the tasks that queued them yield. While the result flusher
    /// owes notices, the ack waits for them: its record's may be among them.
    pub(super) async fn ack(&self, delivery: &Delivery) {
        let Some(tag) = &delivery.tag else { return };
        if self.notices_owed.get() {
            self.acks_after_notices.borrow_mut().push(tag.clone());
            return;
        }
        self.ack_without_outcome(delivery).await;
    }

    /// Queues the ack of a message that has no outcome stored by this handling: acked
    /// before it runs (`acks_late = false`), or parked on the broker to run later. It never
    /// waits for result notices: held unacked longer, it could run twice (the parked copy
    /// and a redelivery, or an at-most-once task again after a crash).
    pub(super) async fn ack_without_outcome(&self, delivery: &Delivery) {
        let Some(tag) = &delivery.tag else { return };
        self.pending_acks.borrow_mut().push(tag.clone());
        if self.pending_acks.borrow().len() >= ACK_BATCH {
            self.flush_acks().await;
        } else {
            self.ack_queued.notify_one();
        }
    }

    pub(super) async fn flush_acks(&self) {
        // Each flush takes the tags it sends, so two flushes in flight (the flusher and an
        // `ack` that filled a batch) never send or forget each other's. Tags go back to the
        // queue if the broker never took them or the flush is cut short (shutdown aborts
        // the flusher): the final flush sends them.
        let taken = AcksInFlight { worker: self, tags: std::mem::take(&mut *self.pending_acks.borrow_mut()) };
        if taken.tags.is_empty() {
            return;
        }
        if self.broker_op("ack", || self.broker.ack(&taken.tags)).await {
            let mut held = self.held.borrow_mut();
            for tag in &taken.tags {
                held.remove(tag);
            }
            taken.sent();
        }
    }

    pub(super) async fn ack_flusher(self: Rc<Self>) {
        loop {
            self.ack_queued.notified().await;
            // Let the other tasks that finished in this turn queue theirs too.
            tokio::task::yield_now().await;
            self.flush_acks().await;
        }
    }

    /// Hands a message back because the worker is stopping, and counts it.
    pub(super) async fn restore_on_shutdown(&self, delivery: &Delivery) {
        self.restore(delivery).await;
        self.stats.borrow_mut().restored_on_shutdown += 1;
    }

    pub(super) async fn restore(&self, delivery: &Delivery) {
        if self.broker_op("restore", || self.broker.restore(delivery)).await {
            if let Some(tag) = &delivery.tag {
                self.held.borrow_mut().remove(tag);
            }
        }
    }

    /// Records a dead letter; false if the broker never took it (the caller then keeps
    /// the message rather than acking it away).
    pub(super) async fn dead_letter(&self, delivery: &Delivery, decoded: Option<&Decoded>, reason: String) -> bool {
        self.stats.borrow_mut().dead_lettered += 1;
        self.on_dead_letter(&delivery.queue, decoded.map(|d| d.headers.task.as_str()));
        let letter = DeadLetter {
            letter_id: uuid::Uuid::new_v4().to_string(),
            id: decoded.map(|d| d.headers.id.clone()),
            task: decoded.map(|d| d.headers.task.clone()),
            queue: delivery.queue.clone(),
            reason,
            time: Utc::now(),
            message: letter_text(&delivery.raw),
        };
        self.broker_op("dead-letter", || self.broker.dead_letter(&letter)).await
    }
}

/// The original message as a dead letter keeps it: whole (so it can be replayed), except
/// one over the size limit, which would be refused again anyway — its first MiB is kept
/// for whoever looks into it, not three more copies of it in memory.
fn letter_text(raw: &[u8]) -> String {
    const KEPT: usize = 1 << 20;
    if raw.len() <= protocol::MAX_MESSAGE_BYTES {
        return String::from_utf8_lossy(raw).into_owned();
    }
    let mut text = String::from_utf8_lossy(&raw[..KEPT]).into_owned();
    text.push_str(&format!("… [{} more bytes not kept]", raw.len() - KEPT));
    text
}
