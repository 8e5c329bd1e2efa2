//! `switchboard-bench`: the load generator.
//!
//! Owns: spreading client connections over several loader processes (each
//! process may hold at most 20,000 descriptors on the reference machines,
//! and each source address 127.0.0.x has its own ephemeral ports), driving
//! scenarios through them, and reporting what it saw: connection and login
//! rates, server memory, end-to-end latency histograms.
//! Must not: estimate anything. Every figure comes from a measurement in
//! this run; projections are labelled as such by the caller.

mod capacity;
mod prelogin;
mod relay;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use switchboard::config::PollerKind;
use switchboard_bench::loadgen::loader::{self, Transport};
use switchboard_bench::loadgen::{percentiles, Fleet, FleetSpec, Latency, ProcStat};

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
    /// How the connections talk: raw TCP (protocol v1), WebSocket with the
    /// `switchboard.v1.bin` subprotocol (`--addr` is then the WebSocket
    /// port), or plain WebSocket whose messages are timed payloads.
    #[arg(long, value_enum, default_value_t = Transport::Raw)]
    transport: Transport,
    /// WebSocket upgrade path; `{user}` and `{token}` are replaced per
    /// connection (default for `ws`: `/?user={user}&token={token}`).
    #[arg(long)]
    ws_path: Option<String>,
    /// Log every connection in as this device of its user (reliable
    /// delivery: stored messages come as INBOX frames, which the loader
    /// acknowledges every 32 frames or 100 ms). Raw TCP only.
    #[arg(long)]
    device: Option<String>,
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
    /// The capacity report: every scenario against Switchboard, the bare
    /// ceiling relay and the tokio baseline, then Switchboard over WebSocket
    /// next to nginx + nchan, each in its own process(es); writes
    /// report.json, report.md and SVG plots.
    Capacity {
        /// Full mode: the largest honest run (as many connections as the
        /// server accepts in one process, at most 19,000: about 18,600
        /// with 20,000 descriptors; 15,000 over WebSocket). Default: quick
        /// mode (4,000; 2,000 over WebSocket; 400,000 churn cycles; 11-15
        /// minutes with --no-peers on 2 vCPUs, both data paths).
        #[arg(long, conflicts_with = "quick")]
        full: bool,
        /// Quick mode, the default (accepted so scripts can say so).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/capacity")]
        out: PathBuf,
        /// The switchboard binary (default: next to this one).
        #[arg(long)]
        switchboard: Option<PathBuf>,
        /// The tokio baseline binary (default: next to this one, if built).
        #[arg(long)]
        tokio: Option<PathBuf>,
        /// Skip the peers (the tokio baseline and nginx + nchan).
        #[arg(long)]
        no_peers: bool,
        /// Skip the nginx + nchan WebSocket peer (it needs
        /// `apt-get install nginx libnginx-mod-nchan`; without them it is
        /// reported absent).
        #[arg(long)]
        no_nchan: bool,
        /// Only the WebSocket comparison: Switchboard's WebSocket port next
        /// to nginx + nchan (no raw-TCP scenarios, no tokio baseline).
        #[arg(long)]
        ws_only: bool,
        /// Connections of the WebSocket comparison (default: 2,000 quick,
        /// 15,000 full).
        #[arg(long)]
        ws_connections: Option<u32>,
        /// socket.rcvbuf_bytes = sndbuf_bytes for every Switchboard server
        /// of the run (default: the server's own default; 0 = left to the
        /// kernel). The report notes it.
        #[arg(long)]
        socket_buffers: Option<usize>,
        /// Data paths for client sockets (`server.poller`) to run the raw
        /// TCP scenarios on, comma-separated (default: epoll,io_uring). The
        /// main pass runs on the server's default if listed; every other
        /// mode adds a pass of idle, unicast, fan-out, heartbeats and churn,
        /// side by side in the report's data-path section. One mode: the
        /// whole run on it, no comparison.
        #[arg(long, value_delimiter = ',', value_parser = parse_poller)]
        pollers: Vec<PollerKind>,
    },
    /// Connections that never log in, each holding an unfinished frame (raw
    /// TCP) or fragmented message (`--ws`): the server's memory growth per
    /// connection, and how many it closed (see prelogin.rs).
    Prelogin {
        /// Server address (the WebSocket port with `--ws`).
        #[arg(long, default_value = "127.0.0.1:7700")]
        addr: SocketAddr,
        /// Speak WebSocket: upgrade, then a fragmented message.
        #[arg(long)]
        ws: bool,
        /// PID of the server process.
        #[arg(long)]
        server_pid: u32,
        #[arg(long, default_value_t = 5000)]
        connections: u32,
        /// The frame length each connection claims; it sends half of it.
        #[arg(long, default_value_t = 65536)]
        frame_bytes: usize,
        /// Seconds between the last write and the measurement.
        #[arg(long, default_value_t = 2)]
        settle_s: u64,
    },
    /// Connect → LOGIN → disconnect cycles against a fresh server process:
    /// does its RSS stay flat after a warm-up? Prints JSON and a PASS/FAIL
    /// line (PASS: grew at most 2 MB, no cycle failed); exits 1 on FAIL.
    Churn {
        /// Measured cycles after the warm-up (one cycle = one connection).
        #[arg(long, default_value_t = 1_000_000)]
        cycles: u64,
        /// Cycles before the first RSS sample (the warm-up also lasts at least 25 s)
        #[arg(long, default_value_t = capacity::churn::WARMUP_CYCLES)]
        warmup: u64,
        /// Distinct user ids, drawn uniformly.
        #[arg(long, default_value_t = 200_000)]
        users: u32,
        /// Cycles a second, warm-up and measured alike (0: as fast as the
        /// host goes; the measured cycles are then held to the warm-up's rate).
        #[arg(long, default_value_t = capacity::churn::DEFAULT_RATE)]
        rate: f64,
        /// Client threads (two sockets each at most).
        #[arg(long, default_value_t = 4)]
        threads: u32,
        /// An RSS sample every this many cycles.
        #[arg(long, default_value_t = 100_000)]
        sample_every: u64,
        /// Server workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// The switchboard binary (default: next to this one).
        #[arg(long)]
        switchboard: Option<PathBuf>,
        /// Where the server's config and log go.
        #[arg(long, default_value = "target/churn")]
        out: PathBuf,
        /// Write the results as JSON to this file as well.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The capacity report's catch-up (one device fetching 10,000 stored
    /// messages) against servers that differ only in `delivery.window`,
    /// alternated round by round; prints each run and each window's median.
    CatchUp {
        /// The windows compared; ratios are to the first.
        #[arg(long, value_delimiter = ',', default_value = "64,128")]
        windows: Vec<u32>,
        /// Rounds; each starts a fresh server per window and catches up 3 times on it.
        #[arg(long, default_value_t = 4)]
        rounds: u32,
        /// Messages waiting at each catch-up.
        #[arg(long, default_value_t = 10_000)]
        messages: u32,
        /// The switchboard binary (default: next to this one).
        #[arg(long)]
        switchboard: Option<PathBuf>,
        /// Where the servers' configs, logs and stores go.
        #[arg(long, default_value = "target/catch-up")]
        out: PathBuf,
    },
    /// The backend API alone (the capacity report's API scenario): batches
    /// of pushes through `/api/v1/batch` to N connections, and single-push
    /// latency under that load. Prints JSON (the `/metrics` scrape time is
    /// measured by the capacity report's idle hold, not here).
    Api {
        /// Connections logged in to receive (the server process must stay
        /// under 20,000 descriptors: at most 19,000).
        #[arg(long, default_value_t = 4000)]
        connections: u32,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// The switchboard binary (default: next to this one).
        #[arg(long)]
        switchboard: Option<PathBuf>,
        #[arg(long, default_value = "target/capacity-api")]
        out: PathBuf,
    },
    /// Socket buffers set (4 KiB) against left to the kernel (0), each
    /// against a fresh server: idle memory per connection, and the round
    /// trip of a large message through the server (see capacity/bulk.rs).
    /// Prints a table and writes bulk.json and bulk.md to --out.
    Bulk {
        /// Payload bytes of each message (at most 16 MiB less a header).
        #[arg(long, default_value_t = 16_000_000)]
        message_bytes: usize,
        /// Round trips per setting.
        #[arg(long, default_value_t = 3)]
        round_trips: u32,
        /// Idle connections for the memory figures.
        #[arg(long, default_value_t = 4000)]
        idle_connections: u32,
        /// socket.rcvbuf_bytes = sndbuf_bytes settings to compare, in order
        /// (0 = left to the kernel).
        #[arg(long, value_delimiter = ',', default_value = "4096,0")]
        buffers: Vec<usize>,
        /// Server workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// The switchboard binary (default: next to this one).
        #[arg(long)]
        switchboard: Option<PathBuf>,
        #[arg(long, default_value = "target/bulk")]
        out: PathBuf,
    },
    /// Three Switchboard nodes on one redis-server, each its own process
    /// (the capacity report's cluster section): unicast same-node vs
    /// cross-node at the same offered rates, Redis commands and round trips
    /// per message, and a room with members on every node. Writes
    /// cluster.json and cluster.md to --out. Needs redis-server.
    Cluster {
        /// Full mode: 19,000 unicast connections (9,500 per node) and
        /// 15,000 room members. Default: quick (4,000 and 4,000; about a
        /// minute and a half).
        #[arg(long, conflicts_with = "quick")]
        full: bool,
        /// Quick mode, the default.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "target/cluster")]
        out: PathBuf,
        /// The switchboard binary (default: next to this one).
        #[arg(long)]
        switchboard: Option<PathBuf>,
        /// The nodes share a Redis Cluster of three masters (created with
        /// redis-cli --cluster create) instead of one redis-server.
        #[arg(long)]
        redis_cluster: bool,
    },
    /// The bare relay used as the unicast ceiling (see relay.rs).
    CeilingRelay {
        #[arg(long, default_value = "127.0.0.1:7899")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 2)]
        workers: usize,
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
        #[arg(long)]
        room: Option<String>,
        #[arg(long, value_enum, default_value_t = Transport::Raw)]
        transport: Transport,
        #[arg(long)]
        ws_path: Option<String>,
        #[arg(long)]
        device: Option<String>,
    },
}

impl Common {
    fn spec(&self) -> Result<FleetSpec, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut s = FleetSpec::new(exe, self.addr, self.connections);
        s.procs = self.procs;
        s.secret = self.secret.clone();
        s.user_prefix = self.user_prefix.clone();
        s.transport = self.transport;
        s.ws_path = self.ws_path.clone();
        s.device = self.device.clone();
        Ok(s)
    }
}

/// Prints the results, and writes them to `--json` if given: an error if
/// that file cannot be written (scripts read it once the run succeeded).
fn finish(common: &Common, result: &impl Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(result).expect("json");
    println!("{text}");
    if let Some(p) = &common.json {
        std::fs::write(p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

fn idle(common: Common, settle_s: u64, hold_s: u64, warmup: u32) -> Result<(), String> {
    let pid = common.server_pid;
    let rss_cold = pid.and_then(ProcStat::rss_bytes);
    if warmup > 0 {
        let mut w = common.spec()?;
        w.connections = warmup;
        w.procs = 1;
        w.user_prefix = format!("warmup-{}", common.user_prefix);
        let mut fleet = Fleet::spawn(&w).map_err(|e| e.to_string())?;
        eprintln!("idle: warm-up with {warmup} connections");
        let (ready, _, _) = fleet.wait_ready(Duration::from_secs(common.ramp_timeout_s))?;
        none_ready(ready, warmup, &common)?;
        fleet.quit();
        std::thread::sleep(Duration::from_secs(1));
    }
    let rss0 = pid.and_then(ProcStat::rss_bytes);
    let slab0 = ProcStat::slab_bytes();
    let mut fleet = Fleet::spawn(&common.spec()?).map_err(|e| e.to_string())?;
    eprintln!("idle: {} connections from {} loader processes", common.connections, fleet.len());
    let (ready, failed, ramp) = fleet.wait_ready(Duration::from_secs(common.ramp_timeout_s))?;
    none_ready(ready, common.connections, &common)?;
    std::thread::sleep(Duration::from_secs(settle_s));
    let rss1 = pid.and_then(ProcStat::rss_bytes);
    let slab1 = ProcStat::slab_bytes();
    let per_conn = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if ready > 0 => Some((b as f64 - a as f64) / ready as f64),
        _ => None,
    };
    if hold_s > 0 {
        eprintln!("  holding {ready} idle connections for {hold_s} s");
        std::thread::sleep(Duration::from_secs(hold_s));
    }
    let c = fleet.collect()?;
    fleet.quit();
    finish(
        &common,
        &IdleRun {
            scenario: "idle",
            connections: ready,
            failed,
            ramp_s: ramp.as_secs_f64(),
            connect_rate_per_s: ready as f64 / ramp.as_secs_f64(),
            server_rss_before_bytes: rss0,
            server_rss_after_bytes: rss1,
            warmup_connections: warmup,
            server_user_bytes_per_conn: per_conn(rss0, rss1),
            server_user_bytes_per_conn_cold: per_conn(rss_cold, rss1),
            host_slab_bytes_per_conn_both_ends: per_conn(slab0, slab1),
            closed_by_server: c.closed,
            pings_answered: c.pongs,
        },
    )
}

/// What `idle` prints (scripts/idle-memory.sh reads it).
#[derive(Serialize)]
struct IdleRun {
    scenario: &'static str,
    connections: u32,
    failed: u32,
    ramp_s: f64,
    connect_rate_per_s: f64,
    server_rss_before_bytes: Option<u64>,
    server_rss_after_bytes: Option<u64>,
    warmup_connections: u32,
    /// After the warm-up: one-time costs excluded.
    server_user_bytes_per_conn: Option<f64>,
    /// From the freshly started server, one-time costs included.
    server_user_bytes_per_conn_cold: Option<f64>,
    /// Both ends of every connection live on this host: the slab delta
    /// covers two sockets per connection.
    host_slab_bytes_per_conn_both_ends: Option<f64>,
    closed_by_server: u32,
    pings_answered: u64,
}

/// What `unicast` prints.
#[derive(Serialize)]
struct UnicastRun {
    scenario: &'static str,
    connections: u32,
    target_rate_per_s: u64,
    /// SENDs the schedule called for (rate × duration).
    sent: u64,
    /// Of those, SENDs a sender's socket did not take whole (overload): one
    /// it took nothing of is dropped, one it took part of closes that
    /// connection.
    blocked: u64,
    /// PUSH or INBOX frames received.
    received: u64,
    msgs_per_s: f64,
    latency: Latency,
    cpu: Option<ServerCpu>,
    /// With `--device`: INBOX frames received again, ACKs and FETCHes sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<DeviceCounts>,
}

/// What device connections did besides receiving.
#[derive(Serialize)]
struct DeviceCounts {
    duplicates: u64,
    acks: u64,
    fetches: u64,
}

/// Server CPU per message delivered, user and system.
#[derive(Serialize)]
struct ServerCpu {
    server_user_ns_per_msg: f64,
    server_sys_ns_per_msg: f64,
}

/// An error (exit 1) when not one of `asked` connections got ready: the
/// figures of such a run would be zeros and nulls.
fn none_ready(ready: u32, asked: u32, common: &Common) -> Result<(), String> {
    if ready == 0 && asked > 0 {
        return Err(format!(
            "none of the {asked} connections to {} logged in (the first error is above): nothing to measure",
            common.addr
        ));
    }
    Ok(())
}

fn unicast(common: Common, rate: u64, duration_s: u64, payload_bytes: usize) -> Result<(), String> {
    let mut fleet = Fleet::spawn(&common.spec()?).map_err(|e| e.to_string())?;
    let (ready, _failed, _) = fleet.wait_ready(Duration::from_secs(common.ramp_timeout_s))?;
    none_ready(ready, common.connections, &common)?;
    if common.device.is_none() {
        eprintln!(
            "unicast: SENDs follow the server's delivery.send_default: stored with its defaults (reliable), \
             and kept, as nothing acknowledges them; set it to \"at_most_once\" for relay figures, \
             or pass --device for stored delivery (README, capacity report)"
        );
    }
    fleet.collect()?; // reset
    let cpu0 = common.server_pid.map(ProcStat::process_cpu);
    let t0 = Instant::now();
    // Recipients among the connections that logged in.
    fleet.start_unicast(rate, duration_s * 1000, ready, payload_bytes, 0x9E37_79B9);
    let (sent, blocked) = fleet.wait_sent()?;
    std::thread::sleep(Duration::from_millis(500)); // in-flight deliveries
                                                    // The run, not the grace after it: dividing by both read
                                                    // duration / (duration + 0.5 s) of the rate delivered.
    let elapsed = t0.elapsed().saturating_sub(Duration::from_millis(500));
    let cpu1 = common.server_pid.map(ProcStat::process_cpu);
    let c = fleet.collect()?;
    fleet.quit();
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) if c.received > 0 => {
            let (user, sys) = b.since(&a);
            Some(ServerCpu {
                server_user_ns_per_msg: user / c.received as f64,
                server_sys_ns_per_msg: sys / c.received as f64,
            })
        }
        _ => None,
    };
    finish(
        &common,
        &UnicastRun {
            scenario: "unicast",
            connections: ready,
            target_rate_per_s: rate,
            sent,
            blocked,
            received: c.received,
            msgs_per_s: c.received as f64 / elapsed.as_secs_f64(),
            latency: percentiles(&c.hist),
            cpu,
            device: common.device.as_ref().map(|_| DeviceCounts {
                duplicates: c.duplicates,
                acks: c.acks,
                fetches: c.fetches,
            }),
        },
    )
}

struct CapacityArgs {
    full: bool,
    out: PathBuf,
    switchboard: Option<PathBuf>,
    tokio: Option<PathBuf>,
    no_peers: bool,
    no_nchan: bool,
    ws_only: bool,
    ws_connections: Option<u32>,
    socket_buffers: Option<usize>,
    pollers: Vec<PollerKind>,
}

/// A `server.poller` value, spelt as in the config.
fn parse_poller(s: &str) -> Result<PollerKind, String> {
    serde_json::from_value(s.into()).map_err(|_| format!("{s:?}: not a data path (epoll or io_uring)"))
}

/// The switchboard binary: `given`, or the one next to this executable.
fn switchboard_bin(given: Option<PathBuf>) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no directory for this executable")?;
    let sb = given.unwrap_or_else(|| dir.join("switchboard"));
    if !sb.exists() {
        return Err(format!("{} not found: build it first (cargo build --release -p switchboard)", sb.display()));
    }
    Ok(sb)
}

struct ChurnArgs {
    plan: capacity::churn::ChurnPlan,
    switchboard: Option<PathBuf>,
    out: PathBuf,
    json: Option<PathBuf>,
}

fn run_churn(a: ChurnArgs) -> Result<(), String> {
    let sb = switchboard_bin(a.switchboard)?;
    let r = capacity::churn::run(&sb, &a.out, &a.plan)?;
    let text = serde_json::to_string_pretty(&r).expect("json");
    println!("{text}");
    if let Some(p) = &a.json {
        std::fs::write(p, &text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    eprintln!("churn: {}", r.summary());
    if !r.pass {
        return Err("churn: FAIL".into());
    }
    Ok(())
}

fn run_bulk(plan: capacity::bulk::BulkPlan, switchboard: Option<PathBuf>, out: PathBuf) -> Result<(), String> {
    let sb = switchboard_bin(switchboard)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let r = capacity::bulk::run(&sb, &exe, &out, &plan)?;
    let json = serde_json::to_string_pretty(&r).expect("json");
    std::fs::write(out.join("bulk.json"), &json).map_err(|e| format!("bulk.json: {e}"))?;
    let md = r.markdown();
    std::fs::write(out.join("bulk.md"), &md).map_err(|e| format!("bulk.md: {e}"))?;
    println!("{md}");
    eprintln!("bulk: wrote {0}/bulk.json and {0}/bulk.md", out.display());
    Ok(())
}

fn run_api(connections: u32, workers: usize, switchboard: Option<PathBuf>, out: PathBuf) -> Result<(), String> {
    if connections > 19_000 {
        return Err("--connections: at most 19,000 (the server process holds one descriptor per connection)".into());
    }
    let sb = switchboard_bin(switchboard)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut plan = capacity::Plan::quick();
    plan.connections = connections;
    plan.workers = workers;
    let r = capacity::Runner::new(plan, out, exe, sb, None, false).api_alone()?;
    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    Ok(())
}

fn run_cluster(full: bool, redis_cluster: bool, switchboard: Option<PathBuf>, out: PathBuf) -> Result<(), String> {
    let sb = switchboard_bin(switchboard)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut plan = if full { capacity::Plan::full() } else { capacity::Plan::quick() };
    plan.redis_cluster = redis_cluster;
    let md = capacity::Runner::new(plan, out.clone(), exe, sb, None, false).cluster_alone()?;
    println!("{md}");
    eprintln!("cluster: wrote {0}/cluster.json and {0}/cluster.md", out.display());
    Ok(())
}

fn run_capacity(a: CapacityArgs) -> Result<(), String> {
    let CapacityArgs {
        full,
        out,
        switchboard,
        tokio,
        no_peers,
        no_nchan,
        ws_only,
        ws_connections,
        socket_buffers,
        pollers,
    } = a;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no directory for this executable")?.to_path_buf();
    let sb = switchboard_bin(switchboard)?;
    let tokio_bin = if no_peers || ws_only {
        None
    } else {
        let t = tokio.unwrap_or_else(|| dir.join("tokio-baseline"));
        if !t.exists() {
            return Err(format!(
                "{} not found: build it (cargo build --release -p switchboard-bench) or pass --no-peers",
                t.display()
            ));
        }
        Some(t)
    };
    let mut plan = if full { capacity::Plan::full() } else { capacity::Plan::quick() };
    plan.ws_only = ws_only;
    plan.socket_buffers = socket_buffers;
    if !pollers.is_empty() {
        plan.pollers = pollers;
    }
    if let Some(n) = ws_connections {
        plan.ws_connections = n;
    }
    let mut runner = capacity::Runner::new(plan, out.clone(), exe, sb, tokio_bin, !(no_peers || no_nchan));
    let report = runner.run()?;
    capacity::write_report(&out, &report)?;
    eprintln!("capacity: wrote {}/report.json and report.md (and the SVG plots)", out.display());
    println!("{}", std::fs::read_to_string(out.join("report.md")).unwrap_or_default());
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let r = match Cli::parse().cmd {
        Cmd::Child { addr, src_ip, first_user, count, secret, user_prefix, room, transport, ws_path, device } => {
            let args = loader::LoaderArgs {
                addr,
                src_ip,
                first_user,
                count,
                secret,
                user_prefix,
                room,
                transport,
                ws_path,
                device,
            };
            loader::run(args).map_err(|e| e.to_string())
        }
        Cmd::Idle { common, settle_s, hold_s, warmup } => idle(common, settle_s, hold_s, warmup),
        Cmd::Capacity {
            full,
            quick: _,
            out,
            switchboard,
            tokio,
            no_peers,
            no_nchan,
            ws_only,
            ws_connections,
            socket_buffers,
            pollers,
        } => run_capacity(CapacityArgs {
            full,
            out,
            switchboard,
            tokio,
            no_peers,
            no_nchan,
            ws_only,
            ws_connections,
            socket_buffers,
            pollers,
        }),
        Cmd::Churn { cycles, warmup, users, rate, threads, sample_every, workers, switchboard, out, json } => {
            let plan = capacity::churn::ChurnPlan {
                warmup,
                users,
                rate: (rate > 0.0).then_some(rate),
                threads,
                sample_every,
                workers,
                ..capacity::churn::ChurnPlan::new(cycles)
            };
            run_churn(ChurnArgs { plan, switchboard, out, json })
        }
        Cmd::CatchUp { windows, rounds, messages, switchboard, out } => switchboard_bin(switchboard).and_then(|sb| {
            if windows.is_empty() || rounds == 0 {
                return Err("catch-up: give at least one window and one round".into());
            }
            capacity::reliable::compare_windows(&sb, &out, &windows, rounds, messages).map(|_| ())
        }),
        Cmd::Api { connections, workers, switchboard, out } => run_api(connections, workers, switchboard, out),
        Cmd::Bulk { message_bytes, round_trips, idle_connections, buffers, workers, switchboard, out } => {
            let plan = capacity::bulk::BulkPlan { message_bytes, round_trips, idle_connections, buffers, workers };
            run_bulk(plan, switchboard, out)
        }
        Cmd::Cluster { full, quick: _, out, switchboard, redis_cluster } => {
            run_cluster(full, redis_cluster, switchboard, out)
        }
        Cmd::CeilingRelay { listen, workers } => relay::run(listen, workers).map_err(|e| e.to_string()),
        Cmd::Prelogin { addr, ws, server_pid, connections, frame_bytes, settle_s } => {
            prelogin::run(prelogin::Args { addr, ws, server_pid, connections, frame_bytes, settle_s }).map(|r| {
                println!("{}", serde_json::to_string_pretty(&r).expect("json"));
            })
        }
        Cmd::Unicast { common, rate, duration_s, payload_bytes } => unicast(common, rate, duration_s, payload_bytes),
    };
    if let Err(e) = r {
        eprintln!("switchboard-bench: {e}");
        std::process::exit(1);
    }
}
