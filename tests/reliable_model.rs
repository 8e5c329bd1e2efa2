//! Property test of reliable delivery's two sans-IO halves together: the
//! per-connection window (`proto::reliable::Window`) over a real inbox
//! store (`store::MemoryStore`), driven by random interleavings of appends,
//! store answers, frames reaching the client, ACKs and FETCHes reaching the
//! server (FETCHes of history a device acknowledged among them), retransmit
//! timers, disconnects, reconnects, server restarts
//! (every connection and everything in flight lost; the store kept, as a
//! durable store keeps it) and the store's retention pass (what every
//! device known then has acknowledged is dropped, so a device's first
//! login may find the inbox starting after seq 1). Whatever the
//! interleaving, once the system is left to settle every device has every
//! seq kept since its first login exactly once after dedup, each
//! connection wrote seqs in order (a retransmit starts again from the
//! acknowledged position), and no device was sent a seq that was not
//! stored. The worker's glue between the two is tested end to end in
//! tests/reliable.rs.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use switchboard::proto::codes::{CloseCode, ErrorCode};
use switchboard::proto::reliable::{Window, WindowEnv, WindowRules};
use switchboard::store::{MemoryStore, NewMessage, Store, StoreLimits, StoredMessage};

/// Devices the random operations drive; one more (the laptop) first logs
/// in at the end, after a retention pass.
const DEVICES: usize = 2;
const ALL_DEVICES: usize = DEVICES + 1;

/// Payloads are the seq in decimal (1–3 bytes), so 5 bytes in flight stop
/// the window as often as its 4 messages do.
fn rules() -> WindowRules {
    WindowRules { window: 4, window_bytes: 5, ack_timeout: 3, max_retransmits: 3, first_page: 5, max_fetch: 7 }
}

/// What the server sends a client.
#[derive(Debug)]
enum Down {
    Inbox(u64),
    Sync { head: u64, page_end: u64 },
}

/// What a client sends the server.
#[derive(Debug)]
enum Up {
    Ack(u64),
    Fetch(u64, u16),
}

/// One connection of a device: the window and what is in flight around it.
struct Conn {
    window: Window,
    /// Reads the window asked for, not yet answered by the store.
    reads: VecDeque<(u64, u32)>,
    /// New-message notices not yet handled by the worker.
    notices: VecDeque<StoredMessage>,
    down: VecDeque<Down>,
    up: VecDeque<Up>,
    /// Seqs written on this connection, in order.
    written: Vec<u64>,
    /// The last FETCH the window took: how many seqs were written before
    /// it, and its `after_seq`. Everything written since is past it.
    fetched: Option<(usize, u64)>,
    closed: bool,
}

/// A device: what it has stored, across connections.
#[derive(Default)]
struct Device {
    have: BTreeSet<u64>,
    /// What the store no longer kept at the device's first login (the
    /// retention pass dropped what every device known then had
    /// acknowledged): it can never have those seqs.
    floor: Option<u64>,
    /// The last SYNC: (head, page_end); a FETCH is out.
    page: Option<(u64, u64)>,
    fetching: bool,
    acked: u64,
    conn: Option<Conn>,
}

impl Device {
    /// Every seq up to here that it can have (the test's view).
    fn prefix(&self) -> u64 {
        self.run_from(self.floor.unwrap_or(0))
    }

    /// The seq it has stored everything up to, as the client itself sees
    /// it: it cannot know what was dropped before its first login, so it
    /// counts from the first seq it got (a seq it lacks after that one is
    /// still a gap to the client, and to the checks).
    fn stored(&self) -> u64 {
        self.run_from(self.have.first().map_or(0, |&s| s - 1))
    }

    fn run_from(&self, mut p: u64) -> u64 {
        while self.have.contains(&(p + 1)) {
            p += 1;
        }
        p
    }
}

/// The window's environment: records into the connection, positions go to
/// the store at once (as the store thread applies them in order).
struct Env<'a> {
    conn_reads: &'a mut VecDeque<(u64, u32)>,
    down: &'a mut VecDeque<Down>,
    written: &'a mut Vec<u64>,
    closed: &'a mut bool,
    store: &'a mut MemoryStore,
    device: &'a str,
}

impl WindowEnv<StoredMessage> for Env<'_> {
    fn deliver(&mut self, m: &StoredMessage) {
        self.written.push(m.seq);
        self.down.push_back(Down::Inbox(m.seq));
    }
    fn sync(&mut self, _req_id: u32, _position: u64, head: u64, page_end: u64) {
        self.down.push_back(Down::Sync { head, page_end });
    }
    fn read(&mut self, after: u64, limit: u32) {
        self.conn_reads.push_back((after, limit));
    }
    fn save_position(&mut self, seq: u64) {
        self.store.set_position("u", self.device, seq, 0).unwrap();
    }
    fn error(&mut self, code: ErrorCode, _req_id: u32, reason: &str) {
        panic!("ERROR {code:?}: {reason}");
    }
    fn close(&mut self, code: CloseCode, _reason: &str) {
        assert_eq!(code, CloseCode::AckTimeout);
        *self.closed = true;
    }
}

struct World {
    store: MemoryStore,
    devices: Vec<Device>,
    now: u32,
    appended: u64,
}

const NAMES: [&str; ALL_DEVICES] = ["phone", "tablet", "laptop"];

impl World {
    fn with_window(&mut self, d: usize, f: impl FnOnce(&mut Window, &mut Env<'_>, u32)) {
        let now = self.now;
        let Some(c) = self.devices[d].conn.as_mut() else { return };
        let mut env = Env {
            conn_reads: &mut c.reads,
            down: &mut c.down,
            written: &mut c.written,
            closed: &mut c.closed,
            store: &mut self.store,
            device: NAMES[d],
        };
        f(&mut c.window, &mut env, now);
        if c.closed {
            self.devices[d].conn = None;
        }
    }

    fn connect(&mut self, d: usize) {
        if self.devices[d].floor.is_none() {
            let first_seq = self.store.inbox_state("u").unwrap().first_seq;
            self.devices[d].floor = Some(first_seq - 1);
        }
        let client_seq = self.devices[d].stored();
        let (position, head) = self.store.device_login("u", NAMES[d], client_seq, 0).unwrap();
        let mut c = Conn {
            window: Window::start::<StoredMessage>(0, 0, 0, &rules(), &mut NoEnv),
            reads: VecDeque::new(),
            notices: VecDeque::new(),
            down: VecDeque::new(),
            up: VecDeque::new(),
            written: Vec::new(),
            fetched: None,
            closed: false,
        };
        let mut env = Env {
            conn_reads: &mut c.reads,
            down: &mut c.down,
            written: &mut c.written,
            closed: &mut c.closed,
            store: &mut self.store,
            device: NAMES[d],
        };
        c.window = Window::start(position, head, self.now, &rules(), &mut env);
        let dev = &mut self.devices[d];
        dev.page = None;
        dev.fetching = false;
        dev.acked = position;
        dev.conn = Some(c);
    }

    fn append(&mut self) {
        self.appended += 1;
        let m = NewMessage {
            to: Arc::from("u"),
            from: Arc::from(""),
            msg_id: self.appended,
            ts_ms: 0,
            payload: Bytes::from(self.appended.to_string()),
            client_id: 0,
            expires_ms: 0,
        };
        let switchboard::store::Appended::New { seq } = self.store.append(&m, 0).unwrap() else { panic!("dup") };
        assert_eq!(seq, self.appended);
        let stored = StoredMessage { seq, msg_id: m.msg_id, ts_ms: 0, from: m.from, payload: m.payload, expires_ms: 0 };
        for dev in &mut self.devices {
            if let Some(c) = dev.conn.as_mut() {
                c.notices.push_back(stored.clone());
            }
        }
    }

    fn notice(&mut self, d: usize) {
        let Some(m) = self.devices[d].conn.as_mut().and_then(|c| c.notices.pop_front()) else { return };
        self.with_window(d, |w, env, now| w.on_appended(&m, now, &rules(), env));
    }

    fn serve_read(&mut self, d: usize) {
        let Some((after, limit)) = self.devices[d].conn.as_mut().and_then(|c| c.reads.pop_front()) else { return };
        let page = self.store.read("u", after, limit as usize).unwrap();
        self.with_window(d, |w, env, now| w.on_page(&page.messages, page.head_seq, now, &rules(), env));
    }

    /// The app lost its copy of some messages (15.7): the client asks for
    /// 3 after half of what it has stored. It keeps what it has (the
    /// model's `have`), so what comes again is deduplicated. Only once the
    /// connection's login SYNC came: a FETCH before it is refused (ERROR
    /// 115, PROTOCOL.md 4.3).
    fn client_refetch(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        let stored = dev.stored();
        if dev.page.is_none() {
            return;
        }
        if let Some(c) = dev.conn.as_mut() {
            c.up.push_back(Up::Fetch(stored / 2, 3));
        }
    }

    /// The client takes one frame and answers as a client should: ACK on
    /// progress (every 2 here, and at a page's end) and on a duplicate,
    /// FETCH once the page is in.
    fn client_recv(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        let Some(c) = dev.conn.as_mut() else { return };
        let Some(f) = c.down.pop_front() else { return };
        let mut dup = false;
        match f {
            Down::Inbox(seq) => dup = !dev.have.insert(seq),
            Down::Sync { head, page_end } => {
                dev.page = Some((head, page_end));
                dev.fetching = false;
            }
        }
        let have = dev.stored();
        let c = dev.conn.as_mut().unwrap();
        let page_end = dev.page.map_or(0, |p| p.1);
        if have >= dev.acked + 2 || (have > dev.acked && have >= page_end) || dup {
            c.up.push_back(Up::Ack(have));
            dev.acked = have;
        }
        if let Some((head, end)) = dev.page {
            if !dev.fetching && have >= end && end < head {
                c.up.push_back(Up::Fetch(have, 7));
                dev.fetching = true;
            }
        }
    }

    fn server_recv(&mut self, d: usize) {
        let Some(u) = self.devices[d].conn.as_mut().and_then(|c| c.up.pop_front()) else { return };
        match u {
            Up::Ack(seq) => self.with_window(d, |w, env, now| w.on_ack(seq, now, &rules(), env)),
            Up::Fetch(after, limit) => {
                if let Some(c) = self.devices[d].conn.as_mut() {
                    c.fetched = Some((c.written.len(), after));
                }
                self.with_window(d, |w, env, now| w.on_fetch(1, after, limit, now, &rules(), env))
            }
        }
    }

    fn tick(&mut self) {
        self.now += 1;
        for d in 0..ALL_DEVICES {
            self.with_window(d, |w, env, now| w.on_tick(now, &rules(), env));
        }
    }

    /// Every device of `devices` connected, everything in flight handled,
    /// the clock moved on now and then, until each has every seq it can
    /// have (or 2,000 rounds).
    fn settle(&mut self, devices: std::ops::Range<usize>) {
        for round in 0..2000 {
            for d in devices.clone() {
                if self.devices[d].conn.is_none() {
                    self.connect(d);
                }
                self.notice(d);
                self.serve_read(d);
                self.client_recv(d);
                self.server_recv(d);
            }
            if round % 50 == 49 {
                self.tick();
            }
            self.check_order();
            if devices.clone().all(|d| self.devices[d].prefix() == self.appended) {
                break;
            }
        }
    }

    /// Each connection wrote seqs in order, restarting only from at most
    /// the device's prefix + 1 (a retransmit from the position), and only
    /// stored ones.
    fn check_order(&self) {
        for dev in &self.devices {
            if let Some(c) = &dev.conn {
                for w in c.written.windows(2) {
                    assert!(w[1] > w[0] || w[1] <= dev.prefix() + 1 || w[1] <= dev.acked + 1, "{:?}", c.written);
                }
                assert!(c.written.iter().all(|&s| s >= 1 && s <= self.appended));
                if let Some((from, after)) = c.fetched {
                    // PROTOCOL.md 15.7: a FETCH's page is (after_seq, page_end].
                    assert!(c.written[from..].iter().all(|&s| s > after), "after FETCH({after}): {:?}", c.written);
                }
            }
        }
    }
}

/// For the placeholder window while a connection is built.
struct NoEnv;

impl WindowEnv<StoredMessage> for NoEnv {
    fn deliver(&mut self, _: &StoredMessage) {}
    fn sync(&mut self, _: u32, _: u64, _: u64, _: u64) {}
    fn read(&mut self, _: u64, _: u32) {}
    fn save_position(&mut self, _: u64) {}
    fn error(&mut self, _: ErrorCode, _: u32, _: &str) {}
    fn close(&mut self, _: CloseCode, _: &str) {}
}

#[derive(Clone, Debug)]
enum Op {
    Append,
    Notice(usize),
    ServeRead(usize),
    ClientRecv(usize),
    ServerRecv(usize),
    /// The client asks again for messages it acknowledged.
    Refetch(usize),
    Tick,
    Disconnect(usize),
    Connect(usize),
    Restart,
    /// The store's retention pass: drops what every known device has
    /// acknowledged.
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..DEVICES;
    prop_oneof![
        4 => Just(Op::Append),
        4 => d.clone().prop_map(Op::Notice),
        4 => d.clone().prop_map(Op::ServeRead),
        8 => d.clone().prop_map(Op::ClientRecv),
        6 => d.clone().prop_map(Op::ServerRecv),
        1 => d.clone().prop_map(Op::Refetch),
        2 => Just(Op::Tick),
        1 => d.clone().prop_map(Op::Disconnect),
        2 => d.prop_map(Op::Connect),
        1 => Just(Op::Restart),
        1 => Just(Op::Expire),
    ]
}

proptest! {
    // 256 cases, or `PROPTEST_CASES` when set (a deep run).
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn every_device_ends_with_every_message_once_in_order(ops in prop::collection::vec(op(), 1..300)) {
        let limits = StoreLimits { ttl_ms: u64::MAX / 4, ..StoreLimits::default() };
        let mut w = World { store: MemoryStore::new(limits), devices: (0..ALL_DEVICES).map(|_| Device::default()).collect(), now: 0, appended: 0 };
        for op in ops {
            match op {
                Op::Append => w.append(),
                Op::Notice(d) => w.notice(d),
                Op::ServeRead(d) => w.serve_read(d),
                Op::ClientRecv(d) => w.client_recv(d),
                Op::ServerRecv(d) => w.server_recv(d),
                Op::Refetch(d) => w.client_refetch(d),
                Op::Tick => w.tick(),
                Op::Disconnect(d) => w.devices[d].conn = None,
                Op::Connect(d) => {
                    if w.devices[d].conn.is_none() {
                        w.connect(d);
                    }
                }
                Op::Restart => {
                    for dev in &mut w.devices {
                        dev.conn = None;
                    }
                }
                Op::Expire => {
                    w.store.expire(0).unwrap();
                }
            }
            w.check_order();
        }
        // Settle the phone and the tablet; the retention pass drops what
        // both have; more messages come; then the laptop logs in for the
        // first time (its first page lies past the dropped seqs) and
        // everyone settles again.
        w.settle(0..DEVICES);
        w.store.expire(0).unwrap();
        for _ in 0..8 {
            w.append();
        }
        w.settle(0..ALL_DEVICES);
        for (d, dev) in w.devices.iter().enumerate() {
            prop_assert_eq!(dev.prefix(), w.appended, "device {} has {:?}", d, dev.have);
            prop_assert_eq!(dev.have.len() as u64, w.appended - dev.floor.unwrap_or(0));
        }
    }
}
