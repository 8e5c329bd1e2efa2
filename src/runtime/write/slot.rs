//! The write slots: per connection, a spin lock over its socket, generation,
//! outbound queue and write flags (the state table is in `write/mod.rs`).
//!
//! Owns: who may write to a connection's socket and in what order. Any
//! thread holding the slot's lock may write: the owning worker (replies,
//! room fan-out, flushing after the socket drained), another worker (a SEND
//! from its client), or an application thread (`Handle::push_to_user`).
//! The lock makes the queue and the socket one ordered stream: a writer
//! that finds the queue empty writes straight to the socket; otherwise, or
//! for what the socket does not take, it appends to the queue.
//! Must not: be held across anything but non-blocking `sendmsg` calls (one
//! for a delivery; up to a socket's fill for the owner's flush, each of at
//! most 64 frames) and queue operations; arm the poller (only the owner may: a writer that
//! leaves bytes queued asks the owner to watch for room, `needs_arm`).
//! The owner's batched sends (`server.batch_sends`, `write/mod.rs`) run without
//! the lock: the frames they write stay pinned at the head of the queue.
//!
//! Why not a hand-off to the owning worker, as DESIGN.md first proposed:
//! measured with `switchboard-bench unicast` at 30,000 msgs/s over 4,000
//! connections on 2 workers, handing every cross-worker SEND to the owner
//! (mailbox + eventfd wake + a context switch) cost ~19.5 µs of kernel time
//! per message against ~11 µs when both ends were on one worker. tokio's
//! scheduler gets the same effect by running the woken writer task on the
//! waking thread.
//!
//! Memory: a worker's slots are allocated zeroed and all-zero is the empty
//! slot, so the pages of slots never used are never committed (a worker
//! sized for 500,000 connections costs nothing for the ones it never had).

use std::alloc::Layout;
use std::os::fd::RawFd;

use bytes::Bytes;

use super::sys::{self, Send};
use crate::config::SlowConsumer;
use crate::outq::{OutLimits, OutQueue, Overflow, MAX_IOV_PER_WRITE};
use crate::proto::wire::Wire;
use crate::sync::requests::{Link, RequestList};
use crate::sync::spin::{SpinGuard, SpinLock};

/// Write state of one connection slot. All-zero is the empty slot (see
/// `OutSlots::new`): no connection, no socket, nothing queued.
pub(crate) struct OutState {
    /// Generation of the connection in the slot (0: none).
    pub generation: u32,
    /// The socket plus one (0: none), so that all-zero means no socket.
    fd_plus_one: RawFd,
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
    /// Owner only: `DIRTY`, `CLOSING`, `FIN_SENT`, `STAGED` (one byte: the
    /// slot is 32 bytes). Other writers read `STAGED`.
    owner: u8,
    /// How frames are encoded for this connection (set by the owner before
    /// `open`, never changed while open).
    pub wire: Wire,
    pub out: OutQueue,
}

/// Owner flag: on the owner's list of slots to flush this turn.
pub(crate) const DIRTY: u8 = 1;
/// Owner flag: the connection is closing and its last frame is queued;
/// once the queue is written out, FIN follows.
pub(crate) const CLOSING: u8 = 2;
/// Owner flag: FIN sent.
pub(crate) const FIN_SENT: u8 = 4;
/// Owner flag: a fan-out step's send to this connection is staged or in
/// flight (`Writer::put`, `Step::Batched`) straight from the step's shared
/// frames, not from the queue: other writers queue behind it, and whatever
/// the socket does not take goes back in front of what they queued.
pub(crate) const STAGED: u8 = 8;

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
    /// The connection's socket (-1: none).
    #[inline]
    pub fn fd(&self) -> RawFd {
        self.fd_plus_one - 1
    }

    /// Empties a slot whose connection is released: no connection, no
    /// socket, nothing queued. `listed` stays (the slot may still be on the
    /// request list, which skips it), and so does `dirty` (it may still be
    /// on the owner's flush list, which skips it).
    pub fn reset(&mut self) {
        self.generation = 0;
        self.set_fd(-1);
        self.open = false;
        self.write_wait = false;
        self.needs_arm = false;
        self.needs_close = false;
        self.owner &= DIRTY;
        self.wire = Wire::Raw;
        self.out.clear();
    }

    /// Whether owner flag `f` is set.
    #[inline]
    pub fn is(&self, f: u8) -> bool {
        self.owner & f != 0
    }

    /// Sets owner flag `f`; returns whether it was set before.
    #[inline]
    pub fn set(&mut self, f: u8) -> bool {
        let was = self.is(f);
        self.owner |= f;
        was
    }

    /// Clears owner flag `f`; returns whether it was set.
    #[inline]
    pub fn clear(&mut self, f: u8) -> bool {
        let was = self.is(f);
        self.owner &= !f;
        was
    }

    /// Sets the socket (-1: none).
    pub fn set_fd(&mut self, fd: RawFd) {
        debug_assert!(fd >= -1, "not a descriptor: {fd}");
        self.fd_plus_one = fd + 1;
    }

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

    /// Queues all of `e` (see `queue`), behind what is queued. On
    /// `Overflow` the connection is closed, so frames queued before the
    /// refusal do not matter.
    pub fn queue_all(&mut self, e: Encoded<'_>, rules: &WriteRules, skipped: &mut u32) -> Result<(), Overflow> {
        for (f, r) in e.frames.iter().zip(e.raw) {
            *skipped += self.queue(f.clone(), kind_of(r), rules)?;
        }
        Ok(())
    }

    /// Writes `e` (the frames encoded for this wire) straight to the socket
    /// if nothing is queued and the socket is not known to be full; queues
    /// what it does not take. Otherwise queues them behind the rest.
    /// `skipped` counts messages dropped under `drop_oldest`; `written`
    /// the bytes the socket took now.
    pub fn put(&mut self, e: Encoded<'_>, rules: &WriteRules, skipped: &mut u32, written: &mut usize) -> Put {
        if !self.out.is_empty() || self.write_wait || self.is(STAGED) {
            return match self.queue_all(e, rules, skipped) {
                Ok(()) => Put::Queued { full: false },
                Err(Overflow) => Put::Overflow,
            };
        }
        let Encoded { frames, raw, iov, total } = e;
        let kinds = raw.iter().map(|r| kind_of(r));
        let took = match sys::sendmsg(self.fd(), &iov[..frames.len()]) {
            Send::Wrote(w) if w == total => {
                *written += w;
                return Put::Sent;
            }
            Send::Wrote(w) => w,
            Send::WouldBlock => 0,
            Send::Error(_) => return Put::Broken,
        };
        *written += took;
        let mut skip = took;
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

    /// Whether the owner may stage a send of `e` to this connection
    /// (`STAGED`): nothing queued, the socket not known to be full, and
    /// frames an empty queue would take under the limits.
    pub fn can_stage(&self, e: &Encoded<'_>, rules: &WriteRules) -> bool {
        self.out.is_empty()
            && !self.write_wait
            && e.frames.len() <= rules.limits.max_frames
            && e.total <= rules.limits.max_bytes
    }

    /// A staged send of `e` wrote its first `written` bytes: the rest goes
    /// back in front of the queue, ahead of what other writers queued
    /// meanwhile, a frame cut short as a partly written head.
    pub fn put_back(&mut self, e: Encoded<'_>, written: usize) {
        let mut start = 0;
        let mut first = 0;
        for f in e.frames {
            if start + f.len() > written {
                break;
            }
            start += f.len();
            first += 1;
        }
        for k in (first..e.frames.len()).rev() {
            let cut = if k == first { written - start } else { 0 };
            self.out.push_front(e.frames[k].slice(cut..), kind_of(&e.raw[k]), cut > 0);
        }
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

/// One slot: a spin lock over the write state, with the link of its
/// worker's request list beside it (in the lock's padding: 32 bytes).
pub(crate) struct OutSlot(SpinLock<OutState, Link>);

/// Holds a slot's lock; releases it on drop.
pub(crate) type OutGuard<'a> = SpinGuard<'a, OutState, Link>;

const _: () = assert!(std::mem::size_of::<OutSlot>() == 32);
// The empty slot is all-zero (see `OutSlots::new`): the raw wire is 0.
const _: () = assert!(Wire::Raw as u8 == 0);

impl OutSlot {
    /// Takes the lock. Holders keep it for one non-blocking syscall at most,
    /// so contention is brief; after a few spins the waiter yields its CPU
    /// in case the holder was preempted.
    #[inline]
    pub fn lock(&self) -> OutGuard<'_> {
        self.0.lock()
    }
}

/// One worker's write slots, and the list of slots that need the owner's
/// attention (arm a write poll, close a slow consumer), filled by other
/// threads (`sync::requests`: a lock-free stack threaded through the
/// slots, each on it at most once, taken whole by the owner).
pub(crate) struct OutSlots {
    pub slots: Box<[OutSlot]>,
    requests: RequestList,
}

impl OutSlots {
    /// `n` empty slots, allocated zeroed: pages of slots never used are
    /// never written, so they cost address space, not memory.
    pub fn new(n: usize) -> OutSlots {
        OutSlots { slots: zeroed_slots(n), requests: RequestList::new() }
    }

    /// Puts slot `i` on the request list; the caller holds its lock and has
    /// set a `needs_*` flag. Returns false if it was already listed.
    pub fn request(&self, i: u32, g: &mut OutGuard<'_>) -> bool {
        self.requests.request(i, self.slots[i as usize].0.side(), &mut g.listed)
    }

    /// After the owning worker died: cuts off every connection still in a
    /// slot (its client sees the connection end instead of hanging
    /// half-alive) and turns away writers from other threads. Returns how
    /// many connections there were.
    pub fn cut_off_all(&self) -> usize {
        let mut n = 0;
        for slot in self.slots.iter() {
            let mut g = slot.lock();
            if g.generation == 0 || g.fd() < 0 {
                continue;
            }
            sys::shutdown(g.fd(), libc::SHUT_RDWR);
            // SAFETY: the slot's descriptor belonged to the dead worker's
            // connection, which keeps it only as a plain number and never
            // closes it now; from here on the slot no longer names it.
            unsafe { sys::close(g.fd()) };
            g.set_fd(-1);
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
        self.requests.take(out, |i| self.slots[i as usize].0.side())
    }
}

/// `n` empty slots in one zeroed allocation (`alloc_zeroed`: a large one
/// comes from fresh, untouched pages; `Box::new_zeroed_slice` is stable
/// since Rust 1.92, the MSRV is 1.90).
fn zeroed_slots(n: usize) -> Box<[OutSlot]> {
    if n == 0 {
        return Box::new([]);
    }
    let layout = Layout::array::<OutSlot>(n).expect("slot array size overflows");
    // SAFETY: the layout has a non-zero size (n > 0, slots are 32 bytes).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<OutSlot>();
    if p.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `p` holds `n` all-zero `OutSlot`s, each a valid empty slot:
    // the lock's flag (AtomicBool false: unlocked), the link (AtomicU32 0:
    // not listed, `sync::requests`), `generation` 0 (none), `fd_plus_one` 0
    // (no socket), every flag false (`owner` 0 too), `wire` 0 (`Wire::Raw`, asserted
    // above), and `out`, an `OutQueue`, which is one `Option<Box<_>>` whose
    // all-zero is `None`, the empty queue (guaranteed for `Option<Box<T>>`;
    // its size is asserted in outq.rs). The memory comes from the global
    // allocator with the layout of `[OutSlot; n]`, which is the layout the
    // `Box<[OutSlot]>` frees with.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) }
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
    fn a_staged_send_cut_short_puts_its_rest_in_front_of_what_others_queued() {
        let rules =
            WriteRules { limits: OutLimits { max_frames: 16, max_bytes: 1 << 20 }, policy: SlowConsumer::DropOldest };
        let raw: Vec<Bytes> = (1..=3u8)
            .map(|n| {
                crate::proto::frame::Frame::Push { msg_id: n as u64, from: "", payload: &[n; 10] }.to_bytes().unwrap()
            })
            .collect();
        let len = raw[0].len();
        let (iov, total) = iovecs(&raw);
        let e = Encoded { frames: &raw, raw: &raw, iov: &iov, total };
        let other = Bytes::from_static(b"queued by another thread");
        let queued = |cut: usize| -> Vec<Bytes> {
            let s = OutSlots::new(1);
            let mut g = s.slots[0].lock();
            assert!(g.can_stage(&e, &rules));
            g.set(STAGED);
            // Another writer finds the send staged and queues behind it.
            let mut skipped = 0;
            let mut written = 0;
            let one = [other.clone()];
            let (oiov, ototal) = iovecs(&one);
            let o = Encoded { frames: &one, raw: &one, iov: &oiov, total: ototal };
            assert_eq!(g.put(o, &rules, &mut skipped, &mut written), Put::Queued { full: false });
            assert!(!g.can_stage(&e, &rules), "a queue that is not empty takes no staged send");
            g.clear(STAGED);
            g.put_back(e, cut);
            let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV_PER_WRITE];
            let n = g.out.fill_iovecs(&mut iov);
            let frames = iov[..n]
                .iter()
                // SAFETY: each iovec points into a frame the queue holds.
                .map(|v| {
                    Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
                })
                .collect();
            g.out.clear();
            frames
        };
        // Nothing written: all three, whole, then the other writer's frame.
        assert_eq!(queued(0), [raw[0].clone(), raw[1].clone(), raw[2].clone(), other.clone()]);
        // Cut inside the second frame: its rest, the third, the other's.
        assert_eq!(queued(len + 3), [raw[1].slice(3..), raw[2].clone(), other.clone()]);
        // Cut right after the first frame: no partial head.
        assert_eq!(queued(len), [raw[1].clone(), raw[2].clone(), other.clone()]);
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

    #[test]
    fn zeroed_slots_are_empty() {
        let s = OutSlots::new(8);
        for slot in s.slots.iter() {
            let g = slot.lock();
            assert_eq!((g.generation, g.fd(), g.wire), (0, -1, Wire::Raw));
            assert!(!g.open && !g.write_wait && !g.needs_arm && !g.needs_close && !g.listed);
            assert!(g.out.is_empty());
        }
        let mut g = s.slots[3].lock();
        g.set_fd(0);
        assert_eq!(g.fd(), 0, "descriptor 0 is a descriptor, not none");
        g.set_fd(-1);
        assert_eq!(g.fd(), -1);
        g.needs_arm = true;
        assert!(s.request(3, &mut g));
        assert!(!s.request(3, &mut g), "listed once");
        drop(g);
        let mut list = Vec::new();
        s.take_requests(&mut list);
        assert_eq!(list, [3]);
        assert!(OutSlots::new(0).slots.is_empty());
    }

    /// Pages of `[addr, addr + len)` resident in memory, by `mincore(2)`
    /// (only the whole pages inside the range are counted).
    fn resident_pages(addr: *const u8, len: usize) -> (usize, usize) {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let start = (addr as usize).next_multiple_of(page);
        let end = (addr as usize + len) / page * page;
        let pages = (end - start) / page;
        let mut vec = vec![0u8; pages];
        // SAFETY: `[start, end)` lies inside one live allocation and is
        // page-aligned; `vec` has one byte per page of it.
        let r = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        (vec.iter().filter(|&&b| b & 1 != 0).count(), pages)
    }

    #[test]
    fn new_slots_commit_no_pages() {
        // 64 MiB or more of slots: above any malloc's mmap threshold, so
        // the array comes fresh from the kernel. Only the pages the
        // allocator itself writes (its headers) may be resident.
        let n = (64 << 20) / std::mem::size_of::<OutSlot>() + 1;
        let s = OutSlots::new(n);
        let (resident, pages) = resident_pages(s.slots.as_ptr() as *const u8, std::mem::size_of_val(&*s.slots));
        assert!(resident <= 2, "{resident} of {pages} slot pages committed by OutSlots::new");
        // Touching one slot commits its page only, and it works.
        let mut g = s.slots[n / 2].lock();
        assert_eq!((g.generation, g.open, g.listed, g.wire), (0, false, false, Wire::Raw));
        assert!(g.out.is_empty());
        g.generation = 7;
        drop(g);
        let (resident, _) = resident_pages(s.slots.as_ptr() as *const u8, std::mem::size_of_val(&*s.slots));
        assert!(resident <= 3, "{resident} pages resident after touching one slot");
    }
}
