//! The admin HTTP API: health, readiness, stats, and pushes from backends
//! that are not written in Rust.
//!
//! Owns: one listener and one thread (`sb-admin`), serving small HTTP/1.1
//! requests one connection at a time, with keep-alive. Every call maps to a
//! `Handle` method.
//! Must not: be on any connection's path. It is a control plane: a few
//! requests per second from an operator or a backend, not a data plane for
//! millions of pushes (embed the server and use the `Handle` for that).
//!
//! Endpoints (JSON bodies out; message payloads in as the raw request body):
//! - `GET /healthz` → 200 while the process serves.
//! - `GET /readyz` → 200 when accepting, 503 once shutting down or draining.
//! - `GET /stats` → counters, users, rooms, connections per worker.
//! - `POST /push?user=U`, `POST /publish?room=R`, `POST /broadcast`,
//!   `POST /kick?user=U`, `POST /join?user=U&room=R`,
//!   `POST /leave?user=U&room=R`, `GET /room?room=R`.
//! - `POST /bench/send_ceiling?room=R&bytes=N`, only with
//!   `admin.bench_endpoints = true`.
//!
//! With `admin.token` set, every request needs `Authorization: Bearer
//! <token>`; a non-loopback listener requires a token (checked at start).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

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

/// Percent-decodes a query key or value (`+` is a space; a `%` not followed
/// by two hex digits stays as it is). Decoded bytes that are not UTF-8 are
/// an error, not U+FFFD: `%ff%fe` and `%fe%ff` must not name the same user.
fn percent_decode(s: &str) -> Result<String, BadRequest> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 3 <= b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| BadRequest::new(400, "a query parameter is not UTF-8 once percent-decoded"))
}

fn read_request(r: &mut BufReader<TcpStream>, token: Option<&str>) -> Result<Option<Request>, BadRequest> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head).map_err(|e| read_failure(&e))?;
        if n == 0 {
            return Ok(None);
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(BadRequest::new(431, "request head too large"));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(BadRequest::new(400, "malformed request")),
    }
    let (mut len, mut authorized, mut close) = (0usize, token.is_none(), false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(usize::MAX);
        } else if h.name.eq_ignore_ascii_case("authorization") {
            if let Some(t) = token {
                authorized = h.value.strip_prefix(b"Bearer ").is_some_and(|v| token_matches(v, t.as_bytes()));
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    if len > MAX_BODY_BYTES {
        return Err(BadRequest::new(413, "body larger than 1 MiB"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| read_failure(&e))?;
    let target = req.path.unwrap_or("/");
    let (path, qs) = target.split_once('?').unwrap_or((target, ""));
    let query = qs
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect::<Result<_, BadRequest>>()?;
    Ok(Some(Request {
        method: req.method.unwrap_or("GET").to_string(),
        path: path.to_string(),
        query,
        authorized,
        body,
        close: close || req.version == Some(0),
    }))
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
    ("/room", "GET"),
    ("/push", "POST"),
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

fn push_error(e: PushError) -> (u16, serde_json::Value) {
    let status = match e {
        PushError::Full { .. } | PushError::ShuttingDown => 503,
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
                }),
            ),
            ("POST", "/push") => match h.push_to_user(need("user")?, &req.body) {
                Ok(p) => (200, json!({ "msg_id": p.msg_id, "connections": p.connections })),
                Err(e) => push_error(e),
            },
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

fn serve_conn(stream: TcpStream, h: &Handle, token: Option<&str>, bench: bool, stop: &AtomicBool) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    while !stop.load(Ordering::Acquire) {
        let req = match read_request(&mut r, token) {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(bad) => {
                let body = json!({ "error": bad.error }).to_string();
                let _ = write!(
                    w,
                    "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    bad.status,
                    crate::proto::ws::handshake::status_phrase(bad.status),
                    body.len()
                );
                return Ok(());
            }
        };
        let (status, body) = route(&req, h, bench);
        let body = body.to_string();
        let allow = match (status, allowed_method(&req.path, bench)) {
            (405, Some(m)) => format!("allow: {m}\r\n"),
            _ => String::new(),
        };
        write!(
            w,
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{allow}{}\r\n{body}",
            crate::proto::ws::handshake::status_phrase(status),
            body.len(),
            if req.close { "connection: close\r\n" } else { "" }
        )?;
        w.flush()?;
        if req.close {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

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
    fn percent_decoding() {
        let d = |s| percent_decode(s).unwrap();
        assert_eq!(d("a%20b+c%2Fd"), "a b c/d");
        assert_eq!(d("100%"), "100%");
        assert_eq!(d("%zz"), "%zz");
        assert_eq!(d("%C3%A9"), "é");
        assert_eq!(percent_decode("%ff%fe").unwrap_err().status, 400, "not UTF-8: refused, not U+FFFD");
        assert_eq!(percent_decode("%C3").unwrap_err().status, 400, "half a character");
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
