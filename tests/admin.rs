//! The admin HTTP API over a real socket.

mod common;

use common::*;
use switchboard::proto::frame::Frame;
use switchboard::Server;

fn admin_server(token: Option<&str>) -> Server {
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = token.map(String::from);
    start(cfg)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn health_stats_and_pushes() {
    let server = admin_server(None);
    let a = server.admin_addr().unwrap();
    assert_eq!(http(a, "GET", "/healthz", b"", None).unwrap().0, 200);
    assert_eq!(http(a, "GET", "/readyz", b"", None).unwrap().0, 200);
    let (mut alice, _) = login(server.local_addr(), "alice");

    let (status, body) = http(a, "POST", "/push?user=alice", b"from a backend", None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["connections"], 1);
    assert_eq!(expect_push(&mut alice).2, b"from a backend");

    let (status, body) = http(a, "POST", "/join?user=alice&room=news%20desk", b"", None).unwrap();
    assert_eq!((status, json(&body)["connections"].as_u64()), (200, Some(1)));
    assert!(matches!(alice.recv().unwrap().frame(), Frame::RoomAck { room: "news desk", .. }));
    assert!(wait_until(std::time::Duration::from_secs(2), || server.handle().room_size("news desk") == 1));
    assert_eq!(json(&http(a, "GET", "/room?room=news+desk", b"", None).unwrap().1)["size"], 1);
    assert_eq!(http(a, "POST", "/publish?room=news%20desk", b"headline", None).unwrap().0, 200);
    match alice.recv().unwrap().frame() {
        Frame::RoomMsg { room, payload, .. } => assert_eq!((room, payload), ("news desk", &b"headline"[..])),
        other => panic!("expected ROOM_MSG, got {other:?}"),
    }
    assert_eq!(http(a, "POST", "/broadcast", b"all", None).unwrap().0, 200);
    assert!(matches!(alice.recv().unwrap().frame(), Frame::RoomMsg { room: "", .. }));

    let stats = json(&http(a, "GET", "/stats", b"", None).unwrap().1);
    assert_eq!(stats["stats"]["logged_in"], 1);
    assert_eq!(stats["users"], 1);
    assert_eq!(stats["users_offline_retained"], 0);
    assert_eq!(stats["workers"], 2);
    // The reliable push above was stored and synced.
    let store = &stats["store"];
    assert_eq!(store["appends"], 1, "{stats}");
    assert!(store["syncs"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(store["appended_per_sync_sum"], 1, "{stats}");
    assert_eq!(store["queue_depth"], 0, "{stats}");
    // alice has no device: her message waits for the TTL.
    assert_eq!(store["pending_messages"], 1, "{stats}");
    assert!(store["pending_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(store["stopped"], false, "{stats}");

    // Errors are JSON with a status that says what went wrong.
    let (status, body) = http(a, "POST", "/push", b"x", None).unwrap();
    assert_eq!(status, 400);
    assert!(json(&body)["error"].as_str().unwrap().contains("user"));
    assert_eq!(http(a, "GET", "/nope", b"", None).unwrap().0, 404);
    assert_eq!(http(a, "POST", "/bench/send_ceiling?room=x", b"", None).unwrap().0, 404, "bench endpoints are off");

    let (status, _) = http(a, "POST", "/kick?user=alice", b"", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(alice.recv_close_code().unwrap(), Some(switchboard::CloseCode::Kicked as u16));
    // Alice is offline now; her directory entry stays a while for a quick
    // reconnect, and /stats says so instead of counting her as a user.
    assert!(wait_until(std::time::Duration::from_secs(2), || {
        let stats = json(&http(a, "GET", "/stats", b"", None).unwrap().1);
        stats["users"] == 0 && stats["users_offline_retained"] == 1
    }));
}

#[test]
fn a_token_is_required_when_configured() {
    let server = admin_server(Some("0123456789abcdef-admin"));
    let a = server.admin_addr().unwrap();
    assert_eq!(http(a, "GET", "/stats", b"", None).unwrap().0, 401);
    assert_eq!(http(a, "GET", "/stats", b"", Some("wrong")).unwrap().0, 401);
    assert_eq!(http(a, "GET", "/stats", b"", Some("0123456789abcdef-admin")).unwrap().0, 200);
}

#[test]
fn readiness_turns_off_at_shutdown() {
    let server = admin_server(None);
    let a = server.admin_addr().unwrap();
    let h = server.handle();
    h.shutdown();
    assert_eq!(http(a, "GET", "/readyz", b"", None).unwrap().0, 503);
    server.join().unwrap();
    assert!(http(a, "GET", "/healthz", b"", None).is_err(), "the admin listener goes with the server");
}

/// The whole response to `request`, sent as is; with `half_close`, the
/// request side is shut after it.
fn raw_exchange(a: std::net::SocketAddr, request: &[u8], half_close: bool) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A known path with the wrong method is 405 with `Allow` naming the right
/// one (it was 404, as if the path did not exist); an unknown path stays 404.
#[test]
fn a_wrong_method_is_405_with_allow() {
    let server = admin_server(None);
    let a = server.admin_addr().unwrap();
    let r = raw_exchange(a, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", false);
    assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
    assert!(r.to_ascii_lowercase().contains("\r\nallow: get\r\n"), "{r}");
    let r = raw_exchange(a, b"GET /push?user=alice HTTP/1.1\r\nConnection: close\r\n\r\n", false);
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    assert!(r.to_ascii_lowercase().contains("\r\nallow: post\r\n"), "{r}");
    assert_eq!(http(a, "GET", "/nope", b"", None).unwrap().0, 404);
    // The bench endpoint does not exist unless turned on: 404, not 405.
    assert_eq!(http(a, "GET", "/bench/send_ceiling?room=x", b"", None).unwrap().0, 404);
}

/// Percent-encoded bytes that are not UTF-8 are a 400: they used to become
/// U+FFFD, so `%ff%fe` and `%fe%ff` named the same user.
#[test]
fn a_query_that_is_not_utf8_is_400() {
    let server = admin_server(None);
    let a = server.admin_addr().unwrap();
    let (status, body) = http(a, "POST", "/push?user=%ff%fe", b"x", None).unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("UTF-8"), "{body}");
    let (status, body) = http(a, "GET", "/room?room=caf%C3%A9", b"", None).unwrap();
    assert_eq!((status, json(&body)["room"].as_str()), (200, Some("café")), "{body}");
}

/// The legacy room size follows the API's rule for room names (1 to 255
/// bytes, 400 otherwise), as `/api/v1/room_sizes` does: an empty or
/// overlong name used to get a size of 0.
#[test]
fn a_legacy_room_size_of_a_name_no_room_can_have_is_400() {
    let server = admin_server(None);
    let a = server.admin_addr().unwrap();
    for room in [String::new(), "a".repeat(256)] {
        let (status, body) = http(a, "GET", &format!("/room?room={room}"), b"", None).unwrap();
        assert_eq!(status, 400, "{} bytes: {body}", room.len());
    }
    let (status, _) = http(a, "GET", &format!("/room?room={}", "a".repeat(255)), b"", None).unwrap();
    assert_eq!(status, 200);
}

/// Error bodies say what was wrong with the request in the API's words,
/// never an OS error's text ("Resource temporarily unavailable (os error
/// 11)", "failed to fill whole buffer").
#[test]
fn error_bodies_carry_no_os_error_text() {
    let server = admin_server(None);
    let a = server.admin_addr().unwrap();
    let r =
        raw_exchange(a, b"POST /push?user=alice HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc", true);
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    let body = r.split_once("\r\n\r\n").unwrap().1;
    let error = json(body)["error"].as_str().unwrap().to_string();
    assert!(error.contains("Content-Length"), "{error}");
    assert!(!error.contains("os error") && !error.contains("fill whole buffer"), "{error}");
}
