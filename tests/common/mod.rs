//! Helpers shared by the integration tests: a server on 127.0.0.1:0 with
//! short timeouts, tokens, and logged-in clients.
#![allow(dead_code)]

pub mod api;
pub mod cluster;
pub mod interop;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use switchboard::client::{Client, LoginInfo};
use switchboard::config::Config;
use switchboard::proto::frame::Frame;
use switchboard::{ConnId, JwtHs256, Server};

pub const SECRET: &str = "integration-test-secret-0123456789";

/// A loopback port that is free now and that this test process has not
/// handed out before. Two tests starting `switchboard serve` at the same
/// moment, or one asking for two ports, must not get the same one: the
/// servers' SO_REUSEPORT listeners would share it, and a client of one
/// could land on the other (and be reset when that test ends).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// Two workers, short timeouts (50 ms ticks), generous heartbeats so tests
/// that do not look at them are not disturbed.
pub fn config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    // No WebSocket port unless a test asks for one (tests/websocket.rs).
    c.websocket.listen = String::new();
    c.server.workers = 2;
    c.server.pin_workers = false;
    c.server.max_connections = 4000;
    c.auth.jwt_secret = Some(SECRET.into());
    c.timeouts.tick_ms = 50;
    c.timeouts.login_timeout_ms = 2_000;
    c.timeouts.heartbeat_interval_ms = 60_000;
    c.timeouts.idle_timeout_ms = 120_000;
    c.timeouts.close_linger_ms = 500;
    // Each test server its own inbox store, in RAM: the default disk store
    // lives in one directory that two servers cannot share
    // (tests/reliable.rs and tests/reliable_crash.rs test it).
    c.store.kind = switchboard::config::StoreKind::Memory;
    c.server.poller = poller();
    // scripts/test.sh runs the protocol tests once more with the owner's
    // writes unbatched (one sendmsg each), the path of hosts that refuse
    // io_uring.
    match std::env::var("SWITCHBOARD_TEST_BATCH_SENDS").as_deref() {
        Ok("0") => c.server.batch_sends = false,
        Ok("1") | Err(_) => {}
        Ok(other) => panic!("SWITCHBOARD_TEST_BATCH_SENDS={other}: expected 0 or 1"),
    }
    c
}

/// The data path the tests run on: the server's default, or the mode named
/// by `SWITCHBOARD_TEST_POLLER` (`epoll` or `io_uring`): scripts/test.sh
/// runs the protocol tests once more in the mode that is not the default.
pub fn poller() -> switchboard::config::PollerKind {
    match std::env::var("SWITCHBOARD_TEST_POLLER").as_deref() {
        Ok("epoll") => switchboard::config::PollerKind::Epoll,
        Ok("io_uring") => switchboard::config::PollerKind::IoUring,
        Ok(other) => panic!("SWITCHBOARD_TEST_POLLER={other}: expected epoll or io_uring"),
        Err(_) => Config::default().server.poller,
    }
}

/// A hung test must fail CI, not stall it until the job is killed: the
/// first server a test binary starts arms a watchdog that aborts the whole
/// binary after `SWITCHBOARD_TEST_DEADLINE_S` (default 600 s), far above
/// what any binary here needs. It kills the binary's child processes
/// first: servers, Redis, nginx and Chromium inherit its stderr, and
/// would hold CI's log open after it ended.
pub fn arm_watchdog() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let secs = std::env::var("SWITCHBOARD_TEST_DEADLINE_S").ok().and_then(|v| v.parse().ok()).unwrap_or(600u64);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            eprintln!("test binary still running after {secs} s: a test is hung; aborting");
            let children = kill_children();
            if children > 0 {
                eprintln!("killed {children} child process(es) of the test binary");
            }
            std::process::exit(101);
        });
    });
}

/// SIGKILLs every child process of this one (each thread's, from
/// `/proc/self/task/*/children`); returns how many.
fn kill_children() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    let mut killed = 0;
    for task in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(task.path().join("children")) else { continue };
        for pid in list.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
            // SAFETY: kill(2) with a pid this process spawned and a signal
            // number; it touches no memory of ours.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    killed
}

pub fn start(cfg: Config) -> Server {
    arm_watchdog();
    Server::builder().config(cfg).start().expect("server starts")
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub fn token(user: &str) -> String {
    JwtHs256::new(SECRET).mint(user, unix_now() + 3600)
}

pub fn connect(addr: SocketAddr) -> Client {
    let c = Client::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

pub fn login(addr: SocketAddr, user: &str) -> (Client, LoginInfo) {
    let mut c = connect(addr);
    let info = c.login(user, &token(user)).expect("login succeeds");
    (c, info)
}

pub fn worker_of(info: &LoginInfo) -> u8 {
    ConnId::from_u64(info.conn_id).worker().0
}

/// Logs `user` in until one connection lands on each worker in `workers`;
/// the others are closed.
pub fn login_on_workers(addr: SocketAddr, user: &str, workers: &[u8]) -> Vec<Client> {
    let mut found: Vec<Option<Client>> = workers.iter().map(|_| None).collect();
    for _ in 0..200 {
        let (c, info) = login(addr, user);
        let w = worker_of(&info);
        if let Some(i) = workers.iter().position(|&x| x == w) {
            if found[i].is_none() {
                found[i] = Some(c);
            }
        }
        if found.iter().all(|f| f.is_some()) {
            return found.into_iter().map(|c| c.unwrap()).collect();
        }
    }
    panic!("SO_REUSEPORT never placed a connection on each of workers {workers:?}");
}

/// The next PUSH (PINGs answered on the way): (msg_id, from, payload).
pub fn expect_push(c: &mut Client) -> (u64, String, Vec<u8>) {
    let f = c.recv_skipping_pings().expect("a frame arrives");
    match f.frame() {
        Frame::Push { msg_id, from, payload } => (msg_id, from.to_string(), payload.to_vec()),
        other => panic!("expected PUSH, got {other:?}"),
    }
}

/// Whether something listens on `addr`: a connection to it succeeds and is
/// not to itself (connecting to a loopback port nobody listens on succeeds
/// when the kernel happens to pick that same port as the source, TCP's
/// simultaneous open; polling a port until "something answers" then
/// returns before the server is up).
pub fn listening(addr: SocketAddr) -> bool {
    match std::net::TcpStream::connect(addr) {
        Ok(s) => s.local_addr().ok() != s.peer_addr().ok(),
        Err(_) => false,
    }
}

/// Whether process `pid` listens on `addr`'s port with a socket of its
/// own: what a test that started a server on a port from [`free_port`]
/// waits for. A connect that succeeds proves less: until the server binds
/// the port, any bind(0) (another test thread's `free_port`) can be given
/// it, and its listener takes the connections and resets them when it
/// closes (tests/cli.rs, `serve_waits_for_the_servers_own_listener_not_any_on_its_port`).
pub fn listens(pid: u32, addr: SocketAddr) -> bool {
    switchboard::portholder::listens(pid, addr.port())
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// One request to the admin API: (status, body).
#[allow(unused_imports)] // not every test binary talks to the admin API
pub use switchboard::client::admin_request as http;

/// A WebSocket connection (JSON messages) logged in by its upgrade
/// request's query string, past its 101 answer.
pub fn ws_login_query(addr: SocketAddr, user: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET /ws?user={user}&token={} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(user)
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            // A read with a timeout is never restarted after a signal
            // (signal(7)); seen once in a full run.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => assert_eq!(r.unwrap(), 1, "the server closed during the handshake"),
        }
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// The paging side of a device client (PROTOCOL.md 15.6–15.7): what the
/// last SYNC announced, and the FETCH of the next page once the device
/// holds the current one.
#[derive(Default)]
pub struct Pager {
    /// The highest head the server announced (SYNC) or showed (INBOX).
    pub head: Option<u64>,
    page_end: u64,
    /// A FETCH is out, its SYNC not yet in.
    fetching: bool,
    fetches: u32,
}

impl Pager {
    /// A SYNC arrived.
    pub fn sync(&mut self, head_seq: u64, page_end: u64) {
        self.head = Some(head_seq.max(self.head.unwrap_or(0)));
        self.page_end = page_end;
        self.fetching = false;
    }

    /// An INBOX with `seq` arrived: a seq above the head counts as the
    /// head, for a catch-up that must reach everything it saw (a live
    /// reader leaves this out and FETCHes only on a SYNC's word).
    pub fn inbox(&mut self, seq: u64) {
        self.head = self.head.map(|h| h.max(seq));
    }

    /// Whether the device, holding every seq up to `have`, has the page
    /// the last SYNC announced.
    pub fn page_done(&self, have: u64) -> bool {
        have >= self.page_end
    }

    /// FETCHes up to 1000 after `have` when the page is in and more are
    /// waiting (one FETCH out at a time).
    pub fn fetch_if_due(&mut self, rx: &mut Client, have: u64) -> Result<(), switchboard::client::ClientError> {
        if !self.fetching && self.page_done(have) && self.head.is_some_and(|h| self.page_end < h) {
            self.fetches += 1;
            rx.fetch(self.fetches, have, 1000)?;
            self.fetching = true;
        }
        Ok(())
    }
}

/// A device catching up on its inbox the way a client does: reads INBOX
/// frames (live or paged) into `by_seq`, ACKs every 32, at a page's end
/// and on a duplicate, and FETCHes the next page once one is in, until it
/// holds every seq up to the head the server announced (its SYNC).
/// Returns that head. `by_seq` may already hold what the device stored
/// before (it logged in with the last of those as `last_seq`).
pub fn catch_up(rx: &mut Client, by_seq: &mut std::collections::BTreeMap<u64, String>, limit: Duration) -> u64 {
    let mut have = 0u64;
    while by_seq.contains_key(&(have + 1)) {
        have += 1;
    }
    let mut pager = Pager::default();
    let mut acked_to = have;
    let deadline = Instant::now() + limit;
    while pager.head.is_none_or(|h| have < h) {
        assert!(Instant::now() < deadline, "catch-up stalled at {have} of {:?}", pager.head);
        let mut dup = false;
        match rx.recv_skipping_pings().expect("the device's connection stays up").frame() {
            Frame::Sync { head_seq, page_end, .. } => pager.sync(head_seq, page_end),
            Frame::Inbox { seq, payload, .. } => {
                dup = seq <= have;
                by_seq.entry(seq).or_insert_with(|| String::from_utf8(payload.to_vec()).unwrap());
                while by_seq.contains_key(&(have + 1)) {
                    have += 1;
                }
                pager.inbox(seq);
            }
            Frame::Push { .. } | Frame::RoomMsg { .. } => {}
            other => panic!("the device got {other:?}"),
        }
        if have >= acked_to + 32 || (have > acked_to && pager.page_done(have)) || dup {
            rx.ack(have).unwrap();
            acked_to = have;
        }
        pager.fetch_if_due(rx, have).unwrap();
    }
    pager.head.unwrap()
}

/// CPU time (clock ticks, 100 per CPU-second) of each of this process's
/// worker threads, by thread id: an idle server's workers burn next to
/// none. Compare two with [`worker_ticks_between`].
pub fn worker_ticks() -> std::collections::HashMap<u64, u64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("sb-worker")))
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse::<u64>().ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            Some((tid, f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?))
        })
        .collect()
}

/// [`worker_ticks`] of the worker threads not in `others`: with `others`
/// taken just before a server starts (`worker_ticks().into_keys()`), that
/// server's own (and those of any other test's server that started in the
/// same moment), not the busy workers of servers other tests run meanwhile.
pub fn worker_ticks_except(others: &std::collections::HashSet<u64>) -> std::collections::HashMap<u64, u64> {
    worker_ticks().into_iter().filter(|(tid, _)| !others.contains(tid)).collect()
}

/// Clock ticks the worker threads alive at both samples burnt between
/// them. Tests run in parallel in one process, so other tests' servers
/// start and stop meanwhile: a sum over all workers went down when one
/// of theirs exited (and the subtraction overflowed).
pub fn worker_ticks_between(
    before: &std::collections::HashMap<u64, u64>,
    after: &std::collections::HashMap<u64, u64>,
) -> u64 {
    after.iter().filter_map(|(tid, &t)| before.get(tid).map(|&b| t.saturating_sub(b))).sum()
}
