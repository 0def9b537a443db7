//! `tasks.escape()`: tries to leave the sandbox (file, env, socket) and reports what happened.
use serde_json::json;
use taskhost_sdk::task;

#[task]
fn escape() -> serde_json::Value {
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
    json!({"file": file, "env": env, "socket": socket, "listen": listen, "dir": dir})
}
