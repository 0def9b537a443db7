//! Every command README.md shows, run as written (through bash, from the repository
//! root, `taskhost` being the binary under test). A command added to the README without
//! an entry here fails the suite, and so does an entry the README no longer shows.

use crate::support::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Shell commands in README's code blocks: every `taskhost`/`make` line of a `sh` block,
/// and the `$ `-prompted ones of a `text` block; comments cut, spaces folded.
fn readme_commands() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut block: Option<String> = None;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            block = if block.is_some() { None } else { Some(fence.trim().to_string()) };
            continue;
        }
        let command = match block.as_deref() {
            Some("sh") => line.trim(),
            Some("text") => match line.trim().strip_prefix("$ ") {
                Some(c) => c,
                None => continue,
            },
            _ => continue,
        };
        let command = command.split(" # ").next().unwrap().split("  #").next().unwrap();
        let command = command.split_whitespace().collect::<Vec<_>>().join(" ");
        if ["taskhost ", "target/debug/taskhost ", "make "].iter().any(|p| command.starts_with(p)) {
            found.insert(command);
        }
    }
    found
}

/// How each README command is exercised: concrete forms of it (placeholders filled in,
/// each optional flag once), run in order against one embedded broker and one Redis.
struct Example {
    readme: &'static str,
    runs: &'static [Run],
}

enum Run {
    /// Run to completion; exit 0 and stdout containing the text.
    Ok(&'static str, &'static str),
    /// Start, wait for the text in its output, then stop it with SIGTERM.
    Serves(&'static str, &'static str),
    /// Not run here, and why (with a check that the reason still holds).
    Elsewhere(&'static str),
}

const EXAMPLES: &[Example] = &[
    Example { readme: "make test", runs: &[Run::Elsewhere("ci")] },
    Example { readme: "make run", runs: &[Run::Elsewhere("make-run")] },
    Example { readme: "make bench [BENCH_SCALE=0.2]", runs: &[Run::Elsewhere("bench")] },
    Example {
        readme: "target/debug/taskhost send tasks.add --args '[2, 3]' --wait",
        runs: &[Run::Ok("target/debug/taskhost send tasks.add --args '[2, 3]' --wait", "5")],
    },
    Example {
        readme: "target/debug/taskhost result $(target/debug/taskhost send tasks.mul --args '[6, 7]') --wait",
        runs: &[Run::Ok("target/debug/taskhost result $(target/debug/taskhost send tasks.mul --args '[6, 7]') --wait", "42")],
    },
    Example {
        readme: "taskhost run tasks.add --args '[2, 3]' --plugins dist/plugins",
        runs: &[Run::Ok("taskhost run tasks.add --args '[2, 3]' --plugins dist/plugins", "5")],
    },
    Example {
        readme: "taskhost build examples/python/add.py --task py.add --version 1.0.0 -o dist/python-plugins",
        // Into a scratch directory: dist/python-plugins is what other tests serve.
        runs: &[Run::Ok(
            "TASKHOST_COMPONENTIZE_PY=.venv/bin/componentize-py taskhost build examples/python/add.py --task py.add --version 1.0.0 -o target/readme-build && taskhost run py.add --args '[2, 3]' --plugins target/readme-build",
            "5",
        )],
    },
    Example {
        readme: "taskhost plugins list --plugins dist/plugins",
        runs: &[Run::Ok("taskhost plugins list --plugins dist/plugins", "media.thumbnail")],
    },
    Example {
        readme: "taskhost plugins compile --plugins dist/plugins",
        runs: &[Run::Ok("taskhost plugins compile --plugins dist/plugins", "components:")],
    },
    Example {
        readme: "taskhost serve --plugins dist/plugins -Q celery,media_heavy -c 32 -p 2 --broker redis://127.0.0.1:6379/0",
        runs: &[Run::Serves(
            "taskhost serve --plugins dist/plugins -Q celery,media_heavy -c 32 -p 2 --broker redis://127.0.0.1:6379/0",
            "worker ready node=taskhost-1",
        )],
    },
    Example {
        readme: "taskhost send tasks.add --args '[2, 3]' --wait",
        runs: &[Run::Ok("taskhost send tasks.add --args '[2, 3]' --wait", "5")],
    },
    Example {
        readme: "taskhost send media.thumbnail --args '[\"<base64>\", 64]' -Q media_heavy --priority 0 --countdown 5",
        runs: &[Run::Ok(
            "id=$(taskhost send media.thumbnail --args '[\"<base64>\", 64]' -Q media_heavy --priority 0 --countdown 5) && taskhost result $id --wait --timeout 30 | head -c 1",
            "\"",
        )],
    },
    Example {
        readme: "taskhost result <task-id> [--wait] [--json]",
        runs: &[
            Run::Ok("taskhost result <task-id>", "5"),
            Run::Ok("taskhost result <task-id> --wait", "5"),
            Run::Ok("taskhost result <task-id> --json", "\"status\":\"SUCCESS\""),
        ],
    },
    Example {
        readme: "taskhost send --workflow '{\"chord\": {\"header\": [{\"task\": \"tasks.add\", \"args\": [1, 1]}], \"body\": {\"task\": \"tasks.tsum\"}}}' --wait",
        runs: &[Run::Ok(
            "taskhost send --workflow '{\"chord\": {\"header\": [{\"task\": \"tasks.add\", \"args\": [1, 1]}], \"body\": {\"task\": \"tasks.tsum\"}}}' --wait",
            "2",
        )],
    },
    Example {
        readme: "taskhost revoke <task-id> [--terminate]",
        runs: &[Run::Ok("taskhost revoke <sleeping-id>", ""), Run::Ok("taskhost revoke <sleeping-id> --terminate", "")],
    },
    Example {
        readme: "taskhost dlq list | show <id> | replay <id>… | purge --all",
        runs: &[
            Run::Ok("taskhost dlq list", "tasks.nope"),
            Run::Ok("taskhost dlq show <letter-id>", "tasks.nope"),
            Run::Ok("taskhost dlq replay <letter-id>", ""),
            Run::Ok("taskhost dlq purge --all", ""),
        ],
    },
    Example {
        readme: "taskhost usage [--tenant T] [--since 24h] [--hourly] [--json]",
        runs: &[
            Run::Ok("taskhost usage", "tasks.add"),
            Run::Ok("taskhost usage --tenant default --since 2h --hourly", "tasks.add"),
            Run::Ok("taskhost usage --json", "\"tenant\":\"default\""),
        ],
    },
    Example {
        readme: "taskhost beat --schedule examples/schedule.toml",
        runs: &[Run::Serves("taskhost beat --schedule examples/schedule.toml", "beat: sent entry=heartbeat")],
    },
    // Releases, in order, on the embedded broker: a key, a first release, a follower, a
    // staged one rolled out with a follower running, then rollback, yank, audit, gc.
    Example {
        readme: "taskhost keygen --name ci --out keys --trust trust.toml",
        runs: &[Run::Ok(
            "rm -rf target/readme-rel && taskhost keygen --name ci --out target/readme-rel/keys --trust target/readme-rel/trust.toml",
            "trusted in target/readme-rel/trust.toml",
        )],
    },
    Example {
        readme: "taskhost publish app.wasm --task media.thumbnail --version 1.5.0 --key keys/ci.key [--manifest M.toml] [--activate] [--registry oci://host/repo] [--json]",
        runs: &[
            Run::Ok(
                "taskhost publish dist/plugins/media.thumbnail@1.4.0.wasm --task media.thumbnail --version 1.4.0 --key target/readme-rel/keys/ci.key --manifest plugins/thumbnail/manifest.toml --json",
                "\"activated\":true",
            ),
            Run::Ok(
                "mkdir -p target/readme-rel/dir && taskhost publish dist/plugins/tasks.add@1.0.0.wasm --task tasks.add --version 1.0.0 --key target/readme-rel/keys/ci.key --registry dir:target/readme-rel/dir --activate && ls target/readme-rel/dir",
                "tasks.add@1.0.0.release.json",
            ),
        ],
    },
    Example {
        readme: "taskhost serve --plugins cache --registry broker --trust trust.toml",
        runs: &[Run::Serves(
            "taskhost serve --plugins target/readme-rel/cache --registry broker --trust target/readme-rel/trust.toml",
            "release fetched from the registry release=media.thumbnail@1.4.0",
        )],
    },
    Example {
        readme: "taskhost publish dist/plugins/media.thumbnail@1.4.0.wasm --manifest plugins/thumbnail/manifest.toml --task media.thumbnail --version 1.5.0 --key keys/ci.key",
        runs: &[Run::Ok(
            "taskhost publish dist/plugins/media.thumbnail@1.4.0.wasm --manifest plugins/thumbnail/manifest.toml --task media.thumbnail --version 1.5.0 --key target/readme-rel/keys/ci.key",
            "roll it out with `taskhost rollout`",
        )],
    },
    Example {
        readme: "taskhost releases [NAME] [--audit] [--json]",
        runs: &[
            Run::Ok("taskhost releases media.thumbnail --json", "\"status\":\"staged\""),
            Run::Ok("taskhost releases --audit media.thumbnail", "publish"),
        ],
    },
    Example { readme: "taskhost releases", runs: &[Run::Ok("taskhost releases", "active 100%")] },
    Example {
        readme: "taskhost rollout media.thumbnail 1.5.0 --steps 1,10,50,100 --interval 60s --max-failure-rate 5%",
        // A follower must be live for the rollout to start; one step, no traffic to judge.
        runs: &[Run::Ok(
            "(taskhost serve -p 1 --plugins target/readme-rel/cache --registry broker --trust target/readme-rel/trust.toml > target/readme-rel/serve.log 2>&1 & echo $! > target/readme-rel/serve.pid); taskhost rollout media.thumbnail 1.5.0 --steps 100 --interval 60s --max-failure-rate 5%; s=$?; kill $(cat target/readme-rel/serve.pid); exit $s",
            "media.thumbnail@1.5.0: 100% of new tasks",
        )],
    },
    Example {
        readme: "taskhost rollback media.thumbnail",
        runs: &[Run::Ok("taskhost rollback media.thumbnail", "media.thumbnail@1.4.0 is the active version")],
    },
    Example {
        readme: "taskhost yank media.thumbnail 1.5.0 --reason CVE-2026-0001",
        runs: &[Run::Ok("taskhost yank media.thumbnail 1.5.0 --reason CVE-2026-0001", "yanked media.thumbnail@1.5.0")],
    },
    Example { readme: "taskhost releases --audit", runs: &[Run::Ok("taskhost releases --audit", "yank")] },
    Example { readme: "taskhost gc --dry-run", runs: &[Run::Ok("taskhost gc --dry-run", "release(s) would delete")] },
    Example {
        readme: "taskhost inspect ping|active|reserved|scheduled|stats|registered|active_queues [-d NODE] [--json]",
        runs: &[
            Run::Ok("taskhost inspect ping", "pong"),
            Run::Ok("taskhost inspect active", "nodes online"),
            Run::Ok("taskhost inspect reserved", "nodes online"),
            Run::Ok("taskhost inspect scheduled", "nodes online"),
            Run::Ok("taskhost inspect stats", "max-concurrency"),
            Run::Ok("taskhost inspect registered", "tasks.add"),
            Run::Ok("taskhost inspect active_queues", "\"celery\""),
            Run::Ok("taskhost inspect ping -d NODE", "1 node online"),
            Run::Ok("taskhost inspect ping --json", "{\"ok\":\"pong\"}"),
        ],
    },
    Example {
        readme: "taskhost events [--json]",
        runs: &[
            Run::Ok("taskhost events --duration 3", "heartbeat: active="),
            Run::Ok("taskhost events --json --duration 3", "\"type\":\"worker-heartbeat\""),
        ],
    },
    Example {
        readme: "taskhost serve -E --http 127.0.0.1:9808",
        runs: &[Run::Serves("taskhost serve -E --http 127.0.0.1:9808", "dashboard on http://127.0.0.1:9808/?token=")],
    },
    Example {
        readme: "taskhost bench runtime --plugins dist/plugins [--processes N]",
        runs: &[
            Run::Ok("taskhost bench runtime --plugins dist/plugins --seconds 0.3", "tasks.noop"),
            Run::Ok("taskhost bench runtime --plugins dist/plugins --processes 1 --seconds 0.3", "tasks.noop"),
        ],
    },
    Example {
        readme: "taskhost bench drain --plugins dist/plugins [--broker URL] [--count N] [--results] [--without-sandbox] [--max-task-memory SIZE] [--worker-nice N] [--prefetch-multiplier N]",
        runs: &[
            Run::Ok("taskhost bench drain --plugins dist/plugins --broker <redis> --count 2000 --results", "/s"),
            // A small pool: what bench/instructions.py --floor runs under valgrind.
            Run::Ok("taskhost bench drain --plugins dist/plugins --count 500 --max-task-memory 64MiB", "/s"),
            // Workers level with the command (the default is 10 below it).
            Run::Ok("taskhost bench drain --plugins dist/plugins --count 500 --worker-nice 0", "/s"),
            // The workers hold one message per sandbox; the report says so.
            Run::Ok(
                "taskhost bench drain --plugins dist/plugins --count 500 --prefetch-multiplier 1 --json",
                "\"prefetch_multiplier\":1",
            ),
            // Every task still fetched, stored and acked (the command fails on a shortfall).
            Run::Ok(
                "taskhost bench drain --plugins dist/plugins --broker <redis> --count 2000 --results --without-sandbox",
                "without a sandbox",
            ),
        ],
    },
    Example {
        readme: "taskhost bench roundtrip --broker URL [--count N]",
        runs: &[Run::Ok("taskhost bench roundtrip --broker \"$TASKHOST_BROKER\" --count 20", "p50")],
    },
];

/// Runs commands as README shows them: bash, the repository root as working directory,
/// `taskhost` on PATH the binary under test, the embedded broker in a scratch directory.
struct Shell {
    /// Holds `taskhost`, a link to the binary under test, first on PATH.
    bin_dir: tempfile::TempDir,
    broker_dir: tempfile::TempDir,
    redis: RedisServer,
    fills: Vec<(String, String)>,
}

impl Shell {
    fn command(&self, line: &str) -> Command {
        let mut line = line.replace("redis://127.0.0.1:6379/0", &self.redis.url()).replace("<redis>", &self.redis.url());
        for (placeholder, value) in &self.fills {
            line = line.replace(placeholder.as_str(), value);
        }
        let path = format!("{}:{}", self.bin_dir.path().display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("set -o pipefail; {line}"))
            .current_dir(repo())
            .env("PATH", path)
            .env("TASKHOST_CACHE_DIR", cache_dir())
            .env("TASKHOST_BROKER", format!("sqlite://{}", self.broker_dir.path().join("taskhost.db").display()))
            .env_remove("TASKHOST_RESULT_BACKEND");
        cmd
    }

    fn ok(&self, line: &str, expect: &str) {
        let out = run_bounded(&mut self.command(line), Duration::from_secs(120));
        let (so, se) = (stdout(&out), stderr(&out));
        assert!(out.status.success(), "`{line}` failed ({:?}):\n{so}\n{se}", out.status);
        assert!(so.contains(expect), "`{line}` printed no {expect:?}:\n{so}\n{se}");
    }

    fn start(&self, line: &str, log: &Path) -> Child {
        let file = std::fs::File::create(log).unwrap();
        let mut cmd = self.command(&format!("exec {line}"));
        cmd.stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap()
    }

    fn serves(&self, line: &str, expect: &str) {
        let log = self.broker_dir.path().join("serving.log");
        let mut child = self.start(line, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains(expect) {
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!("`{line}` never printed {expect:?}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(status.success(), "`{line}` did not stop cleanly on SIGTERM: {status:?}");
    }

    fn elsewhere(&self, what: &str) {
        let read = |p: &str| std::fs::read_to_string(repo().join(p)).unwrap();
        match what {
            // `make test` is what CI runs; it cannot run inside itself.
            "ci" => assert!(read(".ci/run").contains("make test")),
            // `make run` builds (cargo would wait on this test run's own lock), then
            // serves: the serve line it runs is checked, then run, here.
            "make-run" => {
                let lines = stdout(&dry_run("run"));
                let serve = lines.lines().map(str::trim).find(|l| l.contains(" serve ")).unwrap_or_default().to_string();
                assert_eq!(serve, "target/debug/taskhost serve --plugins dist/plugins", "{lines}");
                self.serves(&serve, "worker ready node=taskhost-1");
            }
            // The release build takes minutes; bench/run.py itself runs in smoke size in
            // interop::the_celery_comparison_benchmark_runs_in_smoke_size.
            "bench" => {
                let dry = stdout(&dry_run("bench"));
                assert!(dry.contains("bench/run.py"), "{dry}");
                assert!(read("tests/e2e/interop.rs").contains("fn the_celery_comparison_benchmark_runs_in_smoke_size"));
            }
            other => panic!("no reason {other:?}"),
        }
    }
}

/// `make -n <target>` as a user would type it, not as the `make test` running this sees
/// it (a nested make would print its directory and inherit the outer one's flags).
fn dry_run(target: &str) -> std::process::Output {
    Command::new("make")
        .args(["-n", "--no-print-directory", target])
        .current_dir(repo())
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .output()
        .unwrap()
}

fn thumbnail_base64() -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(png.into_inner())
}

#[test]
fn every_command_the_readme_shows_runs_as_written() {
    let shown = readme_commands();
    let covered: BTreeSet<String> = EXAMPLES.iter().map(|e| e.readme.to_string()).collect();
    let untested: Vec<_> = shown.difference(&covered).collect();
    let stale: Vec<_> = covered.difference(&shown).collect();
    assert!(untested.is_empty(), "README commands with no entry in tests/e2e/readme.rs: {untested:#?}");
    assert!(stale.is_empty(), "entries in tests/e2e/readme.rs the README no longer shows: {stale:#?}");

    let bin_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(taskhost_bin(), bin_dir.path().join("taskhost")).unwrap();
    let mut shell = Shell { bin_dir, broker_dir: tempfile::tempdir().unwrap(), redis: RedisServer::start(), fills: Vec::new() };
    shell.fills.push(("<base64>".into(), thumbnail_base64()));
    // A worker on the embedded broker, as `make run` starts it, for the commands after.
    let worker_log = shell.broker_dir.path().join("worker.log");
    let mut worker = shell.start("target/debug/taskhost serve --plugins dist/plugins", &worker_log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&worker_log).unwrap_or_default().matches("worker ready").count() < 2 {
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&worker_log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ids the placeholder forms need: a finished task, a sleeping one, a dead letter.
    let broker = format!("sqlite://{}", shell.broker_dir.path().join("taskhost.db").display());
    let done = stdout(&send(&broker, &["tasks.add", "--args", "[2, 3]"]));
    wait_status(&broker, &done, "SUCCESS", Duration::from_secs(30));
    shell.fills.push(("<task-id>".into(), done));
    let sleeping = stdout(&send(&broker, &["tasks.sleep", "--args", "[30000]"]));
    wait_status(&broker, &sleeping, "STARTED", Duration::from_secs(30));
    shell.fills.push(("<sleeping-id>".into(), sleeping));
    let lost = stdout(&send(&broker, &["tasks.nope"]));
    wait_status(&broker, &lost, "FAILURE", Duration::from_secs(30));
    let letters = stdout(&cli(&broker, &["dlq", "list", "--json"]));
    let letter: serde_json::Value = serde_json::from_str(letters.lines().next().expect("a dead letter")).unwrap();
    shell.fills.push(("<letter-id>".into(), letter["letter_id"].as_str().unwrap().to_string()));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    shell.fills.push(("NODE".into(), format!("taskhost-0@{host}")));

    for example in EXAMPLES {
        for run in example.runs {
            match run {
                Run::Ok(line, expect) => shell.ok(line, expect),
                Run::Serves(line, expect) => shell.serves(line, expect),
                Run::Elsewhere(what) => shell.elsewhere(what),
            }
        }
    }
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    worker.wait().unwrap();
}
