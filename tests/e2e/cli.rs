//! The `taskhost` binary's one-shot commands: `run` and `plugins list`, exit codes and messages.

use crate::support::*;

fn run(task: &str, extra: &[&str]) -> std::process::Output {
    let dir = plugins_dir();
    let mut args = vec!["run", task, "--plugins", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    taskhost(&args)
}

#[test]
fn run_prints_each_example_result_as_json() {
    for (task, args, expected) in [
        ("tasks.add", r#"[2, 3]"#, "5"),
        ("tasks.mul", r#"[4, 5]"#, "20"),
        ("tasks.tsum", r#"[[1, 2, 3, 4]]"#, "10"),
        ("tasks.echo", r#"[{"a": [1, "x"]}]"#, r#"{"a":[1,"x"]}"#),
        ("tasks.noop", "[]", "null"),
        ("tasks.sleep", "[20]", "20"),
        ("tasks.version", "[]", r#""2.0.0""#),
    ] {
        let out = run(task, &["--args", args]);
        assert!(out.status.success(), "{task}: {}", stderr(&out));
        assert_eq!(stdout(&out), expected, "{task}");
    }
}

#[test]
fn run_takes_kwargs_and_a_version_requirement() {
    let out = run("tasks.add", &["--args", "[1]", "--kwargs", r#"{"y": 7}"#]);
    assert_eq!(stdout(&out), "8", "{}", stderr(&out));
    let out = run("tasks.version", &["--version", "^1"]);
    assert_eq!(stdout(&out), r#""1.0.0""#, "{}", stderr(&out));
    let out = run("tasks.version", &["--version", "^3"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), "error: task tasks.version: no loaded version matches ^3 (loaded: 1.0.0, 2.0.0)");
}

#[test]
fn run_retries_eagerly_up_to_max_retries() {
    let out = run("tasks.flaky", &["--args", "[2]"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "2");
    let out = run("tasks.flaky", &["--args", "[9]"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).ends_with("error: task tasks.flaky failed: max retries (5) exceeded; last reason: attempt 6 of 10"), "{}", stderr(&out));
}

#[test]
fn run_fails_clearly() {
    let out = run("tasks.fail", &["--args", r#"["boom"]"#]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: task tasks.fail failed: boom");

    let out = run("tasks.spin", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: task tasks.spin failed: hard time limit (1s) exceeded");

    let out = run("tasks.nope", &[]);
    assert_eq!(out.status.code(), Some(2));
    let searched = format!("error: no component serves task tasks.nope (searched {} (", plugins_dir().display());
    assert!(stderr(&out).starts_with(&searched) && stderr(&out).ends_with(" components))"), "{}", stderr(&out));

    let out = run("tasks.add", &["--args", "{}"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), "error: --args must be a JSON array, got {}");

    let out = taskhost(&["run", "tasks.add", "--plugins", "/nonexistent/plugins"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), "error: plugins directory /nonexistent/plugins does not exist");
}

#[test]
fn plugins_list_shows_versions_digests_and_limits() {
    let dir = plugins_dir();
    let out = taskhost(&["plugins", "list", "--plugins", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("TASK"), "{text}");
    let spin = text.lines().find(|l| l.starts_with("tasks.spin ")).expect("spin row");
    assert!(spin.contains(" 1s "), "{spin}");
    let thumb = text.lines().find(|l| l.starts_with("media.thumbnail ")).expect("thumbnail row");
    assert!(thumb.contains("media_heavy") && thumb.contains("256MiB") && thumb.contains("1.4.0"), "{thumb}");
    assert_eq!(text.lines().filter(|l| l.starts_with("tasks.version ")).count(), 2);

    let out = taskhost(&["plugins", "list", "--json", "--plugins", dir.to_str().unwrap()]);
    let rows: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let alloc = rows.iter().find(|r| r["task"] == "tasks.alloc").unwrap();
    assert_eq!(alloc["memory_limit"], 32 << 20);
    assert_eq!(alloc["digest"].as_str().unwrap().len(), 64);
}

#[test]
fn an_invalid_manifest_is_reported_and_the_rest_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.add@1.0.0.wasm"), dir.path().join("tasks.add@1.0.0.wasm")).unwrap();
    std::fs::copy(plugin("tasks.mul@1.0.0.wasm"), dir.path().join("tasks.mul@1.0.0.wasm")).unwrap();
    std::fs::write(dir.path().join("tasks.mul@1.0.0.toml"), "timeout = 3\n").unwrap();
    let out = taskhost(&["plugins", "list", "--plugins", dir.path().to_str().unwrap()]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("tasks.add"));
    assert!(!stdout(&out).contains("tasks.mul"));
    assert!(stderr(&out).contains("unknown field `timeout`"), "{}", stderr(&out));
}

#[test]
fn run_compiles_only_the_component_it_runs() {
    // Beside tasks.add, a file that is not a component: `run` never opens it, so it
    // neither compiles it nor says a word about it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.add@1.0.0.wasm"), dir.path().join("tasks.add@1.0.0.wasm")).unwrap();
    std::fs::write(dir.path().join("other.task@1.0.0.wasm"), b"not wasm at all").unwrap();
    let out = taskhost(&["run", "tasks.add", "--args", "[1, 2]", "--plugins", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "3");
    assert!(!stderr(&out).contains("other.task"), "{}", stderr(&out));
}
