//! One worker: the I/O glue around its connections, on one monoio runtime.
//!
//! Owns: the connection table (a slab of `Slot`, preallocated), each slot
//! holding the connection's protocol machine (`proto::conn::Connection`),
//! its rooms, socket, generation and wheel entry; the timing wheel; the
//! worker's rooms; the per-worker scratch buffer every read drains into;
//! the budget of bytes held by incomplete frames.
//! Must not: decide anything about the protocol (the machine does: this
//! file polls, reads into scratch, feeds the machine, and carries out what
//! it asks through `Io`, its `Env`), put bytes on a socket except through
//! the write path (`write/`), be touched from another thread (everything
//! here is `Rc` / `RefCell`, reached only by this worker's tasks), hold a
//! `RefCell` borrow across an `.await`, or hold a buffer for an idle
//! connection.
//!
//! Here: the table, feeding a connection's machine (`with_conn`) and
//! carrying out what it asks (`Io`), accepting, reading, rooms, fan-out,
//! timers and commands. `tasks.rs`: the loops that run them.
//!
//! Tasks per worker (none per connection): `accepts_per_worker` accept
//! loops, one tick loop, one mailbox loop, and one I/O loop that waits on the
//! worker's readiness poller (`poller.rs`) and handles every connection's
//! read and write readiness.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use slab::Slab;

use super::bufring::BufRing;
use super::poller::{token, untoken, Poller, Ready};
use super::shared::Handle;
use super::shared::{Command, Shared};
use super::sys::{self, Recv};
use super::write::{Delivered, Outgoing, Step, Writer, BATCH_MIN};
use crate::app::{CeilingSample, ClientMessage, ClientMessageKind};
use crate::directory::ConnList;
use crate::ids::{ConnId, WorkerId};
use crate::outq::MAX_IOV_PER_WRITE;
use crate::proto::codes::{CloseCode, ErrorCode, LoginErrorCode};
use crate::proto::conn::{Connection, Count, Due, HoldTicket, Listener, LoginRefused, Rules, StoreOpts};
use crate::proto::frame::Frame;
use crate::proto::session::Tick;
use crate::proto::wire::Wire;
use crate::proto::ws::handshake;
use crate::rooms::{LocalRooms, Member, RoomError, RoomIdx};
use crate::stats::{bump, drop_one, WorkerCounters};
use crate::wheel::{Entry, Wheel};

mod reliable;
mod tasks;

pub(crate) use tasks::run;

/// Bytes every read drains into (one buffer per worker, never per
/// connection). 64 KiB: a burst from one client is read in few syscalls.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// Reads per readiness event before yielding to other connections, so one
/// flooding client cannot monopolise the worker (1 MiB at most).
const MAX_READS_PER_WAKE: usize = 16;
/// Mailbox commands handled between two flushes and yields.
const MAILBOX_BATCH: usize = 4096;
/// Due wheel entries handled before yielding.
const TICK_BATCH: usize = 4096;
/// Readiness events handled between two flushes and yields.
const IO_BATCH: usize = 4096;
/// Events (or mailbox commands) handled between two flushes of the turn's
/// queued writes, so a reply, or a fan-out's batched send, waits for at
/// most this many others before it goes out.
const FLUSH_EVERY: usize = 64;
/// Members written to per fan-out step; between steps the worker yields so
/// reads, heartbeats and other commands are not starved by a large room.
const FANOUT_CHUNK: usize = 2048;
/// io_uring: completions in a row that said more bytes were waiting,
/// after which the end of the run is checked by a direct read
/// (`Worker::track_run`). The kernel's multishot receive reads at most 32
/// times before it queues itself again; the lost wake-up was seen only
/// after runs of several hundred.
const LONG_RUN: u32 = 32;
/// `IORING_CQE_F_SOCK_NONEMPTY`: the socket held more bytes after this
/// receive.
const CQE_F_SOCK_NONEMPTY: u32 = 1 << 2;

/// One connection in the worker's table. Its size is asserted below: it is
/// most of what an idle connection costs us.
// `Option<Box<Vec<_>>>` on purpose: 8 bytes in the slot instead of a Vec's
// 24, for a field that is `None` on almost every connection.
#[allow(clippy::box_collection)]
struct Slot {
    conn: Connection,
    /// Rooms this connection is in, with its position in each room's
    /// member list; `None` when in no room.
    rooms: Option<Box<Vec<(RoomIdx, u32)>>>,
    fd: RawFd,
    generation: u32,
    /// Tick of this connection's live wheel entry.
    wheel_at: Tick,
    /// The machine is out of the slot, being fed (`Worker::with_conn`).
    busy: bool,
    /// While busy, a write to this connection found its queue over the
    /// limit: close it as a slow consumer once the machine is back.
    slow: bool,
}

const _: () = assert!(std::mem::size_of::<Slot>() <= 56);

/// A holder in the worker's list: the connection and the tick it started
/// holding.
#[derive(Copy, Clone, Debug)]
struct Holder {
    slot: u32,
    generation: u32,
    since: Tick,
}

pub(crate) struct Worker {
    id: WorkerId,
    shared: Arc<Shared>,
    handle: Handle,
    rules: Rules,
    conns: RefCell<Slab<Slot>>,
    /// The buffer ring receives land in (io_uring poller; `bufring.rs`).
    /// Before `out`: fields drop in order, and the ring is unregistered
    /// while the poller's ring is still open.
    bufs: Option<Rc<BufRing>>,
    /// The write path, with the poller.
    out: Writer,
    wheel: RefCell<Wheel>,
    scratch: RefCell<Box<[u8]>>,
    lookup: RefCell<ConnList>,
    rooms: RefCell<LocalRooms>,
    /// Snapshot of the members a fan-out writes to (reused).
    fanout: RefCell<Vec<Member>>,
    /// Connections that stopped reading at `MAX_READS_PER_WAKE` with data
    /// possibly left (epoll), so the I/O loop comes back to them.
    read_again: RefCell<Vec<(u32, u32)>>,
    /// Connections whose receive the kernel ended because the buffer ring
    /// was empty: armed again at the end of the turn, once this turn's
    /// buffers are back. Their bytes wait in the socket meanwhile.
    starved: RefCell<Vec<(u32, u32)>>,
    /// io_uring: connections whose receive is in a long run (completions
    /// saying more bytes wait in the socket), slot → (generation, how
    /// many so far). A connection is here only while its socket has not
    /// been seen empty, so an idle one costs nothing; at most one entry
    /// per connection.
    runs: RefCell<hashbrown::HashMap<u32, (u32, u32)>>,
    /// io_uring: connections whose long run just ended, looked at once
    /// more before the worker sleeps (`recheck_runs`). A set, so a
    /// worker too busy to reach its idle turn for long holds at most one
    /// entry per connection, however many runs end meanwhile.
    recheck: RefCell<hashbrown::HashSet<(u32, u32)>>,
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
    /// Connections holding an incomplete frame, oldest first (by ticket).
    holders: RefCell<std::collections::BTreeMap<u64, Holder>>,
    next_hold: Cell<u64>,
    /// Bytes charged by every holder of this worker.
    held_bytes: Cell<usize>,
    /// Device connections' delivery windows (`reliable.rs`).
    reliable: RefCell<reliable::Reliable>,
    /// Device connections with a position to save at the next tick.
    unsaved: RefCell<Vec<(u32, u32)>>,
    /// Positions of closed device connections that the store's full queue
    /// refused at the close, by (user, device): tried again at each tick
    /// (`reliable.rs`).
    closed_unsaved: RefCell<reliable::ClosedUnsaved>,
    /// The next slot the sweep that keeps connected devices seen looks at
    /// (`reliable.rs`, `Worker::keep_devices_seen`).
    seen_cursor: Cell<u32>,
    /// Device connections (slot, generation) whose window was put back
    /// open since the tick last found it parked: what the tick looks at
    /// for retransmits (`reliable.rs`). Entries of closed connections go
    /// at the next tick.
    open: RefCell<Vec<(u32, u32)>>,
    /// Inside a turn of the I/O loop: store requests are queued without a
    /// wake, and `store_unwoken` says one is owed (`Worker::store_turn`).
    store_batching: Cell<bool>,
    store_unwoken: Cell<bool>,
    window_rules: crate::proto::reliable::WindowRules,
    /// Connections closed with 4009 since the last tick, and the user of
    /// the last: logged once a tick (`Worker::log_over_budget`), not once
    /// each (a client logging in again as fast as it can was closed
    /// about 400 times a second in a measurement).
    over_budget: RefCell<(u64, Option<Arc<str>>)>,
}

/// Yields once to the scheduler (monoio 0.2 has no `yield_now`).
pub(super) struct YieldNow(pub(super) bool);

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

/// A connection's machine asks; the worker does (`proto::conn::Env`).
struct Io<'a> {
    w: &'a Worker,
    slot: u32,
    generation: u32,
}

impl Io<'_> {
    fn conn_id(&self) -> ConnId {
        ConnId::new(self.w.id, self.slot, self.generation)
    }

    fn queue(&mut self, frame: Bytes, encoded: bool) {
        if self.w.out.reply(self.slot, self.generation, frame, encoded).is_err() {
            self.w.close_slow_consumer(self.slot, self.generation);
        }
    }
}

impl crate::proto::conn::Env for Io<'_> {
    fn reply(&mut self, frame: Bytes) {
        self.queue(frame, false);
    }

    fn reply_encoded(&mut self, bytes: Bytes) {
        self.queue(bytes, true);
    }

    fn set_wire(&mut self, wire: Wire) {
        self.w.out.set_wire(self.slot, self.generation, wire);
    }

    fn login(&mut self, user: &str, token: &[u8]) -> Result<(u64, Arc<str>), LoginRefused> {
        let w = self.w;
        // The authenticator may be the application's code: a panic in it
        // refuses this login, and only this login.
        let auth = &*w.shared.authenticator;
        let verdict =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| auth.authenticate(user, token, unix_now_s())))
                .unwrap_or_else(|panic| {
                    bump(&w.counters().hook_panics, 1);
                    tracing::error!(
                        worker = w.id.0,
                        "the authenticator panicked: {}; login refused",
                        panic_text(&*panic)
                    );
                    Err(crate::auth::AuthError::Rejected("the server's login check failed".into()))
                });
        if let Err(e) = verdict {
            return Err(LoginRefused { code: e.code() as u16, reason: e.to_string() });
        }
        let id = self.conn_id();
        match w.shared.directory.register(user, id) {
            Ok(key) => {
                w.shared.to_cluster(|| crate::cluster::Event::Online(key.clone()));
                Ok((id.to_u64(), key))
            }
            Err(e) => Err(LoginRefused {
                code: LoginErrorCode::TooManyConnections as u16,
                reason: format!("user already has {} connections (limits.max_conns_per_user)", e.limit),
            }),
        }
    }

    fn open(&mut self, login_ok: Bytes) {
        self.w.out.open(self.slot, self.generation, &login_ok);
        bump(&self.w.counters().logged_in, 1);
    }

    fn draining(&mut self) -> Option<String> {
        self.w.shared.draining.load(Ordering::Acquire).then(|| self.w.going_away())
    }

    fn send(&mut self, from: &Arc<str>, to: &str, payload: &[u8]) -> (u64, u32) {
        let w = self.w;
        let msg_id = w.next_msg_id();
        let frame = Frame::Push { msg_id, from, payload }
            .to_bytes()
            .expect("user ids are at most 255 bytes and the payload was checked");
        let mut targets = std::mem::take(&mut *w.lookup.borrow_mut());
        w.shared.directory.lookup_into(to, &mut targets);
        let mut delivered = 0;
        for &t in targets.iter() {
            delivered += u32::from(w.deliver(t, frame.clone()));
        }
        bump(&w.counters().detail.deliveries[crate::stats::DELIVERY_PUSH], delivered as u64);
        *w.lookup.borrow_mut() = targets;
        // Other nodes: the cluster thread forwards it to those holding
        // connections of `to` (the SEND's count is this node's).
        w.shared.to_cluster(|| crate::cluster::Event::ToUser { user: Arc::from(to), frame });
        (msg_id, delivered)
    }

    fn store_send(
        &mut self,
        from: &Arc<str>,
        to: &str,
        payload: &[u8],
        req_id: u32,
        opts: StoreOpts,
        ex: bool,
    ) -> Result<(), (ErrorCode, String)> {
        self.w.store_send(self.conn_id(), from, to, payload, req_id, opts, ex)
    }

    fn device_login(&mut self, user: &Arc<str>, device: &str, last_seq: u64) -> Result<(), (CloseCode, String)> {
        self.w.device_login(self.slot, self.generation, user, device, last_seq)
    }

    fn ack(&mut self, seq: u64) -> Result<(), (ErrorCode, String)> {
        self.w.window_ack(self.slot, self.generation, seq)
    }

    fn fetch(&mut self, req_id: u32, after_seq: u64, limit: u16) -> Result<(), (ErrorCode, String)> {
        self.w.window_fetch(self.slot, self.generation, req_id, after_seq, limit)
    }

    fn to_application(
        &mut self,
        user: &Arc<str>,
        kind: ClientMessageKind,
        req_id: u32,
        payload: &[u8],
    ) -> Result<(), (ErrorCode, &'static str)> {
        let w = self.w;
        let Some(hook) = w.shared.hook.clone() else {
            return Err((ErrorCode::NoHandler, "no application handler for MESSAGE"));
        };
        let msg = ClientMessage {
            conn: self.conn_id(),
            user: user.clone(),
            kind,
            req_id,
            payload: Bytes::copy_from_slice(payload),
        };
        // No borrow is held here: the hook may call any handle method. A
        // panic in it costs this message (the client gets ERROR 111), not
        // the worker and every connection on it.
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(msg, &w.handle))) {
            bump(&w.counters().hook_panics, 1);
            tracing::error!(
                worker = w.id.0,
                slot = self.slot,
                "the application's message hook panicked: {}",
                panic_text(&*panic)
            );
            return Err((ErrorCode::HandlerFailed, "the application's handler failed on this message"));
        }
        Ok(())
    }

    fn join(&mut self, room: &str, creator: Option<&Arc<str>>) -> Result<(), RoomError> {
        self.w.join_room(self.slot, self.generation, room, creator)
    }

    fn leave(&mut self, room: &str) {
        self.w.leave_room(self.slot, self.generation, room);
    }

    fn publish(&mut self, from: &Arc<str>, room: &str, payload: &[u8]) -> Result<(), (ErrorCode, String)> {
        let w = self.w;
        let name = {
            let conns = w.conns.borrow();
            let rooms = w.rooms.borrow();
            let mine = conns.get(self.slot as usize).and_then(|s| s.rooms.as_deref());
            let member = rooms.find(room).filter(|&idx| mine.is_some_and(|l| l.iter().any(|&(i, _)| i == idx)));
            match member {
                Some(idx) => rooms.room(idx).name.clone(),
                None => {
                    return Err((ErrorCode::NotMember, "PUBLISH to a room this connection has not joined".into()));
                }
            }
        };
        let max = w.shared.max_room_payload(room, from);
        if payload.len() > max {
            let reason =
                format!("payload of {} bytes: at most {max} fit a ROOM_MSG in this room from this user", payload.len());
            return Err((ErrorCode::PayloadTooLarge, reason));
        }
        let frame =
            Frame::RoomMsg { msg_id: w.next_msg_id(), room, from, payload }.to_bytes().expect("sizes checked above");
        // Every worker's members, this one's included, are reached through
        // the mailboxes, so the fan-out runs in the mailbox loop, in steps.
        let accepted_ns = w.shared.since_epoch_ns();
        w.shared.to_cluster(|| crate::cluster::Event::Room { room: name.clone(), frame: frame.clone() });
        if w.shared.post_all(frame, |frame| Command::Publish { room: name.clone(), frame, accepted_ns }).is_err() {
            return Err((ErrorCode::Overloaded, "a worker mailbox is full; not every member got the message".into()));
        }
        Ok(())
    }

    fn page(&mut self, path: &str) -> Vec<u8> {
        let shared = &self.w.shared;
        let demo = shared.config.websocket.serves_demo();
        match path {
            "/" | "/index.html" if demo => handshake::response_200("text/html; charset=utf-8", crate::demo::PAGE),
            _ if demo && path.starts_with("/demo/token/") => crate::demo::token_response(shared, path),
            _ if demo => handshake::response_error(404, "not found: this port serves WebSocket and the demo page", &[]),
            _ => handshake::HandshakeError::NotUpgrade { path: path.to_string() }.response(),
        }
    }

    fn closing(&mut self, user: Option<Arc<str>>, last: Bytes, encoded: bool, discard_queue: bool) {
        let w = self.w;
        w.forget_device(self.slot, self.generation);
        w.out.close(self.slot, self.generation, last, encoded, discard_queue);
        let rooms = w.conns.borrow_mut().get_mut(self.slot as usize).and_then(|s| s.rooms.take());
        w.leave_all_rooms(self.slot, self.generation, rooms);
        if let Some(user) = user {
            w.unregister(&user, self.slot, self.generation);
        }
    }

    fn with_budget<R>(&mut self, user: &Arc<str>, f: impl FnOnce(&mut Option<crate::proto::rate::Budget>) -> R) -> R {
        self.w.shared.budgets.with(user, f)
    }

    fn clock_ms(&mut self) -> u64 {
        self.w.clock_ms()
    }

    fn over_budget_close(&mut self, user: &Arc<str>) {
        let mut o = self.w.over_budget.borrow_mut();
        o.0 += 1;
        o.1 = Some(user.clone());
    }

    fn count(&mut self, what: Count) {
        let c = self.w.counters();
        let counter = match what {
            Count::FrameIn(t) => {
                bump(&c.detail.messages_in[crate::stats::message_in_index(t)], 1);
                &c.frames_in
            }
            Count::ProtocolError(code) => {
                bump(&c.detail.protocol_errors[crate::stats::protocol_error_index(code)], 1);
                &c.protocol_errors
            }
            Count::LoginFailure(code) => {
                bump(&c.detail.login_failures[crate::stats::login_failure_index(code)], 1);
                &c.login_failures
            }
            Count::Login => &c.logins,
            Count::RawTransport => &c.detail.raw_connections,
            Count::WsUpgrade => {
                bump(&c.detail.ws_connections, 1);
                &c.ws_upgrades
            }
            Count::WsHandshakeFailure => &c.ws_handshake_failures,
            Count::HttpRequest => &c.http_requests,
            Count::PingSent => &c.pings_sent,
            Count::LoginTimeout => {
                bump(&c.detail.login_failures[crate::stats::LOGIN_TIMEOUT_REASON], 1);
                &c.login_timeouts
            }
            Count::IdleTimeout => &c.idle_timeouts,
            Count::RateLimited => &c.rate_limited,
        };
        bump(counter, 1);
    }

    fn overflowed(&self) -> bool {
        // Set by `Worker::close_slow_consumer` while this machine is fed.
        self.w.conns.borrow().get(self.slot as usize).is_some_and(|s| s.generation == self.generation && s.slow)
    }
}

impl Worker {
    pub(crate) fn new(id: WorkerId, shared: Arc<Shared>, poller: Poller) -> Worker {
        let now = current_tick(&shared);
        let close = Frame::Close { code: CloseCode::ServerFull as u16, reason: CloseCode::ServerFull.reason() };
        Worker {
            id,
            handle: Handle { shared: shared.clone() },
            rules: Rules::new(
                &shared.config,
                shared.timeouts,
                shared.ws_addr,
                shared.hook.is_some(),
                shared.store.get().is_some(),
            ),
            conns: RefCell::new(Slab::with_capacity(shared.max_conns_per_worker)),
            bufs: poller.buffers(),
            starved: RefCell::new(Vec::new()),
            runs: RefCell::new(hashbrown::HashMap::new()),
            recheck: RefCell::new(hashbrown::HashSet::new()),
            out: Writer::new(id, shared.clone(), poller),
            wheel: RefCell::new(Wheel::new(now)),
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            lookup: RefCell::new(ConnList::new()),
            rooms: RefCell::new(LocalRooms::default()),
            fanout: RefCell::new(Vec::new()),
            read_again: RefCell::new(Vec::new()),
            next_generation: Cell::new(1),
            next_msg: Cell::new(0),
            now: Cell::new(now),
            server_full: close.to_bytes().expect("reason fits"),
            stopped: Cell::new(false),
            stop_waker: Cell::new(None),
            listener_fd: Cell::new(-1),
            ws_listener_fd: Cell::new(-1),
            drain_started: Cell::new(false),
            drained: Cell::new(false),
            accepting: Cell::new(0),
            hint_rng: Cell::new(hint_seed(id)),
            mailbox_ready: Cell::new(false),
            store_batching: Cell::new(false),
            store_unwoken: Cell::new(false),
            mailbox_waker: Cell::new(None),
            holders: RefCell::new(std::collections::BTreeMap::new()),
            next_hold: Cell::new(0),
            held_bytes: Cell::new(0),
            reliable: RefCell::new(reliable::Reliable::default()),
            unsaved: RefCell::new(Vec::new()),
            closed_unsaved: RefCell::new(reliable::ClosedUnsaved::new()),
            seen_cursor: Cell::new(0),
            open: RefCell::new(Vec::new()),
            window_rules: shared.config.window_rules(),
            over_budget: RefCell::default(),
            shared,
        }
    }

    fn counters(&self) -> &WorkerCounters {
        &self.shared.counters[self.id.0 as usize]
    }

    /// Milliseconds since the server started (monotonic): the send
    /// budget's clock.
    fn clock_ms(&self) -> u64 {
        self.shared.epoch.elapsed().as_millis() as u64
    }

    /// One WARN line for the connections closed with 4009 since the last
    /// tick, naming the last one's user.
    fn log_over_budget(&self) {
        let (closed, user) = std::mem::take(&mut *self.over_budget.borrow_mut());
        if let Some(user) = user {
            tracing::warn!(
                worker = self.id.0,
                user = &*user,
                "closed {closed} connection(s) that went on sending over their send budget \
                 (the limits.send_max_refused-th refusal in a row); the last was this user's"
            );
        }
    }

    /// Drops the send budgets that are full again (the user is the same
    /// as one with none: `proto::rate`), from this worker's share of the
    /// server's table (`runtime::budgets`).
    fn drop_full_budgets(&self) {
        let Some(limit) = &self.rules.send_limit else { return };
        self.shared.budgets.drop_full(limit, self.clock_ms(), self.id.0 as usize, self.shared.mailboxes.len());
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

    /// A shutdown or a drain has begun: no new connections.
    fn stopping(&self) -> bool {
        self.shared.shutdown.load(Ordering::Acquire) || self.shared.draining.load(Ordering::Acquire)
    }

    // ---- feeding a connection's machine -------------------------------------

    /// Takes the machine of connection (`slot`, `generation`) out of its
    /// slot, runs `f` on it with an `Io` for what it asks, and puts it back:
    /// no borrow of the table is held while it runs, so what it asks may
    /// reach any connection, itself included. Then files an earlier
    /// deadline (`reschedule`) and settles what it holds. `None`: no such
    /// connection, or it is being fed already.
    fn with_conn<R>(
        &self,
        slot: u32,
        generation: u32,
        reschedule: bool,
        f: impl FnOnce(&mut Connection, &mut Io<'_>) -> R,
    ) -> Option<R> {
        let mut conn = {
            let mut conns = self.conns.borrow_mut();
            let s = conns.get_mut(slot as usize).filter(|s| s.generation == generation && !s.busy)?;
            s.busy = true;
            std::mem::replace(&mut s.conn, Connection::new(Listener::Raw { sniff: false }, 0))
        };
        let was_closing = conn.is_closing();
        let r = f(&mut conn, &mut Io { w: self, slot, generation });
        let gone = conn.settle();
        let slow = {
            let mut conns = self.conns.borrow_mut();
            let s = conns.get_mut(slot as usize).expect("a connection is released only by its reads, never while fed");
            s.busy = false;
            if reschedule {
                let next = conn.next_deadline(&self.shared.timeouts);
                if (next.wrapping_sub(s.wheel_at) as i32) < 0 {
                    s.wheel_at = self.wheel.borrow_mut().insert(next, slot, generation);
                }
            }
            self.account_held(&mut conn, gone, slot, generation);
            s.conn = conn;
            std::mem::take(&mut s.slow)
        };
        if slow && !was_closing {
            // Counted once, however many of its writes overflowed while it
            // was fed; the machine may have closed itself already
            // (`Env::overflowed`).
            bump(&self.counters().slow_consumers, 1);
            self.close_conn(slot, generation, CloseCode::SlowConsumer, CloseCode::SlowConsumer.reason());
        }
        Some(r)
    }

    /// Charges what a connection holds to the worker's budget, lists a new
    /// holder, and un-charges one that let go.
    fn account_held(&self, conn: &mut Connection, gone: Option<HoldTicket>, slot: u32, generation: u32) {
        if let Some(t) = gone {
            self.forget_held(t);
        }
        let bytes = conn.held_bytes();
        let Some(h) = conn.held_mut() else { return };
        let t = h.ticket.get_or_insert_with(|| {
            let seq = self.next_hold.get();
            self.next_hold.set(seq + 1);
            let fresh = self.holders.borrow_mut().insert(seq, Holder { slot, generation, since: self.now.get() });
            debug_assert!(fresh.is_none(), "holder keys are never reused");
            HoldTicket { seq, charged: 0 }
        });
        self.held_bytes.set(self.held_bytes.get() - t.charged + bytes);
        t.charged = bytes;
    }

    fn forget_held(&self, t: HoldTicket) {
        let removed = self.holders.borrow_mut().remove(&t.seq);
        debug_assert!(removed.is_some(), "every ticket is listed once");
        self.held_bytes.set(self.held_bytes.get() - t.charged);
    }

    /// Starts closing a connection with a CLOSE frame (`code`: one of ours).
    /// Returns whether this started its close (false: gone, closing
    /// already, or being fed).
    fn close_conn(&self, slot: u32, generation: u32, code: CloseCode, reason: &str) -> bool {
        self.start_close(slot, generation, code, reason) == Some(true)
    }

    /// [`Worker::close_conn`]'s answer as the machine gave it: `None` when
    /// there is no such connection or it is being fed.
    fn start_close(&self, slot: u32, generation: u32, code: CloseCode, reason: &str) -> Option<bool> {
        let now = self.now.get();
        self.with_conn(slot, generation, true, |c, io| c.close(code as u16, reason, now, io))
    }

    /// A write to connection (`slot`, `generation`) found its queue over the
    /// limit: closes it with 4004 and counts it, once. While its machine is
    /// being fed (a reply, or a delivery to itself) the machine is told
    /// (`Env::overflowed`), and `with_conn` counts and closes it once back.
    fn close_slow_consumer(&self, slot: u32, generation: u32) {
        match self.start_close(slot, generation, CloseCode::SlowConsumer, CloseCode::SlowConsumer.reason()) {
            Some(true) => bump(&self.counters().slow_consumers, 1),
            Some(false) => {} // closing already
            None => {
                if let Some(s) = self.conns.borrow_mut().get_mut(slot as usize).filter(|s| s.generation == generation) {
                    s.slow = true;
                }
            }
        }
    }

    /// Delivers `frame` to a logged-in connection on any worker. Returns
    /// whether it was handed over.
    fn deliver(&self, conn: ConnId, frame: Bytes) -> bool {
        match self.out.deliver(conn, frame) {
            Delivered::Direct | Delivered::Batched | Delivered::Queued => true,
            Delivered::No => false,
            Delivered::Overflow => {
                self.close_slow_consumer(conn.slot(), conn.generation());
                false
            }
        }
    }

    fn unregister(&self, user: &Arc<str>, slot: u32, generation: u32) {
        let removed = self.shared.directory.unregister(user, ConnId::new(self.id, slot, generation));
        debug_assert!(removed, "a logged-in connection is in the directory");
        self.shared.to_cluster(|| crate::cluster::Event::Offline(user.clone()));
        drop_one(&self.counters().logged_in);
    }

    // ---- accept -------------------------------------------------------------

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
        if self.conns.borrow().len() >= self.shared.max_conns_per_worker {
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
        if self.shared.config.socket.nodelay {
            sys::set_nodelay(fd);
        }
        let listener = if websocket {
            Listener::WebSocket
        } else {
            Listener::Raw { sniff: self.shared.config.websocket.sniff_on_raw_port }
        };
        let generation = self.next_generation.get();
        self.next_generation.set(generation.wrapping_add(1).max(1));
        let now = self.refresh_now();
        let conn = Connection::new(listener, now);
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let slot = entry.key() as u32;
        let wheel_at = self.wheel.borrow_mut().insert(conn.next_deadline(&self.shared.timeouts), slot, generation);
        self.out.attach(slot, generation, fd, Connection::initial_wire(listener));
        entry.insert(Slot { conn, rooms: None, fd, generation, wheel_at, busy: false, slow: false });
        let c = self.counters();
        bump(&c.accepted, 1);
        bump(&c.connections, 1);
        if listener == (Listener::Raw { sniff: false }) {
            bump(&c.detail.raw_connections, 1);
        }
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

    // ---- readiness ----------------------------------------------------------

    /// One event from the poller.
    fn on_ready(&self, tok: u64, ready: Ready) {
        if let Ready::Mailbox = ready {
            return self.wake_mailbox();
        }
        let (slot, generation, _) = untoken(tok);
        if let Ready::Recv { res, flags, more } = ready {
            return self.on_recv(slot, generation, res, flags, more);
        }
        let fd = match self.conns.borrow().get(slot as usize) {
            Some(s) if s.generation == generation => s.fd,
            _ => return, // stale: the connection is gone
        };
        match ready {
            Ready::Read => {
                if !self.on_readable(slot, generation, fd) {
                    self.release(slot, generation);
                }
            }
            Ready::Write => {
                if self.out.on_writable(slot, generation) {
                    self.out.poller.borrow_mut().want_write(fd, tok);
                }
            }
            Ready::Recv { .. } | Ready::Mailbox => unreachable!("handled above"),
        }
    }

    /// Wakes the mailbox loop: the mailbox's eventfd fired (epoll), or its
    /// flag is up (io_uring, checked by the I/O loop every turn).
    pub(super) fn wake_mailbox(&self) {
        self.mailbox_ready.set(true);
        if let Some(waker) = self.mailbox_waker.take() {
            waker.wake();
        }
    }

    /// io_uring: wakes the mailbox loop if it sleeps while its mailbox's
    /// flag is up. Returns whether it did. (A mailbox loop that is not
    /// asleep re-arms the flag and looks at its queue by itself.)
    pub(super) fn poke_mailbox(&self) -> bool {
        if !self.shared.mailboxes[self.id.0 as usize].signalled() {
            return false;
        }
        match self.mailbox_waker.take() {
            Some(waker) => {
                self.mailbox_ready.set(true);
                waker.wake();
                true
            }
            None => false,
        }
    }

    /// One completion of a connection's multishot receive (io_uring): its
    /// bytes, straight from the buffer ring into the connection's machine,
    /// then the buffer goes back (a connection keeps only what an
    /// incomplete frame needs, copied, as with the scratch buffer). The
    /// replies are flushed once per I/O-loop turn, with every other
    /// completion's.
    fn on_recv(&self, slot: u32, generation: u32, res: i32, flags: u32, more: bool) {
        let bufs = self.bufs.as_ref().expect("receives complete only on the io_uring poller");
        // A stale completion (its connection released, the receive
        // cancelled) finds no connection below: `with_conn`, `release` and
        // `rearm_read` all check the generation, so only its buffer matters.
        let open = match res {
            // SAFETY: one completion, taken once; the slice is not used
            // after `done`.
            n if n > 0 => match unsafe { bufs.take(flags, n as usize) } {
                Some((bid, data)) => {
                    let now = self.now.get();
                    let fed = self.with_conn(slot, generation, true, |c, io| c.on_read(data, now, &self.rules, io));
                    bufs.done(bid, flags, n as usize);
                    if fed.is_none() {
                        return;
                    }
                    bump(&self.counters().detail.bytes_in, n as u64);
                    self.enforce_held_budget();
                    self.track_run(slot, generation, flags & CQE_F_SOCK_NONEMPTY != 0);
                    true
                }
                None => false,
            },
            0 => false,
            e if e == -libc::ECANCELED => {
                // `recheck_runs` ended the receive to start a new one (the
                // only cancellation of a live connection's receive: the
                // one `release` leaves behind finds the slot gone or
                // reused, and `rearm_read` checks the generation).
                self.rearm_read(slot, generation);
                return;
            }
            e if e == -libc::ENOBUFS => {
                // The kernel ended the receive: every buffer was taken
                // between two turns. Nothing was read, nothing is lost.
                bump(&self.counters().recv_buffers_exhausted, 1);
                self.starved.borrow_mut().push((slot, generation));
                return;
            }
            e => {
                tracing::trace!(worker = self.id.0, slot, "receive failed: errno {}", -e);
                false
            }
        };
        if !open {
            self.release(slot, generation);
        } else if !more {
            self.rearm_read(slot, generation);
        }
    }

    /// Follows a connection's run of receives: `nonempty` when the
    /// completion said more bytes wait in the socket. A run of at least
    /// `LONG_RUN` that ends (a completion that found the socket empty)
    /// puts the connection on the recheck list.
    ///
    /// Why: measured on Linux 6.18, a multishot receive that runs for
    /// long without the socket going empty (a client streaming into a
    /// small receive buffer: every read opens the window and the next
    /// segment arrives while the receive still runs) can miss the wake-up
    /// of a segment that arrives during its last read. The trace showed
    /// the segment queued and `sk_data_ready` called, and no completion
    /// and no task work for the receive after it: the bytes sat unread,
    /// the window stayed shut and the client waited for ever
    /// (tests/core.rs, `io_uring_receive_goes_on_after_a_long_burst_into_a_small_buffer`).
    /// The receive stays armed and the next wake-up works; at the end of
    /// the run, `recheck_runs` restarts the receive if bytes wait.
    fn track_run(&self, slot: u32, generation: u32, nonempty: bool) {
        let mut runs = self.runs.borrow_mut();
        if nonempty {
            let e = runs.entry(slot).or_insert((generation, 0));
            if e.0 != generation {
                *e = (generation, 0);
            }
            e.1 += 1;
        } else if !runs.is_empty() {
            if let Some((g, n)) = runs.remove(&slot) {
                if g == generation && n >= LONG_RUN {
                    self.recheck.borrow_mut().insert((slot, generation));
                }
            }
        }
    }

    /// Looks once at every connection whose long run of receives ended
    /// (`track_run`), when a reap found no completion: bytes waiting in
    /// its socket then are what a lost wake-up left (or arrived this very
    /// moment), and its receive is restarted (`Poller::restart_read`), so
    /// that a new one reads them. A look that finds bytes counts in
    /// `recv_lost_wakeups`.
    ///
    /// Not a read of the socket here: with cooperative task work
    /// (`Poller::uring`) the kernel runs the receives' work and posts
    /// their completions at any return of this thread from the kernel (a
    /// system call, an interrupt), so a completion with earlier bytes
    /// could come after a direct read took later ones, and the stream
    /// would reach the connection's machine out of order. Measured: with
    /// direct reads the burst test above failed in 1 of 10 runs under
    /// load, the server closing the client with 1009 on a "frame" length
    /// read from the middle of a payload.
    pub(super) fn recheck_runs(&self) {
        let recheck = std::mem::take(&mut *self.recheck.borrow_mut());
        let c = self.counters();
        for (slot, generation) in recheck {
            let fd = match self.conns.borrow().get(slot as usize) {
                Some(s) if s.generation == generation => s.fd,
                _ => continue,
            };
            if sys::unread_bytes(fd) == 0 {
                continue;
            }
            bump(&c.recv_lost_wakeups, 1);
            // A second restart before the first one's `-ECANCELED` came
            // cancels the new receive, which `on_recv` arms again: no harm.
            self.out.poller.borrow_mut().restart_read(token(slot, generation));
        }
    }

    /// Arms a live connection's receive again (the kernel ended it).
    fn rearm_read(&self, slot: u32, generation: u32) {
        let fd = match self.conns.borrow().get(slot as usize) {
            Some(s) if s.generation == generation => s.fd,
            _ => return,
        };
        self.out.poller.borrow_mut().rearm_read(fd, token(slot, generation));
    }

    /// Arms again the receives the kernel ended on an empty buffer ring,
    /// now that this turn's buffers are back.
    pub(super) fn rearm_starved(&self) {
        let starved = std::mem::take(&mut *self.starved.borrow_mut());
        for (slot, generation) in starved {
            self.rearm_read(slot, generation);
        }
    }

    /// Drains a readable socket into the connection's machine. Returns false
    /// when the connection is finished and must be released.
    fn on_readable(&self, slot: u32, generation: u32, fd: RawFd) -> bool {
        match self.read_socket(slot, generation, fd) {
            Some(drained) => {
                if !drained {
                    self.read_again.borrow_mut().push((slot, generation));
                }
                true
            }
            None => false,
        }
    }

    /// Reads a socket into the connection's machine until it is empty or
    /// `MAX_READS_PER_WAKE` reads were made. `None`: the connection is
    /// finished and must be released; else whether the socket was drained.
    fn read_socket(&self, slot: u32, generation: u32, fd: RawFd) -> Option<bool> {
        let mut open = true;
        let mut drained = false;
        {
            let mut scratch = self.scratch.borrow_mut();
            let now = self.now.get();
            for _ in 0..MAX_READS_PER_WAKE {
                match sys::recv(fd, &mut scratch) {
                    Recv::Data(n) => {
                        bump(&self.counters().detail.bytes_in, n as u64);
                        let data = &mut scratch[..n];
                        self.with_conn(slot, generation, true, |c, io| c.on_read(data, now, &self.rules, io))?;
                        if n < SCRATCH_BYTES {
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
        self.enforce_held_budget();
        self.out.flush_dirty();
        open.then_some(drained)
    }

    /// Closes (1013) the longest holders while the worker holds more than
    /// `limits.partial_bytes_per_worker` in incomplete frames.
    fn enforce_held_budget(&self) {
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

    /// Closes a holder (its close lets its buffers go); a holder whose
    /// connection cannot start closing is taken off the list directly, so
    /// the callers' loops always progress.
    fn drop_holder(&self, h: Holder, code: CloseCode, reason: &str) {
        self.close_conn(h.slot, h.generation, code, reason);
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
    fn expire_held(&self, now: Tick) {
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

    // ---- rooms ----------------------------------------------------------------

    /// Joins a connection to `room` (see `proto::conn::Env::join`).
    fn join_room(&self, slot: u32, generation: u32, room: &str, creator: Option<&Arc<str>>) -> Result<(), RoomError> {
        let mut conns = self.conns.borrow_mut();
        let Some(s) = conns.get_mut(slot as usize).filter(|s| s.generation == generation) else { return Ok(()) };
        let mut rooms = self.rooms.borrow_mut();
        let mine = s.rooms.as_deref().map_or(&[][..], |v| v.as_slice());
        if rooms.find(room).is_some_and(|idx| mine.iter().any(|&(i, _)| i == idx)) {
            return Ok(());
        }
        let limit = self.shared.config.rooms.max_rooms_per_conn;
        if mine.len() >= limit {
            return Err(RoomError::ConnRoomLimit { limit });
        }
        let crate::rooms::Joined { name, created } = self.shared.rooms.join(room, creator)?;
        if created && self.shared.clustered() {
            // The node's first member: subscribe to the room's channel.
            self.shared.to_cluster(|| crate::cluster::Event::RoomChanged(name.clone()));
        }
        let entry = rooms.add(&name, Member { slot, generation });
        s.rooms.get_or_insert_with(Default::default).push(entry);
        Ok(())
    }

    /// Takes a connection out of `room` (nothing if it was not in).
    fn leave_room(&self, slot: u32, generation: u32, room: &str) {
        let entry = {
            let mut conns = self.conns.borrow_mut();
            let Some(s) = conns.get_mut(slot as usize).filter(|s| s.generation == generation) else { return };
            let idx = self.rooms.borrow().find(room);
            let list = s.rooms.as_mut();
            let e = match (idx, list) {
                (Some(idx), Some(list)) => list.iter().position(|&(i, _)| i == idx).map(|k| list.swap_remove(k)),
                _ => None,
            };
            if s.rooms.as_ref().is_some_and(|l| l.is_empty()) {
                s.rooms = None;
            }
            e
        };
        if let Some((idx, pos)) = entry {
            self.drop_membership(idx, pos, Member { slot, generation });
        }
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
            let s = conns.get_mut(moved.slot as usize).filter(|s| s.generation == moved.generation);
            let entry = s.and_then(|s| s.rooms.as_mut()).and_then(|l| l.iter_mut().find(|(i, _)| *i == idx));
            match entry {
                Some(e) => e.1 = new_pos,
                None => debug_assert!(false, "a room member without the membership record"),
            }
        }
        if self.shared.rooms.leave(&name) && self.shared.clustered() {
            self.shared.to_cluster(|| crate::cluster::Event::RoomChanged(name));
        }
    }

    /// Leaves every room (the connection is closing or gone). `rooms` was
    /// taken out of the slot; its positions stay valid throughout, because
    /// each removal moves another member of that room, never this
    /// connection.
    #[allow(clippy::box_collection)] // the field's own type (see `Slot`)
    fn leave_all_rooms(&self, slot: u32, generation: u32, rooms: Option<Box<Vec<(RoomIdx, u32)>>>) {
        for (idx, pos) in rooms.into_iter().flat_map(|b| b.into_iter()) {
            self.drop_membership(idx, pos, Member { slot, generation });
        }
    }

    // ---- fan-out ----------------------------------------------------------------

    /// Writes `frames` (consecutive messages for the same audience, at most
    /// one iovec array) to every member, `FANOUT_CHUNK` members per step.
    /// A member with nothing queued gets one send straight from the shared
    /// buffers: no copy, no queue, no reference count taken (with
    /// `server.batch_sends`, a step of `BATCH_MIN` members or more sends
    /// them as one batch of io_uring submissions, `Writer::send_staged`).
    /// Only what its socket does not take is queued.
    ///
    /// `accepted_ns` (`Shared::since_epoch_ns`) starts the push-to-written
    /// latency: one clock read per step records it for the step's direct
    /// writes.
    async fn fan_out(&self, room: Option<&str>, frames: &[Bytes], accepted_ns: u64) {
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
                        .filter(|(_, s)| s.conn.is_active())
                        .map(|(slot, s)| Member { slot: slot as u32, generation: s.generation }),
                );
            }
        }
        let mut out = Outgoing::new(frames);
        for (step, chunk) in members.chunks(FANOUT_CHUNK).enumerate() {
            if step > 0 {
                YieldNow(false).await;
            }
            let (mut direct, mut batched, mut queued) = (0, 0, 0);
            let how = if chunk.len() >= BATCH_MIN { Step::Batched } else { Step::FanOut };
            for &m in chunk {
                match self.out.put(m, &mut out, how) {
                    Delivered::Direct => direct += 1,
                    Delivered::Batched => batched += 1,
                    Delivered::Overflow => self.close_slow_consumer(m.slot, m.generation),
                    Delivered::Queued => queued += 1,
                    Delivered::No => {}
                }
            }
            // The step's batched sends (`server.batch_sends`) and replies go out
            // now, before the latency is taken.
            self.out.send_staged(&mut out);
            self.out.flush_dirty();
            self.out.poller.borrow_mut().flush();
            // Direct writes counted once per step, not per member (batched
            // ones count as they are sent).
            let c = self.counters();
            bump(&c.writes, direct);
            bump(&c.frames_out, direct * frames.len() as u64);
            let kind = if room.is_some() { crate::stats::DELIVERY_ROOM } else { crate::stats::DELIVERY_BROADCAST };
            bump(&c.detail.deliveries[kind], (direct + batched + queued) * frames.len() as u64);
            if direct + batched > 0 {
                let ns = self.shared.since_epoch_ns().saturating_sub(accepted_ns);
                c.detail.push_to_written.observe(ns, direct + batched);
            }
        }
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
            sends += usize::from(self.out.send_blocking(m, frame, (now + CEILING_WAIT_PER_MEMBER).min(end)));
        }
        CeilingSample { sends, elapsed: t0.elapsed() }
    }

    /// Requests other threads left on this worker's slots (see
    /// `Writer::take_requests`).
    fn on_requests(&self) {
        let (mut list, mut close) = (Vec::new(), Vec::new());
        self.out.take_requests(&mut list, &mut close);
        for (slot, generation) in close {
            self.close_slow_consumer(slot, generation);
        }
    }

    // ---- closing --------------------------------------------------------------

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

    /// Frees a finished connection's slot and closes its socket. Called only
    /// from a read event (EOF, error, or after shutdown(2)), so no read poll
    /// is armed for it.
    fn release(&self, slot: u32, generation: u32) {
        let mut s = {
            let mut conns = self.conns.borrow_mut();
            match conns.get(slot as usize) {
                Some(s) if s.generation == generation && !s.busy => conns.remove(slot as usize),
                _ => return,
            }
        };
        if let Some(t) = s.conn.take_held().and_then(|h| h.ticket) {
            self.forget_held(t);
        }
        self.leave_all_rooms(slot, generation, s.rooms.take());
        if let Some(user) = s.conn.user() {
            self.unregister(user, slot, generation);
        }
        self.forget_device(slot, generation);
        if !self.runs.borrow().is_empty() {
            self.runs.borrow_mut().remove(&slot);
        }
        self.out.detach(slot, generation, s.fd);
        let c = self.counters();
        drop_one(&c.connections);
        bump(&c.closed, 1);
        match s.conn.transport() {
            crate::proto::conn::Transport::Raw => drop_one(&c.detail.raw_connections),
            crate::proto::conn::Transport::Ws(_) => drop_one(&c.detail.ws_connections),
            crate::proto::conn::Transport::Sniff | crate::proto::conn::Transport::Http => {}
        }
    }

    // ---- mailbox ----------------------------------------------------------------

    fn on_command(&self, cmd: Command) {
        match cmd {
            Command::Close { conn, code } => {
                let started = self.close_conn(conn.slot(), conn.generation(), code, code.reason());
                if started && code == CloseCode::Kicked {
                    bump(&self.counters().kicked, 1);
                }
            }
            Command::Join { conn, room } => {
                self.with_conn(conn.slot(), conn.generation(), true, |c, io| c.join(&room, None, io));
            }
            Command::Leave { conn, room } => {
                self.with_conn(conn.slot(), conn.generation(), true, |c, io| c.leave(&room, None, io));
            }
            Command::SendCeiling { room, frame, reply } => {
                let _ = reply.send(self.send_ceiling(&room, &frame));
            }
            Command::Adopt { fd, websocket } => self.on_accept(fd, websocket, true),
            Command::Crash => panic!("worker {} made to panic by crash_worker_for_testing", self.id.0),
            Command::Stored { conn, msg } => self.on_stored(conn, msg),
            Command::SendDone(done) => self.on_send_done(*done),
            Command::DeviceReady { conn, result } => self.on_device_ready(conn, result.map_err(|e| *e)),
            Command::Page { conn, result } => self.on_page(conn, *result),
            Command::Missed { conn, seq } => self.on_missed(conn, seq),
            Command::StoreReset => self.on_store_reset(),
            Command::Replaced { conn, device, login, from } => self.on_replaced(conn, &device, login, from.as_ref()),
            Command::Publish { .. } | Command::Broadcast { .. } => {
                unreachable!("fan-out commands are handled by the mailbox loop")
            }
        }
    }

    // ---- timers -------------------------------------------------------------------

    fn on_due(&self, e: Entry) {
        let now = self.now.get();
        {
            let conns = self.conns.borrow();
            match conns.get(e.slot as usize) {
                Some(s) if s.generation == e.generation && s.wheel_at == e.at => {}
                _ => return, // stale or superseded entry
            }
        }
        let Some(due) = self.with_conn(e.slot, e.generation, false, |c, io| c.on_tick(now, &self.rules, io)) else {
            return;
        };
        let mut conns = self.conns.borrow_mut();
        let Some(s) = conns.get_mut(e.slot as usize) else { return };
        let next = match due {
            Due::At(next) => next,
            Due::Finish => {
                // The read event this causes releases the slot. Visit again
                // a linger later in case it is lost.
                sys::shutdown(s.fd, libc::SHUT_RDWR);
                now.wrapping_add(self.shared.timeouts.linger)
            }
        };
        s.wheel_at = self.wheel.borrow_mut().insert(next, e.slot, e.generation);
    }

    /// Shuts every remaining socket down; each read event then releases it.
    fn abort_all(&self) {
        for (_, s) in self.conns.borrow().iter() {
            sys::shutdown(s.fd, libc::SHUT_RDWR);
        }
    }

    /// The connections `keep` selects, by slot and generation.
    fn select(&self, keep: impl Fn(&Connection) -> bool) -> Vec<(u32, u32)> {
        self.conns.borrow().iter().filter(|(_, s)| keep(&s.conn)).map(|(i, s)| (i as u32, s.generation)).collect()
    }

    /// Starts closing every connection (server shutdown).
    fn close_all(&self, code: CloseCode) {
        for (slot, generation) in self.select(|_| true) {
            self.close_conn(slot, generation, code, code.reason());
        }
        self.out.flush_dirty();
    }
}

fn current_tick(shared: &Shared) -> Tick {
    (shared.epoch.elapsed().as_millis() / shared.config.timeouts.tick_ms as u128) as Tick
}
