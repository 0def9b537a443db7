//! Tenants: whose a message is (its `taskhost_tenant` header, or the queue it came on),
//! the operator's policy for each (`tenants.toml`), and metering of what each one used.
//!
//! Enforced today: identity (queues bound to a tenant, conflicting headers dead-lettered,
//! unknown tenants refused where a policy is loaded), which tasks or component digests a
//! tenant may run, its memory and grants ceilings, a cluster-wide rate limit, concurrency
//! and CPU quota (the worker's `tenancy` stage); every run is metered. Not yet: weights
//! and fair scheduling: a policy naming `weight` is refused at load rather than silently
//! not enforced.

pub mod meter;

use crate::registry::ByteSize;
use crate::runtime::{Grants, Origin, TcpTarget};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// The message header that names a tenant.
pub const TENANT_HEADER: &str = "taskhost_tenant";
/// The tenant of a message that names none.
pub const DEFAULT_TENANT: &str = "default";

/// `tenants.toml`: one table per tenant; unknown keys rejected, errors name the line.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSpec>,
    /// Queue → the tenant it is bound to (from `queues`).
    #[serde(skip)]
    bound: std::collections::HashMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// Queues bound to this tenant: a message on one is this tenant's whatever its header says.
    #[serde(default)]
    pub queues: Vec<String>,
    /// Task names (patterns with `*`) the tenant may run; absent: any.
    pub tasks: Option<Vec<String>>,
    /// Component digests (sha256 hex, optionally `sha256:`-prefixed) the tenant may run;
    /// absent: any.
    pub digests: Option<Vec<String>>,
    /// The largest memory cap any of its tasks gets, whatever the manifest asks.
    pub memory_limit: Option<ByteSize>,
    /// The most its tasks may be granted; each kind absent: the component's grants stand.
    pub grants: Option<GrantsCeiling>,
    /// Its share of the workers, in CPU time, against the other tenants' weights (default
    /// 1). Naming a weight for any tenant turns fair dispatch on (Redis broker).
    pub weight: Option<f64>,
    /// Its tasks running at once across every worker sharing the broker.
    pub max_concurrency: Option<u32>,
    /// Starts of its tasks across the cluster: "10/s", "100/m", "1000/h".
    pub rate_limit: Option<crate::registry::RateLimit>,
    /// Results kept under this key prefix (`acme:` → `acme:celery-task-meta-<id>`), as
    /// Celery's `result_backend_transport_options={"global_keyprefix": "acme:"}` reads
    /// them, so a Redis ACL user limited to `acme:*` reads only the tenant's results.
    pub result_prefix: Option<String>,
    /// Sandbox CPU-seconds its tasks may use per clock hour (UTC) across the cluster; past
    /// it, its messages are held until the next hour.
    pub cpu_quota: Option<f64>,
}

/// A tenant's grants ceiling; each list present caps that kind of grant.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsCeiling {
    pub http: Option<Vec<Origin>>,
    pub tcp: Option<Vec<TcpTarget>>,
    pub send_tasks: Option<Vec<String>>,
    pub config: Option<Vec<String>>,
    /// Host directories (or parents of them) the tenant's tasks may be granted.
    pub dirs: Option<Vec<PathBuf>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("{file}:{line}: {message}")]
    At { file: String, line: usize, message: String },
    #[error("{file}: {message}")]
    File { file: String, message: String },
}

/// Why a message cannot be given a tenant.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdentityError {
    #[error("queue {queue:?} belongs to tenant {bound:?} but the message's taskhost_tenant header says {claimed:?}")]
    Conflict { queue: String, bound: String, claimed: String },
    #[error("tenant {0:?} is not in this worker's tenants.toml")]
    Unknown(String),
    #[error("taskhost_tenant header {0:?} is not a tenant name (letters, digits, '.', '_', '-'; at most 64)")]
    Invalid(String),
}

/// A key prefix as Celery completes `global_keyprefix`: `_` added unless it already ends in
/// one of `:_-.`.
pub fn celery_key_prefix(prefix: &str) -> String {
    match prefix.chars().last() {
        None => String::new(),
        Some(c) if ":_-.".contains(c) => prefix.to_string(),
        Some(_) => format!("{prefix}_"),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Policy {
    pub fn parse(text: &str, file: &str) -> Result<Policy, PolicyError> {
        let mut policy: Policy = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(line) => PolicyError::At { file: file.into(), line, message: e.message().to_string() },
                None => PolicyError::File { file: file.into(), message: e.message().to_string() },
            }
        })?;
        let at = |tenant: &str, message: String| {
            // The line of the tenant's table, for errors found after parsing.
            let header = format!("[tenants.{tenant}");
            let line = text.lines().position(|l| l.trim_start().starts_with(&header)).map_or(0, |i| i + 1);
            PolicyError::At { file: file.into(), line, message }
        };
        let mut bound: BTreeMap<String, String> = BTreeMap::new();
        for (name, spec) in &policy.tenants {
            if !valid_name(name) {
                return Err(at(name, format!("{name:?} is not a tenant name (letters, digits, '.', '_', '-'; at most 64)")));
            }
            if let Some(w) = spec.weight.filter(|w| !(w.is_finite() && *w > 0.0)) {
                return Err(at(name, format!("tenant {name:?}: weight must be a positive number, got {w}")));
            }
            if let Some(p) = &spec.result_prefix {
                if p.is_empty() || p.len() > 128 || p.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(at(name, format!("tenant {name:?}: result_prefix {p:?} is not a key prefix")));
                }
            }
            if spec.max_concurrency == Some(0) {
                return Err(at(name, format!("tenant {name:?}: max_concurrency must be at least 1")));
            }
            if let Some(q) = spec.cpu_quota.filter(|q| !(q.is_finite() && *q > 0.0)) {
                return Err(at(name, format!("tenant {name:?}: cpu_quota must be a positive number of CPU-seconds per hour, got {q}")));
            }
            for queue in &spec.queues {
                if let Some(other) = bound.insert(queue.clone(), name.clone()) {
                    return Err(at(name, format!("queue {queue:?} is bound to both {other:?} and {name:?}")));
                }
            }
            for digest in spec.digests.iter().flatten() {
                let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(at(name, format!("tenant {name:?}: {digest:?} is not a sha256 digest")));
                }
            }
        }
        policy.bound = bound.into_iter().collect();
        Ok(policy)
    }

    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::File { file: file.clone(), message: e.to_string() })?;
        Policy::parse(&text, &file)
    }

    /// Whose a message on `queue` with tenant header `claimed` is. A queue bound to a tenant
    /// decides; a header naming another tenant there is a conflict. Elsewhere the header
    /// decides (the operator trusts producers on unbound queues), a tenant the policy does
    /// not list is refused, and no header means the [`DEFAULT_TENANT`] (`None`: nothing
    /// is allocated for the common case).
    pub fn identify(&self, queue: &str, claimed: Option<String>) -> Result<Option<String>, IdentityError> {
        if let Some(tenant) = self.bound.get(queue) {
            return match claimed {
                Some(c) if c != *tenant => Err(IdentityError::Conflict { queue: queue.into(), bound: tenant.clone(), claimed: c }),
                Some(c) => Ok(Some(c)),
                None => Ok(Some(tenant.clone())),
            };
        }
        match claimed {
            None => Ok(None),
            Some(c) if !valid_name(&c) => Err(IdentityError::Invalid(c.chars().take(80).collect())),
            Some(c) if !self.tenants.is_empty() && c != DEFAULT_TENANT && !self.tenants.contains_key(&c) => {
                Err(IdentityError::Unknown(c))
            }
            Some(c) => Ok(Some(c)),
        }
    }

    pub fn tenant(&self, name: &str) -> Option<&TenantSpec> {
        self.tenants.get(name)
    }

    /// Fair dispatch, if any tenant names a weight: every tenant's weight (1 unless set)
    /// and the bound queues.
    pub fn fairness(&self) -> Option<crate::broker::Fairness> {
        if !self.tenants.values().any(|t| t.weight.is_some()) {
            return None;
        }
        let weights = self.tenants.iter().map(|(name, t)| (name.clone(), t.weight.unwrap_or(1.0))).collect();
        let caps = self.tenants.iter().filter_map(|(name, t)| Some((name.clone(), t.max_concurrency?))).collect();
        Some(crate::broker::Fairness { weights, bound: self.bound.clone(), caps })
    }
}

impl TenantSpec {
    /// Why the tenant may not run `task` at `digest`, if it may not.
    pub fn refuses(&self, task: &str, digest: &str) -> Option<String> {
        if let Some(tasks) = &self.tasks {
            if !tasks.iter().any(|p| crate::runtime::grants_within(task, std::slice::from_ref(p))) {
                return Some(format!("task {task:?} is not among the tasks this tenant may run (tenants.toml tasks)"));
            }
        }
        if let Some(digests) = &self.digests {
            if !digests.iter().any(|d| d.strip_prefix("sha256:").unwrap_or(d).eq_ignore_ascii_case(digest)) {
                return Some(format!("component sha256:{digest} of {task:?} is not among the digests this tenant may run (tenants.toml digests)"));
            }
        }
        None
    }

    /// `grants` within this tenant's ceiling; `None` when the ceiling changes nothing (so
    /// the component's own grants are shared, not copied).
    pub fn cap_grants(&self, grants: &Grants) -> Option<Grants> {
        let ceiling = self.grants.as_ref()?;
        let mut capped = grants.clone();
        if let Some(allowed) = &ceiling.http {
            capped.http.retain(|o| allowed.contains(o));
        }
        if let Some(allowed) = &ceiling.tcp {
            capped.tcp.retain(|t| allowed.contains(t));
        }
        if let Some(allowed) = &ceiling.config {
            capped.config.retain(|c| allowed.contains(c));
        }
        if let Some(allowed) = &ceiling.dirs {
            capped.dirs.retain(|d| allowed.iter().any(|root| d.host.starts_with(root)));
        }
        if let Some(allowed) = &ceiling.send_tasks {
            // Each follow-up must match the tenant's patterns too, as with the operator's.
            let merged: Vec<String> = match &capped.operator_send_tasks {
                None => allowed.clone(),
                // Patterns that lie within both lists.
                Some(op) => op
                    .iter()
                    .filter(|p| crate::runtime::grants_within(p, allowed))
                    .chain(allowed.iter().filter(|p| crate::runtime::grants_within(p, op)))
                    .cloned()
                    .collect(),
            };
            capped.operator_send_tasks = Some(merged);
        }
        (capped != *grants).then_some(capped)
    }
}

/// The policy a worker serves with, re-read when its file changes (checked every second,
/// like the plugins directory); a file that no longer parses keeps the last good policy.
pub struct PolicyHandle {
    current: RwLock<Arc<Policy>>,
}

impl PolicyHandle {
    /// No file: no policy (every tenant allowed everything, metered under its name).
    pub fn none() -> Arc<PolicyHandle> {
        Arc::new(PolicyHandle { current: RwLock::new(Arc::new(Policy::default())) })
    }

    pub fn open(path: &Path) -> Result<Arc<PolicyHandle>, PolicyError> {
        let policy = Policy::load(path)?;
        let handle = Arc::new(PolicyHandle { current: RwLock::new(Arc::new(policy)) });
        let (weak, watched) = (Arc::downgrade(&handle), path.to_path_buf());
        std::thread::Builder::new()
            .name("taskhost-tenants".into())
            .spawn(move || {
                let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
                let path = watched;
                let mut seen: Option<SystemTime> = modified(&path);
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let Some(handle) = weak.upgrade() else { return };
                    let now = modified(&path);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match Policy::load(&path) {
                        Ok(policy) => {
                            tracing::info!(file = %path.display(), tenants = policy.tenants.len(), "tenants policy reloaded");
                            *handle.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
                        }
                        Err(e) => tracing::warn!("tenants policy not reloaded, the last good one stays: {e}"),
                    }
                }
            })
            .map_err(|e| PolicyError::File { file: path.display().to_string(), message: e.to_string() })?;
        Ok(handle)
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[tenants.acme]
queues = ["t.acme"]
tasks = ["reports.*", "tasks.add"]
memory_limit = "64MiB"

[tenants.globex]
digests = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
[tenants.globex.grants]
http = ["https://api.globex.com"]
config = ["GLOBEX_TOKEN"]
"#;

    #[test]
    fn identity_comes_from_the_bound_queue_then_the_header() {
        let p = Policy::parse(POLICY, "tenants.toml").unwrap();
        let s = |t: &str| Some(t.to_string());
        assert_eq!(p.identify("t.acme", None), Ok(s("acme")));
        assert_eq!(p.identify("t.acme", s("acme")), Ok(s("acme")));
        assert_eq!(
            p.identify("t.acme", s("globex")),
            Err(IdentityError::Conflict { queue: "t.acme".into(), bound: "acme".into(), claimed: "globex".into() })
        );
        assert_eq!(p.identify("celery", s("globex")), Ok(s("globex")));
        assert_eq!(p.identify("celery", None), Ok(None), "the default tenant");
        assert_eq!(p.identify("celery", s("initech")), Err(IdentityError::Unknown("initech".into())));
        assert!(matches!(p.identify("celery", s("a\nb")), Err(IdentityError::Invalid(_))));
        // No policy: any well-formed name is taken as it is.
        assert_eq!(Policy::default().identify("celery", s("initech")), Ok(s("initech")));
    }

    #[test]
    fn a_tenant_runs_only_its_tasks_and_digests() {
        let p = Policy::parse(POLICY, "tenants.toml").unwrap();
        let acme = p.tenant("acme").unwrap();
        assert_eq!(acme.refuses("reports.render", "ab"), None);
        assert!(acme.refuses("tasks.payroll", "ab").unwrap().contains("tenants.toml tasks"));
        let globex = p.tenant("globex").unwrap();
        assert_eq!(globex.refuses("x", &"0".repeat(64)), None);
        assert!(globex.refuses("x", &"1".repeat(64)).unwrap().contains("digests"));
    }

    #[test]
    fn grants_are_capped_by_the_tenant() {
        let p = Policy::parse(POLICY, "tenants.toml").unwrap();
        let grants = Grants {
            http: vec!["https://api.globex.com".parse().unwrap(), "https://evil.example".parse().unwrap()],
            config: vec!["GLOBEX_TOKEN".into(), "ACME_TOKEN".into()],
            send_tasks: vec!["mail.*".into()],
            ..Default::default()
        };
        let capped = p.tenant("globex").unwrap().cap_grants(&grants).unwrap();
        assert_eq!(capped.http, vec!["https://api.globex.com".parse::<Origin>().unwrap()]);
        assert_eq!(capped.config, vec!["GLOBEX_TOKEN".to_string()]);
        assert_eq!(capped.send_tasks, grants.send_tasks, "no send_tasks ceiling: unchanged");
        assert_eq!(p.tenant("acme").unwrap().cap_grants(&grants), None, "no ceiling: the component's grants stand");
    }

    #[test]
    fn bad_policies_name_the_line() {
        let err = |text: &str| Policy::parse(text, "tenants.toml").unwrap_err().to_string();
        assert_eq!(
            err("[tenants.acme]\nqueues = [\"a\"]\nmemmory_limit = \"1GiB\"\n"),
            "tenants.toml:3: unknown field `memmory_limit`, expected one of `queues`, `tasks`, `digests`, `memory_limit`, `grants`, `weight`, `max_concurrency`, `rate_limit`, `result_prefix`, `cpu_quota`"
        );
        assert_eq!(
            err("[tenants.a]\nqueues = [\"q\"]\n[tenants.b]\nqueues = [\"q\"]\n"),
            "tenants.toml:3: queue \"q\" is bound to both \"a\" and \"b\""
        );
        assert!(err("[tenants.acme]\nweight = 0\n").starts_with("tenants.toml:1: tenant \"acme\": weight must be a positive number"));
        let fair = Policy::parse("[tenants.a]\nweight = 5\nqueues = [\"qa\"]\n[tenants.b]\n", "t").unwrap().fairness().unwrap();
        assert_eq!(fair.weights, vec![("a".to_string(), 5.0), ("b".to_string(), 1.0)]);
        assert_eq!(fair.bound.get("qa").map(String::as_str), Some("a"));
        assert!(Policy::parse(POLICY, "t").unwrap().fairness().is_none(), "no weights: arrival order");
        assert_eq!(err("[tenants.acme]\nmax_concurrency = 0\n"), "tenants.toml:1: tenant \"acme\": max_concurrency must be at least 1");
        assert!(err("[tenants.acme]\ncpu_quota = -1\n").contains("cpu_quota must be a positive number"));
        assert!(err("[tenants.acme]\nrate_limit = \"5/day\"\n").starts_with("tenants.toml:2: invalid rate limit"));
        assert!(err("[tenants.acme]\ndigests = [\"abc\"]\n").contains("is not a sha256 digest"));
        assert!(err("[tenants.acme.grants]\nhttp = [\"ftp://x\"]\n").starts_with("tenants.toml:2:"));
    }
}
