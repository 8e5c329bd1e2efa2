//! Smoke test of the load generator: the real `switchboard-bench` binary
//! (loader processes and all) against a server in this process.

mod common;

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench")).args(args).output().expect("bench runs");
    assert!(out.status.success(), "switchboard-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn idle_and_unicast_scenarios_report_what_they_measured() {
    let mut cfg = common::config();
    cfg.auth.jwt_secret = None; // the bench logs in with the dev secret by default
    let server = common::start(cfg);
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
        common::wait_until(std::time::Duration::from_secs(5), || h.connection_count() == 0),
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
