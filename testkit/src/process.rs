//! Binaries started by tests: a child that is killed and reaped when the test lets go of it,
//! free loopback addresses, and waiting (bounded) until a server listens.

use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

/// A child process, killed and reaped when dropped (also when the test panics).
#[derive(Debug)]
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `127.0.0.1:<port>` with a port free now.
pub fn free_loopback_addr() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    format!("127.0.0.1:{port}")
}

/// Waits until something accepts connections on `addr`; panics, naming `what`, after
/// `timeout` or as soon as `child` exits.
pub fn wait_listening(child: &mut Running, addr: &str, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("{what} exited before it listened on {addr}: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
