//! Per-connection write side, shared by every worker: a spin-locked slot
//! holding the socket, its generation and its outbound queue.
//!
//! Owns: who may write to a connection's socket and in what order. Any
//! thread holding the slot's lock may write: the owning worker (replies,
//! room fan-out, flushing after the socket drained), another worker (a SEND
//! from its client), or an application thread (`Handle::push_to_user`).
//! The lock makes the queue and the socket one ordered stream: a writer
//! that finds the queue empty writes straight to the socket; otherwise, or
//! for what the socket does not take, it appends to the queue.
//! Must not: be held across anything but one non-blocking `sendmsg` and
//! queue operations; arm the poller (only the owner may: a writer that
//! leaves bytes queued asks the owner to watch for room, `needs_arm`).
//!
//! Why not a hand-off to the owning worker, as DESIGN.md first proposed:
//! measured with `switchboard-bench unicast` at 30,000 msgs/s over 4,000
//! connections on 2 workers, handing every cross-worker SEND to the owner
//! (mailbox + eventfd wake + a context switch) cost ~19.5 µs of kernel time
//! per message against ~11 µs when both ends were on one worker. tokio's
//! scheduler gets the same effect by running the woken writer task on the
//! waking thread.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use bytes::Bytes;

use super::sys::{self, Send};
use crate::config::SlowConsumer;
use crate::outq::{OutLimits, OutQueue, Overflow, MAX_IOV_PER_WRITE};
use crate::proto::wire::Wire;

/// Write state of one connection slot.
pub(crate) struct OutState {
    /// Generation of the connection in the slot (0: none).
    pub generation: u32,
    pub fd: RawFd,
    /// Logged in and not closing: deliveries are accepted.
    pub open: bool,
    /// The owner's poller watches this socket for room (or has been asked
    /// to): the queue is flushed when the socket drains.
    pub write_wait: bool,
    /// A writer other than the owner left bytes queued: the owner must arm
    /// the write poll.
    pub needs_arm: bool,
    /// A writer other than the owner found the queue over its limit: the
    /// owner must close the connection as a slow consumer.
    pub needs_close: bool,
    /// The slot is on its worker's request list.
    pub listed: bool,
    /// How frames are encoded for this connection (set by the owner before
    /// `open`, never changed while open).
    pub wire: Wire,
    pub out: OutQueue,
}

/// What a write attempt did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Put {
    /// Everything went to the socket.
    Sent,
    /// Some or all of it is queued. `full`: because the socket is full (the
    /// write poll must be armed), rather than behind frames already queued.
    Queued { full: bool },
    /// The queue would pass its limit: the connection must be closed.
    Overflow,
    /// The socket is broken; the owner finds out on its read side.
    Broken,
}

/// The bounds a write obeys.
#[derive(Copy, Clone, Debug)]
pub(crate) struct WriteRules {
    pub limits: OutLimits,
    pub policy: SlowConsumer,
}

impl OutState {
    /// Queues one frame (already encoded for this wire; `kind` is its
    /// server frame type, 0 for other bytes) under the limits and the
    /// slow-consumer policy; returns how many older messages were dropped
    /// to make room.
    pub fn queue(&mut self, frame: Bytes, kind: u8, rules: &WriteRules) -> Result<u32, Overflow> {
        let mut skipped = 0;
        if !self.out.fits(frame.len(), &rules.limits) {
            match rules.policy {
                SlowConsumer::Close => return Err(Overflow),
                SlowConsumer::DropOldest => skipped = self.out.drop_oldest_for(frame.len(), &rules.limits)?,
            }
        }
        self.out.push(frame, kind, &rules.limits)?;
        if skipped > 0 {
            self.out.note_skipped(skipped, self.wire);
        }
        Ok(skipped)
    }

    /// Encodes a raw v1 server frame for this connection's wire and queues
    /// it (see `queue`).
    pub fn queue_raw(&mut self, raw: &Bytes, rules: &WriteRules) -> Result<u32, Overflow> {
        self.queue(self.wire.encode(raw), kind_of(raw), rules)
    }

    /// Writes `e` (the frames encoded for this wire) straight to the socket
    /// if nothing is queued and the socket is not known to be full; queues
    /// what it does not take. Otherwise queues them behind the rest.
    /// `skipped` counts messages dropped under `drop_oldest`.
    pub fn put(&mut self, e: Encoded<'_>, rules: &WriteRules, skipped: &mut u32) -> Put {
        let Encoded { frames, raw, iov, total } = e;
        let kinds = raw.iter().map(|r| kind_of(r));
        if !self.out.is_empty() || self.write_wait {
            for (f, kind) in frames.iter().zip(kinds) {
                match self.queue(f.clone(), kind, rules) {
                    Ok(s) => *skipped += s,
                    Err(Overflow) => return Put::Overflow,
                }
            }
            return Put::Queued { full: false };
        }
        let written = match sys::sendmsg(self.fd, &iov[..frames.len()]) {
            Send::Wrote(w) if w == total => return Put::Sent,
            Send::Wrote(w) => w,
            Send::WouldBlock => 0,
            Send::Error(_) => return Put::Broken,
        };
        let mut skip = written;
        for (f, kind) in frames.iter().zip(kinds) {
            if skip >= f.len() {
                skip -= f.len();
            } else if skip > 0 {
                self.out.push_started(f.slice(skip..));
                skip = 0;
            } else {
                match self.queue(f.clone(), kind, rules) {
                    Ok(s) => *skipped += s,
                    Err(Overflow) => return Put::Overflow,
                }
            }
        }
        Put::Queued { full: true }
    }
}

/// The server frame type of a raw frame, as queues record it.
pub(crate) fn kind_of(raw: &[u8]) -> u8 {
    crate::proto::wire::frame_type(raw).map_or(0, |t| t as u8)
}

/// Frames ready for one connection's wire: the encoded bytes with their
/// iovecs, and the raw frames they came from (for the queue's kinds).
#[derive(Copy, Clone)]
pub(crate) struct Encoded<'a> {
    pub frames: &'a [Bytes],
    pub raw: &'a [Bytes],
    pub iov: &'a [libc::iovec; MAX_IOV_PER_WRITE],
    pub total: usize,
}

/// One or more server frames on their way to connections of any wire:
/// encoded for raw TCP as given, and for each WebSocket form the first time
/// a connection of that form needs them (a fan-out encodes its JSON once,
/// not once per member).
pub(crate) struct Outgoing<'a> {
    raw: &'a [Bytes],
    raw_iov: [libc::iovec; MAX_IOV_PER_WRITE],
    raw_total: usize,
    /// WsBinary, WsJson.
    ws: [Option<Box<EncodedSet>>; 2],
}

struct EncodedSet {
    frames: Vec<Bytes>,
    iov: [libc::iovec; MAX_IOV_PER_WRITE],
    total: usize,
}

impl<'a> Outgoing<'a> {
    /// At most `MAX_IOV_PER_WRITE` frames: they go out in one `sendmsg`.
    /// Checked in every build: a longer list has no iovec array to fit in.
    pub fn new(raw: &'a [Bytes]) -> Outgoing<'a> {
        assert!(raw.len() <= MAX_IOV_PER_WRITE, "{} frames for one write, at most {MAX_IOV_PER_WRITE}", raw.len());
        let (raw_iov, raw_total) = iovecs(raw);
        Outgoing { raw, raw_iov, raw_total, ws: [None, None] }
    }

    /// The frames as `wire` carries them; `None` for a handshake still in
    /// progress (nothing can be delivered to it).
    pub fn get(&mut self, wire: Wire) -> Option<Encoded<'_>> {
        let k = match wire {
            Wire::Raw => {
                return Some(Encoded { frames: self.raw, raw: self.raw, iov: &self.raw_iov, total: self.raw_total })
            }
            Wire::Http => return None,
            Wire::WsBinary => 0,
            Wire::WsJson => 1,
        };
        let raw = self.raw;
        let set = self.ws[k].get_or_insert_with(|| {
            let frames: Vec<Bytes> = raw.iter().map(|r| wire.encode(r)).collect();
            let (iov, total) = iovecs(&frames);
            Box::new(EncodedSet { frames, iov, total })
        });
        Some(Encoded { frames: &set.frames, raw, iov: &set.iov, total: set.total })
    }
}

/// One iovec per frame, for `OutState::put`.
pub(crate) fn iovecs(frames: &[Bytes]) -> ([libc::iovec; MAX_IOV_PER_WRITE], usize) {
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV_PER_WRITE];
    let mut total = 0;
    for (v, f) in iov.iter_mut().zip(frames) {
        *v = libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() };
        total += f.len();
    }
    (iov, total)
}

/// One slot: a test-and-set lock over the state, and the link of its
/// worker's request list.
pub(crate) struct OutSlot {
    locked: AtomicBool,
    next: AtomicU32,
    state: UnsafeCell<OutState>,
}

// SAFETY: `state` is only reached through `lock()`, which grants one thread
// at a time; the `Bytes` in the queue are Send + Sync.
unsafe impl Sync for OutSlot {}
unsafe impl std::marker::Send for OutSlot {}

impl Default for OutSlot {
    fn default() -> Self {
        OutSlot {
            locked: AtomicBool::new(false),
            next: AtomicU32::new(NIL),
            state: UnsafeCell::new(OutState {
                generation: 0,
                fd: -1,
                open: false,
                write_wait: false,
                needs_arm: false,
                needs_close: false,
                listed: false,
                wire: Wire::Raw,
                out: OutQueue::default(),
            }),
        }
    }
}

/// Holds a slot's lock; releases it on drop.
pub(crate) struct OutGuard<'a>(&'a OutSlot);

impl OutSlot {
    /// Takes the lock. Holders keep it for one non-blocking syscall at most,
    /// so contention is brief; after a few spins the waiter yields its CPU
    /// in case the holder was preempted.
    pub fn lock(&self) -> OutGuard<'_> {
        let mut spins = 0u32;
        loop {
            if !self.locked.swap(true, Ordering::Acquire) {
                return OutGuard(self);
            }
            while self.locked.load(Ordering::Relaxed) {
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

impl Deref for OutGuard<'_> {
    type Target = OutState;
    fn deref(&self) -> &OutState {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.state.get() }
    }
}

impl DerefMut for OutGuard<'_> {
    fn deref_mut(&mut self) -> &mut OutState {
        // SAFETY: the guard holds the lock, exclusively.
        unsafe { &mut *self.0.state.get() }
    }
}

impl Drop for OutGuard<'_> {
    fn drop(&mut self) {
        self.0.locked.store(false, Ordering::Release);
    }
}

const NIL: u32 = u32::MAX;

/// One worker's write slots, and the list of slots that need the owner's
/// attention (arm a write poll, close a slow consumer), filled by other
/// threads. The list is a lock-free stack threaded through the slots:
/// pushes CAS the head, the owner takes the whole list at once (which
/// makes it immune to ABA); a slot is on it at most once (`listed`), so it
/// never needs memory of its own.
pub(crate) struct OutSlots {
    pub slots: Box<[OutSlot]>,
    head: AtomicU32,
}

impl OutSlots {
    /// `n` slots, preallocated (untouched pages cost nothing).
    pub fn new(n: usize) -> OutSlots {
        OutSlots { slots: (0..n).map(|_| OutSlot::default()).collect(), head: AtomicU32::new(NIL) }
    }

    /// Puts slot `i` on the request list; the caller holds its lock and has
    /// set a `needs_*` flag. Returns false if it was already listed.
    pub fn request(&self, i: u32, g: &mut OutGuard<'_>) -> bool {
        if g.listed {
            return false;
        }
        g.listed = true;
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            self.slots[i as usize].next.store(head, Ordering::Relaxed);
            match self.head.compare_exchange_weak(head, i, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(h) => head = h,
            }
        }
    }

    /// After the owning worker died: cuts off every connection still in a
    /// slot (its client sees the connection end instead of hanging
    /// half-alive) and turns away writers from other threads. Returns how
    /// many connections there were.
    pub fn cut_off_all(&self) -> usize {
        let mut n = 0;
        for slot in self.slots.iter() {
            let mut g = slot.lock();
            if g.generation == 0 || g.fd < 0 {
                continue;
            }
            sys::shutdown(g.fd, libc::SHUT_RDWR);
            // SAFETY: the slot's descriptor belonged to the dead worker's
            // connection, which keeps it only as a plain number and never
            // closes it now; from here on the slot no longer names it.
            unsafe { sys::close(g.fd) };
            g.fd = -1;
            g.generation = 0;
            g.open = false;
            g.write_wait = false;
            g.needs_arm = false;
            g.needs_close = false;
            g.out.clear();
            n += 1;
        }
        n
    }

    /// Owner side: takes every listed slot (most recent first).
    pub fn take_requests(&self, out: &mut Vec<u32>) {
        let mut i = self.head.swap(NIL, Ordering::Acquire);
        while i != NIL {
            out.push(i);
            i = self.slots[i as usize].next.load(Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    #[should_panic(expected = "at most 64")]
    fn more_frames_than_one_write_takes_are_refused_in_every_build() {
        let frames = vec![Bytes::from_static(b"x"); MAX_IOV_PER_WRITE + 1];
        let _ = Outgoing::new(&frames);
    }

    #[test]
    fn the_lock_is_exclusive() {
        let s = Arc::new(OutSlots::new(1));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        let mut g = s.slots[0].lock();
                        g.generation = g.generation.wrapping_add(1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.slots[0].lock().generation, 400_000);
    }

    #[test]
    fn requests_list_each_slot_once_and_lose_none() {
        let s = Arc::new(OutSlots::new(1000));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in (t..1000).step_by(4) {
                        for _ in 0..3 {
                            let mut g = s.slots[i as usize].lock();
                            g.needs_arm = true;
                            s.request(i, &mut g);
                        }
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        for t in threads {
            t.join().unwrap();
        }
        s.take_requests(&mut seen);
        seen.sort();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    }
}
