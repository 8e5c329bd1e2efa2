//! A count with a limit that concurrent takers cannot pass (the server's
//! room count against `rooms.max_rooms`).
//!
//! Owns: the count. A place is reserved by one compare-and-swap that
//! checks the limit and counts in one step; checking and counting in two
//! steps let concurrent creators pass the limit together.
//! Must not: order other memory (the count publishes nothing; what it
//! counts has its own locks), or go below zero.

use std::sync::atomic::Ordering;

use super::facade::AtomicUsize;

/// A count of places taken (all-zero: none).
pub(crate) struct CountLimit {
    taken: AtomicUsize,
}

impl CountLimit {
    pub(crate) fn new() -> CountLimit {
        CountLimit { taken: AtomicUsize::new(0) }
    }

    /// Takes a place if fewer than `max` are taken; false otherwise.
    pub(crate) fn try_take(&self, max: usize) -> bool {
        let mut n = self.taken.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return false;
            }
            match self.taken.compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
    }

    /// Gives back a place taken by `try_take`.
    pub(crate) fn give_back(&self) {
        let before = self.taken.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(before > 0, "a place given back that was never taken");
    }

    /// Places taken now.
    pub(crate) fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }
}
