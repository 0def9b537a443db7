//! Shared fixtures: where the built plugins and binary are, a shared runtime, and
//! helpers to run the binary.

use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, OnceLock};
use taskhost::runtime::{Runtime, RuntimeConfig};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The components `make plugins` built (`TASKHOST_PLUGINS_DIR` overrides).
pub fn plugins_dir() -> PathBuf {
    let dir = std::env::var_os("TASKHOST_PLUGINS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("dist/plugins"));
    assert!(dir.join("tasks.noop@1.0.0.wasm").exists(), "no plugins in {} — run `make plugins` first", dir.display());
    dir
}

pub fn plugin(file: &str) -> PathBuf {
    plugins_dir().join(file)
}

/// The `taskhost` binary (`TASKHOST_BIN` overrides; `make test` builds it).
pub fn taskhost_bin() -> PathBuf {
    let bin = std::env::var_os("TASKHOST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/taskhost"));
    assert!(bin.exists(), "no taskhost binary at {} — run `cargo build -p taskhost`", bin.display());
    bin
}

/// A compile cache private to the test run, so tests never depend on a user's cache.
pub fn cache_dir() -> PathBuf {
    workspace_root().join("target/test-compile-cache")
}

/// One engine for the in-process tests, as one worker process would have.
pub fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            Arc::new(
                Runtime::new(RuntimeConfig { max_instances: 64, cache_dir: Some(cache_dir()), ..Default::default() })
                    .expect("runtime"),
            )
        })
        .clone()
}

/// An engine of its own, for a test that needs other settings than [`runtime`]'s
/// (ceilings, secrets), compiling into the test compile cache.
pub fn custom_runtime(config: RuntimeConfig) -> Arc<Runtime> {
    Arc::new(Runtime::new(RuntimeConfig { cache_dir: Some(cache_dir()), ..config }).expect("runtime"))
}

/// [`custom_runtime`] with these ceilings.
pub fn runtime_with(ceilings: taskhost::ceilings::Ceilings) -> Arc<Runtime> {
    custom_runtime(RuntimeConfig { max_instances: 8, ceilings, ..Default::default() })
}

/// Runs `taskhost <args>` to completion.
pub fn taskhost(args: &[&str]) -> Output {
    std::process::Command::new(taskhost_bin())
        .args(args)
        .env("TASKHOST_CACHE_DIR", cache_dir())
        .output()
        .expect("running taskhost")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// A current-thread tokio runtime, like a worker process's.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio").block_on(f)
}

/// Resident set size of this process, bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("rss pages");
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Peak and current resident memory of a process, in MiB (VmHWM, VmRSS).
pub fn memory_mib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap()
            / 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A private redis-server on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let child = Self::spawn(port, dir.path(), &["--appendonly", "no"]);
        Self::ready(RedisServer { port, child, _dir: dir })
    }

    /// A server persisting to `dir` with an append-only file fsynced every second, as a
    /// production Redis under a queue is run; started again on the same `dir`, it
    /// replays what it had written.
    pub fn start_persistent(port: u16, dir: &std::path::Path) -> RedisServer {
        let child = Self::spawn(port, dir, &["--appendonly", "yes", "--appendfsync", "everysec"]);
        Self::ready(RedisServer { port, child, _dir: tempfile::tempdir().unwrap() })
    }

    /// A server replicating `primary` (on loopback), as a Sentinel-watched replica is run.
    pub fn start_replica_of(primary: u16) -> RedisServer {
        let (port, dir) = (free_port(), tempfile::tempdir().unwrap());
        let child = Self::spawn(
            port,
            dir.path(),
            &[
                "--appendonly",
                "no",
                "--replicaof",
                "127.0.0.1",
                &primary.to_string(),
            ],
        );
        Self::ready(RedisServer {
            port,
            child,
            _dir: dir,
        })
    }

    fn spawn(port: u16, dir: &std::path::Path, persistence: &[&str]) -> std::process::Child {
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(persistence)
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (make test-deps installs it)")
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn ready(server: RedisServer) -> RedisServer {
        let port = server.port;
        poll_until(std::time::Duration::from_secs(10), std::time::Duration::from_millis(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("redis-server did not start on {port}: {e}"))
        });
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// A synchronous command, for assertions.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        block_on(async {
            let mut conn = self.client().get_multiplexed_async_connection().await.unwrap();
            cmd.query_async(&mut conn).await.unwrap()
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `taskhost serve` process, logging to a file; SIGTERM and wait on drop.
pub struct WorkerProcess {
    child: std::process::Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WorkerProcess {
    pub fn start(broker: &str, extra: &[&str]) -> WorkerProcess {
        Self::start_with_plugins(broker, &plugins_dir(), extra)
    }

    pub fn start_with_plugins(broker: &str, plugins: &std::path::Path, extra: &[&str]) -> WorkerProcess {
        Self::start_with_env(broker, plugins, extra, &[])
    }

    /// As `start_with_plugins`, with extra environment variables for the worker only.
    pub fn start_with_env(broker: &str, plugins: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
        Self::start_within(broker, plugins, extra, env, std::time::Duration::from_secs(20))
    }

    /// As `start_with_env`, allowing `ready_within` for the first load (large components
    /// compile for seconds each before the worker is ready).
    pub fn start_within(
        broker: &str,
        plugins: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
        ready_within: std::time::Duration,
    ) -> WorkerProcess {
        Self::start_processes(1, broker, plugins, extra, env, ready_within)
    }

    /// `serve -p <processes>`: a supervisor and its worker processes (`children`).
    pub fn start_processes(
        processes: usize,
        broker: &str,
        plugins: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
        ready_within: std::time::Duration,
    ) -> WorkerProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(taskhost_bin())
            .args(["serve", "-p", &processes.to_string(), "--broker", broker, "--plugins"])
            .arg(plugins)
            .args(extra)
            .env("TASKHOST_CACHE_DIR", cache_dir())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let worker = WorkerProcess { child, log, _dir: dir };
        worker.wait_for_log("worker ready", ready_within);
        worker
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, needle: &str, within: std::time::Duration) {
        poll_until(within, std::time::Duration::from_millis(20), || match self.log_text() {
            log if log.contains(needle) => Ok(()),
            log => Err(format!("worker log never showed {needle:?}:\n{log}")),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The pids of a supervisor's worker processes (its children serving tasks).
    pub fn children(&self) -> Vec<i32> {
        let me = self.pid().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid …: the fields after the last ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if ppid == Some(me.as_str()) && String::from_utf8_lossy(&cmdline).contains("--worker-index") {
                pids.push(pid);
            }
        }
        pids.sort();
        pids
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the process to exit; its exit status.
    pub fn wait(&mut self, within: std::time::Duration) -> std::process::ExitStatus {
        try_poll_until(within, std::time::Duration::from_millis(20), || self.child.try_wait().unwrap().ok_or(()))
            .unwrap_or_else(|()| panic!("worker did not exit within {within:?}:\n{}", self.log_text()))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// The venv Python with Celery (`make test-deps` makes it; `TASKHOST_PYTHON` overrides).
pub fn python() -> PathBuf {
    let py = std::env::var_os("TASKHOST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(py.exists(), "no Python with Celery at {} — run `make test-deps`", py.display());
    py
}

pub fn python_dir() -> PathBuf {
    workspace_root().join("tests/python")
}

/// Runs `tests/python/interop.py <args>` against `broker`; fails the test on a non-zero exit.
pub fn interop(broker: &str, args: &[&str]) -> String {
    interop_with(&[("BROKER", broker)], args)
}

/// Runs `tests/python/interop.py <args>` with `env` (`BROKER`, and `RESULT_BACKEND`,
/// `SENTINEL_MASTER`, … as interop.py reads them); its stdout, trimmed. Fails the test on
/// a non-zero exit.
pub fn interop_with(env: &[(&str, &str)], args: &[&str]) -> String {
    let out = run_bounded(
        std::process::Command::new(python()).arg(python_dir().join("interop.py")).args(args).envs(env.iter().copied()),
        std::time::Duration::from_secs(120),
    );
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "interop.py {args:?} with {env:?} failed:\n{so}\n{se}");
    so.trim().to_string()
}

/// Calls `attempt` every `every` until it gives `Ok`, and returns that; after `within`
/// it panics with the last `Err`, which says what was still missing.
pub fn poll_until<T>(within: std::time::Duration, every: std::time::Duration, attempt: impl FnMut() -> Result<T, String>) -> T {
    try_poll_until(within, every, attempt).unwrap_or_else(|why| panic!("after {within:?}: {why}"))
}

/// As [`poll_until`], but the last `Err` is returned: for a failure message too costly to
/// build at every attempt (a worker's whole log).
pub fn try_poll_until<T, E>(within: std::time::Duration, every: std::time::Duration, mut attempt: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match attempt() {
            Ok(done) => return Ok(done),
            Err(why) if std::time::Instant::now() >= deadline => return Err(why),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// Runs a command, killing it past `limit`.
pub fn run_bounded(cmd: &mut std::process::Command, limit: std::time::Duration) -> Output {
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} ran past {limit:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `taskhost send --broker <broker> <args…>`.
pub fn send(broker: &str, args: &[&str]) -> Output {
    let mut all = vec!["send", "--broker", broker];
    all.extend_from_slice(args);
    taskhost(&all)
}

/// `taskhost <args…> --broker <broker>`.
pub fn cli(broker: &str, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend_from_slice(&["--broker", broker]);
    taskhost(&all)
}

/// The stored result record of a task (`taskhost result --json`).
pub fn record(broker: &str, id: &str) -> serde_json::Value {
    let out = cli(broker, &["result", id, "--json"]);
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

/// Polls until the task's record has `status`.
pub fn wait_status(broker: &str, id: &str, status: &str, within: std::time::Duration) -> serde_json::Value {
    poll_until(within, std::time::Duration::from_millis(25), || match record(broker, id) {
        r if r["status"] == status => Ok(r),
        r => Err(format!("task {id} never reached {status}: {r}")),
    })
}

/// WAT for a hand-written module's `cabi_realloc`: a bump allocator from 64 KiB up, never
/// freeing (a task's instance lives for one call). Paste into a module with `{BUMP_REALLOC}`.
pub const BUMP_REALLOC: &str = r#"  (global $heap (mut i32) (i32.const 65536))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
                           (i32.xor (i32.sub (local.get 2) (i32.const 1)) (i32.const -1))))
    (global.set $heap (i32.add (local.get $p) (local.get 3)))
    (local.get $p))"#;

/// A component of the taskhost world from a hand-written core module (WAT), as an
/// attacker would write one: the module exports `memory`, `cabi_realloc` and `run`.
pub fn task_component(wat: &str) -> Vec<u8> {
    let mut module = wat::parse_str(wat).unwrap();
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(workspace_root().join("wit")).unwrap();
    let world = resolve.select_world(&[package], Some("task")).unwrap();
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8).unwrap();
    wit_component::ComponentEncoder::default().module(&module).unwrap().validate(true).encode().unwrap()
}

/// A Celery protocol v2 message for `task(*args)`, as a Python client writes it.
pub fn celery_message(task: &str, id: &str, args: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    let body = serde_json::json!([args, {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]);
    let body = base64::engine::general_purpose::STANDARD.encode(body.to_string());
    serde_json::json!({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": id, "root_id": id, "parent_id": null, "group": null,
                    "retries": 0, "timelimit": [null, null], "argsrepr": args.to_string(), "kwargsrepr": "{}"},
        "properties": {"correlation_id": id, "delivery_tag": uuid::Uuid::new_v4().to_string(), "body_encoding": "base64",
                       "priority": 0, "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "celery"}}})
    .to_string()
    .into_bytes()
}

/// Enqueues `n` runs of `task(*args)` straight on Redis (one pipeline); their ids.
pub fn enqueue(conn: &mut redis::Connection, task: &str, args: &serde_json::Value, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("LPUSH").arg("celery").arg(celery_message(task, id, args)).ignore();
    }
    pipe.query::<()>(conn).unwrap();
    ids
}
