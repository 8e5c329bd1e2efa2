//! The runtime's side of the store thread: what a request's answer is for,
//! and where it goes.
//!
//! Owns: [`Token`] (what the runtime attaches to each store request), the
//! [`Sink`] that runs on the store thread and turns answers into worker
//! mailbox commands (or hands them to a waiting handle), and the routing
//! of a newly stored message to the recipient's connections.
//! Must not: block (it runs on the store thread between batches; a full
//! mailbox drops the notice: the message is in the store, and a device
//! connection gets it from there), or touch a connection's state (only its
//! worker does, on the command).

use std::cell::Cell;
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
}

impl StoreSink {
    pub(crate) fn new(shared: Arc<Shared>) -> StoreSink {
        let unwoken = (0..shared.mailboxes.len()).map(|_| Cell::new(false)).collect();
        StoreSink { shared, unwoken }
    }

    /// Queues `cmd` in `mb` (worker `index`'s), to be woken at the flush.
    fn queue(&self, index: usize, mb: &Mailbox<Command>, cmd: Command) -> bool {
        let queued = mb.push_unwoken(cmd).is_ok();
        if queued {
            self.unwoken[index].set(true);
        }
        queued
    }

    fn post(&self, conn: ConnId, cmd: Command) -> bool {
        let index = conn.worker().0 as usize;
        self.shared.mailboxes.get(index).is_some_and(|mb| self.queue(index, mb, cmd))
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
        for (woken, mb) in self.unwoken.iter().zip(self.shared.mailboxes.iter()) {
            if woken.replace(false) {
                mb.wake();
            }
        }
    }

    fn done(&self, token: Token, result: Done) {
        match (token, result) {
            (Token::Append { msg, reply }, Done::Appended(r)) => {
                let outcome = r.map(|a| match a {
                    Appended::New { seq } => {
                        let stored = StoredMessage {
                            seq,
                            msg_id: msg.msg_id,
                            ts_ms: msg.ts_ms,
                            from: msg.from.clone(),
                            payload: msg.payload.clone(),
                        };
                        let delivered = self.route(&msg.to, stored);
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
                        let durability = self.shared.store_durability;
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
