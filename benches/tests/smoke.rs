//! Smoke test of the load generator: the real `switchboard-bench` binary
//! (loader processes and all) against a server in this process.

use std::process::Command;
use std::time::{Duration, Instant};

use switchboard::config::Config;
use switchboard::Server;

/// Two workers on 127.0.0.1:0, no WebSocket port unless a test opens one,
/// the development JWT secret (the loaders' default).
fn config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.websocket.listen = String::new();
    c.server.workers = 2;
    c.server.pin_workers = false;
    c.server.max_connections = 4000;
    c.auth.jwt_secret = None;
    c.timeouts.tick_ms = 50;
    c.timeouts.heartbeat_interval_ms = 60_000;
    c.timeouts.idle_timeout_ms = 120_000;
    // Two tests' servers at once: each its own in-memory inbox store.
    c.store.kind = switchboard::config::StoreKind::Memory;
    c
}

fn start(cfg: Config) -> Server {
    Server::builder().config(cfg).start().expect("server starts")
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench")).args(args).output().expect("bench runs");
    assert!(out.status.success(), "switchboard-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn idle_and_unicast_scenarios_report_what_they_measured() {
    let server = start(config());
    let addr = server.local_addr().to_string();
    let pid = std::process::id().to_string();

    let idle = bench(&[
        "idle",
        "--addr",
        &addr,
        "--connections",
        "200",
        "--procs",
        "2",
        "--warmup",
        "20",
        "--settle-s",
        "0",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(idle["connections"], 200);
    assert_eq!(idle["failed"], 0);
    assert!(idle["connect_rate_per_s"].as_f64().unwrap() > 0.0);
    assert!(idle["server_user_bytes_per_conn"].is_number());
    let h = server.handle();
    assert!(
        wait_until(Duration::from_secs(5), || h.connection_count() == 0),
        "the loaders closed everything when they quit"
    );

    let uni = bench(&[
        "unicast",
        "--addr",
        &addr,
        "--connections",
        "100",
        "--rate",
        "1000",
        "--duration-s",
        "2",
        "--server-pid",
        &pid,
    ]);
    let sent = uni["sent"].as_u64().unwrap();
    assert!((1900..=2100).contains(&sent), "open loop at 1000/s for 2 s sent {sent}");
    assert_eq!(uni["received"].as_u64().unwrap(), sent, "every message delivered");
    let lat = &uni["latency"];
    assert!(lat["p50_us"].as_u64().unwrap() <= lat["p99_us"].as_u64().unwrap());
    assert!(lat["p99_us"].as_u64().unwrap() <= lat["max_us"].as_u64().unwrap());
    assert!(server.handle().stats().frames_out >= sent);
}

#[test]
fn loader_speaks_websocket_logs_in_and_delivers() {
    let mut cfg = config();
    cfg.websocket.listen = "127.0.0.1:0".into();
    // A WebSocket ping every 250 ms: the loader must answer them (or be
    // closed as idle) while it measures.
    cfg.timeouts.heartbeat_interval_ms = 250;
    cfg.timeouts.idle_timeout_ms = 1_500;
    let server = start(cfg);
    let ws = server.ws_addr().expect("a WebSocket port").to_string();
    let pid = std::process::id().to_string();

    let idle = bench(&[
        "idle",
        "--transport",
        "ws",
        "--addr",
        &ws,
        "--connections",
        "60",
        "--procs",
        "2",
        "--warmup",
        "10",
        "--settle-s",
        "0",
        "--hold-s",
        "2",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(idle["connections"], 60, "every WebSocket connection upgraded and logged in: {idle}");
    assert_eq!(idle["failed"], 0);
    assert_eq!(idle["closed_by_server"], 0, "pongs kept them alive");
    assert!(idle["pings_answered"].as_u64().unwrap() >= 60, "WebSocket pings answered: {idle}");
    let stats = server.handle().stats();
    assert!(stats.ws_upgrades >= 70, "the loader upgraded over WebSocket: {} upgrades", stats.ws_upgrades);
    assert!(stats.logins >= 70);

    let uni = bench(&[
        "unicast",
        "--transport",
        "ws",
        "--addr",
        &ws,
        "--connections",
        "50",
        "--rate",
        "500",
        "--duration-s",
        "2",
    ]);
    let sent = uni["sent"].as_u64().unwrap();
    assert!((900..=1100).contains(&sent), "open loop at 500/s for 2 s sent {sent}");
    assert_eq!(uni["received"].as_u64().unwrap(), sent, "every message delivered over WebSocket");
    assert!(uni["latency"]["p50_us"].as_u64().unwrap() > 0);
    assert_eq!(server.handle().stats().protocol_errors, 0, "masked, well-formed client frames");
}

#[test]
fn device_loaders_receive_stored_messages_and_acknowledge_them() {
    // Plain SENDs stored (the default), receivers logged in as a device:
    // a few hundred messages, every one delivered once and acknowledged.
    let server = start(config());
    let addr = server.local_addr().to_string();
    let uni = bench(&[
        "unicast",
        "--device",
        "bench",
        "--addr",
        &addr,
        "--connections",
        "40",
        "--procs",
        "2",
        "--rate",
        "200",
        "--duration-s",
        "2",
    ]);
    let sent = uni["sent"].as_u64().unwrap();
    assert!((380..=420).contains(&sent), "open loop at 200/s for 2 s sent {sent}");
    assert_eq!(uni["received"].as_u64().unwrap(), sent, "every stored message delivered as INBOX: {uni}");
    assert_eq!(uni["device"]["duplicates"], 0, "nothing retransmitted: {uni}");
    assert!(uni["device"]["acks"].as_u64().unwrap() > 0, "{uni}");
    assert!(uni["latency"]["p50_us"].as_u64().unwrap() > 0);
    let h = server.handle();
    let c = h.store_counters().expect("a store");
    assert_eq!(c.appends.load(std::sync::atomic::Ordering::Relaxed), sent, "every SEND stored");
    // Every device acknowledged all it got (the loaders ACK within 100 ms
    // and the ACKs reached the store before they quit).
    for u in 0..40 {
        let s = h.inbox_state(&format!("u{u}"), Duration::from_secs(5)).unwrap();
        let positions: Vec<u64> = s.devices.iter().map(|d| d.position).collect();
        assert_eq!(positions, vec![s.head_seq], "u{u}: device positions vs head");
    }
}

#[test]
fn the_ceiling_relay_refuses_a_port_another_process_listens_on() {
    // Switchboard's listeners are SO_REUSEPORT, as the relay's are: a relay
    // binding beside them would join the port and split its connections
    // with the server instead of failing.
    let server = start(config());
    let addr = server.local_addr().to_string();
    let mut relay = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(["ceiling-relay", "--listen", &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the relay starts");
    let exited = wait_until(Duration::from_secs(10), || relay.try_wait().expect("try_wait").is_some());
    if !exited {
        let _ = relay.kill();
    }
    let out = relay.wait_with_output().expect("the relay's output");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(exited, "the relay joined {addr}, which the server holds: {stdout}{stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains(&addr) && stderr.contains("address in use"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", std::process::id())), "names the holder: {stderr}");
}

#[test]
fn a_json_file_that_cannot_be_written_fails_the_run() {
    // Scripts read the --json file once the command succeeded
    // (scripts/idle-memory.sh, scripts/soak.py): a run whose file was not
    // written must not exit 0, or they read a missing or stale file.
    let server = start(config());
    let addr = server.local_addr().to_string();
    let dir = std::env::temp_dir().join(format!("sb-bench-no-such-dir-{}", std::process::id()));
    let json = dir.join("idle.json");
    let json = json.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(["idle", "--addr", &addr, "--connections", "10", "--warmup", "0", "--settle-s", "0", "--json", json])
        .output()
        .expect("bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0 without writing {json}: {stderr}");
    assert!(stderr.contains(json), "{stderr}");
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the results still on stdout");
    assert_eq!(results["connections"], 10);
}
