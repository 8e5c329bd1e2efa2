//! Deployment: `switchboard check` on this host, the graceful drain of the
//! real binary, and a zero-downtime restart on the same port.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchboard::client::{Client, ClientError};
use switchboard::proto::frame::Frame;

const SB: &str = env!("CARGO_BIN_EXE_switchboard");
/// Where the restart run inside the private network namespace writes its
/// summary (set only for that run of this test binary).
const RESTART_OUT_ENV: &str = "SWITCHBOARD_TEST_RESTART_OUT";

fn nofile_hard() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    r.rlim_max
}

fn check(connections: u64) -> (i32, String) {
    let out = Command::new(SB).args(["check", "--connections", &connections.to_string()]).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn row<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("no row {name} in:\n{out}"))
}

#[test]
fn check_reports_what_this_host_lacks_with_the_fix() {
    // A million connections: the file limit of a stock host cannot hold
    // them, and check says so with the exact fix.
    let (code, out) = check(1_000_000);
    // Besides the clients': the reserve, each worker's own and (the
    // default disk store) the store's files.
    let workers = std::thread::available_parallelism().unwrap().get();
    let besides = switchboard::limits::descriptors_besides_clients(&switchboard::Config::default(), workers);
    assert!(besides > 64 + 8 * workers as u64, "the store's files are counted");
    // And what the check's own process has open (stdin, stdout, stderr and
    // whatever it inherited), as `serve` counts at its start.
    let need = 1_000_000 + besides + 3;
    let nofile = row(&out, "RLIMIT_NOFILE");
    if nofile_hard() < need {
        assert!(nofile.starts_with("FAIL"), "{out}");
        let named: u64 = out
            .split("LimitNOFILE=")
            .nth(1)
            .map(|t| t.chars().take_while(char::is_ascii_digit).collect::<String>())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the fix names the value:\n{out}"));
        assert!((need..need + 64).contains(&named), "the fix names {named}, need {need}:\n{out}");
        assert_eq!(code, 1, "a failing item fails the command");
    } else {
        assert!(nofile.starts_with("PASS"), "{out}");
    }
    // Each kernel value reported is the live one.
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().to_string();
    assert!(row(&out, "net.core.somaxconn").contains(&somaxconn), "{out}");
    assert!(out.contains("memory for 1000000 idle connections"), "{out}");
    // With the defaults (disk store), the store's bounded buffers are
    // counted on a line of their own, and in the memory item's need.
    assert!(out.contains("whatever the connections: disk store write buffers and caches"), "{out}");
    assert!(row(&out, "memory for idle connections").contains("fixed by the config"), "{out}");
    // And the disk its limits let it fill, against the free space.
    let disk = row(&out, "disk for the message store");
    assert!(
        disk.contains("MiB free at") && disk.contains("(store.max_bytes 1024 MiB + store.max_journal_mib 128"),
        "{out}"
    );

    // A thousand connections fit this host: the file limit passes.
    let (_, out) = check(1_000);
    assert!(row(&out, "RLIMIT_NOFILE").starts_with("PASS"), "{out}");
    assert!(row(&out, "memory for idle connections").starts_with("PASS"), "{out}");
}

/// Starts the real binary (`switchboard serve`) on a free loopback port,
/// two workers, no WebSocket port, with `extra` appended to its config, and
/// waits until it accepts. Returns the process, its address and the
/// directory holding its config.
fn serve(name: &str, extra: &str) -> (std::process::Child, std::net::SocketAddr, std::path::PathBuf) {
    common::arm_watchdog();
    let port = common::free_port();
    let dir = std::env::temp_dir().join(format!("sb-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\n\n[websocket]\nlisten = \"\"\n\n[store]\npath = {:?}\n\n{extra}",
        dir.join("data")
    );
    std::fs::write(&cfg, text).unwrap();
    let server =
        Command::new(SB).args(["serve", "--log", "warn", "--config"]).arg(&cfg).stdout(Stdio::null()).spawn().unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || common::listens(server.id(), addr)));
    (server, addr, dir)
}

#[test]
fn sigterm_drains_two_thousand_clients_over_the_window_and_exits_zero() {
    let (mut server, addr, dir) =
        serve("drain", "[drain]\nwindow_ms = 3000\nreconnect_jitter_ms = 1000\n\n[timeouts]\nclose_linger_ms = 1000\n");
    let jwt = switchboard::JwtHs256::new(switchboard::config::DEV_JWT_SECRET);
    let mut clients: Vec<Client> = (0..2000)
        .map(|i| {
            let mut c = Client::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            let user = format!("d{i}");
            c.login(&user, &jwt.mint(&user, common::unix_now() + 600)).unwrap();
            c.stream().set_nonblocking(true).unwrap();
            c
        })
        .collect();

    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let mut arrived: Vec<Option<Duration>> = vec![None; clients.len()];
    while arrived.iter().any(|a| a.is_none()) && t0.elapsed() < Duration::from_secs(10) {
        for (i, c) in clients.iter_mut().enumerate() {
            if arrived[i].is_some() {
                continue;
            }
            match c.recv() {
                Ok(f) => match f.frame() {
                    Frame::Close { code, reason } => {
                        assert_eq!(code, 1001, "{reason}");
                        let hint: u64 = reason
                            .split("reconnect_ms=")
                            .nth(1)
                            .and_then(|v| v.parse().ok())
                            .unwrap_or_else(|| panic!("no reconnect hint in {reason:?}"));
                        assert!(hint < 1000, "hint within the jitter: {hint}");
                        arrived[i] = Some(t0.elapsed());
                    }
                    Frame::Ping { .. } => {}
                    other => panic!("unexpected {other:?}"),
                },
                Err(e) if e.is_timeout() => {}
                Err(ClientError::Closed) => panic!("client {i} closed without a CLOSE 1001"),
                Err(e) => panic!("client {i}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let times: Vec<Duration> = arrived.iter().map(|a| a.expect("every client got the close hint")).collect();
    let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    assert!(*last < Duration::from_millis(3000 + 1000), "all within the window: last at {last:?}");
    // 1,000 connections per worker: spread over at least a second (1,000
    // closes per second at most), not sent all at once.
    assert!(*last - *first >= Duration::from_millis(600), "spread: {first:?} .. {last:?}");
    drop(clients); // the clients close; the server sees its peers go
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "the server did not exit after draining");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A drain takes its window plus one close linger, as documented, even when
/// a client never closes its end: it used to wait the linger a second time,
/// then another half second.
#[test]
fn a_drain_with_a_client_that_never_closes_takes_the_window_plus_one_linger() {
    let (mut server, addr, dir) =
        serve("drain-stuck", "[drain]\nwindow_ms = 200\n\n[timeouts]\nclose_linger_ms = 1500\n");
    let jwt = switchboard::JwtHs256::new(switchboard::config::DEV_JWT_SECRET);
    // Logged in, then never reads or closes until the server is gone.
    let mut stuck = Client::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stuck.login("stuck", &jwt.mint("stuck", common::unix_now() + 600)).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "the server did not exit after draining");
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0));
    // Window (at most 200 ms) + linger (1,500 ms) + a tick and scheduling;
    // the old path took 200 + 1,500 + 1,500 + 500 ms.
    assert!(took >= Duration::from_millis(1500), "exited before the linger: {took:?}");
    assert!(took < Duration::from_millis(2800), "drain took {took:?}, more than window + linger");
    drop(stuck);
    let _ = std::fs::remove_dir_all(&dir);
}

/// LISTEN sockets on `port` in /proc/net/tcp: right after a SIGKILL the
/// dead server's listeners may linger there, held by no process, until
/// the kernel has torn down its io_uring instances.
fn listeners_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(3) == Some(&"0A") && f.get(1).and_then(|a| a.rsplit(':').next()) == Some(&format!("{port:04X}")[..])
        })
        .count()
}

#[test]
fn a_server_restarted_right_after_a_sigkill_takes_its_port_back() {
    // What an operator does by hand, or a supervisor with no restart
    // delay: kill -9, start again at once on the same config. Until the
    // kernel has torn down the dead process's io_uring instances, its
    // listeners are still in LISTEN, held by no process, for a few to
    // tens of milliseconds; a start then was refused ("address in use")
    // in about one round in eight. Rounds go on until ten have met such
    // a leftover listener (or 60 rounds), and every restart must come up.
    let (mut server, addr, dir) = serve("kill9", "");
    let cfg = dir.join("kill9.toml");
    let (mut rounds, mut met) = (0, 0);
    while met < 10 && rounds < 60 {
        rounds += 1;
        server.kill().unwrap();
        server.wait().unwrap();
        if listeners_on(addr.port()) > 0 {
            met += 1;
        }
        server = Command::new(SB)
            .args(["serve", "--log", "warn", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let up = common::wait_until(Duration::from_secs(10), || {
            common::listens(server.id(), addr) || server.try_wait().unwrap().is_some()
        });
        assert!(up, "round {rounds}: the restarted server neither listened nor exited in 10 s");
        if let Some(status) = server.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("round {rounds} (leftover listeners met so far: {met}): the restart exited {status}: {err}");
        }
    }
    eprintln!("{rounds} kill-and-restart rounds, {met} of them met the dead server's listeners still in LISTEN");
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_admin_api_takes_connections_once_the_client_port_does() {
    // A probe or a deploy script that waits for the client port and then
    // asks the admin API (`/readyz`, a push) must not be refused: the
    // admin listener was bound only after the workers accepted, and a
    // connection to it right after the first client connection was
    // refused in 10 starts of 10.
    common::arm_watchdog();
    let dir = std::env::temp_dir().join(format!("sb-admin-order-{}", std::process::id()));
    for round in 0..5 {
        let (port, admin) = (common::free_port(), common::free_port());
        let mut server = Command::new(SB)
            .args(["serve", "--log", "error", "--ws-listen", "", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin")
            .arg(format!("127.0.0.1:{admin}"))
            .arg("--data-dir")
            .arg(dir.join(format!("data-{round}")))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let raw: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(
            common::wait_until(Duration::from_secs(10), || {
                assert!(server.try_wait().unwrap().is_none(), "round {round}: the server exited");
                common::listening(raw)
            }),
            "round {round}: the client port never accepted"
        );
        let asked = std::net::TcpStream::connect(("127.0.0.1", admin));
        server.kill().unwrap();
        server.wait().unwrap();
        asked.unwrap_or_else(|e| panic!("round {round}: the admin API refused once the client port accepted: {e}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_overlapping_restart_on_the_same_port_loses_no_connection_attempt() {
    common::arm_watchdog();
    // In a private network namespace (needs root and unshare(1)), with
    // net.ipv4.tcp_migrate_req = 1 as docs/DEPLOY.md recommends: server A,
    // four threads connecting and logging in without pause, server B started
    // on the same port, A drained by SIGTERM. The scenario runs in this
    // test binary, started again inside the namespace for that one test.
    let out = std::env::temp_dir().join(format!("sb-restart-summary-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let me = std::env::current_exe().unwrap();
    let script = "ip link set lo up && sysctl -q -w net.ipv4.tcp_migrate_req=1 && \
                  exec \"$0\" --exact restart_inside_a_private_network_namespace --ignored --test-threads 1";
    let run = Command::new("unshare")
        .args(["-n", "sh", "-c", script])
        .arg(&me)
        .env(RESTART_OUT_ENV, &out)
        .output()
        .expect("unshare(1) runs");
    assert!(
        run.status.success(),
        "the restart run needs a private network namespace (root, unshare -n): {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(&out).expect("the run in the namespace wrote its summary");
    let _ = std::fs::remove_file(&out);
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    // One reset at the moment A's listeners close is the kernel's, not the
    // drain's: a handshake whose last ACK the kernel is processing on one
    // CPU while the listener closes on the other finds it closed by the
    // time it queues the new connection, and resets it
    // (inet_csk_complete_hashdance → inet_child_forget; seen with a
    // tcp:tcp_send_reset trace, 3 times in about 430 runs of this scenario,
    // one attempt in about a million). No migration covers that moment,
    // and nothing in user space can close it short of steering SYNs with
    // a BPF program. Anything else still fails the test: a second failed
    // attempt, one of another kind, or one later in the drain.
    let failures = r["failures"].as_u64().unwrap();
    let kernel_race = failures == 1
        && r["first_error"].as_str().is_some_and(|e| e.contains("os error 104"))
        && r["failures_ms_after_sigterm"][0].as_i64().is_some_and(|ms| (0..=50).contains(&ms));
    assert!(failures == 0 || kernel_race, "{r}");
    assert!(r["attempts_during_restart"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(r["a_exit_code"], 0, "{r}");
    assert_eq!(r["b_ready_after"], true, "{r}");
}

/// The body of the test above, run only inside its network namespace: it
/// takes the fixed ports 7700-7702 and sets nothing up itself.
#[test]
#[ignore = "run by an_overlapping_restart_on_the_same_port_loses_no_connection_attempt, in a private network namespace"]
fn restart_inside_a_private_network_namespace() {
    let Some(out) = std::env::var_os(RESTART_OUT_ENV) else {
        eprintln!("{RESTART_OUT_ENV} is not set: nothing to do outside the namespace");
        return;
    };
    let summary = restart::run(std::path::Path::new(SB)).unwrap_or_else(|e| panic!("restart: {e}"));
    std::fs::write(out, summary.to_string()).unwrap();
}

/// A zero-downtime restart, measured: server A, connection attempts
/// (connect, LOGIN, wait for LOGIN_OK) going on without pause, server B on
/// the same port (`server.share_listen_port`), A drained by SIGTERM while
/// the attempts go on. Every failed attempt is counted, none retried.
mod restart {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use serde_json::json;
    use switchboard::client::Client;
    use switchboard::JwtHs256;

    fn start(bin: &Path, dir: &Path, name: &str, port: u16, admin: u16, share: bool) -> Result<Child, String> {
        let cfg = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\nshare_listen_port = {share}\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[websocket]\nlisten = \"\"\n\n[drain]\nwindow_ms = 1000\nreconnect_jitter_ms = 500\n\n[store]\npath = {:?}\n",
            dir.join(format!("{name}-data"))
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
        Command::new(bin)
            .args(["serve", "--log", "warn", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("start {name}: {e}"))
    }

    fn ready(admin: u16) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], admin));
        matches!(super::common::http(addr, "GET", "/readyz", b"", None), Ok((200, _)))
    }

    fn wait_ready(admin: u16, what: &str) -> Result<(), String> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if ready(admin) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{what} never became ready"))
    }

    /// Runs the scenario against `switchboard`; returns the summary.
    pub fn run(switchboard: &Path) -> Result<serde_json::Value, String> {
        let dir = std::env::temp_dir().join(format!("sb-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (port, admin_a, admin_b) = (7700, 7701, 7702);
        let mut a = start(switchboard, &dir, "a", port, admin_a, false)?;
        wait_ready(admin_a, "server A")?;

        let stop = Arc::new(AtomicBool::new(false));
        let (attempts, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let first_error = Arc::new(Mutex::new(None::<String>));
        // When each failure happened, in ms since the start: tells a failure
        // at the drain's start from one at A's exit.
        let epoch = Instant::now();
        let failure_at = Arc::new(Mutex::new(Vec::<u64>::new()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let jwt = JwtHs256::new(switchboard::config::DEV_JWT_SECRET);
        let clients: Vec<_> = (0..4)
            .map(|k| {
                let (stop, attempts, failures, first_error, jwt) =
                    (stop.clone(), attempts.clone(), failures.clone(), first_error.clone(), jwt.clone());
                let failure_at = failure_at.clone();
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let user = format!("c{k}-{i}");
                        let token = jwt.mint(&user, 4_000_000_000);
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let r = Client::connect_timeout(&addr, Duration::from_secs(2))
                            .map_err(|e| e.to_string())
                            .and_then(|mut c| {
                                c.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
                                c.login(&user, &token).map(|_| ()).map_err(|e| e.to_string())
                            });
                        if let Err(e) = r {
                            failures.fetch_add(1, Ordering::Relaxed);
                            failure_at.lock().unwrap().push(epoch.elapsed().as_millis() as u64);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                })
            })
            .collect();

        std::thread::sleep(Duration::from_millis(800));
        let mut b = start(switchboard, &dir, "b", port, admin_b, true)?;
        wait_ready(admin_b, "server B")?;
        let before = attempts.load(Ordering::Relaxed);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        let sigterm_ms = epoch.elapsed().as_millis() as u64;
        let a_exit = loop {
            if let Some(status) = a.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = a.kill();
                return Err("server A did not exit within 20 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let drained_in = t0.elapsed();
        std::thread::sleep(Duration::from_millis(800));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            let _ = c.join();
        }
        let b_ready = ready(admin_b);
        let _ = b.kill();
        let _ = b.wait();
        let _ = std::fs::remove_dir_all(&dir);
        let failures_ms_after_sigterm: Vec<i64> =
            failure_at.lock().unwrap().iter().map(|&t| t as i64 - sigterm_ms as i64).collect();
        Ok(json!({
            "attempts": attempts.load(Ordering::Relaxed),
            "attempts_during_restart": attempts.load(Ordering::Relaxed) - before,
            "failures": failures.load(Ordering::Relaxed),
            "first_error": *first_error.lock().unwrap(),
            "a_exit_code": a_exit.code(),
            "a_drained_ms": drained_in.as_millis() as u64,
            "failures_ms_after_sigterm": failures_ms_after_sigterm,
            "b_ready_after": b_ready,
        }))
    }
}
