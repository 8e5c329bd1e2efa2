//! The `switchboard` binary as a newcomer runs it, each test a child
//! process: `serve` whose log pipe has closed (it must still drain on
//! SIGTERM and exit, and a second signal must end it at once).

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use switchboard::client::Client;
use switchboard::config::DEV_JWT_SECRET;
use switchboard::JwtHs256;

const SB: &str = env!("CARGO_BIN_EXE_switchboard");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors, which we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The write end of a pipe whose read end is already closed: every write
/// to it fails with EPIPE, as a log pipe does once `tee` or `grep` exits.
fn closed_pipe() -> Stdio {
    let (read, write) = pipe();
    drop(read);
    Stdio::from(write)
}

/// A child process killed (SIGKILL) if a test ends without waiting for it.
struct Proc(Child);

impl Proc {
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }

    /// Waits up to `limit` for the exit; `None` if it is still running.
    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `switchboard serve` on 127.0.0.1:`port`, raw TCP only, with its
/// stdout and stderr as given; returns once the port accepts.
fn serve(port: u16, log: &str, stdout: Stdio, stderr: Stdio) -> Proc {
    common::arm_watchdog();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(SB)
        .args(["serve", "--listen", &listen, "--ws-listen", "", "--workers", "2", "--log", log])
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("switchboard serve starts");
    let mut p = Proc(child);
    let addr: SocketAddr = listen.parse().unwrap();
    let up = common::wait_until(Duration::from_secs(10), || {
        if let Ok(Some(s)) = p.0.try_wait() {
            panic!("switchboard serve exited at start: {s}");
        }
        TcpStream::connect(addr).is_ok()
    });
    assert!(up, "switchboard serve did not listen on {addr} within 10 s");
    p
}

fn dev_login(port: u16, user: &str) -> Client {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Client::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let token = JwtHs256::new(DEV_JWT_SECRET).mint(user, common::unix_now() + 600);
    c.login(user, &token).expect("login with the development secret");
    c
}

/// The bug of issue 11: `serve 2>&1 | tee log`, then tee exits. Every log
/// write fails with EPIPE from then on; the server must still drain on
/// SIGTERM and exit 0. Its workers log at debug (logins), the signal
/// thread logs the drain: none of them may die of it.
#[test]
fn a_server_whose_log_pipe_closed_drains_on_sigterm_and_exits() {
    let port = free_port();
    let (read, write) = pipe();
    let write2 = write.try_clone().unwrap();
    let mut server = serve(port, "debug", Stdio::from(write), Stdio::from(write2));
    drop(read); // tee exits
    let mut alice = dev_login(port, "alice");
    server.signal(libc::SIGTERM);
    assert_eq!(alice.recv_close_code().unwrap(), Some(1001), "the client gets the drain's CLOSE");
    drop(alice);
    let status = server.wait_for(Duration::from_secs(10)).expect("the server exits within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
}

/// A second signal ends the server at once, even while a client that never
/// closes keeps the drain waiting, and even with its stdout and stderr
/// closed before it starts (the banner and the start-up log fail too).
#[test]
fn a_second_signal_exits_at_once() {
    let port = free_port();
    let mut server = serve(port, "info", closed_pipe(), closed_pipe());
    let _stays = dev_login(port, "bob"); // never reads, never closes
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.wait_for(Duration::ZERO).is_none(), "the drain waits for the client");
    let t = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_for(Duration::from_secs(2)).expect("the second signal ends the server");
    assert!(t.elapsed() < Duration::from_secs(1), "at once: {:?}", t.elapsed());
    assert!(status.code().is_some(), "an exit, not a kill: {status}");
}
