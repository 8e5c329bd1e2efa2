//! An application that embeds the server and spawns a child process (a
//! helper, a shell command) while clients are connected. The child inherits
//! the server's accepted sockets: they are not close-on-exec (monoio
//! 0.2.4's io_uring accept passes no SOCK_CLOEXEC). When the server then
//! closes such a connection, the socket stays open in the child, the epoll
//! poller's `forget` does nothing (it counts on close(2) to drop the
//! registration, which it does not while another process holds the
//! socket), and the I/O loop gets the same level-triggered event for the
//! released slot on every turn; it ignores it and, since it yields only on a
//! full batch, spins at 100% CPU and never runs the worker's mailbox, timers
//! or drain again. Found by tests/ws_interop.rs's Chromium test (Chromium
//! was spawned while a raw client was connected; that client's close made
//! the page's worker stall and its drain never finish).
//!
//! Fixed in three places, any of which breaks the chain: accepted sockets
//! are close-on-exec (`Worker::on_accept`), the epoll poller deletes a
//! closing connection's registration (`Poller::forget`), and the I/O loop
//! yields every turn. Before, this test failed every time: the worker
//! burned ~1 s of CPU per second and alice got nothing.
//!
//! Also here, the other side of spawned children: those of a test binary
//! that hangs, which the tests' watchdog kills before it ends the binary.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use switchboard::client::ClientError;
use switchboard::proto::frame::Frame;

/// A child process killed when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_child_process_does_not_stall_the_worker_of_a_connection_it_inherited() {
    let mut cfg = config();
    // Heartbeats several times a second, as in the Chromium test.
    cfg.timeouts.heartbeat_interval_ms = 300;
    cfg.timeouts.idle_timeout_ms = 1500;
    let server = start(cfg);
    let h = server.handle();
    let addr = server.local_addr();
    let bob = login_on_workers(addr, "bob", &[0]).pop().unwrap();
    let mut alice = login_on_workers(addr, "alice", &[0]).pop().unwrap();
    alice.subscribe(1, "lobby").unwrap();
    // Both answer pings; alice hands over her room messages, bob his end.
    let (alice_tx, alice_rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(f) = alice.recv_skipping_pings() {
            if let Frame::RoomMsg { payload, .. } = f.frame() {
                let _ = alice_tx.send(payload.to_vec());
            }
        }
    });
    let (bob_tx, bob_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bob = bob;
        let mut code = None;
        let end = loop {
            match bob.recv_skipping_pings() {
                Ok(f) => {
                    if let Frame::Close { code: c, .. } = f.frame() {
                        code = Some(c);
                    }
                }
                Err(ClientError::Closed) => break Ok(code),
                Err(e) => break Err(e.to_string()),
            }
        };
        let _ = bob_tx.send(end);
    });
    // The application runs a command while bob is connected; it outlives
    // bob's connection.
    let _child = Spawned(Command::new("sleep").arg("30").stdin(Stdio::null()).stdout(Stdio::null()).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    h.kick_user("bob").unwrap();
    let end = bob_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| Err("no end".into()));
    assert_eq!(end, Ok(Some(4003)), "bob gets CLOSE 4003, then EOF");

    let before = worker_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = worker_ticks_between(&before, &worker_ticks());
    h.publish_to_room("lobby", "still served").unwrap();
    let got = alice_rx.recv_timeout(Duration::from_secs(3));
    assert!(ticks < 20, "the idle workers burnt {ticks} clock ticks in one second");
    assert_eq!(got.as_deref(), Ok(&b"still served"[..]), "the worker no longer serves alice");
}

/// The test watchdog (`common::arm_watchdog`) ends a hung test binary. The
/// servers, Redis nodes, nginx and Chromium its tests spawn inherit its
/// stderr; left running, they held CI's log pipe open after the binary
/// ended, so that the job waited for its time limit instead of failing
/// with the log. The watchdog kills them first: the binary's stderr ends
/// when it does.
#[test]
fn the_watchdog_ends_a_hung_binary_and_the_children_that_hold_its_stderr() {
    let started = std::time::Instant::now();
    let mut run = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "hung_with_a_child", "--nocapture", "--test-threads", "1"])
        .env("SWITCHBOARD_TEST_DEADLINE_S", "1")
        .env("SWITCHBOARD_HANG_ON_PURPOSE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = run.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        let _ = tx.send(text);
    });
    let text = rx.recv_timeout(Duration::from_secs(20));
    let status = loop {
        match run.try_wait().unwrap() {
            Some(s) => break Some(s),
            None if started.elapsed() > Duration::from_secs(20) => break None,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if status.is_none() {
        let _ = run.kill();
        let _ = run.wait();
    }
    assert_eq!(status.and_then(|s| s.code()), Some(101), "the watchdog ends the binary with 101");
    let text = text.expect("the binary's stderr ends within 20 s: a child it spawned still holds it");
    assert!(text.contains("a test is hung; aborting"), "{text}");
}

/// Run only by the test above (it sets `SWITCHBOARD_HANG_ON_PURPOSE`):
/// spawns a child that inherits stderr, then hangs past the watchdog.
#[test]
#[ignore = "a hung test on purpose, for the watchdog test above"]
fn hung_with_a_child() {
    if std::env::var_os("SWITCHBOARD_HANG_ON_PURPOSE").is_none() {
        return;
    }
    arm_watchdog();
    let _child = Spawned(Command::new("sleep").arg("60").stdin(Stdio::null()).stdout(Stdio::null()).spawn().unwrap());
    std::thread::sleep(Duration::from_secs(60));
}
