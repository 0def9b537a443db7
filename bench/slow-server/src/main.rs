//! The I/O benchmark's HTTP peer: `slow-server serve PORT DELAY_MS` answers every request
//! on 127.0.0.1 after the delay with 1 KiB; `slow-server check PORT COUNT CONCURRENCY`
//! measures it alone (requests/s), so the benchmark can show it is not the bottleneck.

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\nconnection: close\r\n\r\n";

fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain struct in, plain struct out.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn answer(mut stream: TcpStream, delay: Duration) -> std::io::Result<()> {
    let mut seen = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    tokio::time::sleep(delay).await;
    let mut response = RESPONSE_HEAD.to_vec();
    response.extend_from_slice(&[b'x'; 1024]);
    stream.write_all(&response).await?;
    stream.shutdown().await
}

async fn serve(port: u16, delay: Duration) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    println!("ready");
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, delay));
        }
    }
}

async fn fetch(port: u16) -> std::io::Result<usize> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).await?;
    Ok(body.len())
}

async fn check(port: u16, count: usize, concurrency: usize) {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        tasks.push(tokio::spawn(async move {
            let got = fetch(port).await;
            drop(permit);
            got
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(n)) if n > 1024) {
            failed += 1;
        }
    }
    let took = started.elapsed().as_secs_f64();
    println!("{{\"count\": {count}, \"concurrency\": {concurrency}, \"seconds\": {took}, \"per_s\": {}, \"failed\": {failed}}}", count as f64 / took);
}

fn main() {
    raise_open_file_limit();
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok()).expect("usage: slow-server serve PORT DELAY_MS | check PORT COUNT CONCURRENCY");
    // One thread: the benchmark's workers get the other cores.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match args.get(1).map(String::as_str) {
        Some("serve") => rt.block_on(serve(num(2) as u16, Duration::from_millis(num(3)))),
        Some("check") => rt.block_on(check(num(2) as u16, num(3) as usize, num(4) as usize)),
        _ => eprintln!("usage: slow-server serve PORT DELAY_MS | check PORT COUNT CONCURRENCY"),
    }
}
