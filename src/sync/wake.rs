//! The wake flag of a single-consumer mailbox: producers signal the
//! consumer (an eventfd write) only when it may be asleep, not per message.
//!
//! Owns: the `notified` flag and the orderings that guarantee no published
//! work is stranded. A producer publishes work (a queue push, a slot
//! request), then `raise`s: only the raise that flips the flag from false
//! to true signals. The consumer, woken, `rearm`s before looking for work,
//! then sleeps only if it found none and was not signalled since.
//! Must not: signal, sleep or touch the work itself; the caller does.
//!
//! Why both sides are swaps with acquire-release, and why that suffices
//! (checked by the loom model `mailbox_wake_strands_nothing`): every raise
//! and rearm is a read-modify-write of the one flag, so each reads the one
//! just before it in the flag's modification order. A raise that reads
//! `true` (and does not signal) comes after a raise that signalled, with no
//! rearm between them. The consumer, woken by that signal, rearms later
//! than the signalling raise. If that rearm also comes after the silent
//! raise, it reads from it or from a later raise, all in one release
//! sequence, so it acquires the work published before each of them and
//! its look for work finds it. If it comes before, the silent raise read a
//! `true` set after the rearm, by a raise that signalled again: the same
//! argument applies to that signal. With a plain `store(false)` as the rearm (as
//! this code once had, `SeqCst` like the queue's loads, with an `AcqRel`
//! swap) the chain breaks: the C++20 model lets a raise read a `true`
//! older than the store while the consumer's look misses the push,
//! and loom finds exactly that command stranded.

use std::sync::atomic::Ordering;

use super::facade::AtomicBool;

/// The mailbox's "a signal is pending" flag (all-zero: none pending).
pub(crate) struct WakeFlag {
    notified: AtomicBool,
}

impl WakeFlag {
    pub(crate) fn new() -> WakeFlag {
        WakeFlag { notified: AtomicBool::new(false) }
    }

    /// Producer side, after publishing work: whether this caller must
    /// signal the consumer (it set the flag; until the next `rearm`, every
    /// other raise returns false).
    #[inline]
    #[must_use = "the caller that raised the flag must signal the consumer"]
    pub(crate) fn raise(&self) -> bool {
        !self.notified.swap(true, Ordering::AcqRel)
    }

    /// Consumer side: whether a producer raised the flag since the last
    /// `rearm` (its signal may not have been seen yet).
    #[inline]
    pub(crate) fn pending(&self) -> bool {
        self.notified.load(Ordering::Acquire)
    }

    /// Consumer side, before it looks for work: the next raise signals
    /// again. A swap, not a store (see the module doc).
    #[inline]
    pub(crate) fn rearm(&self) {
        self.notified.swap(false, Ordering::AcqRel);
    }
}
