//! Taking messages in: fetching while there is room, polling the handlings, catching a
//! handling's panic, and the graceful drain at shutdown.

use super::*;

impl Worker {
    /// Fetches while there is room and runs what it fetched. Handlings are polled here,
    /// not spawned: a `LocalSet` runs up to 61 tasks before the runtime looks at its
    /// sockets again, which put ~3 ms between asking for more messages and getting
    /// them, longer than the default prefetch lasts when tasks take microseconds (the
    /// cores sat 15% idle in the no-op drain). Yielding every few handlings
    /// ([`HANDLED_PER_TURN_FETCHING`]) lets the broker's replies in that much sooner.
    pub(super) async fn consume(self: Rc<Self>, mut stop: watch::Receiver<bool>) -> Handlings {
        let mut handlings = Handlings::new();
        let mut backoff = Duration::from_millis(100);
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut fetching: Option<Pin<Box<dyn Future<Output = Result<Vec<Delivery>, BrokerError>>>>> = None;
        let mut handled_this_turn = 0;
        loop {
            let stopping = *stop.borrow();
            if fetching.is_none() {
                if stopping {
                    break;
                }
                let room = self.prefetch_limit().saturating_sub(self.in_progress.get());
                // Refill in batches: fetching one message each time one finishes would cost
                // a broker round trip per task. An idle worker (nothing held) fetches at once.
                let low_water = (self.prefetch_limit() / 2).max(1);
                let idle = self.in_progress.get() == 0;
                // Messages waiting only for their result write do not hold back the next
                // fetch, up to a prefetch's worth of them: what is held stays within twice
                // the prefetch.
                let settled_enough = self.settling.get() < self.prefetch_limit();
                let mut wanted = room > 0 && (room >= low_water || idle) && settled_enough;
                // Under fair dispatch, no more than a little work waits here: what waits
                // here was handed out in the order of its turn, and a tenant arriving now
                // would queue behind all of it.
                let mut budget = f64::INFINITY;
                if self.fair.get() {
                    let waiting = Duration::from_nanos(self.waiting_charge_ns.get());
                    wanted &= idle || waiting < FAIR_LOOKAHEAD / 2;
                    budget = FAIR_LOOKAHEAD.saturating_sub(waiting).as_secs_f64();
                }
                if wanted && retry_at.is_none() {
                    let (broker, keys) = (self.broker.clone(), self.queues.borrow().clone());
                    fetching = Some(Box::pin(async move { broker.fetch_within(&keys, room, budget, FETCH_WAIT).await }));
                }
            }
            // A fetch in flight is never dropped, only awaited: a BRPOP abandoned on the
            // server would still pop (and lose) the next message.
            tokio::select! {
                got = async { fetching.as_mut().expect("guarded").await }, if fetching.is_some() => {
                    fetching = None;
                    match got {
                        Ok(deliveries) => {
                            backoff = Duration::from_millis(100);
                            for d in deliveries {
                                if let Some(tag) = &d.tag {
                                    self.held.borrow_mut().insert(tag.clone());
                                }
                                handlings.push(self.clone().handling(d));
                            }
                            // Round robin across queues, as kombu does.
                            let mut queues = self.queues.borrow_mut();
                            if queues.len() > 1 {
                                queues.rotate_left(1);
                            }
                        }
                        Err(e) => {
                            tracing::warn!("fetch failed, retrying in {:?}: {e}", backoff);
                            retry_at = Some(tokio::time::Instant::now() + backoff);
                            // At most 1 s: consuming resumes within ~1 s of the broker's
                            // return, and a failed attempt costs one refused connect.
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
                Some(()) = handlings.next(), if !handlings.is_empty() => {
                    handled_this_turn += 1;
                    let per_turn = if fetching.is_some() { HANDLED_PER_TURN_FETCHING } else { HANDLED_PER_TURN };
                    if handled_this_turn >= per_turn {
                        handled_this_turn = 0;
                        tokio::task::yield_now().await;
                    }
                }
                // In a block: select! makes every branch's future each turn, and a sleep
                // made here read the clock once a handled message.
                _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    retry_at = None;
                }
                // A handling waiting for its rate-limit turn frees its slot without ending.
                _ = self.slot_freed.notified() => {}
                _ = stop.changed(), if !stopping => {}
            }
        }
        handlings
    }

    /// One message's handling, as `consume` and `drain` poll it: counted while it lasts.
    /// A panic in it is caught and the message dead-lettered with the reason: handing it
    /// back would only run into the same panic at every redelivery, forever.
    pub(super) fn handling(self: Rc<Self>, delivery: Delivery) -> Pin<Box<dyn Future<Output = ()>>> {
        let counted = InProgress::new(&self, delivery.charge);
        let delivery = Rc::new(delivery);
        let worker = self.clone();
        // Every line logged while handling it carries the task's id, name, version, queue
        // and tenant (filled in as they become known).
        let span = tracing::info_span!(
            "task",
            id = tracing::field::Empty,
            task = tracing::field::Empty,
            version = tracing::field::Empty,
            queue = %delivery.queue,
            tenant = tracing::field::Empty,
        );
        // Boxed on its own, the handling (~5 KB) is copied once, into its box; built inside
        // the wrappers below, it was copied at each.
        let handle: Pin<Box<dyn Future<Output = ()>>> = Box::pin(self.handle(delivery.clone(), counted));
        let caught = std::panic::AssertUnwindSafe(tracing::Instrument::instrument(handle, span)).catch_unwind();
        // Chained, not awaited in an async block: `.await` moves the captured future into
        // the block's state at its first poll, a copy of the whole handling (KBs) a message.
        Box::pin(caught.then(move |outcome| async move {
            if let Err(payload) = outcome {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                worker.after_panic(&delivery, &what).await;
            }
        }))
    }

    /// What a panicked handling leaves: no running entry, a dead letter with the reason,
    /// a FAILURE for the task, and the message acked (or handed back if no letter could
    /// be written, so it is never lost).
    pub(super) async fn after_panic(&self, delivery: &Delivery, what: &str) {
        let decoded = protocol::decode(&delivery.raw).ok();
        if let Some(d) = &decoded {
            self.running.borrow_mut().remove(&d.headers.id);
            self.span_starts.borrow_mut().remove(&d.headers.id);
        }
        let reason = format!("the worker panicked handling this message: {what}");
        tracing::error!(queue = %delivery.queue, id = ?decoded.as_ref().map(|d| &d.headers.id), "{reason}; dead-lettered");
        if !self.dead_letter(delivery, decoded.as_ref(), reason.clone()).await {
            self.restore(delivery).await;
            return;
        }
        if let Some(d) = &decoded {
            if d.headers.ignore_result != Some(true) {
                let exc = ExceptionInfo::new(outcome::TASKHOST_MODULE, "WorkerPanic", reason.as_str());
                let mut record = ResultRecord::failure(&d.headers.id, &exc, Some(format!("taskhost: {reason}")));
                self.link_fields(&mut record, d);
                self.store(record, None).await;
            }
        }
        {
            let mut stats = self.stats.borrow_mut();
            stats.processed += 1;
            stats.failed += 1;
        }
        self.ack(delivery).await;
    }

    /// Makes the shutdown skip its grace period: running tasks are stopped and requeued
    /// at once. For a worker whose supervisor is gone, which must hand back what it holds
    /// and exit promptly rather than run on unsupervised.
    pub fn hurry(&self) {
        self.hurried.set(true);
        self.hurry_now.notify_one();
    }

    pub(super) async fn drain(&self, mut handlings: Handlings) {
        let grace = if self.hurried.get() { Duration::ZERO } else { self.cfg.shutdown_grace };
        tracing::info!(in_progress = self.in_progress.get(), grace = ?grace, "draining: no new messages; waiting for running tasks");
        self.draining.send_replace(true);
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = handlings.next() => if next.is_none() { break },
                _ = async { tokio::select! { _ = &mut deadline => {}, _ = self.hurry_now.notified() => {} } }, if !self.killing.get() => {
                    tracing::warn!(running = self.running.borrow().len(), "grace period over: stopping running tasks and requeueing them");
                    self.killing.set(true);
                    for running in self.running.borrow().values() {
                        running.control.revoke();
                    }
                }
            }
        }
        let restored = self.stats.borrow().restored_on_shutdown;
        tracing::info!(restored, "drained");
    }
}
