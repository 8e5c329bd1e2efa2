//! Rooms and fan-out over real loopback sockets. The tests run one at a
//! time (one lock): this process then never holds more than about 10,000
//! descriptors (5,000 clients and their server ends), and the memory
//! bound of the slow-consumer test sees no other test's server.

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use switchboard::client::{Client, ClientError};
use switchboard::config::SlowConsumer;
use switchboard::proto::frame::{Frame, RoomOp};
use switchboard::rooms::RoomError;
use switchboard::{CloseCode, ErrorCode, PushError};

static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The next ROOM_MSG: (room, from, payload).
fn expect_room_msg(c: &mut Client) -> (String, String, Vec<u8>) {
    let f = c.recv_skipping_pings().expect("a frame arrives");
    match f.frame() {
        Frame::RoomMsg { room, from, payload, .. } => (room.to_string(), from.to_string(), payload.to_vec()),
        other => panic!("expected ROOM_MSG, got {other:?}"),
    }
}

/// The ERROR code a SUBSCRIBE of `room` is refused with.
fn refused(c: &mut Client, room: &str) -> u16 {
    match c.subscribe(9, room) {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn five_thousand_members_get_every_publish_once_in_order() {
    let _g = heavy();
    let mut cfg = config();
    cfg.server.max_connections = 6000;
    let server = start(cfg);
    let addr = server.local_addr();
    let h = server.handle();
    let mut members: Vec<Client> = (0..5000)
        .map(|i| {
            let (mut c, _) = login(addr, &format!("m{i}"));
            c.subscribe(1, "stadium").unwrap();
            c
        })
        .collect();
    assert_eq!(h.room_size("stadium"), 5000);
    let per_worker = h.connections_per_worker();
    assert!(per_worker.iter().all(|&n| n > 1000), "members on every worker: {per_worker:?}");

    // Two publishers at once: the application from a thread, and a member.
    const N: usize = 30;
    let h2 = h.clone();
    let app = std::thread::spawn(move || {
        for i in 0..N {
            h2.publish_to_room("stadium", format!("app:{i}")).unwrap();
        }
    });
    let (mut speaker, _) = login(addr, "speaker");
    speaker.subscribe(1, "stadium").unwrap();
    for i in 0..N {
        speaker.publish(0, "stadium", format!("speaker:{i}").as_bytes()).unwrap();
    }
    app.join().unwrap();

    for (k, m) in members.iter_mut().enumerate() {
        let mut next: HashMap<String, usize> = HashMap::new();
        for _ in 0..2 * N {
            let (room, from, payload) = expect_room_msg(m);
            assert_eq!(room, "stadium");
            let text = String::from_utf8(payload).unwrap();
            let (who, seq) = text.split_once(':').unwrap();
            assert_eq!(from, if who == "app" { "" } else { "speaker" });
            let want = next.entry(who.to_string()).or_insert(0);
            assert_eq!(seq.parse::<usize>().unwrap(), *want, "member {k}: {who}'s messages in order, none missing");
            *want += 1;
        }
        assert_eq!(next.values().sum::<usize>(), 2 * N);
    }
    // Exactly once: nothing more is waiting for anyone.
    h.push_to_user("m0", b"sentinel").unwrap();
    assert_eq!(expect_push(&mut members[0]).2, b"sentinel");
}

#[test]
fn leaving_stops_delivery_and_updates_the_count() {
    let _g = heavy();
    let server = start(config());
    let addr = server.local_addr();
    let h = server.handle();
    let mut a = login_on_workers(addr, "ann", &[0]).remove(0);
    let mut b = login_on_workers(addr, "bob", &[1]).remove(0);
    a.subscribe(1, "news").unwrap();
    b.subscribe(2, "news").unwrap();
    assert_eq!(h.room_size("news"), 2);
    h.publish_to_room("news", b"first").unwrap();
    assert_eq!(expect_room_msg(&mut a).2, b"first");
    assert_eq!(expect_room_msg(&mut b).2, b"first");
    b.unsubscribe(3, "news").unwrap();
    assert!(wait_until(Duration::from_secs(2), || h.room_size("news") == 1));
    h.publish_to_room("news", b"second").unwrap();
    assert_eq!(expect_room_msg(&mut a).2, b"second");
    // b gets the sentinel with no ROOM_MSG before it.
    h.push_to_user("bob", b"sentinel").unwrap();
    assert_eq!(expect_push(&mut b).2, b"sentinel");
    // Disconnecting leaves every room.
    drop(a);
    assert!(wait_until(Duration::from_secs(2), || h.room_size("news") == 0));
    assert_eq!(h.room_count(), 0);
}

#[test]
fn the_application_joins_and_leaves_users() {
    let _g = heavy();
    let server = start(config());
    let addr = server.local_addr();
    let h = server.handle();
    let mut devices = login_on_workers(addr, "cat", &[0, 1]);
    // The connections `login_on_workers` dropped (landed on a worker it
    // already had) are released once their worker reads the FIN: until
    // then a join would count them too.
    assert!(wait_until(Duration::from_secs(5), || h.connections_of("cat").len() == 2));
    assert_eq!(h.join_room("cat", "vip").unwrap(), 2);
    for d in &mut devices {
        match d.recv().unwrap().frame() {
            Frame::RoomAck { req_id: 0, op: RoomOp::Subscribed, room } => assert_eq!(room, "vip"),
            other => panic!("expected ROOM_ACK, got {other:?}"),
        }
    }
    assert!(wait_until(Duration::from_secs(2), || h.room_size("vip") == 2));
    h.publish_to_room("vip", b"welcome").unwrap();
    for d in &mut devices {
        assert_eq!(expect_room_msg(d).2, b"welcome");
    }
    assert_eq!(h.leave_room("cat", "vip").unwrap(), 2);
    for d in &mut devices {
        assert!(matches!(d.recv().unwrap().frame(), Frame::RoomAck { op: RoomOp::Unsubscribed, .. }));
    }
    assert!(wait_until(Duration::from_secs(2), || h.room_size("vip") == 0));
}

#[test]
fn clients_chat_in_a_room_and_get_acks() {
    let _g = heavy();
    let server = start(config());
    let addr = server.local_addr();
    let (mut a, _) = login(addr, "a");
    let (mut b, _) = login(addr, "b");
    a.subscribe(1, "chat").unwrap();
    b.subscribe(1, "chat").unwrap();
    a.publish(7, "chat", b"hello room").unwrap();
    // The publisher gets its ack and, as a member, the message itself.
    let mut got_ack = false;
    let mut got_msg = false;
    for _ in 0..2 {
        match a.recv().unwrap().frame() {
            Frame::RoomAck { req_id: 7, op: RoomOp::Published, room: "chat" } => got_ack = true,
            Frame::RoomMsg { from: "a", payload: b"hello room", .. } => got_msg = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got_ack && got_msg);
    assert_eq!(expect_room_msg(&mut b), ("chat".into(), "a".into(), b"hello room".to_vec()));
}

#[test]
fn broadcast_reaches_every_connection_on_every_worker() {
    let _g = heavy();
    let server = start(config());
    let addr = server.local_addr();
    let h = server.handle();
    let mut all: Vec<Client> = (0..2000).map(|i| login(addr, &format!("b{i}")).0).collect();
    assert!(h.connections_per_worker().iter().all(|&n| n > 0));
    for k in 0..3 {
        let p = h.broadcast(format!("announcement {k}")).unwrap();
        assert_eq!(p.workers, 2);
    }
    for c in &mut all {
        for k in 0..3 {
            let (room, from, payload) = expect_room_msg(c);
            assert_eq!((room.as_str(), from.as_str()), ("", ""));
            assert_eq!(payload, format!("announcement {k}").into_bytes());
        }
    }
    // A connection that has not logged in gets nothing.
    let mut anon = connect(addr);
    h.broadcast(b"late").unwrap();
    anon.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(anon.recv().unwrap_err().is_timeout());
}

#[test]
fn a_reader_that_stops_is_cut_off_and_memory_stays_bounded() {
    let _g = heavy();
    let mut cfg = config();
    cfg.limits.outbound_max_bytes = 64 * 1024;
    cfg.limits.outbound_max_frames = 256;
    let server = start(cfg);
    let addr = server.local_addr();
    let h = server.handle();
    let (mut stuck, _) = login(addr, "stuck");
    stuck.subscribe(1, "feed").unwrap();
    let readers: Vec<Client> = (0..40)
        .map(|i| {
            let (mut c, _) = login(addr, &format!("r{i}"));
            c.subscribe(1, "feed").unwrap();
            c
        })
        .collect();
    const MSGS: usize = 20_000;
    // Readers report progress; the publisher stays at most 32 messages
    // ahead of the slowest *reader*, so only the stuck client falls behind.
    let progress: std::sync::Arc<Vec<std::sync::atomic::AtomicUsize>> =
        std::sync::Arc::new((0..readers.len()).map(|_| std::sync::atomic::AtomicUsize::new(0)).collect());
    let threads: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            let progress = progress.clone();
            std::thread::spawn(move || {
                for i in 0..MSGS {
                    let (_, _, p) = expect_room_msg(&mut c);
                    assert_eq!(&p[..8], &(i as u64).to_be_bytes(), "every message, in order");
                    progress[k].store(i + 1, std::sync::atomic::Ordering::Relaxed);
                }
                c
            })
        })
        .collect();
    let rss0 = rss_bytes();
    let mut payload = vec![0u8; 1024];
    for i in 0..MSGS {
        while progress.iter().map(|p| p.load(std::sync::atomic::Ordering::Relaxed)).min().unwrap() + 32 < i {
            std::thread::yield_now();
        }
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        h.publish_to_room("feed", &payload).unwrap();
    }
    let _readers: Vec<Client> = threads.into_iter().map(|t| t.join().expect("readers got every message")).collect();
    let grown = rss_bytes().saturating_sub(rss0);
    // 20 MB went to every member; an unbounded queue for the stuck one
    // would hold all of it.
    assert!(grown < 8 << 20, "process RSS grew by {grown} bytes");
    assert_eq!(h.stats().slow_consumers, 1);
    assert!(
        wait_until(Duration::from_secs(3), || h.room_size("feed") == 40),
        "room size {} stats {:?}",
        h.room_size("feed"),
        h.stats()
    );
    // The stuck client finds its stream ended (possibly after a CLOSE 4004).
    stuck.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        match stuck.recv() {
            Ok(f) => {
                if let Frame::Close { code, .. } = f.frame() {
                    assert_eq!(code, CloseCode::SlowConsumer as u16);
                }
            }
            Err(ClientError::Closed) => break,
            Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the slow consumer's stream should end, got {e}"),
        }
    }
}

#[test]
fn drop_oldest_keeps_a_slow_reader_connected_and_says_what_it_skipped() {
    let _g = heavy();
    let mut cfg = config();
    cfg.limits.slow_consumer = SlowConsumer::DropOldest;
    cfg.limits.outbound_max_frames = 64;
    cfg.limits.outbound_max_bytes = 256 * 1024;
    // A small send buffer: left to the kernel, it grows to take the whole
    // 1.6 MB burst and nothing reaches the outbound queue's limit.
    cfg.socket.sndbuf_bytes = 4096;
    let server = start(cfg);
    let addr = server.local_addr();
    let h = server.handle();
    let (mut slow, _) = login(addr, "slow");
    slow.subscribe(1, "ticker").unwrap();
    let payload = vec![7u8; 512];
    // 3,001 messages; the last one (the newest, never dropped) ends the read.
    for i in 0..=3000u64 {
        let mut p = payload.clone();
        p[..8].copy_from_slice(&i.to_be_bytes());
        h.publish_to_room("ticker", &p).unwrap();
    }
    let (mut seen, mut skipped, mut last) = (0u64, 0u64, None);
    while last != Some(3000) {
        match slow.recv().unwrap().frame() {
            Frame::RoomMsg { payload, .. } => {
                let i = u64::from_be_bytes(payload[..8].try_into().unwrap());
                assert!(last.is_none_or(|l| i > l), "still in order");
                last = Some(i);
                seen += 1;
            }
            Frame::Skipped { count } => skipped += count as u64,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(skipped > 0, "the reader was told it skipped messages");
    assert_eq!(seen + skipped, 3001, "every message was either delivered or counted as skipped");
    assert_eq!(h.stats().skipped, skipped);
    assert_eq!(h.stats().slow_consumers, 0);
    assert!(h.is_online("slow"));
}

/// A fan-out's members are written in batches straight from the message
/// (nothing queued for a member that is keeping up); what a full socket
/// does not take goes back in front of that member's queue, ahead of
/// pushes other threads queued behind the batch meanwhile. Readers that
/// keep pausing, small send buffers and a second writer thread make that
/// happen thousands of times: every member still gets every room message
/// and every push, each stream whole and in order.
#[test]
fn fan_out_members_that_fall_behind_mid_batch_keep_both_streams_whole_and_in_order() {
    let _g = heavy();
    let mut cfg = config();
    cfg.socket.sndbuf_bytes = 4096;
    cfg.limits.outbound_max_bytes = 32 << 20;
    cfg.limits.outbound_max_frames = 1 << 20;
    let server = start(cfg);
    let addr = server.local_addr();
    let h = server.handle();
    const MEMBERS: usize = 16;
    const ROOM_MSGS: u64 = 3000;
    const PUSHES: u64 = 1000;
    let members: Vec<Client> = (0..MEMBERS)
        .map(|i| {
            let (mut c, _) = login(addr, &format!("m{i}"));
            c.subscribe(1, "r").unwrap();
            c
        })
        .collect();
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let (mut room, mut pushes) = (0u64, 0u64);
                while room < ROOM_MSGS || pushes < PUSHES {
                    match c.recv_skipping_pings().expect("the stream goes on").frame() {
                        Frame::RoomMsg { payload, .. } => {
                            assert_eq!(&payload[..8], &room.to_be_bytes(), "room messages whole and in order");
                            room += 1;
                        }
                        Frame::Push { payload, .. } => {
                            assert_eq!(&payload[..8], &pushes.to_be_bytes(), "pushes whole and in order");
                            pushes += 1;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                    // Fall behind now and then, so sockets fill mid-batch.
                    if (room + pushes) % 20 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();
    let pusher = {
        let h = h.clone();
        std::thread::spawn(move || {
            let mut p = vec![1u8; 300];
            for j in 0..PUSHES {
                p[..8].copy_from_slice(&j.to_be_bytes());
                for i in 0..MEMBERS {
                    assert_eq!(h.push_to_user(&format!("m{i}"), &p).unwrap().connections, 1);
                }
            }
        })
    };
    let mut p = vec![2u8; 700];
    for i in 0..ROOM_MSGS {
        p[..8].copy_from_slice(&i.to_be_bytes());
        h.publish_to_room("r", &p).unwrap();
    }
    pusher.join().unwrap();
    for r in readers {
        r.join().expect("every member got both streams whole and in order");
    }
    let st = h.stats();
    assert_eq!(st.slow_consumers, 0);
    assert!(st.write_waits > 0, "sockets filled, so frames were put back: {st:?}");
}

#[test]
fn room_limits_give_the_documented_errors() {
    let _g = heavy();
    let mut cfg = config();
    cfg.rooms.max_rooms_per_conn = 2;
    cfg.rooms.max_members_per_room = 2;
    cfg.rooms.max_rooms = 3;
    let server = start(cfg);
    let addr = server.local_addr();
    let h = server.handle();
    let (mut a, _) = login(addr, "a");
    a.subscribe(1, "r1").unwrap();
    a.subscribe(2, "r2").unwrap();
    assert_eq!(refused(&mut a, "r3"), ErrorCode::RoomLimit as u16);
    let (mut b, _) = login(addr, "b");
    b.subscribe(1, "r1").unwrap();
    let (mut c, _) = login(addr, "c");
    assert_eq!(refused(&mut c, "r1"), ErrorCode::RoomFull as u16);
    assert!(matches!(h.join_room("c", "r1"), Err(PushError::Room(RoomError::RoomFull { limit: 2 }))));
    c.subscribe(1, "r3").unwrap();
    assert_eq!(refused(&mut c, "r4"), ErrorCode::TooManyRooms as u16);
    assert!(matches!(h.join_room("c", "r4"), Err(PushError::Room(RoomError::TooManyRooms { limit: 3 }))));
    // PUBLISH to a room one is not in.
    c.publish(5, "r1", b"x").unwrap();
    match c.recv().unwrap().frame() {
        Frame::Error { code, req_id: 5, .. } => assert_eq!(code, ErrorCode::NotMember as u16),
        other => panic!("expected ERROR 107, got {other:?}"),
    }
    assert!(matches!(h.publish_to_room("", b"x"), Err(PushError::Room(RoomError::InvalidName))));
    assert_eq!(h.room_size("r1"), 2);
}

/// One user cannot fill the server's room table for everyone (the
/// hardening probe created all 100,000 rooms from 1,565 connections in a
/// second): its SUBSCRIBEs may create at most
/// `rooms.max_rooms_created_per_user` rooms that exist at once, on all its
/// devices together; joining rooms that exist is not limited by it, and the
/// application's joins are not counted.
#[test]
fn one_user_creates_at_most_its_share_of_the_rooms() {
    let _g = heavy();
    let mut cfg = config();
    cfg.rooms.max_rooms_created_per_user = 3;
    let server = start(cfg);
    let addr = server.local_addr();
    let h = server.handle();
    let (mut phone, _) = login(addr, "creator");
    let (mut laptop, _) = login(addr, "creator");
    phone.subscribe(1, "c1").unwrap();
    phone.subscribe(2, "c2").unwrap();
    laptop.subscribe(3, "c3").unwrap();
    assert_eq!(refused(&mut phone, "c4"), ErrorCode::RoomCreationLimit as u16);
    assert_eq!(refused(&mut laptop, "c5"), ErrorCode::RoomCreationLimit as u16, "per user, not per device");
    assert_eq!(h.room_count(), 3);
    // Others create rooms as before; the creator joins theirs.
    let (mut other, _) = login(addr, "other");
    other.subscribe(1, "o1").unwrap();
    phone.subscribe(4, "o1").unwrap();
    // The application may put the user in a new room.
    h.join_room("creator", "app-room").unwrap();
    for c in [&mut phone, &mut laptop] {
        assert!(matches!(c.recv().unwrap().frame(), Frame::RoomAck { op: RoomOp::Subscribed, req_id: 0, .. }));
    }
    // A room of theirs that is gone frees a creation.
    laptop.unsubscribe(5, "c3").unwrap();
    assert_eq!(h.room_size("c3"), 0);
    phone.subscribe(6, "c4").unwrap();
}

#[test]
fn client_room_operations_can_be_switched_off() {
    let _g = heavy();
    let mut cfg = config();
    cfg.rooms.client_subscribe = false;
    cfg.rooms.client_publish = false;
    let server = start(cfg);
    let (mut c, _) = login(server.local_addr(), "d");
    match c.subscribe(1, "r") {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::SubscribeDisabled as u16),
        other => panic!("expected ERROR 109, got {other:?}"),
    }
    server.handle().join_room("d", "r").unwrap();
    assert!(matches!(c.recv().unwrap().frame(), Frame::RoomAck { op: RoomOp::Subscribed, .. }));
    c.publish(2, "r", b"x").unwrap();
    match c.recv().unwrap().frame() {
        Frame::Error { code, req_id: 2, .. } => assert_eq!(code, ErrorCode::PublishDisabled as u16),
        other => panic!("expected ERROR 108, got {other:?}"),
    }
}

#[test]
fn room_size_is_cheap_enough_to_call_often() {
    let _g = heavy();
    let server = start(config());
    let (mut c, _) = login(server.local_addr(), "e");
    c.subscribe(1, "hot").unwrap();
    let h = server.handle();
    let t0 = Instant::now();
    let mut total = 0;
    for _ in 0..100_000 {
        total += h.room_size("hot");
    }
    assert_eq!(total, 100_000);
    // Not a timing assertion (benchmarks hold those); this only shows the
    // call takes no lock a publish needs and completes promptly.
    assert!(t0.elapsed() < Duration::from_secs(5));
}
