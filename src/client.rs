//! A small blocking client for the raw TCP protocol, over `std::net`.
//!
//! Owns: one connection, its read buffer, and helpers for LOGIN (with or
//! without a device id), SEND, SEND_EX, ACK, FETCH, PING and reading
//! frames (every server frame, the reliable-delivery ones included, comes
//! back from [`Client::recv`] as a [`RawFrame`]). Used by `switchboard client`, the tests and
//! anyone who wants to talk to a server from plain Rust. Also one plain
//! request to the admin API ([`admin_request`]).
//! Must not: be used where thousands of connections are needed (one thread
//! per blocking client); the load generator has its own lean client.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::proto::frame::{decode, DecodeError, EncodeError, Frame, PROTOCOL_MAX_FRAME_BYTES};

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("server sent an invalid frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode: {0}")]
    Encode(#[from] EncodeError),
    #[error("connection closed by the server")]
    Closed,
    #[error("login refused: code {code}: {reason}")]
    LoginRefused { code: u16, reason: String },
    #[error("server closed the connection: code {code}: {reason}")]
    CloseFrame { code: u16, reason: String },
    #[error("request refused: ERROR {code}: {reason}")]
    Refused { code: u16, reason: String },
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    /// The peer spoke HTTP: a WebSocket port, an admin port or some web
    /// server, not a Switchboard raw TCP port.
    #[error(
        "the server answered in HTTP ({status_line:?}): this is a WebSocket or HTTP port, not Switchboard's raw \
         TCP port (server.listen, 7700 by default; the WebSocket port, 7710 by default, is for browsers)"
    )]
    HttpAnswer { status_line: String },
}

impl ClientError {
    /// Whether this is a read timeout (set with `set_read_timeout`).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// One received frame, owning its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame(Bytes);

impl RawFrame {
    /// The decoded frame (decoding again is cheap and cannot fail: the bytes
    /// were validated when received).
    pub fn frame(&self) -> Frame<'_> {
        decode(&self.0, PROTOCOL_MAX_FRAME_BYTES).ok().flatten().expect("validated on receipt").0
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }
}

/// What LOGIN_OK told us.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LoginInfo {
    pub conn_id: u64,
    pub heartbeat_interval_ms: u32,
    pub idle_timeout_ms: u32,
    pub max_frame_bytes: u32,
}

/// A blocking connection to a Switchboard server.
pub struct Client {
    stream: TcpStream,
    buf: BytesMut,
    /// Whether a frame has been received (an HTTP answer can only come
    /// first).
    framed: bool,
}

impl Client {
    /// Connects (with TCP_NODELAY).
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Client { stream, buf: BytesMut::with_capacity(4096), framed: false })
    }

    /// Connects with a timeout.
    pub fn connect_timeout(addr: &SocketAddr, timeout: Duration) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(addr, timeout)?;
        stream.set_nodelay(true)?;
        Ok(Client { stream, buf: BytesMut::with_capacity(4096), framed: false })
    }

    /// A second handle on the same connection, for reading on one thread
    /// while another writes. Frames already read into this handle's buffer
    /// stay here: split before reading anything after the login.
    pub fn try_clone_for_reading(&self) -> io::Result<Client> {
        Ok(Client { stream: self.stream.try_clone()?, buf: BytesMut::with_capacity(4096), framed: self.framed })
    }

    /// Bounds how long `recv` blocks (`None`: forever).
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(d)
    }

    /// Bounds how long a send blocks on a peer that does not read (`None`: forever).
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.stream.set_write_timeout(d)
    }

    /// The underlying socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Encodes and writes one frame.
    pub fn send_frame(&mut self, f: &Frame<'_>) -> Result<(), ClientError> {
        let b = f.to_bytes()?;
        self.stream.write_all(&b)?;
        Ok(())
    }

    /// Writes raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends LOGIN and waits for LOGIN_OK (answering any PING on the way).
    pub fn login(&mut self, user: &str, token: &str) -> Result<LoginInfo, ClientError> {
        self.login_with(&Frame::Login { user, token: token.as_bytes(), device: None, last_seq: 0 })
    }

    /// Sends LOGIN as device `device` (reliable delivery: 1 to 64 bytes,
    /// stable per app install) that has stored every inbox message up to
    /// `last_seq` (0: none), and waits for LOGIN_OK. The server follows it
    /// with a SYNC and the first page of INBOX frames, left for
    /// [`Client::recv`].
    pub fn login_device(
        &mut self,
        user: &str,
        token: &str,
        device: &str,
        last_seq: u64,
    ) -> Result<LoginInfo, ClientError> {
        self.login_with(&Frame::Login { user, token: token.as_bytes(), device: Some(device), last_seq })
    }

    fn login_with(&mut self, login: &Frame<'_>) -> Result<LoginInfo, ClientError> {
        self.send_frame(login)?;
        let f = self.recv_skipping_pings()?;
        match f.frame() {
            Frame::LoginOk { conn_id, heartbeat_interval_ms, idle_timeout_ms, max_frame_bytes } => {
                Ok(LoginInfo { conn_id, heartbeat_interval_ms, idle_timeout_ms, max_frame_bytes })
            }
            Frame::LoginError { code, reason } => Err(ClientError::LoginRefused { code, reason: reason.to_string() }),
            Frame::Close { code, reason } => Err(ClientError::CloseFrame { code, reason: reason.to_string() }),
            other => Err(ClientError::Unexpected(format!("{other:?} while waiting for LOGIN_OK"))),
        }
    }

    /// Sends a SEND to `to`.
    pub fn send(&mut self, req_id: u32, to: &str, payload: &[u8]) -> Result<(), ClientError> {
        self.send_frame(&Frame::Send { req_id, to, payload })
    }

    /// Sends a SEND_EX to `to`: `flags` 0 or [`SEND_EX_AT_MOST_ONCE`],
    /// `client_id` an idempotency key (0: none). The answer (SEND_RESULT,
    /// for `req_id != 0`) is left for [`Client::recv`].
    ///
    /// [`SEND_EX_AT_MOST_ONCE`]: crate::proto::frame::SEND_EX_AT_MOST_ONCE
    pub fn send_ex(
        &mut self,
        req_id: u32,
        flags: u8,
        client_id: u64,
        to: &str,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.send_frame(&Frame::SendEx { req_id, flags, client_id, ttl_ms: 0, to, payload })
    }

    /// [`Client::send_ex`] of a message that expires `ttl_ms` (at least 1)
    /// after the server stored it: a device that has not had it by then
    /// never gets it (docs/PROTOCOL.md 15.9). Sets [`SEND_EX_TTL`] in
    /// `flags`.
    ///
    /// [`SEND_EX_TTL`]: crate::proto::frame::SEND_EX_TTL
    pub fn send_ex_with_ttl(
        &mut self,
        req_id: u32,
        flags: u8,
        client_id: u64,
        ttl_ms: u32,
        to: &str,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let flags = flags | crate::proto::frame::SEND_EX_TTL;
        self.send_frame(&Frame::SendEx { req_id, flags, client_id, ttl_ms, to, payload })
    }

    /// Acknowledges every inbox message up to `seq` (cumulative).
    pub fn ack(&mut self, seq: u64) -> Result<(), ClientError> {
        self.send_frame(&Frame::Ack { seq })
    }

    /// Asks for up to `limit` (at least 1) inbox messages after
    /// `after_seq`, which also acknowledges `after_seq`. The SYNC and INBOX
    /// frames that answer are left for [`Client::recv`].
    pub fn fetch(&mut self, req_id: u32, after_seq: u64, limit: u16) -> Result<(), ClientError> {
        self.send_frame(&Frame::Fetch { req_id, after_seq, limit })
    }

    /// Joins a room and waits for its ROOM_ACK (other frames in between are
    /// returned as an error: call it on a quiet connection).
    pub fn subscribe(&mut self, req_id: u32, room: &str) -> Result<(), ClientError> {
        self.send_frame(&Frame::Subscribe { req_id, room })?;
        self.expect_room_ack(req_id)
    }

    /// Leaves a room and waits for its ROOM_ACK.
    pub fn unsubscribe(&mut self, req_id: u32, room: &str) -> Result<(), ClientError> {
        self.send_frame(&Frame::Unsubscribe { req_id, room })?;
        self.expect_room_ack(req_id)
    }

    fn expect_room_ack(&mut self, req_id: u32) -> Result<(), ClientError> {
        let f = self.recv_skipping_pings()?;
        match f.frame() {
            Frame::RoomAck { req_id: r, .. } if r == req_id => Ok(()),
            Frame::Error { code, reason, .. } => Err(ClientError::Refused { code, reason: reason.to_string() }),
            other => Err(ClientError::Unexpected(format!("{other:?} while waiting for ROOM_ACK {req_id}"))),
        }
    }

    /// Publishes to a room the connection is in.
    pub fn publish(&mut self, req_id: u32, room: &str, payload: &[u8]) -> Result<(), ClientError> {
        self.send_frame(&Frame::Publish { req_id, room, payload })
    }

    /// Reads the next frame, blocking (up to the read timeout).
    pub fn recv(&mut self) -> Result<RawFrame, ClientError> {
        loop {
            match decode(&self.buf, PROTOCOL_MAX_FRAME_BYTES) {
                Ok(Some((_, n))) => {
                    self.framed = true;
                    return Ok(RawFrame(self.buf.split_to(n).freeze()));
                }
                Ok(None) => {}
                // "HTTP" read as a length prefix is 1.2 GB: the first bytes
                // of an HTTP answer, from the wrong port.
                Err(_) if !self.framed && self.buf.starts_with(b"HTTP") => return Err(self.http_answer()),
                Err(e) => return Err(e.into()),
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The error for a peer that answered in HTTP, with its status line
    /// (read on for up to 256 bytes to get it whole).
    fn http_answer(&mut self) -> ClientError {
        let mut chunk = [0u8; 256];
        while !self.buf.contains(&b'\n') && self.buf.len() < chunk.len() {
            match self.stream.read(&mut chunk[..256 - self.buf.len()]) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        let line = self.buf[..].split(|&b| b == b'\n').next().unwrap_or_default();
        ClientError::HttpAnswer { status_line: String::from_utf8_lossy(line).trim().to_string() }
    }

    /// Reads frames until one is not a PING (PINGs are answered), e.g. to
    /// wait for a PUSH without caring about heartbeats.
    pub fn recv_skipping_pings(&mut self) -> Result<RawFrame, ClientError> {
        loop {
            let f = self.recv()?;
            if let Frame::Ping { data } = f.frame() {
                let pong = Frame::Pong { data }.to_bytes()?;
                self.stream.write_all(&pong)?;
                continue;
            }
            return Ok(f);
        }
    }

    /// Reads until the server closes; returns the CLOSE (or LOGIN_ERROR)
    /// code it sent, if any.
    pub fn recv_close_code(&mut self) -> Result<Option<u16>, ClientError> {
        let mut code = None;
        loop {
            match self.recv() {
                Ok(f) => match f.frame() {
                    Frame::Close { code: c, .. } | Frame::LoginError { code: c, .. } => code = Some(c),
                    _ => {}
                },
                Err(ClientError::Closed) => return Ok(code),
                Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(code),
                Err(e) => return Err(e),
            }
        }
    }
}

/// One HTTP/1.1 request to the admin API on its own connection (`token`:
/// sent as `Authorization: Bearer`): (status, body). Blocking, with a 5 s
/// connect and a 120 s read timeout. For tests, tools and scripts; a
/// backend in production wants a real HTTP client.
pub fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n{auth}connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{SendOutcome, SEND_EX_AT_MOST_ONCE};
    use std::net::TcpListener;

    /// A scripted server on loopback: reads the client's frames, answers a
    /// device login with LOGIN_OK, SYNC and one INBOX, a SEND_EX with
    /// SEND_RESULT; the client reads each back through `recv`.
    #[test]
    fn the_client_speaks_the_reliable_delivery_frames() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut frames: Vec<Vec<u8>> = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut next = |s: &mut TcpStream, buf: &mut Vec<u8>| loop {
                if let Some((_, n)) = decode(buf, PROTOCOL_MAX_FRAME_BYTES).unwrap() {
                    return buf.drain(..n).collect::<Vec<u8>>();
                }
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "client hung up");
                buf.extend_from_slice(&chunk[..n]);
            };
            let login = next(&mut s, &mut buf);
            frames.push(login);
            let ok = Frame::LoginOk { conn_id: 1, heartbeat_interval_ms: 1, idle_timeout_ms: 2, max_frame_bytes: 8192 };
            s.write_all(&ok.to_bytes().unwrap()).unwrap();
            s.write_all(&Frame::Sync { req_id: 0, position: 41, head_seq: 42, page_end: 42 }.to_bytes().unwrap())
                .unwrap();
            let inbox = Frame::Inbox { seq: 42, msg_id: 9, ts_ms: 5, from: "bob", payload: b"hi" };
            s.write_all(&inbox.to_bytes().unwrap()).unwrap();
            for _ in 0..3 {
                frames.push(next(&mut s, &mut buf));
            }
            let result =
                Frame::SendResult { req_id: 7, outcome: SendOutcome::Stored, seq: 3, msg_id: 10, delivered: 0 };
            s.write_all(&result.to_bytes().unwrap()).unwrap();
            frames
        });
        let mut c = Client::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let info = c.login_device("alice", "t0k", "phone", 41).unwrap();
        assert_eq!(info.conn_id, 1);
        assert_eq!(c.recv().unwrap().frame(), Frame::Sync { req_id: 0, position: 41, head_seq: 42, page_end: 42 });
        assert_eq!(
            c.recv().unwrap().frame(),
            Frame::Inbox { seq: 42, msg_id: 9, ts_ms: 5, from: "bob", payload: b"hi" }
        );
        c.ack(42).unwrap();
        c.fetch(3, 42, 100).unwrap();
        c.send_ex(7, SEND_EX_AT_MOST_ONCE, 1001, "bob", b"yo").unwrap();
        assert_eq!(
            c.recv().unwrap().frame(),
            Frame::SendResult { req_id: 7, outcome: SendOutcome::Stored, seq: 3, msg_id: 10, delivered: 0 }
        );
        let sent = server.join().unwrap();
        let sent: Vec<Frame<'_>> =
            sent.iter().map(|b| decode(b, PROTOCOL_MAX_FRAME_BYTES).unwrap().unwrap().0).collect();
        assert_eq!(
            sent,
            [
                Frame::Login { user: "alice", token: b"t0k", device: Some("phone"), last_seq: 41 },
                Frame::Ack { seq: 42 },
                Frame::Fetch { req_id: 3, after_seq: 42, limit: 100 },
                Frame::SendEx {
                    req_id: 7,
                    flags: SEND_EX_AT_MOST_ONCE,
                    client_id: 1001,
                    ttl_ms: 0,
                    to: "bob",
                    payload: b"yo"
                },
            ]
        );
    }
}
