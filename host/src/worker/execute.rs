//! Running a task in its sandbox: STARTED, progress and follow-ups while it runs, and
//! the hand-off to its outcome.

use super::*;

impl Worker {
    /// Runs the task in a sandbox held by `slot`, which is given back as soon as the
    /// sandbox is gone: storing the outcome and acking need no sandbox, and holding the
    /// slot through them kept the next tasks waiting on result writes (results drain 8%
    /// slower). The message then settles (`in_progress`) apart from the prefetch.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn execute(
        &self,
        delivery: &Rc<Delivery>,
        decoded: &Decoded,
        task: &Arc<TaskVersion>,
        limits: &TaskLimits,
        grants: Arc<crate::runtime::Grants>,
        ignore_result: bool,
        slot: (tokio::sync::SemaphorePermit<'_>, tokio::sync::SemaphorePermit<'_>),
        in_progress: &mut InProgress,
    ) {
        let h = &decoded.headers;
        let acks_late = task.manifest.acks_late.unwrap_or(true);
        if !acks_late {
            self.ack_without_outcome(delivery).await;
        }
        let version = task.version.to_string();
        tracing::Span::current().record("version", version.as_str());
        self.on_started(delivery, decoded, &version);
        if self.cfg.track_started && !ignore_result {
            let mut started = ResultRecord::started(&h.id, self.pid, &self.cfg.node_name);
            self.link_fields(&mut started, decoded);
            self.store(started, None).await;
        }
        let mut control = RunControl::keeping_progress();
        // A channel for follow-ups only where some are granted: most tasks send none,
        // and a channel per task cost the no-op drain ~3% (68.4k → 70.5k/s without it, 5
        // alternating pairs of 200k drains).
        let mut sent_rx = None;
        if !grants.send_tasks.is_empty() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<SentTask>();
            control = control.with_sent_tasks(tx);
            sent_rx = Some(rx);
        }
        let control = Arc::new(control.with_grants(grants));
        let mut sent_ids = Vec::new();
        // Follow-ups being published, polled beside the run: a slow broker must not
        // keep the run from its time limit or a revoke.
        // Made only where follow-ups are granted (an allocation per task otherwise).
        let mut publishing: Option<FuturesUnordered<Pin<Box<dyn Future<Output = Option<String>> + '_>>>> =
            sent_rx.is_some().then(FuturesUnordered::new);
        let input = TaskInput {
            id: h.id.clone(),
            name: h.task.clone(),
            retries: h.retries,
            queue: delivery.queue.clone(),
            eta: h.eta.map(|e| e.to_rfc3339()),
            parent_id: h.parent_id.clone(),
            root_id: h.root_id.clone(),
            args: decoded.args_json.clone(),
            kwargs: decoded.kwargs_json.clone(),
        };
        self.running.borrow_mut().insert(
            h.id.clone(),
            RunningTask {
                control: control.clone(),
                delivery: delivery.clone(),
                acknowledged: !acks_late,
                started_unix: crate::protocol::unix_now(),
            },
        );
        let run = {
            // Boxed: wasmtime's instantiate/call futures are large, and inline they would
            // make every spawned `handle` future large too (memcpy'd on spawn and poll).
            let mut running = Box::pin(self.runtime.run(&task.component, &version, input, limits, control.clone()));
            loop {
                tokio::select! {
                    biased;
                    run = &mut running => break run,
                    () = control.progress_reported() => {
                        for p in control.take_progress() {
                            self.store_progress(p, ignore_result).await;
                        }
                    }
                    // Published as soon as asked, as Celery's apply_async inside a task is.
                    Some(t) = async { sent_rx.as_mut()?.recv().await }, if sent_rx.is_some() => {
                        if let Some(p) = publishing.as_mut() {
                            p.push(Box::pin(self.publish_sent(t, decoded)));
                        }
                    }
                    Some(published) = async { publishing.as_mut()?.next().await },
                        if publishing.as_ref().is_some_and(|p| !p.is_empty()) => sent_ids.extend(published),
                }
            }
        };
        for p in control.take_progress() {
            self.store_progress(p, ignore_result).await;
        }
        if let (Some(rx), Some(p)) = (sent_rx.as_mut(), publishing.as_mut()) {
            while let Ok(t) = rx.try_recv() {
                p.push(Box::pin(self.publish_sent(t, decoded)));
            }
            while let Some(published) = p.next().await {
                sent_ids.extend(published);
            }
        }
        drop(publishing);
        self.running.borrow_mut().remove(&h.id);
        let (memory, sandbox) = slot;
        drop(memory);
        if self.shrink_owed.get() > 0 {
            // A `pool_shrink` took this slot away.
            self.shrink_owed.set(self.shrink_owed.get() - 1);
            sandbox.forget();
        } else {
            drop(sandbox);
        }
        in_progress.settling();
        self.meter_run(h, &run, delivery.charge);
        self.on_run_end(&delivery.queue, &h.task, &version, &run);
        if self.killing.get() && run.result == Err(TaskError::Revoked) {
            self.span_starts.borrow_mut().remove(&h.id);
            if acks_late {
                // Stopped by the shutdown, not by a user: it runs again elsewhere.
                self.restore_on_shutdown(delivery).await;
            } else if !ignore_result {
                // Acked before it ran (at most once): nothing to requeue; say what happened.
                let mut record = ResultRecord::revoked(&h.id, "terminated");
                self.link_fields(&mut record, decoded);
                self.store(record, None).await;
            }
            return;
        }
        // Boxed in a statement of its own: a temporary in the awaited expression stays in
        // this future's state across the await (4 KB more for every message).
        let finishing = Box::pin(self.finish(delivery, decoded, task, run, sent_ids, ignore_result, acks_late));
        finishing.await;
    }

    /// Publishes a follow-up a task sent (`send-task`): its parent is that task, its root
    /// the task's root. With no queue named it goes where its own manifest routes it, if
    /// this worker knows the task, else to `celery`. Its id, if the broker took it (only
    /// those are listed as the task's children).
    pub(super) async fn publish_sent(&self, sent: SentTask, decoded: &Decoded) -> Option<String> {
        let h = &decoded.headers;
        let queue = sent.queue.clone().unwrap_or_else(|| {
            self.registry
                .resolve(&sent.name, None)
                .ok()
                .and_then(|tv| tv.manifest.queue.clone())
                .unwrap_or_else(|| DEFAULT_QUEUE.to_string())
        });
        let mut extra_headers = serde_json::Map::new();
        if let Some(req) = &sent.version {
            extra_headers.insert("taskhost_version".into(), serde_json::Value::from(req.clone()));
        }
        // A follow-up is the sender's tenant's: it cannot launder work into another's.
        if let Some(tenant) = &h.tenant {
            extra_headers.insert(crate::tenant::TENANT_HEADER.into(), serde_json::Value::from(tenant.clone()));
        }
        let eta = sent
            .countdown
            .and_then(|c| Duration::try_from_secs_f64(c).ok())
            .and_then(|d| chrono::TimeDelta::from_std(d).ok())
            .and_then(|d| Utc::now().checked_add_signed(d));
        let msg = OutgoingTask {
            task: sent.name.clone(),
            id: sent.id.clone(),
            args: serde_json::from_str(&sent.args).unwrap_or_default(),
            kwargs: serde_json::from_str(&sent.kwargs).unwrap_or_default(),
            queue,
            priority: sent.priority.unwrap_or(0),
            eta,
            root_id: Some(h.root_id.clone().unwrap_or_else(|| h.id.clone())),
            parent_id: Some(h.id.clone()),
            origin: self.cfg.node_name.clone(),
            extra_headers,
            ..Default::default()
        };
        if !self.publish_task(&msg).await {
            tracing::error!(task = %h.task, id = %h.id, sent = ?msg.task, sent_id = %msg.id, "follow-up lost: the broker never took it");
            return None;
        }
        tracing::info!(task = %h.task, id = %h.id, sent = ?msg.task, sent_id = %msg.id, queue = ?msg.queue, "follow-up sent");
        Some(sent.id)
    }
}
