//! Raw TCP protocol v1: frame layout, decoder and encoder.
//!
//! Owns: the byte layout of every frame (documented in `docs/PROTOCOL.md`),
//! decoding from a borrowed buffer without copying, and encoding.
//! Must not: do I/O, allocate per decoded frame, keep state between calls, or
//! panic on any input. "Need more bytes" (`Ok(None)`) is not "invalid"
//! (`Err`): the first waits, the second closes the connection with the
//! [`CloseCode`] the error maps to.
//!
//! Every frame:
//! ```text
//! +----------------+---------+---------+----------------------+
//! | length: u32 BE | version | type    | body                 |
//! | = 2 + body len | u8 = 1  | u8      | (length - 2) bytes   |
//! +----------------+---------+---------+----------------------+
//! ```
//! Integers are big-endian. `str8` is a u8 length then that many UTF-8 bytes;
//! `bytes16` is a u16 length then that many bytes; `rest` is everything to the
//! end of the frame.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::codes::CloseCode;

/// The protocol version this module speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body: length (4), version (1), type (1).
pub const HEADER_LEN: usize = 6;
/// The length prefix alone.
pub const LEN_PREFIX: usize = 4;
/// Smallest frame a server may be configured to accept (whole frame, header
/// included): large enough for a LOGIN with a 255-byte user id and the
/// largest token the server accepts (4096 bytes).
pub const MIN_MAX_FRAME_BYTES: usize = 8192;
/// Largest frame the protocol allows at all (16 MiB); servers default lower.
pub const PROTOCOL_MAX_FRAME_BYTES: usize = 16 << 20;
/// Largest PING/PONG data: enough for a timestamp and a nonce.
pub const MAX_PING_DATA: usize = 64;
/// Largest user id in bytes (the `str8` limit).
pub const MAX_USER_ID_BYTES: usize = 255;

/// Whether `user` can be a user id: 1 to [`MAX_USER_ID_BYTES`] bytes, the
/// rule LOGIN decoding, the handle and `switchboard token` all apply.
pub fn is_valid_user_id(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_ID_BYTES
}
/// Largest LOGIN token the server accepts (the built-in JWT check refuses
/// longer ones with LOGIN_ERROR 1).
pub const MAX_LOGIN_TOKEN_BYTES: usize = 4096;
/// Largest valid LOGIN frame, header included (4 + 1 + 1 + 1 + 255 + 2 +
/// 4096 = 4360 bytes): the largest frame a connection may send before it
/// has logged in. A connection that has not logged in can therefore make
/// the server buffer at most this much, whatever `max_frame_bytes` is.
pub const MAX_LOGIN_FRAME_BYTES: usize = HEADER_LEN + 1 + MAX_USER_ID_BYTES + 2 + MAX_LOGIN_TOKEN_BYTES;
const _: () = assert!(MAX_LOGIN_FRAME_BYTES <= MIN_MAX_FRAME_BYTES);

/// Frame type byte.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Login = 0x01,
    LoginOk = 0x02,
    LoginError = 0x03,
    Ping = 0x04,
    Pong = 0x05,
    Push = 0x06,
    Send = 0x07,
    SendAck = 0x08,
    Message = 0x09,
    Close = 0x0A,
    Error = 0x0B,
    Subscribe = 0x10,
    Unsubscribe = 0x11,
    RoomAck = 0x12,
    Publish = 0x13,
    RoomMsg = 0x14,
    Skipped = 0x15,
}

impl FrameType {
    /// Maps a type byte to a known frame type.
    pub fn from_u8(b: u8) -> Option<FrameType> {
        Some(match b {
            0x01 => FrameType::Login,
            0x02 => FrameType::LoginOk,
            0x03 => FrameType::LoginError,
            0x04 => FrameType::Ping,
            0x05 => FrameType::Pong,
            0x06 => FrameType::Push,
            0x07 => FrameType::Send,
            0x08 => FrameType::SendAck,
            0x09 => FrameType::Message,
            0x0A => FrameType::Close,
            0x0B => FrameType::Error,
            0x10 => FrameType::Subscribe,
            0x11 => FrameType::Unsubscribe,
            0x12 => FrameType::RoomAck,
            0x13 => FrameType::Publish,
            0x14 => FrameType::RoomMsg,
            0x15 => FrameType::Skipped,
            _ => return None,
        })
    }

    /// Upper-case protocol name, as in `docs/PROTOCOL.md`.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Login => "LOGIN",
            FrameType::LoginOk => "LOGIN_OK",
            FrameType::LoginError => "LOGIN_ERROR",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Push => "PUSH",
            FrameType::Send => "SEND",
            FrameType::SendAck => "SEND_ACK",
            FrameType::Message => "MESSAGE",
            FrameType::Close => "CLOSE",
            FrameType::Error => "ERROR",
            FrameType::Subscribe => "SUBSCRIBE",
            FrameType::Unsubscribe => "UNSUBSCRIBE",
            FrameType::RoomAck => "ROOM_ACK",
            FrameType::Publish => "PUBLISH",
            FrameType::RoomMsg => "ROOM_MSG",
            FrameType::Skipped => "SKIPPED",
        }
    }

    /// Whether a slow consumer's queue may drop this frame under
    /// `limits.slow_consumer = "drop_oldest"`: messages, not control frames.
    pub fn is_droppable(self) -> bool {
        matches!(self, FrameType::Push | FrameType::RoomMsg)
    }
}

/// One decoded frame, borrowing its variable-length fields from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Client → server: `user: str8, token: bytes16`.
    Login { user: &'a str, token: &'a [u8] },
    /// Server → client: `conn_id: u64, heartbeat_interval_ms: u32,
    /// idle_timeout_ms: u32, max_frame_bytes: u32`.
    LoginOk { conn_id: u64, heartbeat_interval_ms: u32, idle_timeout_ms: u32, max_frame_bytes: u32 },
    /// Server → client, then the server closes: `code: u16, reason: str8`.
    LoginError { code: u16, reason: &'a str },
    /// Either way: `data: rest` (at most 64 bytes), echoed in the PONG.
    Ping { data: &'a [u8] },
    /// Either way: `data: rest`, the PING's data.
    Pong { data: &'a [u8] },
    /// Server → client: `msg_id: u64, from: str8, payload: rest`. `from` is
    /// empty for pushes from the application.
    Push { msg_id: u64, from: &'a str, payload: &'a [u8] },
    /// Client → server: `req_id: u32, to: str8, payload: rest`.
    Send { req_id: u32, to: &'a str, payload: &'a [u8] },
    /// Server → client, for a SEND with `req_id != 0`: `req_id: u32,
    /// delivered: u32` (connections the message was handed to).
    SendAck { req_id: u32, delivered: u32 },
    /// Client → server, for the application: `req_id: u32, payload: rest`.
    Message { req_id: u32, payload: &'a [u8] },
    /// Either way, then the sender closes: `code: u16, reason: str8`.
    Close { code: u16, reason: &'a str },
    /// Server → client, the connection stays open: `code: u16, req_id: u32,
    /// reason: str8`.
    Error { code: u16, req_id: u32, reason: &'a str },
    /// Client → server: join a room. `req_id: u32, room: str8`.
    Subscribe { req_id: u32, room: &'a str },
    /// Client → server: leave a room. `req_id: u32, room: str8`.
    Unsubscribe { req_id: u32, room: &'a str },
    /// Server → client: a room operation took effect. `req_id: u32, op: u8,
    /// room: str8`; `req_id` is the request's, 0 when the application acted
    /// for the client.
    RoomAck { req_id: u32, op: RoomOp, room: &'a str },
    /// Client → server: publish to a room the client is in. `req_id: u32,
    /// room: str8, payload: rest`.
    Publish { req_id: u32, room: &'a str, payload: &'a [u8] },
    /// Server → client: a room message. `msg_id: u64, room: str8, from:
    /// str8, payload: rest`; `room` empty for a broadcast to everyone,
    /// `from` empty when the application published.
    RoomMsg { msg_id: u64, room: &'a str, from: &'a str, payload: &'a [u8] },
    /// Server → client: this many messages for this connection were dropped
    /// here because it read too slowly. `count: u32`.
    Skipped { count: u32 },
}

/// The operation a ROOM_ACK confirms.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RoomOp {
    Subscribed = 1,
    Unsubscribed = 2,
    Published = 3,
}

impl RoomOp {
    fn from_u8(b: u8) -> Option<RoomOp> {
        Some(match b {
            1 => RoomOp::Subscribed,
            2 => RoomOp::Unsubscribed,
            3 => RoomOp::Published,
            _ => return None,
        })
    }
}

/// Why bytes are not a valid frame. Each maps to a [`CloseCode`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("frame length {len} is below the minimum of 2")]
    FrameTooShort { len: u32 },
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    #[error("unsupported protocol version {0} (this server speaks 1)")]
    BadVersion(u8),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("{frame} frame truncated in field `{field}`")]
    Truncated { frame: &'static str, field: &'static str },
    #[error("{frame} frame has {extra} bytes after its last field")]
    TrailingBytes { frame: &'static str, extra: usize },
    #[error("{frame} field `{field}` is not valid UTF-8")]
    InvalidUtf8 { frame: &'static str, field: &'static str },
    #[error("{frame} field `{field}` must not be empty")]
    EmptyField { frame: &'static str, field: &'static str },
    #[error("{frame} field `{field}` is longer than {max} bytes")]
    FieldTooLong { frame: &'static str, field: &'static str, max: usize },
    #[error("{frame} field `{field}` has an unknown value {value}")]
    BadValue { frame: &'static str, field: &'static str, value: u32 },
}

impl DecodeError {
    /// The close code a server sends before closing on this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            DecodeError::FrameTooLarge { .. } => CloseCode::FrameTooLarge,
            DecodeError::BadVersion(_) => CloseCode::UnsupportedVersion,
            _ => CloseCode::ProtocolError,
        }
    }
}

/// A field cannot be encoded.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("field `{field}` is {len} bytes, more than the {max} its frame allows")]
    FieldTooLong { field: &'static str, len: usize, max: usize },
    #[error("frame of {len} bytes exceeds the protocol limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
}

/// Reads fields from a frame body in order, naming the field that runs out.
struct Reader<'a> {
    buf: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { frame: self.frame, field });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn str8(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let n = self.take(1, field)?[0] as usize;
        let b = self.take(n, field)?;
        std::str::from_utf8(b).map_err(|_| DecodeError::InvalidUtf8 { frame: self.frame, field })
    }
    fn nonempty_str8(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let s = self.str8(field)?;
        if s.is_empty() {
            return Err(DecodeError::EmptyField { frame: self.frame, field });
        }
        Ok(s)
    }
    fn bytes16(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u16(field)? as usize;
        self.take(n, field)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { frame: self.frame, extra: self.buf.len() })
        }
    }
}

/// Decodes the first frame in `buf`.
///
/// Returns `Ok(None)` when `buf` holds only a prefix of a frame that is valid
/// so far, `Ok(Some((frame, consumed)))` for a whole frame, or `Err` as soon
/// as the bytes seen cannot start a valid frame: an oversized length, a bad
/// version or an unknown type is rejected from the header alone, before the
/// body arrives, so a peer cannot make the server buffer a frame it will
/// refuse. `max_frame_bytes` bounds the whole frame, header included.
pub fn decode(buf: &[u8], max_frame_bytes: usize) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    if buf.len() < LEN_PREFIX {
        // The length is not complete, but its first bytes may already put
        // it over the limit (a lone 0x90 means at least 2.4 GB): refuse now
        // rather than wait for bytes that can only confirm it.
        let mut at_least = [0u8; LEN_PREFIX];
        at_least[..buf.len()].copy_from_slice(buf);
        let total = LEN_PREFIX as u64 + u32::from_be_bytes(at_least) as u64;
        if total > max_frame_bytes as u64 {
            return Err(DecodeError::FrameTooLarge { len: total, max: max_frame_bytes });
        }
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 2 {
        return Err(DecodeError::FrameTooShort { len });
    }
    let total = LEN_PREFIX as u64 + len as u64;
    if total > max_frame_bytes as u64 {
        return Err(DecodeError::FrameTooLarge { len: total, max: max_frame_bytes });
    }
    if buf.len() > LEN_PREFIX && buf[4] != VERSION {
        return Err(DecodeError::BadVersion(buf[4]));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let ty = FrameType::from_u8(buf[5]).ok_or(DecodeError::UnknownType(buf[5]))?;
    let total = total as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = decode_body(ty, &buf[HEADER_LEN..total])?;
    Ok(Some((frame, total)))
}

fn decode_body(ty: FrameType, body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let mut r = Reader { buf: body, frame: ty.name() };
    let frame = match ty {
        FrameType::Login => {
            let user = r.nonempty_str8("user")?;
            let token = r.bytes16("token")?;
            Frame::Login { user, token }
        }
        FrameType::LoginOk => Frame::LoginOk {
            conn_id: r.u64("conn_id")?,
            heartbeat_interval_ms: r.u32("heartbeat_interval_ms")?,
            idle_timeout_ms: r.u32("idle_timeout_ms")?,
            max_frame_bytes: r.u32("max_frame_bytes")?,
        },
        FrameType::LoginError => Frame::LoginError { code: r.u16("code")?, reason: r.str8("reason")? },
        FrameType::Ping | FrameType::Pong => {
            let data = r.rest();
            if data.len() > MAX_PING_DATA {
                return Err(DecodeError::FieldTooLong { frame: ty.name(), field: "data", max: MAX_PING_DATA });
            }
            if ty == FrameType::Ping {
                Frame::Ping { data }
            } else {
                Frame::Pong { data }
            }
        }
        FrameType::Push => Frame::Push { msg_id: r.u64("msg_id")?, from: r.str8("from")?, payload: r.rest() },
        FrameType::Send => Frame::Send { req_id: r.u32("req_id")?, to: r.nonempty_str8("to")?, payload: r.rest() },
        FrameType::SendAck => Frame::SendAck { req_id: r.u32("req_id")?, delivered: r.u32("delivered")? },
        FrameType::Message => Frame::Message { req_id: r.u32("req_id")?, payload: r.rest() },
        FrameType::Close => Frame::Close { code: r.u16("code")?, reason: r.str8("reason")? },
        FrameType::Error => Frame::Error { code: r.u16("code")?, req_id: r.u32("req_id")?, reason: r.str8("reason")? },
        FrameType::Subscribe => Frame::Subscribe { req_id: r.u32("req_id")?, room: r.nonempty_str8("room")? },
        FrameType::Unsubscribe => Frame::Unsubscribe { req_id: r.u32("req_id")?, room: r.nonempty_str8("room")? },
        FrameType::RoomAck => {
            let req_id = r.u32("req_id")?;
            let op = r.take(1, "op")?[0];
            let op =
                RoomOp::from_u8(op).ok_or(DecodeError::BadValue { frame: ty.name(), field: "op", value: op as u32 })?;
            Frame::RoomAck { req_id, op, room: r.nonempty_str8("room")? }
        }
        FrameType::Publish => {
            Frame::Publish { req_id: r.u32("req_id")?, room: r.nonempty_str8("room")?, payload: r.rest() }
        }
        FrameType::RoomMsg => {
            Frame::RoomMsg { msg_id: r.u64("msg_id")?, room: r.str8("room")?, from: r.str8("from")?, payload: r.rest() }
        }
        FrameType::Skipped => Frame::Skipped { count: r.u32("count")? },
    };
    r.finish()?;
    Ok(frame)
}

fn check_str8(field: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.len() > u8::MAX as usize {
        return Err(EncodeError::FieldTooLong { field, len: s.len(), max: u8::MAX as usize });
    }
    Ok(())
}

fn put_str8(dst: &mut BytesMut, s: &str) {
    dst.put_u8(s.len() as u8);
    dst.put_slice(s.as_bytes());
}

/// Cuts a human-readable reason to what a `str8` holds, on a char boundary.
pub fn clip_reason(reason: &str) -> &str {
    if reason.len() <= u8::MAX as usize {
        return reason;
    }
    let mut end = u8::MAX as usize;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

impl Frame<'_> {
    /// The frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Login { .. } => FrameType::Login,
            Frame::LoginOk { .. } => FrameType::LoginOk,
            Frame::LoginError { .. } => FrameType::LoginError,
            Frame::Ping { .. } => FrameType::Ping,
            Frame::Pong { .. } => FrameType::Pong,
            Frame::Push { .. } => FrameType::Push,
            Frame::Send { .. } => FrameType::Send,
            Frame::SendAck { .. } => FrameType::SendAck,
            Frame::Message { .. } => FrameType::Message,
            Frame::Close { .. } => FrameType::Close,
            Frame::Error { .. } => FrameType::Error,
            Frame::Subscribe { .. } => FrameType::Subscribe,
            Frame::Unsubscribe { .. } => FrameType::Unsubscribe,
            Frame::RoomAck { .. } => FrameType::RoomAck,
            Frame::Publish { .. } => FrameType::Publish,
            Frame::RoomMsg { .. } => FrameType::RoomMsg,
            Frame::Skipped { .. } => FrameType::Skipped,
        }
    }

    /// Length of the body in bytes (the frame is `HEADER_LEN` more).
    pub fn body_len(&self) -> usize {
        match self {
            Frame::Login { user, token } => 1 + user.len() + 2 + token.len(),
            Frame::LoginOk { .. } => 8 + 4 + 4 + 4,
            Frame::LoginError { reason, .. } | Frame::Close { reason, .. } => 2 + 1 + reason.len(),
            Frame::Ping { data } | Frame::Pong { data } => data.len(),
            Frame::Push { from, payload, .. } => 8 + 1 + from.len() + payload.len(),
            Frame::Send { to, payload, .. } => 4 + 1 + to.len() + payload.len(),
            Frame::SendAck { .. } => 8,
            Frame::Message { payload, .. } => 4 + payload.len(),
            Frame::Error { reason, .. } => 2 + 4 + 1 + reason.len(),
            Frame::Subscribe { room, .. } | Frame::Unsubscribe { room, .. } => 4 + 1 + room.len(),
            Frame::RoomAck { room, .. } => 4 + 1 + 1 + room.len(),
            Frame::Publish { room, payload, .. } => 4 + 1 + room.len() + payload.len(),
            Frame::RoomMsg { room, from, payload, .. } => 8 + 1 + room.len() + 1 + from.len() + payload.len(),
            Frame::Skipped { .. } => 4,
        }
    }

    /// Appends the encoded frame to `dst`. Fails without writing anything if
    /// a field does not fit its length prefix.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Frame::Login { user, token } => {
                check_str8("user", user)?;
                if token.len() > u16::MAX as usize {
                    return Err(EncodeError::FieldTooLong { field: "token", len: token.len(), max: u16::MAX as usize });
                }
            }
            Frame::LoginError { reason, .. } | Frame::Close { reason, .. } | Frame::Error { reason, .. } => {
                check_str8("reason", reason)?
            }
            Frame::Ping { data } | Frame::Pong { data } if data.len() > MAX_PING_DATA => {
                return Err(EncodeError::FieldTooLong { field: "data", len: data.len(), max: MAX_PING_DATA });
            }
            Frame::Push { from, .. } => check_str8("from", from)?,
            Frame::Send { to, .. } => check_str8("to", to)?,
            Frame::Subscribe { room, .. }
            | Frame::Unsubscribe { room, .. }
            | Frame::RoomAck { room, .. }
            | Frame::Publish { room, .. } => check_str8("room", room)?,
            Frame::RoomMsg { room, from, .. } => {
                check_str8("room", room)?;
                check_str8("from", from)?
            }
            _ => {}
        }
        let total = HEADER_LEN + self.body_len();
        if total > PROTOCOL_MAX_FRAME_BYTES {
            return Err(EncodeError::FrameTooLarge { len: total, max: PROTOCOL_MAX_FRAME_BYTES });
        }
        dst.reserve(total);
        dst.put_u32((total - LEN_PREFIX) as u32);
        dst.put_u8(VERSION);
        dst.put_u8(self.frame_type() as u8);
        match self {
            Frame::Login { user, token } => {
                put_str8(dst, user);
                dst.put_u16(token.len() as u16);
                dst.put_slice(token);
            }
            Frame::LoginOk { conn_id, heartbeat_interval_ms, idle_timeout_ms, max_frame_bytes } => {
                dst.put_u64(*conn_id);
                dst.put_u32(*heartbeat_interval_ms);
                dst.put_u32(*idle_timeout_ms);
                dst.put_u32(*max_frame_bytes);
            }
            Frame::LoginError { code, reason } | Frame::Close { code, reason } => {
                dst.put_u16(*code);
                put_str8(dst, reason);
            }
            Frame::Ping { data } | Frame::Pong { data } => dst.put_slice(data),
            Frame::Push { msg_id, from, payload } => {
                dst.put_u64(*msg_id);
                put_str8(dst, from);
                dst.put_slice(payload);
            }
            Frame::Send { req_id, to, payload } => {
                dst.put_u32(*req_id);
                put_str8(dst, to);
                dst.put_slice(payload);
            }
            Frame::SendAck { req_id, delivered } => {
                dst.put_u32(*req_id);
                dst.put_u32(*delivered);
            }
            Frame::Message { req_id, payload } => {
                dst.put_u32(*req_id);
                dst.put_slice(payload);
            }
            Frame::Error { code, req_id, reason } => {
                dst.put_u16(*code);
                dst.put_u32(*req_id);
                put_str8(dst, reason);
            }
            Frame::Subscribe { req_id, room } | Frame::Unsubscribe { req_id, room } => {
                dst.put_u32(*req_id);
                put_str8(dst, room);
            }
            Frame::RoomAck { req_id, op, room } => {
                dst.put_u32(*req_id);
                dst.put_u8(*op as u8);
                put_str8(dst, room);
            }
            Frame::Publish { req_id, room, payload } => {
                dst.put_u32(*req_id);
                put_str8(dst, room);
                dst.put_slice(payload);
            }
            Frame::RoomMsg { msg_id, room, from, payload } => {
                dst.put_u64(*msg_id);
                put_str8(dst, room);
                put_str8(dst, from);
                dst.put_slice(payload);
            }
            Frame::Skipped { count } => dst.put_u32(*count),
        }
        Ok(())
    }

    /// Encodes into a fresh, exactly sized buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.body_len());
        self.encode(&mut b)?;
        Ok(b.freeze())
    }
}

/// A PING with no data, as the server sends it: one static buffer shared by
/// every heartbeat, never allocated.
pub static PING_EMPTY: [u8; HEADER_LEN] = [0, 0, 0, 2, VERSION, FrameType::Ping as u8];

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    fn roundtrip(f: Frame<'_>) {
        let bytes = f.to_bytes().unwrap();
        let (g, n) = decode(&bytes, MAX).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(f, g);
        // Every strict prefix is "need more bytes", never an error.
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], MAX), Ok(None), "prefix {cut} of {f:?}");
        }
    }

    #[test]
    fn a_length_prefix_already_over_the_limit_is_refused_from_its_first_bytes() {
        let too_large = |b: &[u8], max| matches!(decode(b, max), Err(DecodeError::FrameTooLarge { .. }));
        assert!(too_large(&[0x90], MAX), "a lone 0x90 is at least 2.4 GB");
        assert!(too_large(&[0x00, 0x01], MAX), "at least 65540 bytes");
        assert_eq!(decode(&[0x00, 0x00], MAX), Ok(None));
        // Before login the limit is the largest LOGIN: 4360 bytes.
        assert_eq!(decode(&[0x00, 0x00, 0x11], MAX_LOGIN_FRAME_BYTES), Ok(None), "at least 4356");
        assert!(too_large(&[0x00, 0x00, 0x12], MAX_LOGIN_FRAME_BYTES), "at least 4612");
        let longest = "u".repeat(MAX_USER_ID_BYTES);
        let token = vec![b't'; MAX_LOGIN_TOKEN_BYTES];
        let login = Frame::Login { user: &longest, token: &token }.to_bytes().unwrap();
        assert_eq!(login.len(), MAX_LOGIN_FRAME_BYTES);
        assert!(decode(&login, MAX_LOGIN_FRAME_BYTES).unwrap().is_some());
    }

    #[test]
    fn every_frame_roundtrips() {
        roundtrip(Frame::Login { user: "alice", token: b"eyJ.x.y" });
        roundtrip(Frame::LoginOk { conn_id: 7, heartbeat_interval_ms: 1, idle_timeout_ms: 2, max_frame_bytes: 3 });
        roundtrip(Frame::LoginError { code: 3, reason: "token expired" });
        roundtrip(Frame::Ping { data: b"" });
        roundtrip(Frame::Ping { data: &[9; 64] });
        roundtrip(Frame::Pong { data: b"12345678" });
        roundtrip(Frame::Push { msg_id: u64::MAX, from: "", payload: b"hello" });
        roundtrip(Frame::Push { msg_id: 1, from: "bob", payload: b"" });
        roundtrip(Frame::Send { req_id: 9, to: "bob", payload: b"hi" });
        roundtrip(Frame::SendAck { req_id: 9, delivered: 2 });
        roundtrip(Frame::Message { req_id: 0, payload: b"{\"op\":1}" });
        roundtrip(Frame::Close { code: 1000, reason: "bye" });
        roundtrip(Frame::Error { code: 4100, req_id: 5, reason: "no such user" });
    }

    #[test]
    fn room_frames_roundtrip_and_reject_bad_fields() {
        roundtrip(Frame::Subscribe { req_id: 1, room: "lobby" });
        roundtrip(Frame::Unsubscribe { req_id: 2, room: "lobby" });
        roundtrip(Frame::RoomAck { req_id: 3, op: RoomOp::Published, room: "lobby" });
        roundtrip(Frame::Publish { req_id: 4, room: "lobby", payload: b"hi all" });
        roundtrip(Frame::RoomMsg { msg_id: 5, room: "lobby", from: "ann", payload: b"hi all" });
        roundtrip(Frame::RoomMsg { msg_id: 6, room: "", from: "", payload: b"to everyone" });
        roundtrip(Frame::Skipped { count: 12 });
        // SUBSCRIBE with an empty room.
        assert_eq!(
            decode(&[0, 0, 0, 7, 1, 0x10, 0, 0, 0, 1, 0], MAX),
            Err(DecodeError::EmptyField { frame: "SUBSCRIBE", field: "room" })
        );
        // ROOM_ACK with op 9.
        assert_eq!(
            decode(&[0, 0, 0, 9, 1, 0x12, 0, 0, 0, 1, 9, 1, b'r'], MAX),
            Err(DecodeError::BadValue { frame: "ROOM_ACK", field: "op", value: 9 })
        );
        assert!(FrameType::RoomMsg.is_droppable() && !FrameType::RoomAck.is_droppable());
    }

    #[test]
    fn documented_examples_are_byte_exact() {
        // These are the hex examples in docs/PROTOCOL.md.
        let login = Frame::Login { user: "alice", token: b"t0k" }.to_bytes().unwrap();
        assert_eq!(&login[..], &[0, 0, 0, 0x0d, 1, 1, 5, b'a', b'l', b'i', b'c', b'e', 0, 3, b't', b'0', b'k']);
        assert_eq!(&PING_EMPTY[..], &Frame::Ping { data: b"" }.to_bytes().unwrap()[..]);
        let push = Frame::Push { msg_id: 1, from: "", payload: b"hi" }.to_bytes().unwrap();
        assert_eq!(&push[..], &[0, 0, 0, 0x0d, 1, 6, 0, 0, 0, 0, 0, 0, 0, 1, 0, b'h', b'i']);
    }

    #[test]
    fn rejects_bad_headers_before_the_body_arrives() {
        // Length 2^32-1: refused from the 4-byte prefix alone.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], MAX),
            Err(DecodeError::FrameTooLarge { len: 4 + 0xffff_ffff, max: MAX })
        );
        assert_eq!(decode(&[0, 0, 0, 1], MAX), Err(DecodeError::FrameTooShort { len: 1 }));
        assert_eq!(decode(&[0, 0, 0, 9, 2], MAX), Err(DecodeError::BadVersion(2)));
        assert_eq!(decode(&[0, 0, 0, 9, 1, 0x7f], MAX), Err(DecodeError::UnknownType(0x7f)));
        assert_eq!(decode(&[0, 0, 0, 9, 1, 0x00], MAX), Err(DecodeError::UnknownType(0)));
    }

    #[test]
    fn rejects_bad_bodies_naming_the_field() {
        // LOGIN whose user length runs past the end of the frame.
        assert_eq!(
            decode(&[0, 0, 0, 4, 1, 1, 9, b'a'], MAX),
            Err(DecodeError::Truncated { frame: "LOGIN", field: "user" })
        );
        // LOGIN with an empty user id.
        assert_eq!(
            decode(&[0, 0, 0, 5, 1, 1, 0, 0, 0], MAX),
            Err(DecodeError::EmptyField { frame: "LOGIN", field: "user" })
        );
        // SEND_ACK with one extra byte.
        assert_eq!(
            decode(&[0, 0, 0, 11, 1, 8, 0, 0, 0, 1, 0, 0, 0, 1, 0xaa], MAX),
            Err(DecodeError::TrailingBytes { frame: "SEND_ACK", extra: 1 })
        );
        // SEND with a non-UTF-8 target.
        assert_eq!(
            decode(&[0, 0, 0, 8, 1, 7, 0, 0, 0, 0, 1, 0xff], MAX),
            Err(DecodeError::InvalidUtf8 { frame: "SEND", field: "to" })
        );
        // PING carrying more than 64 bytes.
        let mut ping = vec![0, 0, 0, 67, 1, 4];
        ping.extend_from_slice(&[0; 65]);
        assert_eq!(decode(&ping, MAX), Err(DecodeError::FieldTooLong { frame: "PING", field: "data", max: 64 }));
    }

    #[test]
    fn decodes_back_to_back_frames() {
        let mut b = BytesMut::new();
        Frame::Ping { data: b"a" }.encode(&mut b).unwrap();
        Frame::Send { req_id: 1, to: "x", payload: b"p" }.encode(&mut b).unwrap();
        let (f1, n1) = decode(&b, MAX).unwrap().unwrap();
        assert_eq!(f1, Frame::Ping { data: b"a" });
        let (f2, n2) = decode(&b[n1..], MAX).unwrap().unwrap();
        assert_eq!(f2, Frame::Send { req_id: 1, to: "x", payload: b"p" });
        assert_eq!(n1 + n2, b.len());
    }

    #[test]
    fn encode_refuses_oversized_fields() {
        let long = "x".repeat(256);
        assert!(matches!(
            Frame::Send { req_id: 0, to: &long, payload: b"" }.to_bytes(),
            Err(EncodeError::FieldTooLong { field: "to", .. })
        ));
        assert_eq!(clip_reason(&"é".repeat(200)).len(), 254);
    }

    #[test]
    fn close_codes_follow_the_error() {
        assert_eq!(DecodeError::BadVersion(9).close_code(), CloseCode::UnsupportedVersion);
        assert_eq!(DecodeError::FrameTooLarge { len: 1, max: 0 }.close_code(), CloseCode::FrameTooLarge);
        assert_eq!(DecodeError::UnknownType(9).close_code(), CloseCode::ProtocolError);
    }
}
