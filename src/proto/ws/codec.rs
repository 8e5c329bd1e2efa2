//! The WebSocket frame codec (RFC 6455 §5): decoders for either end of a
//! connection and the encoder of server frames.
//!
//! Owns: decoding client→server frames (masked, possibly fragmented,
//! control frames interleaved) into whole messages ([`Decoder`]), and
//! server→client frames likewise for clients ([`ClientDecoder`]); UTF-8
//! validation of text as it arrives (`super::utf8`); the byte layout of
//! server→client frames ([`frame_header`] and helpers), with the header
//! separable from the payload so one payload can be shared by many
//! connections, each written as `writev(header, payload)`.
//! Must not: do I/O, read a clock, negotiate an extension (no
//! permessage-deflate: an RSV bit is always an error), interpret what a
//! message says (that is `json` or `frame`), use `unsafe`, or panic on any
//! input. "Need more bytes" (`Ok(None)`) is not "invalid" (`Err`): the first
//! waits, the second fails the connection with the close code the error
//! maps to.
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

use super::utf8::Utf8Stream;

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
    #[error("server frame is masked")]
    Masked,
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

/// Which end of the connection a decoder serves. A server decodes client
/// frames, which are always masked; a client decodes server frames, which
/// never are (RFC 6455 §5.1: either end fails the connection otherwise).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Role {
    Server,
    Client,
}

/// A parsed frame header: everything before the payload.
#[derive(Copy, Clone, Debug)]
struct Header {
    fin: bool,
    opcode: Opcode,
    /// The masking key: always for client frames, never for server frames.
    mask: Option<[u8; 4]>,
    /// Bytes before the payload (2 to 14).
    header_len: usize,
    /// Payload bytes.
    len: usize,
}

/// Parses a frame header, rejecting as early as the bytes allow: RSV bits,
/// the opcode and its place in the message sequence from byte 0; a frame
/// masked the wrong way for `role` and an oversized control frame from
/// byte 1; an illegal or oversized length as soon as the length is
/// complete, before the masking key or any payload arrives. `buffered` is
/// what the message in progress already holds, so the limit applies across
/// fragments.
fn parse_header(
    buf: &[u8],
    role: Role,
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
    let masked = b1 & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(WsError::Unmasked),
        (Role::Client, true) => return Err(WsError::Masked),
        _ => {}
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
    let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
    let mask = if masked {
        let Some(k) = buf.get(header_len - 4..header_len) else { return Ok(None) };
        Some([k[0], k[1], k[2], k[3]])
    } else {
        None
    };
    // `len` is at most max_message_bytes (a usize) or 125 here.
    Ok(Some(Header { fin, opcode, mask, header_len, len: len as usize }))
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

/// The key that unmasks a payload from byte `offset` on.
fn key_at(key: [u8; 4], offset: usize) -> [u8; 4] {
    let o = offset % 4;
    [key[o], key[(o + 1) % 4], key[(o + 2) % 4], key[(o + 3) % 4]]
}

/// Bytes of a partly arrived masked text frame unmasked at a time (into a
/// stack copy, for validation only). A multiple of 4: every piece starts at
/// the same key phase.
const CHECK_CHUNK: usize = 512;
const _: () = assert!(CHECK_CHUNK.is_multiple_of(4));

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
/// state: the fragmented message in progress, if any, and how far the text
/// of an incomplete frame has been checked.
///
/// Holds no heap buffer until a client fragments a message (browsers do not),
/// and keeps at most [`KEEP_REASSEMBLY_CAPACITY`] once that message is done.
/// The reassembly buffer never grows beyond `max_message_bytes`.
///
/// Text is validated as it arrives, also inside one frame that arrives over
/// several reads: the first byte that makes the text invalid UTF-8 is an
/// error ([`WsError::InvalidUtf8`], 1007) on the call that first sees it,
/// however long the rest of the frame is. For that the decoder must be kept
/// between calls while [`Decoder::is_idle`] is false (the caller keeps the
/// incomplete frame's bytes anyway).
#[derive(Debug)]
pub struct Decoder {
    max_message_bytes: usize,
    /// While the text frame at the front of the caller's buffer is
    /// incomplete: how many of its payload bytes `utf8` has checked.
    /// 0 otherwise.
    frame_checked: usize,
    /// The fragments so far; empty when no message is in progress.
    buf: Vec<u8>,
    /// Text validation across fragments and reads.
    utf8: Utf8Stream,
    /// Text or Binary while a fragmented message is being reassembled.
    in_progress: Option<Opcode>,
    /// The last event borrowed `buf`: empty it on the next call.
    release: bool,
    role: Role,
}

impl Decoder {
    /// A server's decoder of client frames, refusing messages (whole, after
    /// reassembly) longer than `max_message_bytes` with close code 1009.
    pub fn new(max_message_bytes: usize) -> Decoder {
        Decoder::with_role(max_message_bytes, Role::Server)
    }

    fn with_role(max_message_bytes: usize, role: Role) -> Decoder {
        Decoder {
            max_message_bytes,
            frame_checked: 0,
            buf: Vec::new(),
            utf8: Utf8Stream::default(),
            in_progress: None,
            release: false,
            role,
        }
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

    /// True when the decoder holds no state between frames: no message in
    /// progress and no partly checked frame. A decoder that is not idle
    /// must be kept for the next call; an idle one may be dropped and a new
    /// one made, which costs nothing.
    pub fn is_idle(&self) -> bool {
        self.in_progress.is_none() && self.frame_checked == 0
    }

    /// Heap bytes held by the reassembly buffer (its capacity).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Decodes the first frame in `buf`, unmasking its payload in place.
    ///
    /// Returns `Ok(None)` when `buf` holds only a prefix of a frame that is
    /// valid so far (the bytes were not changed: call again with the same
    /// frame at the front and more bytes after it), or
    /// `Ok(Some((event, consumed)))`: the frame took the first `consumed`
    /// bytes of `buf`, which the caller must drop before the next call (they
    /// are unmasked now, so decoding them again would garble them). Errors
    /// are final: close with [`WsError::close_code`] and stop decoding.
    pub fn decode<'a>(&'a mut self, buf: &'a mut [u8]) -> Result<Option<(WsEvent<'a>, usize)>, WsError> {
        let Some(h) = self.next_frame(buf)? else { return Ok(None) };
        let end = h.header_len + h.len;
        if let Some(key) = h.mask {
            apply_mask(&mut buf[h.header_len..end], key);
        }
        let buf: &'a [u8] = buf;
        let event = self.finish(h, &buf[h.header_len..end])?;
        Ok(Some((event, end)))
    }

    /// Lets go of what the last event borrowed, then parses the header at
    /// the front of `buf`: `Some` once the whole frame is there. For a text
    /// frame that is not, checks the text that has arrived since the last
    /// call, so invalid UTF-8 fails before the rest comes.
    fn next_frame(&mut self, buf: &[u8]) -> Result<Option<Header>, WsError> {
        if self.release {
            self.release = false;
            self.buf.clear();
            if self.buf.capacity() > KEEP_REASSEMBLY_CAPACITY {
                self.buf = Vec::new();
            }
        }
        let Some(h) = parse_header(buf, self.role, self.in_progress, self.buf.len(), self.max_message_bytes)? else {
            return Ok(None);
        };
        let end = h.header_len.saturating_add(h.len);
        if buf.len() >= end {
            return Ok(Some(h));
        }
        if self.is_text(h.opcode) {
            // parse_header saw the whole header: the payload so far follows.
            let arrived = &buf[h.header_len..];
            if arrived.len() > self.frame_checked {
                self.check_text(&arrived[self.frame_checked..], h.mask)?;
                self.frame_checked = arrived.len();
            }
        }
        Ok(None)
    }

    /// Whether a frame with `opcode` carries text.
    fn is_text(&self, opcode: Opcode) -> bool {
        opcode == Opcode::Text || (opcode == Opcode::Continuation && self.in_progress == Some(Opcode::Text))
    }

    /// Validates payload bytes of an incomplete frame from `frame_checked`
    /// on, unmasking a copy: the caller's bytes stay as they came until the
    /// frame is whole.
    fn check_text(&mut self, data: &[u8], mask: Option<[u8; 4]>) -> Result<(), WsError> {
        let Some(key) = mask else {
            return self.utf8.feed(data).map_err(|_| WsError::InvalidUtf8);
        };
        let key = key_at(key, self.frame_checked);
        let mut copy = [0u8; CHECK_CHUNK];
        for piece in data.chunks(CHECK_CHUNK) {
            let c = &mut copy[..piece.len()];
            c.copy_from_slice(piece);
            apply_mask(c, key);
            self.utf8.feed(c).map_err(|_| WsError::InvalidUtf8)?;
        }
        Ok(())
    }

    /// The event for a whole frame whose (unmasked) payload is `payload`.
    fn finish<'a>(&'a mut self, h: Header, payload: &'a [u8]) -> Result<WsEvent<'a>, WsError> {
        // Text bytes already validated while the frame was incomplete.
        let checked = std::mem::take(&mut self.frame_checked).min(payload.len());
        let invalid = |_| WsError::InvalidUtf8;
        Ok(match h.opcode {
            Opcode::Ping => WsEvent::Ping(payload),
            Opcode::Pong => WsEvent::Pong(payload),
            Opcode::Close => parse_close(payload)?,
            Opcode::Text if h.fin => {
                if checked > 0 {
                    // Checked in pieces: finish the check, so the error is
                    // the same as for a frame that came at once.
                    self.utf8.feed(&payload[checked..]).map_err(invalid)?;
                    if !self.utf8.is_complete() {
                        return Err(WsError::InvalidUtf8);
                    }
                }
                WsEvent::Text(std::str::from_utf8(payload).map_err(|_| WsError::InvalidUtf8)?)
            }
            Opcode::Binary if h.fin => WsEvent::Binary(payload),
            Opcode::Text | Opcode::Binary => {
                self.in_progress = Some(h.opcode);
                if h.opcode == Opcode::Text {
                    self.utf8.feed(&payload[checked..]).map_err(invalid)?;
                }
                self.append(payload);
                WsEvent::Fragment
            }
            Opcode::Continuation => {
                if self.in_progress == Some(Opcode::Text) {
                    self.utf8.feed(&payload[checked..]).map_err(invalid)?;
                }
                self.append(payload);
                if !h.fin {
                    return Ok(WsEvent::Fragment);
                }
                let kind = self.in_progress.take();
                self.release = true;
                let this: &'a Decoder = self;
                if kind == Some(Opcode::Text) {
                    // A character cut off at the end of the last fragment.
                    if !this.utf8.is_complete() {
                        return Err(WsError::InvalidUtf8);
                    }
                    WsEvent::Text(std::str::from_utf8(&this.buf).map_err(|_| WsError::InvalidUtf8)?)
                } else {
                    WsEvent::Binary(&this.buf)
                }
            }
        })
    }

    /// Appends a fragment, growing the buffer no further than the limit.
    fn append(&mut self, data: &[u8]) {
        // parse_header checked that the message stays within the limit.
        let need = self.buf.len() + data.len();
        if need > self.buf.capacity() {
            let target = need.max(self.buf.capacity().saturating_mul(2)).max(MIN_REASSEMBLY_ALLOC);
            let target = target.min(self.max_message_bytes.max(need));
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(data);
    }
}

/// Decodes server→client frames into messages: the client end of
/// [`Decoder`], with the same rules (fragments, control frames, UTF-8 as it
/// arrives, close payloads, the message limit), except that frames must be
/// unmasked ([`WsError::Masked`] otherwise). For load generators, tests and
/// any Rust client of the server.
///
/// Nothing is unmasked, so `decode` reads the caller's bytes without
/// changing them.
#[derive(Debug)]
pub struct ClientDecoder(Decoder);

impl ClientDecoder {
    /// A decoder refusing messages (whole, after reassembly) longer than
    /// `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> ClientDecoder {
        ClientDecoder(Decoder::with_role(max_message_bytes, Role::Client))
    }

    /// Decodes the first frame in `buf`, as [`Decoder::decode`] does:
    /// `Ok(None)` to wait for more bytes (call again with the same frame at
    /// the front), `Ok(Some((event, consumed)))`, or a final error.
    pub fn decode<'a>(&'a mut self, buf: &'a [u8]) -> Result<Option<(WsEvent<'a>, usize)>, WsError> {
        let Some(h) = self.0.next_frame(buf)? else { return Ok(None) };
        debug_assert!(h.mask.is_none(), "parse_header refuses masked frames in the client role");
        let end = h.header_len + h.len;
        let event = self.0.finish(h, &buf[h.header_len..end])?;
        Ok(Some((event, end)))
    }

    /// True while a fragmented message is being reassembled.
    pub fn in_message(&self) -> bool {
        self.0.in_message()
    }

    /// True when no state is held between frames (see [`Decoder::is_idle`]).
    pub fn is_idle(&self) -> bool {
        self.0.is_idle()
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
        assert_eq!(std::mem::size_of::<ClientDecoder>(), std::mem::size_of::<Decoder>());
    }

    /// Feeds `wire` to `dec` `step` bytes per read, keeping what was not
    /// consumed, as the worker does. Returns how many bytes had been
    /// delivered when the first error came, or the events if none did.
    fn feed_in_steps(dec: &mut Decoder, wire: &[u8], step: usize) -> Result<Vec<Owned>, (WsError, usize)> {
        let (mut rbuf, mut out, mut delivered) = (Vec::new(), Vec::new(), 0);
        for chunk in wire.chunks(step) {
            rbuf.extend_from_slice(chunk);
            delivered += chunk.len();
            let before = rbuf.clone();
            let mut start = 0;
            loop {
                match dec.decode(&mut rbuf[start..]) {
                    Ok(Some((ev, n))) => {
                        out.extend(own(&ev));
                        start += n;
                    }
                    Ok(None) => break,
                    Err(e) => return Err((e, delivered)),
                }
            }
            assert_eq!(rbuf[start..], before[start..], "waiting for more bytes leaves them as they came");
            rbuf.drain(..start);
        }
        Ok(out)
    }

    /// Autobahn 6.4.3/6.4.4: one text frame whose payload is valid, then a
    /// code point above U+10FFFF (f4 90 80 80), then valid again. The error
    /// must come with the read that brings the byte that shows it (0x90),
    /// whatever the reads' sizes, not when the frame is whole.
    #[test]
    fn invalid_utf8_inside_one_frame_fails_at_the_first_bad_byte() {
        let part1 = "κόσμε".as_bytes();
        let payload = [part1, b"\xf4\x90\x80\x80", b"edited"].concat();
        let frame = client(0x81, &payload);
        let header = 6;
        // The first byte that cannot continue valid UTF-8: 0x90 after 0xf4.
        let bad = header + part1.len() + 1;
        for step in 1..=frame.len() {
            let (e, delivered) = feed_in_steps(&mut Decoder::new(MAX), &frame, step).unwrap_err();
            assert_eq!((e, e.close_code()), (WsError::InvalidUtf8, 1007), "step {step}");
            let expected = (bad / step + 1) * step;
            assert_eq!(delivered, expected.min(frame.len()), "step {step}: failed with the read that had byte {bad}");
        }
        // Likewise for a server frame read by a client.
        let (h, n) = frame_header(Opcode::Text, true, payload.len());
        let server = [&h[..n], &payload[..]].concat();
        let mut dec = ClientDecoder::new(MAX);
        assert_eq!(dec.decode(&server[..n + part1.len() + 1]), Ok(None), "valid so far");
        assert!(!dec.is_idle());
        assert_eq!(dec.decode(&server[..n + part1.len() + 2]), Err(WsError::InvalidUtf8));
    }

    #[test]
    fn a_character_split_across_reads_and_fragments_is_checked_where_it_completes() {
        // "é" = c3 a9 cut between fragments, and each fragment cut between
        // reads anywhere.
        let frames = [client(0x01, b"caf\xc3"), client(0x89, b"p"), client(0x80, b"\xa9 \xe2\x82\xac ok")].concat();
        for step in 1..=frames.len() {
            let got = feed_in_steps(&mut Decoder::new(MAX), &frames, step);
            assert_eq!(got, Ok(vec![Owned::Ping(b"p".to_vec()), Owned::Text("café € ok".into())]), "step {step}");
        }
        // The continuation breaks the character: refused with its first
        // payload byte, before the rest of that frame.
        let first = client(0x01, b"caf\xc3");
        let second = client(0x80, b"\x28 and much more text after it");
        let wire = [&first[..], &second[..]].concat();
        let bad = first.len() + 6;
        for step in 1..=wire.len() {
            let (e, delivered) = feed_in_steps(&mut Decoder::new(MAX), &wire, step).unwrap_err();
            assert_eq!(e, WsError::InvalidUtf8);
            assert_eq!(delivered, ((bad / step + 1) * step).min(wire.len()), "step {step}");
        }
        // A character cut off at the very end of the message, in pieces.
        let wire = [client(0x01, b"ok"), client(0x80, b"\xe2\x82")].concat();
        for step in 1..=wire.len() {
            let (e, delivered) = feed_in_steps(&mut Decoder::new(MAX), &wire, step).unwrap_err();
            assert_eq!((e, delivered), (WsError::InvalidUtf8, wire.len()), "refused once the message ends");
        }
    }

    #[test]
    fn a_partly_checked_frame_keeps_the_decoder_busy() {
        let mut dec = Decoder::new(MAX);
        assert!(dec.is_idle());
        let frame = client(0x81, b"hello");
        assert_eq!(dec.decode(&mut frame[..8].to_vec()), Ok(None));
        assert!(!dec.is_idle(), "two text bytes checked: keep the decoder");
        let mut whole = frame.clone();
        assert_eq!(dec.decode(&mut whole), Ok(Some((WsEvent::Text("hello"), frame.len()))));
        assert!(dec.is_idle());
        // A binary frame in pieces needs no state; a fragment does.
        assert_eq!(dec.decode(&mut client(0x82, b"data")[..8].to_vec()), Ok(None));
        assert!(dec.is_idle());
        let mut frag = client(0x02, b"da");
        assert_eq!(dec.decode(&mut frag).map(|o| o.map(|(e, _)| own(&e))), Ok(Some(None)));
        assert!(!dec.is_idle() && dec.in_message());
    }

    #[test]
    fn client_decoder_reads_server_frames() {
        let (h1, n1) = frame_header(Opcode::Text, false, 3);
        let (h2, n2) = frame_header(Opcode::Continuation, true, 3);
        let wire = [
            text_frame("héllo"),
            binary_frame(&[0, 255]),
            [&h1[..n1], b"abc"].concat(),
            ping_frame(b"p"),
            [&h2[..n2], b"def"].concat(),
            pong_frame(b""),
            binary_frame(&[7; 70_000]),
            close_frame(4003, "kicked"),
        ]
        .concat();
        let expect = vec![
            Owned::Text("héllo".into()),
            Owned::Binary(vec![0, 255]),
            Owned::Ping(b"p".to_vec()),
            Owned::Text("abcdef".into()),
            Owned::Pong(Vec::new()),
            Owned::Binary(vec![7; 70_000]),
            Owned::Close(Some(4003), "kicked".into()),
        ];
        for step in [1, 2, 3, 7, 100, 4096, wire.len()] {
            let mut dec = ClientDecoder::new(MAX * 2);
            let (mut rbuf, mut got) = (Vec::new(), Vec::new());
            for chunk in wire.chunks(step) {
                rbuf.extend_from_slice(chunk);
                let mut start = 0;
                while let Some((ev, n)) = dec.decode(&rbuf[start..]).unwrap() {
                    got.extend(own(&ev));
                    start += n;
                }
                rbuf.drain(..start);
            }
            assert_eq!(got, expect, "step {step}");
            assert!(dec.is_idle() && !dec.in_message());
        }
    }

    #[test]
    fn client_decoder_refuses_what_a_server_must_not_send() {
        let e = ClientDecoder::new(MAX).decode(&mask(&text_frame("hi"), [1, 2, 3, 4])).unwrap_err();
        assert_eq!((e, e.close_code()), (WsError::Masked, 1002));
        assert_eq!(ClientDecoder::new(MAX).decode(&[0x81, 0x80]), Err(WsError::Masked), "from byte 1");
        assert_eq!(ClientDecoder::new(MAX).decode(&[0xc1, 0]), Err(WsError::ReservedBits(4)));
        assert_eq!(ClientDecoder::new(MAX).decode(&[0x82, 0x7e, 0, 5]), Err(WsError::NonMinimalLength { len: 5 }));
        assert_eq!(ClientDecoder::new(MAX).decode(&text_frame("\u{1F600}")[..4]), Ok(None));
        assert_eq!(ClientDecoder::new(MAX).decode(b"\x81\x02\xc3\x28"), Err(WsError::InvalidUtf8));
        assert_eq!(ClientDecoder::new(MAX).decode(b"\x88\x02\x03\xed"), Err(WsError::InvalidCloseCode(1005)));
        let e = ClientDecoder::new(10).decode(&binary_frame(&[0; 11])).unwrap_err();
        assert_eq!(e, WsError::MessageTooBig { len: 11, max: 10 });
        // A masked server decoder and an unmasked client one agree on every
        // frame the encoder writes.
        for f in [text_frame("x"), binary_frame(&[1; 300]), ping_frame(b"12"), close_frame(1000, "")] {
            let mut masked = mask(&f, [9, 8, 7, 6]);
            let server = Decoder::new(MAX).decode(&mut masked).unwrap().map(|(e, n)| (own(&e), n - 4));
            let client = ClientDecoder::new(MAX).decode(&f).unwrap().map(|(e, n)| (own(&e), n));
            assert_eq!(server, client);
        }
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
        fn text_in_pieces_fails_exactly_when_std_says_the_prefix_is_invalid(
            payload in proptest::collection::vec(prop_oneof![
                3 => 0x20u8..0x7f, 2 => 0x80u8..0xc0, 2 => 0xc2u8..0xf5, 1 => any::<u8>(),
            ], 0..120),
            key in any::<[u8; 4]>(),
            step in 1usize..20,
        ) {
            let (h, n) = frame_header(Opcode::Text, true, payload.len());
            let frame = mask(&[&h[..n], &payload[..]].concat(), key);
            let header = n + 4;
            let valid_prefix = |b: &[u8]| match std::str::from_utf8(b) {
                Ok(_) => true,
                Err(e) => e.error_len().is_none(),
            };
            match feed_in_steps(&mut Decoder::new(MAX), &frame, step) {
                Ok(events) => {
                    prop_assert!(std::str::from_utf8(&payload).is_ok());
                    prop_assert_eq!(events, vec![Owned::Text(String::from_utf8(payload.clone()).unwrap())]);
                }
                Err((e, delivered)) => {
                    prop_assert_eq!(e, WsError::InvalidUtf8);
                    let seen = delivered.saturating_sub(header).min(payload.len());
                    let previous_read = (delivered - 1) / step * step;
                    let before = previous_read.saturating_sub(header).min(payload.len());
                    // Refused by the first read after which the payload so
                    // far can no longer be valid (or at the end, for a
                    // character cut off there).
                    prop_assert!(valid_prefix(&payload[..before]));
                    prop_assert!(!valid_prefix(&payload[..seen]) || (delivered == frame.len()));
                }
            }
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
        fn arbitrary_bytes_never_panic_the_client_decoder(
            b in proptest::collection::vec(any::<u8>(), 0..2048),
            step in 1usize..64,
            max in 0usize..4096,
        ) {
            let mut dec = ClientDecoder::new(max);
            let mut rbuf = Vec::new();
            'feed: for chunk in b.chunks(step) {
                rbuf.extend_from_slice(chunk);
                let mut start = 0;
                loop {
                    match dec.decode(&rbuf[start..]) {
                        Ok(Some((_, n))) => {
                            prop_assert!(n > 0 && start + n <= rbuf.len());
                            start += n;
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                rbuf.drain(..start);
            }
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
