//! `switchboard-bench prelogin`: what connections that never log in can make
//! a server hold.
//!
//! Owns: one hostile scenario from the hardening review. Each of N
//! connections starts a frame and never finishes it: on raw TCP a LOGIN
//! header claiming `--frame-bytes` followed by half of that; on WebSocket
//! (`--ws`) an upgrade without login, then the first fragment of a message
//! of half that size, with pings after it so the connection looks alive.
//! It reports the server's RSS growth per connection and how many
//! connections the server closed on its own.
//! Must not: estimate. The figure is the server process's RSS (from /proc)
//! after the connections sent their bytes, minus its RSS before, divided by
//! the connections; the server runs in its own process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;
use switchboard::proto::ws::Opcode;
use switchboard_bench::loadgen::loader::ws_client_fragment;
use switchboard_bench::loadgen::ProcStat;

/// Settings of one run.
pub struct Args {
    pub addr: SocketAddr,
    pub ws: bool,
    pub server_pid: u32,
    pub connections: u32,
    pub frame_bytes: usize,
    pub settle_s: u64,
}

fn open(addr: SocketAddr, ws: bool) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    if ws {
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes())?;
        // The 101 (read whole: it is small and comes at once).
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b)?;
            if n == 0 {
                return Err(std::io::Error::other("closed during the upgrade"));
            }
            head.extend_from_slice(&b[..n]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(std::io::Error::other(String::from_utf8_lossy(&head).into_owned()));
        }
    }
    Ok(s)
}

/// The unfinished frame a connection sends.
fn unfinished(ws: bool, frame_bytes: usize, i: u32) -> Vec<u8> {
    let half = frame_bytes / 2;
    if ws {
        let key = (i.wrapping_mul(0x9E37_79B9)).to_ne_bytes();
        let mut v = ws_client_fragment(Opcode::Binary, false, &vec![0x5a; half], key);
        v.extend_from_slice(&ws_client_fragment(Opcode::Ping, true, b"alive", key));
        v
    } else {
        let mut v = ((frame_bytes - 4) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&[1, 0x01]);
        v.resize(half, b'x');
        v
    }
}

/// Whether the server closed this connection (EOF or reset; anything it
/// sent is read and dropped).
fn closed_by_server(s: &mut TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// What one run measured.
#[derive(Serialize)]
pub struct PreloginRun {
    scenario: &'static str,
    /// `raw` or `websocket`.
    transport: &'static str,
    connections: usize,
    refused_or_failed: u32,
    claimed_frame_bytes: usize,
    bytes_sent_per_connection: usize,
    send_s: f64,
    settle_s: u64,
    server_rss_before_bytes: u64,
    server_rss_after_bytes: u64,
    server_rss_growth_bytes: i64,
    server_rss_growth_per_connection: f64,
    closed_by_server: usize,
    still_open: usize,
}

pub fn run(a: Args) -> Result<PreloginRun, String> {
    // Warm-up: one-time costs (allocator size classes, the worker's
    // scratch) are not charged to the measured connections.
    for i in 0..200 {
        let mut s = open(a.addr, a.ws).map_err(|e| format!("warm-up connection: {e}"))?;
        let _ = s.write_all(&unfinished(a.ws, a.frame_bytes.min(8192), i));
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss0 = ProcStat::rss_bytes(a.server_pid).ok_or("cannot read the server's RSS")?;
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(a.connections as usize);
    let mut refused = 0u32;
    for i in 0..a.connections {
        match open(a.addr, a.ws) {
            Ok(mut s) => {
                if s.write_all(&unfinished(a.ws, a.frame_bytes, i)).is_err() {
                    refused += 1;
                }
                conns.push(s);
            }
            Err(_) => refused += 1,
        }
    }
    let sent_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(a.settle_s));
    let rss1 = ProcStat::rss_bytes(a.server_pid).ok_or("cannot read the server's RSS")?;
    let closed = conns.iter_mut().map(closed_by_server).filter(|&c| c).count();
    let n = conns.len().max(1) as f64;
    Ok(PreloginRun {
        scenario: "prelogin",
        transport: if a.ws { "websocket" } else { "raw" },
        connections: conns.len(),
        refused_or_failed: refused,
        claimed_frame_bytes: a.frame_bytes,
        bytes_sent_per_connection: unfinished(a.ws, a.frame_bytes, 0).len(),
        send_s: sent_s,
        settle_s: a.settle_s,
        server_rss_before_bytes: rss0,
        server_rss_after_bytes: rss1,
        server_rss_growth_bytes: rss1 as i64 - rss0 as i64,
        server_rss_growth_per_connection: (rss1 as f64 - rss0 as f64) / n,
        closed_by_server: closed,
        still_open: conns.len() - closed,
    })
}
