//! The backend API in the capacity run: pushes per second end to end
//! (API → clients) through `/api/v1/batch`, and the API's latency under
//! that load. (The `/metrics` scrape is timed after the idle hold.)
//!
//! Sizes: the run's own `plan.connections` receivers (raw TCP loaders,
//! which count PUSH frames and their latency from the timed payload);
//! `CLIENTS` backends on keep-alive connections, each posting batches of
//! `BATCH` at-most-once pushes (timed 64-byte payloads, base64) to users
//! in turn, as fast as the API answers, for `SECONDS`; one more backend
//! posting a single push every 5 ms, whose round trip is the latency a
//! backend sees under that load.
//!
//! Owns: the server it starts and the HTTP clients (std sockets, in this
//! process).
//! Must not: judge (report.rs does, against the targets).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hdrhistogram::Histogram;
use switchboard::timed;

use super::report::ApiBench;
use super::scenarios::{note, Delivery, Runner, ServerProc};

/// Backends posting batches at once.
const CLIENTS: usize = 4;
/// Pushes per batch request.
const BATCH: usize = 1000;
/// How long the backends post.
const SECONDS: u64 = 5;

/// One keep-alive HTTP/1.1 connection to the API.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn, String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("API connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        Ok(Conn { s, buf: Vec::with_capacity(64 * 1024) })
    }

    /// One request; the status and body of its answer.
    fn call(&mut self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.s.write_all(head.as_bytes()).and_then(|()| self.s.write_all(body)).map_err(|e| e.to_string())?;
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    return Ok((status, self.buf[end + 4..end + 4 + len].to_vec()));
                }
            }
            let n = self.s.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the API closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A batch of `BATCH` at-most-once pushes to users `prefix{first..}`,
/// wrapping at `users`, each payload stamped now.
fn batch_body(prefix: &str, first: u64, users: u64, seq: &mut u32) -> Vec<u8> {
    let mut body = String::with_capacity(BATCH * 110);
    body.push_str("{\"commands\":[");
    for i in 0..BATCH as u64 {
        if i > 0 {
            body.push(',');
        }
        *seq = seq.wrapping_add(1);
        let p = base64::engine::general_purpose::STANDARD.encode(timed::payload(*seq, 64));
        let user = (first + i) % users;
        body.push_str(&format!(
            "{{\"push\":{{\"user\":\"{prefix}{user}\",\"payload\":\"{p}\",\"mode\":\"at_most_once\"}}}}"
        ));
    }
    body.push_str("]}");
    body.into_bytes()
}

/// Pushes in a batch answer that reached a connection. (Parsed into the
/// two fields it reads, not a JSON tree: the backend's CPU is the loaders'
/// and the server's too on this host.)
fn delivered_in(answer: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Outcome {
        status: u16,
        #[serde(default)]
        connections: u64,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        results: Vec<Outcome>,
    }
    serde_json::from_slice::<Answer>(answer)
        .map_or(0, |a| a.results.iter().filter(|r| r.status == 200 && r.connections == 1).count() as u64)
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

impl Runner {
    /// The API scenario on its own (`switchboard-bench api`).
    pub fn api_alone(&mut self) -> Result<ApiBench, String> {
        self.api()
    }

    pub(super) fn api(&mut self) -> Result<ApiBench, String> {
        let s = ServerProc::switchboard(
            &self.switchboard_bin,
            &self.out,
            "api",
            self.plan.workers,
            Delivery::AtMostOnce,
            &self.plan.server_config(""),
        )?;
        let admin = s.admin.ok_or("the API server has no admin listener")?;
        let n = self.plan.connections;
        note(format!("switchboard: backend API batches to {n} connections"));
        let prefix = "api-u";
        let spec = self.spec(s.addr, n, prefix, None);
        let (mut fleet, ready, _) = self.spawn_ready(&spec)?;
        fleet.collect()?;
        let users = u64::from(ready.max(1));

        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let backends: Vec<_> = (0..CLIENTS)
            .map(|k| {
                let stop = stop.clone();
                std::thread::spawn(move || -> Result<(u64, u64, Histogram<u64>), String> {
                    let mut c = Conn::open(admin)?;
                    let mut hist = Histogram::<u64>::new(3).expect("histogram");
                    let (mut accepted, mut posted, mut seq) = (0u64, 0u64, (k as u32) << 24);
                    let mut first = (k * BATCH) as u64;
                    while !stop.load(Ordering::Relaxed) {
                        let body = batch_body(prefix, first, users, &mut seq);
                        first += (CLIENTS * BATCH) as u64;
                        let t = Instant::now();
                        let (status, answer) = c.call("POST", "/api/v1/batch", &body)?;
                        let _ = hist.record(us(t.elapsed()));
                        if status != 200 {
                            return Err(format!("batch answered {status}: {}", String::from_utf8_lossy(&answer)));
                        }
                        posted += BATCH as u64;
                        accepted += delivered_in(&answer);
                    }
                    Ok((posted, accepted, hist))
                })
            })
            .collect();
        let probe = {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<Histogram<u64>, String> {
                let mut c = Conn::open(admin)?;
                let mut hist = Histogram::<u64>::new(3).expect("histogram");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let body =
                        format!("{{\"user\":\"{prefix}{}\",\"text\":\"probe\",\"mode\":\"at_most_once\"}}", i % users);
                    let t = Instant::now();
                    let (status, _) = c.call("POST", "/api/v1/push", body.as_bytes())?;
                    let _ = hist.record(us(t.elapsed()));
                    if status != 200 {
                        return Err(format!("a single push answered {status}"));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(hist)
            })
        };
        std::thread::sleep(Duration::from_secs(SECONDS));
        stop.store(true, Ordering::Relaxed);
        let (mut posted, mut accepted) = (0u64, 0u64);
        let mut batch_hist = Histogram::<u64>::new(3).expect("histogram");
        for b in backends {
            let (p, a, h) = b.join().map_err(|_| "a backend thread panicked")??;
            posted += p;
            accepted += a;
            batch_hist.add(h).map_err(|e| e.to_string())?;
        }
        let sending = t0.elapsed().as_secs_f64();
        let single_hist = probe.join().map_err(|_| "the probe thread panicked")??;
        let probes = single_hist.len();
        // Everything accepted has been written or queued; collect until the
        // count stops rising (at most 10 s).
        let mut received = 0u64;
        let mut e2e = Histogram::<u64>::new(3).expect("histogram");
        let wait_until = Instant::now() + Duration::from_secs(10);
        loop {
            let c = fleet.collect()?;
            received += c.received;
            let _ = e2e.add(&c.hist);
            if received >= accepted + probes || Instant::now() > wait_until {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let all_in = t0.elapsed().as_secs_f64();

        fleet.quit();
        drop(s);
        let r = ApiBench {
            connections: ready,
            backends: CLIENTS as u32,
            batch: BATCH as u32,
            seconds: sending,
            pushes_posted: posted,
            pushes_accepted: accepted,
            pushes_per_s: accepted as f64 / sending,
            delivered: received,
            delivered_per_s: received as f64 / all_in,
            e2e_p50_us: e2e.value_at_quantile(0.5),
            e2e_p99_us: e2e.value_at_quantile(0.99),
            batch_p50_us: batch_hist.value_at_quantile(0.5),
            batch_p99_us: batch_hist.value_at_quantile(0.99),
            single_push_p50_us: single_hist.value_at_quantile(0.5),
            single_push_p99_us: single_hist.value_at_quantile(0.99),
            single_pushes: probes,
        };
        note(format!(
            "  {:.0} pushes/s accepted, {:.0}/s delivered ({} of {}), batch p99 {} us, single push p99 {} us under load",
            r.pushes_per_s,
            r.delivered_per_s,
            r.delivered,
            r.pushes_accepted + probes,
            r.batch_p99_us,
            r.single_push_p99_us
        ));
        Ok(r)
    }
}
