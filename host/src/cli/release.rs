//! `taskhost keygen`, `publish`, `releases`, `rollout`, `rollback`, `yank` and `gc`:
//! signed releases from CI to every worker that follows the registry.

use super::serve::{redact, BrokerArgs};
use super::{current_thread_runtime, CliError};
use crate::broker::releases::ReleaseStore;
use crate::registry::publish::{self, Published, ReleaseOpError, RolloutOutcome, RolloutPlan};
use crate::registry::release::{self, ReleaseRecord, SignedRelease};
use crate::registry::rollout::{AuditEntry, ReadyReport};
use crate::registry::Manifest;
use anyhow::{anyhow, Context as _};
use semver::Version;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// The key's name: files NAME.key (private, mode 0600) and NAME.pub.
    #[arg(long, default_value = "taskhost-release")]
    pub name: String,
    /// Directory to write them to.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Also append the key to this trust.toml (created if absent), trusted for `--tasks`.
    #[arg(long, value_name = "FILE")]
    pub trust: Option<PathBuf>,
    /// Task-name patterns the key is trusted for in the trust.toml entry.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub tasks: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The component (`.wasm`).
    pub component: PathBuf,
    /// Its manifest (queue, limits, grants), signed with it.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    #[arg(long)]
    pub task: String,
    #[arg(long)]
    pub version: Version,
    /// Private key file from `taskhost keygen` [default: the key text in $TASKHOST_SIGNING_KEY].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Where to publish: `broker` (the --broker URL, the default), a redis:// or sqlite://
    /// URL, `oci://host/repository` (the bytes in an OCI registry, CNCF Wasm layout; the
    /// signed record on the broker; `oci+http://` for a plain-HTTP registry), or a plugins
    /// directory (`dir:PATH`) for workers that do not follow a registry.
    #[arg(long, default_value = "broker")]
    pub registry: String,
    /// Who publishes [default: $GITHUB_ACTOR, else $USER].
    #[arg(long)]
    pub publisher: Option<String>,
    /// Commit the component was built from [default: $GITHUB_SHA].
    #[arg(long)]
    pub git_commit: Option<String>,
    /// CI run that built it [default: $GITHUB_SERVER_URL/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID].
    #[arg(long)]
    pub ci_run: Option<String>,
    /// Make it the active version at once even if the task already has one (else
    /// `taskhost rollout` activates it).
    #[arg(long)]
    pub activate: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, clap::Args)]
pub struct ReleasesArgs {
    /// Only this task.
    pub name: Option<String>,
    /// The audit log: every publish, rollout step, rollback and yank.
    #[arg(long)]
    pub audit: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    pub name: String,
    pub version: Version,
    /// Percent of new tasks at each step.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,100")]
    pub steps: Vec<f64>,
    /// Time at each step before the next (`60s`, `2m`, `500ms`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Roll back when the new version's failure rate exceeds the old one's by more than
    /// this many points (`5%`).
    #[arg(long, default_value = "5%", value_parser = parse_percent)]
    pub max_failure_rate: f64,
    /// Outcomes of the new version needed before its failure rate counts.
    #[arg(long, default_value_t = 20)]
    pub min_samples: u64,
    /// How long to wait for every live worker to have the new version ready.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    pub name: String,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, clap::Args)]
pub struct YankArgs {
    pub name: String,
    pub version: Version,
    #[arg(long, default_value = "yanked")]
    pub reason: String,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Only this task's releases.
    pub name: Option<String>,
    /// Queues whose messages' version requirements keep a release [default: celery and
    /// every queue the releases' manifests name].
    #[arg(short = 'Q', long, value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a duration (60s, 2m, 500ms)"))?;
    Duration::try_from_secs_f64(v * scale).map_err(|_| format!("{text:?} is not a duration (60s, 2m, 500ms)"))
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let v: f64 = text.trim().trim_end_matches('%').trim().parse().map_err(|_| format!("{text:?} is not a percentage"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{text:?} is not between 0% and 100%"))
    }
}

/// Who is acting, for the audit log.
fn actor() -> String {
    ["TASKHOST_ACTOR", "GITHUB_ACTOR", "USER"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

fn op_err(e: ReleaseOpError) -> CliError {
    match e {
        ReleaseOpError::Store(_) | ReleaseOpError::Interrupted(_) | ReleaseOpError::NotReady { .. } => CliError::failed(e),
        _ => CliError::usage(e),
    }
}

async fn open_store(url: &str) -> Result<Box<dyn ReleaseStore>, CliError> {
    crate::broker::releases::connect(url)
        .await
        .with_context(|| format!("connecting to the release registry {}", redact(url)))
        .map_err(CliError::Usage)
}

fn is_oci(registry: &str) -> bool {
    crate::registry::oci::split_scheme(registry).is_some()
}

/// The release store a `--registry` value names. Releases whose bytes are in an OCI
/// registry are indexed on the broker (signed record, location, rollout state), so for
/// `oci://` the store is the broker's.
pub fn registry_url(registry: &str, broker: &str) -> Result<String, CliError> {
    match registry {
        "broker" => Ok(broker.to_string()),
        r if is_oci(r) => Ok(broker.to_string()),
        r if crate::broker::is_redis_url(r) || crate::broker::is_sqlite_url(r) => Ok(r.to_string()),
        r => Err(CliError::usage(anyhow!("--registry {r:?}: expected broker, a redis:// or sqlite:// URL, oci://host/repository, or dir:PATH"))),
    }
}

pub fn keygen(args: KeygenArgs) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = release::generate_signing_key();
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string()).map_err(CliError::Usage)?;
    let private = args.out.join(format!("{}.key", args.name));
    let public = args.out.join(format!("{}.pub", args.name));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .with_context(|| format!("{} (an existing key is never overwritten)", private.display()))
        .map_err(CliError::Usage)?;
    writeln!(file, "{}", release::encode_signing_key(&key)).map_err(CliError::failed)?;
    let public_text = release::encode_public_key(&key.verifying_key());
    std::fs::write(&public, format!("{public_text}\n")).with_context(|| public.display().to_string()).map_err(CliError::Failed)?;
    println!("wrote {} (keep it secret: a CI secret) and {}", private.display(), public.display());
    println!("key id {}", release::key_id(&key.verifying_key()));
    let patterns = args.tasks.iter().map(|t| serde_json::Value::from(t.as_str()).to_string()).collect::<Vec<_>>().join(", ");
    let entry = format!("[[key]]\nname = {}\npublic_key = \"{public_text}\"\ntasks = [{patterns}]\n", serde_json::Value::from(args.name.as_str()));
    match &args.trust {
        Some(path) => {
            let mut text = std::fs::read_to_string(path).unwrap_or_default();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&entry);
            // Checked before it is written: a worker refuses a trust file it cannot read.
            release::Trust::parse(&text).map_err(CliError::usage)?;
            std::fs::write(path, text).with_context(|| path.display().to_string()).map_err(CliError::Failed)?;
            println!("trusted in {} for {}", path.display(), args.tasks.join(", "));
        }
        None => println!("\n# trust.toml on every worker:\n{entry}"),
    }
    Ok(())
}

fn signing_key(path: Option<&Path>) -> Result<ed25519_dalek::SigningKey, CliError> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).with_context(|| p.display().to_string()).map_err(CliError::Usage)?,
        None => std::env::var("TASKHOST_SIGNING_KEY")
            .map_err(|_| CliError::usage(anyhow!("no signing key: pass --key FILE or set TASKHOST_SIGNING_KEY")))?,
    };
    release::parse_signing_key(&text).map_err(|e| CliError::usage(anyhow!(e)))
}

/// Loads the component the way a worker does: it must compile, link against the host and
/// export a taskhost world. Returns the world version.
fn check_component(bytes: &[u8]) -> Result<String, CliError> {
    let runtime = crate::runtime::Runtime::new(crate::runtime::RuntimeConfig { max_instances: 1, ..Default::default() })
        .map_err(CliError::failed)?;
    let loaded = runtime.load(bytes).map_err(|e| CliError::usage(anyhow!("the component does not load: {e}")))?;
    Ok(loaded.world.clone())
}

pub fn publish(args: PublishArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let key = signing_key(args.key.as_deref())?;
    let component = std::fs::read(&args.component).with_context(|| args.component.display().to_string()).map_err(CliError::Usage)?;
    let manifest = match &args.manifest {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| p.display().to_string()).map_err(CliError::Usage)?;
            Manifest::parse(&String::from_utf8_lossy(&bytes)).map_err(|e| CliError::usage(anyhow!("{}: {e}", p.display())))?;
            Some(bytes)
        }
        None => None,
    };
    if args.task.is_empty() || args.task.starts_with('.') || args.task.contains(['/', '\\', '@', '\0']) {
        return Err(CliError::usage(anyhow!("--task {:?} is not a task name", args.task)));
    }
    if !args.version.build.is_empty() {
        // 1.0.0+a and 1.0.0+b would be two releases that every requirement treats as one.
        return Err(CliError::usage(anyhow!("--version {}: build metadata (+…) is not allowed in a release version", args.version)));
    }
    let world = check_component(&component)?;
    let env = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
    let ci_run = args.ci_run.clone().or_else(|| match (env("GITHUB_SERVER_URL"), env("GITHUB_REPOSITORY"), env("GITHUB_RUN_ID")) {
        (Some(s), Some(r), Some(id)) => Some(format!("{s}/{r}/actions/runs/{id}")),
        _ => None,
    });
    let record = ReleaseRecord {
        task: args.task.clone(),
        version: args.version.to_string(),
        component_sha256: release::sha256_hex(&component),
        manifest_sha256: manifest.as_deref().map(release::sha256_hex),
        world,
        publisher: args.publisher.clone().unwrap_or_else(actor),
        key_id: release::key_id(&key.verifying_key()),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        size: component.len() as u64,
        git_commit: args.git_commit.clone().or_else(|| env("GITHUB_SHA")),
        ci_run,
    };
    let signed = SignedRelease::sign(&record, &key);
    let key_name = record.key();

    if let Some(dir) = args.registry.strip_prefix("dir:") {
        let dir = Path::new(dir);
        let wasm = dir.join(format!("{key_name}.wasm"));
        if let Ok(existing) = std::fs::read(&wasm) {
            if release::sha256_hex(&existing) == record.component_sha256 {
                return report_publish(&args, &record, &format!("dir:{}", dir.display()), "already-published", false);
            }
            return Err(CliError::usage(anyhow!("{} already holds another component; publish a new version", wasm.display())));
        }
        if let Some(m) = &manifest {
            std::fs::write(wasm.with_extension("toml"), m).map_err(CliError::failed)?;
        }
        std::fs::write(crate::registry::release_path(&wasm), signed.to_json()).map_err(CliError::failed)?;
        std::fs::write(&wasm, &component).map_err(CliError::failed)?;
        return report_publish(&args, &record, &format!("dir:{}", dir.display()), "published", true);
    }
    let (broker, _) = args.broker.urls(file);
    let url = registry_url(&args.registry, &broker)?;
    let location = match is_oci(&args.registry) {
        true => {
            let target = crate::registry::oci::OciTarget::parse(&args.registry).map_err(|e| CliError::usage(anyhow!(e)))?;
            Some(target.location(&record.task, &record.version).map_err(|e| CliError::usage(anyhow!(e)))?)
        }
        false => None,
    };
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        if let Some(location) = &location {
            use crate::registry::oci::{push, Pushed};
            match push(location, &component, &signed.to_json(), &record).await.map_err(|e| CliError::failed(anyhow!(e)))? {
                Pushed::Pushed | Pushed::Same => {}
                Pushed::Conflict(existing) => {
                    return Err(CliError::usage(anyhow!("{location} already holds another component ({existing}); publish a new version")))
                }
            }
        }
        let store = open_store(&url).await?;
        let outcome =
            publish::publish(store.as_ref(), &signed, &record, &component, manifest.as_deref(), args.activate, location.as_deref())
                .await
                .map_err(op_err)?;
        let url = location.clone().unwrap_or(url);
        match outcome {
            Published::Stored { activated } => report_publish(&args, &record, &redact(&url), "published", activated),
            Published::AlreadyPublished => report_publish(&args, &record, &redact(&url), "already-published", false),
        }
    })
}

fn report_publish(args: &PublishArgs, record: &ReleaseRecord, registry: &str, status: &str, active: bool) -> Result<(), CliError> {
    if args.json {
        let out = serde_json::json!({
            "task": record.task, "version": record.version, "sha256": record.component_sha256,
            "size": record.size, "world": record.world, "key_id": record.key_id,
            "registry": registry, "status": status, "activated": active,
        });
        println!("{out}");
    } else {
        let what = if status == "published" { "published" } else { "already published (same digest): nothing changed for" };
        let active = if active { "; active for new tasks" } else if status == "published" { "; roll it out with `taskhost rollout`" } else { "" };
        println!("{what} {} ({} bytes, sha256 {}) to {registry}{active}", record.key(), record.size, &record.component_sha256[..16]);
    }
    Ok(())
}

pub fn releases(args: ReleasesArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (broker, _) = args.broker.urls(file);
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let store = open_store(&broker).await?;
        if args.audit {
            let entries: Vec<AuditEntry> =
                store.audit().await.map_err(CliError::failed)?.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
            let entries: Vec<&AuditEntry> = entries.iter().filter(|e| args.name.as_ref().is_none_or(|n| *n == e.task)).collect();
            if args.json {
                println!("{}", serde_json::to_string(&entries).map_err(CliError::failed)?);
            } else {
                for e in entries {
                    println!("{}  {:<9} {}@{}  by {}  {}", e.time, e.action, e.task, e.version.as_deref().unwrap_or("-"), e.by, e.detail);
                }
            }
            return Ok(());
        }
        let list = store.list().await.map_err(CliError::failed)?;
        let states = publish::rollouts(store.as_ref()).await.map_err(CliError::failed)?;
        let reports: Vec<(String, ReadyReport)> = store
            .ready()
            .await
            .map_err(CliError::failed)?
            .into_iter()
            .filter_map(|(w, r)| serde_json::from_str(&r).ok().map(|r| (w, r)))
            .collect();
        let mut rows = Vec::new();
        for r in &list {
            let Some((task, version)) = r.key.rsplit_once('@') else { continue };
            if args.name.as_ref().is_some_and(|n| n != task) {
                continue;
            }
            let record = SignedRelease::parse(r.signed.as_bytes()).and_then(|s| s.unverified_record()).ok();
            let share = Version::parse(version).ok().and_then(|v| {
                states.get(task).and_then(|s| s.shares().into_iter().find(|(sv, _)| *sv == v).map(|(_, share)| share))
            });
            let status = match (&r.yanked, share) {
                (Some(why), _) => format!("yanked: {why}"),
                (None, Some(share)) => format!("active {share}%"),
                (None, None) if states.contains_key(task) => "staged".to_string(),
                (None, None) => "newest serves".to_string(),
            };
            let mut ready: Vec<&str> =
                reports.iter().filter(|(_, rep)| rep.ready.get(&r.key) == Some(&r.digest)).map(|(w, _)| w.as_str()).collect();
            ready.sort();
            rows.push(serde_json::json!({
                "task": task, "version": version, "sha256": r.digest,
                "publisher": record.as_ref().map(|r| r.publisher.clone()),
                "time": record.as_ref().map(|r| r.time.clone()),
                "git_commit": record.as_ref().and_then(|r| r.git_commit.clone()),
                "status": status, "ready_on": ready, "live_workers": reports.len(),
            }));
        }
        let mut workers: Vec<serde_json::Value> =
            reports.iter().map(|(w, r)| serde_json::json!({"worker": w, "pid": r.pid, "ready": r.ready.len(), "refused": r.refused})).collect();
        workers.sort_by(|a, b| a["worker"].as_str().cmp(&b["worker"].as_str()));
        if args.json {
            println!("{}", serde_json::Value::Array(rows));
        } else {
            for w in &workers {
                println!("worker {} (pid {}): {} loaded, {} refused under trust.toml", w["worker"].as_str().unwrap_or("?"), w["pid"], w["ready"], w["refused"]);
            }
            println!("{:<28} {:<10} {:<12} {:<14} {:<24} {:<20} ready", "TASK", "VERSION", "SHA256", "PUBLISHER", "TIME", "STATUS");
            for row in rows {
                let s = |k: &str| row[k].as_str().unwrap_or("-").to_string();
                println!(
                    "{:<28} {:<10} {:<12} {:<14} {:<24} {:<20} {}/{}",
                    s("task"),
                    s("version"),
                    s("sha256").chars().take(12).collect::<String>(),
                    s("publisher"),
                    s("time"),
                    s("status"),
                    row["ready_on"].as_array().map_or(0, |a| a.len()),
                    row["live_workers"],
                );
            }
        }
        Ok(())
    })
}

pub fn rollout(args: RolloutArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    if args.steps.is_empty() || args.steps.iter().any(|s| !(0.0..=100.0).contains(s)) {
        return Err(CliError::usage(anyhow!("--steps must be percentages between 0 and 100")));
    }
    let (broker, _) = args.broker.urls(file);
    let plan = RolloutPlan {
        task: args.name.clone(),
        version: args.version.clone(),
        steps: args.steps.clone(),
        interval: args.interval,
        max_failure_rate: args.max_failure_rate,
        min_samples: args.min_samples,
        ready_timeout: args.ready_timeout,
        by: actor(),
    };
    let json = args.json;
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let store = open_store(&broker).await?;
        let outcome = publish::rollout(store.as_ref(), &plan, |line| {
            if !json {
                println!("{line}");
            }
        })
        .await
        .map_err(op_err)?;
        let key = format!("{}@{}", plan.task, plan.version);
        match outcome {
            RolloutOutcome::Completed | RolloutOutcome::AlreadyActive => {
                if json {
                    println!("{}", serde_json::json!({"release": key, "outcome": "active"}));
                } else if outcome == RolloutOutcome::AlreadyActive {
                    println!("{key} is already the active version");
                }
                Ok(())
            }
            RolloutOutcome::RolledBack { reason } => {
                if json {
                    println!("{}", serde_json::json!({"release": key, "outcome": "rolled-back", "reason": reason}));
                }
                Err(CliError::failed(anyhow!("rollout of {key} rolled back: {reason}")))
            }
        }
    })
}

pub fn rollback(args: RollbackArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (broker, _) = args.broker.urls(file);
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let store = open_store(&broker).await?;
        let active = publish::rollback(store.as_ref(), &args.name, &actor()).await.map_err(op_err)?;
        println!("{}@{active} is the active version", args.name);
        Ok(())
    })
}

pub fn yank(args: YankArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (broker, _) = args.broker.urls(file);
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let store = open_store(&broker).await?;
        publish::yank(store.as_ref(), &args.name, &args.version, &args.reason, &actor()).await.map_err(op_err)?;
        println!("yanked {}@{}: it serves no new task; messages requiring only it are dead-lettered", args.name, args.version);
        Ok(())
    })
}

pub fn gc(args: GcArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (broker_url, _) = args.broker.urls(file);
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let store = open_store(&broker_url).await?;
        let broker = super::connect_broker(&broker_url).await?;
        let queues = match &args.queues {
            Some(q) => q.clone(),
            None => {
                let mut queues = std::collections::BTreeSet::from([crate::worker::DEFAULT_QUEUE.to_string()]);
                for r in store.list().await.map_err(CliError::failed)? {
                    if let Some(bytes) = store.manifest(&r.key).await.map_err(CliError::failed)? {
                        if let Ok(Some(queue)) = Manifest::parse(&String::from_utf8_lossy(&bytes)).map(|m| m.queue) {
                            queues.insert(queue);
                        }
                    }
                }
                queues.into_iter().collect()
            }
        };
        let mut required = Vec::new();
        let mut unreadable = 0usize;
        for raw in broker.queued(&queues).await.map_err(CliError::failed)? {
            match crate::protocol::decode(&raw) {
                Ok(d) => {
                    if let Some(req) = d.headers.version_req.as_deref().and_then(|r| semver::VersionReq::parse(r).ok()) {
                        required.push((d.headers.task.clone(), req));
                    }
                }
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!("{unreadable} queued message(s) could not be read; their version requirements are not known");
        }
        let gone = publish::gc(store.as_ref(), args.name.as_deref(), &required, args.dry_run, &actor()).await.map_err(op_err)?;
        if args.json {
            println!("{}", serde_json::json!({"deleted": if args.dry_run { Vec::new() } else { gone.clone() }, "would_delete": if args.dry_run { gone.clone() } else { Vec::new() }, "queues": queues, "requirements": required.len()}));
        } else {
            let verb = if args.dry_run { "would delete" } else { "deleted" };
            for key in &gone {
                println!("{verb} {key}");
            }
            println!(
                "{} release(s) {verb}; {} queued version requirement(s) read from {}",
                gone.len(),
                required.len(),
                queues.join(", ")
            );
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_percentages_read_as_written() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_percent("5%").unwrap(), 5.0);
        assert!(parse_percent("150%").is_err());
    }
}
