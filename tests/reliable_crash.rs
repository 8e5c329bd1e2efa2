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
    serve_with(port, admin, dir, &format!("[store]\nmax_messages_per_inbox = {inbox_limit}\nshards = {shards}\n"))
}

/// [`serve`] with this config file.
fn serve_with(port: u16, admin: u16, dir: &std::path::Path, config: &str) -> Proc {
    common::arm_watchdog();
    std::fs::write(dir.join("switchboard.toml"), config).unwrap();
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

/// An empty directory of this test process for the test `name`.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sb-crash-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// SIGKILLs the server on `port` and waits until its port is closed.
fn kill(mut server: Proc, port: u16) {
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    // The dead process's listeners outlive it briefly: its io_uring is
    // torn down after the exit, in the kernel's own time, and until then
    // they accept (and then reset) connections. Wait until they are gone.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || !common::listening(addr)), "the killed server's port");
}

/// SIGTERM: the server drains and exits; waits for that (at most 30 s)
/// and until its port is closed.
fn terminate(mut server: Proc, port: u16) {
    // SAFETY: kill(2) on a child of this process that has not been waited for.
    assert_eq!(unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the server did not exit within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(server, port);
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
    let dir = fresh_dir(&kill_after_answers.to_string());
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
    kill(server, port);
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
    let dir = fresh_dir("damaged");
    let (port, admin) = (common::free_port(), common::free_port());
    let server = serve(port, admin, &dir, 100_000, 1);
    // Stored and acknowledged; nobody reads them, so they stay in the hot log.
    let mut tx = client(port, "tx", None);
    for req in 1..=300u32 {
        tx.send(req, "rx", format!("s{req}").as_bytes()).unwrap();
        match tx.recv_skipping_pings().unwrap().frame() {
            Frame::SendAck { req_id, .. } => assert_eq!(req_id, req),
            other => panic!("expected SEND_ACK {req}, got {other:?}"),
        }
    }
    kill(server, port);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

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

/// The crash loop's choices, repeatable from a seed.
struct Rng(proptest::test_runner::TestRng);

impl Rng {
    fn new(seed: u64) -> Rng {
        let seed = seed.to_le_bytes().repeat(4);
        Rng(proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &seed))
    }

    fn next(&mut self) -> u64 {
        proptest::prelude::Rng::next_u64(&mut self.0)
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    /// True once in `n` times, about.
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
}

/// What the crash loop's clients share with its main thread.
#[derive(Default)]
struct Loop {
    /// No new messages: the senders finish what they have out.
    stop_sending: AtomicBool,
    /// The devices stop dropping their connections.
    calm: AtomicBool,
    /// Per receiver: how many messages were sent to it in all, once every
    /// sender is done (0 until then).
    expected: Mutex<BTreeMap<String, u64>>,
}

const LOOP_RECEIVERS: [&str; 3] = ["r0", "r1", "r2"];
const LOOP_DEVICES: [&str; 2] = ["phone", "laptop"];

/// The server killed with SIGKILL again and again (`SWITCHBOARD_CRASH_ROUNDS`
/// times, 3 by default; `scripts/deep-check.sh` runs many more) while two
/// users SEND with client ids and the application pushes with client ids
/// (and now and then at most once) to three users with two devices each
/// that read, ACK at random intervals, drop their connections now and
/// then and log in again with the last seq they hold. Senders retry
/// whatever was not answered, with the same client id, after each
/// restart, until everything is answered. At the end every device holds
/// every message sent to its user exactly once: seqs dense from 1, no seq
/// ever seen with two payloads, no seq skipped on a connection, each
/// sender's messages in the order sent, and the seq each sender was
/// answered with is the one delivered; and the store's count of the
/// messages it keeps comes down to 0 once the retention passes have
/// dropped what every device acknowledged. Here the store is the disk
/// store: one or two shards (by the seed), `fsync` or `os` at each start,
/// a short retention interval; about one round in four drains the server
/// (SIGTERM) instead of killing it. Both loops have a small window and
/// first page (retransmits and FETCHes on every round).
/// `SWITCHBOARD_CRASH_SEED` repeats a run's choices (printed at its
/// start); the kill times are the host's. Checked able to fail: with the
/// disk store's recovery made to skip one logged message in 50, 5 rounds
/// failed.
#[test]
fn a_server_killed_again_and_again_under_load_loses_repeats_and_reorders_nothing() {
    let dir = fresh_dir("loop");
    let (port, admin) = (common::free_port(), common::free_port());
    let seed = loop_seed();
    let shards = 1 + (seed >> 8) % 2;
    let config = |durability: &str| {
        format!(
            "[store]\nshards = {shards}\ndurability = {durability:?}\nretention_interval_ms = 200\n\
             [auth]\njwt_secret = {:?}\n[drain]\nwindow_ms = 200\n{LOOP_CONFIG}",
            common::SECRET
        )
    };
    let mut server = Some(serve_with(port, admin, &dir, &config("fsync")));
    crash_loop(&format!("disk store, {shards} shard(s)"), seed, &[(port, admin)], |rng| {
        let running = server.take().expect("running");
        if rng.one_in(4) {
            // A drain (SIGTERM) now and then: positions and logs written
            // on the way out, and clients closed with 1001.
            terminate(running, port);
        } else {
            kill(running, port);
        }
        std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
        // Either durability: `os` leaves more to the kernel at each kill.
        let durability = if rng.one_in(2) { "fsync" } else { "os" };
        server = Some(serve_with(port, admin, &dir, &config(durability)));
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The crash loop with the Redis store on a real `redis-server`, or a
/// Redis Cluster of three (by the seed; never killed): two nodes of a
/// cluster, the clients on either, one of the nodes killed each round and
/// started again under its node id.
#[test]
fn nodes_on_the_redis_store_killed_again_and_again_lose_repeat_and_reorder_nothing() {
    use common::cluster::{Node, NodeOpts, Redis};
    use switchboard::redis_proc::{RedisCluster, RedisServer};
    let seed = loop_seed();
    // One Redis, or a Redis Cluster of three masters (the inboxes and
    // dedup keys spread over slots), by the seed.
    let (one, cluster) = if (seed >> 8).is_multiple_of(2) {
        (Some(RedisServer::start()), None)
    } else {
        (None, Some(RedisCluster::start(3)))
    };
    let (redis, what) = match (&one, &cluster) {
        (Some(one), _) => (Redis::One(one.url()), "Redis store (one Redis), two nodes"),
        (_, Some(cluster)) => (Redis::Cluster(cluster.urls()), "Redis store (Redis Cluster), two nodes"),
        _ => unreachable!("one or the other"),
    };
    let opts = NodeOpts {
        store: "redis",
        store_extra: "retention_interval_ms = 200",
        extra: LOOP_CONFIG.into(),
        ..NodeOpts::default()
    };
    let mut nodes = [Node::start("a", &redis, &opts), Node::start("b", &redis, &opts)];
    let endpoints: Vec<(u16, u16)> = nodes.iter().map(|n| (n.addr.port(), n.admin.port())).collect();
    crash_loop(what, seed, &endpoints, |rng| {
        let node = &mut nodes[rng.range(0, 2) as usize];
        node.kill();
        std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
        node.restart(&redis);
    });
}

/// The crash loops' settings besides the store: a small window and first
/// page (retransmits and FETCHes on every round), and the tick that ACK
/// timeouts that short need.
const LOOP_CONFIG: &str = "[delivery]\nwindow = 16\nfirst_page = 8\nack_timeout_ms = 400\nmax_fetch = 50\n\
                           [timeouts]\ntick_ms = 100\n";

/// `SWITCHBOARD_CRASH_SEED`, or one from the clock: a crash loop's choices.
fn loop_seed() -> u64 {
    std::env::var("SWITCHBOARD_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    })
}

/// The crash loop on the servers at `endpoints` (TCP, admin port):
/// `crash` kills one of them and starts it again, each round.
fn crash_loop(store: &str, seed: u64, endpoints: &[(u16, u16)], mut crash: impl FnMut(&mut Rng)) {
    let rounds: u32 = std::env::var("SWITCHBOARD_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    eprintln!("crash loop, {store}: {rounds} rounds, SWITCHBOARD_CRASH_SEED={seed}");
    let ports: Arc<[u16]> = endpoints.iter().map(|e| e.0).collect();
    let admins: Arc<[u16]> = endpoints.iter().map(|e| e.1).collect();
    let shared = Arc::new(Loop::default());
    let mut rng = Rng::new(seed);

    let devices: Vec<_> = LOOP_RECEIVERS
        .iter()
        .flat_map(|u| LOOP_DEVICES.iter().map(move |d| (*u, *d)))
        .map(|(user, device)| {
            let (shared, seed) = (shared.clone(), rng.next());
            let ports = ports.clone();
            std::thread::spawn(move || loop_device(&ports, user, device, &shared, Rng::new(seed)))
        })
        .collect();
    let senders: Vec<_> = ["s0", "s1"]
        .into_iter()
        .map(|user| {
            let (shared, seed) = (shared.clone(), rng.next());
            let ports = ports.clone();
            std::thread::spawn(move || loop_sender(&ports, user, &shared, Rng::new(seed)))
        })
        .collect();
    let app = {
        let (shared, seed) = (shared.clone(), rng.next());
        std::thread::spawn(move || loop_application(&admins, &shared, Rng::new(seed)))
    };

    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.range(200, 2500)));
        crash(&mut rng);
    }
    std::thread::sleep(Duration::from_millis(500));
    shared.stop_sending.store(true, Ordering::Relaxed);
    shared.calm.store(true, Ordering::Relaxed);
    // Every message each sender made, by receiver: (payload, answered seq).
    let mut sent: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for t in senders.into_iter().chain([app]) {
        for (to, payload, seq) in t.join().unwrap_or_else(|_| panic!("a sender failed (above)")) {
            sent.entry(to).or_default().push((payload, seq));
        }
    }
    *shared.expected.lock().unwrap() =
        LOOP_RECEIVERS.iter().map(|u| (u.to_string(), sent.get(*u).map_or(0, |v| v.len() as u64))).collect();
    let held: Vec<(&str, BTreeMap<u64, String>)> = devices
        .into_iter()
        .zip(LOOP_RECEIVERS.iter().flat_map(|u| LOOP_DEVICES.map(|_| *u)))
        .map(|(t, u)| (u, t.join().unwrap_or_else(|_| panic!("a device of {u} failed (above)"))))
        .collect();
    // Every device acknowledged everything: the retention passes drop it
    // all, so the inboxes' count of what they keep (rebuilt at each
    // recovery, kept since) comes down to 0.
    let admin: SocketAddr = format!("127.0.0.1:{}", endpoints[0].1).parse().unwrap();
    let mut pending = String::new();
    let drained = common::wait_until(Duration::from_secs(30), || {
        let (status, body) = admin_request(admin, "GET", "/api/v1/stats", b"", None).expect("the stats");
        assert_eq!(status, 200, "{body}");
        let at = body.find("\"pending_messages\":").expect("the store's pending messages") + 19;
        pending = body[at..].split([',', '}']).next().unwrap().trim().to_string();
        pending == "0"
    });
    assert!(drained, "the store still keeps {pending} messages that every device acknowledged");

    for user in LOOP_RECEIVERS {
        let to_user = sent.get(user).cloned().unwrap_or_default();
        let mut by_seq: BTreeMap<u64, &str> = BTreeMap::new();
        for (payload, seq) in &to_user {
            if let Some(other) = by_seq.insert(*seq, payload) {
                panic!("{user}: {payload} and {other} were both answered with seq {seq}");
            }
        }
        for (_, got) in held.iter().filter(|(u, _)| *u == user) {
            assert_eq!(got.len(), to_user.len(), "{user}: messages held against messages sent");
            for (seq, payload) in got {
                assert_eq!(by_seq.get(seq).copied(), Some(payload.as_str()), "{user}: seq {seq}");
            }
            // Each sender's messages in the order it made them.
            let mut last: BTreeMap<&str, u64> = BTreeMap::new();
            for payload in got.values() {
                let (from, n) = payload.split_once(':').unwrap();
                let n: u64 = n.parse().unwrap();
                let before = last.insert(from, n).unwrap_or(0);
                assert!(n > before, "{user}: {payload} after {from}:{before}");
            }
        }
    }
    let total: usize = sent.values().map(Vec::len).sum();
    eprintln!(
        "crash loop, {store}: {rounds} restarts, {total} messages, every one delivered once to each device, in order"
    );
}

/// One of these loopback ports at random.
fn any_of(ports: &[u16], rng: &mut Rng) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ports[rng.range(0, ports.len() as u64) as usize]))
}

/// Connects to one of `ports` at random and logs in, retrying while the
/// server is down.
fn loop_connect(ports: &[u16], rng: &mut Rng, user: &str, device: Option<(&str, u64)>) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "{user} could not log in for 60 s");
        let attempt = Client::connect_timeout(&any_of(ports, rng), Duration::from_secs(2))
            .map_err(Into::into)
            .and_then(|mut c| {
                let token = common::token(user);
                match device {
                    Some((d, last_seq)) => c.login_device(user, &token, d, last_seq)?,
                    None => c.login(user, &token)?,
                };
                Ok::<_, switchboard::client::ClientError>(c)
            });
        match attempt {
            Ok(c) => {
                c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                return c;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(30)),
        }
    }
}

/// A device of the crash loop: holds every seq up to `have`, and returns
/// them (seq → payload) once it holds all its user's messages.
fn loop_device(ports: &[u16], user: &str, device: &str, shared: &Loop, mut rng: Rng) -> BTreeMap<u64, String> {
    let mut got: BTreeMap<u64, String> = BTreeMap::new();
    let mut have = 0u64;
    let mut done_by: Option<Instant> = None;
    loop {
        let mut rx = loop_connect(ports, &mut rng, user, Some((device, have)));
        let mut pager = common::Pager::default();
        let mut acked_to = have;
        let mut ack_every = rng.range(1, 17);
        loop {
            let expected = shared.expected.lock().unwrap().get(user).copied().unwrap_or(0);
            if expected > 0 {
                if have >= expected {
                    if have > acked_to {
                        let _ = rx.ack(have);
                    }
                    return got;
                }
                let by = *done_by.get_or_insert_with(|| Instant::now() + Duration::from_secs(60));
                assert!(Instant::now() < by, "{user}/{device}: stalled at {have} of {expected}");
            }
            let mut idle = false;
            match rx.recv_skipping_pings() {
                Ok(f) => match f.frame() {
                    Frame::Sync { head_seq, page_end, .. } => pager.sync(head_seq, page_end),
                    Frame::Inbox { seq, payload, .. } => {
                        let payload = String::from_utf8(payload.to_vec()).unwrap();
                        if seq <= have {
                            assert_eq!(got[&seq], payload, "{user}/{device}: seq {seq} again with another payload");
                        } else {
                            assert_eq!(seq, have + 1, "{user}/{device}: seq {seq} after {have} on one connection");
                            got.insert(seq, payload);
                            have = seq;
                        }
                    }
                    Frame::Push { payload, .. } => assert_eq!(payload, b"live only", "{user}/{device}: a PUSH"),
                    // A drain's CLOSE 1001: log in again.
                    Frame::Close { .. } => break,
                    other => panic!("{user}/{device} got {other:?}"),
                },
                Err(e) if e.is_timeout() => idle = true,
                Err(_) => break,
            }
            // ACKs at random intervals, and whenever the line is quiet
            // or a page is in (as a client would before its FETCH).
            if have > acked_to && (have - acked_to >= ack_every || idle || pager.page_done(have)) {
                if rx.ack(have).is_err() {
                    break;
                }
                acked_to = have;
                ack_every = rng.range(1, 17);
            }
            if pager.fetch_if_due(&mut rx, have).is_err() {
                break;
            }
            if !shared.calm.load(Ordering::Relaxed) && rng.one_in(3000) {
                std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
                break;
            }
        }
    }
}

/// A sender of the crash loop: SEND_EX with client ids 1, 2, ... to the
/// receivers at random, at most 16 unanswered, each sent again with its
/// id over every new connection until answered. Returns (to, payload,
/// seq answered) of every message it made.
fn loop_sender(ports: &[u16], user: &str, shared: &Loop, mut rng: Rng) -> Vec<(String, String, u64)> {
    let mut made: Vec<(String, String, u64)> = Vec::new();
    // Unanswered, by client id: index into `made`.
    let mut out: BTreeMap<u64, usize> = BTreeMap::new();
    'connection: loop {
        let mut tx = loop_connect(ports, &mut rng, user, None);
        for (&id, &i) in &out {
            let (to, payload, _) = &made[i];
            if tx.send_ex(id as u32, 0, id, to, payload.as_bytes()).is_err() {
                continue 'connection;
            }
        }
        loop {
            while out.len() < 16 && !shared.stop_sending.load(Ordering::Relaxed) {
                let id = made.len() as u64 + 1;
                let to = LOOP_RECEIVERS[rng.range(0, 3) as usize].to_string();
                let payload = format!("{user}:{id}");
                let sent = tx.send_ex(id as u32, 0, id, &to, payload.as_bytes());
                out.insert(id, made.len());
                made.push((to, payload, 0));
                if sent.is_err() {
                    continue 'connection;
                }
                std::thread::sleep(Duration::from_micros(rng.range(0, 1500)));
            }
            if out.is_empty() {
                return made;
            }
            match tx.recv_skipping_pings() {
                Ok(f) => match f.frame() {
                    Frame::SendResult { req_id, outcome, seq, .. } => {
                        assert_ne!(
                            outcome,
                            switchboard::proto::frame::SendOutcome::Relayed,
                            "{user}: stored by default"
                        );
                        let i = out.remove(&u64::from(req_id)).expect("an answer to a SEND out");
                        made[i].2 = seq;
                    }
                    Frame::Close { .. } => continue 'connection,
                    other => panic!("{user} got {other:?}"),
                },
                Err(e) if e.is_timeout() => {}
                Err(_) => continue 'connection,
            }
        }
    }
}

/// The application of the crash loop: reliable pushes through the admin
/// API (of one of `admins` at random) with client ids, one at a time,
/// each retried until answered 200.
fn loop_application(admins: &[u16], shared: &Loop, mut rng: Rng) -> Vec<(String, String, u64)> {
    let mut made = Vec::new();
    while !shared.stop_sending.load(Ordering::Relaxed) {
        let id = made.len() as u64 + 1;
        let to = LOOP_RECEIVERS[rng.range(0, 3) as usize];
        let payload = format!("app:{id}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let seq = loop {
            assert!(Instant::now() < deadline, "push {id} not answered 200 for 60 s");
            let path = format!("/push?user={to}&client_id={id}");
            let admin = any_of(admins, &mut rng);
            match admin_request(admin, "POST", &path, payload.as_bytes(), None) {
                Ok((200, body)) => break seq_of(&body),
                _ => std::thread::sleep(Duration::from_millis(30)),
            }
        };
        made.push((to.to_string(), payload, seq));
        // Now and then an at-most-once push between them: a PUSH on the
        // devices' connections, beside their window, that nothing expects
        // after a crash.
        if rng.one_in(4) {
            let admin = any_of(admins, &mut rng);
            let path = format!("/push?user={to}&mode=at_most_once");
            let _ = admin_request(admin, "POST", &path, b"live only", None);
        }
        std::thread::sleep(Duration::from_micros(rng.range(0, 3000)));
    }
    made
}

/// The `"seq"` of an admin API push's answer.
fn seq_of(body: &str) -> u64 {
    let at = body.find("\"seq\":").unwrap_or_else(|| panic!("no seq in {body}")) + 6;
    body[at..].trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}
