//! One worker process's Celery events: the Lamport clock, whether task events are on
//! (`-E`, `enable_events`), and task events buffered and sent in `task.multi` batches.

use crate::broker::Broker;
use crate::protocol::events::{
    batch_json, encode_event_message, event_json, local_utcoffset, routing_key, Stamp, TaskEvent, WorkerEvent, MULTI_ROUTING_KEY,
};
use std::cell::{Cell, RefCell};
use std::time::Duration;
use tokio::sync::Notify;

/// How long task events gather before they leave in one batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// Most events in one message, and most bytes of them.
const BATCH_MAX: usize = 2000;
const BATCH_MAX_BYTES: usize = 1 << 20;
/// Celery's heartbeat interval (`freq`).
pub const HEARTBEAT_FREQ: Duration = Duration::from_secs(2);
/// Buffered task events past this many bytes are dropped (counted) rather than held
/// without bound while the broker is unreachable.
const BUFFER_CAP_BYTES: usize = 64 << 20;

pub struct EventSink {
    node: String,
    pid: u32,
    utcoffset: f64,
    task_events: Cell<bool>,
    clock: Cell<u64>,
    pending: RefCell<Vec<String>>,
    pending_bytes: Cell<usize>,
    queued: Notify,
    dropped: Cell<u64>,
}


impl EventSink {
    pub fn new(node: &str, task_events: bool) -> Self {
        EventSink {
            node: node.to_string(),
            pid: std::process::id(),
            utcoffset: local_utcoffset(),
            task_events: Cell::new(task_events),
            clock: Cell::new(0),
            pending: RefCell::default(),
            pending_bytes: Cell::new(0),
            queued: Notify::new(),
            dropped: Cell::new(0),
        }
    }

    pub fn task_events(&self) -> bool {
        self.task_events.get()
    }

    /// Turns task events on or off; whether that changed anything.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.replace(on) != on
    }

    /// The next Lamport time, for an event or a control reply.
    pub fn tick(&self) -> u64 {
        let c = self.clock.get() + 1;
        self.clock.set(c);
        c
    }

    pub fn clock(&self) -> u64 {
        self.clock.get()
    }

    /// A clock seen on a message from elsewhere: ours stays ahead of it.
    pub fn seen_clock(&self, other: u64) {
        if other > self.clock.get() {
            self.clock.set(other);
        }
    }

    fn stamp(&self) -> Stamp<'_> {
        Stamp { hostname: &self.node, utcoffset: self.utcoffset, pid: self.pid, clock: self.tick(), timestamp: crate::protocol::unix_now() }
    }

    /// Queues a task event if task events are on.
    pub fn task(&self, event: &TaskEvent<'_>) {
        if !self.task_events.get() {
            return;
        }
        if self.pending_bytes.get() >= BUFFER_CAP_BYTES {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        let json = event_json(event, &self.stamp());
        self.pending_bytes.set(self.pending_bytes.get() + json.len());
        let mut pending = self.pending.borrow_mut();
        pending.push(json);
        if pending.len() == 1 {
            self.queued.notify_one();
        }
    }

    /// Sends a worker event now (worker events do not wait for a batch).
    pub async fn worker(&self, broker: &dyn Broker, kind: &'static str, active: usize, processed: u64) {
        let event = WorkerEvent {
            kind,
            freq: HEARTBEAT_FREQ.as_secs_f64(),
            active,
            processed,
            loadavg: loadavg(),
            sw_ident: "taskhost",
            sw_ver: env!("CARGO_PKG_VERSION"),
            sw_sys: system_name(),
        };
        let json = event_json(&event, &self.stamp());
        let raw = encode_event_message(&self.node, &routing_key(kind), json.as_bytes());
        if let Err(e) = broker.publish_event(&routing_key(kind), &raw).await {
            tracing::debug!("sending {kind} failed: {e}");
        }
    }

    /// Waits until a task event is queued, then lets a batch gather.
    pub async fn wait_for_batch(&self) {
        if self.pending.borrow().is_empty() {
            self.queued.notified().await;
        }
        tokio::time::sleep(BATCH_WINDOW).await;
    }

    /// Sends the queued task events; those the broker did not take (or that were still
    /// on their way when this was cancelled) are queued again, ahead of newer ones.
    pub async fn flush(&self, broker: &dyn Broker) {
        let events = std::mem::take(&mut *self.pending.borrow_mut());
        self.pending_bytes.set(0);
        if events.is_empty() {
            return;
        }
        let mut unsent = Unsent { sink: self, events: events.into() };
        while !unsent.events.is_empty() {
            let (mut n, mut bytes) = (0, 0);
            while n < unsent.events.len() && n < BATCH_MAX && (n == 0 || bytes + unsent.events[n].len() <= BATCH_MAX_BYTES) {
                bytes += unsent.events[n].len();
                n += 1;
            }
            let batch: Vec<&String> = unsent.events.iter().take(n).collect();
            let raw = encode_event_message(&self.node, MULTI_ROUTING_KEY, &batch_json(&batch));
            if let Err(e) = broker.publish_event(MULTI_ROUTING_KEY, &raw).await {
                tracing::warn!("sending {} task events failed, kept for the next batch: {e}", unsent.events.len());
                return;
            }
            unsent.events.drain(..n);
        }
        let dropped = self.dropped.replace(0);
        if dropped > 0 {
            tracing::warn!(dropped, "task events dropped while the broker was unreachable");
        }
    }
}

/// Events taken for sending and not yet sent: back to the front of the queue when dropped.
struct Unsent<'a> {
    sink: &'a EventSink,
    events: std::collections::VecDeque<String>,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let mut pending = self.sink.pending.borrow_mut();
        let newer = std::mem::take(&mut *pending);
        let bytes: usize = self.events.iter().chain(&newer).map(String::len).sum();
        pending.extend(self.events.drain(..));
        pending.extend(newer);
        self.sink.pending_bytes.set(bytes);
    }
}

/// The system's name as Python's `platform.system()` gives it (Celery's `sw_sys`).
fn system_name() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        "freebsd" => "FreeBSD",
        other => other,
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> [f64; 3] {
    let mut out = [0.0f64; 3];
    // SAFETY: getloadavg writes at most 3 doubles into the array passed.
    let n = unsafe { libc::getloadavg(out.as_mut_ptr(), 3) };
    if n < 3 {
        return [0.0; 3];
    }
    out.map(|v| (v * 100.0).round() / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_events_queue_only_while_enabled_and_the_clock_moves() {
        let sink = EventSink::new("taskhost@box", false);
        sink.task(&TaskEvent::Started { uuid: "a" });
        assert!(sink.pending.borrow().is_empty());
        assert_eq!(sink.clock(), 0);
        assert!(sink.set_task_events(true));
        assert!(!sink.set_task_events(true));
        sink.task(&TaskEvent::Started { uuid: "a" });
        assert_eq!(sink.pending.borrow().len(), 1);
        sink.seen_clock(40);
        assert_eq!(sink.tick(), 41);
    }
}
