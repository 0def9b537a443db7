//! `tasks.sneak(port)`: an adversarial task that tries every way around its grants it
//! knows and reports each outcome; every one must be refused. Its manifest grants
//! `http://localhost:<port>` (a name that resolves to loopback), the dir `/data`, the
//! config name `VISIBLE`, and nothing else.
use std::collections::BTreeMap;
use taskhost_sdk::{http, task, Context, SendOptions, TaskError};

fn outcome<T, E: std::fmt::Display>(r: Result<T, E>, reached: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(v) => format!("REACHED: {}", reached(v)),
        Err(e) => format!("denied: {e}"),
    }
}

fn get(url: &str) -> String {
    outcome(http::get(url), |r| format!("status {}", r.status))
}

#[task]
fn sneak(ctx: &Context, port: u16) -> Result<BTreeMap<&'static str, String>, TaskError> {
    let mut tried = BTreeMap::new();
    // Not granted at all.
    tried.insert("ungranted_host", get(&format!("http://127.0.0.2:{port}/")));
    tried.insert("cloud_metadata", get("http://169.254.169.254/latest/meta-data/"));
    // The granted name, whose address is loopback.
    tried.insert("granted_name_private_address", get(&format!("http://localhost:{port}/")));
    // The address the granted name stands for, written as a raw IP.
    tried.insert("granted_name_as_raw_ip", get(&format!("http://127.0.0.1:{port}/")));
    // Spin's CVE-2024-32980: connect to one authority, name another in Host.
    tried.insert(
        "host_header_trick",
        outcome(http::Request::get(&format!("http://127.0.0.1:{port}/")).header("host", &format!("localhost:{port}")).send(), |r| {
            format!("status {}", r.status)
        }),
    );
    tried.insert("userinfo_trick", get(&format!("http://localhost:{port}@127.0.0.1:{port}/")));
    tried.insert("other_port_of_granted_name", get(&format!("http://localhost:{}/", port.wrapping_add(1))));
    tried.insert("https_for_http_grant", get(&format!("https://localhost:{port}/")));
    // Raw sockets: no [grants] tcp at all.
    tried.insert("raw_tcp", outcome(std::net::TcpStream::connect(("127.0.0.1", port)), |_| "connected".into()));
    tried.insert("name_lookup", outcome(std::net::TcpStream::connect(("localhost", port)), |_| "connected".into()));
    // Out of the granted directory.
    tried.insert("dotdot_out_of_dir", outcome(std::fs::read_to_string("/data/../etc/hostname"), |t| t));
    tried.insert("absolute_path_outside", outcome(std::fs::read_to_string("/etc/hostname"), |t| t));
    tried.insert("write_read_only_dir", outcome(std::fs::write("/data/planted", "x"), |()| "written".into()));
    // Configuration and follow-ups it was not granted.
    tried.insert("ungranted_config", outcome(ctx.config("SMTP_PASSWORD"), |v| format!("{v:?}")));
    tried.insert("ungranted_send_task", outcome(ctx.send_task("tasks.payroll", &(), &(), &SendOptions::default()), |id| id));
    Ok(tried)
}
