//! Deployment: `switchboard check` on this host, the graceful drain of the
//! real binary, and a zero-downtime restart on the same port.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchboard::client::{Client, ClientError};
use switchboard::proto::frame::Frame;

const SB: &str = env!("CARGO_BIN_EXE_switchboard");
const BENCH: &str = env!("CARGO_BIN_EXE_switchboard-bench");

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
    let need = 1_000_000 + 64 + 8 * std::thread::available_parallelism().unwrap().get() as u64;
    let nofile = row(&out, "RLIMIT_NOFILE");
    if nofile_hard() < need {
        assert!(nofile.starts_with("FAIL"), "{out}");
        assert!(out.contains(&format!("LimitNOFILE={need}")), "the fix names the value:\n{out}");
        assert_eq!(code, 1, "a failing item fails the command");
    } else {
        assert!(nofile.starts_with("PASS"), "{out}");
    }
    // Each kernel value reported is the live one.
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().to_string();
    assert!(row(&out, "net.core.somaxconn").contains(&somaxconn), "{out}");
    assert!(out.contains("memory for 1000000 idle connections"), "{out}");

    // A thousand connections fit this host: the file limit passes.
    let (_, out) = check(1_000);
    assert!(row(&out, "RLIMIT_NOFILE").starts_with("PASS"), "{out}");
    assert!(row(&out, "memory for idle connections").starts_with("PASS"), "{out}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the real binary (`switchboard serve`) on a free loopback port,
/// two workers, no WebSocket port, with `extra` appended to its config, and
/// waits until it accepts. Returns the process, its address and the
/// directory holding its config.
fn serve(name: &str, extra: &str) -> (std::process::Child, std::net::SocketAddr, std::path::PathBuf) {
    common::arm_watchdog();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("sb-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    let text = format!("[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\n\n[websocket]\nlisten = \"\"\n\n{extra}");
    std::fs::write(&cfg, text).unwrap();
    let server =
        Command::new(SB).args(["serve", "--log", "warn", "--config"]).arg(&cfg).stdout(Stdio::null()).spawn().unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || common::listening(addr)));
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

#[test]
fn an_overlapping_restart_on_the_same_port_loses_no_connection_attempt() {
    common::arm_watchdog();
    // In a private network namespace (needs root and unshare(1)), with
    // net.ipv4.tcp_migrate_req = 1 as docs/DEPLOY.md recommends: server A,
    // four threads connecting and logging in without pause, server B started
    // on the same port, A drained by SIGTERM.
    let script = format!(
        "ip link set lo up && sysctl -q -w net.ipv4.tcp_migrate_req=1 && exec {BENCH} restart-check --switchboard {SB}"
    );
    let out = Command::new("unshare").args(["-n", "sh", "-c", &script]).output().expect("unshare(1) runs");
    assert!(
        out.status.success(),
        "restart-check needs a private network namespace (root, unshare -n): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["failures"], 0, "{r}");
    assert!(r["attempts_during_restart"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(r["a_exit_code"], 0, "{r}");
    assert_eq!(r["b_ready_after"], true, "{r}");
}
