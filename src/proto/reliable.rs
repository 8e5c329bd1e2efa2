//! One device connection's share of reliable delivery, without I/O: the
//! window of stored messages in flight, cumulative ACKs, retransmits, the
//! login sync and FETCH paging (docs/PROTOCOL.md section 15).
//!
//! Owns: which inbox seqs this connection has written and not had
//! acknowledged, the device position as this connection knows it, the
//! inbox head it has heard of, how far it may push before the client asks
//! for more (`limit`: the login page or a FETCH, or everything once caught
//! up), and the retransmit deadline.
//! Must not: do I/O, read a clock or hold messages: messages wait in the
//! store, not here. What the window needs done goes through a
//! [`WindowEnv`]: write a message, write a SYNC, read a page from the
//! store, save the position, answer an ERROR, close. The worker keeps one
//! `Window` per connection that logged in with a device id, in a side table
//! (a plain connection pays nothing for it); tests drive it with a virtual
//! clock (`tests` below).
//!
//! Order: seqs written on one connection only ever increase, except that a
//! retransmit starts again from the acknowledged position + 1; the client
//! drops seqs it already has. A message that arrives live is written at once
//! only when it is the next seq and no store read is outstanding; anything
//! else is read from the store in order.

use std::collections::VecDeque;

use super::codes::{CloseCode, ErrorCode};
use super::session::Tick;

/// `limit` once the connection is caught up: every new message is pushed.
const LIVE: u64 = u64::MAX;

/// A message the window can write: its seq and payload size.
pub trait Item {
    fn seq(&self) -> u64;
    fn payload_len(&self) -> usize;
}

/// What the window needs from the connection and the store around it.
pub trait WindowEnv<M> {
    /// Writes `msg` as an INBOX frame.
    fn deliver(&mut self, msg: &M);
    /// Writes a SYNC frame.
    fn sync(&mut self, req_id: u32, position: u64, head_seq: u64, page_end: u64);
    /// Asks the store for up to `limit` messages after `after_seq`; the
    /// answer comes back as [`Window::on_page`] (or [`Window::on_read_failed`]).
    fn read(&mut self, after_seq: u64, limit: u32);
    /// The device has stored everything up to `seq`: record it.
    fn save_position(&mut self, seq: u64);
    /// Answers an ERROR (the connection stays open).
    fn error(&mut self, code: ErrorCode, req_id: u32, reason: &str);
    /// Closes the connection.
    fn close(&mut self, code: CloseCode, reason: &str);
    /// The window went back to the ACK position to send again (for the
    /// counters; nothing to do).
    fn retransmitting(&mut self) {}
}

/// The `[delivery]` settings a window obeys, in ticks where they are times.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct WindowRules {
    /// Messages in flight (written, not acknowledged) at most.
    pub window: u32,
    /// Payload bytes in flight at most (one message is always allowed).
    pub window_bytes: u64,
    /// Retransmit from the position when the ACK position has not moved
    /// for this long while messages are in flight.
    pub ack_timeout: Tick,
    /// Retransmits in a row without progress before CLOSE 4007.
    pub max_retransmits: u8,
    /// Messages pushed at login before the client must FETCH.
    pub first_page: u32,
    /// Largest FETCH `limit` honoured.
    pub max_fetch: u32,
}

/// One device connection's delivery state. See the module doc.
#[derive(Debug)]
pub struct Window {
    /// The device's position: every seq ≤ `acked` is stored on the device.
    acked: u64,
    /// The highest seq written on this connection since the last rewind.
    sent: u64,
    /// The highest seq this connection may push now (`LIVE`: no bound).
    limit: u64,
    /// The highest seq known to exist in the inbox.
    head: u64,
    /// (seq, payload bytes) of what is in flight, oldest first.
    in_flight: VecDeque<(u64, u32)>,
    in_flight_bytes: u64,
    /// A store read is outstanding, asked for seqs after this.
    reading: Option<u64>,
    /// When to retransmit (or retry a failed read).
    deadline: Option<Tick>,
    /// Retransmits since the position last moved.
    retries: u8,
    /// The `req_id` of the last SYNC written (0: the login's): a page that
    /// has to be announced again (see [`Window::on_page`]) keeps it.
    page_req: u32,
    /// The login SYNC waits for the first page's read, so that its
    /// `page_end` counts from the first seq the inbox still keeps.
    sync_pending: bool,
    /// The next message does not fit the bytes left in flight: no store
    /// read until an ACK or a retransmit changes that.
    full: bool,
}

/// A device connection logged in whose login the store has not answered
/// yet (no [`Window`] until it does).
///
/// Notices of new messages that come meanwhile are counted, not dropped.
/// The store thread answers a login before the notices of what it stored
/// after the login read the head, so those are in the login page. But in
/// a cluster (the Redis store), a notice that another node forwards for a
/// message it stored just after this login's read can come before the
/// answer: dropped, it left the device without that message until the
/// next one came.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// The highest seq a notice named (0: none).
    heard: u64,
}

impl Pending {
    /// A message `seq` was stored in the user's inbox (or messages up to
    /// it: a held notice).
    pub fn on_appended(&mut self, seq: u64) {
        self.heard = self.heard.max(seq);
    }

    /// The head to start the window at ([`Window::start`]) once the
    /// store answers the login with the head it `read`: that or the
    /// highest seq heard since, whichever is higher.
    pub fn head(self, read: u64) -> u64 {
        read.max(self.heard)
    }
}

/// One device connection's login, for the rule that a device holds one
/// connection (PROTOCOL.md 15.2): a later LOGIN of the same device, on
/// this server or on another node of its cluster, replaces it (CLOSE
/// 4008). On one server, logins are numbered in the order the server took
/// them, so of two at once the later one wins and never both go. Between
/// nodes, logins are ordered by when they happened on Redis's clock
/// (`at_ms`), ties by node id: a total order, so of two logins on two
/// nodes exactly one wins, and a connection that died silently (the
/// reason for the rule) always logged in long before its device's next
/// login. Another device of the user, or another user sharing a device id,
/// is not this one (the notice goes only to the user's connections).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLogin {
    pub device: std::sync::Arc<str>,
    /// Its number among the server's device logins.
    pub number: u64,
    /// When it happened, in ms of the cluster's clock (Redis's, as this
    /// node last read it; the node's own without a cluster).
    pub at_ms: u64,
}

impl DeviceLogin {
    /// Whether the login `number` of `device` on this server replaces this
    /// connection. A connection hears of its own login too, and keeps
    /// itself.
    pub fn replaced_by(&self, device: &str, number: u64) -> bool {
        self.number < number && &*self.device == device
    }

    /// A login of `device` at `at_ms` on node `node`, this connection
    /// being on node `me`: `Some(true)` if it replaces this connection,
    /// `Some(false)` if this connection is the later one (the other node
    /// must then close its own), `None` if it is another device.
    pub fn replaced_from(&self, device: &str, at_ms: u64, node: &str, me: &str) -> Option<bool> {
        (&*self.device == device).then(|| (self.at_ms, me) < (at_ms, node))
    }
}

impl Window {
    /// A device logged in; the store says its position is `position` and
    /// its inbox head `head`. Writes the login SYNC and starts pushing the
    /// first page. With messages waiting the SYNC goes out with the first
    /// page's read: what follows the position may have been dropped (a new
    /// device of a user whose other devices had everything acknowledged,
    /// or expired messages), and the page starts at the first seq kept.
    pub fn start<M: Item>(
        position: u64,
        head: u64,
        now: Tick,
        rules: &WindowRules,
        env: &mut impl WindowEnv<M>,
    ) -> Window {
        let head = head.max(position);
        let page_end = head.min(position.saturating_add(rules.first_page as u64));
        let mut w = Window {
            acked: position,
            sent: position,
            limit: if page_end >= head { LIVE } else { page_end },
            head,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            reading: None,
            deadline: None,
            retries: 0,
            page_req: 0,
            sync_pending: page_end > position,
            full: false,
        };
        if !w.sync_pending {
            env.sync(0, position, head, page_end);
        }
        w.pump(now, rules, env);
        w
    }

    /// A device connection whose window was parked (see
    /// [`Window::is_idle`]) comes back to life at `position`, which was
    /// then also the head: no SYNC, nothing in flight, live.
    pub fn resume(position: u64) -> Window {
        Window {
            acked: position,
            sent: position,
            limit: LIVE,
            head: position,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            reading: None,
            deadline: None,
            retries: 0,
            page_req: 0,
            sync_pending: false,
            full: false,
        }
    }

    /// Nothing in flight, nothing asked of the store, no timer, caught up:
    /// the window is fully described by its position, so the caller may
    /// drop it and [`Window::resume`] it when the connection next needs
    /// one. (An idle device connection then costs no window.)
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
            && self.reading.is_none()
            && self.deadline.is_none()
            && self.limit == LIVE
            && self.sent == self.head
            && self.acked == self.head
            && !self.sync_pending
    }

    pub fn position(&self) -> u64 {
        self.acked
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    /// Messages written and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Caught up: new messages are pushed as they arrive.
    pub fn is_live(&self) -> bool {
        self.limit == LIVE
    }

    /// When the window next needs [`Window::on_tick`], if ever.
    pub fn deadline(&self) -> Option<Tick> {
        self.deadline
    }

    fn has_room(&self, len: usize, rules: &WindowRules) -> bool {
        self.in_flight.len() < rules.window as usize
            && (self.in_flight.is_empty() || self.in_flight_bytes + len as u64 <= rules.window_bytes)
    }

    fn write<M: Item>(&mut self, msg: &M, now: Tick, rules: &WindowRules, env: &mut impl WindowEnv<M>) {
        debug_assert!(msg.seq() > self.sent, "seqs on a connection only increase");
        env.deliver(msg);
        self.sent = msg.seq();
        let len = msg.payload_len() as u32;
        self.in_flight.push_back((msg.seq(), len));
        self.in_flight_bytes += len as u64;
        if self.deadline.is_none() {
            self.deadline = Some(now.wrapping_add(rules.ack_timeout));
        }
    }

    /// Asks the store for what may be pushed next, if anything and if no
    /// read is outstanding.
    fn pump<M: Item>(&mut self, now: Tick, rules: &WindowRules, env: &mut impl WindowEnv<M>) {
        let _ = now;
        if self.reading.is_some() || self.full {
            return;
        }
        let upto = self.head.min(self.limit);
        if self.sync_pending && self.sent >= upto {
            // The client acknowledged the whole login page before its
            // SYNC: nothing to read for it, so the SYNC goes now.
            self.announce(upto, env);
        }
        let room = (rules.window as usize).saturating_sub(self.in_flight.len()) as u64;
        if self.sent >= upto || room == 0 || (self.in_flight_bytes >= rules.window_bytes && !self.in_flight.is_empty())
        {
            return;
        }
        let n = room.min(upto - self.sent) as u32;
        self.reading = Some(self.sent);
        env.read(self.sent, n);
    }

    /// A message was just stored in this user's inbox.
    pub fn on_appended<M: Item>(&mut self, msg: &M, now: Tick, rules: &WindowRules, env: &mut impl WindowEnv<M>) {
        let seq = msg.seq();
        self.head = self.head.max(seq);
        // While the login's SYNC waits (a failed first-page read), the
        // message waits too: the SYNC comes first (PROTOCOL.md 15.6).
        if self.reading.is_none()
            && !self.sync_pending
            && seq == self.sent + 1
            && seq <= self.limit
            && self.has_room(msg.payload_len(), rules)
        {
            self.write(msg, now, rules, env);
        } else {
            self.pump(now, rules, env);
        }
    }

    /// Messages up to `seq` are in the inbox, though their notices
    /// ([`Window::on_appended`]) were not seen: read what may be pushed.
    pub fn on_head<M: Item>(&mut self, seq: u64, now: Tick, rules: &WindowRules, env: &mut impl WindowEnv<M>) {
        self.head = self.head.max(seq);
        self.pump(now, rules, env);
    }

    /// The store's answer to [`WindowEnv::read`]: messages after the seq
    /// asked for, in order (seqs may skip ones that expired), and the head.
    pub fn on_page<M: Item>(
        &mut self,
        messages: &[M],
        head: u64,
        now: Tick,
        rules: &WindowRules,
        env: &mut impl WindowEnv<M>,
    ) {
        let asked = self.reading.take();
        self.head = self.head.max(head);
        // A rewind (retransmit) or a FETCH moved `sent` while the read was
        // out: the page no longer continues what was written; read again.
        // So did an ACK past a FETCH of history that came meanwhile, even
        // when it brought `sent` back to where the read started: the page
        // now ends below `sent`, so nothing of the answer is to be written.
        if asked == Some(self.sent) && self.sent < self.limit {
            // The store keeps nothing between `sent` and the first seq it
            // returned (nothing up to the head if none): those messages
            // expired, or were dropped before this device was known.
            let kept = messages.iter().map(|m| m.seq()).find(|&s| s > self.sent).unwrap_or(self.head + 1);
            if kept > self.limit || (self.sync_pending && kept > self.sent + 1 && self.limit != LIVE) {
                // Nothing is left of the page the client was told of, or
                // the login page, not announced yet, lost its first seqs:
                // the page moves past the gap, as long as it was, and a
                // SYNC (the login's, or again the last one's) says so, or
                // the client would wait for seqs that will never come.
                let span = self.limit - self.sent;
                self.sent = kept - 1;
                let page_end = self.head.min(self.sent.saturating_add(span));
                self.limit = if page_end >= self.head { LIVE } else { page_end };
                self.announce(page_end, env);
            } else if kept > self.sent + 1 && self.limit == LIVE {
                self.sent = kept - 1;
            }
            if self.sync_pending {
                let page_end = self.head.min(self.limit);
                self.announce(page_end, env);
            }
            for m in messages {
                if m.seq() <= self.sent {
                    continue;
                }
                if m.seq() > self.limit {
                    break;
                }
                if !self.has_room(m.payload_len(), rules) {
                    // Read again once an ACK (or a retransmit) makes room,
                    // not now: the answer would be the same.
                    self.full = true;
                    break;
                }
                self.write(m, now, rules, env);
            }
        }
        self.pump(now, rules, env);
    }

    /// Writes the SYNC of the page that ends at `page_end`.
    fn announce<M>(&mut self, page_end: u64, env: &mut impl WindowEnv<M>) {
        self.sync_pending = false;
        env.sync(self.page_req, self.acked, self.head, page_end);
    }

    /// The store could not answer a read: try again at the next deadline.
    pub fn on_read_failed(&mut self, now: Tick, rules: &WindowRules) {
        self.reading = None;
        if self.deadline.is_none() {
            self.deadline = Some(now.wrapping_add(rules.ack_timeout));
        }
    }

    /// The client's cumulative ACK.
    pub fn on_ack<M: Item>(&mut self, seq: u64, now: Tick, rules: &WindowRules, env: &mut impl WindowEnv<M>) {
        if seq > self.head {
            let reason = format!("ACK of seq {seq} beyond the inbox head {}", self.head);
            return env.error(ErrorCode::BadAck, 0, &reason);
        }
        if seq <= self.acked {
            // What a FETCH below the position wrote again is covered by
            // the device's ACK of its position: without this, it stayed in
            // flight, was retransmitted, and the connection was closed
            // with 4007 unless a new message moved the position.
            if self.in_flight.front().is_some_and(|&(s, _)| s <= seq) {
                self.covered(seq, now, rules);
                self.pump(now, rules, env);
            }
            return;
        }
        self.advance(seq, now, rules, env);
        self.pump(now, rules, env);
    }

    /// The client has every seq up to `seq`: they leave what is in flight,
    /// and the retransmit timer starts again for what is left.
    fn covered(&mut self, seq: u64, now: Tick, rules: &WindowRules) {
        while let Some(&(s, len)) = self.in_flight.front() {
            if s > seq {
                break;
            }
            self.in_flight.pop_front();
            self.in_flight_bytes -= len as u64;
        }
        self.full = false;
        self.retries = 0;
        self.deadline = if self.in_flight.is_empty() { None } else { Some(now.wrapping_add(rules.ack_timeout)) };
    }

    /// The position moves to `seq` (≤ head, > acked).
    fn advance<M: Item>(&mut self, seq: u64, now: Tick, rules: &WindowRules, env: &mut impl WindowEnv<M>) {
        self.acked = seq;
        env.save_position(seq);
        self.covered(seq, now, rules);
        // The client has more than this connection wrote (from an earlier
        // connection of the device): carry on after it.
        if seq > self.sent {
            self.sent = seq;
        }
    }

    /// FETCH: the client has everything up to `after_seq` and asks for up to
    /// `limit` messages after it. Answered with a SYNC describing the page;
    /// the page itself flows through the window.
    pub fn on_fetch<M: Item>(
        &mut self,
        req_id: u32,
        after_seq: u64,
        limit: u16,
        now: Tick,
        rules: &WindowRules,
        env: &mut impl WindowEnv<M>,
    ) {
        if after_seq > self.head {
            let reason = format!("FETCH after seq {after_seq}, beyond the inbox head {}", self.head);
            return env.error(ErrorCode::BadAck, req_id, &reason);
        }
        if self.sync_pending {
            // The login's SYNC waits for the first page's read (`start`);
            // a FETCH answered now would take its place, and the client
            // would never get the login's SYNC (PROTOCOL.md 15.6, 15.8).
            let reason = "the inbox is still being loaded; wait for the login SYNC";
            return env.error(ErrorCode::StoreUnavailable, req_id, reason);
        }
        let mut rewound = false;
        if after_seq > self.acked {
            self.advance(after_seq, now, rules, env);
        } else if after_seq != self.sent {
            // Asked again for what it already acknowledged: write it again
            // from there, that page only (the client goes on by FETCH, as
            // the SYNC's page_end tells it). Also forward: after such a
            // page `sent` is below the position, and a FETCH past it (but
            // not past the position) starts its page at its own after_seq,
            // not where the earlier page stopped.
            self.rewind_to(after_seq);
            rewound = true;
        }
        let n = (limit as u64).min(rules.max_fetch as u64);
        let page_end = self.head.min(after_seq.saturating_add(n));
        if page_end >= self.head {
            self.limit = LIVE;
        } else if rewound {
            self.limit = page_end;
        } else if self.limit != LIVE {
            self.limit = self.limit.max(page_end);
        }
        self.page_req = req_id;
        self.announce(page_end, env);
        self.pump(now, rules, env);
    }

    fn rewind_to(&mut self, seq: u64) {
        self.sent = seq;
        self.full = false;
        self.in_flight.clear();
        self.in_flight_bytes = 0;
    }

    /// A timer visit at `now`: retransmits when the ACK position has not
    /// moved for `ack_timeout` while messages are in flight (CLOSE 4007
    /// after `max_retransmits` in a row), or retries a failed read.
    pub fn on_tick<M: Item>(&mut self, now: Tick, rules: &WindowRules, env: &mut impl WindowEnv<M>) {
        let Some(at) = self.deadline else { return };
        if (now.wrapping_sub(at) as i32) < 0 {
            return;
        }
        self.deadline = None;
        if !self.in_flight.is_empty() {
            if self.retries >= rules.max_retransmits {
                let reason = format!("no ACK after {} retransmits of seq {} onward", self.retries, self.acked + 1);
                return env.close(CloseCode::AckTimeout, &reason);
            }
            self.retries += 1;
            env.retransmitting();
            let acked = self.acked;
            self.rewind_to(acked);
        }
        self.pump(now, rules, env);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Msg(u64, usize);

    impl Item for Msg {
        fn seq(&self) -> u64 {
            self.0
        }
        fn payload_len(&self) -> usize {
            self.1
        }
    }

    /// Records what the window asks for; `store` answers reads.
    #[derive(Default)]
    struct Rec {
        delivered: Vec<u64>,
        syncs: Vec<(u32, u64, u64, u64)>,
        reads: Vec<(u64, u32)>,
        saved: Vec<u64>,
        errors: Vec<ErrorCode>,
        closed: Option<CloseCode>,
    }

    impl WindowEnv<Msg> for Rec {
        fn deliver(&mut self, msg: &Msg) {
            assert!(!self.syncs.is_empty(), "INBOX {} before the login SYNC", msg.0);
            self.delivered.push(msg.0);
        }
        fn sync(&mut self, req_id: u32, position: u64, head_seq: u64, page_end: u64) {
            self.syncs.push((req_id, position, head_seq, page_end));
        }
        fn read(&mut self, after_seq: u64, limit: u32) {
            self.reads.push((after_seq, limit));
        }
        fn save_position(&mut self, seq: u64) {
            self.saved.push(seq);
        }
        fn error(&mut self, code: ErrorCode, _req_id: u32, _reason: &str) {
            self.errors.push(code);
        }
        fn close(&mut self, code: CloseCode, _reason: &str) {
            self.closed = Some(code);
        }
    }

    fn rules() -> WindowRules {
        WindowRules { window: 4, window_bytes: 1000, ack_timeout: 5, max_retransmits: 2, first_page: 3, max_fetch: 10 }
    }

    /// The inbox: seqs 1..=head, `len` bytes each.
    fn page(after: u64, limit: u32, head: u64) -> Vec<Msg> {
        (after + 1..=head).take(limit as usize).map(|s| Msg(s, 10)).collect()
    }

    /// Serves the outstanding read from an inbox of `head` messages.
    fn serve(w: &mut Window, env: &mut Rec, head: u64, now: Tick) {
        while let Some((after, limit)) = env.reads.pop() {
            let p = page(after, limit, head);
            w.on_page(&p, head, now, &rules(), env);
        }
    }

    #[test]
    fn login_syncs_and_pushes_only_the_first_page() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 10, 0, &rules(), &mut env);
        assert_eq!(env.reads, vec![(0, 3)]);
        assert_eq!(env.syncs, vec![], "the SYNC goes out with the page's read");
        serve(&mut w, &mut env, 10, 0);
        assert_eq!(env.syncs, vec![(0, 0, 10, 3)]);
        assert_eq!(env.delivered, vec![1, 2, 3]);
        assert!(!w.is_live());
        // A live message beyond the page is not pushed.
        w.on_appended(&Msg(11, 10), 1, &rules(), &mut env);
        assert_eq!(env.delivered, vec![1, 2, 3]);
        assert!(env.reads.is_empty());
    }

    #[test]
    fn a_small_backlog_goes_live_and_new_messages_are_written_at_once() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(5, 7, 0, &rules(), &mut env);
        serve(&mut w, &mut env, 7, 0);
        assert_eq!(env.syncs, vec![(0, 5, 7, 7)]);
        assert!(w.is_live());
        w.on_appended(&Msg(8, 10), 1, &rules(), &mut env);
        assert_eq!(env.delivered, vec![6, 7, 8]);
        assert!(env.reads.is_empty(), "the next seq in hand is written without a store read");
    }

    #[test]
    fn the_window_bounds_what_is_in_flight_and_acks_open_it() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 0, 0, &rules(), &mut env);
        for s in 1..=6 {
            w.on_appended(&Msg(s, 10), 0, &rules(), &mut env);
        }
        assert_eq!(env.delivered, vec![1, 2, 3, 4], "window of 4");
        assert_eq!(w.in_flight(), 4);
        // 5 and 6 wait in the store; the ACK opens the window and a read
        // fetches them.
        assert_eq!(env.reads, vec![]);
        w.on_ack(2, 1, &rules(), &mut env);
        assert_eq!(env.saved, vec![2]);
        assert_eq!(env.reads, vec![(4, 2)]);
        serve(&mut w, &mut env, 6, 1);
        assert_eq!(env.delivered, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn bytes_in_flight_are_bounded_but_one_message_always_goes() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 0, 0, &rules(), &mut env);
        w.on_appended(&Msg(1, 5000), 0, &rules(), &mut env);
        assert_eq!(env.delivered, vec![1], "larger than window_bytes, but alone");
        w.on_appended(&Msg(2, 10), 0, &rules(), &mut env);
        assert_eq!(env.delivered, vec![1]);
        w.on_ack(1, 1, &rules(), &mut env);
        assert_eq!(env.reads, vec![(1, 1)]);
    }

    #[test]
    fn no_ack_retransmits_from_the_position_then_closes() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 0, 0, &rules(), &mut env);
        for s in 1..=3 {
            w.on_appended(&Msg(s, 10), 0, &rules(), &mut env);
        }
        w.on_ack(1, 2, &rules(), &mut env);
        assert_eq!(w.deadline(), Some(7));
        w.on_tick(6, &rules(), &mut env);
        assert!(env.reads.is_empty(), "not due yet");
        w.on_tick(7, &rules(), &mut env);
        assert_eq!(env.reads, vec![(1, 2)], "again from the position");
        serve(&mut w, &mut env, 3, 7);
        assert_eq!(env.delivered, vec![1, 2, 3, 2, 3]);
        w.on_tick(12, &rules(), &mut env);
        serve(&mut w, &mut env, 3, 12);
        assert_eq!(env.closed, None);
        w.on_tick(17, &rules(), &mut env);
        assert_eq!(env.closed, Some(CloseCode::AckTimeout));
    }

    #[test]
    fn an_ack_resets_the_retransmit_count() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 0, 0, &rules(), &mut env);
        for s in 1..=3 {
            w.on_appended(&Msg(s, 10), 0, &rules(), &mut env);
        }
        for round in 0..6u32 {
            let t = 5 * (round + 1);
            w.on_tick(t, &rules(), &mut env);
            serve(&mut w, &mut env, 3, t);
            if round % 2 == 1 {
                w.on_ack(w.position() + 1, t, &rules(), &mut env);
            }
        }
        assert_eq!(env.closed, None);
    }

    #[test]
    fn a_page_overtaken_by_a_retransmit_is_dropped_and_read_again() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 0, 0, &rules(), &mut env);
        for s in 1..=5 {
            w.on_appended(&Msg(s, 10), 0, &rules(), &mut env);
        }
        w.on_ack(2, 0, &rules(), &mut env);
        assert_eq!(env.reads, vec![(4, 1)]);
        // The read is out when the retransmit rewinds to 2.
        w.on_tick(5, &rules(), &mut env);
        let stale = env.reads.remove(0);
        w.on_page(&page(stale.0, stale.1, 5), 5, 5, &rules(), &mut env);
        assert_eq!(env.reads, vec![(2, 3)], "read again from the position");
        serve(&mut w, &mut env, 5, 5);
        assert_eq!(env.delivered, vec![1, 2, 3, 4, 3, 4, 5]);
    }

    #[test]
    fn a_fetch_of_acknowledged_history_is_cleared_by_the_ack_of_the_position() {
        // The device has 1..=10 and asks for 1..=3 again (it lost its
        // copy): they come again, and its cumulative ACK, still 10, covers
        // them. Nothing is retransmitted, and the connection stays open.
        let r = rules();
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(10, 10, 0, &r, &mut env);
        w.on_fetch(1, 0, 3, 1, &r, &mut env);
        serve(&mut w, &mut env, 10, 1);
        assert_eq!(env.syncs.last(), Some(&(1, 10, 10, 3)), "the position stays; the page ends at 3");
        assert_eq!(env.delivered, vec![1, 2, 3], "that page only");
        for t in 2..40 {
            w.on_ack(10, t, &r, &mut env);
            assert_eq!(w.in_flight(), 0, "the ACK of the position covers what came again");
            w.on_tick(t, &r, &mut env);
            serve(&mut w, &mut env, 10, t);
        }
        assert_eq!(env.closed, None);
        assert_eq!(env.delivered, vec![1, 2, 3], "no retransmit");
        // The client goes on by FETCH to the head, and is live again.
        w.on_fetch(2, 3, 10, 40, &r, &mut env);
        for t in 40..50 {
            serve(&mut w, &mut env, 10, t);
            w.on_ack(10, t, &r, &mut env);
        }
        assert_eq!(env.delivered, (1..=10).collect::<Vec<_>>());
        assert!(w.is_live() && w.is_idle());
    }

    #[test]
    fn a_fetch_after_a_fetch_of_history_writes_only_its_own_page() {
        // The device has 1..=35 (found by a hostile-input probe: after a
        // FETCH from 0, a FETCH after 34 wrote 4..=35 and one after 35 wrote
        // 33..=35). Each FETCH writes (after_seq, page_end], within
        // max_fetch, whatever the FETCH before it asked.
        let r = rules();
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(35, 35, 0, &r, &mut env);
        // Serves reads and ACKs the position (which covers a page of
        // history) until the page is through the window of 4.
        let drain = |w: &mut Window, env: &mut Rec, t: Tick| {
            for _ in 0..20 {
                serve(w, env, 35, t);
                w.on_ack(35, t, &r, env);
            }
            std::mem::take(&mut env.delivered)
        };
        w.on_fetch(1, 0, 3, 1, &r, &mut env);
        assert_eq!(drain(&mut w, &mut env, 1), vec![1, 2, 3]);
        w.on_fetch(2, 34, 100, 2, &r, &mut env);
        assert_eq!(drain(&mut w, &mut env, 2), vec![35], "the page after 34 only");
        assert_eq!(env.syncs.last(), Some(&(2, 35, 35, 35)));
        w.on_fetch(3, 35, 5, 3, &r, &mut env);
        assert_eq!(drain(&mut w, &mut env, 3), Vec::<u64>::new(), "nothing after the head");
        assert_eq!(env.syncs.last(), Some(&(3, 35, 35, 35)));
        // A FETCH past the end of the one before: its own page, capped at
        // max_fetch (10), not everything after the earlier page.
        w.on_fetch(4, 0, 1, 4, &r, &mut env);
        assert_eq!(drain(&mut w, &mut env, 4), vec![1]);
        w.on_fetch(5, 20, 100, 5, &r, &mut env);
        assert_eq!(drain(&mut w, &mut env, 5), (21..=30).collect::<Vec<_>>());
        assert_eq!(env.syncs.last(), Some(&(5, 35, 35, 30)));
        assert_eq!((w.in_flight(), env.closed), (0, None));
    }

    #[test]
    fn a_read_answered_after_an_ack_moved_past_a_fetch_of_history_writes_nothing_beyond_it() {
        // Found by the model (tests/reliable_model.rs) once it fetched
        // history: a read out for after 5, then FETCH(1, 3) (page 2..=4),
        // then the client's ACK of 5 moved `sent` back to 5, so the read's
        // answer looked current while the page ended below it; in a debug
        // build `limit - sent` overflowed.
        let r = WindowRules { window: 2, ..rules() };
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(3, 18, 0, &r, &mut env);
        let (after, n) = env.reads.pop().unwrap();
        w.on_page(&page(after, n, 18), 18, 0, &r, &mut env);
        assert_eq!(env.delivered, vec![4, 5]);
        w.on_ack(4, 1, &r, &mut env);
        assert_eq!(env.reads, vec![(5, 1)], "a read is out for after 5");
        w.on_fetch(1, 1, 3, 1, &r, &mut env);
        assert_eq!(env.syncs.last(), Some(&(1, 4, 18, 4)));
        w.on_ack(5, 2, &r, &mut env);
        let (after, n) = env.reads.remove(0);
        w.on_page(&page(after, n, 18), 18, 2, &r, &mut env);
        serve(&mut w, &mut env, 18, 2);
        // The ACK says the client has everything up to 5, the history
        // page included: nothing more to write until it FETCHes on.
        assert_eq!(env.delivered, vec![4, 5], "nothing past the page's end");
        assert_eq!(env.syncs.last(), Some(&(1, 4, 18, 4)), "no SYNC of its own");
        // The client goes on by FETCH after its position, as usual.
        w.on_fetch(2, 5, 3, 3, &r, &mut env);
        serve(&mut w, &mut env, 18, 3);
        assert_eq!(env.syncs.last(), Some(&(2, 5, 18, 8)));
        assert_eq!(env.delivered, [4, 5, 6, 7, 8]);
    }

    #[test]
    fn fetch_pages_through_the_window_and_goes_live_at_the_head() {
        let r = rules();
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 30, 0, &r, &mut env);
        serve(&mut w, &mut env, 30, 0);
        assert_eq!(env.delivered, vec![1, 2, 3]);
        w.on_fetch(7, 3, 100, 1, &r, &mut env);
        // limit capped at max_fetch = 10; FETCH after 3 acknowledges 3.
        assert_eq!(env.syncs.last(), Some(&(7, 3, 30, 13)));
        assert_eq!(env.saved, vec![3]);
        serve(&mut w, &mut env, 30, 1);
        assert_eq!(env.delivered.len(), 3 + 4, "the window still bounds a page");
        for t in 2..10 {
            let last = *env.delivered.last().unwrap();
            w.on_ack(last, t, &r, &mut env);
            serve(&mut w, &mut env, 30, t);
        }
        assert_eq!(*env.delivered.last().unwrap(), 13, "stops at the page end");
        w.on_fetch(8, 13, 100, 3, &r, &mut env);
        w.on_fetch(9, 23, 100, 3, &r, &mut env);
        assert!(w.is_live());
        assert_eq!(env.syncs.last(), Some(&(9, 23, 30, 30)));
    }

    #[test]
    fn bad_acks_and_fetches_are_errors_and_change_nothing() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 2, 0, &rules(), &mut env);
        w.on_ack(3, 0, &rules(), &mut env);
        w.on_fetch(1, 9, 5, 0, &rules(), &mut env);
        assert_eq!(env.errors, vec![ErrorCode::BadAck, ErrorCode::BadAck]);
        assert_eq!(w.position(), 0);
        assert!(env.saved.is_empty());
    }

    #[test]
    fn expired_seqs_are_skipped() {
        let r = WindowRules { first_page: 10, ..rules() };
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 6, 0, &r, &mut env);
        let (after, _) = env.reads.pop().unwrap();
        // 1..=3 expired: the store returns from 4.
        w.on_page(&[Msg(4, 1), Msg(5, 1)], 6, 0, &r, &mut env);
        assert_eq!(after, 0);
        assert_eq!(env.delivered, vec![4, 5]);
    }

    /// Serves the outstanding reads from an inbox that keeps seqs
    /// `first..=head` (those below `first` expired or were dropped after
    /// every device known then had them), with payloads of `len` bytes.
    /// Fails if the window asks for the same thing again and again.
    fn serve_kept(w: &mut Window, env: &mut Rec, first: u64, head: u64, len: usize, now: Tick) {
        for _ in 0..50 {
            let Some((after, limit)) = env.reads.pop() else { return };
            let kept: Vec<Msg> = (after.max(first - 1) + 1..=head).take(limit as usize).map(|s| Msg(s, len)).collect();
            w.on_page(&kept, head, now, &rules(), env);
        }
        panic!("the window reads the store again and again: {:?}", env.reads);
    }

    #[test]
    fn a_new_device_whose_first_page_was_dropped_starts_at_the_first_kept_seq() {
        // A second device logs in after the first one had 1..=24
        // acknowledged and dropped: its page moves past the gap, and its
        // one SYNC says where the page really ends.
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 30, 0, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 25, 30, 10, 0);
        assert_eq!(env.syncs, vec![(0, 0, 30, 27)], "position 0, head 30, first page 25..=27");
        assert_eq!(env.delivered, vec![25, 26, 27]);
        assert!(!w.is_live());
        w.on_fetch(1, 27, 100, 1, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 25, 30, 10, 1);
        assert_eq!(env.syncs.last(), Some(&(1, 27, 30, 30)));
        assert_eq!(env.delivered, vec![25, 26, 27, 28, 29, 30]);
        assert!(w.is_live());
    }

    #[test]
    fn a_login_page_that_lost_its_first_seqs_is_as_long_from_the_first_kept_one() {
        // Seq 1 was dropped, 2.. kept: the first page (3 messages) starts
        // at 2, as docs/PROTOCOL.md 15.6 says, rather than ending short.
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 30, 0, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 2, 30, 10, 0);
        assert_eq!(env.syncs, vec![(0, 0, 30, 4)], "position 0, head 30, first page 2..=4");
        assert_eq!(env.delivered, vec![2, 3, 4]);
        assert!(!w.is_live());
    }

    #[test]
    fn a_notice_that_came_before_the_login_answer_is_not_lost() {
        // The store read the head (5) for the login; a message stored
        // after that (6) was announced to the connection before the
        // login's answer (a notice forwarded by another node of a
        // cluster). Nothing follows it: the window still pushes it.
        let mut pending = Pending::default();
        pending.on_appended(6);
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(5, pending.head(5), 0, &rules(), &mut env);
        assert_eq!(env.reads, vec![(5, 1)], "read what the notice named");
        serve(&mut w, &mut env, 6, 0);
        assert_eq!(env.syncs, vec![(0, 5, 6, 6)], "the SYNC counts it in the head");
        assert_eq!(env.delivered, vec![6]);
        assert!(w.is_live());
        // Notices of what the login read already change nothing.
        let mut pending = Pending::default();
        pending.on_appended(3);
        let mut env = Rec::default();
        let w = Window::start::<Msg>(5, pending.head(5), 0, &rules(), &mut env);
        assert_eq!(env.syncs, vec![(0, 5, 5, 5)]);
        assert!(env.reads.is_empty() && w.is_idle());
    }

    #[test]
    fn an_ack_of_the_whole_login_page_before_its_sync_still_gets_the_sync() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 10, 0, &rules(), &mut env);
        // The device had 1..=3 from a connection whose ACK was lost.
        w.on_ack(3, 0, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 1, 10, 10, 0);
        assert_eq!(env.syncs, vec![(0, 3, 10, 3)], "position 3, nothing more in this page");
        assert!(env.delivered.is_empty());
        w.on_fetch(1, 3, 100, 1, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 1, 10, 10, 1);
        assert_eq!(env.delivered, vec![4, 5, 6, 7], "a window of 4");
    }

    /// A FETCH that came after the store answered the login but before
    /// the login's SYNC went out (it waits for the first page's read) took
    /// that SYNC's place: the client got a SYNC with the FETCH's req_id
    /// and never the login's (req_id 0), which PROTOCOL.md 15.6 promises
    /// before the first INBOX and whose position 15.8 has a client compare
    /// with its `last_seq`. Found by fuzz/fuzz_targets/conn.rs. As while
    /// the inbox is loading (4.3), it gets ERROR 115 and is not acted on.
    #[test]
    fn a_fetch_before_the_login_sync_is_refused_and_the_login_sync_still_comes() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 10, 0, &rules(), &mut env);
        assert_eq!(env.reads, vec![(0, 3)], "the SYNC waits for this read");
        w.on_fetch(5, 0, 1, 0, &rules(), &mut env);
        assert_eq!(env.errors, vec![ErrorCode::StoreUnavailable]);
        assert!(env.saved.is_empty());
        serve(&mut w, &mut env, 10, 0);
        assert_eq!(env.syncs, vec![(0, 0, 10, 3)], "the login's SYNC, and only it");
        assert_eq!(env.delivered, vec![1, 2, 3]);
        // Once it is out, a FETCH is answered as usual.
        w.on_fetch(6, 3, 2, 1, &rules(), &mut env);
        assert_eq!(env.syncs.last(), Some(&(6, 3, 10, 5)));
    }

    /// The login's first-page read failed (the store's queue was busy),
    /// and the notice of the first message after the position came before
    /// the retry: it was written as INBOX at once, ahead of the login's
    /// SYNC, so a client told by that SYNC to start over (PROTOCOL.md 15.8)
    /// had already dropped it as a duplicate. Found by
    /// fuzz/fuzz_targets/conn.rs. The message now waits for the SYNC.
    #[test]
    fn a_message_stored_while_the_login_sync_waits_on_a_failed_read_comes_after_it() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 1, 0, &rules(), &mut env);
        assert_eq!(env.reads, vec![(0, 1)], "the SYNC waits for this read");
        env.reads.clear();
        w.on_read_failed(0, &rules());
        w.on_appended(&Msg(1, 10), 0, &rules(), &mut env);
        assert!(env.delivered.is_empty(), "nothing before the login's SYNC");
        serve(&mut w, &mut env, 1, 0);
        assert_eq!(env.syncs, vec![(0, 0, 1, 1)]);
        assert_eq!(env.delivered, vec![1]);
    }

    #[test]
    fn a_page_whose_seqs_all_expired_is_announced_again_from_the_next_kept_one() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 10, 0, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 1, 10, 10, 0);
        w.on_ack(3, 1, &rules(), &mut env);
        // Meanwhile 4..=20 expired and the head moved to 30.
        w.on_fetch(5, 3, 5, 2, &rules(), &mut env);
        assert_eq!(env.syncs.last(), Some(&(5, 3, 10, 8)));
        for s in 11..=30 {
            w.on_appended(&Msg(s, 10), 2, &rules(), &mut env);
        }
        serve_kept(&mut w, &mut env, 21, 30, 10, 2);
        assert_eq!(env.syncs.last(), Some(&(5, 3, 30, 25)), "the same FETCH's page, past the gap");
        assert_eq!(env.delivered, vec![1, 2, 3, 21, 22, 23, 24], "a window of 4");
        w.on_ack(24, 3, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 21, 30, 10, 3);
        assert_eq!(*env.delivered.last().unwrap(), 25, "up to the page end");
        assert!(env.reads.is_empty());
    }

    #[test]
    fn a_page_with_everything_up_to_the_head_expired_goes_live() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 10, 0, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 11, 10, 10, 0);
        assert_eq!(env.syncs, vec![(0, 0, 10, 10)]);
        assert!(w.is_live());
        w.on_appended(&Msg(11, 10), 1, &rules(), &mut env);
        assert_eq!(env.delivered, vec![11], "written at once");
        assert!(env.reads.is_empty());
    }

    #[test]
    fn a_message_larger_than_the_bytes_left_waits_for_an_ack_without_reading_again() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 0, 0, &rules(), &mut env);
        w.on_appended(&Msg(1, 400), 0, &rules(), &mut env);
        w.on_appended(&Msg(2, 400), 0, &rules(), &mut env);
        w.on_appended(&Msg(3, 400), 0, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 1, 3, 400, 0);
        assert_eq!(env.delivered, vec![1, 2], "800 of 1000 bytes in flight: 3 does not fit");
        w.on_appended(&Msg(4, 400), 0, &rules(), &mut env);
        assert!(env.reads.is_empty(), "nothing to read until an ACK makes room");
        w.on_ack(1, 1, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 1, 4, 400, 1);
        assert_eq!(env.delivered, vec![1, 2, 3]);
        w.on_ack(3, 2, &rules(), &mut env);
        serve_kept(&mut w, &mut env, 1, 4, 400, 2);
        assert_eq!(env.delivered, vec![1, 2, 3, 4]);
    }

    #[test]
    fn an_idle_window_parks_and_resumes_where_it_was() {
        let mut env = Rec::default();
        let mut w = Window::start::<Msg>(0, 0, 0, &rules(), &mut env);
        assert!(w.is_idle());
        w.on_appended(&Msg(1, 10), 0, &rules(), &mut env);
        assert!(!w.is_idle(), "one in flight");
        w.on_ack(1, 1, &rules(), &mut env);
        assert!(w.is_idle());
        let mut w = Window::resume(w.position());
        w.on_appended(&Msg(2, 10), 2, &rules(), &mut env);
        assert_eq!(env.delivered, vec![1, 2]);
        assert!(env.reads.is_empty());
    }

    /// A model: whatever the interleaving of arrivals, ACKs, retransmit
    /// timers and reads, the client ends with every seq exactly once after
    /// dedup, the connection never writes a seq below one it wrote since
    /// the last rewind, and never more than the window is in flight.
    #[test]
    fn random_interleavings_deliver_everything_once_in_order() {
        let r = WindowRules { first_page: 100, ..rules() };
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _case in 0..300 {
            let mut env = Rec::default();
            let mut head = next() % 5;
            let mut w = Window::start::<Msg>(0, head, 0, &r, &mut env);
            let mut have: u64 = 0; // the client's contiguous prefix
            let mut now: Tick = 0;
            let mut pending: Option<(u64, u32)> = None;
            let mut seen = 0;
            for _step in 0..200 {
                match next() % 6 {
                    0 if head < 40 => {
                        head += 1;
                        w.on_appended(&Msg(head, 10), now, &r, &mut env);
                    }
                    1 => {
                        if pending.is_none() {
                            pending = env.reads.pop();
                        }
                        if let Some((after, limit)) = pending.take() {
                            w.on_page(&page(after, limit, head), head, now, &r, &mut env);
                        }
                    }
                    2 => w.on_ack(have, now, &r, &mut env),
                    3 => {
                        now += 3;
                        w.on_tick(now, &r, &mut env);
                    }
                    _ => {}
                }
                for &s in &env.delivered[seen..] {
                    if s == have + 1 {
                        have = s;
                    }
                }
                seen = env.delivered.len();
                assert!(w.in_flight() <= r.window as usize);
                assert!(env.closed.is_none() || w.in_flight() > 0);
                if env.closed.is_some() {
                    break;
                }
            }
            if env.closed.is_some() {
                continue;
            }
            // Quiesce: ACK and serve reads until nothing moves.
            for _ in 0..200 {
                w.on_ack(have, now, &r, &mut env);
                if let Some((after, limit)) = env.reads.pop() {
                    w.on_page(&page(after, limit, head), head, now, &r, &mut env);
                }
                for &s in &env.delivered[seen..] {
                    if s == have + 1 {
                        have = s;
                    }
                }
                seen = env.delivered.len();
            }
            assert_eq!(have, head, "everything arrived");
            assert_eq!(w.position(), head);
        }
    }

    #[test]
    fn a_later_login_of_the_same_device_replaces_a_connection_and_nothing_else_does() {
        let phone = DeviceLogin { device: "phone".into(), number: 7, at_ms: 0 };
        assert!(phone.replaced_by("phone", 8), "the device logged in again");
        assert!(!phone.replaced_by("phone", 7), "its own login: it keeps itself");
        assert!(!phone.replaced_by("phone", 6), "an older login, heard late, loses to this one");
        assert!(!phone.replaced_by("laptop", 8), "another device of the user");
        assert!(!phone.replaced_by("phone2", 8), "a device id that only starts the same");
        assert!(!phone.replaced_by("phon", 8));
        // Two logins of one device at once: whichever order the notices
        // cross in, exactly one connection stays.
        let (a, b) = (
            DeviceLogin { device: "d".into(), number: 10, at_ms: 0 },
            DeviceLogin { device: "d".into(), number: 11, at_ms: 0 },
        );
        assert!(a.replaced_by(&b.device, b.number));
        assert!(!b.replaced_by(&a.device, a.number));
    }

    /// Between nodes: the later login on the cluster's clock wins, a tie
    /// goes to the greater node id, and of two logins on two nodes,
    /// whichever notice arrives first, exactly one side closes: the older
    /// one's node on the later one's notice, and the later one's node
    /// answers the older one's notice by telling that node (Some(false)).
    #[test]
    fn between_nodes_exactly_one_of_two_logins_of_a_device_stays() {
        let ghost = DeviceLogin { device: "phone".into(), number: 900, at_ms: 1_000 };
        assert_eq!(ghost.replaced_from("phone", 61_000, "b", "a"), Some(true), "logged in again a minute later on B");
        assert_eq!(ghost.replaced_from("laptop", 61_000, "b", "a"), None, "another device");
        assert_eq!(ghost.replaced_from("phone2", 61_000, "b", "a"), None);
        // A notice from an older login elsewhere, heard late: this one stays
        // and the other node is to close its own.
        assert_eq!(ghost.replaced_from("phone", 999, "b", "a"), Some(false));
        for (at_a, at_b) in [(5, 5), (5, 6), (6, 5), (0, u64::MAX)] {
            let on_a = DeviceLogin { device: "d".into(), number: 1, at_ms: at_a };
            let on_b = DeviceLogin { device: "d".into(), number: 1, at_ms: at_b };
            let a_goes = on_a.replaced_from("d", at_b, "b", "a").unwrap();
            let b_goes = on_b.replaced_from("d", at_a, "a", "b").unwrap();
            assert!(a_goes != b_goes, "at {at_a} on A and {at_b} on B: exactly one goes");
            assert_eq!(a_goes, (at_a, "a") < (at_b, "b"));
        }
    }
}
