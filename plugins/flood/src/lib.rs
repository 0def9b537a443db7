//! `tasks.flood(bytes?)`: writes a flood of stdout (100 MiB by default); the host keeps only its cap.
use std::io::Write;
use taskhost_sdk::task;

#[task]
fn flood(bytes: Option<u64>) -> u64 {
    let total = bytes.unwrap_or(100 << 20);
    let line = [b'x'; 1023];
    let mut out = std::io::stdout().lock();
    let mut written = 0;
    while written < total {
        let _ = out.write_all(&line);
        let _ = out.write_all(b"\n");
        written += 1024;
    }
    written
}
