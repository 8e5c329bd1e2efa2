//! The write path: everything that puts bytes on a connection.
//!
//! Owns: the one verb for "deliver this frame to this connection"
//! ([`deliver`], from any thread, and [`Writer::deliver`], the owning
//! worker's shortcut to the same), queueing a connection's own replies,
//! opening a connection to deliveries and closing it to them, flushing, the
//! writable wake-up, and the slow-consumer policy (a queue over
//! `limits.outbound_max_bytes` is closed or drops its oldest messages, by
//! `limits.slow_consumer`).
//! Must not: decide anything about the protocol (that is `proto::conn`),
//! or hold a slot's lock across anything but non-blocking syscalls.
//!
//! Who writes: any thread holding a slot's lock (`slot.rs`). A writer that
//! finds the queue empty and the socket not known to be full writes straight
//! to the socket; otherwise it appends to the queue. Only the owning worker
//! arms write polls and closes connections: another thread that leaves
//! bytes queued, or finds a queue over its limit, puts the slot on the
//! owner's request list and wakes the owner's mailbox.
//!
//! ## The flags of a slot (`OutState`)
//!
//! | flag | set by | when | cleared by | when |
//! |---|---|---|---|---|
//! | `open` | owner, [`Writer::open`] | login: LOGIN_OK is queued first | owner, [`Writer::close`]; any writer on overflow | close starts; a queue passed its limit |
//! | `write_wait` | any writer | its write left bytes queued because the socket was full | owner, [`Writer::on_writable`] | the queue drained (or the socket broke) |
//! | `needs_arm` | another thread | with `write_wait`: the owner must arm the write poll | owner, [`Writer::take_requests`] | poll armed |
//! | `needs_close` | another thread | the queue passed its limit: close as a slow consumer | owner, [`Writer::take_requests`] | close started |
//! | `listed` | another thread | the slot went on the request list (once) | owner, [`Writer::take_requests`] | list taken |
//! | `DIRTY` (owner byte) | owner | a reply or close was queued this turn | owner, [`Writer::flush_dirty`] | flushed |
//! | `CLOSING` (owner byte) | owner, [`Writer::close`] | the last frame (CLOSE, LOGIN_ERROR, an HTTP answer) is queued | owner, [`Writer::detach`] | slot freed |
//! | `FIN_SENT` (owner byte) | owner | the queue drained while `closing`: FIN sent | owner, [`Writer::detach`] | slot freed |
//! | `STAGED` (owner byte; others read it) | owner, [`Writer::put`] | a fan-out step staged a send to it from the step's frames | owner, [`Writer::send_staged`] | the send completed, its unsent rest put back in front of the queue |
//!
//! Deliveries need `open`; a connection's own replies (before login too)
//! need only a live generation and no `closing`. A writer writes straight
//! to the socket only if the queue is empty and neither `write_wait` nor
//! `STAGED` is set; otherwise it queues behind.
//!
//! ## Batched sends (`server.batch_sends`)
//!
//! Where the owning worker writes to many of its connections at once, it
//! does not do so one `sendmsg(2)` at a time. A fan-out step's members
//! with nothing queued are staged (`STAGED`, `Writer::send_staged`): one
//! `IORING_OP_SENDMSG` each straight from the step's shared frames, up to
//! 256 per `io_uring_enter` (`Batch`, `Poller::send_batch`), on the
//! io_uring poller's ring or the epoll poller's ring for sends; only what
//! a socket does not take is queued, in front of anything other threads
//! queued meanwhile. A member already behind gets the frames queued and
//! marked `DIRTY` like a reply, and `flush_dirty` hands every dirty
//! connection's head of queue to the kernel the same way. So do a tick's
//! PINGs, a turn's replies and the backlogs whose sockets had room again,
//! when there are at least `BATCH_MIN` of them. A single delivery (a SEND,
//! a push, a SEND_ACK) is written at once, as without batching. A socket
//! with no room answers `-EAGAIN` at once and gets its write poll as
//! before; the poll's event marks the slot dirty again instead of writing
//! (`on_writable`). Writers on other threads keep their direct write: they
//! find the queue not empty (or `STAGED`) while the owner's batch is
//! pending and append behind it.

mod slot;

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::sync::Arc;

use bytes::Bytes;

use slot::{OutGuard, OutState, Put, CLOSING, DIRTY, FIN_SENT, STAGED};
pub(crate) use slot::{OutSlots, Outgoing, WriteRules};

use super::poller::{token, Poller};
use super::shared::Shared;
use super::sys::{self, Send};
use crate::ids::{ConnId, WorkerId};
use crate::outq::{Overflow, MAX_IOV_PER_WRITE};
use crate::proto::wire::Wire;
use crate::rooms::Member;
use crate::stats::{bump, WorkerCounters};

/// Delivers `frame` to a logged-in connection, from any thread: straight to
/// its socket when nothing is queued for it, else behind what is. What a
/// full socket does not take is queued and the owner is asked (through its
/// request list and a mailbox wake) to watch for room; a queue over its
/// limit asks the owner to close the connection. Returns whether the frame
/// was handed over (false: the connection is gone or not logged in).
///
/// Why any thread writes instead of handing every frame to the owner:
/// measured with `switchboard-bench unicast` at 30,000 msgs/s over 4,000
/// connections on 2 workers, handing every cross-worker SEND to the owner
/// (mailbox + eventfd wake + a context switch) cost ~19.5 µs of kernel time
/// per message against ~11 µs when both ends were on one worker.
pub(crate) fn deliver(shared: &Shared, conn: ConnId, frame: &Bytes) -> bool {
    deliver_at(shared, conn, frame, None)
}

/// [`deliver`], timing the push-to-written latency from `accepted` when the
/// socket takes the frame at once (a frame left queued is written later by
/// the owner and not timed).
pub(crate) fn deliver_at(shared: &Shared, conn: ConnId, frame: &Bytes, accepted: Option<std::time::Instant>) -> bool {
    let w = conn.worker().0 as usize;
    let Some(slots) = shared.outs.get(w) else { return false };
    let Some(slot) = slots.slots.get(conn.slot() as usize) else { return false };
    let frames = std::slice::from_ref(frame);
    let mut out = Outgoing::new(frames);
    let mut skipped = 0;
    let mut g = slot.lock();
    if g.generation != conn.generation() || !g.open {
        return false;
    }
    if g.wire != Wire::Raw {
        // Encode outside the lock (JSON takes a while), then check the
        // connection is still the same one.
        let wire = g.wire;
        drop(g);
        let _ = out.get(wire);
        g = slot.lock();
        if g.generation != conn.generation() || !g.open {
            return false;
        }
    }
    let Some(e) = out.get(g.wire) else { return false };
    let mut written = 0;
    let r = g.put(e, &shared.write_rules, &mut skipped, &mut written);
    let wake = match r {
        Put::Sent | Put::Broken => false,
        Put::Queued { full } => {
            if full && !g.write_wait {
                g.write_wait = true;
                g.needs_arm = true;
                slots.request(conn.slot(), &mut g)
            } else {
                false
            }
        }
        Put::Overflow => {
            g.open = false;
            g.needs_close = true;
            slots.request(conn.slot(), &mut g)
        }
    };
    drop(g);
    let latency = match (r, accepted) {
        (Put::Sent, Some(t)) => Some(t.elapsed().as_nanos() as u64),
        _ => None,
    };
    // This thread's own block: plain stores, no locked instruction.
    let handed = matches!(r, Put::Sent | Put::Queued { .. });
    shared.foreign_counters.with(|c| {
        if handed {
            bump(&c.frames_out, 1);
        }
        if written > 0 {
            bump(&c.writes, 1);
        }
        bump(&c.detail.bytes_out, written as u64);
        if skipped > 0 {
            bump(&c.skipped, skipped as u64);
        }
        if let Some(ns) = latency {
            c.detail.push_to_written.observe(ns, 1);
        }
    });
    if wake {
        shared.mailboxes[w].wake();
    }
    matches!(r, Put::Sent | Put::Queued { .. })
}

/// How a delivery went.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// One write took it all.
    Direct,
    /// Queued (behind other frames, or the socket was full).
    Queued,
    /// Nothing was queued for it: it goes out with the worker's batched
    /// sends at the end of this step (`server.batch_sends`), as a direct write
    /// would have, and is counted as a write then.
    Batched,
    /// The connection is gone, closing, or not logged in.
    No,
    /// Its queue passed its limit: the caller must close it as a slow
    /// consumer (`Writer` never closes a connection itself).
    Overflow,
}

/// How [`Writer::put`] writes to one connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A single delivery: written at once, counted as a write.
    Single,
    /// One member of a fan-out step: written at once; the caller counts the
    /// step's direct writes once.
    FanOut,
    /// One member of a fan-out step of `BATCH_MIN` members or more
    /// (`server.batch_sends`): staged, and written by the step's batch
    /// ([`Writer::send_staged`]).
    Batched,
}

/// What the last write attempt left.
enum WriteState {
    Drained,
    Blocked,
    Failed,
}

/// A worker's side of the write path: its slots, the poller that reports
/// room on its sockets, and the slots to flush at the end of the turn.
pub(crate) struct Writer {
    id: WorkerId,
    shared: Arc<Shared>,
    /// Read and write readiness of the worker's sockets (`poller.rs`); the
    /// worker's I/O loop reaps it, the write path arms write polls on it.
    pub poller: RefCell<Poller>,
    dirty: RefCell<Vec<u32>>,
    iov: RefCell<[libc::iovec; MAX_IOV_PER_WRITE]>,
    /// `server.batch_sends`: the owner's writes go out as one batch of
    /// submissions per flush instead of one `sendmsg` each (see `Batch`).
    batch: Option<RefCell<Batch>>,
    /// `server.batch_sends`: a fan-out step's staged sends (`Step::Batched`),
    /// written from the step's frames, not from the queues.
    staged: Option<RefCell<Batch>>,
}

/// Sends of one flush, submitted together (`Poller::send_batch`): the
/// owner's deliveries, replies and backlog writes of a turn cost one
/// `io_uring_enter` instead of one `sendmsg(2)` per connection.
///
/// How it stays one ordered stream per socket without holding the slots'
/// locks across the syscall: the frames being sent stay in the
/// connection's queue, pinned (`OutQueue::pin`). Other threads that write
/// meanwhile find the queue not empty and append behind it (`OutState::put`);
/// a drop under `drop_oldest` skips the pinned frames; only the owner
/// removes them, by what the kernel reports written. The slot is not
/// released during the batch either: it is built and completed within
/// one `flush_dirty`, and only the owner detaches slots.
#[derive(Default)]
struct Batch {
    /// (slot, generation, bytes offered) per send.
    sends: Vec<(u32, u32, usize)>,
    fds: Vec<RawFd>,
    /// Each send's iovecs, at `start..start + len` of `iov`.
    spans: Vec<(usize, usize)>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::msghdr>,
    res: Vec<i32>,
}

impl Batch {
    /// Adds a send of `iov` (the caller keeps the bytes alive until the
    /// batch is submitted and cleared).
    fn add(&mut self, slot: u32, generation: u32, fd: RawFd, iov: &[libc::iovec]) {
        let offered = iov.iter().map(|v| v.iov_len).sum();
        self.sends.push((slot, generation, offered));
        self.fds.push(fd);
        self.spans.push((self.iov.len(), iov.len()));
        self.iov.extend_from_slice(iov);
    }

    /// Submits every send in one `io_uring_enter`; `res` holds each one's
    /// result (bytes written or `-errno`) afterwards.
    fn submit(&mut self, poller: &mut Poller) {
        // The headers point into `iov`, complete now: it does not move
        // until the batch is cleared.
        self.msgs.clear();
        for &(start, len) in &self.spans {
            // SAFETY: msghdr is plain data; zeroed is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iov[start..].as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = len as _;
            self.msgs.push(msg);
        }
        self.res.clear();
        self.res.resize(self.sends.len(), 0);
        poller.send_batch(&self.fds, &self.msgs, &mut self.res);
    }

    fn clear(&mut self) {
        self.sends.clear();
        self.fds.clear();
        self.spans.clear();
        self.iov.clear();
    }
}

/// Sends per `io_uring_enter` at most: well within the submission queue
/// (`uring.sq_entries` is at least 256 and 4096 by default, and a flush
/// may find arms and closes queued too) and the completion queue.
const BATCH_MAX: usize = 256;
/// Fewer dirty connections than this are written one `sendmsg` each. A
/// ring submission saves one syscall round trip per send after the first
/// (about 300 ns here: `cargo bench -p switchboard-bench --bench micro --
/// syscall`) and adds its own entries and completions; with one or two
/// sends that is no gain worth the extra path. The value is a judgment,
/// not a measured optimum.
pub(crate) const BATCH_MIN: usize = 4;

impl Writer {
    pub fn new(id: WorkerId, shared: Arc<Shared>, poller: Poller) -> Writer {
        let batch = shared.config.server.batch_sends && poller.batches_sends();
        Writer {
            id,
            shared,
            dirty: RefCell::new(Vec::new()),
            iov: RefCell::new([libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV_PER_WRITE]),
            batch: batch.then(|| RefCell::new(Batch::default())),
            staged: batch.then(|| RefCell::new(Batch::default())),
            poller: RefCell::new(poller),
        }
    }

    fn slots(&self) -> &OutSlots {
        &self.shared.outs[self.id.0 as usize]
    }

    fn counters(&self) -> &WorkerCounters {
        &self.shared.counters[self.id.0 as usize]
    }

    fn lock(&self, slot: u32, generation: u32) -> Option<OutGuard<'_>> {
        let g = self.slots().slots[slot as usize].lock();
        (g.generation == generation).then_some(g)
    }

    // ---- a connection's life --------------------------------------------------

    /// A new connection takes `slot`: its socket, and how frames for it are
    /// encoded (`Wire::Http` until a WebSocket upgrade). Not open to
    /// deliveries yet.
    pub fn attach(&self, slot: u32, generation: u32, fd: RawFd, wire: Wire) {
        let mut g = self.slots().slots[slot as usize].lock();
        debug_assert!(g.generation == 0 && g.out.is_empty(), "a free slot has no write state");
        g.generation = generation;
        g.set_fd(fd);
        g.wire = wire;
        let mut poller = self.poller.borrow_mut();
        poller.add(fd, token(slot, generation));
        poller.flush();
    }

    /// The connection's bytes change form (a WebSocket upgrade, or an HTTP
    /// request sniffed on the raw port). Only before it is open.
    pub fn set_wire(&self, slot: u32, generation: u32, wire: Wire) {
        if let Some(mut g) = self.lock(slot, generation) {
            debug_assert!(!g.open, "the wire is fixed once deliveries are accepted");
            g.wire = wire;
        }
    }

    /// Login: queues `first` (LOGIN_OK) and opens the connection to
    /// deliveries in one step under the lock, so a delivery from any thread
    /// (the user is in the directory already) goes behind it: LOGIN_OK is
    /// always the first frame of a logged-in connection (PROTOCOL.md 1.3).
    pub fn open(&self, slot: u32, generation: u32, first: &Bytes) {
        let Some(mut g) = self.lock(slot, generation) else { return };
        debug_assert!(!g.open && !g.is(CLOSING));
        // An empty queue holds it: the limits cannot refuse one frame.
        let _ = g.queue_raw(first, &self.shared.write_rules);
        g.open = true;
        self.mark_dirty(slot, &mut g);
        bump(&self.counters().frames_out, 1);
    }

    /// Queues a connection's own reply (logged in or not, not closing): a
    /// raw v1 frame encoded here for the connection's wire, or (`encoded`)
    /// bytes already in its wire form (an HTTP response, a WebSocket
    /// control frame). Flushed at the end of the turn, so the replies to
    /// one read go out in one write; but once they fill half of the
    /// queue's limit (frames or bytes) they are written at once: a client
    /// that pipelines more requests in one read than the queue holds
    /// replies for (1,100 PINGs in one write) was closed as a slow
    /// consumer for replies never offered to its socket. `Err(Overflow)`:
    /// the queue passed its limit; the caller closes the connection as a
    /// slow consumer.
    pub fn reply(&self, slot: u32, generation: u32, frame: Bytes, encoded: bool) -> Result<(), Overflow> {
        let Some(mut g) = self.lock(slot, generation) else { return Ok(()) };
        if g.is(CLOSING) {
            return Ok(());
        }
        let skipped = if encoded {
            g.queue(frame, 0, &self.shared.write_rules)
        } else {
            g.queue_raw(&frame, &self.shared.write_rules)
        };
        match skipped {
            Ok(skipped) => {
                let c = self.counters();
                bump(&c.frames_out, 1);
                if skipped > 0 {
                    bump(&c.skipped, skipped as u64);
                }
                self.mark_dirty(slot, &mut g);
                let limits = &self.shared.write_rules.limits;
                if !g.write_wait && (2 * g.out.frames() >= limits.max_frames || 2 * g.out.bytes() >= limits.max_bytes) {
                    // Still listed dirty: the turn's flush finds it empty
                    // (or full again) and goes on as for any other slot.
                    let state = self.write_out(&mut g);
                    self.settle(&mut g, slot, state);
                }
                Ok(())
            }
            Err(Overflow) => Err(Overflow),
        }
    }

    /// Closes the connection to deliveries and queues its last frame (`last`
    /// raw v1, or `encoded` in its wire form) behind what is queued, or
    /// instead of it (`discard_queue`: a slow consumer's backlog is not worth
    /// waiting for). FIN follows once the queue is written out.
    pub fn close(&self, slot: u32, generation: u32, last: Bytes, encoded: bool, discard_queue: bool) {
        let Some(mut g) = self.lock(slot, generation) else { return };
        g.open = false;
        if discard_queue {
            g.out.discard_unsent();
        }
        let last = if encoded { last } else { g.wire.encode(&last) };
        g.out.push_final(last);
        g.set(CLOSING);
        self.mark_dirty(slot, &mut g);
    }

    /// Frees the slot as its connection is released, and closes the socket.
    pub fn detach(&self, slot: u32, generation: u32, fd: RawFd) {
        // Under the lock: no other thread is writing to the socket, and none
        // will after this (the generation no longer matches).
        let mut g = self.slots().slots[slot as usize].lock();
        debug_assert_eq!(g.generation, generation);
        if g.write_wait {
            // Fire the armed write poll now; its event will find the slot
            // stale.
            sys::shutdown(fd, libc::SHUT_RDWR);
        }
        // Requests for this connection are void (see `OutState::reset`).
        g.reset();
        // The connection owned `fd` since its accept; its slot no longer
        // names it (generation 0), so nothing uses it again.
        self.poller.borrow_mut().close(fd, token(slot, generation));
    }

    // ---- deliveries ---------------------------------------------------------------

    /// Delivers `frame` to a logged-in connection on any worker (see
    /// [`deliver`]); this worker's own are written without the request list.
    pub fn deliver(&self, conn: ConnId, frame: Bytes) -> Delivered {
        if conn.worker() != self.id {
            return if deliver(&self.shared, conn, &frame) { Delivered::Queued } else { Delivered::No };
        }
        let m = Member { slot: conn.slot(), generation: conn.generation() };
        self.put(m, &mut Outgoing::new(&[frame]), Step::Single)
    }

    /// Writes (or queues) `out` (encoded lazily, once per wire) for one of
    /// this worker's logged-in connections, arming its write poll directly
    /// when the socket fills. See [`Step`] for how: a single delivery is
    /// written at once: a batch of one costs more than a `sendmsg`
    /// (measured at 20,000 relayed msgs/s: 4.6-4.9 µs of user CPU per
    /// message against 3.4-3.5, when every delivery was batched).
    ///
    /// `Step::Batched`: a member with nothing queued is not queued either.
    /// Its send is staged, pointing at `out`'s frames, and goes out with the
    /// step's batch, [`Writer::send_staged`], which the caller runs before
    /// `out` is dropped (`flush_dirty` checks in debug builds that none is
    /// left). Only what its socket does not take is queued then. So a
    /// fan-out's delivery costs no allocation and no reference count
    /// unless the member is behind.
    pub fn put(&self, m: Member, out: &mut Outgoing<'_>, step: Step) -> Delivered {
        let mut skipped = 0;
        let mut written = 0;
        let frames;
        let r = {
            let Some(mut g) = self.lock(m.slot, m.generation) else { return Delivered::No };
            if !g.open {
                return Delivered::No;
            }
            let Some(e) = out.get(g.wire) else { return Delivered::No };
            frames = e.frames.len();
            if let (Step::Batched, Some(staged)) = (step, &self.staged) {
                if g.can_stage(&e, &self.shared.write_rules) {
                    g.set(STAGED);
                    let mut b = staged.borrow_mut();
                    b.add(m.slot, m.generation, g.fd(), &e.iov[..frames]);
                    drop(g);
                    bump(&self.counters().frames_out, frames as u64);
                    if b.sends.len() == BATCH_MAX {
                        drop(b);
                        self.send_staged(out);
                    }
                    return Delivered::Batched;
                }
            }
            let r = g.put(e, &self.shared.write_rules, &mut skipped, &mut written);
            match r {
                Put::Queued { full: true } if !g.write_wait => {
                    g.write_wait = true;
                    bump(&self.counters().write_waits, 1);
                    self.poller.borrow_mut().want_write(g.fd(), token(m.slot, m.generation));
                }
                Put::Overflow => g.open = false,
                Put::Broken => sys::shutdown(g.fd(), libc::SHUT_RDWR),
                _ => {}
            }
            r
        };
        let c = self.counters();
        if skipped > 0 {
            bump(&c.skipped, skipped as u64);
        }
        if written > 0 {
            bump(&c.detail.bytes_out, written as u64);
        }
        match r {
            Put::Sent => {
                if step == Step::Single {
                    bump(&c.writes, 1);
                    bump(&c.frames_out, frames as u64);
                }
                Delivered::Direct
            }
            Put::Queued { .. } => {
                bump(&c.frames_out, frames as u64);
                Delivered::Queued
            }
            Put::Overflow => Delivered::Overflow,
            Put::Broken => Delivered::No,
        }
    }

    /// Benchmark only (`Handle::bench_send_ceiling`): a plain blocking send
    /// of `frame` to one member with nothing queued, under its lock, until
    /// `deadline`; one that takes nothing by then is cut off. Returns
    /// whether it was sent whole.
    pub fn send_blocking(&self, m: Member, frame: &Bytes, deadline: std::time::Instant) -> bool {
        let Some(g) = self.lock(m.slot, m.generation) else { return false };
        if !g.out.is_empty() {
            return false;
        }
        if sys::send_all_until(g.fd(), frame, deadline) {
            return true;
        }
        sys::shutdown(g.fd(), libc::SHUT_RDWR);
        false
    }

    // ---- flushing --------------------------------------------------------------------

    fn mark_dirty(&self, slot: u32, g: &mut OutGuard<'_>) {
        if !g.set(DIRTY) {
            self.dirty.borrow_mut().push(slot);
        }
    }

    /// Writes out every connection with frames queued this turn.
    pub fn flush_dirty(&self) {
        debug_assert!(
            self.staged.as_ref().is_none_or(|b| b.borrow().sends.is_empty()),
            "a fan-out step's staged sends go out before the turn's flush (send_staged)"
        );
        loop {
            let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
            if dirty.is_empty() {
                return;
            }
            match &self.batch {
                Some(batch) if dirty.len() >= BATCH_MIN => {
                    let mut b = batch.borrow_mut();
                    for &slot in &dirty {
                        self.collect(&mut b, slot);
                        if b.sends.len() == BATCH_MAX {
                            self.send_batch(&mut b);
                        }
                    }
                    self.send_batch(&mut b);
                }
                _ => {
                    for &slot in &dirty {
                        self.flush(slot);
                    }
                }
            }
            let mut d = self.dirty.borrow_mut();
            if d.is_empty() {
                let mut dirty = dirty;
                dirty.clear();
                *d = dirty; // keep the allocation for the next batch
            }
        }
    }

    /// Locks a slot taken off the dirty list and clears its flag; `None`
    /// if there is nothing to flush: stale, or waiting for room (flushed
    /// when the poller reports it).
    fn take_dirty(&self, slot: u32) -> Option<OutGuard<'_>> {
        let mut g = self.slots().slots[slot as usize].lock();
        (g.clear(DIRTY) && g.generation != 0 && !g.write_wait).then_some(g)
    }

    fn flush(&self, slot: u32) {
        let Some(mut g) = self.take_dirty(slot) else { return };
        let state = self.write_out(&mut g);
        self.settle(&mut g, slot, state);
    }

    /// After a flush's writes: FIN for a closing connection that is
    /// drained, a write poll for a full socket, shutdown for a broken one.
    fn settle(&self, g: &mut OutGuard<'_>, slot: u32, state: WriteState) {
        match state {
            WriteState::Drained => self.after_drain(g),
            WriteState::Blocked => {
                g.write_wait = true;
                bump(&self.counters().write_waits, 1);
                self.poller.borrow_mut().want_write(g.fd(), token(slot, g.generation));
            }
            WriteState::Failed => {
                g.out.clear();
                sys::shutdown(g.fd(), libc::SHUT_RDWR);
            }
        }
    }

    /// Batched sends: adds the head of `slot`'s queue (up to 64 frames)
    /// to `b`, pinned, where `flush` would write it.
    fn collect(&self, b: &mut Batch, slot: u32) {
        let Some(mut g) = self.take_dirty(slot) else { return };
        let mut iov = self.iov.borrow_mut();
        let n = g.out.fill_iovecs(&mut iov);
        if n == 0 {
            self.after_drain(&mut g);
            return;
        }
        g.out.pin(n);
        b.add(slot, g.generation, g.fd(), &iov[..n]);
    }

    /// Submits the sends `collect` gathered, in one `io_uring_enter`, and
    /// settles each connection by what its socket took, as `flush` does.
    fn send_batch(&self, b: &mut Batch) {
        self.complete_batch(b, |g, written, _| {
            g.out.unpin();
            g.out.advance(written);
        });
    }

    /// Writes a fan-out step's staged sends (`Step::Batched`) of `out`'s
    /// frames, in one `io_uring_enter` per `BATCH_MAX`. A member whose
    /// socket took less gets the rest in front of its queue, ahead of
    /// what other threads queued meanwhile, and its write poll; one whose
    /// queue others filled meanwhile is flushed with this turn's dirty
    /// slots.
    pub fn send_staged(&self, out: &mut Outgoing<'_>) {
        let Some(staged) = &self.staged else { return };
        self.complete_batch(&mut staged.borrow_mut(), |g, written, whole| {
            g.clear(STAGED);
            if !whole {
                let wire = g.wire;
                g.put_back(out.get(wire).expect("a staged send has an encoding"), written);
            }
        });
    }

    /// Submits `b` and settles each of its sends: `took` first updates the
    /// slot (locked) by the bytes written (0 if the socket had no room or
    /// failed) and whether that was all it offered; then a socket that
    /// took less gets its write poll, a broken one is shut down, and a
    /// queue that others filled meanwhile (or that held more than 64
    /// frames) is marked for the next round of the flush.
    fn complete_batch(&self, b: &mut Batch, mut took: impl FnMut(&mut OutGuard<'_>, usize, bool)) {
        if b.sends.is_empty() {
            return;
        }
        b.submit(&mut self.poller.borrow_mut());
        let c = self.counters();
        for (&(slot, generation, offered), &res) in b.sends.iter().zip(&b.res) {
            let mut g = self.slots().slots[slot as usize].lock();
            debug_assert_eq!(g.generation, generation, "a slot in a batch is not released");
            let written = usize::try_from(res).unwrap_or(0);
            if res >= 0 {
                bump(&c.writes, 1);
                bump(&c.detail.bytes_out, written as u64);
            }
            let whole = res >= 0 && written == offered;
            took(&mut g, written, whole);
            let state = if whole {
                if !g.out.is_empty() {
                    self.mark_dirty(slot, &mut g);
                    continue;
                }
                WriteState::Drained
            } else if res >= 0 || res == -libc::EAGAIN {
                WriteState::Blocked
            } else {
                tracing::trace!(worker = self.id.0, fd = g.fd(), "write failed: errno {}", -res);
                WriteState::Failed
            };
            self.settle(&mut g, slot, state);
        }
        b.clear();
    }

    /// Writes as much of the queue as the socket takes, 64 frames per
    /// syscall.
    fn write_out(&self, g: &mut OutState) -> WriteState {
        let mut iov = self.iov.borrow_mut();
        loop {
            let n = g.out.fill_iovecs(&mut iov);
            if n == 0 {
                return WriteState::Drained;
            }
            let offered: usize = iov[..n].iter().map(|v| v.iov_len).sum();
            match sys::sendmsg(g.fd(), &iov[..n]) {
                Send::Wrote(w) => {
                    let c = self.counters();
                    bump(&c.writes, 1);
                    bump(&c.detail.bytes_out, w as u64);
                    g.out.advance(w);
                    if w < offered {
                        return WriteState::Blocked;
                    }
                }
                Send::WouldBlock => return WriteState::Blocked,
                Send::Error(e) => {
                    tracing::trace!(worker = self.id.0, fd = g.fd(), "write failed: {e}");
                    return WriteState::Failed;
                }
            }
        }
    }

    /// The queue is empty: a closing connection now sends its FIN.
    fn after_drain(&self, g: &mut OutState) {
        if g.is(CLOSING) && !g.set(FIN_SENT) {
            sys::shutdown(g.fd(), libc::SHUT_WR);
        }
    }

    /// The socket has room again. Returns true to keep waiting for more.
    pub fn on_writable(&self, slot: u32, generation: u32) -> bool {
        let Some(mut g) = self.lock(slot, generation) else { return false };
        if !g.write_wait {
            return false; // a late event after the queue drained
        }
        if self.batch.is_some() {
            // The backlog goes out with this turn's batch; a socket that
            // fills again arms a new poll then. The interest ends here: the
            // io_uring poll was one-shot, but epoll's is level-triggered
            // and would report the drained socket on every turn.
            g.write_wait = false;
            self.poller.borrow_mut().write_done(g.fd(), token(slot, generation));
            self.mark_dirty(slot, &mut g);
            return false;
        }
        match self.write_out(&mut g) {
            WriteState::Drained => {
                g.write_wait = false;
                self.poller.borrow_mut().write_done(g.fd(), token(slot, generation));
                self.after_drain(&mut g);
                false
            }
            WriteState::Blocked => true,
            WriteState::Failed => {
                g.write_wait = false;
                self.poller.borrow_mut().write_done(g.fd(), token(slot, generation));
                g.out.clear();
                sys::shutdown(g.fd(), libc::SHUT_RDWR);
                false
            }
        }
    }

    /// Requests other threads left on this worker's slots: arms a write
    /// poll for a socket they filled; returns in `close` the connections
    /// whose queue they found over its limit (slot, generation), for the
    /// caller to close as slow consumers.
    pub fn take_requests(&self, scratch: &mut Vec<u32>, close: &mut Vec<(u32, u32)>) {
        scratch.clear();
        self.slots().take_requests(scratch);
        for &slot in scratch.iter() {
            let mut g = self.slots().slots[slot as usize].lock();
            g.listed = false;
            if std::mem::take(&mut g.needs_arm) && g.write_wait {
                bump(&self.counters().write_waits, 1);
                self.poller.borrow_mut().want_write(g.fd(), token(slot, g.generation));
            }
            if std::mem::take(&mut g.needs_close) {
                close.push((slot, g.generation));
            }
        }
        self.poller.borrow_mut().flush();
    }
}
