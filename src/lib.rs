//! Switchboard: a connection server and push tier on io_uring.
//!
//! Holds many mostly idle client connections per host, keeps them alive with
//! heartbeats, and delivers messages to a user within milliseconds. Embed it:
//!
//! ```no_run
//! use switchboard::Server;
//!
//! let server = Server::builder()
//!     .listen("127.0.0.1:7700")
//!     .jwt_secret("a secret of at least 16 bytes")
//!     // The inboxes of reliable delivery; without this line, the
//!     // directory `switchboard-data` in the working directory.
//!     .data_dir("/var/lib/myapp/inboxes")
//!     .start()
//!     .expect("server starts");
//! let handle = server.handle(); // Clone + Send + Sync
//! std::thread::spawn(move || {
//!     let _ = handle.push_to_user("alice", b"hello");
//! });
//! ```
//!
//! Layers: `proto` is the sans-IO protocol (codec, session state machine);
//! `runtime` is the only module that imports monoio; `server` is the
//! embedding API; `client` is a small blocking client for tools and tests;
//! `sync` holds the lock-free primitives that `tests/loom-models/` model-checks;
//! `store` keeps the per-user inboxes of reliable delivery, on a thread of
//! its own (never a worker).

pub mod admin;
mod app;
pub mod auth;
pub mod authlog;
pub mod client;
pub mod cluster;
pub mod config;
mod demo;
pub mod directory;
pub mod ids;
pub mod limits;
pub mod mailbox;
pub mod metrics;
pub mod outq;
pub mod portholder;
pub mod proto;
#[doc(hidden)]
pub mod redis_proc;
pub mod rooms;
mod runtime;
pub mod server;
pub mod stats;
pub mod store;
mod sync;
pub mod timed;
pub mod wheel;

pub use auth::{AuthError, Authenticator, JwtHs256};
pub use config::{Config, StoreKind};
pub use ids::{ConnId, WorkerId};
pub use mailbox::Full;
pub use proto::codes::{CloseCode, ErrorCode, LoginErrorCode};
pub use runtime::DriverKind;
pub use server::{
    ClientMessage, ClientMessageKind, Handle, InboxStateError, MessageHook, PendingAnswer, PendingForget,
    PendingInboxState, PendingPush, Published, PushError, Pushed, Receipt, ReliablePush, Server, ServerBuilder,
    ServerError, StartError,
};
pub use stats::Stats;
pub use store::{Durability, Store};
