//! What the fuzz targets in `fuzz/` drive: every parser that reads bytes from outside —
//! broker messages, manifests, schedules, workflows. Each must return, never panic.

/// A broker list element, a pidbox broadcast, an event message.
pub fn messages(data: &[u8]) {
    if let Ok(decoded) = crate::protocol::decode(data) {
        // What the worker derives from a decoded message must not panic either.
        let _ = decoded.args();
        let _ = decoded.kwargs();
        let _ = crate::protocol::args_repr(&decoded.args());
        let _ = crate::canvas::remaining_chain_ids(&decoded.embed);
        if let Some(req) = decoded.headers.version_req.as_deref() {
            let _ = semver::VersionReq::parse(req);
        }
        if let Some(tp) = decoded.headers.traceparent.as_deref() {
            let _ = crate::observe::otlp::parse_traceparent(tp);
        }
    }
    if let Ok(req) = crate::protocol::decode_control(data) {
        let _ = req.is_for("taskhost@fuzz");
        let _ = req.task_ids();
    }
    let _ = crate::protocol::events::decode_event_message(data);
    let _ = crate::protocol::mark_redelivered(data);
}

/// A component's manifest (`<task>@<version>.toml`).
pub fn manifest(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::registry::Manifest::parse(text);
    }
}

/// A beat schedule file.
pub fn schedule(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(entries) = crate::beat::schedule::parse(text) {
            let now = chrono::Utc::now();
            for e in &entries {
                if let Some(due) = e.last_due(now) {
                    let _ = e.next_due(due);
                }
            }
        }
    }
}

/// A `send --workflow` document, planned as the CLI would publish it.
pub fn workflow(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(w) = crate::canvas::Workflow::parse(text) {
            let _ = crate::canvas::plan(w, "gen1@fuzz", "celery");
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every input kept in `fuzz/corpus/<target>/` (seeds, and whatever a fuzzing run
    /// found worth keeping) goes through its target on every `make test`: a regression
    /// of one that once crashed fails here, without a fuzzer.
    #[test]
    fn the_kept_corpus_runs_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let targets: [(&str, fn(&[u8])); 4] =
            [("messages", super::messages), ("manifest", super::manifest), ("schedule", super::schedule), ("workflow", super::workflow)];
        for (name, target) in targets {
            let dir = root.join(name);
            let entries: Vec<_> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten().collect();
            assert!(!entries.is_empty(), "no corpus for {name}");
            for entry in entries {
                // A fuzzing run beside this may replace inputs under it.
                if let Ok(data) = std::fs::read(entry.path()) {
                    target(&data);
                }
            }
        }
    }
}
