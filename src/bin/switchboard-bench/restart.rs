//! `switchboard-bench restart-check`: a zero-downtime restart, measured.
//!
//! Owns: starting server A, hammering it with connection attempts (connect,
//! LOGIN, wait for LOGIN_OK), starting server B on the same port
//! (`server.share_listen_port`), draining A with SIGTERM while the attempts
//! go on, and reporting how many attempts failed. Run it where
//! `net.ipv4.tcp_migrate_req = 1` (the test runs it in a private network
//! namespace), so connections queued on A's closing listeners move to B's.
//! Must not: retry a failed attempt (every failure is counted).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::client::Client;
use switchboard::JwtHs256;

fn start(bin: &Path, dir: &Path, name: &str, port: u16, admin: u16, share: bool) -> Result<Child, String> {
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\nshare_listen_port = {share}\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[websocket]\nlisten = \"\"\n\n[drain]\nwindow_ms = 1000\nreconnect_jitter_ms = 500\n"
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
    matches!(switchboard::loadgen::http(addr, "GET", "/readyz", b"", None), Ok((200, _)))
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

/// Runs the scenario and prints a JSON summary.
pub fn run(switchboard: PathBuf) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("sb-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (port, admin_a, admin_b) = (7700, 7701, 7702);
    let mut a = start(&switchboard, &dir, "a", port, admin_a, false)?;
    wait_ready(admin_a, "server A")?;

    let stop = Arc::new(AtomicBool::new(false));
    let (attempts, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    // When each failure happened, in ms since the start: tells a failure
    // at the drain's start from one at A's exit.
    let epoch = Instant::now();
    let failure_at = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
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
                    let r = Client::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string()).and_then(
                        |mut c| {
                            c.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
                            c.login(&user, &token).map(|_| ()).map_err(|e| e.to_string())
                        },
                    );
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
    let mut b = start(&switchboard, &dir, "b", port, admin_b, true)?;
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
    let summary = json!({
        "attempts": attempts.load(Ordering::Relaxed),
        "attempts_during_restart": attempts.load(Ordering::Relaxed) - before,
        "failures": failures.load(Ordering::Relaxed),
        "first_error": *first_error.lock().unwrap(),
        "a_exit_code": a_exit.code(),
        "a_drained_ms": drained_in.as_millis() as u64,
        "failures_ms_after_sigterm": failure_at.lock().unwrap().iter().map(|&t| t as i64 - sigterm_ms as i64).collect::<Vec<_>>(),
        "b_ready_after": b_ready,
    });
    println!("{summary}");
    Ok(())
}
