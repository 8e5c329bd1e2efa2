//! What does a login + logout cost the user directory over a long run, and
//! does the heap stay where it was?
//!
//! Question: per login (register, then unregister), the mean and worst
//! time, how many single logins took over 1 ms (a login that triggers the
//! table's rebuild pays for the whole rebuild: removed users leave
//! tombstones, a new login never reuses one, and a table full of them is
//! copied to a fresh one), and the live heap bytes left behind per login.
//! Two populations: users drawn from a million ids (a crowd reconnecting),
//! and one user logging in and out again and again (a flapping client: its
//! logins fill its own probe sequence with tombstones, so the table is
//! rebuilt every ~5·log2(slots) of them).
//! Sizes: the table of a server sized for this host (19,920 connections,
//! 10,000 online), and one sized for a million connections with 500,000
//! online, where a rebuild copies half a million entries.
//!
//! Run: `cargo bench -p switchboard-bench --bench directory_churn`. Plain timing (no criterion):
//! the worst case is the point, and it is one operation in a million.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use switchboard::directory::Directory;
use switchboard::ids::{ConnId, WorkerId};

/// mimalloc (as in the server) with a count of live bytes on the side.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call forwards to mimalloc with the same arguments.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        mimalloc::MiMalloc.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A directory with `online` users logged in.
fn populated(capacity: usize, online: u32) -> Directory {
    let d = Directory::with_capacity(16, capacity);
    for i in 0..online {
        d.register(&format!("online{i}"), ConnId::new(WorkerId(0), i, 1)).unwrap();
    }
    d
}

/// Runs `logins` logins + logouts of `user(i)` after a warm-up of a tenth
/// as many, and prints the figures.
fn run(label: &str, d: &Directory, logins: u32, user: impl Fn(u32) -> String) {
    let conn = |i: u32| ConnId::new(WorkerId(1), i % 1_000_000, 1);
    // The server's sweeper removes offline users once a second, after a
    // linger; here every 1,000 logins and with no linger (the earliest
    // removals, so the most tombstones), on this thread: its time counts.
    let once = |i: u32| {
        if i.is_multiple_of(1_000) {
            d.sweep(0);
        }
        let name = d.register(&user(i), conn(i)).unwrap();
        assert!(d.unregister(&name, conn(i)));
    };
    for i in 0..logins / 10 {
        once(i);
    }
    let live0 = LIVE_BYTES.load(Ordering::Relaxed);
    let (mut worst, mut over_1ms) = (Duration::ZERO, 0u32);
    let t0 = Instant::now();
    for i in logins / 10..logins / 10 + logins {
        let t = Instant::now();
        once(i);
        let e = t.elapsed();
        worst = worst.max(e);
        over_1ms += u32::from(e > Duration::from_millis(1));
    }
    let mean_ns = t0.elapsed().as_nanos() as f64 / logins as f64;
    let grown = LIVE_BYTES.load(Ordering::Relaxed) - live0;
    println!(
        "{label}: {logins} logins: mean {:.2} µs, worst {:.2} ms, {over_1ms} over 1 ms; live heap {grown:+} bytes ({:+.2} per login)",
        mean_ns / 1e3,
        worst.as_secs_f64() * 1e3,
        grown as f64 / logins as f64
    );
}

fn main() {
    let crowd = |i: u32| format!("user{}", i.wrapping_mul(2_654_435_761) % 1_000_000);
    let flapper = |_| "flapper".to_string();
    let d = populated(19_920, 10_000);
    run("sized for 19,920, 10,000 online, crowd of 1M ids", &d, 1_000_000, crowd);
    let d = populated(19_920, 10_000);
    run("sized for 19,920, 10,000 online, one user flapping", &d, 100_000, flapper);
    let d = populated(1_000_000, 500_000);
    run("sized for 1M, 500,000 online, crowd of 1M ids", &d, 3_000_000, crowd);
    let d = populated(1_000_000, 500_000);
    run("sized for 1M, 500,000 online, one user flapping", &d, 100_000, flapper);
}
