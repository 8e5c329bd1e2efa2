//! The embedding API: build and start a server, then push through a handle.
//!
//! Owns: `ServerBuilder`, `Server` (the running threads) and the methods of
//! `Handle` (the cloneable `Send + Sync` entry point for any thread). The
//! types they take and return are in `app.rs`, re-exported here. The state
//! behind them (`Shared`), the `Handle` type itself (the runtime hands it to
//! the application's hook) and the commands that cross into a worker
//! (`Command`) are the runtime's (`runtime/shared.rs`): the runtime never
//! imports this module.
//! Must not: change a connection's protocol state (only its worker does,
//! through `proto::conn`). A handle looks up the directory, posts commands
//! to the owning worker's mailbox, and writes frames to a connection
//! through the write path (`runtime/write`), which any thread may use.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use crate::app::{
    CeilingSample, ClientMessage, ClientMessageKind, Published, PushError, Pushed, Receipt, ReliablePush, ServerError,
    StartError,
};
use crate::auth::{Authenticator, JwtHs256};
use crate::config::{Config, ConfigError};
use crate::ids::ConnId;
use crate::proto::codes::CloseCode;
use crate::proto::frame::Frame;
use crate::runtime::Command;
pub use crate::runtime::{Handle, MessageHook};
use crate::stats::Stats;

impl Handle {
    fn check_user(user: &str) -> Result<(), PushError> {
        if !crate::proto::frame::is_valid_user_id(user) {
            return Err(PushError::InvalidUser);
        }
        Ok(())
    }

    /// Refuses once a shutdown was asked for, or once a drained server's
    /// workers stopped (`Server::join`). A drain under way refuses nothing:
    /// the connections still here get pushes until their CLOSE, and the
    /// store takes reliable messages for the devices that left.
    fn check_open(&self) -> Result<(), PushError> {
        if self.shared.shutdown.load(Ordering::Acquire) {
            return Err(PushError::ShuttingDown);
        }
        Ok(())
    }

    /// Posts `cmd(conn)` to the owner of each connection of `user` on
    /// this node.
    fn post_to_user(&self, user: &str, cmd: impl FnMut(ConnId) -> Command) -> Result<usize, PushError> {
        let (queued, targets) = self.shared.post_to_user(user, cmd);
        if queued < targets {
            return Err(PushError::Full { queued, targets });
        }
        Ok(queued)
    }

    /// Pushes `payload` to `user` the way `delivery.send_default` says:
    /// stored (the default, when the server has a store) as
    /// [`Handle::push_reliable`] does, or live only as
    /// [`Handle::push_to_user`] does (then the [`PendingPush`] is already
    /// complete, with `seq` 0).
    pub fn push(&self, user: &str, payload: impl AsRef<[u8]>) -> Result<PendingPush, PushError> {
        if self.shared.reliable_by_default() {
            return self.push_reliable(user, payload, 0);
        }
        let p = self.push_to_user(user, payload)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let r = Receipt { seq: 0, msg_id: p.msg_id, duplicate: false, connections: p.connections, durability: None };
        let _ = tx.send(Ok(r));
        Ok(PendingPush { rx })
    }

    /// Stores `payload` in `user`'s inbox (docs/PROTOCOL.md section 15):
    /// it gets the inbox's next seq, devices get it now or when they next
    /// log in, in order, until they acknowledge it; connections without a
    /// device id get it as a live PUSH. `client_id` (0: none) makes the
    /// push idempotent: the same non-zero id within
    /// `delivery.dedup_window_ms` is stored once and answered with the
    /// first push's seq. Never blocks: the returned [`PendingPush`]
    /// completes once the message is as durable as `store.durability`
    /// promises (wait for it before deleting the application's copy).
    pub fn push_reliable(
        &self,
        user: &str,
        payload: impl AsRef<[u8]>,
        client_id: u64,
    ) -> Result<PendingPush, PushError> {
        self.push_reliable_with(user, payload, ReliablePush { client_id, ..ReliablePush::default() })
    }

    /// [`Handle::push_reliable`] with every option: the idempotency key
    /// and an expiry of the message's own (docs/PROTOCOL.md 15.9): from
    /// `ttl` after it is stored, it is no longer delivered to a device
    /// that did not have it yet.
    pub fn push_reliable_with(
        &self,
        user: &str,
        payload: impl AsRef<[u8]>,
        opts: ReliablePush,
    ) -> Result<PendingPush, PushError> {
        Self::check_user(user)?;
        self.check_open()?;
        let store = self.shared.store.get().ok_or(PushError::NoStore)?;
        let payload = payload.as_ref();
        let max = self.shared.max_inbox_payload("");
        if payload.len() > max {
            return Err(PushError::PayloadTooLarge { len: payload.len(), max });
        }
        // Saturating: a Duration past u64::MAX ms is the longest expiry,
        // not what a cast leaves of it.
        let ttl_ms = opts.ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1));
        let ts_ms = crate::store::unix_ms();
        let msg = crate::store::NewMessage {
            to: Arc::from(user),
            from: Arc::from(""),
            msg_id: self.shared.next_msg_id.fetch_add(1, Ordering::Relaxed),
            ts_ms,
            payload: bytes::Bytes::copy_from_slice(payload),
            client_id: opts.client_id,
            expires_ms: crate::store::expires_at(ts_ms, ttl_ms),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let token =
            crate::runtime::inbox::Token::Append { msg: msg.clone(), reply: crate::runtime::inbox::Reply::Handle(tx) };
        store.try_submit(token, crate::store::Request::Append(msg)).map_err(|_| PushError::StoreBusy)?;
        Ok(PendingPush { rx })
    }

    /// What the store holds for `user`: head seq, the oldest seq kept, and
    /// each device's position. Waits for the store thread (at most
    /// `timeout`); do not call it from the message hook.
    pub fn inbox_state(
        &self,
        user: &str,
        timeout: std::time::Duration,
    ) -> Result<crate::store::InboxState, InboxStateError> {
        self.request_inbox_state(user).map_err(InboxStateError::Push)?.wait_timeout(timeout)
    }

    /// Asks the store for `user`'s inbox state without waiting: the answer
    /// reflects every push submitted before this call (and perhaps some
    /// submitted after it, stored in the same group commit).
    pub fn request_inbox_state(&self, user: &str) -> Result<PendingInboxState, PushError> {
        Self::check_user(user)?;
        let store = self.shared.store.get().ok_or(PushError::NoStore)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let req = crate::store::Request::State { user: Arc::from(user) };
        store.try_submit(crate::runtime::inbox::Token::State(tx), req).map_err(|_| self.refused())?;
        Ok(PendingAnswer { rx })
    }

    /// Forgets `user`'s device `device` (its app signed out, or was
    /// uninstalled) as if unseen for `store.ttl_ms`: its position no longer
    /// keeps messages in the inbox (PROTOCOL.md 15.2). `Ok(false)`: the
    /// store did not know it. Waits for the store thread (at most
    /// `timeout`), which answers once the change is synced; do not call it
    /// from the message hook. Positions its connections hand over after
    /// the forget (the last ACKs of one that closed as the app signed out)
    /// are dropped until the device logs in again; in a cluster, only those
    /// handed over on this node (docs/API.md).
    pub fn forget_device(
        &self,
        user: &str,
        device: &str,
        timeout: std::time::Duration,
    ) -> Result<bool, InboxStateError> {
        self.request_forget_device(user, device).map_err(InboxStateError::Push)?.wait_timeout(timeout)
    }

    /// [`Handle::forget_device`] without waiting.
    pub fn request_forget_device(&self, user: &str, device: &str) -> Result<PendingForget, PushError> {
        Self::check_user(user)?;
        if device.is_empty() || device.len() > crate::proto::frame::MAX_DEVICE_ID_BYTES {
            return Err(PushError::InvalidDevice);
        }
        let store = self.shared.store.get().ok_or(PushError::NoStore)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let req = crate::store::Request::ForgetDevice { user: Arc::from(user), device: Arc::from(device) };
        store.try_submit(crate::runtime::inbox::Token::ForgetDevice(tx), req).map_err(|_| self.refused())?;
        Ok(PendingAnswer { rx })
    }

    /// Why the store's queue refused a request: full, or stopped by a
    /// shutdown (after which a retry cannot help).
    fn refused(&self) -> PushError {
        if self.is_shutting_down() {
            PushError::ShuttingDown
        } else {
            PushError::StoreBusy
        }
    }

    /// Whether [`Handle::push`] and a client's plain SEND store messages
    /// (`delivery.send_default = "reliable"` and a store).
    pub fn reliable_by_default(&self) -> bool {
        self.shared.reliable_by_default()
    }

    /// The store thread's counters (`None` without a store).
    pub fn store_counters(&self) -> Option<Arc<crate::store::StoreCounters>> {
        self.shared.store.get().map(|s| s.counters().clone())
    }

    /// `store.max_bytes`, the bytes of messages the server's own store
    /// holds at most (past it a reliable send is refused: ERROR 114, the
    /// admin API's 507). `None` without a store, or with an application's
    /// own ([`ServerBuilder::custom_store`]), which keeps its own limits.
    /// Compare it with the held bytes of [`Handle::store_counters`].
    pub fn store_max_bytes(&self) -> Option<u64> {
        let own = self.shared.store.get().is_some() && !self.shared.custom_store;
        own.then_some(self.shared.config.store.max_bytes)
    }

    /// Bytes free to this process on the filesystem of the disk store's
    /// directory (`store.path`), read now (`statvfs`). `None` without the
    /// server's own disk store, or if the directory cannot be read. When
    /// the disk fills before `store.max_bytes` is reached, the store stops
    /// at the write it refuses and reliable requests get ERROR 115 until
    /// there is room again (docs/DEPLOY.md, "Disk").
    pub fn store_disk_free_bytes(&self) -> Option<u64> {
        let store = &self.shared.config.store;
        if self.shared.custom_store || store.kind != crate::config::StoreKind::Disk {
            return None;
        }
        crate::limits::free_bytes_at(&store.path).map(|(_, free)| free)
    }

    /// The counters of cross-node work (Redis commands and round trips,
    /// records sent and received, deliveries for other nodes, the state of
    /// the connection to Redis): `None` when this node is not in a
    /// cluster (`cluster.redis` unset). Live: read them at any time.
    pub fn cluster_counters(&self) -> Option<Arc<crate::cluster::ClusterCounters>> {
        self.shared.cluster.get().map(|l| l.counters.clone())
    }

    /// This process's id in the cluster, as other nodes and Redis see it:
    /// `cluster.node_id` (or `<hostname>:<port>`), `/`, the process id
    /// (see `ClusterConfig::node_id_or_default`). `None` when not in a
    /// cluster.
    pub fn node_id(&self) -> Option<String> {
        self.shared.cluster.get().map(|l| l.node_id.to_string())
    }

    /// Pushes `payload` live, at most once, to every connection of `user`
    /// online now, in one PUSH frame encoded once and shared by all of
    /// them; nothing is stored. `Ok` with `connections: 0` means the user
    /// is offline and the message is gone.
    pub fn push_to_user(&self, user: &str, payload: impl AsRef<[u8]>) -> Result<Pushed, PushError> {
        Self::check_user(user)?;
        self.check_open()?;
        let payload = payload.as_ref();
        let max = self.shared.max_push_payload();
        if payload.len() > max {
            return Err(PushError::PayloadTooLarge { len: payload.len(), max });
        }
        // Accepted: the push-to-written latency starts here.
        let accepted = std::time::Instant::now();
        let msg_id = self.shared.next_msg_id.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::Push { msg_id, from: "", payload }.to_bytes().expect("sizes checked above");
        // Written from this thread, straight to each socket (see
        // runtime::write for why).
        let connections = self
            .shared
            .directory
            .lookup(user)
            .iter()
            .filter(|&&c| crate::runtime::deliver_at(&self.shared, c, &frame, Some(accepted)))
            .count();
        if connections > 0 {
            self.shared
                .foreign_counters
                .with(|c| crate::stats::bump(&c.detail.deliveries[crate::stats::DELIVERY_PUSH], connections as u64));
        }
        self.shared.to_cluster(|| crate::cluster::Event::ToUser { user: Arc::from(user), frame });
        Ok(Pushed { msg_id, connections })
    }

    /// Joins every connection of `user` to `room` (each gets a ROOM_ACK with
    /// `req_id` 0). Returns how many connections were asked to join. Room
    /// limits are checked here as far as the handle can see them (room full,
    /// too many rooms); a connection already in `rooms.max_rooms_per_conn`
    /// rooms gets ERROR 104 instead.
    pub fn join_room(&self, user: &str, room: &str) -> Result<usize, PushError> {
        Self::check_user(user)?;
        self.check_open()?;
        self.shared.rooms.would_accept(room)?;
        let room: Arc<str> = Arc::from(room);
        self.shared.to_cluster(|| crate::cluster::Event::Join {
            user: Arc::from(user),
            room: room.clone(),
            join: true,
        });
        self.post_to_user(user, |conn| Command::Join { conn, room: room.clone() })
    }

    /// Takes every connection of `user` out of `room`.
    pub fn leave_room(&self, user: &str, room: &str) -> Result<usize, PushError> {
        Self::check_user(user)?;
        self.check_open()?;
        crate::rooms::check_room_name(room)?;
        let room: Arc<str> = Arc::from(room);
        self.shared.to_cluster(|| crate::cluster::Event::Join {
            user: Arc::from(user),
            room: room.clone(),
            join: false,
        });
        self.post_to_user(user, |conn| Command::Leave { conn, room: room.clone() })
    }

    /// Publishes `payload` to every connection in `room`, as one ROOM_MSG
    /// encoded once (one copy per worker, shared by that worker's members).
    pub fn publish_to_room(&self, room: &str, payload: impl AsRef<[u8]>) -> Result<Published, PushError> {
        crate::rooms::check_room_name(room)?;
        self.check_open()?;
        let payload = payload.as_ref();
        let max = self.shared.max_room_payload(room, "");
        if payload.len() > max {
            return Err(PushError::PayloadTooLarge { len: payload.len(), max });
        }
        let msg_id = self.shared.next_msg_id.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::RoomMsg { msg_id, room, from: "", payload }.to_bytes().expect("sizes checked above");
        let room: Arc<str> = Arc::from(room);
        let accepted_ns = self.shared.since_epoch_ns();
        self.shared.to_cluster(|| crate::cluster::Event::Room { room: room.clone(), frame: frame.clone() });
        let workers =
            self.shared.post_all(frame, |frame| Command::Publish { room: room.clone(), frame, accepted_ns })?;
        Ok(Published { msg_id, workers })
    }

    /// Sends `payload` to every logged-in connection, as a ROOM_MSG with an
    /// empty room name.
    pub fn broadcast(&self, payload: impl AsRef<[u8]>) -> Result<Published, PushError> {
        self.check_open()?;
        let payload = payload.as_ref();
        let max = self.shared.max_room_payload("", "");
        if payload.len() > max {
            return Err(PushError::PayloadTooLarge { len: payload.len(), max });
        }
        let msg_id = self.shared.next_msg_id.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::RoomMsg { msg_id, room: "", from: "", payload }.to_bytes().expect("sizes checked above");
        let accepted_ns = self.shared.since_epoch_ns();
        self.shared.to_cluster(|| crate::cluster::Event::Broadcast(frame.clone()));
        let workers = self.shared.post_all(frame, |frame| Command::Broadcast { frame, accepted_ns })?;
        Ok(Published { msg_id, workers })
    }

    /// Connections in `room` right now, over all workers: one shard read
    /// lock and a hash lookup, cheap enough to call per request.
    pub fn room_size(&self, room: &str) -> u64 {
        self.shared.rooms.size(room)
    }

    /// Rooms with at least one connection.
    pub fn room_count(&self) -> usize {
        self.shared.rooms.room_count()
    }

    /// Benchmark only: has every worker write `payload`, as a ROOM_MSG, to
    /// each of its members of `room` with a plain blocking `send` loop, and
    /// returns each worker's count and wall time. This is the kernel's
    /// floor for a fan-out over exactly the sockets a publish would use.
    /// It blocks the workers while it runs; never call it in production.
    #[doc(hidden)]
    pub fn bench_send_ceiling(&self, room: &str, payload: &[u8]) -> Result<Vec<CeilingSample>, PushError> {
        crate::rooms::check_room_name(room)?;
        let frame = Frame::RoomMsg { msg_id: 0, room, from: "", payload }.to_bytes().map_err(|_| {
            PushError::PayloadTooLarge { len: payload.len(), max: self.shared.max_room_payload(room, "") }
        })?;
        let room: Arc<str> = Arc::from(room);
        let (tx, rx) = std::sync::mpsc::channel();
        let workers = self.shared.post_all(frame, |frame| Command::SendCeiling {
            room: room.clone(),
            frame,
            reply: tx.clone(),
        })?;
        drop(tx);
        Ok((0..workers).filter_map(|_| rx.recv().ok()).collect())
    }

    /// Tests of the supervision path only: makes worker `worker` panic, as
    /// a bug would. The server then stops and [`Server::join`] returns the
    /// error. Never call it in production.
    #[doc(hidden)]
    pub fn crash_worker_for_testing(&self, worker: usize) -> Result<(), PushError> {
        let mb = self.shared.mailboxes.get(worker).ok_or(PushError::Full { queued: 0, targets: 1 })?;
        mb.push(Command::Crash).map_err(|_| PushError::Full { queued: 0, targets: 1 })
    }

    /// Closes every connection of `user` with close code 4003 (kicked).
    /// Returns how many connections were told to close.
    pub fn kick_user(&self, user: &str) -> Result<usize, PushError> {
        Self::check_user(user)?;
        self.check_open()?;
        self.shared.to_cluster(|| crate::cluster::Event::Kick(Arc::from(user)));
        self.post_to_user(user, |conn| Command::Close { conn, code: CloseCode::Kicked })
    }

    /// Closes one connection with `code`.
    pub fn close_connection(&self, conn: ConnId, code: CloseCode) -> Result<(), PushError> {
        self.check_open()?;
        let Some(mb) = self.shared.mailboxes.get(conn.worker().0 as usize) else {
            return Ok(());
        };
        mb.push(Command::Close { conn, code }).map_err(|_| PushError::Full { queued: 0, targets: 1 })
    }

    /// Whether `user` has at least one logged-in connection.
    pub fn is_online(&self, user: &str) -> bool {
        self.shared.directory.is_online(user)
    }

    /// The logged-in connections of `user`.
    pub fn connections_of(&self, user: &str) -> Vec<ConnId> {
        self.shared.directory.lookup(user).to_vec()
    }

    /// Open connections, logged in or not.
    pub fn connection_count(&self) -> u64 {
        self.stats().connections
    }

    /// Logged-in connections.
    pub fn logged_in_count(&self) -> u64 {
        self.stats().logged_in
    }

    /// Users with at least one connection (walks the directory: not for a
    /// hot loop).
    pub fn user_count(&self) -> usize {
        self.shared.directory.user_count()
    }

    /// Users whose last connection closed less than about ten seconds ago:
    /// the directory keeps their entry for a while so that a reconnecting
    /// user does not rebuild it (see `docs/DEPLOY.md`, "Memory per
    /// connection"). Falls to 0 within ~11 s of the last close.
    pub fn offline_retained_count(&self) -> usize {
        self.shared.directory.offline_count()
    }

    /// Counters summed over workers.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for c in self.shared.counters.iter() {
            s.add(c);
        }
        self.shared.foreign_counters.for_each(|c| s.add(c));
        s.mailbox_full = self.shared.mailboxes.iter().map(|m| m.full_count()).sum();
        s
    }

    /// Per-worker open connection counts.
    pub fn connections_per_worker(&self) -> Vec<u64> {
        self.shared.counters.iter().map(|c| c.connections.load(Ordering::Relaxed)).collect()
    }

    /// The raw TCP address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The WebSocket address, when `websocket.listen` is set.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.shared.ws_addr
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.shared.mailboxes.len()
    }

    /// Starts a graceful shutdown: workers stop accepting, send CLOSE 1001
    /// to every connection, wait up to `timeouts.close_linger_ms` for the
    /// peers to close, then exit. Returns at once; [`Server::join`] waits.
    pub fn shutdown(&self) {
        self.shared.request_shutdown();
    }

    /// Whether a shutdown has been requested.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.load(Ordering::Acquire)
    }

    /// Starts a graceful drain: workers stop accepting (with
    /// `net.ipv4.tcp_migrate_req = 1`, connections still in their accept
    /// queues move to another listener on the same port, e.g. the new
    /// process of a restart), `/readyz` turns 503, and every connection gets
    /// CLOSE 1001 with a reconnect hint, spread over `drain.window_ms`. The
    /// workers exit when their connections are gone (or the window plus
    /// `timeouts.close_linger_ms` has passed). Returns at once;
    /// [`Server::join`] waits. Pushes go on meanwhile: a live one reaches
    /// the connections not closed yet, a reliable one is stored for the
    /// devices wherever they reconnect. Once the workers have exited
    /// ([`Server::join`] returned), the handle refuses as after a shutdown.
    pub fn drain(&self) {
        if !self.shared.draining.swap(true, Ordering::AcqRel) {
            tracing::info!(window_ms = self.shared.config.drain.window_ms, "drain requested");
        }
        for mb in self.shared.mailboxes.iter() {
            mb.wake();
        }
    }

    /// Whether a drain has been requested.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Whether the server accepts new connections (what `/readyz` reports).
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down() && !self.is_draining()
    }
}

/// Builds a [`Server`].
///
/// An embedded server binds only what its builder asks for: raw TCP on
/// [`listen`](ServerBuilder::listen) (default `127.0.0.1:7700`; port 0
/// picks a free one), WebSocket only with
/// [`ws_listen`](ServerBuilder::ws_listen), the admin API only with a
/// [`config`](ServerBuilder::config) that sets `admin.listen`. (A
/// [`Config`], like `switchboard serve`, has WebSocket on `127.0.0.1:7710`
/// by default; the builder does not, so an application and a development
/// server can run side by side.)
pub struct ServerBuilder {
    config: Config,
    authenticator: Option<Arc<dyn Authenticator>>,
    hook: Option<MessageHook>,
    custom_store: Option<Box<dyn crate::store::Store>>,
}

impl ServerBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Sets `server.listen`.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.config.server.listen = addr.into();
        self
    }

    /// Sets `websocket.listen`: accept WebSocket clients on `addr` (port 0
    /// picks a free one, see [`Server::ws_addr`]); `""` turns WebSocket
    /// off, which is the builder's default.
    pub fn ws_listen(mut self, addr: impl Into<String>) -> Self {
        self.config.websocket.listen = addr.into();
        self
    }

    /// Sets `server.workers` (0 = one per core).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.server.workers = n;
        self
    }

    /// Sets `store.path`, the directory of the on-disk inbox store
    /// (default `switchboard-data` in the working directory; created if
    /// missing), and `store.kind` to the disk store. Two servers cannot
    /// share one.
    pub fn data_dir(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.custom_store = None;
        self.config.store.kind = crate::config::StoreKind::Disk;
        self.config.store.path = path.into();
        self
    }

    /// Sets `store.kind`: `Disk` (the default), `Memory` (bounded, lost on
    /// restart), `None` (no reliable delivery: live relay only) or `Redis`
    /// (shared by the nodes of a cluster: it needs `cluster.redis`, set
    /// through [`config`](ServerBuilder::config), or `start` refuses it).
    pub fn store(mut self, kind: crate::config::StoreKind) -> Self {
        self.custom_store = None;
        self.config.store.kind = kind;
        self
    }

    /// Keeps the inboxes in the application's own [`Store`](crate::store::Store)
    /// (its database, or one of the crate's stores wrapped), instead of the
    /// one `store.kind` names. The server runs it on a thread of its own, one
    /// request batch at a time, and calls [`Store::sync`](crate::store::Store::sync)
    /// once per batch before it answers any write of the batch: what `sync`
    /// returns `Ok` for must survive what the application promises its users
    /// (a `Receipt`'s `durability` is what [`Store::durability`](crate::store::Store::durability)
    /// says). One shard, whatever `store.shards` says; `store.batch_wait_us`
    /// applies (default 0: no wait). Of [`data_dir`](ServerBuilder::data_dir),
    /// [`store`](ServerBuilder::store) and this, the one called last wins.
    /// The trait's documentation says what each method must do; the crate's
    /// own stores are the reference.
    pub fn custom_store(mut self, store: impl crate::store::Store) -> Self {
        self.custom_store = Some(Box::new(store));
        self
    }

    /// Sets `auth.jwt_secret`.
    pub fn jwt_secret(mut self, secret: impl Into<String>) -> Self {
        self.config.auth.jwt_secret = Some(secret.into());
        self
    }

    /// Replaces the JWT check with the application's own.
    pub fn authenticator(mut self, a: impl Authenticator) -> Self {
        self.authenticator = Some(Arc::new(a));
        self
    }

    /// Receives MESSAGE frames (and SENDs when `routing.client_send` is off).
    pub fn on_message(mut self, hook: impl Fn(ClientMessage, &Handle) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Validates, checks system limits, binds one listener per worker and
    /// starts the workers. Returns once every worker is accepting.
    pub fn start(self) -> Result<Server, StartError> {
        let config = self.config;
        config.validate_for(self.authenticator.is_some())?;
        let authenticator: Arc<dyn Authenticator> = match self.authenticator {
            Some(a) => a,
            None => {
                let (secret, dev) = config.jwt_secret();
                if dev {
                    tracing::warn!(
                        "auth.jwt_secret is not set: using the built-in development secret; anyone can mint tokens \
                         (the switchboard binary's `token` command). Set auth.jwt_secret or {} for real use.",
                        crate::config::JWT_SECRET_ENV
                    );
                }
                Arc::new(
                    JwtHs256::new(secret)
                        .with_leeway_s(config.auth.jwt_leeway_s)
                        .with_require_exp(config.auth.require_exp),
                )
            }
        };
        // Logins and refusals are logged at debug, refusals at info at most
        // once per interval, whichever authenticator decides.
        let authenticator: Arc<dyn Authenticator> = Arc::new(crate::authlog::Logged::new(authenticator));
        let admin = config.admin.clone();
        let admin_listener: Option<(SocketAddr, std::net::TcpListener)> = if admin.listen.is_empty() {
            // Keys without an address: the operator meant the API to be on.
            if admin.token.is_some() || admin.read_token.is_some() || admin.bench_endpoints {
                tracing::warn!(
                    "admin.token, admin.read_token or admin.bench_endpoints is set, but admin.listen is not: \
                     the admin API is off (set admin.listen, e.g. \"127.0.0.1:7701\", to serve it)"
                );
            }
            None
        } else {
            if admin.bench_endpoints {
                tracing::warn!(
                    "admin.bench_endpoints is on: /bench/send_ceiling blocks the workers while it runs; \
                     for the capacity scripts, never in production"
                );
            }
            let addr = admin.listen.parse().map_err(|_| ConfigError::Invalid {
                key: "admin.listen",
                message: "is not an IP:port address".into(),
            })?;
            // Refused here, before the workers and the store start, as the
            // client ports are; and bound here, so that it takes
            // connections before the client ports do: a script that waits
            // for the client port and then asks `/readyz` is answered
            // (once the workers run) rather than refused. Served from
            // `Admin::start` below.
            crate::runtime::probe_port(addr, |holder| crate::portholder::admin_advice(addr, holder))?;
            let listener = std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
            Some((addr, listener))
        };
        let started = crate::runtime::start(config, authenticator, self.hook, self.custom_store)?;
        let mut server = Server {
            handle: started.handle,
            threads: started.threads,
            admin: None,
            sweeper: Some(started.sweeper),
            store: started.store,
            cluster: started.cluster,
        };
        if let Some((addr, listener)) = admin_listener {
            let a = crate::admin::Admin::start(listener, server.handle(), &admin)
                .map_err(|source| StartError::Bind { addr, source })?;
            tracing::info!(addr = %a.local_addr(), "admin API listening");
            server.admin = Some(a);
        }
        Ok(server)
    }
}

/// A store query on its way through the store thread: an inbox's state
/// ([`Handle::request_inbox_state`]) or a device forgotten
/// ([`Handle::request_forget_device`]).
#[derive(Debug)]
pub struct PendingAnswer<T> {
    rx: std::sync::mpsc::Receiver<Result<T, crate::store::StoreError>>,
}

impl<T> PendingAnswer<T> {
    /// Waits at most `timeout` for the store's answer.
    pub fn wait_timeout(self, timeout: std::time::Duration) -> Result<T, InboxStateError> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => r.map_err(InboxStateError::Store),
            Err(_) => Err(InboxStateError::Timeout),
        }
    }
}

/// An inbox state query on its way through the store
/// ([`Handle::request_inbox_state`]).
pub type PendingInboxState = PendingAnswer<crate::store::InboxState>;

/// A device being forgotten ([`Handle::request_forget_device`]): answers
/// whether the store knew it.
pub type PendingForget = PendingAnswer<bool>;

/// A reliable push on its way into the store ([`Handle::push_reliable`]).
#[derive(Debug)]
pub struct PendingPush {
    rx: std::sync::mpsc::Receiver<Result<Receipt, crate::store::StoreError>>,
}

impl PendingPush {
    /// Waits until the store has the message (durable as
    /// `store.durability` promises) or refused it. Blocks: call it off the
    /// server's threads (not from the message hook).
    ///
    /// `InboxFull` and `StoreFull` stored nothing. `Unavailable` may come
    /// after the message was appended, when the write or its sync failed
    /// (as ERROR 115 says to a client, docs/PROTOCOL.md): it may then be
    /// kept and delivered. A push retried after it should carry a
    /// `client_id` ([`Handle::push_reliable`]), so that a message kept the
    /// first time is not stored twice.
    pub fn wait(self) -> Result<Receipt, crate::store::StoreError> {
        self.rx.recv().unwrap_or_else(|_| Err(crate::store::StoreError::Unavailable("the store stopped".into())))
    }

    /// [`PendingPush::wait`], for at most `timeout` (`None`: not yet).
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<Result<Receipt, crate::store::StoreError>> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Some(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(_) => Some(Err(crate::store::StoreError::Unavailable("the store stopped".into()))),
        }
    }
}

/// Why [`Handle::inbox_state`] or [`Handle::forget_device`] has no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InboxStateError {
    #[error(transparent)]
    Push(PushError),
    #[error(transparent)]
    Store(crate::store::StoreError),
    #[error("the store did not answer in time")]
    Timeout,
}

/// A running server: its worker threads and a handle.
pub struct Server {
    pub(crate) handle: Handle,
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) admin: Option<crate::admin::Admin>,
    /// The directory's sweeper thread (`sb-directory`).
    pub(crate) sweeper: Option<crate::runtime::Sweeper>,
    /// The store's threads (`sb-store-<i>`, one per shard), stopped after
    /// the workers so that what they queued is stored and synced.
    pub(crate) store: Option<crate::store::Service<crate::runtime::inbox::Token>>,
    /// The cluster thread (`sb-cluster`), stopped last: the workers'
    /// closing connections and the store's last messages go through it.
    pub(crate) cluster: Option<crate::cluster::node::ClusterThread>,
}

impl Server {
    /// A builder with the default configuration, except that WebSocket is
    /// off until [`ServerBuilder::ws_listen`] asks for it (see
    /// [`ServerBuilder`]).
    pub fn builder() -> ServerBuilder {
        let mut config = Config::default();
        config.websocket.listen = String::new();
        ServerBuilder { config, authenticator: None, hook: None, custom_store: None }
    }

    /// A handle for pushing from any thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The raw TCP address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// The WebSocket address, when `websocket.listen` is set.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.handle.ws_addr()
    }

    /// The admin API's address, when `admin.listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// Waits for the workers to exit: after [`Handle::shutdown`] or a
    /// drain, or on their own when one of them died, which is the error.
    pub fn join(mut self) -> Result<(), ServerError> {
        for (worker, t) in self.threads.drain(..).enumerate() {
            if t.join().is_err() {
                // A panic past the worker's own supervision (in its clean-up).
                let mut failure = self.handle.shared.failure.lock().unwrap_or_else(|e| e.into_inner());
                failure.get_or_insert(ServerError::WorkerDied { worker, message: "panicked while stopping".into() });
            }
        }
        // The workers are gone (a drain ended, or a worker died): from now
        // on the handle refuses as after a shutdown, before the store stops.
        self.handle.shared.shutdown.store(true, Ordering::Release);
        self.admin = None;
        drop(self.sweeper.take());
        if let Some(store) = self.store.take() {
            if let Err(e) = store.stop() {
                tracing::error!("the message store's last sync failed: {e}");
            }
        }
        drop(self.cluster.take());
        match self.handle.shared.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Starts a graceful shutdown and waits for it to finish.
    pub fn shutdown(self) -> Result<(), ServerError> {
        self.handle.shutdown();
        self.join()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.handle.shutdown();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}
