//! A plain HTTP/1.1 client for the backend API tests: one request per
//! connection, any headers, the whole answer back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An API answer: status, head (lowercased) and body.
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.head.lines().find_map(|l| l.strip_prefix(&name).and_then(|r| r.strip_prefix(": ")).map(str::trim))
    }
}

/// Sends `method path` with `headers` (a Host header is added unless one
/// is given) and `body`, and reads the whole answer.
pub fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse(&raw)
}

/// Parses a whole HTTP/1.1 answer (Content-Length framed, as the API sends).
pub fn parse(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Answer { status, head: head.to_ascii_lowercase(), body: body.to_string() }
}

/// A JSON POST with the key `key` (write or read).
pub fn post(addr: SocketAddr, path: &str, key: &str, body: &serde_json::Value) -> Answer {
    let auth = format!("Bearer {key}");
    let h = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    call(addr, "POST", path, &h, body.to_string().as_bytes())
}

/// A GET with the key `key`.
pub fn get(addr: SocketAddr, path: &str, key: &str) -> Answer {
    call(addr, "GET", path, &[("X-API-Key", key)], b"")
}
