//! One worker: its connections, its wheel, its mailbox, on one monoio runtime.
//!
//! Owns: the connection table (a slab of `Conn`, preallocated), each
//! connection's session, partial-frame buffer and outbound queue; the timing
//! wheel; the dirty list of connections with output to flush; the per-worker
//! scratch buffer every read drains into.
//! Must not: be touched from another thread (everything here is `Rc` /
//! `RefCell`, reached only by this worker's tasks), hold a `RefCell` borrow
//! across an `.await`, or hold a buffer for an idle connection.
//!
//! Tasks per worker (none per connection): `accepts_per_worker` accept
//! loops, one tick loop, one mailbox loop, and one I/O loop that waits on the
//! worker's readiness poller (`poller.rs`) and handles every connection's
//! read and write readiness.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use monoio::net::{TcpListener, UnixStream};
use slab::Slab;

use super::outslot::{OutSlots, OutState, Outgoing, Put};
use super::poller::{token, untoken, Poller, Ready};
use super::sys::{self, Recv, Send};
use crate::directory::ConnList;
use crate::ids::{ConnId, WorkerId};
use crate::outq::{Overflow, MAX_IOV_PER_WRITE};
use crate::proto::codes::{CloseCode, ErrorCode, LoginErrorCode};
use crate::proto::frame::FrameType;
use crate::proto::frame::{clip_reason, decode, Frame, RoomOp, MAX_LOGIN_FRAME_BYTES, PING_EMPTY};
use crate::proto::session::{Inbound, Phase, Tick, TickAction};
use crate::proto::wire::{Wire, MAX_LOGIN_MESSAGE_BYTES, SUBPROTOCOLS};
use crate::proto::ws::{self, handshake, Decoder, WsEvent};
use crate::rooms::{LocalRooms, Member, RoomError, RoomIdx};
use crate::server::{CeilingSample, ClientMessage, ClientMessageKind, Command, Handle, Shared};
use crate::stats::{bump, drop_one, WorkerCounters};
use crate::wheel::{Entry, Wheel};

/// Bytes every read drains into (one buffer per worker, never per
/// connection). 64 KiB: a burst from one client is read in few syscalls.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// Capacity an incomplete frame's buffer may keep beyond twice its length
/// between reads (more is given back).
const KEEP_PARTIAL_CAPACITY: usize = 4096;
/// Reads per readiness event before yielding to other connections, so one
/// flooding client cannot monopolise the worker (1 MiB at most).
const MAX_READS_PER_WAKE: usize = 16;
/// Mailbox commands handled between two flushes and yields.
const MAILBOX_BATCH: usize = 4096;
/// Due wheel entries handled before yielding.
const TICK_BATCH: usize = 4096;
/// Readiness events handled between two flushes and yields.
const IO_BATCH: usize = 4096;
/// Members written to per fan-out step; between steps the worker yields so
/// reads, heartbeats and other commands are not starved by a large room.
const FANOUT_CHUNK: usize = 2048;

/// Connection flags.
const DIRTY: u8 = 1;
/// FIN sent (closing, queue flushed).
const FIN_SENT: u8 = 4;
/// What the connection's bytes are (flags bits 4-5).
const T_MASK: u8 = 3 << 4;
/// Raw protocol v1 frames.
const T_RAW: u8 = 0;
/// Not known yet: the raw port with `websocket.sniff_on_raw_port`, before
/// the first bytes.
const T_SNIFF: u8 = 1 << 4;
/// An HTTP request: the WebSocket upgrade (or a page) is being read.
const T_HTTP: u8 = 2 << 4;
/// WebSocket frames.
const T_WS: u8 = 3 << 4;

/// One connection's state. Its size is asserted below: it is most of what
/// an idle connection costs us.
// `Option<Box<Vec<_>>>` on purpose: 8 bytes in the slot instead of a Vec's
// 24, for fields that are `None` on almost every connection.
#[allow(clippy::box_collection)]
struct Conn {
    /// Set once logged in; shared with the directory key.
    user: Option<Arc<str>>,
    /// An incomplete frame or WebSocket message; `None` (no allocation)
    /// when idle.
    held: Option<Box<Held>>,
    /// Rooms this connection is in, with its position in each room's
    /// member list; `None` when in no room.
    rooms: Option<Box<Vec<(RoomIdx, u32)>>>,
    session: crate::proto::session::Session,
    fd: RawFd,
    generation: u32,
    /// Tick of this connection's live wheel entry.
    wheel_at: Tick,
    flags: u8,
}

const _: () = assert!(std::mem::size_of::<Conn>() <= 64);

/// What a connection holds between reads while a frame (or a fragmented
/// WebSocket message) is incomplete, charged to the worker's budget
/// (`limits.partial_bytes_per_worker`) and listed in the worker's holders
/// (oldest first), which the budget and `timeouts.message_timeout_ms`
/// close from.
struct Held {
    /// Bytes of an incomplete frame (empty while only `ws` holds).
    partial: Vec<u8>,
    /// WebSocket, mid-message: the decoder holding the fragments so far
    /// (between messages a decoder holds nothing worth keeping).
    ws: Option<Decoder>,
    /// Key in the worker's holders list.
    seq: u64,
    /// Bytes charged to the budget: the buffers' capacities and this box.
    charged: usize,
}

/// A holder in the worker's list: the connection and the tick it started
/// holding.
#[derive(Copy, Clone, Debug)]
struct Holder {
    slot: u32,
    generation: u32,
    since: Tick,
}

/// How a delivery went.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Delivered {
    /// One write took it all.
    Direct,
    /// Queued (behind other frames, or the socket was full).
    Queued,
    /// The connection is gone, closing, or not logged in.
    No,
}

/// What the last write attempt left.
enum WriteState {
    Drained,
    Blocked,
    Failed,
}

pub(crate) struct Worker {
    id: WorkerId,
    shared: Arc<Shared>,
    handle: Handle,
    conns: RefCell<Slab<Conn>>,
    poller: RefCell<Poller>,
    wheel: RefCell<Wheel>,
    dirty: RefCell<Vec<u32>>,
    scratch: RefCell<Box<[u8]>>,
    iov: RefCell<[libc::iovec; MAX_IOV_PER_WRITE]>,
    lookup: RefCell<ConnList>,
    rooms: RefCell<LocalRooms>,
    /// Snapshot of the members a fan-out writes to (reused).
    fanout: RefCell<Vec<Member>>,
    /// Connections that stopped reading at `MAX_READS_PER_WAKE` with data
    /// possibly left: an edge-triggered poller will not report it again,
    /// so the I/O loop comes back to them.
    read_again: RefCell<Vec<(u32, u32)>>,
    next_generation: Cell<u32>,
    next_msg: Cell<u64>,
    now: Cell<Tick>,
    /// Frame refusing a connection when the table is full.
    server_full: Bytes,
    /// Set at the very end of a shutdown: the tick loop exits.
    stopped: Cell<bool>,
    /// The tick loop's waker while it sleeps, for `stopped`.
    stop_waker: Cell<Option<std::task::Waker>>,
    /// The listening sockets, raw and WebSocket (-1: none), for stopping
    /// them at a drain or shutdown.
    listener_fd: Cell<RawFd>,
    ws_listener_fd: Cell<RawFd>,
    /// `websocket.message_limit()`.
    ws_max_message: usize,
    /// A drain task was started; it set `drained` when done.
    drain_started: Cell<bool>,
    drained: Cell<bool>,
    /// Accept loops still running: a drain waits for them to end, since an
    /// accept in flight can still hand over a connection after the
    /// listener is shut (dropping it unread would reset the client).
    accepting: Cell<u32>,
    /// State of the generator behind the drain's reconnect hints.
    hint_rng: Cell<u64>,
    /// The poller saw the mailbox eventfd fire; the mailbox loop's waker.
    mailbox_ready: Cell<bool>,
    mailbox_waker: Cell<Option<std::task::Waker>>,
    /// Connections holding an incomplete frame, oldest first (by `Held::seq`).
    holders: RefCell<std::collections::BTreeMap<u64, Holder>>,
    next_hold: Cell<u64>,
    /// Bytes charged by every `Held` of this worker.
    held_bytes: Cell<usize>,
}

/// Resolves once the I/O loop reports a mailbox wake.
struct MailboxWake<'a>(&'a Worker);

impl Future for MailboxWake<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let w = self.0;
        if w.mailbox_ready.replace(false) || w.stopped.get() {
            return Poll::Ready(());
        }
        w.mailbox_waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// Resolves once the worker is stopped (the tick loop's way out of its
/// sleep at shutdown).
struct Stopped<'a>(&'a Worker);

impl Future for Stopped<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.stopped.get() {
            return Poll::Ready(());
        }
        self.0.stop_waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// Yields once to the scheduler (monoio 0.2 has no `yield_now`).
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fn close_frame(code: CloseCode, reason: &str) -> Bytes {
    Frame::Close { code: code as u16, reason: clip_reason(reason) }.to_bytes().expect("reason clipped")
}

/// A seed for a worker's reconnect hints that differs per process and per
/// worker (the clock, the pid, the worker index), so two servers draining
/// at once do not hand out the same sequence. Never zero (xorshift).
fn hint_seed(id: WorkerId) -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mixed = (nanos ^ ((std::process::id() as u64) << 32) ^ (id.0 as u64 + 1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    mixed | 1
}

/// The message of a caught panic.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + std::marker::Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn unix_now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Worker {
    pub(crate) fn new(id: WorkerId, shared: Arc<Shared>, poller: Poller) -> Worker {
        let now = current_tick(&shared);
        Worker {
            id,
            handle: Handle { shared: shared.clone() },
            conns: RefCell::new(Slab::with_capacity(shared.max_conns_per_worker)),
            poller: RefCell::new(poller),
            wheel: RefCell::new(Wheel::new(now)),
            dirty: RefCell::new(Vec::new()),
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            iov: RefCell::new([libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV_PER_WRITE]),
            lookup: RefCell::new(ConnList::new()),
            rooms: RefCell::new(LocalRooms::default()),
            fanout: RefCell::new(Vec::new()),
            read_again: RefCell::new(Vec::new()),
            next_generation: Cell::new(1),
            next_msg: Cell::new(0),
            now: Cell::new(now),
            server_full: close_frame(CloseCode::ServerFull, CloseCode::ServerFull.reason()),
            stopped: Cell::new(false),
            stop_waker: Cell::new(None),
            listener_fd: Cell::new(-1),
            ws_listener_fd: Cell::new(-1),
            ws_max_message: shared.config.websocket.message_limit(shared.config.limits.max_frame_bytes),
            drain_started: Cell::new(false),
            drained: Cell::new(false),
            accepting: Cell::new(0),
            hint_rng: Cell::new(hint_seed(id)),
            mailbox_ready: Cell::new(false),
            mailbox_waker: Cell::new(None),
            holders: RefCell::new(std::collections::BTreeMap::new()),
            next_hold: Cell::new(0),
            held_bytes: Cell::new(0),
            shared,
        }
    }

    fn counters(&self) -> &WorkerCounters {
        &self.shared.counters[self.id.0 as usize]
    }

    fn refresh_now(&self) -> Tick {
        let now = current_tick(&self.shared);
        self.now.set(now);
        now
    }

    /// Message ids minted on this worker: worker index + 1 in bits 48..56,
    /// so they never collide with the handle's (below 2^48) or another
    /// worker's.
    fn next_msg_id(&self) -> u64 {
        let n = self.next_msg.get().wrapping_add(1) & 0xFFFF_FFFF_FFFF;
        self.next_msg.set(n);
        ((self.id.0 as u64 + 1) << 48) | n
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.conns.borrow().len()
    }

    // ---- accept -------------------------------------------------------------

    /// A shutdown or a drain has begun: no new connections.
    fn stopping(&self) -> bool {
        self.shared.shutdown.load(Ordering::Acquire) || self.shared.draining.load(Ordering::Acquire)
    }

    /// A new connection, from the raw TCP listener or (`websocket`) the
    /// WebSocket one, or (`handed`) from another worker that had no room.
    fn on_accept(&self, fd: OwnedFd, websocket: bool, handed: bool) {
        // While draining, a connection accepted before the listener was shut
        // is served: the drain logs it in and then sends it the CLOSE with
        // the reconnect hint. Dropping it here would reset the client when
        // its LOGIN is already waiting unread (measured: 1-5 resets per
        // overlapping restart in tests/deploy.rs).
        if self.shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        let mut conns = self.conns.borrow_mut();
        if conns.len() >= self.shared.max_conns_per_worker {
            drop(conns);
            // SO_REUSEPORT spreads connections by a hash of their
            // addresses, not by room: another worker may have slots left.
            // One hop only: a worker that was handed a connection and is
            // full itself refuses it.
            let fd = if handed {
                fd
            } else {
                match self.hand_off(fd, websocket) {
                    None => return,
                    Some(fd) => fd,
                }
            };
            bump(&self.counters().refused_full, 1);
            let raw = fd.as_raw_fd();
            if websocket {
                sys::send_once(raw, &Wire::Http.encode(&self.server_full));
            } else {
                sys::send_once(raw, &self.server_full);
            }
            drop(fd);
            return;
        }
        // From here on the socket is a plain descriptor owned by its slot
        // (closed in `release`): readiness comes from the worker's poller,
        // I/O is plain syscalls. Close-on-exec: io_uring's accept (monoio
        // 0.2.4) sets no flags, and a child process the embedding
        // application spawns must not inherit, and keep open, our clients'
        // sockets.
        let fd = fd.into_raw_fd();
        sys::set_cloexec(fd);
        let (transport, wire) = if websocket {
            (T_HTTP, Wire::Http)
        } else if self.shared.config.websocket.sniff_on_raw_port {
            (T_SNIFF, Wire::Raw)
        } else {
            (T_RAW, Wire::Raw)
        };
        if self.shared.config.socket.nodelay {
            sys::set_nodelay(fd);
        }
        let generation = self.next_generation.get();
        self.next_generation.set(generation.wrapping_add(1).max(1));
        let now = self.refresh_now();
        let session = crate::proto::session::Session::new(now);
        let entry = conns.vacant_entry();
        let slot = entry.key() as u32;
        let wheel_at = self.wheel.borrow_mut().insert(session.next_deadline(&self.shared.timeouts), slot, generation);
        {
            let mut g = self.outs().slots[slot as usize].lock();
            debug_assert!(g.generation == 0 && g.out.is_empty(), "a free slot has no write state");
            g.generation = generation;
            g.set_fd(fd);
            g.open = false;
            g.write_wait = false;
            g.wire = wire;
        }
        entry.insert(Conn { user: None, held: None, rooms: None, session, fd, generation, wheel_at, flags: transport });
        drop(conns);
        let mut poller = self.poller.borrow_mut();
        poller.add(fd, token(slot, generation));
        poller.flush();
        let c = self.counters();
        bump(&c.accepted, 1);
        bump(&c.connections, 1);
    }

    /// Offers a connection this worker has no room for to the worker with
    /// the most free slots. Gives it back when no other worker has room or
    /// that worker's mailbox is full.
    fn hand_off(&self, fd: OwnedFd, websocket: bool) -> Option<OwnedFd> {
        let max = self.shared.max_conns_per_worker as u64;
        let target = self
            .shared
            .counters
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != self.id.0 as usize)
            .map(|(i, c)| (i, max.saturating_sub(c.connections.load(Ordering::Relaxed))))
            .filter(|&(_, free)| free > 0)
            .max_by_key(|&(_, free)| free)
            .map(|(i, _)| i);
        let Some(target) = target else { return Some(fd) };
        match self.shared.mailboxes[target].offer(Command::Adopt { fd, websocket }) {
            Ok(()) => {
                bump(&self.counters().handed_off, 1);
                None
            }
            Err(Command::Adopt { fd, .. }) => Some(fd),
            Err(_) => unreachable!("offer returns the command it was given"),
        }
    }

    /// One readiness event from the poller.
    fn on_ready(self: &Rc<Self>, tok: u64, ready: Ready) {
        if let Ready::Mailbox { rearm } = ready {
            if rearm {
                self.poller.borrow_mut().watch_mailbox(self.shared.mailboxes[self.id.0 as usize].eventfd());
            }
            self.mailbox_ready.set(true);
            if let Some(waker) = self.mailbox_waker.take() {
                waker.wake();
            }
            return;
        }
        let (slot, generation, _) = untoken(tok);
        let fd = match self.conns.borrow().get(slot as usize) {
            Some(c) if c.generation == generation => c.fd,
            _ => return, // stale: the connection is gone
        };
        match ready {
            Ready::Read { rearm } => {
                if self.on_readable(slot, generation) {
                    if rearm {
                        self.poller.borrow_mut().rearm_read(fd, tok);
                    }
                } else {
                    self.release(slot, generation);
                }
            }
            Ready::Write => {
                if self.on_writable(slot, generation) {
                    self.poller.borrow_mut().want_write(fd, tok);
                }
            }
            Ready::Mailbox { .. } => unreachable!("handled above"),
        }
    }

    // ---- read path ----------------------------------------------------------

    /// Drains a readable socket and acts on every whole frame. Returns false
    /// when the connection is finished and must be released.
    fn on_readable(self: &Rc<Self>, slot: u32, generation: u32) -> bool {
        let (fd, mut held) = {
            let mut conns = self.conns.borrow_mut();
            match conns.get_mut(slot as usize) {
                Some(c) if c.generation == generation => (c.fd, c.held.take()),
                _ => return false,
            }
        };
        let (mut partial, mut dec) = match held.as_deref_mut() {
            Some(h) => (std::mem::take(&mut h.partial), h.ws.take()),
            None => (Vec::new(), None),
        };
        let mut open = true;
        let mut drained = false;
        {
            let mut scratch = self.scratch.borrow_mut();
            for _ in 0..MAX_READS_PER_WAKE {
                match sys::recv(fd, &mut scratch) {
                    Recv::Data(n) => {
                        if partial.is_empty() {
                            let used = self.on_bytes(slot, generation, &mut scratch[..n], &mut dec);
                            partial.extend_from_slice(&scratch[used..n]);
                        } else {
                            partial.extend_from_slice(&scratch[..n]);
                            let used = self.on_bytes(slot, generation, &mut partial, &mut dec);
                            partial.drain(..used);
                        }
                        if n < scratch.len() {
                            drained = true;
                            break;
                        }
                    }
                    Recv::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Recv::Eof => {
                        open = false;
                        break;
                    }
                    Recv::Error(e) => {
                        tracing::trace!(worker = self.id.0, slot, "read failed: {e}");
                        open = false;
                        break;
                    }
                }
            }
        }
        if open && !drained {
            self.read_again.borrow_mut().push((slot, generation));
        }
        self.keep_held(slot, generation, held, partial, dec);
        self.flush_dirty();
        open
    }

    /// Puts back what a connection holds after a read (an incomplete frame,
    /// a decoder mid-message), charged to the worker's budget, or lets it
    /// go when nothing is incomplete or the connection is closing. Then
    /// closes the longest holders while the worker is over its budget.
    fn keep_held(
        self: &Rc<Self>,
        slot: u32,
        generation: u32,
        held: Option<Box<Held>>,
        partial: Vec<u8>,
        ws: Option<Decoder>,
    ) {
        {
            let mut conns = self.conns.borrow_mut();
            let c = conns
                .get_mut(slot as usize)
                .filter(|c| c.generation == generation && c.session.phase() != Phase::Closing);
            let Some(c) = c else {
                if let Some(h) = held {
                    self.forget_held(&h);
                }
                return;
            };
            debug_assert!(c.held.is_none(), "a connection's held buffers were taken for the read");
            if partial.is_empty() && ws.is_none() {
                if let Some(h) = held {
                    self.forget_held(&h);
                }
                return;
            }
            let mut h = held.unwrap_or_else(|| {
                let seq = self.next_hold.get();
                self.next_hold.set(seq + 1);
                let since = self.now.get();
                let fresh = self.holders.borrow_mut().insert(seq, Holder { slot, generation, since });
                debug_assert!(fresh.is_none(), "holder keys are never reused");
                Box::new(Held { partial: Vec::new(), ws: None, seq, charged: 0 })
            });
            // The read accumulator keeps the capacity of its largest read:
            // give back what an emptied or much shrunk buffer no longer uses.
            let mut partial = partial;
            if partial.is_empty() {
                partial = Vec::new();
            } else if partial.capacity() > 2 * partial.len().max(KEEP_PARTIAL_CAPACITY) {
                partial.shrink_to_fit();
            }
            h.partial = partial;
            h.ws = ws;
            let charge = std::mem::size_of::<Held>()
                + h.partial.capacity()
                + h.ws.as_ref().map_or(0, Decoder::buffered_capacity);
            self.held_bytes.set(self.held_bytes.get() - h.charged + charge);
            h.charged = charge;
            c.held = Some(h);
        }
        let budget = self.shared.config.limits.partial_bytes_per_worker;
        while self.held_bytes.get() > budget {
            let Some(oldest) = self.holders.borrow().first_key_value().map(|(_, &h)| h) else { break };
            bump(&self.counters().partial_budget_closes, 1);
            tracing::debug!(
                worker = self.id.0,
                slot = oldest.slot,
                "partial-frame budget exhausted: closing the oldest holder"
            );
            self.drop_holder(oldest, CloseCode::TryAgainLater, CloseCode::TryAgainLater.reason());
        }
    }

    /// Un-charges a connection's held buffers and takes it off the holders.
    fn forget_held(&self, h: &Held) {
        let removed = self.holders.borrow_mut().remove(&h.seq);
        debug_assert!(removed.is_some(), "every Held is listed once");
        self.held_bytes.set(self.held_bytes.get() - h.charged);
    }

    /// Closes a holder (its close lets its buffers go); a holder whose
    /// connection cannot start closing is taken off the list directly, so
    /// the callers' loops always progress.
    fn drop_holder(self: &Rc<Self>, h: Holder, code: CloseCode, reason: &str) {
        self.begin_close(h.slot, h.generation, code, reason);
        let stale = {
            let holders = self.holders.borrow();
            holders.first_key_value().filter(|(_, f)| f.slot == h.slot && f.generation == h.generation).map(|(&k, _)| k)
        };
        if let Some(k) = stale {
            debug_assert!(false, "a listed holder that could not be closed");
            self.holders.borrow_mut().remove(&k);
        }
    }

    /// Closes (1008) the connections whose incomplete frame or message is
    /// older than `timeouts.message_timeout_ms`.
    fn expire_held(self: &Rc<Self>, now: Tick) {
        let limit = self.shared.timeouts.message;
        loop {
            let Some(oldest) = self.holders.borrow().first_key_value().map(|(_, &h)| h) else { return };
            if now.wrapping_sub(oldest.since) < limit {
                return;
            }
            bump(&self.counters().message_timeouts, 1);
            let reason = "a frame or message was not completed within timeouts.message_timeout_ms";
            self.drop_holder(oldest, CloseCode::PolicyViolation, reason);
        }
    }

    /// Handles the whole frames (or the HTTP request) at the start of
    /// `data`; returns the bytes consumed (all of them once the connection
    /// is closing: input is then discarded). `dec` is a WebSocket
    /// connection's decoder kept across reads (mid-message only).
    fn on_bytes(self: &Rc<Self>, slot: u32, generation: u32, data: &mut [u8], dec: &mut Option<Decoder>) -> usize {
        let mut off = 0;
        while off < data.len() {
            let transport = match self.conns.borrow().get(slot as usize) {
                Some(c) if c.generation == generation && c.session.phase() != Phase::Closing => c.flags & T_MASK,
                _ => return data.len(),
            };
            let used = match transport {
                T_RAW => self.on_raw_bytes(slot, generation, &data[off..]),
                T_WS => self.on_ws_bytes(slot, generation, &mut data[off..], dec),
                T_HTTP => self.on_http_bytes(slot, generation, &data[off..]),
                _ => {
                    let t = match handshake::looks_like_http(&data[off..]) {
                        None => break,
                        Some(true) => T_HTTP,
                        Some(false) => T_RAW,
                    };
                    self.set_transport(slot, generation, t, (t == T_HTTP).then_some(Wire::Http));
                    continue;
                }
            };
            if used == 0 {
                break;
            }
            off += used;
        }
        if self.is_closing(slot, generation) {
            return data.len();
        }
        off
    }

    /// Changes what a connection's bytes are, and (if given) how its
    /// writers encode.
    fn set_transport(&self, slot: u32, generation: u32, transport: u8, wire: Option<Wire>) {
        if let Some(c) = self.conns.borrow_mut().get_mut(slot as usize).filter(|c| c.generation == generation) {
            c.flags = (c.flags & !T_MASK) | transport;
        }
        if let Some(wire) = wire {
            let mut g = self.outs().slots[slot as usize].lock();
            if g.generation == generation {
                g.wire = wire;
            }
        }
    }

    /// The phase of a live connection (`None`: gone).
    fn phase(&self, slot: u32, generation: u32) -> Option<Phase> {
        match self.conns.borrow().get(slot as usize) {
            Some(c) if c.generation == generation => Some(c.session.phase()),
            _ => None,
        }
    }

    /// Raw protocol v1: decodes and handles whole frames. Before login
    /// nothing larger than the largest LOGIN is accepted, so a connection
    /// that has not logged in cannot make the server buffer more.
    fn on_raw_bytes(self: &Rc<Self>, slot: u32, generation: u32, data: &[u8]) -> usize {
        let mut off = 0;
        while off < data.len() {
            let max = match self.phase(slot, generation) {
                Some(Phase::Active) => self.shared.config.limits.max_frame_bytes,
                Some(Phase::AwaitingLogin) => MAX_LOGIN_FRAME_BYTES,
                Some(Phase::Closing) | None => return data.len(),
            };
            match decode(&data[off..], max) {
                Ok(None) => break,
                Ok(Some((frame, n))) => {
                    off += n;
                    self.on_frame(slot, generation, frame);
                }
                Err(e) => {
                    if max == MAX_LOGIN_FRAME_BYTES {
                        // The first bytes of a connection: an HTTP client on
                        // the wrong port (a browser, curl) gets an answer it
                        // can show, naming the right one.
                        match handshake::looks_like_http_request(&data[off..]) {
                            None => break, // could still be a method: wait for it
                            Some(true) => {
                                bump(&self.counters().protocol_errors, 1);
                                let text = match self.shared.ws_addr {
                                    Some(a) => format!(
                                        "this is Switchboard's raw TCP port (protocol v1, docs/PROTOCOL.md); \
                                         WebSocket and HTTP are served on ws://{a}/"
                                    ),
                                    None => "this is Switchboard's raw TCP port (protocol v1, docs/PROTOCOL.md); \
                                             this server has no WebSocket port (websocket.listen is empty)"
                                        .to_string(),
                                };
                                let response = handshake::response_error(400, &text, &[]);
                                self.close_with(slot, generation, Bytes::from(response), true, false);
                                return data.len();
                            }
                            Some(false) => {}
                        }
                    }
                    bump(&self.counters().protocol_errors, 1);
                    tracing::debug!(worker = self.id.0, slot, "closing connection: {e}");
                    self.begin_close(slot, generation, e.close_code(), &e.to_string());
                    return data.len();
                }
            }
        }
        off
    }

    // ---- WebSocket ----------------------------------------------------------

    /// An HTTP request on the WebSocket port (or a sniffed raw port): the
    /// upgrade, a page, or an error response. Returns 0 until the whole
    /// head is in (bounded by `websocket.max_handshake_bytes`), then the
    /// bytes of the head; what follows is WebSocket frames.
    fn on_http_bytes(self: &Rc<Self>, slot: u32, generation: u32, data: &[u8]) -> usize {
        let cfg = &self.shared.config.websocket;
        match handshake::parse_request(data, cfg.max_handshake_bytes) {
            Ok(None) => 0,
            Ok(Some((hs, n))) => {
                self.on_upgrade(slot, generation, &hs);
                n
            }
            Err(handshake::HandshakeError::NotUpgrade { path }) => {
                self.on_http_page(slot, generation, &path);
                data.len()
            }
            Err(e) => {
                tracing::debug!(worker = self.id.0, slot, "refusing WebSocket upgrade: {e}");
                self.refuse_http(slot, generation, e.response());
                data.len()
            }
        }
    }

    /// Ends an HTTP request with an error response.
    fn refuse_http(self: &Rc<Self>, slot: u32, generation: u32, response: Vec<u8>) {
        bump(&self.counters().ws_handshake_failures, 1);
        self.close_with(slot, generation, Bytes::from(response), true, false);
    }

    /// A valid upgrade request: Origin and subprotocol checks, the 101, and
    /// the login from the query string if there is one.
    fn on_upgrade(self: &Rc<Self>, slot: u32, generation: u32, hs: &handshake::Handshake) {
        let cfg = &self.shared.config.websocket;
        if !handshake::origin_allowed(hs.origin.as_deref(), &cfg.allowed_origins) {
            let reason = format!("origin {:?} is not in websocket.allowed_origins", hs.origin.as_deref().unwrap_or(""));
            return self.refuse_http(slot, generation, handshake::response_error(403, &reason, &[]));
        }
        let protocol = if hs.protocols.is_empty() {
            None
        } else {
            match handshake::choose_protocol(&hs.protocols, &SUBPROTOCOLS) {
                Some(p) => Some(p),
                None => {
                    let reason = format!(
                        "no supported subprotocol in Sec-WebSocket-Protocol; this server speaks {} and {}",
                        SUBPROTOCOLS[0], SUBPROTOCOLS[1]
                    );
                    return self.refuse_http(slot, generation, handshake::response_error(400, &reason, &[]));
                }
            }
        };
        let response = Bytes::from(handshake::response_101(&hs.accept(), protocol));
        self.enqueue_encoded(slot, generation, response);
        self.set_transport(slot, generation, T_WS, Some(Wire::for_subprotocol(protocol)));
        bump(&self.counters().ws_upgrades, 1);
        if let Some(login) = hs.login() {
            self.on_frame(slot, generation, login);
        }
    }

    /// A plain GET on the WebSocket port: the demo page (and its
    /// development-token helper) when enabled, else 426 or 404.
    fn on_http_page(self: &Rc<Self>, slot: u32, generation: u32, path: &str) {
        bump(&self.counters().http_requests, 1);
        let demo = self.shared.config.websocket.serves_demo();
        let response = match path {
            "/" | "/index.html" if demo => handshake::response_200("text/html; charset=utf-8", crate::demo::PAGE),
            _ if demo && path.starts_with("/demo/token/") => crate::demo::token_response(&self.shared, path),
            _ if demo => handshake::response_error(404, "not found: this port serves WebSocket and the demo page", &[]),
            _ => handshake::HandshakeError::NotUpgrade { path: path.to_string() }.response(),
        };
        self.close_with(slot, generation, Bytes::from(response), true, false);
    }

    /// WebSocket frames: decodes and handles whole messages.
    fn on_ws_bytes(self: &Rc<Self>, slot: u32, generation: u32, data: &mut [u8], kept: &mut Option<Decoder>) -> usize {
        let mut dec = kept.take().unwrap_or_else(|| Decoder::new(self.ws_max_message));
        let mut off = 0;
        while off < data.len() {
            // Before login, messages no larger than the largest login (a
            // message already started keeps its limit).
            match self.phase(slot, generation) {
                Some(Phase::Active) => dec.set_max_message_bytes(self.ws_max_message),
                // websocket.conformance_echo (test only): no login, so the full limit.
                Some(Phase::AwaitingLogin) if self.shared.config.websocket.conformance_echo => {
                    dec.set_max_message_bytes(self.ws_max_message)
                }
                Some(Phase::AwaitingLogin) => dec.set_max_message_bytes(MAX_LOGIN_MESSAGE_BYTES),
                Some(Phase::Closing) | None => return data.len(),
            }
            match dec.decode(&mut data[off..]) {
                Ok(None) => break,
                Ok(Some((ev, n))) => {
                    off += n;
                    self.on_ws_event(slot, generation, ev);
                }
                Err(e) => {
                    bump(&self.counters().protocol_errors, 1);
                    tracing::debug!(worker = self.id.0, slot, "closing WebSocket: {e}");
                    self.close_code(slot, generation, e.close_code(), &e.to_string());
                    return data.len();
                }
            }
        }
        // Mid-message, or mid-way through checking a text frame's UTF-8.
        if !dec.is_idle() {
            *kept = Some(dec);
        }
        off
    }

    fn on_ws_event(self: &Rc<Self>, slot: u32, generation: u32, ev: WsEvent<'_>) {
        // ---- websocket.conformance_echo (test only; config allows it on
        // loopback only): text and binary messages go back as they came,
        // with their opcode, through the write path; no login. Control
        // frames and errors take the normal paths below. ----
        if self.shared.config.websocket.conformance_echo {
            let echo = match ev {
                WsEvent::Text(text) => Some(ws::text_frame(text)),
                WsEvent::Binary(bytes) => Some(ws::binary_frame(bytes)),
                _ => None,
            };
            if let Some(frame) = echo {
                self.enqueue_encoded(slot, generation, Bytes::from(frame));
                return;
            }
        }
        // ---- end of conformance echo ----
        match ev {
            WsEvent::Text(text) => match crate::proto::json::ClientFrame::parse(text) {
                Ok(f) => self.on_frame(slot, generation, f.as_frame()),
                Err(e) => {
                    bump(&self.counters().protocol_errors, 1);
                    self.close_code(slot, generation, e.close_code(), &e.to_string());
                }
            },
            WsEvent::Binary(bytes) => match decode(bytes, self.shared.config.limits.max_frame_bytes) {
                Ok(Some((frame, n))) if n == bytes.len() => self.on_frame(slot, generation, frame),
                Ok(_) => {
                    bump(&self.counters().protocol_errors, 1);
                    let reason = "a binary message must hold exactly one whole protocol v1 frame";
                    self.close_code(slot, generation, ws::close::PROTOCOL_ERROR, reason);
                }
                Err(e) => {
                    bump(&self.counters().protocol_errors, 1);
                    self.close_code(slot, generation, e.close_code() as u16, &e.to_string());
                }
            },
            WsEvent::Ping(data) => {
                self.ws_alive(slot, generation);
                self.enqueue_encoded(slot, generation, Bytes::from(ws::pong_frame(data)));
            }
            WsEvent::Pong(_) => self.ws_alive(slot, generation),
            WsEvent::Close { code, .. } => {
                // The closing handshake: echo the code, then close.
                let echo = match code {
                    Some(code) => Bytes::from(ws::close_frame(code, "")),
                    None => Bytes::from_static(&ws::CLOSE_EMPTY),
                };
                self.close_with(slot, generation, echo, true, false);
            }
            WsEvent::Fragment => {}
        }
    }

    /// A WebSocket ping or pong: liveness, like any frame, once logged in
    /// (before login only LOGIN counts, as on raw TCP).
    fn ws_alive(&self, slot: u32, generation: u32) {
        let now = self.now.get();
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = conns.get_mut(slot as usize).filter(|c| c.generation == generation) {
            if c.session.is_active() {
                let _ = c.session.on_frame(FrameType::Pong, now);
                self.reschedule_if_earlier(c, slot);
            }
        }
    }

    fn is_closing(&self, slot: u32, generation: u32) -> bool {
        match self.conns.borrow().get(slot as usize) {
            Some(c) if c.generation == generation => c.session.phase() == Phase::Closing,
            _ => true,
        }
    }

    fn on_frame(self: &Rc<Self>, slot: u32, generation: u32, frame: Frame<'_>) {
        bump(&self.counters().frames_in, 1);
        let now = self.now.get();
        let verdict = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(slot as usize).filter(|c| c.generation == generation) else {
                return;
            };
            let v = c.session.on_frame(frame.frame_type(), now);
            // Traffic after a PING brings the next heartbeat (mark + interval)
            // before the idle check the wheel entry was filed under.
            self.reschedule_if_earlier(c, slot);
            v
        };
        match verdict {
            Ok(Inbound::Process) => {}
            Ok(Inbound::Ignore) => return,
            Err(e) => {
                bump(&self.counters().protocol_errors, 1);
                self.begin_close(slot, generation, e.close_code(), &e.to_string());
                return;
            }
        }
        match frame {
            Frame::Login { user, token } => self.on_login(slot, generation, user, token),
            Frame::Ping { data } => {
                let pong = Frame::Pong { data }.to_bytes().expect("PING data is bounded by the decoder");
                self.reply(slot, generation, pong);
            }
            Frame::Pong { .. } => {}
            Frame::Send { req_id, to, payload } => self.on_send(slot, generation, req_id, to, payload),
            Frame::Message { req_id, payload } => {
                self.to_application(slot, generation, ClientMessageKind::Message, req_id, payload)
            }
            Frame::Close { .. } => self.begin_close(slot, generation, CloseCode::Normal, "closed by client"),
            Frame::Subscribe { req_id, room } | Frame::Unsubscribe { req_id, room }
                if !self.shared.config.rooms.client_subscribe =>
            {
                let reason = "clients may not join or leave rooms on this server (rooms.client_subscribe)";
                self.reply_error(slot, generation, ErrorCode::SubscribeDisabled, req_id, reason);
                let _ = room;
            }
            Frame::Subscribe { req_id, room } => {
                if let Err(e) = self.join_room(slot, generation, room, Some(req_id)) {
                    self.reply_error(slot, generation, e.code(), req_id, &e.to_string());
                }
            }
            Frame::Unsubscribe { req_id, room } => self.leave_room(slot, generation, room, Some(req_id)),
            Frame::Publish { req_id, room, payload } => self.on_publish(slot, generation, req_id, room, payload),
            // The session refuses server-only frames before we get here.
            Frame::LoginOk { .. }
            | Frame::LoginError { .. }
            | Frame::Push { .. }
            | Frame::SendAck { .. }
            | Frame::Error { .. }
            | Frame::RoomAck { .. }
            | Frame::RoomMsg { .. }
            | Frame::Skipped { .. } => {
                self.begin_close(slot, generation, CloseCode::UnexpectedFrame, "server-only frame")
            }
        }
    }

    fn on_login(self: &Rc<Self>, slot: u32, generation: u32, user: &str, token: &[u8]) {
        let counters = self.counters();
        // The authenticator may be the application's code: a panic in it
        // refuses this login, and only this login.
        let auth = &*self.shared.authenticator;
        let verdict =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| auth.authenticate(user, token, unix_now_s())))
                .unwrap_or_else(|panic| {
                    bump(&counters.hook_panics, 1);
                    tracing::error!(
                        worker = self.id.0,
                        "the authenticator panicked: {}; login refused",
                        panic_text(&*panic)
                    );
                    Err(crate::auth::AuthError::Rejected("the server's login check failed".into()))
                });
        if let Err(e) = verdict {
            bump(&counters.login_failures, 1);
            self.fail_login(slot, generation, e.code() as u16, &e.to_string());
            return;
        }
        let id = ConnId::new(self.id, slot, generation);
        let key = match self.shared.directory.register(user, id) {
            Ok(k) => k,
            Err(e) => {
                bump(&counters.login_failures, 1);
                let reason = format!("user already has {} connections (limits.max_conns_per_user)", e.limit);
                self.fail_login(slot, generation, LoginErrorCode::TooManyConnections as u16, &reason);
                return;
            }
        };
        let now = self.now.get();
        {
            let mut conns = self.conns.borrow_mut();
            let c = conns
                .get_mut(slot as usize)
                .filter(|c| c.generation == generation)
                .expect("conn is live during its read");
            let ok = c.session.login_ok(now);
            debug_assert!(ok, "session accepted LOGIN so it was awaiting login");
            debug_assert!(c.user.is_none());
            c.user = Some(key);
            // The heartbeat may come due before the login deadline the
            // wheel entry was filed under.
            self.reschedule_if_earlier(c, slot);
        }
        bump(&counters.logins, 1);
        bump(&counters.logged_in, 1);
        let cfg = &self.shared.config;
        let ok = Frame::LoginOk {
            conn_id: id.to_u64(),
            heartbeat_interval_ms: cfg.timeouts.heartbeat_interval_ms as u32,
            idle_timeout_ms: cfg.timeouts.idle_timeout_ms as u32,
            max_frame_bytes: cfg.limits.max_frame_bytes as u32,
        }
        .to_bytes()
        .expect("fixed-size frame");
        {
            // The slot opens with LOGIN_OK already in it: a delivery from
            // any thread (the user is in the directory since `register`)
            // finds it queued and goes behind it, so LOGIN_OK is always the
            // first frame of a logged-in connection (PROTOCOL.md 1.3).
            let mut g = self.outs().slots[slot as usize].lock();
            debug_assert!(g.generation == generation && !g.open);
            // An empty queue holds it: the limits cannot refuse one frame.
            let _ = g.queue_raw(&ok, &self.shared.write_rules);
            g.open = true;
        }
        bump(&counters.frames_out, 1);
        self.mark_dirty(slot);
        // Logged in while draining (it was logging in when the drain began,
        // or its accept completed as the listener was shut): its attempt
        // succeeded; now it gets the same CLOSE as everyone else.
        if self.shared.draining.load(Ordering::Acquire) {
            self.begin_close(slot, generation, CloseCode::GoingAway, &self.going_away());
        }
    }

    /// The drain's CLOSE reason, with a reconnect hint drawn below
    /// `drain.reconnect_jitter_ms` (xorshift: spread, not secrecy).
    fn going_away(&self) -> String {
        let mut r = self.hint_rng.get();
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        self.hint_rng.set(r);
        format!("server going away; reconnect_ms={}", r % self.shared.config.drain.reconnect_jitter_ms.max(1))
    }

    fn fail_login(self: &Rc<Self>, slot: u32, generation: u32, code: u16, reason: &str) {
        let frame = Frame::LoginError { code, reason: clip_reason(reason) }.to_bytes().expect("reason clipped");
        self.close_with(slot, generation, frame, false, false);
    }

    fn on_send(self: &Rc<Self>, slot: u32, generation: u32, req_id: u32, to: &str, payload: &[u8]) {
        if !self.shared.config.routing.client_send {
            if self.shared.hook.is_some() {
                let kind = ClientMessageKind::Send { to: to.to_string() };
                self.to_application(slot, generation, kind, req_id, payload);
            } else {
                self.reply_error(
                    slot,
                    generation,
                    ErrorCode::SendDisabled,
                    req_id,
                    "client-to-client SEND is disabled",
                );
            }
            return;
        }
        let Some(from) = self.user_of(slot, generation) else {
            return;
        };
        let max = self.shared.max_push_payload() - from.len();
        if payload.len() > max {
            let reason = format!("payload of {} bytes: at most {max} fit a PUSH from this user", payload.len());
            self.reply_error(slot, generation, ErrorCode::PayloadTooLarge, req_id, &reason);
            return;
        }
        let frame = Frame::Push { msg_id: self.next_msg_id(), from: &from, payload }
            .to_bytes()
            .expect("user ids are at most 255 bytes and payload fits a frame");
        let mut targets = std::mem::take(&mut *self.lookup.borrow_mut());
        self.shared.directory.lookup_into(to, &mut targets);
        let mut delivered = 0u32;
        for &t in targets.iter() {
            delivered += u32::from(self.deliver(t, frame.clone()));
        }
        *self.lookup.borrow_mut() = targets;
        if req_id != 0 {
            let ack = Frame::SendAck { req_id, delivered }.to_bytes().expect("fixed-size frame");
            self.reply(slot, generation, ack);
        }
    }

    // ---- rooms ----------------------------------------------------------------

    fn room_ack(self: &Rc<Self>, slot: u32, generation: u32, req_id: u32, op: RoomOp, room: &str) {
        let ack = Frame::RoomAck { req_id, op, room }.to_bytes().expect("room names are at most 255 bytes");
        self.reply(slot, generation, ack);
    }

    /// Joins a logged-in connection to `room` and acknowledges it (with
    /// `req_id`, or 0 when the application asked). Joining a room twice is
    /// acknowledged and changes nothing.
    fn join_room(
        self: &Rc<Self>,
        slot: u32,
        generation: u32,
        room: &str,
        req_id: Option<u32>,
    ) -> Result<(), RoomError> {
        {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(slot as usize).filter(|c| c.generation == generation) else { return Ok(()) };
            if !c.session.is_active() {
                return Ok(());
            }
            let mut rooms = self.rooms.borrow_mut();
            let mine = c.rooms.as_deref().map_or(&[][..], |v| v.as_slice());
            let already = rooms.find(room).is_some_and(|idx| mine.iter().any(|&(i, _)| i == idx));
            if !already {
                let limit = self.shared.config.rooms.max_rooms_per_conn;
                if mine.len() >= limit {
                    return Err(RoomError::ConnRoomLimit { limit });
                }
                // A client's own SUBSCRIBE creates rooms on its user's
                // account (rooms.max_rooms_created_per_user); the
                // application's joins do not count.
                let creator = if req_id.is_some() { c.user.as_ref() } else { None };
                let name = self.shared.rooms.join(room, creator)?;
                let entry = rooms.add(&name, Member { slot, generation });
                c.rooms.get_or_insert_with(Default::default).push(entry);
            }
        }
        self.room_ack(slot, generation, req_id.unwrap_or(0), RoomOp::Subscribed, room);
        Ok(())
    }

    /// Takes a connection out of `room` (acknowledged even if it was not in).
    fn leave_room(self: &Rc<Self>, slot: u32, generation: u32, room: &str, req_id: Option<u32>) {
        let entry = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(slot as usize).filter(|c| c.generation == generation) else { return };
            if !c.session.is_active() {
                return;
            }
            let idx = self.rooms.borrow().find(room);
            match (idx, c.rooms.as_mut()) {
                (Some(idx), Some(list)) => match list.iter().position(|&(i, _)| i == idx) {
                    Some(k) => {
                        let e = list.swap_remove(k);
                        if list.is_empty() {
                            c.rooms = None;
                        }
                        Some(e)
                    }
                    None => None,
                },
                _ => None,
            }
        };
        if let Some((idx, pos)) = entry {
            self.drop_membership(idx, pos, Member { slot, generation });
        }
        self.room_ack(slot, generation, req_id.unwrap_or(0), RoomOp::Unsubscribed, room);
    }

    /// Removes one membership from the worker's room and the registry, and
    /// fixes the position of the member that moved into its place.
    fn drop_membership(&self, idx: RoomIdx, pos: u32, m: Member) {
        let (removed, name) = {
            let mut rooms = self.rooms.borrow_mut();
            let name = rooms.room(idx).name.clone();
            (rooms.remove(idx, pos, m), name)
        };
        if let Some((moved, new_pos)) = removed.moved {
            let mut conns = self.conns.borrow_mut();
            let c = conns.get_mut(moved.slot as usize).filter(|c| c.generation == moved.generation);
            let entry = c.and_then(|c| c.rooms.as_mut()).and_then(|l| l.iter_mut().find(|(i, _)| *i == idx));
            match entry {
                Some(e) => e.1 = new_pos,
                None => debug_assert!(false, "a room member without the membership record"),
            }
        }
        self.shared.rooms.leave(&name);
    }

    /// Leaves every room (the connection is closing or gone). `rooms` was
    /// taken out of the connection; its positions stay valid throughout,
    /// because each removal moves another member of that room, never this
    /// connection.
    #[allow(clippy::box_collection)] // the field's own type (see `Conn`)
    fn leave_all_rooms(&self, slot: u32, generation: u32, rooms: Option<Box<Vec<(RoomIdx, u32)>>>) {
        for (idx, pos) in rooms.into_iter().flat_map(|b| b.into_iter()) {
            self.drop_membership(idx, pos, Member { slot, generation });
        }
    }

    fn on_publish(self: &Rc<Self>, slot: u32, generation: u32, req_id: u32, room: &str, payload: &[u8]) {
        if !self.shared.config.rooms.client_publish {
            let reason = "clients may not publish on this server (rooms.client_publish)";
            return self.reply_error(slot, generation, ErrorCode::PublishDisabled, req_id, reason);
        }
        let (from, name) = {
            let conns = self.conns.borrow();
            let Some(c) = conns.get(slot as usize).filter(|c| c.generation == generation) else { return };
            let rooms = self.rooms.borrow();
            let member =
                rooms.find(room).filter(|&idx| c.rooms.as_deref().is_some_and(|l| l.iter().any(|&(i, _)| i == idx)));
            match (member, &c.user) {
                (Some(idx), Some(user)) => (user.clone(), rooms.room(idx).name.clone()),
                _ => {
                    drop((rooms, conns));
                    return self.reply_error(
                        slot,
                        generation,
                        ErrorCode::NotMember,
                        req_id,
                        "PUBLISH to a room this connection has not joined",
                    );
                }
            }
        };
        let max = self.shared.max_room_payload(room, &from);
        if payload.len() > max {
            let reason =
                format!("payload of {} bytes: at most {max} fit a ROOM_MSG in this room from this user", payload.len());
            return self.reply_error(slot, generation, ErrorCode::PayloadTooLarge, req_id, &reason);
        }
        let frame = Frame::RoomMsg { msg_id: self.next_msg_id(), room, from: &from, payload }
            .to_bytes()
            .expect("sizes checked above");
        // Every worker's members, this one's included, are reached through
        // the mailboxes, so the fan-out runs in the mailbox loop, in steps.
        if self.shared.post_all(frame, |frame| Command::Publish { room: name.clone(), frame }).is_err() {
            let reason = "a worker mailbox is full; not every member got the message";
            return self.reply_error(slot, generation, ErrorCode::Overloaded, req_id, reason);
        }
        if req_id != 0 {
            self.room_ack(slot, generation, req_id, RoomOp::Published, room);
        }
    }

    fn to_application(
        self: &Rc<Self>,
        slot: u32,
        generation: u32,
        kind: ClientMessageKind,
        req_id: u32,
        payload: &[u8],
    ) {
        let Some(hook) = self.shared.hook.clone() else {
            self.reply_error(slot, generation, ErrorCode::NoHandler, req_id, "no application handler for MESSAGE");
            return;
        };
        let Some(user) = self.user_of(slot, generation) else {
            return;
        };
        let msg = ClientMessage {
            conn: ConnId::new(self.id, slot, generation),
            user,
            kind,
            req_id,
            payload: Bytes::copy_from_slice(payload),
        };
        // No borrow is held here: the hook may call any handle method. A
        // panic in it costs this message (the client gets ERROR 111), not
        // the worker and every connection on it.
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(msg, &self.handle))) {
            bump(&self.counters().hook_panics, 1);
            tracing::error!(
                worker = self.id.0,
                slot,
                "the application's message hook panicked: {}",
                panic_text(&*panic)
            );
            let reason = "the application's handler failed on this message";
            self.reply_error(slot, generation, ErrorCode::HandlerFailed, req_id, reason);
        }
    }

    /// Files a new wheel entry when the session's next deadline is earlier
    /// than the live entry (a later deadline needs nothing: the early entry
    /// comes due, and the session says to wait).
    fn reschedule_if_earlier(&self, c: &mut Conn, slot: u32) {
        let next = c.session.next_deadline(&self.shared.timeouts);
        if (next.wrapping_sub(c.wheel_at) as i32) < 0 {
            c.wheel_at = self.wheel.borrow_mut().insert(next, slot, c.generation);
        }
    }

    fn user_of(&self, slot: u32, generation: u32) -> Option<Arc<str>> {
        let conns = self.conns.borrow();
        conns.get(slot as usize).filter(|c| c.generation == generation).and_then(|c| c.user.clone())
    }

    // ---- delivery -------------------------------------------------------------

    /// This worker's write slots.
    fn outs(&self) -> &OutSlots {
        &self.shared.outs[self.id.0 as usize]
    }

    /// Hands a frame to a logged-in connection on any worker, written from
    /// this thread (see `outslot`). Returns whether it was handed over.
    fn deliver(self: &Rc<Self>, conn: ConnId, frame: Bytes) -> bool {
        if conn.worker() == self.id {
            return self.put_local(Member { slot: conn.slot(), generation: conn.generation() }, &[frame], true);
        }
        super::deliver(&self.shared, conn, &frame)
    }

    /// Writes (or queues) `frames` for one of this worker's logged-in
    /// connections, arming its write poll directly when the socket fills.
    fn put_local(self: &Rc<Self>, m: Member, frames: &[Bytes], count: bool) -> bool {
        self.put_out(m, &mut Outgoing::new(frames), count) != Delivered::No
    }

    /// `put_local` for frames encoded (lazily, once per wire) in `out`.
    fn put_out(self: &Rc<Self>, m: Member, out: &mut Outgoing<'_>, count: bool) -> Delivered {
        let mut skipped = 0;
        let frames;
        let r = {
            let mut g = self.outs().slots[m.slot as usize].lock();
            if g.generation != m.generation || !g.open {
                return Delivered::No;
            }
            let Some(e) = out.get(g.wire) else { return Delivered::No };
            frames = e.frames.len();
            let r = g.put(e, &self.shared.write_rules, &mut skipped);
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
        match r {
            Put::Sent => {
                if count {
                    bump(&c.writes, 1);
                    bump(&c.frames_out, frames as u64);
                }
                Delivered::Direct
            }
            Put::Queued { .. } => {
                bump(&c.frames_out, frames as u64);
                Delivered::Queued
            }
            Put::Overflow => {
                self.close_slow_consumer(m.slot, m.generation);
                Delivered::No
            }
            Put::Broken => Delivered::No,
        }
    }

    fn reply(self: &Rc<Self>, slot: u32, generation: u32, frame: Bytes) {
        self.enqueue(slot, generation, frame);
    }

    fn reply_error(self: &Rc<Self>, slot: u32, generation: u32, code: ErrorCode, req_id: u32, reason: &str) {
        let frame =
            Frame::Error { code: code as u16, req_id, reason: clip_reason(reason) }.to_bytes().expect("reason clipped");
        self.reply(slot, generation, frame);
    }

    /// Queues a reply (a raw v1 frame, encoded here for the connection's
    /// wire) on one of this worker's connections (logged in or not, not
    /// closing) and marks it for the flush at the end of the batch, so
    /// replies to one read go out in one write. A queue over its limit
    /// closes the connection as a slow consumer.
    fn enqueue(self: &Rc<Self>, slot: u32, generation: u32, frame: Bytes) -> bool {
        self.enqueue_as(slot, generation, frame, false)
    }

    /// `enqueue` for bytes already in the connection's wire form (an HTTP
    /// response, a WebSocket pong).
    fn enqueue_encoded(self: &Rc<Self>, slot: u32, generation: u32, bytes: Bytes) -> bool {
        self.enqueue_as(slot, generation, bytes, true)
    }

    fn enqueue_as(self: &Rc<Self>, slot: u32, generation: u32, frame: Bytes, encoded: bool) -> bool {
        {
            let conns = self.conns.borrow();
            match conns.get(slot as usize) {
                Some(c) if c.generation == generation && c.session.phase() != Phase::Closing => {}
                _ => return false,
            }
        }
        let queued = {
            let mut g = self.outs().slots[slot as usize].lock();
            if g.generation != generation {
                return false;
            }
            if encoded {
                g.queue(frame, 0, &self.shared.write_rules)
            } else {
                g.queue_raw(&frame, &self.shared.write_rules)
            }
        };
        match queued {
            Ok(skipped) => {
                let c = self.counters();
                bump(&c.frames_out, 1);
                if skipped > 0 {
                    bump(&c.skipped, skipped as u64);
                }
                self.mark_dirty(slot);
                true
            }
            Err(Overflow) => {
                self.close_slow_consumer(slot, generation);
                false
            }
        }
    }

    fn mark_dirty(&self, slot: u32) {
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = conns.get_mut(slot as usize) {
            if c.flags & DIRTY == 0 {
                c.flags |= DIRTY;
                self.dirty.borrow_mut().push(slot);
            }
        }
    }

    fn close_slow_consumer(self: &Rc<Self>, slot: u32, generation: u32) {
        bump(&self.counters().slow_consumers, 1);
        self.begin_close(slot, generation, CloseCode::SlowConsumer, CloseCode::SlowConsumer.reason());
    }

    // ---- fan-out ----------------------------------------------------------------

    /// Writes `frames` (consecutive messages for the same audience, at most
    /// one iovec array) to every member, `FANOUT_CHUNK` members per step.
    /// A member with nothing queued gets one `sendmsg` straight from the
    /// shared buffers: no copy, no queue, no reference count taken. Only
    /// what its socket does not take is queued.
    async fn fan_out(self: &Rc<Self>, room: Option<&str>, frames: &[Bytes]) {
        debug_assert!(!frames.is_empty() && frames.len() <= MAX_IOV_PER_WRITE);
        let mut members = std::mem::take(&mut *self.fanout.borrow_mut());
        members.clear();
        match room {
            Some(name) => {
                let rooms = self.rooms.borrow();
                if let Some(idx) = rooms.find(name) {
                    members.extend_from_slice(&rooms.room(idx).members);
                }
            }
            None => {
                let conns = self.conns.borrow();
                members.extend(
                    conns
                        .iter()
                        .filter(|(_, c)| c.session.is_active())
                        .map(|(slot, c)| Member { slot: slot as u32, generation: c.generation }),
                );
            }
        }
        let mut out = Outgoing::new(frames);
        for (step, chunk) in members.chunks(FANOUT_CHUNK).enumerate() {
            if step > 0 {
                self.flush_dirty();
                self.poller.borrow_mut().flush();
                YieldNow(false).await;
            }
            let mut direct = 0;
            for &m in chunk {
                direct += u64::from(self.put_out(m, &mut out, false) == Delivered::Direct);
            }
            // Direct writes counted once per step, not per member.
            let c = self.counters();
            bump(&c.writes, direct);
            bump(&c.frames_out, direct * frames.len() as u64);
        }
        self.flush_dirty();
        *self.fanout.borrow_mut() = members;
    }

    /// Benchmark only: the kernel's floor for this worker's share of a
    /// fan-out, a plain `send` loop over the members' sockets. It holds each
    /// member's slot lock while it writes, so it is bounded: a member whose
    /// socket takes no more within `CEILING_WAIT_PER_MEMBER` (one that does
    /// not read) is cut off (its stream may end mid-frame), and the whole
    /// loop stops after `CEILING_WAIT_TOTAL`.
    fn send_ceiling(&self, room: &str, frame: &Bytes) -> CeilingSample {
        const CEILING_WAIT_PER_MEMBER: Duration = Duration::from_millis(200);
        const CEILING_WAIT_TOTAL: Duration = Duration::from_secs(2);
        let members: Vec<Member> = {
            let rooms = self.rooms.borrow();
            rooms.find(room).map_or(Vec::new(), |idx| rooms.room(idx).members.clone())
        };
        let t0 = std::time::Instant::now();
        let end = t0 + CEILING_WAIT_TOTAL;
        let mut sends = 0;
        for m in members {
            let now = std::time::Instant::now();
            if now >= end {
                break;
            }
            let g = self.outs().slots[m.slot as usize].lock();
            if g.generation == m.generation && g.out.is_empty() {
                if sys::send_all_until(g.fd(), frame, (now + CEILING_WAIT_PER_MEMBER).min(end)) {
                    sends += 1;
                } else {
                    sys::shutdown(g.fd(), libc::SHUT_RDWR);
                }
            }
        }
        CeilingSample { sends, elapsed: t0.elapsed() }
    }

    /// Writes out every connection with queued frames.
    pub(crate) fn flush_dirty(self: &Rc<Self>) {
        loop {
            let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
            if dirty.is_empty() {
                return;
            }
            for &slot in &dirty {
                self.flush(slot);
            }
            let mut d = self.dirty.borrow_mut();
            if d.is_empty() {
                let mut dirty = dirty;
                dirty.clear();
                *d = dirty; // keep the allocation for the next batch
            }
        }
    }

    fn flush(self: &Rc<Self>, slot: u32) {
        let (generation, closing) = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(slot as usize) else {
                return;
            };
            if c.flags & DIRTY == 0 {
                return;
            }
            c.flags &= !DIRTY;
            (c.generation, c.session.phase() == Phase::Closing)
        };
        let mut g = self.outs().slots[slot as usize].lock();
        if g.generation != generation || g.write_wait {
            return; // flushed when the poller reports room
        }
        match self.write_out(&mut g) {
            WriteState::Drained => self.after_drain(slot, &mut g, closing),
            WriteState::Blocked => {
                g.write_wait = true;
                bump(&self.counters().write_waits, 1);
                self.poller.borrow_mut().want_write(g.fd(), token(slot, generation));
            }
            WriteState::Failed => {
                g.out.clear();
                sys::shutdown(g.fd(), libc::SHUT_RDWR);
            }
        }
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
                    bump(&self.counters().writes, 1);
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
    fn after_drain(&self, slot: u32, g: &mut OutState, closing: bool) {
        if !closing {
            return;
        }
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = conns.get_mut(slot as usize) {
            if c.generation == g.generation && c.flags & FIN_SENT == 0 {
                c.flags |= FIN_SENT;
                sys::shutdown(g.fd(), libc::SHUT_WR);
            }
        }
    }

    /// The socket has room again. Returns true to keep waiting for more.
    fn on_writable(&self, slot: u32, generation: u32) -> bool {
        let closing = self.is_closing(slot, generation);
        let mut g = self.outs().slots[slot as usize].lock();
        if g.generation != generation || !g.write_wait {
            return false; // stale, or a late event after the queue drained
        }
        match self.write_out(&mut g) {
            WriteState::Drained => {
                g.write_wait = false;
                self.poller.borrow_mut().write_done(g.fd(), token(slot, generation));
                self.after_drain(slot, &mut g, closing);
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

    /// Requests other threads left on this worker's slots: arm a write poll
    /// for a socket they filled, close a connection whose queue they found
    /// over its limit.
    fn on_requests(self: &Rc<Self>) {
        let mut list = Vec::new();
        self.outs().take_requests(&mut list);
        for slot in list {
            let (generation, close) = {
                let mut g = self.outs().slots[slot as usize].lock();
                g.listed = false;
                if g.needs_arm {
                    g.needs_arm = false;
                    if g.write_wait {
                        bump(&self.counters().write_waits, 1);
                        self.poller.borrow_mut().want_write(g.fd(), token(slot, g.generation));
                    }
                }
                (g.generation, std::mem::take(&mut g.needs_close))
            };
            if close {
                self.close_slow_consumer(slot, generation);
            }
        }
        self.poller.borrow_mut().flush();
    }

    // ---- closing --------------------------------------------------------------

    /// Starts closing with a CLOSE frame.
    pub(crate) fn begin_close(self: &Rc<Self>, slot: u32, generation: u32, code: CloseCode, reason: &str) {
        tracing::debug!(worker = self.id.0, slot, code = code as u16, "closing: {reason}");
        self.close_with(slot, generation, close_frame(code, reason), false, code == CloseCode::SlowConsumer);
    }

    /// Starts closing with a close code that is not one of ours (a
    /// WebSocket one, such as 1007 for invalid UTF-8).
    fn close_code(self: &Rc<Self>, slot: u32, generation: u32, code: u16, reason: &str) {
        tracing::debug!(worker = self.id.0, slot, code, "closing: {reason}");
        let frame = Frame::Close { code, reason: clip_reason(reason) }.to_bytes().expect("reason clipped");
        self.close_with(slot, generation, frame, false, false);
    }

    /// Starts closing: leaves the directory and the rooms, stops other
    /// threads' deliveries, queues `last` (CLOSE or LOGIN_ERROR, encoded
    /// here for the connection's wire unless `encoded`) after what is
    /// queued (or instead of it, for a slow consumer), sends FIN once
    /// flushed, and releases the connection when the peer closes or the
    /// linger runs out.
    fn close_with(self: &Rc<Self>, slot: u32, generation: u32, last: Bytes, encoded: bool, discard_queue: bool) {
        let now = self.now.get();
        let (user, rooms) = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(slot as usize).filter(|c| c.generation == generation) else {
                return;
            };
            if !c.session.start_close(now) {
                return;
            }
            // Input is discarded from now on: incomplete frames go.
            if let Some(h) = c.held.take() {
                self.forget_held(&h);
            }
            self.reschedule_if_earlier(c, slot);
            (c.user.take(), c.rooms.take())
        };
        {
            let mut g = self.outs().slots[slot as usize].lock();
            g.open = false;
            if discard_queue {
                g.out.discard_unsent();
            }
            let last = if encoded { last } else { g.wire.encode(&last) };
            g.out.push_final(last);
        }
        self.mark_dirty(slot);
        self.leave_all_rooms(slot, generation, rooms);
        if let Some(user) = user {
            let removed = self.shared.directory.unregister(&user, ConnId::new(self.id, slot, generation));
            debug_assert!(removed, "a logged-in connection is in the directory");
            drop_one(&self.counters().logged_in);
        }
    }

    /// Frees a finished connection's slot and closes its socket. Called only
    /// from a read event (EOF, error, or after shutdown(2)), so no read poll
    /// is armed for it.
    fn release(&self, slot: u32, generation: u32) {
        let conn = {
            let mut conns = self.conns.borrow_mut();
            match conns.get(slot as usize) {
                Some(c) if c.generation == generation => conns.remove(slot as usize),
                _ => return,
            }
        };
        if let Some(h) = &conn.held {
            self.forget_held(h);
        }
        self.leave_all_rooms(slot, generation, conn.rooms);
        if let Some(user) = &conn.user {
            let removed = self.shared.directory.unregister(user, ConnId::new(self.id, slot, generation));
            debug_assert!(removed, "a logged-in connection is in the directory");
            drop_one(&self.counters().logged_in);
        }
        {
            // Under the lock: no other thread is writing to the socket, and
            // none will after this (the generation no longer matches).
            let mut g = self.outs().slots[slot as usize].lock();
            if g.write_wait {
                // Fire the armed write poll now; its event will find the
                // slot stale.
                sys::shutdown(conn.fd, libc::SHUT_RDWR);
            }
            g.generation = 0;
            g.open = false;
            g.write_wait = false;
            // Requests for this connection are void; the slot may still be
            // on the list and is skipped there.
            g.needs_arm = false;
            g.needs_close = false;
            g.wire = Wire::Raw;
            g.out.clear();
            self.poller.borrow_mut().forget(conn.fd, token(slot, generation));
            // SAFETY: the connection owned `fd` since its accept; its slot
            // no longer names it (generation 0), so nothing uses it again.
            unsafe { sys::close(conn.fd) };
            g.set_fd(-1);
        }
        let c = self.counters();
        drop_one(&c.connections);
        bump(&c.closed, 1);
    }

    // ---- mailbox ----------------------------------------------------------------

    fn on_command(self: &Rc<Self>, cmd: Command) {
        match cmd {
            Command::Close { conn, code } => {
                if code == CloseCode::Kicked && !self.is_closing(conn.slot(), conn.generation()) {
                    bump(&self.counters().kicked, 1);
                }
                self.begin_close(conn.slot(), conn.generation(), code, code.reason());
            }
            Command::Join { conn, room } => {
                if let Err(e) = self.join_room(conn.slot(), conn.generation(), &room, None) {
                    self.reply_error(conn.slot(), conn.generation(), e.code(), 0, &e.to_string());
                }
            }
            Command::Leave { conn, room } => self.leave_room(conn.slot(), conn.generation(), &room, None),
            Command::SendCeiling { room, frame, reply } => {
                let _ = reply.send(self.send_ceiling(&room, &frame));
            }
            Command::Adopt { fd, websocket } => self.on_accept(fd, websocket, true),
            Command::Crash => panic!("worker {} made to panic by crash_worker_for_testing", self.id.0),
            Command::Publish { .. } | Command::Broadcast { .. } => {
                unreachable!("fan-out commands are handled by the mailbox loop")
            }
        }
    }

    // ---- timers -------------------------------------------------------------------

    fn on_due(self: &Rc<Self>, e: Entry) {
        let now = self.now.get();
        let t = &self.shared.timeouts;
        let action = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(e.slot as usize) else {
                return;
            };
            if c.generation != e.generation || c.wheel_at != e.at {
                return; // stale or superseded entry
            }
            let action = c.session.on_tick(now, t);
            match action {
                TickAction::Wait { next } => {
                    c.wheel_at = self.wheel.borrow_mut().insert(next, e.slot, e.generation);
                }
                TickAction::Ping { next } => {
                    c.wheel_at = self.wheel.borrow_mut().insert(next, e.slot, e.generation);
                }
                TickAction::Finish => {
                    // The read event this causes releases the slot. Re-check
                    // later in case it is lost.
                    sys::shutdown(c.fd, libc::SHUT_RDWR);
                    c.wheel_at = self.wheel.borrow_mut().insert(now.wrapping_add(t.linger), e.slot, e.generation);
                }
                TickAction::Close(_) => {
                    // The entry just consumed was the live one; mark "none"
                    // (infinitely late) so the close files the linger
                    // deadline.
                    c.wheel_at = now.wrapping_add(i32::MAX as u32);
                }
            }
            action
        };
        match action {
            TickAction::Ping { .. } => {
                bump(&self.counters().pings_sent, 1);
                self.reply(e.slot, e.generation, Bytes::from_static(&PING_EMPTY));
            }
            TickAction::Close(code) => {
                let c = self.counters();
                match code {
                    CloseCode::LoginTimeout => bump(&c.login_timeouts, 1),
                    CloseCode::IdleTimeout => bump(&c.idle_timeouts, 1),
                    _ => {}
                }
                self.begin_close(e.slot, e.generation, code, code.reason());
            }
            TickAction::Wait { .. } | TickAction::Finish => {}
        }
    }

    /// Shuts every remaining socket down; each read event then releases it.
    fn abort_all(&self) {
        for (_, c) in self.conns.borrow().iter() {
            sys::shutdown(c.fd, libc::SHUT_RDWR);
        }
    }

    /// Starts closing every connection (server shutdown).
    fn close_all(self: &Rc<Self>, code: CloseCode) {
        let ids: Vec<(u32, u32)> = self.conns.borrow().iter().map(|(s, c)| (s as u32, c.generation)).collect();
        for (slot, generation) in ids {
            self.begin_close(slot, generation, code, code.reason());
        }
        self.flush_dirty();
    }
}

fn tick_ms_of(shared: &Shared) -> u64 {
    shared.config.timeouts.tick_ms
}

/// Wraps a duplicate of `fd` in monoio's thinnest pollable type (a bare
/// shared fd), used only to wait for readability: the mailbox eventfd and
/// the poller's descriptor.
fn pollable(fd: RawFd) -> std::io::Result<UnixStream> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; the result is checked.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let std_stream = unsafe { <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(dup) };
    UnixStream::from_std(std_stream)
}

fn current_tick(shared: &Shared) -> Tick {
    (shared.epoch.elapsed().as_millis() / shared.config.timeouts.tick_ms as u128) as Tick
}

/// Waits on the poller's descriptor and handles every ready connection.
async fn io_loop(w: Rc<Worker>, ready_fd: UnixStream) {
    let mut events = Vec::with_capacity(IO_BATCH);
    loop {
        // Connections cut short by the per-wake read limit come first.
        let again = std::mem::take(&mut *w.read_again.borrow_mut());
        for (slot, generation) in again {
            w.on_ready(token(slot, generation), Ready::Read { rearm: false });
        }
        w.poller.borrow_mut().reap(&mut events, IO_BATCH);
        if events.is_empty() {
            if w.stopped.get() {
                return;
            }
            if !w.read_again.borrow().is_empty() {
                w.flush_dirty();
                YieldNow(false).await;
                continue;
            }
            w.poller.borrow_mut().flush();
            if ready_fd.readable(false).await.is_err() {
                return;
            }
            continue;
        }
        for (tok, ready) in events.drain(..) {
            w.on_ready(tok, ready);
        }
        w.flush_dirty();
        w.poller.borrow_mut().flush();
        // Every turn gives the other tasks (mailbox, timers, accepts) their
        // turn: events that keep coming cannot starve them.
        YieldNow(false).await;
    }
}

async fn accept_loop(w: Rc<Worker>, listener: Rc<TcpListener>, websocket: bool) {
    struct Running(Rc<Worker>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.accepting.set(self.0.accepting.get() - 1);
        }
    }
    w.accepting.set(w.accepting.get() + 1);
    let _running = Running(w.clone());
    let mut backoff_logged = false;
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                backoff_logged = false;
                // SAFETY: `into_raw_fd` hands over the stream's descriptor,
                // which nothing else owns.
                w.on_accept(unsafe { OwnedFd::from_raw_fd(stream.into_raw_fd()) }, websocket, false);
            }
            Err(e) => {
                if w.stopping() {
                    return;
                }
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                if !backoff_logged {
                    tracing::warn!(worker = w.id.0, "accept failed: {e}; retrying in 100 ms");
                    backoff_logged = true;
                }
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if w.stopping() {
            return;
        }
    }
}

async fn tick_loop(w: Rc<Worker>) {
    let tick_ms = w.shared.config.timeouts.tick_ms;
    let mut due = Vec::new();
    loop {
        let next = w.now.get().wrapping_add(1);
        let at = w.shared.epoch + Duration::from_millis(next as u64 * tick_ms);
        monoio::select! {
            _ = monoio::time::sleep_until(monoio::time::Instant::from_std(at)) => {}
            _ = Stopped(&w) => return,
        }
        let now = w.refresh_now();
        w.expire_held(now);
        w.wheel.borrow_mut().advance(now, &mut due);
        let mut handled = 0;
        for e in due.drain(..) {
            w.on_due(e);
            handled += 1;
            if handled % TICK_BATCH == 0 {
                w.flush_dirty();
                YieldNow(false).await;
            }
        }
        w.flush_dirty();
    }
}

async fn mailbox_loop(w: Rc<Worker>) {
    let mb = &w.shared.mailboxes[w.id.0 as usize];
    let mut batch: std::collections::VecDeque<Command> = std::collections::VecDeque::with_capacity(MAILBOX_BATCH);
    let mut frames: Vec<Bytes> = Vec::with_capacity(MAX_IOV_PER_WRITE);
    loop {
        if w.shared.shutdown.load(Ordering::Acquire) || w.drained.get() {
            return;
        }
        if w.shared.draining.load(Ordering::Acquire) && !w.drain_started.replace(true) {
            monoio::spawn(drain(w.clone()));
        }
        // Re-arm wakes first, then look at both things a wake announces:
        // write-slot requests and commands. (Waiting on commands alone lost
        // requests: a wake for a request left `notified` set, so no later
        // wake reached the eventfd until a command happened to arrive.)
        mb.begin_drain(false);
        w.on_requests();
        if mb.is_empty() {
            MailboxWake(&w).await;
            if w.stopped.get() {
                return;
            }
            continue;
        }
        while batch.len() < MAILBOX_BATCH {
            let Some(cmd) = mb.pop() else { break };
            batch.push_back(cmd);
        }
        let full = batch.len() == MAILBOX_BATCH;
        while let Some(cmd) = batch.pop_front() {
            match cmd {
                // Consecutive messages for the same room (or consecutive
                // broadcasts) go out together: one sendmsg per member
                // carries all of them. Only consecutive ones, so every
                // member still sees messages in publish order.
                Command::Publish { room, frame } => {
                    frames.push(frame);
                    while frames.len() < MAX_IOV_PER_WRITE {
                        match batch.front() {
                            Some(Command::Publish { room: next, .. }) if *next == room => {}
                            _ => break,
                        }
                        if let Some(Command::Publish { frame, .. }) = batch.pop_front() {
                            frames.push(frame);
                        }
                    }
                    w.fan_out(Some(&room), &frames).await;
                    frames.clear();
                }
                Command::Broadcast { frame } => {
                    frames.push(frame);
                    while frames.len() < MAX_IOV_PER_WRITE && matches!(batch.front(), Some(Command::Broadcast { .. })) {
                        if let Some(Command::Broadcast { frame }) = batch.pop_front() {
                            frames.push(frame);
                        }
                    }
                    w.fan_out(None, &frames).await;
                    frames.clear();
                }
                other => w.on_command(other),
            }
        }
        w.flush_dirty();
        w.poller.borrow_mut().flush();
        if full {
            YieldNow(false).await;
        }
    }
}

/// A graceful drain: stop accepting, then CLOSE 1001 with a reconnect hint
/// to every connection, spread over the drain window, then wait for the
/// peers to close (bounded by the linger). The mailbox loop keeps running
/// meanwhile (write-room requests, room commands); it ends when this sets
/// `drained`.
async fn drain(w: Rc<Worker>) {
    let cfg = &w.shared.config;
    // Closing the listener moves connections still in its accept queue to
    // another listener of the port when net.ipv4.tcp_migrate_req = 1.
    sys::shutdown(w.listener_fd.get(), libc::SHUT_RDWR);
    if w.ws_listener_fd.get() >= 0 {
        sys::shutdown(w.ws_listener_fd.get(), libc::SHUT_RDWR);
    }
    // Logged-in connections only: one still logging in gets its LOGIN_OK
    // first (its attempt succeeded), and its CLOSE right after (on_login).
    let ids: Vec<(u32, u32)> =
        w.conns.borrow().iter().filter(|(_, c)| c.session.is_active()).map(|(s, c)| (s as u32, c.generation)).collect();
    // At least 1,000 closes per second: a worker with few connections does
    // not sit out the whole window.
    let window = Duration::from_millis(cfg.drain.window_ms.min(ids.len() as u64));
    let t0 = std::time::Instant::now();
    let mut done = 0;
    while done < ids.len() {
        // Everyone whose share of the window has come.
        let due = if window.is_zero() {
            ids.len()
        } else {
            ((t0.elapsed().as_secs_f64() / window.as_secs_f64()) * ids.len() as f64).ceil() as usize
        };
        while done < due.min(ids.len()) {
            let (slot, generation) = ids[done];
            w.begin_close(slot, generation, CloseCode::GoingAway, &w.going_away());
            done += 1;
        }
        w.flush_dirty();
        if done < ids.len() {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(cfg.timeouts.close_linger_ms);
    while (w.connection_count() > 0 || w.accepting.get() > 0) && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    // Connections still not logged in at the deadline get the CLOSE too
    // (left open until the process exits, a LOGIN the server never read
    // would turn that exit into a reset).
    let stragglers: Vec<(u32, u32)> = w
        .conns
        .borrow()
        .iter()
        .filter(|(_, c)| c.session.phase() != Phase::Closing)
        .map(|(s, c)| (s as u32, c.generation))
        .collect();
    for (slot, generation) in stragglers {
        w.begin_close(slot, generation, CloseCode::GoingAway, &w.going_away());
    }
    w.flush_dirty();
    w.drained.set(true);
    w.mailbox_ready.set(true);
    if let Some(waker) = w.mailbox_waker.take() {
        waker.wake();
    }
}

/// The worker's main future: accept, tick and mailbox loops until shutdown,
/// then a graceful close of every connection.
pub(crate) async fn run(
    shared: Arc<Shared>,
    id: WorkerId,
    listener: std::net::TcpListener,
    ws_listener: Option<std::net::TcpListener>,
    driver: super::DriverKind,
    ready: impl FnOnce(Result<(), String>),
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => Rc::new(l),
        Err(e) => return ready(Err(format!("cannot register listener: {e}"))),
    };
    let ws_listener = match ws_listener.map(TcpListener::from_std).transpose() {
        Ok(l) => l.map(Rc::new),
        Err(e) => return ready(Err(format!("cannot register the WebSocket listener: {e}"))),
    };
    let poller = match (driver, shared.config.server.poller) {
        (super::DriverKind::IoUring, crate::config::PollerKind::IoUring) => {
            Poller::uring(shared.config.uring.sq_entries, shared.config.uring.cq_entries)
        }
        _ => Poller::epoll(),
    };
    let poller = match poller {
        Ok(p) => p,
        Err(e) => return ready(Err(format!("cannot create the connection poller: {e}"))),
    };
    let mut poller = poller;
    poller.watch_mailbox(shared.mailboxes[id.0 as usize].eventfd());
    poller.flush();
    let poller_ready = match pollable(poller.fd()) {
        Ok(s) => s,
        Err(e) => return ready(Err(format!("cannot register the poller: {e}"))),
    };
    let w = Rc::new(Worker::new(id, shared.clone(), poller));
    w.listener_fd.set(listener.as_raw_fd());
    for _ in 0..shared.config.server.accepts_per_worker {
        monoio::spawn(accept_loop(w.clone(), listener.clone(), false));
    }
    if let Some(l) = &ws_listener {
        w.ws_listener_fd.set(l.as_raw_fd());
        for _ in 0..shared.config.server.accepts_per_worker {
            monoio::spawn(accept_loop(w.clone(), l.clone(), true));
        }
    }
    monoio::spawn(io_loop(w.clone(), poller_ready));
    monoio::spawn(tick_loop(w.clone()));
    ready(Ok(()));
    mailbox_loop(w.clone()).await;

    // Graceful shutdown. Everything is released while the runtime still
    // runs: monoio 0.2 does not close the descriptors of tasks still
    // pending when a runtime is dropped.
    // 1. Stop listening: shutdown() on a listening socket ends it and fails
    //    the pending accepts, so the accept loops return.
    sys::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
    drop(listener);
    if let Some(l) = ws_listener {
        sys::shutdown(l.as_raw_fd(), libc::SHUT_RDWR);
    }
    // 2. CLOSE 1001 to everyone, then wait for peers to close, bounded by
    //    the linger. A drain did both already (spread over its window): its
    //    stragglers are cut off at once, so a drain takes its window plus
    //    one linger, as documented.
    if !w.drained.get() {
        w.close_all(CloseCode::GoingAway);
        let linger = Duration::from_millis(shared.config.timeouts.close_linger_ms);
        let deadline = std::time::Instant::now() + linger;
        while (w.connection_count() > 0 || w.accepting.get() > 0) && std::time::Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // 3. Whoever is left is cut off; their readers release them.
    let left = w.connection_count();
    w.abort_all();
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while (w.connection_count() > 0 || Rc::strong_count(&w) > 2) && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    // 4. Stop the tick and I/O loops (at once, not at the next tick); the
    //    last Rc to the worker then goes with them and closes the poller.
    w.stopped.set(true);
    if let Some(waker) = w.stop_waker.take() {
        waker.wake();
    }
    w.poller.borrow_mut().wake();
    let deadline = std::time::Instant::now() + Duration::from_millis(tick_ms_of(&shared) + 5);
    while Rc::strong_count(&w) > 1 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
    tracing::debug!(worker = id.0, cut_off = left, "worker stopped");
}
