//! Three Switchboard nodes (separate processes) on one Redis and on a
//! 3-master Redis Cluster, both real `redis-server`s started here: a SEND
//! from node A reaches a user's devices on nodes B and C; a room with
//! members on all three; a broadcast; a kick, join and push through the
//! API of a node that does not hold the user.

mod common;

use std::time::Duration;

use common::cluster::{next_message, Node, NodeOpts, Redis};
use switchboard::proto::frame::Frame;
use switchboard::redis_proc::{RedisCluster, RedisServer};

/// Waits until Redis lists exactly `nodes` in `user`'s presence.
fn presence_is(redis: &Redis, user: &str, nodes: &[&str]) {
    let ok = common::wait_until(Duration::from_secs(10), || redis.presence(user) == nodes);
    assert!(ok, "presence of {user}: want {nodes:?}, Redis has {:?}", redis.presence(user));
}

fn scenarios(redis: Redis) {
    let opts = NodeOpts::default();
    let a = Node::start("a", &redis, &opts);
    let b = Node::start("b", &redis, &opts);
    let c = Node::start("c", &redis, &opts);

    // 1. A SEND from alice on A reaches both of bob's devices, on B and C.
    let mut bob_b = b.login("bob", None);
    let mut bob_c = c.login("bob", None);
    presence_is(&redis, "bob", &["b", "c"]);
    let mut alice = a.login("alice", None);
    alice.send(1, "bob", b"hello bob").unwrap();
    match alice.recv_skipping_pings().unwrap().frame() {
        Frame::SendAck { req_id: 1, delivered } => assert_eq!(delivered, 0, "no device of bob is on A"),
        other => panic!("expected SEND_ACK, got {other:?}"),
    }
    assert_eq!(next_message(&mut bob_b), (String::new(), "hello bob".into()));
    assert_eq!(next_message(&mut bob_c), (String::new(), "hello bob".into()));

    // Many messages keep their order per sender across nodes.
    for i in 0..200 {
        alice.send(0, "bob", format!("m{i}").as_bytes()).unwrap();
    }
    for i in 0..200 {
        assert_eq!(next_message(&mut bob_b).1, format!("m{i}"));
        assert_eq!(next_message(&mut bob_c).1, format!("m{i}"));
    }

    // 2. A room with members on three nodes: a PUBLISH on any node reaches
    // every member, and each node subscribes only while it has members.
    let mut members = [a.login("m1", None), b.login("m2", None), c.login("m3", None)];
    for m in members.iter_mut() {
        m.subscribe(7, "lobby").unwrap();
    }
    let subscribed = common::wait_until(Duration::from_secs(10), || redis.subscribers("sb:r:lobby") == 3);
    assert!(subscribed, "three nodes subscribe to the room: {}", redis.subscribers("sb:r:lobby"));
    members[1].publish(8, "lobby", b"from b").unwrap();
    for m in members.iter_mut() {
        assert_eq!(next_message(m), ("lobby".into(), "from b".into()));
    }
    // Through the API of a node too.
    let (status, body) = c.api("/api/v1/publish", r#"{"room": "lobby", "text": "from the api"}"#);
    assert_eq!(status, 200, "{body}");
    for m in members.iter_mut() {
        assert_eq!(next_message(m), ("lobby".into(), "from the api".into()));
    }
    // The last member on A leaves: A unsubscribes.
    members[0].unsubscribe(9, "lobby").unwrap();
    let left = common::wait_until(Duration::from_secs(10), || redis.subscribers("sb:r:lobby") == 2);
    assert!(left, "A unsubscribes once it has no member: {}", redis.subscribers("sb:r:lobby"));

    // 3. A broadcast through A's API reaches logged-in connections on every node.
    let (status, body) = a.api("/api/v1/broadcast", r#"{"text": "to everyone"}"#);
    assert_eq!(status, 200, "{body}");
    for c in [&mut bob_b, &mut bob_c] {
        assert_eq!(next_message(c), (String::new(), "to everyone".into()));
    }
    for m in members.iter_mut() {
        assert_eq!(next_message(m), (String::new(), "to everyone".into()));
    }

    // 4. An API push and join for bob through A, which holds none of his
    // connections.
    let (status, body) = a.api("/api/v1/push", r#"{"user": "bob", "text": "via api", "mode": "at_most_once"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(next_message(&mut bob_b).1, "via api");
    assert_eq!(next_message(&mut bob_c).1, "via api");
    let (status, body) = a.api("/api/v1/join", r#"{"user": "bob", "room": "lobby"}"#);
    assert_eq!(status, 200, "{body}");
    for c in [&mut bob_b, &mut bob_c] {
        match c.recv_skipping_pings().unwrap().frame() {
            Frame::RoomAck { room: "lobby", .. } => {}
            other => panic!("expected ROOM_ACK for the join, got {other:?}"),
        }
    }

    // 5. A kick through A closes bob's connections on B and C with 4003;
    // his presence goes.
    let (status, body) = a.api("/api/v1/kick", r#"{"user": "bob"}"#);
    assert_eq!(status, 200, "{body}");
    for c in [&mut bob_b, &mut bob_c] {
        assert_eq!(c.recv_close_code().unwrap(), Some(4003));
    }
    presence_is(&redis, "bob", &[]);
}

#[test]
fn three_nodes_on_one_redis() {
    let redis = RedisServer::start();
    scenarios(Redis::One(redis.url()));
}

#[test]
fn three_nodes_on_a_redis_cluster() {
    let redis = RedisCluster::start(3);
    scenarios(Redis::Cluster(redis.urls()));
}
