//! What the disk store's thread spends per reliable message on the `os`
//! hot path, with no network, no workers and no other thread in the way.
//!
//! Question: in reliable unicast the store thread is the one part that
//! at-most-once delivery does not have. Per message it appends (seq,
//! the hot log, the message kept in RAM), later resolves the message
//! (dropped once every device acknowledged it, written into fjall if not)
//! and writes the device positions the workers hand over. How many
//! nanoseconds of one core is that, split by kind of work?
//!
//! Workload: the capacity run's reliable unicast, replayed on a virtual
//! clock: `USERS` users of one device each, `RATE` appends per second
//! (random recipients, 64-byte payloads, no client message id), one
//! `sync` per `BATCH` appends (the batches the store thread sees at that
//! rate), and once a second every device's position moves to what it had
//! received until a second before (the worker's tick, 100 ms of ACK delay
//! and transit rounded up), so that a message is dropped, not written to
//! fjall, when the hot tier resolves it (two seconds after its append,
//! `src/store/disk.rs`). `SECONDS` of virtual time after `WARM_S` of
//! warm-up. Durability `os`: `sync` is a `write` to the page cache.
//!
//! Result (2-core VM, ext4, 2026-12-02; three runs over an hour, the best
//! round of each): 1,892 / 2,244 / 1,916 ns per message, of which appends
//! (with the resolutions they carry) 1,180 / 1,413 / 1,149, positions
//! 330 / 391 / 357 (3.3–3.9 µs per position written) and syncs 382 / 440
//! / 410; every round of the three read 1,892–2,764. In the server at 30,000 msgs/s the
//! store thread takes about 7,500 ns of CPU per message (22–26% of a core,
//! `/proc` thread times): the rest is its queue, answers and routing, and
//! the cache misses of a thread that shares 2 cores with the workers and
//! loaders (`perf record` of that thread: the same functions, each
//! slower).
//!
//! 2026-12-03, the hot users in slots (`src/store/disk.rs`, `Hot`) against
//! the build before, five runs of each alternated, best round of each:
//! 886–1,065 ns per message against 1,112–1,326 (this day's host read
//! lower than the one above for both); appends with their resolutions 558
//! and 558 against 753 and 853 in the two pairs whose split was kept.
//!
//! The figures above ran on glibc's malloc: the bench had no global
//! allocator until 2026-12-04, the server has mimalloc. On mimalloc,
//! three pairs alternated, best round of each: 884 / 736 / 878 ns per
//! message with hot messages dropped at their resolution (c5b2574), 710
//! / 843 / 1,014 with them dropped when the position that acknowledges
//! them is written (654a48a): appends 341–500 against 244–405 ns,
//! positions 178–257 against 261–356 (the drops moved there). On glibc
//! the same pair read 1,090–1,355 against 1,431–1,630, most of the
//! difference in glibc's `malloc_consolidate` and `_int_malloc`.
//!
//! Run: `cargo bench -p switchboard-bench --bench store_hot`. Prints ns
//! per message for appends (with the resolutions they carry), positions
//! and syncs, best of `ROUNDS` rounds (a round is a fresh store); run two
//! builds one after the other to compare them. Data goes to a fresh
//! directory under `STORE_BENCH_DIR` (default: the system's temporary
//! directory), removed at the end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::store::{DiskStore, Durability, NewMessage, Store, StoreLimits};

// The server's allocator: the store's work is mostly small allocations
// and frees, and glibc's malloc costs them differently.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: usize = 4000;
const RATE: u64 = 40_000;
const BATCH: u64 = 8;
const SECONDS: u64 = 8;
const WARM_S: u64 = 3;
const ROUNDS: usize = 3;
const DEVICE: &str = "bench";

/// Time spent per kind of work, over the measured seconds.
#[derive(Default)]
struct Spent {
    append: Duration,
    position: Duration,
    sync: Duration,
    messages: u64,
    positions: u64,
}

fn round(dir: &std::path::Path, users: &[Arc<str>], payload: &Bytes) -> Spent {
    let mut store = DiskStore::open(dir, Durability::Os, StoreLimits::default()).expect("store opens");
    for u in users {
        store.device_login(u, DEVICE, 0, 0).expect("login");
    }
    // received[u]: seqs given to user u, by virtual second.
    let mut heads = vec![0u64; users.len()];
    let mut head_at_second: Vec<u64> = vec![0; users.len()];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut spent = Spent::default();
    let per_ms = RATE / 1000;
    let start_ms = 1_000_000u64;
    for ms in 0..(WARM_S + SECONDS) * 1000 {
        let now_ms = start_ms + ms;
        let measured = ms >= WARM_S * 1000;
        if ms % 1000 == 0 {
            // The tick: each device acknowledged what it had a second ago.
            let t = Instant::now();
            let mut n = 0;
            for (i, u) in users.iter().enumerate() {
                if head_at_second[i] > 0 {
                    store.set_position(u, DEVICE, head_at_second[i], now_ms).expect("position");
                    n += 1;
                }
            }
            head_at_second.copy_from_slice(&heads);
            if measured {
                spent.position += t.elapsed();
                spent.positions += n;
            }
        }
        for k in 0..per_ms {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let to = (rng % users.len() as u64) as usize;
            let m = NewMessage {
                to: users[to].clone(),
                from: users[(to + 1) % users.len()].clone(),
                msg_id: rng,
                ts_ms: now_ms,
                payload: payload.clone(),
                client_id: 0,
                expires_ms: 0,
            };
            let t = Instant::now();
            let seq = match store.append(&m, now_ms).expect("append") {
                switchboard::store::Appended::New { seq } => seq,
                other => panic!("unexpected {other:?}"),
            };
            let a = t.elapsed();
            heads[to] = seq;
            let mut s = Duration::ZERO;
            if (k + 1) % BATCH == 0 {
                let t = Instant::now();
                store.sync().expect("sync");
                s = t.elapsed();
            }
            if measured {
                spent.append += a;
                spent.sync += s;
                spent.messages += 1;
            }
        }
    }
    spent
}

fn main() {
    let base = std::env::var_os("STORE_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let users: Vec<Arc<str>> = (0..USERS).map(|i| Arc::from(format!("lad-os-u{i}"))).collect();
    let payload = Bytes::from(vec![b'x'; 64]);
    println!(
        "disk store, os, {USERS} users, {RATE} appends/s on a virtual clock, sync every {BATCH}, \
         positions every second; ns per message (best of {ROUNDS} rounds of {SECONDS} s)"
    );
    let mut best: Option<f64> = None;
    for r in 0..ROUNDS {
        let dir = base.join(format!("switchboard-store-hot-{}-{r}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = round(&dir, &users, &payload);
        let _ = std::fs::remove_dir_all(&dir);
        let per = |d: Duration| d.as_nanos() as f64 / s.messages as f64;
        let total = per(s.append) + per(s.position) + per(s.sync);
        println!(
            "round {r}: {total:.0} ns/msg = append {:.0} + positions {:.0} ({} written, {:.0} ns each) + sync {:.0}",
            per(s.append),
            per(s.position),
            s.positions,
            s.position.as_nanos() as f64 / s.positions.max(1) as f64,
            per(s.sync)
        );
        if best.is_none_or(|b| total < b) {
            best = Some(total);
        }
    }
    if let Some(total) = best {
        println!("best: {total:.0} ns per message");
    }
}
