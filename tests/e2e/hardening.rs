//! What a hostile tenant or producer tries, each attack reproduced and shown contained:
//! unbounded time limits, bulk-memory stalls, huge guest texts, loading bombs, bad files
//! in the plugins directory, fine clocks, forged log lines, panicking handlings.

use crate::support::*;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use taskhost::ceilings::Ceilings;
use taskhost::registry::Registry;
use taskhost::runtime::{
    RunControl, Runtime, RuntimeConfig, TaskError, TaskInput, TaskLimits, MAX_GUEST_TEXT,
    MAX_PROGRESS_STATE_BYTES,
};

fn hostile_input(mode: &str, n: u64) -> TaskInput {
    TaskInput {
        id: uuid::Uuid::new_v4().to_string(),
        name: "tasks.hostile".into(),
        queue: "celery".into(),
        args: serde_json::json!([mode, n]).to_string(),
        kwargs: "{}".into(),
        ..Default::default()
    }
}

fn hostile(rt: &Arc<Runtime>) -> taskhost::runtime::LoadedComponent {
    rt.load(&std::fs::read(plugin("tasks.hostile@1.0.0.wasm")).unwrap()).unwrap()
}

async fn run_hostile(rt: &Arc<Runtime>, mode: &str, n: u64, limits: TaskLimits, control: Arc<RunControl>) -> taskhost::runtime::TaskRun {
    rt.run(&hostile(rt), "1.0.0", hostile_input(mode, n), &limits, control).await
}

fn truncated(text: &str, cap: usize) {
    assert!(text.len() <= cap + 40, "{} bytes kept, cap {cap}", text.len());
    assert!(text.contains("[truncated "), "no truncation marker in {:?}…", &text[text.len().saturating_sub(60)..]);
}

#[test]
fn huge_failure_reject_retry_and_progress_texts_are_cut_with_a_marker() {
    let rt = runtime();
    let limits = TaskLimits::default();
    block_on(async {
        match run_hostile(&rt, "fail", 200_000, limits, Arc::default()).await.result {
            Err(TaskError::Fail { message }) => truncated(&message, MAX_GUEST_TEXT),
            other => panic!("{other:?}"),
        }
        match run_hostile(&rt, "reject", 200_000, limits, Arc::default()).await.result {
            Err(TaskError::Reject { reason }) => truncated(&reason, MAX_GUEST_TEXT),
            other => panic!("{other:?}"),
        }
        match run_hostile(&rt, "retry", 200_000, limits, Arc::default()).await.result {
            Err(TaskError::Retry { reason, .. }) => truncated(&reason, MAX_GUEST_TEXT),
            other => panic!("{other:?}"),
        }
        // 50 MB is past what a guest may hand the host in one call: it never gets copied.
        let rss_before = rss_bytes();
        match run_hostile(&rt, "fail", 50_000_000, limits, Arc::default()).await.result {
            Err(e @ TaskError::Trap { .. }) => {
                let text = e.to_string();
                assert!(text.contains("handed the host more than"), "{text}");
                assert!(text.len() < 4096, "{} bytes", text.len());
            }
            other => panic!("{other:?}"),
        }
        assert!(rss_bytes().saturating_sub(rss_before) < 200 << 20, "the host copied the 50 MB message");

        let control = Arc::new(RunControl::keeping_progress());
        let run = run_hostile(&rt, "progress", 200_000, limits, control.clone()).await;
        assert!(run.result.is_ok(), "{:?}", run.result);
        let updates = control.take_progress();
        let progress = updates.first().expect("one progress update");
        truncated(&progress.state, MAX_PROGRESS_STATE_BYTES);
    });
}

/// A component of the taskhost world written by hand, as an attacker would: its `run`
/// grows memory by `pages` and writes all of it with one `memory.fill`, a single wasm
/// instruction no epoch tick can interrupt (a compiler's memset is a loop, which can).
fn bulk_fill_component(pages: u32) -> Vec<u8> {
    let wat = format!(
        r#"(module
  (memory (export "memory") 17)
{BUMP_REALLOC}
  (data (i32.const 16) "1")
  (func (export "run") (param i32) (result i32)
    (local $start i32)
    (local.set $start (i32.mul (memory.grow (i32.const {pages})) (i32.const 65536)))
    (memory.fill (local.get $start) (i32.const 90) (i32.mul (i32.const {pages}) (i32.const 65536)))
    (i32.store8 (i32.const 32) (i32.const 0))
    (i32.store (i32.const 40) (i32.const 16))
    (i32.store (i32.const 44) (i32.const 1))
    (i32.const 32)))"#
    );
    task_component(&wat)
}

#[test]
fn a_bulk_fill_over_a_large_memory_stalls_only_its_own_thread() {
    let component = bulk_fill_component(16384); // 1 GiB
    let limits = TaskLimits { memory: 1100 << 20, ..Default::default() };
    // Largest gap a 5 ms ticker on the worker's thread sees while the fill runs beside it.
    let gap_beside_fill = |rt: Arc<Runtime>| {
        let loaded = rt.load(&component).unwrap();
        block_on(async move {
            let done = std::cell::Cell::new(false);
            let fill = async {
                // The ticker is going by the time the fill starts.
                tokio::time::sleep(Duration::from_millis(30)).await;
                let input = TaskInput { name: "tasks.fill".into(), args: "[]".into(), kwargs: "{}".into(), ..Default::default() };
                let run = rt.run(&loaded, "1.0.0", input, &limits, Arc::default()).await;
                done.set(true);
                run
            };
            let ticker = async {
                let mut worst = Duration::ZERO;
                let mut last = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    worst = worst.max(last.elapsed());
                    last = Instant::now();
                    if done.get() {
                        break worst;
                    }
                }
            };
            let (run, worst) = tokio::join!(fill, ticker);
            assert_eq!(run.result, Ok("1".into()));
            (worst, run.elapsed)
        })
    };
    // The attack: run inline, the fill holds the thread for its whole length.
    let inline = runtime_with(Ceilings { isolate_memory_above: u64::MAX, ..Default::default() });
    let (stalled, took) = gap_beside_fill(inline);
    assert!(stalled >= took / 2, "inline: worst gap {stalled:?}, fill took {took:?}");
    // Contained: above the isolation threshold it runs on a thread of its own.
    let (gap, took) = gap_beside_fill(runtime());
    assert!(gap * 3 < took, "isolated: worst gap {gap:?}, fill took {took:?}");
}

#[test]
fn guests_see_coarse_clocks_unless_precise_ones_are_both_asked_for_and_allowed() {
    let step = |rt: Arc<Runtime>, precise: bool| {
        let limits = TaskLimits { precise_clocks: precise, ..Default::default() };
        let run = block_on(async move { run_hostile(&rt, "clock", 0, limits, Arc::default()).await });
        let report: serde_json::Value = serde_json::from_str(&run.result.expect("clock report")).unwrap();
        (report["mono_min_step_ns"].as_u64().unwrap(), report["wall_min_step_ns"].as_u64().unwrap(), report)
    };
    let allowing = runtime_with(Ceilings { allow_precise_clocks: true, ..Default::default() });
    // The side channel: with exact clocks, steps of well under a microsecond are visible.
    let (mono, _, report) = step(allowing.clone(), true);
    assert!(mono < 100_000, "precise clocks should step finely: {report}");
    // Coarse by default, and when the operator does not allow precision.
    for (rt, precise) in [(runtime(), false), (runtime(), true), (allowing, false)] {
        let (mono, wall, report) = step(rt, precise);
        assert!(mono >= 1_000_000 && wall >= 1_000_000, "clocks step below 1 ms: {report}");
        assert_eq!(report["wall_subsec_ns"].as_u64().unwrap() % 1_000_000, 0, "{report}");
    }
}

#[test]
fn a_time_limit_past_what_an_instant_can_hold_neither_panics_nor_runs_forever_unrevoked() {
    let rt = runtime();
    let spin = rt.load(&std::fs::read(plugin("tasks.spin@1.0.0.wasm")).unwrap()).unwrap();
    let control = Arc::new(RunControl::default());
    let revoker = control.clone();
    let run = block_on(async move {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            revoker.revoke();
        });
        let limits = TaskLimits { hard: Duration::MAX, soft: Some(Duration::MAX), ..Default::default() };
        let input = TaskInput { name: "tasks.spin".into(), args: "[]".into(), kwargs: "{}".into(), ..Default::default() };
        rt.run(&spin, "1.0.0", input, &limits, control).await
    });
    assert_eq!(run.result, Err(TaskError::Revoked));
}

/// A component that takes long to compile and much memory: one function of `ops`
/// arithmetic steps over locals the optimizer cannot fold away.
fn compile_bomb(ops: u32) -> Vec<u8> {
    use wasm_encoder::*;
    let mut module = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32], [ValType::I32]);
    module.section(&types);
    let mut funcs = FunctionSection::new();
    funcs.function(0);
    module.section(&funcs);
    let mut exports = ExportSection::new();
    exports.export("f", ExportKind::Func, 0);
    module.section(&exports);
    let mut f = Function::new([(8, ValType::I32)]);
    for k in 1..9u32 {
        f.instruction(&Instruction::LocalGet(0));
        f.instruction(&Instruction::I32Const(k as i32 * 7919));
        f.instruction(&Instruction::I32Add);
        f.instruction(&Instruction::LocalSet(k));
    }
    for i in 0..ops {
        let l = i % 9;
        f.instruction(&Instruction::LocalGet(l));
        f.instruction(&Instruction::LocalGet((l + 4) % 9));
        f.instruction(match i % 3 {
            0 => &Instruction::I32Mul,
            1 => &Instruction::I32Xor,
            _ => &Instruction::I32Rotl,
        });
        f.instruction(&Instruction::LocalSet((l + 1) % 9));
    }
    f.instruction(&Instruction::LocalGet(5));
    f.instruction(&Instruction::End);
    let mut code = CodeSection::new();
    code.function(&f);
    module.section(&code);
    let core = module.finish();
    let mut component = Component::new();
    component.section(&RawSection { id: ComponentSectionId::CoreModule as u8, data: &core });
    let mut instances = InstanceSection::new();
    instances.instantiate(0, Vec::<(&str, ModuleArg)>::new());
    component.section(&instances);
    component.finish()
}

/// A runtime that compiles in child processes of the real binary, into a fresh cache.
fn compiling_runtime(ceilings: Ceilings, cache: &Path) -> Arc<Runtime> {
    Arc::new(
        Runtime::new(RuntimeConfig {
            max_instances: 4,
            ceilings,
            cache_dir: Some(cache.to_path_buf()),
            compiler: Some(taskhost_bin()),
            ..Default::default()
        })
        .unwrap(),
    )
}

fn invalid_reason(report: &taskhost::registry::ScanReport, file: &str) -> String {
    report
        .invalid
        .iter()
        .find(|(p, _)| p.file_name().unwrap() == file)
        .map(|(_, e)| e.clone())
        .unwrap_or_else(|| panic!("{file} not reported invalid: {report:?}"))
}

#[test]
fn a_compile_bomb_is_stopped_in_its_own_process_remembered_and_holds_up_no_other_deploy() {
    let bomb = compile_bomb(1_000_000);
    // Memory: the child is stopped at the ceiling; this process never holds the compile.
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = compiling_runtime(Ceilings { compile_memory: 300 << 20, ..Default::default() }, cache.path());
    let registry = Registry::open(dir.path(), rt).unwrap();
    std::fs::write(dir.path().join("tasks.bomb@1.0.0.wasm"), &bomb).unwrap();
    let rss_before = rss_bytes();
    let report = registry.scan().unwrap();
    let reason = invalid_reason(&report, "tasks.bomb@1.0.0.wasm");
    assert!(reason.contains("compiling needed more than 300MiB of memory (ceiling compile_memory)"), "{reason}");
    assert!(rss_bytes().saturating_sub(rss_before) < 100 << 20, "the compile's memory landed in the worker");
    // The same bytes under another name are refused at once, not compiled again.
    std::fs::write(dir.path().join("tasks.bomb2@1.0.0.wasm"), &bomb).unwrap();
    let started = Instant::now();
    let report = registry.scan().unwrap();
    assert!(invalid_reason(&report, "tasks.bomb2@1.0.0.wasm").contains("remembered for this digest"));
    assert!(started.elapsed() < Duration::from_millis(500), "a remembered failure took {:?}", started.elapsed());

    // Time: while a bomb compiles (stopped at 6 s), a component deployed beside it serves.
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = compiling_runtime(Ceilings { compile_timeout: Duration::from_secs(6), ..Default::default() }, cache.path());
    let registry = Registry::open(dir.path(), rt).unwrap();
    block_on(async {
        let watch = registry.watch(taskhost::registry::WATCH_INTERVAL);
        std::fs::write(dir.path().join("tasks.bomb@1.0.0.wasm"), &bomb).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(registry.is_loading("tasks.bomb"), "the bomb should still be compiling");
        std::fs::copy(plugin("tasks.add@1.0.0.wasm"), dir.path().join("tasks.add@1.0.0.wasm")).unwrap();
        let deployed = Instant::now();
        while registry.resolve("tasks.add", None).is_err() {
            assert!(deployed.elapsed() < Duration::from_secs(4), "tasks.add waited for the bomb");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let beside = deployed.elapsed();
        while registry.is_loading("tasks.bomb") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(registry.resolve("tasks.bomb", None).is_err());
        assert!(beside < Duration::from_secs(4), "tasks.add served after {beside:?}");
        watch.abort();
    });
    let report = registry.scan().unwrap();
    assert!(report.invalid.is_empty(), "nothing changed since: {report:?}");
}

#[test]
fn only_regular_files_within_the_size_ceiling_load_and_symlinks_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let add = plugin("tasks.add@1.0.0.wasm");
    let registry = Registry::open(dir.path(), runtime_with(Ceilings { max_component_size: 300 << 10, ..Default::default() })).unwrap();
    let fifo = dir.path().join("tasks.fifo@1.0.0.wasm");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink(&add, dir.path().join("tasks.link@1.0.0.wasm")).unwrap();
    std::fs::copy(plugin("media.thumbnail@1.4.0.wasm"), dir.path().join("media.big@1.0.0.wasm")).unwrap();
    std::fs::copy(&add, dir.path().join("tasks.add@1.0.0.wasm")).unwrap();
    let started = Instant::now();
    let report = registry.scan().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "a FIFO held up the scan");
    assert!(invalid_reason(&report, "tasks.fifo@1.0.0.wasm").ends_with("is not a regular file"));
    assert!(invalid_reason(&report, "tasks.link@1.0.0.wasm").contains("is a symbolic link"));
    let big = invalid_reason(&report, "media.big@1.0.0.wasm");
    assert!(big.contains("above this worker's ceiling of 300KiB (max_component_size)"), "{big}");
    assert!(registry.resolve("tasks.add", None).is_ok());

    let allowing = Registry::open(dir.path(), runtime_with(Ceilings { allow_symlinks: true, ..Default::default() })).unwrap();
    assert!(allowing.resolve("tasks.link", None).is_ok());
    assert!(allowing.resolve("tasks.fifo", None).is_err());
}

#[test]
fn a_half_written_copy_over_a_serving_file_never_unloads_the_serving_build() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("tasks.add@1.0.0.wasm");
    let bytes = std::fs::read(plugin("tasks.add@1.0.0.wasm")).unwrap();
    std::fs::write(&target, &bytes).unwrap();
    let registry = Registry::open(dir.path(), runtime()).unwrap();
    let serving = registry.resolve("tasks.add", None).unwrap();
    // A deploy caught mid-copy.
    std::fs::write(&target, &bytes[..bytes.len() / 2]).unwrap();
    let report = registry.scan().unwrap();
    assert_eq!(report.invalid.len(), 1, "{report:?}");
    assert!(report.removed.is_empty(), "the serving build was unloaded: {report:?}");
    let still = registry.resolve("tasks.add", None).expect("still served");
    assert_eq!(still.component.digest, serving.component.digest);
    let run = block_on(runtime().run(&still.component, "1.0.0", TaskInput {
        name: "tasks.add".into(), args: "[2, 3]".into(), kwargs: "{}".into(), ..Default::default()
    }, &still.limits(), Arc::default()));
    assert_eq!(run.result, Ok("5".into()));
    // The copy completes: the new build replaces the old one.
    std::fs::write(&target, &bytes).unwrap();
    let report = registry.scan().unwrap();
    assert_eq!(report.added.len(), 1, "{report:?}");
    assert!(registry.resolve("tasks.add", None).is_ok());
}

#[test]
fn manifests_above_the_ceilings_do_not_load_and_plugins_list_says_why() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.spin@1.0.0.wasm"), dir.path().join("tasks.spin@1.0.0.wasm")).unwrap();
    std::fs::write(dir.path().join("tasks.spin@1.0.0.toml"), "time_limit = 1e30\n").unwrap();
    std::fs::copy(plugin("tasks.add@1.0.0.wasm"), dir.path().join("tasks.add@1.0.0.wasm")).unwrap();
    std::fs::write(dir.path().join("tasks.add@1.0.0.toml"), "max_retries = 4000000000\nmemory_limit = \"64MiB\"\n").unwrap();
    std::fs::copy(plugin("tasks.mul@1.0.0.wasm"), dir.path().join("tasks.mul@1.0.0.wasm")).unwrap();
    // Bounded: a FIFO must not hang it.
    let list = |extra: &[&str]| {
        run_bounded(
            std::process::Command::new(taskhost_bin())
                .args(["plugins", "list"])
                .args(extra)
                .arg("--plugins")
                .arg(dir.path())
                .env("TASKHOST_CACHE_DIR", cache_dir()),
            Duration::from_secs(60),
        )
    };
    let out = list(&[]);
    let (so, se) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("tasks.mul"), "{so}");
    assert!(!so.contains("tasks.spin") && !so.contains("tasks.add"), "{so}");
    assert!(se.contains("time_limit = 1000000000000000000000000000000s is above this worker's ceiling of 3600s"), "{se}");
    assert!(se.contains("max_retries = 4000000000 is above this worker's ceiling of 100"), "{se}");
    // A FIFO in the directory does not hang the listing.
    let fifo = std::ffi::CString::new(dir.path().join("x@1.0.0.wasm").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let out = list(&["--max-time-limit", "1e31"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = list(&[]);
    assert!(stderr(&out).contains("is not a regular file"), "{}", stderr(&out));
}

fn embedded_broker() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("broker.db").display());
    (dir, url)
}

fn send_id(broker: &str, args: &[&str]) -> String {
    let out = send(broker, args);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

#[test]
fn time_limits_from_a_message_are_held_to_the_operator_ceiling() {
    let (_dir, broker) = embedded_broker();
    let worker = WorkerProcess::start(&broker, &["-c", "4", "--max-time-limit", "2"]);
    let started = Instant::now();
    let ids: Vec<String> = [
        vec!["tasks.spin", "--time-limit", "1e9"],
        vec!["tasks.spin", "--time-limit", "1e19"],
        vec!["tasks.spin", "--soft-time-limit", "1e19"],
    ]
    .iter()
    .map(|args| send_id(&broker, args))
    .collect();
    for id in &ids {
        let r = wait_status(&broker, id, "FAILURE", Duration::from_secs(20));
        assert_eq!(r["result"]["exc_type"], "TimeLimitExceeded", "{r}");
    }
    assert!(started.elapsed() < Duration::from_secs(12), "took {:?}", started.elapsed());
    // The 1e9 and 1e19 ones ran into the 2 s ceiling; the soft one into the manifest's 1 s.
    let limits: Vec<f64> =
        ids.iter().map(|id| record(&broker, id)["result"]["exc_message"][0].as_f64().unwrap()).collect();
    assert_eq!(limits, vec![2.0, 2.0, 1.0]);
    let log = worker.log_text();
    assert!(!log.contains("panicked"), "{log}");
    let add = send(&broker, &["tasks.add", "--args", "[2, 3]", "--wait"]);
    assert_eq!(stdout(&add), "5");
}

#[test]
fn a_panicking_handling_is_dead_lettered_once_and_the_worker_serves_on() {
    let (_dir, broker) = embedded_broker();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(taskhost_bin())
        .args(["serve", "-p", "1", "--visibility-timeout", "1", "--broker", &broker, "--plugins"])
        .arg(plugins_dir())
        .env("TASKHOST_CACHE_DIR", cache_dir())
        .env("TASKHOST_FAILPOINT_PANIC_TASK", "tasks.add")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let id = send_id(&broker, &["tasks.add", "--args", "[2, 3]"]);
    let r = wait_status(&broker, &id, "FAILURE", Duration::from_secs(20));
    assert_eq!(r["result"]["exc_type"], "WorkerPanic", "{r}");
    assert_eq!(stdout(&send(&broker, &["tasks.mul", "--args", "[6, 7]", "--wait"])), "42");
    // Past the visibility timeout and a sweep, it has not come back to panic again.
    std::thread::sleep(Duration::from_millis(2500));
    let letters = stdout(&cli(&broker, &["dlq", "list", "--json"]));
    let count = letters.lines().filter(|l| l.contains(&id)).count();
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(count, 1, "{letters}\n{text}");
    assert!(letters.contains("the worker panicked handling this message"), "{letters}");
    assert_eq!(text.matches("the worker panicked handling this message").count(), 1, "{text}");
}

#[test]
fn a_guests_log_text_cannot_forge_worker_log_lines() {
    let (_dir, broker) = embedded_broker();
    let worker = WorkerProcess::start(&broker, &["-c", "2"]);
    let out = send(&broker, &["tasks.hostile", "--args", "[\"log\", 100000]", "--wait"]);
    assert_eq!(stdout(&out), "\"logged\"", "{}", stderr(&out));
    worker.wait_for_log("harmless", Duration::from_secs(5));
    let log = worker.log_text();
    for line in log.lines() {
        assert!(!line.trim_start().starts_with("INFO succeeded task=tasks.payroll"), "forged line: {line}");
        assert!(!line.contains('\r') && !line.contains('\x1b'), "control character in {line:?}");
    }
    assert!(log.contains("harmless\\nINFO succeeded task=tasks.payroll"), "{log}");
    assert!(log.contains("[truncated "), "the 100 kB line was not cut: {} bytes of log", log.len());
}

#[test]
fn each_task_reserves_its_memory_cap_from_the_process_budget() {
    let (_dir, broker) = embedded_broker();
    let plugins = tempfile::tempdir().unwrap();
    std::fs::copy(plugin("tasks.sleep@1.0.0.wasm"), plugins.path().join("tasks.sleep@1.0.0.wasm")).unwrap();
    std::fs::write(plugins.path().join("tasks.sleep@1.0.0.toml"), "memory_limit = \"100MiB\"\n").unwrap();
    std::fs::copy(plugin("tasks.add@1.0.0.wasm"), plugins.path().join("tasks.huge@1.0.0.wasm")).unwrap();
    std::fs::write(plugins.path().join("tasks.huge@1.0.0.toml"), "memory_limit = \"300MiB\"\n").unwrap();
    let worker = WorkerProcess::start_with_plugins(&broker, plugins.path(), &["-c", "8", "--max-process-memory", "256MiB"]);
    // Two 100 MiB tasks fit in 256 MiB at once; six take three rounds of 600 ms.
    let started = Instant::now();
    let ids: Vec<String> = (0..6).map(|_| send_id(&broker, &["tasks.sleep", "--args", "[600]"])).collect();
    for id in &ids {
        wait_status(&broker, id, "SUCCESS", Duration::from_secs(20));
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1750), "six 100 MiB tasks ran more than two at once: {took:?}");
    // A manifest asking for more than the process budget does not load.
    assert!(worker.log_text().contains("memory_limit = 300MiB is above this worker's ceiling of 256MiB"), "{}", worker.log_text());
}

/// How long one uninterruptible instruction can hold a worker's thread: a `memory.fill`
/// over all of a task's memory at the isolation threshold (128 MiB), fresh pages, inline.
/// The figure README's Security section quotes; run with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: prints the bound README quotes"]
fn longest_uninterruptible_instruction_at_the_isolation_threshold() {
    let pages = (taskhost::ceilings::DEFAULT_ISOLATE_MEMORY_ABOVE >> 16) as u32 - 32;
    let rt = runtime_with(Ceilings { isolate_memory_above: u64::MAX, ..Default::default() });
    let loaded = rt.load(&bulk_fill_component(pages)).unwrap();
    let limits = TaskLimits { memory: taskhost::ceilings::DEFAULT_ISOLATE_MEMORY_ABOVE, ..Default::default() };
    let mut times = Vec::new();
    for _ in 0..5 {
        let input = TaskInput { name: "tasks.fill".into(), args: "[]".into(), kwargs: "{}".into(), ..Default::default() };
        let run = block_on(rt.run(&loaded, "1.0.0", input, &limits, Arc::default()));
        assert_eq!(run.result, Ok("1".into()));
        times.push(run.elapsed);
    }
    println!("memory.fill over {} MiB, fresh instance each: {times:?}", (pages as u64) >> 4);
}

#[test]
fn out_of_range_durations_on_the_command_line_are_usage_errors_not_panics() {
    let (_dir, broker) = embedded_broker();
    for args in [
        vec!["result", "some-id", "--wait", "--timeout", "-1"],
        vec!["result", "some-id", "--wait", "--timeout", "1e30"],
        vec!["serve", "--shutdown-grace", "1e30"],
        vec!["revoke", "some-id", "--expires", "1e30"],
    ] {
        let out = cli(&broker, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}: {}", stderr(&out));
    }
}
