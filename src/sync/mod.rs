//! Synchronisation primitives shared across threads, small enough to be
//! model-checked: the write slot's spin lock (`spin`), the intrusive list
//! of slots that need their owner (`requests`), the mailbox's wake flag
//! (`wake`) and a counted limit (`limit`, the server-wide room count).
//!
//! Owns: the atomics, their memory orderings and the one `UnsafeCell` of
//! these protocols, so that what the loom models check is the code that
//! runs. `tests/loom-models/` compiles exactly these files (through `#[path]`)
//! with `--cfg loom`, where the facade below swaps std's atomics, cell,
//! spin hint and yield for loom's.
//! Must not: use anything from the rest of the crate (`crate::…`) or any
//! dependency other than std (and loom under `cfg(loom)`); reach std's
//! atomics, `UnsafeCell`, `spin_loop` or `yield_now` other than through
//! `facade`, or loom could not see that access; block (these are spin and
//! lock-free protocols; a waiter yields its CPU, never parks).

pub(crate) mod limit;
pub(crate) mod requests;
pub(crate) mod spin;
pub(crate) mod wake;

/// What the primitives import instead of std's atomics, cell, spin hint
/// and yield: std's in the server, loom's under `cfg(loom)`.
pub(crate) mod facade {
    #[cfg(not(loom))]
    pub(crate) use std::{
        hint::spin_loop,
        sync::atomic::{AtomicBool, AtomicU32, AtomicUsize},
        thread::yield_now,
    };

    #[cfg(loom)]
    pub(crate) use loom::{
        hint::spin_loop,
        sync::atomic::{AtomicBool, AtomicU32, AtomicUsize},
        thread::yield_now,
    };

    #[cfg(loom)]
    pub(crate) use loom::cell::{MutPtr, UnsafeCell};

    use std::sync::atomic::Ordering;

    /// The spin lock's test-and-set: `swap(true, Acquire)`, returning
    /// whether the flag was already set.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) fn test_and_set(flag: &AtomicBool) -> bool {
        flag.swap(true, Ordering::Acquire)
    }

    /// The same under loom, except that finding the flag set does not
    /// write `true` over `true`. That write is invisible: it only reads
    /// with acquire (so it publishes nothing), and the holder's release
    /// store must follow it in the flag's modification order (a swap's
    /// write comes right after the value it read). loom does not model
    /// that last rule: it leaves the waiter's write unordered against the
    /// holder's release, lets the waiter's loads keep reading its own
    /// stale `true`, and stops with "exceeded maximum number of branches"
    /// on any lock that takes with `swap`. A failed `compare_exchange`
    /// reads the same way and writes nothing. (A `compare_exchange` in the
    /// server would cost ~1 ns more per lock than the `swap`, measured.)
    #[cfg(loom)]
    pub(crate) fn test_and_set(flag: &AtomicBool) -> bool {
        flag.compare_exchange(false, true, Ordering::Acquire, Ordering::Acquire).is_err()
    }

    #[cfg(not(loom))]
    pub(crate) use self::std_cell::{MutPtr, UnsafeCell};

    /// std's `UnsafeCell` behind loom's API (a `MutPtr` per exclusive
    /// access, which loom tracks and std compiles to a raw pointer).
    #[cfg(not(loom))]
    mod std_cell {
        /// `std::cell::UnsafeCell`, same layout (all-zero is valid when
        /// `T`'s all-zero is).
        #[repr(transparent)]
        pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

        impl<T> UnsafeCell<T> {
            #[allow(dead_code)] // only `SpinLock::new` builds one
            pub(crate) const fn new(value: T) -> UnsafeCell<T> {
                UnsafeCell(std::cell::UnsafeCell::new(value))
            }

            /// A pointer for one exclusive access (loom's name: it takes
            /// `&self`, unlike std's `get_mut`). The caller makes the
            /// access exclusive.
            pub(crate) fn get_mut(&self) -> MutPtr<T> {
                MutPtr(self.0.get())
            }
        }

        /// One exclusive access to an `UnsafeCell`'s value.
        pub(crate) struct MutPtr<T>(*mut T);

        impl<T> MutPtr<T> {
            /// Calls `f` with the raw pointer.
            pub(crate) fn with<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
                f(self.0)
            }
        }
    }
}
