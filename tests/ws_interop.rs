//! Interoperability with WebSocket clients written elsewhere.
//!
//! - `python_websockets_client`: the Python `websockets` library (its
//!   `websockets.sync.client`) runs `tests/interop/ws_client.py` against an
//!   in-process server: login in the upgrade query and in a first message,
//!   a push from the handle, a send between users, a room with publishes
//!   from a client and from the handle, several heartbeat periods of silence
//!   survived on the library's automatic pong, and the binary subprotocol.
//! - `python_websockets_reliable_resume`: the same library as a device
//!   with reliable delivery (`tests/interop/ws_reliable.py`): stored
//!   messages live, a partial ACK, a dropped connection, messages stored
//!   from the handle while it is away, a login with `last_seq`, FETCH
//!   paging past the first page, and every message once, in order.
//! - `chromium_demo_page`: a headless Chromium opens the demo page (served
//!   in dev mode, on the development secret) in a 1280x900 window, logs in
//!   through the page's own token fetch as a device, shows messages stored
//!   from the handle live, and after a reload (during which more were stored,
//!   past the first page) the whole inbox once and in order (resumed with
//!   `last_seq`, the rest FETCHed), acknowledged; then a push from the handle, a
//!   send to a raw TCP client (echoed), room messages, a full log without a
//!   page scrollbar, a drain's 1001 after which it reconnects at the hinted
//!   time to a second server on the same port and rejoins its room, and a
//!   normal close shown as normal; `tests/interop/browser.py` drives it
//!   over the Chrome DevTools Protocol.
//!
//! The test and each script talk through the script's stdout, one
//! checkpoint per line (the scripts' docstrings list them); the test acts
//! on the server handle at a few of them and asserts on the rest. Where the
//! script cannot see that the test has acted (messages stored for a client
//! that is offline), the test answers with a line on the script's stdin
//! (`Script::tell`), which the script waits for with a deadline.
//!
//! Tools: `python3` with `websockets` (11 or later) and `/usr/bin/chromium`.
//! `scripts/test.sh` (the README's test command, which `.ci/run` calls)
//! installs them on a clean Debian machine. A missing tool fails the test
//! with a message naming it, except that `SWITCHBOARD_SKIP_BROWSER=1`
//! makes `chromium_demo_page` skip (with a notice on stderr), for machines
//! where a browser cannot run. Each script runs under a deadline and is
//! killed when its test ends, Chromium (its whole process group) too, and
//! Chromium's temporary profile directory and its singleton socket's
//! directory are removed on every path.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::interop::*;
use common::*;
use switchboard::config::DemoPage;
use switchboard::proto::frame::Frame;
use switchboard::Config;
use switchboard::JwtHs256;

/// The two tests run one at a time: each has a server in this process and
/// spawns children (python3, Chromium), which would inherit the other's
/// accepted sockets (not close-on-exec yet: tests/spawned_children.rs).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long Chromium may take to open its DevTools port.
const BROWSER_START: Duration = Duration::from_secs(20);
const CHROMIUM: &str = "/usr/bin/chromium";

#[test]
fn python_websockets_client() {
    let _one = one_at_a_time();
    require_python_websockets();
    let mut cfg = config();
    cfg.websocket.listen = "127.0.0.1:0".into();
    // Heartbeats several times a second, so the script's 2.5 s of silence
    // spans many PING/PONG rounds and would cross the idle timeout many
    // times over without the library's automatic pongs.
    cfg.timeouts.heartbeat_interval_ms = 300;
    cfg.timeouts.idle_timeout_ms = 1500;
    let server = start(cfg);
    let h = server.handle();
    let url = format!("ws://{}", server.ws_addr().expect("a WebSocket listener"));
    let mut args = vec![url];
    for user in ["alice", "bob", "carol"] {
        args.extend([user.to_string(), token(user)]);
    }
    args.push("2.5".into()); // seconds of silence
    let mut s = Script::spawn("ws_client.py", &args);

    let first = s.expect("LOGIN_OK query user=alice");
    assert!(first.ends_with("heartbeat_ms=300 idle_ms=1500"), "{first}");
    s.expect("LOGIN_OK message user=bob");
    s.expect("READY");
    let pushed = h.push_to_user("alice", "rust-push-1").unwrap();
    assert_eq!(pushed.connections, 1);
    s.expect("PUSH user=alice from='' payload=rust-push-1");
    s.expect("SEND alice->bob delivered=1 payload=hi from A");
    s.expect("JOINED");
    assert_eq!(h.room_size("lobby"), 2);
    h.publish_to_room("lobby", "rust-room-1").unwrap();
    s.expect("ROOM_MSG user=alice room=lobby payload=rust-room-1");
    s.expect("ROOM_MSG user=bob room=lobby payload=rust-room-1");
    s.expect("ALIVE after 2.5s idle");
    let st = h.stats();
    assert!(st.pings_sent >= 2, "the server should have pinged the silent clients: {st:?}");
    assert_eq!(st.idle_timeouts, 0, "{st:?}");
    s.expect("LOGIN_OK binary user=carol max_frame_bytes=65536");
    s.expect("BINARY alice<->carol ok");
    s.expect("DONE");
    s.finish();

    assert!(wait_until(Duration::from_secs(5), || h.connection_count() == 0), "{:?}", h.stats());
    let st = h.stats();
    assert_eq!((st.ws_upgrades, st.logins, st.protocol_errors), (3, 3, 0), "{st:?}");
    server.shutdown().unwrap();
}

/// Reliable delivery over WebSocket JSON, from a third-party client
/// (`tests/interop/ws_reliable.py`): a device stores ten live messages,
/// acknowledges six and drops its connection; thirty more are stored while
/// it is away; it logs in again with the highest seq it stored, pages
/// through the rest with FETCH and ends up with every message once, in
/// order, and live again.
#[test]
fn python_websockets_reliable_resume() {
    let _one = one_at_a_time();
    require_python_websockets();
    let mut cfg = config();
    cfg.websocket.listen = "127.0.0.1:0".into();
    // A short first page, so that the thirty stored while the device was
    // away take the FETCH path more than once (the script asks for 10 at a
    // time).
    cfg.delivery.first_page = 8;
    let server = start(cfg);
    let h = server.handle();
    let url = format!("ws://{}", server.ws_addr().expect("a WebSocket listener"));
    let (user, device) = ("dora", "py-laptop");
    let args = [url, user.into(), token(user), device.into(), "8".into()];
    let mut s = Script::spawn("ws_reliable.py", &args);
    let store = |range: std::ops::RangeInclusive<u32>, online: usize| {
        for i in range {
            let r = h.push_reliable(user, format!("r{i}"), 0).unwrap().wait().expect("stored");
            assert_eq!((r.seq, r.connections), (u64::from(i), online), "r{i}");
        }
    };
    let position = || {
        let st = h.inbox_state(user, Duration::from_secs(5)).expect("the inbox state");
        assert_eq!(st.devices.len(), 1, "{st:?}");
        assert_eq!(st.devices[0].device, device);
        st.devices[0].position
    };

    s.expect("LIVE");
    store(1..=10, 1);
    s.expect("OFFLINE stored=10 acked=6");
    assert!(wait_until(Duration::from_secs(5), || !h.is_online(user)), "the device's connection should be gone");
    assert_eq!(position(), 6, "the server keeps the acknowledged position");
    store(11..=40, 0);
    s.tell("PUSHED 40");
    s.expect("RESUMED position=10 head=40 page_end=18");
    let caught_up = s.expect("CAUGHT_UP have=40");
    // 11..18 came with the login, 19..40 in three FETCHes of 10, 10 and 2.
    assert_eq!(caught_up, "CAUGHT_UP have=40 pages=4 fetches=3 duplicates=0");
    assert!(wait_until(Duration::from_secs(5), || position() == 40), "the last page acknowledged");
    store(41..=41, 1);
    s.expect("LIVE_AGAIN r41");
    s.expect("DONE");
    s.finish();
    assert!(wait_until(Duration::from_secs(5), || position() == 41));
    let st = h.stats();
    assert_eq!((st.ws_upgrades, st.logins, st.protocol_errors), (2, 2, 0), "{st:?}");
    server.shutdown().unwrap();
}

// ---- Chromium ---------------------------------------------------------------

/// A headless Chromium in its own process group, with a fresh profile
/// directory; dropping it kills the group and removes the directory.
struct Chromium {
    child: Child,
    dir: PathBuf,
}

impl Chromium {
    /// Starts Chromium and returns it with its browser DevTools WebSocket URL.
    fn launch() -> (Chromium, String) {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("switchboard-chromium-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("chromium.log")).unwrap();
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-dev-shm-usage",
                "--no-proxy-server",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-breakpad",
                "--password-store=basic",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its singleton socket's directory goes under the temporary
            // directory, which it removes only on a clean exit: under ours,
            // so that Drop, which kills it, removes that too.
            .env("TMPDIR", &dir)
            // Its own process group, so Drop ends the renderers and helpers
            // too, not only the browser process.
            .process_group(0)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("cannot run {CHROMIUM}: {e}");
            }
        };
        let mut browser = Chromium { child, dir };
        let url = browser.devtools_url();
        (browser, url)
    }

    /// Reads `DevToolsActivePort` (port, then path) from the profile.
    fn devtools_url(&mut self) -> String {
        let file = self.dir.join("profile").join("DevToolsActivePort");
        let end = Instant::now() + BROWSER_START;
        while Instant::now() < end {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    if port.parse::<u16>().is_ok() && path.starts_with("/devtools/browser/") {
                        return format!("ws://127.0.0.1:{port}{path}");
                    }
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{CHROMIUM} exited ({st}) before opening its DevTools port:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{CHROMIUM} did not open its DevTools port within {BROWSER_START:?}:\n{}", self.log());
    }

    /// The end of Chromium's stderr, for failure reports.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: kill(2) with the (negated) process group id of the child
        // this guard started; it touches no memory.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
        // Helpers of the group may still be exiting and writing the profile.
        for _ in 0..50 {
            if std::fs::remove_dir_all(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// A test run leaves nothing of Chromium's behind: besides the profile,
/// Chromium keeps its singleton socket in a directory of its own under
/// the temporary directory, which it removes only on a clean exit, and
/// the guard kills it.
#[test]
fn chromium_leaves_no_temporary_directory() {
    let _one = one_at_a_time();
    if std::env::var("SWITCHBOARD_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("chromium_leaves_no_temporary_directory: skipped because SWITCHBOARD_SKIP_BROWSER=1");
        return;
    }
    assert!(Path::new(CHROMIUM).exists(), "this test needs {CHROMIUM}; SWITCHBOARD_SKIP_BROWSER=1 skips it");
    let (browser, _url) = Chromium::launch();
    let link = browser.dir.join("profile").join("SingletonSocket");
    let socket = std::fs::read_link(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display()));
    let socket_dir = socket.parent().expect("the socket is in a directory").to_path_buf();
    assert!(socket_dir.exists(), "{} exists while Chromium runs", socket_dir.display());
    let profile = browser.dir.clone();
    drop(browser);
    assert!(!profile.exists(), "{} left behind", profile.display());
    assert!(!socket_dir.exists(), "{} left behind", socket_dir.display());
}

/// Before a test that drives the demo page in Chromium: the browser
/// tests one at a time (held while the guard lives), and what they need;
/// `None` when `SWITCHBOARD_SKIP_BROWSER=1` skips them.
fn browser_test(name: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    let one = one_at_a_time();
    if std::env::var("SWITCHBOARD_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("{name}: skipped because SWITCHBOARD_SKIP_BROWSER=1");
        return None;
    }
    require_python_websockets();
    assert!(
        Path::new(CHROMIUM).exists(),
        "this test needs {CHROMIUM}: run scripts/test.sh as root (it installs it), or `apt-get install chromium`; \
         SWITCHBOARD_SKIP_BROWSER=1 skips it"
    );
    Some(one)
}

/// A server config with a WebSocket listener serving the demo page: on,
/// since the listener is on loopback, and with no secret configured the
/// server runs on the development one, so the page mints its own token.
fn demo_page_config() -> Config {
    let mut cfg = config();
    cfg.websocket.listen = "127.0.0.1:0".into();
    cfg.websocket.demo_page = DemoPage::Auto;
    cfg.auth.jwt_secret = None;
    cfg
}

#[test]
fn chromium_demo_page() {
    let Some(_one) = browser_test("chromium_demo_page") else { return };
    let mut cfg = demo_page_config();
    // Heartbeats several times a second: the page's socket stays up only
    // if Chromium answers the server's pings.
    cfg.timeouts.heartbeat_interval_ms = 300;
    cfg.timeouts.idle_timeout_ms = 1500;
    // The drain at the end: CLOSE 1001 with a hint below 300 ms.
    cfg.drain.window_ms = 1000;
    cfg.drain.reconnect_jitter_ms = 300;
    let (secret, dev) = cfg.jwt_secret();
    let second_cfg = cfg.clone();
    // With SWITCHBOARD_JWT_SECRET in the environment the token helper is
    // off (403) and the page needs a pasted token, as in production.
    let page_token = if dev { "-".to_string() } else { JwtHs256::new(secret.clone()).mint("alice", unix_now() + 600) };
    let server = start(cfg);
    let h = server.handle();
    let page = format!("http://{}/", server.ws_addr().expect("a WebSocket listener"));

    let (browser, devtools) = Chromium::launch();
    let args = [devtools, page, "alice".into(), page_token, "bob".into()];
    let mut s = Script::spawn("browser.py", &args);
    // Bob connects after Chromium and the script are started: children
    // inherit the server's accepted sockets (they are not close-on-exec,
    // see tests/spawned_children.rs), and a socket of his in their hands
    // would outlive his close on the server.
    let mut bob = connect(server.local_addr());
    bob.login("bob", &JwtHs256::new(secret).mint("bob", unix_now() + 600)).expect("bob logs in over raw TCP");
    // Bob answers the server's PINGs and forwards his PUSHes, until the
    // server closes his connection at shutdown.
    let (bob_tx, bob_rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(f) = bob.recv_skipping_pings() {
            if let Frame::Push { from, payload, .. } = f.frame() {
                let _ = bob_tx.send((from.to_string(), payload.to_vec()));
            }
        }
    });

    s.expect("LOGGED_IN alice");
    // Reliable delivery across a reload: five stored and shown live, then
    // twenty-five more (past the first page of 20) stored while no page is
    // connected; the reloaded page resumes after what it saved.
    let store = |range: std::ops::RangeInclusive<u64>, online: usize| {
        for i in range {
            let r = h.push_reliable("alice", format!("inbox-{i}"), 0).unwrap().wait().expect("stored");
            assert_eq!((r.seq, r.connections), (i, online), "inbox-{i}");
        }
    };
    s.expect("INBOX_READY");
    store(1..=5, 1);
    s.expect("INBOX_LIVE 5");
    s.expect("RELOADED");
    assert!(wait_until(Duration::from_secs(5), || !h.is_online("alice")), "the reload should close the page's socket");
    store(6..=30, 0);
    s.tell("PUSHED 30");
    s.expect("RESUMED 30 once in order");
    let position = || {
        let st = h.inbox_state("alice", Duration::from_secs(5)).expect("the inbox state");
        assert_eq!(st.devices.len(), 1, "one device across the reload: {st:?}");
        st.devices[0].position
    };
    assert!(wait_until(Duration::from_secs(5), || position() == 30), "the page acknowledges what it stored");
    s.expect("READY");
    assert_eq!(h.push_to_user("alice", "rust-push-browser").unwrap().connections, 1);
    s.expect("PUSH_SEEN rust-push-browser");
    s.expect("SENT hello bob from the browser");
    let (from, payload) = bob_rx.recv_timeout(Duration::from_secs(10)).expect("bob gets the page's send");
    assert_eq!((from.as_str(), payload.as_slice()), ("alice", &b"hello bob from the browser"[..]));
    s.expect("JOINED");
    assert_eq!(h.room_size("lobby"), 1);
    h.publish_to_room("lobby", "rust-room-browser").unwrap();
    s.expect("ROOM_SEEN");
    s.expect("ALIVE after 2.0s idle");
    let st = h.stats();
    assert!(st.pings_sent >= 2, "the server should have pinged the silent page: {st:?}");
    assert_eq!(st.idle_timeouts, 0, "{st:?}");
    s.expect("FILL");
    for i in 0..100 {
        assert_eq!(h.push_to_user("alice", format!("fill-{i}")).unwrap().connections, 1);
    }
    s.expect("NO_PAGE_SCROLL");

    // A restart: a second server on the same WebSocket port, then the first
    // drains. The page must come back after the hint, to the second one,
    // and rejoin its room.
    s.expect("DRAIN_ME");
    let mut second_cfg = second_cfg;
    second_cfg.websocket.listen = server.ws_addr().unwrap().to_string();
    second_cfg.server.share_listen_port = true;
    let second = start(second_cfg);
    let h2 = second.handle();
    h.drain();
    s.expect("RECONNECTED");
    assert!(wait_until(Duration::from_secs(5), || h2.is_online("alice") && h2.room_size("lobby") == 1));
    h2.publish_to_room("lobby", "after-reconnect").unwrap();
    s.expect("ROOM_AFTER after-reconnect");
    s.expect("REFUSED_SENDS");
    // The message the page typed while its path was cut: stored once in
    // bob's inbox on the second server, though the page sent it twice.
    s.expect("RESENT typed while cut off");
    let bob_inbox = h2.inbox_state("bob", Duration::from_secs(5)).expect("bob's inbox");
    assert_eq!(bob_inbox.head_seq, 1, "stored once: {bob_inbox:?}");
    s.expect("REFUSED_ONCE");
    s.expect("DONE");
    s.finish();
    drop(browser);

    let st = h.stats();
    server.join().expect("the first server drained");
    assert!(st.http_requests >= if dev { 2 } else { 1 }, "the page and its token: {st:?}");
    assert_eq!(
        (st.ws_upgrades, st.protocol_errors, st.idle_timeouts),
        (2, 0, 0),
        "before and after the reload: {st:?}"
    );
    assert!(wait_until(Duration::from_secs(5), || !h2.is_online("alice")), "alice should be gone after Disconnect");
    let st = h2.stats();
    // The reconnect after the drain, the one after the cut path, and the
    // refused login (once).
    assert_eq!((st.ws_upgrades, st.logins, st.login_failures, st.protocol_errors), (3, 2, 1, 0), "{st:?}");
    second.shutdown().unwrap();
}

/// The demo page catching up on a server whose send budget is smaller
/// than its catch-up: each FETCH spends one message of the budget
/// (PROTOCOL.md 15.7), so some get ERROR 118, and the page sends each
/// again after the wait the error names instead of stopping there; it
/// ends with every message once, in order, and acknowledged.
#[test]
fn chromium_demo_page_catches_up_past_the_send_budget() {
    let Some(_one) = browser_test("chromium_demo_page_catches_up_past_the_send_budget") else { return };
    let mut cfg = demo_page_config();
    // One message a page: seven FETCHes after the first page, against a
    // burst of two and two a second.
    cfg.delivery.first_page = 1;
    cfg.delivery.max_fetch = 1;
    cfg.limits.send_rate = 2;
    cfg.limits.send_burst = 2;
    let (secret, dev) = cfg.jwt_secret();
    let page_token = if dev { "-".to_string() } else { JwtHs256::new(secret).mint("alice", unix_now() + 600) };
    let server = start(cfg);
    let h = server.handle();
    // Stored by the application, which no send budget holds.
    for i in 1..=8u64 {
        let r = h.push_reliable("alice", format!("inbox-{i}"), 0).unwrap().wait().expect("stored");
        assert_eq!(r.seq, i);
    }
    let page = format!("http://{}/", server.ws_addr().expect("a WebSocket listener"));
    let (browser, devtools) = Chromium::launch();
    let mut s = Script::spawn("browser.py", &[devtools, page, "alice".into(), page_token, "catch-up:8".into()]);
    s.expect("LOGGED_IN alice");
    s.expect("CAUGHT_UP 8");
    // While the page is still open: its ACK of the last page is batched.
    let position = || {
        let st = h.inbox_state("alice", Duration::from_secs(5)).expect("the inbox state");
        st.devices.first().map_or(0, |d| d.position)
    };
    assert!(wait_until(Duration::from_secs(5), || position() == 8), "the page acknowledges what it stored");
    s.finish();
    drop(browser);
    assert!(h.stats().rate_limited > 0, "some FETCHes were over the budget");
    server.shutdown().unwrap();
}
