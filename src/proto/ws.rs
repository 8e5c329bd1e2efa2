//! WebSocket transport (RFC 6455), server side: the upgrade handshake, the
//! client frame decoder with message reassembly, and the server frame encoder.
//!
//! Owns: parsing and validating the HTTP/1.1 upgrade request and writing the
//! HTTP responses ([`handshake`]); decoding client→server frames (masked,
//! possibly fragmented, control frames interleaved) into whole messages
//! ([`Decoder`]); the byte layout of server→client frames ([`frame_header`]
//! and helpers), with the header separable from the payload so one payload can
//! be shared by many connections, each written as `writev(header, payload)`.
//! Must not: do I/O, read a clock, negotiate an extension (no
//! permessage-deflate: an RSV bit is always an error), interpret what a message
//! says (that is `json` or `frame`), use `unsafe`, or panic on any input.
//! "Need more bytes" (`Ok(None)`) is not "invalid" (`Err`): the first waits,
//! the second fails the connection with the close code the error maps to.
//!
//! Every frame (RFC 6455 §5.2):
//! ```text
//! byte 0: FIN(1) RSV1(1) RSV2(1) RSV3(1) opcode(4)
//! byte 1: MASK(1) len7(7)
//! len7 = 0..=125: the payload length
//! len7 = 126:     then a u16 BE length (126..=65535)
//! len7 = 127:     then a u64 BE length (65536..=2^63-1, MSB clear)
//! MASK = 1:       then a 4-byte masking key (client→server: always;
//!                 server→client: never)
//! then the payload; masked byte i = byte i XOR key[i % 4]
//! ```

use thiserror::Error;

/// Longest payload of a control frame (close, ping, pong), RFC 6455 §5.5.
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Longest close reason: a control payload less the 2-byte status code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// Longest client frame header: 2 bytes, a 64-bit length, a masking key.
pub const MAX_CLIENT_HEADER_LEN: usize = 2 + 8 + 4;
/// Longest server frame header: 2 bytes and a 64-bit length, never masked.
pub const MAX_SERVER_HEADER_LEN: usize = 2 + 8;
/// Reassembly buffer capacity a [`Decoder`] keeps once a fragmented message
/// is complete; a buffer that grew beyond it is freed.
pub const KEEP_REASSEMBLY_CAPACITY: usize = 4096;
/// Smallest allocation for a reassembly buffer (a first fragment is usually
/// followed by more).
const MIN_REASSEMBLY_ALLOC: usize = 256;

/// WebSocket close status codes (RFC 6455 §7.4.1 and the IANA registry).
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown, browser navigating away).
    pub const GOING_AWAY: u16 = 1001;
    /// A protocol error: a malformed frame or an illegal frame sequence.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A data type the endpoint cannot accept (e.g. binary where only text
    /// is understood).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Data inconsistent with the message type (non-UTF-8 text).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message that violates the endpoint's policy (generic).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;

    /// Whether a close frame received from a peer may carry `code`.
    ///
    /// Valid: 1000–1003, 1007–1014 and 3000–4999. 1012 (service restart),
    /// 1013 (try again later) and 1014 (bad gateway) are accepted: they are
    /// registered with IANA, browsers send and accept them, and the Autobahn
    /// test suite no longer lists them as invalid. Invalid: below 1000,
    /// 1004 (reserved), 1005 (no status) and 1006 (abnormal closure), which
    /// must never be on the wire, 1015 (TLS failure, likewise), 1016–2999
    /// (reserved for future RFCs) and 5000 and above.
    pub fn is_valid_received(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Frame opcode (RFC 6455 §5.2). 0x3–0x7 and 0xB–0xF are reserved.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    /// Maps the low nibble of byte 0 to a defined opcode.
    pub fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong: at most 125 bytes, never fragmented.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }

    /// Lower-case name, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Continuation => "continuation",
            Opcode::Text => "text",
            Opcode::Binary => "binary",
            Opcode::Close => "close",
            Opcode::Ping => "ping",
            Opcode::Pong => "pong",
        }
    }
}

/// One decoded event. Data and control payloads are unmasked and borrowed:
/// from the caller's buffer for a message that came in one frame, from the
/// decoder's reassembly buffer for one that came in fragments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WsEvent<'a> {
    /// A whole text message, valid UTF-8.
    Text(&'a str),
    /// A whole binary message.
    Binary(&'a [u8]),
    /// A ping; answer with a pong carrying the same data ([`pong_frame`]).
    Ping(&'a [u8]),
    /// A pong (solicited or not); counts as liveness only.
    Pong(&'a [u8]),
    /// The peer is closing. `code` is `None` for an empty close payload
    /// (answer with an empty close or 1000); otherwise a code valid to
    /// receive, with a UTF-8 reason (possibly empty).
    Close { code: Option<u16>, reason: &'a str },
    /// A non-final fragment of a data message went into the reassembly
    /// buffer: nothing to act on. Advance past the consumed bytes and decode
    /// again.
    Fragment,
}

/// Why client bytes are not valid WebSocket traffic. Each maps to a close
/// code ([`WsError::close_code`]); the `Display` text is the close reason.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
pub enum WsError {
    #[error("reserved bits set (RSV 0b{0:03b}) without a negotiated extension")]
    ReservedBits(u8),
    #[error("reserved opcode 0x{0:x}")]
    ReservedOpcode(u8),
    #[error("client frame is not masked")]
    Unmasked,
    #[error("{} frame payload longer than 125 bytes", .0.name())]
    ControlTooLong(Opcode),
    #[error("fragmented {} frame (control frames must have FIN set)", .0.name())]
    FragmentedControl(Opcode),
    #[error("64-bit payload length has its most significant bit set")]
    LengthMsbSet,
    #[error("payload length {len} not encoded in the fewest bytes")]
    NonMinimalLength { len: u64 },
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new {} message while a fragmented message is in progress", .0.name())]
    MessageInProgress(Opcode),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooBig { len: u64, max: usize },
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame with a 1-byte payload")]
    CloseTooShort,
    #[error("close code {0} is not valid on the wire")]
    InvalidCloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl WsError {
    /// The close code a server sends before closing on this error: 1009 for
    /// a message over the limit, 1007 for non-UTF-8 text (message or close
    /// reason), 1002 for everything else.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::MessageTooBig { .. } => close::MESSAGE_TOO_BIG,
            WsError::InvalidUtf8 | WsError::InvalidCloseReason => close::INVALID_PAYLOAD,
            _ => close::PROTOCOL_ERROR,
        }
    }

    /// The close frame to send for this error (code and reason).
    pub fn to_close_frame(&self) -> Vec<u8> {
        close_frame(self.close_code(), &self.to_string())
    }
}

/// A parsed frame header: everything before the payload.
#[derive(Copy, Clone, Debug)]
struct Header {
    fin: bool,
    opcode: Opcode,
    mask: [u8; 4],
    /// Bytes before the payload (2 to 14).
    header_len: usize,
    /// Payload bytes.
    len: usize,
}

/// Parses a client frame header, rejecting as early as the bytes allow: RSV
/// bits, the opcode and its place in the message sequence from byte 0; an
/// unmasked frame and an oversized control frame from byte 1; an illegal or
/// oversized length as soon as the length is complete, before the masking key
/// or any payload arrives. `buffered` is what the message in progress already
/// holds, so the limit applies across fragments.
fn parse_header(
    buf: &[u8],
    in_progress: Option<Opcode>,
    buffered: usize,
    max_message_bytes: usize,
) -> Result<Option<Header>, WsError> {
    let Some(&b0) = buf.first() else { return Ok(None) };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    if rsv != 0 {
        return Err(WsError::ReservedBits(rsv));
    }
    let opcode = Opcode::from_u8(b0 & 0x0f).ok_or(WsError::ReservedOpcode(b0 & 0x0f))?;
    if opcode.is_control() && !fin {
        return Err(WsError::FragmentedControl(opcode));
    }
    match opcode {
        Opcode::Continuation if in_progress.is_none() => return Err(WsError::UnexpectedContinuation),
        Opcode::Text | Opcode::Binary if in_progress.is_some() => return Err(WsError::MessageInProgress(opcode)),
        _ => {}
    }
    let Some(&b1) = buf.get(1) else { return Ok(None) };
    if b1 & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let len7 = b1 & 0x7f;
    if opcode.is_control() && len7 as usize > MAX_CONTROL_PAYLOAD {
        return Err(WsError::ControlTooLong(opcode));
    }
    let (len, len_bytes) = match len7 {
        126 => {
            let Some(b) = buf.get(2..4) else { return Ok(None) };
            let len = u16::from_be_bytes([b[0], b[1]]) as u64;
            if len < 126 {
                return Err(WsError::NonMinimalLength { len });
            }
            (len, 2)
        }
        127 => {
            let Some(b) = buf.get(2..10) else { return Ok(None) };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let len = u64::from_be_bytes(a);
            if len >> 63 != 0 {
                return Err(WsError::LengthMsbSet);
            }
            if len <= u16::MAX as u64 {
                return Err(WsError::NonMinimalLength { len });
            }
            (len, 8)
        }
        n => (n as u64, 0),
    };
    if !opcode.is_control() {
        // For a first frame nothing is buffered; for a continuation the
        // limit covers the whole message.
        let total = (buffered as u64).saturating_add(len);
        if total > max_message_bytes as u64 {
            return Err(WsError::MessageTooBig { len: total, max: max_message_bytes });
        }
    }
    let header_len = 2 + len_bytes + 4;
    let Some(k) = buf.get(header_len - 4..header_len) else { return Ok(None) };
    // `len` is at most max_message_bytes (a usize) or 125 here.
    Ok(Some(Header { fin, opcode, mask: [k[0], k[1], k[2], k[3]], header_len, len: len as usize }))
}

/// XORs `data` with a masking key, as RFC 6455 §5.3 defines; applying it
/// twice restores the input. The server unmasks with it; a client (a test
/// or a load generator) masks with it.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(a) ^ wide).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key phase is 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Parses a close payload (already unmasked).
fn parse_close(p: &[u8]) -> Result<WsEvent<'_>, WsError> {
    match p {
        [] => Ok(WsEvent::Close { code: None, reason: "" }),
        [_] => Err(WsError::CloseTooShort),
        [hi, lo, rest @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close::is_valid_received(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(rest).map_err(|_| WsError::InvalidCloseReason)?;
            Ok(WsEvent::Close { code: Some(code), reason })
        }
    }
}

/// Decodes client→server frames into messages, one connection's worth of
/// state: the fragmented message in progress, if any.
///
/// Holds no heap buffer until a client fragments a message (browsers do not),
/// and keeps at most [`KEEP_REASSEMBLY_CAPACITY`] once that message is done.
/// The reassembly buffer never grows beyond `max_message_bytes`.
#[derive(Debug)]
pub struct Decoder {
    max_message_bytes: usize,
    /// Text or Binary while a fragmented message is being reassembled.
    in_progress: Option<Opcode>,
    /// The fragments so far; empty when no message is in progress.
    buf: Vec<u8>,
    /// Text in progress: `buf[..utf8_valid]` is valid UTF-8 and the rest (at
    /// most 3 bytes) the start of a character split across fragments.
    utf8_valid: usize,
    /// The last event borrowed `buf`: empty it on the next call.
    release: bool,
}

impl Decoder {
    /// A decoder refusing messages (whole, after reassembly) longer than
    /// `max_message_bytes` with close code 1009.
    pub fn new(max_message_bytes: usize) -> Decoder {
        Decoder { max_message_bytes, in_progress: None, buf: Vec::new(), utf8_valid: 0, release: false }
    }

    /// The message size limit.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Sets the size limit of messages that start from now on (a message
    /// being reassembled keeps the limit it started under): e.g. a small
    /// one until the connection has logged in.
    pub fn set_max_message_bytes(&mut self, max: usize) {
        if self.in_progress.is_none() {
            self.max_message_bytes = max;
        }
    }

    /// The smallest read buffer that can hold any frame this decoder accepts
    /// in one piece: a frame must be contiguous in the buffer passed to
    /// [`Decoder::decode`] before it is decoded.
    pub fn max_frame_len(&self) -> usize {
        self.max_message_bytes.saturating_add(MAX_CLIENT_HEADER_LEN)
    }

    /// True while a fragmented message is being reassembled.
    pub fn in_message(&self) -> bool {
        self.in_progress.is_some()
    }

    /// Heap bytes held by the reassembly buffer (its capacity).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Decodes the first frame in `buf`, unmasking its payload in place.
    ///
    /// Returns `Ok(None)` when `buf` holds only a prefix of a frame that is
    /// valid so far (nothing was changed: call again with more bytes), or
    /// `Ok(Some((event, consumed)))`: the frame took the first `consumed`
    /// bytes of `buf`, which the caller must drop before the next call (they
    /// are unmasked now, so decoding them again would garble them). Errors
    /// are final: close with [`WsError::close_code`] and stop decoding.
    pub fn decode<'a>(&'a mut self, buf: &'a mut [u8]) -> Result<Option<(WsEvent<'a>, usize)>, WsError> {
        if self.release {
            self.release = false;
            self.buf.clear();
            if self.buf.capacity() > KEEP_REASSEMBLY_CAPACITY {
                self.buf = Vec::new();
            }
        }
        let Some(h) = parse_header(buf, self.in_progress, self.buf.len(), self.max_message_bytes)? else {
            return Ok(None);
        };
        let total = h.header_len.saturating_add(h.len);
        if buf.len() < total {
            return Ok(None);
        }
        apply_mask(&mut buf[h.header_len..total], h.mask);
        let buf: &'a [u8] = buf;
        let payload = &buf[h.header_len..total];
        let event = match h.opcode {
            Opcode::Ping => WsEvent::Ping(payload),
            Opcode::Pong => WsEvent::Pong(payload),
            Opcode::Close => parse_close(payload)?,
            Opcode::Text if h.fin => WsEvent::Text(std::str::from_utf8(payload).map_err(|_| WsError::InvalidUtf8)?),
            Opcode::Binary if h.fin => WsEvent::Binary(payload),
            Opcode::Text | Opcode::Binary => {
                self.in_progress = Some(h.opcode);
                self.utf8_valid = 0;
                self.append(payload)?;
                WsEvent::Fragment
            }
            Opcode::Continuation => {
                self.append(payload)?;
                if !h.fin {
                    WsEvent::Fragment
                } else {
                    let kind = self.in_progress.take();
                    self.release = true;
                    let this: &'a Decoder = self;
                    let event = if kind == Some(Opcode::Text) {
                        // A character cut off at the end of the last fragment.
                        if this.utf8_valid != this.buf.len() {
                            return Err(WsError::InvalidUtf8);
                        }
                        WsEvent::Text(std::str::from_utf8(&this.buf).map_err(|_| WsError::InvalidUtf8)?)
                    } else {
                        WsEvent::Binary(&this.buf)
                    };
                    return Ok(Some((event, total)));
                }
            }
        };
        Ok(Some((event, total)))
    }

    /// Appends a fragment, growing the buffer no further than the limit, and
    /// validates text as far as it is complete.
    fn append(&mut self, data: &[u8]) -> Result<(), WsError> {
        // parse_header checked that the message stays within the limit.
        let need = self.buf.len() + data.len();
        if need > self.buf.capacity() {
            let target = need.max(self.buf.capacity().saturating_mul(2)).max(MIN_REASSEMBLY_ALLOC);
            let target = target.min(self.max_message_bytes.max(need));
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(data);
        if self.in_progress == Some(Opcode::Text) {
            match std::str::from_utf8(&self.buf[self.utf8_valid..]) {
                Ok(_) => self.utf8_valid = self.buf.len(),
                // Incomplete at the end: fine so far.
                Err(e) if e.error_len().is_none() => self.utf8_valid += e.valid_up_to(),
                Err(_) => return Err(WsError::InvalidUtf8),
            }
        }
        Ok(())
    }
}

/// The header of a server→client frame: 2, 4 or 10 bytes (the second value),
/// never masked. Send `header[..n]` then the payload, e.g. with `writev`, so
/// one payload can go to many connections.
pub fn frame_header(opcode: Opcode, fin: bool, len: usize) -> ([u8; MAX_SERVER_HEADER_LEN], usize) {
    let mut h = [0u8; MAX_SERVER_HEADER_LEN];
    h[0] = ((fin as u8) << 7) | opcode as u8;
    if len <= MAX_CONTROL_PAYLOAD {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// A whole unfragmented server→client frame in one buffer.
pub fn encode_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let (h, n) = frame_header(opcode, true, payload.len());
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
    out
}

/// A text message in one frame.
pub fn text_frame(text: &str) -> Vec<u8> {
    encode_frame(Opcode::Text, text.as_bytes())
}

/// A binary message in one frame.
pub fn binary_frame(data: &[u8]) -> Vec<u8> {
    encode_frame(Opcode::Binary, data)
}

/// Cuts `s` to at most `max` bytes on a char boundary.
fn clip_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A close frame with a status code and a reason, the reason cut to
/// [`MAX_CLOSE_REASON`] bytes on a char boundary. The code is written as
/// given: send one valid on the wire (not 1005, 1006 or 1015).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = clip_utf8(reason, MAX_CLOSE_REASON);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode_frame(Opcode::Close, &payload)
}

/// A ping; data beyond [`MAX_CONTROL_PAYLOAD`] bytes is cut off.
pub fn ping_frame(data: &[u8]) -> Vec<u8> {
    encode_frame(Opcode::Ping, &data[..data.len().min(MAX_CONTROL_PAYLOAD)])
}

/// A pong; data beyond [`MAX_CONTROL_PAYLOAD`] bytes is cut off (a ping
/// the decoder accepted never has more).
pub fn pong_frame(data: &[u8]) -> Vec<u8> {
    encode_frame(Opcode::Pong, &data[..data.len().min(MAX_CONTROL_PAYLOAD)])
}

/// A ping with no data, as the server's heartbeat sends it: one static
/// buffer, never allocated.
pub static PING_EMPTY: [u8; 2] = [0x80 | Opcode::Ping as u8, 0];

/// An empty close frame (no status code), the answer to one.
pub static CLOSE_EMPTY: [u8; 2] = [0x80 | Opcode::Close as u8, 0];

pub mod handshake {
    //! The HTTP/1.1 upgrade request (RFC 6455 §4.2) and the responses.
    //!
    //! Owns: parsing the request head from a buffer, validating what the RFC
    //! requires of it, reading the `user`/`token` query parameters, the
    //! accept key, protocol choice, the Origin allow list, and the bytes of
    //! every response the server writes before the connection is a WebSocket.
    //! Must not: do I/O or decide policy (which origins, which protocols:
    //! the server passes them in).

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use sha1::{Digest, Sha1};
    use thiserror::Error;

    use crate::proto::frame::{Frame, MAX_USER_ID_BYTES};

    /// Appended to the client's key before hashing (RFC 6455 §1.3).
    pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    /// The only `Sec-WebSocket-Version` spoken.
    pub const VERSION: &str = "13";
    /// Header fields parsed per request; more is an error (431).
    pub const MAX_HEADERS: usize = 64;
    /// A sensible `max_head` for [`parse_request`]: browsers send 0.5–2 KiB,
    /// cookies included.
    pub const DEFAULT_MAX_HEAD: usize = 8192;
    /// Bytes a `Sec-WebSocket-Key` decodes to.
    pub const KEY_BYTES: usize = 16;
    /// Characters of a `Sec-WebSocket-Key`: base64 of 16 bytes.
    const KEY_CHARS: usize = 24;
    /// Longest method named in an error message.
    const MAX_METHOD_IN_ERROR: usize = 16;

    /// An offered subprotocol starting with this carries the login token
    /// (`switchboard.token.<JWT>`: a JWT's characters are all allowed in a
    /// subprotocol name).
    pub const TOKEN_PROTOCOL_PREFIX: &str = "switchboard.token.";

    /// A valid upgrade request.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Handshake {
        /// The request path without the query (`/ws`), as sent.
        pub path: String,
        /// `user` query parameter, percent-decoded; 1–255 bytes when present.
        pub user: Option<String>,
        /// The login token: the `token` query parameter, percent-decoded,
        /// or an offered subprotocol `switchboard.token.<token>` (never
        /// echoed back, and not listed in `protocols`), for clients that
        /// keep tokens out of URLs (and so out of proxy logs).
        pub token: Option<String>,
        /// The `Origin` header, as sent (browsers always send one).
        pub origin: Option<String>,
        /// Sub-protocols offered (`Sec-WebSocket-Protocol`), in the client's
        /// order of preference, without a token entry.
        pub protocols: Vec<String>,
        /// The `Sec-WebSocket-Key`, trimmed.
        pub key: String,
    }

    impl Handshake {
        /// The `Sec-WebSocket-Accept` value for this request.
        pub fn accept(&self) -> String {
            accept_key(&self.key)
        }

        /// A LOGIN built from the `user` query parameter and the token
        /// (query or subprotocol), when both are present: the server can log
        /// the connection in without a first message.
        pub fn login(&self) -> Option<Frame<'_>> {
            match (&self.user, &self.token) {
                (Some(user), Some(token)) => Some(Frame::Login { user, token: token.as_bytes() }),
                _ => None,
            }
        }
    }

    /// Why a request head is refused. Each maps to an HTTP status
    /// ([`HandshakeError::status`]) and a whole response
    /// ([`HandshakeError::response`]).
    #[derive(Clone, Debug, PartialEq, Eq, Error)]
    pub enum HandshakeError {
        #[error("request head larger than {max} bytes")]
        HeadTooLarge { max: usize },
        #[error("more than {} header fields", MAX_HEADERS)]
        TooManyHeaders,
        #[error("malformed HTTP request: {0}")]
        Malformed(httparse::Error),
        #[error("method {method} not allowed (only GET)")]
        MethodNotAllowed { method: String },
        #[error("HTTP/1.{0} request: WebSocket needs HTTP/1.1")]
        HttpVersion(u8),
        /// A well-formed GET without an `Upgrade` header: a plain page
        /// request, which the server may answer itself.
        #[error("plain HTTP request for {path} (not a WebSocket upgrade)")]
        NotUpgrade { path: String },
        #[error("Upgrade header does not offer websocket")]
        NotWebSocket,
        #[error("Connection header does not contain the upgrade token")]
        NoConnectionUpgrade,
        #[error("missing or unsupported Sec-WebSocket-Version (this server speaks 13)")]
        UnsupportedVersion,
        #[error("missing Host header")]
        MissingHost,
        #[error("missing Sec-WebSocket-Key")]
        MissingKey,
        #[error("Sec-WebSocket-Key is not base64 of 16 bytes")]
        BadKey,
        #[error("header {0} appears more than once")]
        DuplicateHeader(&'static str),
        #[error("header {0} is not valid UTF-8")]
        BadHeader(&'static str),
        #[error("the login token is given twice (token query parameter, switchboard.token. subprotocols)")]
        TwoTokens,
        #[error("query parameter {0} is malformed, repeated or out of range")]
        BadQuery(&'static str),
    }

    impl HandshakeError {
        /// The HTTP status to answer with: 431 for a head too large, 405 for
        /// a method other than GET, 505 for HTTP/1.0, 426 for a plain request
        /// or an unsupported version, 400 otherwise.
        pub fn status(&self) -> u16 {
            match self {
                HandshakeError::HeadTooLarge { .. } | HandshakeError::TooManyHeaders => 431,
                HandshakeError::MethodNotAllowed { .. } => 405,
                HandshakeError::HttpVersion(_) => 505,
                HandshakeError::NotUpgrade { .. } | HandshakeError::UnsupportedVersion => 426,
                _ => 400,
            }
        }

        /// Headers the status requires: `Sec-WebSocket-Version: 13` with a
        /// version error, `Upgrade: websocket` with every 426 (RFC 9110
        /// §15.5.22: a 426 MUST carry `Upgrade`, so the version error has
        /// both), `Allow: GET` with 405.
        pub fn extra_headers(&self) -> &'static [(&'static str, &'static str)] {
            match self {
                HandshakeError::UnsupportedVersion => &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", VERSION)],
                HandshakeError::NotUpgrade { .. } => &[("Upgrade", "websocket")],
                HandshakeError::MethodNotAllowed { .. } => &[("Allow", "GET")],
                _ => &[],
            }
        }

        /// The whole response: status, required headers, the message as body.
        pub fn response(&self) -> Vec<u8> {
            response_error(self.status(), &self.to_string(), self.extra_headers())
        }
    }

    /// Values of every header field called `name` (case-insensitive).
    fn header_values<'h, 'b: 'h>(
        headers: &'h [httparse::Header<'b>],
        name: &'h str,
    ) -> impl Iterator<Item = &'b [u8]> + 'h {
        headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }

    /// The value of a header that may appear at most once.
    fn single<'b>(headers: &[httparse::Header<'b>], name: &'static str) -> Result<Option<&'b [u8]>, HandshakeError> {
        let mut it = header_values(headers, name);
        let first = it.next();
        if it.next().is_some() {
            return Err(HandshakeError::DuplicateHeader(name));
        }
        Ok(first)
    }

    /// Whether a comma-separated header value lists `token`
    /// (case-insensitive).
    fn has_token(value: &[u8], token: &str) -> bool {
        value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }

    /// Decodes a query value: `%XX` escapes and `+` as a space (form
    /// encoding, what `URLSearchParams` writes); the result must be UTF-8.
    fn percent_decode(s: &str, name: &'static str) -> Result<String, HandshakeError> {
        let bad = || HandshakeError::BadQuery(name);
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    let hi = b.get(i + 1).copied().and_then(hex).ok_or_else(bad)?;
                    let lo = b.get(i + 2).copied().and_then(hex).ok_or_else(bad)?;
                    out.push((hi << 4) | lo);
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| bad())
    }

    /// Reads `user` and `token` from a query string; other parameters are
    /// ignored. A repeated `user` or `token` is refused rather than guessed.
    fn parse_query(query: &str) -> Result<(Option<String>, Option<String>), HandshakeError> {
        let (mut user, mut token) = (None, None);
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (slot, name) = match k {
                "user" => (&mut user, "user"),
                "token" => (&mut token, "token"),
                _ => continue,
            };
            if slot.is_some() {
                return Err(HandshakeError::BadQuery(name));
            }
            *slot = Some(percent_decode(v, name)?);
        }
        if let Some(u) = &user {
            if u.is_empty() || u.len() > MAX_USER_ID_BYTES {
                return Err(HandshakeError::BadQuery("user"));
            }
        }
        Ok((user, token))
    }

    fn utf8<'b>(v: &'b [u8], name: &'static str) -> Result<&'b str, HandshakeError> {
        std::str::from_utf8(v).map_err(|_| HandshakeError::BadHeader(name))
    }

    /// Parses an upgrade request head from the start of `buf`.
    ///
    /// `Ok(None)`: the head is incomplete and shorter than `max_head`; read
    /// more and call again with the whole buffer. `Ok(Some((hs, n)))`: the
    /// head took the first `n` bytes; bytes after it (a client that did not
    /// wait for the 101) belong to the frame decoder. `Err`: answer with
    /// [`HandshakeError::response`] and close, except
    /// [`HandshakeError::NotUpgrade`], a plain GET the server may serve.
    ///
    /// Checks, in order: method GET (405), no `Upgrade` header → NotUpgrade,
    /// HTTP/1.1 (505), `Upgrade` lists `websocket`, `Connection` lists
    /// `upgrade`, `Sec-WebSocket-Version: 13` (426), `Sec-WebSocket-Key` is
    /// base64 of 16 bytes, one `Host`, then Origin, protocols and the query
    /// (400, also for a token given twice).
    pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<(Handshake, usize)>, HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) if n <= max_head => n,
            Ok(httparse::Status::Partial) if buf.len() < max_head => return Ok(None),
            Ok(_) => return Err(HandshakeError::HeadTooLarge { max: max_head }),
            Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
            Err(e) => return Err(HandshakeError::Malformed(e)),
        };
        let method = req.method.unwrap_or("");
        if method != "GET" {
            let method = method.chars().take(MAX_METHOD_IN_ERROR).collect();
            return Err(HandshakeError::MethodNotAllowed { method });
        }
        let target = req.path.unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers: &[httparse::Header<'_>] = req.headers;
        if header_values(headers, "Upgrade").next().is_none() {
            return Err(HandshakeError::NotUpgrade { path: path.to_owned() });
        }
        match req.version {
            Some(1) => {}
            v => return Err(HandshakeError::HttpVersion(v.unwrap_or(0))),
        }
        if !header_values(headers, "Upgrade").any(|v| has_token(v, "websocket")) {
            return Err(HandshakeError::NotWebSocket);
        }
        if !header_values(headers, "Connection").any(|v| has_token(v, "upgrade")) {
            return Err(HandshakeError::NoConnectionUpgrade);
        }
        let mut versions = header_values(headers, "Sec-WebSocket-Version");
        match (versions.next(), versions.next()) {
            (Some(v), None) if v.trim_ascii() == VERSION.as_bytes() => {}
            _ => return Err(HandshakeError::UnsupportedVersion),
        }
        let key = single(headers, "Sec-WebSocket-Key")?.ok_or(HandshakeError::MissingKey)?.trim_ascii();
        if key.len() != KEY_CHARS || STANDARD.decode(key).ok().map(|k| k.len()) != Some(KEY_BYTES) {
            return Err(HandshakeError::BadKey);
        }
        // Base64 is ASCII.
        let key = utf8(key, "Sec-WebSocket-Key")?.to_owned();
        // RFC 6455 §4.2.1 item 2 and HTTP/1.1: exactly one Host. Its value
        // is not compared with our address (behind a proxy it names the
        // proxy's).
        if single(headers, "Host")?.is_none() {
            return Err(HandshakeError::MissingHost);
        }
        let origin = match single(headers, "Origin")? {
            Some(v) => Some(utf8(v, "Origin")?.trim().to_owned()),
            None => None,
        };
        let mut protocols = Vec::new();
        let mut protocol_token = None;
        for v in header_values(headers, "Sec-WebSocket-Protocol") {
            let v = utf8(v, "Sec-WebSocket-Protocol")?;
            for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match p.strip_prefix(TOKEN_PROTOCOL_PREFIX) {
                    Some(_) if protocol_token.is_some() => return Err(HandshakeError::TwoTokens),
                    Some(t) => protocol_token = Some(t.to_owned()),
                    None => protocols.push(p.to_owned()),
                }
            }
        }
        let (user, mut token) = parse_query(query)?;
        if let Some(t) = protocol_token {
            if token.is_some() {
                // Which one was meant would be a guess: refuse.
                return Err(HandshakeError::TwoTokens);
            }
            token = Some(t);
        }
        Ok(Some((Handshake { path: path.to_owned(), user, token, origin, protocols, key }, n)))
    }

    /// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64 of the SHA-1
    /// of the key and [`GUID`].
    pub fn accept_key(key: &str) -> String {
        let mut h = Sha1::new();
        h.update(key.as_bytes());
        h.update(GUID.as_bytes());
        STANDARD.encode(h.finalize())
    }

    /// The first sub-protocol the client offered (it lists them in order of
    /// preference) that the server supports; names compare exactly.
    pub fn choose_protocol<'a, S: AsRef<str>>(offered: &'a [String], supported: &[S]) -> Option<&'a str> {
        offered.iter().map(String::as_str).find(|o| supported.iter().any(|s| s.as_ref() == *o))
    }

    /// `scheme://host[:port]` lower-cased, without a trailing `/` or the
    /// scheme's default port.
    fn normalize_origin(s: &str) -> String {
        let lower = s.trim().trim_end_matches('/').to_ascii_lowercase();
        let Some((scheme, authority)) = lower.split_once("://") else { return lower };
        let default_port = match scheme {
            "http" | "ws" => ":80",
            "https" | "wss" => ":443",
            _ => "",
        };
        let authority = match authority.strip_suffix(default_port) {
            Some(a) if !default_port.is_empty() => a,
            _ => authority,
        };
        format!("{scheme}://{authority}")
    }

    /// Whether a request's `Origin` may connect. An empty allow list or one
    /// containing `*` allows every origin. Otherwise the origin must equal an
    /// entry as `scheme://host[:port]`: scheme and host case-insensitive, a
    /// default port (80, 443) the same as none, a trailing `/` ignored. A
    /// request without `Origin` does not come from a browser page, which
    /// always sends one, and is allowed: the check protects browsers' users
    /// from other sites' pages, and any other client can send any Origin.
    /// The opaque origin `null` matches only an entry `null`.
    pub fn origin_allowed(origin: Option<&str>, allow_list: &[String]) -> bool {
        if allow_list.is_empty() || allow_list.iter().any(|a| a.trim() == "*") {
            return true;
        }
        let Some(origin) = origin else { return true };
        let origin = normalize_origin(origin);
        allow_list.iter().any(|a| normalize_origin(a) == origin)
    }

    /// Sniffs a connection's first bytes: `Some(true)` for an HTTP request
    /// (`GET `), `Some(false)` for anything else, such as a raw protocol v1
    /// frame (its u32 length starts with byte 0 for any frame under 16 MiB,
    /// never `G`), `None` while fewer than 4 bytes could still be `GET `.
    pub fn looks_like_http(first_bytes: &[u8]) -> Option<bool> {
        const GET: &[u8; 4] = b"GET ";
        if first_bytes.len() >= GET.len() {
            Some(&first_bytes[..GET.len()] == GET)
        } else if GET.starts_with(first_bytes) {
            None
        } else {
            Some(false)
        }
    }

    /// Whether the first bytes of a connection are an HTTP request line of
    /// any common method (`None`: too few bytes to tell). Used where HTTP
    /// does not belong, to say which port serves it.
    pub fn looks_like_http_request(first_bytes: &[u8]) -> Option<bool> {
        const METHODS: [&[u8]; 9] =
            [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"PRI "];
        let mut undecided = false;
        for m in METHODS {
            let n = m.len().min(first_bytes.len());
            if first_bytes[..n] == m[..n] {
                if n == m.len() {
                    return Some(true);
                }
                undecided = true;
            }
        }
        if undecided {
            None
        } else {
            Some(false)
        }
    }

    /// The 101 response that completes the upgrade.
    pub fn response_101(accept: &str, protocol: Option<&str>) -> Vec<u8> {
        let mut r = String::with_capacity(160);
        r.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
        push_header(&mut r, "Sec-WebSocket-Accept", accept);
        if let Some(p) = protocol {
            push_header(&mut r, "Sec-WebSocket-Protocol", p);
        }
        r.push_str("\r\n");
        r.into_bytes()
    }

    /// The standard reason phrase for the statuses this server sends.
    pub fn status_phrase(status: u16) -> &'static str {
        match status {
            101 => "Switching Protocols",
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            413 => "Content Too Large",
            426 => "Upgrade Required",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "Error",
        }
    }

    /// Appends `name: value\r\n`, with any CR or LF turned into a space so a
    /// value cannot inject a header.
    fn push_header(r: &mut String, name: &str, value: &str) {
        let clean = |s: &str, r: &mut String| r.extend(s.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }));
        clean(name, r);
        r.push_str(": ");
        clean(value, r);
        r.push_str("\r\n");
    }

    /// A response with a body that closes the connection: the status line
    /// with the standard phrase ([`status_phrase`]), `extra_headers`, and
    /// `reason` plus a newline as a plain-text body. E.g. 400, 403 for an
    /// Origin that [`origin_allowed`] refuses, 426 with
    /// `Sec-WebSocket-Version: 13`.
    pub fn response_error(status: u16, reason: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
        let mut body = String::with_capacity(reason.len() + 1);
        body.push_str(reason);
        body.push('\n');
        response(status, "text/plain; charset=utf-8", body.as_bytes(), extra_headers)
    }

    /// A 200 response with a body (the demo page, for a
    /// [`HandshakeError::NotUpgrade`] request), then close.
    pub fn response_200(content_type: &str, body: &[u8]) -> Vec<u8> {
        response(200, content_type, body, &[])
    }

    fn response(status: u16, content_type: &str, body: &[u8], extra_headers: &[(&str, &str)]) -> Vec<u8> {
        let mut r = String::with_capacity(160);
        r.push_str("HTTP/1.1 ");
        r.push_str(&status.to_string());
        r.push(' ');
        r.push_str(status_phrase(status));
        r.push_str("\r\n");
        push_header(&mut r, "Content-Type", content_type);
        push_header(&mut r, "Content-Length", &body.len().to_string());
        // RFC 9110 §7.8: whoever sends `Upgrade` also lists "upgrade" in
        // `Connection`, so intermediaries do not forward it.
        let upgrade = extra_headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("Upgrade"));
        push_header(&mut r, "Connection", if upgrade { "Upgrade, close" } else { "close" });
        for (name, value) in extra_headers {
            push_header(&mut r, name, value);
        }
        r.push_str("\r\n");
        let mut out = r.into_bytes();
        out.extend_from_slice(body);
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

        fn request(lines: &[&str]) -> Vec<u8> {
            let mut s = String::from("GET /ws?user=alice&token=a.b.c HTTP/1.1\r\nHost: server.example.com\r\n");
            for l in lines {
                s.push_str(l);
                s.push_str("\r\n");
            }
            s.push_str("\r\n");
            s.into_bytes()
        }

        fn good() -> Vec<&'static str> {
            vec![
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            ]
        }

        fn parse(b: &[u8]) -> Result<Option<(Handshake, usize)>, HandshakeError> {
            parse_request(b, DEFAULT_MAX_HEAD)
        }

        /// `good()` with the header called `name` replaced (or removed).
        fn with(name: &str, line: Option<&'static str>) -> Vec<u8> {
            let mut l: Vec<&str> = good().into_iter().filter(|h| !h.starts_with(name)).collect();
            l.extend(line);
            request(&l)
        }

        #[test]
        fn accept_key_matches_rfc_6455() {
            assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        }

        #[test]
        fn parses_the_rfc_example_request() {
            let req = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
                Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\n\
                Sec-WebSocket-Version: 13\r\n\r\n\x81\x85";
            let (hs, n) = parse(req).unwrap().unwrap();
            assert_eq!(n, req.len() - 2, "the bytes after the head are not consumed");
            assert_eq!(
                hs,
                Handshake {
                    path: "/chat".into(),
                    user: None,
                    token: None,
                    origin: Some("http://example.com".into()),
                    protocols: vec!["chat".into(), "superchat".into()],
                    key: KEY.into(),
                }
            );
            assert_eq!(hs.accept(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
            assert_eq!(hs.login(), None);
            assert_eq!(choose_protocol(&hs.protocols, &["superchat", "chat"]), Some("chat"));
            assert_eq!(choose_protocol(&hs.protocols, &["Chat"]), None);
        }

        #[test]
        fn every_prefix_is_incomplete_and_a_long_head_is_refused() {
            let req = request(&good());
            for cut in 0..req.len() {
                assert_eq!(parse(&req[..cut]), Ok(None), "prefix {cut}");
            }
            assert!(parse(&req).unwrap().is_some());
            // Incomplete at the limit: 431.
            let err = parse_request(&req[..100], 100).unwrap_err();
            assert_eq!(err, HandshakeError::HeadTooLarge { max: 100 });
            assert_eq!(err.status(), 431);
            // Complete but longer than the limit.
            assert_eq!(parse_request(&req, req.len() - 1), Err(HandshakeError::HeadTooLarge { max: req.len() - 1 }));
            let many: Vec<String> = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: y")).collect();
            let many: Vec<&str> = many.iter().map(String::as_str).collect();
            let err = parse_request(&request(&many), 1 << 20).unwrap_err();
            assert_eq!((err.clone(), err.status()), (HandshakeError::TooManyHeaders, 431));
        }

        #[test]
        fn query_parameters_are_percent_decoded() {
            let (hs, _) = parse(&request(&good())).unwrap().unwrap();
            assert_eq!(
                (hs.path.as_str(), hs.user.as_deref(), hs.token.as_deref()),
                ("/ws", Some("alice"), Some("a.b.c"))
            );
            assert_eq!(hs.login(), Some(Frame::Login { user: "alice", token: b"a.b.c" }));
            let q = |target: &str| {
                let mut r = format!("GET {target} HTTP/1.1\r\n").into_bytes();
                r.extend_from_slice(&request(&good())[b"GET /ws?user=alice&token=a.b.c HTTP/1.1\r\n".len()..]);
                parse(&r).map(|o| o.map(|(h, _)| (h.path, h.user, h.token)))
            };
            assert_eq!(
                q("/?x=1&user=J%C3%BCrgen+M&token=t%2Bk%3D&y"),
                Ok(Some(("/".into(), Some("Jürgen M".into()), Some("t+k=".into()))))
            );
            assert_eq!(q("/ws"), Ok(Some(("/ws".into(), None, None))));
            assert_eq!(q("/?user=%zz"), Err(HandshakeError::BadQuery("user")));
            assert_eq!(q("/?token=%C3"), Err(HandshakeError::BadQuery("token")), "not UTF-8");
            assert_eq!(q("/?user=a&user=b"), Err(HandshakeError::BadQuery("user")));
            assert_eq!(q("/?user="), Err(HandshakeError::BadQuery("user")));
            assert_eq!(q(&format!("/?user={}", "u".repeat(256))), Err(HandshakeError::BadQuery("user")));
            assert_eq!(HandshakeError::BadQuery("user").status(), 400);
        }

        #[test]
        fn exactly_one_host_is_required() {
            let without = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
            let err = parse(without).unwrap_err();
            assert_eq!((err.clone(), err.status()), (HandshakeError::MissingHost, 400));
            let mut lines = good();
            lines.push("Host: again.example");
            assert_eq!(parse(&request(&lines)).unwrap_err(), HandshakeError::DuplicateHeader("Host"));
        }

        #[test]
        fn a_token_may_come_as_a_subprotocol_and_is_never_offered_back() {
            let with = |target: &str, protocol_lines: &[&str]| {
                let mut lines = good();
                lines.extend_from_slice(protocol_lines);
                let mut r = format!("GET {target} HTTP/1.1\r\n").into_bytes();
                r.extend_from_slice(&request(&lines)[b"GET /ws?user=alice&token=a.b.c HTTP/1.1\r\n".len()..]);
                parse(&r).map(|o| o.map(|(h, _)| h))
            };
            let hs = with("/?user=alice", &["Sec-WebSocket-Protocol: switchboard.v1.json, switchboard.token.x.y-z_"])
                .unwrap()
                .unwrap();
            assert_eq!(hs.token.as_deref(), Some("x.y-z_"));
            assert_eq!(hs.protocols, vec!["switchboard.v1.json".to_string()], "the token is not a protocol to choose");
            assert_eq!(hs.login(), Some(Frame::Login { user: "alice", token: b"x.y-z_" }));
            // Only a token offered: no protocol left, so the default applies.
            let hs = with("/?user=alice", &["Sec-WebSocket-Protocol: switchboard.token.t"]).unwrap().unwrap();
            assert!(hs.protocols.is_empty());
            assert_eq!(hs.login(), Some(Frame::Login { user: "alice", token: b"t" }));
            // Without a user there is no login at the upgrade.
            let hs = with("/", &["Sec-WebSocket-Protocol: switchboard.token.t"]).unwrap().unwrap();
            assert_eq!(hs.login(), None);
            // Twice is refused, whichever way.
            let two = with("/?user=a&token=q", &["Sec-WebSocket-Protocol: switchboard.token.t"]);
            assert_eq!(two, Err(HandshakeError::TwoTokens));
            let two = with(
                "/?user=a",
                &["Sec-WebSocket-Protocol: switchboard.token.t", "Sec-WebSocket-Protocol: switchboard.token.u"],
            );
            assert_eq!(two, Err(HandshakeError::TwoTokens));
            assert_eq!(HandshakeError::TwoTokens.status(), 400);
        }

        #[test]
        fn refuses_other_methods_and_http_1_0() {
            let post = [&b"POST"[..], &request(&good())[3..]].concat();
            let err = parse(&post).unwrap_err();
            assert_eq!(err, HandshakeError::MethodNotAllowed { method: "POST".into() });
            assert_eq!(err.status(), 405);
            assert!(String::from_utf8(err.response()).unwrap().contains("\r\nAllow: GET\r\n"));
            let old = String::from_utf8(request(&good())).unwrap().replace("HTTP/1.1", "HTTP/1.0");
            let err = parse(old.as_bytes()).unwrap_err();
            assert_eq!((err.clone(), err.status()), (HandshakeError::HttpVersion(0), 505));
            assert!(matches!(parse(b"GET / HTTP/2.0\r\n\r\n"), Err(HandshakeError::Malformed(_))));
            assert!(matches!(parse(b"\x00\x00\x00\x05\x01\x01"), Err(HandshakeError::Malformed(_))));
        }

        #[test]
        fn a_plain_get_is_not_an_upgrade() {
            let err = parse(b"GET /index.html?x=1 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n").unwrap_err();
            assert_eq!(err, HandshakeError::NotUpgrade { path: "/index.html".into() });
            assert_eq!(err.status(), 426);
            assert_eq!(parse(b"GET / HTTP/1.0\r\n\r\n"), Err(HandshakeError::NotUpgrade { path: "/".into() }));
            assert!(String::from_utf8(err.response()).unwrap().contains("\r\nUpgrade: websocket\r\n"));
        }

        #[test]
        fn upgrade_and_connection_are_case_insensitive_token_lists() {
            assert!(parse(&with("Upgrade", Some("Upgrade: WebSocket"))).unwrap().is_some());
            assert!(parse(&with("Upgrade", Some("upgrade: foo/2, websocket"))).unwrap().is_some());
            assert!(parse(&with("Connection", Some("connection: keep-alive, UPGRADE"))).unwrap().is_some());
            assert_eq!(parse(&with("Upgrade", Some("Upgrade: h2c"))), Err(HandshakeError::NotWebSocket));
            assert_eq!(parse(&with("Upgrade", Some("Upgrade: websockets"))), Err(HandshakeError::NotWebSocket));
            assert_eq!(
                parse(&with("Connection", Some("Connection: keep-alive"))),
                Err(HandshakeError::NoConnectionUpgrade)
            );
            assert_eq!(parse(&with("Connection", None)), Err(HandshakeError::NoConnectionUpgrade));
            assert_eq!(HandshakeError::NotWebSocket.status(), 400);
            assert_eq!(HandshakeError::NoConnectionUpgrade.status(), 400);
        }

        #[test]
        fn only_version_13_is_spoken() {
            for v in [Some("Sec-WebSocket-Version: 8"), Some("Sec-WebSocket-Version: 13, 8"), None] {
                let err = parse(&with("Sec-WebSocket-Version", v)).unwrap_err();
                assert_eq!((err.clone(), err.status()), (HandshakeError::UnsupportedVersion, 426), "{v:?}");
                let resp = String::from_utf8(err.response()).unwrap();
                assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{resp}");
                assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{resp}");
                assert!(resp.contains("\r\nUpgrade: websocket\r\n"), "{resp}");
                assert!(resp.contains("\r\nConnection: Upgrade, close\r\n"), "{resp}");
            }
        }

        #[test]
        fn the_key_must_be_base64_of_16_bytes() {
            assert_eq!(parse(&with("Sec-WebSocket-Key", None)), Err(HandshakeError::MissingKey));
            for bad in [
                "Sec-WebSocket-Key: not base64 at all!!!!",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j", // 15 bytes
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=x",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZSE=", // 24 characters, 17 bytes
            ] {
                let err = parse(&with("Sec-WebSocket-Key", Some(bad))).unwrap_err();
                assert_eq!((err.clone(), err.status()), (HandshakeError::BadKey, 400), "{bad}");
            }
            let mut twice = good();
            twice.push("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==");
            assert_eq!(parse(&request(&twice)), Err(HandshakeError::DuplicateHeader("Sec-WebSocket-Key")));
        }

        #[test]
        fn origin_and_protocols_are_reported() {
            let mut l = good();
            l.extend(["Origin: https://App.example.com", "Sec-WebSocket-Protocol: a, b", "Sec-WebSocket-Protocol: c"]);
            let (hs, _) = parse(&request(&l)).unwrap().unwrap();
            assert_eq!(hs.origin.as_deref(), Some("https://App.example.com"));
            assert_eq!(hs.protocols, ["a", "b", "c"]);
            assert_eq!(choose_protocol(&hs.protocols, &[String::from("c"), String::from("b")]), Some("b"));
            l.push("Origin: https://evil.example");
            assert_eq!(parse(&request(&l)), Err(HandshakeError::DuplicateHeader("Origin")));
            let good_req = request(&good());
            let at = good_req.len() - 2;
            let bad = [&good_req[..at], &b"Origin: http://\xff\r\n"[..], &good_req[at..]].concat();
            assert_eq!(parse(&bad), Err(HandshakeError::BadHeader("Origin")));
        }

        #[test]
        fn origin_allow_list() {
            let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert!(origin_allowed(Some("https://evil.example"), &[]));
            assert!(origin_allowed(Some("https://evil.example"), &list(&["https://a.example", "*"])));
            let l = list(&["https://app.example.com", "http://localhost:8080", "https://x.example:443/"]);
            assert!(origin_allowed(Some("https://app.example.com"), &l));
            assert!(origin_allowed(Some("https://APP.Example.com"), &l), "host is case-insensitive");
            assert!(origin_allowed(Some("https://app.example.com:443"), &l), "default port");
            assert!(origin_allowed(Some("https://x.example"), &l));
            assert!(origin_allowed(Some("http://localhost:8080"), &l));
            assert!(!origin_allowed(Some("http://localhost:8081"), &l));
            assert!(!origin_allowed(Some("http://localhost"), &l));
            assert!(!origin_allowed(Some("http://app.example.com"), &l), "scheme differs");
            assert!(!origin_allowed(Some("https://app.example.com.evil.example"), &l));
            assert!(!origin_allowed(Some("https://evil.example/https://app.example.com"), &l));
            assert!(!origin_allowed(Some("null"), &l));
            assert!(origin_allowed(Some("null"), &list(&["null"])));
            assert!(origin_allowed(None, &l), "no Origin: not a browser");
            assert!(!origin_allowed(Some("http://[::1]:8080"), &l));
            assert!(origin_allowed(Some("http://[::1]"), &list(&["http://[::1]:80"])));
        }

        #[test]
        fn sniffs_http_from_the_first_bytes() {
            assert_eq!(looks_like_http(b""), None);
            assert_eq!(looks_like_http(b"G"), None);
            assert_eq!(looks_like_http(b"GE"), None);
            assert_eq!(looks_like_http(b"GET"), None);
            assert_eq!(looks_like_http(b"GET "), Some(true));
            assert_eq!(looks_like_http(b"GET / HTTP/1.1"), Some(true));
            assert_eq!(looks_like_http(&[0]), Some(false), "a raw frame's length");
            assert_eq!(looks_like_http(&[0, 0, 0, 13, 1, 1]), Some(false));
            assert_eq!(looks_like_http(b"GX"), Some(false));
            assert_eq!(looks_like_http(b"GETX"), Some(false));
            assert_eq!(looks_like_http(b"POST /"), Some(false));
        }

        #[test]
        fn responses_are_byte_exact() {
            assert_eq!(
                response_101("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", None),
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            );
            assert_eq!(
                response_101("x", Some("chat")),
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: x\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
            );
            assert_eq!(
                response_error(403, "origin not allowed", &[]),
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 19\r\n\
                  Connection: close\r\n\r\norigin not allowed\n"
            );
            assert_eq!(
                response_error(426, "v", &[("Sec-WebSocket-Version", "13")]),
                b"HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\
                  Connection: close\r\nSec-WebSocket-Version: 13\r\n\r\nv\n"
            );
            // A value cannot inject a header.
            let r = String::from_utf8(response_error(400, "x", &[("X-A", "1\r\nSet-Cookie: a=b")])).unwrap();
            assert!(r.contains("\r\nX-A: 1  Set-Cookie: a=b\r\n"), "{r}");
            assert_eq!(
                response_200("text/html", b"<p>hi</p>"),
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9\r\nConnection: close\r\n\r\n<p>hi</p>"
            );
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic_the_parser(
                b in proptest::collection::vec(any::<u8>(), 0..600),
                max in 0usize..1024,
            ) {
                let _ = parse_request(&b, max);
                let _ = looks_like_http(&b);
            }

            #[test]
            fn arbitrary_header_values_never_panic(
                target in "[ -~]{0,40}",
                values in proptest::collection::vec((0usize..8, "[ -~\u{80}-\u{10ffff}]{0,30}"), 0..10),
            ) {
                const NAMES: [&str; 8] = ["Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
                    "Origin", "Sec-WebSocket-Protocol", "Host", "X"];
                let mut r = format!("GET {target} HTTP/1.1\r\n");
                for (i, v) in &values {
                    r.push_str(&format!("{}: {v}\r\n", NAMES[*i]));
                }
                r.push_str("\r\n");
                let _ = parse_request(r.as_bytes(), DEFAULT_MAX_HEAD);
                let list = vec![target.clone()];
                let _ = origin_allowed(Some(&target), &list);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 64 * 1024;

    /// Test-only masker: turns a server-encoded (unmasked) frame into the
    /// client frame a browser would send, byte by byte and independently of
    /// `apply_mask`.
    fn mask(frame: &[u8], key: [u8; 4]) -> Vec<u8> {
        let hlen = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let mut out = frame[..hlen].to_vec();
        out[1] |= 0x80;
        out.extend_from_slice(&key);
        out.extend(frame[hlen..].iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    /// A client frame with the given first byte, masked with a fixed key.
    fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
        let (h, n) = frame_header(Opcode::Text, true, payload.len());
        let mut f = h[..n].to_vec();
        f[0] = b0;
        f.extend_from_slice(payload);
        mask(&f, [1, 2, 3, 4])
    }

    /// An event with owned data, to compare across calls.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, String),
    }

    fn own(e: &WsEvent<'_>) -> Option<Owned> {
        Some(match e {
            WsEvent::Text(s) => Owned::Text(s.to_string()),
            WsEvent::Binary(b) => Owned::Binary(b.to_vec()),
            WsEvent::Ping(b) => Owned::Ping(b.to_vec()),
            WsEvent::Pong(b) => Owned::Pong(b.to_vec()),
            WsEvent::Close { code, reason } => Owned::Close(*code, reason.to_string()),
            WsEvent::Fragment => return None,
        })
    }

    /// Feeds `chunks` as a socket would deliver them, decoding whenever
    /// possible, as the server does; returns the events or the first error.
    fn drive(dec: &mut Decoder, chunks: &[impl AsRef<[u8]>]) -> Result<Vec<Owned>, WsError> {
        let mut rbuf = Vec::new();
        let mut out = Vec::new();
        for c in chunks {
            rbuf.extend_from_slice(c.as_ref());
            let mut start = 0;
            while let Some((ev, n)) = dec.decode(&mut rbuf[start..])? {
                out.extend(own(&ev));
                start += n;
            }
            rbuf.drain(..start);
        }
        Ok(out)
    }

    fn decode_all(frames: &[Vec<u8>]) -> Result<Vec<Owned>, WsError> {
        let all = frames.concat();
        drive(&mut Decoder::new(MAX), &[&all])
    }

    fn err_of(frames: &[Vec<u8>]) -> (WsError, u16) {
        let e = decode_all(frames).unwrap_err();
        (e, e.close_code())
    }

    #[test]
    fn rfc_6455_section_5_7_examples() {
        // A single-frame unmasked text message (what the server sends).
        assert_eq!(text_frame("Hello"), [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        // A single-frame masked text message (what a client sends).
        let mut masked: [u8; 11] = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(mask(&text_frame("Hello"), [0x37, 0xfa, 0x21, 0x3d]), masked);
        let mut dec = Decoder::new(MAX);
        assert_eq!(dec.decode(&mut masked), Ok(Some((WsEvent::Text("Hello"), 11))));
        // A fragmented unmasked text message.
        let (h1, n1) = frame_header(Opcode::Text, false, 3);
        let (h2, n2) = frame_header(Opcode::Continuation, true, 2);
        assert_eq!([&h1[..n1], &b"Hel"[..]].concat(), [0x01, 0x03, 0x48, 0x65, 0x6c]);
        assert_eq!([&h2[..n2], &b"lo"[..]].concat(), [0x80, 0x02, 0x6c, 0x6f]);
        let frames = [
            mask(&[&h1[..n1], &b"Hel"[..]].concat(), [9, 8, 7, 6]),
            mask(&[&h2[..n2], &b"lo"[..]].concat(), [1, 0, 0, 1]),
        ];
        assert_eq!(decode_all(&frames), Ok(vec![Owned::Text("Hello".into())]));
        // Unmasked ping, and a masked pong with the same body.
        assert_eq!(ping_frame(b"Hello"), [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        let mut pong: [u8; 11] = [0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(Decoder::new(MAX).decode(&mut pong), Ok(Some((WsEvent::Pong(b"Hello"), 11))));
        assert_eq!(pong_frame(b"Hello")[0], 0x8a);
        // 256 bytes binary in a single unmasked frame; 64 KiB likewise.
        let (h, n) = frame_header(Opcode::Binary, true, 256);
        assert_eq!(h[..n], [0x82, 0x7e, 0x01, 0x00]);
        let (h, n) = frame_header(Opcode::Binary, true, 65536);
        assert_eq!(h[..n], [0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
        // Both decode back when masked.
        for len in [256, 65536] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let f = mask(&binary_frame(&data), [0xde, 0xad, 0xbe, 0xef]);
            assert_eq!(decode_all(&[f]), Ok(vec![Owned::Binary(data)]));
        }
    }

    #[test]
    fn header_sizes_switch_at_126_and_65536() {
        assert_eq!(frame_header(Opcode::Text, true, 125).1, 2);
        assert_eq!(frame_header(Opcode::Text, true, 126).1, 4);
        assert_eq!(frame_header(Opcode::Text, true, 65535).1, 4);
        assert_eq!(frame_header(Opcode::Text, true, 65536).1, 10);
        assert_eq!(frame_header(Opcode::Ping, true, 0).0[..2], PING_EMPTY);
        assert_eq!(encode_frame(Opcode::Close, b""), CLOSE_EMPTY);
    }

    #[test]
    fn every_strict_prefix_waits_without_touching_the_bytes() {
        let f = mask(&text_frame(&"x".repeat(300)), [5, 6, 7, 8]);
        for cut in 0..f.len() {
            let mut b = f[..cut].to_vec();
            assert_eq!(Decoder::new(MAX).decode(&mut b), Ok(None), "prefix {cut}");
            assert_eq!(b, f[..cut], "prefix {cut} unchanged");
        }
    }

    #[test]
    fn unmasked_client_frames_are_refused() {
        assert_eq!(decode_all(&[text_frame("hi")]).unwrap_err(), WsError::Unmasked);
        assert_eq!(Decoder::new(MAX).decode(&mut [0x81, 0x02]), Err(WsError::Unmasked));
        assert_eq!(WsError::Unmasked.close_code(), 1002);
    }

    #[test]
    fn rsv_bits_and_reserved_opcodes_are_protocol_errors() {
        for (b0, bits) in [(0xc1, 4), (0xa1, 2), (0x91, 1), (0xf1, 7)] {
            // Refused from byte 0 alone.
            assert_eq!(Decoder::new(MAX).decode(&mut [b0]), Err(WsError::ReservedBits(bits)));
            assert_eq!(err_of(&[client(b0, b"x")]), (WsError::ReservedBits(bits), 1002));
        }
        for op in (0x3..=0x7).chain(0xb..=0xf) {
            assert_eq!(err_of(&[client(0x80 | op, b"x")]), (WsError::ReservedOpcode(op), 1002), "opcode {op:x}");
        }
    }

    #[test]
    fn control_frames_are_short_and_unfragmented() {
        let long = [0u8; 126];
        for (op, opcode) in [(0x89, Opcode::Ping), (0x8a, Opcode::Pong), (0x88, Opcode::Close)] {
            assert_eq!(err_of(&[client(op, &long)]), (WsError::ControlTooLong(opcode), 1002));
            let fin_clear = op & 0x7f;
            assert_eq!(err_of(&[client(fin_clear, b"")]), (WsError::FragmentedControl(opcode), 1002));
        }
        // 125 bytes is fine.
        assert_eq!(decode_all(&[client(0x89, &[7; 125])]), Ok(vec![Owned::Ping(vec![7; 125])]));
    }

    #[test]
    fn lengths_must_be_minimal_with_the_msb_clear() {
        let mut msb = vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(Decoder::new(usize::MAX).decode(&mut msb), Err(WsError::LengthMsbSet));
        assert_eq!(WsError::LengthMsbSet.close_code(), 1002);
        let mut short16 = vec![0x82, 0xfe, 0x00, 0x7d];
        assert_eq!(Decoder::new(MAX).decode(&mut short16), Err(WsError::NonMinimalLength { len: 125 }));
        let mut short64 = vec![0x82, 0xff, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        let e = Decoder::new(MAX).decode(&mut short64).unwrap_err();
        assert_eq!((e, e.close_code()), (WsError::NonMinimalLength { len: 65535 }, 1002));
    }

    #[test]
    fn fragment_sequence_rules() {
        // Continuation with nothing started.
        assert_eq!(err_of(&[client(0x80, b"x")]), (WsError::UnexpectedContinuation, 1002));
        assert_eq!(err_of(&[client(0x00, b"x")]), (WsError::UnexpectedContinuation, 1002));
        // A new text or binary message while one is in progress.
        for b0 in [0x81, 0x82, 0x01] {
            let op = Opcode::from_u8(b0 & 0xf).unwrap();
            assert_eq!(err_of(&[client(0x01, b"a"), client(b0, b"b")]), (WsError::MessageInProgress(op), 1002));
        }
        // Control frames between fragments are fine and come out at once.
        let frames =
            [client(0x02, b"ab"), client(0x89, b"p"), client(0x00, b"cd"), client(0x8a, b"q"), client(0x80, b"e")];
        assert_eq!(
            decode_all(&frames),
            Ok(vec![Owned::Ping(b"p".to_vec()), Owned::Pong(b"q".to_vec()), Owned::Binary(b"abcde".to_vec())])
        );
        // Empty fragments, and a new message after a reassembled one.
        let frames = [client(0x01, b""), client(0x00, b""), client(0x80, b""), client(0x81, b"next")];
        assert_eq!(decode_all(&frames), Ok(vec![Owned::Text(String::new()), Owned::Text("next".into())]));
    }

    #[test]
    fn fragments_report_progress() {
        let mut b = [client(0x01, b"He"), client(0x80, b"llo")].concat();
        let mut dec = Decoder::new(MAX);
        let (ev, n) = dec.decode(&mut b).unwrap().unwrap();
        assert_eq!((ev, n), (WsEvent::Fragment, 8));
        assert!(dec.in_message());
        assert_eq!(dec.decode(&mut b[8..]), Ok(Some((WsEvent::Text("Hello"), 9))));
        assert!(!dec.in_message());
    }

    #[test]
    fn message_limit_is_checked_from_the_header_and_across_fragments() {
        let mut dec = Decoder::new(1000);
        // Only the 4-byte header of a 1001-byte frame has arrived.
        let e = dec.decode(&mut [0x82, 0xfe, 0x03, 0xe9]).unwrap_err();
        assert_eq!((e, e.close_code()), (WsError::MessageTooBig { len: 1001, max: 1000 }, 1009));
        let e = Decoder::new(1000).decode(&mut [0x82, 0xff, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(e, WsError::MessageTooBig { len: 1 << 32, max: 1000 });
        // Exactly at the limit is fine, in one frame or in pieces.
        let mut dec = Decoder::new(1000);
        let frames = [client(0x82, &[1; 1000])];
        assert_eq!(drive(&mut dec, &[&frames[0]]), Ok(vec![Owned::Binary(vec![1; 1000])]));
        let pieces = [client(0x02, &[1; 600]), client(0x00, &[2; 400]), client(0x80, &[3; 1])].concat();
        let mut dec = Decoder::new(1000);
        let e = drive(&mut dec, &[&pieces]).unwrap_err();
        assert_eq!((e, e.close_code()), (WsError::MessageTooBig { len: 1001, max: 1000 }, 1009));
        assert!(dec.buffered_capacity() <= 1000, "the reassembly buffer stays within the limit");
        // Control frames do not count against the message.
        let frames = [client(0x02, &[1; 1000]), client(0x89, &[0; 125]), client(0x80, b"")];
        assert_eq!(drive(&mut Decoder::new(1000), &[&frames.concat()]).unwrap().len(), 2);
    }

    #[test]
    fn text_must_be_utf8_and_fails_fast() {
        assert_eq!(err_of(&[client(0x81, b"ok \xff")]), (WsError::InvalidUtf8, 1007));
        // The first fragment is already invalid: refused before the rest.
        assert_eq!(err_of(&[client(0x01, b"\xc3\x28")]), (WsError::InvalidUtf8, 1007));
        // Invalid in the middle of a later fragment.
        assert_eq!(err_of(&[client(0x01, b"abc"), client(0x00, b"d\xed\xa0\x80")]), (WsError::InvalidUtf8, 1007));
        // A character split across fragments is fine ("é" = c3 a9, "€" = e2 82 ac).
        let frames =
            [client(0x01, b"caf\xc3"), client(0x00, b"\xa9 \xe2"), client(0x00, b"\x82"), client(0x80, b"\xac")];
        assert_eq!(decode_all(&frames), Ok(vec![Owned::Text("café €".into())]));
        // ...but not one cut off at the end of the message.
        assert_eq!(err_of(&[client(0x01, b"caf"), client(0x80, b"\xc3")]), (WsError::InvalidUtf8, 1007));
        // Binary is not checked.
        assert_eq!(decode_all(&[client(0x82, b"\xff")]), Ok(vec![Owned::Binary(vec![0xff])]));
    }

    #[test]
    fn close_payloads() {
        assert_eq!(decode_all(&[client(0x88, b"")]), Ok(vec![Owned::Close(None, String::new())]));
        assert_eq!(decode_all(&[client(0x88, b"\x03\xe8bye")]), Ok(vec![Owned::Close(Some(1000), "bye".into())]));
        assert_eq!(err_of(&[client(0x88, b"\x03")]), (WsError::CloseTooShort, 1002));
        for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
        {
            let p = code.to_be_bytes();
            assert_eq!(decode_all(&[client(0x88, &p)]), Ok(vec![Owned::Close(Some(code), String::new())]), "{code}");
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            let p = code.to_be_bytes();
            assert_eq!(err_of(&[client(0x88, &p)]), (WsError::InvalidCloseCode(code), 1002), "{code}");
        }
        assert_eq!(err_of(&[client(0x88, b"\x03\xe8\xce\xba\xed\xa0\x80")]), (WsError::InvalidCloseReason, 1007));
    }

    #[test]
    fn the_reassembly_buffer_is_freed_or_kept_small() {
        let mut dec = Decoder::new(1 << 20);
        assert_eq!(dec.buffered_capacity(), 0, "nothing held before a fragment");
        let small = [client(0x01, b"ab"), client(0x80, b"c")].concat();
        assert_eq!(drive(&mut dec, &[&small]), Ok(vec![Owned::Text("abc".into())]));
        let kept = dec.buffered_capacity();
        assert!(kept > 0 && kept <= KEEP_REASSEMBLY_CAPACITY);
        let big = [client(0x02, &[1; 10_000]), client(0x80, &[2; 10_000])].concat();
        let mut b = big.clone();
        let (_, n) = dec.decode(&mut b).unwrap().unwrap();
        let (ev, _) = dec.decode(&mut b[n..]).unwrap().unwrap();
        assert!(matches!(ev, WsEvent::Binary(d) if d.len() == 20_000));
        assert!(dec.buffered_capacity() >= 20_000, "still borrowed by the event");
        // The next call releases it, even when it only waits for bytes.
        assert_eq!(dec.decode(&mut []), Ok(None));
        assert_eq!(dec.buffered_capacity(), 0);
        // Unfragmented messages never touch it.
        assert_eq!(drive(&mut dec, &[client(0x82, &[9; 5000])]), Ok(vec![Owned::Binary(vec![9; 5000])]));
        assert_eq!(dec.buffered_capacity(), 0);
    }

    #[test]
    fn decoder_state_is_small() {
        assert!(std::mem::size_of::<Decoder>() <= 48);
    }

    #[test]
    fn encoder_helpers() {
        assert_eq!(close_frame(1000, "bye"), [0x88, 5, 0x03, 0xe8, b'b', b'y', b'e']);
        assert_eq!(close_frame(4002, ""), [0x88, 2, 0x0f, 0xa2]);
        // The reason is cut to 123 bytes on a char boundary.
        let f = close_frame(1001, &"é".repeat(100));
        assert_eq!(f[1] as usize, 2 + 122);
        assert_eq!(decode_all(&[mask(&f, [1, 1, 1, 1])]), Ok(vec![Owned::Close(Some(1001), "é".repeat(61))]));
        assert_eq!(ping_frame(&[0; 200]).len(), 2 + 125);
        assert_eq!(pong_frame(b""), [0x8a, 0]);
        assert_eq!(PING_EMPTY, [0x89, 0]);
        let e = WsError::InvalidUtf8;
        assert_eq!(e.to_close_frame(), close_frame(1007, "text message is not valid UTF-8"));
    }

    #[test]
    fn apply_mask_matches_the_bytewise_definition() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut a = data.clone();
            apply_mask(&mut a, [0x11, 0x22, 0x33, 0x44]);
            let b: Vec<u8> = data.iter().enumerate().map(|(i, x)| x ^ [0x11, 0x22, 0x33, 0x44][i % 4]).collect();
            assert_eq!(a, b);
            apply_mask(&mut a, [0x11, 0x22, 0x33, 0x44]);
            assert_eq!(a, data);
        }
    }

    #[test]
    fn close_codes_follow_the_error() {
        let cases = [
            (WsError::ReservedBits(1), 1002),
            (WsError::ReservedOpcode(3), 1002),
            (WsError::Unmasked, 1002),
            (WsError::ControlTooLong(Opcode::Ping), 1002),
            (WsError::FragmentedControl(Opcode::Close), 1002),
            (WsError::LengthMsbSet, 1002),
            (WsError::NonMinimalLength { len: 1 }, 1002),
            (WsError::UnexpectedContinuation, 1002),
            (WsError::MessageInProgress(Opcode::Text), 1002),
            (WsError::MessageTooBig { len: 2, max: 1 }, 1009),
            (WsError::InvalidUtf8, 1007),
            (WsError::CloseTooShort, 1002),
            (WsError::InvalidCloseCode(1005), 1002),
            (WsError::InvalidCloseReason, 1007),
        ];
        for (e, code) in cases {
            assert_eq!(e.close_code(), code, "{e}");
            assert!(e.to_string().len() <= MAX_CLOSE_REASON, "{e}");
        }
    }

    /// A message the proptest sends: data in fragments, or a control frame.
    #[derive(Clone, Debug)]
    enum Msg {
        Text(String, Vec<usize>),
        Binary(Vec<u8>, Vec<usize>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
    }

    fn msg() -> impl Strategy<Value = Msg> {
        let cuts = proptest::collection::vec(0usize..4096, 0..4);
        prop_oneof![
            (".{0,60}", cuts.clone()).prop_map(|(s, c)| Msg::Text(s, c)),
            (proptest::collection::vec(any::<u8>(), 0..700), cuts).prop_map(|(b, c)| Msg::Binary(b, c)),
            proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
            proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Pong),
        ]
    }

    /// Server-encoded frames for a message, fragmented at `cuts` (byte
    /// offsets, so text may be cut inside a character), with `controls`
    /// inserted between fragments.
    fn frames_of(m: &Msg, controls: &mut Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Owned>) {
        let (op, data, cuts, expect) = match m {
            Msg::Ping(d) => return (vec![ping_frame(d)], vec![Owned::Ping(d.clone())]),
            Msg::Pong(d) => return (vec![pong_frame(d)], vec![Owned::Pong(d.clone())]),
            Msg::Text(s, c) => (Opcode::Text, s.as_bytes(), c, Owned::Text(s.clone())),
            Msg::Binary(b, c) => (Opcode::Binary, &b[..], c, Owned::Binary(b.clone())),
        };
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(data.len());
        let (mut frames, mut events, mut at) = (Vec::new(), Vec::new(), 0);
        for (i, &cut) in cuts.iter().enumerate() {
            let last = i + 1 == cuts.len();
            let opcode = if i == 0 { op } else { Opcode::Continuation };
            let (h, n) = frame_header(opcode, last, cut - at);
            frames.push([&h[..n], &data[at..cut]].concat());
            at = cut;
            if !last {
                if let Some(c) = controls.pop() {
                    events.push(Owned::Ping(c.clone()));
                    frames.push(ping_frame(&c));
                }
            }
        }
        events.push(expect);
        (frames, events)
    }

    proptest! {
        #[test]
        fn masked_split_server_frames_decode_to_the_same_messages(
            msgs in proptest::collection::vec(msg(), 0..12),
            controls in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..6),
            keys in proptest::collection::vec(any::<[u8; 4]>(), 1..8),
            splits in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let mut controls = controls;
            let (mut wire, mut expect) = (Vec::new(), Vec::new());
            let mut k = 0;
            for m in &msgs {
                let (frames, events) = frames_of(m, &mut controls);
                for f in frames {
                    wire.extend(mask(&f, keys[k % keys.len()]));
                    k += 1;
                }
                expect.extend(events);
            }
            wire.extend(mask(&close_frame(1000, "bye"), keys[0]));
            expect.push(Owned::Close(Some(1000), "bye".into()));
            let mut cuts: Vec<usize> = splits.iter().map(|s| s % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(wire.len());
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&wire[at..c]);
                at = c;
            }
            let got = drive(&mut Decoder::new(MAX), &chunks);
            prop_assert_eq!(got, Ok(expect));
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(
            b in proptest::collection::vec(any::<u8>(), 0..2048),
            splits in proptest::collection::vec(any::<usize>(), 0..6),
            max in 0usize..4096,
        ) {
            let mut cuts: Vec<usize> = splits.iter().map(|s| s % (b.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(b.len());
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&b[at..c]);
                at = c;
            }
            let mut dec = Decoder::new(max);
            let _ = drive(&mut dec, &chunks);
            prop_assert!(dec.buffered_capacity() <= max.max(MIN_REASSEMBLY_ALLOC));
        }

        #[test]
        fn masked_frames_with_arbitrary_headers_never_panic(
            frames in proptest::collection::vec(
                (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300), any::<[u8; 4]>()),
                0..8,
            ),
        ) {
            // Valid lengths and masking, any first byte: exercises every
            // rule past the length.
            let wire: Vec<u8> = frames.iter().flat_map(|(b0, p, key)| {
                let (h, n) = frame_header(Opcode::Text, true, p.len());
                let mut f = h[..n].to_vec();
                f[0] = *b0;
                f.extend_from_slice(p);
                mask(&f, *key)
            }).collect();
            let _ = drive(&mut Decoder::new(1024), &[&wire]);
        }
    }
}
