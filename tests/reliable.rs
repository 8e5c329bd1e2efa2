//! Reliable delivery end to end (docs/PROTOCOL.md section 15): devices,
//! the window, ACK and retransmit, login sync and FETCH paging, idempotent
//! SEND_EX, two devices, retention limits. Each fault test breaks
//! something on purpose and then asserts that every message arrives exactly
//! once after dedup by seq, in order. (The server killed with SIGKILL is in
//! tests/reliable_crash.rs, which runs the binary.)

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchboard::client::{Client, ClientError};
use switchboard::config::{Config, StoreKind};
use switchboard::proto::frame::{Frame, SendOutcome};
use switchboard::ErrorCode;

/// The shared test config with an in-memory store (each test its own).
fn config() -> Config {
    let mut c = common::config();
    c.store.kind = StoreKind::Memory;
    c.delivery.ack_timeout_ms = 300;
    c
}

/// What a device client saw: INBOX frames by seq (dedup), in arrival
/// order, and the SYNCs.
#[derive(Default)]
struct Seen {
    /// seq → payload, first copy kept.
    by_seq: BTreeMap<u64, Vec<u8>>,
    /// Every INBOX seq in arrival order, duplicates included.
    arrivals: Vec<u64>,
    syncs: Vec<(u32, u64, u64, u64)>,
    /// The client's contiguous prefix: it has every seq up to here.
    have: u64,
    /// A copy arrived that the client already had: its ACK was lost or
    /// late, so it acknowledges again.
    dup: bool,
    /// Fetch the next page once the current one is in (what a real client
    /// does); off where a test fetches by hand.
    auto_fetch: bool,
    fetches: u32,
}

impl Seen {
    /// Takes one frame; returns it if it is not an INBOX or SYNC.
    fn take(&mut self, f: &Frame<'_>) -> bool {
        match *f {
            Frame::Inbox { seq, payload, .. } => {
                if let Some(&last) = self.arrivals.last() {
                    // In order on one connection, except that a retransmit
                    // starts again from the position.
                    assert!(seq > last || seq <= self.have + 1, "seq {seq} after {last}, have {}", self.have);
                }
                self.arrivals.push(seq);
                self.dup |= seq <= self.have;
                self.by_seq.entry(seq).or_insert_with(|| payload.to_vec());
                while self.by_seq.contains_key(&(self.have + 1)) {
                    self.have += 1;
                }
                true
            }
            Frame::Sync { req_id, position, head_seq, page_end } => {
                self.syncs.push((req_id, position, head_seq, page_end));
                true
            }
            _ => false,
        }
    }
}

fn device_login(addr: SocketAddr, user: &str, device: &str, last_seq: u64) -> Client {
    let mut c = common::connect(addr);
    c.login_device(user, &common::token(user), device, last_seq).expect("device login");
    c
}

/// The test config with a disk store in a fresh directory of its own
/// (named after `tag`), and that directory, for the test to remove.
fn disk_config(tag: &str) -> (std::path::PathBuf, Config) {
    let dir = std::env::temp_dir().join(format!("{tag}-{}-{}", std::process::id(), common::unix_now()));
    let mut cfg = config();
    cfg.store.kind = StoreKind::Disk;
    cfg.store.path = dir.clone();
    (dir, cfg)
}

/// Reads INBOX/SYNC frames into `seen`, acknowledging every `ack_every`
/// new seqs, until `until(seen)` or `limit` passes. Other frames fail the
/// test.
fn read_until(c: &mut Client, seen: &mut Seen, ack_every: u64, limit: Duration, until: impl Fn(&Seen) -> bool) {
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let end = Instant::now() + limit;
    let mut acked: u64 = 0;
    while !until(seen) {
        assert!(Instant::now() < end, "gave up: have {} of the inbox, syncs {:?}", seen.have, seen.syncs);
        match c.recv_skipping_pings() {
            Ok(f) => {
                let frame = f.frame();
                assert!(seen.take(&frame), "unexpected frame {frame:?}");
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => panic!("connection failed: {e}"),
        }
        if seen.have >= acked.saturating_add(ack_every) || (seen.have > acked && until(seen)) || seen.dup {
            acked = seen.have;
            seen.dup = false;
            c.ack(acked).unwrap();
        }
        if let Some(&(_, _, head, page_end)) = seen.syncs.last() {
            if seen.auto_fetch && seen.have >= page_end && page_end < head {
                seen.fetches += 1;
                c.fetch(1000 + seen.fetches, seen.have, 100).unwrap();
                // Wait for its SYNC before asking again.
                seen.syncs.push((0, seen.have, head, seen.have + 1));
            }
        }
    }
}

/// Sends `n` reliable SENDs from `from` to `to`, each answered with
/// SEND_ACK before the next (so they are stored); payload "m{i}".
fn send_stored(c: &mut Client, to: &str, range: std::ops::Range<u32>) {
    for i in range {
        c.send(i + 1, to, format!("m{i}").as_bytes()).unwrap();
        let f = c.recv_skipping_pings().unwrap();
        match f.frame() {
            Frame::SendAck { req_id, .. } => assert_eq!(req_id, i + 1),
            other => panic!("expected SEND_ACK, got {other:?}"),
        }
    }
}

fn payloads(seen: &Seen) -> Vec<String> {
    seen.by_seq.values().map(|p| String::from_utf8(p.clone()).unwrap()).collect()
}

fn expected(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

#[test]
fn a_client_killed_mid_stream_reconnects_and_gets_the_rest_once_in_order() {
    let server = common::start(config());
    let addr = server.local_addr();
    let (mut alice, _) = common::login(addr, "alice");
    let mut bob = device_login(addr, "bob", "phone", 0);
    let mut seen = Seen::default();
    read_until(&mut bob, &mut seen, 1, Duration::from_secs(5), |s| !s.syncs.is_empty());
    send_stored(&mut alice, "bob", 0..200);
    // Bob stores 50 and acknowledges 30, then his app is killed.
    read_until(&mut bob, &mut seen, u64::MAX, Duration::from_secs(10), |s| s.have >= 50);
    bob.ack(30).unwrap();
    drop(bob);
    let mut bob = device_login(addr, "bob", "phone", seen.have);
    seen.auto_fetch = true;
    read_until(&mut bob, &mut seen, 8, Duration::from_secs(20), |s| s.have >= 200);
    assert_eq!(payloads(&seen), expected(0..200));
    assert_eq!(*seen.by_seq.keys().last().unwrap(), 200);
}

#[test]
fn the_window_bounds_what_is_unacknowledged_and_a_silent_client_gets_a_retransmit() {
    let mut cfg = config();
    cfg.delivery.window = 8;
    let server = common::start(cfg);
    let addr = server.local_addr();
    let (mut alice, _) = common::login(addr, "alice");
    let mut bob = device_login(addr, "bob", "tab", 0);
    let mut seen = Seen::default();
    read_until(&mut bob, &mut seen, 1, Duration::from_secs(5), |s| !s.syncs.is_empty());
    send_stored(&mut alice, "bob", 0..20);
    // No ACK: 8 arrive, then (after the ACK timeout) the same 8 again.
    read_until(&mut bob, &mut seen, u64::MAX, Duration::from_secs(10), |s| s.arrivals.len() >= 16);
    assert_eq!(seen.have, 8, "no more than the window before an ACK");
    assert_eq!(&seen.arrivals[..16], &[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    read_until(&mut bob, &mut seen, 1, Duration::from_secs(10), |s| s.have >= 20);
    assert_eq!(payloads(&seen), expected(0..20));
}

/// A window that went idle and stayed so across ticks, then got messages
/// again, is retransmitted to as a fresh one: the retransmit timer
/// follows each window that has something in flight, however often it
/// parked before. And a connection that closed with messages in flight
/// leaves nothing that stops the next connection (which may take its
/// slot) from getting its retransmit.
#[test]
fn a_window_reopened_after_idle_ticks_and_a_new_connection_after_a_close_get_retransmits() {
    let server = common::start(config());
    let addr = server.local_addr();
    let (mut alice, _) = common::login(addr, "alice");
    let mut bob = device_login(addr, "bob", "phone", 0);
    let mut seen = Seen::default();
    read_until(&mut bob, &mut seen, 1, Duration::from_secs(5), |s| !s.syncs.is_empty());
    let mut sent = 0;
    for _ in 0..3 {
        // Delivered and acknowledged: the window goes idle, and stays so
        // for several ticks (50 ms each in the test config).
        send_stored(&mut alice, "bob", sent..sent + 2);
        sent += 2;
        read_until(&mut bob, &mut seen, 1, Duration::from_secs(5), |s| s.have >= sent as u64);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(seen.arrivals, (1..=sent as u64).collect::<Vec<_>>(), "each once while acknowledged");
    // Then three that bob does not acknowledge: after the ACK timeout
    // (300 ms) they come again.
    send_stored(&mut alice, "bob", sent..sent + 3);
    let first = seen.arrivals.len();
    read_until(&mut bob, &mut seen, u64::MAX, Duration::from_secs(10), |s| s.arrivals.len() >= first + 6);
    assert_eq!(&seen.arrivals[first..first + 6], &[7, 8, 9, 7, 8, 9], "three, then the same three again");
    bob.ack(9).unwrap();

    // Bob's tablet closes with a message in flight; the next device
    // connection on the server gets its own retransmit.
    let mut tablet = device_login(addr, "bob", "tablet", 9);
    let mut seen_tablet = Seen::default();
    read_until(&mut tablet, &mut seen_tablet, u64::MAX, Duration::from_secs(5), |s| !s.syncs.is_empty());
    send_stored(&mut alice, "bob", 9..10);
    read_until(&mut tablet, &mut seen_tablet, u64::MAX, Duration::from_secs(5), |s| !s.arrivals.is_empty());
    drop(tablet);
    let mut laptop = device_login(addr, "carol", "laptop", 0);
    let mut seen_laptop = Seen::default();
    read_until(&mut laptop, &mut seen_laptop, u64::MAX, Duration::from_secs(5), |s| !s.syncs.is_empty());
    send_stored(&mut alice, "carol", 0..2);
    read_until(&mut laptop, &mut seen_laptop, u64::MAX, Duration::from_secs(10), |s| s.arrivals.len() >= 4);
    assert_eq!(seen_laptop.arrivals[..4], [1, 2, 1, 2], "two, then the same two again");
}

#[test]
fn an_offline_user_gets_the_first_page_then_fetches_the_rest() {
    let server = common::start(config());
    let addr = server.local_addr();
    let handle = server.handle();
    for i in 0..500u32 {
        let r = handle.push_reliable("carol", format!("m{i}"), 0).unwrap().wait().unwrap();
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(r.connections, 0);
        assert_eq!(r.durability, None, "the memory store keeps nothing across a crash");
    }
    let mut carol = device_login(addr, "carol", "laptop", 0);
    let mut seen = Seen::default();
    read_until(&mut carol, &mut seen, u64::MAX, Duration::from_secs(10), |s| s.have >= 20);
    assert_eq!(seen.syncs, vec![(0, 0, 500, 20)], "the login SYNC: position 0, head 500, first page to 20");
    // Nothing beyond the page until the client asks.
    carol.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(carol.recv_skipping_pings().unwrap_err().is_timeout());
    let mut req = 1;
    while seen.have < 500 {
        carol.fetch(req, seen.have, 200).unwrap();
        let want = (seen.have + 200).min(500);
        read_until(&mut carol, &mut seen, 32, Duration::from_secs(10), |s| s.have >= want);
        assert_eq!(seen.syncs.last().unwrap().0, req);
        req += 1;
    }
    assert_eq!(payloads(&seen), expected(0..500));
    assert_eq!(seen.arrivals, (1..=500).collect::<Vec<_>>(), "each once, in order");
    // Caught up: a new message is pushed without a FETCH.
    handle.push_reliable("carol", "m500", 0).unwrap().wait().unwrap();
    read_until(&mut carol, &mut seen, 1, Duration::from_secs(5), |s| s.have >= 501);
}

#[test]
fn a_device_that_lost_its_copy_fetches_history_one_asked_page_at_a_time() {
    // PROTOCOL.md 15.7: each FETCH gets (after_seq, page_end], also after
    // a FETCH below the position. Found by a hostile-input probe: after
    // FETCH(0, 3), FETCH(38, 100) wrote 4..=40 instead of 39 and 40.
    let server = common::start(config());
    let handle = server.handle();
    for i in 0..40u32 {
        handle.push_reliable("erin", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    // A device that has (and has acknowledged) all 40.
    let mut erin = device_login(server.local_addr(), "erin", "tablet", 0);
    let mut seen = Seen::default();
    read_until(&mut erin, &mut seen, 100, Duration::from_secs(10), |s| s.have >= 20);
    erin.fetch(9, 20, 100).unwrap();
    read_until(&mut erin, &mut seen, 100, Duration::from_secs(10), |s| s.have >= 40);
    assert_eq!(seen.arrivals, (1..=40).collect::<Vec<_>>());
    erin.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    // (req_id, after_seq, limit, the page's seqs).
    let asked: [(u32, u64, u16, Vec<u64>); 4] =
        [(1, 0, 3, vec![1, 2, 3]), (2, 38, 100, vec![39, 40]), (3, 40, 5, vec![]), (4, 10, 5, (11..=15).collect())];
    for (req, after, limit, want) in asked {
        erin.fetch(req, after, limit).unwrap();
        let page_end = want.last().copied().unwrap_or(after);
        assert_eq!(next_sync(&mut erin), (req, 40, 40, page_end), "FETCH({after}, {limit})");
        let got: Vec<u64> = want.iter().map(|_| next_inbox(&mut erin).0).collect();
        assert_eq!(got, want, "FETCH({after}, {limit})");
        assert!(erin.recv_skipping_pings().unwrap_err().is_timeout(), "nothing past FETCH({after}, {limit})'s page");
    }
}

#[test]
fn two_devices_of_one_user_catch_up_independently() {
    let server = common::start(config());
    let addr = server.local_addr();
    let handle = server.handle();
    for i in 0..100u32 {
        handle.push_reliable("dan", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    let mut phone = device_login(addr, "dan", "phone", 0);
    let mut seen_phone = Seen::default();
    read_until(&mut phone, &mut seen_phone, 16, Duration::from_secs(10), |s| s.have >= 20);
    phone.fetch(1, 20, 1000).unwrap();
    read_until(&mut phone, &mut seen_phone, 16, Duration::from_secs(10), |s| s.have >= 100);
    drop(phone);
    for i in 100..150u32 {
        handle.push_reliable("dan", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    // The tablet never saw anything: it starts from 0; the phone from 100.
    let mut tablet = device_login(addr, "dan", "tablet", 0);
    let mut seen_tablet = Seen::default();
    read_until(&mut tablet, &mut seen_tablet, 16, Duration::from_secs(10), |s| !s.syncs.is_empty());
    assert_eq!(seen_tablet.syncs[0], (0, 0, 150, 20));
    let mut phone = device_login(addr, "dan", "phone", 0);
    read_until(&mut phone, &mut seen_phone, 16, Duration::from_secs(10), |s| s.syncs.len() >= 3);
    assert_eq!(seen_phone.syncs[2], (0, 100, 150, 120), "the phone resumes from its stored position");
    let mut req = 1;
    while seen_tablet.have < 150 || seen_phone.have < 150 {
        for (c, s) in [(&mut tablet, &mut seen_tablet), (&mut phone, &mut seen_phone)] {
            if s.have < 150 {
                c.fetch(req, s.have, 40).unwrap();
                let want = (s.have + 40).min(150);
                read_until(c, s, 8, Duration::from_secs(10), |s| s.have >= want);
            }
        }
        req += 1;
    }
    assert_eq!(payloads(&seen_tablet), expected(0..150));
    assert_eq!(payloads(&seen_phone), expected(0..150));
    // The last ACKs reach the store shortly after they were sent.
    let positions = || {
        let state = handle.inbox_state("dan", Duration::from_secs(5)).unwrap();
        assert_eq!(state.head_seq, 150);
        let mut p: Vec<(String, u64)> = state.devices.iter().map(|d| (d.device.clone(), d.position)).collect();
        p.sort();
        p
    };
    let want = vec![("phone".to_string(), 150), ("tablet".to_string(), 150)];
    common::wait_until(Duration::from_secs(5), || positions() == want);
    assert_eq!(positions(), want);
}

/// Store reads served so far.
fn store_reads(server: &switchboard::Server) -> u64 {
    server.handle().store_counters().expect("a store").reads.load(std::sync::atomic::Ordering::Relaxed)
}

/// The next frame, which must be an INBOX: its seq and payload.
fn next_inbox(c: &mut Client) -> (u64, Vec<u8>) {
    match c.recv_skipping_pings().unwrap().frame() {
        Frame::Inbox { seq, payload, .. } => (seq, payload.to_vec()),
        other => panic!("expected INBOX, got {other:?}"),
    }
}

/// The next frame, which must be a SYNC: (req_id, position, head_seq, page_end).
fn next_sync(c: &mut Client) -> (u32, u64, u64, u64) {
    match c.recv_skipping_pings().unwrap().frame() {
        Frame::Sync { req_id, position, head_seq, page_end } => (req_id, position, head_seq, page_end),
        other => panic!("expected SYNC, got {other:?}"),
    }
}

#[test]
fn a_new_device_gets_what_is_kept_after_the_other_devices_messages_were_dropped() {
    // The phone read and acknowledged 1..=30; the retention pass dropped
    // them (every device known then had them). A tablet logs in for the
    // first time: its page starts at the first kept seq, not in the gap.
    let mut c = config();
    c.store.retention_interval_ms = 100;
    c.admin.listen = "127.0.0.1:0".into();
    let server = common::start(c);
    let addr = server.local_addr();
    let handle = server.handle();
    for i in 0..30u32 {
        handle.push_reliable("erin", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    let mut phone = device_login(addr, "erin", "phone", 0);
    let mut seen_phone = Seen { auto_fetch: true, ..Seen::default() };
    read_until(&mut phone, &mut seen_phone, 8, Duration::from_secs(10), |s| s.have >= 30);
    drop(phone);
    let dropped = common::wait_until(Duration::from_secs(10), || {
        handle.inbox_state("erin", Duration::from_secs(5)).unwrap().first_seq == 31
    });
    assert!(dropped, "the retention pass drops what the only device acknowledged");
    for i in 30..55u32 {
        handle.push_reliable("erin", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    let reads_before = store_reads(&server);
    let mut tablet = device_login(addr, "erin", "tablet", 0);
    tablet.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(next_sync(&mut tablet), (0, 0, 55, 50), "the login SYNC: the first page is 31..=50");
    // The admin API counts what the tablet has not stored of what is kept.
    let (status, body) = common::http(server.admin_addr().unwrap(), "GET", "/inbox?user=erin", b"", None).unwrap();
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tablet_state = state["devices"].as_array().unwrap().iter().find(|d| d["device"] == "tablet").cloned();
    assert_eq!((status, tablet_state.map(|d| d["pending"].clone())), (200, Some(serde_json::json!(25))), "{body}");
    let mut got: Vec<(u64, Vec<u8>)> = (0..20).map(|_| next_inbox(&mut tablet)).collect();
    tablet.fetch(1, 50, 100).unwrap();
    assert_eq!(next_sync(&mut tablet), (1, 50, 55, 55), "the FETCH's SYNC: the rest, then live");
    got.extend((0..5).map(|_| next_inbox(&mut tablet)));
    let want: Vec<(u64, Vec<u8>)> = (30..55u32).map(|i| (i as u64 + 1, format!("m{i}").into_bytes())).collect();
    assert_eq!(got, want, "each kept message once, in order");
    // Two pages, two reads (and none going round while the tablet waits).
    let reads = store_reads(&server) - reads_before;
    assert!(reads <= 4, "{reads} store reads");
    tablet.ack(55).unwrap();
    handle.push_reliable("erin", "m55", 0).unwrap().wait().unwrap();
    assert_eq!(next_inbox(&mut tablet).0, 56, "live after the last page");
}

/// A memory store starts over at a restart: its seqs begin again at 1,
/// and they name other messages than the ones a device stored before.
/// Once the new inbox's head has passed what the device stored, its
/// login's `last_seq` is a seq of the new inbox too; taken as the
/// position, it made the device skip every new message up to it
/// (PROTOCOL.md 15.6, 15.8). A memory store that has not seen the device
/// since it started has no reason to believe the seq: the login SYNC
/// gives the position the store has (0), below the `last_seq`, which
/// tells the client to start over from it, and every new message comes.
#[test]
fn a_device_back_after_a_memory_store_restart_gets_every_new_message() {
    let server = common::start(config());
    let handle = server.handle();
    for i in 0..5u32 {
        handle.push_reliable("gail", format!("old{i}"), 0).unwrap().wait().unwrap();
    }
    let mut phone = device_login(server.local_addr(), "gail", "phone", 0);
    let mut seen = Seen::default();
    read_until(&mut phone, &mut seen, 1, Duration::from_secs(5), |s| s.have >= 5);
    drop(phone);
    server.shutdown().unwrap();

    let server = common::start(config());
    let handle = server.handle();
    for i in 0..7u32 {
        let r = handle.push_reliable("gail", format!("m{i}"), 0).unwrap().wait().unwrap();
        assert_eq!(r.seq, i as u64 + 1, "the new store starts again at 1");
    }
    let mut phone = device_login(server.local_addr(), "gail", "phone", 5);
    phone.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(next_sync(&mut phone), (0, 0, 7, 7), "the position the new store has, below the last_seq sent");
    let got: Vec<(u64, Vec<u8>)> = (0..7).map(|_| next_inbox(&mut phone)).collect();
    let want: Vec<(u64, Vec<u8>)> = (0..7u32).map(|i| (i as u64 + 1, format!("m{i}").into_bytes())).collect();
    assert_eq!(got, want, "every new message, once, in order");
    phone.ack(7).unwrap();
    handle.push_reliable("gail", "m7", 0).unwrap().wait().unwrap();
    assert_eq!(next_inbox(&mut phone).0, 8, "live after the page");
}

/// A device connected and idle for longer than `store.ttl_ms` stays known:
/// the store forgets devices it has not seen for that long, and it saw one
/// only at its login and its ACKs. Forgotten while connected, the desk's
/// unacknowledged message was dropped once the phone acknowledged it, and
/// when the desk's connection ended before its ACK, its next login never
/// got that message.
#[test]
fn a_device_connected_longer_than_the_ttl_is_not_forgotten() {
    let mut c = config();
    c.store.ttl_ms = 1_500;
    c.store.retention_interval_ms = 100;
    let server = common::start(c);
    let addr = server.local_addr();
    let handle = server.handle();
    let mut desk = device_login(addr, "ida", "desk", 0);
    let mut seen_desk = Seen::default();
    read_until(&mut desk, &mut seen_desk, 1, Duration::from_secs(5), |s| !s.syncs.is_empty());
    // Idle past the TTL, with retention passes all along.
    std::thread::sleep(Duration::from_millis(2_500));
    let devices = || -> Vec<String> {
        handle.inbox_state("ida", Duration::from_secs(5)).unwrap().devices.into_iter().map(|d| d.device).collect()
    };
    assert_eq!(devices(), ["desk"], "the connected desk is still known");
    let mut phone = device_login(addr, "ida", "phone", 0);
    let mut seen_phone = Seen::default();
    read_until(&mut phone, &mut seen_phone, 1, Duration::from_secs(5), |s| !s.syncs.is_empty());
    handle.push_reliable("ida", "m1", 0).unwrap().wait().unwrap();
    // The phone acknowledges it; the desk reads it and dies before its ACK.
    read_until(&mut phone, &mut seen_phone, 1, Duration::from_secs(5), |s| s.have >= 1);
    desk.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(next_inbox(&mut desk), (1, b"m1".to_vec()));
    drop(desk);
    // A few retention passes after the phone's position reached the store.
    assert!(common::wait_until(Duration::from_secs(5), || {
        handle.inbox_state("ida", Duration::from_secs(5)).unwrap().devices.iter().any(|d| d.position == 1)
    }));
    std::thread::sleep(Duration::from_millis(500));
    let mut desk = device_login(addr, "ida", "desk", 0);
    desk.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(next_sync(&mut desk), (0, 0, 1, 1), "the desk's page still holds m1");
    assert_eq!(next_inbox(&mut desk), (1, b"m1".to_vec()));
}

#[test]
fn a_message_too_large_for_the_window_bytes_left_waits_for_an_ack_without_store_reads() {
    let mut c = config();
    c.delivery.window_bytes = 1000;
    c.delivery.ack_timeout_ms = 5000;
    let server = common::start(c);
    let handle = server.handle();
    let mut dev = device_login(server.local_addr(), "fay", "phone", 0);
    dev.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(next_sync(&mut dev), (0, 0, 0, 0));
    for i in 0..3u8 {
        handle.push_reliable("fay", vec![b'a' + i; 400], 0).unwrap().wait().unwrap();
    }
    assert_eq!(next_inbox(&mut dev).0, 1);
    assert_eq!(next_inbox(&mut dev).0, 2);
    // 800 of 1000 bytes in flight: the third waits for an ACK, in the
    // store, and costs no store reads meanwhile.
    let before = store_reads(&server);
    std::thread::sleep(Duration::from_millis(500));
    let reads = store_reads(&server) - before;
    assert!(reads <= 1, "{reads} store reads while waiting");
    dev.ack(2).unwrap();
    assert_eq!(next_inbox(&mut dev), (3, vec![b'c'; 400]));
}

#[test]
fn a_send_ex_retried_after_its_connection_died_is_stored_and_delivered_once() {
    let server = common::start(config());
    let addr = server.local_addr();
    let mut erin = device_login(addr, "erin", "phone", 0);
    let mut seen = Seen::default();
    read_until(&mut erin, &mut seen, 1, Duration::from_secs(5), |s| !s.syncs.is_empty());
    // The sender's connection dies before it reads the answer.
    let (mut frank, _) = common::login(addr, "frank");
    frank.send_ex(1, 0, 0xfeed, "erin", b"hello once").unwrap();
    drop(frank);
    let (mut frank, _) = common::login(addr, "frank");
    frank.send_ex(2, 0, 0xfeed, "erin", b"hello once").unwrap();
    let f = frank.recv_skipping_pings().unwrap();
    let first_seq = match f.frame() {
        Frame::SendResult { req_id: 2, outcome, seq, .. } => {
            // Stored by the first attempt (duplicate) or, if that one was
            // lost with its connection, by this one.
            assert!(matches!(outcome, SendOutcome::Duplicate | SendOutcome::Stored), "{outcome:?}");
            seq
        }
        other => panic!("expected SEND_RESULT, got {other:?}"),
    };
    // A third try: certainly a duplicate of the same seq.
    frank.send_ex(3, 0, 0xfeed, "erin", b"hello once").unwrap();
    match frank.recv_skipping_pings().unwrap().frame() {
        Frame::SendResult { req_id: 3, outcome: SendOutcome::Duplicate, seq, .. } => assert_eq!(seq, first_seq),
        other => panic!("expected a duplicate SEND_RESULT, got {other:?}"),
    }
    // A different client id is a different message.
    frank.send_ex(4, 0, 0xbeef, "erin", b"hello twice").unwrap();
    match frank.recv_skipping_pings().unwrap().frame() {
        Frame::SendResult { req_id: 4, outcome: SendOutcome::Stored, seq, .. } => assert_eq!(seq, first_seq + 1),
        other => panic!("expected SEND_RESULT stored, got {other:?}"),
    }
    read_until(&mut erin, &mut seen, 1, Duration::from_secs(5), |s| s.have >= 2);
    erin.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(erin.recv_skipping_pings().unwrap_err().is_timeout(), "nothing more");
    assert_eq!(seen.arrivals, vec![1, 2]);
    assert_eq!(payloads(&seen), vec!["hello once".to_string(), "hello twice".to_string()]);
}

#[test]
fn at_most_once_stays_available_and_plain_clients_get_a_push() {
    let server = common::start(config());
    let addr = server.local_addr();
    let (mut gus, _) = common::login(addr, "gus");
    let (mut hal, _) = common::login(addr, "hal");
    // A plain (no device) receiver of a stored SEND gets today's PUSH.
    hal.send(1, "gus", b"stored").unwrap();
    assert!(matches!(hal.recv_skipping_pings().unwrap().frame(), Frame::SendAck { req_id: 1, delivered: 1 }));
    assert_eq!(common::expect_push(&mut gus).2, b"stored");
    // SEND_EX at most once: relayed, answered with seq 0, not stored.
    hal.send_ex(2, switchboard::proto::frame::SEND_EX_AT_MOST_ONCE, 0, "gus", b"live").unwrap();
    match hal.recv_skipping_pings().unwrap().frame() {
        Frame::SendResult { req_id: 2, outcome: SendOutcome::Relayed, seq: 0, delivered: 1, .. } => {}
        other => panic!("expected SEND_RESULT relayed, got {other:?}"),
    }
    assert_eq!(common::expect_push(&mut gus).2, b"live");
    let state = server.handle().inbox_state("gus", Duration::from_secs(5)).unwrap();
    assert_eq!(state.head_seq, 1, "only the stored one is in the inbox");
    // ACK without a device id is an error, not a close.
    gus.ack(1).unwrap();
    match gus.recv_skipping_pings().unwrap().frame() {
        Frame::Error { code, .. } => assert_eq!(code, ErrorCode::NotReliable as u16),
        other => panic!("expected ERROR 116, got {other:?}"),
    }
}

#[test]
fn retention_limits_refuse_with_their_error_codes() {
    let mut cfg = config();
    cfg.store.max_messages_per_inbox = 10;
    cfg.store.max_bytes = 1 << 20;
    let server = common::start(cfg);
    let addr = server.local_addr();
    let (mut ivy, _) = common::login(addr, "ivy");
    send_stored(&mut ivy, "jon", 0..10);
    ivy.send(11, "jon", b"one too many").unwrap();
    match ivy.recv_skipping_pings().unwrap().frame() {
        Frame::Error { code, req_id, .. } => assert_eq!((code, req_id), (ErrorCode::InboxFull as u16, 11)),
        other => panic!("expected ERROR 113, got {other:?}"),
    }
    // The store's byte limit: 60 KiB messages to many users fill 1 MiB.
    let big = vec![b'x'; 60_000];
    let mut refused = None;
    for i in 0..40u32 {
        ivy.send(100 + i, &format!("user{i}"), &big).unwrap();
        match ivy.recv_skipping_pings().unwrap().frame() {
            Frame::SendAck { .. } => {}
            Frame::Error { code, .. } => {
                refused = Some((i, code));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (i, code) = refused.expect("the byte limit refuses at some point");
    assert_eq!(code, ErrorCode::StoreFull as u16);
    assert!((15..=17).contains(&i), "refused after about 1 MiB, at message {i}");
    // Refused means not stored: the inbox still holds exactly 10.
    let state = server.handle().inbox_state("jon", Duration::from_secs(5)).unwrap();
    assert_eq!((state.head_seq, state.messages), (10, 10));
    let _ = ClientError::Closed;
}

#[test]
fn a_disk_store_keeps_messages_and_positions_across_a_restart() {
    let (dir, cfg) = disk_config("sb-reliable");
    let server = common::start(cfg.clone());
    let h = server.handle();
    for i in 0..30u32 {
        h.push_reliable("kim", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    let mut kim = device_login(server.local_addr(), "kim", "phone", 0);
    let mut seen = Seen::default();
    read_until(&mut kim, &mut seen, 5, Duration::from_secs(5), |s| s.have >= 20);
    // The last ACK reaches the store before the shutdown (a fixed sleep
    // is not enough on a loaded host).
    let acked_20 = || {
        let state = h.inbox_state("kim", Duration::from_secs(5)).unwrap();
        state.devices.iter().any(|d| d.device == "phone" && d.position == 20)
    };
    assert!(common::wait_until(Duration::from_secs(10), acked_20), "the ACK of 20 reached the store");
    drop(kim);
    server.shutdown().unwrap();
    let server = common::start(cfg);
    let h = server.handle();
    let r = h.push_reliable("kim", "m30", 0).unwrap().wait().unwrap();
    assert_eq!(r.seq, 31, "seqs continue after a restart");
    assert_eq!(r.durability, Some(switchboard::store::Durability::Fsync));
    let mut kim = device_login(server.local_addr(), "kim", "phone", 0);
    read_until(&mut kim, &mut seen, 5, Duration::from_secs(5), |s| s.syncs.len() >= 2);
    assert_eq!(seen.syncs[1], (0, 20, 31, 31), "the position survived the restart");
    read_until(&mut kim, &mut seen, 5, Duration::from_secs(5), |s| s.have >= 31);
    assert_eq!(payloads(&seen), expected(0..31));
    drop(kim);
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device its app signed out of (or that was uninstalled) held every
/// message its user got after it until `store.ttl_ms` (7 days) had passed
/// without it: disk, and the inbox's `max_messages_per_inbox`, taken by a
/// device that would never come back. The backend forgets it through the
/// admin API; the user's other devices' acknowledgements then decide what
/// goes, and the device stays forgotten across a restart.
#[test]
fn a_device_forgotten_through_the_api_holds_its_users_messages_no_longer() {
    let (dir, mut cfg) = disk_config("sb-forget");
    cfg.store.retention_interval_ms = 100;
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = Some("write-key-0123456789abcdef".into());
    let server = common::start(cfg.clone());
    let (addr, h) = (server.local_addr(), server.handle());
    let api = |server: &switchboard::Server, body: serde_json::Value| {
        let key = Some("write-key-0123456789abcdef");
        let body = body.to_string();
        let (status, answer) =
            common::http(server.admin_addr().unwrap(), "POST", "/api/v1/forget_device", body.as_bytes(), key).unwrap();
        (status, serde_json::from_str::<serde_json::Value>(&answer).unwrap_or_default())
    };
    // The tablet logs in once, then signs out for good.
    drop(device_login(addr, "noa", "tablet", 0));
    for i in 0..10u32 {
        h.push_reliable("noa", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    let mut phone = device_login(addr, "noa", "phone", 0);
    let mut seen = Seen::default();
    read_until(&mut phone, &mut seen, 10, Duration::from_secs(5), |s| s.have >= 10);
    let state = || h.inbox_state("noa", Duration::from_secs(5)).unwrap();
    let phone_at_10 = || state().devices.iter().any(|d| d.device == "phone" && d.position == 10);
    assert!(common::wait_until(Duration::from_secs(10), phone_at_10), "the phone's ACK reached the store");
    std::thread::sleep(Duration::from_millis(300)); // retention passes
    assert_eq!(state().messages, 10, "the tablet holds all ten");

    let (status, v) = api(&server, serde_json::json!({ "user": "noa", "device": "tablet" }));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, serde_json::json!({ "user": "noa", "device": "tablet", "forgotten": true }));
    let devices = |st: switchboard::store::InboxState| st.devices.into_iter().map(|d| d.device).collect::<Vec<_>>();
    assert_eq!(devices(state()), ["phone"]);
    assert!(common::wait_until(Duration::from_secs(10), || state().messages == 0), "the phone had them all");
    // Again, or a device never seen: nothing to forget, and it says so.
    let (status, v) = api(&server, serde_json::json!({ "user": "noa", "device": "tablet" }));
    assert_eq!((status, &v["forgotten"]), (200, &serde_json::json!(false)), "{v}");
    let (status, v) = api(&server, serde_json::json!({ "user": "noa", "device": "" }));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("device id"), "{v}");
    let (status, v) = api(&server, serde_json::json!({ "user": "noa" }));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("device"), "{v}");

    // Forgotten for good: a restart does not bring it back, and messages
    // go as the phone acknowledges them.
    drop(phone);
    server.shutdown().unwrap();
    let server = common::start(cfg);
    let h = server.handle();
    for i in 10..13u32 {
        h.push_reliable("noa", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    let state = || h.inbox_state("noa", Duration::from_secs(5)).unwrap();
    assert_eq!(devices(state()), ["phone"]);
    // In a batch too: the commands after it see it gone.
    drop(device_login(server.local_addr(), "noa", "watch", 0));
    let batch = serde_json::json!({ "commands": [
        { "forget_device": { "user": "noa", "device": "watch" } },
        { "inbox": { "user": "noa" } },
    ] })
    .to_string();
    let key = Some("write-key-0123456789abcdef");
    let (status, answer) =
        common::http(server.admin_addr().unwrap(), "POST", "/api/v1/batch", batch.as_bytes(), key).unwrap();
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!((status, &v["results"][0]["forgotten"]), (200, &serde_json::json!(true)), "{v}");
    assert_eq!(v["results"][1]["devices"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["results"][1]["devices"][0]["device"], "phone", "{v}");
    let mut phone = device_login(server.local_addr(), "noa", "phone", 10);
    read_until(&mut phone, &mut seen, 3, Duration::from_secs(5), |s| s.have >= 13);
    assert_eq!(payloads(&seen), expected(0..13));
    assert!(common::wait_until(Duration::from_secs(10), || state().messages == 0), "nothing held for the tablet");
    drop(phone);
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sign-out the docs describe: the app closes its connection (or the
/// backend kicks it) and the backend forgets the device at once. The
/// connection's last ACKs reach the store after the forget (they are
/// handed over at its close, through the store's queue), and they used to
/// add the device back at its old position, while the API had answered
/// `forgotten: true` (6 times in 6 in a review).
#[test]
fn a_device_forgotten_right_after_its_connection_closed_stays_forgotten() {
    let mut cfg = config();
    cfg.store.retention_interval_ms = 100;
    let server = common::start(cfg);
    let (addr, h) = (server.local_addr(), server.handle());
    drop(device_login(addr, "ada", "phone", 0));
    for round in 0..3u32 {
        let device = format!("tablet-{round}");
        let mut tablet = device_login(addr, "ada", &device, 0);
        for i in 0..5u32 {
            h.push_reliable("ada", format!("r{round} m{i}"), 0).unwrap().wait().unwrap();
        }
        let mut seen = Seen::default();
        let head = h.inbox_state("ada", Duration::from_secs(5)).unwrap().head_seq;
        read_until(&mut tablet, &mut seen, 1, Duration::from_secs(5), |s| s.have >= head);
        if round % 2 == 0 {
            drop(tablet); // the app closes
        } else {
            h.kick_user("ada").unwrap(); // the backend closes it
        }
        assert_eq!(h.forget_device("ada", &device, Duration::from_secs(5)), Ok(true));
        // Past the ticks that hand over what the closed connection had.
        std::thread::sleep(Duration::from_millis(1500));
        let devices: Vec<String> =
            h.inbox_state("ada", Duration::from_secs(5)).unwrap().devices.into_iter().map(|d| d.device).collect();
        assert_eq!(devices, ["phone"], "round {round}: the forgotten device came back");
    }
}

/// A disk store of three shards: each user's inbox lives in its shard,
/// seqs go on per user after a restart (started again with
/// `store.shards = 1`: the count on disk wins), and a device catches up
/// from its shard.
#[test]
fn a_sharded_disk_store_keeps_every_users_inbox_across_a_restart() {
    let (dir, mut cfg) = disk_config("sb-shards");
    cfg.store.shards = 3;
    let users: Vec<String> = (0..12).map(|i| format!("sharded-{i}")).collect();
    let hit: std::collections::HashSet<usize> = users.iter().map(|u| switchboard::store::shard_of(u, 3)).collect();
    assert_eq!(hit.len(), 3, "the users fall in every shard");
    let server = common::start(cfg.clone());
    let h = server.handle();
    for round in 0..5u64 {
        for u in &users {
            let r = h.push_reliable(u, format!("{u}-{round}"), 0).unwrap().wait().unwrap();
            assert_eq!(r.seq, round + 1, "{u}: one inbox, dense seqs");
        }
    }
    server.shutdown().unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("SHARDS")).unwrap(), "3\n");
    cfg.store.shards = 1;
    let server = common::start(cfg);
    let h = server.handle();
    for u in &users {
        let r = h.push_reliable(u, format!("{u}-5"), 0).unwrap().wait().unwrap();
        assert_eq!(r.seq, 6, "{u}: its seqs go on in its shard after the restart");
        let state = h.inbox_state(u, Duration::from_secs(5)).unwrap();
        assert_eq!((state.head_seq, state.messages), (6, 6), "{u}");
    }
    for u in [&users[0], &users[11]] {
        let mut c = device_login(server.local_addr(), u, "phone", 0);
        let mut seen = Seen::default();
        read_until(&mut c, &mut seen, 5, Duration::from_secs(5), |s| s.have >= 6);
        assert_eq!(payloads(&seen), (0..6).map(|i| format!("{u}-{i}")).collect::<Vec<_>>(), "{u}");
    }
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a disk store holds shows in `/stats` and `/metrics` as soon as a
/// restarted server is up, before any request reaches its store: an
/// operator checking a restored backup, and the store-full alert, read it.
/// (Found by an outside check of docs/DEPLOY.md: both gauges read 0 until
/// a shard's first request or retention pass, 60 s after the start.)
#[test]
fn a_restarted_disk_store_shows_what_it_holds_before_any_request() {
    let (dir, mut cfg) = disk_config("sb-held-at-start");
    cfg.store.shards = 2;
    cfg.admin.listen = "127.0.0.1:0".into();
    let users: Vec<String> = (0..6).map(|i| format!("held-{i}")).collect();
    let shards: std::collections::HashSet<usize> = users.iter().map(|u| switchboard::store::shard_of(u, 2)).collect();
    assert_eq!(shards.len(), 2, "the users fall in both shards");
    let server = common::start(cfg.clone());
    let h = server.handle();
    for u in &users {
        for i in 0..3 {
            h.push_reliable(u, format!("{u}-{i}"), 0).unwrap().wait().unwrap();
        }
    }
    let counters = h.store_counters().expect("a store");
    let held = |c: &switchboard::store::StoreCounters| {
        use std::sync::atomic::Ordering::Relaxed;
        (c.held_messages.load(Relaxed), c.held_bytes.load(Relaxed))
    };
    let before = held(&counters);
    assert_eq!(before.0, 18);
    server.shutdown().unwrap();
    let server = common::start(cfg);
    let counters = server.handle().store_counters().expect("a store");
    let shown = common::wait_until(Duration::from_secs(3), || held(&counters) == before);
    assert!(shown, "after the restart the store shows {:?}, it holds {before:?}", held(&counters));
    let (status, stats) = common::http(server.admin_addr().unwrap(), "GET", "/api/v1/stats", b"", None).unwrap();
    assert_eq!(status, 200);
    assert!(stats.contains("\"pending_messages\":18"), "{stats}");
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_server_on_the_same_store_directory_is_refused_with_the_reason() {
    let (dir, cfg) = disk_config("sb-reliable-lock");
    let first = common::start(cfg.clone());
    let err = match switchboard::Server::builder().config(cfg).start() {
        Ok(_) => panic!("two servers opened one store directory"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("in use by another process"), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
    first.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_admin_api_pushes_reliably_or_at_most_once_and_shows_an_inbox() {
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    let server = common::start(cfg);
    let a = server.admin_addr().unwrap();
    let json = |b: &str| -> serde_json::Value { serde_json::from_str(b).unwrap() };
    // Stored while the user is offline; the same client_id twice is one message.
    let (status, body) = common::http(a, "POST", "/push?user=lea", b"first", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let first = json(&body);
    assert_eq!((first["seq"].as_u64(), first["stored"].as_bool()), (Some(1), Some(true)));
    assert_eq!(first["durability"], "memory");
    for _ in 0..2 {
        let (status, body) = common::http(a, "POST", "/push?user=lea&client_id=9", b"second", None).unwrap();
        assert_eq!((status, json(&body)["seq"].as_u64()), (200, Some(2)), "{body}");
    }
    // At most once: not stored, nobody online, gone.
    let (status, body) = common::http(a, "POST", "/push?user=lea&mode=at_most_once", b"gone", None).unwrap();
    assert_eq!(
        (status, json(&body)["stored"].as_bool(), json(&body)["connections"].as_u64()),
        (200, Some(false), Some(0))
    );
    assert_eq!(common::http(a, "POST", "/push?user=lea&mode=sometimes", b"x", None).unwrap().0, 400);
    // A device catches up and acknowledges; the inbox shows its position.
    let mut lea = device_login(server.local_addr(), "lea", "watch", 0);
    let mut seen = Seen::default();
    read_until(&mut lea, &mut seen, 1, Duration::from_secs(5), |s| s.have >= 2);
    assert_eq!(payloads(&seen), vec!["first".to_string(), "second".to_string()]);
    let inbox = || json(&common::http(a, "GET", "/inbox?user=lea", b"", None).unwrap().1);
    assert!(common::wait_until(Duration::from_secs(5), || inbox()["devices"][0]["position"] == 2));
    let state = inbox();
    assert_eq!(state["head_seq"], 2);
    assert_eq!(state["devices"][0]["device"], "watch");
    assert_eq!(state["devices"][0]["pending"], 0);
}

#[test]
fn a_pipelined_sender_gets_every_send_ack_in_order() {
    // A sender that does not wait for each SEND_ACK (what a client
    // flushing its outbox after a reconnect does): 10,000 SENDs back to
    // back, read on another thread. Every one is stored and acknowledged,
    // in order, and the connection stays up.
    // On the default disk store with fsync, where appends are group
    // committed and SEND_ACKs come back in bursts.
    let (dir, cfg) = disk_config("sb-pipelined");
    let server = common::start(cfg);
    let addr = server.local_addr();
    let (mut tx, _) = common::login(addr, "piper");
    let mut acks = tx.try_clone_for_reading().unwrap();
    const N: u32 = 10_000;
    let reader = std::thread::spawn(move || {
        for i in 0..N {
            match acks.recv_skipping_pings().unwrap_or_else(|e| panic!("SEND_ACK {i}: {e}")).frame() {
                Frame::SendAck { req_id, .. } => assert_eq!(req_id, i + 1, "SEND_ACKs in order"),
                other => panic!("expected SEND_ACK {i}, got {other:?}"),
            }
        }
    });
    for i in 0..N {
        tx.send(i + 1, "offline-reader", format!("m{i}").as_bytes()).unwrap();
    }
    reader.join().unwrap();
    let mut rx = device_login(addr, "offline-reader", "d1", 0);
    let mut seen = Seen { auto_fetch: true, ..Seen::default() };
    read_until(&mut rx, &mut seen, 32, Duration::from_secs(20), |s| s.have == N as u64);
    assert_eq!(payloads(&seen), expected(0..N));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The store thread hands its answers and its notices of new messages to
/// the workers through their mailboxes (`limits.mailbox_capacity`). One
/// store turn can answer more than a mailbox holds: 60 devices logging in
/// at once, then a burst of pushes to all of them. What does not fit must
/// still arrive: a lost login answer left its device without a SYNC for
/// good, and a lost notice left a caught-up device without the message
/// until the next one came.
#[test]
fn store_answers_and_notices_that_find_a_full_mailbox_still_arrive() {
    const DEVICES: usize = 60;
    const ROUNDS: u64 = 3;
    let mut cfg = config();
    cfg.limits.mailbox_capacity = 16;
    cfg.server.workers = 1;
    let server = common::start(cfg);
    let addr = server.local_addr();
    let h = server.handle();
    // Every LOGIN written before any answer is read.
    let mut devices: Vec<(Client, Seen)> = (0..DEVICES)
        .map(|i| {
            let mut c = common::connect(addr);
            let user = format!("u{i}");
            let token = common::token(&user);
            c.send_frame(&Frame::Login { user: &user, token: token.as_bytes(), device: Some("phone"), last_seq: 0 })
                .unwrap();
            (c, Seen::default())
        })
        .collect();
    for (c, seen) in &mut devices {
        match c.recv_skipping_pings().unwrap().frame() {
            Frame::LoginOk { .. } => {}
            other => panic!("expected LOGIN_OK, got {other:?}"),
        }
        read_until(c, seen, 1, Duration::from_secs(10), |s| !s.syncs.is_empty());
    }
    // Every push submitted before any is waited for: the store thread
    // takes them in a few turns.
    let pending: Vec<_> = (0..ROUNDS)
        .flat_map(|r| (0..DEVICES).map(move |i| (i, r)))
        .map(|(i, r)| h.push_reliable(&format!("u{i}"), format!("m{r}"), 0).unwrap())
        .collect();
    for p in pending {
        p.wait().unwrap();
    }
    for (i, (c, seen)) in devices.iter_mut().enumerate() {
        read_until(c, seen, 1, Duration::from_secs(10), |s| s.have >= ROUNDS);
        assert_eq!(payloads(seen), expected(0..ROUNDS as u32), "u{i}");
    }
}

/// A handle kept past the server's shutdown is told so by an inbox query,
/// not that the store's queue is full (which says: retry).
#[test]
fn an_inbox_query_after_shutdown_says_so() {
    let server = common::start(config());
    let h = server.handle();
    h.push_reliable("zed", "m", 0).unwrap().wait().unwrap();
    server.shutdown().unwrap();
    match h.inbox_state("zed", Duration::from_secs(5)) {
        Err(switchboard::server::InboxStateError::Push(switchboard::PushError::ShuttingDown)) => {}
        other => panic!("expected ShuttingDown, got {other:?}"),
    }
}

/// A phone whose connection died silently at a network change (no FIN or
/// RST reached the server) logs in again on a new one. The old one stayed
/// open until its idle timeout (300 s by default), counted against
/// `limits.max_conns_per_user`: after 16 network changes the 17th login
/// got LOGIN_ERROR 8 (an outside review), and the app had no way to close
/// connections it had lost. A device's LOGIN now closes the user's other
/// connections of that device on the server with CLOSE 4008: the newest
/// login wins, and the old window's messages come again on the new one.
#[test]
fn a_device_logging_in_again_replaces_its_silent_old_connection() {
    let server = common::start(config());
    let addr = server.local_addr();
    let handle = server.handle();
    let (mut alice, _) = common::login(addr, "alice");
    let mut laptop = device_login(addr, "bob", "laptop", 0);
    let mut ghosts = Vec::new();
    for round in 1..=20u32 {
        // Logged in and answered: the new connection is the device's.
        let mut phone = device_login(addr, "bob", "phone", 0);
        let mut seen = Seen::default();
        read_until(&mut phone, &mut seen, u64::MAX, Duration::from_secs(5), |s| !s.syncs.is_empty());
        // The one before it was closed with 4008, and is gone from the server.
        if let Some(mut old) = ghosts.pop() {
            let old: &mut Client = &mut old;
            old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (code, reason) = loop {
                match old.recv_skipping_pings().expect("a CLOSE before the end").frame() {
                    Frame::Close { code, reason } => break (code, reason.to_string()),
                    _ => continue,
                }
            };
            assert_eq!(code, switchboard::CloseCode::Replaced as u16, "round {round}: {reason}");
        }
        assert!(
            common::wait_until(Duration::from_secs(5), || handle.connections_of("bob").len() == 2),
            "round {round}: bob has {} connections, the laptop and the newest phone",
            handle.connections_of("bob").len()
        );
        // Never read again by the test: the next round's ghost.
        ghosts.push(phone);
    }
    // The newest phone connection gets what is stored; the laptop, another
    // device, was never touched.
    send_stored(&mut alice, "bob", 0..3);
    let mut phone = ghosts.pop().unwrap();
    let mut seen = Seen::default();
    read_until(&mut phone, &mut seen, u64::MAX, Duration::from_secs(5), |s| s.have >= 3);
    let mut seen_laptop = Seen::default();
    read_until(&mut laptop, &mut seen_laptop, u64::MAX, Duration::from_secs(5), |s| s.have >= 3);
}

/// What a device connection is sent, in order: INBOX (seq, payload) and
/// SYNC frames.
#[derive(Debug, PartialEq)]
enum Got {
    Inbox(u64, String),
    Sync { req_id: u32, position: u64, head_seq: u64, page_end: u64 },
}

/// The INBOX and SYNC frames arriving on `c` until `n` INBOX frames have
/// come or `limit` passes; acknowledges none.
fn inbox_frames(c: &mut Client, n: usize, limit: Duration) -> Vec<Got> {
    c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    while got.iter().filter(|g| matches!(g, Got::Inbox(..))).count() < n && Instant::now() < end {
        match c.recv_skipping_pings() {
            Ok(f) => match f.frame() {
                Frame::Inbox { seq, payload, .. } => got.push(Got::Inbox(seq, String::from_utf8_lossy(payload).into())),
                Frame::Sync { req_id, position, head_seq, page_end } => {
                    got.push(Got::Sync { req_id, position, head_seq, page_end })
                }
                other => panic!("unexpected frame {other:?}"),
            },
            Err(e) if e.is_timeout() => {}
            Err(e) => panic!("connection failed: {e}"),
        }
    }
    got
}

/// An operator's count of messages that expired undelivered
/// (`expired_unacknowledged` of the store's counters, the metric
/// `switchboard_store_expired_unacknowledged_total`): of what retention
/// drops, the messages a known device had not acknowledged, and not those
/// every device had.
#[test]
fn messages_that_expire_undelivered_are_counted() {
    let mut cfg = config();
    cfg.store.retention_interval_ms = 100;
    let server = common::start(cfg);
    let handle = server.handle();
    let counters = handle.store_counters().expect("a store");
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    // The phone gets and acknowledges two messages, then goes away.
    let mut phone = device_login(server.local_addr(), "ivy", "phone", 0);
    assert_eq!(next_sync(&mut phone), (0, 0, 0, 0), "the login's SYNC");
    for text in ["a", "b"] {
        handle.push_reliable("ivy", text, 0).unwrap().wait().unwrap();
    }
    let (seq, _) = (next_inbox(&mut phone), next_inbox(&mut phone)).1;
    phone.ack(seq).unwrap();
    drop(phone);
    // Two that expire before it comes back.
    let ttl = switchboard::ReliablePush { client_id: 0, ttl: Some(Duration::from_millis(200)) };
    for text in ["ring", "code"] {
        handle.push_reliable_with("ivy", text, ttl).unwrap().wait().unwrap();
    }
    let counted = common::wait_until(Duration::from_secs(10), || count(&counters.expired) == 4);
    assert!(counted, "retention dropped {} of the 4", count(&counters.expired));
    assert_eq!(count(&counters.expired_unacknowledged), 2, "the two that expired; not the two acknowledged");
}

/// A `ReliablePush::ttl` longer than a u64 of milliseconds holds (about
/// 584 million years) is the longest expiry, not what is left of it past
/// 2^64: a cast that wrapped made this one expire 384 ms after it was
/// stored.
#[test]
fn an_expiry_too_long_for_milliseconds_is_the_longest_one() {
    let server = common::start(config());
    let handle = server.handle();
    // 18_446_744_073_709_552 s is 2^64 + 384 ms.
    let ttl = Some(Duration::from_secs(18_446_744_073_709_552));
    let far = switchboard::ReliablePush { client_id: 0, ttl };
    assert_eq!(handle.push_reliable_with("ivy", "for ever", far).unwrap().wait().unwrap().seq, 1);
    std::thread::sleep(Duration::from_millis(600));
    let mut phone = device_login(server.local_addr(), "ivy", "phone", 0);
    let got = inbox_frames(&mut phone, 1, Duration::from_secs(5));
    let sync = Got::Sync { req_id: 0, position: 0, head_seq: 1, page_end: 1 };
    assert_eq!(got, [sync, Got::Inbox(1, "for ever".into())], "not expired 600 ms after it was stored");
}

#[test]
fn messages_past_their_own_expiry_are_not_delivered_to_a_device_back_later() {
    let mut cfg = config();
    // Login pages of two: the expired messages fall inside the pages.
    cfg.delivery.first_page = 2;
    // No retransmits while the test reads at its own pace (config()'s
    // 300 ms sent copies on a busy host, between the frames it counts).
    cfg.delivery.ack_timeout_ms = 10_000;
    let server = common::start(cfg);
    let addr = server.local_addr();
    let handle = server.handle();
    // The tablet is connected while the messages are stored; the phone is not.
    let mut tablet = device_login(addr, "ivy", "tablet", 0);
    // Its window is open once its login SYNC came: from then on each new
    // message is written to it live, not read from the inbox (where an
    // expired one would be left out, on a host slow enough).
    tablet.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match tablet.recv_skipping_pings().unwrap().frame() {
        Frame::Sync { req_id: 0, position: 0, head_seq: 0, page_end: 0 } => {}
        other => panic!("expected the login SYNC, got {other:?}"),
    }
    let (mut gus, _) = common::login(addr, "gus");
    let stored = |gus: &mut Client, req_id: u32| match gus.recv_skipping_pings().unwrap().frame() {
        Frame::SendAck { req_id: r, .. } | Frame::SendResult { req_id: r, outcome: SendOutcome::Stored, .. } => {
            assert_eq!(r, req_id)
        }
        other => panic!("expected the SEND's answer, got {other:?}"),
    };
    gus.send(1, "ivy", b"keep 1").unwrap();
    stored(&mut gus, 1);
    gus.send_ex_with_ttl(2, 0, 0, 1_000, "ivy", b"call invite").unwrap();
    stored(&mut gus, 2);
    let ttl = Some(Duration::from_millis(1_000));
    let otp = switchboard::ReliablePush { client_id: 0, ttl };
    assert_eq!(handle.push_reliable_with("ivy", "one-time code", otp).unwrap().wait().unwrap().seq, 3);
    gus.send_ex_with_ttl(4, 0, 0, 60_000, "ivy", b"fresh for a minute").unwrap();
    stored(&mut gus, 4);
    gus.send(5, "ivy", b"keep 2").unwrap();
    stored(&mut gus, 5);
    // A device connected when they are stored gets every one at once
    // (within the second the two short-lived ones have).
    let live = inbox_frames(&mut tablet, 5, Duration::from_secs(5));
    let seqs: Vec<u64> = live.iter().filter_map(|g| if let Got::Inbox(s, _) = g { Some(*s) } else { None }).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    tablet.ack(5).unwrap();
    std::thread::sleep(Duration::from_millis(1_300));
    // The phone logs in after two of them expired. Its first page (1–2)
    // brings 1 only; what is left of the page after it (2) expired with 3,
    // so a second SYNC moves the page past them (PROTOCOL.md 15.7) and 4
    // comes; 5 after a FETCH.
    let inbox = |s: u64, p: &str| Got::Inbox(s, p.to_string());
    let sync = |req_id, position, page_end| Got::Sync { req_id, position, head_seq: 5, page_end };
    let mut phone = device_login(addr, "ivy", "phone", 0);
    let got = inbox_frames(&mut phone, 2, Duration::from_secs(5));
    assert_eq!(got, [sync(0, 0, 2), inbox(1, "keep 1"), sync(0, 0, 4), inbox(4, "fresh for a minute")]);
    phone.fetch(8, 4, 10).unwrap();
    assert_eq!(inbox_frames(&mut phone, 1, Duration::from_secs(5)), [sync(8, 4, 5), inbox(5, "keep 2")]);
    phone.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(phone.recv_skipping_pings().unwrap_err().is_timeout(), "nothing more");
    phone.ack(5).unwrap();
    // History read again (a FETCH below the position) leaves them out too.
    phone.fetch(9, 0, 10).unwrap();
    let again = inbox_frames(&mut phone, 3, Duration::from_secs(5));
    assert_eq!(again, [sync(9, 5, 5), inbox(1, "keep 1"), inbox(4, "fresh for a minute"), inbox(5, "keep 2")]);
}

/// A device offline while 32 other device ids of its user log in (a
/// browser that keeps no `localStorage` makes a new one at each start) is
/// pushed out of the user's list of devices. What it had not acknowledged
/// was then dropped at the next retention pass, once those devices had
/// it: stored, SEND_ACKed, and never delivered. It is kept until its TTL,
/// and the device gets it when it logs in again (PROTOCOL.md 15.2).
#[test]
fn a_device_pushed_out_by_32_others_still_gets_what_was_stored_for_it() {
    let (dir, mut cfg) = disk_config("sb-pushed-out");
    cfg.store.retention_interval_ms = 100;
    let server = common::start(cfg);
    let (addr, h) = (server.local_addr(), server.handle());
    drop(device_login(addr, "ida", "phone", 0));
    for i in 0..3u32 {
        h.push_reliable("ida", format!("m{i}"), 0).unwrap().wait().unwrap();
    }
    for i in 0..32 {
        let mut web = device_login(addr, "ida", &format!("web-{i}"), 0);
        let mut seen = Seen::default();
        read_until(&mut web, &mut seen, 3, Duration::from_secs(5), |s| s.have >= 3);
    }
    let state = || h.inbox_state("ida", Duration::from_secs(5)).unwrap();
    let all_web_at_3 =
        || state().devices.iter().filter(|d| d.device.starts_with("web-") && d.position == 3).count() == 32;
    assert!(common::wait_until(Duration::from_secs(10), all_web_at_3), "{:?}", state().devices);
    std::thread::sleep(Duration::from_millis(400)); // retention passes
    let st = state();
    assert_eq!(st.messages, 3, "kept for the phone: {:?}", st.devices);
    assert!(!st.devices.iter().any(|d| d.device == "phone"), "pushed out of the list");

    let mut phone = device_login(addr, "ida", "phone", 0);
    let mut seen = Seen::default();
    read_until(&mut phone, &mut seen, 3, Duration::from_secs(5), |s| s.have >= 3);
    assert_eq!(payloads(&seen), expected(0..3));
    drop(phone);
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
