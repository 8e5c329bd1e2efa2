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
/// Largest LOGIN `device` id in bytes: enough for a UUID in any spelling
/// or a short install name, small enough to keep per-device inbox state
/// cheap.
pub const MAX_DEVICE_ID_BYTES: usize = 64;
/// Largest valid LOGIN frame, header included (4 + 1 + 1 + 1 + 255 + 2 +
/// 4096 = 4360 bytes, plus 1 + 64 + 8 = 73 for the optional `device` and
/// `last_seq`: 4433 bytes): the largest frame a connection may send before
/// it has logged in. A connection that has not logged in can therefore
/// make the server buffer at most this much, whatever `max_frame_bytes` is.
pub const MAX_LOGIN_FRAME_BYTES: usize =
    HEADER_LEN + 1 + MAX_USER_ID_BYTES + 2 + MAX_LOGIN_TOKEN_BYTES + 1 + MAX_DEVICE_ID_BYTES + 8;
const _: () = assert!(MAX_LOGIN_FRAME_BYTES <= MIN_MAX_FRAME_BYTES);
const _: () = assert!(MAX_LOGIN_FRAME_BYTES == 4433);

/// SEND_EX `flags` bit 0: deliver at most once, as a plain SEND does without
/// a store (nothing stored, SEND_RESULT outcome `Relayed`). Bit 1 is
/// [`SEND_EX_TTL`]; the other bits are reserved and must be 0.
pub const SEND_EX_AT_MOST_ONCE: u8 = 1;
/// Every SEND_EX flag this protocol version knows.
pub const SEND_EX_KNOWN_FLAGS: u8 = SEND_EX_AT_MOST_ONCE | SEND_EX_TTL;
/// SEND_EX `flags` bit 1: a `ttl_ms: u32` (at least 1) follows
/// `client_id`; the stored message expires that long after it was stored
/// (docs/PROTOCOL.md 15.9).
pub const SEND_EX_TTL: u8 = 2;
/// Bytes of an INBOX frame besides `from` and `payload`: the header (6),
/// `seq`, `msg_id` and `ts_ms` (8 each) and the `from` length (1).
pub const INBOX_OVERHEAD_BYTES: usize = HEADER_LEN + 8 + 8 + 8 + 1;
const _: () = assert!(INBOX_OVERHEAD_BYTES == 31);

/// Largest INBOX payload from user `from` (empty: the application) when
/// frames may be `max_frame_bytes` long, header included: a SEND or SEND_EX
/// whose INBOX would be longer is refused (ERROR 103), as is one whose PUSH
/// would be.
pub fn max_inbox_payload(max_frame_bytes: usize, from: &str) -> usize {
    max_frame_bytes.saturating_sub(INBOX_OVERHEAD_BYTES).saturating_sub(from.len())
}

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
    Sync = 0x16,
    Inbox = 0x17,
    Ack = 0x18,
    Fetch = 0x19,
    SendEx = 0x1A,
    SendResult = 0x1B,
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
            0x16 => FrameType::Sync,
            0x17 => FrameType::Inbox,
            0x18 => FrameType::Ack,
            0x19 => FrameType::Fetch,
            0x1A => FrameType::SendEx,
            0x1B => FrameType::SendResult,
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
            FrameType::Sync => "SYNC",
            FrameType::Inbox => "INBOX",
            FrameType::Ack => "ACK",
            FrameType::Fetch => "FETCH",
            FrameType::SendEx => "SEND_EX",
            FrameType::SendResult => "SEND_RESULT",
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
    /// Client → server: `user: str8, token: bytes16 [, device: str8,
    /// last_seq: u64]`. The two trailing fields come together or not at
    /// all: `device` (1 to [`MAX_DEVICE_ID_BYTES`] bytes) names the app
    /// install for reliable delivery, `last_seq` is the highest inbox seq
    /// it has stored (0: none). `device: None` ⇒ `last_seq` is 0 and
    /// nothing is encoded after the token (the LOGIN of before).
    Login { user: &'a str, token: &'a [u8], device: Option<&'a str>, last_seq: u64 },
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
    /// Server → client: where a device's inbox stands, after LOGIN_OK of a
    /// device login (`req_id` 0) and as the answer to a FETCH. `req_id: u32,
    /// position: u64, head_seq: u64, page_end: u64`: the messages
    /// (position, page_end] come next as INBOX frames; more remain iff
    /// `page_end < head_seq`.
    Sync { req_id: u32, position: u64, head_seq: u64, page_end: u64 },
    /// Server → client: one stored message. `seq: u64, msg_id: u64, ts_ms:
    /// u64, from: str8, payload: rest`; `from` empty for the application.
    Inbox { seq: u64, msg_id: u64, ts_ms: u64, from: &'a str, payload: &'a [u8] },
    /// Client → server: cumulative acknowledgement, the device stored every
    /// message with a seq up to `seq`. `seq: u64`.
    Ack { seq: u64 },
    /// Client → server: the next page of the inbox. `req_id: u32,
    /// after_seq: u64, limit: u16` (`limit` at least 1); counts as an ACK
    /// of `after_seq`.
    Fetch { req_id: u32, after_seq: u64, limit: u16 },
    /// Client → server: SEND with a delivery choice and an idempotency key.
    /// `req_id: u32, flags: u8, client_id: u64, [ttl_ms: u32,] to: str8,
    /// payload: rest`; `flags`: [`SEND_EX_AT_MOST_ONCE`],
    /// [`SEND_EX_TTL`] (then `ttl_ms` is on the wire, at least 1), both or
    /// 0; `client_id` 0 = none; `ttl_ms` 0 = none (and not on the wire).
    SendEx { req_id: u32, flags: u8, client_id: u64, ttl_ms: u32, to: &'a str, payload: &'a [u8] },
    /// Server → client, for a SEND_EX with `req_id != 0`: `req_id: u32,
    /// outcome: u8, seq: u64, msg_id: u64, delivered: u32`.
    SendResult { req_id: u32, outcome: SendOutcome, seq: u64, msg_id: u64, delivered: u32 },
}

/// What became of a SEND_EX (SEND_RESULT `outcome`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SendOutcome {
    /// Stored in the recipient's inbox as durably as the server is
    /// configured to store (`seq` is its place there).
    Stored = 0,
    /// The same (sender, `client_id`) was stored before, within the dedup
    /// window: not stored or delivered again; `seq` and `msg_id` are the
    /// original's.
    Duplicate = 1,
    /// Relayed at most once, not stored (`seq` is 0).
    Relayed = 2,
}

impl SendOutcome {
    /// Maps a wire value back to an outcome.
    pub fn from_u8(b: u8) -> Option<SendOutcome> {
        Some(match b {
            0 => SendOutcome::Stored,
            1 => SendOutcome::Duplicate,
            2 => SendOutcome::Relayed,
            _ => return None,
        })
    }
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
    #[error("{frame} field `{field}` has unknown flags 0x{bits:02x}")]
    UnknownFlags { frame: &'static str, field: &'static str, bits: u8 },
    #[error("{frame} field `{field}` must not be 0")]
    Zero { frame: &'static str, field: &'static str },
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
    /// A value no valid frame carries (the decoder would refuse it).
    #[error("field `{field}` {why}")]
    Invalid { field: &'static str, why: &'static str },
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
            // The optional tail: `device` and `last_seq` together, or nothing.
            let (device, last_seq) = if r.buf.is_empty() {
                (None, 0)
            } else {
                let device = r.nonempty_str8("device")?;
                if device.len() > MAX_DEVICE_ID_BYTES {
                    return Err(DecodeError::FieldTooLong {
                        frame: ty.name(),
                        field: "device",
                        max: MAX_DEVICE_ID_BYTES,
                    });
                }
                (Some(device), r.u64("last_seq")?)
            };
            Frame::Login { user, token, device, last_seq }
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
        FrameType::Sync => Frame::Sync {
            req_id: r.u32("req_id")?,
            position: r.u64("position")?,
            head_seq: r.u64("head_seq")?,
            page_end: r.u64("page_end")?,
        },
        FrameType::Inbox => Frame::Inbox {
            seq: r.u64("seq")?,
            msg_id: r.u64("msg_id")?,
            ts_ms: r.u64("ts_ms")?,
            from: r.str8("from")?,
            payload: r.rest(),
        },
        FrameType::Ack => Frame::Ack { seq: r.u64("seq")? },
        FrameType::Fetch => {
            let req_id = r.u32("req_id")?;
            let after_seq = r.u64("after_seq")?;
            let limit = r.u16("limit")?;
            if limit == 0 {
                return Err(DecodeError::Zero { frame: ty.name(), field: "limit" });
            }
            Frame::Fetch { req_id, after_seq, limit }
        }
        FrameType::SendEx => {
            let req_id = r.u32("req_id")?;
            let flags = r.take(1, "flags")?[0];
            if flags & !SEND_EX_KNOWN_FLAGS != 0 {
                let bits = flags & !SEND_EX_KNOWN_FLAGS;
                return Err(DecodeError::UnknownFlags { frame: ty.name(), field: "flags", bits });
            }
            let client_id = r.u64("client_id")?;
            let ttl_ms = if flags & SEND_EX_TTL != 0 {
                let ttl_ms = r.u32("ttl_ms")?;
                if ttl_ms == 0 {
                    return Err(DecodeError::Zero { frame: ty.name(), field: "ttl_ms" });
                }
                ttl_ms
            } else {
                0
            };
            Frame::SendEx { req_id, flags, client_id, ttl_ms, to: r.nonempty_str8("to")?, payload: r.rest() }
        }
        FrameType::SendResult => {
            let req_id = r.u32("req_id")?;
            let outcome = r.take(1, "outcome")?[0];
            let outcome = SendOutcome::from_u8(outcome).ok_or(DecodeError::BadValue {
                frame: ty.name(),
                field: "outcome",
                value: outcome as u32,
            })?;
            Frame::SendResult {
                req_id,
                outcome,
                seq: r.u64("seq")?,
                msg_id: r.u64("msg_id")?,
                delivered: r.u32("delivered")?,
            }
        }
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
            Frame::Sync { .. } => FrameType::Sync,
            Frame::Inbox { .. } => FrameType::Inbox,
            Frame::Ack { .. } => FrameType::Ack,
            Frame::Fetch { .. } => FrameType::Fetch,
            Frame::SendEx { .. } => FrameType::SendEx,
            Frame::SendResult { .. } => FrameType::SendResult,
        }
    }

    /// Length of the body in bytes (the frame is `HEADER_LEN` more).
    pub fn body_len(&self) -> usize {
        match self {
            Frame::Login { user, token, device, .. } => {
                1 + user.len() + 2 + token.len() + device.map_or(0, |d| 1 + d.len() + 8)
            }
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
            Frame::Sync { .. } => 4 + 8 + 8 + 8,
            Frame::Inbox { from, payload, .. } => 8 + 8 + 8 + 1 + from.len() + payload.len(),
            Frame::Ack { .. } => 8,
            Frame::Fetch { .. } => 4 + 8 + 2,
            Frame::SendEx { flags, to, payload, .. } => {
                let ttl = if flags & SEND_EX_TTL != 0 { 4 } else { 0 };
                4 + 1 + 8 + ttl + 1 + to.len() + payload.len()
            }
            Frame::SendResult { .. } => 4 + 1 + 8 + 8 + 4,
        }
    }

    /// Appends the encoded frame to `dst`. Fails without writing anything if
    /// a field does not fit its length prefix.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Frame::Login { user, token, device, last_seq } => {
                check_str8("user", user)?;
                if token.len() > u16::MAX as usize {
                    return Err(EncodeError::FieldTooLong { field: "token", len: token.len(), max: u16::MAX as usize });
                }
                match device {
                    None if *last_seq != 0 => {
                        return Err(EncodeError::Invalid { field: "last_seq", why: "is only sent with a device" })
                    }
                    None => {}
                    Some("") => return Err(EncodeError::Invalid { field: "device", why: "must not be empty" }),
                    Some(d) if d.len() > MAX_DEVICE_ID_BYTES => {
                        return Err(EncodeError::FieldTooLong {
                            field: "device",
                            len: d.len(),
                            max: MAX_DEVICE_ID_BYTES,
                        })
                    }
                    Some(_) => {}
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
            Frame::Inbox { from, .. } => check_str8("from", from)?,
            Frame::Fetch { limit: 0, .. } => {
                return Err(EncodeError::Invalid { field: "limit", why: "must not be 0" });
            }
            Frame::SendEx { flags, ttl_ms, to, .. } => {
                if flags & !SEND_EX_KNOWN_FLAGS != 0 {
                    return Err(EncodeError::Invalid { field: "flags", why: "has bits this protocol does not define" });
                }
                if (flags & SEND_EX_TTL != 0) != (*ttl_ms != 0) {
                    return Err(EncodeError::Invalid {
                        field: "ttl_ms",
                        why: "set (not 0) exactly when flags has SEND_EX_TTL",
                    });
                }
                check_str8("to", to)?
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
            Frame::Login { user, token, device, last_seq } => {
                put_str8(dst, user);
                dst.put_u16(token.len() as u16);
                dst.put_slice(token);
                if let Some(device) = device {
                    put_str8(dst, device);
                    dst.put_u64(*last_seq);
                }
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
            Frame::Sync { req_id, position, head_seq, page_end } => {
                dst.put_u32(*req_id);
                dst.put_u64(*position);
                dst.put_u64(*head_seq);
                dst.put_u64(*page_end);
            }
            Frame::Inbox { seq, msg_id, ts_ms, from, payload } => {
                dst.put_u64(*seq);
                dst.put_u64(*msg_id);
                dst.put_u64(*ts_ms);
                put_str8(dst, from);
                dst.put_slice(payload);
            }
            Frame::Ack { seq } => dst.put_u64(*seq),
            Frame::Fetch { req_id, after_seq, limit } => {
                dst.put_u32(*req_id);
                dst.put_u64(*after_seq);
                dst.put_u16(*limit);
            }
            Frame::SendEx { req_id, flags, client_id, ttl_ms, to, payload } => {
                dst.put_u32(*req_id);
                dst.put_u8(*flags);
                dst.put_u64(*client_id);
                if flags & SEND_EX_TTL != 0 {
                    dst.put_u32(*ttl_ms);
                }
                put_str8(dst, to);
                dst.put_slice(payload);
            }
            Frame::SendResult { req_id, outcome, seq, msg_id, delivered } => {
                dst.put_u32(*req_id);
                dst.put_u8(*outcome as u8);
                dst.put_u64(*seq);
                dst.put_u64(*msg_id);
                dst.put_u32(*delivered);
            }
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
        // Before login the limit is the largest LOGIN: 4433 bytes.
        assert_eq!(decode(&[0x00, 0x00, 0x11], MAX_LOGIN_FRAME_BYTES), Ok(None), "at least 4356");
        assert!(too_large(&[0x00, 0x00, 0x12], MAX_LOGIN_FRAME_BYTES), "at least 4612");
        let longest = "u".repeat(MAX_USER_ID_BYTES);
        let token = vec![b't'; MAX_LOGIN_TOKEN_BYTES];
        let login = Frame::Login { user: &longest, token: &token, device: None, last_seq: 0 }.to_bytes().unwrap();
        assert_eq!(login.len(), 4360, "the largest LOGIN without a device");
        assert!(decode(&login, MAX_LOGIN_FRAME_BYTES).unwrap().is_some());
        let device = "d".repeat(MAX_DEVICE_ID_BYTES);
        let login = Frame::Login { user: &longest, token: &token, device: Some(&device), last_seq: u64::MAX }
            .to_bytes()
            .unwrap();
        assert_eq!(login.len(), MAX_LOGIN_FRAME_BYTES);
        assert!(decode(&login, MAX_LOGIN_FRAME_BYTES).unwrap().is_some());
        assert!(too_large(&login[..4], MAX_LOGIN_FRAME_BYTES - 1));
    }

    #[test]
    fn every_frame_roundtrips() {
        roundtrip(Frame::Login { user: "alice", token: b"eyJ.x.y", device: None, last_seq: 0 });
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
        let login = Frame::Login { user: "alice", token: b"t0k", device: None, last_seq: 0 }.to_bytes().unwrap();
        assert_eq!(&login[..], &[0, 0, 0, 0x0d, 1, 1, 5, b'a', b'l', b'i', b'c', b'e', 0, 3, b't', b'0', b'k']);
        assert_eq!(&PING_EMPTY[..], &Frame::Ping { data: b"" }.to_bytes().unwrap()[..]);
        let push = Frame::Push { msg_id: 1, from: "", payload: b"hi" }.to_bytes().unwrap();
        assert_eq!(&push[..], &[0, 0, 0, 0x0d, 1, 6, 0, 0, 0, 0, 0, 0, 0, 1, 0, b'h', b'i']);
    }

    /// Bytes from a hex dump as in `docs/PROTOCOL.md` (`00 00 00 0d 01 …`).
    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
    }

    /// Decodes a documented example, checks it is one whole frame, equal to
    /// `want`, and that encoding `want` gives the same bytes.
    fn documented(doc: &str, want: Frame<'_>) {
        let bytes = hex(doc);
        let (got, n) = decode(&bytes, MAX).unwrap().unwrap();
        assert_eq!(n, bytes.len(), "{want:?}");
        assert_eq!(got, want);
        assert_eq!(&want.to_bytes().unwrap()[..], &bytes[..], "{want:?}");
    }

    #[test]
    fn login_extension_roundtrips_with_and_without_device() {
        roundtrip(Frame::Login { user: "alice", token: b"t0k", device: None, last_seq: 0 });
        roundtrip(Frame::Login { user: "alice", token: b"t0k", device: Some("phone"), last_seq: 0 });
        roundtrip(Frame::Login { user: "alice", token: b"", device: Some("é"), last_seq: u64::MAX });
        let device = "d".repeat(MAX_DEVICE_ID_BYTES);
        roundtrip(Frame::Login { user: "u", token: b"t", device: Some(&device), last_seq: 41 });
        // The tail adds 1 + D + 8 bytes; without it the frame is as before.
        let old = Frame::Login { user: "alice", token: b"t0k", device: None, last_seq: 0 }.to_bytes().unwrap();
        let new = Frame::Login { user: "alice", token: b"t0k", device: Some("phone"), last_seq: 41 };
        assert_eq!(new.to_bytes().unwrap().len(), old.len() + 1 + 5 + 8);
        assert_eq!(new.body_len(), 11 + 14);
    }

    #[test]
    fn reliable_frames_roundtrip() {
        roundtrip(Frame::Sync { req_id: 0, position: 41, head_seq: 120, page_end: 61 });
        roundtrip(Frame::Sync { req_id: u32::MAX, position: u64::MAX, head_seq: 0, page_end: 1 });
        roundtrip(Frame::Inbox { seq: 42, msg_id: 7, ts_ms: 1_700_000_000_000, from: "bob", payload: b"hi" });
        roundtrip(Frame::Inbox { seq: 1, msg_id: u64::MAX, ts_ms: 0, from: "", payload: b"" });
        roundtrip(Frame::Ack { seq: 0 });
        roundtrip(Frame::Ack { seq: u64::MAX });
        roundtrip(Frame::Fetch { req_id: 3, after_seq: 61, limit: 1 });
        roundtrip(Frame::Fetch { req_id: 0, after_seq: u64::MAX, limit: u16::MAX });
        roundtrip(Frame::SendEx { req_id: 7, flags: 0, client_id: 1001, ttl_ms: 0, to: "bob", payload: b"hi" });
        roundtrip(Frame::SendEx {
            req_id: 0,
            flags: SEND_EX_AT_MOST_ONCE,
            client_id: 0,
            ttl_ms: 0,
            to: "b",
            payload: b"",
        });
        roundtrip(Frame::SendEx { req_id: 1, flags: SEND_EX_TTL, client_id: 5, ttl_ms: 1, to: "b", payload: b"x" });
        let both = SEND_EX_AT_MOST_ONCE | SEND_EX_TTL;
        roundtrip(Frame::SendEx { req_id: 2, flags: both, client_id: 0, ttl_ms: u32::MAX, to: "b", payload: b"" });
        // The flag and the field go together, both ways.
        let no_flag = Frame::SendEx { req_id: 3, flags: 0, client_id: 0, ttl_ms: 5, to: "b", payload: b"" };
        assert!(matches!(no_flag.to_bytes(), Err(EncodeError::Invalid { field: "ttl_ms", .. })));
        let no_ttl = Frame::SendEx { req_id: 3, flags: SEND_EX_TTL, client_id: 0, ttl_ms: 0, to: "b", payload: b"" };
        assert!(matches!(no_ttl.to_bytes(), Err(EncodeError::Invalid { field: "ttl_ms", .. })));
        // A ttl_ms of 0 on the wire is malformed (CLOSE 1002), as a FETCH limit of 0 is.
        let mut zero = Frame::SendEx { req_id: 3, flags: SEND_EX_TTL, client_id: 0, ttl_ms: 7, to: "b", payload: b"" }
            .to_bytes()
            .unwrap()
            .to_vec();
        zero[19..23].copy_from_slice(&[0; 4]);
        assert_eq!(decode(&zero, MAX), Err(DecodeError::Zero { frame: "SEND_EX", field: "ttl_ms" }));
        for outcome in [SendOutcome::Stored, SendOutcome::Duplicate, SendOutcome::Relayed] {
            roundtrip(Frame::SendResult { req_id: 7, outcome, seq: 43, msg_id: 9, delivered: 2 });
        }
        assert_eq!(Frame::Sync { req_id: 0, position: 0, head_seq: 0, page_end: 0 }.to_bytes().unwrap().len(), 34);
        assert_eq!(Frame::Ack { seq: 0 }.to_bytes().unwrap().len(), 14);
        assert_eq!(Frame::Fetch { req_id: 0, after_seq: 0, limit: 1 }.to_bytes().unwrap().len(), 20);
        let result = Frame::SendResult { req_id: 0, outcome: SendOutcome::Stored, seq: 0, msg_id: 0, delivered: 0 };
        assert_eq!(result.to_bytes().unwrap().len(), 31);
        for (b, ty) in [
            (0x16, FrameType::Sync),
            (0x17, FrameType::Inbox),
            (0x18, FrameType::Ack),
            (0x19, FrameType::Fetch),
            (0x1a, FrameType::SendEx),
            (0x1b, FrameType::SendResult),
        ] {
            assert_eq!(FrameType::from_u8(b), Some(ty));
            assert_eq!(ty as u8, b);
            assert!(!ty.is_droppable());
        }
        assert_eq!(FrameType::from_u8(0x1c), None);
        assert_eq!(decode(&[0, 0, 0, 2, 1, 0x1c], MAX), Err(DecodeError::UnknownType(0x1c)));
    }

    #[test]
    fn max_inbox_payload_is_what_fits_an_inbox() {
        for from in ["", "bob", &"u".repeat(MAX_USER_ID_BYTES)] {
            let max = max_inbox_payload(MIN_MAX_FRAME_BYTES, from);
            let payload = vec![0; max];
            let inbox = Frame::Inbox { seq: 1, msg_id: 1, ts_ms: 1, from, payload: &payload };
            assert_eq!(inbox.to_bytes().unwrap().len(), MIN_MAX_FRAME_BYTES, "{from:?}");
            assert_eq!(max, MIN_MAX_FRAME_BYTES - 31 - from.len());
        }
        assert_eq!(max_inbox_payload(20, "bob"), 0, "saturates");
    }

    #[test]
    fn reliable_frames_reject_bad_fields_naming_them() {
        let frame = |ty: u8, body: &[u8]| {
            let mut b = ((body.len() + 2) as u32).to_be_bytes().to_vec();
            b.extend_from_slice(&[1, ty]);
            b.extend_from_slice(body);
            b
        };
        let login = |tail: &[u8]| {
            let mut body = vec![1, b'u', 0, 1, b't'];
            body.extend_from_slice(tail);
            frame(0x01, &body)
        };
        // LOGIN tails: an empty device, a device over 64 bytes, a tail cut
        // short in either field, a tail with a byte to spare.
        assert_eq!(decode(&login(&[0]), MAX), Err(DecodeError::EmptyField { frame: "LOGIN", field: "device" }));
        let mut long = vec![65];
        long.extend_from_slice(&[b'd'; 65]);
        long.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode(&login(&long), MAX),
            Err(DecodeError::FieldTooLong { frame: "LOGIN", field: "device", max: 64 })
        );
        assert_eq!(decode(&login(&[3, b'a']), MAX), Err(DecodeError::Truncated { frame: "LOGIN", field: "device" }));
        assert_eq!(
            decode(&login(&[1, b'a', 0, 0, 0]), MAX),
            Err(DecodeError::Truncated { frame: "LOGIN", field: "last_seq" })
        );
        assert_eq!(
            decode(&login(&[1, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 9]), MAX),
            Err(DecodeError::TrailingBytes { frame: "LOGIN", extra: 1 })
        );
        assert_eq!(
            decode(&login(&[1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]), MAX),
            Err(DecodeError::InvalidUtf8 { frame: "LOGIN", field: "device" })
        );
        // SEND_EX with flag bit 2 set, and with an empty target.
        let e = decode(&frame(0x1a, &[0, 0, 0, 1, 0x05, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'b']), MAX).unwrap_err();
        assert_eq!(e, DecodeError::UnknownFlags { frame: "SEND_EX", field: "flags", bits: 0x04 });
        assert_eq!(e.to_string(), "SEND_EX field `flags` has unknown flags 0x04");
        // Flag bit 1 with its ttl_ms cut short.
        assert_eq!(
            decode(&frame(0x1a, &[0, 0, 0, 1, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), MAX),
            Err(DecodeError::Truncated { frame: "SEND_EX", field: "ttl_ms" })
        );
        assert_eq!(e.close_code(), CloseCode::ProtocolError);
        assert_eq!(
            decode(&frame(0x1a, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), MAX),
            Err(DecodeError::EmptyField { frame: "SEND_EX", field: "to" })
        );
        // SEND_RESULT with outcome 3.
        let mut body = vec![0, 0, 0, 1, 3];
        body.extend_from_slice(&[0; 20]);
        assert_eq!(
            decode(&frame(0x1b, &body), MAX),
            Err(DecodeError::BadValue { frame: "SEND_RESULT", field: "outcome", value: 3 })
        );
        // FETCH with limit 0.
        let e = decode(&frame(0x19, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]), MAX).unwrap_err();
        assert_eq!(e, DecodeError::Zero { frame: "FETCH", field: "limit" });
        assert_eq!(e.to_string(), "FETCH field `limit` must not be 0");
        // Fixed-size frames: too short names the field, too long the excess.
        assert_eq!(decode(&frame(0x18, &[0; 7]), MAX), Err(DecodeError::Truncated { frame: "ACK", field: "seq" }));
        assert_eq!(decode(&frame(0x18, &[0; 9]), MAX), Err(DecodeError::TrailingBytes { frame: "ACK", extra: 1 }));
        assert_eq!(
            decode(&frame(0x16, &[0; 27]), MAX),
            Err(DecodeError::Truncated { frame: "SYNC", field: "page_end" })
        );
        assert_eq!(
            decode(&frame(0x1b, &[0; 24]), MAX),
            Err(DecodeError::Truncated { frame: "SEND_RESULT", field: "delivered" })
        );
        // INBOX with a `from` that is not UTF-8.
        let mut body = vec![0; 24];
        body.extend_from_slice(&[1, 0xc3]);
        assert_eq!(decode(&frame(0x17, &body), MAX), Err(DecodeError::InvalidUtf8 { frame: "INBOX", field: "from" }));
    }

    #[test]
    fn encode_refuses_what_the_decoder_would_refuse() {
        let invalid = |f: Frame<'_>, field: &str| {
            assert!(matches!(f.to_bytes(), Err(EncodeError::Invalid { field: g, .. }) if g == field), "{f:?}")
        };
        invalid(Frame::Login { user: "u", token: b"t", device: None, last_seq: 1 }, "last_seq");
        invalid(Frame::Login { user: "u", token: b"t", device: Some(""), last_seq: 0 }, "device");
        invalid(Frame::Fetch { req_id: 1, after_seq: 1, limit: 0 }, "limit");
        invalid(Frame::SendEx { req_id: 1, flags: 0x80, client_id: 1, ttl_ms: 0, to: "b", payload: b"" }, "flags");
        let long = "d".repeat(MAX_DEVICE_ID_BYTES + 1);
        assert_eq!(
            Frame::Login { user: "u", token: b"t", device: Some(&long), last_seq: 0 }.to_bytes(),
            Err(EncodeError::FieldTooLong { field: "device", len: 65, max: 64 })
        );
        let long = "x".repeat(256);
        assert!(matches!(
            Frame::Inbox { seq: 1, msg_id: 1, ts_ms: 1, from: &long, payload: b"" }.to_bytes(),
            Err(EncodeError::FieldTooLong { field: "from", .. })
        ));
    }

    /// The hex examples of the reliable-delivery frames in
    /// `docs/PROTOCOL.md` (3.1, 3.18–3.23), copied from there.
    #[test]
    fn documented_reliable_examples_are_byte_exact() {
        documented(
            "00 00 00 1b 01 01 05 61 6c 69 63 65 00 03 74 30
             6b 05 70 68 6f 6e 65 00 00 00 00 00 00 00 29",
            Frame::Login { user: "alice", token: b"t0k", device: Some("phone"), last_seq: 41 },
        );
        documented(
            "00 00 00 1e 01 16 00 00 00 00 00 00 00 00 00 00
             00 29 00 00 00 00 00 00 00 78 00 00 00 00 00 00
             00 3d",
            Frame::Sync { req_id: 0, position: 41, head_seq: 120, page_end: 61 },
        );
        documented(
            "00 00 00 20 01 17 00 00 00 00 00 00 00 2a 00 02
             00 00 00 00 00 01 00 00 01 8b cf e5 68 00 03 62
             6f 62 68 69",
            Frame::Inbox { seq: 42, msg_id: 0x0002000000000001, ts_ms: 1_700_000_000_000, from: "bob", payload: b"hi" },
        );
        documented("00 00 00 0a 01 18 00 00 00 00 00 00 00 3d", Frame::Ack { seq: 61 });
        documented(
            "00 00 00 10 01 19 00 00 00 03 00 00 00 00 00 00
             00 3d 00 64",
            Frame::Fetch { req_id: 3, after_seq: 61, limit: 100 },
        );
        documented(
            "00 00 00 15 01 1a 00 00 00 07 00 00 00 00 00 00
             00 03 e9 03 62 6f 62 68 69",
            Frame::SendEx { req_id: 7, flags: 0, client_id: 1001, ttl_ms: 0, to: "bob", payload: b"hi" },
        );
        documented(
            "00 00 00 19 01 1a 00 00 00 09 02 00 00 00 00 00
             00 00 00 00 00 75 30 03 62 6f 62 68 69",
            Frame::SendEx { req_id: 9, flags: SEND_EX_TTL, client_id: 0, ttl_ms: 30_000, to: "bob", payload: b"hi" },
        );
        documented(
            "00 00 00 1b 01 1b 00 00 00 07 00 00 00 00 00 00
             00 00 2b 00 02 00 00 00 00 00 02 00 00 00 01",
            Frame::SendResult {
                req_id: 7,
                outcome: SendOutcome::Stored,
                seq: 43,
                msg_id: 0x0002000000000002,
                delivered: 1,
            },
        );
        documented(
            "00 00 00 1b 01 1b 00 00 00 08 01 00 00 00 00 00
             00 00 2b 00 02 00 00 00 00 00 02 00 00 00 00",
            Frame::SendResult {
                req_id: 8,
                outcome: SendOutcome::Duplicate,
                seq: 43,
                msg_id: 0x0002000000000002,
                delivered: 0,
            },
        );
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
        assert_eq!(DecodeError::Zero { frame: "FETCH", field: "limit" }.close_code(), CloseCode::ProtocolError);
    }
}
