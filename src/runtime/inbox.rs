//! The runtime's side of the store thread: what a request's answer is for,
//! and where it goes.
//!
//! Owns: [`Token`] (what the runtime attaches to each store request), the
//! [`Sink`] that runs on the store thread and turns answers into worker
//! mailbox commands (or hands them to a waiting handle), and the routing
//! of a newly stored message to the recipient's connections.
//! Must not: block (it runs on the store thread between batches), drop
//! an answer or a device's notice (what a full mailbox refuses is held
//! here and offered again: [`StoreSink`]), or touch a connection's state
//! (only its worker does, on the command).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use super::shared::{Command, Shared};
use crate::app::Receipt;
use crate::ids::ConnId;
use crate::mailbox::Mailbox;
use crate::store::{Appended, Done, InboxState, NewMessage, Page, Sink, StoreError, StoredMessage};

/// Who waits for an append's outcome.
pub(crate) enum Reply {
    /// A client's SEND (`ex`: SEND_EX, answered with SEND_RESULT) on this
    /// connection; `req_id` 0 wants no answer unless it failed.
    Client { conn: ConnId, req_id: u32, ex: bool },
    /// An application push through the handle.
    Handle(SyncSender<Result<Receipt, StoreError>>),
}

/// What a store request's answer is for.
pub(crate) enum Token {
    Append {
        msg: NewMessage,
        reply: Reply,
    },
    /// A device logged in on this connection.
    Login {
        conn: ConnId,
    },
    /// A connection's window asked for a page.
    Read {
        conn: ConnId,
    },
    /// A device position; nothing waits for it.
    Position,
    /// An inbox's state, for the handle.
    State(SyncSender<Result<InboxState, StoreError>>),
    /// A device forgotten, for the handle: whether it was known.
    ForgetDevice(SyncSender<Result<bool, StoreError>>),
}

/// What the sender of an append learns.
#[derive(Clone, Debug)]
pub(crate) struct AppendOutcome {
    pub seq: u64,
    pub msg_id: u64,
    pub duplicate: bool,
    /// Connections of the recipient the message was handed to.
    pub delivered: u32,
}

/// The outcome of `conn`'s SEND (`ex`: SEND_EX) that went to the store.
pub(crate) struct SendDone {
    pub conn: ConnId,
    pub req_id: u32,
    pub ex: bool,
    pub outcome: Result<AppendOutcome, StoreError>,
}

/// The store thread's answers, into the workers' mailboxes.
///
/// A full mailbox (`limits.mailbox_capacity`) does not lose them: what it
/// refuses is held, per worker, and offered again at each flush, the
/// thread coming back within [`crate::store::service::HELD_RETRY`]
/// while anything is held. Once
/// something is held for a worker, everything after it for that worker
/// waits behind it, so the worker still sees the store's order (a login's
/// answer before the notices of what was stored after it, which the
/// window counts on). What is held is bounded: answers, at most one per
/// request the worker's connections have out (a login, a page, a SEND,
/// and a worker that does not drain sends no new ones); and notices,
/// folded into one per connection with the highest seq
/// ([`Command::Missed`]: the window reads that far from the store; a
/// plain connection's at-most-once PUSH is not held). One store turn can
/// answer more than a mailbox holds (thousands of logins or SENDs at
/// once); a lost login answer left its device without a SYNC for good,
/// a lost page left its window waiting, and a lost notice left a
/// caught-up device without the message until the next one came.
///
/// Commands are queued without a wake, and each worker that got one is
/// woken once, at [`Sink::flush`] after the batch's answers. Woken one
/// answer at a time, a worker took the store thread's CPU in the middle of
/// a batch whenever the host was busy: at 40,000 reliable msgs/s (`os`,
/// 4,000 devices, 2 workers) the store thread was preempted on leaving the
/// eventfd `write` about 45 times a second (`perf record -e
/// sched:sched_switch` on it), and every answer behind in the batch
/// waited for the worker's time slice.
pub(crate) struct StoreSink {
    shared: Arc<Shared>,
    /// Workers with a command queued since the last flush.
    unwoken: Box<[Cell<bool>]>,
    /// Per worker, what its full mailbox refused (see above).
    held: Box<[RefCell<Held>]>,
}

/// What one worker's mailbox refused, in the order to offer it again
/// (the store sink's, and the cluster thread's for the notices other
/// nodes send).
#[derive(Default)]
pub(crate) struct Held {
    /// Answers, oldest first.
    answers: VecDeque<Command>,
    /// Connections that missed notices, with the highest seq missed;
    /// offered after the answers.
    missed: HashMap<ConnId, u64>,
}

impl Held {
    pub(crate) fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.missed.is_empty()
    }

    /// Keeps `cmd`, refused by a full mailbox (or behind what was): a
    /// message's notice folded into its connection's `Missed`.
    pub(crate) fn keep(&mut self, cmd: Command) {
        match cmd {
            Command::Stored { conn, msg } => {
                let seq = self.missed.entry(conn).or_default();
                *seq = (*seq).max(msg.seq);
            }
            Command::Missed { conn, seq: missed } => {
                let seq = self.missed.entry(conn).or_default();
                *seq = (*seq).max(missed);
            }
            cmd => self.answers.push_back(cmd),
        }
    }

    /// Offers what is held to `mb` again, in order, as much as it takes
    /// now, without a wake; whether it took anything (the caller wakes
    /// the worker then).
    pub(crate) fn release(&mut self, mb: &Mailbox<Command>) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut moved = false;
        while let Some(cmd) = self.answers.pop_front() {
            match mb.offer_again_unwoken(cmd) {
                Ok(()) => moved = true,
                Err(cmd) => {
                    self.answers.push_front(cmd);
                    return moved;
                }
            }
        }
        let mut full = false;
        self.missed.retain(|&conn, &mut seq| {
            full = full || mb.offer_again_unwoken(Command::Missed { conn, seq }).is_err();
            moved |= !full;
            full
        });
        moved
    }
}

impl StoreSink {
    pub(crate) fn new(shared: Arc<Shared>) -> StoreSink {
        let unwoken = (0..shared.mailboxes.len()).map(|_| Cell::new(false)).collect();
        let held = (0..shared.mailboxes.len()).map(|_| RefCell::default()).collect();
        StoreSink { shared, unwoken, held }
    }

    /// Queues `cmd` in `mb` (worker `index`'s), to be woken at the flush,
    /// or holds it (see above). True either way: a message's notice
    /// counts its connection as delivered to (a plain connection's, if
    /// held, is folded into a `Missed` its worker does nothing with: at
    /// most once).
    fn queue(&self, index: usize, mb: &Mailbox<Command>, cmd: Command) -> bool {
        let mut held = self.held[index].borrow_mut();
        let cmd = if held.is_empty() {
            match mb.offer_unwoken(cmd) {
                Ok(()) => {
                    self.unwoken[index].set(true);
                    return true;
                }
                Err(cmd) => cmd,
            }
        } else {
            cmd
        };
        held.keep(cmd);
        true
    }

    fn post(&self, conn: ConnId, cmd: Command) -> bool {
        let index = conn.worker().0 as usize;
        self.shared.mailboxes.get(index).is_some_and(|mb| self.queue(index, mb, cmd))
    }

    /// Offers worker `index`'s held commands again, in order, as many as
    /// its mailbox takes now.
    fn release(&self, index: usize, mb: &Mailbox<Command>) {
        if self.held[index].borrow_mut().release(mb) {
            self.unwoken[index].set(true);
        }
    }

    /// A new message for `to`: a notice to each of its connections'
    /// workers here, and to the other nodes holding its connections.
    /// Returns how many connections here took it.
    fn route(&self, to: &Arc<str>, msg: StoredMessage) -> u32 {
        let msg = Arc::new(msg);
        self.shared.to_cluster(|| crate::cluster::Event::Stored { user: to.clone(), msg: msg.clone() });
        self.shared.route_stored_by(to, &msg, |index, mb, cmd| self.queue(index, mb, cmd))
    }
}

impl Sink<Token> for StoreSink {
    fn flush(&self) {
        for (index, mb) in self.shared.mailboxes.iter().enumerate() {
            self.release(index, mb);
        }
        for (woken, mb) in self.unwoken.iter().zip(self.shared.mailboxes.iter()) {
            if woken.replace(false) {
                mb.wake();
            }
        }
    }

    fn held_back(&self) -> bool {
        self.held.iter().any(|h| !h.borrow().is_empty())
    }

    fn done(&self, token: Token, result: Done) {
        match (token, result) {
            (Token::Append { msg, reply }, Done::Appended(r)) => {
                let outcome = r.map(|a| match a {
                    Appended::New { seq } => {
                        let delivered = self.route(&msg.to, StoredMessage::of(seq, &msg));
                        AppendOutcome { seq, msg_id: msg.msg_id, duplicate: false, delivered }
                    }
                    Appended::Duplicate { seq, msg_id } => AppendOutcome { seq, msg_id, duplicate: true, delivered: 0 },
                });
                match reply {
                    Reply::Client { conn, req_id, ex } => {
                        if req_id != 0 || outcome.is_err() {
                            self.post(conn, Command::SendDone(Box::new(SendDone { conn, req_id, ex, outcome })));
                        }
                    }
                    Reply::Handle(tx) => {
                        let durability = self.shared.store.get().and_then(|s| s.counters().durability());
                        let _ = tx.try_send(outcome.map(|o| Receipt {
                            seq: o.seq,
                            msg_id: o.msg_id,
                            duplicate: o.duplicate,
                            connections: o.delivered as usize,
                            durability,
                        }));
                    }
                }
            }
            (Token::Login { conn }, Done::DeviceLogin(r)) => {
                self.post(conn, Command::DeviceReady { conn, result: r.map_err(Box::new) });
            }
            (Token::Read { conn }, Done::Read(r)) => {
                self.post(conn, Command::Page { conn, result: Box::new(r) });
            }
            (Token::Position, Done::Position(r)) => {
                if let Err(e) = r {
                    tracing::warn!("a device position was not saved: {e}");
                }
            }
            (Token::State(tx), Done::State(r)) => {
                let _ = tx.try_send(r);
            }
            (Token::ForgetDevice(tx), Done::ForgetDevice(r)) => {
                let _ = tx.try_send(r);
            }
            _ => debug_assert!(false, "a store answer of the wrong kind for its token"),
        }
    }
}

/// A page's worth of messages, as the window wants them.
pub(crate) type PageResult = Result<Page, StoreError>;

impl crate::proto::reliable::Item for StoredMessage {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn payload_len(&self) -> usize {
        self.payload.len()
    }
}
