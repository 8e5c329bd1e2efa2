//! The wake flag of a single-consumer mailbox: producers signal the
//! consumer (an eventfd write) only when it may be asleep, not per message.
//!
//! Owns: the `notified` flag and the orderings that guarantee no published
//! work is stranded. A producer publishes work (a queue push, a slot
//! request), then `raise`s: only the raise that flips the flag from false
//! to true signals. The consumer, woken, `rearm`s before looking for work,
//! then sleeps only if it found none and was not signalled since.
//! Must not: signal, sleep or touch the work itself; the caller does.

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

    /// Consumer side, before it looks for work: the next raise signals
    /// again.
    #[inline]
    pub(crate) fn rearm(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }
}
