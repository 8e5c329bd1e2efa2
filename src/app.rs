//! The data the embedding API exchanges with an application: a client's
//! message for it, what a push or publish did, and why something failed.
//!
//! Owns: plain types, no behaviour. `server.rs` (the API) and the runtime
//! both use them; `server.rs` re-exports them, so `switchboard::server::X`
//! and `switchboard::X` name them as before.
//! Must not: depend on the runtime or the server.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::config::ConfigError;
use crate::ids::ConnId;
use crate::rooms::RoomError;

/// A message from a client that the server does not route itself.
#[derive(Clone, Debug)]
pub struct ClientMessage {
    /// The connection it came from.
    pub conn: ConnId,
    /// The logged-in user who sent it.
    pub user: Arc<str>,
    /// What kind of frame carried it.
    pub kind: ClientMessageKind,
    /// The client's request id (0 = none).
    pub req_id: u32,
    /// The payload, copied out of the read buffer.
    pub payload: Bytes,
}

/// Which frame carried a [`ClientMessage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessageKind {
    /// A MESSAGE frame: always for the application.
    Message,
    /// A SEND to `to`, passed to the application because `routing.client_send`
    /// is off.
    Send { to: String },
}

/// What one worker measured for `Handle::bench_send_ceiling`.
#[doc(hidden)]
#[derive(Copy, Clone, Debug)]
pub struct CeilingSample {
    /// Sockets written to.
    pub sends: usize,
    /// Wall time of the loop.
    pub elapsed: std::time::Duration,
}

/// Why a push, kick or other handle call did not go through.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PushError {
    #[error("user id must be 1 to 255 bytes")]
    InvalidUser,
    #[error("device id must be 1 to 64 bytes")]
    InvalidDevice,
    #[error("payload of {len} bytes is over the limit of {max} (limits.max_frame_bytes less the header of the frame that carries it: PUSH, INBOX for a reliable push, ROOM_MSG for a room or a broadcast)")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("a worker mailbox is full; {queued} of {targets} connections got the command")]
    Full { queued: usize, targets: usize },
    #[error("this server has no message store (store.kind = \"none\"): reliable pushes, inboxes and devices need one; at-most-once pushes work")]
    NoStore,
    #[error("the message store's queue is full (store.queue_capacity or store.queue_max_bytes); the message was not stored, retry")]
    StoreBusy,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Room(#[from] RoomError),
}

/// Outcome of a push to a user.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// The id carried in the PUSH frame (unique per server run).
    pub msg_id: u64,
    /// Connections the push was queued for (0: the user is offline).
    pub connections: usize,
}

/// Outcome of a reliable push once the store has it (`Handle::push`,
/// `Handle::push_reliable`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The message's seq in the user's inbox.
    pub seq: u64,
    /// The id carried in its INBOX and PUSH frames.
    pub msg_id: u64,
    /// Already stored by an earlier push with the same idempotency key:
    /// `seq` and `msg_id` are that push's.
    pub duplicate: bool,
    /// Connections of the user online when it was stored (0: it waits in
    /// the inbox).
    pub connections: usize,
    /// What survives the message now: `Some(Fsync)`: a crash of the
    /// process or of the machine; `Some(Os)`: a crash of the process;
    /// `None`: nothing (the memory store, or an at-most-once push). With
    /// the Redis store, of the Redis process or host, as its masters'
    /// `appendonly`/`appendfsync` say (read again at every reconnect and
    /// every 5 s; `None` without an AOF or when `CONFIG GET` is refused).
    pub durability: Option<crate::store::Durability>,
}

/// Options of a reliable push ([`crate::Handle::push_reliable_with`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReliablePush {
    /// The idempotency key: a push with the same non-zero key to the same
    /// user within `delivery.dedup_window_ms` is stored once. 0 = none.
    pub client_id: u64,
    /// The message expires this long after it is stored: from then on it
    /// is not delivered to a device that did not have it yet (one
    /// connected when it is stored gets it at once). Cut to whole
    /// milliseconds (at least 1); one longer than `u64::MAX` milliseconds
    /// is that long. `None`: only `store.ttl_ms` applies.
    pub ttl: Option<std::time::Duration>,
}

/// Outcome of a room publish or a broadcast.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The id carried in the ROOM_MSG frame.
    pub msg_id: u64,
    /// Workers the message was posted to (each fans it out to its members).
    pub workers: usize,
}

/// Why a running server stopped on its own, as `Server::join` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ServerError {
    /// A worker thread panicked (a bug). Its connections were cut off (each
    /// client saw its connection end) and the other workers shut down
    /// gracefully.
    #[error("worker {worker} died: {message}")]
    WorkerDied { worker: usize, message: String },
}

/// Why the server did not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Limits(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("worker {worker} failed to start: {message}")]
    Worker { worker: usize, message: String },
    /// The message store (`[store]`) could not be opened, e.g. its
    /// directory is not writable or another server holds it.
    #[error("cannot open the message store at {path}: {message}")]
    Store { path: String, message: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
