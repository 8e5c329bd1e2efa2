//! The HTTP/1.1 upgrade request (RFC 6455 §4.2) and the responses.
//!
//! Owns: validating what the RFC requires of an upgrade request, reading
//! the `user`/`token` query parameters, the accept key, protocol choice,
//! the Origin allow list, and the bytes of every response the server writes
//! before the connection is a WebSocket.
//! Must not: parse HTTP itself (the head, header lookups, query decoding
//! and response layout are `proto::http`, shared with the admin API), do
//! I/O, or decide policy (which origins, which protocols: the server passes
//! them in).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest, Sha1};
use thiserror::Error;

use crate::proto::frame::{Frame, MAX_USER_ID_BYTES};
use crate::proto::http::{self, DuplicateHeader, HeadError, RequestHead};

/// Appended to the client's key before hashing (RFC 6455 §1.3).
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The only `Sec-WebSocket-Version` spoken.
pub const VERSION: &str = "13";
// Header fields parsed per request (431 beyond): the HTTP parser's limit.
pub use crate::proto::http::MAX_HEADERS;
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
            (Some(user), Some(token)) => {
                Some(Frame::Login { user, token: token.as_bytes(), device: None, last_seq: 0 })
            }
            _ => None,
        }
    }
}

/// Why a request head is refused. Each maps to an HTTP status
/// ([`HandshakeError::status`]) and a whole response
/// ([`HandshakeError::response`]).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// Not an acceptable HTTP request head (431 or 400).
    #[error(transparent)]
    Head(#[from] HeadError),
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
            HandshakeError::Head(e) => e.status(),
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

impl From<DuplicateHeader> for HandshakeError {
    fn from(d: DuplicateHeader) -> HandshakeError {
        HandshakeError::DuplicateHeader(d.0)
    }
}

/// Reads `user` and `token` from a query string; other parameters are
/// ignored. A repeated `user` or `token` is refused rather than guessed.
fn parse_query(query: &str) -> Result<(Option<String>, Option<String>), HandshakeError> {
    let (mut user, mut token) = (None, None);
    for (k, v) in http::query_pairs(query) {
        let (slot, name) = match k {
            "user" => (&mut user, "user"),
            "token" => (&mut token, "token"),
            _ => continue,
        };
        if slot.is_some() {
            return Err(HandshakeError::BadQuery(name));
        }
        *slot = Some(http::percent_decode(v).map_err(|_| HandshakeError::BadQuery(name))?);
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
    let Some(head) = RequestHead::parse(buf, max_head)? else { return Ok(None) };
    let method = head.method();
    if method != "GET" {
        let method = method.chars().take(MAX_METHOD_IN_ERROR).collect();
        return Err(HandshakeError::MethodNotAllowed { method });
    }
    let path = head.path();
    if head.values("Upgrade").next().is_none() {
        return Err(HandshakeError::NotUpgrade { path: path.to_owned() });
    }
    if head.version() != 1 {
        return Err(HandshakeError::HttpVersion(head.version()));
    }
    if !head.has_token("Upgrade", "websocket") {
        return Err(HandshakeError::NotWebSocket);
    }
    if !head.has_token("Connection", "upgrade") {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    let mut versions = head.values("Sec-WebSocket-Version");
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.trim_ascii() == VERSION.as_bytes() => {}
        _ => return Err(HandshakeError::UnsupportedVersion),
    }
    let key = head.single("Sec-WebSocket-Key")?.ok_or(HandshakeError::MissingKey)?.trim_ascii();
    if key.len() != KEY_CHARS || STANDARD.decode(key).ok().map(|k| k.len()) != Some(KEY_BYTES) {
        return Err(HandshakeError::BadKey);
    }
    // Base64 is ASCII.
    let key = utf8(key, "Sec-WebSocket-Key")?.to_owned();
    // RFC 6455 §4.2.1 item 2 and HTTP/1.1: exactly one Host. Its value
    // is not compared with our address (behind a proxy it names the
    // proxy's).
    if head.single("Host")?.is_none() {
        return Err(HandshakeError::MissingHost);
    }
    let origin = match head.single("Origin")? {
        Some(v) => Some(utf8(v, "Origin")?.trim().to_owned()),
        None => None,
    };
    let mut protocols = Vec::new();
    let mut protocol_token = None;
    for v in head.values("Sec-WebSocket-Protocol") {
        let v = utf8(v, "Sec-WebSocket-Protocol")?;
        for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.strip_prefix(TOKEN_PROTOCOL_PREFIX) {
                Some(_) if protocol_token.is_some() => return Err(HandshakeError::TwoTokens),
                Some(t) => protocol_token = Some(t.to_owned()),
                None => protocols.push(p.to_owned()),
            }
        }
    }
    let (user, mut token) = parse_query(head.query())?;
    if let Some(t) = protocol_token {
        if token.is_some() {
            // Which one was meant would be a guess: refuse.
            return Err(HandshakeError::TwoTokens);
        }
        token = Some(t);
    }
    Ok(Some((Handshake { path: path.to_owned(), user, token, origin, protocols, key }, head.len())))
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
/// any method of RFC 9110 (and PATCH, and HTTP/2's preface `PRI`; `None`:
/// too few bytes to tell). Used where HTTP does not belong, to say which
/// port serves it. None of them can start a raw frame the server takes:
/// its first byte would make the length over 16 MiB.
pub fn looks_like_http_request(first_bytes: &[u8]) -> Option<bool> {
    const METHODS: [&[u8]; 10] =
        [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ", b"PRI "];
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
    http::push_header(&mut r, "Sec-WebSocket-Accept", accept);
    if let Some(p) = protocol {
        http::push_header(&mut r, "Sec-WebSocket-Protocol", p);
    }
    r.push_str("\r\n");
    r.into_bytes()
}

// The reason phrases of the statuses the server sends.
pub use crate::proto::http::status_phrase;

/// A response with a body that closes the connection: the status line
/// with the standard phrase ([`status_phrase`]), `extra_headers`, and
/// `reason` plus a newline as a plain-text body. E.g. 400, 403 for an
/// Origin that [`origin_allowed`] refuses, 426 with
/// `Sec-WebSocket-Version: 13`.
pub fn response_error(status: u16, reason: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut body = String::with_capacity(reason.len() + 1);
    body.push_str(reason);
    body.push('\n');
    http::response(status, "text/plain; charset=utf-8", body.as_bytes(), extra_headers, true)
}

/// A 200 response with a body (the demo page, for a
/// [`HandshakeError::NotUpgrade`] request), then close.
pub fn response_200(content_type: &str, body: &[u8]) -> Vec<u8> {
    http::response(200, content_type, body, &[], true)
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
        assert_eq!(err, HandshakeError::Head(HeadError::TooLarge { max: 100 }));
        assert_eq!(err.status(), 431);
        // Complete but longer than the limit.
        let max = req.len() - 1;
        assert_eq!(parse_request(&req, max), Err(HandshakeError::Head(HeadError::TooLarge { max })));
        let many: Vec<String> = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: y")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = parse_request(&request(&many), 1 << 20).unwrap_err();
        assert_eq!((err.clone(), err.status()), (HandshakeError::Head(HeadError::TooManyHeaders), 431));
    }

    #[test]
    fn query_parameters_are_percent_decoded() {
        let (hs, _) = parse(&request(&good())).unwrap().unwrap();
        assert_eq!((hs.path.as_str(), hs.user.as_deref(), hs.token.as_deref()), ("/ws", Some("alice"), Some("a.b.c")));
        assert_eq!(hs.login(), Some(Frame::Login { user: "alice", token: b"a.b.c", device: None, last_seq: 0 }));
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
        assert_eq!(hs.login(), Some(Frame::Login { user: "alice", token: b"x.y-z_", device: None, last_seq: 0 }));
        // Only a token offered: no protocol left, so the default applies.
        let hs = with("/?user=alice", &["Sec-WebSocket-Protocol: switchboard.token.t"]).unwrap().unwrap();
        assert!(hs.protocols.is_empty());
        assert_eq!(hs.login(), Some(Frame::Login { user: "alice", token: b"t", device: None, last_seq: 0 }));
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
        assert!(matches!(parse(b"GET / HTTP/2.0\r\n\r\n"), Err(HandshakeError::Head(HeadError::Malformed(_)))));
        assert!(matches!(parse(b"\x00\x00\x00\x05\x01\x01"), Err(HandshakeError::Head(HeadError::Malformed(_)))));
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
