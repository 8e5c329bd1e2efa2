//! The backend API's routes over real HTTP (docs/API.md): each route's
//! success and error paths, keys and scopes, pushes that arrive at raw and
//! WebSocket clients, and a batch of 10,000 pushes counted exactly.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::api::{call, get, post};
use common::*;
use serde_json::{json, Value};
use switchboard::client::Client;
use switchboard::proto::frame::Frame;
use switchboard::Server;

const WRITE: &str = "write-key-0123456789abcdef";
const READ: &str = "read-key-0123456789abcdef";

fn api_server(ws: bool) -> Server {
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = Some(WRITE.into());
    cfg.admin.read_token = Some(READ.into());
    cfg.admin.max_body_bytes = 4096;
    if ws {
        cfg.websocket.listen = "127.0.0.1:0".into();
    }
    start(cfg)
}

/// The next PUSH's payload, as text.
fn next_push(c: &mut Client) -> String {
    let (_, _, payload) = expect_push(c);
    String::from_utf8(payload).unwrap()
}

#[test]
fn keys_and_scopes() {
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    // Probes need no key.
    assert_eq!(call(a, "GET", "/healthz", &[], b"").status, 200);
    assert_eq!(call(a, "GET", "/readyz", &[], b"").status, 200);
    // No key: 401 with WWW-Authenticate; a wrong one: 401.
    let r = call(a, "GET", "/api/v1/stats", &[], b"");
    assert_eq!((r.status, r.header("www-authenticate")), (401, Some("bearer")), "{}", r.body);
    assert_eq!(get(a, "/api/v1/stats", "not-the-key-0123456789").status, 401);
    // Either key reads, as Bearer or X-API-Key.
    assert_eq!(get(a, "/api/v1/stats", READ).status, 200);
    let bearer = format!("Bearer {READ}");
    assert_eq!(call(a, "GET", "/api/v1/stats", &[("Authorization", &bearer)], b"").status, 200);
    assert_eq!(get(a, "/api/v1/stats", WRITE).status, 200);
    // Only the write key writes.
    let push = json!({ "user": "alice", "text": "x", "mode": "at_most_once" });
    let r = post(a, "/api/v1/push", READ, &push);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("read_token"), "{}", r.body);
    assert_eq!(post(a, "/api/v1/push", WRITE, &push).status, 200);
    // The legacy routes need the key too.
    assert_eq!(call(a, "GET", "/stats", &[], b"").status, 401);
}

#[test]
fn pushes_to_users_one_or_many_reliable_or_not() {
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    let (mut alice, _) = login(server.local_addr(), "alice");
    let (mut bob, _) = login(server.local_addr(), "bob");

    // At most once, as text: live only, to each connection.
    let r = post(a, "/api/v1/push", WRITE, &json!({ "user": "alice", "text": "hi", "mode": "at_most_once" }));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((r.json()["connections"].as_u64(), r.json()["stored"].as_bool()), (Some(1), Some(false)));
    assert_eq!(next_push(&mut alice), "hi");

    // Reliable (the default with a store), binary as base64: stored with a seq.
    let r = post(a, "/api/v1/push", WRITE, &json!({ "user": "carol", "payload": "3q2+7w==" }));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (v["stored"].as_bool(), v["seq"].as_u64(), v["durability"].as_str()),
        (Some(true), Some(1), Some("memory"))
    );
    // Idempotent with a client_id.
    let again = json!({ "user": "carol", "payload": "3q2+7w==", "client_id": 7 });
    let first = post(a, "/api/v1/push", WRITE, &again).json();
    let second = post(a, "/api/v1/push", WRITE, &again).json();
    assert_eq!(
        (first["seq"].as_u64(), second["seq"].as_u64(), second["duplicate"].as_bool()),
        (Some(2), Some(2), Some(true))
    );
    let inbox = get(a, "/api/v1/inbox?user=carol", READ);
    assert_eq!((inbox.status, inbox.json()["head_seq"].as_u64()), (200, Some(2)), "{}", inbox.body);
    // The key is per user: the same client_id to another user is that
    // user's own message, stored, not taken for carol's.
    let other =
        post(a, "/api/v1/push", WRITE, &json!({ "user": "dave", "payload": "3q2+7w==", "client_id": 7 })).json();
    assert_eq!((other["seq"].as_u64(), other["duplicate"].as_bool()), (Some(1), Some(false)), "{other}");
    let inbox = get(a, "/api/v1/inbox?user=dave", READ);
    assert_eq!((inbox.status, inbox.json()["head_seq"].as_u64()), (200, Some(1)), "{}", inbox.body);
    // So a push to many users takes one key: retried (after a 504 for
    // some of them, say), it stores none of them twice.
    let many = json!({ "users": ["dave", "erin"], "text": "to both", "client_id": 8 });
    let first = post(a, "/api/v1/push", WRITE, &many).json();
    let second = post(a, "/api/v1/push", WRITE, &many).json();
    for (i, (seq, user)) in [(2, "dave"), (1, "erin")].into_iter().enumerate() {
        let (f, s) = (&first["results"][i], &second["results"][i]);
        assert_eq!(
            (f["status"].as_u64(), f["seq"].as_u64(), f["duplicate"].as_bool()),
            (Some(200), Some(seq), Some(false)),
            "{first}"
        );
        assert_eq!(
            (s["status"].as_u64(), s["seq"].as_u64(), s["duplicate"].as_bool()),
            (Some(200), Some(seq), Some(true)),
            "{second}"
        );
        let inbox = get(a, &format!("/api/v1/inbox?user={user}"), READ);
        assert_eq!(inbox.json()["head_seq"].as_u64(), Some(seq), "{}", inbox.body);
    }

    // Many users in one call: one result each, in order.
    let r = post(
        a,
        "/api/v1/push",
        WRITE,
        &json!({ "users": ["alice", "bob", "nobody"], "text": "all", "mode": "at_most_once" }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].as_array().unwrap().clone();
    let got: Vec<(String, u64, u64)> = results
        .iter()
        .map(|x| {
            (x["user"].as_str().unwrap().into(), x["status"].as_u64().unwrap(), x["connections"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(got, vec![("alice".into(), 200, 1), ("bob".into(), 200, 1), ("nobody".into(), 200, 0)]);
    assert_eq!(next_push(&mut alice), "all");
    assert_eq!(next_push(&mut bob), "all");

    // A raw body, parameters in the query string.
    let h = [("X-API-Key", WRITE), ("Content-Type", "application/octet-stream")];
    let r = call(a, "POST", "/api/v1/push?user=bob&mode=at_most_once", &h, b"\x00raw\xff");
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, _, p) = expect_push(&mut bob);
    assert_eq!(p, b"\x00raw\xff");
}

#[test]
fn bad_requests_say_what_is_wrong() {
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    let error = |r: common::api::Answer| (r.status, r.json()["error"].as_str().unwrap().to_string());
    let (s, e) = error(post(a, "/api/v1/push", WRITE, &json!({ "usr": "a", "text": "x" })));
    assert!(s == 400 && e.contains("usr"), "{s} {e}");
    let (s, e) = error(post(a, "/api/v1/push", WRITE, &json!({ "user": "a" })));
    assert!(s == 400 && e.contains("payload"), "{s} {e}");
    let (s, e) = error(post(a, "/api/v1/push", WRITE, &json!({ "user": "a", "payload": "not base64!" })));
    assert!(s == 400 && e.contains("base64"), "{s} {e}");
    let (s, e) = error(post(a, "/api/v1/push", WRITE, &json!({ "user": "a", "text": "x", "mode": "sometimes" })));
    assert!(s == 400 && e.contains("mode"), "{s} {e}");
    let (s, e) = error(post(a, "/api/v1/join", WRITE, &json!({ "user": "a" })));
    assert!(s == 400 && e.contains("room"), "{s} {e}");
    let (s, _) = error(post(a, "/api/v1/push", WRITE, &json!({ "user": "", "text": "x" })));
    assert_eq!(s, 400);
    // An idempotency key where nothing is stored.
    let amo = json!({ "user": "a", "text": "x", "mode": "at_most_once", "client_id": 3 });
    let (s, e) = error(post(a, "/api/v1/push", WRITE, &amo));
    assert!(s == 400 && e.contains("client_id"), "{s} {e}");
    // An expiry where nothing is stored, or out of its range.
    let amo = json!({ "user": "a", "text": "x", "mode": "at_most_once", "ttl_ms": 1000 });
    let (s, e) = error(post(a, "/api/v1/push", WRITE, &amo));
    assert!(s == 400 && e.contains("ttl_ms"), "{s} {e}");
    for ttl in [json!(0), json!(4_294_967_296u64), json!(-1), json!("60000")] {
        let (s, e) = error(post(a, "/api/v1/push", WRITE, &json!({ "user": "a", "text": "x", "ttl_ms": ttl })));
        assert!(s == 400 && e.contains("ttl_ms"), "{ttl}: {s} {e}");
    }
    // Names in lists are checked like single ones, by position.
    let (s, e) = error(post(a, "/api/v1/presence", READ, &json!({ "users": ["a", ""] })));
    assert!(s == 400 && e.contains("users[1]"), "{s} {e}");
    let long = "r".repeat(300);
    let (s, e) = error(post(a, "/api/v1/room_sizes", READ, &json!({ "rooms": ["ok", long] })));
    assert!(s == 400 && e.contains("rooms[1]"), "{s} {e}");
    let h = [("X-API-Key", WRITE), ("Content-Type", "application/json")];
    let r = call(a, "POST", "/api/v1/kick", &h, b"{not json");
    assert_eq!(r.status, 400, "{}", r.body);
    // Over admin.max_body_bytes (4096 here): 413, before the body is read.
    let big = json!({ "room": "r", "text": "x".repeat(5000) });
    assert_eq!(post(a, "/api/v1/publish", WRITE, &big).status, 413);
    // Unknown route 404, wrong method 405 with Allow.
    assert_eq!(get(a, "/api/v1/nope", READ).status, 404);
    let r = get(a, "/api/v1/push", WRITE);
    assert_eq!((r.status, r.header("allow")), (405, Some("post")));
    // A query that does not decode.
    assert_eq!(get(a, "/api/v1/inbox?user=%zz", READ).status, 400);
    // A browser's form content type: 415.
    let h = [("X-API-Key", WRITE), ("Content-Type", "text/plain")];
    assert_eq!(call(a, "POST", "/api/v1/broadcast", &h, br#"{"text":"x"}"#).status, 415);
    // A query parameter the call does not read, or one given twice, is
    // refused as a JSON body's unknown field is: a typo of `mode` stored
    // the message reliably, and a second `user` was dropped.
    let raw = [("X-API-Key", WRITE), ("Content-Type", "application/octet-stream")];
    for (path, names) in [
        ("/api/v1/push?user=a&mdoe=at_most_once", "mdoe"),
        ("/api/v1/push?user=a&user=b", "user"),
        ("/push?user=a&colour=red", "colour"),
        ("/api/v1/publish?room=r&rom=s", "rom"),
    ] {
        let (s, e) = error(call(a, "POST", path, &raw, b"x"));
        assert!(s == 400 && e.contains(names), "{path}: {s} {e}");
    }
    let (s, e) = error(get(a, "/api/v1/inbox?user=a&usr=b", READ));
    assert!(s == 400 && e.contains("usr"), "{s} {e}");
    // A JSON call reads nothing from the query.
    let (s, e) = error(post(a, "/api/v1/push?user=b", WRITE, &json!({ "user": "a", "text": "x" })));
    assert!(s == 400 && e.contains("user"), "{s} {e}");
    // What the calls do read still works.
    assert_eq!(call(a, "POST", "/api/v1/push?user=a&mode=at_most_once", &raw, b"x").status, 200);
    assert_eq!(get(a, "/healthz?probe=1", READ).status, 200);
}

#[test]
fn rooms_presence_kick_and_broadcast() {
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    let (mut alice, _) = login(server.local_addr(), "alice");

    let r = post(a, "/api/v1/join", WRITE, &json!({ "user": "alice", "room": "lobby" }));
    assert_eq!((r.status, r.json()["connections"].as_u64()), (200, Some(1)), "{}", r.body);
    // The connection is told (ROOM_ACK with req_id 0).
    let ack = alice.recv_skipping_pings().unwrap();
    assert!(matches!(ack.frame(), Frame::RoomAck { req_id: 0, room: "lobby", .. }), "{:?}", ack.frame());
    let r = post(a, "/api/v1/room_sizes", READ, &json!({ "rooms": ["lobby", "empty"] }));
    assert_eq!(r.json()["rooms"], json!([{ "room": "lobby", "size": 1 }, { "room": "empty", "size": 0 }]));
    let r = post(a, "/api/v1/publish", WRITE, &json!({ "room": "lobby", "text": "to the room" }));
    assert_eq!(r.status, 200, "{}", r.body);
    let m = alice.recv_skipping_pings().unwrap();
    assert!(matches!(m.frame(), Frame::RoomMsg { room: "lobby", payload: b"to the room", .. }), "{:?}", m.frame());
    let r = post(a, "/api/v1/leave", WRITE, &json!({ "user": "alice", "room": "lobby" }));
    assert_eq!(r.status, 200, "{}", r.body);
    let ack = alice.recv_skipping_pings().unwrap();
    assert!(matches!(ack.frame(), Frame::RoomAck { req_id: 0, room: "lobby", .. }), "{:?}", ack.frame());
    let r = post(a, "/api/v1/broadcast", WRITE, &json!({ "text": "everyone" }));
    assert_eq!(r.status, 200, "{}", r.body);
    let m = alice.recv_skipping_pings().unwrap();
    assert!(matches!(m.frame(), Frame::RoomMsg { room: "", payload: b"everyone", .. }), "{:?}", m.frame());

    let r = post(a, "/api/v1/presence", READ, &json!({ "users": ["alice", "nobody"] }));
    assert_eq!(
        r.json()["users"],
        json!([{ "user": "alice", "online": true, "connections": 1 }, { "user": "nobody", "online": false, "connections": 0 }])
    );
    let r = get(a, "/api/v1/connections?user=alice", READ);
    assert_eq!(r.json()["connections"].as_array().map(Vec::len), Some(1), "{}", r.body);

    let r = post(a, "/api/v1/kick", WRITE, &json!({ "user": "alice" }));
    assert_eq!((r.status, r.json()["connections"].as_u64()), (200, Some(1)), "{}", r.body);
    alice.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        match alice.recv() {
            Ok(f) if matches!(f.frame(), Frame::Close { .. }) => break,
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert!(wait_until(Duration::from_secs(5), || get(a, "/api/v1/connections?user=alice", READ).json()
        ["connections"]
        == json!([])));
}

/// A WebSocket client (JSON subprotocol, logged in by the query string):
/// reads text messages.
struct Ws(TcpStream);

impl Ws {
    fn open(addr: SocketAddr, user: &str) -> Ws {
        let mut ws = Ws(ws_login_query(addr, user));
        assert_eq!(ws.next()["type"], "login_ok");
        ws
    }

    /// The next text message, as JSON (server frames are unmasked).
    fn next(&mut self) -> Value {
        let mut h = [0u8; 2];
        self.0.read_exact(&mut h).unwrap();
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.0.read_exact(&mut l).unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                self.0.read_exact(&mut l).unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        self.0.read_exact(&mut p).unwrap();
        assert_eq!(h[0] & 0x0f, 0x1, "a text message");
        serde_json::from_slice(&p).unwrap()
    }
}

#[test]
fn a_push_through_the_api_arrives_at_raw_and_websocket_clients() {
    let server = api_server(true);
    let a = server.admin_addr().unwrap();
    let (mut raw, _) = login(server.local_addr(), "dana");
    let mut ws = Ws::open(server.ws_addr().unwrap(), "dana");
    let r = post(a, "/api/v1/push", WRITE, &json!({ "user": "dana", "text": "both", "mode": "at_most_once" }));
    assert_eq!((r.status, r.json()["connections"].as_u64()), (200, Some(2)), "{}", r.body);
    assert_eq!(next_push(&mut raw), "both");
    let m = ws.next();
    assert_eq!((m["type"].as_str(), m["payload"].as_str()), (Some("push"), Some("both")), "{m}");
    // Binary payloads reach the WebSocket client as base64.
    let r = post(a, "/api/v1/push", WRITE, &json!({ "user": "dana", "payload": "3q2+7w==", "mode": "at_most_once" }));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(expect_push(&mut raw).2, [0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(ws.next()["payload_b64"], "3q2+7w==");
}

/// 10,000 pushes in one batch request, to 10 users who read as they come:
/// every one arrives once, and the batch answers each.
#[test]
fn a_batch_of_10000_pushes_all_arrive_counted_exactly() {
    const USERS: usize = 10;
    const EACH: usize = 1000;
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    let readers: Vec<_> = (0..USERS)
        .map(|u| {
            let (mut c, _) = login(server.local_addr(), &format!("u{u}"));
            std::thread::spawn(move || {
                let mut seen = HashSet::new();
                while seen.len() < EACH {
                    assert!(seen.insert(next_push(&mut c)), "a push arrived twice");
                }
                c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
                let extra = c.recv_skipping_pings().ok().map(|f| format!("{:?}", f.frame()));
                (seen, extra)
            })
        })
        .collect();
    let commands: Vec<Value> = (0..USERS * EACH)
        .map(|i| json!({ "push": { "user": format!("u{}", i % USERS), "text": format!("m{i}"), "mode": "at_most_once" } }))
        .collect();
    let r = post(a, "/api/v1/batch", WRITE, &json!({ "commands": commands }));
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), USERS * EACH);
    for (i, x) in results.iter().enumerate() {
        assert_eq!((x["status"].as_u64(), x["connections"].as_u64()), (Some(200), Some(1)), "command {i}: {x}");
    }
    for (u, t) in readers.into_iter().enumerate() {
        let (seen, extra) = t.join().unwrap();
        assert_eq!(extra, None, "u{u} got more than its {EACH}");
        let want: HashSet<String> = (0..USERS * EACH).filter(|i| i % USERS == u).map(|i| format!("m{i}")).collect();
        assert_eq!(seen, want, "u{u}");
    }
}

/// A batch mixes kinds; a malformed command gets its own 400 and the
/// others still run; reliable pushes are stored, counted by the inbox.
#[test]
fn a_batch_answers_every_command_on_its_own() {
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    let mut commands = vec![
        json!({ "join": { "user": "erin", "room": "r" } }),
        json!({ "push": { "user": "erin" } }),
        json!({ "explode": {} }),
        json!({ "presence": { "users": ["erin"] } }),
        json!({ "inbox": { "user": "frank" } }),
    ];
    for i in 0..2000 {
        commands.push(json!({ "push": { "user": "frank", "text": format!("r{i}") } }));
    }
    commands.push(json!({ "inbox": { "user": "frank" } }));
    let r = post(a, "/api/v1/batch", WRITE, &json!({ "commands": commands }));
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), commands.len());
    let status = |i: usize| results[i]["status"].as_u64().unwrap();
    assert_eq!([status(0), status(1), status(2), status(3), status(4)], [200, 400, 400, 200, 200]);
    assert!(results[2]["error"].as_str().unwrap().contains("explode"), "{}", results[2]);
    let seqs: Vec<u64> = results[5..5 + 2000].iter().map(|x| x["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=2000).collect::<Vec<_>>(), "stored in order, each once");
    // Commands run in order: the inbox query after the pushes sees them all.
    assert_eq!(results[2005]["head_seq"].as_u64(), Some(2000), "{}", results[2005]);
    // A body that is not a batch: 400 for the whole request.
    let h = [("X-API-Key", WRITE), ("Content-Type", "application/json")];
    let r = call(a, "POST", "/api/v1/batch", &h, b"{\"commands\": {}}");
    assert_eq!(r.status, 400, "{}", r.body);
}

/// A batch stops pushing to a user at that user's first failed push: what
/// came after it is answered 424 and not stored, so that retrying the
/// failed push and then the rest keeps the user's order. Pushes to other
/// users, and a push whose command did not parse, follow the same rule.
#[test]
fn a_batch_does_not_push_to_a_user_past_that_users_failed_push() {
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    let commands = vec![
        json!({ "push": { "user": "gina", "text": "one" } }),
        json!({ "push": { "user": "gina", "payload": "not base64!" } }),
        json!({ "push": { "user": "hank", "text": "h1" } }),
        json!({ "push": { "user": "gina", "text": "three" } }),
        json!({ "push": { "users": ["hank", "gina", "ivy"], "text": "both" } }),
        json!({ "push": { "user": "ivy", "text": "i1", "colour": "red" } }),
        json!({ "push": { "user": "ivy", "text": "i2" } }),
        json!({ "push": { "user": "hank", "text": "h2", "mode": "at_most_once" } }),
    ];
    let r = post(a, "/api/v1/batch", WRITE, &json!({ "commands": commands }));
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].as_array().unwrap().clone();
    let status = |x: &Value| x["status"].as_u64().unwrap();
    let statuses: Vec<u64> = results.iter().map(status).collect();
    assert_eq!(statuses[..4], [200, 400, 200, 424], "{}", r.body);
    let per_user: Vec<(String, u64)> = results[4]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["user"].as_str().unwrap().to_string(), status(x)))
        .collect();
    let want = [("hank".to_string(), 200), ("gina".to_string(), 424), ("ivy".to_string(), 200)];
    assert_eq!(per_user, want, "{}", results[4]);
    assert_eq!(statuses[5..], [400, 424, 200], "{}", r.body);
    let skipped = results[3]["error"].as_str().unwrap();
    assert!(skipped.contains("command 1"), "names the failed command: {skipped}");
    // A user named twice in one command's list is tried twice (one
    // command), and a request of its own is never skipped.
    let r = post(
        a,
        "/api/v1/batch",
        WRITE,
        &json!({ "commands": [
        { "push": { "users": ["", ""], "text": "x" } },
    ] }),
    );
    let statuses: Vec<u64> = r.json()["results"][0]["results"].as_array().unwrap().iter().map(status).collect();
    assert_eq!(statuses, [400, 400], "{}", r.body);
    let r = post(a, "/api/v1/push", WRITE, &json!({ "users": ["", ""], "text": "x" }));
    let statuses: Vec<u64> = r.json()["results"].as_array().unwrap().iter().map(status).collect();
    assert_eq!(statuses, [400, 400], "{}", r.body);
    // Nothing skipped was stored: gina's inbox holds "one" only, ivy's the
    // push to three users only.
    for (user, head) in [("gina", 1), ("hank", 2), ("ivy", 1)] {
        let r = get(a, &format!("/api/v1/inbox?user={user}"), WRITE);
        assert_eq!(r.json()["head_seq"].as_u64(), Some(head), "{user}: {}", r.body);
    }
}

/// Batches larger than a single payload's limit run a few at a time
/// (`LARGE_AT_ONCE`): eight at once all complete, each answered in full.
#[test]
fn concurrent_large_batches_all_complete() {
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let commands: Vec<Value> = (0..2000)
                    .map(|i| json!({ "push": { "user": format!("t{t}-{i}"), "text": "x", "mode": "at_most_once" } }))
                    .collect();
                let r = post(a, "/api/v1/batch", WRITE, &json!({ "commands": commands }));
                assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(200)]);
                let results = r.json()["results"].as_array().unwrap().clone();
                assert_eq!(results.len(), 2000);
                assert!(results.iter().all(|x| x["status"] == 200 && x["connections"] == 0));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A reliable push with `ttl_ms` (JSON, a batch, or the query string of a
/// raw push) is stored, and not delivered to a device that logs in after
/// it expired; the others are, in order (docs/API.md, POST /api/v1/push).
#[test]
fn a_push_past_its_ttl_is_not_delivered_to_a_device_that_comes_later() {
    let server = api_server(false);
    let a = server.admin_addr().unwrap();
    let push = |body: Value| {
        let r = post(a, "/api/v1/push", WRITE, &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["seq"].as_u64().unwrap()
    };
    assert_eq!(push(json!({ "user": "kim", "text": "ring ring", "ttl_ms": 200 })), 1);
    assert_eq!(push(json!({ "user": "kim", "text": "kept" })), 2);
    let batch = json!({ "commands": [
        { "push": { "user": "kim", "text": "code 1234", "ttl_ms": 200 } },
        { "push": { "user": "kim", "text": "a day", "ttl_ms": 86_400_000 } },
    ] });
    let r = post(a, "/api/v1/batch", WRITE, &batch);
    assert_eq!(r.status, 200, "{}", r.body);
    let seqs: Vec<_> = r.json()["results"].as_array().unwrap().iter().map(|x| x["seq"].as_u64()).collect();
    assert_eq!(seqs, [Some(3), Some(4)], "{}", r.body);
    let h = [("X-API-Key", WRITE), ("Content-Type", "application/octet-stream")];
    let r = call(a, "POST", "/api/v1/push?user=kim&ttl_ms=200", &h, b"raw, short-lived");
    assert_eq!((r.status, r.json()["seq"].as_u64()), (200, Some(5)), "{}", r.body);
    std::thread::sleep(Duration::from_millis(400));
    let mut c = connect(server.local_addr());
    c.login_device("kim", &token("kim"), "phone", 0).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut got = Vec::new();
    while let Ok(f) = c.recv_skipping_pings() {
        if let Frame::Inbox { seq, payload, .. } = f.frame() {
            got.push((seq, String::from_utf8_lossy(payload).into_owned()));
        }
    }
    assert_eq!(got, [(2, "kept".to_string()), (4, "a day".to_string())]);
    let inbox = get(a, "/api/v1/inbox?user=kim", READ).json();
    assert_eq!(inbox["head_seq"].as_u64(), Some(5), "{inbox}");
}
