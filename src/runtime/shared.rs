//! What the workers and the handles share, and what crosses into a worker.
//!
//! Owns: `Shared` (configuration, mailboxes, directory, room registry, the
//! write slots, counters, the lifecycle flags) and `Command`, the messages
//! a worker's mailbox carries.
//! Must not: hold per-connection protocol state (that is `proto::conn`) or
//! anything a worker changes without a lock or an atomic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::app::{CeilingSample, ClientMessage, PushError, ServerError};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::directory::Directory;
use crate::ids::ConnId;
use crate::mailbox::Mailbox;
use crate::proto::codes::CloseCode;
use crate::proto::session::Timeouts;
use crate::rooms::RoomRegistry;
use crate::stats::CounterTable;

/// A command posted to a worker's mailbox.
pub(crate) enum Command {
    /// Close one connection with a code.
    Close { conn: ConnId, code: CloseCode },
    /// Join a connection to a room on the application's behalf.
    Join { conn: ConnId, room: Arc<str> },
    /// Take a connection out of a room on the application's behalf.
    Leave { conn: ConnId, room: Arc<str> },
    /// Fan an encoded ROOM_MSG out to this worker's members of `room`.
    /// `accepted_ns`: when it was accepted (`Shared::since_epoch_ns`), for
    /// the push-to-written latency.
    Publish { room: Arc<str>, frame: Bytes, accepted_ns: u64 },
    /// Fan an encoded ROOM_MSG out to every logged-in connection of this
    /// worker.
    Broadcast { frame: Bytes, accepted_ns: u64 },
    /// Benchmark only: a plain blocking `send` of `frame` to each of this
    /// worker's members of `room`, timed; the kernel's floor for a fan-out
    /// over the same sockets.
    SendCeiling { room: Arc<str>, frame: Bytes, reply: std::sync::mpsc::Sender<CeilingSample> },
    /// Serve a connection another worker accepted but had no room for.
    Adopt { fd: std::os::fd::OwnedFd, websocket: bool },
    /// Tests of the supervision path only: panic in the worker.
    Crash,
    /// A message was stored in the inbox of `conn`'s user (shared by the
    /// notices to each of its connections).
    Stored { conn: ConnId, msg: Arc<crate::store::StoredMessage> },
    /// The outcome of a SEND or SEND_EX that went to the store.
    SendDone(Box<super::inbox::SendDone>),
    /// The store's answer to `conn`'s device login: (position, head).
    DeviceReady { conn: ConnId, result: Result<(u64, u64), Box<crate::store::StoreError>> },
    /// A page for `conn`'s window.
    Page { conn: ConnId, result: Box<super::inbox::PageResult> },
    /// Messages up to `seq` were stored in the inbox of `conn`'s user, and
    /// their notices ([`Command::Stored`]) found the mailbox full: the
    /// store thread held them back and folded them into this one.
    Missed { conn: ConnId, seq: u64 },
    /// The store lost its data (a Redis restarted without its AOF): close
    /// every device connection, keeping none of their positions, so that
    /// each logs in again and learns it (PROTOCOL.md 15.8).
    StoreReset,
    /// `device` of `conn`'s user logged in on another connection: close
    /// `conn` if it is a connection of that device that logged in before
    /// (CLOSE 4008). `from: None`: on this server, the `login`-th device
    /// login; `Some(node)`: on that node of the cluster, at `login` ms of
    /// the cluster's clock (`DeviceLogin::replaced_from`).
    Replaced { conn: ConnId, device: Arc<str>, login: u64, from: Option<Arc<str>> },
}

// Mailboxes hold `limits.mailbox_capacity` commands each, allocated at
// start: the large payloads ride in boxes.
const _: () = assert!(std::mem::size_of::<Command>() <= 64);

/// State shared by every worker and handle.
pub(crate) struct Shared {
    pub config: Config,
    pub timeouts: Timeouts,
    pub max_conns_per_worker: usize,
    pub mailboxes: Box<[Mailbox<Command>]>,
    pub directory: Directory,
    pub rooms: RoomRegistry,
    /// Every connection's write side, per worker.
    pub outs: Box<[super::write::OutSlots]>,
    pub write_rules: super::write::WriteRules,
    /// Counters bumped by threads that do not own the connection: one
    /// single-writer block per such thread (`stats::ForeignCounters`).
    pub foreign_counters: crate::stats::ForeignCounters,
    pub counters: CounterTable,
    pub authenticator: Arc<dyn Authenticator>,
    pub hook: Option<MessageHook>,
    pub shutdown: AtomicBool,
    /// A graceful drain was requested (`Handle::drain`).
    pub draining: AtomicBool,
    /// Message ids for pushes from handles; workers number their own with
    /// the worker index in the top bits (see `Worker::next_msg_id`).
    pub next_msg_id: AtomicU64,
    /// Device logins numbered in order, over all workers: of two
    /// connections of one device, the later login replaces the other
    /// (`Worker::device_login`).
    pub device_logins: AtomicU64,
    pub local_addr: SocketAddr,
    /// The WebSocket address, when `websocket.listen` is set.
    pub ws_addr: Option<SocketAddr>,
    pub epoch: Instant,
    /// The first worker that died, if one did: the server then stops, and
    /// `Server::join` returns it.
    pub failure: std::sync::Mutex<Option<ServerError>>,
    /// The store thread's queue, when `store.kind` is not `none` (set once
    /// at start, before the workers run).
    pub store: std::sync::OnceLock<crate::store::Submitter<super::inbox::Token>>,
    /// The queue to the `sb-cluster` thread, when `cluster.redis` is set
    /// (set once at start, before the workers run).
    pub cluster: std::sync::OnceLock<crate::cluster::Link>,
    /// The store is the application's own (`ServerBuilder::custom_store`):
    /// `store.kind`, `store.path` and the store's limits in the config do
    /// not describe it.
    pub custom_store: bool,
    /// The users' send budgets below full (`limits.send_rate`), shared by
    /// a user's connections on every worker.
    pub budgets: super::budgets::Budgets,
}

impl Shared {
    /// Nanoseconds since the server started (`epoch`): a timestamp that
    /// fits a `u64` in a mailbox command.
    pub(crate) fn since_epoch_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Hands `ev` to the cluster thread (nothing without a cluster). Never
    /// blocks; a full queue refuses it (counted in `ClusterCounters`).
    #[inline]
    pub(crate) fn to_cluster(&self, ev: impl FnOnce() -> crate::cluster::Event) {
        if let Some(link) = self.cluster.get() {
            link.send(ev());
        }
    }

    /// Whether this node is part of a cluster.
    #[inline]
    pub(crate) fn clustered(&self) -> bool {
        self.cluster.get().is_some()
    }

    /// Posts `make(conn)` to the owner of each connection of `user` on
    /// this node. Returns (queued, connections).
    pub(crate) fn post_to_user(&self, user: &str, mut make: impl FnMut(ConnId) -> Command) -> (usize, usize) {
        let conns = self.directory.lookup(user);
        let mut queued = 0;
        for &c in &conns {
            if self.mailboxes[c.worker().0 as usize].push(make(c)).is_ok() {
                queued += 1;
            }
        }
        (queued, conns.len())
    }

    /// A message stored in `to`'s inbox: a notice to the worker of each of
    /// its connections on this node, through `post` (the worker's index,
    /// its mailbox, the notice), which says whether the connection counts
    /// as delivered to. Both callers hold what a full mailbox refuses:
    /// the store thread's sink (`inbox::StoreSink`, which also queues
    /// without waking and wakes once per batch) and the cluster thread,
    /// for messages other nodes stored.
    pub(crate) fn route_stored_by(
        &self,
        to: &str,
        msg: &Arc<crate::store::StoredMessage>,
        mut post: impl FnMut(usize, &Mailbox<Command>, Command) -> bool,
    ) -> u32 {
        let conns = self.directory.lookup(to);
        let mut delivered = 0;
        for &conn in conns.iter() {
            let index = conn.worker().0 as usize;
            delivered += u32::from(post(index, &self.mailboxes[index], Command::Stored { conn, msg: msg.clone() }));
        }
        delivered
    }

    /// Asks every worker to shut down (see `Handle::shutdown`).
    pub(crate) fn request_shutdown(&self) {
        if !self.shutdown.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tracing::info!("shutdown requested");
        }
        for mb in self.mailboxes.iter() {
            mb.wake();
        }
    }

    /// Largest payload of a message that goes to the store: its INBOX
    /// frame from `from` fits `limits.max_frame_bytes`.
    pub(crate) fn max_inbox_payload(&self, from: &str) -> usize {
        crate::proto::frame::max_inbox_payload(self.config.limits.max_frame_bytes, from)
    }

    /// Whether a SEND or push that does not choose is stored.
    pub(crate) fn reliable_by_default(&self) -> bool {
        self.store.get().is_some() && self.config.delivery.send_default == crate::config::SendDefault::Reliable
    }

    /// Largest PUSH payload: frames from the server are never longer than
    /// `limits.max_frame_bytes`, the size LOGIN_OK announces, so a client
    /// can use one limit both ways.
    pub(crate) fn max_push_payload(&self) -> usize {
        self.config.limits.max_frame_bytes - crate::proto::frame::HEADER_LEN - 8 - 1
    }

    /// Largest ROOM_MSG payload for `room` and sender `from`, by the same
    /// rule as [`Shared::max_push_payload`].
    pub(crate) fn max_room_payload(&self, room: &str, from: &str) -> usize {
        (self.config.limits.max_frame_bytes - crate::proto::frame::HEADER_LEN - 8 - 2)
            .saturating_sub(room.len() + from.len())
    }

    /// Posts `make(frame)` to every worker: the first gets `frame`, the
    /// others a copy each, so workers never share a reference count while
    /// they fan out. Returns how many workers took it.
    pub(crate) fn post_all(&self, frame: Bytes, make: impl Fn(Bytes) -> Command) -> Result<usize, PushError> {
        let n = self.mailboxes.len();
        let mut queued = 0;
        for (i, mb) in self.mailboxes.iter().enumerate() {
            let f = if i + 1 == n { frame.clone() } else { Bytes::copy_from_slice(&frame) };
            if mb.push(make(f)).is_ok() {
                queued += 1;
            }
        }
        if queued < n {
            return Err(PushError::Full { queued, targets: n });
        }
        Ok(queued)
    }
}

/// Receives client messages on the worker thread that owns the connection.
/// It must return quickly: it runs between two reads of that worker's
/// sockets. It may call any [`Handle`] method.
pub type MessageHook = Arc<dyn Fn(ClientMessage, &Handle) + Send + Sync>;

/// The cloneable entry point for pushing from any thread. Its methods are
/// the embedding API, in `server.rs`; the type lives here because the
/// runtime hands it to the application's hook.
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}
