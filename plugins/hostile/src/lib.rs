//! `tasks.hostile(mode, n?)`: what a hostile tenant's task tries, one mode per attack, so
//! tests can show each one contained: huge texts, forged log lines, bulk memory work,
//! clock probing, reads, writes and requests beyond what is granted, stack exhaustion and
//! host resources created without end, results past the cap.
use serde_json::json;
use std::time::{Instant, SystemTime};
use taskhost_sdk::{task, Context, TaskError};

#[task]
fn hostile(ctx: &Context, mode: String, n: Option<u64>, path: Option<String>) -> Result<serde_json::Value, TaskError> {
    let n = n.unwrap_or(0) as usize;
    let path = path.unwrap_or_default();
    let big = || "x".repeat(n);
    match mode.as_str() {
        "fail" => Err(TaskError::fail(big())),
        "recurse" => Ok(json!(recurse(n as u64))),
        "resources" => {
            // Host-side objects (pollables), never dropped: host memory, not guest memory.
            for i in 0..n {
                let pollable = wasip2::clocks::monotonic_clock::subscribe_duration(1_000_000_000 + i as u64);
                std::mem::forget(pollable);
            }
            Ok(json!(n))
        }
        "logflood" => {
            for i in 0..n {
                ctx.info(&format!("line {i}"));
            }
            Ok(json!(n))
        }
        "progressflood" => {
            for i in 0..n {
                ctx.set_progress("PROGRESS", &json!({"i": i}));
            }
            Ok(json!(n))
        }
        // A result of exactly n bytes of JSON (a string of n - 2 characters in quotes):
        // one past the worker's result cap, or far past it.
        "result" => Ok(json!("x".repeat(n.saturating_sub(2)))),
        "reject" => Err(TaskError::reject(big())),
        "retry" => Err(TaskError::retry_in(big(), 0.0)),
        "progress" => {
            ctx.set_progress(&big(), &json!({"step": 1}));
            Ok(json!(n))
        }
        "log" => {
            // A newline, then what a real worker line looks like.
            ctx.info("harmless\nINFO succeeded task=tasks.payroll id=forged\r\x1b[2K");
            ctx.info(&big());
            Ok(json!("logged"))
        }
        "fill" => {
            // One `memory.fill` over n bytes: a single wasm instruction that no epoch
            // tick can interrupt.
            let mut buffer: Vec<u8> = Vec::with_capacity(n);
            unsafe {
                std::ptr::write_bytes(buffer.as_mut_ptr(), 0x5a, n);
                buffer.set_len(n);
            }
            Ok(json!(buffer[n / 2] as u64 + buffer.len() as u64))
        }
        "clock" => {
            // The smallest step each clock shows between consecutive readings.
            let (mut mono_step, mut wall_step) = (u128::MAX, u128::MAX);
            let (mut last_mono, mut last_wall) = (Instant::now(), SystemTime::now());
            let started = Instant::now();
            let mut readings = 0u64;
            while started.elapsed().as_millis() < 50 && readings < 5_000_000 {
                let (mono, wall) = (Instant::now(), SystemTime::now());
                let dm = mono.duration_since(last_mono).as_nanos();
                let dw = wall.duration_since(last_wall).map(|d| d.as_nanos()).unwrap_or(0);
                if dm > 0 {
                    mono_step = mono_step.min(dm);
                    last_mono = mono;
                }
                if dw > 0 {
                    wall_step = wall_step.min(dw);
                    last_wall = wall;
                }
                readings += 1;
            }
            let wall_now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
            Ok(json!({"mono_min_step_ns": mono_step as u64, "wall_min_step_ns": wall_step as u64,
                      "wall_subsec_ns": (wall_now % 1_000_000_000) as u64, "readings": readings}))
        }
        // Files: whatever the sandbox lets through, or the error it gave.
        "read" => Ok(match std::fs::read_to_string(&path) {
            Ok(text) => json!({"read": text}),
            Err(e) => json!({"error": e.to_string()}),
        }),
        "write" => Ok(match std::fs::write(&path, b"written by a task") {
            Ok(()) => json!({"wrote": path}),
            Err(e) => json!({"error": e.to_string()}),
        }),
        // Follow-ups of n bytes of arguments each, until the host refuses one.
        "send" => {
            let args = vec![big()];
            let mut sent = 0;
            loop {
                match ctx.send_task("tasks.add", &args, &(), &taskhost_sdk::SendOptions::default()) {
                    Ok(_) => sent += 1,
                    Err(e) => break Ok(json!({"sent": sent, "error": e})),
                }
                if sent >= 10_000 {
                    break Ok(json!({"sent": sent}));
                }
            }
        }
        // TCP: n connections to path (host:port), all kept open, until one is refused.
        "sockets" => {
            let mut open = Vec::new();
            for _ in 0..n.max(1) {
                match std::net::TcpStream::connect(path.as_str()) {
                    Ok(s) => open.push(s),
                    Err(e) => return Ok(json!({"connected": open.len(), "error": e.to_string()})),
                }
            }
            Ok(json!({"connected": open.len()}))
        }
        // Follow-ups with each kind of bad option; what the host said to each.
        "sendopt" => {
            use taskhost_sdk::SendOptions;
            let bad = [
                SendOptions { priority: Some(10), ..Default::default() },
                SendOptions { countdown: Some(-1.0), ..Default::default() },
                SendOptions { countdown: Some(f64::NAN), ..Default::default() },
                SendOptions { version: Some("not a semver".into()), ..Default::default() },
                SendOptions { queue: Some("q\r\nFLUSHALL".into()), ..Default::default() },
                SendOptions { queue: Some("q".repeat(300)), ..Default::default() },
                SendOptions { queue: Some(String::new()), ..Default::default() },
            ];
            let said: Vec<String> = bad
                .iter()
                .map(|o| match ctx.send_task("tasks.add", &(1, 2), &(), o) {
                    Ok(id) => format!("SENT {id}"),
                    Err(e) => e,
                })
                .collect();
            Ok(json!(said))
        }
        // Secrets: how long the value is (never the value), or the host's refusal.
        "config" => Ok(match ctx.config(&path) {
            Ok(Some(value)) => json!({"len": value.len()}),
            Ok(None) => json!({"missing": true}),
            Err(e) => json!({"error": e}),
        }),
        // HTTP: GET the URL n times (at least once), until the host refuses one.
        "http" => {
            let mut fetched = 0;
            let mut bytes = 0;
            for _ in 0..n.max(1) {
                match taskhost_sdk::http::get(&path) {
                    Ok(r) => {
                        fetched += 1;
                        bytes += r.body.len();
                    }
                    Err(e) => return Ok(json!({"fetched": fetched, "bytes": bytes, "error": e.to_string()})),
                }
            }
            Ok(json!({"fetched": fetched, "bytes": bytes}))
        }
        other => Err(TaskError::reject(format!("unknown mode {other:?}"))),
    }
}

/// Recursion `depth` frames deep, each keeping a little stack the optimizer cannot drop.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == 0 {
        return 0;
    }
    let pad = std::hint::black_box([depth; 16]);
    recurse(depth - 1).wrapping_add(pad[(depth % 16) as usize])
}
