//! Shared fixtures: where the built plugins and binary are, a shared runtime, and
//! helpers to run the binary.

use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, OnceLock};
use taskhost::runtime::{Runtime, RuntimeConfig};

fn workspace_root() -> PathBuf {
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
