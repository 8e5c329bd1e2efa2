//! The admin HTTP API over a real socket.

mod common;

use common::*;
use switchboard::loadgen::http;
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
    assert_eq!(stats["workers"], 2);

    // Errors are JSON with a status that says what went wrong.
    let (status, body) = http(a, "POST", "/push", b"x", None).unwrap();
    assert_eq!(status, 400);
    assert!(json(&body)["error"].as_str().unwrap().contains("user"));
    assert_eq!(http(a, "GET", "/nope", b"", None).unwrap().0, 404);
    assert_eq!(http(a, "POST", "/bench/send_ceiling?room=x", b"", None).unwrap().0, 404, "bench endpoints are off");

    let (status, _) = http(a, "POST", "/kick?user=alice", b"", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(alice.recv_close_code().unwrap(), Some(switchboard::CloseCode::Kicked as u16));
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
