//! The network grants from the attacker's side: `[grants] http` and `tcp` against real
//! local HTTP and SMTP servers started here; every way around them `tasks.sneak` knows is
//! refused, and the per-run allowances hold.

use crate::support::*;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskhost::registry::Registry;
use taskhost::runtime::{RunControl, TaskError, TaskInput, TaskRun};

/// A small HTTP/1.1 server on 127.0.0.1: `/hello`, `/big` (2 MiB, with a length),
/// `/big-stream` (2 MiB, no length, ends at close), `/slow` (answers after 10 s),
/// `/redirect` (302 to the cloud metadata address). Records each request's Host header.
struct HttpServer {
    port: u16,
    hosts: Arc<Mutex<Vec<String>>>,
}

const BIG: usize = 2 << 20;

impl HttpServer {
    fn start() -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hosts = Arc::new(Mutex::new(Vec::new()));
        let seen = hosts.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &seen);
                });
            }
        });
        HttpServer { port, hosts }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests(&self) -> usize {
        self.hosts.lock().unwrap().len()
    }
}

fn serve_one(stream: std::net::TcpStream, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut host = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("host") {
                host = value.trim().to_string();
            }
        }
    }
    seen.lock().unwrap().push(host);
    match path.as_str() {
        "/hello" => write!(writer, "HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\nhello world")?,
        "/big" => {
            write!(writer, "HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\nconnection: close\r\n\r\n")?;
            writer.write_all(&vec![b'x'; BIG])?;
        }
        "/big-stream" => {
            write!(writer, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")?;
            for _ in 0..(BIG / 4096) {
                writer.write_all(&[b'x'; 4096])?;
            }
        }
        "/slow" => {
            std::thread::sleep(Duration::from_secs(10));
            write!(writer, "HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nslow")?;
        }
        "/redirect" => write!(
            writer,
            "HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/latest/meta-data/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )?,
        _ => write!(writer, "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?,
    }
    writer.flush()?;
    let _ = writer.shutdown(std::net::Shutdown::Write);
    // Drain what the client still sends so the close is orderly.
    let _ = reader.read_to_end(&mut Vec::new());
    Ok(())
}

/// A plugins dir with the given components, each under the manifest given.
fn plugins_with(components: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (task, manifest) in components {
        std::fs::copy(plugin(&format!("{task}@1.0.0.wasm")), dir.path().join(format!("{task}@1.0.0.wasm"))).unwrap();
        std::fs::write(dir.path().join(format!("{task}@1.0.0.toml")), manifest).unwrap();
    }
    dir
}

/// A runtime whose operator allows these HTTP origins (a loopback address is granted
/// only where the operator allows it).
fn allowing_http(origins: &[&str]) -> Arc<taskhost::runtime::Runtime> {
    runtime_with(taskhost::ceilings::Ceilings {
        http: Some(origins.iter().map(|o| o.parse().unwrap()).collect()),
        ..Default::default()
    })
}

fn run_task(registry: &Registry, name: &str, args: serde_json::Value) -> TaskRun {
    let tv = registry.resolve(name, None).unwrap();
    let control = Arc::new(RunControl::default().with_grants(tv.grants()));
    let input = TaskInput { id: uuid(), name: name.into(), args: args.to_string(), kwargs: "{}".into(), ..Default::default() };
    block_on(registry.runtime().run(&tv.component, "1.0.0", input, &tv.limits(), control))
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn json(run: &TaskRun) -> serde_json::Value {
    serde_json::from_str(run.result.as_ref().unwrap_or_else(|e| panic!("task failed: {e}"))).unwrap()
}

#[test]
fn a_granted_origin_is_fetched_and_redirects_are_returned_not_followed() {
    let server = HttpServer::start();
    let origin = format!("http://127.0.0.1:{}", server.port);
    let plugins = plugins_with(&[("http.fetch", &format!("[grants]\nhttp = [\"{origin}\"]\n"))]);
    // Without the operator's allowance, a loopback address is not granted.
    let registry = Registry::open(plugins.path(), runtime()).unwrap();
    assert!(registry.resolve("http.fetch", None).unwrap().grants().http.is_empty());
    let refused = run_task(&registry, "http.fetch", serde_json::json!([server.url("/hello")]));
    assert!(matches!(&refused.result, Err(TaskError::Fail { message }) if message.contains("not granted")), "{:?}", refused.result);
    let registry = Registry::open(plugins.path(), allowing_http(&[&origin])).unwrap();
    let got = json(&run_task(&registry, "http.fetch", serde_json::json!([server.url("/hello")])));
    let sha = hex::encode(Sha256::digest(b"hello world"));
    assert_eq!(got, serde_json::json!({"status": 200, "length": 11, "sha256": sha}));
    // The Host header is the authority connected to.
    assert_eq!(server.hosts.lock().unwrap()[0], format!("127.0.0.1:{}", server.port));
    // A redirect, even to a place never granted, comes back to the guest as it is.
    let got = json(&run_task(&registry, "http.fetch", serde_json::json!([server.url("/redirect")])));
    assert_eq!(got["status"], 302);
    assert_eq!(server.requests(), 2);
}

#[test]
fn every_way_around_the_grants_that_tasks_sneak_tries_is_refused() {
    let server = HttpServer::start();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("ok.txt"), "fine").unwrap();
    let manifest = format!(
        "[grants]\nhttp = [\"http://localhost:{}\"]\nconfig = [\"VISIBLE\"]\ndirs = [{{ host = \"{}\", guest = \"/data\", mode = \"ro\" }}]\n",
        server.port,
        data.path().display()
    );
    let plugins = plugins_with(&[("tasks.sneak", &manifest)]);
    let rt = runtime_with(taskhost::ceilings::Ceilings {
        dirs: vec![data.path().to_str().unwrap().parse().unwrap()],
        ..Default::default()
    });
    let registry = Registry::open(plugins.path(), rt).unwrap();
    let run = run_task(&registry, "tasks.sneak", serde_json::json!([server.port]));
    let tried = json(&run);
    let tried = tried.as_object().unwrap();
    assert_eq!(tried.len(), 15, "{tried:#?}");
    for (attempt, outcome) in tried {
        assert!(outcome.as_str().unwrap().starts_with("denied: "), "{attempt} got through: {outcome}");
    }
    assert_eq!(server.requests(), 0, "a request reached the server");
    let port = server.port;
    let said = |attempt: &str| tried[attempt].as_str().unwrap().to_string();
    assert_eq!(
        said("ungranted_host"),
        format!("denied: http request to http://127.0.0.2:{port} denied: not granted (a manifest grants it with [grants] http = [\"http://127.0.0.2:{port}\"])")
    );
    assert_eq!(
        said("granted_name_private_address"),
        format!(
            "denied: http request to http://localhost:{port} denied: localhost resolves to a loopback, private or link-local address, which a granted name never reaches (grant the address itself, with the operator's allowance: [grants] http in taskhost.toml or --allow-http)"
        )
    );
    assert!(said("granted_name_as_raw_ip").contains("not granted"), "{}", said("granted_name_as_raw_ip"));
    assert!(said("cloud_metadata").contains("not granted"));
    assert!(said("other_port_of_granted_name").contains("not granted"));
    assert!(said("https_for_http_grant").contains("not granted"));
    // The guest may not set Host at all; user info in the authority is refused.
    assert!(said("host_header_trick").contains("Forbidden"), "{}", said("host_header_trick"));
    assert!(said("userinfo_trick").contains("user info"));
    // No [grants] tcp: no connect, and no name lookup either (nothing to learn from DNS).
    assert!(said("raw_tcp").contains("Permission denied") || said("raw_tcp").contains("ermission"), "{}", said("raw_tcp"));
    assert!(said("name_lookup").contains("ermission"), "{}", said("name_lookup"));
    assert!(said("ungranted_config").contains("[grants] config = [\\\"SMTP_PASSWORD\\\"]") || said("ungranted_config").contains("[grants] config"));
    assert!(said("ungranted_send_task").contains("[grants] send_tasks"));
    assert!(!data.path().join("planted").exists());
    // Counted: the nine the gate refuses itself (the raw connect is refused earlier, by
    // wasmtime, since without [grants] tcp no socket can even be created).
    assert!(run.denials >= 9, "denials counted: {}", run.denials);
}

#[test]
fn http_allowances_hold_per_run_requests_bytes_and_deadline() {
    let server = HttpServer::start();
    let origin = format!("http://127.0.0.1:{}", server.port);
    let plugins = plugins_with(&[(
        "tasks.hostile",
        &format!("time_limit = 2\nmax_http_requests = 3\nmax_http_response_bytes = \"3MiB\"\n[grants]\nhttp = [\"{origin}\"]\n"),
    )]);
    let registry = Registry::open(plugins.path(), allowing_http(&[&origin])).unwrap();
    let http = |n: u64, path: &str| json(&run_task(&registry, "tasks.hostile", serde_json::json!(["http", n, server.url(path)])));
    // Three requests a run, then a refusal that names the setting.
    let got = http(5, "/hello");
    assert_eq!(got["fetched"], 3);
    assert_eq!(
        got["error"],
        format!("http request to {origin} denied: this run already made 3 requests, all its manifest allows (max_http_requests)")
    );
    // A new run starts with a new allowance.
    assert_eq!(http(1, "/hello")["fetched"], 1);
    // 3 MiB of bodies a run: one 2 MiB body, then the second is cut, announced or not.
    for path in ["/big", "/big-stream"] {
        let got = http(2, path);
        assert_eq!(got["fetched"], 1, "{path}: {got}");
        assert_eq!(got["bytes"], BIG, "{path}: {got}");
        assert!(got["error"].as_str().unwrap().contains("max_http_response_bytes"), "{path}: {got}");
    }
    // A request ends with the task at its hard limit (the server answers after 10 s).
    let started = Instant::now();
    let run = run_task(&registry, "tasks.hostile", serde_json::json!(["http", 1, server.url("/slow")]));
    assert_eq!(run.result, Err(TaskError::TimeLimit { limit: Duration::from_secs(2) }));
    assert!(started.elapsed() < Duration::from_secs(8), "the request outlived the task: {:?}", started.elapsed());
}

#[test]
fn the_operator_caps_network_grants_for_every_manifest() {
    let server = HttpServer::start();
    let origin = format!("http://127.0.0.1:{}", server.port);
    let plugins = plugins_with(&[("http.fetch", &format!("[grants]\nhttp = [\"{origin}\"]\n"))]);
    let capped = runtime_with(taskhost::ceilings::Ceilings {
        http: Some(vec!["https://api.example.com".parse().unwrap()]),
        ..Default::default()
    });
    let registry = Registry::open(plugins.path(), capped).unwrap();
    assert!(registry.resolve("http.fetch", None).unwrap().grants().http.is_empty(), "the grant is dropped at load");
    let run = run_task(&registry, "http.fetch", serde_json::json!([server.url("/hello")]));
    assert!(matches!(&run.result, Err(TaskError::Fail { message }) if message.contains("not granted")), "{:?}", run.result);
    let allowed = runtime_with(taskhost::ceilings::Ceilings {
        http: Some(vec![origin.parse().unwrap()]),
        ..Default::default()
    });
    let registry = Registry::open(plugins.path(), allowed).unwrap();
    assert_eq!(json(&run_task(&registry, "http.fetch", serde_json::json!([server.url("/hello")])))["status"], 200);
    assert_eq!(server.requests(), 1);
}

/// aiosmtpd on a free port, delivering into a mailbox file.
struct SmtpServer {
    port: u16,
    child: std::process::Child,
    mailbox: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmtpServer {
    fn start() -> SmtpServer {
        let dir = tempfile::tempdir().unwrap();
        let mailbox = dir.path().join("mbox");
        let port = free_port();
        let child = std::process::Command::new(python())
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&mailbox)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("aiosmtpd (make test-deps installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        SmtpServer { port, child, mailbox, _dir: dir }
    }

    fn delivered(&self) -> String {
        std::fs::read_dir(self.mailbox.join("new"))
            .map(|entries| entries.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect())
            .unwrap_or_default()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mail_registry(tcp_grant: &str, server: &str) -> (tempfile::TempDir, Arc<Registry>) {
    let plugins = plugins_with(&[(
        "mail.send",
        &format!("[grants]\ntcp = [\"{tcp_grant}\"]\nconfig = [\"SMTP_SERVER\", \"SMTP_FROM\"]\n"),
    )]);
    let secrets: std::collections::BTreeMap<String, String> =
        [("SMTP_SERVER", server), ("SMTP_FROM", "reports@example.com")].map(|(k, v)| (k.to_string(), v.to_string())).into();
    let ceilings = taskhost::ceilings::Ceilings { tcp: Some(vec![tcp_grant.parse().unwrap()]), ..Default::default() };
    let rt = custom_runtime(taskhost::runtime::RuntimeConfig { max_instances: 4, secrets: Arc::new(secrets), ceilings, ..Default::default() });
    let registry = Registry::open(plugins.path(), rt).unwrap();
    (plugins, registry)
}

#[test]
fn mail_goes_only_to_the_granted_smtp_server() {
    let smtp = SmtpServer::start();
    let addr = format!("127.0.0.1:{}", smtp.port);
    let (_p, registry) = mail_registry(&addr, &addr);
    let args = serde_json::json!([["ops@example.com"], "Nightly report", "All green.\n.leading dot"]);
    let run = run_task(&registry, "mail.send", args.clone());
    assert!(run.result.as_ref().is_ok_and(|r| r.starts_with("\"250")), "{:?}", run.result);
    let mail = smtp.delivered();
    assert!(mail.contains("Subject: Nightly report") && mail.contains("All green.") && mail.contains("\n.leading dot"), "{mail}");
    assert!(mail.contains("From: <reports@example.com>"), "{mail}");

    // The same server by a name that resolves to loopback: the lookup is allowed (the
    // name is granted), the connect to its private address is not.
    let named = format!("localhost:{}", smtp.port);
    let (_p, registry) = mail_registry(&named, &named);
    let run = run_task(&registry, "mail.send", args.clone());
    assert!(matches!(&run.result, Err(TaskError::Fail { message }) if message.contains("[grants] tcp")), "{:?}", run.result);
    // A server the grant does not name (another port).
    let other = format!("127.0.0.1:{}", free_port());
    let (_p, registry) = mail_registry(&addr, &other);
    let run = run_task(&registry, "mail.send", args);
    assert!(matches!(&run.result, Err(TaskError::Fail { message }) if message.contains("[grants] tcp")), "{:?}", run.result);
    assert_eq!(smtp.delivered().matches("Subject: Nightly report").count(), 1);
}

#[test]
fn a_python_celery_client_enqueues_http_fetch_and_gets_the_result() {
    let server = HttpServer::start();
    let plugins = plugins_with(&[("http.fetch", &format!("[grants]\nhttp = [\"http://127.0.0.1:{}\"]\n", server.port))]);
    let redis = RedisServer::start();
    let allow = format!("--allow-http=http://127.0.0.1:{}", server.port);
    let _worker = WorkerProcess::start_with_plugins(&redis.url(), plugins.path(), &[&allow]);
    let script = r#"
import os, sys
from celery import Celery
app = Celery("t", broker=os.environ["BROKER"], backend=os.environ["BROKER"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
import json
print(json.dumps(app.send_task("http.fetch", (os.environ["URL"],)).get(timeout=30), sort_keys=True))
try:
    app.send_task("http.fetch", ("http://169.254.169.254/latest/meta-data/",)).get(timeout=30)
except Exception as e:
    print(type(e).__name__, e)
"#;
    let out = run_bounded(
        std::process::Command::new(python()).args(["-c", script]).env("BROKER", redis.url()).env("URL", server.url("/hello")),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let sha = hex::encode(Sha256::digest(b"hello world"));
    assert!(text.contains(&format!(r#"{{"length": 11, "sha256": "{sha}", "status": 200}}"#)), "{text}");
    assert!(text.contains("http request to http://169.254.169.254 denied: not granted"), "{text}");
}

/// A CA and a certificate it signed for 127.0.0.1, made with openssl.
fn test_pki(dir: &std::path::Path) {
    let sh = |script: &str| {
        let out = std::process::Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj '/CN=taskhost test CA' 2>/dev/null");
    sh("openssl req -newkey rsa:2048 -nodes -keyout leaf.key -out leaf.csr -subj '/CN=127.0.0.1' 2>/dev/null");
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh("openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 2 -extfile ext 2>/dev/null");
}

#[test]
fn https_is_verified_against_the_mozilla_roots_and_the_operators_ca() {
    let dir = tempfile::tempdir().unwrap();
    test_pki(dir.path());
    let port = free_port();
    let server = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"secure hello"
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True); srv.serve_forever()
"#;
    let mut child = std::process::Command::new(python())
        .args(["-c", server, &port.to_string()])
        .arg(dir.path().join("leaf.pem"))
        .arg(dir.path().join("leaf.key"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    let origin = format!("https://127.0.0.1:{port}");
    let plugins = plugins_with(&[("http.fetch", &format!("[grants]\nhttp = [\"{origin}\"]\n"))]);
    let fetch = |ca: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(taskhost_bin());
        cmd.args(["run", "http.fetch", "--args", &format!("[\"{origin}/x\"]"), "--allow-http", &origin, "--plugins"])
            .arg(plugins.path())
            .env("TASKHOST_CACHE_DIR", cache_dir())
            .env_remove("TASKHOST_HTTP_CA_FILE");
        if let Some(ca) = ca {
            cmd.env("TASKHOST_HTTP_CA_FILE", ca);
        }
        run_bounded(&mut cmd, Duration::from_secs(60))
    };
    // Signed by a CA nobody trusts: refused.
    let out = fetch(None);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).to_lowercase().contains("tls") || stderr(&out).contains("certificate"), "{}", stderr(&out));
    // The operator trusts the CA: fetched.
    let out = fetch(Some(&dir.path().join("ca.pem")));
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", stderr(&out));
    let sha = hex::encode(Sha256::digest(b"secure hello"));
    assert_eq!(stdout(&out).trim(), format!(r#"{{"status":200,"length":12,"sha256":"{sha}"}}"#));
}

#[test]
fn a_manifest_cannot_grant_itself_the_workers_private_network() {
    // The cloud metadata address and the broker's port, named literally: dropped at load
    // unless the operator's own list names them.
    let plugins = plugins_with(&[(
        "tasks.hostile",
        "[grants]\nhttp = [\"http://169.254.169.254\", \"https://api.example.com\"]\ntcp = [\"127.0.0.1:6379\", \"smtp.example.com:587\"]\n",
    )]);
    let registry = Registry::open(plugins.path(), runtime()).unwrap();
    let grants = registry.resolve("tasks.hostile", None).unwrap().grants();
    assert_eq!(grants.http.iter().map(|o| o.to_string()).collect::<Vec<_>>(), ["https://api.example.com"]);
    assert_eq!(grants.tcp.iter().map(|t| t.to_string()).collect::<Vec<_>>(), ["smtp.example.com:587"]);
    let got = json(&run_task(&registry, "tasks.hostile", serde_json::json!(["http", 1, "http://169.254.169.254/latest/meta-data/"])));
    assert!(got["error"].as_str().unwrap().contains("not granted"), "{got}");
}

#[test]
fn a_run_opens_at_most_32_sockets() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let plugins = plugins_with(&[("tasks.hostile", &format!("[grants]\ntcp = [\"{addr}\"]\n"))]);
    let rt = runtime_with(taskhost::ceilings::Ceilings { tcp: Some(vec![addr.parse().unwrap()]), ..Default::default() });
    let registry = Registry::open(plugins.path(), rt).unwrap();
    let got = json(&run_task(&registry, "tasks.hostile", serde_json::json!(["sockets", 100, addr])));
    assert_eq!(got["connected"], 32, "{got}");
    assert!(got["error"].is_string(), "{got}");
}
