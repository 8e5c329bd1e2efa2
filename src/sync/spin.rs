//! A test-and-set spin lock, for state held across a few instructions or
//! one non-blocking syscall (a connection's write slot).
//!
//! Owns: mutual exclusion over one `T`, and the ordering that makes each
//! holder's writes visible to the next (acquire on taking, release on
//! giving back). Also keeps an unlocked `side` value in the same struct,
//! so a slot's list link shares the lock's padding instead of adding 8
//! bytes to every slot.
//! Must not: park, queue waiters or allocate. Taking the lock is one
//! `swap` (`facade::test_and_set`); a waiter spins on a plain load and,
//! after a few spins, yields its CPU in case the holder was preempted
//! (two cores, many threads).

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;

use super::facade::{spin_loop, test_and_set, yield_now, AtomicBool, MutPtr, UnsafeCell};

/// Spins on a held lock before each wait turns into a yield.
const SPINS_BEFORE_YIELD: u32 = 64;

/// A spin lock over a `T`, with a `side` value that is not under it (it
/// has its own synchronisation, e.g. atomics).
///
/// All-zero is a valid, unlocked `SpinLock` when all-zero is a valid `T`
/// and `S` (the write slots are allocated zeroed).
pub(crate) struct SpinLock<T, S = ()> {
    locked: AtomicBool,
    side: S,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through a `SpinGuard`, which exists for
// one thread at a time (the `locked` swap), so sharing the lock hands `T`
// from thread to thread (`T: Send`) but never shares it; `side` is shared
// as is (`S: Sync`).
unsafe impl<T: Send, S: Sync> Sync for SpinLock<T, S> {}

impl<T, S> SpinLock<T, S> {
    // The server's locks (the write slots) are allocated zeroed; the loom
    // models build them one by one.
    #[allow(dead_code)]
    pub(crate) fn new(value: T, side: S) -> SpinLock<T, S> {
        SpinLock { locked: AtomicBool::new(false), side, value: UnsafeCell::new(value) }
    }

    /// The value kept beside the lock (not protected by it).
    pub(crate) fn side(&self) -> &S {
        &self.side
    }

    /// Takes the lock, spinning (then yielding) while another thread holds
    /// it.
    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, T, S> {
        let mut spins = 0u32;
        loop {
            if !test_and_set(&self.locked) {
                return SpinGuard { lock: self, value: ManuallyDrop::new(self.value.get_mut()) };
            }
            while self.locked.load(Ordering::Relaxed) {
                spins += 1;
                if spins < SPINS_BEFORE_YIELD {
                    spin_loop();
                } else {
                    yield_now();
                }
            }
        }
    }
}

/// Holds a `SpinLock`; gives it back on drop.
pub(crate) struct SpinGuard<'a, T, S = ()> {
    lock: &'a SpinLock<T, S>,
    /// The access to the value, which ends (for loom's tracking) before
    /// the lock is given back.
    value: ManuallyDrop<MutPtr<T>>,
}

impl<T, S> Deref for SpinGuard<'_, T, S> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so no other reference to the
        // value exists outside this guard; the reference borrows the guard.
        self.value.with(|p| unsafe { &*p })
    }
}

impl<T, S> DerefMut for SpinGuard<'_, T, S> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock and is borrowed mutably, so this
        // is the only reference to the value.
        self.value.with(|p| unsafe { &mut *p })
    }
}

impl<T, S> Drop for SpinGuard<'_, T, S> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: dropped once, here; `value` is not used after this.
        unsafe { ManuallyDrop::drop(&mut self.value) };
        self.lock.locked.store(false, Ordering::Release);
    }
}
