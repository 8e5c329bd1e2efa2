//! The server killed with SIGKILL in the middle of a stream of reliable
//! SENDs and application pushes, then restarted on the same data
//! directory: every message that was acknowledged (SEND_ACK, or a 200 from
//! the admin API's reliable push) is delivered, exactly once after dedup by
//! seq, in each sender's order; nothing that was refused is. Runs the
//! `switchboard` binary, so that the kill is a real one.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard::client::{admin_request, Client};
use switchboard::config::DEV_JWT_SECRET;
use switchboard::proto::frame::Frame;
use switchboard::JwtHs256;

const SB: &str = env!("CARGO_BIN_EXE_switchboard");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `switchboard serve` on these ports, with the config and data under
/// `dir` (the config written by [`serve`]).
fn serve_command(port: u16, admin: u16, dir: &std::path::Path) -> Command {
    let mut c = Command::new(SB);
    c.args(["serve", "--workers", "2", "--ws-listen", "", "--log", "warn"])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--admin", &format!("127.0.0.1:{admin}")])
        .arg("--config")
        .arg(dir.join("switchboard.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

fn serve(port: u16, admin: u16, dir: &std::path::Path, inbox_limit: usize, shards: usize) -> Proc {
    common::arm_watchdog();
    let config = dir.join("switchboard.toml");
    std::fs::write(&config, format!("[store]\nmax_messages_per_inbox = {inbox_limit}\nshards = {shards}\n")).unwrap();
    let child = serve_command(port, admin, dir).spawn().expect("switchboard serve starts");
    let mut p = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up = common::wait_until(Duration::from_secs(10), || {
        if let Ok(Some(s)) = p.0.try_wait() {
            panic!("switchboard serve exited at start: {s}");
        }
        common::listens(p.0.id(), addr)
    });
    assert!(up, "serve did not listen on {addr}");
    p
}

fn client(port: u16, user: &str, device: Option<&str>) -> Client {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Client::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let token = JwtHs256::new(DEV_JWT_SECRET).mint(user, common::unix_now() + 600);
    match device {
        Some(d) => c.login_device(user, &token, d, 0).unwrap(),
        None => c.login(user, &token).unwrap(),
    };
    c
}

/// Killed while SENDs are in flight, far below the inbox limit. (The
/// application's pushes keep coming while the SENDs are answered, at a
/// rate of the machine's choosing, so the limit is set well above what
/// both senders can store before the kill, not just above the SENDs.)
///
/// With a store of two shards (docs/DEPLOY.md, "Shards"): the receiver's
/// inbox is in one of them, and each is recovered from its own journal
/// and hot log.
#[test]
fn a_server_killed_with_sigkill_mid_stream_delivers_every_acknowledged_message_after_restart() {
    killed_and_restarted(1000, 100_000, false, 2);
}

/// Killed once the inbox limit (1,500) has refused some SENDs: nothing
/// refused is delivered.
#[test]
fn a_server_killed_with_sigkill_after_refusals_delivers_none_of_them() {
    killed_and_restarted(2000, 1500, true, 1);
}

fn killed_and_restarted(kill_after_answers: usize, inbox_limit: usize, expect_refusals: bool, shards: usize) {
    let dir = std::env::temp_dir().join(format!("sb-crash-{}-{kill_after_answers}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port, admin) = (common::free_port(), common::free_port());
    let server = serve(port, admin, &dir, inbox_limit, shards);

    // The receiver logs in with a device id and then does not read.
    let rx = client(port, "rx", Some("phone"));

    // Sender 1: 3,000 SENDs, pipelined; answers read on another thread.
    let mut tx = client(port, "tx", None);
    let mut tx_reader = tx.try_clone_for_reading().unwrap();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let refused = Arc::new(Mutex::new(HashSet::new()));
    let answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let (acked, refused, answers) = (acked.clone(), refused.clone(), answers.clone());
        std::thread::spawn(move || {
            while let Ok(f) = tx_reader.recv_skipping_pings() {
                match f.frame() {
                    Frame::SendAck { req_id, .. } => acked.lock().unwrap().insert(req_id),
                    Frame::Error { req_id, code, .. } => {
                        assert_eq!(code, switchboard::ErrorCode::InboxFull as u16, "refused only by the limit");
                        refused.lock().unwrap().insert(req_id)
                    }
                    other => panic!("sender got {other:?}"),
                };
                answers.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Sender 2: the application, through the admin API, one at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let pushed = Arc::new(Mutex::new(Vec::new()));
    let app = {
        let (stop, pushed) = (stop.clone(), pushed.clone());
        let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("a{i}");
                if let Ok((200, _)) = admin_request(admin, "POST", "/push?user=rx", body.as_bytes(), None) {
                    pushed.lock().unwrap().push(i);
                }
                i += 1;
            }
        })
    };
    // The application's pushes are under way before the SENDs start.
    let end = Instant::now() + Duration::from_secs(30);
    while pushed.lock().unwrap().len() < 50 {
        assert!(Instant::now() < end, "the admin API stored too few pushes");
        std::thread::sleep(Duration::from_millis(2));
    }
    let writer = std::thread::spawn(move || {
        for req in 1..=3000u32 {
            if tx.send(req, "rx", format!("s{req}").as_bytes()).is_err() {
                break;
            }
        }
        tx
    });
    while answers.load(Ordering::Relaxed) < kill_after_answers {
        assert!(Instant::now() < end, "the server answered too few SENDs");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut server = server;
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    // The dead process's listeners outlive it briefly: its io_uring is
    // torn down after the exit, in the kernel's own time, and until then
    // they accept (and then reset) connections. Wait until they are gone.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || !common::listening(addr)), "the killed server's port");
    stop.store(true, Ordering::Relaxed);
    app.join().unwrap();
    let _tx = writer.join().unwrap();
    reader.join().unwrap();
    drop(rx);
    let acked = acked.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    let pushed = pushed.lock().unwrap().clone();
    assert!(acked.len() >= 500, "only {} SENDs were acknowledged before the kill", acked.len());
    assert_eq!(!refused.is_empty(), expect_refusals, "refusals before the kill: {}", refused.len());

    // Restart on the same directory; the device catches up.
    let _server = serve(port, admin, &dir, inbox_limit, shards);
    let mut rx = client(port, "rx", Some("phone"));
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut by_seq: BTreeMap<u64, String> = BTreeMap::new();
    let head = common::catch_up(&mut rx, &mut by_seq, Duration::from_secs(60));
    assert_eq!(by_seq.len() as u64, head, "seqs 1..={head}, dense");
    let mut seen = HashSet::new();
    let (mut last_s, mut last_a) = (0u32, None::<u32>);
    for p in by_seq.values() {
        assert!(seen.insert(p.clone()), "{p} delivered under two seqs");
        if let Some(n) = p.strip_prefix('s') {
            let n: u32 = n.parse().unwrap();
            assert!(n > last_s, "SENDs out of order: s{n} after s{last_s}");
            assert!(!refused.contains(&n), "s{n} was refused but delivered");
            last_s = n;
        } else {
            let n: u32 = p[1..].parse().unwrap();
            assert!(last_a.is_none_or(|l| n > l), "pushes out of order");
            last_a = Some(n);
        }
    }
    for r in &acked {
        assert!(seen.contains(&format!("s{r}")), "s{r} was acknowledged but not delivered");
    }
    for i in &pushed {
        assert!(seen.contains(&format!("a{i}")), "a{i} was acknowledged by the admin API but not delivered");
    }
    eprintln!(
        "killed after {} SEND_ACKs, {} refusals, {} admin pushes; {} messages delivered after the restart",
        acked.len(),
        refused.len(),
        pushed.len(),
        head
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record damaged in the middle of a hot log file (a flipped byte: a
/// failing disk, or a tool writing into the store directory) ended the
/// file there at the next start: every acknowledged message after it was
/// dropped, with one WARN about "a write the process did not finish", the
/// inbox head went back, and its seqs were given out again to new
/// messages (an outside review: 200 of 300 acknowledged messages gone). A
/// crash cuts a record short only at the end of a file, never one that
/// whole records follow: the server now refuses to start, naming the file
/// and where it is damaged.
#[test]
fn a_hot_log_damaged_mid_file_is_refused_at_start_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("sb-crash-{}-damaged", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (port, admin) = (common::free_port(), common::free_port());
    let mut server = serve(port, admin, &dir, 100_000, 1);
    // Stored and acknowledged; nobody reads them, so they stay in the hot log.
    let mut tx = client(port, "tx", None);
    for req in 1..=300u32 {
        tx.send(req, "rx", format!("s{req}").as_bytes()).unwrap();
        match tx.recv_skipping_pings().unwrap().frame() {
            Frame::SendAck { req_id, .. } => assert_eq!(req_id, req),
            other => panic!("expected SEND_ACK {req}, got {other:?}"),
        }
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || !common::listening(addr)), "the killed server's port");

    // One byte flipped a third of the way into the largest hot log file.
    let hot = dir.join("data").join("hot");
    let file = std::fs::read_dir(&hot)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 300 * 40, "the 300 messages are in {}: {} bytes", file.display(), bytes.len());
    let at = bytes.len() / 3;
    bytes[at] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let mut child = serve_command(port, admin, &dir).stderr(Stdio::piped()).spawn().expect("switchboard serve starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline || common::listening(addr) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started on a hot log damaged at byte {at} of {}", file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name) && err.contains("damaged"), "the refusal names the file: {err}");
    // The way out it gives, accepting the loss: an empty file in its place.
    std::fs::write(&file, b"").unwrap();
    let server = serve(port, admin, &dir, 100_000, 1);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
