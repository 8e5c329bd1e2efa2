//! The worker's glue for reliable delivery: the side table of device
//! connections' windows, and carrying out what a window asks.
//!
//! Owns: `Reliable`, the table (slot → device, user and
//! `proto::reliable::Window`) that exists only for connections that logged
//! in with a device id, so a plain connection's slot pays nothing; handing
//! store requests to the store thread; the store's answers (commands) for
//! this worker's connections; the windows' retransmit timers.
//! Must not: decide anything about delivery (the window does), wait for the
//! store (requests are queued with `try_submit`, answers come back as
//! mailbox commands), or hold a borrow of the table while a window runs.

use std::sync::Arc;

use bytes::Bytes;

use super::Worker;
use crate::ids::ConnId;
use crate::proto::codes::{CloseCode, ErrorCode};
use crate::proto::conn::StoreOpts;
use crate::proto::frame::{clip_reason, Frame, SendOutcome};
use crate::proto::reliable::{DeviceLogin, Pending, Window, WindowEnv};
use crate::proto::session::Tick;
use crate::runtime::inbox::{PageResult, Reply, SendDone, Token};
use crate::store::{Busy, NewMessage, Request, StoreError, StoredMessage, Submitter};

/// Where a device connection's window is.
enum State {
    /// Logged in; the store has not answered with the position yet (the
    /// notices that came meanwhile are counted in it).
    Pending(Pending),
    /// Idle (nothing in flight, caught up): only the position is kept.
    Parked { position: u64 },
    /// Messages in flight, a page or a timer outstanding.
    Open(Box<Window>),
}

/// One device connection's entry in the side table. An idle one (parked)
/// costs this entry, 88 bytes in the table with its key (80 of them the
/// struct, since the login time for the cluster-wide device rule), and its
/// device id; the window (about 120 bytes, and 16 per message in flight)
/// exists only while something is in flight.
pub(super) struct Device {
    generation: u32,
    user: Arc<str>,
    /// Its device and login number (`Shared::device_logins`); a later
    /// login of the device replaces it (`on_replaced`).
    login: DeviceLogin,
    state: State,
    /// A position acknowledged and not yet handed to the store (0: none).
    /// Saved at the next tick or at the close, not per ACK: the store
    /// then takes at most one position write per device connection per
    /// tick, and a position lost with a crash only means some messages
    /// come again (dropped by seq).
    unsaved: u64,
    /// In the worker's list of windows the tick looks at (`Worker::open`):
    /// set when the window is put back open, cleared by the tick that
    /// finds it parked.
    listed: bool,
}

/// The side table: slot → device connection.
pub(super) type Reliable = hashbrown::HashMap<u32, Device>;

/// Positions of closed device connections still to hand to the store:
/// (user, device) → the position; at most the worker's connection slots
/// (`Shared::max_conns_per_worker`) entries.
pub(super) type ClosedUnsaved = hashbrown::HashMap<(Arc<str>, Arc<str>), u64>;

/// The ERROR a store failure is answered with.
pub(super) fn store_error(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::InboxFull { .. } => ErrorCode::InboxFull,
        StoreError::StoreFull { .. } => ErrorCode::StoreFull,
        StoreError::Unavailable(_) => ErrorCode::StoreUnavailable,
    }
}

/// What a window asks, carried out for connection (`slot`, `generation`).
struct WinIo<'a> {
    w: &'a Worker,
    slot: u32,
    generation: u32,
    user: &'a Arc<str>,
    read_failed: bool,
    close: Option<(CloseCode, String)>,
    overflow: bool,
    /// The position the window asked to save, if it moved.
    saved: Option<u64>,
}

/// What a window asked that is carried out once it is back in the table.
struct After {
    read_failed: bool,
    close: Option<(CloseCode, String)>,
    overflow: bool,
    saved: Option<u64>,
}

impl<'a> WinIo<'a> {
    fn new(w: &'a Worker, slot: u32, generation: u32, user: &'a Arc<str>) -> Self {
        WinIo { w, slot, generation, user, read_failed: false, close: None, overflow: false, saved: None }
    }

    fn after(self) -> After {
        After { read_failed: self.read_failed, close: self.close, overflow: self.overflow, saved: self.saved }
    }
}

impl WinIo<'_> {
    fn write(&mut self, frame: Bytes) {
        if self.w.out.reply(self.slot, self.generation, frame, false).is_err() {
            self.overflow = true;
        }
    }

    fn conn(&self) -> ConnId {
        ConnId::new(self.w.id, self.slot, self.generation)
    }
}

impl WindowEnv<StoredMessage> for WinIo<'_> {
    fn deliver(&mut self, m: &StoredMessage) {
        let frame = Frame::Inbox { seq: m.seq, msg_id: m.msg_id, ts_ms: m.ts_ms, from: &m.from, payload: &m.payload }
            .to_bytes()
            .expect("stored payloads were checked against the INBOX size");
        crate::stats::bump(&self.w.counters().detail.deliveries[crate::stats::DELIVERY_INBOX], 1);
        self.write(frame);
    }

    fn sync(&mut self, req_id: u32, position: u64, head_seq: u64, page_end: u64) {
        self.write(Frame::Sync { req_id, position, head_seq, page_end }.to_bytes().expect("fixed-size frame"));
    }

    fn read(&mut self, after_seq: u64, limit: u32) {
        let Some(store) = self.w.shared.store.get() else {
            self.read_failed = true;
            return;
        };
        let req = Request::Read { user: self.user.clone(), after_seq, limit: limit as usize };
        if self.w.submit_store(store, Token::Read { conn: self.conn() }, req).is_err() {
            self.read_failed = true;
        }
    }

    fn save_position(&mut self, seq: u64) {
        self.saved = Some(seq);
    }

    fn error(&mut self, code: ErrorCode, req_id: u32, reason: &str) {
        let frame = Frame::Error { code: code as u16, req_id, reason: clip_reason(reason) };
        self.write(frame.to_bytes().expect("reason clipped"));
    }

    fn retransmitting(&mut self) {
        crate::stats::bump(&self.w.counters().detail.retransmits, 1);
    }

    fn close(&mut self, code: CloseCode, reason: &str) {
        if code == CloseCode::AckTimeout {
            crate::stats::bump(&self.w.counters().detail.ack_timeout_closes, 1);
        }
        self.close = Some((code, reason.to_string()));
    }
}

/// Keeps an idle window as its position only.
fn park(window: Box<Window>) -> State {
    if window.is_idle() {
        State::Parked { position: window.position() }
    } else {
        State::Open(window)
    }
}

impl Worker {
    /// Runs `f` on the window of device connection (`slot`, `generation`)
    /// with a `WinIo`, the entry out of the table meanwhile; then carries
    /// out a close or a failed read the window asked for. `None`: not a
    /// device connection, or its window is not open yet.
    fn with_window<R>(
        &self,
        slot: u32,
        generation: u32,
        f: impl FnOnce(&mut Window, &mut WinIo<'_>) -> R,
    ) -> Option<R> {
        let mut dev = {
            let mut table = self.reliable.borrow_mut();
            match table.get(&slot) {
                Some(d) if d.generation == generation && !matches!(d.state, State::Pending(_)) => {
                    table.remove(&slot)?
                }
                _ => return None,
            }
        };
        let mut window = match std::mem::replace(&mut dev.state, State::Pending(Pending::default())) {
            State::Open(w) => w,
            State::Parked { position } => Box::new(Window::resume(position)),
            State::Pending(_) => unreachable!("checked above"),
        };
        let mut io = WinIo::new(self, slot, generation, &dev.user);
        let r = f(&mut window, &mut io);
        let after = io.after();
        self.put_back(slot, generation, dev, window, after);
        Some(r)
    }

    /// Puts a device connection's entry back in the table, its window
    /// parked if idle, and carries out what the window asked: the position
    /// to save at the next tick, a failed read to retry, a close.
    fn put_back(&self, slot: u32, generation: u32, mut dev: Device, mut window: Box<Window>, after: After) {
        if let Some(seq) = after.saved {
            if dev.unsaved == 0 {
                self.unsaved.borrow_mut().push((slot, generation));
            }
            dev.unsaved = seq;
        }
        if after.read_failed {
            window.on_read_failed(self.now.get(), &self.window_rules);
        }
        dev.state = park(window);
        if matches!(dev.state, State::Open(_)) && !dev.listed {
            dev.listed = true;
            self.open.borrow_mut().push((slot, generation));
        }
        self.reliable.borrow_mut().insert(slot, dev);
        if after.overflow {
            self.close_slow_consumer(slot, generation);
        } else if let Some((code, reason)) = after.close {
            self.close_conn(slot, generation, code, &reason);
        }
    }

    /// A device logged in on (`slot`, `generation`) as `user`: its window
    /// opens when the store answers with its position.
    pub(super) fn device_login(
        &self,
        slot: u32,
        generation: u32,
        user: &Arc<str>,
        device: &str,
        last_seq: u64,
    ) -> Result<(), (CloseCode, String)> {
        let Some(store) = self.shared.store.get() else {
            // No store: the connection is served as a plain one; ACK and
            // FETCH get ERROR 116.
            return Ok(());
        };
        let device: Arc<str> = Arc::from(device);
        let conn = ConnId::new(self.id, slot, generation);
        let req = Request::DeviceLogin { user: user.clone(), device: device.clone(), client_seq: last_seq };
        if self.submit_store(store, Token::Login { conn }, req).is_err() {
            return Err((CloseCode::TryAgainLater, "the message store is busy; log in again shortly".into()));
        }
        let login = self.shared.device_logins.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        // One connection per device (PROTOCOL.md 15.2): the others of this
        // device on this server are closed, on whichever worker. An app
        // whose connection died without a FIN or RST (a network change)
        // cannot close it, and such ghosts counted against
        // max_conns_per_user until their idle timeout.
        // This connection gets one too, and keeps itself: its login is not
        // older than its own.
        let (queued, conns) = self.shared.post_to_user(user, |other| crate::runtime::Command::Replaced {
            conn: other,
            device: device.clone(),
            login,
            from: None,
        });
        if queued < conns {
            tracing::warn!(worker = self.id.0, "a full mailbox: an older connection of a device may stay open");
        }
        // And on the other nodes of a cluster, where the balancer may have
        // put the connection the device had before its network changed.
        let at_ms = self.shared.cluster.get().map_or(0, |link| {
            let at_ms = link.now_ms();
            link.send(crate::cluster::Event::Replaced(Box::new(crate::cluster::DeviceReplaced {
                user: user.clone(),
                device: device.clone(),
                at_ms,
                to: None,
            })));
            at_ms
        });
        let dev = Device {
            generation,
            user: user.clone(),
            login: DeviceLogin { device, number: login, at_ms },
            state: State::Pending(Pending::default()),
            unsaved: 0,
            listed: false,
        };
        self.reliable.borrow_mut().insert(slot, dev);
        Ok(())
    }

    /// A login of `device` on another connection ([`Command::Replaced`]),
    /// here (`from: None`) or on node `from`: `conn` goes if it is a
    /// connection of that device that logged in before it. If `conn` is
    /// the later one, node `from` is told so, and closes its own.
    pub(super) fn on_replaced(&self, conn: ConnId, device: &str, login: u64, from: Option<&Arc<str>>) {
        let (slot, generation) = (conn.slot(), conn.generation());
        // Whether this connection goes, and what node `from` is told when
        // it is the later login of the device (that node closes its own).
        let (goes, answer) = {
            let reliable = self.reliable.borrow();
            let Some(d) = reliable.get(&slot).filter(|d| d.generation == generation) else { return };
            match (from, self.shared.cluster.get()) {
                (None, _) => (d.login.replaced_by(device, login), None),
                (Some(node), Some(link)) => match d.login.replaced_from(device, login, node, &link.node_id) {
                    Some(true) => (true, None),
                    Some(false) => {
                        let answer = crate::cluster::DeviceReplaced {
                            user: d.user.clone(),
                            device: d.login.device.clone(),
                            at_ms: d.login.at_ms,
                            to: Some(node.clone()),
                        };
                        (false, Some(answer))
                    }
                    None => (false, None),
                },
                (Some(_), None) => (false, None),
            }
        };
        if goes && self.close_conn(slot, generation, CloseCode::Replaced, CloseCode::Replaced.reason()) {
            crate::stats::bump(&self.counters().detail.replaced_closes, 1);
        }
        if let Some(answer) = answer {
            tracing::debug!(
                worker = self.id.0,
                user = &*answer.user,
                device = &*answer.device,
                "a device's login on another node is older than its connection here: telling that node"
            );
            self.shared.to_cluster(|| crate::cluster::Event::Replaced(Box::new(answer)));
        }
    }

    /// The store lost what it held ([`Command::StoreReset`]): every device
    /// connection's window counts seqs of inboxes that are gone, and the
    /// new inboxes' seqs start again at 1, which it would take for ones it
    /// sent. Each is closed (1001, log in again), with its unsaved
    /// position dropped, as are those of devices closed before: written
    /// into a new inbox, an old position would mark its new messages up to
    /// it as acknowledged.
    pub(super) fn on_store_reset(&self) {
        self.closed_unsaved.borrow_mut().clear();
        let devices: Vec<(u32, u32)> = self
            .reliable
            .borrow_mut()
            .iter_mut()
            .map(|(&slot, d)| {
                d.unsaved = 0;
                (slot, d.generation)
            })
            .collect();
        let n = devices.len();
        for (slot, generation) in devices {
            self.close_conn(
                slot,
                generation,
                CloseCode::GoingAway,
                "the message store lost its data; log in again (PROTOCOL.md 15.8)",
            );
        }
        tracing::warn!(worker = self.id.0, devices = n, "closed every device connection after the store lost its data");
    }

    /// The connection (`slot`) is closing: it has no window any more.
    pub(super) fn forget_device(&self, slot: u32, generation: u32) {
        let gone = {
            let mut table = self.reliable.borrow_mut();
            match table.get(&slot) {
                Some(d) if d.generation == generation => table.remove(&slot),
                _ => None,
            }
        };
        if let Some(d) = gone.filter(|d| d.unsaved != 0) {
            if !self.save_position(&d.user, &d.login.device, d.unsaved) {
                // Kept past the connection, for the tick to hand over:
                // dropped, its messages came again at the next login, and
                // a device that never came back held the inbox to its TTL.
                // Bounded by the worker's connection slots: past that many
                // (a store stalled through a long churn of closes) the
                // position is dropped as before, and those messages come
                // again at the device's next login.
                let mut kept = self.closed_unsaved.borrow_mut();
                let key = (d.user, d.login.device);
                if kept.len() < self.shared.max_conns_per_worker || kept.contains_key(&key) {
                    let seq = kept.entry(key).or_default();
                    *seq = (*seq).max(d.unsaved);
                } else {
                    tracing::warn!(
                        worker = self.id.0,
                        "a closed device's position was not saved: the store's queue is full"
                    );
                }
            }
        }
    }

    /// Hands a device's acknowledged position to the store. Returns false
    /// when the store's queue is full (tried again at the next tick).
    fn save_position(&self, user: &Arc<str>, device: &Arc<str>, seq: u64) -> bool {
        let Some(store) = self.shared.store.get() else { return true };
        let req = Request::Position { user: user.clone(), device: device.clone(), seq };
        self.submit_store(store, Token::Position, req).is_ok()
    }

    /// Whether positions of closed connections still wait for room in the
    /// store's queue (the worker's shutdown waits a moment for them).
    pub(super) fn positions_waiting(&self) -> bool {
        !self.closed_unsaved.borrow().is_empty()
    }

    /// The tick: positions acknowledged since the last one go to the
    /// store, and those of closed connections that found its queue full.
    pub(super) fn save_positions(&self) {
        self.closed_unsaved.borrow_mut().retain(|(user, device), seq| !self.save_position(user, device, *seq));
        let dirty = std::mem::take(&mut *self.unsaved.borrow_mut());
        let mut again = Vec::new();
        for (slot, generation) in dirty {
            let mut table = self.reliable.borrow_mut();
            let Some(d) = table.get_mut(&slot).filter(|d| d.generation == generation && d.unsaved != 0) else {
                continue;
            };
            if self.save_position(&d.user, &d.login.device, d.unsaved) {
                d.unsaved = 0;
            } else {
                again.push((slot, generation));
            }
        }
        self.unsaved.borrow_mut().extend(again);
    }

    /// A slice of the sweep that keeps connected devices seen: the store
    /// forgets a device not seen for `store.ttl_ms` (a login and an ACK
    /// are what it sees), and a device connected and idle that long (a
    /// desktop app open for a quiet week) was forgotten while connected.
    /// Its next ACK made it known again, but meanwhile its user's other
    /// devices' ACKs could drop messages it had not acknowledged, lost to
    /// it if its connection then ended first. So every connected device's
    /// position is handed to the store again at least every quarter of
    /// the TTL: each tick looks at the share of the worker's connection
    /// slots that makes a full round in that time (a few slots a tick at
    /// the defaults: a 7-day TTL, 1 s ticks), without a field per
    /// connection. A refusal by a full queue waits for the next round.
    fn keep_devices_seen(&self) {
        let table = self.reliable.borrow();
        let slots = self.shared.max_conns_per_worker.max(1) as u64;
        let round_ms = (self.shared.config.store.ttl_ms / 4).max(1);
        let n = (slots * self.shared.config.timeouts.tick_ms).div_ceil(round_ms).clamp(1, slots);
        let start = u64::from(self.seen_cursor.get()) % slots;
        self.seen_cursor.set(((start + n) % slots) as u32);
        if table.is_empty() {
            return;
        }
        for i in 0..n {
            let slot = ((start + i) % slots) as u32;
            let Some(d) = table.get(&slot) else { continue };
            let position = match &d.state {
                State::Parked { position } => *position,
                State::Open(w) => w.position(),
                State::Pending(_) => continue, // its login was just seen
            };
            self.save_position(&d.user, &d.login.device, position);
        }
    }

    /// Queues a store request. Inside [`Worker::store_turn`] the store
    /// thread is woken once, at the end of the turn, not per request
    /// (`store::service`'s module doc says why).
    fn submit_store(&self, store: &Submitter<Token>, token: Token, req: Request) -> Result<(), Busy> {
        if !self.store_batching.get() {
            return store.try_submit(token, req);
        }
        store.try_submit_unwoken(token, req)?;
        self.store_unwoken.set(true);
        Ok(())
    }

    /// Runs `turn` (the I/O loop's handling of ready connections, or the
    /// tick's positions) with the store thread's wakes held to its end,
    /// where one wake covers what the turn queued.
    pub(super) fn store_turn(&self, turn: impl FnOnce()) {
        if self.store_batching.replace(true) {
            return turn(); // already inside one: its end wakes
        }
        turn();
        self.store_batching.set(false);
        self.wake_store();
    }

    /// Wakes the store thread if requests were queued without a wake.
    pub(super) fn wake_store(&self) {
        if self.store_unwoken.replace(false) {
            if let Some(store) = self.shared.store.get() {
                store.wake();
            }
        }
    }

    /// A SEND or SEND_EX to be stored: queued for the store thread; the
    /// answer comes back as `Command::SendDone`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store_send(
        &self,
        conn: ConnId,
        from: &Arc<str>,
        to: &str,
        payload: &[u8],
        req_id: u32,
        opts: StoreOpts,
        ex: bool,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(store) = self.shared.store.get() else {
            return Err((ErrorCode::NotReliable, "this server has no message store (store.kind = \"none\")".into()));
        };
        let ts_ms = crate::store::unix_ms();
        let msg = NewMessage {
            to: Arc::from(to),
            from: from.clone(),
            msg_id: self.next_msg_id(),
            ts_ms,
            payload: Bytes::copy_from_slice(payload),
            client_id: opts.client_id,
            expires_ms: crate::store::expires_at(ts_ms, opts.ttl_ms as u64),
        };
        let token = Token::Append { msg: msg.clone(), reply: Reply::Client { conn, req_id, ex } };
        self.submit_store(store, token, Request::Append(msg)).map_err(|_| {
            (ErrorCode::StoreUnavailable, "the message store's queue is full; the message was not stored".into())
        })
    }

    /// The client's ACK on (`slot`, `generation`).
    pub(super) fn window_ack(&self, slot: u32, generation: u32, seq: u64) -> Result<(), (ErrorCode, String)> {
        let now = self.now.get();
        let rules = self.window_rules;
        self.with_window(slot, generation, |w, io| w.on_ack(seq, now, &rules, io))
            .ok_or_else(|| self.not_reliable(slot, generation))
    }

    /// The client's FETCH on (`slot`, `generation`).
    pub(super) fn window_fetch(
        &self,
        slot: u32,
        generation: u32,
        req_id: u32,
        after_seq: u64,
        limit: u16,
    ) -> Result<(), (ErrorCode, String)> {
        let now = self.now.get();
        let rules = self.window_rules;
        self.with_window(slot, generation, |w, io| w.on_fetch(req_id, after_seq, limit, now, &rules, io))
            .ok_or_else(|| self.not_reliable(slot, generation))
    }

    fn not_reliable(&self, slot: u32, generation: u32) -> (ErrorCode, String) {
        let pending = self.reliable.borrow().get(&slot).is_some_and(|d| d.generation == generation);
        if pending {
            (ErrorCode::StoreUnavailable, "the inbox is still being loaded; wait for the login SYNC".into())
        } else if self.shared.store.get().is_none() {
            (ErrorCode::NotReliable, "this server has no message store (store.kind = \"none\")".into())
        } else {
            (ErrorCode::NotReliable, "this connection logged in without a device id".into())
        }
    }

    // ---- the store's answers ----------------------------------------------------

    /// `msg` was stored for the user of `conn` (one of this worker's).
    pub(super) fn on_stored(&self, conn: ConnId, msg: Arc<StoredMessage>) {
        let (slot, generation) = (conn.slot(), conn.generation());
        let now = self.now.get();
        let rules = self.window_rules;
        if self.with_window(slot, generation, |w, io| w.on_appended(&*msg, now, &rules, io)).is_some() {
            return;
        }
        if self.heard_while_pending(slot, generation, msg.seq) {
            // The store has not answered the login yet: the window counts
            // the message in when it starts (a notice from another node
            // can come before the answer of a login that read the head
            // before the message was stored).
            return;
        }
        // A plain connection: today's live PUSH, at most once.
        let frame = Frame::Push { msg_id: msg.msg_id, from: &msg.from, payload: &msg.payload }
            .to_bytes()
            .expect("an INBOX-sized payload fits a PUSH");
        if self.deliver(conn, frame) {
            crate::stats::bump(&self.counters().detail.deliveries[crate::stats::DELIVERY_PUSH], 1);
        }
    }

    /// Notices of messages up to `seq` for the user of `conn` were held
    /// back by the store thread (a full mailbox): the window reads that
    /// far (the cluster thread holds notices too, for messages other
    /// nodes stored). A window not open yet counts them in when it starts;
    /// a plain connection's at-most-once PUSH is gone.
    pub(super) fn on_missed(&self, conn: ConnId, seq: u64) {
        let now = self.now.get();
        let rules = self.window_rules;
        let (slot, generation) = (conn.slot(), conn.generation());
        if self.with_window(slot, generation, |w, io| w.on_head(seq, now, &rules, io)).is_none() {
            let _ = self.heard_while_pending(slot, generation, seq);
        }
    }

    /// A notice of messages up to `seq` for a device connection whose
    /// login the store has not answered yet: counted for its window's
    /// start. False if (`slot`, `generation`) is no such connection.
    fn heard_while_pending(&self, slot: u32, generation: u32, seq: u64) -> bool {
        match self.reliable.borrow_mut().get_mut(&slot).filter(|d| d.generation == generation) {
            Some(Device { state: State::Pending(p), .. }) => {
                p.on_appended(seq);
                true
            }
            _ => false,
        }
    }

    /// The outcome of `conn`'s SEND (SEND_ACK) or SEND_EX (SEND_RESULT).
    pub(super) fn on_send_done(&self, done: SendDone) {
        let SendDone { conn, req_id, ex, outcome } = done;
        let frame = match outcome {
            Ok(o) if ex => Frame::SendResult {
                req_id,
                outcome: if o.duplicate { SendOutcome::Duplicate } else { SendOutcome::Stored },
                seq: o.seq,
                msg_id: o.msg_id,
                delivered: o.delivered,
            }
            .to_bytes(),
            Ok(o) => Frame::SendAck { req_id, delivered: o.delivered }.to_bytes(),
            Err(e) => {
                let reason = format!("not stored: {e}");
                Frame::Error { code: store_error(&e) as u16, req_id, reason: clip_reason(&reason) }.to_bytes()
            }
        };
        // Written now, not queued for the end of the batch: one store batch
        // answers thousands of SENDs of one sender at once.
        self.deliver(conn, frame.expect("fixed-size frames and clipped reasons"));
    }

    /// The store's answer to a device login: the window opens.
    pub(super) fn on_device_ready(&self, conn: ConnId, result: Result<(u64, u64), StoreError>) {
        let (slot, generation) = (conn.slot(), conn.generation());
        let (position, head) = match result {
            Ok(r) => r,
            Err(e) => {
                self.forget_device(slot, generation);
                // The instruction first: a WebSocket close reason is cut at 123 bytes.
                let reason = format!("log in again shortly: the inbox could not be loaded ({e})");
                self.close_conn(slot, generation, CloseCode::TryAgainLater, &reason);
                return;
            }
        };
        let (dev, pending) = {
            let mut table = self.reliable.borrow_mut();
            match table.get(&slot) {
                Some(&Device { generation: g, state: State::Pending(p), .. }) if g == generation => {
                    (table.remove(&slot).expect("just seen"), p)
                }
                _ => return, // closed meanwhile
            }
        };
        let mut io = WinIo::new(self, slot, generation, &dev.user);
        let window = Box::new(Window::start(position, pending.head(head), self.now.get(), &self.window_rules, &mut io));
        let after = io.after();
        self.put_back(slot, generation, dev, window, after);
    }

    /// A page the window of `conn` asked for.
    pub(super) fn on_page(&self, conn: ConnId, result: PageResult) {
        let now = self.now.get();
        let rules = self.window_rules;
        self.with_window(conn.slot(), conn.generation(), |w, io| match result {
            Ok(page) => w.on_page(&page.messages, page.head_seq, now, &rules, io),
            Err(e) => {
                tracing::warn!(worker = io.w.id.0, "a page read failed: {e}");
                w.on_read_failed(now, &rules);
            }
        });
    }

    /// The tick: windows whose retransmit (or read retry) is due. It
    /// looks only at the windows listed in `Worker::open` (each put back
    /// open since a tick last found it parked), not at the whole table:
    /// parked devices are most of a big server's, and a pass over all of
    /// them would cost each tick in proportion to every device connection
    /// the worker holds, busy or not.
    pub(super) fn reliable_tick(&self, now: Tick) {
        self.save_positions();
        self.keep_devices_seen();
        let mut open = std::mem::take(&mut *self.open.borrow_mut());
        let mut due = Vec::new();
        let mut table = self.reliable.borrow_mut();
        open.retain(|&(slot, generation)| {
            // Gone, or the slot another connection's now (its own entry is
            // listed under its generation): dropped.
            let Some(d) = table.get_mut(&slot).filter(|d| d.generation == generation) else { return false };
            let State::Open(w) = &d.state else {
                d.listed = false;
                return false;
            };
            if w.deadline().is_some_and(|at| (now.wrapping_sub(at) as i32) >= 0) {
                due.push((slot, generation));
            }
            true
        });
        drop(table);
        if open.capacity() > 4 * open.len() + 1024 {
            open.shrink_to(2 * open.len()); // after a burst
        }
        // Nothing was listed meanwhile: no window ran.
        *self.open.borrow_mut() = open;
        let rules = self.window_rules;
        for (slot, generation) in due {
            self.with_window(slot, generation, |w, io| w.on_tick(now, &rules, io));
        }
    }
}
