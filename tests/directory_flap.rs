//! A user who logs in and out again and again never makes the directory
//! rebuild its table.
//!
//! Owns: a global allocator for this test binary that records the largest
//! single allocation made while armed, and the one test that reads it.
//! Must not: hold a second test (the harness would run it on another thread
//! and its allocations would land in the record), or open sockets.
//!
//! Regression test for the flapping user found while fixing issue 9's
//! login leak: removing a user at its last logout left a tombstone in its
//! probe sequence, a new login never reused one, and every ~5·log2(slots)
//! logins of that one user copied its whole table (a fresh table is one
//! allocation of ~9 bytes per slot, far above anything else a login
//! allocates). Measured in `benches/benches/directory_churn.rs` with 500,000 users
//! online: 2.09 ms per login on average, 0.2 s pauses.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use switchboard::directory::Directory;
use switchboard::ids::{ConnId, WorkerId};

/// Forwards to the system allocator; while `ARMED`, keeps the largest size
/// asked for.
struct Largest;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` with the same arguments; the
// record is only arithmetic on the side.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Largest = Largest;

#[test]
fn a_flapping_user_never_rebuilds_the_table() {
    // Sized for 100,000 users, 50,000 of them online: 64 shards of 2,048
    // slots; rebuilding one allocates a table of about 18 KB at once, where
    // a login allocates at most a few hundred bytes at a time.
    let d = Directory::with_capacity(16, 100_000);
    for i in 0..50_000u32 {
        d.register(&format!("online{i}"), ConnId::new(WorkerId(0), i, 1)).unwrap();
    }
    let conn = ConnId::new(WorkerId(1), 7, 1);
    let name = d.register("flapper", conn).unwrap();
    assert!(d.unregister(&name, conn));
    ARMED.store(true, Ordering::Relaxed);
    // Tens of times the logins that used to bring a rebuild.
    for _ in 0..20_000 {
        let name = d.register("flapper", conn).unwrap();
        assert!(d.unregister(&name, conn));
    }
    ARMED.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 4096, "a login allocated {largest} bytes at once: a table was rebuilt");
    assert_eq!(d.user_count(), 50_000);
    assert!(!d.is_online("flapper"));
}
