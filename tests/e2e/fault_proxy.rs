//! A TCP fault proxy for the chaos tests: forwards to a server and, on command, resets
//! every connection, black-holes traffic (nothing through, no FIN, no RST), or delays it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Bytes pass as they come.
    None,
    /// Nothing passes either way and nobody is told: no FIN, no RST. Connections made
    /// meanwhile are accepted and hear nothing. What was sent waits and is delivered when
    /// the hole closes, as TCP's retransmissions would deliver it after a partition.
    BlackHole,
    /// Each chunk is delivered this much later, in each direction.
    Latency(Duration),
}

struct State {
    fault: Mutex<Fault>,
    /// Every live socket, both ends of each connection, for `reset_all`.
    sockets: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

/// Forwards 127.0.0.1:`port` to `upstream` until dropped.
pub struct FaultProxy {
    pub port: u16,
    state: Arc<State>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State { fault: Mutex::new(Fault::None), sockets: Mutex::new(Vec::new()), stop: AtomicBool::new(false) });
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                // Inside a black hole a new connection is accepted (the kernel completes the
                // handshake) but never reaches the server until the hole closes.
                match listener.accept() {
                    Ok((client, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || connect_when_open(client, upstream, st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy { port, state }
    }

    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Ends every open connection at both ends, dropping whatever it still held (the
    /// last descriptor closes with linger 0, so the kernel sends RST); new connections
    /// are let through.
    pub fn reset_all(&self) {
        let sockets = std::mem::take(&mut *self.state.sockets.lock().unwrap());
        for s in &sockets {
            // Linger 0: the close sends RST rather than FIN.
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            // Both ways: bytes still waiting to be forwarded are dropped with it.
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.reset_all();
    }
}

fn fault(state: &State) -> Fault {
    *state.fault.lock().unwrap()
}

fn connect_when_open(client: TcpStream, upstream: u16, state: Arc<State>) {
    while fault(&state) == Fault::BlackHole {
        if state.stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    client.set_nonblocking(false).unwrap();
    {
        let mut sockets = state.sockets.lock().unwrap();
        sockets.push(client.try_clone().unwrap());
        sockets.push(server.try_clone().unwrap());
    }
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let st = state.clone();
    std::thread::spawn(move || pump(c2, s2, st));
    pump(server, client, state);
}

/// Copies `from` → `to` through a delay line, honouring the current fault, until either
/// side closes; then closes both.
fn pump(mut from: TcpStream, to: TcpStream, state: Arc<State>) {
    from.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let (line, delayed) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = {
        let mut to = to.try_clone().unwrap();
        let state = state.clone();
        std::thread::spawn(move || {
            for (due, bytes) in delayed {
                let wait = due.saturating_duration_since(Instant::now());
                std::thread::sleep(wait);
                // Bytes read before a black hole opened wait behind it too.
                while fault(&state) == Fault::BlackHole && !state.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if to.write_all(&bytes).is_err() {
                    break;
                }
            }
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if state.stop.load(Ordering::Relaxed) {
            break;
        }
        // Inside a black hole nothing is read: the sender's bytes stay queued.
        if fault(&state) == Fault::BlackHole {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let due = match fault(&state) {
                    Fault::Latency(d) => Instant::now() + d,
                    _ => Instant::now(),
                };
                if line.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    drop(line);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    let mut sockets = state.sockets.lock().unwrap();
    let fd = (from.as_raw_fd(), to.as_raw_fd());
    sockets.retain(|s| !same_socket(s, fd.0) && !same_socket(s, fd.1));
}

/// Whether two descriptors are the same socket (clones are distinct descriptors).
fn same_socket(s: &TcpStream, fd: i32) -> bool {
    let inode = |fd: i32| {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
    };
    inode(s.as_raw_fd()).is_some() && inode(s.as_raw_fd()) == inode(fd)
}
