//! The directory gives back what a login takes: after a warm-up, logins and
//! logouts (register, unregister) leave the heap where it was.
//!
//! Owns: a counting global allocator for this test binary (live bytes of
//! every allocation made through Rust's allocator), and the one test that
//! reads it.
//! Must not: hold a second test (the harness would run it on another thread
//! and its allocations would land in the count), or open sockets.
//!
//! Regression test for issue 9's "memory grows about 10 B per login/logout
//! cycle": papaya 0.2.5 never advanced an incremental resize from `compute`
//! (the only way the directory writes), so every resize triggered by the
//! tombstones of removed users left the previous table alive in a chain.
//! Here a directory sized for 1,000 users (a table of 2,048 slots, ~18 KB)
//! fills every couple of thousand logins; before the fix this test saw
//! 100,000 logins leave 909,832 bytes live (9.10 per login).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use switchboard::directory::Directory;
use switchboard::ids::{ConnId, WorkerId};

/// Forwards to the system allocator, keeping a count of live bytes.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call forwards to `System` with the same arguments; the
// counter is only arithmetic on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Logs in and out `count` sessions starting at `first`: every fifth user
/// has a second device for a while (the several-devices path), and user
/// names repeat over a pool of 5,000. Every 1,000 sessions the offline
/// users are swept, as the server's sweeper thread does (with no linger
/// here: the test does not wait for the clock), so removals, tombstones and
/// table rebuilds all happen.
fn churn(d: &Directory, first: u32, count: u32) {
    for i in first..first + count {
        if i % 1_000 == 0 {
            d.sweep(0);
        }
        let user = format!("user{}", i.wrapping_mul(2_654_435_761) % 5_000);
        let a = ConnId::new(WorkerId(0), i % 50_000, 1);
        let name = d.register(&user, a).expect("under the per-user limit");
        if i % 5 == 0 {
            let b = ConnId::new(WorkerId(1), i % 50_000, 1);
            d.register(&user, b).expect("under the per-user limit");
            assert!(d.unregister(&name, b));
        }
        assert!(d.unregister(&name, a));
    }
}

#[test]
fn login_logout_churn_leaves_the_heap_where_it_was() {
    let d = Directory::with_capacity(16, 1_000);
    // Warm-up: the table reaches its working size and has been rebuilt a
    // few times (each rebuild clears the tombstones of removed users).
    churn(&d, 0, 20_000);
    d.sweep(0);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    churn(&d, 20_000, 100_000);
    d.sweep(0);
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    assert_eq!(d.user_count(), 0);
    let growth = after - before;
    // One table of this directory is ~18 KB and reclamation is deferred by
    // a batch or so: a bounded directory stays well inside 64 KiB.
    assert!(
        growth < 64 * 1024,
        "100,000 logins and logouts left {growth} more bytes live ({:.2} per login)",
        growth as f64 / 100_000.0
    );
}
