//! `switchboard-bench bulk`: what the socket buffer setting costs an idle
//! connection and what it allows a busy one, side by side in one run.
//!
//! The question: with `socket.rcvbuf_bytes` / `sndbuf_bytes` set to 4 KiB
//! (which also turns the kernel's buffer autotuning off for those sockets),
//! one connection moved a 16 MB message about 20 times slower than a peer
//! server that leaves the buffers to the kernel. Does leaving them unset
//! (0) cost idle connections anything, and what does it give a busy one?
//!
//! Owns: for each setting compared, a fresh `switchboard serve` in its own
//! process, with the setting and a message size limit large enough for the
//! bulk messages; the idle figures (the capacity run's idle hold: server
//! RSS and half the host's slab growth per connection; and, from `ss -tm`,
//! the buffer memory the server's sockets hold with the connections idle);
//! then one client that SENDs a large message to a second client, which
//! sends it straight back: the round trip, twice through the server, timed
//! from the first byte written to the last byte read back, with the server
//! sockets' buffer sizes and bytes held sampled while it runs.
//! Must not: change kernel settings. The buffers a socket may grow to
//! without a setting are the host's `net.ipv4.tcp_rmem` / `tcp_wmem`,
//! which the report prints with the figures.
//!
//! Sizes: 16 MB, the size of the measurement that raised the question (and
//! just under the protocol's 16 MiB frame limit); a few round trips per
//! setting, because on a shared 2-core host one can be disturbed; the
//! quick capacity run's 4,000 idle connections.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchboard::client::Client;
use switchboard::proto::frame::{Frame, PROTOCOL_MAX_FRAME_BYTES};
use switchboard::JwtHs256;

use super::median;
use super::report::f;
use super::scenarios::{note, Delivery, Runner, ServerProc};

/// What to compare.
#[derive(Clone, Debug)]
pub struct BulkPlan {
    /// Payload bytes of each bulk message.
    pub message_bytes: usize,
    pub round_trips: u32,
    /// Idle connections for the memory figures.
    pub idle_connections: u32,
    /// `socket.rcvbuf_bytes` = `sndbuf_bytes` settings, in order; 0 = left
    /// to the kernel.
    pub buffers: Vec<usize>,
    pub workers: usize,
}

/// The whole comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BulkReport {
    pub question: String,
    pub message_bytes: usize,
    /// The host's `net.ipv4.tcp_rmem` and `tcp_wmem` (min default max):
    /// what an unset buffer may grow to.
    pub tcp_rmem: Option<String>,
    pub tcp_wmem: Option<String>,
    pub page_bytes: u64,
    pub settings: Vec<BulkSetting>,
    pub method: String,
}

/// One buffer setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BulkSetting {
    /// `socket.rcvbuf_bytes` = `sndbuf_bytes`; 0 = left to the kernel.
    pub socket_buffer_bytes: usize,
    pub idle_connections: u32,
    pub server_user_bytes_per_conn: Option<f64>,
    /// Half the host's slab growth per connection: an upper bound.
    pub server_kernel_bytes_per_conn: Option<f64>,
    /// The server's sockets with the idle connections open (`ss -tm`):
    /// how many, and the buffer memory they hold together (`r` + `t` +
    /// `w` + `f`: received, in flight, queued, reserved).
    pub idle_server_sockets: Option<u64>,
    pub idle_server_socket_bytes: Option<u64>,
    /// The host's TCP buffer pages (/proc/net/sockstat `mem`) with the idle
    /// connections open, and before they were opened. Coarse: the kernel
    /// moves this counter in per-CPU batches (`net.core.mem_pcpu_rsv`
    /// pages), and other processes' sockets count too.
    pub tcp_mem_pages_idle: Option<u64>,
    pub tcp_mem_pages_before: Option<u64>,
    /// Each round trip, in seconds.
    pub round_trip_s: Vec<f64>,
    pub median_round_trip_s: Option<f64>,
    /// Message bytes over the median round trip (each byte crosses the
    /// server twice).
    pub megabytes_per_s: Option<f64>,
    /// The host's peak TCP buffer pages during the round trips.
    pub tcp_mem_pages_peak: Option<u64>,
    /// The server's own sockets during the round trips (`ss -tm`, sampled):
    /// the largest receive and send buffer sizes, and the most bytes one
    /// socket held in them.
    pub server_socket_peak: Option<SocketPeak>,
}

/// Peaks of the server's sockets' memory, from `ss -tm`'s `skmem`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketPeak {
    /// `rb`: the receive buffer's size (SO_RCVBUF, doubled; or autotuned).
    pub rcvbuf_bytes: u64,
    /// `tb`: the send buffer's size.
    pub sndbuf_bytes: u64,
    /// `r` + `w`: bytes held, received and queued to send.
    pub held_bytes: u64,
}

/// The `skmem` fields of one socket in `ss -tm` output: (r, rb, t, tb, f, w).
fn skmem_fields(inner: &str) -> [u64; 6] {
    let field = |name: &str| inner.split(',').find_map(|kv| kv.strip_prefix(name)?.parse::<u64>().ok()).unwrap_or(0);
    [field("r"), field("rb"), field("t"), field("tb"), field("f"), field("w")]
}

/// Every socket's `skmem:(…)` in an `ss -tm` output.
fn skmems(ss: &str) -> impl Iterator<Item = [u64; 6]> + '_ {
    ss.split("skmem:(").skip(1).map(|part| skmem_fields(part.split(')').next().unwrap_or("")))
}

/// Sockets, and the buffer memory they hold together (r + t + w + f).
fn socket_totals(ss: &str) -> (u64, u64) {
    skmems(ss).fold((0, 0), |(n, bytes), [r, _, t, _, f, w]| (n + 1, bytes + r + t + w + f))
}

impl SocketPeak {
    /// Folds in every `skmem:(…)` of an `ss -tm` output.
    fn update(&mut self, ss: &str) {
        for [r, rb, _, tb, _, w] in skmems(ss) {
            self.rcvbuf_bytes = self.rcvbuf_bytes.max(rb);
            self.sndbuf_bytes = self.sndbuf_bytes.max(tb);
            self.held_bytes = self.held_bytes.max(r + w);
        }
    }
}

/// `ss -tm` of the established sockets whose local port is `port`.
fn ss_sockets(port: u16) -> Option<String> {
    let filter = format!("( sport = :{port} )");
    let out = std::process::Command::new("ss").args(["-tmnH", "state", "established", &filter]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl BulkReport {
    /// A markdown table and the settings' ratio.
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut m = String::new();
        let _ = writeln!(
            m,
            "| socket buffers | server user bytes per idle connection | server kernel bytes per idle connection (upper bound) | buffer bytes held by the server's idle sockets, all together (sockets) | {} MB round trip, median (each) | MB/s | server socket peak: receive / send buffer size, bytes held |\n|---|---|---|---|---|---|---|",
            f(self.message_bytes as f64 / 1e6, 0)
        );
        for s in &self.settings {
            let each: Vec<String> = s.round_trip_s.iter().map(|t| f(*t, 3)).collect();
            let pages = |p: Option<u64>| p.map_or("n/a".into(), |p| p.to_string());
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} ({}) | {} s ({}) | {} | {} |",
                setting_name(s.socket_buffer_bytes),
                f(s.server_user_bytes_per_conn, 0),
                f(s.server_kernel_bytes_per_conn, 0),
                pages(s.idle_server_socket_bytes),
                pages(s.idle_server_sockets),
                f(s.median_round_trip_s, 3),
                each.join(", "),
                f(s.megabytes_per_s, 1),
                s.server_socket_peak
                    .map_or("n/a".into(), |p| format!("{} / {} / {}", p.rcvbuf_bytes, p.sndbuf_bytes, p.held_bytes)),
            );
        }
        if let [a, b, ..] = &self.settings[..] {
            if let (Some(x), Some(y)) = (a.median_round_trip_s, b.median_round_trip_s) {
                let _ = writeln!(
                    m,
                    "\nRound trip, {} / {}: {}",
                    setting_name(a.socket_buffer_bytes),
                    setting_name(b.socket_buffer_bytes),
                    f(x / y, 1)
                );
            }
        }
        let _ = writeln!(
            m,
            "\nHost: net.ipv4.tcp_rmem = {}, net.ipv4.tcp_wmem = {} (bytes: min default max), pages of {} bytes.",
            self.tcp_rmem.as_deref().unwrap_or("n/a"),
            self.tcp_wmem.as_deref().unwrap_or("n/a"),
            self.page_bytes
        );
        m
    }
}

fn setting_name(bytes: usize) -> String {
    if bytes == 0 {
        "unset (kernel autotuning)".into()
    } else {
        format!("{bytes} B (SO_RCVBUF/SO_SNDBUF)")
    }
}

fn sysctl(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/"))).ok()?;
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The host's TCP buffer memory in pages: `mem` of /proc/net/sockstat.
fn tcp_mem_pages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The server config for one setting: its buffers, and limits that let a
/// `message_bytes` message through (frame size, the outbound queue that
/// holds what a receiver's socket has not taken yet, the partial-frame
/// budget, and time to arrive on the slowest setting).
fn server_config(buffers: usize) -> String {
    let frame = PROTOCOL_MAX_FRAME_BYTES;
    format!(
        "\n[socket]\nrcvbuf_bytes = {buffers}\nsndbuf_bytes = {buffers}\n\n\
         [limits]\nmax_frame_bytes = {frame}\noutbound_max_bytes = {}\npartial_bytes_per_worker = {}\n\n\
         [timeouts]\nmessage_timeout_ms = 300000\n",
        4 * frame,
        8 * frame,
    )
}

fn client(addr: SocketAddr, jwt: &JwtHs256, user: &str) -> Result<Client, String> {
    let mut c = Client::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(300))).map_err(|e| e.to_string())?;
    c.set_write_timeout(Some(Duration::from_secs(300))).map_err(|e| e.to_string())?;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    c.login(user, &jwt.mint(user, exp + 3600)).map_err(|e| format!("login {user}: {e}"))?;
    Ok(c)
}

/// Reads until a PUSH arrives (SEND_ACKs and PINGs pass); returns its
/// payload length.
fn await_push(c: &mut Client) -> Result<usize, String> {
    loop {
        let f = c.recv_skipping_pings().map_err(|e| format!("waiting for the PUSH: {e}"))?;
        match f.frame() {
            Frame::Push { payload, .. } => return Ok(payload.len()),
            Frame::SendAck { .. } => {}
            other => return Err(format!("{other:?} while waiting for the PUSH")),
        }
    }
}

/// One round trip: `a` sends to `b`, `b` sends the same bytes back.
fn round_trip(a: &mut Client, b: &mut Client, payload: &[u8]) -> Result<Duration, String> {
    let t0 = Instant::now();
    a.send(1, "bulk-b", payload).map_err(|e| format!("send: {e}"))?;
    let n = await_push(b)?;
    if n != payload.len() {
        return Err(format!("b got {n} bytes of {}", payload.len()));
    }
    b.send(2, "bulk-a", payload).map_err(|e| format!("send back: {e}"))?;
    let n = await_push(a)?;
    if n != payload.len() {
        return Err(format!("a got {n} bytes back of {}", payload.len()));
    }
    Ok(t0.elapsed())
}

impl Runner {
    /// One setting against a fresh server.
    fn bulk_setting(&mut self, plan: &BulkPlan, buffers: usize) -> Result<BulkSetting, String> {
        let tag = format!("bulk-{buffers}");
        let s = ServerProc::switchboard(
            &self.switchboard_bin,
            &self.out,
            &tag,
            plan.workers,
            Delivery::AtMostOnce,
            &server_config(buffers),
        )?;
        note(format!("bulk: socket buffers {}", setting_name(buffers)));
        std::thread::sleep(Duration::from_millis(300));
        let before = tcp_mem_pages();
        let (idle, fleets) = self.idle_hold(&s)?;
        let idle_pages = tcp_mem_pages();
        let idle_sockets = ss_sockets(s.addr.port()).map(|out| socket_totals(&out));
        for f in fleets {
            f.quit();
        }
        note(format!(
            "  idle: {} user / {} kernel bytes per connection; the server's sockets (count, buffer bytes): {:?}; host TCP buffer pages {:?} (before {:?})",
            f(idle.server_user_bytes_per_conn, 0),
            f(idle.server_kernel_bytes_per_conn, 0),
            idle_sockets,
            idle_pages,
            before
        ));

        let jwt = JwtHs256::new(switchboard::config::DEV_JWT_SECRET);
        let mut a = client(s.addr, &jwt, "bulk-a")?;
        let mut b = client(s.addr, &jwt, "bulk-b")?;
        let payload: Vec<u8> = (0..plan.message_bytes).map(|i| (i % 251) as u8).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let port = s.addr.port();
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                let mut sockets: Option<SocketPeak> = None;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(p) = tcp_mem_pages() {
                        peak.fetch_max(p, Ordering::Relaxed);
                    }
                    if let Some(out) = ss_sockets(port) {
                        sockets.get_or_insert_with(SocketPeak::default).update(&out);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                sockets
            })
        };
        let mut times = Vec::new();
        let mut failure = None;
        for k in 0..plan.round_trips {
            match round_trip(&mut a, &mut b, &payload) {
                Ok(t) => {
                    note(format!("  round trip {}: {:.3} s", k + 1, t.as_secs_f64()));
                    times.push(t.as_secs_f64());
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let server_socket_peak = sampler.join().unwrap_or(None);
        s.stop();
        if let Some(e) = failure {
            return Err(format!("bulk with socket buffers {}: {e}", setting_name(buffers)));
        }
        let round_trip_s = times.clone();
        let med = median(&mut times);
        Ok(BulkSetting {
            socket_buffer_bytes: buffers,
            idle_connections: idle.connections,
            server_user_bytes_per_conn: idle.server_user_bytes_per_conn,
            server_kernel_bytes_per_conn: idle.server_kernel_bytes_per_conn,
            idle_server_sockets: idle_sockets.map(|(n, _)| n),
            idle_server_socket_bytes: idle_sockets.map(|(_, b)| b),
            tcp_mem_pages_idle: idle_pages,
            tcp_mem_pages_before: before,
            round_trip_s,
            median_round_trip_s: med,
            megabytes_per_s: med.map(|t| plan.message_bytes as f64 / 1e6 / t),
            tcp_mem_pages_peak: Some(peak.load(Ordering::Relaxed)),
            server_socket_peak,
        })
    }

    /// Every setting of `plan`, one after the other.
    pub fn bulk(&mut self, plan: &BulkPlan) -> Result<BulkReport, String> {
        std::fs::create_dir_all(&self.out).map_err(|e| e.to_string())?;
        if plan.message_bytes + 64 > PROTOCOL_MAX_FRAME_BYTES {
            return Err(format!(
                "--message-bytes must leave room for the frame header within {PROTOCOL_MAX_FRAME_BYTES}"
            ));
        }
        let mut settings = Vec::new();
        for &b in &plan.buffers {
            settings.push(self.bulk_setting(plan, b)?);
        }
        Ok(BulkReport {
            question: "what do idle connections cost, and how fast does one busy connection move a large message, with the socket buffers set against left to the kernel?".into(),
            message_bytes: plan.message_bytes,
            tcp_rmem: sysctl("net.ipv4.tcp_rmem"),
            tcp_wmem: sysctl("net.ipv4.tcp_wmem"),
            // SAFETY: sysconf has no preconditions.
            page_bytes: unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64,
            settings,
            method: "each setting against a fresh server process: the idle hold of the capacity run (connections in 4 steps from loader processes; RSS delta and half the host's Slab delta per connection), /proc/net/sockstat TCP mem with them open; then one raw-TCP client SENDs the message to a second, which SENDs it back (twice through the server), timed from the first byte written to the last byte read back, while a thread samples sockstat every 5 ms for the peak".into(),
        })
    }
}

/// Runs the comparison against `bin`, in `out`.
pub fn run(bin: &Path, bench_exe: &Path, out: &Path, plan: &BulkPlan) -> Result<BulkReport, String> {
    let mut capacity = super::Plan::quick();
    capacity.connections = plan.idle_connections;
    capacity.workers = plan.workers;
    let mut runner = Runner::new(capacity, out.to_path_buf(), bench_exe.to_path_buf(), bin.to_path_buf(), None, false);
    runner.bulk(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(buffers: usize, trips: &[f64]) -> BulkSetting {
        let mut t = trips.to_vec();
        let med = median(&mut t);
        BulkSetting {
            socket_buffer_bytes: buffers,
            idle_connections: 4000,
            server_user_bytes_per_conn: Some(180.4),
            server_kernel_bytes_per_conn: None,
            idle_server_sockets: Some(4000),
            idle_server_socket_bytes: Some(0),
            tcp_mem_pages_idle: Some(3),
            tcp_mem_pages_before: Some(2),
            round_trip_s: trips.to_vec(),
            median_round_trip_s: med,
            megabytes_per_s: med.map(|m| 16.0 / m),
            tcp_mem_pages_peak: Some(4000),
            server_socket_peak: Some(SocketPeak { rcvbuf_bytes: 8192, sndbuf_bytes: 8192, held_bytes: 9000 }),
        }
    }

    #[test]
    fn socket_peaks_fold_in_every_skmem_of_ss() {
        let ss = "0 0 127.0.0.1:7700 127.0.0.1:5555\n\t skmem:(r100,rb8192,t0,tb8192,f0,w2000,o0,bl0,d0)\n\
                  0 0 127.0.0.1:7700 127.0.0.1:5556\n\t skmem:(r0,rb131072,t5,tb46080,f4096,w0,o0,bl0,d0)\n";
        let mut p = SocketPeak::default();
        p.update(ss);
        assert_eq!(p, SocketPeak { rcvbuf_bytes: 131072, sndbuf_bytes: 46080, held_bytes: 2100 });
        p.update("0 0 a b\n\t skmem:(r9000,rb1,t0,tb1,f0,w0)\n");
        assert_eq!(p.held_bytes, 9000, "the most any socket held");
        assert_eq!(p.rcvbuf_bytes, 131072, "peaks only grow");
        assert_eq!(socket_totals(ss), (2, 100 + 2000 + 5 + 4096));
    }

    #[test]
    fn the_table_has_a_row_per_setting_and_their_ratio() {
        let r = BulkReport {
            question: String::new(),
            message_bytes: 16_000_000,
            tcp_rmem: Some("4096 131072 6291456".into()),
            tcp_wmem: None,
            page_bytes: 4096,
            settings: vec![setting(4096, &[8.0, 9.0, 8.5]), setting(0, &[0.5, 0.4, 0.6])],
            method: String::new(),
        };
        let m = r.markdown();
        assert!(m.contains("| 16 MB round trip, median (each) |"), "{m}");
        assert!(
            m.contains(
                "| 4096 B (SO_RCVBUF/SO_SNDBUF) | 180 | n/a | 0 (4000) | 8.500 s (8.000, 9.000, 8.500) | 1.9 | 8192 / 8192 / 9000 |"
            ),
            "{m}"
        );
        assert!(m.contains("| unset (kernel autotuning) | 180 | n/a | 0 (4000) | 0.500 s"), "{m}");
        assert!(m.contains("Round trip, 4096 B (SO_RCVBUF/SO_SNDBUF) / unset (kernel autotuning): 17.0"), "{m}");
        assert!(m.contains("tcp_rmem = 4096 131072 6291456, net.ipv4.tcp_wmem = n/a"), "{m}");
    }

    #[test]
    fn the_server_config_lets_the_message_through_and_sets_only_the_buffers_asked_for() {
        let c = server_config(0);
        assert!(c.contains("rcvbuf_bytes = 0\nsndbuf_bytes = 0\n"), "{c}");
        let mut cfg = switchboard::Config::from_toml(&format!("[server]\nlisten = \"127.0.0.1:1\"\n{c}")).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.limits.max_frame_bytes, PROTOCOL_MAX_FRAME_BYTES);
        cfg.socket.rcvbuf_bytes = 4096;
        cfg.validate().unwrap();
    }
}
