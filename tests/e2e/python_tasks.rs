//! Tasks written in Python (`examples/python`, built by `make plugins` with `taskhost
//! build`): through the real worker, with a Python Celery client.

use crate::support::*;

/// What `make plugins` built from `examples/python`, beside the Rust components.
fn python_plugins() -> std::path::PathBuf {
    let dir = plugins_dir().parent().expect("plugins dir has a parent").join("python-plugins");
    assert!(dir.join("py.add@1.0.0.wasm").exists(), "no Python components in {} — run `make plugins`", dir.display());
    dir
}

#[test]
fn python_tasks_return_results_and_fail_as_python_exceptions() {
    let redis = RedisServer::start();
    let url = redis.url();
    // Each component compiles once (~15 s by the debug build) into the test compile cache.
    let worker =
        WorkerProcess::start_within(&url, &python_plugins(), &["-c", "8"], &[], std::time::Duration::from_secs(300));
    let out = run_bounded(
        std::process::Command::new(python()).arg(python_dir().join("interop.py")).arg("python_tasks").env("BROKER", &url),
        std::time::Duration::from_secs(400),
    );
    assert!(out.status.success(), "{}\n{}\nworker log:\n{}", stdout(&out), stderr(&out), worker.log_text());
}
