//! Fuzz target for the sans-IO connection machine (`proto::conn`) with
//! the reliable-delivery window (`proto::reliable`) behind it: the input is
//! a script of events for one or two connections of one user, on the raw
//! TCP port (with or without HTTP sniffing) or the WebSocket port. Client
//! bytes (mostly well-formed frames: LOGIN with or without a device, SEND,
//! SEND_EX, ACK, FETCH, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, MESSAGE, PING,
//! PONG, CLOSE, WebSocket control frames; and garbage) arrive in chunks of
//! any size; the clock moves and timers come due; the store answers logins,
//! reads, appends and failures late and out of step, as its thread and a
//! cluster's notices can; the socket drains or backs up; the worker pushes,
//! joins, closes and releases. The `Env` here is the sans-IO boundary: it
//! records what the machine asks for, and plays the worker's glue for the
//! window (a window per device connection, parked when idle).
//!
//! It checks what docs/PROTOCOL.md promises a client: no panic; every frame
//! the server writes is one whole server frame no longer than
//! `max_frame_bytes`; nothing after the close; INBOX seqs on a connection
//! increase strictly except after a retransmit or FETCH, and only after the
//! login SYNC; an INBOX carries the stored message of its seq; SYNC
//! positions never go back; at most `delivery.window` messages (and
//! `window_bytes`, unless one) unacknowledged; the bytes held for an
//! incomplete frame stay within the frame limits; a malformed frame closes
//! with the code section 2.4 gives; a timer visit never asks to be visited
//! again at or before now. Run from the repository root:
//! `cargo +nightly fuzz run conn` (fuzz/README.md).
#![no_main]

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchboard::config::Config;
use switchboard::proto::codes::{CloseCode, ErrorCode};
use switchboard::proto::conn::{Connection, Count, Due, Env, Listener, LoginRefused, Rules, StoreOpts, Transport};
use switchboard::proto::frame::{decode, Frame, FrameType, MAX_LOGIN_FRAME_BYTES, SEND_EX_TTL};
use switchboard::proto::rate::Budget;
use switchboard::proto::reliable::{Item, Pending, Window, WindowEnv, WindowRules};
use switchboard::proto::session::{Phase, Tick, Timeouts};
use switchboard::proto::wire::MAX_LOGIN_MESSAGE_BYTES;
use switchboard::proto::ws;
use switchboard::rooms::RoomError;
use switchboard::ClientMessageKind;

/// The fuzz input, read front to back; zeros once it runs out.
struct In<'a>(&'a [u8]);

impl In<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ---- the store ---------------------------------------------------------------

#[derive(Clone, Debug)]
struct Msg {
    seq: u64,
    msg_id: u64,
    payload: Vec<u8>,
}

impl Item for Msg {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// User "u"'s inbox, every message ever stored (seq = index + 1), the seqs
/// no longer kept (acknowledged by every device, or expired) and the
/// devices' positions.
#[derive(Default)]
struct Store {
    msgs: Vec<Msg>,
    gone: BTreeSet<u64>,
    positions: Vec<(String, u64)>,
}

impl Store {
    fn head(&self) -> u64 {
        self.msgs.len() as u64
    }
    fn append(&mut self, payload: Vec<u8>) -> u64 {
        let seq = self.head() + 1;
        self.msgs.push(Msg { seq, msg_id: 1000 + seq, payload });
        seq
    }
    fn page(&self, after: u64, limit: u32) -> Vec<Msg> {
        self.msgs
            .iter()
            .skip(after as usize)
            .filter(|m| !self.gone.contains(&m.seq))
            .take(limit as usize)
            .cloned()
            .collect()
    }
    fn position(&self, device: &str) -> Option<u64> {
        self.positions.iter().find(|(d, _)| d == device).map(|(_, p)| *p)
    }
    fn save(&mut self, device: &str, seq: u64) {
        match self.positions.iter_mut().find(|(d, _)| d == device) {
            Some((_, p)) => *p = (*p).max(seq),
            None => self.positions.push((device.to_string(), seq)),
        }
    }
}

// ---- what one connection's client saw, and the checks on it ----------------------

/// Frames queued for the connection, in order, with the window events that
/// explain them.
enum Ev {
    Frame(Bytes),
    /// A retransmit or a FETCH: the next INBOX comes after this seq, not
    /// necessarily after the last one.
    Rewind(u64),
    /// The window took an ACK (or FETCH) up to this seq.
    Covered(u64),
}

#[derive(Default)]
struct Client {
    last_inbox: Option<u64>,
    floor: Option<u64>,
    synced: bool,
    position: u64,
    max_page_end: u64,
    live: bool,
    /// INBOX (seq, payload bytes) since the last rewind, not yet covered by
    /// an ACK: fewer than the window holds, never more.
    unacked: Vec<(u64, usize)>,
    /// The highest seq received in order since the last SYNC, for ACKs.
    have: u64,
    logged_in: bool,
}

/// The outbound queue as the write slot keeps it, and what went through it.
struct Out {
    max_frames: usize,
    max_bytes: usize,
    queue: VecDeque<usize>,
    queued_bytes: usize,
    log: Vec<Ev>,
    /// A write was refused since the machine was last handed this.
    slow: bool,
    /// A write was refused: the connection is closed as a slow consumer
    /// with its queue dropped, so nothing written meanwhile reaches the
    /// client (the write slot may take a smaller frame after refusing one,
    /// but only into the queue the close drops).
    doomed: bool,
}

impl Out {
    fn write(&mut self, frame: Bytes) -> bool {
        if self.doomed || self.queue.len() >= self.max_frames || self.queued_bytes + frame.len() > self.max_bytes {
            self.slow = true;
            self.doomed = true;
            return false;
        }
        self.queue.push_back(frame.len());
        self.queued_bytes += frame.len();
        self.log.push(Ev::Frame(frame));
        true
    }
    /// Bytes already in the connection's wire form (not checked as frames).
    fn write_encoded(&mut self, len: usize) {
        if self.doomed || self.queue.len() >= self.max_frames || self.queued_bytes + len > self.max_bytes {
            self.slow = true;
            self.doomed = true;
            return;
        }
        self.queue.push_back(len);
        self.queued_bytes += len;
    }
    fn drain(&mut self, n: usize) {
        for _ in 0..n {
            let Some(len) = self.queue.pop_front() else { break };
            self.queued_bytes -= len;
        }
    }
}

enum Dev {
    None,
    Pending { pending: Pending },
    Parked { device: String, position: u64 },
    Open { device: String, w: Box<Window> },
}

/// One connection and the worker's state around it.
struct Side {
    conn: Connection,
    listener: Listener,
    out: Out,
    client: Client,
    /// Client bytes not yet read by the server.
    unread: Vec<u8>,
    /// The client speaks WebSocket (it sent an upgrade).
    client_ws: bool,
    /// The machine started its close (`Env::closing`).
    closed: bool,
    /// The code of the close it started with (0: an HTTP answer).
    close_code: Option<u16>,
    /// Logged in and open to deliveries.
    open: bool,
    /// Released by the worker: nothing more happens to it.
    gone: bool,
    /// The wheel entry.
    sched: Tick,
    dev: Dev,
    login_asked: Option<(String, u64)>,
    reads: VecDeque<(u64, u32)>,
    /// Pages read by the store, not yet handed back: (asked, messages, head).
    pages: VecDeque<(Vec<Msg>, u64)>,
    notices: VecDeque<u64>,
    next_req: u32,
}

/// The server-wide settings and the state the connections share.
struct World {
    rules: Rules,
    wrules: WindowRules,
    t: Timeouts,
    store: Store,
    budget: Option<(String, Budget)>,
    now: Tick,
    tick_ms: u64,
    draining: bool,
    store_busy: bool,
    has_store: bool,
}

// ---- the window glue: WindowEnv for one side -----------------------------------

struct WinIo<'a> {
    out: &'a mut Out,
    reads: &'a mut VecDeque<(u64, u32)>,
    busy: bool,
    position: u64,
    /// A FETCH after this seq is being answered: its SYNC starts a page.
    fetch: Option<u64>,
    read_failed: bool,
    saved: Option<u64>,
    close: Option<CloseCode>,
}

impl<'a> WinIo<'a> {
    fn new(side: &'a mut Side, busy: bool, position: u64) -> WinIo<'a> {
        WinIo {
            out: &mut side.out,
            reads: &mut side.reads,
            busy,
            position,
            fetch: None,
            read_failed: false,
            saved: None,
            close: None,
        }
    }
}

impl WindowEnv<Msg> for WinIo<'_> {
    fn deliver(&mut self, m: &Msg) {
        let frame = Frame::Inbox { seq: m.seq, msg_id: m.msg_id, ts_ms: 7, from: "w", payload: &m.payload };
        self.out.write(frame.to_bytes().expect("stored payloads fit an INBOX"));
    }
    fn sync(&mut self, req_id: u32, position: u64, head_seq: u64, page_end: u64) {
        if let Some(after) = self.fetch.take() {
            self.out.log.push(Ev::Rewind(after));
        }
        self.out.write(Frame::Sync { req_id, position, head_seq, page_end }.to_bytes().unwrap());
    }
    fn read(&mut self, after_seq: u64, limit: u32) {
        assert!(limit > 0, "a read of nothing");
        if self.busy {
            self.read_failed = true;
        } else {
            assert!(self.reads.is_empty(), "two reads outstanding: {:?} and ({after_seq}, {limit})", self.reads);
            self.reads.push_back((after_seq, limit));
        }
    }
    fn save_position(&mut self, seq: u64) {
        self.out.log.push(Ev::Covered(seq));
        self.saved = Some(seq);
    }
    fn error(&mut self, code: ErrorCode, req_id: u32, reason: &str) {
        let frame = Frame::Error { code: code as u16, req_id, reason };
        self.out.write(frame.to_bytes().unwrap());
    }
    fn close(&mut self, code: CloseCode, _reason: &str) {
        self.close = Some(code);
    }
    fn retransmitting(&mut self) {
        self.out.log.push(Ev::Rewind(self.position));
    }
}

/// What a window asked that the caller carries out on the connection.
#[derive(Default)]
struct After {
    overflow: bool,
    close: Option<CloseCode>,
}

/// Runs `f` on the side's window (`None` if it has no open or parked one),
/// as the worker's `with_window` does.
fn with_window(
    side: &mut Side,
    store: &mut Store,
    busy: bool,
    now: Tick,
    wr: &WindowRules,
    f: impl FnOnce(&mut Window, &mut WinIo<'_>),
) -> Option<After> {
    let (device, mut w) = match std::mem::replace(&mut side.dev, Dev::None) {
        Dev::Open { device, w } => (device, w),
        Dev::Parked { device, position } => (device, Box::new(Window::resume(position))),
        other => {
            side.dev = other;
            return None;
        }
    };
    let before = side.out.slow;
    side.out.slow = false;
    let mut io = WinIo::new(side, busy, w.position());
    f(&mut w, &mut io);
    let (read_failed, saved, close) = (io.read_failed, io.saved, io.close);
    let overflow = side.out.slow;
    side.out.slow = before || overflow;
    assert!(w.in_flight() <= wr.window as usize, "{} in flight, window {}", w.in_flight(), wr.window);
    if let Some(at) = w.deadline() {
        assert!((at.wrapping_sub(now) as i32) > 0 || w.in_flight() == 0 || read_failed, "deadline {at} at {now}");
    }
    if let Some(seq) = saved {
        store.save(&device, seq);
    }
    if read_failed {
        w.on_read_failed(now, wr);
    }
    side.dev = if w.is_idle() { Dev::Parked { device, position: w.position() } } else { Dev::Open { device, w } };
    Some(After { overflow, close })
}

// ---- the Env ------------------------------------------------------------------------

struct Io<'a> {
    side: &'a mut Side,
    world: &'a mut World,
}

impl Io<'_> {
    fn live(&self, what: &str) {
        assert!(!self.side.closed, "{what} after the close");
    }
}

impl Env for Io<'_> {
    fn reply(&mut self, frame: Bytes) {
        self.live("a reply");
        self.side.out.write(frame);
    }
    fn reply_encoded(&mut self, bytes: Bytes) {
        self.live("an encoded reply");
        // An HTTP 101 or a WebSocket control frame: not raw v1.
        self.side.out.write_encoded(bytes.len());
    }
    fn set_wire(&mut self, _wire: switchboard::proto::wire::Wire) {
        self.live("a wire change");
    }
    fn login(&mut self, user: &str, token: &[u8]) -> Result<(u64, Arc<str>), LoginRefused> {
        self.live("a login");
        if token == b"good" {
            Ok((1, Arc::from(user)))
        } else {
            Err(LoginRefused { code: 2, reason: "bad signature".into() })
        }
    }
    fn open(&mut self, login_ok: Bytes) {
        self.live("open");
        assert!(!self.side.open, "opened twice");
        self.side.open = true;
        self.side.out.write(login_ok);
    }
    fn draining(&mut self) -> Option<String> {
        self.world.draining.then(|| "server going away; reconnect_ms=5".to_string())
    }
    fn send(&mut self, _from: &Arc<str>, _to: &str, _payload: &[u8]) -> (u64, u32) {
        self.live("a send");
        (77, 1)
    }
    fn store_send(
        &mut self,
        from: &Arc<str>,
        to: &str,
        payload: &[u8],
        _req_id: u32,
        _opts: StoreOpts,
        _ex: bool,
    ) -> Result<(), (ErrorCode, String)> {
        self.live("a stored send");
        assert!(self.world.has_store, "stored without a store");
        assert!(payload.len() <= self.world.rules.max_inbox_payload(from), "an INBOX too large to write");
        if self.world.store_busy {
            return Err((ErrorCode::StoreUnavailable, "busy".into()));
        }
        if to == "u" {
            let seq = self.world.store.append(payload.to_vec());
            self.side.notices.push_back(seq);
        }
        Ok(())
    }
    fn device_login(&mut self, _user: &Arc<str>, device: &str, last_seq: u64) -> Result<(), (CloseCode, String)> {
        self.live("a device login");
        if !self.world.has_store {
            return Ok(());
        }
        if self.world.store_busy {
            return Err((CloseCode::TryAgainLater, "busy".into()));
        }
        self.side.login_asked = Some((device.to_string(), last_seq));
        self.side.dev = Dev::Pending { pending: Pending::default() };
        Ok(())
    }
    fn ack(&mut self, seq: u64) -> Result<(), (ErrorCode, String)> {
        self.live("an ACK");
        if trace() {
            eprintln!("  ACK {seq}");
        }
        let (now, wr, busy) = (self.world.now, self.world.wrules, self.world.store_busy);
        let r = with_window(self.side, &mut self.world.store, busy, now, &wr, |w, io| w.on_ack(seq, now, &wr, io));
        self.side.out.log.push(Ev::Covered(seq));
        match r {
            Some(_) => Ok(()),
            None if matches!(self.side.dev, Dev::Pending { .. }) => {
                Err((ErrorCode::StoreUnavailable, "loading".into()))
            }
            None => Err((ErrorCode::NotReliable, "no device".into())),
        }
    }
    fn fetch(&mut self, req_id: u32, after_seq: u64, limit: u16) -> Result<(), (ErrorCode, String)> {
        self.live("a FETCH");
        if trace() {
            eprintln!("  FETCH {req_id} after {after_seq} limit {limit}");
        }
        let (now, wr, busy) = (self.world.now, self.world.wrules, self.world.store_busy);
        let r = with_window(self.side, &mut self.world.store, busy, now, &wr, |w, io| {
            io.fetch = Some(after_seq);
            w.on_fetch(req_id, after_seq, limit, now, &wr, io)
        });
        match r {
            Some(_) => Ok(()),
            None if matches!(self.side.dev, Dev::Pending { .. }) => {
                Err((ErrorCode::StoreUnavailable, "loading".into()))
            }
            None => Err((ErrorCode::NotReliable, "no device".into())),
        }
    }
    fn to_application(
        &mut self,
        _user: &Arc<str>,
        _kind: ClientMessageKind,
        _req_id: u32,
        payload: &[u8],
    ) -> Result<(), (ErrorCode, &'static str)> {
        self.live("a message for the application");
        if payload.first() == Some(&b'!') {
            return Err((ErrorCode::HandlerFailed, "failed"));
        }
        Ok(())
    }
    fn join(&mut self, room: &str, _creator: Option<&Arc<str>>) -> Result<(), RoomError> {
        self.live("a join");
        if room == "full" {
            return Err(RoomError::RoomFull { limit: 1 });
        }
        Ok(())
    }
    fn leave(&mut self, _room: &str) {
        self.live("a leave");
    }
    fn publish(&mut self, _from: &Arc<str>, room: &str, _payload: &[u8]) -> Result<(), (ErrorCode, String)> {
        self.live("a publish");
        if room == "full" {
            return Err((ErrorCode::NotMember, "not a member".into()));
        }
        Ok(())
    }
    fn page(&mut self, path: &str) -> Vec<u8> {
        self.live("a page");
        ws::handshake::response_error(404, &format!("no page {path}"), &[])
    }
    fn closing(&mut self, user: Option<Arc<str>>, last: Bytes, encoded: bool, discard_queue: bool) {
        self.live("a second close");
        self.side.closed = true;
        assert_eq!(user.is_some(), self.side.open, "the directory entry goes with the close, once");
        if discard_queue {
            self.side.out.queue.clear();
            self.side.out.queued_bytes = 0;
        }
        let code = if encoded {
            if last.first() == Some(&0x88) && last.len() >= 4 {
                Some(u16::from_be_bytes([last[2], last[3]]))
            } else {
                Some(0)
            }
        } else {
            check_frame(&last, self.world.rules.max_frame_bytes);
            match decode(&last, usize::MAX) {
                Ok(Some((Frame::Close { code, .. }, _))) => Some(code),
                Ok(Some((Frame::LoginError { .. }, _))) => Some(0),
                other => panic!("the last frame is a CLOSE or a LOGIN_ERROR, not {other:?}"),
            }
        };
        if code == Some(CloseCode::SlowConsumer as u16) {
            assert!(discard_queue, "a slow consumer's queue is dropped");
        }
        if trace() {
            eprintln!("  closed {code:?}");
        }
        self.side.close_code = code;
        // The worker forgets the window at the close (`forget_device`).
        if let Dev::Open { device, w } = &self.side.dev {
            self.world.store.save(device, w.position());
        }
        self.side.dev = Dev::None;
        self.side.open = false;
    }
    fn with_budget<R>(&mut self, user: &Arc<str>, f: impl FnOnce(&mut Option<Budget>) -> R) -> R {
        let mut kept = self.world.budget.as_ref().filter(|(u, _)| **u == **user).map(|(_, b)| *b);
        let r = f(&mut kept);
        self.world.budget = kept.map(|b| (user.to_string(), b));
        r
    }
    fn clock_ms(&mut self) -> u64 {
        self.world.now as u64 * self.world.tick_ms
    }
    fn over_budget_close(&mut self, _user: &Arc<str>) {}
    fn count(&mut self, _what: Count) {}
    fn overflowed(&self) -> bool {
        self.side.out.slow
    }
}

/// A frame the server writes is one whole server frame within the limit it
/// announces in LOGIN_OK.
fn check_frame(raw: &[u8], max: usize) -> FrameType {
    assert!(raw.len() <= max, "a frame of {} bytes, over max_frame_bytes {max}", raw.len());
    let (f, n) = match decode(raw, max) {
        Ok(Some(x)) => x,
        other => panic!("the server wrote an undecodable frame: {other:?} {raw:?}"),
    };
    assert_eq!(n, raw.len(), "one frame per write");
    let ty = f.frame_type();
    assert!(
        !matches!(
            ty,
            FrameType::Login
                | FrameType::Send
                | FrameType::Message
                | FrameType::Subscribe
                | FrameType::Unsubscribe
                | FrameType::Publish
                | FrameType::Ack
                | FrameType::Fetch
                | FrameType::SendEx
        ),
        "the server wrote a client frame {ty:?}"
    );
    ty
}

/// Checks what was queued for a side since the last call.
fn verify(side: &mut Side, world: &World) {
    let max = world.rules.max_frame_bytes;
    let c = &mut side.client;
    for ev in side.out.log.drain(..) {
        match ev {
            Ev::Rewind(floor) => {
                c.floor = Some(c.floor.map_or(floor, |f| f.min(floor)));
                c.unacked.clear();
            }
            Ev::Covered(seq) => c.unacked.retain(|&(s, _)| s > seq),
            Ev::Frame(raw) => {
                check_frame(&raw, max);
                let Ok(Some((f, _))) = decode(&raw, max) else { unreachable!() };
                if trace() {
                    eprintln!("  -> {f:?}");
                }
                match f {
                    Frame::LoginOk { max_frame_bytes, .. } => {
                        assert!(!c.logged_in, "LOGIN_OK twice");
                        assert_eq!(max_frame_bytes as usize, max);
                        c.logged_in = true;
                    }
                    Frame::Sync { req_id, position, head_seq, page_end } => {
                        assert!(c.logged_in, "SYNC before LOGIN_OK");
                        assert!(c.synced || req_id == 0, "the first SYNC is the login's");
                        assert!(position <= head_seq && page_end <= head_seq, "SYNC {position} {head_seq} {page_end}");
                        assert!(head_seq <= world.store.head(), "SYNC head {head_seq} past the inbox's");
                        assert!(position >= c.position, "the position went back from {} to {position}", c.position);
                        c.synced = true;
                        c.position = position;
                        c.max_page_end = c.max_page_end.max(page_end);
                        c.live |= page_end == head_seq;
                        c.have = c.have.max(position);
                    }
                    Frame::Inbox { seq, msg_id, payload, .. } => {
                        assert!(c.synced, "INBOX {seq} before the login SYNC");
                        assert!(seq >= 1 && seq <= world.store.head(), "INBOX {seq} past the head");
                        let m = &world.store.msgs[seq as usize - 1];
                        assert_eq!(
                            (msg_id, payload),
                            (m.msg_id, &m.payload[..]),
                            "INBOX {seq} is not the stored message"
                        );
                        match c.floor.take() {
                            Some(floor) => assert!(seq > floor, "INBOX {seq} after a rewind to {floor}"),
                            None => {
                                if let Some(last) = c.last_inbox {
                                    assert!(seq > last, "INBOX {seq} after {last} without a rewind");
                                }
                            }
                        }
                        assert!(
                            c.live || seq <= c.max_page_end,
                            "INBOX {seq} beyond every page announced ({})",
                            c.max_page_end
                        );
                        c.last_inbox = Some(seq);
                        if seq == c.have + 1 {
                            c.have = seq;
                        }
                        c.unacked.push((seq, payload.len()));
                        assert!(
                            c.unacked.len() <= world.wrules.window as usize,
                            "{} INBOX unacknowledged, window {}",
                            c.unacked.len(),
                            world.wrules.window
                        );
                        let bytes: usize = c.unacked.iter().map(|&(_, n)| n).sum();
                        assert!(
                            c.unacked.len() == 1 || bytes as u64 <= world.wrules.window_bytes,
                            "{bytes} payload bytes unacknowledged, window_bytes {}",
                            world.wrules.window_bytes
                        );
                    }
                    _ => {}
                }
            }
        }
    }
    // What an incomplete frame holds stays within the frame limits (the
    // buffer, grown by doubling, and a WebSocket message's fragments).
    if side.conn.held().is_some() {
        assert!(!side.conn.is_closing(), "a closing connection holds input");
        let limit = match side.conn.phase() {
            Phase::Active => world.rules.max_frame_bytes.max(world.rules.ws_max_message),
            _ => MAX_LOGIN_FRAME_BYTES.max(MAX_LOGIN_MESSAGE_BYTES),
        };
        let bound = 4 * limit.max(4096) + 1024;
        assert!(side.conn.held_bytes() <= bound, "{} bytes held, limit {limit}", side.conn.held_bytes());
    }
}

// ---- driving ---------------------------------------------------------------------------

/// Files a deadline in the wheel as `wheel::Wheel::insert` does: at or
/// before now means the next tick.
fn file(at: Tick, now: Tick) -> Tick {
    let ahead = (at.wrapping_sub(now) as i32).clamp(1, 4095) as u32;
    now.wrapping_add(ahead)
}

/// After any call into the machine, as the worker's `with_conn` does: the
/// held buffers settle, an overflow closes the connection, the wheel entry
/// moves earlier if the deadline did.
fn after_call(side: &mut Side, world: &mut World, was_closing: bool) {
    let _ = side.conn.settle();
    if std::mem::take(&mut side.out.slow) && !was_closing {
        let now = world.now;
        let mut conn = std::mem::replace(&mut side.conn, Connection::new(Listener::Raw { sniff: false }, 0));
        conn.close(
            CloseCode::SlowConsumer as u16,
            "slow consumer",
            now,
            &mut Io { side: &mut *side, world: &mut *world },
        );
        side.conn = conn;
        let _ = side.conn.settle();
    }
    let next = side.conn.next_deadline(&world.t);
    if (next.wrapping_sub(side.sched) as i32) < 0 {
        side.sched = file(next, world.now);
    }
    verify(side, world);
}

/// Runs `f` on the side's machine with its `Io`, as the worker's
/// `with_conn` does (the machine taken out of its slot meanwhile), then
/// [`after_call`].
fn with_conn<R>(side: &mut Side, world: &mut World, f: impl FnOnce(&mut Connection, &mut Io<'_>) -> R) -> R {
    let was_closing = side.conn.is_closing();
    let mut conn = std::mem::replace(&mut side.conn, Connection::new(Listener::Raw { sniff: false }, 0));
    let r = f(&mut conn, &mut Io { side: &mut *side, world: &mut *world });
    side.conn = conn;
    after_call(side, world, was_closing);
    r
}

/// Carries out what a window asked outside the machine.
fn carry_out(side: &mut Side, world: &mut World, after: Option<After>) {
    let Some(after) = after else { return };
    let now = world.now;
    if after.overflow {
        with_conn(side, world, |c, io| c.close(CloseCode::SlowConsumer as u16, "slow consumer", now, io));
    } else if let Some(code) = after.close {
        with_conn(side, world, |c, io| c.close(code as u16, "ack timeout", now, io));
    } else {
        verify(side, world);
    }
}

fn feed(side: &mut Side, world: &mut World, n: usize) {
    let n = n.min(side.unread.len());
    if n == 0 {
        return;
    }
    let mut chunk: Vec<u8> = side.unread.drain(..n).collect();
    let now = world.now;
    let rules = world.rules.clone();
    with_conn(side, world, |c, io| c.on_read(&mut chunk, now, &rules, io));
}

fn mask(payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut body = payload.to_vec();
    ws::apply_mask(&mut body, key);
    body
}

/// A client WebSocket frame, masked.
fn ws_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&[0x37, 0xfa, 0x21, 0x3d]);
    f.extend_from_slice(&mask(payload));
    f
}

/// A raw v1 frame as the client sends it on its transport.
fn wrap(side: &Side, raw: &[u8]) -> Vec<u8> {
    if side.client_ws {
        ws_frame(0x82, raw)
    } else {
        raw.to_vec()
    }
}

const ROOMS: [&str; 3] = ["lobby", "full", "r"];

/// A client frame, biased toward what a real client sends now.
fn client_frame(side: &mut Side, world: &World, inp: &mut In) -> Vec<u8> {
    let c = &side.client;
    let pick = inp.u8();
    let seq_choice = |inp: &mut In| -> u64 {
        match inp.u8() % 6 {
            0 => c.have,
            1 => c.last_inbox.unwrap_or(0),
            2 => c.position,
            3 => world.store.head(),
            4 => world.store.head() + 1,
            _ => inp.u8() as u64,
        }
    };
    side.next_req = side.next_req.wrapping_add(1);
    let req_id = side.next_req;
    let payload_len = match inp.u8() % 8 {
        0 => inp.u16() as usize % 9000,
        1 => inp.u16() as usize % 600,
        _ => inp.u8() as usize % 24,
    };
    let payload = vec![b'p'; payload_len];
    let frame = match pick % 18 {
        0 | 1 => {
            let device = match inp.u8() % 3 {
                0 => None,
                1 => Some("d1"),
                _ => Some("d2"),
            };
            let last_seq = if device.is_some() { seq_choice(inp) } else { 0 };
            let token: &[u8] = if inp.u8().is_multiple_of(8) { b"bad" } else { b"good" };
            Frame::Login { user: "u", token, device, last_seq }
        }
        2 | 3 => Frame::Ack { seq: seq_choice(inp) },
        4 | 5 => {
            let after_seq = seq_choice(inp);
            let limit = (inp.u8() as u16 % 12).max(1);
            Frame::Fetch { req_id, after_seq, limit }
        }
        6 => Frame::Send { req_id, to: if inp.u8().is_multiple_of(2) { "u" } else { "v" }, payload: &payload },
        7 | 8 => {
            let flags = inp.u8() % 4;
            let ttl_ms = if flags & SEND_EX_TTL != 0 { 1 + inp.u8() as u32 } else { 0 };
            let to = if inp.u8().is_multiple_of(4) { "v" } else { "u" };
            return wrap(
                side,
                &Frame::SendEx { req_id, flags, client_id: inp.u8() as u64, ttl_ms, to, payload: &payload }
                    .to_bytes()
                    .unwrap(),
            );
        }
        9 => Frame::Subscribe { req_id, room: ROOMS[inp.u8() as usize % 3] },
        10 => Frame::Unsubscribe { req_id, room: ROOMS[inp.u8() as usize % 3] },
        11 => Frame::Publish { req_id, room: ROOMS[inp.u8() as usize % 3], payload: &payload },
        12 => Frame::Message { req_id, payload: &payload },
        13 => Frame::Ping { data: &payload[..payload.len().min(64)] },
        14 => Frame::Pong { data: b"" },
        15 => Frame::Close { code: 1000, reason: "bye" },
        16 if side.client_ws => {
            // JSON text, which either subprotocol takes.
            let text = match inp.u8() % 5 {
                4 => format!(
                    r#"{{"type":"login","user":"u","token":"good","device":"d1","last_seq":"{}"}}"#,
                    seq_choice(inp)
                ),
                0 => format!(r#"{{"type":"ack","seq":"{}"}}"#, seq_choice(inp)),
                1 => format!(r#"{{"type":"fetch","req_id":{req_id},"after_seq":"{}","limit":5}}"#, seq_choice(inp)),
                2 => r#"{"type":"ping"}"#.to_string(),
                _ => format!(r#"{{"type":"send","req_id":{req_id},"to":"u","payload":"hi","client_id":"9"}}"#),
            };
            return ws_frame(0x81, text.as_bytes());
        }
        16 | 17 if side.client_ws => {
            return match inp.u8() % 4 {
                0 => ws_frame(0x89, b"hb"),
                1 => ws_frame(0x8a, b""),
                2 => {
                    // A message in two fragments, a ping between them.
                    let raw = Frame::Ping { data: b"frag" }.to_bytes().unwrap();
                    let (a, b) = raw.split_at(raw.len() / 2);
                    let mut v = ws_frame(0x02, a);
                    v.extend(ws_frame(0x89, b""));
                    v.extend(ws_frame(0x80, b));
                    v
                }
                _ => ws_frame(0x88, &1000u16.to_be_bytes()),
            };
        }
        _ => Frame::Ping { data: b"" },
    };
    wrap(side, &frame.to_bytes().unwrap())
}

/// An upgrade request (with a login in its query string or not).
fn upgrade(inp: &mut In) -> Vec<u8> {
    let query = match inp.u8() % 3 {
        0 => "",
        1 => "?user=u&token=good",
        _ => "?user=u&token=bad",
    };
    let protocol = match inp.u8() % 3 {
        0 => "",
        1 => "Sec-WebSocket-Protocol: switchboard.v1.bin\r\n",
        _ => "Sec-WebSocket-Protocol: switchboard.v1.json\r\n",
    };
    format!(
        "GET /{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
    )
    .into_bytes()
}

/// A malformed frame and the close code section 2.4 (or RFC 6455 for the
/// WebSocket framing) gives it, for a logged-in connection.
fn malformed(side: &Side, world: &World, inp: &mut In) -> (Vec<u8>, u16) {
    let max = world.rules.max_frame_bytes;
    let raw: (Vec<u8>, u16) = match inp.u8() % 10 {
        0 => (vec![0, 0, 0, 1], 1002),
        1 => (vec![0, 0, 0, 2, 2, 4], 4000),
        2 => (vec![0, 0, 0, 2, 1, 0x1c], 1002),
        3 => {
            let mut v = ((max - 3) as u32).to_be_bytes().to_vec();
            v.extend_from_slice(&[1, 4]);
            (v, 1009)
        }
        4 => (vec![0, 0, 0, 3, 1, 7, 0], 1002),
        5 => (vec![0, 0, 0, 16, 1, 0x19, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1002),
        6 => (vec![0, 0, 0, 7, 1, 0x10, 0, 0, 0, 1, 0], 1002),
        7 => (Frame::Sync { req_id: 1, position: 0, head_seq: 0, page_end: 0 }.to_bytes().unwrap().to_vec(), 4006),
        8 => (Frame::Login { user: "u", token: b"good", device: None, last_seq: 0 }.to_bytes().unwrap().to_vec(), 4006),
        _ => {
            let mut v = vec![0, 0, 0, 67, 1, 4];
            v.extend_from_slice(&[0; 65]);
            (v, 1002)
        }
    };
    if !side.client_ws {
        return raw;
    }
    match inp.u8() % 6 {
        0 => (vec![0x82, 0x00], 1002),                    // unmasked
        1 => (ws_frame(0xc2, &raw.0), 1002),              // reserved bits
        2 => (ws_frame(0x83, &raw.0), 1002),              // reserved opcode
        3 => (ws_frame(0x81, &[b'"', 0xff, b'"']), 1007), // text not UTF-8
        4 => (ws_frame(0x09, b""), 1002),                 // fragmented ping
        _ => (ws_frame(0x82, &raw.0), raw.1),
    }
}

fn new_side(listener: Listener, now: Tick, max_frames: usize, max_bytes: usize) -> Side {
    Side {
        conn: Connection::new(listener, now),
        listener,
        out: Out {
            max_frames,
            max_bytes,
            queue: VecDeque::new(),
            queued_bytes: 0,
            log: Vec::new(),
            slow: false,
            doomed: false,
        },
        client: Client::default(),
        unread: Vec::new(),
        client_ws: false,
        closed: false,
        close_code: None,
        open: false,
        gone: false,
        sched: file(now.wrapping_add(1), now),
        dev: Dev::None,
        login_asked: None,
        reads: VecDeque::new(),
        pages: VecDeque::new(),
        notices: VecDeque::new(),
        next_req: 0,
    }
}

fn listener(b: u8) -> Listener {
    match b % 3 {
        0 => Listener::Raw { sniff: false },
        1 => Listener::Raw { sniff: true },
        _ => Listener::WebSocket,
    }
}

/// `CONNFUZZ_TRACE=1`: print the script as it runs (to read a crash).
fn trace() -> bool {
    std::env::var_os("CONNFUZZ_TRACE").is_some()
}

fn run(data: &[u8]) {
    let mut inp = In(data);
    let mut config = Config::default();
    let setup = inp.u8();
    let has_store = setup & 1 == 0;
    config.limits.max_frame_bytes = if setup & 2 == 0 { 8192 } else { 65536 };
    config.delivery.window = 1 + inp.u8() as u32 % 6;
    config.delivery.window_bytes = 1 + inp.u16() as u64 % 3000;
    config.delivery.first_page = 1 + inp.u8() as u32 % 6;
    config.delivery.max_fetch = 1 + inp.u8() as u32 % 8;
    config.delivery.max_retransmits = inp.u8() % 4;
    config.timeouts.tick_ms = 1000;
    config.delivery.ack_timeout_ms = 1000 * (1 + inp.u8() as u64 % 4);
    if setup & 4 != 0 {
        config.limits.send_rate = 1 + inp.u8() as u64 % 5;
        config.limits.send_burst = 1 + inp.u8() as u64 % 5;
        config.limits.send_max_refused = inp.u8() as u32 % 4;
    }
    if setup & 8 != 0 {
        config.delivery.send_default = switchboard::config::SendDefault::AtMostOnce;
    }
    if setup & 16 != 0 {
        config.routing.client_send = false;
    }
    if config.validate().is_err() {
        return;
    }
    let t = {
        let login = 1 + inp.u8() as u32 % 8;
        let heartbeat = 1 + inp.u8() as u32 % 8;
        let idle = heartbeat + 1 + inp.u8() as u32 % 8;
        Timeouts { login, heartbeat, idle, linger: 1 + inp.u8() as u32 % 3, message: 1 + inp.u8() as u32 % 8 }
    };
    let rules = Rules::new(&config, t, None, setup & 32 != 0, has_store);
    let wrules = config.window_rules();
    let start: Tick = if setup & 64 != 0 { u32::MAX - 20 } else { 0 };
    let out_frames = 2 + inp.u8() as usize % 40;
    let out_bytes = 256 + inp.u16() as usize * 8;
    let mut world = World {
        rules,
        wrules,
        t,
        store: Store::default(),
        budget: None,
        now: start,
        tick_ms: 1000,
        draining: false,
        store_busy: false,
        has_store,
    };
    // The inbox may hold messages already.
    for _ in 0..inp.u8() % 8 {
        let len = inp.u8() as usize;
        world.store.append(vec![b'o'; len]);
    }
    let mut sides = vec![new_side(listener(inp.u8()), start, out_frames, out_bytes)];

    let mut steps = 0;
    while !inp.is_empty() && steps < 2000 {
        steps += 1;
        let op = inp.u8();
        let i = (op as usize >> 7) % sides.len();
        if sides[i].gone {
            if sides.len() < 2 {
                sides.push(new_side(listener(inp.u8()), world.now, out_frames, out_bytes));
            }
            continue;
        }
        let side = &mut sides[i];
        if trace() {
            eprintln!("[{}] op {} at {}: {:?} {:?}", i, op & 0x7f, world.now, side.conn.phase(), side.conn.transport());
        }
        match op & 0x7f {
            // Client bytes: frames mostly, an upgrade, garbage.
            0..=29 => {
                let bytes = client_frame(side, &world, &mut inp);
                side.unread.extend_from_slice(&bytes);
            }
            30..=33 => {
                let is_http = matches!(side.listener, Listener::WebSocket | Listener::Raw { sniff: true });
                if is_http && !side.client_ws && side.unread.is_empty() {
                    side.client_ws = true;
                    let req = upgrade(&mut inp);
                    side.unread.extend_from_slice(&req);
                }
            }
            34 | 35 => {
                let n = inp.u8() as usize % 16;
                let junk = inp.bytes(n);
                side.unread.extend_from_slice(&junk);
            }
            // The server reads: all of it, or a piece.
            36..=55 => {
                let n = match inp.u8() {
                    0..=127 => usize::MAX,
                    b => 1 + b as usize % 40,
                };
                feed(side, &mut world, n);
            }
            // A malformed frame, read whole by a logged-in connection.
            56 | 57 => {
                let clean = side.unread.is_empty() && side.conn.held().is_none() && side.conn.is_active();
                let on_frames = matches!(side.conn.transport(), Transport::Raw | Transport::Ws(_));
                let (bytes, code) = malformed(side, &world, &mut inp);
                if clean && on_frames && side.client_ws == matches!(side.conn.transport(), Transport::Ws(_)) {
                    side.unread = bytes;
                    feed(side, &mut world, usize::MAX);
                    assert!(side.closed, "a malformed frame left the connection open");
                    assert_eq!(side.close_code, Some(code), "the close code of a malformed frame");
                }
            }
            // Time.
            58..=65 => {
                let dt = match inp.u8() {
                    0..=199 => 1,
                    b => b as u32 % 20,
                };
                world.now = world.now.wrapping_add(dt);
                tick_all(&mut sides, &mut world);
            }
            // An early timer visit (the wheel re-buckets lazily).
            66 => timer_visit(side, &mut world),
            // The store answers.
            67..=70 => answer_login(side, &mut world, &mut inp),
            71..=74 => {
                if let Some((after, limit)) = side.reads.pop_front() {
                    let page = world.store.page(after, limit);
                    side.pages.push_back((page, world.store.head()));
                }
            }
            75..=78 => {
                if let Some((page, head)) = side.pages.pop_front() {
                    let (now, wr) = (world.now, world.wrules);
                    let busy = world.store_busy;
                    let r = with_window(side, &mut world.store, busy, now, &wr, |w, io| {
                        w.on_page(&page, head, now, &wr, io)
                    });
                    carry_out(side, &mut world, r);
                }
            }
            // The store fails the outstanding read.
            79 if side.reads.pop_front().is_some() => {
                let (now, wr) = (world.now, world.wrules);
                if let Dev::Open { w, .. } = &mut side.dev {
                    w.on_read_failed(now, &wr);
                }
            }
            // A message stored for the user (from another connection, or
            // the application), its notices queued for every device.
            80..=84 => {
                let len = match inp.u8() {
                    0..=200 => inp.u8() as usize % 40,
                    _ => inp.u16() as usize % 3000,
                };
                let seq = world.store.append(vec![b'm'; len]);
                for s in sides.iter_mut() {
                    s.notices.push_back(seq);
                }
            }
            85..=88 => {
                if let Some(seq) = side.notices.pop_front() {
                    notice(side, &mut world, seq, false);
                }
            }
            // Notices held back by a full mailbox: the head only.
            89 => {
                if let Some(&seq) = side.notices.back() {
                    side.notices.clear();
                    notice(side, &mut world, seq, true);
                }
            }
            // Retention: a seq acknowledged by every device or expired.
            90 | 91 => {
                let head = world.store.head();
                if head > 0 {
                    let seq = 1 + inp.u8() as u64 % head;
                    world.store.gone.insert(seq);
                }
            }
            92 => world.store_busy = !world.store_busy,
            93 => world.draining = !world.draining,
            // The socket takes some of the queue.
            94..=99 => {
                let n = inp.u8() as usize % 8;
                side.out.drain(n);
            }
            // A push or room message from elsewhere.
            100..=103 if side.open && !side.closed => {
                let len = inp.u8() as usize * 4;
                let payload = vec![b'x'; len];
                let frame = Frame::Push { msg_id: 5, from: "w", payload: &payload }.to_bytes().unwrap();
                if !side.out.write(frame) {
                    side.out.slow = false;
                    let now = world.now;
                    with_conn(side, &mut world, |c, io| c.close(CloseCode::SlowConsumer as u16, "slow", now, io));
                } else {
                    verify(side, &world);
                }
            }
            // The application joins or removes the connection.
            104 | 105 => {
                let room = ROOMS[inp.u8() as usize % 3];
                if op & 1 == 0 {
                    with_conn(side, &mut world, |c, io| c.join(room, None, io));
                } else {
                    with_conn(side, &mut world, |c, io| c.leave(room, None, io));
                }
            }
            // The worker closes it: kicked, shutdown, message timeout,
            // partial budget, replaced.
            106 | 107 => {
                let code = [4003u16, 1001, 1008, 1013, 4008][inp.u8() as usize % 5];
                let now = world.now;
                let was_closing = side.conn.is_closing();
                let started = with_conn(side, &mut world, |c, io| c.close(code, "server", now, io));
                assert_eq!(started, !was_closing, "a close starts once");
            }
            // The peer's FIN (or RST): released.
            108 => {
                let _ = side.conn.take_held();
                side.gone = true;
            }
            109 => {
                let _ = side.conn.settle();
            }
            _ => {}
        }
    }
}

fn notice(side: &mut Side, world: &mut World, seq: u64, held: bool) {
    if let Dev::Pending { pending, .. } = &mut side.dev {
        pending.on_appended(seq);
        return;
    }
    let (now, wr, busy) = (world.now, world.wrules, world.store_busy);
    let msg = world.store.msgs[seq as usize - 1].clone();
    let r = with_window(side, &mut world.store, busy, now, &wr, |w, io| {
        if held {
            w.on_head(seq, now, &wr, io)
        } else {
            w.on_appended(&msg, now, &wr, io)
        }
    });
    carry_out(side, world, r);
}

fn answer_login(side: &mut Side, world: &mut World, inp: &mut In) {
    let Some((device, last_seq)) = side.login_asked.take() else { return };
    let Dev::Pending { pending, .. } = &side.dev else { return };
    let pending = *pending;
    let now = world.now;
    if inp.u8().is_multiple_of(16) {
        side.dev = Dev::None;
        with_conn(side, world, |c, io| c.close(1013, "log in again shortly", now, io));
        return;
    }
    // PROTOCOL.md 15.6: the record, or last_seq if it is not past the head
    // and the device is known.
    let head = world.store.head();
    let position = match world.store.position(&device) {
        Some(p) if last_seq <= head => p.max(last_seq),
        Some(p) => p,
        None => {
            world.store.save(&device, 0);
            0
        }
    };
    let wr = world.wrules;
    let busy = world.store_busy;
    let before = side.out.slow;
    side.out.slow = false;
    let mut io = WinIo::new(side, busy, position);
    let mut w = Box::new(Window::start(position, pending.head(head), now, &wr, &mut io));
    let read_failed = io.read_failed;
    let overflow = side.out.slow;
    side.out.slow = before;
    if read_failed {
        w.on_read_failed(now, &wr);
    }
    side.dev = if w.is_idle() { Dev::Parked { device, position: w.position() } } else { Dev::Open { device, w } };
    carry_out(side, world, Some(After { overflow, close: None }));
}

/// A visit of the side's wheel entry, due or early.
fn timer_visit(side: &mut Side, world: &mut World) {
    let now = world.now;
    let rules = world.rules.clone();
    match with_conn(side, world, |c, io| c.on_tick(now, &rules, io)) {
        Due::At(next) => {
            assert!((next.wrapping_sub(now) as i32) > 0, "a timer visit at {now} asks for another at {next}");
            side.sched = file(next, now);
        }
        Due::Finish => {
            assert!(side.conn.is_closing(), "finished without a close");
            side.gone = true;
            let _ = side.conn.take_held();
        }
    }
}

/// The tick: every due wheel entry, then every window's retransmit timer.
fn tick_all(sides: &mut [Side], world: &mut World) {
    let now = world.now;
    for side in sides.iter_mut().filter(|s| !s.gone) {
        let mut visits = 0;
        while !side.gone && (now.wrapping_sub(side.sched) as i32) >= 0 {
            visits += 1;
            assert!(visits < 4, "the timer comes due again and again at {now}");
            timer_visit(side, world);
        }
        if side.gone {
            continue;
        }
        let due = match &side.dev {
            Dev::Open { w, .. } => w.deadline().is_some_and(|at| (now.wrapping_sub(at) as i32) >= 0),
            _ => false,
        };
        if due {
            let (wr, busy) = (world.wrules, world.store_busy);
            let r = with_window(side, &mut world.store, busy, now, &wr, |w, io| w.on_tick(now, &wr, io));
            carry_out(side, world, r);
        }
    }
}

fuzz_target!(|data: &[u8]| run(data));
