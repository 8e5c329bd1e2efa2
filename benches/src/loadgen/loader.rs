//! One loader process: many client connections on one epoll loop (mio).
//!
//! Owns: its connections (bound to one source address so the ephemeral
//! ports of 127.0.0.1 are not the limit), logging them in with real JWTs,
//! answering server PINGs, open-loop sending, and timing every PUSH it
//! receives from the timestamp in its payload. Three transports
//! ([`Transport`]): raw TCP protocol v1; WebSocket with the
//! `switchboard.v1.bin` subprotocol (the same frames, one per binary
//! message, login in the upgrade query, client frames masked, WebSocket
//! pings answered with pongs); and plain WebSocket for other push servers
//! (nchan), where each data message is a timed payload itself.
//!
//! Reliable delivery (`--device`, raw TCP only): every connection logs in as
//! that device of its user, is ready once the login's SYNC arrived, counts
//! each new INBOX (timed like a PUSH; a seq already had is a duplicate, not
//! counted), and acknowledges as PROTOCOL.md 15.4 says: cumulatively, after
//! 32 INBOX frames or 100 ms after the first unacknowledged one, whichever
//! comes first, and at the end of a page; a page that leaves more waiting
//! is followed by a FETCH of the rest.
//! Must not: hold a buffer or a timer per connection. A connection is a
//! socket, a state byte and its user index; a partial frame (rare) is the
//! only thing buffered, and one scratch buffer serves every read. Device
//! connections add 32 bytes each (their inbox position, in a side table)
//! and share one FIFO of ACK deadlines.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};
use switchboard::proto::frame::{decode, Frame, PROTOCOL_MAX_FRAME_BYTES};
use switchboard::proto::wire::SUBPROTOCOL_BINARY;
use switchboard::proto::ws::{apply_mask, frame_header, Opcode};
use switchboard::timed::{self, mono_ns};
use switchboard::JwtHs256;

use super::ctl::{Command, Event};

const STDIN: Token = Token(usize::MAX - 1);
/// Connects in flight at once: a connect storm without overflowing the
/// server's accept backlog.
const MAX_INFLIGHT_CONNECTS: usize = 512;

/// How a loader's connections talk to the server.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Raw TCP, protocol v1 frames.
    #[default]
    Raw,
    /// WebSocket, subprotocol `switchboard.v1.bin`: each binary message is
    /// one v1 frame; login by the upgrade query (`?user=U&token=JWT`).
    Ws,
    /// WebSocket without a Switchboard protocol (nchan and the like): the
    /// connection is ready once upgraded, and every text or binary message
    /// is a timed payload (see `timed_payload`).
    WsPlain,
}

impl Transport {
    /// The command-line name (`--transport`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::Raw => "raw",
            Transport::Ws => "ws",
            Transport::WsPlain => "ws-plain",
        }
    }

    fn is_websocket(self) -> bool {
        self != Transport::Raw
    }
}

/// The upgrade path of a `Ws` connection when none is given.
pub const DEFAULT_WS_PATH: &str = "/?user={user}&token={token}";

/// A device connection acknowledges after this many INBOX frames ...
pub const ACK_EVERY: u64 = 32;
/// ... or this long after the first unacknowledged one (PROTOCOL.md 15.4).
pub const ACK_DELAY: Duration = Duration::from_millis(100);
/// The `limit` of a FETCH: as much as the server allows (`delivery.max_fetch`).
const FETCH_LIMIT: u16 = u16::MAX;

/// Largest WebSocket payload the loader accepts from a server.
const MAX_WS_PAYLOAD: usize = 16 << 20;

/// A masked client→server WebSocket frame (FIN set) carrying `payload`:
/// the server-side header layout with the mask bit set, the key, then the
/// masked payload.
pub fn ws_client_frame(opcode: Opcode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    ws_client_fragment(opcode, true, payload, key)
}

/// A masked client→server WebSocket frame with FIN as given: with `fin`
/// false, the first fragment of a message (or a middle one, with
/// `Opcode::Continuation`).
pub fn ws_client_fragment(opcode: Opcode, fin: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let (mut h, n) = frame_header(opcode, fin, payload.len());
    h[1] |= 0x80;
    let mut v = Vec::with_capacity(n + 4 + payload.len());
    v.extend_from_slice(&h[..n]);
    v.extend_from_slice(&key);
    let start = v.len();
    v.extend_from_slice(payload);
    apply_mask(&mut v[start..], key);
    v
}

/// `raw` as this transport sends it: itself, or a masked binary message.
fn wrap(transport: Transport, rng: &mut u64, raw: Bytes) -> Bytes {
    if transport.is_websocket() {
        Bytes::from(ws_client_frame(Opcode::Binary, &raw, (xorshift(rng) as u32).to_ne_bytes()))
    } else {
        raw
    }
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum State {
    Connecting,
    /// WebSocket: the upgrade request is sent, the 101 not yet read.
    Upgrading,
    LoginSent,
    /// A device login: LOGIN_OK read, its SYNC not yet.
    Syncing,
    /// Logged in, SUBSCRIBE sent, waiting for its ROOM_ACK.
    Joining,
    Ready,
    Closed,
}

struct Conn {
    stream: TcpStream,
    user: u32,
    state: State,
    /// Bytes of an incomplete frame; `None` almost always (boxed: 8 bytes
    /// per connection instead of a Vec's 24).
    #[allow(clippy::box_collection)]
    partial: Option<Box<Vec<u8>>>,
}

/// Settings for one loader process.
pub struct LoaderArgs {
    pub addr: SocketAddr,
    pub src_ip: IpAddr,
    pub first_user: u32,
    pub count: u32,
    pub secret: String,
    pub user_prefix: String,
    /// Room to join after logging in.
    pub room: Option<String>,
    pub transport: Transport,
    /// WebSocket upgrade path; `{user}` and `{token}` are replaced by the
    /// connection's user id and a fresh JWT (`Ws` default:
    /// [`DEFAULT_WS_PATH`]).
    pub ws_path: Option<String>,
    /// Log in as this device of each user (reliable delivery; raw TCP).
    pub device: Option<String>,
}

/// Where a device connection stands in its user's inbox.
#[derive(Copy, Clone, Default)]
struct InboxPos {
    /// Highest seq received (and "stored").
    seq: u64,
    /// Highest seq acknowledged (by ACK or FETCH).
    acked: u64,
    /// The last SYNC's page end and head.
    page_end: u64,
    head: u64,
}

fn emit(e: &Event) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(e).expect("events serialise"));
    let _ = out.flush();
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

struct Unicast {
    rate_per_s: u64,
    started: Instant,
    until: Instant,
    sent: u64,
    blocked: u64,
    next_sender: usize,
    users_total: u32,
    /// Prefix of the receivers' user ids.
    to_prefix: String,
    payload: Vec<u8>,
    rng: u64,
}

struct Publisher {
    room: String,
    rate_per_s: f64,
    count: u32,
    sent: u32,
    payload_bytes: usize,
    first_seq: u32,
    started: Instant,
}

struct Loader {
    args: LoaderArgs,
    poll: Poll,
    conns: Vec<Conn>,
    jwt: JwtHs256,
    scratch: Vec<u8>,
    hist: Histogram<u64>,
    per_seq: std::collections::HashMap<u32, (u32, u64)>,
    skipped: u64,
    received: u64,
    pongs: u64,
    closed: u32,
    ready: u32,
    failed: u32,
    connected: u32,
    inflight: usize,
    next_connect: u32,
    first_error: Option<String>,
    unicast: Option<Unicast>,
    publisher: Option<Publisher>,
    /// Device connections: each one's inbox position (empty otherwise).
    inbox: Vec<InboxPos>,
    /// (deadline, connection, its `acked` then): ACKs due unless the
    /// connection acknowledged since. In deadline order.
    ack_due: VecDeque<(Instant, usize, u64)>,
    /// INBOX frames with a seq already received.
    duplicates: u64,
    acks_sent: u64,
    fetches_sent: u64,
    stdin_buf: Vec<u8>,
    quit: bool,
    /// WebSocket keys and masks.
    rng: u64,
}

/// Writes all of `data` to a non-blocking socket, waiting for room when it
/// is full (up to 5 s). Returns whether it had to wait.
fn write_waiting(stream: &mut TcpStream, data: &[u8]) -> bool {
    write_all_waiting(stream, data).unwrap_or(true)
}

/// `write_waiting` that says whether all of `data` went: Ok(whether it
/// had to wait), or the error (a timeout once 5 s passed with some left).
fn write_all_waiting(stream: &mut TcpStream, mut data: &[u8]) -> io::Result<bool> {
    let mut waited = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !data.is_empty() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no room in the socket for 5 s"));
        }
        match stream.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                waited = true;
                let mut p = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                // SAFETY: one live pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(waited)
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

impl Loader {
    fn start_connect(&mut self) -> io::Result<()> {
        let user = self.args.first_user + self.next_connect;
        self.next_connect += 1;
        let idx = self.conns.len();
        let addr = self.args.addr;
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        // Small buffers, like a phone's idle socket: the loader must stay
        // lean at tens of thousands of connections.
        sock.set_recv_buffer_size(4096)?;
        sock.set_send_buffer_size(4096)?;
        // Let connect() pick the port by the whole 4-tuple, so ports left in
        // TIME_WAIT by a previous run are reused (tcp_tw_reuse covers
        // loopback by default) instead of exhausting the range.
        let one: libc::c_int = 1;
        // SAFETY: passes a live c_int of the size given.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        sock.bind(&SocketAddr::new(self.args.src_ip, 0).into())?;
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(sock.into());
        self.poll.registry().register(&mut stream, Token(idx), Interest::READABLE | Interest::WRITABLE)?;
        self.conns.push(Conn { stream, user, state: State::Connecting, partial: None });
        self.inflight += 1;
        Ok(())
    }

    fn fail(&mut self, i: usize, why: String) {
        let c = &mut self.conns[i];
        if c.state == State::Closed {
            return;
        }
        let was_ready = c.state == State::Ready;
        if c.state == State::Connecting {
            self.inflight -= 1;
        }
        c.state = State::Closed;
        let _ = self.poll.registry().deregister(&mut c.stream);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        if was_ready {
            self.closed += 1;
        } else {
            self.failed += 1;
            if self.first_error.is_none() {
                self.first_error = Some(why);
            }
        }
    }

    fn on_writable(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.state != State::Connecting {
            return;
        }
        if let Ok(Some(e)) | Err(e) = c.stream.take_error() {
            self.fail(i, format!("connect: {e}"));
            return;
        }
        if c.stream.peer_addr().is_err() {
            return; // not connected yet
        }
        self.inflight -= 1;
        self.connected += 1;
        let user = format!("{}{}", self.args.user_prefix, c.user);
        let token = match self.args.transport {
            Transport::WsPlain => String::new(),
            _ => self.jwt.mint(&user, unix_now() + 86_400),
        };
        let first = match self.args.transport {
            Transport::Raw => {
                c.state = State::LoginSent;
                let device = self.args.device.as_deref();
                Frame::Login { user: &user, token: token.as_bytes(), device, last_seq: 0 }
                    .to_bytes()
                    .expect("login encodes")
                    .to_vec()
            }
            t => {
                c.state = State::Upgrading;
                let path = self.args.ws_path.as_deref().unwrap_or(DEFAULT_WS_PATH);
                let path = path.replace("{user}", &user).replace("{token}", &token);
                let key: [u8; 16] = [xorshift(&mut self.rng).to_ne_bytes(), xorshift(&mut self.rng).to_ne_bytes()]
                    .concat()
                    .try_into()
                    .expect("16 bytes");
                let key = base64::engine::general_purpose::STANDARD.encode(key);
                let protocol = if t == Transport::Ws {
                    format!("Sec-WebSocket-Protocol: {SUBPROTOCOL_BINARY}\r\n")
                } else {
                    String::new()
                };
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n",
                    self.args.addr
                )
                .into_bytes()
            }
        };
        let _ = self.poll.registry().reregister(&mut c.stream, Token(i), Interest::READABLE);
        if let Err(e) = c.stream.write_all(&first) {
            self.fail(i, format!("send LOGIN or upgrade request: {e}"));
        }
    }

    /// Sends one v1 frame as this transport frames it. A socket buffer
    /// full of this connection's SENDs (4 KiB, under overload) is waited
    /// for (`write_all_waiting`), as a real client's write would: failing the
    /// write closed a device connection at its ACK, and the steps after
    /// it then sent to a user nobody read for.
    fn send_frame(&mut self, i: usize, raw: Bytes, what: &str) -> bool {
        let out = wrap(self.args.transport, &mut self.rng, raw);
        let stream = &mut self.conns[i].stream;
        if let Err(e) = write_all_waiting(stream, &out) {
            self.fail(i, format!("send {what}: {e}"));
            return false;
        }
        true
    }

    /// A timed payload received (ROOM_MSG, or a plain WebSocket message).
    fn on_timed(&mut self, payload: &[u8]) {
        self.received += 1;
        if let Some((sent, seq)) = timed::read(payload) {
            let lat_us = (mono_ns().saturating_sub(sent) / 1000).max(1);
            let _ = self.hist.record(lat_us);
            let e = self.per_seq.entry(seq).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(lat_us);
        }
    }

    fn on_readable(&mut self, i: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        loop {
            if self.conns[i].state == State::Closed {
                break;
            }
            let n = match self.conns[i].stream.read(&mut scratch) {
                Ok(0) => {
                    self.fail(i, "server closed the connection".into());
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(i, format!("read: {e}"));
                    break;
                }
            };
            match self.conns[i].partial.take() {
                Some(mut p) => {
                    p.extend_from_slice(&scratch[..n]);
                    let used = self.on_bytes(i, &p);
                    if used < p.len() && self.conns[i].state != State::Closed {
                        p.drain(..used);
                        self.conns[i].partial = Some(p);
                    }
                }
                None => {
                    let used = self.on_bytes(i, &scratch[..n]);
                    if used < n && self.conns[i].state != State::Closed {
                        self.conns[i].partial = Some(Box::new(scratch[used..n].to_vec()));
                    }
                }
            }
            if n < scratch.len() {
                break;
            }
        }
        self.scratch = scratch;
    }

    /// Handles what arrived; returns the bytes used (the rest is an
    /// incomplete frame, kept for the next read).
    fn on_bytes(&mut self, i: usize, data: &[u8]) -> usize {
        let mut off = 0;
        if self.conns[i].state == State::Upgrading {
            let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                if data.len() > 16 * 1024 {
                    self.fail(i, "upgrade response head too long".into());
                    return data.len();
                }
                return 0;
            };
            if !data.starts_with(b"HTTP/1.1 101") {
                let text = String::from_utf8_lossy(&data[..data.len().min(300)]).replace("\r\n", " | ");
                self.fail(i, format!("upgrade refused: {text}"));
                return data.len();
            }
            off = end + 4;
            if self.args.transport == Transport::WsPlain {
                self.conns[i].state = State::Ready;
                self.ready += 1;
            } else {
                self.conns[i].state = State::LoginSent;
            }
        }
        let rest = &data[off..];
        let used = if self.args.transport.is_websocket() { self.ws_frames(i, rest) } else { self.raw_frames(i, rest) };
        off + used
    }

    fn raw_frames(&mut self, i: usize, data: &[u8]) -> usize {
        let mut off = 0;
        while off < data.len() {
            let (frame, n) = match decode(&data[off..], PROTOCOL_MAX_FRAME_BYTES) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    self.fail(i, format!("bad frame from server: {e}"));
                    return data.len();
                }
            };
            off += n;
            if !self.on_frame(i, frame) {
                return data.len();
            }
        }
        off
    }

    fn ws_frames(&mut self, i: usize, data: &[u8]) -> usize {
        use switchboard::proto::ws::{ClientDecoder, WsEvent};
        // The library's client-end decoder. A new one per call: servers here
        // never fragment (a fragment is reported as an error), so it holds
        // no state worth keeping per connection.
        let mut dec = ClientDecoder::new(MAX_WS_PAYLOAD);
        let mut off = 0;
        while off < data.len() {
            let (ev, n) = match dec.decode(&data[off..]) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    self.fail(i, format!("bad WebSocket frame from the server: {e}"));
                    return data.len();
                }
            };
            off += n;
            let payload = match ev {
                WsEvent::Text(t) => t.as_bytes(),
                WsEvent::Binary(b) => b,
                WsEvent::Ping(p) => {
                    let pong = ws_client_frame(Opcode::Pong, p, (xorshift(&mut self.rng) as u32).to_ne_bytes());
                    let _ = self.conns[i].stream.write(&pong);
                    self.pongs += 1;
                    continue;
                }
                WsEvent::Pong(_) => continue,
                WsEvent::Close { code, reason } => {
                    self.fail(i, format!("server closed the WebSocket: {code:?} {reason}"));
                    return data.len();
                }
                WsEvent::Fragment => {
                    self.fail(i, "the server fragmented a WebSocket message".into());
                    return data.len();
                }
            };
            // A data message: one whole frame.
            if self.args.transport == Transport::WsPlain {
                self.on_timed(payload);
                continue;
            }
            match decode(payload, PROTOCOL_MAX_FRAME_BYTES) {
                Ok(Some((frame, used))) if used == payload.len() => {
                    if !self.on_frame(i, frame) {
                        return data.len();
                    }
                }
                _ => {
                    self.fail(i, "a binary message that is not exactly one v1 frame".into());
                    return data.len();
                }
            }
        }
        off
    }

    /// One v1 frame from the server; false if the connection failed.
    fn on_frame(&mut self, i: usize, frame: Frame<'_>) -> bool {
        match frame {
            Frame::LoginOk { .. } if self.args.device.is_some() => self.conns[i].state = State::Syncing,
            Frame::LoginOk { .. } => return self.logged_in(i),
            Frame::Sync { position, head_seq, page_end, .. } if !self.inbox.is_empty() => {
                let a = &mut self.inbox[i];
                a.seq = a.seq.max(position);
                a.acked = a.acked.max(position);
                (a.page_end, a.head) = (page_end, head_seq);
                // An empty page with more waiting (expired messages): on.
                if a.seq >= page_end && page_end < head_seq && !self.fetch(i) {
                    return false;
                }
                if self.conns[i].state == State::Syncing {
                    return self.logged_in(i);
                }
            }
            Frame::Inbox { seq, payload, .. } if !self.inbox.is_empty() => return self.on_inbox(i, seq, payload),
            Frame::RoomAck { .. } if self.conns[i].state == State::Joining => {
                self.conns[i].state = State::Ready;
                self.ready += 1;
            }
            Frame::Error { code, reason, .. } if self.conns[i].state == State::Joining => {
                self.fail(i, format!("SUBSCRIBE refused: ERROR {code}: {reason}"));
                return false;
            }
            Frame::RoomMsg { payload, .. } => self.on_timed(payload),
            Frame::Skipped { count } => self.skipped += count as u64,
            Frame::LoginError { code, reason } => {
                self.fail(i, format!("LOGIN_ERROR {code}: {reason}"));
                return false;
            }
            // Named, not left to the end of the stream ("server closed the
            // connection"): 4005 says the server was full.
            Frame::Close { code, reason } => {
                self.fail(i, format!("server closed the connection: CLOSE {code}: {reason}"));
                return false;
            }
            Frame::Ping { data: d } => {
                let pong = wrap(self.args.transport, &mut self.rng, Frame::Pong { data: d }.to_bytes().expect("pong"));
                let _ = self.conns[i].stream.write(&pong);
                self.pongs += 1;
            }
            // A stored message reaches a device login as INBOX: timed alike.
            Frame::Push { payload, .. } | Frame::Inbox { payload, .. } => {
                self.received += 1;
                if let Some(sent) = timed::sent_ns(payload) {
                    let lat_us = mono_ns().saturating_sub(sent) / 1000;
                    let _ = self.hist.record(lat_us.max(1));
                }
            }
            _ => {}
        }
        true
    }

    /// LOGIN_OK (or, for a device, its SYNC) read: join the room, or ready.
    fn logged_in(&mut self, i: usize) -> bool {
        match self.args.room.clone() {
            Some(room) => {
                let sub = Frame::Subscribe { req_id: 1, room: &room }.to_bytes().expect("room fits");
                self.conns[i].state = State::Joining;
                self.send_frame(i, sub, "SUBSCRIBE")
            }
            None => {
                self.conns[i].state = State::Ready;
                self.ready += 1;
                true
            }
        }
    }

    /// One INBOX on a device connection: counted and timed if new, then
    /// acknowledged as PROTOCOL.md 15.4 says.
    fn on_inbox(&mut self, i: usize, seq: u64, payload: &[u8]) -> bool {
        let a = &mut self.inbox[i];
        if seq <= a.seq {
            self.duplicates += 1;
            return true;
        }
        let was_acked = a.seq == a.acked;
        a.seq = seq;
        let a = *a;
        self.received += 1;
        if let Some(sent) = timed::sent_ns(payload) {
            let _ = self.hist.record((mono_ns().saturating_sub(sent) / 1000).max(1));
        }
        if a.seq == a.page_end && a.page_end < a.head {
            self.fetch(i)
        } else if a.seq - a.acked >= ACK_EVERY || a.seq == a.page_end {
            self.ack(i)
        } else {
            if was_acked {
                self.ack_due.push_back((Instant::now() + ACK_DELAY, i, a.acked));
            }
            true
        }
    }

    /// Acknowledges everything received on device connection `i`.
    fn ack(&mut self, i: usize) -> bool {
        let a = &mut self.inbox[i];
        a.acked = a.seq;
        let f = Frame::Ack { seq: a.seq }.to_bytes().expect("ack encodes");
        self.acks_sent += 1;
        self.send_frame(i, f, "ACK")
    }

    /// FETCHes what follows the page just received (which it acknowledges).
    fn fetch(&mut self, i: usize) -> bool {
        let a = &mut self.inbox[i];
        a.acked = a.seq;
        self.fetches_sent += 1;
        let req_id = self.fetches_sent as u32;
        let f = Frame::Fetch { req_id, after_seq: a.seq, limit: FETCH_LIMIT }.to_bytes().expect("fetch encodes");
        self.send_frame(i, f, "FETCH")
    }

    /// Sends the ACKs whose delay is up; returns the time to the next one.
    fn flush_acks(&mut self) -> Option<Duration> {
        let now = Instant::now();
        while let Some(&(due, i, acked_then)) = self.ack_due.front() {
            if due > now {
                return Some(due - now);
            }
            self.ack_due.pop_front();
            let a = self.inbox[i];
            if a.acked == acked_then && a.seq > a.acked && self.conns[i].state == State::Ready {
                self.ack(i);
            }
        }
        None
    }

    fn on_stdin(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: reads into a live stack buffer from fd 0 (non-blocking).
            let n = unsafe { libc::read(0, chunk.as_mut_ptr() as *mut libc::c_void, chunk.len()) };
            if n == 0 {
                self.quit = true; // coordinator gone
                return;
            }
            if n < 0 {
                return;
            }
            self.stdin_buf.extend_from_slice(&chunk[..n as usize]);
            while let Some(pos) = self.stdin_buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.stdin_buf.drain(..=pos).collect();
                match serde_json::from_slice::<Command>(&line) {
                    Ok(cmd) => self.on_command(cmd),
                    Err(e) => emit(&Event::Error { message: format!("bad command: {e}") }),
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Unicast { rate_per_s, duration_ms, users_total, payload_bytes, seed, to_prefix } => {
                let now = Instant::now();
                self.unicast = Some(Unicast {
                    rate_per_s,
                    started: now,
                    until: now + Duration::from_millis(duration_ms),
                    sent: 0,
                    blocked: 0,
                    next_sender: 0,
                    users_total,
                    to_prefix: to_prefix.unwrap_or_else(|| self.args.user_prefix.clone()),
                    payload: vec![0u8; payload_bytes.max(8)],
                    rng: seed | 1,
                });
            }
            Command::Collect => {
                let mut out = Vec::new();
                V2Serializer::new().serialize(&self.hist, &mut out).expect("histogram serialises");
                emit(&Event::Collected {
                    received: self.received,
                    pongs: self.pongs,
                    closed: self.closed,
                    hist: base64::engine::general_purpose::STANDARD.encode(out),
                    per_seq: self.per_seq.drain().map(|(s, (n, m))| (s, n, m)).collect(),
                    skipped: self.skipped,
                    duplicates: self.duplicates,
                    acks: self.acks_sent,
                    fetches: self.fetches_sent,
                });
                self.hist.reset();
                self.received = 0;
                self.pongs = 0;
                // Per collect, as every other count: a member cut off in
                // one phase must not mark every later one incomplete.
                self.closed = 0;
                self.skipped = 0;
                self.duplicates = 0;
                self.acks_sent = 0;
                self.fetches_sent = 0;
            }
            Command::Publish { room, rate_per_s, count, payload_bytes, first_seq } => {
                self.publisher = Some(Publisher {
                    room,
                    rate_per_s,
                    count,
                    sent: 0,
                    payload_bytes,
                    first_seq,
                    started: Instant::now(),
                });
            }
            Command::Quit => self.quit = true,
        }
    }

    /// Sends every PUBLISH due by now from the first ready connection.
    fn drive_publisher(&mut self) -> Option<Duration> {
        let p = self.publisher.as_mut()?;
        let due = ((p.started.elapsed().as_secs_f64() * p.rate_per_s) as u32 + 1).min(p.count);
        let Some(i) = self.conns.iter().position(|c| c.state == State::Ready) else {
            emit(&Event::Error { message: "no ready connection to publish from".into() });
            self.publisher = None;
            return None;
        };
        let mut blocked = 0;
        while p.sent < due {
            let payload = timed::payload(p.first_seq + p.sent, p.payload_bytes);
            let f = Frame::Publish { req_id: 0, room: &p.room, payload: &payload }.to_bytes().expect("publish encodes");
            let f = wrap(self.args.transport, &mut self.rng, f);
            // A publisher that the server reads slowly waits (its messages
            // are the load; dropping them would under-report), and counts
            // how often it had to.
            if write_waiting(&mut self.conns[i].stream, &f) {
                blocked += 1;
            }
            p.sent += 1;
        }
        if p.sent >= p.count {
            emit(&Event::Sent { sent: p.sent as u64, blocked, elapsed_ms: p.started.elapsed().as_millis() as u64 });
            self.publisher = None;
            return None;
        }
        let next = Duration::from_secs_f64(p.sent as f64 / p.rate_per_s);
        Some(next.saturating_sub(p.started.elapsed()).max(Duration::from_micros(200)))
    }

    /// Sends every SEND due by now (open loop: the schedule does not wait
    /// for replies; a send the socket cannot take is counted as blocked).
    fn drive_unicast(&mut self) -> Option<Duration> {
        let u = self.unicast.as_mut()?;
        let now = Instant::now();
        let elapsed = now.min(u.until).duration_since(u.started);
        let due = (elapsed.as_nanos() as u64 * u.rate_per_s / 1_000_000_000).saturating_sub(u.sent);
        let n = self.conns.len();
        for _ in 0..due {
            // Next ready sender, round robin.
            let mut tries = 0;
            while self.conns[u.next_sender % n].state != State::Ready && tries < n {
                u.next_sender += 1;
                tries += 1;
            }
            if tries == n {
                break;
            }
            let sender = u.next_sender % n;
            u.next_sender += 1;
            let target = (xorshift(&mut u.rng) % u.users_total as u64) as u32;
            let to = format!("{}{}", u.to_prefix, target);
            timed::restamp(&mut u.payload);
            let f = Frame::Send { req_id: 0, to: &to, payload: &u.payload }.to_bytes().expect("send encodes");
            let f = wrap(self.args.transport, &mut self.rng, f);
            match self.conns[sender].stream.write(&f) {
                Ok(w) if w == f.len() => {}
                // A short write would corrupt the stream: the socket buffer
                // is that full only under overload; count and close it.
                Ok(_) => {
                    u.blocked += 1;
                    let _ = self.conns[sender].stream.shutdown(std::net::Shutdown::Both);
                }
                Err(_) => u.blocked += 1,
            }
            u.sent += 1;
        }
        if now >= u.until {
            emit(&Event::Sent { sent: u.sent, blocked: u.blocked, elapsed_ms: u.started.elapsed().as_millis() as u64 });
            self.unicast = None;
            return None;
        }
        Some(Duration::from_micros(500))
    }
}

/// Runs a loader until `Quit` or until the coordinator goes away.
pub fn run(args: LoaderArgs) -> io::Result<()> {
    // SAFETY: set O_NONBLOCK on our own stdin.
    unsafe {
        let fl = libc::fcntl(0, libc::F_GETFL);
        libc::fcntl(0, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let poll = Poll::new()?;
    poll.registry().register(&mut SourceFd(&io::stdin().as_raw_fd()), STDIN, Interest::READABLE)?;
    let count = args.count;
    if args.device.is_some() && args.transport != Transport::Raw {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "--device needs --transport raw"));
    }
    let inbox = if args.device.is_some() { vec![InboxPos::default(); count as usize] } else { Vec::new() };
    let mut l = Loader {
        jwt: JwtHs256::new(args.secret.clone()),
        args,
        poll,
        conns: Vec::with_capacity(count as usize),
        scratch: vec![0; 64 * 1024],
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        per_seq: std::collections::HashMap::new(),
        skipped: 0,
        received: 0,
        pongs: 0,
        closed: 0,
        ready: 0,
        failed: 0,
        connected: 0,
        inflight: 0,
        next_connect: 0,
        first_error: None,
        unicast: None,
        publisher: None,
        inbox,
        ack_due: VecDeque::new(),
        duplicates: 0,
        acks_sent: 0,
        fetches_sent: 0,
        stdin_buf: Vec::new(),
        quit: false,
        rng: (mono_ns() ^ (u64::from(std::process::id()) << 32)) | 1,
    };
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut announced = false;
    let mut events = Events::with_capacity(4096);
    while !l.quit {
        while l.inflight < MAX_INFLIGHT_CONNECTS && l.next_connect < count {
            if let Err(e) = l.start_connect() {
                l.failed += 1;
                if l.first_error.is_none() {
                    l.first_error = Some(format!("connect: {e}"));
                }
            }
        }
        let timeout = l.drive_unicast().unwrap_or(Duration::from_millis(100));
        let timeout = l.drive_publisher().map_or(timeout, |t| t.min(timeout));
        let timeout = l.flush_acks().map_or(timeout, |t| t.min(timeout));
        match l.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            if ev.token() == STDIN {
                l.on_stdin();
                continue;
            }
            let i = ev.token().0;
            if ev.is_writable() {
                l.on_writable(i);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                if l.conns[i].state == State::Connecting {
                    l.on_writable(i);
                }
                l.on_readable(i);
            }
        }
        if !announced {
            if l.ready + l.failed >= count {
                announced = true;
                emit(&Event::Ready {
                    ready: l.ready,
                    failed: l.failed,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    first_error: l.first_error.clone(),
                });
            } else if last_progress.elapsed() >= Duration::from_millis(500) {
                last_progress = Instant::now();
                emit(&Event::Progress { connected: l.connected, ready: l.ready, failed: l.failed });
            }
        }
    }
    let _ = io::stdin().lock().fill_buf();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard::proto::ws::{Decoder, WsEvent};

    #[test]
    fn client_frames_are_masked_and_the_server_decoder_reads_them() {
        for len in [0usize, 5, 125, 126, 1000, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut f = ws_client_frame(Opcode::Binary, &payload, [1, 2, 3, 4]);
            assert_ne!(f[1] & 0x80, 0, "MASK bit set");
            let mut dec = Decoder::new(1 << 20);
            match dec.decode(&mut f).expect("valid frame") {
                Some((WsEvent::Binary(p), n)) => {
                    assert_eq!(p, &payload[..]);
                    assert_eq!(n, f.len());
                }
                other => panic!("len {len}: {other:?}"),
            }
        }
        let mut pong = ws_client_frame(Opcode::Pong, b"hb", [9, 9, 9, 9]);
        assert!(matches!(Decoder::new(1024).decode(&mut pong), Ok(Some((WsEvent::Pong(b"hb"), _)))));
    }
}
