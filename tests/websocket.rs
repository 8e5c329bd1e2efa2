//! WebSocket conformance (RFC 6455), grouped like the Autobahn test-suite
//! categories: handshake, framing (1.x), pings and pongs (2.x), reserved
//! bits (3.x), opcodes (4.x), fragmentation (5.x), UTF-8 (6.x), closing
//! (7.x), limits (9.x-like), then this server's own protocol on top
//! (subprotocols, login, routing between raw TCP and WebSocket, sniffing).
//!
//! Every test talks over a plain `std::net::TcpStream`: the upgrade request
//! is written by hand and client frames are built and masked here, so what
//! the server receives does not depend on its WebSocket codec. Server frames
//! are read with the library's client-end decoder (`ClientDecoder`), which
//! refuses what RFC 6455 forbids a server to send (a mask, RSV bits, a
//! non-minimal length, a long or fragmented control frame, invalid UTF-8 or
//! close codes); on top, these tests require what this server promises: it
//! never fragments. The raw protocol v1 codec is shared too, to build and
//! read what a binary message carries. Every test asserts an exact close
//! code or reply.
//!
//! Not covered: "idle WebSocket connections hold no read buffer" — the
//! server keeps no buffer for an idle connection by construction
//! (`Conn::partial`/`Conn::ws` are `None` between frames), but `Stats` has
//! no counter of buffered bytes to observe it from outside.

mod common;
use common::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard::config::{Config, DemoPage};
use switchboard::proto::frame::{decode, Frame, RoomOp, PROTOCOL_MAX_FRAME_BYTES};
use switchboard::proto::ws::{ClientDecoder, WsEvent};
use switchboard::{JwtHs256, Server};

/// The key and accept value of RFC 6455 §1.3's example.
const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

const BIN: &str = "switchboard.v1.bin";
const JSON: &str = "switchboard.v1.json";

/// Read and write timeout of every socket: nothing here waits longer.
const IO_TIMEOUT: Duration = Duration::from_secs(8);

// ---- setup ----------------------------------------------------------------------

/// `common::config()` with a WebSocket port; frames large enough that a
/// 64 KiB SEND to oneself comes back as a (slightly longer) PUSH.
fn ws_config() -> Config {
    let mut c = config();
    c.websocket.listen = "127.0.0.1:0".into();
    c.limits.max_frame_bytes = 128 * 1024;
    c.limits.outbound_max_bytes = 1 << 20;
    c
}

fn start_ws(cfg: Config) -> (Server, SocketAddr) {
    let s = start(cfg);
    let a = s.ws_addr().expect("websocket.listen is set");
    (s, a)
}

/// Every connection the server saw is released (the linger after a close
/// is 500 ms) and nobody is left in the directory: no error or close path
/// leaks a slot.
fn assert_all_released(s: &Server) {
    let h = s.handle();
    let done = wait_until(Duration::from_secs(5), || h.connection_count() == 0 && h.user_count() == 0);
    assert!(done, "{} connections, {} users left", h.connection_count(), h.user_count());
    assert_eq!(h.logged_in_count(), 0);
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe)
}

// ---- client frames, by hand -------------------------------------------------------

/// A different masking key for every frame (xorshift), as RFC 6455 §5.3 asks.
fn next_mask() -> [u8; 4] {
    static STATE: AtomicU32 = AtomicU32::new(0x3779_B97F);
    let mut x = STATE.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    STATE.store(x, Ordering::Relaxed);
    x.to_be_bytes()
}

/// A client frame: `b0` is FIN, RSV and opcode exactly as sent; the payload
/// masked with `mask` (`None`: unmasked, which a server must refuse).
fn frame_with(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(b0);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(m | n as u8),
        n @ 126..=65535 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked frame with no RSV bits.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_with(((fin as u8) << 7) | opcode, payload, Some(next_mask()))
}

fn text(s: &str) -> Vec<u8> {
    frame(true, OP_TEXT, s.as_bytes())
}

fn binary(b: &[u8]) -> Vec<u8> {
    frame(true, OP_BINARY, b)
}

fn ping(b: &[u8]) -> Vec<u8> {
    frame(true, OP_PING, b)
}

fn close(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    frame(true, OP_CLOSE, &p)
}

/// `json` padded with trailing spaces (still valid JSON) to `total` bytes.
fn padded(json: &str, total: usize) -> String {
    assert!(json.len() <= total, "{json} is longer than {total}");
    format!("{json}{}", " ".repeat(total - json.len()))
}

fn json_ping(data: &str) -> String {
    json!({"type": "ping", "data": data}).to_string()
}

// ---- server frames ----------------------------------------------------------------

/// What the server sent, one frame at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// Code (`None`: empty payload) and reason.
    Close(Option<u16>, String),
    /// The server closed the TCP connection (FIN or reset).
    Eof,
}

/// Decodes one server frame from the start of `buf` (`None`: not all
/// there yet), failing the test on anything RFC 6455 forbids a server to
/// send and on a fragment (this server never fragments).
fn parse_server_frame(dec: &mut ClientDecoder, buf: &[u8]) -> Option<(Ev, usize)> {
    let (ev, n) = match dec.decode(buf) {
        Ok(Some(x)) => x,
        Ok(None) => return None,
        Err(e) => panic!("the server sent a frame a client must refuse: {e}"),
    };
    let ev = match ev {
        WsEvent::Text(t) => Ev::Text(t.to_string()),
        WsEvent::Binary(b) => Ev::Binary(b.to_vec()),
        WsEvent::Ping(p) => Ev::Ping(p.to_vec()),
        WsEvent::Pong(p) => Ev::Pong(p.to_vec()),
        WsEvent::Close { code, reason } => Ev::Close(code, reason.to_string()),
        WsEvent::Fragment => panic!("the server fragmented a message"),
    };
    Some((ev, n))
}

/// An HTTP response head.
#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads bytes until `buf` holds a whole response head; parses it and leaves
/// what follows in `buf`.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Head {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => panic!("EOF before a whole response head: {:?}", String::from_utf8_lossy(buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("reading the response head: {e}; got {:?}", String::from_utf8_lossy(buf)),
        }
    };
    let head = String::from_utf8(buf[..end].to_vec()).expect("response head is ASCII");
    buf.drain(..end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().and_then(|s| s.parse().ok()).expect("status code");
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("bad header line {l:?}"));
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Head { status, headers }
}

/// A whole HTTP response the server ended by closing.
#[derive(Debug)]
struct Response {
    head: Head,
    body: Vec<u8>,
}

impl Response {
    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads a response to its end: the body is `Content-Length` bytes and then
/// the server closes (every response but the 101 says `Connection: close`).
fn read_response(s: &mut TcpStream) -> Response {
    let mut buf = Vec::new();
    let head = read_head(s, &mut buf);
    loop {
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_reset(&e) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("reading the response body: {e} (status {})", head.status),
        }
    }
    let len: usize = head.header("Content-Length").expect("Content-Length").parse().unwrap();
    assert_eq!(buf.len(), len, "body length vs Content-Length");
    assert!(head.header("Connection").is_some_and(|v| v.to_ascii_lowercase().contains("close")), "{head:?}");
    Response { head, body: buf }
}

/// Sends `request` on a new connection and reads the response to the close.
fn http(addr: SocketAddr, request: impl AsRef<[u8]>) -> Response {
    let mut s = tcp(addr);
    s.write_all(request.as_ref()).unwrap();
    read_response(&mut s)
}

/// An upgrade request for `path` with the standard headers and `extra`.
fn upgrade(path: &str, extra: &[&str]) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {RFC_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in extra {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

/// A request built from a request line and whole header lines.
fn request(line: &str, headers: &[&str]) -> String {
    let mut r = format!("{line}\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

const STD_HEADERS: [&str; 5] = [
    "Host: localhost",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
];

/// The standard headers without the one starting with `drop`, plus `extra`.
fn headers_without<'a>(drop: &str, extra: &[&'a str]) -> Vec<&'a str> {
    STD_HEADERS.iter().copied().filter(|h| !h.starts_with(drop)).chain(extra.iter().copied()).collect()
}

/// One WebSocket client connection.
struct Ws {
    s: TcpStream,
    buf: Vec<u8>,
    dec: ClientDecoder,
}

impl Ws {
    /// A connection past its 101; `buf` holds what was read after it.
    fn new(s: TcpStream, buf: Vec<u8>) -> Ws {
        Ws { s, buf, dec: ClientDecoder::new(PROTOCOL_MAX_FRAME_BYTES * 2) }
    }

    /// Sends `request` and expects a 101 completing it (RFC accept key).
    fn handshake(addr: SocketAddr, request: &str) -> (Ws, Head) {
        let mut s = tcp(addr);
        s.write_all(request.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let head = read_head(&mut s, &mut buf);
        assert_eq!(head.status, 101, "{head:?}: {:?}", String::from_utf8_lossy(&buf));
        assert_eq!(head.header("Upgrade").map(str::to_ascii_lowercase).as_deref(), Some("websocket"));
        assert_eq!(head.header("Connection").map(str::to_ascii_lowercase).as_deref(), Some("upgrade"));
        assert_eq!(head.header("Sec-WebSocket-Accept"), Some(RFC_ACCEPT));
        (Ws::new(s, buf), head)
    }

    /// Upgrades `path` with the standard headers and `extra`.
    fn open(addr: SocketAddr, path: &str, extra: &[&str]) -> (Ws, Head) {
        Ws::handshake(addr, &upgrade(path, extra))
    }

    /// A connection that has not logged in (JSON subprotocol).
    fn anon(addr: SocketAddr) -> Ws {
        Ws::open(addr, "/ws", &[]).0
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to the server");
    }

    /// Sends a text message in one frame.
    fn send_text(&mut self, s: &str) {
        self.send(&text(s));
    }

    /// The next server frame, or `Eof`.
    fn recv(&mut self) -> Ev {
        loop {
            if let Some((ev, n)) = parse_server_frame(&mut self.dec, &self.buf) {
                self.buf.drain(..n);
                return ev;
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match self.s.read(&mut chunk) {
                Ok(0) => {
                    assert!(self.buf.is_empty(), "EOF inside a server frame ({} bytes)", self.buf.len());
                    return Ev::Eof;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_reset(&e) => return Ev::Eof,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("reading from the server: {e} (timeout: nothing came)"),
            }
        }
    }

    fn expect(&mut self, want: Ev) {
        assert_eq!(self.recv(), want);
    }

    /// The next frame is a close with `code`, then the server closes TCP.
    /// Returns the reason.
    fn expect_close(&mut self, code: u16) -> String {
        let reason = match self.recv() {
            Ev::Close(Some(c), reason) => {
                assert_eq!(c, code, "close code (reason {reason:?})");
                reason
            }
            other => panic!("expected close {code}, got {other:?}"),
        };
        self.expect_eof();
        reason
    }

    /// The server closes the TCP connection with nothing more sent.
    fn expect_eof(&mut self) {
        assert_eq!(self.recv(), Ev::Eof);
    }

    /// The next frame is a text message holding JSON.
    fn json(&mut self) -> Value {
        match self.recv() {
            Ev::Text(t) => serde_json::from_str(&t).unwrap_or_else(|e| panic!("server text {t:?} is not JSON: {e}")),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The next frame is a binary message holding one raw frame, returned
    /// as its bytes (decode with [`raw`]).
    fn raw(&mut self) -> Vec<u8> {
        match self.recv() {
            Ev::Binary(b) => b,
            other => panic!("expected a binary message, got {other:?}"),
        }
    }

    /// Sends a JSON ping and expects its pong: everything sent before it has
    /// been handled, and nothing else was queued before the pong.
    fn sync(&mut self, tag: &str) {
        self.send_text(&json_ping(tag));
        assert_eq!(self.json(), json!({"type": "pong", "data": tag}));
    }
}

/// Decodes exactly one raw v1 frame.
fn raw(b: &[u8]) -> Frame<'_> {
    let (f, n) = decode(b, PROTOCOL_MAX_FRAME_BYTES).expect("valid raw frame").expect("whole raw frame");
    assert_eq!(n, b.len(), "a binary message holds exactly one raw frame");
    f
}

fn query_path(user: &str) -> String {
    format!("/ws?user={user}&token={}", token(user))
}

/// A JSON connection logged in by the query string.
fn ws_login(addr: SocketAddr, user: &str) -> Ws {
    let (mut ws, head) = Ws::open(addr, &query_path(user), &[]);
    assert_eq!(head.header("Sec-WebSocket-Protocol"), None, "no protocol offered, none chosen");
    let ok = ws.json();
    assert_eq!(ok["type"], "login_ok", "{ok}");
    ws
}

/// A binary-subprotocol connection logged in by a raw LOGIN in a binary
/// message.
fn ws_login_bin(addr: SocketAddr, user: &str) -> Ws {
    let (mut ws, head) = Ws::open(addr, "/ws", &[&format!("Sec-WebSocket-Protocol: {BIN}")]);
    assert_eq!(head.header("Sec-WebSocket-Protocol"), Some(BIN));
    let t = token(user);
    ws.send(&binary(&Frame::Login { user, token: t.as_bytes(), device: None, last_seq: 0 }.to_bytes().unwrap()));
    let b = ws.raw();
    assert!(matches!(raw(&b), Frame::LoginOk { .. }), "{:?}", raw(&b));
    ws
}

// ---- 0. handshake ---------------------------------------------------------------------

#[test]
fn handshake_101_carries_the_accept_key_and_the_chosen_subprotocol() {
    let (_s, addr) = start_ws(ws_config());
    // No subprotocol offered: none in the answer (RFC 6455 §4.2.2), JSON spoken.
    let (mut ws, head) = Ws::open(addr, "/ws", &[]);
    assert_eq!(head.header("Sec-WebSocket-Protocol"), None);
    ws.send(&ping(b"p"));
    ws.expect(Ev::Pong(b"p".to_vec()));

    // The first supported protocol in the client's order of preference.
    let (_ws, head) = Ws::open(addr, "/", &[&format!("Sec-WebSocket-Protocol: chat, {BIN}, {JSON}")]);
    assert_eq!(head.header("Sec-WebSocket-Protocol"), Some(BIN));
    let (_ws, head) =
        Ws::open(addr, "/", &["Sec-WebSocket-Protocol: chat", &format!("Sec-WebSocket-Protocol: {JSON}")]);
    assert_eq!(head.header("Sec-WebSocket-Protocol"), Some(JSON));

    // An offered extension (every browser offers permessage-deflate) is not
    // accepted: no extension header in the answer, so RSV1 stays illegal.
    let (_ws, head) = Ws::open(addr, "/", &["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]);
    assert_eq!(head.header("Sec-WebSocket-Extensions"), None);

    // Header names and tokens are case-insensitive; Connection may list more
    // tokens (Firefox sends "keep-alive, Upgrade").
    let req = request(
        "GET /ws HTTP/1.1",
        &[
            "host: localhost",
            "upgrade: WebSocket",
            "connection: keep-alive, upgrade",
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
            "sec-websocket-version: 13",
        ],
    );
    let (mut ws, _) = Ws::handshake(addr, &req);
    ws.send(&ping(b"case"));
    ws.expect(Ev::Pong(b"case".to_vec()));
}

#[test]
fn handshake_accept_key_is_sha1_of_key_and_guid() {
    use base64::Engine as _;
    use sha1::Digest as _;
    let (_s, addr) = start_ws(ws_config());
    let key = base64::engine::general_purpose::STANDARD.encode(*b"0123456789abcdef");
    let mut h = sha1::Sha1::new();
    h.update(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes());
    let want = base64::engine::general_purpose::STANDARD.encode(h.finalize());
    let mut s = tcp(addr);
    let req = request(
        "GET /ws HTTP/1.1",
        &[
            "Host: localhost",
            "Upgrade: websocket",
            "Connection: Upgrade",
            &format!("Sec-WebSocket-Key: {key}"),
            "Sec-WebSocket-Version: 13",
        ],
    );
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s, &mut Vec::new());
    assert_eq!(head.status, 101);
    assert_eq!(head.header("Sec-WebSocket-Accept"), Some(want.as_str()));
}

#[test]
fn handshake_refusals_have_the_right_status() {
    let (_s, addr) = start_ws(ws_config());
    let cases: Vec<(&str, String, u16)> = vec![
        ("missing key", request("GET /ws HTTP/1.1", &headers_without("Sec-WebSocket-Key", &[])), 400),
        // RFC 6455 §4.2.1 item 2.
        ("missing Host", request("GET /ws HTTP/1.1", &headers_without("Host", &[])), 400),
        (
            "key not 16 bytes",
            request("GET /ws HTTP/1.1", &headers_without("Sec-WebSocket-Key", &["Sec-WebSocket-Key: c2hvcnQ="])),
            400,
        ),
        (
            "no upgrade token in Connection",
            request("GET /ws HTTP/1.1", &headers_without("Connection", &["Connection: keep-alive"])),
            400,
        ),
        ("Upgrade is not websocket", request("GET /ws HTTP/1.1", &headers_without("Upgrade", &["Upgrade: h2c"])), 400),
        ("only unsupported subprotocols", upgrade("/ws", &["Sec-WebSocket-Protocol: chat, superchat"]), 400),
        ("empty user in the query", upgrade("/ws?user=&token=x", &[]), 400),
        ("repeated token in the query", upgrade("/ws?user=a&token=x&token=y", &[]), 400),
        ("two keys", upgrade("/ws", &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="]), 400),
        // RFC 6455 §4.1: "The method of the request MUST be GET, and the
        // HTTP version MUST be at least 1.1."
        ("POST", request("POST /ws HTTP/1.1", &STD_HEADERS), 405),
        ("HTTP/1.0", request("GET /ws HTTP/1.0", &STD_HEADERS), 505),
    ];
    for (what, req, status) in cases {
        let r = http(addr, &req);
        assert_eq!(r.head.status, status, "{what}: {:?} {}", r.head, r.body_text());
        assert!(!r.body.is_empty(), "{what}: the body says why");
        if status == 405 {
            assert_eq!(r.head.header("Allow"), Some("GET"), "{what}");
        }
    }
    // Not HTTP at all (a TLS ClientHello on the plain port).
    let r = http(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    assert_eq!(r.head.status, 400, "{}", r.body_text());
    assert_all_released(&_s);
}

/// RFC 6455 §4.2.2/§4.4: an unsupported version is answered with an error
/// (426 Upgrade Required is the RFC's example) carrying the versions the
/// server speaks; RFC 9110 §15.5.22: a 426 must carry `Upgrade`.
#[test]
fn handshake_wrong_or_missing_version_is_426_with_the_supported_version() {
    let (_s, addr) = start_ws(ws_config());
    for (what, req) in [
        (
            "version 8",
            request("GET /ws HTTP/1.1", &headers_without("Sec-WebSocket-Version", &["Sec-WebSocket-Version: 8"])),
        ),
        ("no version", request("GET /ws HTTP/1.1", &headers_without("Sec-WebSocket-Version", &[]))),
        (
            "two versions",
            request("GET /ws HTTP/1.1", &headers_without("Sec-WebSocket-Version", &["Sec-WebSocket-Version: 13, 8"])),
        ),
    ] {
        let r = http(addr, &req);
        assert_eq!(r.head.status, 426, "{what}: {:?}", r.head);
        assert_eq!(r.head.header("Sec-WebSocket-Version"), Some("13"), "{what}");
        assert_eq!(r.head.header("Upgrade"), Some("websocket"), "{what}");
        assert_eq!(r.head.header("Connection"), Some("Upgrade, close"), "{what}");
    }
}

#[test]
fn handshake_head_over_the_limit_is_431() {
    let mut cfg = ws_config();
    cfg.websocket.max_handshake_bytes = 1024;
    let (_s, addr) = start_ws(cfg);
    // In one write.
    let pad = format!("X-Pad: {}", "a".repeat(1500));
    let r = http(addr, upgrade("/ws", &[&pad]));
    assert_eq!(r.head.status, 431, "{}", r.body_text());
    // In pieces, none of which alone is over the limit, and no end in sight.
    let mut s = tcp(addr);
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(20));
        // The server may have answered already: a failed write is fine.
        let _ = s.write_all(format!("X-Pad: {}\r\n", "b".repeat(500)).as_bytes());
    }
    let r = read_response(&mut s);
    assert_eq!(r.head.status, 431, "{}", r.body_text());
    // Too many header fields, each short.
    let many: Vec<String> = (0..70).map(|i| format!("X-{i}: {i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let r = http(addr, upgrade("/ws", &many));
    assert_eq!(r.head.status, 431, "{}", r.body_text());
    // Just under the limit is fine.
    let base = upgrade("/ws", &[]).len();
    let pad = format!("X-Pad: {}", "c".repeat(1024 - base - "X-Pad: \r\n".len()));
    let req = upgrade("/ws", &[&pad]);
    assert_eq!(req.len(), 1024);
    let (mut ws, _) = Ws::handshake(addr, &req);
    ws.send(&ping(b"ok"));
    ws.expect(Ev::Pong(b"ok".to_vec()));
}

#[test]
fn handshake_origin_outside_the_allow_list_is_403() {
    let mut cfg = ws_config();
    cfg.websocket.allowed_origins = vec!["https://app.example.com".into()];
    let (_s, addr) = start_ws(cfg);
    let r = http(addr, upgrade("/ws", &["Origin: https://evil.example.com"]));
    assert_eq!(r.head.status, 403, "{}", r.body_text());
    let r = http(addr, upgrade("/ws", &["Origin: http://app.example.com"]));
    assert_eq!(r.head.status, 403, "the scheme is part of the origin");
    // Same origin, written differently: allowed.
    Ws::open(addr, "/ws", &["Origin: https://APP.example.com:443"]);
    // No Origin: not a browser, allowed.
    Ws::open(addr, "/ws", &[]);
}

/// A client that sends half a request and stalls is answered 408 at the
/// login deadline; one that upgrades and never logs in gets close 4001.
#[test]
fn handshake_stalled_is_cut_off_at_the_login_deadline() {
    let mut cfg = ws_config();
    cfg.timeouts.login_timeout_ms = 400;
    let (_s, addr) = start_ws(cfg);
    let t0 = Instant::now();
    let mut s = tcp(addr);
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: webso").unwrap();
    let r = read_response(&mut s);
    let took = t0.elapsed();
    assert_eq!(r.head.status, 408, "{}", r.body_text());
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");

    let t0 = Instant::now();
    let mut ws = Ws::anon(addr);
    assert_eq!(ws.expect_close(4001), "login timeout");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");
    // WebSocket pings are not a login: a client that only pings is cut off
    // at the same deadline.
    let t0 = Instant::now();
    let mut ws = Ws::anon(addr);
    let mut pongs = 0;
    let reason = loop {
        ws.send(&ping(b"still here"));
        match ws.recv() {
            Ev::Pong(_) => pongs += 1,
            Ev::Close(Some(4001), reason) => break reason,
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(reason, "login timeout");
    assert!(pongs >= 3 && t0.elapsed() < Duration::from_secs(3), "{pongs} pongs in {:?}", t0.elapsed());
    drop(ws);
    assert_all_released(&_s);
}

/// A head left unfinished is a request that timed out, whichever timer
/// cuts it off first: with `timeouts.message_timeout_ms` shorter than the
/// login deadline it is that one, and the answer is still 408, not a 400
/// that says the request was malformed.
#[test]
fn handshake_stalled_past_the_message_timeout_is_408() {
    let mut cfg = ws_config();
    cfg.timeouts.login_timeout_ms = 10_000;
    cfg.timeouts.message_timeout_ms = 400;
    let (_s, addr) = start_ws(cfg);
    for partial in [&b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: webso"[..], b"GE", b"\r\n\r\n"] {
        let t0 = Instant::now();
        let mut s = tcp(addr);
        s.write_all(partial).unwrap();
        let r = read_response(&mut s);
        let took = t0.elapsed();
        assert_eq!(r.head.status, 408, "{:?}: {}", String::from_utf8_lossy(partial), r.body_text());
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "{took:?}");
    }
    assert_all_released(&_s);
}

#[test]
fn plain_get_serves_the_demo_page_on_loopback_else_404_or_426() {
    let (_s, addr) = start_ws(ws_config());
    let r = http(addr, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.head.status, 200);
    assert_eq!(r.head.header("Content-Type"), Some("text/html; charset=utf-8"));
    assert!(r.body_text().to_ascii_lowercase().contains("<html"), "an HTML page");
    let r = http(addr, "GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.head.status, 404);

    // Without the demo page a plain GET is told to upgrade.
    let mut cfg = ws_config();
    cfg.websocket.demo_page = DemoPage::Off;
    let (_s2, addr2) = start_ws(cfg);
    let r = http(addr2, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.head.status, 426);
    assert_eq!(r.head.header("Upgrade"), Some("websocket"));
    assert_eq!(r.head.header("Connection"), Some("Upgrade, close"));
}

/// A client may send frames right after its request, without waiting for
/// the 101 (RFC 6455 §4.1 allows it only after, but a server must not lose
/// them when they share a segment).
#[test]
fn frames_pipelined_after_the_request_are_handled() {
    let (_s, addr) = start_ws(ws_config());
    let mut bytes = upgrade(&query_path("alice"), &[]).into_bytes();
    bytes.extend_from_slice(&ping(b"early"));
    bytes.extend_from_slice(&text(&json_ping("early-json")));
    let mut s = tcp(addr);
    s.write_all(&bytes).unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_head(&mut s, &mut buf).status, 101);
    let mut ws = Ws::new(s, buf);
    assert_eq!(ws.json()["type"], "login_ok");
    ws.expect(Ev::Pong(b"early".to_vec()));
    assert_eq!(ws.json(), json!({"type": "pong", "data": "early-json"}));
}

// ---- 1. framing -------------------------------------------------------------------------

/// Text messages whose length needs each encoding (7-bit, 16-bit, 64-bit),
/// at the boundaries; the server answers each (a JSON ping padded with
/// spaces to the length).
#[test]
fn framing_text_message_lengths() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    for n in [30, 125, 126, 127, 65535, 65536, 100_000] {
        let tag = n.to_string();
        ws.send_text(&padded(&json_ping(&tag), n));
        assert_eq!(ws.json(), json!({"type": "pong", "data": tag}), "{n} bytes");
    }
    // 64 KiB sent in 997-byte chops (Autobahn 1.1.8).
    let f = text(&padded(&json_ping("chopped"), 65536));
    for chunk in f.chunks(997) {
        ws.send(chunk);
    }
    assert_eq!(ws.json(), json!({"type": "pong", "data": "chopped"}));
    // A zero-length text message is not a protocol message: 1002.
    ws.send(&text(""));
    ws.expect_close(1002);
}

/// A JSON message with a key given twice is refused with 1002, not read
/// last-wins (`{"type":"ping","type":"send",...}` was a SEND).
#[test]
fn json_duplicate_keys_are_1002() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    ws.send_text(r#"{"type":"ping","type":"send","to":"alice","payload":"x"}"#);
    ws.expect_close(1002);
}

/// A raw SEND to oneself of exactly `total` bytes, and its payload.
fn send_of_len(to: &str, req_id: u32, total: usize) -> (Vec<u8>, Vec<u8>) {
    let overhead = Frame::Send { req_id, to, payload: &[] }.to_bytes().unwrap().len();
    let payload: Vec<u8> = (0..total - overhead).map(|i| (i % 251) as u8).collect();
    let f = Frame::Send { req_id, to, payload: &payload }.to_bytes().unwrap().to_vec();
    assert_eq!(f.len(), total);
    (f, payload)
}

#[test]
fn framing_binary_message_lengths() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login_bin(addr, "alice");
    for (i, n) in [125usize, 126, 127, 65535, 65536, 100_000].into_iter().enumerate() {
        let req_id = i as u32 + 1;
        let (f, payload) = send_of_len("alice", req_id, n);
        ws.send(&binary(&f));
        // The PUSH to oneself and the ack, each a binary message.
        let (mut pushed, mut acked) = (false, false);
        for _ in 0..2 {
            let b = ws.raw();
            match raw(&b) {
                Frame::Push { from, payload: p, .. } => {
                    assert_eq!((from, p), ("alice", &payload[..]), "{n} bytes");
                    pushed = true;
                }
                Frame::SendAck { req_id: r, delivered } => {
                    assert_eq!((r, delivered), (req_id, 1));
                    acked = true;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(pushed && acked);
    }
    // An empty binary message holds no frame: 1002.
    ws.send(&binary(&[]));
    ws.expect_close(1002);
}

/// Server messages of every length encoding (checked by the parser: minimal,
/// unmasked).
#[test]
fn framing_server_messages_use_every_length_encoding() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    for n in [1usize, 100, 200, 65_000, 70_000] {
        let payload = "x".repeat(n);
        ws.send_text(&json!({"type": "send", "req_id": 9, "to": "alice", "payload": payload}).to_string());
        let mut got = [ws.json(), ws.json()];
        got.sort_by_key(|v| v["type"].as_str().unwrap().to_string());
        assert_eq!(got[0]["type"], "push");
        assert_eq!(got[0]["from"], "alice");
        assert_eq!(got[0]["payload"].as_str().map(str::len), Some(n));
        assert_eq!(got[1], json!({"type": "send_ack", "req_id": 9, "delivered": 1}));
    }
}

#[test]
fn framing_unmasked_client_frame_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    ws.send(&frame_with(0x80 | OP_TEXT, json_ping("x").as_bytes(), None));
    ws.expect_close(1002);
    let mut ws = Ws::anon(addr);
    ws.send(&frame_with(0x80 | OP_PING, b"x", None));
    ws.expect_close(1002);
}

/// RFC 6455 §5.2: "the minimal number of bytes MUST be used to encode the
/// length"; this server refuses anything else.
#[test]
fn framing_non_minimal_length_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = Ws::anon(addr);
    // 5 bytes with a 16-bit length.
    let k = next_mask();
    let mut f = vec![0x80 | OP_PING, 0x80 | 126, 0, 5];
    f.extend_from_slice(&k);
    f.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
    ws.send(&f);
    ws.expect_close(1002);
    // A 64-bit length with the most significant bit set.
    let mut ws = Ws::anon(addr);
    let mut f = vec![0x80 | OP_BINARY, 0x80 | 127];
    f.extend_from_slice(&(1u64 << 63 | 70_000).to_be_bytes());
    ws.send(&f);
    ws.expect_close(1002);
}

// ---- 2. pings and pongs ----------------------------------------------------------------

#[test]
fn ping_is_answered_with_its_payload() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = Ws::anon(addr);
    let max: Vec<u8> = (0..125u8).collect();
    for p in [&b""[..], b"hello", &[0xff, 0x00, 0xfe][..], &max[..]] {
        ws.send(&ping(p));
        ws.expect(Ev::Pong(p.to_vec()));
    }
    // Sent a byte at a time (Autobahn 2.6).
    let f = ping(b"chopped");
    for b in f {
        ws.send(&[b]);
        std::thread::sleep(Duration::from_millis(2));
    }
    ws.expect(Ev::Pong(b"chopped".to_vec()));
    // Ten in one write: ten pongs, in order.
    let mut burst = Vec::new();
    for i in 0..10u8 {
        burst.extend_from_slice(&ping(&[i]));
    }
    ws.send(&burst);
    for i in 0..10u8 {
        ws.expect(Ev::Pong(vec![i]));
    }
    // Logged in, the same.
    let mut ws = ws_login(addr, "alice");
    ws.send(&ping(b"in"));
    ws.expect(Ev::Pong(b"in".to_vec()));
}

#[test]
fn ping_with_payload_over_125_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = Ws::anon(addr);
    ws.send(&ping(&[b'p'; 126]));
    ws.expect_close(1002);
}

#[test]
fn unsolicited_pong_is_ignored() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    ws.send(&frame(true, OP_PONG, b"unasked"));
    ws.send(&frame(true, OP_PONG, b""));
    ws.send(&ping(b"after"));
    ws.expect(Ev::Pong(b"after".to_vec()));
    ws.sync("still-open");
}

#[test]
fn fragmented_ping_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = Ws::anon(addr);
    ws.send(&frame(false, OP_PING, b"frag"));
    ws.expect_close(1002);
    // A fragmented pong likewise.
    let mut ws = Ws::anon(addr);
    ws.send(&frame(false, OP_PONG, b"frag"));
    ws.expect_close(1002);
}

/// Server heartbeats are WebSocket pings; a client answering them stays
/// past the idle timeout, one that does not is closed with 4002.
#[test]
fn heartbeat_is_a_ws_ping_and_pongs_keep_the_connection() {
    let mut cfg = ws_config();
    // 700 ms to answer a ping sent 200 ms into silence: slack for a test
    // thread that a loaded host does not run at once.
    cfg.timeouts.heartbeat_interval_ms = 200;
    cfg.timeouts.idle_timeout_ms = 900;
    let (_s, addr) = start_ws(cfg);

    let mut ws = ws_login(addr, "alice");
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(2000) {
        match ws.recv() {
            Ev::Ping(p) => {
                assert!(p.is_empty(), "heartbeat pings carry nothing");
                pings += 1;
                ws.send(&frame(true, OP_PONG, &p));
            }
            other => panic!("expected a heartbeat ping, got {other:?}"),
        }
    }
    assert!(pings >= 3, "{pings} pings in 2 s with a 200 ms heartbeat");
    // Alive well past the 900 ms idle timeout.
    ws.send_text(&json_ping("alive"));
    loop {
        match ws.recv() {
            Ev::Ping(p) => ws.send(&frame(true, OP_PONG, &p)),
            Ev::Text(t) => {
                assert_eq!(serde_json::from_str::<Value>(&t).unwrap(), json!({"type": "pong", "data": "alive"}));
                break;
            }
            other => panic!("{other:?}"),
        }
    }

    drop(ws);

    // Silent: one ping, then close 4002 about the idle timeout after login.
    let mut ws = ws_login(addr, "bob");
    let t0 = Instant::now();
    ws.expect(Ev::Ping(Vec::new()));
    assert_eq!(ws.expect_close(4002), "idle timeout");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(750) && took < Duration::from_secs(3), "{took:?}");
    assert_all_released(&_s);
}

// ---- 3. reserved bits, 4. opcodes --------------------------------------------------------

#[test]
fn reserved_bits_are_1002() {
    let (_s, addr) = start_ws(ws_config());
    for rsv in [0x40u8, 0x20, 0x10, 0x70] {
        for op in [OP_TEXT, OP_BINARY, OP_PING, OP_CLOSE] {
            // A good message first (Autobahn 3.2): answered; then the bad
            // frame: 1002, and the ping after it is never answered.
            let mut ws = ws_login(addr, "alice");
            let mut bytes = text(&json_ping("before"));
            let payload: &[u8] = if op == OP_CLOSE { &[0x03, 0xe8] } else { b"" };
            bytes.extend_from_slice(&frame_with(0x80 | rsv | op, payload, Some(next_mask())));
            bytes.extend_from_slice(&ping(b"after"));
            ws.send(&bytes);
            assert_eq!(ws.json(), json!({"type": "pong", "data": "before"}));
            let reason = ws.expect_close(1002);
            assert!(reason.contains("reserved bits"), "rsv {rsv:#x} op {op}: {reason}");
        }
    }
    assert_all_released(&_s);
}

#[test]
fn reserved_opcodes_are_1002() {
    let (_s, addr) = start_ws(ws_config());
    for op in (3..=7).chain(11..=15) {
        let mut ws = Ws::anon(addr);
        let mut bytes = ping(b"before");
        bytes.extend_from_slice(&frame(true, op, b"reserved"));
        bytes.extend_from_slice(&ping(b"after"));
        ws.send(&bytes);
        ws.expect(Ev::Pong(b"before".to_vec()));
        let reason = ws.expect_close(1002);
        assert!(reason.contains("reserved opcode"), "{op}: {reason}");
    }
    assert_all_released(&_s);
}

// ---- 5. fragmentation -----------------------------------------------------------------------

#[test]
fn fragmented_text_with_pings_interleaved_is_one_message() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    let msg = json_ping("fragmented");
    let (a, rest) = msg.split_at(5);
    let (b, c) = rest.split_at(9);
    // Each piece in its own write, so the server sees them in separate reads.
    let pieces = [
        frame(false, OP_TEXT, a.as_bytes()),
        ping(b"one"),
        frame(false, OP_CONT, b.as_bytes()),
        frame(false, OP_CONT, b""),
        ping(b"two"),
        frame(true, OP_CONT, c.as_bytes()),
    ];
    for p in &pieces {
        ws.send(p);
        std::thread::sleep(Duration::from_millis(10));
    }
    ws.expect(Ev::Pong(b"one".to_vec()));
    ws.expect(Ev::Pong(b"two".to_vec()));
    assert_eq!(ws.json(), json!({"type": "pong", "data": "fragmented"}));
    // The same all in one write, and one byte per fragment (Autobahn 5.x, 6.2.4).
    let mut all = Vec::new();
    let bytes = msg.as_bytes();
    for (i, byte) in bytes.iter().enumerate() {
        let op = if i == 0 { OP_TEXT } else { OP_CONT };
        all.extend_from_slice(&frame(i + 1 == bytes.len(), op, &[*byte]));
        if i == 3 {
            all.extend_from_slice(&ping(b"mid"));
        }
    }
    ws.send(&all);
    ws.expect(Ev::Pong(b"mid".to_vec()));
    assert_eq!(ws.json(), json!({"type": "pong", "data": "fragmented"}));
    // The same bytes again, cut every 7 bytes into separate writes: frame
    // headers, masking keys and payloads split across reads.
    for chunk in all.chunks(7) {
        ws.send(chunk);
        std::thread::sleep(Duration::from_millis(1));
    }
    ws.expect(Ev::Pong(b"mid".to_vec()));
    assert_eq!(ws.json(), json!({"type": "pong", "data": "fragmented"}));
    ws.sync("after");
}

#[test]
fn fragmented_binary_is_one_message() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login_bin(addr, "alice");
    let f = Frame::Ping { data: b"raw-ping" }.to_bytes().unwrap();
    ws.send(&frame(false, OP_BINARY, &f[..3]));
    ws.send(&ping(b"ctl"));
    ws.send(&frame(false, OP_CONT, &f[3..8]));
    ws.send(&frame(true, OP_CONT, &f[8..]));
    ws.expect(Ev::Pong(b"ctl".to_vec()));
    let b = ws.raw();
    assert_eq!(raw(&b), Frame::Pong { data: b"raw-ping" });
}

#[test]
fn continuation_without_a_message_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    for fin in [true, false] {
        let mut ws = Ws::anon(addr);
        ws.send(&frame(fin, OP_CONT, b"orphan"));
        let reason = ws.expect_close(1002);
        assert!(reason.contains("continuation"), "{reason}");
    }
    // After a whole message, a continuation has nothing to continue.
    let mut ws = ws_login(addr, "alice");
    let mut bytes = text(&json_ping("whole"));
    bytes.extend_from_slice(&frame(true, OP_CONT, b"more"));
    ws.send(&bytes);
    assert_eq!(ws.json(), json!({"type": "pong", "data": "whole"}));
    ws.expect_close(1002);
}

#[test]
fn data_frame_inside_a_fragmented_message_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    for (first, second) in [(OP_TEXT, OP_TEXT), (OP_TEXT, OP_BINARY), (OP_BINARY, OP_TEXT)] {
        let mut ws = Ws::anon(addr);
        ws.send(&frame(false, first, b"{\"type\""));
        std::thread::sleep(Duration::from_millis(10));
        ws.send(&frame(true, second, b"x"));
        let reason = ws.expect_close(1002);
        assert!(reason.contains("in progress"), "{reason}");
    }
}

// ---- 6. UTF-8 -----------------------------------------------------------------------------

/// Invalid sequences (Markus Kuhn's test file, as Autobahn 6.x uses them).
const INVALID_UTF8: [&[u8]; 8] = [
    b"\xff",                 // never valid
    b"\x80",                 // lone continuation byte
    b"\xc0\x80",             // overlong NUL
    b"\xe0\x80\xaf",         // overlong '/'
    b"\xed\xa0\x80",         // UTF-16 surrogate
    b"\xf4\x90\x80\x80",     // above U+10FFFF
    b"\xce\xba\xe1\xbd",     // truncated at the end
    b"\xce\xba\xe1\xbd\x20", // truncated in the middle
];

fn json_ping_bytes(data: &[u8]) -> Vec<u8> {
    let mut m = br#"{"type":"ping","data":""#.to_vec();
    m.extend_from_slice(data);
    m.extend_from_slice(br#""}"#);
    m
}

#[test]
fn invalid_utf8_text_is_1007() {
    let (_s, addr) = start_ws(ws_config());
    for bad in INVALID_UTF8 {
        let mut ws = Ws::anon(addr);
        ws.send(&frame(true, OP_TEXT, &json_ping_bytes(bad)));
        ws.expect_close(1007);
    }
    // In fragments, the last one ending inside a character.
    let mut ws = ws_login(addr, "alice");
    ws.send(&frame(false, OP_TEXT, br#"{"type":"ping","data":"x"}"#));
    ws.send(&frame(true, OP_CONT, b"\xe2\x82"));
    ws.expect_close(1007);
    assert_all_released(&_s);
}

/// An invalid sequence split between fragments, and one inside the second
/// of three: the server fails at the fragment that makes it invalid, without
/// waiting for the rest (Autobahn 6.4.1/6.4.2 "fail fast").
#[test]
fn invalid_utf8_across_fragments_fails_fast() {
    let (_s, addr) = start_ws(ws_config());
    let cases: [(&[u8], &[u8]); 3] = [
        (b"{\"type\":\"ping\",\"data\":\"\xf4", b"\x90\x80\x80"),
        (b"{\"type\":\"ping\",\"data\":\"\xce\xba\xe1", b"\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"),
        (b"{\"type\":\"ping\",\"data\":\"", b"\xc0\xaf"),
    ];
    for (first, second) in cases {
        let mut ws = Ws::anon(addr);
        ws.send(&frame(false, OP_TEXT, first));
        std::thread::sleep(Duration::from_millis(20));
        ws.send(&frame(false, OP_CONT, second));
        // No final fragment is sent: the close must come without it.
        ws.expect_close(1007);
    }
}

/// Invalid UTF-8 inside one frame closes at once too (Autobahn 6.4.3/6.4.4):
/// the frame announces 60 bytes of text, only its start arrives, and the
/// rest never does. The close must come without it, whether the bad bytes
/// come in the first read or a later one.
#[test]
fn invalid_utf8_inside_one_frame_fails_fast() {
    let (_s, addr) = start_ws(ws_config());
    let good = "{\"type\":\"ping\",\"data\":\"κόσμε".as_bytes();
    let mut payload = [good, b"\xf4\x90\x80\x80"].concat();
    payload.resize(60, b' ');
    let f = frame(true, OP_TEXT, &payload);
    // Header (6 bytes), the valid start, and the bad sequence's first two
    // bytes (0x90 after 0xf4 can never be valid).
    let cut = 6 + good.len() + 2;
    for first_read in [cut, 6 + good.len()] {
        let mut ws = Ws::anon(addr);
        ws.send(&f[..first_read]);
        if first_read < cut {
            // Let the valid part be read (and checked) on its own.
            std::thread::sleep(Duration::from_millis(20));
            ws.send(&f[first_read..cut]);
        }
        ws.expect_close(1007);
    }
}

#[test]
fn valid_utf8_split_across_fragments_is_accepted() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    // 2-, 3- and 4-byte characters, the largest code point, U+FFFF.
    let data = "κόσμε€𝄞\u{10FFFF}\u{FFFF}";
    let msg = json_ping(data);
    let bytes = msg.as_bytes();
    // Cut inside each character (the data starts at byte 23).
    for cut in [24, 26, 28, 30, 32, 34, 35, 37, 38, 39, 41, 42, 43, 45, 46] {
        ws.send(&frame(false, OP_TEXT, &bytes[..cut]));
        std::thread::sleep(Duration::from_millis(5));
        ws.send(&frame(true, OP_CONT, &bytes[cut..]));
        assert_eq!(ws.json(), json!({"type": "pong", "data": data}), "cut at {cut}");
    }
    // One byte per fragment.
    let mut all = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        all.extend_from_slice(&frame(i + 1 == bytes.len(), if i == 0 { OP_TEXT } else { OP_CONT }, &[*b]));
    }
    ws.send(&all);
    assert_eq!(ws.json(), json!({"type": "pong", "data": data}));
}

/// A close reason must be UTF-8 (RFC 6455 §5.5.1); this server answers 1007,
/// the code for data inconsistent with its type (Autobahn 7.5.1 accepts it).
#[test]
fn invalid_utf8_in_close_reason_is_1007() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = Ws::anon(addr);
    ws.send(&close(1000, b"bye \xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"));
    ws.expect_close(1007);
}

// ---- 7. close handling ----------------------------------------------------------------------

#[test]
fn close_1000_is_echoed_and_the_server_closes_tcp() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    let t0 = Instant::now();
    ws.send(&close(1000, b"done"));
    ws.expect_close(1000);
    assert!(t0.elapsed() < Duration::from_secs(1), "the server closes TCP at once, not at the linger");
    // An empty close is echoed empty (RFC 6455 §5.5.1).
    let mut ws = Ws::anon(addr);
    ws.send(&frame(true, OP_CLOSE, b""));
    ws.expect(Ev::Close(None, String::new()));
    ws.expect_eof();
    // A close in the middle of a fragmented message is answered at once.
    let mut ws = ws_login(addr, "alice");
    ws.send(&frame(false, OP_TEXT, b"{\"type\":"));
    ws.send(&close(1001, b"leaving"));
    ws.expect_close(1001);
    // A JSON close message closes with 1000 too.
    let mut ws = ws_login(addr, "alice");
    ws.send_text(r#"{"type":"close"}"#);
    ws.expect_close(1000);
    assert_all_released(&_s);
}

#[test]
fn close_with_one_byte_payload_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = Ws::anon(addr);
    ws.send(&frame(true, OP_CLOSE, &[0x03]));
    ws.expect_close(1002);
}

#[test]
fn close_with_invalid_code_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        let mut ws = Ws::anon(addr);
        ws.send(&close(code, b""));
        let reason = ws.expect_close(1002);
        assert!(reason.contains(&code.to_string()), "{code}: {reason}");
    }
    assert_all_released(&_s);
}

#[test]
fn close_with_valid_code_is_echoed() {
    let (_s, addr) = start_ws(ws_config());
    for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
        let mut ws = Ws::anon(addr);
        ws.send(&close(code, b"reason"));
        ws.expect_close(code);
    }
    // The longest reason (123 bytes) is fine; one more makes the payload 126
    // bytes, too long for a control frame.
    let mut ws = Ws::anon(addr);
    ws.send(&close(1000, &[b'r'; 123]));
    ws.expect_close(1000);
    let mut ws = Ws::anon(addr);
    ws.send(&close(1000, &[b'r'; 124]));
    ws.expect_close(1002);
    assert_all_released(&_s);
}

#[test]
fn data_after_close_is_ignored() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    let mut bytes = close(1000, b"");
    bytes.extend_from_slice(&text(&json_ping("late")));
    bytes.extend_from_slice(&ping(b"late"));
    bytes.extend_from_slice(&frame(true, 0x3, b"invalid too"));
    ws.send(&bytes);
    ws.expect_close(1000);
    // And after the echo (Autobahn 7.1.x): nothing but the end.
    let mut ws = ws_login(addr, "alice");
    ws.send(&close(1000, b""));
    assert_eq!(ws.recv(), Ev::Close(Some(1000), String::new()));
    // The server may already have closed the socket; a failed write is fine.
    let _ = ws.s.write_all(&ping(b"after close"));
    ws.expect_eof();
    assert_all_released(&_s);
}

#[test]
fn server_shutdown_closes_websockets_with_1001() {
    let (s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    let t = std::thread::spawn(move || s.shutdown());
    assert_eq!(ws.expect_close(1001), "server going away");
    t.join().unwrap().unwrap();
}

#[test]
fn kick_closes_a_websocket_with_4003() {
    let (s, addr) = start_ws(ws_config());
    let mut ws = ws_login(addr, "alice");
    assert_eq!(s.handle().kick_user("alice").unwrap(), 1);
    assert_eq!(ws.expect_close(4003), "kicked");
}

// ---- limits ---------------------------------------------------------------------------------

#[test]
fn message_over_max_message_bytes_is_1009() {
    let mut cfg = ws_config();
    cfg.websocket.max_message_bytes = 1000;
    let (_s, addr) = start_ws(cfg);
    let mut ws = ws_login(addr, "alice");
    // Exactly the limit: fine.
    ws.send_text(&padded(&json_ping("limit"), 1000));
    assert_eq!(ws.json(), json!({"type": "pong", "data": "limit"}));
    // One more, in one frame: refused from the header alone.
    ws.send_text(&padded(&json_ping("over"), 1001));
    ws.expect_close(1009);

    // Exactly the limit across fragments: fine.
    let mut ws = ws_login(addr, "alice");
    let m = padded(&json_ping("split"), 1000);
    ws.send(&frame(false, OP_TEXT, &m.as_bytes()[..500]));
    ws.send(&frame(true, OP_CONT, &m.as_bytes()[500..]));
    assert_eq!(ws.json(), json!({"type": "pong", "data": "split"}));
    // Across fragments: 600 + 600.
    let m = padded(&json_ping("frag"), 1200);
    ws.send(&frame(false, OP_TEXT, &m.as_bytes()[..600]));
    ws.send(&frame(true, OP_CONT, &m.as_bytes()[600..]));
    ws.expect_close(1009);

    // Binary, announced with a 64-bit length and no payload sent at all.
    let mut ws = ws_login_bin(addr, "alice");
    let mut f = vec![0x80 | OP_BINARY, 0x80 | 127];
    f.extend_from_slice(&(1u64 << 40).to_be_bytes());
    ws.send(&f);
    ws.expect_close(1009);
    assert_all_released(&_s);
}

/// Before login a message may be no larger than the largest login (8 KiB):
/// a connection that has not logged in cannot make the server buffer a
/// message of `websocket.max_message_bytes` (here ~175 KiB).
#[test]
fn before_login_a_message_larger_than_any_login_is_1009() {
    let (_s, addr) = start_ws(ws_config());
    // One frame announcing 20,000 bytes: refused from its header.
    let mut ws = Ws::anon(addr);
    let mut f = vec![0x80 | OP_TEXT, 0x80 | 126];
    f.extend_from_slice(&20_000u16.to_be_bytes());
    ws.send(&f);
    ws.expect_close(1009);
    // Fragments adding up past 8 KiB.
    let mut ws = Ws::anon(addr);
    ws.send(&frame(false, OP_TEXT, &[b' '; 6000]));
    ws.send(&frame(false, OP_CONT, &[b' '; 6000]));
    ws.expect_close(1009);
    // A login of ordinary size in fragments still works, and after it the
    // full message size applies again.
    let mut ws = Ws::anon(addr);
    let login = json!({"type": "login", "user": "frag", "token": token("frag")}).to_string();
    let (a, b) = login.split_at(10);
    ws.send(&frame(false, OP_TEXT, a.as_bytes()));
    ws.send(&frame(true, OP_CONT, b.as_bytes()));
    assert_eq!(ws.json()["type"], "login_ok");
    ws.send_text(&padded(&json_ping("big"), 20_000));
    assert_eq!(ws.json(), json!({"type": "pong", "data": "big"}));
    assert_eq!(_s.handle().stats().protocol_errors, 2);
}

/// A fragmented message must be finished within
/// `timeouts.message_timeout_ms`: a client that keeps pinging between
/// fragments it never finishes used to hold the reassembly buffer forever.
#[test]
fn an_unfinished_fragmented_message_is_closed_after_the_message_timeout() {
    let mut cfg = ws_config();
    cfg.timeouts.message_timeout_ms = 600;
    let (s, addr) = start_ws(cfg);
    let mut ws = ws_login(addr, "dangling");
    let t0 = Instant::now();
    ws.send(&frame(false, OP_TEXT, &[b' '; 50_000]));
    let mut closed = None;
    while t0.elapsed() < Duration::from_secs(4) {
        ws.send(&ping(b"alive"));
        match ws.recv() {
            Ev::Pong(_) => std::thread::sleep(Duration::from_millis(100)),
            Ev::Close(code, _) => {
                closed = code;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(closed, Some(1008), "closed with 1008 within the message timeout");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(500), "closed after {waited:?}");
    assert_eq!(s.handle().stats().message_timeouts, 1);
    assert_all_released(&s);
}

// ---- protocol on top: login, subprotocols, routing ------------------------------------------

#[test]
fn query_login_gets_login_ok_first() {
    let (_s, addr) = start_ws(ws_config());
    let (mut ws, _) = Ws::open(addr, &query_path("alice"), &[]);
    let ok = ws.json();
    assert_eq!(ok["type"], "login_ok");
    let conn_id: u64 = ok["conn_id"].as_str().expect("conn_id is a string").parse().unwrap();
    assert_ne!(conn_id, 0);
    assert_eq!(ok["heartbeat_interval_ms"], 60_000);
    assert_eq!(ok["idle_timeout_ms"], 120_000);
    assert_eq!(ok["max_frame_bytes"], 128 * 1024);
    // A second login is not allowed now: 4006, as on raw TCP.
    ws.send_text(&json!({"type": "login", "user": "alice", "token": token("alice")}).to_string());
    ws.expect_close(4006);
}

#[test]
fn token_in_a_subprotocol_logs_in_and_is_not_echoed() {
    let (_s, addr) = start_ws(ws_config());
    // What a browser does to keep the token out of the URL:
    // new WebSocket("ws://host/?user=carol", ["switchboard.v1.json", "switchboard.token." + jwt]).
    let offer = format!("Sec-WebSocket-Protocol: {JSON}, switchboard.token.{}", token("carol"));
    let (mut ws, head) = Ws::open(addr, "/ws?user=carol", &[&offer]);
    assert_eq!(head.header("Sec-WebSocket-Protocol"), Some(JSON), "the token is never chosen");
    assert_eq!(ws.json()["type"], "login_ok");
    // A wrong token there is a failed login like any other.
    let offer = format!("Sec-WebSocket-Protocol: switchboard.token.{}", token("someone-else"));
    let (mut ws, head) = Ws::open(addr, "/ws?user=carol", &[&offer]);
    assert_eq!(head.header("Sec-WebSocket-Protocol"), None);
    let err = ws.json();
    assert_eq!((err["type"].as_str(), err["code"].as_u64()), (Some("login_error"), Some(5)), "{err}");
    ws.expect_close(1008);
    // The token twice (query and subprotocol): 400.
    let offer = format!("Sec-WebSocket-Protocol: switchboard.token.{}", token("carol"));
    let r = http(addr, upgrade(&query_path("carol"), &[&offer]));
    assert_eq!(r.head.status, 400);
}

#[test]
fn first_message_login_and_the_session_rules() {
    let (_s, addr) = start_ws(ws_config());
    let mut ws = Ws::anon(addr);
    ws.send_text(&json!({"type": "login", "user": "bob", "token": token("bob")}).to_string());
    assert_eq!(ws.json()["type"], "login_ok");
    ws.sync("in");
    // Anything but LOGIN before login: 4006.
    let mut ws = Ws::anon(addr);
    ws.send_text(&json!({"type": "send", "to": "bob", "payload": "hi"}).to_string());
    ws.expect_close(4006);
}

#[test]
fn bad_token_is_login_error_then_close_1008() {
    let (_s, addr) = start_ws(ws_config());
    let forged = JwtHs256::new("another-secret-of-enough-length-0123").mint("alice", unix_now() + 3600);
    // By message.
    let mut ws = Ws::anon(addr);
    ws.send_text(&json!({"type": "login", "user": "alice", "token": forged}).to_string());
    let e = ws.json();
    assert_eq!(e["type"], "login_error");
    assert_eq!(e["code"], 2, "bad signature: {e}");
    ws.expect_close(1008);
    // By query.
    let (mut ws, _) = Ws::open(addr, &format!("/ws?user=alice&token={forged}"), &[]);
    assert_eq!(ws.json()["code"], 2);
    ws.expect_close(1008);
    // Binary subprotocol: LOGIN_ERROR as a raw frame, then close 1008.
    let (mut ws, _) =
        Ws::open(addr, &format!("/ws?user=alice&token={forged}"), &[&format!("Sec-WebSocket-Protocol: {BIN}")]);
    let b = ws.raw();
    assert!(matches!(raw(&b), Frame::LoginError { code: 2, .. }), "{:?}", raw(&b));
    ws.expect_close(1008);
    assert_all_released(&_s);
}

#[test]
fn malformed_json_is_1002() {
    let (_s, addr) = start_ws(ws_config());
    for bad in ["{", "[1,2]", "\"ping\"", r#"{"type":"teleport"}"#, r#"{"type":"ping","data":7}"#, r#"{"data":"x"}"#] {
        let mut ws = ws_login(addr, "alice");
        ws.send_text(bad);
        ws.expect_close(1002);
    }
    assert_all_released(&_s);
}

#[test]
fn binary_subprotocol_carries_one_raw_frame_per_message() {
    let (_s, addr) = start_ws(ws_config());
    let (mut ws, head) = Ws::open(addr, "/ws", &[&format!("Sec-WebSocket-Protocol: {BIN}")]);
    assert_eq!(head.header("Sec-WebSocket-Protocol"), Some(BIN));
    let t = token("alice");
    ws.send(&binary(
        &Frame::Login { user: "alice", token: t.as_bytes(), device: None, last_seq: 0 }.to_bytes().unwrap(),
    ));
    let b = ws.raw();
    match raw(&b) {
        Frame::LoginOk { conn_id, heartbeat_interval_ms, idle_timeout_ms, max_frame_bytes } => {
            assert_ne!(conn_id, 0);
            assert_eq!((heartbeat_interval_ms, idle_timeout_ms, max_frame_bytes), (60_000, 120_000, 128 * 1024));
        }
        other => panic!("{other:?}"),
    }
    ws.send(&binary(&Frame::Ping { data: b"raw" }.to_bytes().unwrap()));
    let b = ws.raw();
    assert_eq!(raw(&b), Frame::Pong { data: b"raw" });
    // Two frames in one message: 1002.
    let mut two = Frame::Ping { data: b"1" }.to_bytes().unwrap().to_vec();
    two.extend_from_slice(&Frame::Ping { data: b"2" }.to_bytes().unwrap());
    ws.send(&binary(&two));
    ws.expect_close(1002);
    // Half a frame: 1002.
    let ws2 = ws_login_bin(addr, "alice");
    let mut ws2 = ws2;
    let f = Frame::Ping { data: b"half" }.to_bytes().unwrap();
    ws2.send(&binary(&f[..f.len() - 2]));
    ws2.expect_close(1002);
}

#[test]
fn send_between_websocket_users() {
    let (_s, addr) = start_ws(ws_config());
    let mut a = ws_login(addr, "wsa");
    let mut b = ws_login(addr, "wsb");
    a.send_text(&json!({"type": "send", "req_id": 1, "to": "wsb", "payload": "hi b"}).to_string());
    assert_eq!(a.json(), json!({"type": "send_ack", "req_id": 1, "delivered": 1}));
    let p = b.json();
    assert_eq!(
        (p["type"].as_str(), p["from"].as_str(), p["payload"].as_str()),
        (Some("push"), Some("wsa"), Some("hi b"))
    );
    assert!(p["msg_id"].as_str().unwrap().parse::<u64>().is_ok(), "{p}");
    // Binary payloads go as payload_b64.
    b.send_text(&json!({"type": "send", "req_id": 2, "to": "wsa", "payload_b64": "/wA="}).to_string());
    assert_eq!(b.json(), json!({"type": "send_ack", "req_id": 2, "delivered": 1}));
    let p = a.json();
    assert_eq!((p["from"].as_str(), p["payload_b64"].as_str()), (Some("wsb"), Some("/wA=")), "{p}");
    // To a binary-subprotocol user: a raw PUSH in a binary message.
    let mut c = ws_login_bin(addr, "wsc");
    a.send_text(&json!({"type": "send", "to": "wsc", "payload": "to bin"}).to_string());
    let m = c.raw();
    assert!(matches!(raw(&m), Frame::Push { from: "wsa", payload: b"to bin", .. }), "{:?}", raw(&m));
    a.sync("a");
    b.sync("b");
}

#[test]
fn send_between_raw_tcp_and_websocket() {
    let (s, addr) = start_ws(ws_config());
    let (mut r, _) = login(s.local_addr(), "rawu");
    let mut w = ws_login(addr, "wsu");
    r.send(3, "wsu", b"from raw").unwrap();
    match r.recv().unwrap().frame() {
        Frame::SendAck { req_id: 3, delivered: 1 } => {}
        other => panic!("{other:?}"),
    }
    let p = w.json();
    assert_eq!(
        (p["type"].as_str(), p["from"].as_str(), p["payload"].as_str()),
        (Some("push"), Some("rawu"), Some("from raw"))
    );
    w.send_text(&json!({"type": "send", "req_id": 4, "to": "rawu", "payload": "from ws"}).to_string());
    assert_eq!(w.json(), json!({"type": "send_ack", "req_id": 4, "delivered": 1}));
    let (_, from, payload) = expect_push(&mut r);
    assert_eq!((from.as_str(), &payload[..]), ("wsu", &b"from ws"[..]));
}

#[test]
fn room_with_raw_and_websocket_members_gets_each_publish_once() {
    let (s, addr) = start_ws(ws_config());
    let h = s.handle();
    let (mut r, _) = login(s.local_addr(), "r1");
    let mut j = ws_login(addr, "j1");
    let mut b = ws_login_bin(addr, "b1");
    r.subscribe(1, "mix").unwrap();
    j.send_text(&json!({"type": "subscribe", "req_id": 2, "room": "mix"}).to_string());
    assert_eq!(j.json(), json!({"type": "room_ack", "req_id": 2, "op": "subscribed", "room": "mix"}));
    b.send(&binary(&Frame::Subscribe { req_id: 3, room: "mix" }.to_bytes().unwrap()));
    let m = b.raw();
    assert_eq!(raw(&m), Frame::RoomAck { req_id: 3, op: RoomOp::Subscribed, room: "mix" });
    assert!(wait_until(Duration::from_secs(5), || h.room_size("mix") == 3));

    // From the application.
    h.publish_to_room("mix", b"app").unwrap();
    // From the raw member (it gets its ack and, as a member, the message).
    r.publish(5, "mix", b"raw").unwrap();
    // From the JSON member.
    j.send_text(&json!({"type": "publish", "req_id": 6, "room": "mix", "payload": "json"}).to_string());

    // Each member sees each of the three once (the two client publishes may
    // interleave either way), plus its own ack.
    let mut raw_seen = Vec::new();
    let mut raw_acked = false;
    while raw_seen.len() < 3 || !raw_acked {
        match r.recv().unwrap().frame() {
            Frame::RoomMsg { room: "mix", payload, .. } => raw_seen.push(payload.to_vec()),
            Frame::RoomAck { req_id: 5, op: RoomOp::Published, room: "mix" } => raw_acked = true,
            other => panic!("raw member: {other:?}"),
        }
    }
    let mut json_seen = Vec::new();
    let mut json_acked = false;
    while json_seen.len() < 3 || !json_acked {
        let v = j.json();
        match v["type"].as_str() {
            Some("room_msg") => json_seen.push(v["payload"].as_str().unwrap().as_bytes().to_vec()),
            Some("room_ack") => {
                assert_eq!(v, json!({"type": "room_ack", "req_id": 6, "op": "published", "room": "mix"}));
                json_acked = true;
            }
            _ => panic!("json member: {v}"),
        }
    }
    let mut bin_seen = Vec::new();
    while bin_seen.len() < 3 {
        let m = b.raw();
        match raw(&m) {
            Frame::RoomMsg { room: "mix", payload, .. } => bin_seen.push(payload.to_vec()),
            other => panic!("binary member: {other:?}"),
        }
    }
    for seen in [&mut raw_seen, &mut json_seen, &mut bin_seen] {
        seen.sort();
        assert_eq!(*seen, vec![b"app".to_vec(), b"json".to_vec(), b"raw".to_vec()]);
    }
    // Nothing more queued: the next thing each gets is the answer to a ping.
    r.send_frame(&Frame::Ping { data: b"sync" }).unwrap();
    assert_eq!(r.recv().unwrap().frame(), Frame::Pong { data: b"sync" });
    j.sync("sync");
    b.send(&binary(&Frame::Ping { data: b"sync" }.to_bytes().unwrap()));
    let m = b.raw();
    assert_eq!(raw(&m), Frame::Pong { data: b"sync" });
}

#[test]
fn push_to_user_reaches_websocket_clients() {
    let (s, addr) = start_ws(ws_config());
    let mut j = ws_login(addr, "alice");
    let mut b = ws_login_bin(addr, "alice");
    let pushed = s.handle().push_to_user("alice", b"from the app").unwrap();
    assert_eq!(pushed.connections, 2);
    let v = j.json();
    assert_eq!(v["type"], "push");
    assert_eq!(v["payload"], "from the app");
    assert_eq!(v["msg_id"], pushed.msg_id.to_string());
    let m = b.raw();
    match raw(&m) {
        Frame::Push { msg_id, payload, .. } => assert_eq!((msg_id, payload), (pushed.msg_id, &b"from the app"[..])),
        other => panic!("{other:?}"),
    }
}

// ---- sniffing on the raw port -----------------------------------------------------------------

#[test]
fn sniffing_serves_websocket_and_raw_on_one_port() {
    let mut cfg = ws_config();
    cfg.websocket.sniff_on_raw_port = true;
    cfg.timeouts.login_timeout_ms = 1000;
    let (s, _) = start_ws(cfg);
    let port = s.local_addr();
    let mut w = ws_login(port, "wsu");
    let (mut r, _) = login(port, "rawu");
    w.send_text(&json!({"type": "send", "req_id": 1, "to": "rawu", "payload": "sniffed"}).to_string());
    assert_eq!(w.json(), json!({"type": "send_ack", "req_id": 1, "delivered": 1}));
    let (_, from, payload) = expect_push(&mut r);
    assert_eq!((from.as_str(), &payload[..]), ("wsu", &b"sniffed"[..]));
    r.send(2, "wsu", b"back").unwrap();
    assert_eq!(w.json()["payload"], "back");
    // The request arriving a byte at a time is still told apart.
    let mut s2 = tcp(port);
    for b in upgrade("/ws", &[]).as_bytes() {
        s2.write_all(&[*b]).unwrap();
    }
    let head = read_head(&mut s2, &mut Vec::new());
    assert_eq!(head.status, 101);
    // A request that stalls on the raw port is answered in HTTP too (408).
    let mut s3 = tcp(port);
    s3.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    assert_eq!(read_response(&mut s3).head.status, 408);
}

/// Without sniffing the raw port is raw only, but an HTTP request there
/// (a browser or curl on the wrong port: "GET " read as a raw length is
/// about 1.2 GB) gets a short HTTP 400 naming the WebSocket port rather
/// than a raw CLOSE it cannot show.
#[test]
fn without_sniffing_an_upgrade_on_the_raw_port_gets_a_400_naming_the_websocket_port() {
    let (s, ws_addr) = start_ws(ws_config());
    let r = http(s.local_addr(), upgrade("/ws", &[]));
    assert_eq!(r.head.status, 400, "{r:?}");
    let body = r.body_text();
    assert!(body.contains("raw TCP port") && body.contains(&format!("ws://{ws_addr}/")), "{body}");
    // Any method, and without a WebSocket port: still an answer a browser shows.
    let mut cfg = ws_config();
    cfg.websocket.listen = String::new();
    let s = start(cfg);
    let r = http(s.local_addr(), "POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.head.status, 400);
    assert!(r.body_text().contains("no WebSocket port"));
    // Every method of RFC 9110 is such a request, TRACE as well as the rest
    // (a raw frame can never start with one: its length would be far over
    // the protocol's 16 MiB).
    for method in ["TRACE", "OPTIONS", "PATCH"] {
        let r = http(s.local_addr(), format!("{method} / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(r.head.status, 400, "{method}: {r:?}");
        assert!(r.body_text().contains("no WebSocket port"), "{method}");
    }
    // Bytes that only look like the start of a method until the fourth are
    // still a raw protocol error.
    let mut c = connect(s.local_addr());
    c.send_raw(b"GEX ").unwrap();
    assert_eq!(c.recv_close_code().unwrap(), Some(1009));
}

// ---- conformance echo (websocket.conformance_echo) ----------------------------------

/// The test-only echo mode that `scripts/autobahn.sh` runs the Autobahn
/// suite against: text and binary messages come back as they were sent
/// (opcode and bytes, fragments reassembled), without a login; control
/// frames and protocol errors behave as always.
#[test]
fn conformance_echo_returns_messages_as_sent() {
    let mut cfg = ws_config();
    cfg.websocket.conformance_echo = true;
    let (s, addr) = start_ws(cfg);
    let mut ws = Ws::anon(addr);
    ws.send_text("not JSON, and no login");
    ws.expect(Ev::Text("not JSON, and no login".into()));
    ws.send(&binary(&[0, 1, 2, 255]));
    ws.expect(Ev::Binary(vec![0, 1, 2, 255]));
    // Larger than a login may be: the full message limit applies.
    let big = "x".repeat(100_000);
    ws.send_text(&big);
    ws.expect(Ev::Text(big));
    // Fragments with a ping between them: the pong first, then one message.
    ws.send(&frame(false, OP_TEXT, &"caf\u{e9} ".as_bytes()[..4]));
    ws.send(&ping(b"p"));
    ws.send(&frame(true, OP_CONT, &"caf\u{e9} ".as_bytes()[4..]));
    ws.expect(Ev::Pong(b"p".to_vec()));
    ws.expect(Ev::Text("caf\u{e9} ".into()));
    ws.send(&frame(true, OP_TEXT, b"\xff"));
    ws.expect_close(1007);
    let mut ws = Ws::anon(addr);
    ws.send(&close(1000, b"bye"));
    ws.expect_close(1000);
    assert_all_released(&s);
}
