//! What follows a run: SUCCESS/FAILURE/RETRY/REVOKED records, chain steps, links and
//! chords, retries, dead letters for what cannot run, and the ack or hand-back.

use super::*;

impl Worker {
    pub(super) async fn finish(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        task: &TaskVersion,
        run: TaskRun,
        sent_ids: Vec<String>,
        ignore_result: bool,
        acks_late: bool,
    ) {
        let h = &decoded.headers;
        {
            let mut stats = self.stats.borrow_mut();
            stats.processed += 1;
            stats.grant_denials += u64::from(run.denials);
            match stats.per_task.get_mut(&h.task) {
                Some(count) => *count += 1,
                None => {
                    stats.per_task.insert(h.task.clone(), 1);
                }
            }
        }
        if !run.stdout.text.is_empty() || !run.stderr.text.is_empty() {
            tracing::debug!(task = %h.task, id = %h.id, stdout = %run.stdout.text, stderr = %run.stderr.text, "guest output");
        }
        let error = match run.result {
            Ok(json) => {
                let value: serde_json::Value = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
                let duration_ms = run.elapsed.as_secs_f64() * 1e3;
                // Debug, not info: at tens of thousands of tasks a second a line each would
                // flood the log (Celery's worker logs successes only at `-l info`, not by default).
                tracing::debug!(task = %h.task, id = %h.id, outcome = "succeeded", duration_ms, "succeeded in {:.3}s: {json}", run.elapsed.as_secs_f64());
                self.stats.borrow_mut().succeeded += 1;
                self.registry.record_outcome(task, true);
                self.on_succeeded(&delivery.queue, decoded, &value, run.elapsed);
                // Celery's order: next chain step and links first, then the SUCCESS naming them.
                let mut children: Vec<serde_json::Value> = sent_ids.iter().map(|id| canvas::child_tuple(id)).collect();
                children.extend(self.hand_on(decoded, &value).await);
                let stored = ignore_result || {
                    let mut record = ResultRecord::success(&h.id, value.clone());
                    record.children = children;
                    self.link_fields(&mut record, decoded);
                    self.store(record, None).await
                };
                self.chord_member_done(decoded, "SUCCESS", value).await;
                self.settle(delivery, stored, acks_late).await;
                return;
            }
            Err(e) => e,
        };
        // Only failures name the version (in their traceback).
        let version = task.version.to_string();
        let retry_reason = match &error {
            TaskError::Retry { reason, countdown } => Some((reason.clone(), *countdown)),
            TaskError::Trap { .. } if task.manifest.autoretry.contains(&AutoRetry::Trap) => Some((error.to_string(), None)),
            TaskError::TimeLimit { .. } if task.manifest.autoretry.contains(&AutoRetry::TimeLimit) => {
                Some((error.to_string(), None))
            }
            TaskError::MemoryLimit { .. } if task.manifest.autoretry.contains(&AutoRetry::MemoryLimit) => {
                Some((error.to_string(), None))
            }
            _ => None,
        };
        let max_retries = task
            .manifest
            .max_retries
            .unwrap_or(retry::DEFAULT_MAX_RETRIES)
            .min(self.runtime.config().ceilings.max_retries);
        if let Some((reason, countdown)) = retry_reason {
            if h.retries < max_retries {
                self.retry(delivery, decoded, task, &reason, countdown, ignore_result, acks_late).await;
                return;
            }
            let exc = outcome::max_retries_exceeded(
                &h.task,
                &h.id,
                &protocol::args_repr(&decoded.args()),
                &protocol::kwargs_repr(&decoded.kwargs()),
            );
            let traceback = format!("taskhost: {}@{version}: retries exhausted ({max_retries}); last: {reason}", h.task);
            tracing::warn!(task = %h.task, id = %h.id, outcome = "failed", duration_ms = run.elapsed.as_secs_f64() * 1e3, "{}", exc.message());
            // The outcome is stored either way; a lost letter is logged by broker_op.
            let _ = self.dead_letter(delivery, Some(decoded), format!("max retries ({max_retries}) exceeded: {reason}")).await;
            self.registry.record_outcome(task, false);
            self.fail(delivery, decoded, &exc, traceback, ignore_result, acks_late).await;
            return;
        }
        if error == TaskError::Revoked {
            tracing::info!(task = %h.task, id = %h.id, outcome = "revoked", duration_ms = run.elapsed.as_secs_f64() * 1e3, "terminated by revoke");
            self.on_revoked(&delivery.queue, decoded, true, false);
            let mut record = ResultRecord::revoked(&h.id, "terminated");
            self.link_fields(&mut record, decoded);
            let revoked = record.result.clone();
            let stored = ignore_result || self.store(record, None).await;
            self.chord_member_done(decoded, "REVOKED", revoked).await;
            self.settle(delivery, stored, acks_late).await;
            return;
        }
        tracing::info!(task = %h.task, id = %h.id, outcome = "failed", duration_ms = run.elapsed.as_secs_f64() * 1e3, "failed: {error}");
        if let TaskError::Reject { reason } = &error {
            self.on_rejected(&delivery.queue, decoded);
            // The outcome is stored either way; a lost letter is logged by broker_op.
            let _ = self.dead_letter(delivery, Some(decoded), format!("rejected by the task: {reason}")).await;
        }
        let exc = outcome::exception_for(&error);
        let traceback = outcome::traceback_for(&h.task, &version, &error, &run.stderr.text);
        self.registry.record_outcome(task, false);
        self.fail(delivery, decoded, &exc, traceback, ignore_result, acks_late).await;
    }

    /// Boxed, as [`Worker::skip_unrun`] is: inline, it made `finish` (boxed for every
    /// message) twice as large.
    pub(super) fn fail<'a>(
        &'a self,
        delivery: &'a Delivery,
        decoded: &'a Decoded,
        exc: &'a ExceptionInfo,
        traceback: String,
        ignore_result: bool,
        acks_late: bool,
    ) -> futures::future::LocalBoxFuture<'a, ()> {
        Box::pin(self.fail_inline(delivery, decoded, exc, traceback, ignore_result, acks_late))
    }

    async fn fail_inline(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        exc: &ExceptionInfo,
        traceback: String,
        ignore_result: bool,
        acks_late: bool,
    ) {
        self.stats.borrow_mut().failed += 1;
        self.on_failed(&delivery.queue, decoded, exc, &traceback);
        // The rest of a chain never runs: each of its ids reads the same failure, stored
        // first so that a client woken by this task's FAILURE already sees them.
        for id in canvas::remaining_chain_ids(&decoded.embed) {
            if !self.may_write_result_for(decoded, &id).await {
                continue;
            }
            let mut step = ResultRecord::failure(&id, exc, Some(traceback.clone()));
            step.parent_id = Some(decoded.headers.id.clone());
            self.store(step, None).await;
        }
        let mut record = ResultRecord::failure(&decoded.headers.id, exc, Some(traceback.clone()));
        self.link_fields(&mut record, decoded);
        let stored = ignore_result || self.store(record, None).await;
        let lineage = canvas::Lineage { headers: &decoded.headers, origin: &self.cfg.node_name };
        for errback in canvas::errbacks(&decoded.embed, &lineage, DEFAULT_QUEUE) {
            self.publish_task(&errback).await;
        }
        let exc_value = serde_json::to_value(exc).expect("exception serializes");
        self.chord_member_done(decoded, "FAILURE", exc_value).await;
        self.settle(delivery, stored, acks_late).await;
    }

    /// After an outcome: with acks-late, ack once it is stored, or hand the message back
    /// if it could not be stored (so it runs again instead of staying held forever).
    /// Without acks-late it was acked before running and there is nothing left to do.
    pub(super) async fn settle(&self, delivery: &Delivery, stored: bool, acks_late: bool) {
        match (acks_late, stored) {
            (false, _) => {}
            (true, true) => self.ack(delivery).await,
            (true, false) => self.restore(delivery).await,
        }
    }

    /// Publishes the next chain step and link callbacks after a success; their ids as
    /// `children` tuples.
    /// A plain task has none: its future then holds nothing (the publishing one, ~2 KB,
    /// is made and boxed only where a chain or link is there to publish).
    pub(super) fn hand_on<'a>(
        &'a self,
        decoded: &'a Decoded,
        value: &'a serde_json::Value,
    ) -> impl Future<Output = Vec<serde_json::Value>> + 'a {
        let publishing = canvas::has_followers(&decoded.embed).then(|| -> futures::future::LocalBoxFuture<'a, Vec<serde_json::Value>> {
            Box::pin(self.publish_followers(decoded, value))
        });
        async move {
            match publishing {
                Some(p) => p.await,
                None => Vec::new(),
            }
        }
    }

    async fn publish_followers(&self, decoded: &Decoded, value: &serde_json::Value) -> Vec<serde_json::Value> {
        let lineage = canvas::Lineage { headers: &decoded.headers, origin: &self.cfg.node_name };
        let mut children = Vec::new();
        let next = canvas::next_chain_step(&decoded.embed, value, &lineage, DEFAULT_QUEUE);
        for msg in next.into_iter().chain(canvas::callbacks(&decoded.embed, value, &lineage, DEFAULT_QUEUE)) {
            self.publish_task(&msg).await;
            children.push(canvas::child_tuple(&msg.id));
        }
        children
    }

    /// A chord member's outcome joins its chord; the member that completes it publishes
    /// the callback with every result in order, or fails it with ChordError.
    /// As [`Worker::hand_on`]: the joining future is made and boxed only for a chord member.
    pub(super) fn chord_member_done<'a>(
        &'a self,
        decoded: &'a Decoded,
        state: &'a str,
        result: serde_json::Value,
    ) -> impl Future<Output = ()> + 'a {
        let member = decoded.headers.group.is_some() && decoded.embed.chord.is_some();
        let joining = member.then(|| -> futures::future::LocalBoxFuture<'a, ()> { Box::pin(self.join_chord(decoded, state, result)) });
        async move {
            if let Some(j) = joining {
                j.await
            }
        }
    }

    async fn join_chord(&self, decoded: &Decoded, state: &str, result: serde_json::Value) {
        let h = &decoded.headers;
        let (Some(group), Some(callback)) = (&h.group, &decoded.embed.chord) else { return };
        if !self.backend.native_join() {
            // The producer sent a `celery.chord_unlock` that polls the members instead.
            return;
        }
        let entry = canvas::ChordEntry { task_id: h.id.clone(), state: state.to_string(), result };
        let joined = match self.backend.chord_join(group, h.group_index.unwrap_or(0), &entry).await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(group = %group, id = %h.id, "chord join failed: {e}");
                return;
            }
        };
        let Some((entries, token)) = joined else { return };
        let lineage = canvas::Lineage { headers: h, origin: &self.cfg.node_name };
        match canvas::chord_outcome(&entries) {
            Ok(results) => {
                let mut msg = canvas::message_for(callback, Some(serde_json::Value::Array(results)), &lineage, DEFAULT_QUEUE);
                msg.group = Some(group.clone());
                msg.group_index = None;
                tracing::info!(group = %group, callback = %msg.task, id = %msg.id, "chord complete");
                self.publish_task(&msg).await;
            }
            Err(exc) => {
                let id = callback
                    .options
                    .get("task_id")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                tracing::info!(group = %group, callback = %id, "chord failed: {}", exc.message());
                let mut record = ResultRecord::failure(&id, &exc, Some(format!("taskhost: {}", exc.message())));
                record.group_id = Some(group.clone());
                record.key_prefix = self.result_prefixes.borrow().get(&h.id).map(|(p, _)| p.clone()).filter(|p| !p.is_empty());
                if self.may_write_result_for(decoded, &id).await {
                    self.store(record, None).await;
                }
            }
        }
        if let Err(e) = self.backend.chord_done(group, &token).await {
            tracing::warn!(group = %group, "clearing chord state failed: {e}");
        }
    }

    /// Publishes a task this worker creates (chain step, link, errback, chord callback).
    /// Whether the broker took it (retried through outages, up to `STORE_GIVE_UP`).
    pub(super) async fn publish_task(&self, msg: &OutgoingTask) -> bool {
        let raw = encode_task(msg);
        let published = match msg.eta.filter(|eta| *eta > Utc::now() + ETA_SLACK) {
            Some(eta) => self.broker_op("publish", || self.broker.schedule(&msg.queue, msg.priority, &raw, eta)).await,
            None => self.broker_op("publish", || self.broker.publish(&msg.queue, msg.priority, &raw)).await,
        };
        if published {
            self.on_sent(&msg.queue, &msg.task);
        }
        published
    }

    /// Boxed, as [`Worker::fail`] is.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn retry<'a>(
        &'a self,
        delivery: &'a Delivery,
        decoded: &'a Decoded,
        task: &'a TaskVersion,
        reason: &'a str,
        countdown: Option<f64>,
        ignore_result: bool,
        acks_late: bool,
    ) -> futures::future::LocalBoxFuture<'a, ()> {
        Box::pin(self.retry_inline(delivery, decoded, task, reason, countdown, ignore_result, acks_late))
    }

    #[allow(clippy::too_many_arguments)]
    async fn retry_inline(
        &self,
        delivery: &Delivery,
        decoded: &Decoded,
        task: &TaskVersion,
        reason: &str,
        countdown: Option<f64>,
        ignore_result: bool,
        acks_late: bool,
    ) {
        let h = &decoded.headers;
        let delay = retry::retry_delay(&task.manifest, countdown, h.retries, rand::random::<f64>());
        let eta = chrono::TimeDelta::from_std(delay)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
            .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
        let priority = decoded.priority;
        let next = OutgoingTask {
            task: h.task.clone(),
            id: h.id.clone(),
            args: decoded.args(),
            kwargs: decoded.kwargs(),
            embed: decoded.embed.clone(),
            queue: delivery.queue.clone(),
            priority,
            eta: Some(eta),
            expires: h.expires.map(|e| e.to_utc()),
            retries: h.retries + 1,
            root_id: h.root_id.clone(),
            parent_id: Some(h.id.clone()),
            group: h.group.clone(),
            group_index: h.group_index,
            time_limit: h.time_limit,
            ignore_result,
            origin: self.cfg.node_name.clone(),
            // Every header the message came with (stamps, custom ones) goes on the retry.
            extra_headers: crate::protocol::Envelope::parse(&delivery.raw).map(|e| e.headers).unwrap_or_default(),
        };
        let raw = encode_task(&next);
        let published = if delay.is_zero() {
            self.broker.publish(&delivery.queue, priority, &raw).await
        } else {
            self.broker.schedule(&delivery.queue, priority, &raw, eta).await
        };
        if let Err(e) = published {
            if acks_late {
                tracing::warn!(id = %h.id, "could not requeue the retry, returning the message instead: {e}");
                self.span_starts.borrow_mut().remove(&h.id);
                self.restore(delivery).await;
            } else {
                // Acked before it ran: the only copy was the one we failed to publish.
                let exc = ExceptionInfo::new(outcome::TASKHOST_MODULE, "RetryLost", format!("retry could not be queued: {e}"));
                self.fail(delivery, decoded, &exc, format!("taskhost: {e}"), ignore_result, false).await;
            }
            return;
        }
        self.stats.borrow_mut().retried += 1;
        self.on_retried(&delivery.queue, decoded, reason);
        tracing::info!(task = %h.task, id = %h.id, retries = h.retries + 1, outcome = "retried", "retry in {:?}: {reason}", delay);
        if !ignore_result {
            let exc = ExceptionInfo::new(outcome::TASKHOST_MODULE, "RetryRequested", reason);
            let mut record = ResultRecord::retry(&h.id, Some(&exc), Some(format!("retry {} requested: {reason}", h.retries + 1)));
            self.link_fields(&mut record, decoded);
            self.store(record, None).await;
        }
        // The retry is queued: this delivery is done whether or not RETRY was stored.
        self.settle(delivery, true, acks_late).await;
    }

    /// REVOKED (`revoked` or `expired`) for a message that will not run; a chord it
    /// belongs to counts it as failed, as Celery does.
    /// Boxed, as the other paths `handle` takes rarely: inline, their state (~2 KB each)
    /// made every message's handling future larger, and it is copied as it is boxed.
    pub(super) fn skip_unrun<'a>(
        &'a self,
        delivery: &'a Delivery,
        decoded: &'a Decoded,
        reason: &'a str,
        ignore_result: bool,
    ) -> futures::future::LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            self.stats.borrow_mut().processed += 1;
            self.on_revoked(&delivery.queue, decoded, false, reason == "expired");
            let mut record = ResultRecord::revoked(&decoded.headers.id, reason);
            self.link_fields(&mut record, decoded);
            let revoked = record.result.clone();
            let stored = ignore_result || self.store(record, None).await;
            self.chord_member_done(decoded, "REVOKED", revoked).await;
            self.settle(delivery, stored, true).await;
        })
    }

    /// FAILURE plus a dead letter for a message that cannot run here at all.
    /// Boxed, as [`Worker::skip_unrun`] is.
    pub(super) fn fail_unrunnable<'a>(
        &'a self,
        delivery: &'a Delivery,
        decoded: &'a Decoded,
        module: &'a str,
        exc_type: &'a str,
        reason: String,
        ignore_result: bool,
    ) -> futures::future::LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            self.stats.borrow_mut().processed += 1;
            if !self.dead_letter(delivery, Some(decoded), reason.clone()).await {
                self.restore(delivery).await;
                return;
            }
            let exc = ExceptionInfo::new(module, exc_type, reason.as_str());
            self.fail(delivery, decoded, &exc, format!("taskhost: {reason}"), ignore_result, true).await;
        })
    }

    pub(super) async fn store_progress(&self, p: Progress, ignore_result: bool) {
        if ignore_result {
            return;
        }
        let meta: serde_json::Value = serde_json::from_str(&p.meta).unwrap_or(serde_json::Value::Null);
        self.store(ResultRecord::custom(&p.task_id, meta), Some(&p.state)).await;
    }
}
