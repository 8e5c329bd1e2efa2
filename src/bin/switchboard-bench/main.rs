//! `switchboard-bench`: the load generator.
//!
//! Owns: spreading client connections over several loader processes (each
//! process may hold at most 20,000 descriptors on the reference machines,
//! and each source address 127.0.0.x has its own ephemeral ports), driving
//! scenarios through them, and reporting what it saw: connection and login
//! rates, server memory, end-to-end latency histograms.
//! Must not: estimate anything. Every figure comes from a measurement in
//! this run; projections are labelled as such by the caller.

mod ctl;
mod loader;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, Command as Proc, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use serde_json::json;

use ctl::{Command, Event};

#[derive(Parser)]
#[command(name = "switchboard-bench", about = "Load generator for Switchboard (raw TCP protocol v1)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    addr: SocketAddr,
    /// Total client connections (one user each).
    #[arg(long, default_value_t = 1000)]
    connections: u32,
    /// Loader processes (0 = one per 8,000 connections).
    #[arg(long, default_value_t = 0)]
    procs: u32,
    /// JWT secret the server checks (default: the development secret).
    #[arg(long, default_value = switchboard::config::DEV_JWT_SECRET)]
    secret: String,
    /// Prefix of the user ids (`<prefix><index>`).
    #[arg(long, default_value = "u")]
    user_prefix: String,
    /// PID of the server process, for memory and CPU figures.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Give up if the connections are not all logged in by then.
    #[arg(long, default_value_t = 120)]
    ramp_timeout_s: u64,
    /// Write the results as JSON to this file as well.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect, log in, hold idle; report connect rate and server memory.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Seconds to wait after the ramp before measuring memory.
        #[arg(long, default_value_t = 2)]
        settle_s: u64,
        /// Seconds to hold the idle connections after measuring.
        #[arg(long, default_value_t = 0)]
        hold_s: u64,
        /// Connections opened, logged in and closed before the baseline, so
        /// one-time costs (allocator pages per size class, io_uring ring
        /// pages, scratch buffers) are not charged to the measured ones.
        #[arg(long, default_value_t = 1000)]
        warmup: u32,
    },
    /// Open-loop client-to-client SENDs at a fixed total rate; end-to-end
    /// latency from a timestamp in the payload.
    Unicast {
        #[command(flatten)]
        common: Common,
        /// Total messages per second over all loaders.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        duration_s: u64,
        #[arg(long, default_value_t = 64)]
        payload_bytes: usize,
    },
    /// (internal) One loader process, driven over stdin/stdout.
    #[command(hide = true)]
    Child {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        src_ip: IpAddr,
        #[arg(long)]
        first_user: u32,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        secret: String,
        #[arg(long)]
        user_prefix: String,
    },
}

/// Reads /proc figures of a process.
pub struct ProcStat;

impl ProcStat {
    /// Resident set size in bytes.
    pub fn rss_bytes(pid: u32) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }

    /// (user, system) CPU time in clock ticks.
    pub fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
    }

    /// Kernel slab memory in bytes (`Slab:` of /proc/meminfo).
    pub fn slab_bytes() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = s.lines().find(|l| l.starts_with("Slab:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }
}

/// The loader processes of one run.
struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    events: mpsc::Receiver<(usize, Event)>,
    per_child: Vec<u32>,
}

impl Fleet {
    fn spawn(c: &Common) -> std::io::Result<Fleet> {
        let procs = if c.procs == 0 { c.connections.div_ceil(8000).max(1) } else { c.procs };
        let exe = std::env::current_exe()?;
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let mut per_child = Vec::new();
        let base = c.connections / procs;
        let mut first = 0;
        for k in 0..procs {
            let count = base + u32::from(k < c.connections % procs);
            // 127.0.0.10, .11, ...: each source address has its own
            // ephemeral port range towards the server.
            let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + k as u8));
            let mut child = Proc::new(&exe)
                .args(["child", "--addr", &c.addr.to_string(), "--src-ip", &src.to_string()])
                .args(["--first-user", &first.to_string(), "--count", &count.to_string()])
                .args(["--secret", &c.secret, "--user-prefix", &c.user_prefix])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            first += count;
            per_child.push(count);
            stdins.push(child.stdin.take().expect("piped"));
            let out = child.stdout.take().expect("piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(e) => {
                            if tx.send((k as usize, e)).is_err() {
                                break;
                            }
                        }
                        Err(e) => eprintln!("loader {k}: unparsable event {line:?}: {e}"),
                    }
                }
            });
            children.push(child);
        }
        Ok(Fleet { children, stdins, events: rx, per_child })
    }

    fn send(&mut self, k: usize, cmd: &Command) {
        let line = serde_json::to_string(cmd).expect("commands serialise");
        let _ = writeln!(self.stdins[k], "{line}");
    }

    fn broadcast(&mut self, cmd: &Command) {
        for k in 0..self.stdins.len() {
            self.send(k, cmd);
        }
    }

    /// Waits until every loader reported `Ready`; prints progress.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(u32, u32, Duration), String> {
        let t0 = Instant::now();
        let n = self.children.len();
        let mut ready = vec![None; n];
        let mut progress = vec![(0u32, 0u32); n];
        let mut last_print = Instant::now();
        let mut first_error = None;
        while ready.iter().any(|r: &Option<(u32, u32)>| r.is_none()) {
            let left = timeout.checked_sub(t0.elapsed()).ok_or_else(|| {
                format!("ramp timed out after {timeout:?}: {progress:?} (connected, ready) per loader")
            })?;
            match self.events.recv_timeout(left.min(Duration::from_millis(500))) {
                Ok((k, Event::Progress { connected, ready: r, .. })) => progress[k] = (connected, r),
                Ok((k, Event::Ready { ready: r, failed, first_error: fe, .. })) => {
                    ready[k] = Some((r, failed));
                    progress[k] = (r + failed, r);
                    if first_error.is_none() {
                        first_error = fe;
                    }
                }
                Ok((k, Event::Error { message })) => return Err(format!("loader {k}: {message}")),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err("a loader exited".into()),
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                let r: u32 = progress.iter().map(|p| p.1).sum();
                eprintln!(
                    "  ramp: {r} / {} logged in ({:.1} s)",
                    self.per_child.iter().sum::<u32>(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        let (r, f) = ready.iter().flatten().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if f > 0 {
            eprintln!("  {f} connections failed; first error: {}", first_error.unwrap_or_default());
        }
        Ok((r, f, t0.elapsed()))
    }

    /// Collects and merges what every loader recorded since the last call.
    fn collect(&mut self) -> Result<Collected, String> {
        self.broadcast(&Command::Collect);
        let mut out = Collected {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            received: 0,
            pongs: 0,
            closed: 0,
        };
        let mut got = 0;
        while got < self.children.len() {
            match self.events.recv_timeout(Duration::from_secs(30)) {
                Ok((_, Event::Collected { received, pongs, closed, hist })) => {
                    let raw = base64::engine::general_purpose::STANDARD.decode(hist).map_err(|e| e.to_string())?;
                    let h: Histogram<u64> =
                        Deserializer::new().deserialize(&mut raw.as_slice()).map_err(|e| format!("{e:?}"))?;
                    out.hist.add(&h).map_err(|e| format!("{e:?}"))?;
                    out.received += received;
                    out.pongs += pongs;
                    out.closed += closed;
                    got += 1;
                }
                Ok((k, Event::Error { message })) => return Err(format!("loader {k}: {message}")),
                Ok(_) => {}
                Err(e) => return Err(format!("collect: {e}")),
            }
        }
        Ok(out)
    }

    fn wait_sent(&mut self) -> Result<(u64, u64), String> {
        let (mut sent, mut blocked, mut got) = (0, 0, 0);
        while got < self.children.len() {
            match self.events.recv_timeout(Duration::from_secs(600)) {
                Ok((_, Event::Sent { sent: s, blocked: b, .. })) => {
                    sent += s;
                    blocked += b;
                    got += 1;
                }
                Ok((k, Event::Error { message })) => return Err(format!("loader {k}: {message}")),
                Ok(_) => {}
                Err(e) => return Err(format!("waiting for senders: {e}")),
            }
        }
        Ok((sent, blocked))
    }

    fn quit(mut self) {
        self.broadcast(&Command::Quit);
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Collected {
    hist: Histogram<u64>,
    received: u64,
    pongs: u64,
    closed: u32,
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn finish(common: &Common, result: serde_json::Value) {
    let text = serde_json::to_string_pretty(&result).expect("json");
    println!("{text}");
    if let Some(p) = &common.json {
        if let Err(e) = std::fs::write(p, text) {
            eprintln!("cannot write {}: {e}", p.display());
        }
    }
}

fn idle(common: Common, settle_s: u64, hold_s: u64, warmup: u32) -> Result<(), String> {
    let pid = common.server_pid;
    let rss_cold = pid.and_then(ProcStat::rss_bytes);
    if warmup > 0 {
        let mut w = common.clone();
        w.connections = warmup;
        w.procs = 1;
        w.user_prefix = format!("warmup-{}", common.user_prefix);
        let mut fleet = Fleet::spawn(&w).map_err(|e| e.to_string())?;
        eprintln!("idle: warm-up with {warmup} connections");
        fleet.wait_ready(Duration::from_secs(common.ramp_timeout_s))?;
        fleet.quit();
        std::thread::sleep(Duration::from_secs(1));
    }
    let rss0 = pid.and_then(ProcStat::rss_bytes);
    let slab0 = ProcStat::slab_bytes();
    let mut fleet = Fleet::spawn(&common).map_err(|e| e.to_string())?;
    eprintln!("idle: {} connections from {} loader processes", common.connections, fleet.children.len());
    let (ready, failed, ramp) = fleet.wait_ready(Duration::from_secs(common.ramp_timeout_s))?;
    std::thread::sleep(Duration::from_secs(settle_s));
    let rss1 = pid.and_then(ProcStat::rss_bytes);
    let slab1 = ProcStat::slab_bytes();
    let per_conn = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if ready > 0 => json!((b as f64 - a as f64) / ready as f64),
        _ => json!(null),
    };
    if hold_s > 0 {
        eprintln!("  holding {ready} idle connections for {hold_s} s");
        std::thread::sleep(Duration::from_secs(hold_s));
    }
    let c = fleet.collect()?;
    fleet.quit();
    finish(
        &common,
        json!({
            "scenario": "idle",
            "connections": ready,
            "failed": failed,
            "ramp_s": ramp.as_secs_f64(),
            "connect_rate_per_s": ready as f64 / ramp.as_secs_f64(),
            "server_rss_before_bytes": rss0,
            "server_rss_after_bytes": rss1,
            "warmup_connections": warmup,
            "server_user_bytes_per_conn": per_conn(rss0, rss1),
            // From the freshly started server, one-time costs included.
            "server_user_bytes_per_conn_cold": per_conn(rss_cold, rss1),
            // Both ends of every connection live on this host: the slab
            // delta covers two sockets per connection.
            "host_slab_bytes_per_conn_both_ends": per_conn(slab0, slab1),
            "closed_by_server": c.closed,
            "pings_answered": c.pongs,
        }),
    );
    Ok(())
}

fn unicast(common: Common, rate: u64, duration_s: u64, payload_bytes: usize) -> Result<(), String> {
    let mut fleet = Fleet::spawn(&common).map_err(|e| e.to_string())?;
    let procs = fleet.children.len() as u64;
    let (ready, _failed, _) = fleet.wait_ready(Duration::from_secs(common.ramp_timeout_s))?;
    fleet.collect()?; // reset
    let cpu0 = common.server_pid.and_then(ProcStat::cpu_ticks);
    let t0 = Instant::now();
    for k in 0..fleet.children.len() {
        let share = rate / procs + u64::from((k as u64) < rate % procs);
        fleet.send(
            k,
            &Command::Unicast {
                rate_per_s: share,
                duration_ms: duration_s * 1000,
                users_total: common.connections,
                payload_bytes,
                seed: 0x9E37_79B9 + k as u64,
            },
        );
    }
    let (sent, blocked) = fleet.wait_sent()?;
    std::thread::sleep(Duration::from_millis(500)); // in-flight deliveries
    let elapsed = t0.elapsed();
    let cpu1 = common.server_pid.and_then(ProcStat::cpu_ticks);
    let c = fleet.collect()?;
    fleet.quit();
    let tck = 1e9 / 100.0; // ns per clock tick (USER_HZ = 100)
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) if c.received > 0 => json!({
            "server_user_ns_per_msg": (b.0 - a.0) as f64 * tck / c.received as f64,
            "server_sys_ns_per_msg": (b.1 - a.1) as f64 * tck / c.received as f64,
        }),
        _ => json!(null),
    };
    finish(
        &common,
        json!({
            "scenario": "unicast",
            "connections": ready,
            "target_rate_per_s": rate,
            "sent": sent,
            "blocked": blocked,
            "received": c.received,
            "msgs_per_s": c.received as f64 / elapsed.as_secs_f64(),
            "latency": percentiles(&c.hist),
            "cpu": cpu,
        }),
    );
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let r = match Cli::parse().cmd {
        Cmd::Child { addr, src_ip, first_user, count, secret, user_prefix } => {
            loader::run(loader::LoaderArgs { addr, src_ip, first_user, count, secret, user_prefix })
                .map_err(|e| e.to_string())
        }
        Cmd::Idle { common, settle_s, hold_s, warmup } => idle(common, settle_s, hold_s, warmup),
        Cmd::Unicast { common, rate, duration_s, payload_bytes } => unicast(common, rate, duration_s, payload_bytes),
    };
    if let Err(e) = r {
        eprintln!("switchboard-bench: {e}");
        std::process::exit(1);
    }
}
