//! Server configuration: the TOML schema, its defaults and its validation.
//!
//! Owns: every tunable, its default, its memory cost (in the doc comment) and
//! the checks that reject a bad value with the key's full name.
//! Must not: touch the system (the start-up checks against kernel limits live
//! in `limits.rs`) or keep anything at run time but plain values.
//!
//! Every field has a default, so an empty file (or none) is a valid config.
//! Unknown keys are errors, so a typo is reported instead of ignored.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{MAX_SLOTS_PER_WORKER, MAX_WORKERS};
use crate::proto::frame::{MIN_MAX_FRAME_BYTES, PROTOCOL_MAX_FRAME_BYTES};
use crate::proto::session::Timeouts;
use crate::store::{Durability, StoreLimits};

/// The development secret used when none is configured. Anyone can mint
/// tokens with it, so the server refuses to use it on a non-loopback address.
pub const DEV_JWT_SECRET: &str = "switchboard-dev-secret-do-not-use-in-production";

/// Shortest JWT secret accepted (other than the development one).
pub const MIN_JWT_SECRET_BYTES: usize = 16;

/// Checks a JWT secret as the server does at start: the development secret
/// (loopback only, checked with the addresses), or at least
/// [`MIN_JWT_SECRET_BYTES`]. `switchboard token` applies it too, so it never
/// mints a token the server would refuse to check.
pub fn check_jwt_secret(secret: &str) -> Result<(), ConfigError> {
    if secret != DEV_JWT_SECRET && secret.len() < MIN_JWT_SECRET_BYTES {
        return Err(invalid(
            "auth.jwt_secret",
            format!("(or {JWT_SECRET_ENV}) must be at least {MIN_JWT_SECRET_BYTES} bytes, is {}", secret.len()),
        ));
    }
    Ok(())
}

/// Shortest `admin.token` accepted.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// Environment variable with the JWT secret, used when `auth.jwt_secret`
/// is not set (the configuration file's value wins).
pub const JWT_SECRET_ENV: &str = "SWITCHBOARD_JWT_SECRET";

/// A configuration that cannot run, naming the key at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config: `{key}` {message}")]
    Invalid { key: &'static str, message: String },
}

/// The longest timeout in milliseconds (`[timeouts]`,
/// `delivery.ack_timeout_ms`): 32 bits, about 49.7 days. The wheel counts
/// ticks in a `u32` and compares them wrapping, so a deadline must stay
/// below a quarter of its range (`Config::timeouts_in_ticks`); at the
/// shortest tick (10 ms) this bound is 0.4 of that.
pub const MAX_TIMEOUT_MS: u64 = u32::MAX as u64;
const _: () = assert!(MAX_TIMEOUT_MS / 10 + 2 <= u32::MAX as u64 / 4);
/// The largest `auth.jwt_leeway_s`: a day of clock skew. More would make a
/// token's `exp` mean little (an expired token accepted for as long).
pub const MAX_JWT_LEEWAY_S: u64 = 86_400;

/// A key that takes one of a few names (`demo_page = "auto"`): its
/// values, in the order the README gives them.
trait Named: Sized + Copy + 'static {
    const NAMES: &'static [&'static str];
    const VALUES: &'static [Self];
}

macro_rules! named {
    ($t:ty { $($name:literal => $v:expr),+ $(,)? }) => {
        impl Named for $t {
            const NAMES: &'static [&'static str] = &[$($name),+];
            const VALUES: &'static [Self] = &[$($v),+];
        }
    };
}

named!(IoDriver { "auto" => IoDriver::Auto, "io_uring" => IoDriver::IoUring, "epoll" => IoDriver::Epoll });
named!(PollerKind { "epoll" => PollerKind::Epoll, "io_uring" => PollerKind::IoUring });
named!(SlowConsumer { "close" => SlowConsumer::Close, "drop_oldest" => SlowConsumer::DropOldest });
named!(SendDefault { "reliable" => SendDefault::Reliable, "at_most_once" => SendDefault::AtMostOnce });
named!(DemoPage { "on" => DemoPage::On, "off" => DemoPage::Off, "auto" => DemoPage::Auto });
named!(StoreKind {
    "disk" => StoreKind::Disk,
    "memory" => StoreKind::Memory,
    "redis" => StoreKind::Redis,
    "none" => StoreKind::None,
});
named!(Durability { "fsync" => Durability::Fsync, "os" => Durability::Os });

/// Reads a [`Named`] value: a value of another type (`demo_page = true`)
/// is refused listing the names, as an unknown name is (TOML's own words
/// were "wanted string or table").
fn named<'de, D: serde::Deserializer<'de>, T: Named>(d: D) -> Result<T, D::Error> {
    struct Names<T>(std::marker::PhantomData<T>);
    impl<T: Named> serde::de::Visitor<'_> for Names<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let names: Vec<String> = T::NAMES.iter().map(|n| format!("`{n}`")).collect();
            write!(f, "one of {} (a string)", names.join(", "))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            match T::NAMES.iter().position(|n| *n == v) {
                Some(i) => Ok(T::VALUES[i]),
                None => Err(E::unknown_variant(v, T::NAMES)),
            }
        }
    }
    d.deserialize_any(Names(std::marker::PhantomData))
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// Which io driver the workers run on.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring; if the kernel refuses it, fall back to epoll and log a
    /// warning saying why.
    Auto,
    /// io_uring or refuse to start.
    IoUring,
    /// epoll (monoio's legacy driver), for kernels without io_uring.
    Epoll,
}

/// Readiness mechanism for client sockets.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PollerKind {
    IoUring,
    Epoll,
}

/// `[server]`: listening and workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address for the raw TCP protocol. Port 0 picks a free port.
    pub listen: String,
    /// Worker threads, one per core; 0 = as many as the process may run on.
    pub workers: usize,
    /// Pin worker i to the i-th allowed CPU. Worth it on a host whose cores
    /// are the server's alone; where other busy processes share the cores
    /// (load generators, sidecars), pinned workers cannot move away from
    /// them: measured with the capacity benchmark's loaders on the same 2
    /// cores, unicast p99 at 80,000 msgs/s was 1.05 s pinned, 22.6 ms not.
    pub pin_workers: bool,
    /// `auto`, `io_uring` or `epoll`.
    #[serde(deserialize_with = "named")]
    pub io_driver: IoDriver,
    /// The data path for client sockets:
    /// - `epoll` (default): one epoll set per worker (waited on through the
    ///   runtime's ring), then a `recv` per readable socket into a scratch
    ///   buffer.
    /// - `io_uring`: one multishot receive per connection on a per-worker
    ///   ring, landing bytes in a shared buffer ring that idle connections
    ///   hold nothing of (`[uring]` `recv_buffers` × `recv_buffer_bytes`,
    ///   4 MiB per worker by default, touched at start); the ring's work
    ///   runs in the worker's own `io_uring_enter`, one batch per loop turn.
    ///   Needs Linux 6.1; an older kernel, or io_uring refused, falls back
    ///   to epoll with a warning.
    ///
    /// With `io_driver = "epoll"` it is always epoll. Measured side by side
    /// by `switchboard-bench capacity --quick` (its data-path section;
    /// 4,000 connections, 2 workers), in two runs with the modes' order
    /// swapped: system CPU per relayed message 0.99× and 0.94× epoll's,
    /// fan-out and heartbeats equal, throughput and p99 each better in
    /// whichever mode ran second (the difference is below the run's order
    /// effect), and idle memory per connection 1.04× and 1.09× epoll's
    /// (the armed receive costs the kernel more than an epoll entry). Idle
    /// memory decides: epoll stays the default. Both modes batch the
    /// worker's own sends (`batch_sends`); DEPLOY.md, "Choosing the data
    /// path", has what is left between them.
    #[serde(deserialize_with = "named")]
    pub poller: PollerKind,
    /// Where a worker writes to many of its connections at once (a room
    /// publish or broadcast, a tick's PINGs, a turn's replies), the writes
    /// go out as `IORING_OP_SENDMSG` submissions, up to 256 per
    /// `io_uring_enter`, instead of one `sendmsg(2)` each. A single
    /// delivery, and writes from other threads, stay direct (a batch of one
    /// costs more than the syscall). On by default, with either poller: the
    /// `io_uring` poller submits them on its own ring; `epoll` adds a
    /// 256-entry ring per worker for sends only (28 KiB of kernel
    /// memory per worker; connections hold nothing in it, so idle memory
    /// per connection does not change). Off, or with
    /// `io_driver = "epoll"`, or where the kernel refuses io_uring (with a
    /// warning): one `sendmsg(2)` per write. Measured with the fan-out
    /// bench (`FANOUT_BATCH_SENDS=0|1`): README, "Measured", the table of
    /// differences; docs/DEPLOY.md, "Choosing the data path".
    pub batch_sends: bool,
    /// Most connections the whole server holds (split evenly over workers);
    /// 0 = as many as `RLIMIT_NOFILE` allows. Each slot costs its share of
    /// the connection table only once used (the table is reserved, not
    /// touched, at start).
    pub max_connections: usize,
    /// Accept backlog per worker listener (capped by `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Accepts kept outstanding per worker, so a connect storm is not served
    /// one accept at a time.
    pub accepts_per_worker: usize,
    /// Start even if another process already listens on `listen`. The
    /// listeners use SO_REUSEPORT, so the kernel then splits new connections
    /// between both processes: what a zero-downtime restart wants, and a
    /// silent mistake otherwise (two development servers sharing a port
    /// split their users, and a SEND reaches only users on the same
    /// process), hence off by default; a second server wants other ports.
    pub share_listen_port: bool,
}

impl ServerConfig {
    /// Workers to start on a host where the process may run on `cpus`
    /// CPUs: `workers`, or with 0 one per CPU, never more than
    /// [`MAX_WORKERS`] (an explicit count above it is a config error; a
    /// larger host gets `MAX_WORKERS` workers).
    pub fn worker_count(&self, cpus: usize) -> usize {
        if self.workers == 0 {
            cpus.clamp(1, MAX_WORKERS)
        } else {
            self.workers
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7700".into(),
            workers: 0,
            pin_workers: false,
            io_driver: IoDriver::Auto,
            poller: PollerKind::Epoll,
            batch_sends: true,
            max_connections: 0,
            listen_backlog: 4096,
            accepts_per_worker: 4,
            share_listen_port: false,
        }
    }
}

/// `[socket]`: per-connection kernel buffers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// SO_RCVBUF for accepted sockets; 0 = not set, left to the kernel's
    /// autotuning between `net.ipv4.tcp_rmem`'s default and maximum (setting
    /// it turns autotuning off for the socket). The kernel doubles a set
    /// value for overhead; an idle socket holds no buffer memory either way,
    /// a busy one up to twice this (or up to `tcp_rmem`'s maximum).
    pub rcvbuf_bytes: usize,
    /// SO_SNDBUF for accepted sockets (same accounting as `rcvbuf_bytes`;
    /// 0: autotuned within `net.ipv4.tcp_wmem`). Beyond it, frames wait in
    /// the connection's outbound queue.
    pub sndbuf_bytes: usize,
    /// TCP_NODELAY: pushes leave at once instead of waiting for Nagle.
    pub nodelay: bool,
}

impl Default for SocketConfig {
    fn default() -> Self {
        // Left to the kernel: measured with `switchboard-bench bulk`, idle
        // connections cost the same as with 4 KiB set (their sockets hold no
        // buffer either way), and a 16 MB message's round trip took ~0.1-0.2 s
        // against ~18 s (docs/DEPLOY.md, "Socket buffers").
        SocketConfig { rcvbuf_bytes: 0, sndbuf_bytes: 0, nodelay: true }
    }
}

/// `[timeouts]`: login deadline and heartbeats, on one coarse wheel per
/// worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// Wheel resolution: every deadline is rounded up to a tick.
    pub tick_ms: u64,
    /// A connection must LOGIN within this time.
    pub login_timeout_ms: u64,
    /// The server PINGs a connection that has been silent this long. Below
    /// the ~5 minute idle-mapping timeout of carrier NATs.
    pub heartbeat_interval_ms: u64,
    /// A connection silent this long (no PONG to our PING) is closed.
    pub idle_timeout_ms: u64,
    /// After sending CLOSE, wait this long for the peer to close.
    pub close_linger_ms: u64,
    /// A frame, or a fragmented WebSocket message, must arrive whole within
    /// this long of the read that left it incomplete; else the connection
    /// is closed (1008). Bounds how long a client can make the server hold
    /// a partial frame, e.g. by pinging between the fragments of a message
    /// it never finishes.
    pub message_timeout_ms: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            tick_ms: 1000,
            login_timeout_ms: 10_000,
            heartbeat_interval_ms: 240_000,
            idle_timeout_ms: 300_000,
            close_linger_ms: 2_000,
            message_timeout_ms: 30_000,
        }
    }
}

/// What happens to a connection whose outbound queue is full.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Close it with 4004: it reads too slowly to keep up.
    Close,
    /// Drop its oldest queued messages (PUSH, ROOM_MSG; never control
    /// frames) to make room, and tell it with a SKIPPED frame where the gap
    /// is. Only when no message can be dropped is it closed.
    DropOldest,
}

/// `[limits]`: bounds on every queue and buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest frame accepted from a client, header included. A connection
    /// holding a partial frame buffers at most this much.
    pub max_frame_bytes: usize,
    /// Frames queued for one connection before it is closed as a slow
    /// consumer (32 bytes each, the payload itself is shared).
    pub outbound_max_frames: usize,
    /// Bytes queued for one connection before it is closed as a slow
    /// consumer.
    pub outbound_max_bytes: usize,
    /// Commands each worker's mailbox holds (64 bytes each, allocated
    /// at start); a push to a full mailbox fails with `Full`.
    pub mailbox_capacity: usize,
    /// Connections one user id may hold at once (devices); one more login
    /// is refused.
    pub max_conns_per_user: usize,
    /// `close` or `drop_oldest` when an outbound queue is full.
    #[serde(deserialize_with = "named")]
    pub slow_consumer: SlowConsumer,
    /// Bytes one worker may hold in incomplete frames and WebSocket
    /// reassembly buffers, over all its connections. An idle connection
    /// holds none; a connection mid-frame holds what it has sent so far.
    /// Past the budget, the connection that has held an incomplete frame
    /// longest is closed (1013, try again later), until the rest fits.
    /// Bounds what clients that start frames and never finish them can
    /// make the server hold: workers × this, at most.
    pub partial_bytes_per_worker: usize,
    /// Messages (SEND, SEND_EX, PUBLISH, MESSAGE; a FETCH counts as one,
    /// without bytes) one user may send a second through this server (all
    /// its connections on every worker thread together);
    /// past its budget a message gets ERROR 118 and is not acted on
    /// (`proto::rate`). 0: no limit.
    pub send_rate: u64,
    /// Messages a user may send at once before the rate applies.
    /// 0: one second's worth (`send_rate`).
    pub send_burst: u64,
    /// Payload bytes of those messages one user may send a second
    /// through this server. 0: no limit.
    pub send_bytes_rate: u64,
    /// Payload bytes at once before the rate applies; at least
    /// `max_frame_bytes`. 0: one second's worth, or `max_frame_bytes` if
    /// that is more.
    pub send_bytes_burst: u64,
    /// N: the Nth SEND in a row refused by the send budget closes the
    /// connection (4009) instead of an ERROR 118. 0: never.
    pub send_max_refused: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: 64 * 1024,
            outbound_max_frames: 1024,
            outbound_max_bytes: 256 * 1024,
            mailbox_capacity: 65_536,
            max_conns_per_user: 16,
            slow_consumer: SlowConsumer::Close,
            partial_bytes_per_worker: 64 << 20,
            send_rate: 0,
            send_burst: 0,
            send_bytes_rate: 0,
            send_bytes_burst: 0,
            send_max_refused: 1000,
        }
    }
}

impl LimitsConfig {
    /// `send_burst` as it applies (0: `send_rate`).
    pub fn send_burst(&self) -> u64 {
        if self.send_burst == 0 {
            self.send_rate
        } else {
            self.send_burst
        }
    }

    /// `send_bytes_burst` as it applies (0: `send_bytes_rate`, or
    /// `max_frame_bytes` if more).
    pub fn send_bytes_burst(&self) -> u64 {
        if self.send_bytes_burst == 0 {
            self.send_bytes_rate.max(self.max_frame_bytes as u64)
        } else {
            self.send_bytes_burst
        }
    }

    /// The send budget's rates (`proto::rate`); `None` when neither rate
    /// is set.
    pub fn send_limit(&self) -> Option<crate::proto::rate::SendLimit> {
        crate::proto::rate::SendLimit::new(
            self.send_rate,
            self.send_burst(),
            self.send_bytes_rate,
            self.send_bytes_burst(),
            self.send_max_refused,
        )
    }
}

/// `[auth]`: the built-in JWT check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret. Unset: `SWITCHBOARD_JWT_SECRET`, else the development
    /// secret (loopback only).
    pub jwt_secret: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    pub jwt_leeway_s: u64,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { jwt_secret: None, jwt_leeway_s: 30, require_exp: true }
    }
}

/// `[routing]`: what clients may do without the application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Deliver a client's SEND to the target user's connections. Off: SEND
    /// goes to the application's message hook, or is refused.
    pub client_send: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig { client_send: true }
    }
}

/// Whether a client's SEND (and an application push that does not say) is
/// stored in the recipient's inbox or relayed live only.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendDefault {
    /// Stored durably, delivered with a seq, acknowledged, retransmitted,
    /// kept for an offline user (docs/PROTOCOL.md section 15).
    Reliable,
    /// Relayed to the connections online now; gone if there are none.
    AtMostOnce,
}

/// `[delivery]`: reliable delivery to devices (docs/PROTOCOL.md section 15).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// What a plain SEND and an application push get. SEND_EX and the
    /// reliable/at-most-once handle calls choose per message.
    #[serde(deserialize_with = "named")]
    pub send_default: SendDefault,
    /// Stored messages written to one connection and not yet acknowledged,
    /// at most. (The window's state exists only for connections that logged
    /// in with a device id: about 100 bytes plus 16 per message in flight.)
    /// Why 128: a catch-up runs at about a window per ACK round trip (the
    /// client ACKs every 32), so the window sets how much a slow round
    /// trip costs. Catch-up of 10,000 messages (the capacity report's;
    /// `switchboard-bench catch-up --windows 64,128,256`), windows
    /// alternated, 12 runs each, two comparisons minutes apart on one host:
    /// medians 0.80 / 1.16 / 1.54 M msgs/s and 0.45 / 0.58 / 0.88 M with
    /// 64 / 128 / 256. 128 keeps a full window's state under 2.2 KB a
    /// connection; 256 would double that for the next ~1.5×.
    pub window: u32,
    /// Payload bytes in flight to one connection, at most (one message
    /// always goes). At most half of `limits.outbound_max_bytes` is used
    /// (a smaller outbound limit lowers it), so a window never makes its
    /// reader a slow consumer.
    pub window_bytes: u64,
    /// No ACK progress for this long while messages are in flight: write
    /// them again from the acknowledged position.
    pub ack_timeout_ms: u64,
    /// Retransmits in a row without ACK progress before CLOSE 4007.
    pub max_retransmits: u8,
    /// Messages pushed at a device's login; the client FETCHes the rest.
    pub first_page: u32,
    /// Largest FETCH `limit` honoured.
    pub max_fetch: u32,
    /// A SEND_EX with a (sender, client_id) seen this recently is answered
    /// with the first one's seq and not stored again.
    pub dedup_window_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            send_default: SendDefault::Reliable,
            window: 128,
            window_bytes: 128 << 10,
            ack_timeout_ms: 5_000,
            max_retransmits: 5,
            first_page: 20,
            max_fetch: 1000,
            dedup_window_ms: 3_600_000,
        }
    }
}

/// `[rooms]`: rooms and their limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Rooms one connection may be in (16 bytes per membership).
    pub max_rooms_per_conn: usize,
    /// Connections one room may hold, over all workers.
    pub max_members_per_room: u64,
    /// Distinct rooms the server holds at once (one map entry each).
    pub max_rooms: usize,
    /// Rooms that one user's SUBSCRIBEs may have created and that still
    /// exist (a room counts against its creator until its last member
    /// leaves); past it, a SUBSCRIBE to a room that does not exist yet gets
    /// ERROR 112, while joining existing rooms goes on. 0: clients create
    /// no rooms at all, only the application does (`Handle::join_room`,
    /// never counted). Keeps one user from filling `max_rooms` for
    /// everyone; with untrusted users, size `max_rooms` for users × this,
    /// or use 0.
    pub max_rooms_created_per_user: u32,
    /// Clients may SUBSCRIBE/UNSUBSCRIBE themselves (off: only the
    /// application joins them).
    pub client_subscribe: bool,
    /// Clients may PUBLISH to rooms they are in (a chat room); off: only
    /// the application publishes.
    pub client_publish: bool,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            max_rooms_per_conn: 64,
            max_members_per_room: 1_000_000,
            max_rooms: 100_000,
            max_rooms_created_per_user: 64,
            client_subscribe: true,
            client_publish: true,
        }
    }
}

/// `[drain]`: graceful drain on SIGTERM (`Handle::drain`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// CLOSE 1001 frames go out spread over this window, so a million
    /// clients do not all reconnect in the same second. A worker with few
    /// connections uses less of it (at least 1,000 closes per second).
    pub window_ms: u64,
    /// Each CLOSE carries a reconnect hint `reconnect_ms=<n>`, n uniform in
    /// [0, reconnect_jitter_ms): a further spread for clients that honour
    /// it.
    pub reconnect_jitter_ms: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig { window_ms: 10_000, reconnect_jitter_ms: 5_000 }
    }
}

/// `[admin]`: the backend HTTP API (docs/API.md): pushes, rooms,
/// presence, batches, stats, metrics, health and readiness.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the API, e.g. "127.0.0.1:7701"; empty = off.
    pub listen: String,
    /// The API key (`Authorization: Bearer <key>` or `X-API-Key: <key>`)
    /// every route but `/healthz` and `/readyz` needs; required when
    /// `listen` is not a loopback address.
    pub token: Option<String>,
    /// A second key that may use the read-only routes only (stats,
    /// presence, connections, room sizes, inbox state, metrics).
    pub read_token: Option<String>,
    /// `Host` names (with or without a port) the API answers to besides
    /// the loopback ones, e.g. "push-api.internal". On a loopback listener
    /// any other `Host` is refused (DNS rebinding); elsewhere `Host` is
    /// checked only when this list is not empty.
    pub allowed_hosts: Vec<String>,
    /// Most API connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Largest body of a route that takes one payload (bytes).
    pub max_body_bytes: usize,
    /// Largest body of `/api/v1/batch` and of the list routes (bytes).
    pub max_batch_bytes: usize,
    /// Most commands in one batch (and users or rooms in one call).
    pub max_batch_commands: usize,
    /// Time a client has to send a request head; also how long a
    /// keep-alive connection may sit idle.
    pub header_timeout_ms: u64,
    /// Time a client has to send a request body once its head is in.
    pub body_timeout_ms: u64,
    /// Serve the benchmark-only endpoints (`/bench/...`), which block the
    /// workers while they run. Never in production.
    pub bench_endpoints: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: String::new(),
            token: None,
            read_token: None,
            allowed_hosts: Vec::new(),
            max_connections: 1024,
            max_body_bytes: 1 << 20,
            max_batch_bytes: 32 << 20,
            max_batch_commands: 100_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            bench_endpoints: false,
        }
    }
}

/// `[websocket]`: the WebSocket transport (RFC 6455) for browsers and
/// every WebSocket client, on the same workers as raw TCP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Address of the WebSocket listener; empty = no WebSocket port.
    pub listen: String,
    /// Also accept WebSocket upgrades on `server.listen`, told apart from
    /// raw frames by their first bytes (`GET `). Costs nothing per raw
    /// frame; off by default so the raw port stays raw-only.
    pub sniff_on_raw_port: bool,
    /// Origins allowed to connect (e.g. `"https://app.example.com"`);
    /// empty or "*" = any. A request without an Origin header (not a
    /// browser) is always allowed: only browsers send one reliably.
    pub allowed_origins: Vec<String>,
    /// Largest message a client may send, after reassembly of fragments;
    /// 0 = derived from limits.max_frame_bytes (4/3 of it plus 1 KiB: a
    /// JSON message with a base64 payload of a full frame).
    pub max_message_bytes: usize,
    /// Largest HTTP upgrade request (request line and headers).
    pub max_handshake_bytes: usize,
    /// Serve the demo page at `GET /` of the WebSocket port: "auto" (when
    /// the WebSocket port is on a loopback address), "on" or "off".
    #[serde(deserialize_with = "named")]
    pub demo_page: DemoPage,
    /// Test only: echo every text and binary message back as it came (same
    /// opcode), without a login, through the real decoder, worker and
    /// write path, for WebSocket conformance suites (`scripts/autobahn.sh`).
    /// Refused unless every address that accepts WebSocket upgrades is a
    /// loopback address. The login deadline still applies.
    pub conformance_echo: bool,
}

/// When to serve the browser demo page.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DemoPage {
    Auto,
    On,
    Off,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            listen: "127.0.0.1:7710".into(),
            sniff_on_raw_port: false,
            allowed_origins: Vec::new(),
            max_message_bytes: 0,
            max_handshake_bytes: 8192,
            demo_page: DemoPage::Auto,
            conformance_echo: false,
        }
    }
}

impl WebSocketConfig {
    /// The WebSocket listen address, if one is configured.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            invalid("websocket.listen", format!("{:?} is not an IP:port address (or empty to disable)", self.listen))
        })
    }

    /// The message size limit in force for `max_frame_bytes`.
    pub fn message_limit(&self, max_frame_bytes: usize) -> usize {
        if self.max_message_bytes != 0 {
            self.max_message_bytes
        } else {
            max_frame_bytes / 3 * 4 + 1024
        }
    }

    /// Whether the demo page is served.
    pub fn serves_demo(&self) -> bool {
        match self.demo_page {
            DemoPage::On => true,
            DemoPage::Off => false,
            DemoPage::Auto => matches!(self.listen_addr(), Ok(Some(a)) if a.ip().is_loopback()),
        }
    }
}

/// `[uring]`: io_uring sizing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UringConfig {
    /// Submission queue entries per worker (64 bytes each).
    pub sq_entries: u32,
    /// Completion queue entries per worker (16 bytes each). Large, so a
    /// burst of completions cannot overflow it.
    pub cq_entries: u32,
    /// `server.poller = "io_uring"`: buffers in each worker's receive
    /// buffer ring (a power of two, at most 32,768). The kernel fills them
    /// only as bytes arrive, so idle connections hold none.
    pub recv_buffers: u16,
    /// Size of each receive buffer, in bytes (4 KiB to 1 MiB). With the
    /// kernel's incremental consumption (Linux 6.12+) small messages share
    /// a buffer; the ring is `recv_buffers` × this, touched once at start.
    pub recv_buffer_bytes: u32,
}

impl Default for UringConfig {
    fn default() -> Self {
        // 256 × 16 KiB = 4 MiB per worker: about 40,000 PINGs or small
        // SENDs from different connections between two loop turns before
        // the ring runs dry (which costs a re-arm, never bytes).
        UringConfig { sq_entries: 4096, cq_entries: 65_536, recv_buffers: 256, recv_buffer_bytes: 16 * 1024 }
    }
}

/// Which store keeps the per-user inboxes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// On disk under `store.path` (fjall), durable per `store.durability`.
    Disk,
    /// In RAM, bounded by the limits below, lost on restart.
    Memory,
    /// No store: messages are relayed live only, at most once.
    None,
    /// In Redis (the `[cluster]` Redis or Redis Cluster), shared by every
    /// node: a user's inbox is there whichever node they connect to next.
    /// Durable as Redis is configured (docs/SCALING.md).
    Redis,
}

/// `store.batch_wait_us` unset, with a disk store and `os` durability or
/// with the memory store: stores whose turn ends in no sync that would
/// gather the next batch (`store/service.rs`, "Waiting for a batch", has
/// the measurements).
pub const DEFAULT_BATCH_WAIT_US: u64 = 1_000;
/// The largest `store.batch_wait_us`: every reliable message may wait
/// this long more.
pub const MAX_BATCH_WAIT_US: u64 = 100_000;

/// `[store]`: the inbox store behind reliable delivery.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `disk`, `memory` or `none`.
    #[serde(deserialize_with = "named")]
    pub kind: StoreKind,
    /// Directory of the disk store, created if missing; relative paths are
    /// relative to the working directory.
    pub path: std::path::PathBuf,
    /// `fsync` (an acknowledged message survives power loss: one
    /// `fdatasync` per batch of appends) or `os` (survives a crash of the
    /// process only).
    #[serde(deserialize_with = "named")]
    pub durability: Durability,
    /// Messages, and devices not seen, are dropped after this long.
    pub ttl_ms: u64,
    /// Messages one inbox may hold; one more is refused (ERROR 113).
    pub max_messages_per_inbox: u64,
    /// Bytes (payload + record) the store may hold; past it appends are
    /// refused (ERROR 114). The memory store holds about this much RAM.
    pub max_bytes: u64,
    /// Requests that may wait for the store thread (a few hundred bytes
    /// each with their payloads); past it a request gets ERROR 115.
    pub queue_capacity: usize,
    /// Bytes the appends waiting for the store thread may hold (payload
    /// and ids, each counted as in `max_bytes`), over every shard; past
    /// it an append gets ERROR 115 (the admin API 503) as past
    /// `queue_capacity`. 1 MiB to 1 TiB.
    pub queue_max_bytes: u64,
    /// The disk store's write buffer (memtable) per keyspace, in MiB. A
    /// larger one flushes less often; each flush holds appends up for its
    /// table and manifest syncs (docs/DEPLOY.md, "Write stalls").
    pub write_buffer_mib: u64,
    /// The disk store's journal files, in MiB per shard, at most (fjall's
    /// write-ahead log): past it, the write buffers that hold the oldest
    /// journal back are flushed so that it can go. It bounds the disk the
    /// journals take and what a start after a crash replays
    /// (docs/DEPLOY.md, "Disk"). At least 64.
    pub max_journal_mib: u64,
    /// Shards of a disk or memory store, each a thread (and, on disk, a
    /// directory with write buffers) of its own serving the users hashed
    /// to it. A disk store keeps the count it was created with
    /// (docs/DEPLOY.md, "Shards": when more than one pays).
    pub shards: usize,
    /// Microseconds from one turn of the store thread that serves requests
    /// to the next turn of writes, at least (`store/service.rs`, "Waiting
    /// for a batch"): while writes keep coming, fewer and larger batches,
    /// fewer wakes of the store thread and the workers, at most this much
    /// more latency; a turn with a read or a login, and a request after a
    /// quiet spell, are served at once. Unset: 1,000 with a disk store
    /// and `os` durability and with the memory store, else 0 (with
    /// `fsync` the sync of one batch gathers the next; a Redis round trip
    /// does the same). At most 100,000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_wait_us: Option<u64>,
    /// Milliseconds from the end of one retention pass (messages past
    /// `ttl_ms`, messages every known device has acknowledged, devices
    /// not seen for `ttl_ms`) to the start of the next. Shorter frees
    /// store space sooner and costs the store thread more passes.
    pub retention_interval_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let limits = StoreLimits::default();
        StoreConfig {
            kind: StoreKind::Disk,
            path: "switchboard-data".into(),
            durability: Durability::Fsync,
            ttl_ms: limits.ttl_ms,
            max_messages_per_inbox: limits.max_messages_per_inbox,
            max_bytes: limits.max_bytes,
            queue_capacity: 65_536,
            queue_max_bytes: crate::store::DEFAULT_QUEUE_MAX_BYTES,
            write_buffer_mib: crate::store::disk::WRITE_BUFFER_MIB,
            max_journal_mib: crate::store::disk::MAX_JOURNAL_MIB,
            shards: 1,
            batch_wait_us: None,
            retention_interval_ms: crate::store::EXPIRE_INTERVAL.as_millis() as u64,
        }
    }
}

impl StoreConfig {
    /// The limits a store opened with this configuration enforces;
    /// `dedup_window_ms` is `delivery.dedup_window_ms`.
    pub fn limits(&self, dedup_window_ms: u64) -> StoreLimits {
        StoreLimits {
            max_messages_per_inbox: self.max_messages_per_inbox,
            max_bytes: self.max_bytes,
            ttl_ms: self.ttl_ms,
            dedup_window_ms,
        }
    }

    /// The store thread's wait for a batch: `batch_wait_us`, or its
    /// default for this kind and durability.
    pub fn batch_wait(&self) -> std::time::Duration {
        let default = match (self.kind, self.durability) {
            (StoreKind::Disk, Durability::Os) | (StoreKind::Memory, _) => DEFAULT_BATCH_WAIT_US,
            _ => 0,
        };
        std::time::Duration::from_micros(self.batch_wait_us.unwrap_or(default))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_wait_us.is_some_and(|us| us > MAX_BATCH_WAIT_US) {
            return Err(invalid(
                "store.batch_wait_us",
                format!("is {}, must be at most {MAX_BATCH_WAIT_US}", self.batch_wait_us.unwrap_or(0)),
            ));
        }
        if self.kind == StoreKind::Disk && self.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty with store.kind = \"disk\""));
        }
        if self.ttl_ms < 1000 {
            return Err(invalid("store.ttl_ms", format!("is {}, must be at least 1000", self.ttl_ms)));
        }
        if self.max_messages_per_inbox == 0 {
            return Err(invalid("store.max_messages_per_inbox", "must be at least 1"));
        }
        if self.max_bytes < 1 << 20 {
            return Err(invalid("store.max_bytes", format!("is {}, must be at least 1048576", self.max_bytes)));
        }
        if !(1 << 20..=1 << 40).contains(&self.queue_max_bytes) {
            return Err(invalid(
                "store.queue_max_bytes",
                format!("is {}, must be between 1048576 (1 MiB) and 1099511627776 (1 TiB)", self.queue_max_bytes),
            ));
        }
        if !(16..=1 << 24).contains(&self.queue_capacity) {
            return Err(invalid(
                "store.queue_capacity",
                format!("is {}, must be between 16 and 16777216", self.queue_capacity),
            ));
        }
        if !(1..=crate::store::MAX_SHARDS).contains(&self.shards) {
            return Err(invalid(
                "store.shards",
                format!("is {}, must be between 1 and {}", self.shards, crate::store::MAX_SHARDS),
            ));
        }
        if !(100..=86_400_000).contains(&self.retention_interval_ms) {
            return Err(invalid(
                "store.retention_interval_ms",
                format!("is {}, must be between 100 and 86400000", self.retention_interval_ms),
            ));
        }
        if !(1..=4096).contains(&self.write_buffer_mib) {
            return Err(invalid(
                "store.write_buffer_mib",
                format!("is {}, must be between 1 and 4096", self.write_buffer_mib),
            ));
        }
        let journal = crate::store::disk::MIN_JOURNAL_MIB..=1 << 20;
        if !journal.contains(&self.max_journal_mib) {
            return Err(invalid(
                "store.max_journal_mib",
                format!(
                    "is {}, must be between {} and {} (the storage engine takes no less than 64)",
                    self.max_journal_mib,
                    journal.start(),
                    journal.end()
                ),
            ));
        }
        Ok(())
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub socket: SocketConfig,
    pub timeouts: TimeoutConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub routing: RoutingConfig,
    pub delivery: DeliveryConfig,
    pub rooms: RoomsConfig,
    pub admin: AdminConfig,
    pub drain: DrainConfig,
    pub websocket: WebSocketConfig,
    pub uring: UringConfig,
    pub store: StoreConfig,
    pub cluster: ClusterConfig,
}

/// Where `[cluster] redis` points: one Redis (a URL) or the seed nodes of
/// a Redis Cluster (a list).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RedisAddrs {
    /// `redis = "redis://127.0.0.1:6379"`: a single Redis (or Valkey).
    Single(String),
    /// `redis = ["redis://10.0.0.1:7000", ...]`: a Redis Cluster, reached
    /// through any of these seed nodes.
    Cluster(Vec<String>),
}

impl RedisAddrs {
    /// The URLs, whatever the mode.
    pub fn urls(&self) -> Vec<String> {
        match self {
            RedisAddrs::Single(u) => vec![u.clone()],
            RedisAddrs::Cluster(v) => v.clone(),
        }
    }

    /// The URLs with their passwords masked ([`redacted_url`]): what logs
    /// and errors show.
    pub fn redacted(&self) -> Vec<String> {
        self.urls().iter().map(|u| redacted_url(u)).collect()
    }

    /// Whether this is a Redis Cluster (a list of seed nodes).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisAddrs::Cluster(_))
    }
}

/// An entry of `websocket.allowed_origins`: `*`, `null` (what a sandboxed
/// page sends), or `scheme://host[:port]` without a path, as browsers send
/// the Origin header.
/// Whether listeners on `a` and `b` would take the same port: the same
/// port (not 0, which picks a free one) on the same address, or on the
/// wildcard address of either (`0.0.0.0` takes the port on every IPv4
/// address, `[::]` on every address).
fn shares_a_port(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

fn origin_entry_ok(o: &str) -> bool {
    if o == "*" || o == "null" {
        return true;
    }
    let Some((scheme, host)) = o.split_once("://") else { return false };
    !scheme.is_empty()
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        && host_entry_ok(host)
}

/// An entry of `admin.allowed_hosts` (or an origin's host part): a host
/// name or address with or without `:port`, nothing else.
fn host_entry_ok(h: &str) -> bool {
    !h.is_empty() && !h.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || matches!(b, b'/' | b'@'))
}

/// `url` with the password of its user info (`redis://user:PASSWORD@host`)
/// replaced by `***`, for logs and error messages.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_string() };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// `[cluster]`: many nodes behind one load balancer, sharing presence,
/// routing and (with `store.kind = "redis"`) inboxes through Redis
/// (docs/SCALING.md). Without `redis`, the node runs on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// A Redis URL, or a list of Redis Cluster seed URLs; unset = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisAddrs>,
    /// This node's name, unique in the cluster (at most 64 bytes of
    /// `[A-Za-z0-9._:-]`); empty = `<hostname>:<listen port>`. Redis sees
    /// it with `/<pid>` appended (one id per process).
    pub node_id: String,
    /// How often the node renews its liveness record in Redis.
    pub heartbeat_ms: u64,
    /// A node whose liveness record is older than this is dead: its
    /// presence entries are ignored (and removed by the next reader).
    /// At least twice `heartbeat_ms`; the default is three heartbeats.
    pub node_ttl_ms: u64,
    /// Longest a cached user→nodes lookup is used (a login anywhere drops
    /// it from every node's cache at once; this bounds a lost drop notice).
    pub route_cache_ms: u64,
    /// Users whose lookup is cached, at most (about 100 bytes each).
    pub route_cache_entries: usize,
    /// Cross-node work (forwards, presence updates) waiting for the Redis
    /// thread, at most; past it the work is refused and counted.
    pub queue_capacity: usize,
    /// Bytes of messages (forwards, room and broadcast frames, stored
    /// messages' notices) that work may hold; past it a forward is refused
    /// and counted as past `queue_capacity`. 1 MiB to 1 TiB.
    pub queue_max_bytes: u64,
    /// Bytes of forwarded messages in one Redis PUBLISH, at most.
    pub max_batch_bytes: usize,
    /// A Redis command not answered within this long fails (and is
    /// retried or counted, per docs/SCALING.md).
    pub command_timeout_ms: u64,
    /// A turn of the Redis thread that finds fewer than
    /// [`crate::cluster::node::LINGER_UNTIL_EVENTS`] events waits this long
    /// for more before it sends (0 = never waits): fewer Redis round trips
    /// per message at moderate rates, for this much added latency.
    pub batch_linger_us: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            node_id: String::new(),
            heartbeat_ms: 1_000,
            node_ttl_ms: 3_000,
            route_cache_ms: 30_000,
            route_cache_entries: 1_000_000,
            queue_capacity: 65_536,
            queue_max_bytes: crate::cluster::DEFAULT_QUEUE_MAX_BYTES,
            max_batch_bytes: 256 << 10,
            command_timeout_ms: 2_000,
            batch_linger_us: 1_000,
        }
    }
}

/// Longest `cluster.node_id`.
pub const MAX_NODE_ID_BYTES: usize = 64;

impl ClusterConfig {
    /// This process's id in the cluster: `node_id` (or
    /// `<hostname>:<port>`), then `/` and the process id. The process id
    /// keeps two processes of one node apart: the old and the new one of
    /// an overlapping restart on the same port both run for a while, and
    /// the old one's logouts must not remove the new one's presence.
    pub fn node_id_or_default(&self, listen_port: u16) -> String {
        format!("{}/{}", self.node_name(listen_port), std::process::id())
    }

    /// `node_id`, or `<hostname>:<port>`.
    pub fn node_name(&self, listen_port: u16) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let host = if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            "node".to_string()
        };
        let mut id: String =
            host.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).take(50).collect();
        id.push_str(&format!(":{listen_port}"));
        id
    }

    fn validate(&self, store: StoreKind) -> Result<(), ConfigError> {
        let Some(redis) = &self.redis else {
            if store == StoreKind::Redis {
                return Err(invalid("store.kind", "is \"redis\": set cluster.redis to the Redis to use"));
            }
            return Ok(());
        };
        let urls = redis.urls();
        if urls.is_empty() {
            return Err(invalid("cluster.redis", "lists no address (leave it out to run without Redis)"));
        }
        for u in &urls {
            if u.starts_with("rediss://") || u.starts_with("valkeys://") {
                return Err(invalid(
                    "cluster.redis",
                    format!(
                        "{:?}: this build speaks to Redis without TLS; reach Redis over a private network, or \
                         through a TLS tunnel on this host (stunnel, spiped) with a redis:// URL to its local end",
                        redacted_url(u)
                    ),
                ));
            }
            if !(u.starts_with("redis://") || u.starts_with("valkey://")) {
                return Err(invalid("cluster.redis", format!("{:?} is not a redis:// URL", redacted_url(u))));
            }
        }
        let id_ok = |s: &str| {
            s.len() <= MAX_NODE_ID_BYTES
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        };
        if !id_ok(&self.node_id) {
            return Err(invalid(
                "cluster.node_id",
                format!("{:?}: at most {MAX_NODE_ID_BYTES} bytes of A-Z a-z 0-9 . _ : -", self.node_id),
            ));
        }
        if self.heartbeat_ms < 100 || self.heartbeat_ms > 60_000 {
            return Err(invalid("cluster.heartbeat_ms", "must be between 100 and 60000"));
        }
        if self.node_ttl_ms < 2 * self.heartbeat_ms {
            return Err(invalid("cluster.node_ttl_ms", "must be at least twice cluster.heartbeat_ms"));
        }
        if self.route_cache_entries == 0 || self.route_cache_ms == 0 {
            return Err(invalid("cluster.route_cache_entries", "and cluster.route_cache_ms must be at least 1"));
        }
        if !(16..=1 << 24).contains(&self.queue_capacity) {
            return Err(invalid("cluster.queue_capacity", "must be between 16 and 16777216"));
        }
        if !(1 << 20..=1 << 40).contains(&self.queue_max_bytes) {
            return Err(invalid(
                "cluster.queue_max_bytes",
                "must be between 1048576 (1 MiB) and 1099511627776 (1 TiB)",
            ));
        }
        if !(4096..=64 << 20).contains(&self.max_batch_bytes) {
            return Err(invalid("cluster.max_batch_bytes", "must be between 4096 and 67108864"));
        }
        if self.batch_linger_us > 100_000 {
            return Err(invalid("cluster.batch_linger_us", "must be at most 100000 (0 = no linger)"));
        }
        if self.command_timeout_ms < 10 {
            return Err(invalid("cluster.command_timeout_ms", "must be at least 10"));
        }
        if matches!(store, StoreKind::Disk | StoreKind::Memory) {
            return Err(invalid(
                "store.kind",
                format!(
                    "is {:?} with cluster.redis set: an inbox kept by one node is not there when the user \
                     reconnects to another; use \"redis\" (or \"none\" for live delivery only)",
                    format!("{store:?}").to_lowercase()
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let cfg = Config::parse_file(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a TOML file without checking its values, for a caller that
    /// overrides some of them first (`serve`'s flags) and then calls
    /// [`Config::validate`] on the result: a value the override replaces
    /// must not be refused.
    pub fn parse_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.display().to_string(), message: e.to_string() })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: "<text>".into(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|_| invalid("server.listen", format!("{:?} is not an IP:port address", self.server.listen)))
    }

    /// The JWT secret in force and whether it is the development one: unset
    /// (the built-in default), or that published value given explicitly in
    /// the config or the environment, which is just as public.
    pub fn jwt_secret(&self) -> (String, bool) {
        let secret = match (&self.auth.jwt_secret, std::env::var(JWT_SECRET_ENV)) {
            (Some(s), _) => s.clone(),
            (None, Ok(s)) if !s.is_empty() => s,
            _ => DEV_JWT_SECRET.to_string(),
        };
        let dev = secret == DEV_JWT_SECRET;
        (secret, dev)
    }

    /// Session timeouts converted to wheel ticks: rounded up, plus one tick,
    /// because a session's clock is the tick it is in (up to one tick behind
    /// real time). A timeout therefore fires up to two ticks late, never
    /// early.
    pub fn timeouts_in_ticks(&self) -> Timeouts {
        let t = &self.timeouts;
        let ticks = |ms: u64| (ms.div_ceil(t.tick_ms) + 1).min(u32::MAX as u64 / 4) as u32;
        Timeouts {
            login: ticks(t.login_timeout_ms),
            heartbeat: ticks(t.heartbeat_interval_ms),
            idle: ticks(t.idle_timeout_ms),
            linger: ticks(t.close_linger_ms),
            message: ticks(t.message_timeout_ms),
        }
    }

    /// The `[delivery]` window settings, times in ticks (rounded up, as for
    /// the session timeouts).
    pub fn window_rules(&self) -> crate::proto::reliable::WindowRules {
        let d = &self.delivery;
        crate::proto::reliable::WindowRules {
            window: d.window,
            window_bytes: d.window_bytes.min(self.limits.outbound_max_bytes as u64 / 2),
            ack_timeout: (d.ack_timeout_ms.div_ceil(self.timeouts.tick_ms) + 1).min(u32::MAX as u64 / 4) as u32,
            max_retransmits: d.max_retransmits,
            first_page: d.first_page,
            max_fetch: d.max_fetch,
        }
    }

    /// The smallest `limits.partial_bytes_per_worker` accepted: room for
    /// four of the largest frames or messages a client may send (one
    /// connection mid-message holds up to about three: the frame being read,
    /// grown by doubling, and the fragments so far).
    pub fn min_partial_bytes_per_worker(&self) -> usize {
        4 * self.limits.max_frame_bytes.max(self.websocket.message_limit(self.limits.max_frame_bytes))
    }

    /// Checks every value and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_for(false)
    }

    /// [`Config::validate`] for a server whose logins an application's
    /// own authenticator checks (`own_auth`): the JWT secret is then not
    /// used, so neither its length nor the development secret's
    /// loopback-only rule applies.
    pub(crate) fn validate_for(&self, own_auth: bool) -> Result<(), ConfigError> {
        let addr = self.listen_addr()?;
        if self.server.workers > MAX_WORKERS {
            return Err(invalid("server.workers", format!("is {}, at most {MAX_WORKERS}", self.server.workers)));
        }
        if self.server.accepts_per_worker == 0 || self.server.accepts_per_worker > 64 {
            return Err(invalid("server.accepts_per_worker", "must be between 1 and 64"));
        }
        if self.server.listen_backlog == 0 {
            return Err(invalid("server.listen_backlog", "must be at least 1"));
        }
        if self.server.max_connections > MAX_SLOTS_PER_WORKER * MAX_WORKERS {
            return Err(invalid("server.max_connections", "is beyond what the connection id can address"));
        }
        for (key, v) in
            [("socket.rcvbuf_bytes", self.socket.rcvbuf_bytes), ("socket.sndbuf_bytes", self.socket.sndbuf_bytes)]
        {
            if v != 0 && !(1024..=64 << 20).contains(&v) {
                return Err(invalid(
                    key,
                    format!("is {v}, must be 0 (left to the kernel) or between 1024 and 67108864"),
                ));
            }
        }
        let t = &self.timeouts;
        if !(10..=60_000).contains(&t.tick_ms) {
            return Err(invalid("timeouts.tick_ms", format!("is {}, must be between 10 and 60000", t.tick_ms)));
        }
        // Before any relation between them: a value past the bound was cut
        // to the wheel's reach without a word, or blamed on another check.
        let timeouts = [
            ("timeouts.login_timeout_ms", t.login_timeout_ms),
            ("timeouts.heartbeat_interval_ms", t.heartbeat_interval_ms),
            ("timeouts.idle_timeout_ms", t.idle_timeout_ms),
            ("timeouts.close_linger_ms", t.close_linger_ms),
            ("timeouts.message_timeout_ms", t.message_timeout_ms),
        ];
        for (key, v) in timeouts.into_iter().chain([("delivery.ack_timeout_ms", self.delivery.ack_timeout_ms)]) {
            if v > MAX_TIMEOUT_MS {
                return Err(invalid(
                    key,
                    format!("is {v} ms, at most {MAX_TIMEOUT_MS} (32 bits of milliseconds, about 49.7 days)"),
                ));
            }
        }
        if self.auth.jwt_leeway_s > MAX_JWT_LEEWAY_S {
            return Err(invalid(
                "auth.jwt_leeway_s",
                format!(
                    "is {} s, at most {MAX_JWT_LEEWAY_S} (a day): it is the clock skew forgiven on a token's exp and nbf",
                    self.auth.jwt_leeway_s
                ),
            ));
        }
        for (key, v) in timeouts {
            if v < t.tick_ms {
                return Err(invalid(
                    key,
                    format!("is {v} ms, shorter than one tick (timeouts.tick_ms = {})", t.tick_ms),
                ));
            }
        }
        if t.idle_timeout_ms <= t.heartbeat_interval_ms {
            return Err(invalid(
                "timeouts.idle_timeout_ms",
                format!(
                    "({}) must be longer than timeouts.heartbeat_interval_ms ({}): the client needs time to answer the PING",
                    t.idle_timeout_ms, t.heartbeat_interval_ms
                ),
            ));
        }
        if self.timeouts_in_ticks().validate().is_err() {
            return Err(invalid("timeouts.idle_timeout_ms", "and heartbeat_interval_ms fall into the same tick"));
        }
        for o in &self.websocket.allowed_origins {
            if !origin_entry_ok(o) {
                return Err(invalid(
                    "websocket.allowed_origins",
                    format!(
                        "has {o:?}: each entry is an origin as a browser sends it, scheme://host[:port] with no \
                         path (e.g. \"https://app.example.com\"), or \"*\" for any"
                    ),
                ));
            }
        }
        for h in &self.admin.allowed_hosts {
            if !host_entry_ok(h) {
                return Err(invalid(
                    "admin.allowed_hosts",
                    format!("has {h:?}: each entry is a host name or address, with or without :port (e.g. \"push-api.internal\")"),
                ));
            }
        }
        let l = &self.limits;
        if !(MIN_MAX_FRAME_BYTES..=PROTOCOL_MAX_FRAME_BYTES).contains(&l.max_frame_bytes) {
            return Err(invalid(
                "limits.max_frame_bytes",
                format!(
                    "is {}, must be between {MIN_MAX_FRAME_BYTES} and {PROTOCOL_MAX_FRAME_BYTES}",
                    l.max_frame_bytes
                ),
            ));
        }
        if l.outbound_max_frames == 0 {
            return Err(invalid("limits.outbound_max_frames", "must be at least 1"));
        }
        if l.outbound_max_bytes < l.max_frame_bytes {
            return Err(invalid(
                "limits.outbound_max_bytes",
                format!(
                    "({}) must hold at least one frame of limits.max_frame_bytes ({})",
                    l.outbound_max_bytes, l.max_frame_bytes
                ),
            ));
        }
        if l.outbound_max_bytes > u32::MAX as usize {
            return Err(invalid("limits.outbound_max_bytes", "must be below 4 GiB"));
        }
        if !(16..=1 << 24).contains(&l.mailbox_capacity) {
            return Err(invalid("limits.mailbox_capacity", "must be between 16 and 16777216"));
        }
        // Before the partial budget, which a message limit past its own
        // bound makes too small.
        let msg = self.websocket.message_limit(l.max_frame_bytes);
        if !(125..=PROTOCOL_MAX_FRAME_BYTES * 2).contains(&msg) {
            return Err(invalid(
                "websocket.max_message_bytes",
                format!("is {msg}, must be between 125 and {}", PROTOCOL_MAX_FRAME_BYTES * 2),
            ));
        }
        let min_partial = self.min_partial_bytes_per_worker();
        if l.partial_bytes_per_worker < min_partial {
            return Err(invalid(
                "limits.partial_bytes_per_worker",
                format!(
                    "is {}, must be at least {min_partial}: four of the largest messages a client may send \
                     (websocket.max_message_bytes or limits.max_frame_bytes)",
                    l.partial_bytes_per_worker
                ),
            ));
        }
        // A burst without its rate would silently do nothing; a bytes
        // burst below the largest payload would refuse that payload for
        // ever, however long the client waits.
        if l.send_rate == 0 && l.send_burst != 0 {
            return Err(invalid("limits.send_burst", "is set but limits.send_rate is 0 (no limit): set both"));
        }
        if l.send_bytes_rate == 0 && l.send_bytes_burst != 0 {
            return Err(invalid(
                "limits.send_bytes_burst",
                "is set but limits.send_bytes_rate is 0 (no limit): set both",
            ));
        }
        if l.send_bytes_rate != 0 && l.send_bytes_burst() < l.max_frame_bytes as u64 {
            return Err(invalid(
                "limits.send_bytes_burst",
                format!(
                    "is {}, must be at least limits.max_frame_bytes ({}): a larger message could never be sent",
                    l.send_bytes_burst, l.max_frame_bytes
                ),
            ));
        }
        if l.max_conns_per_user == 0 || l.max_conns_per_user > 1024 {
            return Err(invalid("limits.max_conns_per_user", "must be between 1 and 1024"));
        }
        let dev = self.jwt_secret().1 && !own_auth;
        if dev && !addr.ip().is_loopback() {
            return Err(invalid(
                "auth.jwt_secret",
                format!(
                    "is the built-in development secret (unset, or set to that published value), which is only allowed on loopback addresses (server.listen is {addr}); set auth.jwt_secret or {JWT_SECRET_ENV} to a secret of your own"
                ),
            ));
        }
        if !own_auth {
            check_jwt_secret(&self.jwt_secret().0)?;
        }
        let d = &self.delivery;
        if !(1..=4096).contains(&d.window) {
            return Err(invalid("delivery.window", format!("is {}, must be between 1 and 4096", d.window)));
        }
        if d.window_bytes == 0 {
            return Err(invalid("delivery.window_bytes", "must be at least 1"));
        }
        if d.ack_timeout_ms < t.tick_ms {
            return Err(invalid(
                "delivery.ack_timeout_ms",
                format!("is {} ms, shorter than one tick (timeouts.tick_ms = {})", d.ack_timeout_ms, t.tick_ms),
            ));
        }
        if !(1..=65_535).contains(&d.first_page) || !(1..=65_535).contains(&d.max_fetch) {
            return Err(invalid("delivery.first_page", "and delivery.max_fetch must be between 1 and 65535"));
        }
        if self.rooms.max_rooms_per_conn == 0 || self.rooms.max_rooms_per_conn > 4096 {
            return Err(invalid("rooms.max_rooms_per_conn", "must be between 1 and 4096"));
        }
        if self.rooms.max_members_per_room == 0 {
            return Err(invalid("rooms.max_members_per_room", "must be at least 1"));
        }
        if self.rooms.max_rooms == 0 {
            return Err(invalid("rooms.max_rooms", "must be at least 1"));
        }
        if let Some(t) = &self.admin.token {
            if t.len() < MIN_ADMIN_TOKEN_BYTES {
                return Err(invalid(
                    "admin.token",
                    format!("is {} bytes, must be at least {MIN_ADMIN_TOKEN_BYTES} (a guessable token guards nothing, on loopback too)", t.len()),
                ));
            }
        }
        if let Some(t) = &self.admin.read_token {
            if t.len() < MIN_ADMIN_TOKEN_BYTES {
                return Err(invalid(
                    "admin.read_token",
                    format!("is {} bytes, must be at least {MIN_ADMIN_TOKEN_BYTES}", t.len()),
                ));
            }
            if self.admin.token.is_none() {
                return Err(invalid("admin.read_token", "needs admin.token too (else writes would need no key)"));
            }
            if self.admin.token.as_deref() == Some(t) {
                return Err(invalid("admin.read_token", "must differ from admin.token"));
            }
        }
        if !(1..=16_384).contains(&self.admin.max_connections) {
            return Err(invalid("admin.max_connections", "must be between 1 and 16384"));
        }
        if !(1024..=1 << 30).contains(&self.admin.max_body_bytes)
            || self.admin.max_batch_bytes < self.admin.max_body_bytes
        {
            return Err(invalid(
                "admin.max_body_bytes",
                "must be between 1 KiB and 1 GiB, and admin.max_batch_bytes at least as large",
            ));
        }
        if self.admin.max_batch_bytes > 1 << 30 {
            return Err(invalid("admin.max_batch_bytes", "must be at most 1 GiB"));
        }
        self.cluster.validate(self.store.kind)?;
        if self.admin.max_batch_commands == 0 {
            return Err(invalid("admin.max_batch_commands", "must be at least 1"));
        }
        if self.admin.header_timeout_ms == 0 || self.admin.body_timeout_ms == 0 {
            return Err(invalid("admin.header_timeout_ms", "and admin.body_timeout_ms must be at least 1"));
        }
        if !self.admin.listen.is_empty() {
            let a: SocketAddr = self.admin.listen.parse().map_err(|_| {
                invalid(
                    "admin.listen",
                    format!("{:?} is not an IP:port address (or empty to disable)", self.admin.listen),
                )
            })?;
            if shares_a_port(a, addr) {
                return Err(invalid(
                    "admin.listen",
                    format!("({a}) is on the port of server.listen ({addr}): give each listener a port of its own"),
                ));
            }
            if let Some(w) = self.websocket.listen_addr()?.filter(|&w| shares_a_port(a, w)) {
                return Err(invalid(
                    "admin.listen",
                    format!("({a}) is on the port of websocket.listen ({w}): give each listener a port of its own"),
                ));
            }
            if !a.ip().is_loopback() && self.admin.token.is_none() {
                return Err(invalid(
                    "admin.token",
                    format!("must be set (16 bytes or more) when admin.listen ({a}) is not a loopback address"),
                ));
            }
        }
        let ws = &self.websocket;
        if let Some(a) = ws.listen_addr()? {
            if shares_a_port(a, addr) {
                return Err(invalid(
                    "websocket.listen",
                    format!(
                        "({a}) is on the port of server.listen ({addr}); use websocket.sniff_on_raw_port to share one port"
                    ),
                ));
            }
            if dev && !a.ip().is_loopback() {
                return Err(invalid(
                    "auth.jwt_secret",
                    format!(
                        "is the built-in development secret (unset, or set to that published value), which is only allowed on loopback addresses (websocket.listen is {a}); set auth.jwt_secret or {JWT_SECRET_ENV} to a secret of your own"
                    ),
                ));
            }
        }
        if !(1024..=65536).contains(&ws.max_handshake_bytes) {
            return Err(invalid("websocket.max_handshake_bytes", "must be between 1024 and 65536"));
        }
        if ws.conformance_echo {
            // Every address where an upgrade may arrive must be loopback.
            let mut ws_addrs: Vec<SocketAddr> = ws.listen_addr()?.into_iter().collect();
            if ws.sniff_on_raw_port {
                ws_addrs.push(addr);
            }
            let why = match ws_addrs.iter().find(|a| !a.ip().is_loopback()) {
                _ if ws_addrs.is_empty() => {
                    Some("no WebSocket listener is configured (websocket.listen is empty)".into())
                }
                Some(a) => Some(format!("{a} is not a loopback address")),
                None => None,
            };
            if let Some(why) = why {
                return Err(invalid(
                    "websocket.conformance_echo",
                    format!(
                        "is a test mode (every text and binary message is echoed back, without a login) and is \
                         allowed only with WebSocket on loopback addresses: {why}; set websocket.listen to \
                         127.0.0.1:PORT (and websocket.sniff_on_raw_port = false unless server.listen is loopback \
                         too), or turn conformance_echo off"
                    ),
                ));
            }
        }
        // Past the kernel's largest rings (IORING_MAX_ENTRIES, and twice
        // it for the completion queue) io_uring_setup fails with EINVAL,
        // which read as "io_uring is unavailable" at start.
        if !(256..=32_768).contains(&self.uring.sq_entries) || !self.uring.sq_entries.is_power_of_two() {
            return Err(invalid("uring.sq_entries", "must be a power of two from 256 to 32768 (the kernel's largest)"));
        }
        if !(self.uring.sq_entries..=65_536).contains(&self.uring.cq_entries)
            || !self.uring.cq_entries.is_power_of_two()
        {
            return Err(invalid(
                "uring.cq_entries",
                "must be a power of two from uring.sq_entries to 65536 (the kernel's largest)",
            ));
        }
        if !self.uring.recv_buffers.is_power_of_two() || self.uring.recv_buffers > 1 << 15 {
            return Err(invalid("uring.recv_buffers", "must be a power of two, at most 32768"));
        }
        if !(4096..=1 << 20).contains(&self.uring.recv_buffer_bytes) {
            return Err(invalid("uring.recv_buffer_bytes", "must be between 4096 and 1048576"));
        }
        self.store.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("[timeouts]\nheartbeat_ms = 5\n").unwrap_err().to_string();
        assert!(e.contains("heartbeat_ms"), "{e}");
    }

    #[test]
    fn bad_relation_names_the_key() {
        let e = Config::from_toml("[timeouts]\nheartbeat_interval_ms = 5000\nidle_timeout_ms = 4000\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeouts.idle_timeout_ms"), "{e}");
        let e = Config::from_toml("[server]\nlisten = \"nope\"\n").unwrap_err().to_string();
        assert!(e.contains("server.listen"), "{e}");
    }

    #[test]
    fn conformance_echo_is_refused_off_loopback() {
        assert!(!Config::default().websocket.conformance_echo, "off by default");
        let on = |extra: &str| Config::from_toml(&format!("[websocket]\nconformance_echo = true\n{extra}"));
        assert!(on("").is_ok(), "the default WebSocket address is loopback");
        assert!(on("listen = \"[::1]:0\"\n").is_ok());
        let secret = "[auth]\njwt_secret = \"a secret of at least 16 bytes\"\n";
        let e = on(&format!("listen = \"0.0.0.0:7710\"\n{secret}")).unwrap_err().to_string();
        assert!(e.contains("websocket.conformance_echo") && e.contains("0.0.0.0:7710 is not a loopback"), "{e}");
        let e = on("listen = \"\"\n").unwrap_err().to_string();
        assert!(e.contains("no WebSocket listener"), "{e}");
        // Sniffing brings upgrades to server.listen too.
        let raw_off_loopback = format!("sniff_on_raw_port = true\n[server]\nlisten = \"0.0.0.0:7700\"\n{secret}");
        let e = on(&raw_off_loopback).unwrap_err().to_string();
        assert!(e.contains("0.0.0.0:7700 is not a loopback"), "{e}");
        assert!(on("listen = \"\"\nsniff_on_raw_port = true\n").is_ok(), "sniffing on a loopback raw port");
    }

    #[test]
    fn dev_secret_is_refused_off_loopback() {
        if std::env::var(JWT_SECRET_ENV).is_ok() {
            return; // the environment supplies a real secret
        }
        let e = Config::from_toml("[server]\nlisten = \"0.0.0.0:7700\"\n").unwrap_err().to_string();
        assert!(e.contains("auth.jwt_secret"), "{e}");
        assert!(Config::from_toml("[server]\nlisten = \"0.0.0.0:7700\"\n[auth]\njwt_secret = \"0123456789abcdef\"\n")
            .is_ok());
    }

    #[test]
    fn detected_worker_counts_stay_within_the_connection_id() {
        let auto = ServerConfig { workers: 0, ..ServerConfig::default() };
        assert_eq!(auto.worker_count(2), 2);
        assert_eq!(auto.worker_count(0), 1);
        assert_eq!(auto.worker_count(300), MAX_WORKERS, "300 CPUs: 256 workers, no wrapped worker id");
        let explicit = ServerConfig { workers: 8, ..ServerConfig::default() };
        assert_eq!(explicit.worker_count(300), 8);
        let too_many = format!("[server]\nworkers = {}\n", MAX_WORKERS + 1);
        assert!(Config::from_toml(&too_many).unwrap_err().to_string().contains("server.workers"));
    }

    #[test]
    fn the_development_secret_is_refused_off_loopback_however_it_is_given() {
        let explicit = format!("[server]\nlisten = \"0.0.0.0:7700\"\n[auth]\njwt_secret = \"{DEV_JWT_SECRET}\"\n");
        let e = Config::from_toml(&explicit).unwrap_err().to_string();
        assert!(e.contains("auth.jwt_secret") && e.contains("development secret"), "{e}");
        let ws = format!("[websocket]\nlisten = \"0.0.0.0:7710\"\n[auth]\njwt_secret = \"{DEV_JWT_SECRET}\"\n");
        assert!(Config::from_toml(&ws).is_err());
        let on_loopback = format!("[auth]\njwt_secret = \"{DEV_JWT_SECRET}\"\n");
        let c = Config::from_toml(&on_loopback).unwrap();
        assert!(c.jwt_secret().1, "an explicit development secret is still the development secret");
    }

    #[test]
    fn admin_tokens_are_16_bytes_or_more_everywhere() {
        let short = "[admin]\nlisten = \"127.0.0.1:7701\"\ntoken = \"short\"\n";
        let e = Config::from_toml(short).unwrap_err().to_string();
        assert!(e.contains("admin.token"), "{e}");
        assert!(Config::from_toml("[admin]\nlisten = \"127.0.0.1:7701\"\ntoken = \"\"\n").is_err());
        assert!(Config::from_toml("[admin]\nlisten = \"127.0.0.1:7701\"\ntoken = \"0123456789abcdef\"\n").is_ok());
        assert!(Config::from_toml("[admin]\nlisten = \"0.0.0.0:7701\"\n").is_err(), "off loopback a token is required");
    }

    #[test]
    fn the_send_budget_is_off_by_default_and_its_bursts_are_checked() {
        assert_eq!(Config::default().limits.send_limit(), None);
        assert_eq!(Config::default().limits.send_max_refused, 1000);
        let c = Config::from_toml("[limits]\nsend_rate = 50\nsend_bytes_rate = 1000\n").unwrap();
        assert_eq!(c.limits.send_burst(), 50, "a second's worth");
        assert_eq!(c.limits.send_bytes_burst(), 65536, "at least the largest frame");
        assert!(c.limits.send_limit().is_some());
        let e = Config::from_toml("[limits]\nsend_burst = 5\n").unwrap_err().to_string();
        assert!(e.contains("limits.send_burst") && e.contains("send_rate is 0"), "{e}");
        let e = Config::from_toml("[limits]\nsend_bytes_burst = 5\n").unwrap_err().to_string();
        assert!(e.contains("limits.send_bytes_burst"), "{e}");
        let e =
            Config::from_toml("[limits]\nsend_bytes_rate = 100\nsend_bytes_burst = 1000\n").unwrap_err().to_string();
        assert!(e.contains("at least limits.max_frame_bytes (65536)"), "{e}");
    }

    #[test]
    fn ticks_round_up() {
        let mut c = Config::default();
        c.timeouts.tick_ms = 100;
        c.timeouts.login_timeout_ms = 250;
        assert_eq!(c.timeouts_in_ticks().login, 4, "3 ticks rounded up, plus the tick we are in");
    }
}

#[cfg(test)]
mod store_section {
    use super::*;

    #[test]
    fn defaults_are_the_spec_and_bad_values_name_the_key() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.store.kind, StoreKind::Disk);
        assert_eq!(c.store.path, std::path::PathBuf::from("switchboard-data"));
        assert_eq!(c.store.durability, Durability::Fsync);
        assert_eq!(
            (c.store.ttl_ms, c.store.max_messages_per_inbox, c.store.max_bytes, c.store.queue_capacity),
            (604_800_000, 100_000, 1_073_741_824, 65_536)
        );
        assert_eq!(c.store.shards, 1, "one shard unless asked (store/shards.rs says why)");
        assert_eq!(c.store.queue_max_bytes, 64 << 20);
        assert_eq!(c.store.max_journal_mib, 128, "docs/DEPLOY.md, \"Disk\", has the restart times behind it");
        assert_eq!(c.cluster.queue_max_bytes, 64 << 20);
        let c = Config::from_toml("[store]\nkind = \"memory\"\ndurability = \"os\"\n").unwrap();
        assert_eq!((c.store.kind, c.store.durability), (StoreKind::Memory, Durability::Os));
        for (toml, key) in [
            ("kind = \"redis\"", "kind"),
            ("path = \"\"", "store.path"),
            ("ttl_ms = 10", "store.ttl_ms"),
            ("max_messages_per_inbox = 0", "store.max_messages_per_inbox"),
            ("max_bytes = 1000", "store.max_bytes"),
            ("write_buffer_mib = 0", "store.write_buffer_mib"),
            ("max_journal_mib = 63", "store.max_journal_mib"),
            ("max_journal_mib = 1048577", "store.max_journal_mib"),
            ("shards = 0", "store.shards"),
            ("shards = 65", "store.shards"),
            ("queue_capacity = 1", "store.queue_capacity"),
            ("queue_max_bytes = 1000", "store.queue_max_bytes"),
            ("queue_max_bytes = 2000000000000", "store.queue_max_bytes"),
            ("retention_interval_ms = 10", "store.retention_interval_ms"),
            ("durabilty = \"os\"", "durabilty"),
        ] {
            let e = Config::from_toml(&format!("[store]\n{toml}\n")).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        assert!(Config::from_toml("[store]\nkind = \"none\"\npath = \"\"\n").is_ok(), "no path needed without a disk");
    }

    /// Rings past the kernel's largest passed the check and failed at
    /// start as if io_uring were missing, without naming the key.
    /// The admin API or WebSocket on the raw TCP address was found only
    /// at bind time, as "address in use" by the server's own pid (exit 1,
    /// which a supervisor retries); it is a configuration error naming
    /// both keys.
    #[test]
    fn a_listener_on_another_listeners_address_is_refused_naming_both_keys() {
        let secret = "[auth]\njwt_secret = \"a secret of at least 16 bytes\"\n";
        for (toml, key, other) in [
            ("[server]\nlisten = \"127.0.0.1:17900\"\n[admin]\nlisten = \"127.0.0.1:17900\"\n", "admin.listen", "server.listen"),
            ("[admin]\nlisten = \"127.0.0.1:7710\"\n", "admin.listen", "websocket.listen"),
            ("[server]\nlisten = \"0.0.0.0:17900\"\n[admin]\nlisten = \"127.0.0.1:17900\"\ntoken = \"0123456789abcdef\"\n", "admin.listen", "server.listen"),
            ("[server]\nlisten = \"127.0.0.1:17900\"\n[websocket]\nlisten = \"0.0.0.0:17900\"\n", "websocket.listen", "server.listen"),
        ] {
            let e = Config::from_toml(&format!("{toml}{secret}")).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(other), "{toml}: {e}");
        }
        // Port 0 (any free port) and other ports are fine.
        assert!(Config::from_toml("[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n").is_ok());
        assert!(Config::from_toml("[admin]\nlisten = \"127.0.0.1:7701\"\n").is_ok());
        assert!(Config::from_toml("[admin]\nlisten = \"[::1]:7700\"\n").is_ok(), "another address, same port");
    }

    /// Timeouts past what the wheel holds were cut to it without a word
    /// (a login timeout of 9e15 ms kept an unauthenticated connection for
    /// decades), and a huge heartbeat was blamed on the tick. Each is
    /// refused first, by name, with its limit.
    #[test]
    fn timeouts_past_what_the_implementation_holds_are_refused_by_name() {
        let huge = 9_000_000_000_000_000u64;
        for (toml, key, limit) in [
            (format!("[timeouts]\nlogin_timeout_ms = {huge}"), "timeouts.login_timeout_ms", "4294967295"),
            (format!("[timeouts]\nmessage_timeout_ms = {huge}"), "timeouts.message_timeout_ms", "4294967295"),
            (format!("[timeouts]\nclose_linger_ms = {huge}"), "timeouts.close_linger_ms", "4294967295"),
            (
                format!("[timeouts]\nheartbeat_interval_ms = {huge}\nidle_timeout_ms = {}", huge + 1000),
                "timeouts.heartbeat_interval_ms",
                "4294967295",
            ),
            (format!("[timeouts]\nidle_timeout_ms = {huge}"), "timeouts.idle_timeout_ms", "4294967295"),
            (format!("[delivery]\nack_timeout_ms = {huge}"), "delivery.ack_timeout_ms", "4294967295"),
            ("[auth]\njwt_leeway_s = 100000000".to_string(), "auth.jwt_leeway_s", "86400"),
        ] {
            let e = Config::from_toml(&toml).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(limit), "{toml}: {e}");
            assert!(!e.contains("same tick"), "{toml}: {e}");
        }
        let at_limit = "[timeouts]\nlogin_timeout_ms = 4294967295\nheartbeat_interval_ms = 4294900000\n\
                        idle_timeout_ms = 4294967295\nmessage_timeout_ms = 4294967295\nclose_linger_ms = 4294967295\n\
                        [delivery]\nack_timeout_ms = 4294967295\n[auth]\njwt_leeway_s = 86400\n";
        let c = Config::from_toml(at_limit).unwrap();
        let t = c.timeouts_in_ticks();
        assert_eq!(t.login as u64, 4_294_967_295u64.div_ceil(1000) + 1, "not cut short");
    }

    /// A WebSocket message limit past its ceiling was blamed on
    /// limits.partial_bytes_per_worker, which it made too small.
    #[test]
    fn a_websocket_message_limit_past_its_ceiling_is_named_before_the_partial_budget() {
        let e = Config::from_toml("[websocket]\nmax_message_bytes = 100000000000\n").unwrap_err().to_string();
        assert!(e.contains("websocket.max_message_bytes") && e.contains("33554432"), "{e}");
        assert!(!e.contains("partial_bytes_per_worker"), "{e}");
    }

    /// The names `named` reads a key's values by are the ones serde writes
    /// them as (the enums' `rename_all`): one list cannot drift from the
    /// other.
    #[test]
    fn named_values_are_spelled_as_serde_spells_them() {
        fn same<T: Named + serde::Serialize>() {
            for (name, v) in T::NAMES.iter().zip(T::VALUES) {
                assert_eq!(serde_json::to_value(v).unwrap(), serde_json::Value::String(name.to_string()));
            }
        }
        same::<IoDriver>();
        same::<PollerKind>();
        same::<SlowConsumer>();
        same::<SendDefault>();
        same::<DemoPage>();
        same::<StoreKind>();
        same::<Durability>();
    }

    /// A value of the wrong type for a key of named values (`demo_page =
    /// true`) was answered with TOML's "wanted string or table"; the
    /// error lists the values the key takes, as for an unknown one.
    #[test]
    fn a_wrong_value_for_a_key_of_named_values_lists_them() {
        for (toml, values) in [
            ("[websocket]\ndemo_page = true", ["on", "off", "auto"].as_slice()),
            ("[websocket]\ndemo_page = {}", &["on", "off", "auto"]),
            ("[websocket]\ndemo_page = \"yes\"", &["on", "off", "auto"]),
            ("[server]\nio_driver = 1", &["auto", "io_uring", "epoll"]),
            ("[server]\npoller = false", &["epoll", "io_uring"]),
            ("[limits]\nslow_consumer = []", &["close", "drop_oldest"]),
            ("[store]\nkind = true", &["disk", "memory", "redis", "none"]),
            ("[store]\ndurability = 1", &["fsync", "os"]),
            ("[delivery]\nsend_default = true", &["reliable", "at_most_once"]),
        ] {
            let e = Config::from_toml(toml).unwrap_err().to_string();
            for v in values {
                assert!(e.contains(&format!("`{v}`")), "{toml}: {v} missing from {e}");
            }
        }
        let c = Config::from_toml("[websocket]\ndemo_page = \"off\"\n[server]\npoller = \"io_uring\"\n").unwrap();
        assert_eq!((c.websocket.demo_page, c.server.poller), (DemoPage::Off, PollerKind::IoUring));
    }

    #[test]
    fn ring_sizes_past_the_kernels_largest_are_refused_by_name() {
        for (toml, key) in [
            ("sq_entries = 65536\ncq_entries = 65536", "uring.sq_entries"),
            ("sq_entries = 128", "uring.sq_entries"),
            ("cq_entries = 131072", "uring.cq_entries"),
            ("cq_entries = 2048", "uring.cq_entries"),
        ] {
            let e = Config::from_toml(&format!("[uring]\n{toml}\n")).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        assert!(Config::from_toml("[uring]\nsq_entries = 32768\ncq_entries = 65536\n").is_ok());
    }

    #[test]
    fn the_batch_wait_defaults_by_durability_and_has_a_ceiling() {
        use std::time::Duration;
        let wait = |toml: &str| Config::from_toml(toml).unwrap().store.batch_wait();
        assert_eq!(wait(""), Duration::ZERO, "fsync: the fdatasync gathers the next batch");
        assert_eq!(wait("[store]\ndurability = \"os\"\n"), Duration::from_millis(1));
        let memory = Duration::from_millis(1);
        assert_eq!(wait("[store]\nkind = \"memory\"\n"), memory, "no sync to gather the next batch");
        assert_eq!(wait("[store]\nkind = \"memory\"\ndurability = \"os\"\n"), memory);
        assert_eq!(wait("[store]\nkind = \"memory\"\nbatch_wait_us = 0\n"), Duration::ZERO);
        assert_eq!(wait("[store]\nkind = \"none\"\n"), Duration::ZERO, "no store thread");
        assert_eq!(wait("[store]\ndurability = \"os\"\nbatch_wait_us = 0\n"), Duration::ZERO);
        assert_eq!(wait("[store]\nbatch_wait_us = 250\n"), Duration::from_micros(250));
        assert_eq!(wait("[store]\nbatch_wait_us = 100000\n"), Duration::from_millis(100));
        let e = Config::from_toml("[store]\nbatch_wait_us = 100001\n").unwrap_err().to_string();
        assert!(e.contains("store.batch_wait_us") && e.contains("at most 100000"), "{e}");
    }
}

#[cfg(test)]
mod socket_buffers {
    use super::*;

    #[test]
    fn zero_leaves_them_to_the_kernel_and_a_set_size_has_bounds() {
        let mut c = Config::default();
        assert_eq!((c.socket.rcvbuf_bytes, c.socket.sndbuf_bytes), (0, 0), "autotuned by default");
        c.validate().unwrap();
        c.socket.rcvbuf_bytes = 4096;
        c.socket.sndbuf_bytes = 64 << 20;
        c.validate().unwrap();
        c.socket.rcvbuf_bytes = 1023;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("socket.rcvbuf_bytes") && e.contains("0 (left to the kernel)"), "{e}");
        c.socket.rcvbuf_bytes = 0;
        c.socket.sndbuf_bytes = (64 << 20) + 1;
        assert!(c.validate().unwrap_err().to_string().contains("socket.sndbuf_bytes"));
    }

    #[test]
    fn origins_and_admin_hosts_that_could_never_match_are_refused() {
        for bad in ["not a url", "", "https://app.example.com/", "app.example.com", "https://"] {
            let toml = format!("[websocket]\nallowed_origins = [{bad:?}]\n");
            let e = Config::from_toml(&toml).unwrap_err().to_string();
            assert!(e.contains("websocket.allowed_origins"), "{bad:?}: {e}");
        }
        for good in ["*", "null", "https://app.example.com", "http://localhost:8080", "chrome-extension://abc"] {
            let toml = format!("[websocket]\nallowed_origins = [{good:?}]\n");
            assert!(Config::from_toml(&toml).is_ok(), "{good:?}");
        }
        for bad in ["", "a b", "http://x", "x/y"] {
            let toml = format!("[admin]\nallowed_hosts = [{bad:?}]\n");
            let e = Config::from_toml(&toml).unwrap_err().to_string();
            assert!(e.contains("admin.allowed_hosts"), "{bad:?}: {e}");
        }
        for good in ["push-api.internal", "10.0.0.5:7701", "[::1]:7701"] {
            let toml = format!("[admin]\nallowed_hosts = [{good:?}]\n");
            assert!(Config::from_toml(&toml).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn a_redis_urls_password_is_left_out_of_what_is_logged() {
        assert_eq!(redacted_url("redis://:s3cret@10.0.0.5:6379/0"), "redis://:***@10.0.0.5:6379/0");
        assert_eq!(redacted_url("redis://app:s3cret@h:1"), "redis://app:***@h:1");
        assert_eq!(redacted_url("redis://app@h:1"), "redis://app@h:1");
        assert_eq!(redacted_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redacted_url("valkey://:a@b@h:1"), "valkey://:***@h:1");
        let addrs = RedisAddrs::Cluster(vec!["redis://:pw@a:7000".into(), "redis://b:7001".into()]);
        assert_eq!(addrs.redacted(), ["redis://:***@a:7000", "redis://b:7001"]);
    }

    #[test]
    fn cluster_takes_one_redis_or_a_list_and_needs_a_shared_store() {
        let one =
            Config::from_toml("[store]\nkind = \"redis\"\n[cluster]\nredis = \"redis://127.0.0.1:6379\"\n").unwrap();
        assert_eq!(one.cluster.redis, Some(RedisAddrs::Single("redis://127.0.0.1:6379".into())));
        let many = Config::from_toml(
            "[store]\nkind = \"none\"\n[cluster]\nredis = [\"redis://a:7000\", \"redis://b:7001\"]\nnode_id = \"gw-1\"\n",
        )
        .unwrap();
        assert!(many.cluster.redis.as_ref().unwrap().is_cluster());
        assert_eq!(many.cluster.redis.unwrap().urls().len(), 2);
        let e = Config::from_toml("[cluster]\nredis = \"redis://127.0.0.1:6379\"\n").unwrap_err().to_string();
        assert!(e.contains("store.kind") && e.contains("\"disk\""), "{e}");
        let e = Config::from_toml("[store]\nkind = \"redis\"\n").unwrap_err().to_string();
        assert!(e.contains("cluster.redis"), "{e}");
        let e =
            Config::from_toml("[store]\nkind = \"none\"\n[cluster]\nredis = \"http://x\"\n").unwrap_err().to_string();
        assert!(e.contains("not a redis:// URL"), "{e}");
        // This build has no TLS for Redis: refused at the config, not
        // retried for ever at run time.
        let e = Config::from_toml("[store]\nkind = \"none\"\n[cluster]\nredis = \"rediss://:pw@x:6380\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.redis") && e.contains("TLS") && !e.contains("pw"), "{e}");
        let e = Config::from_toml("[store]\nkind = \"none\"\n[cluster]\nredis = \"redis://x\"\nnode_id = \"a b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.node_id"), "{e}");
        let e = Config::from_toml(
            "[store]\nkind = \"none\"\n[cluster]\nredis = \"redis://x\"\nheartbeat_ms = 1000\nnode_ttl_ms = 1500\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cluster.node_ttl_ms"), "{e}");
        let id = ClusterConfig::default().node_id_or_default(7700);
        assert!(id.ends_with(&format!(":7700/{}", std::process::id())) && id.len() > 5, "{id}");
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The example file in the repository documents the defaults: it must
    /// parse, and say exactly what the built-in defaults are.
    #[test]
    fn example_file_is_the_defaults() {
        let text = include_str!("../switchboard.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }
}
