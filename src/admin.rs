//! The admin HTTP API: health, readiness, stats, and pushes from backends
//! that are not written in Rust.
//!
//! Owns: one listener and one thread (`sb-admin`), serving small HTTP/1.1
//! requests one connection at a time, with keep-alive. Every call maps to a
//! `Handle` method. Request heads, query decoding and response layout are
//! `proto::http`'s, the same as the WebSocket handshake's.
//! Must not: be on any connection's path. It is a control plane: a few
//! requests per second from an operator or a backend, not a data plane for
//! millions of pushes (embed the server and use the `Handle` for that).
//!
//! Endpoints (JSON bodies out; message payloads in as the raw request body):
//! - `GET /healthz` → 200 while the process serves.
//! - `GET /readyz` → 200 when accepting, 503 once shutting down or draining.
//! - `GET /metrics` → the Prometheus text format (`metrics.rs`).
//! - `GET /stats` → counters, users, rooms, connections per worker, and
//!   `store`: the inbox store thread's counters since start (`null`
//!   without a store): `appends` (messages stored), `duplicates`, `syncs`
//!   (group commits), `appended_per_sync_sum` (messages stored by synced
//!   batches: over `syncs`, the messages per sync), `reads`, `refusals`
//!   (inbox or store full), `errors`, `busy` (refused, queue full),
//!   `queue_depth` (waiting now) and `expired`.
//! - `POST /push?user=U[&mode=reliable|at_most_once][&client_id=N]`:
//!   stored in U's inbox and answered once durable (`seq`), or live only;
//!   the default is `delivery.send_default`. `GET /inbox?user=U`: the
//!   inbox's head seq, oldest seq kept, size and each device's position.
//! - `POST /publish?room=R`, `POST /broadcast`,
//!   `POST /kick?user=U`, `POST /join?user=U&room=R`,
//!   `POST /leave?user=U&room=R`, `GET /room?room=R`.
//! - `POST /bench/send_ceiling?room=R&bytes=N`, only with
//!   `admin.bench_endpoints = true`.
//!
//! With `admin.token` set, every request needs `Authorization: Bearer
//! <token>`; a non-loopback listener requires a token (checked at start).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::proto::http::{self, HeadError, PercentError, RequestHead};
use crate::server::{Handle, PushError};

/// Largest request body accepted (a message payload).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest request head.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A running admin listener.
pub struct Admin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Admin {
    /// Binds `listen` and serves `handle` on a thread.
    pub fn start(listen: SocketAddr, handle: Handle, token: Option<String>, bench: bool) -> io::Result<Admin> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("sb-admin".into()).spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(stream) = conn {
                    let _ = serve_conn(stream, &handle, token.as_deref(), bench, &stop2);
                }
            }
        })?;
        Ok(Admin { addr, stop, thread: Some(thread) })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    authorized: bool,
    body: Vec<u8>,
    close: bool,
}

/// A request the API cannot serve, with the status and the words the client
/// gets (never an OS error's text).
#[derive(Debug)]
struct BadRequest {
    status: u16,
    error: &'static str,
}

impl BadRequest {
    const fn new(status: u16, error: &'static str) -> BadRequest {
        BadRequest { status, error }
    }
}

/// What a failed read of a request tells the client.
fn read_failure(e: &io::Error) -> BadRequest {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => BadRequest::new(408, "request not complete within 10 s"),
        io::ErrorKind::UnexpectedEof => BadRequest::new(400, "request body shorter than its Content-Length"),
        _ => BadRequest::new(400, "cannot read the request"),
    }
}

/// What the API answers for a query key or value it cannot decode.
fn bad_query(e: PercentError) -> BadRequest {
    match e {
        PercentError::BadEscape => BadRequest::new(400, "a query parameter has a % not followed by two hex digits"),
        PercentError::NotUtf8 => BadRequest::new(400, "a query parameter is not UTF-8 once percent-decoded"),
    }
}

/// What the API answers for a request head it cannot parse.
fn bad_head(e: &HeadError) -> BadRequest {
    match e {
        HeadError::TooLarge { .. } => BadRequest::new(e.status(), "request head larger than 16 KiB"),
        HeadError::TooManyHeaders => BadRequest::new(e.status(), "more than 64 header fields"),
        HeadError::Malformed(_) => BadRequest::new(e.status(), "malformed request"),
    }
}

/// One client connection: the stream and the bytes read from it that no
/// request has used yet (the start of the next head, or of a body).
struct ConnReader {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4096;

impl ConnReader {
    /// Reads more bytes into `buf`; `Ok(0)` at the end of the stream.
    fn fill(&mut self) -> io::Result<usize> {
        let at = self.buf.len();
        self.buf.resize(at + READ_CHUNK, 0);
        let r = loop {
            match self.stream.read(&mut self.buf[at..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        self.buf.truncate(at + *r.as_ref().unwrap_or(&0));
        r
    }
}

/// Reads the next request: its head, parsed by the HTTP head parser the
/// WebSocket handshake uses ([`RequestHead`]), then its body.
/// `Ok(None)`: the client closed the connection before a whole head.
fn read_request(c: &mut ConnReader, token: Option<&str>) -> Result<Option<Request>, BadRequest> {
    loop {
        match RequestHead::parse(&c.buf, MAX_HEAD_BYTES) {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => return Err(bad_head(&e)),
        }
        if c.fill().map_err(|e| read_failure(&e))? == 0 {
            return Ok(None);
        }
    }
    // Parsed again, now to keep: the loop above may not hold a borrow of
    // `c.buf` across the reads that grow it.
    let head =
        RequestHead::parse(&c.buf, MAX_HEAD_BYTES).ok().flatten().ok_or(BadRequest::new(400, "malformed request"))?;
    let dup = |_| BadRequest::new(400, "a header that may appear once appears more than once");
    let len = match head.single("Content-Length").map_err(dup)? {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or(BadRequest::new(400, "Content-Length is not a number"))?,
        None => 0,
    };
    let authorized = match token {
        None => true,
        Some(t) => head
            .single("Authorization")
            .map_err(dup)?
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .is_some_and(|v| token_matches(v, t.as_bytes())),
    };
    let close = head.has_token("Connection", "close") || head.version() == 0;
    if len > MAX_BODY_BYTES {
        return Err(BadRequest::new(413, "body larger than 1 MiB"));
    }
    let (method, path, head_len) = (head.method().to_string(), head.path().to_string(), head.len());
    let query = head.query().to_string();
    // The body: what was read past the head, then the rest from the socket.
    c.buf.drain(..head_len);
    while c.buf.len() < len {
        match c.fill() {
            Ok(0) => return Err(read_failure(&io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) => return Err(read_failure(&e)),
        }
    }
    let rest = c.buf.split_off(len);
    let body = std::mem::replace(&mut c.buf, rest);
    // Decoded once the body is read: an error answer then leaves no unread
    // bytes behind, which would turn the close into a reset.
    let query = http::query_pairs(&query)
        .map(|(k, v)| Ok((http::percent_decode(k).map_err(bad_query)?, http::percent_decode(v).map_err(bad_query)?)))
        .collect::<Result<_, BadRequest>>()?;
    Ok(Some(Request { method, path, query, authorized, body, close }))
}

/// Compares a presented token with the configured one in time that does
/// not depend on where they differ (or on their lengths): both are hashed
/// with SHA-256 and the digests compared without an early exit, so timing
/// the answers cannot recover the token byte by byte.
fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(presented), Sha256::digest(expected));
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box: the optimiser may not turn the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Every path the API serves, with its method (for 405 and `Allow`).
const ROUTES: &[(&str, &str)] = &[
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/stats", "GET"),
    ("/metrics", "GET"),
    ("/room", "GET"),
    ("/push", "POST"),
    ("/inbox", "GET"),
    ("/publish", "POST"),
    ("/broadcast", "POST"),
    ("/kick", "POST"),
    ("/join", "POST"),
    ("/leave", "POST"),
    ("/bench/send_ceiling", "POST"),
];

/// The method `path` is served with, if it is served at all.
fn allowed_method(path: &str, bench: bool) -> Option<&'static str> {
    ROUTES.iter().find(|(p, _)| *p == path && (bench || !p.starts_with("/bench/"))).map(|(_, m)| *m)
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// How long a reliable push or an inbox query waits for the store.
const STORE_WAIT: Duration = Duration::from_secs(10);

fn store_error(e: crate::store::StoreError) -> (u16, serde_json::Value) {
    let (status, code) = match e {
        crate::store::StoreError::InboxFull { .. } => (507, crate::ErrorCode::InboxFull),
        crate::store::StoreError::StoreFull { .. } => (507, crate::ErrorCode::StoreFull),
        crate::store::StoreError::Unavailable(_) => (503, crate::ErrorCode::StoreUnavailable),
    };
    (status, json!({ "error": e.to_string(), "code": code as u16 }))
}

/// `POST /push`: reliable (waits until stored) or at most once.
fn push(req: &Request, h: &Handle, user: &str) -> (u16, serde_json::Value) {
    let reliable = match param(&req.query, "mode") {
        None => h.reliable_by_default(),
        Some("reliable") => true,
        Some("at_most_once") => false,
        Some(m) => return (400, json!({ "error": format!("mode={m}: use reliable or at_most_once") })),
    };
    if !reliable {
        return match h.push_to_user(user, &req.body) {
            Ok(p) => (200, json!({ "msg_id": p.msg_id, "connections": p.connections, "stored": false })),
            Err(e) => push_error(e),
        };
    }
    let client_id = match param(&req.query, "client_id").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(id)) => id,
        Some(Err(_)) => return (400, json!({ "error": "client_id must be an integer 0..2^64-1" })),
    };
    let pending = match h.push_reliable(user, &req.body, client_id) {
        Ok(p) => p,
        Err(e) => return push_error(e),
    };
    match pending.wait_timeout(STORE_WAIT) {
        None => (504, json!({ "error": "the store did not answer in time; the message may or may not be stored" })),
        Some(Err(e)) => store_error(e),
        Some(Ok(r)) => (
            200,
            json!({
                "msg_id": r.msg_id,
                "seq": r.seq,
                "duplicate": r.duplicate,
                "connections": r.connections,
                "stored": true,
                "durability": match r.durability {
                    Some(crate::store::Durability::Fsync) => "fsync",
                    Some(crate::store::Durability::Os) => "os",
                    None => "memory",
                },
            }),
        ),
    }
}

fn inbox(h: &Handle, user: &str) -> (u16, serde_json::Value) {
    match h.inbox_state(user, STORE_WAIT) {
        Ok(s) => (
            200,
            json!({
                "user": user,
                "head_seq": s.head_seq,
                "first_seq": s.first_seq,
                "messages": s.messages,
                "bytes": s.bytes,
                "devices": s.devices.iter().map(|d| json!({
                    "device": d.device,
                    "position": d.position,
                    "pending": s.head_seq.saturating_sub(d.position),
                    "last_seen_ms": d.last_seen_ms,
                })).collect::<Vec<_>>(),
            }),
        ),
        Err(crate::server::InboxStateError::Push(e)) => push_error(e),
        Err(crate::server::InboxStateError::Store(e)) => store_error(e),
        Err(crate::server::InboxStateError::Timeout) => (504, json!({ "error": "the store did not answer in time" })),
    }
}

/// The store thread's counters for `/stats` (each read on its own: the
/// set is not one snapshot).
fn store_counters(c: &crate::store::StoreCounters) -> serde_json::Value {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "appends": get(&c.appends),
        "duplicates": get(&c.duplicates),
        "syncs": get(&c.syncs),
        "appended_per_sync_sum": get(&c.appended_per_sync_sum),
        "reads": get(&c.reads),
        "refusals": get(&c.refusals),
        "errors": get(&c.errors),
        "busy": get(&c.busy),
        "queue_depth": get(&c.queue_depth),
        "expired": get(&c.expired),
    })
}

fn push_error(e: PushError) -> (u16, serde_json::Value) {
    let status = match e {
        PushError::Full { .. } | PushError::ShuttingDown | PushError::StoreBusy => 503,
        _ => 400,
    };
    (status, json!({ "error": e.to_string() }))
}

fn route(req: &Request, h: &Handle, bench: bool) -> (u16, serde_json::Value) {
    if !req.authorized {
        return (401, json!({ "error": "missing or wrong bearer token (admin.token)" }));
    }
    let need =
        |name: &str| param(&req.query, name).ok_or_else(|| (400, json!({ "error": format!("missing ?{name}=") })));
    let r: Result<(u16, serde_json::Value), (u16, serde_json::Value)> = (|| {
        Ok(match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/healthz") => (200, json!({ "status": "ok" })),
            ("GET", "/readyz") => {
                if h.is_ready() {
                    (200, json!({ "ready": true }))
                } else {
                    (503, json!({ "ready": false }))
                }
            }
            ("GET", "/stats") => (
                200,
                json!({
                    "stats": h.stats(),
                    "users": h.user_count(),
                    "users_offline_retained": h.offline_retained_count(),
                    "rooms": h.room_count(),
                    "connections_per_worker": h.connections_per_worker(),
                    "workers": h.workers(),
                    "store": h.store_counters().map(|c| store_counters(&c)),
                }),
            ),
            ("POST", "/push") => push(req, h, need("user")?),
            ("GET", "/inbox") => inbox(h, need("user")?),
            ("POST", "/publish") => match h.publish_to_room(need("room")?, &req.body) {
                Ok(p) => (200, json!({ "msg_id": p.msg_id, "workers": p.workers })),
                Err(e) => push_error(e),
            },
            ("POST", "/broadcast") => match h.broadcast(&req.body) {
                Ok(p) => (200, json!({ "msg_id": p.msg_id, "workers": p.workers })),
                Err(e) => push_error(e),
            },
            ("POST", "/kick") => match h.kick_user(need("user")?) {
                Ok(n) => (200, json!({ "connections": n })),
                Err(e) => push_error(e),
            },
            ("POST", "/join") => match h.join_room(need("user")?, need("room")?) {
                Ok(n) => (200, json!({ "connections": n })),
                Err(e) => push_error(e),
            },
            ("POST", "/leave") => match h.leave_room(need("user")?, need("room")?) {
                Ok(n) => (200, json!({ "connections": n })),
                Err(e) => push_error(e),
            },
            ("GET", "/room") => {
                let room = need("room")?;
                (200, json!({ "room": room, "size": h.room_size(room) }))
            }
            ("POST", "/bench/send_ceiling") if bench => {
                let bytes: usize = param(&req.query, "bytes").and_then(|b| b.parse().ok()).unwrap_or(64);
                let seq: u32 = param(&req.query, "seq").and_then(|b| b.parse().ok()).unwrap_or(u32::MAX);
                let payload = crate::timed::payload(seq, bytes);
                match h.bench_send_ceiling(need("room")?, &payload) {
                    Ok(samples) => (
                        200,
                        json!(samples
                            .iter()
                            .map(|s| json!({ "sends": s.sends, "elapsed_ns": s.elapsed.as_nanos() as u64 }))
                            .collect::<Vec<_>>()),
                    ),
                    Err(e) => push_error(e),
                }
            }
            _ => match allowed_method(&req.path, bench) {
                Some(m) => (405, json!({ "error": format!("{} takes {m}, not {}", req.path, req.method) })),
                None => (404, json!({ "error": format!("no route for {} {}", req.method, req.path) })),
            },
        })
    })();
    r.unwrap_or_else(|e| e)
}

/// A JSON response, with `Allow` for a 405; `close` ends the connection
/// after it.
fn json_response(status: u16, body: &str, allow: Option<&str>, close: bool) -> Vec<u8> {
    let allow: &[(&str, &str)] = match allow {
        Some(m) => &[("Allow", m)],
        None => &[],
    };
    http::response(status, "application/json", body.as_bytes(), allow, close)
}

fn serve_conn(stream: TcpStream, h: &Handle, token: Option<&str>, bench: bool, stop: &AtomicBool) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = stream.try_clone()?;
    let mut r = ConnReader { stream, buf: Vec::new() };
    while !stop.load(Ordering::Acquire) {
        let req = match read_request(&mut r, token) {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(bad) => {
                let body = json!({ "error": bad.error }).to_string();
                let _ = w.write_all(&json_response(bad.status, &body, None, true));
                return Ok(());
            }
        };
        if req.authorized && (req.method.as_str(), req.path.as_str()) == ("GET", "/metrics") {
            let body = crate::metrics::render(h);
            w.write_all(&http::response(200, crate::metrics::CONTENT_TYPE, body.as_bytes(), &[], req.close))?;
            if req.close {
                return Ok(());
            }
            continue;
        }
        let (status, body) = route(&req, h, bench);
        let allow = if status == 405 { allowed_method(&req.path, bench) } else { None };
        w.write_all(&json_response(status, &body.to_string(), allow, req.close))?;
        w.flush()?;
        if req.close {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison_accepts_only_the_exact_token() {
        use super::token_matches;
        let t = b"0123456789abcdef-admin";
        assert!(token_matches(t, t));
        assert!(!token_matches(b"0123456789abcdef-admin ", t), "longer");
        assert!(!token_matches(b"0123456789abcdef-admi", t), "a prefix");
        assert!(!token_matches(b"1123456789abcdef-admin", t), "first byte differs");
        assert!(!token_matches(b"0123456789abcdef-admiN", t), "last byte differs");
        assert!(!token_matches(b"", t));
    }

    #[test]
    fn undecodable_queries_are_400_in_the_api_words() {
        use super::{bad_query, PercentError};
        let e = bad_query(PercentError::NotUtf8);
        assert_eq!(e.status, 400);
        assert!(e.error.contains("UTF-8"), "{e:?}");
        assert!(bad_query(PercentError::BadEscape).error.contains("hex digits"));
    }

    #[test]
    fn read_failures_are_told_in_the_api_words() {
        use super::read_failure;
        let timeout = read_failure(&std::io::Error::from_raw_os_error(libc::EAGAIN));
        assert_eq!((timeout.status, timeout.error), (408, "request not complete within 10 s"));
        let other = read_failure(&std::io::Error::from_raw_os_error(libc::ECONNRESET));
        assert!(!other.error.contains("os error"), "{other:?}");
    }
}
