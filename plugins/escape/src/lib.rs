//! `tasks.escape()`: tries to leave the sandbox (file, env, socket) and reports what happened,
//! and whether anything an earlier task wrote into its memory is still there.
use serde_json::json;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use taskhost_sdk::task;

/// Starts at 7 (a data segment): a fresh instance always sees 7 before counting this call.
static CALLS: AtomicU32 = AtomicU32::new(7);
/// Zero-initialised (bss): a fresh instance sees it all zero; each call fills it.
static SCRATCH: [AtomicU64; 32 * 1024] = [const { AtomicU64::new(0) }; 32 * 1024];

#[task]
fn escape() -> serde_json::Value {
    let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    let residue = SCRATCH.iter().filter(|w| w.load(Ordering::Relaxed) != 0).count();
    for w in &SCRATCH {
        w.store(0x7461_736b_686f_7374, Ordering::Relaxed);
    }
    let file = match std::fs::read_to_string("/etc/passwd") {
        Ok(text) => format!("read {} bytes", text.len()),
        Err(e) => format!("denied: {e}"),
    };
    let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    let socket = match std::net::TcpStream::connect("127.0.0.1:6379") {
        Ok(_) => "connected".to_string(),
        Err(e) => format!("denied: {e}"),
    };
    let listen = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(_) => "listening".to_string(),
        Err(e) => format!("denied: {e}"),
    };
    let dir = match std::fs::read_dir("/") {
        Ok(entries) => format!("listed {} entries", entries.count()),
        Err(e) => format!("denied: {e}"),
    };
    json!({"file": file, "env": env, "socket": socket, "listen": listen, "dir": dir,
           "calls": calls, "residue_words": residue})
}
