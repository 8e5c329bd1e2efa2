//! How one server frame goes out on each transport.
//!
//! Owns: turning a server frame, encoded once in the raw v1 form (the form
//! every delivery path and fan-out shares), into the bytes a connection of
//! a given transport receives: the raw frame itself; a WebSocket binary
//! message carrying it; a WebSocket text message with its JSON form; or,
//! before a WebSocket handshake completed, the HTTP response that ends the
//! request. PING becomes a WebSocket ping and CLOSE a WebSocket close frame
//! with the same code and reason, so heartbeats and closes work with any
//! WebSocket client, browsers included.
//! Must not: do I/O or keep state. One encoded frame per raw frame, always,
//! so a queue can keep them one to one.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{decode, Frame, FrameType};
use super::json::encode_json;
use super::ws::{self, handshake, Opcode};

/// The transport of one connection, as its writers see it.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum Wire {
    /// Raw TCP, protocol v1 frames.
    #[default]
    Raw = 0,
    /// A WebSocket handshake is in progress: only the HTTP response that
    /// ends it (an error) can be sent.
    Http = 1,
    /// WebSocket, subprotocol `switchboard.v1.bin`: each frame in a binary
    /// message.
    WsBinary = 2,
    /// WebSocket, subprotocol `switchboard.v1.json` (the default): each
    /// frame as JSON in a text message.
    WsJson = 3,
}

/// The subprotocol for binary messages.
pub const SUBPROTOCOL_BINARY: &str = "switchboard.v1.bin";
/// The subprotocol for JSON text messages (also used when a client offers
/// none).
pub const SUBPROTOCOL_JSON: &str = "switchboard.v1.json";
/// Subprotocols this server speaks, in its order of preference.
pub const SUBPROTOCOLS: [&str; 2] = [SUBPROTOCOL_JSON, SUBPROTOCOL_BINARY];

/// Largest WebSocket message a connection may send before it has logged
/// in: a login in either form with the longest user id, token and device id
/// (JSON: at most 255 × 6 bytes of escaped user id + 4,096 of token + 64 × 6
/// of escaped device id + `last_seq` and the keys, about 6.1 KiB; binary: one
/// LOGIN frame, 4,433 bytes). A connection that has not logged in can make
/// the server buffer at most this much (plus the frame header), whatever
/// `websocket.max_message_bytes` is.
pub const MAX_LOGIN_MESSAGE_BYTES: usize = 8192;
const _: () = assert!(MAX_LOGIN_MESSAGE_BYTES >= super::frame::MAX_LOGIN_FRAME_BYTES);
const _: () = assert!(
    MAX_LOGIN_MESSAGE_BYTES
        >= 6 * super::frame::MAX_USER_ID_BYTES
            + super::frame::MAX_LOGIN_TOKEN_BYTES
            + 6 * super::frame::MAX_DEVICE_ID_BYTES
            + 192
);

/// WebSocket close code sent after a LOGIN_ERROR (RFC 6455 §7.4.1, policy
/// violation): a browser reports 1006 when the TCP connection ends without
/// a close frame, which would hide why.
pub const WS_LOGIN_FAILED: u16 = 1008;

impl Wire {
    /// The wire for a negotiated subprotocol (`None`: none offered).
    pub fn for_subprotocol(p: Option<&str>) -> Wire {
        match p {
            Some(SUBPROTOCOL_BINARY) => Wire::WsBinary,
            _ => Wire::WsJson,
        }
    }

    /// True for the two WebSocket forms.
    pub fn is_websocket(self) -> bool {
        matches!(self, Wire::WsBinary | Wire::WsJson)
    }

    /// Encodes `raw` (one whole v1 server frame) for this wire. Frames with
    /// nothing to send on it (anything but the final CLOSE or LOGIN_ERROR on
    /// `Http`) give an empty `Bytes`, which queues ignore.
    pub fn encode(self, raw: &Bytes) -> Bytes {
        if self == Wire::Raw {
            return raw.clone();
        }
        let frame = match decode(raw, usize::MAX) {
            Ok(Some((frame, _))) => frame,
            _ => {
                debug_assert!(false, "wire::encode takes whole, valid frames");
                return Bytes::new();
            }
        };
        match self {
            Wire::Raw => unreachable!("handled above"),
            Wire::Http => http_final(&frame),
            Wire::WsBinary | Wire::WsJson => self.websocket(raw, &frame),
        }
    }

    fn websocket(self, raw: &Bytes, frame: &Frame<'_>) -> Bytes {
        match *frame {
            Frame::Ping { .. } => Bytes::from_static(&ws::PING_EMPTY),
            Frame::Close { code, reason } => Bytes::from(ws::close_frame(code, reason)),
            Frame::LoginError { reason, .. } => {
                let mut out = BytesMut::new();
                self.message(raw, frame, &mut out);
                out.put_slice(&ws::close_frame(WS_LOGIN_FAILED, reason));
                out.freeze()
            }
            _ => {
                let mut out = BytesMut::new();
                self.message(raw, frame, &mut out);
                out.freeze()
            }
        }
    }

    /// One data message: the raw frame in a binary message, or its JSON in
    /// a text message.
    fn message(self, raw: &Bytes, frame: &Frame<'_>, out: &mut BytesMut) {
        let json;
        let (opcode, body) = match self {
            Wire::WsBinary => (Opcode::Binary, &raw[..]),
            _ => match encode_json(frame) {
                Some(text) => {
                    json = text;
                    (Opcode::Text, json.as_bytes())
                }
                None => {
                    debug_assert!(false, "every server frame but PING and CLOSE has a JSON form");
                    (Opcode::Binary, &raw[..])
                }
            },
        };
        let (header, n) = ws::frame_header(opcode, true, body.len());
        out.reserve(n + body.len());
        out.put_slice(&header[..n]);
        out.put_slice(body);
    }
}

/// The response that ends an HTTP request still waiting for its upgrade:
/// the CLOSE's code mapped to a status, the reason as the body. A head cut
/// off by either timer (the login deadline, or the message timeout that
/// times an unfinished head as it times an unfinished frame) is 408; one
/// closed to free the worker's budget for incomplete frames (1013), like
/// a server going away or full, is 503: neither says the request was
/// malformed, which is what 400 tells a client.
fn http_final(frame: &Frame<'_>) -> Bytes {
    use super::codes::CloseCode;
    let Frame::Close { code, reason } = *frame else { return Bytes::new() };
    let status = match CloseCode::from_u16(code) {
        Some(CloseCode::LoginTimeout) | Some(CloseCode::PolicyViolation) => 408,
        Some(CloseCode::GoingAway) | Some(CloseCode::ServerFull) | Some(CloseCode::TryAgainLater) => 503,
        _ => 400,
    };
    Bytes::from(handshake::response_error(status, reason, &[]))
}

/// The frame type of a raw v1 frame (its sixth byte), if it is one.
pub fn frame_type(raw: &[u8]) -> Option<FrameType> {
    raw.get(5).copied().and_then(FrameType::from_u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codes::CloseCode;
    use crate::proto::ws::{ClientDecoder, WsEvent};

    /// Decodes what the server sent as a client does.
    fn client_view(bytes: Vec<u8>) -> Vec<String> {
        let mut d = ClientDecoder::new(1 << 20);
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let (ev, n) = d.decode(&bytes[at..]).unwrap().expect("whole frames");
            out.push(match ev {
                WsEvent::Text(s) => format!("text {s}"),
                WsEvent::Binary(b) => format!("binary {}", b.len()),
                WsEvent::Ping(p) => format!("ping {}", p.len()),
                WsEvent::Close { code, reason } => format!("close {code:?} {reason}"),
                other => format!("{other:?}"),
            });
            at += n;
        }
        out
    }

    #[test]
    fn raw_is_unchanged_and_shares_the_buffer() {
        let raw = Frame::Push { msg_id: 1, from: "a", payload: b"hi" }.to_bytes().unwrap();
        let enc = Wire::Raw.encode(&raw);
        assert_eq!(enc.as_ptr(), raw.as_ptr());
    }

    #[test]
    fn websocket_forms() {
        let raw = Frame::Push { msg_id: 7, from: "alice", payload: b"hi" }.to_bytes().unwrap();
        assert_eq!(client_view(Wire::WsBinary.encode(&raw).to_vec()), vec![format!("binary {}", raw.len())]);
        assert_eq!(
            client_view(Wire::WsJson.encode(&raw).to_vec()),
            vec![r#"text {"type":"push","msg_id":"7","from":"alice","payload":"hi"}"#.to_string()]
        );
        let ping = Bytes::from_static(&crate::proto::frame::PING_EMPTY);
        assert_eq!(client_view(Wire::WsJson.encode(&ping).to_vec()), vec!["ping 0"]);
        let close = Frame::Close { code: CloseCode::Kicked as u16, reason: "kicked" }.to_bytes().unwrap();
        assert_eq!(client_view(Wire::WsBinary.encode(&close).to_vec()), vec!["close Some(4003) kicked"]);
    }

    #[test]
    fn login_error_is_followed_by_a_close_frame() {
        let raw = Frame::LoginError { code: 2, reason: "bad signature" }.to_bytes().unwrap();
        let seen = client_view(Wire::WsJson.encode(&raw).to_vec());
        assert_eq!(seen.len(), 2);
        assert!(seen[0].starts_with(r#"text {"type":"login_error","code":2"#), "{seen:?}");
        assert_eq!(seen[1], "close Some(1008) bad signature");
    }

    #[test]
    fn http_gets_a_status_for_the_close_only() {
        let close = Frame::Close { code: CloseCode::LoginTimeout as u16, reason: "login timeout" }.to_bytes().unwrap();
        let r = Wire::Http.encode(&close);
        assert!(r.starts_with(b"HTTP/1.1 408 Request Timeout\r\n"), "{:?}", String::from_utf8_lossy(&r));
        for (code, status) in [
            (CloseCode::PolicyViolation, &b"HTTP/1.1 408 Request Timeout\r\n"[..]),
            (CloseCode::TryAgainLater, b"HTTP/1.1 503 Service Unavailable\r\n"),
            (CloseCode::ProtocolError, b"HTTP/1.1 400 Bad Request\r\n"),
        ] {
            let close = Frame::Close { code: code as u16, reason: "why" }.to_bytes().unwrap();
            let r = Wire::Http.encode(&close);
            assert!(r.starts_with(status), "{code:?}: {:?}", String::from_utf8_lossy(&r));
        }
        let ping = Bytes::from_static(&crate::proto::frame::PING_EMPTY);
        assert!(Wire::Http.encode(&ping).is_empty());
    }
}
