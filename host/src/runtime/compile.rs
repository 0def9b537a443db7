//! Compiling a component in a child process held to the operator's compile memory and
//! time, so a compile bomb costs that child, never the worker; the child's work lands in
//! the compile cache, from which the worker maps it.

use super::cache::CompileCache;
use super::LoadError;
use crate::ceilings::Ceilings;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wasmtime::component::Component;
use wasmtime::Engine;

/// How often the child's resident memory and time are checked. Memory can overshoot the
/// limit by what a compile touches in this long (tens of MB at most).
const POLL: Duration = Duration::from_millis(20);

/// The hidden subcommand the child runs: component bytes on stdin, result in the cache.
pub const CHILD_ARGS: [&str; 2] = ["plugins", "compile-one"];

/// Compiles `bytes` in a child of `exe` unless the cache has them already.
/// Returns the component and whether it came from the cache.
pub(super) fn in_child(
    exe: &Path,
    ceilings: &Ceilings,
    cache: &CompileCache,
    engine: &Engine,
    bytes: &[u8],
    digest: &str,
) -> Result<(Component, bool), LoadError> {
    if let Some(component) = cache.cached(engine, digest) {
        return Ok((component, true));
    }
    let dir = cache.dir().ok_or_else(|| LoadError::Host("compiling in a child needs a compile cache".into()))?;
    // One compile per digest per cache: the worker processes of a machine (which share the
    // cache) wait for the first one's result instead of each compiling the same bytes.
    let _lock = DigestLock::take(dir, digest)?;
    if let Some(component) = cache.cached(engine, digest) {
        return Ok((component, true));
    }
    let mut command = Command::new(exe);
    // SAFETY: prctl is async-signal-safe, as pre_exec requires. The child must not
    // outlive this process: its limits are enforced only from here.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .args(CHILD_ARGS)
        // What shapes the compiled code (the memory reservation) and what the child reads.
        .args(["--max-task-memory", &ceilings.max_task_memory.to_string()])
        .args(["--max-component-size", &ceilings.max_component_size.to_string()])
        .env("TASKHOST_CACHE_DIR", dir)
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LoadError::Host(format!("cannot start the compiler process {}: {e}", exe.display())))?;
    let pid = child.id();
    // Fed and read on threads of their own: a child that stops reading (or floods its
    // stderr) must not block this loop, which is what enforces the limits.
    let mut stdin = child.stdin.take().expect("piped");
    let input = bytes.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.by_ref().take(64 << 10).read_to_end(&mut text);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&text).into_owned()
    });

    let started = Instant::now();
    let mut peak = 0u64;
    let verdict = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(LoadError::Host(format!("waiting for the compiler process: {e}"))),
        }
        // A limit that cannot be checked is not enforced: fail closed.
        let Some(rss) = resident_bytes(pid) else {
            break Err(LoadError::Host(format!("cannot read the compiler process's memory (/proc/{pid}/statm)")));
        };
        peak = peak.max(rss);
        if peak > ceilings.compile_memory {
            break Err(LoadError::Compile(format!(
                "compiling needed more than {} of memory (ceiling compile_memory); stopped",
                crate::registry::ByteSize(ceilings.compile_memory)
            )));
        }
        if started.elapsed() > ceilings.compile_timeout {
            break Err(LoadError::CompileTimeout(format!(
                "compiling took longer than {}s (ceiling compile_timeout); stopped",
                ceilings.compile_timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(POLL);
    };
    if verdict.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let _ = feeder.join();
    let said = reader.join().unwrap_or_default();
    let status = verdict?;
    if !status.success() {
        let reason = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        let reason = reason.strip_prefix("error: ").unwrap_or(reason);
        return Err(LoadError::Compile(if reason.is_empty() {
            format!("the compiler process ended with {status}")
        } else {
            reason.to_string()
        }));
    }
    tracing::debug!(digest = &digest[..12.min(digest.len())], took = ?started.elapsed(), peak_rss = peak, "compiled in a child process");
    match cache.cached(engine, digest) {
        Some(component) => Ok((component, false)),
        None => Err(LoadError::Host(format!(
            "the compiler process succeeded but left nothing usable in the compile cache {}",
            dir.display()
        ))),
    }
}

/// An exclusive `flock` on `<cache>/<digest>.lock`, released when dropped or when its
/// process dies (so a killed compiler never leaves it held).
struct DigestLock(#[allow(dead_code, reason = "held for its lock")] std::fs::File);

impl DigestLock {
    fn take(dir: &Path, digest: &str) -> Result<DigestLock, LoadError> {
        if !digest.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(LoadError::Host(format!("digest {digest:?} is not hex")));
        }
        std::fs::create_dir_all(dir).map_err(|e| LoadError::Host(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("{digest}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LoadError::Host(format!("{}: {e}", path.display())))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(LoadError::Host(format!("locking {}: {}", path.display(), std::io::Error::last_os_error())));
        }
        Ok(DigestLock(file))
    }
}

/// Resident set size of process `pid`, bytes.
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}
