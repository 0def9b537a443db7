//! Prometheus metrics under celery-exporter's names and labels plus `taskhost_*` ones:
//! counted per worker process, merged across a `serve`'s processes, rendered as text.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use crate::worker::HashMap;
use std::fmt::Write as _;

/// celery-exporter's `--buckets` default (prometheus_client's), seconds.
pub const RUNTIME_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// celery-exporter's `--queue-wait-buckets` default, seconds.
pub const QUEUE_WAIT_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];
/// Sandbox memory high-water per run, bytes (64 KiB pages up to 4 GiB).
pub const MEMORY_BUCKETS: &[f64] = &[
    1048576.0, 4194304.0, 16777216.0, 33554432.0, 67108864.0, 134217728.0, 268435456.0, 536870912.0, 1073741824.0, 4294967296.0,
];

/// Observations in cumulative-at-render buckets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    /// One count per bucket bound, plus one for +Inf; not cumulative.
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.counts.len() != bounds.len() + 1 {
            self.counts = vec![0; bounds.len() + 1];
        }
        let i = bounds.iter().position(|b| value <= *b).unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn merge(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }
}

/// What happened to one task name on one queue in one process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskSeries {
    pub sent: u64,
    pub received: u64,
    pub started: u64,
    pub succeeded: u64,
    /// By exception class name (celery-exporter's `exception` label).
    pub failed: BTreeMap<String, u64>,
    pub rejected: u64,
    pub revoked: u64,
    pub retried: u64,
    pub runtime: Histogram,
    pub queue_wait: Histogram,
    /// Runs by version and outcome (`succeeded`, `failed`, `retried`, `revoked`).
    pub runs: BTreeMap<String, BTreeMap<String, u64>>,
    pub memory_high_water: Histogram,
    pub time_limit_hits: u64,
    pub memory_limit_hits: u64,
    pub grant_denials: u64,
    pub dead_letters: u64,
    pub rate_limit_waits: u64,
    pub rate_limit_wait_seconds: f64,
}

impl TaskSeries {
    fn merge(&mut self, o: &TaskSeries) {
        self.sent += o.sent;
        self.received += o.received;
        self.started += o.started;
        self.succeeded += o.succeeded;
        for (k, v) in &o.failed {
            *self.failed.entry(k.clone()).or_default() += v;
        }
        self.rejected += o.rejected;
        self.revoked += o.revoked;
        self.retried += o.retried;
        self.runtime.merge(&o.runtime);
        self.queue_wait.merge(&o.queue_wait);
        for (version, outcomes) in &o.runs {
            let mine = self.runs.entry(version.clone()).or_default();
            for (k, v) in outcomes {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
        self.memory_high_water.merge(&o.memory_high_water);
        self.time_limit_hits += o.time_limit_hits;
        self.memory_limit_hits += o.memory_limit_hits;
        self.grant_denials += o.grant_denials;
        self.dead_letters += o.dead_letters;
        self.rate_limit_waits += o.rate_limit_waits;
        self.rate_limit_wait_seconds += o.rate_limit_wait_seconds;
    }
}

/// Most (queue, task name) series a process keeps; past it, new names count under
/// [`OVERFLOW_NAME`]. Task names come from producers: a flood of made-up names must not
/// grow the worker's memory or the scrape without bound.
pub const MAX_SERIES: usize = 2_000;
pub const OVERFLOW_NAME: &str = "_other";

/// One process's counts: queue → task name → series. Looked up by `&str` on the hot
/// path, so a task already seen costs four hash lookups and no allocation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskMetrics {
    pub queues: HashMap<String, HashMap<String, TaskSeries>>,
    #[serde(skip)]
    count: usize,
}

impl TaskMetrics {
    pub fn series(&mut self, queue: &str, task: &str) -> &mut TaskSeries {
        let known = self.queues.get(queue).is_some_and(|names| names.contains_key(task));
        let (queue, task) = if known { (queue, task) } else { self.add(queue, task) };
        self.queues.get_mut(queue).and_then(|names| names.get_mut(task)).expect("present or added")
    }

    /// Adds the series of a task not seen before (or, past [`MAX_SERIES`], the overflow
    /// series) and says which it was.
    fn add<'a>(&mut self, queue: &'a str, task: &'a str) -> (&'a str, &'a str) {
        let (queue, task) = if self.count < MAX_SERIES { (queue, task) } else { (OVERFLOW_NAME, OVERFLOW_NAME) };
        let names = self.queues.entry(queue.to_string()).or_default();
        if !names.contains_key(task) {
            names.insert(task.to_string(), TaskSeries::default());
            self.count += 1;
        }
        (queue, task)
    }
}

/// A loaded component, for `taskhost_plugin_loaded`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub digest: String,
}

/// What one worker process reports for a scrape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessMetrics {
    /// Node name (`taskhost-0@host`).
    pub node: String,
    pub active: usize,
    pub tasks: TaskMetrics,
    pub plugins: Vec<PluginInfo>,
    pub releases_refused: u64,
    pub compile_cache_hits: u64,
    pub compile_cache_misses: u64,
}

/// celery-exporter's `hostname` label: the host part of a node name (`nodesplit`).
pub fn exporter_hostname(node: &str) -> &str {
    node.split_once('@').map_or(node, |(_, host)| host)
}

/// celery-exporter's `exception` label from an exception repr: `ValueError('x')` → `ValueError`.
pub fn exception_label(repr: &str) -> String {
    let name: String = repr.chars().take_while(|c| c.is_alphanumeric() || *c == '_').take(64).collect();
    if !name.is_empty() && repr[name.len()..].starts_with('(') {
        name
    } else {
        "UnknownException".into()
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// Prometheus text format: one `# HELP`/`# TYPE` per family, its samples after it.
#[derive(Default)]
struct Exposition {
    families: Vec<(String, &'static str, &'static str, Vec<String>)>,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &'static str, help: &'static str) -> &mut Vec<String> {
        match self.families.iter().position(|f| f.0 == name) {
            Some(i) => &mut self.families[i].3,
            None => {
                self.families.push((name.to_string(), kind, help, Vec::new()));
                &mut self.families.last_mut().expect("pushed").3
            }
        }
    }

    fn sample(&mut self, family: &str, kind: &'static str, help: &'static str, suffix: &str, pairs: &[(&str, &str)], v: f64) {
        // As prometheus_client writes counters: the family itself named `…_total`.
        let (family, suffix) = if kind == "counter" { (format!("{family}{suffix}"), "") } else { (family.to_string(), suffix) };
        let line = format!("{family}{suffix}{} {}", labels(pairs), number(v));
        self.family(&family, kind, help).push(line);
    }

    fn histogram(&mut self, family: &str, help: &'static str, bounds: &[f64], pairs: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (i, bound) in bounds.iter().chain(std::iter::once(&f64::INFINITY)).enumerate() {
            cumulative += h.counts.get(i).copied().unwrap_or(0);
            let le = number(*bound);
            let mut with_le: Vec<(&str, &str)> = pairs.to_vec();
            with_le.push(("le", &le));
            self.sample(family, "histogram", help, "_bucket", &with_le, cumulative as f64);
        }
        self.sample(family, "histogram", help, "_sum", pairs, h.sum);
        self.sample(family, "histogram", help, "_count", pairs, h.count() as f64);
    }

    fn render(self) -> String {
        let mut out = String::new();
        for (name, kind, help, samples) in self.families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in samples {
                out.push_str(&s);
                out.push('\n');
            }
        }
        out
    }
}

/// A worker process as the scrape sees it: its report, and whether it is recent.
pub struct ProcessView<'a> {
    pub metrics: &'a ProcessMetrics,
    pub up: bool,
}

/// celery-exporter's task counters: event, help text, the count.
type Counter = (&'static str, &'static str, fn(&TaskSeries) -> u64);
const TASK_COUNTERS: &[Counter] = &[
    ("sent", "Sent when a task message is published.", |s| s.sent),
    ("received", "Sent when the worker receives a task.", |s| s.received),
    ("started", "Sent just before the worker executes the task.", |s| s.started),
    ("succeeded", "Sent if the task executed successfully.", |s| s.succeeded),
    ("rejected", "The task was rejected by the worker, possibly to be re-queued or moved to a dead letter queue.", |s| s.rejected),
    ("revoked", "Sent if the task has been revoked.", |s| s.revoked),
    ("retried", "Sent if the task failed, but will be retried in the future.", |s| s.retried),
];

/// The `/metrics` page for every process of a `serve` and the queue lengths read now.
pub fn render(processes: &[ProcessView<'_>], queue_lengths: &[(String, u64)]) -> String {
    let mut merged: BTreeMap<(String, String, String), TaskSeries> = BTreeMap::new();
    let mut hosts: BTreeMap<String, (bool, usize)> = BTreeMap::new();
    let mut plugins: BTreeSet<PluginInfo> = BTreeSet::new();
    let (mut refused, mut hits, mut misses) = (0, 0, 0);
    for p in processes {
        let host = exporter_hostname(&p.metrics.node).to_string();
        let entry = hosts.entry(host.clone()).or_insert((false, 0));
        entry.0 |= p.up;
        if p.up {
            entry.1 += p.metrics.active;
        }
        for (queue, names) in &p.metrics.tasks.queues {
            for (name, series) in names {
                merged.entry((name.clone(), host.clone(), queue.clone())).or_default().merge(series);
            }
        }
        if p.up {
            plugins.extend(p.metrics.plugins.iter().cloned());
        }
        refused += p.metrics.releases_refused;
        hits += p.metrics.compile_cache_hits;
        misses += p.metrics.compile_cache_misses;
    }

    // One pass over the series: the exposition groups samples by family, whatever order
    // they come in.
    let per_task: &[(&str, &str, fn(&TaskSeries) -> f64)] = &[
        ("taskhost_time_limit_hits", "Runs stopped at their hard time limit.", |s| s.time_limit_hits as f64),
        ("taskhost_memory_limit_hits", "Runs stopped at their memory limit.", |s| s.memory_limit_hits as f64),
        ("taskhost_grant_denials", "Requests tasks made that their grants did not allow.", |s| s.grant_denials as f64),
        ("taskhost_dead_letters", "Messages moved to the dead-letter queue.", |s| s.dead_letters as f64),
        ("taskhost_rate_limit_waits", "Runs that waited for their rate limit.", |s| s.rate_limit_waits as f64),
        ("taskhost_rate_limit_wait_seconds", "Time runs waited for their rate limit.", |s| s.rate_limit_wait_seconds),
    ];
    let mut x = Exposition::default();
    for ((name, host, queue), s) in &merged {
        let l: &[(&str, &str)] = &[("name", name), ("hostname", host), ("queue_name", queue)];
        for (event, help, count) in TASK_COUNTERS {
            x.sample(&format!("celery_task_{event}"), "counter", help, "_total", l, count(s) as f64);
        }
        let failed_help = "Sent if the execution of the task failed.";
        if s.failed.is_empty() {
            let with: &[(&str, &str)] = &[("name", name), ("hostname", host), ("exception", ""), ("queue_name", queue)];
            x.sample("celery_task_failed", "counter", failed_help, "_total", with, 0.0);
        }
        for (exception, n) in &s.failed {
            let with: &[(&str, &str)] = &[("name", name), ("hostname", host), ("exception", exception), ("queue_name", queue)];
            x.sample("celery_task_failed", "counter", failed_help, "_total", with, *n as f64);
        }
        x.histogram("celery_task_runtime", "Histogram of task runtime measurements.", RUNTIME_BUCKETS, l, &s.runtime);
        x.histogram(
            "celery_task_queue_wait_time",
            "Histogram of the time tasks spend waiting in the queue before being executed, excluding deliberate ETA/countdown delay.",
            QUEUE_WAIT_BUCKETS,
            l,
            &s.queue_wait,
        );
        for (version, outcomes) in &s.runs {
            for (outcome, n) in outcomes {
                let with: &[(&str, &str)] =
                    &[("name", name), ("version", version), ("outcome", outcome), ("hostname", host), ("queue_name", queue)];
                x.sample("taskhost_task_runs", "counter", "Task runs by component version and outcome.", "_total", with, *n as f64);
            }
        }
        if s.memory_high_water.count() > 0 {
            x.histogram(
                "taskhost_sandbox_memory_high_water_bytes",
                "The most linear memory each run's sandbox held at once.",
                MEMORY_BUCKETS,
                l,
                &s.memory_high_water,
            );
        }
        for (family, help, value) in per_task {
            x.sample(family, "counter", help, "_total", l, value(s));
        }
    }
    for (host, (up, active)) in &hosts {
        let l: &[(&str, &str)] = &[("hostname", host)];
        x.sample("celery_worker_up", "gauge", "Indicates if a worker has recently sent a heartbeat.", "", l, if *up { 1.0 } else { 0.0 });
        x.sample("celery_worker_tasks_active", "gauge", "The number of tasks the worker is currently processing", "", l, *active as f64);
    }
    for (queue, n) in queue_lengths {
        x.sample("celery_queue_length", "gauge", "The number of message in broker queue.", "", &[("queue_name", queue)], *n as f64);
    }
    for plugin in &plugins {
        let l: &[(&str, &str)] = &[("name", &plugin.name), ("version", &plugin.version), ("digest", &plugin.digest)];
        x.sample("taskhost_plugin_loaded", "gauge", "Component versions loaded by live worker processes.", "", l, 1.0);
    }
    x.sample("taskhost_releases_refused", "counter", "Components refused by signature checks.", "_total", &[], refused as f64);
    x.sample("taskhost_compile_cache_hits", "counter", "Components mapped from the compile cache.", "_total", &[], hits as f64);
    x.sample("taskhost_compile_cache_misses", "counter", "Components compiled because the cache lacked them.", "_total", &[], misses as f64);
    let up = processes.iter().filter(|p| p.up).count();
    x.sample("taskhost_worker_processes", "gauge", "Worker processes of this serve reporting.", "", &[], up as f64);
    x.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_inf() {
        let mut h = Histogram::default();
        h.observe(RUNTIME_BUCKETS, 0.004);
        h.observe(RUNTIME_BUCKETS, 0.2);
        h.observe(RUNTIME_BUCKETS, 99.0);
        let mut x = Exposition::default();
        x.histogram("t", "h", RUNTIME_BUCKETS, &[("name", "a")], &h);
        let text = x.render();
        assert!(text.contains("t_bucket{name=\"a\",le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("t_bucket{name=\"a\",le=\"0.25\"} 2\n"));
        assert!(text.contains("t_bucket{name=\"a\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("t_count{name=\"a\"} 3\n"));
    }

    #[test]
    fn processes_of_one_host_merge_under_celery_exporters_labels() {
        let mut a = ProcessMetrics { node: "taskhost-0@vm".into(), active: 2, ..Default::default() };
        a.tasks.series("celery", "tasks.add").succeeded = 3;
        let mut b = ProcessMetrics { node: "taskhost-1@vm".into(), active: 1, ..Default::default() };
        b.tasks.series("celery", "tasks.add").succeeded = 4;
        *b.tasks.series("celery", "tasks.add").failed.entry("TimeLimitExceeded".into()).or_default() += 1;
        let text = render(&[ProcessView { metrics: &a, up: true }, ProcessView { metrics: &b, up: true }], &[("celery".into(), 5)]);
        assert!(text.contains("celery_task_succeeded_total{name=\"tasks.add\",hostname=\"vm\",queue_name=\"celery\"} 7\n"), "{text}");
        assert!(text.contains(
            "celery_task_failed_total{name=\"tasks.add\",hostname=\"vm\",exception=\"TimeLimitExceeded\",queue_name=\"celery\"} 1\n"
        ));
        assert!(text.contains("celery_worker_up{hostname=\"vm\"} 1\n"));
        assert!(text.contains("celery_worker_tasks_active{hostname=\"vm\"} 3\n"));
        assert!(text.contains("celery_queue_length{queue_name=\"celery\"} 5\n"));
        assert_eq!(text.matches("# TYPE celery_task_succeeded_total counter").count(), 1);
    }

    #[test]
    fn made_up_task_names_cannot_grow_the_series_without_bound() {
        let mut m = TaskMetrics::default();
        for i in 0..MAX_SERIES + 500 {
            m.series("celery", &format!("made.up.{i}")).received += 1;
        }
        for i in 0..100 {
            m.series(&format!("queue.{i}"), "x").received += 1;
        }
        assert_eq!(m.queues["celery"].len(), MAX_SERIES);
        assert_eq!(m.queues.len(), 2);
        assert_eq!(m.queues[OVERFLOW_NAME][OVERFLOW_NAME].received, 600);
        m.series("celery", "made.up.0").received += 1;
        assert_eq!(m.queues["celery"]["made.up.0"].received, 2);
    }

    #[test]
    fn exception_labels_as_celery_exporter_reads_them() {
        assert_eq!(exception_label("ValueError('boom')"), "ValueError");
        assert_eq!(exception_label("TimeLimitExceeded(30.0,)"), "TimeLimitExceeded");
        assert_eq!(exception_label("weird"), "UnknownException");
        assert_eq!(exporter_hostname("taskhost-0@vm"), "vm");
    }
}
