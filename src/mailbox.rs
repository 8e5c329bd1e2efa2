//! A worker's mailbox: a bounded lock-free queue and an eventfd wake.
//!
//! Owns: handing commands from any thread to one worker, and waking that
//! worker only when it may be asleep.
//! Must not: block, grow, or wake a worker per message. A full queue is
//! `Err(Full)` to the producer; the producer decides (retry, drop, report).
//!
//! Protocol (`sync::wake`, model-checked by `tests/loom-models`): a producer
//! pushes, then writes the eventfd only if it flipped `notified` from false
//! to true. The worker, woken by the eventfd, clears `notified` (a swap)
//! *before* looking at the queue, so a push that lands after that look
//! either was seen by it or writes the eventfd again. A busy worker
//! therefore costs its producers one atomic swap per message, not a
//! syscall.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use thiserror::Error;

use crate::sync::wake::WakeFlag;

/// The mailbox is full; the command was not queued.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
#[error("worker mailbox is full")]
pub struct Full;

/// A bounded multi-producer, single-consumer mailbox with an eventfd.
pub struct Mailbox<T> {
    queue: ArrayQueue<T>,
    notified: CachePadded<WakeFlag>,
    efd: OwnedFd,
    /// Pushes refused because the queue was full.
    full_count: AtomicU64,
}

impl<T> Mailbox<T> {
    /// A mailbox of `capacity` commands (allocated now) and its eventfd.
    pub fn new(capacity: usize) -> io::Result<Mailbox<T>> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is
        // checked before it is wrapped.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Mailbox {
            queue: ArrayQueue::new(capacity),
            notified: CachePadded::new(WakeFlag::new()),
            // SAFETY: `fd` is a freshly created descriptor owned by no one else.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            full_count: AtomicU64::new(0),
        })
    }

    /// Bytes a mailbox of `capacity` commands holds from its start, empty or
    /// not: the queue allocates and stamps every slot (a stamp and a
    /// command) when it is made.
    pub fn bytes(capacity: usize) -> u64 {
        use std::mem::{align_of, size_of};
        let slot = (size_of::<usize>() + size_of::<T>()).next_multiple_of(align_of::<T>().max(align_of::<usize>()));
        capacity as u64 * slot as u64
    }

    /// Queues `cmd` and wakes the worker if it may be idle.
    pub fn push(&self, cmd: T) -> Result<(), Full> {
        self.push_unwoken(cmd)?;
        self.wake();
        Ok(())
    }

    /// Queues `cmd` without waking the worker; the producer calls
    /// [`Mailbox::wake`] once it has queued what it has to hand over.
    /// For a producer that answers in batches (the store thread): a wake
    /// per batch instead of one mid-batch, where on a busy host the woken
    /// worker takes the producer's CPU before the rest of the batch is out.
    pub fn push_unwoken(&self, cmd: T) -> Result<(), Full> {
        self.offer_unwoken(cmd).map_err(|_| Full)
    }

    /// Like [`Mailbox::push_unwoken`], but a full mailbox hands the
    /// command back (a producer that keeps it to offer again: the store
    /// thread's sink).
    pub fn offer_unwoken(&self, cmd: T) -> Result<(), T> {
        self.queue.push(cmd).inspect_err(|_| {
            self.full_count.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// [`Mailbox::offer_unwoken`] of a command offered before: a refusal
    /// is not counted again in [`Mailbox::full_count`].
    pub fn offer_again_unwoken(&self, cmd: T) -> Result<(), T> {
        self.queue.push(cmd)
    }

    /// Like [`Mailbox::push`], but a full mailbox hands the command back
    /// (e.g. a connection's descriptor, which the caller still has to
    /// answer).
    pub fn offer(&self, cmd: T) -> Result<(), T> {
        if let Err(cmd) = self.queue.push(cmd) {
            self.full_count.fetch_add(1, Ordering::Relaxed);
            return Err(cmd);
        }
        self.wake();
        Ok(())
    }

    /// Wakes the worker unless a wake is already pending.
    pub fn wake(&self) {
        if self.notified.raise() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
            // EAGAIN (counter saturated) means a wake is pending anyway.
            unsafe { libc::write(self.efd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        }
    }

    /// Worker side, after the eventfd fired: re-arm wakes (and reset the
    /// eventfd's counter if the waiter needs that: a level-triggered poll
    /// does, a multishot io_uring poll does not). Call before draining.
    pub fn begin_drain(&self, reset_eventfd: bool) {
        if reset_eventfd {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from our own
            // non-blocking eventfd; EAGAIN is fine (nothing to reset).
            unsafe { libc::read(self.efd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        }
        self.notified.rearm();
    }

    /// Worker side: a producer woke (or is waking) the worker since the
    /// last `begin_drain`. One atomic load: a busy worker's I/O loop checks
    /// it every turn instead of reading the eventfd.
    pub fn signalled(&self) -> bool {
        self.notified.pending()
    }

    /// Worker side: the next command, if any.
    pub fn pop(&self) -> Option<T> {
        self.queue.pop()
    }

    /// Commands waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no command is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The eventfd the worker polls.
    pub fn eventfd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    /// Pushes refused so far because the queue was full.
    pub fn full_count(&self) -> u64 {
        self.full_count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn eventfd_value(m: &Mailbox<u32>) -> u64 {
        let mut v: u64 = 0;
        let n = unsafe { libc::read(m.eventfd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    #[test]
    fn full_is_an_error_value() {
        let m = Mailbox::new(2).unwrap();
        m.push(1u32).unwrap();
        m.push(2).unwrap();
        assert_eq!(m.push(3), Err(Full));
        assert_eq!(m.full_count(), 1);
        assert_eq!(m.pop(), Some(1));
        m.push(3).unwrap();
    }

    #[test]
    fn one_wake_per_idle_period() {
        let m = Mailbox::new(16).unwrap();
        for i in 0..10 {
            m.push(i).unwrap();
        }
        assert_eq!(eventfd_value(&m), 1, "ten pushes, one eventfd write");
        m.begin_drain(true);
        while m.pop().is_some() {}
        m.push(99).unwrap();
        assert_eq!(eventfd_value(&m), 1, "a push after the drain wakes again");
    }

    #[test]
    fn an_unwoken_push_waits_for_the_producers_wake() {
        let m = Mailbox::new(16).unwrap();
        for i in 0..5 {
            m.push_unwoken(i).unwrap();
        }
        assert!(!m.signalled(), "no wake before the producer asks for one");
        assert_eq!(eventfd_value(&m), 0);
        m.wake();
        assert!(m.signalled());
        assert_eq!(eventfd_value(&m), 1, "five pushes, one wake");
        m.begin_drain(true);
        assert_eq!((0..5).map(|_| m.pop().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        let small = Mailbox::new(1).unwrap();
        small.push_unwoken(1u32).unwrap();
        assert_eq!(small.push_unwoken(2), Err(Full));
        assert_eq!(small.full_count(), 1);
    }

    #[test]
    fn many_producers_lose_nothing() {
        let m = Arc::new(Mailbox::new(1024).unwrap());
        let producers: Vec<_> = (0..4u32)
            .map(|p| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        let v = p * 1_000_000 + i;
                        while m.push(v).is_err() {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut seen = 0;
        let mut last = [None::<u32>; 4];
        while seen < 40_000 {
            m.begin_drain(true);
            while let Some(v) = m.pop() {
                let p = (v / 1_000_000) as usize;
                assert!(last[p].is_none_or(|l| l < v), "per-producer order kept");
                last[p] = Some(v);
                seen += 1;
            }
        }
        for p in producers {
            p.join().unwrap();
        }
    }
}
