//! How many reliable appends per second the store's threads take, with 1,
//! 2 and 4 shards, and what each costs in CPU: the store stage alone,
//! with no network and no workers.
//!
//! Question: the store thread is the one serial stage of reliable
//! delivery (`src/store/shards.rs`). How far does one shard go when
//! nothing else limits it, and what do more shards add, and cost?
//!
//! Workload: the capacity run's reliable unicast as the store's threads
//! see it: `USERS` users logged in as one device each, `SUBMITTERS`
//! threads (standing in for the workers) each appending to its own users
//! in turn (64-byte payloads, no client message id) as fast as the store
//! answers, at most `IN_FLIGHT` appends unanswered, waking the store
//! threads once per `TURN` requests queued (as a worker does per turn of
//! its loop); every 100 ms each submitter hands over its devices'
//! positions at the head (what a worker's tick does), so messages are
//! dropped, not written into fjall, when the hot tier resolves them. A
//! fresh disk store (`durability = "os"`) per round, `WARM_S` of warm-up,
//! then `SECONDS` measured; the configurations alternate, `ROUNDS` times.
//! CPU is the store threads' own (`schedstat`), not fjall's threads' or
//! the submitters' (which spin while `IN_FLIGHT` appends wait).
//!
//! Result (2-core VM, ext4, 2026-12-03): see the README, "Where this
//! differs from the first design" (store shards).
//!
//! Run: `cargo bench -p switchboard-bench --bench store_shards`. Data goes
//! to fresh directories under `STORE_BENCH_DIR` (default: the system's
//! temporary directory), removed at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::config::{ClusterConfig, StoreConfig, StoreKind};
use switchboard::store::{
    open_store_shards, Done, Durability, NewMessage, Request, Service, ServiceConfig, Sink, DEFAULT_DEDUP_WINDOW_MS,
};

const USERS: usize = 4000;
const SUBMITTERS: usize = 2;
const IN_FLIGHT: u64 = 8192;
const TURN: usize = 64;
const WARM_S: u64 = 2;
const SECONDS: u64 = 5;
const ROUNDS: usize = 3;
const SHARDS: [usize; 3] = [1, 2, 4];
const DEVICE: &str = "bench";

/// Counts the answers; nothing else (the runtime's sink routes them).
#[derive(Clone, Default)]
struct Count {
    appended: Arc<AtomicU64>,
    logins: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Sink<()> for Count {
    fn done(&self, _: (), result: Done) {
        let n = match result {
            Done::Appended(Ok(_)) => &self.appended,
            Done::DeviceLogin(Ok(_)) => &self.logins,
            Done::Position(Ok(())) => return,
            _ => &self.failed,
        };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// CPU time the store's threads (`sb-store-<i>`) have run so far: the
/// first field of each one's `/proc/self/task/<tid>/schedstat`.
fn store_threads_cpu() -> Duration {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("sb-store-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Duration::from_nanos(ns)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Round {
    appends_per_s: f64,
    /// The store threads' CPU per append.
    cpu_ns_per_append: f64,
}

fn round(dir: &std::path::Path, shards: usize, users: &[Arc<str>], payload: &Bytes) -> Round {
    let cfg = StoreConfig {
        kind: StoreKind::Disk,
        path: dir.to_path_buf(),
        durability: Durability::Os,
        shards,
        ..StoreConfig::default()
    };
    let stores = open_store_shards(&cfg, shards, DEFAULT_DEDUP_WINDOW_MS, &ClusterConfig::default(), 0)
        .expect("the store opens");
    assert_eq!(stores.len(), shards);
    let count = Count::default();
    let parts = stores.into_iter().map(|s| (s, count.clone())).collect();
    let service = Service::start_shards(parts, ServiceConfig::new(cfg.queue_capacity.div_ceil(shards))).unwrap();
    let submitter = service.submitter();
    for u in users {
        let login = Request::DeviceLogin { user: u.clone(), device: DEVICE.into(), client_seq: 0 };
        while submitter.try_submit((), login.clone()).is_err() {
            std::thread::yield_now();
        }
    }
    while count.logins.load(Ordering::Relaxed) < users.len() as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let submitted = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(WARM_S + SECONDS);
    let measured_from = Instant::now() + Duration::from_secs(WARM_S);
    let (mut at_start, mut cpu_at_start) = (0, Duration::ZERO);
    std::thread::scope(|scope| {
        for t in 0..SUBMITTERS {
            let mine: Vec<Arc<str>> = users.iter().skip(t).step_by(SUBMITTERS).cloned().collect();
            let (submitter, count, submitted) = (submitter.clone(), count.clone(), submitted.clone());
            scope.spawn(move || {
                let device: Arc<str> = DEVICE.into();
                let mut sent = vec![0u64; mine.len()];
                let mut next_tick = Instant::now() + Duration::from_millis(100);
                let mut i = 0usize;
                let mut msg_id = (t as u64) << 48;
                while Instant::now() < end {
                    for _ in 0..TURN {
                        if submitted.load(Ordering::Relaxed) >= count.appended.load(Ordering::Relaxed) + IN_FLIGHT {
                            break;
                        }
                        let k = i % mine.len();
                        msg_id += 1;
                        let m = NewMessage {
                            to: mine[k].clone(),
                            from: mine[(k + 1) % mine.len()].clone(),
                            msg_id,
                            ts_ms: unix_ms(),
                            payload: payload.clone(),
                            client_id: 0,
                            expires_ms: 0,
                        };
                        if submitter.try_submit_unwoken((), Request::Append(m)).is_err() {
                            break;
                        }
                        submitted.fetch_add(1, Ordering::Relaxed);
                        sent[k] += 1;
                        i += 1;
                    }
                    if Instant::now() >= next_tick {
                        next_tick += Duration::from_millis(100);
                        for (k, u) in mine.iter().enumerate() {
                            // At the head, or past it: the store clamps a
                            // position to the head.
                            let p = Request::Position { user: u.clone(), device: device.clone(), seq: sent[k] };
                            let _ = submitter.try_submit_unwoken((), p);
                        }
                    }
                    submitter.wake();
                    std::thread::yield_now();
                }
            });
        }
        std::thread::sleep(measured_from.saturating_duration_since(Instant::now()));
        at_start = count.appended.load(Ordering::Relaxed);
        cpu_at_start = store_threads_cpu();
    });
    let took = Duration::from_secs(SECONDS);
    let appended = count.appended.load(Ordering::Relaxed) - at_start;
    let spent = store_threads_cpu() - cpu_at_start;
    service.stop().expect("the store stops");
    assert_eq!(count.failed.load(Ordering::Relaxed), 0, "no request failed");
    Round {
        appends_per_s: appended as f64 / took.as_secs_f64(),
        cpu_ns_per_append: spent.as_nanos() as f64 / appended.max(1) as f64,
    }
}

fn main() {
    let base = std::env::var_os("STORE_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let root = base.join(format!("switchboard-store-shards-{}", std::process::id()));
    let users: Vec<Arc<str>> = (0..USERS).map(|i| Arc::from(format!("lad-os-u{i}"))).collect();
    let payload = Bytes::from(vec![b'x'; 64]);
    println!(
        "store threads alone, disk store (os), {USERS} device users, {SUBMITTERS} submitting threads, \
         positions every 100 ms; {SECONDS} s per round after {WARM_S} s, {ROUNDS} rounds alternated; \
         CPU = the store threads'"
    );
    let mut results: Vec<Vec<Round>> = SHARDS.iter().map(|_| Vec::new()).collect();
    for r in 0..ROUNDS {
        for (i, &shards) in SHARDS.iter().enumerate() {
            let dir = root.join(format!("r{r}-s{shards}"));
            let got = round(&dir, shards, &users, &payload);
            let _ = std::fs::remove_dir_all(&dir);
            println!(
                "  round {}: {shards} shard(s): {:.0} appends/s, {:.0} ns CPU per append",
                r + 1,
                got.appends_per_s,
                got.cpu_ns_per_append
            );
            results[i].push(got);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base_rate = median(&mut results[0].iter().map(|r| r.appends_per_s).collect());
    println!("median of the rounds:");
    for (i, &shards) in SHARDS.iter().enumerate() {
        let rate = median(&mut results[i].iter().map(|r| r.appends_per_s).collect());
        let cpu = median(&mut results[i].iter().map(|r| r.cpu_ns_per_append).collect());
        println!(
            "  {shards} shard(s): {rate:.0} appends/s ({:.2} of one shard), {cpu:.0} ns CPU per append",
            rate / base_rate
        );
    }
}
