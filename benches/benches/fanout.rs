//! Fan-out benchmark: how close does a room publish come to the kernel's
//! floor, and what does our own code add on top?
//!
//! Why these sizes: 15,000 members is the largest room that fits, with its
//! loaders, under this machine's 20,000 descriptors per process (the server
//! runs in this process; the members in loader processes). A 64-byte
//! payload makes the per-send kernel cost dominate, which is the case the
//! ceiling is about.
//!
//! In one run, over the same member sockets:
//! 1. **Send ceiling**: each worker writes the message to each of its
//!    members with a plain blocking `send` loop (`Handle::bench_send_ceiling`).
//! 2. **Single-message fan-out**: `publish_to_room`, one message at a time;
//!    time from the call until the last member has it (p50/p99 over
//!    repeats), and server CPU per delivery (worker threads only, user and
//!    system split).
//! 3. **Sustained rate above the ceiling**: publishes at a rate whose
//!    deliveries would exceed the ceiling if sent one per syscall; with
//!    coalescing several messages share one send. Reports deliveries/s and
//!    publish→receive latency.
//!
//! Run: `cargo bench -p switchboard-bench --bench fanout` (env: FANOUT_MEMBERS, FANOUT_WORKERS,
//! FANOUT_REPEATS, FANOUT_SUSTAIN_S, FANOUT_SUSTAIN_FACTOR = offered
//! deliveries as a multiple of the ceiling, default 6;
//! FANOUT_SOCKET_BUFFERS = `socket.rcvbuf_bytes` and `sndbuf_bytes`;
//! FANOUT_POLLER = `server.poller`, epoll or io_uring;
//! FANOUT_BATCH_SENDS = `server.batch_sends`, 1 (default) or 0;
//! FANOUT_PERF, below). Results also go to `target/fanout.json`.
//!
//! CPU figures are for the worker threads only: the scheduler's nanosecond
//! run time, split into user and system by the kernel's tick samples, or
//! with FANOUT_PERF=1 by `perf` samples of those threads (`cpu-clock`,
//! 2,000 per second of their run time; `perf` must be on the PATH and
//! allowed to sample them). The report names the method and the samples
//! behind each split, and each window's recording stays in
//! `target/fanout-perf/{ceiling,single,sustained}/perf.data` for
//! `perf report -i`. Either way the user figure is sampled: compare the
//! single-message figure with the send ceiling's of the same run (see
//! `loadgen/perfsplit.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::config::Config;
use switchboard::Server;
use switchboard_bench::loadgen::perfsplit::{CpuSplit, CpuWindow};
use switchboard_bench::loadgen::{percentiles, timed_payload, Collected, Fleet, FleetSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROOM: &str = "bench";
const PAYLOAD: usize = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn quantile(mut v: Vec<u64>, q: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Completion time (µs) of each publish whose sequence number is in
/// `seqs`: when its last member received it. Panics if a member missed one.
fn completions(c: &Collected, seqs: std::ops::Range<u32>, members: u64) -> Vec<u64> {
    seqs.map(|s| {
        let (n, max_us) = c.per_seq.get(&s).copied().unwrap_or((0, 0));
        assert_eq!(n, members, "message {s} reached {n} of {members} members");
        max_us
    })
    .collect()
}

/// How a window split user from system time, with the samples behind it.
fn split_json(w: &CpuSplit) -> serde_json::Value {
    json!({
        "method": w.method(),
        "user_kernel_samples": w.samples.map(|s| [s.user, s.kernel]),
        "sched_run_ms": w.sched_ns / 1e6,
        "why_not_perf": w.perf_error,
    })
}

fn main() {
    let members: u32 = env_or("FANOUT_MEMBERS", 15_000);
    let workers: usize = env_or("FANOUT_WORKERS", 2);
    let repeats: u32 = env_or("FANOUT_REPEATS", 20);
    let sustain_s: u64 = env_or("FANOUT_SUSTAIN_S", 5);
    let factor: f64 = env_or("FANOUT_SUSTAIN_FACTOR", 6.0);
    let perf = env_or("FANOUT_PERF", 0) != 0;
    let window = |name: &str| {
        let dir = PathBuf::from("target/fanout-perf").join(name);
        CpuWindow::open("sb-worker", perf.then_some(dir.as_path()))
    };

    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.websocket.listen = String::new();
    cfg.server.workers = workers;
    cfg.server.max_connections = members as usize + 1000;
    // Room messages are never stored: an in-memory inbox store, so the
    // bench writes nothing into the source tree (the default disk store
    // would open `switchboard-data` in the working directory, benches/).
    cfg.store.kind = switchboard::config::StoreKind::Memory;
    // 0 (the default): the kernel sizes socket buffers; e.g. 4096 to compare
    // with builds from before that default.
    let buffers: usize = env_or("FANOUT_SOCKET_BUFFERS", cfg.socket.rcvbuf_bytes);
    cfg.socket.rcvbuf_bytes = buffers;
    cfg.socket.sndbuf_bytes = buffers;
    // FANOUT_POLLER=io_uring: the other data path (`server.poller`).
    if let Ok(p) = std::env::var("FANOUT_POLLER") {
        cfg.server.poller = match p.as_str() {
            "epoll" => switchboard::config::PollerKind::Epoll,
            "io_uring" => switchboard::config::PollerKind::IoUring,
            other => panic!("FANOUT_POLLER={other}: epoll or io_uring"),
        };
    }
    // FANOUT_BATCH_SENDS=0: the owner's writes one sendmsg each.
    if let Ok(b) = std::env::var("FANOUT_BATCH_SENDS") {
        cfg.server.batch_sends = match b.as_str() {
            "1" => true,
            "0" => false,
            other => panic!("FANOUT_BATCH_SENDS={other}: 1 or 0"),
        };
    }
    let (poller, batch_sends) = (cfg.server.poller, cfg.server.batch_sends);
    let server = Server::builder().config(cfg).start().expect("server starts");
    let h = server.handle();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_switchboard-bench"));
    let mut spec = FleetSpec::new(exe, server.local_addr(), members);
    spec.room = Some(ROOM.into());
    spec.src_base = 60;
    let mut fleet = Fleet::spawn(&spec).expect("loaders start");
    eprintln!(
        "fanout: {members} members on {workers} workers ({poller:?}, batch_sends {batch_sends}), {} loader processes",
        fleet.len()
    );
    let (ready, failed, _) = fleet.wait_ready(Duration::from_secs(180)).expect("members join");
    assert_eq!((ready, failed), (members, 0));
    assert_eq!(h.room_size(ROOM), members as u64);
    let _ = fleet.collect();
    let settle = Duration::from_millis(200);

    // 1. The kernel's floor: plain blocking sends over the same sockets.
    let cpu_c = window("ceiling");
    let mut loop_rates = Vec::new();
    for r in 0..repeats {
        let samples = h.bench_send_ceiling(ROOM, &timed_payload(r, PAYLOAD)).expect("ceiling");
        let sends: usize = samples.iter().map(|s| s.sends).sum();
        assert_eq!(sends, members as usize);
        // Per worker core: sends per second of each worker's own loop.
        let per_core: Vec<f64> = samples.iter().map(|s| s.sends as f64 / s.elapsed.as_secs_f64()).collect();
        loop_rates.push(per_core.iter().sum::<f64>() / per_core.len() as f64);
        std::thread::sleep(settle);
    }
    let cpu_c = cpu_c.close();
    let ceiling = fleet.collect().expect("collect");
    let ceiling_done = completions(&ceiling, 0..repeats, members as u64);
    let ceiling_per_core = median(loop_rates);

    // 2. Single-message fan-out. Each publish has finished before the next
    //    (twice the ceiling's slowest completion), so every delivery is a
    //    send of its own and the last one is in before the collection.
    let settle = settle.max(Duration::from_micros(2 * quantile(ceiling_done.clone(), 0.99)));
    let cpu_single = window("single");
    let base = 1_000;
    for r in 0..repeats {
        h.publish_to_room(ROOM, timed_payload(base + r, PAYLOAD)).expect("publish");
        std::thread::sleep(settle);
    }
    let cpu_single = cpu_single.close();
    let single = fleet.collect().expect("collect");
    let single_done = completions(&single, base..base + repeats, members as u64);
    let single_deliveries = (repeats * members) as f64;

    // 3. Sustained: publish at `factor` times the rate the ceiling could
    //    deliver one message per send.
    let ceiling_total = ceiling_per_core * workers.min(2) as f64;
    let rate = ((factor * ceiling_total / members as f64).ceil() as u64).max(1);
    let total_msgs = (rate * sustain_s) as u32;
    let base = 100_000;
    let cpu_sustained = window("sustained");
    let t0 = Instant::now();
    for i in 0..total_msgs {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        while h.publish_to_room(ROOM, timed_payload(base + i, PAYLOAD)).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let publishing = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let cpu_sustained = cpu_sustained.close();
    let sustained = fleet.collect().expect("collect");
    let sustained_done = completions(&sustained, base..base + total_msgs, members as u64);
    // Deliveries over the window from the first publish to the last arrival.
    let last_arrival_s = publishing.as_secs_f64().max(
        (0..total_msgs).map(|i| i as f64 / rate as f64 + sustained_done[i as usize] as f64 / 1e6).fold(0.0, f64::max),
    );
    let sustained_rate = sustained.received as f64 / last_arrival_s;
    let stats = h.stats();
    fleet.quit();
    drop(server);

    let single_p50 = quantile(single_done.clone(), 0.5);
    let ceiling_p50 = quantile(ceiling_done.clone(), 0.5);
    let result = json!({
        "question": "room fan-out vs the kernel's send ceiling over the same sockets",
        "members": members,
        "workers": workers,
        "poller": format!("{poller:?}"),
        "batch_sends": batch_sends,
        "payload_bytes": PAYLOAD,
        "cpu_split": {
            "send_ceiling": split_json(&cpu_c),
            "single_message": split_json(&cpu_single),
            "sustained": split_json(&cpu_sustained),
        },
        "send_ceiling": {
            "sends_per_s_per_core": ceiling_per_core,
            "user_ns_per_send": cpu_c.user_ns / (repeats * members) as f64,
            "sys_ns_per_send": cpu_c.sys_ns / (repeats * members) as f64,
            "completion_p50_ms": ceiling_p50 as f64 / 1e3,
            "completion_p99_ms": quantile(ceiling_done, 0.99) as f64 / 1e3,
        },
        "single_message": {
            "completion_p50_ms": single_p50 as f64 / 1e3,
            "completion_p99_ms": quantile(single_done, 0.99) as f64 / 1e3,
            "deliveries_per_s": members as f64 / (single_p50 as f64 / 1e6),
            "fraction_of_ceiling": ceiling_p50 as f64 / single_p50 as f64,
            "server_user_ns_per_delivery": cpu_single.user_ns / single_deliveries,
            "server_sys_ns_per_delivery": cpu_single.sys_ns / single_deliveries,
        },
        "sustained": {
            "publish_rate_per_s": rate,
            "messages": total_msgs,
            "deliveries": sustained.received,
            "deliveries_per_s": sustained_rate,
            "vs_ceiling": sustained_rate / ceiling_total,
            "latency": percentiles(&sustained.hist),
            "completion_p50_ms": quantile(sustained_done.clone(), 0.5) as f64 / 1e3,
            "completion_p99_ms": quantile(sustained_done.clone(), 0.99) as f64 / 1e3,
            "server_user_ns_per_delivery": cpu_sustained.user_ns / sustained.received as f64,
            "server_sys_ns_per_delivery": cpu_sustained.sys_ns / sustained.received as f64,
            "sendmsg_calls": stats.writes,
        },
    });
    let text = serde_json::to_string_pretty(&result).unwrap();
    println!("{text}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/fanout.json", &text);
}
