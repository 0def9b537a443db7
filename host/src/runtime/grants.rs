//! What a task may reach beyond its arguments, as its manifest grants: follow-up tasks,
//! directories, config names, HTTP origins and TCP targets. Everything not granted is
//! denied, with a guest-visible error that names the grant that would allow it.

use super::net::{Origin, TcpTarget};
use super::outbound::{DEFAULT_MAX_HTTP_REQUESTS, DEFAULT_MAX_HTTP_RESPONSE_BYTES};

/// Follow-ups one run may send when its manifest does not say (`max_sent_tasks`).
pub const DEFAULT_MAX_SENT_TASKS: u32 = 100;

/// One task version's grants, shared by all its runs: already the intersection of what
/// its manifest asks and what the operator allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Grants {
    /// Task names (or patterns with `*`) `send-task` may publish.
    pub send_tasks: Vec<String>,
    pub max_sent_tasks: u32,
    /// Host directories preopened for the guest; nothing above them is reachable.
    pub dirs: Vec<DirGrant>,
    /// Names the guest may read through `wasi:config/store`, from the worker's secrets.
    pub config: Vec<String>,
    /// The operator's patterns every follow-up must match as well (`None`: no cap).
    pub operator_send_tasks: Option<Vec<String>>,
    /// Origins `wasi:http` requests may go to (already within the operator's).
    pub http: Vec<Origin>,
    /// Requests one run may make.
    pub max_http_requests: u32,
    /// Response body bytes one run may read, all requests together.
    pub max_http_response_bytes: u64,
    /// host:port pairs `wasi:sockets` may connect to (already within the operator's).
    pub tcp: Vec<TcpTarget>,
}

/// A host directory a task sees at `guest`.
#[derive(Debug, Clone, PartialEq)]
pub struct DirGrant {
    pub host: std::path::PathBuf,
    pub guest: String,
    pub writable: bool,
}

impl Default for Grants {
    /// Nothing granted.
    fn default() -> Self {
        Grants {
            send_tasks: Vec::new(),
            max_sent_tasks: DEFAULT_MAX_SENT_TASKS,
            dirs: Vec::new(),
            config: Vec::new(),
            operator_send_tasks: None,
            http: Vec::new(),
            max_http_requests: DEFAULT_MAX_HTTP_REQUESTS,
            max_http_response_bytes: DEFAULT_MAX_HTTP_RESPONSE_BYTES,
            tcp: Vec::new(),
        }
    }
}

impl Grants {
    /// Whether the manifest grants sending `task` (the operator is asked separately).
    pub fn may_send(&self, task: &str) -> bool {
        self.send_tasks.iter().any(|pattern| glob(pattern, task))
    }

    /// Whether the operator's cap lets `task` be sent.
    pub fn operator_allows_send(&self, task: &str) -> bool {
        self.operator_send_tasks.as_ref().is_none_or(|allowed| allowed.iter().any(|p| glob(p, task)))
    }
}

/// Whether every name `pattern` matches is also matched by one of `allowed`, as far as
/// can be told without enumerating names: true for a pattern one of them matches as text.
pub fn within(pattern: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|a| glob(a, pattern))
}

/// `*` matches any run of characters (dots included): `mail.*`, `*.render`, `a.*.b`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A follow-up task a run asked the host to publish; the worker turns it into a Celery
/// message whose parent is the run's task.
#[derive(Debug, Clone, PartialEq)]
pub struct SentTask {
    pub id: String,
    pub name: String,
    /// JSON array.
    pub args: String,
    /// JSON object.
    pub kwargs: String,
    pub queue: Option<String>,
    pub countdown: Option<f64>,
    pub priority: Option<u8>,
    /// Semver requirement on the target's version.
    pub version: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_names_may_be_sent() {
        let g = Grants { send_tasks: vec!["mail.*".into(), "reports.render".into(), "*.audit".into()], ..Default::default() };
        assert!(g.may_send("mail.send"));
        assert!(g.may_send("mail.queue.flush"));
        assert!(g.may_send("reports.render"));
        assert!(g.may_send("billing.audit"));
        assert!(!g.may_send("reports.render2"));
        assert!(!g.may_send("mailx.send"));
        assert!(!g.may_send("mail"));
        assert!(!g.may_send("billing.audit.x"));
        assert!(!Grants::default().may_send("anything"));
        let all = Grants { send_tasks: vec!["*".into()], ..Default::default() };
        assert!(all.may_send("x.y"));
        let capped = Grants { operator_send_tasks: Some(vec!["tasks.*".into()]), ..g.clone() };
        assert!(capped.operator_allows_send("tasks.add") && !capped.operator_allows_send("mail.send"));
        assert!(g.operator_allows_send("anything"), "no operator cap by default");
        assert!(within("tasks.a*", &["tasks.*".into()]) && !within("*", &["tasks.*".into()]));
        assert!(glob("a*b*c", "a-b-c") && !glob("a*b*c", "a-c") && glob("a*a", "aa") && !glob("a*a", "a"));
    }
}
