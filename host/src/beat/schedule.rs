//! `schedule.toml`: periodic entries (`every = "30s"` or `cron = "*/5 * * * *"` with a
//! timezone), each with its task, args, queue and options; parsed and validated once.

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    /// Default timezone of cron entries (IANA name), UTC if absent.
    timezone: Option<String>,
    #[serde(default, rename = "entry")]
    entries: Vec<RawEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    task: String,
    every: Option<String>,
    cron: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    kwargs: Map<String, Value>,
    queue: Option<String>,
    #[serde(default)]
    priority: u8,
    /// Seconds after sending that an unrun message expires.
    expires: Option<f64>,
}

/// When an entry fires.
#[derive(Debug, Clone)]
pub enum When {
    /// On multiples of the interval since the Unix epoch.
    Every(Duration),
    Cron { cron: Box<croner::Cron>, tz: Tz, text: String },
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub task: String,
    pub when: When,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub queue: String,
    pub priority: u8,
    pub expires: Option<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("{0}")]
    Parse(String),
    #[error("entry {0:?}: give exactly one of `every` or `cron`")]
    OneSchedule(String),
    #[error("entry {name:?}: {reason}")]
    Bad { name: String, reason: String },
    #[error("two entries are named {0:?}")]
    Duplicate(String),
}

/// "30s", "5m", "1h", "2d", "500ms", or a bare number of seconds.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid interval {text:?} (e.g. \"30s\", \"5m\", \"1h\")"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => return Err(format!("unknown interval unit {other:?} in {text:?} (use ms, s, m, h, d)")),
    };
    if !(secs >= 0.1 && secs.is_finite()) {
        return Err(format!("interval {text:?} must be at least 100ms"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("interval {text:?} is too long"))
}

pub fn parse(text: &str) -> Result<Vec<Entry>, ScheduleError> {
    let raw: RawSchedule = toml::from_str(text).map_err(|e| ScheduleError::Parse(e.message().to_string()))?;
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::new();
    for e in raw.entries {
        if !names.insert(e.name.clone()) {
            return Err(ScheduleError::Duplicate(e.name));
        }
        let bad = |reason: String| ScheduleError::Bad { name: e.name.clone(), reason };
        let when = match (&e.every, &e.cron) {
            (Some(every), None) => When::Every(parse_interval(every).map_err(bad)?),
            (None, Some(cron)) => {
                let tz_name = e.timezone.clone().or_else(|| raw.timezone.clone()).unwrap_or_else(|| "UTC".into());
                let tz: Tz = tz_name.parse().map_err(|_| bad(format!("unknown timezone {tz_name:?}")))?;
                let parsed: croner::Cron = cron.parse().map_err(|err| bad(format!("invalid cron {cron:?}: {err}")))?;
                When::Cron { cron: Box::new(parsed), tz, text: cron.clone() }
            }
            _ => return Err(ScheduleError::OneSchedule(e.name)),
        };
        let expires = match e.expires {
            Some(s) if !(s > 0.0 && s.is_finite()) => return Err(bad("expires must be positive seconds".into())),
            other => other.map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)),
        };
        out.push(Entry {
            name: e.name,
            task: e.task,
            when,
            args: e.args,
            kwargs: e.kwargs,
            queue: e.queue.unwrap_or_else(|| "celery".into()),
            priority: e.priority.min(9),
            expires,
        });
    }
    Ok(out)
}

impl Entry {
    /// The latest tick at or before `now`, if any.
    pub fn last_due(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(every) => {
                let step = every.as_millis().max(1) as i64;
                let ms = now.timestamp_millis();
                DateTime::from_timestamp_millis(ms - ms.rem_euclid(step))
            }
            When::Cron { cron, tz, .. } => {
                // croner keeps the sub-second part of its start time: a tick is a whole second.
                let whole = now.with_nanosecond(0).unwrap_or(now);
                cron.find_previous_occurrence(&whole.with_timezone(tz), true).ok().map(|t| t.with_timezone(&Utc))
            }
        }
    }

    /// The first tick after `now`.
    pub fn next_due(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(every) => self.last_due(now).map(|t| t + TimeDelta::from_std(*every).unwrap_or(TimeDelta::MAX)),
            When::Cron { cron, tz, .. } => {
                let whole = now.with_nanosecond(0).unwrap_or(now);
                cron.find_next_occurrence(&whole.with_timezone(tz), false).ok().map(|t| t.with_timezone(&Utc))
            }
        }
    }

    /// Interval entries fire at once on a first start, cron entries wait for their time (as Celery).
    pub fn fires_on_first_start(&self) -> bool {
        matches!(self.when, When::Every(_))
    }

    pub fn describe(&self) -> String {
        match &self.when {
            When::Every(d) => format!("every {}s", d.as_secs_f64()),
            When::Cron { text, tz, .. } => format!("cron {text:?} ({tz})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_interval_and_cron_entries() {
        let entries = parse(
            r#"
            timezone = "Europe/Paris"
            [[entry]]
            name = "ping"
            task = "tasks.noop"
            every = "30s"
            [[entry]]
            name = "report"
            task = "tasks.add"
            cron = "0 9 * * *"
            args = [1, 2]
            queue = "reports"
            priority = 3
            expires = 60
            "#,
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        let now = DateTime::parse_from_rfc3339("2026-11-25T12:00:17Z").unwrap().to_utc();
        assert_eq!(entries[0].last_due(now).unwrap().to_rfc3339(), "2026-11-25T12:00:00+00:00");
        assert_eq!(entries[0].next_due(now).unwrap().to_rfc3339(), "2026-11-25T12:00:30+00:00");
        // 09:00 in Paris (UTC+1 in November) is 08:00 UTC.
        assert_eq!(entries[1].last_due(now).unwrap().to_rfc3339(), "2026-11-25T08:00:00+00:00");
        assert_eq!(entries[1].next_due(now).unwrap().to_rfc3339(), "2026-11-26T08:00:00+00:00");
        assert_eq!(entries[1].queue, "reports");
        // The same tick whatever the sub-second part of "now".
        let later = now + TimeDelta::milliseconds(643);
        assert_eq!(entries[1].last_due(later), entries[1].last_due(now));
        assert_eq!(entries[1].last_due(later).unwrap().timestamp_subsec_nanos(), 0);
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let err = |t: &str| parse(t).unwrap_err().to_string();
        assert_eq!(err("[[entry]]\nname = \"a\"\ntask = \"t\"\n"), "entry \"a\": give exactly one of `every` or `cron`");
        assert_eq!(
            err("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"3 parsecs\"\n"),
            "entry \"a\": unknown interval unit \"parsecs\" in \"3 parsecs\" (use ms, s, m, h, d)"
        );
        assert!(err("[[entry]]\nname = \"a\"\ntask = \"t\"\ncron = \"61 * * * *\"\n").starts_with("entry \"a\": invalid cron"));
        assert_eq!(
            err("[[entry]]\nname = \"a\"\ntask = \"t\"\ncron = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\n"),
            "entry \"a\": unknown timezone \"Mars/Olympus\""
        );
        assert_eq!(
            err("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\n[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\n"),
            "two entries are named \"a\""
        );
        assert!(err("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\nretries = 1\n").starts_with("unknown field `retries`"));
    }
}
