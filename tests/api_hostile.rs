//! Hostile clients of the backend API (issue: a silent connection delayed
//! `/healthz` by 10 s, a request head without a newline grew RSS by its
//! size, a chunked body smuggled a second request, a cross-site browser
//! POST was obeyed). A binary of its own: the memory test reads the
//! process's RSS, which other tests' allocations would disturb; its tests
//! run one at a time.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::api::{call, parse, post};
use common::*;
use serde_json::json;
use switchboard::client::Client;
use switchboard::Server;

/// One test at a time (see the module doc).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// An API on loopback without a key: what the checks of Host, Origin and
/// content type protect.
fn api_server() -> Server {
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.header_timeout_ms = 5_000;
    start(cfg)
}

/// Nothing arrives at `c` within 300 ms.
fn nothing_arrives(c: &mut Client) {
    c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    if let Ok(f) = c.recv_skipping_pings() {
        panic!("got {:?}", f.frame());
    }
}

fn push_json(user: &str, text: &str) -> Vec<u8> {
    json!({ "user": user, "text": text, "mode": "at_most_once" }).to_string().into_bytes()
}

#[test]
fn silent_and_slow_clients_do_not_delay_health_or_pushes() {
    let _s = serial();
    let server = api_server();
    let a = server.admin_addr().unwrap();
    let (mut alice, _) = login(server.local_addr(), "alice");
    // 500 connections that send nothing.
    let silent: Vec<TcpStream> = (0..500).map(|_| TcpStream::connect(a).unwrap()).collect();
    // 5 that send their head one byte a second.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow: Vec<_> = (0..5)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(a).unwrap();
                for b in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n".iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        assert_eq!(call(a, "GET", "/healthz", &[], b"").status, 200);
        worst = worst.max(t.elapsed());
        let t = Instant::now();
        let h = [("Content-Type", "application/json")];
        let r = call(a, "POST", "/api/v1/push", &h, &push_json("alice", &format!("p{i}")));
        assert_eq!(r.status, 200, "{}", r.body);
        let (_, _, p) = expect_push(&mut alice);
        worst = worst.max(t.elapsed());
        assert_eq!(p, format!("p{i}").as_bytes());
    }
    // 300 ms: the neighbouring test's 100 ms bound failed once, at 110.9 ms,
    // in a full run on a busy 2-core host; a request stuck behind the
    // slow clients would wait for their 5 s header timeout.
    assert!(worst < Duration::from_millis(300), "a request took {worst:?} next to 505 idle or slow clients");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // The slow heads are cut off at admin.header_timeout_ms (5 s here),
    // and so are the silent connections: their reads see the close.
    let mut s = silent.into_iter().next().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(t.elapsed() < Duration::from_secs(10), "a silent connection was held {:?}", t.elapsed());
    for t in slow {
        t.join().unwrap();
    }
}

/// A batch of 300,000 commands runs on the blocking pool, not on the
/// event loop: `/healthz` answers while it runs. (Run on the event loop,
/// this batch held a health check for 426 ms here; on the pool, 17 ms.
/// The bound is 200 ms, under half the first: 100 ms failed once, at
/// 110.9 ms, in a full run on a busy 2-core host.)
#[test]
fn a_huge_batch_does_not_hold_up_health_checks() {
    let _s = serial();
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.max_batch_commands = 300_000;
    let server = start(cfg);
    let a = server.admin_addr().unwrap();
    let commands: Vec<serde_json::Value> = (0..300_000)
        .map(|i| json!({ "push": { "user": format!("off{i}"), "text": "x", "mode": "at_most_once" } }))
        .collect();
    let body = json!({ "commands": commands }).to_string();
    let batch = std::thread::spawn(move || {
        let t = Instant::now();
        let r = call(a, "POST", "/api/v1/batch", &[("Content-Type", "application/json")], body.as_bytes());
        (r.status, t.elapsed())
    });
    let mut worst = Duration::ZERO;
    let mut probes = 0;
    while !batch.is_finished() {
        let t = Instant::now();
        assert_eq!(call(a, "GET", "/healthz", &[], b"").status, 200);
        worst = worst.max(t.elapsed());
        probes += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let (status, took) = batch.join().unwrap();
    assert_eq!(status, 200);
    eprintln!("the batch took {took:?}; {probes} health checks, the slowest {worst:?}");
    assert!(worst < Duration::from_millis(200), "a health check took {worst:?} during the batch");
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn a_head_of_300_mib_without_a_newline_costs_no_memory() {
    let _s = serial();
    let server = api_server();
    let a = server.admin_addr().unwrap();
    // Warm up: the API thread, its runtime and a connection's buffers.
    assert_eq!(call(a, "GET", "/healthz", &[], b"").status, 200);
    let before = rss_bytes();
    let mut s = TcpStream::connect(a).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /").unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 300 << 20 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let after = rss_bytes();
    // The server answered 431 and closed after its 16 KiB head buffer.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let grew = after.saturating_sub(before);
    eprintln!("sent {sent} bytes of head; RSS grew by {grew} bytes; answer {:?}", parse(&answer).status);
    assert!(sent < 300 << 20, "the server read all {sent} bytes of a head without a newline");
    assert!(grew < 1 << 20, "RSS grew by {grew} bytes");
    assert_eq!(call(a, "GET", "/healthz", &[], b"").status, 200);
}

/// Sends `request` on a connection of its own and reads until it closes.
fn exchange(a: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_request_smuggled_in_a_chunked_body_is_not_executed() {
    let _s = serial();
    let server = api_server();
    let a = server.admin_addr().unwrap();
    let (mut bob, _) = login(server.local_addr(), "bob");
    let smuggled = "POST /broadcast HTTP/1.1\r\nHost: localhost\r\nContent-Length: 8\r\n\r\nsmuggled";
    // A chunked body that carries a whole request: the body is its chunk,
    // not a second request (the old server ignored Transfer-Encoding).
    let chunked = format!(
        "POST /api/v1/kick HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
        smuggled.len()
    );
    let next = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let text = exchange(a, format!("{chunked}{next}").as_bytes());
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "the kick's 400 and the health check's 200, nothing else: {text}");
    nothing_arrives(&mut bob);
    // Content-Length and Transfer-Encoding together: framed by
    // Transfer-Encoding alone (RFC 9112 6.1: a front that used the length
    // would have sent the smuggled bytes as a request of their own), and
    // the connection is closed after the answer, so nothing after the
    // chunked body is read as a request.
    let both = format!(
        "POST /api/v1/presence HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
    );
    let text = exchange(a, both.as_bytes());
    assert!(text.starts_with("HTTP/1.1 400 "), "an empty body is not a presence query: {text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    // Two different Content-Lengths: 400, and the connection closed.
    let two = format!(
        "POST /broadcast HTTP/1.1\r\nHost: localhost\r\nContent-Length: 8\r\nContent-Length: 0\r\n\r\n{smuggled}"
    );
    let text = exchange(a, two.as_bytes());
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    nothing_arrives(&mut bob);
}

/// A client may shut its write side once its request is sent (RFC 9112
/// 9.6 lets it; `curl` over a pipe and some proxies do). Found by a
/// hostile-input probe: the server dropped the request half-way at the
/// read's end of file, so the push was stored but never answered, and a
/// retry without `client_id` stored it twice.
#[test]
fn a_request_from_a_client_that_shut_its_write_side_is_answered() {
    let _s = serial();
    let server = api_server();
    let a = server.admin_addr().unwrap();
    let host = format!("Host: 127.0.0.1:{}\r\n", a.port());
    for i in 0..10 {
        let body = json!({ "user": "dora", "text": format!("m{i}") }).to_string();
        let request = format!(
            "POST /api/v1/push HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 "), "push {i}: {text:?}");
        assert!(text.contains(&format!("\"seq\":{}", i + 1)), "push {i}: {text}");
    }
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET /api/v1/inbox?user=dora HTTP/1.1\r\n{host}\r\n").as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 ") && text.contains("\"head_seq\":10"), "{text}");
}

#[test]
fn cross_site_posts_and_foreign_hosts_are_refused() {
    let _s = serial();
    let server = api_server();
    let a = server.admin_addr().unwrap();
    let (mut carol, _) = login(server.local_addr(), "carol");
    let body = push_json("carol", "x");
    // A page on another site, shaped as a browser sends it.
    let browser = [("Origin", "https://evil.example"), ("Content-Type", "application/json")];
    let r = call(a, "POST", "/api/v1/push", &browser, &body);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call(a, "POST", "/push?user=carol", &[("Sec-Fetch-Site", "cross-site")], b"x");
    assert_eq!(r.status, 403, "{}", r.body);
    // text/plain needs no CORS preflight: refused even without Origin.
    let r = call(a, "POST", "/push?user=carol", &[("Content-Type", "text/plain")], b"x");
    assert_eq!(r.status, 415, "{}", r.body);
    // DNS rebinding: the attacker's name resolved to 127.0.0.1.
    let host = format!("evil.example:{}", a.port());
    let r = call(a, "POST", "/api/v1/push", &[("Host", &host), ("Content-Type", "application/json")], &body);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call(a, "GET", "/api/v1/stats", &[("Host", &host)], b"");
    assert_eq!(r.status, 403, "{}", r.body);
    // A header the checks read, given twice: refused whichever line comes
    // first (the first was taken, so a foreign Host or a form's content
    // type behind a good one got through; RFC 9112 3.2 asks 400 for two
    // Host lines).
    let good_host = a.to_string();
    for twice in [
        [("Host", good_host.as_str()), ("Host", host.as_str())],
        [("Host", host.as_str()), ("Host", good_host.as_str())],
        [("Content-Type", "application/json"), ("Content-Type", "text/plain")],
        [("Content-Type", "text/plain"), ("Content-Type", "application/json")],
        [("Origin", "http://evil.example"), ("Origin", "http://127.0.0.1")],
    ] {
        let r = call(a, "POST", "/api/v1/push", &twice, &body);
        assert_eq!(r.status, 400, "{twice:?}: {}", r.body);
        assert!(r.body.contains("more than once"), "{twice:?}: {}", r.body);
    }
    nothing_arrives(&mut carol);
    // The same request from a backend (no Origin, loopback Host) is served.
    let r = post(a, "/api/v1/push", "", &json!({ "user": "carol", "text": "ok", "mode": "at_most_once" }));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(expect_push(&mut carol).2, b"ok");
    // Probes answer whatever the Host: a load balancer's is its own.
    let r = call(a, "GET", "/healthz", &[("Host", "10.1.2.3:80")], b"");
    assert_eq!(r.status, 200);
}

/// The API serves many clients at once over keep-alive: 50 threads, 20
/// requests each on one connection.
#[test]
fn keep_alive_clients_are_served_concurrently() {
    let _s = serial();
    let server = api_server();
    let a: SocketAddr = server.admin_addr().unwrap();
    let threads: Vec<_> = (0..50)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(a).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut buf = vec![0u8; 4096];
                for _ in 0..20 {
                    s.write_all(b"GET /api/v1/stats HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
                    let mut got = Vec::new();
                    // One answer: head, then Content-Length bytes of body.
                    loop {
                        let n = s.read(&mut buf).unwrap();
                        assert!(n > 0, "closed mid keep-alive");
                        got.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&got).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(String::from))
                                .unwrap()
                                .trim()
                                .parse()
                                .unwrap();
                            if body.len() >= len {
                                assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
