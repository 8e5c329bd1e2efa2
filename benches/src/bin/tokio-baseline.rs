//! `tokio-baseline`: Switchboard's raw TCP protocol v1 served the way a Rust
//! team would write it with tokio — a comparison point for the capacity
//! benchmarks, **not a product**. Nothing here is meant to be deployed or
//! extended; it exists so the same load generator can run the same load
//! against both servers and compare memory per idle connection, unicast
//! throughput and latency, and room fan-out.
//!
//! The design is the idiomatic task-per-connection one:
//!
//! - a multi-thread runtime with `--workers` threads (as many as Switchboard
//!   has workers), an accept loop, and one task per connection that owns the
//!   read half: a `BytesMut` read loop decoding frames with Switchboard's own
//!   codec (`switchboard::proto::frame`), plus one writer task per
//!   connection that owns the write half and drains a bounded
//!   `mpsc::channel::<Bytes>` (1024 frames), batching whatever is queued into
//!   one `writev`;
//! - a full channel is a slow consumer: the connection is closed with CLOSE
//!   4004, its queued frames discarded, as Switchboard does by default;
//! - a directory `RwLock<HashMap<user, Vec<Arc<Peer>>>>` for SEND, and a room
//!   map `RwLock<HashMap<room, HashMap<conn_id, Arc<Peer>>>>` for
//!   SUBSCRIBE / UNSUBSCRIBE / PUBLISH; every PUSH and ROOM_MSG is encoded
//!   once and a clone of the `Bytes` is `try_send`-ed to each target;
//! - per-connection timers: a `tokio::time::Sleep` in the connection task's
//!   `select!` for the login deadline (10 s), the heartbeat PING
//!   (`--heartbeat-ms`, 240 s of silence) and the idle close
//!   (`--idle-ms`, 300 s);
//! - LOGIN checked with Switchboard's HS256 JWT verifier; LOGIN_OK, LOGIN_ERROR,
//!   PING/PONG, SEND/SEND_ACK/PUSH, MESSAGE (always ERROR 101: there is no
//!   application), CLOSE, ROOM_ACK, ROOM_MSG, ERROR 103/104/107, malformed
//!   frames (CLOSE with the decoder's code), 4006 for frames out of phase,
//!   `limits.max_conns_per_user` (16) and `rooms.max_rooms_per_conn` (64);
//!   closing writes what is queued, then the final frame, then FIN, and
//!   waits up to 2 s for the client's FIN.
//!
//! Left out (not needed for the comparison): configuration files, the
//! embedding API (application pushes, broadcasts, kicks, a MESSAGE hook),
//! `slow_consumer = "drop_oldest"` and SKIPPED, the byte bound of the
//! outbound queue (only the 1024-frame bound is kept), the server-wide room
//! limits (`max_members_per_room`, `max_rooms`), the connection ceiling and
//! CLOSE 4005, graceful shutdown with CLOSE 1001, stats and admin endpoints,
//! and the WebSocket transport.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use switchboard::auth::{Authenticator, JwtHs256};
use switchboard::proto::codes::{CloseCode, ErrorCode, LoginErrorCode};
use switchboard::proto::frame::{clip_reason, decode, Frame, RoomOp, LEN_PREFIX, PING_EMPTY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{sleep_until, timeout_at, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Largest frame either way, header included (Switchboard's default).
const MAX_FRAME_BYTES: usize = 65536;
/// Frames queued for one connection before it counts as a slow consumer
/// (Switchboard's `limits.outbound_max_frames`).
const OUTBOUND_FRAMES: usize = 1024;
/// Initial read buffer per connection (tokio-util's `FramedRead` uses 8 KiB).
const READ_BUF_BYTES: usize = 4096;
/// Most frames handed to one `writev`.
const MAX_BATCH: usize = 64;
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_LINGER: Duration = Duration::from_secs(2);
const MAX_CONNS_PER_USER: usize = 16;
const MAX_ROOMS_PER_CONN: usize = 64;
const LISTEN_BACKLOG: u32 = 4096;

#[derive(Parser)]
#[command(name = "tokio-baseline", about = "Comparison point: protocol v1 with tokio, one task per connection")]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7800")]
    listen: SocketAddr,
    /// Runtime worker threads (match Switchboard's `--workers`).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// HS256 secret for LOGIN tokens (default: Switchboard's development secret).
    #[arg(long)]
    secret: Option<String>,
    /// Server PING after this much silence from a logged-in client.
    #[arg(long, default_value_t = 240_000)]
    heartbeat_ms: u64,
    /// CLOSE 4002 after this much silence from a logged-in client.
    #[arg(long, default_value_t = 300_000)]
    idle_ms: u64,
}

/// The sending side of one connection, as the directory and rooms hold it.
struct Peer {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    /// Notified by whoever finds `tx` full: the connection's task then
    /// closes it with 4004.
    slow: Notify,
}

enum Queued {
    Yes,
    /// The queue is full; the connection has been told to close.
    Full,
    /// The connection's writer is gone.
    Closed,
}

impl Peer {
    fn push(&self, frame: Bytes) -> Queued {
        match self.tx.try_send(frame) {
            Ok(()) => Queued::Yes,
            Err(TrySendError::Full(_)) => {
                self.slow.notify_one();
                Queued::Full
            }
            Err(TrySendError::Closed(_)) => Queued::Closed,
        }
    }
}

/// Everything the connections share.
///
/// Rooms are a map of member senders rather than one
/// `tokio::sync::broadcast` channel per room: with broadcast, each
/// connection would need a receiver per room it is in, merged into its
/// writer (a `StreamMap` that changes on every SUBSCRIBE), and a slow reader
/// would silently lag (`RecvError::Lagged`) instead of being closed. Sending
/// into the connection's own outbound channel keeps one queue per
/// connection, one ordering for PUSH and ROOM_MSG, one slow-consumer rule,
/// and costs a `try_send` per member per message. The locks are plain
/// `std::sync::RwLock`s: nothing awaits while holding them, fan-out only
/// needs the read side, and joins and leaves are rare next to messages.
struct Shared {
    auth: JwtHs256,
    heartbeat: Duration,
    idle: Duration,
    users: RwLock<HashMap<String, Vec<Arc<Peer>>>>,
    rooms: RwLock<HashMap<String, HashMap<u64, Arc<Peer>>>>,
    next_conn: AtomicU64,
    next_msg: AtomicU64,
}

/// How the read side ended.
enum End {
    /// EOF or a read error: release the connection at once.
    Gone,
    /// Write what is queued, then this frame (CLOSE or LOGIN_ERROR), then FIN.
    Last(Bytes),
    /// The outbound queue is full: discard it and write CLOSE 4004.
    Slow,
}

fn close_frame(code: CloseCode, reason: &str) -> Bytes {
    Frame::Close { code: code as u16, reason: clip_reason(reason) }.to_bytes().expect("reason clipped")
}

fn unix_now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One connection's state, owned by its task.
struct Conn {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    /// Set once logged in.
    user: Option<String>,
    /// Rooms this connection is in.
    rooms: Vec<String>,
}

impl Conn {
    /// Reads and handles frames until the connection must end.
    async fn run(&mut self, rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> End {
        let login_deadline = Instant::now() + LOGIN_TIMEOUT;
        let (heartbeat, idle) = (self.shared.heartbeat, self.shared.idle);
        let mut last_rx = Instant::now();
        let mut pinged = false;
        let peer = self.peer.clone();
        // One timer per connection. Traffic only moves its deadline later, so
        // it is not reset on every frame: when it fires early it is re-armed.
        let timer = sleep_until(login_deadline);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                r = rd.read_buf(buf) => {
                    match r {
                        Ok(0) | Err(_) => return End::Gone,
                        Ok(_) => {}
                    }
                    let mut got_frame = false;
                    loop {
                        match decode(buf, MAX_FRAME_BYTES) {
                            Ok(Some((frame, n))) => {
                                got_frame = true;
                                let end = self.on_frame(frame);
                                buf.advance(n);
                                if let Some(end) = end {
                                    return end;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return End::Last(close_frame(e.close_code(), &e.to_string())),
                        }
                    }
                    if got_frame {
                        last_rx = Instant::now();
                        pinged = false;
                    }
                    // Room for the rest of a partial frame (its length is
                    // checked by the decoder), or for the next read.
                    if buf.len() >= LEN_PREFIX {
                        let total = LEN_PREFIX + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                        buf.reserve(total.saturating_sub(buf.len()));
                    }
                    if buf.capacity() - buf.len() < 1024 {
                        buf.reserve(1024);
                    }
                }
                _ = &mut timer => {
                    if self.user.is_none() {
                        return End::Last(close_frame(CloseCode::LoginTimeout, "no LOGIN within the login deadline"));
                    }
                    let now = Instant::now();
                    if now >= last_rx + idle {
                        return End::Last(close_frame(CloseCode::IdleTimeout, CloseCode::IdleTimeout.reason()));
                    }
                    if !pinged && now >= last_rx + heartbeat {
                        pinged = true;
                        if let Some(end) = self.reply(Bytes::from_static(&PING_EMPTY)) {
                            return end;
                        }
                    }
                }
                _ = peer.slow.notified() => return End::Slow,
            }
            let next = if self.user.is_none() {
                login_deadline
            } else if pinged {
                last_rx + idle
            } else {
                last_rx + heartbeat.min(idle)
            };
            if timer.is_elapsed() || next < timer.deadline() {
                timer.as_mut().reset(next);
            }
        }
    }

    /// Handles one whole frame; `Some` ends the connection.
    fn on_frame(&mut self, frame: Frame<'_>) -> Option<End> {
        let unexpected = |reason: String| Some(End::Last(close_frame(CloseCode::UnexpectedFrame, &reason)));
        match frame {
            Frame::LoginOk { .. }
            | Frame::LoginError { .. }
            | Frame::Push { .. }
            | Frame::SendAck { .. }
            | Frame::Error { .. }
            | Frame::RoomAck { .. }
            | Frame::RoomMsg { .. }
            | Frame::Skipped { .. }
            | Frame::Sync { .. }
            | Frame::Inbox { .. }
            | Frame::SendResult { .. } => {
                unexpected(format!("{} is sent by the server only", frame.frame_type().name()))
            }
            Frame::Close { .. } => Some(End::Last(close_frame(CloseCode::Normal, "closed by client"))),
            Frame::Login { user, token, .. } if self.user.is_none() => self.login(user, token),
            Frame::Login { .. } => unexpected("already logged in".to_string()),
            f if self.user.is_none() => unexpected(format!("{} is not allowed before LOGIN", f.frame_type().name())),
            Frame::Ping { data } => self.reply(Frame::Pong { data }.to_bytes().expect("PING data is bounded")),
            Frame::Pong { .. } => None,
            Frame::Send { req_id, to, payload } => self.send(req_id, to, payload),
            Frame::Message { req_id, .. } => {
                self.error(ErrorCode::NoHandler, req_id, "no application handler for MESSAGE")
            }
            Frame::Subscribe { req_id, room } => self.subscribe(req_id, room),
            Frame::Unsubscribe { req_id, room } => self.unsubscribe(req_id, room),
            Frame::Publish { req_id, room, payload } => self.publish(req_id, room, payload),
            // No store here: the baseline is the live relay.
            Frame::Ack { .. } => self.error(ErrorCode::NotReliable, 0, "reliable delivery is not available"),
            Frame::Fetch { req_id, .. } | Frame::SendEx { req_id, .. } => {
                self.error(ErrorCode::NotReliable, req_id, "reliable delivery is not available")
            }
        }
    }

    /// Queues a reply to this connection.
    fn reply(&self, frame: Bytes) -> Option<End> {
        match self.peer.push(frame) {
            Queued::Yes => None,
            Queued::Full => Some(End::Slow),
            Queued::Closed => Some(End::Gone),
        }
    }

    fn error(&self, code: ErrorCode, req_id: u32, reason: &str) -> Option<End> {
        let f = Frame::Error { code: code as u16, req_id, reason: clip_reason(reason) };
        self.reply(f.to_bytes().expect("reason clipped"))
    }

    fn login(&mut self, user: &str, token: &[u8]) -> Option<End> {
        let refuse = |code: u16, reason: &str| {
            let f = Frame::LoginError { code, reason: clip_reason(reason) };
            Some(End::Last(f.to_bytes().expect("reason clipped")))
        };
        if let Err(e) = self.shared.auth.authenticate(user, token, unix_now_s()) {
            return refuse(e.code() as u16, &e.to_string());
        }
        {
            let mut users = self.shared.users.write().unwrap();
            let conns = users.entry(user.to_string()).or_default();
            if conns.len() >= MAX_CONNS_PER_USER {
                let reason = format!("user already has {MAX_CONNS_PER_USER} connections");
                return refuse(LoginErrorCode::TooManyConnections as u16, &reason);
            }
            conns.push(self.peer.clone());
        }
        self.user = Some(user.to_string());
        let ok = Frame::LoginOk {
            conn_id: self.peer.id,
            heartbeat_interval_ms: self.shared.heartbeat.as_millis() as u32,
            idle_timeout_ms: self.shared.idle.as_millis() as u32,
            max_frame_bytes: MAX_FRAME_BYTES as u32,
        };
        self.reply(ok.to_bytes().expect("fixed-size frame"))
    }

    fn next_msg_id(&self) -> u64 {
        self.shared.next_msg.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn send(&self, req_id: u32, to: &str, payload: &[u8]) -> Option<End> {
        let from = self.user.as_deref().expect("logged in");
        // PUSH: header 6, msg_id 8, from length 1.
        let max = MAX_FRAME_BYTES - 15 - from.len();
        if payload.len() > max {
            let reason = format!("payload of {} bytes: at most {max} fit a PUSH from this user", payload.len());
            return self.error(ErrorCode::PayloadTooLarge, req_id, &reason);
        }
        let push = Frame::Push { msg_id: self.next_msg_id(), from, payload }.to_bytes().expect("size checked");
        let mut delivered = 0u32;
        if let Some(conns) = self.shared.users.read().unwrap().get(to) {
            for p in conns {
                if let Queued::Yes = p.push(push.clone()) {
                    delivered += 1;
                }
            }
        }
        if req_id == 0 {
            return None;
        }
        self.reply(Frame::SendAck { req_id, delivered }.to_bytes().expect("fixed-size frame"))
    }

    fn room_ack(&self, req_id: u32, op: RoomOp, room: &str) -> Option<End> {
        self.reply(Frame::RoomAck { req_id, op, room }.to_bytes().expect("room names are at most 255 bytes"))
    }

    fn subscribe(&mut self, req_id: u32, room: &str) -> Option<End> {
        if !self.rooms.iter().any(|r| r == room) {
            if self.rooms.len() >= MAX_ROOMS_PER_CONN {
                let reason = format!("this connection is already in {MAX_ROOMS_PER_CONN} rooms");
                return self.error(ErrorCode::RoomLimit, req_id, &reason);
            }
            let mut rooms = self.shared.rooms.write().unwrap();
            rooms.entry(room.to_string()).or_default().insert(self.peer.id, self.peer.clone());
            self.rooms.push(room.to_string());
        }
        self.room_ack(req_id, RoomOp::Subscribed, room)
    }

    fn unsubscribe(&mut self, req_id: u32, room: &str) -> Option<End> {
        if let Some(k) = self.rooms.iter().position(|r| r == room) {
            self.rooms.swap_remove(k);
            let mut rooms = self.shared.rooms.write().unwrap();
            if let Some(members) = rooms.get_mut(room) {
                members.remove(&self.peer.id);
                if members.is_empty() {
                    rooms.remove(room);
                }
            }
        }
        self.room_ack(req_id, RoomOp::Unsubscribed, room)
    }

    fn publish(&self, req_id: u32, room: &str, payload: &[u8]) -> Option<End> {
        if !self.rooms.iter().any(|r| r == room) {
            return self.error(ErrorCode::NotMember, req_id, "PUBLISH to a room this connection has not joined");
        }
        let from = self.user.as_deref().expect("logged in");
        // ROOM_MSG: header 6, msg_id 8, two length bytes.
        let max = MAX_FRAME_BYTES - 16 - room.len() - from.len();
        if payload.len() > max {
            let reason =
                format!("payload of {} bytes: at most {max} fit a ROOM_MSG in this room from this user", payload.len());
            return self.error(ErrorCode::PayloadTooLarge, req_id, &reason);
        }
        let msg = Frame::RoomMsg { msg_id: self.next_msg_id(), room, from, payload };
        let msg = msg.to_bytes().expect("size checked");
        if let Some(members) = self.shared.rooms.read().unwrap().get(room) {
            for p in members.values() {
                p.push(msg.clone());
            }
        }
        if req_id == 0 {
            return None;
        }
        self.room_ack(req_id, RoomOp::Published, room)
    }

    /// Takes the connection out of the directory and its rooms, so nothing
    /// new is queued for it (fan-outs send under the read locks).
    fn leave_everything(&mut self) {
        let id = self.peer.id;
        if let Some(user) = self.user.take() {
            let mut users = self.shared.users.write().unwrap();
            if let Some(conns) = users.get_mut(&user) {
                conns.retain(|p| p.id != id);
                if conns.is_empty() {
                    users.remove(&user);
                }
            }
        }
        if !self.rooms.is_empty() {
            let mut rooms = self.shared.rooms.write().unwrap();
            for room in self.rooms.drain(..) {
                if let Some(members) = rooms.get_mut(&room) {
                    members.remove(&id);
                    if members.is_empty() {
                        rooms.remove(&room);
                    }
                }
            }
        }
    }
}

/// One `write` or `writev` of the frames' remaining bytes.
async fn write_some(wr: &mut OwnedWriteHalf, frames: &[Bytes]) -> io::Result<usize> {
    if frames.len() == 1 {
        return wr.write(&frames[0]).await;
    }
    let iov: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    wr.write_vectored(&iov).await
}

/// The writer task: drains the outbound channel into the socket, batching
/// what is queued. Ends with FIN once every sender is dropped and the queue
/// is written. When told to stop (slow consumer) it gives the write half
/// back with the unwritten rest of a frame it had started, if any, and drops
/// the queue.
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
    mut stop: oneshot::Receiver<()>,
) -> Option<(OwnedWriteHalf, Option<Bytes>)> {
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = &mut stop => return Some((wr, None)),
            f = rx.recv() => f,
        };
        let Some(first) = first else {
            let _ = wr.shutdown().await;
            return None;
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let (mut head, mut started) = (0, false);
        while head < batch.len() {
            let written = tokio::select! {
                biased;
                _ = &mut stop => {
                    let rest = if started { Some(batch[head].clone()) } else { None };
                    return Some((wr, rest));
                }
                r = write_some(&mut wr, &batch[head..]) => r,
            };
            let mut n = match written {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            while n > 0 {
                let len = batch[head].len();
                if n >= len {
                    n -= len;
                    head += 1;
                    started = false;
                } else {
                    batch[head].advance(n);
                    n = 0;
                    started = true;
                }
            }
        }
        batch.clear();
    }
}

/// One connection: this task reads, a second one writes.
async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(OUTBOUND_FRAMES);
    let (stop_tx, stop_rx) = oneshot::channel();
    let mut writer = tokio::spawn(write_loop(wr, rx, stop_rx));
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
    let peer = Arc::new(Peer { id, tx, slow: Notify::new() });
    let mut conn = Conn { shared, peer, user: None, rooms: Vec::new() };
    let mut buf = BytesMut::with_capacity(READ_BUF_BYTES);
    let end = conn.run(&mut rd, &mut buf).await;
    conn.leave_everything();
    let linger_until = Instant::now() + CLOSE_LINGER;
    // Queue the final frame behind what is already queued.
    let outcome = match end {
        End::Gone => Queued::Closed,
        End::Slow => Queued::Full,
        End::Last(last) => conn.peer.push(last),
    };
    // Only this task holds the peer now: dropping it drops the last sender,
    // so the writer finishes the queue (the final frame last) and sends FIN.
    drop(conn);
    match outcome {
        Queued::Closed => {
            writer.abort();
            return;
        }
        Queued::Yes => {
            if timeout_at(linger_until, &mut writer).await.is_err() {
                writer.abort();
                return;
            }
        }
        Queued::Full => {
            let _ = stop_tx.send(());
            let Ok(Some((mut wr, rest))) = writer.await else { return };
            let close = close_frame(CloseCode::SlowConsumer, CloseCode::SlowConsumer.reason());
            let finish = async {
                if let Some(rest) = rest {
                    wr.write_all(&rest).await?;
                }
                wr.write_all(&close).await?;
                wr.shutdown().await
            };
            if !matches!(timeout_at(linger_until, finish).await, Ok(Ok(()))) {
                return;
            }
        }
    }
    // Wait (briefly) for the client's FIN, so it reads our CLOSE rather than
    // a reset.
    let _ = timeout_at(linger_until, async {
        loop {
            buf.clear();
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let shutdown = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    tokio::spawn(serve(shared.clone(), stream));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => return,
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if cli.workers == 0 || cli.heartbeat_ms == 0 || cli.idle_ms == 0 {
        eprintln!("tokio-baseline: --workers, --heartbeat-ms and --idle-ms must be positive");
        std::process::exit(2);
    }
    let secret = cli.secret.unwrap_or_else(|| switchboard::config::DEV_JWT_SECRET.to_string());
    let shared = Arc::new(Shared {
        auth: JwtHs256::new(secret),
        heartbeat: Duration::from_millis(cli.heartbeat_ms),
        idle: Duration::from_millis(cli.idle_ms),
        users: RwLock::new(HashMap::new()),
        rooms: RwLock::new(HashMap::new()),
        next_conn: AtomicU64::new(0),
        next_msg: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let listener = match bind(cli.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tokio-baseline: cannot listen on {}: {e}", cli.listen);
                std::process::exit(1);
            }
        };
        println!("listening on {}", listener.local_addr().map_or(cli.listen, |a| a));
        // The accept loop runs on a worker, like the connections.
        let _ = tokio::spawn(accept_loop(listener, shared)).await;
    });
    // Not graceful: connections are dropped with the runtime.
    std::process::exit(0);
}
