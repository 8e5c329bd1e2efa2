//! A conformance suite for [`Store`] implementations: the behaviour the
//! server relies on from any store, checked the same way against the
//! crate's own stores (memory, disk with either durability, Redis on one
//! server and on a cluster) and against one an embedding application
//! writes for [`crate::server::ServerBuilder::custom_store`].
//!
//! ```
//! use switchboard::store::conformance::{self, Subject};
//! use switchboard::store::{MemoryStore, Store, StoreLimits};
//!
//! struct Mine(MemoryStore); // your store here
//!
//! impl Subject for Mine {
//!     fn store(&mut self) -> &mut dyn Store {
//!         &mut self.0
//!     }
//!     fn restart(&mut self) -> bool {
//!         false // keeps nothing across a restart; a durable store reopens here
//!     }
//!     fn forgets_empty_inboxes(&self) -> bool {
//!         true // the memory store forgets an inbox left empty; a durable store leaves this out
//!     }
//! }
//!
//! // In a #[test]: panics naming every check that failed.
//! conformance::run_all(|limits: StoreLimits| Mine(MemoryStore::new(limits)));
//! ```
//!
//! Each check gets fresh subjects from the function it is given, with the
//! limits it needs, and drives the store's methods directly, with its own
//! clock (`now_ms` from a fixed point in 2027), as the store thread would.
//! What a store may do either way is accepted either way: dropping a
//! message at the acknowledgement that completes it or at the next
//! retention pass ([`Subject::drops_at_acknowledgement`]), keeping
//! nothing across a restart ([`Subject::restart`] returns `false`; the
//! checks of what a restart keeps are then skipped) and, only then,
//! forgetting an inbox left with no message and no device
//! ([`Subject::forgets_empty_inboxes`], as the memory store of the example
//! does; without it, the example fails two checks).

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::Bytes;

use super::{
    record_bytes, Appended, InboxState, NewMessage, Page, Store, StoreError, StoreLimits, MAX_DEVICES_PER_USER,
    MAX_DEVICE_BYTES,
};

/// A store under test, and how to restart it.
pub trait Subject {
    /// The store.
    fn store(&mut self) -> &mut dyn Store;
    /// Syncs, closes the store and opens it again on what it kept, as a
    /// restart of the process would; `false`, doing nothing, for a store
    /// that keeps nothing across a restart.
    fn restart(&mut self) -> bool;
    /// Whether the store drops a message at the acknowledgement that
    /// completes it (every known device of its user past it), as the disk
    /// store does while the message is hot, rather than at the next
    /// retention pass ([`Store::expire`]), which then counts none of
    /// those. Either is allowed; the checks expect what this says.
    fn drops_at_acknowledgement(&self) -> bool {
        false
    }
    /// Whether the retention pass forgets an inbox left with no message
    /// and no device, its seqs then starting again at 1, as the memory
    /// store does to bound its RAM by what it holds. Allowed only to a
    /// store that keeps nothing across a restart ([`Subject::restart`]
    /// `false`): its clients already start over when they find an inbox
    /// behind what they stored (PROTOCOL.md 15.8), and the only one that
    /// could find this one behind is a device the store forgot, which
    /// starts over anyway. Otherwise the head outlives the record.
    fn forgets_empty_inboxes(&self) -> bool {
        false
    }
}

impl Subject for Box<dyn Subject> {
    fn store(&mut self) -> &mut dyn Store {
        (**self).store()
    }
    fn restart(&mut self) -> bool {
        (**self).restart()
    }
    fn drops_at_acknowledgement(&self) -> bool {
        (**self).drops_at_acknowledgement()
    }
    fn forgets_empty_inboxes(&self) -> bool {
        (**self).forgets_empty_inboxes()
    }
}

/// How a check makes a fresh subject with the limits it needs.
pub type Make<'a> = &'a mut dyn FnMut(StoreLimits) -> Box<dyn Subject>;

/// One check of the suite.
pub struct Check {
    /// What it checks, as a name (also the test's name in the crate's own
    /// runs of the suite).
    pub name: &'static str,
    /// Runs it: panics if the store does not behave.
    pub run: fn(Make<'_>),
}

/// Every check of the suite.
pub const CHECKS: &[Check] = &[
    Check { name: "append_and_read_in_order_with_dense_seqs", run: append_and_read_in_order_with_dense_seqs },
    Check { name: "append_batch_as_one_by_one", run: append_batch_as_one_by_one },
    Check { name: "head_survives_trimming", run: head_survives_trimming },
    Check { name: "head_survives_its_record", run: head_survives_its_record },
    Check { name: "dedup_within_window_and_not_after", run: dedup_within_window_and_not_after },
    Check { name: "device_positions_independent_per_device", run: device_positions_independent_per_device },
    Check { name: "positions_written_together_as_one_by_one", run: positions_written_together_as_one_by_one },
    Check { name: "retention_drops_by_ttl", run: retention_drops_by_ttl },
    Check { name: "trimmed_when_all_devices_acked", run: trimmed_when_all_devices_acked },
    Check { name: "a_forgotten_device_holds_the_inbox_no_longer", run: a_forgotten_device_holds_the_inbox_no_longer },
    Check {
        name: "a_device_pushed_out_by_other_devices_loses_nothing_before_its_ttl",
        run: a_device_pushed_out_by_other_devices_loses_nothing_before_its_ttl,
    },
    Check {
        name: "a_login_past_the_head_keeps_the_position_the_store_has",
        run: a_login_past_the_head_keeps_the_position_the_store_has,
    },
    Check { name: "never_trimmed_without_a_device_before_ttl", run: never_trimmed_without_a_device_before_ttl },
    Check { name: "inbox_full_and_store_full_at_the_limits", run: inbox_full_and_store_full_at_the_limits },
    Check { name: "restart_keeps_everything_synced", run: restart_keeps_everything_synced },
    Check { name: "expiries_are_kept_with_their_messages", run: expiries_are_kept_with_their_messages },
    Check {
        name: "retention_drops_expired_messages_from_the_front",
        run: retention_drops_expired_messages_from_the_front,
    },
];

/// Runs every check of [`CHECKS`] against fresh subjects from `make`, and
/// panics at the end naming each check that failed, with its message
/// (each failure is also printed as it happens, by the panic hook).
pub fn run_all<S: Subject + 'static>(mut make: impl FnMut(StoreLimits) -> S) {
    let mut make = |limits| Box::new(make(limits)) as Box<dyn Subject>;
    let mut failed = Vec::new();
    for check in CHECKS {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (check.run)(&mut make))) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            failed.push(format!("{}: {why}", check.name));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} store conformance checks failed:\n{}",
        failed.len(),
        CHECKS.len(),
        failed.join("\n")
    );
}

// ---- helpers -------------------------------------------------------------

pub(crate) const T0: u64 = 1_800_000_000_000;

pub(crate) fn msg(to: &str, from: &str, msg_id: u64, ts_ms: u64, payload: &str, client_id: u64) -> NewMessage {
    NewMessage {
        to: to.into(),
        from: from.into(),
        msg_id,
        ts_ms,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        client_id,
        expires_ms: 0,
    }
}

pub(crate) fn append(s: &mut dyn Store, to: &str, n: u64, now: u64) -> u64 {
    match s.append(&msg(to, "app", n, now, &format!("m{n}"), 0), now).unwrap() {
        Appended::New { seq } => seq,
        d => panic!("unexpected {d:?}"),
    }
}

/// A device that logs in and acknowledges up to `seq` (a login's seq alone
/// does not count for a device the store does not know: `login_device`).
pub(crate) fn login_acked(s: &mut dyn Store, user: &str, device: &str, seq: u64, now: u64) {
    s.device_login(user, device, 0, now).unwrap();
    s.set_position(user, device, seq, now).unwrap();
}

pub(crate) fn seqs(p: &Page) -> Vec<u64> {
    p.messages.iter().map(|m| m.seq).collect()
}

// ---- the checks ------------------------------------------------------------

fn append_and_read_in_order_with_dense_seqs(make: Make) {
    let mut subject = make(StoreLimits::default());
    let s = subject.store();
    for i in 0..10 {
        for user in ["alice", "bob"] {
            assert_eq!(append(s, user, i, T0 + i), i + 1, "dense per user");
        }
    }
    s.sync().unwrap();
    let p = s.read("alice", 0, 100).unwrap();
    assert_eq!(seqs(&p), (1..=10).collect::<Vec<_>>());
    assert_eq!(p.head_seq, 10);
    let m = &p.messages[3];
    assert_eq!((m.msg_id, m.ts_ms, &*m.from, &m.payload[..]), (3, T0 + 3, "app", &b"m3"[..]));
    assert_eq!(seqs(&s.read("bob", 4, 3).unwrap()), vec![5, 6, 7], "a page after a seq");
    let tail = s.read("bob", 10, 5).unwrap();
    assert!(tail.messages.is_empty());
    assert_eq!(tail.head_seq, 10);
    assert_eq!(s.read("nobody", 0, 5).unwrap(), Page { messages: vec![], head_seq: 0 });
    let st = s.inbox_state("alice").unwrap();
    assert_eq!((st.head_seq, st.first_seq, st.messages), (10, 1, 10));
    assert_eq!(st.bytes, 10 * record_bytes("alice", "app", 2), "payloads m0..m9");
    let none = s.inbox_state("nobody").unwrap();
    assert_eq!((none.head_seq, none.first_seq, none.messages, none.bytes), (0, 1, 0, 0));
}

/// `append_batch` gives the outcomes of as many `append`s, in order, and
/// leaves the same inboxes (the store thread hands a backend every append
/// of a turn at once, and a backend that overrides it must not change
/// what they mean): a retry within the batch is a duplicate, a refusal
/// takes no seq and stops nothing after it.
fn append_batch_as_one_by_one(make: Make) {
    let limits = StoreLimits { max_messages_per_inbox: 4, dedup_window_ms: 10_000, ..StoreLimits::default() };
    let batch = [
        msg("alice", "bob", 1, T0, "a1", 7),
        msg("carol", "bob", 2, T0, "c1", 7),
        msg("alice", "bob", 3, T0, "a1", 7),
        msg("alice", "", 4, T0, "a2", 0),
        msg("alice", "", 5, T0, "a3", 0),
        msg("alice", "dan", 6, T0, "a4", 0),
        msg("alice", "dan", 7, T0, "a5", 0),
        msg("carol", "", 8, T0, "c2", 0),
    ];
    let mut one = make(limits);
    let mut all = make(limits);
    let want: Vec<_> = batch.iter().map(|m| one.store().append(m, T0)).collect();
    let new = |seq| Ok(Appended::New { seq });
    assert_eq!(
        want,
        [
            new(1),
            new(1),
            Ok(Appended::Duplicate { seq: 1, msg_id: 1 }),
            new(2),
            new(3),
            new(4),
            Err(StoreError::InboxFull { limit: 4 }),
            new(2),
        ],
        "one by one"
    );
    assert_eq!(all.store().append_batch(&batch, T0), want, "as a batch");
    for s in [one.store(), all.store()] {
        s.sync().unwrap();
    }
    for user in ["alice", "carol"] {
        assert_eq!(all.store().read(user, 0, 10).unwrap(), one.store().read(user, 0, 10).unwrap(), "{user}'s inbox");
    }
}

fn head_survives_trimming(make: Make) {
    let mut subject = make(StoreLimits::default());
    let at_ack = subject.drops_at_acknowledgement();
    let s = subject.store();
    for i in 0..5 {
        append(s, "alice", i, T0);
    }
    assert_eq!(s.device_login("alice", "phone", 0, T0).unwrap(), (0, 5));
    s.set_position("alice", "phone", 5, T0).unwrap();
    assert_eq!(s.held().0, if at_ack { 0 } else { 5 });
    assert_eq!(s.expire(T0 + 1).unwrap(), if at_ack { 0 } else { 5 }, "all acknowledged by the only device");
    let st = s.inbox_state("alice").unwrap();
    assert_eq!((st.head_seq, st.first_seq, st.messages, st.bytes), (5, 6, 0, 0));
    assert_eq!(append(s, "alice", 9, T0), 6, "the seq goes on after a trim");
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![6]);
    if subject.restart() {
        let s = subject.store();
        assert_eq!(append(s, "alice", 10, T0), 7, "and after a restart");
        assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![6, 7]);
    }
}

/// A user whose every message and device expired has no record left; the
/// next append still takes the next seq, before and after a restart. Or,
/// for a store that forgets such an inbox ([`Subject::forgets_empty_inboxes`]),
/// it starts again at 1 and a device that comes back starts over.
fn head_survives_its_record(make: Make) {
    let ttl_ms = 1_000;
    let mut subject = make(StoreLimits { ttl_ms, ..StoreLimits::default() });
    let s = subject.store();
    for i in 0..3 {
        append(s, "alice", i, T0);
    }
    s.device_login("alice", "phone", 0, T0).unwrap();
    assert_eq!(s.expire(T0 + ttl_ms).unwrap(), 3, "messages and the device past the ttl");
    let st = s.inbox_state("alice").unwrap();
    if subject.forgets_empty_inboxes() {
        assert!(!subject.restart(), "only a store that keeps nothing across a restart may forget an inbox");
        assert_eq!((st.head_seq, st.first_seq, st.messages, st.devices.len()), (0, 1, 0, 0));
        let s = subject.store();
        assert_eq!(s.device_login("alice", "phone", 3, T0 + ttl_ms).unwrap(), (0, 0), "the device starts over");
        assert_eq!(append(s, "alice", 9, T0 + ttl_ms), 1);
        return;
    }
    let s = subject.store();
    assert_eq!((st.head_seq, st.first_seq, st.messages, st.devices.len()), (3, 4, 0, 0));
    s.sync().unwrap();
    if subject.restart() {
        assert_eq!(subject.store().inbox_state("alice").unwrap().head_seq, 3);
    }
    assert_eq!(append(subject.store(), "alice", 9, T0 + ttl_ms), 4);
}

fn dedup_within_window_and_not_after(make: Make) {
    let window = 10_000;
    let mut subject = make(StoreLimits { dedup_window_ms: window, ..StoreLimits::default() });
    let s = subject.store();
    let m = msg("alice", "bob", 77, T0, "hi", 5);
    assert_eq!(s.append(&m, T0).unwrap(), Appended::New { seq: 1 });
    let retry = msg("alice", "bob", 78, T0, "hi", 5);
    assert_eq!(s.append(&retry, T0 + window - 1).unwrap(), Appended::Duplicate { seq: 1, msg_id: 77 });
    let other_sender = msg("alice", "carol", 79, T0, "hi", 5);
    assert_eq!(s.append(&other_sender, T0).unwrap(), Appended::New { seq: 2 }, "keyed by sender");
    // And by recipient: an application pushes as sender "" to every user,
    // numbering its keys per user (the admin API's and the handle's
    // `client_id`), so the same key to another user is another message.
    let to_dan = msg("dan", "bob", 81, T0, "hi", 5);
    assert_eq!(s.append(&to_dan, T0).unwrap(), Appended::New { seq: 1 }, "keyed by recipient");
    let app_alice = msg("alice", "", 82, T0, "order #7", 7);
    let app_dan = msg("dan", "", 83, T0, "order #7", 7);
    assert_eq!(s.append(&app_alice, T0).unwrap(), Appended::New { seq: 3 });
    assert_eq!(s.append(&app_dan, T0).unwrap(), Appended::New { seq: 2 }, "an application's key, per user");
    assert_eq!(s.append(&app_dan, T0 + 1).unwrap(), Appended::Duplicate { seq: 2, msg_id: 83 });
    let no_key = msg("alice", "bob", 80, T0, "hi", 0);
    assert_eq!(s.append(&no_key, T0).unwrap(), Appended::New { seq: 4 });
    assert_eq!(s.append(&no_key, T0).unwrap(), Appended::New { seq: 5 }, "client_id 0 is never deduplicated");
    assert_eq!(s.append(&retry, T0 + window).unwrap(), Appended::New { seq: 6 }, "the window has passed");
    // The new entry is remembered from its own append, and expire keeps it.
    s.expire(T0 + window + 1).unwrap();
    assert_eq!(s.append(&m, T0 + window + 2).unwrap(), Appended::Duplicate { seq: 6, msg_id: 78 });
    s.expire(T0 + 2 * window).unwrap();
    assert_eq!(s.append(&m, T0 + 2 * window).unwrap(), Appended::New { seq: 7 }, "dropped by expire");
    let app_dan_later = msg("dan", "", 84, T0, "order #7", 7);
    assert_eq!(s.append(&app_dan_later, T0 + 2 * window).unwrap(), Appended::New { seq: 3 });
    if subject.restart() {
        let s = subject.store();
        assert_eq!(s.append(&m, T0 + 2 * window + 1).unwrap(), Appended::Duplicate { seq: 7, msg_id: 77 });
        let app_alice_later = msg("alice", "", 85, T0, "order #7", 7);
        assert_eq!(s.append(&app_alice_later, T0 + 2 * window + 1).unwrap(), Appended::New { seq: 8 });
        assert_eq!(s.append(&app_dan, T0 + 2 * window + 1).unwrap(), Appended::Duplicate { seq: 3, msg_id: 84 });
    }
}

fn device_positions_independent_per_device(make: Make) {
    let mut subject = make(StoreLimits::default());
    let s = subject.store();
    for i in 0..10 {
        append(s, "alice", i, T0);
    }
    assert_eq!(s.device_login("alice", "phone", 4, T0).unwrap(), (0, 10), "a device not known: not taken");
    assert_eq!(s.device_login("alice", "laptop", 99, T0).unwrap(), (0, 10), "past the head: not taken");
    assert_eq!(s.device_login("alice", "laptop", 10, T0).unwrap(), (10, 10), "up to the head: taken");
    s.set_position("alice", "phone", 7, T0 + 1).unwrap();
    s.set_position("alice", "phone", 5, T0 + 2).unwrap();
    assert_eq!(s.device_login("alice", "phone", 2, T0 + 3).unwrap(), (7, 10), "positions never go back");
    // A device the store does not know: its positions are dropped, up to
    // the head or past it; only a login adds a device (`move_device`).
    s.set_position("alice", "tablet", 3, T0 + 4).unwrap();
    s.set_position("alice", "tablet", 50, T0 + 4).unwrap();
    let known = |s: &mut dyn Store| s.inbox_state("alice").unwrap().devices.iter().any(|d| d.device == "tablet");
    assert!(!known(s), "a position does not add a device");
    s.device_login("alice", "tablet", 0, T0 + 4).unwrap();
    s.set_position("alice", "tablet", 3, T0 + 4).unwrap();
    // Past the head: seqs of an inbox that is gone (a store that lost its
    // data under a connection that stayed). Dropped: taken, even capped at
    // the head, it would mark the new inbox's messages as acknowledged.
    s.set_position("alice", "tablet", 50, T0 + 5).unwrap();
    let mut devices = s.inbox_state("alice").unwrap().devices;
    devices.sort_by(|a, b| a.device.cmp(&b.device));
    let got: Vec<_> = devices.iter().map(|d| (d.device.as_str(), d.position, d.last_seen_ms)).collect();
    assert_eq!(got, vec![("laptop", 10, T0), ("phone", 7, T0 + 3), ("tablet", 3, T0 + 4)]);
    assert_eq!(s.device_login("bob", "phone", 3, T0).unwrap(), (0, 0), "another user's device is its own");
}

/// The positions a store turn hands over at once: the outcomes and the
/// positions of as many `set_position`s, a bad id refused alone, and a
/// user with several devices moving in one call (read once, from disk
/// after a restart) keeps every move.
fn positions_written_together_as_one_by_one(make: Make) {
    let mut subject = make(StoreLimits::default());
    let s = subject.store();
    for (i, user) in ["alice", "bob"].iter().enumerate() {
        for n in 0..10 {
            append(s, user, n + 10 * i as u64, T0);
        }
        s.device_login(user, "phone", 0, T0).unwrap();
        s.device_login(user, "laptop", 0, T0).unwrap();
    }
    s.sync().unwrap();
    // A restart empties the disk store's cache: every user is read back.
    subject.restart();
    let s = subject.store();
    let long = "d".repeat(300);
    let moves = [
        ("alice", "phone", 3),
        ("bob", "laptop", 4),
        ("alice", "laptop", 6),
        ("alice", "phone", 2), // never back
        ("", "phone", 1),
        ("bob", long.as_str(), 1),
        ("alice", "tablet", 99), // past the head: dropped, no device added
        ("carol", "phone", 1),   // nothing stored yet: dropped too
        ("alice", "tablet", 10), // a device not known: dropped (only a login adds one)
        ("carol", "phone", 0),   // the same
    ];
    let got = s.set_positions(&moves, T0 + 5);
    let refused: Vec<bool> = got.iter().map(Result::is_err).collect();
    assert_eq!(refused, [false, false, false, false, true, true, false, false, false, false]);
    let positions = |s: &mut dyn Store, user: &str| {
        let mut d = s.inbox_state(user).unwrap().devices;
        d.sort_by(|a, b| a.device.cmp(&b.device));
        d.into_iter().map(|d| (d.device, d.position, d.last_seen_ms)).collect::<Vec<_>>()
    };
    let want_alice = vec![("laptop".into(), 6, T0 + 5), ("phone".into(), 3, T0 + 5)];
    let want_bob = vec![("laptop".into(), 4, T0 + 5), ("phone".into(), 0, T0)];
    assert_eq!(positions(s, "alice"), want_alice);
    assert_eq!(positions(s, "bob"), want_bob);
    assert_eq!(positions(s, "carol"), vec![]);
    s.sync().unwrap();
    if subject.restart() {
        let s = subject.store();
        assert_eq!(positions(s, "alice"), want_alice, "kept through a restart");
        assert_eq!(positions(s, "bob"), want_bob);
    }
}

fn retention_drops_by_ttl(make: Make) {
    let ttl = 60_000;
    let mut subject = make(StoreLimits { ttl_ms: ttl, ..StoreLimits::default() });
    let s = subject.store();
    append(s, "alice", 1, T0);
    append(s, "alice", 2, T0 + 10);
    s.device_login("alice", "phone", 0, T0).unwrap();
    assert_eq!(s.expire(T0 + ttl - 1).unwrap(), 0);
    assert_eq!(s.expire(T0 + ttl).unwrap(), 1, "the first is ttl old");
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![2]);
    assert!(s.inbox_state("alice").unwrap().devices.is_empty(), "the phone was unseen for ttl");
    assert_eq!(s.expire(T0 + ttl + 10).unwrap(), 1);
    let st = s.inbox_state("alice").unwrap();
    let head = if subject.forgets_empty_inboxes() { 0 } else { 2 };
    assert_eq!((st.head_seq, st.first_seq, st.messages, st.bytes), (head, head + 1, 0, 0));
}

fn trimmed_when_all_devices_acked(make: Make) {
    let mut subject = make(StoreLimits::default());
    let at_ack = subject.drops_at_acknowledgement();
    let by_pass = |n: u64| if at_ack { 0 } else { n };
    let s = subject.store();
    for i in 0..6 {
        append(s, "alice", i, T0);
    }
    login_acked(s, "alice", "phone", 5, T0);
    login_acked(s, "alice", "laptop", 3, T0);
    assert_eq!(s.expire(T0 + 1).unwrap(), by_pass(3), "up to the lowest position");
    // Dropped at the acknowledgement, 4 and 5 went with the phone's ACK,
    // when it was the only device known.
    let want: &[u64] = if at_ack { &[6] } else { &[4, 5, 6] };
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), want);
    s.set_position("alice", "laptop", 6, T0 + 2).unwrap();
    assert_eq!(s.expire(T0 + 3).unwrap(), by_pass(2), "4 and 5: the phone has 5");
    assert_eq!(s.inbox_state("alice").unwrap().first_seq, 6);
}

/// A device its app signed out of is forgotten on the backend's word
/// ([`Store::forget_device`]), not only after `ttl_ms` unseen: until then
/// its position kept every message after it, whatever the user's other
/// devices had acknowledged.
fn a_forgotten_device_holds_the_inbox_no_longer(make: Make) {
    let ttl = 60_000;
    let mut subject = make(StoreLimits { ttl_ms: ttl, ..StoreLimits::default() });
    let at_ack = subject.drops_at_acknowledgement();
    let s = subject.store();
    for i in 0..5 {
        append(s, "alice", i, T0);
    }
    login_acked(s, "alice", "tablet", 2, T0);
    login_acked(s, "alice", "phone", 5, T0);
    s.expire(T0 + 1).unwrap();
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![3, 4, 5], "the tablet holds 3 to 5");
    // Two more (hot in the disk store), which the phone acknowledges.
    append(s, "alice", 5, T0 + 1);
    append(s, "alice", 6, T0 + 1);
    s.set_position("alice", "phone", 7, T0 + 1).unwrap();
    assert_eq!(s.held().0, 5);
    assert_eq!(s.forget_device("alice", "tablet", T0 + 1), Ok(true));
    assert_eq!(s.forget_device("alice", "tablet", T0 + 1), Ok(false), "forgotten already");
    assert_eq!(s.forget_device("alice", "watch", T0 + 1), Ok(false), "never known");
    assert_eq!(s.forget_device("nobody", "phone", T0 + 1), Ok(false), "no such user");
    let devices = |st: InboxState| st.devices.into_iter().map(|d| d.device).collect::<Vec<_>>();
    assert_eq!(devices(s.inbox_state("alice").unwrap()), ["phone"]);
    // The disk store drops its hot ones at once, as at an acknowledgement;
    // the rest go at the retention pass.
    assert_eq!(s.held().0, if at_ack { 3 } else { 5 });
    assert_eq!(s.expire(T0 + 2).unwrap(), if at_ack { 3 } else { 5 }, "the phone has them all");
    let st = s.inbox_state("alice").unwrap();
    assert_eq!((st.head_seq, st.first_seq, st.messages), (7, 8, 0));
    // Logging in again, it is a new device: it starts at 0, not at a
    // position the store kept, nor at what it says it stored (the store
    // cannot tell that from a seq of an inbox gone with the device's
    // record: login_device).
    assert_eq!(s.device_login("alice", "tablet", 4, T0 + 3).unwrap(), (0, 7));
    // With no device left, the messages wait for the TTL, as for a user
    // who never had one.
    append(s, "alice", 7, T0 + 4);
    assert_eq!(s.forget_device("alice", "tablet", T0 + 4), Ok(true));
    assert_eq!(s.forget_device("alice", "phone", T0 + 4), Ok(true));
    assert!(s.inbox_state("alice").unwrap().devices.is_empty());
    assert_eq!(s.expire(T0 + 5).unwrap(), 0, "kept: no device acknowledged it");
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![8]);
    // Ids as the other calls check them.
    assert!(s.forget_device("", "phone", T0 + 5).is_err());
    assert!(s.forget_device("alice", &"d".repeat(MAX_DEVICE_BYTES + 1), T0 + 5).is_err());
    // It stays forgotten across a restart.
    login_acked(s, "alice", "phone", 8, T0 + 6);
    s.device_login("alice", "tablet", 0, T0 + 6).unwrap();
    assert_eq!(s.forget_device("alice", "tablet", T0 + 6), Ok(true));
    s.sync().unwrap();
    if subject.restart() {
        let s = subject.store();
        assert_eq!(devices(s.inbox_state("alice").unwrap()), ["phone"]);
        assert_eq!(s.expire(T0 + 7).unwrap(), 1, "the phone had 8");
    }
}

/// A store may keep a bounded list of devices per user (this crate's
/// keep [`MAX_DEVICES_PER_USER`]) and forget the one seen least recently
/// when one more logs in, but not what it had not acknowledged: that
/// stays, as if the device were still known, until its TTL. Back (a new
/// device then, from 0), it gets everything the inbox keeps. The crate's
/// stores dropped those messages once the other devices had acknowledged
/// them: stored (SEND_RESULT `stored`) and never delivered.
fn a_device_pushed_out_by_other_devices_loses_nothing_before_its_ttl(make: Make) {
    let ttl = 600_000;
    let mut subject = make(StoreLimits { ttl_ms: ttl, ..StoreLimits::default() });
    let s = subject.store();
    s.device_login("alice", "phone", 0, T0).unwrap();
    for i in 0..3 {
        append(s, "alice", i, T0 + 1);
    }
    let others = MAX_DEVICES_PER_USER as u64;
    for i in 0..others {
        login_acked(s, "alice", &format!("web-{i}"), 3, T0 + 2 + i);
    }
    // One more, which every device but the phone acknowledges.
    append(s, "alice", 3, T0 + 100);
    for i in 0..others {
        s.set_position("alice", &format!("web-{i}"), 4, T0 + 101).unwrap();
    }
    s.expire(T0 + 200).unwrap();
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![1, 2, 3, 4], "kept for the phone");
    s.sync().unwrap();
    let s = if subject.restart() {
        let s = subject.store();
        s.expire(T0 + 300).unwrap();
        assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![1, 2, 3, 4], "kept through a restart");
        s
    } else {
        subject.store()
    };
    assert_eq!(s.device_login("alice", "phone", 0, T0 + 400).unwrap(), (0, 4), "the phone back");
    s.expire(T0 + 500).unwrap();
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![1, 2, 3, 4]);
}

/// A LOGIN whose `last_seq` is past the head comes from a client that
/// stored from another inbox (a memory store restarted, a backup
/// restored, an `os` store that lost its last writes to a power cut): its
/// seqs name other messages. It used to move the device's position to
/// the head, so the inbox's messages counted as the device's and went
/// (the disk store dropped them at once), acknowledged or not.
fn a_login_past_the_head_keeps_the_position_the_store_has(make: Make) {
    let mut subject = make(StoreLimits::default());
    let s = subject.store();
    for i in 0..3 {
        append(s, "alice", i, T0);
    }
    assert_eq!(s.device_login("alice", "phone", 500, T0).unwrap(), (0, 3), "a new device starts at 0");
    s.set_position("alice", "phone", 1, T0 + 1).unwrap();
    assert_eq!(s.device_login("alice", "phone", 500, T0 + 2).unwrap(), (1, 3), "a known one where it was");
    s.expire(T0 + 3).unwrap();
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![2, 3], "what it never acknowledged is kept");
    assert_eq!(s.device_login("alice", "phone", 3, T0 + 4).unwrap(), (3, 3), "up to the head, last_seq counts");
}

fn never_trimmed_without_a_device_before_ttl(make: Make) {
    let ttl = 60_000;
    let mut subject = make(StoreLimits { ttl_ms: ttl, ..StoreLimits::default() });
    let s = subject.store();
    for i in 0..3 {
        append(s, "alice", i, T0);
    }
    assert_eq!(s.expire(T0 + 1).unwrap(), 0);
    assert_eq!(s.expire(T0 + ttl - 1).unwrap(), 0);
    assert_eq!(seqs(&s.read("alice", 0, 10).unwrap()), vec![1, 2, 3]);
    assert_eq!(s.expire(T0 + ttl).unwrap(), 3);
}

fn inbox_full_and_store_full_at_the_limits(make: Make) {
    let per = record_bytes("alice", "app", 2);
    let limits = StoreLimits { max_messages_per_inbox: 3, max_bytes: 5 * per, ..StoreLimits::default() };
    let mut subject = make(limits);
    let at_ack = subject.drops_at_acknowledgement();
    let s = subject.store();
    for i in 0..3 {
        append(s, "alice", i, T0);
    }
    assert_eq!(s.append(&msg("alice", "app", 9, T0, "m9", 0), T0), Err(StoreError::InboxFull { limit: 3 }));
    append(s, "bobby", 1, T0);
    append(s, "bobby", 2, T0);
    assert_eq!(s.append(&msg("bobby", "app", 9, T0, "m9", 0), T0), Err(StoreError::StoreFull { limit_bytes: 5 * per }));
    assert_eq!(s.inbox_state("bobby").unwrap().head_seq, 2, "a refused append takes no seq");
    login_acked(s, "alice", "phone", 3, T0);
    assert_eq!(s.expire(T0 + 1).unwrap(), if at_ack { 0 } else { 3 });
    assert_eq!(append(s, "bobby", 3, T0), 3, "room again after the trim");
    assert_eq!(append(s, "alice", 4, T0), 4);
}

fn restart_keeps_everything_synced(make: Make) {
    let mut subject = make(StoreLimits::default());
    let at_ack = subject.drops_at_acknowledgement();
    let s = subject.store();
    for i in 0..20 {
        append(s, if i % 2 == 0 { "alice" } else { "bob" }, i, T0 + i);
    }
    login_acked(s, "alice", "phone", 4, T0);
    s.sync().unwrap();
    let before = (s.read("alice", 0, 100).unwrap(), s.inbox_state("alice").unwrap(), s.inbox_state("bob").unwrap());
    if !subject.restart() {
        return;
    }
    let s = subject.store();
    let after = (s.read("alice", 0, 100).unwrap(), s.inbox_state("alice").unwrap(), s.inbox_state("bob").unwrap());
    assert_eq!(before, after);
    assert_eq!(append(s, "bob", 99, T0), 11, "seqs continue");
    // The bytes counter is rebuilt at open: the limit still holds.
    s.device_login("alice", "phone", 10, T0).unwrap();
    // 1 to 4 went at the first ACK if it dropped them (5 to 10 were not
    // hot any more after the restart).
    assert_eq!(s.expire(T0 + 1).unwrap(), if at_ack { 6 } else { 10 });
    s.sync().unwrap();
    assert!(subject.restart());
    let st = subject.store().inbox_state("alice").unwrap();
    assert_eq!((st.head_seq, st.first_seq, st.messages), (10, 11, 0));
}

/// A message's own expiry (`NewMessage::expires_ms`) comes back with it
/// from `read`, appended one by one or in a batch, and after a restart;
/// a read returns it whether or not it has passed (the store thread
/// leaves out what expired: `service::read_unexpired`).
fn expiries_are_kept_with_their_messages(make: Make) {
    let mut subject = make(StoreLimits::default());
    let s = subject.store();
    let expiring =
        |n: u64, expires_ms: u64| NewMessage { expires_ms, ..msg("alice", "bob", n, T0 + n, &format!("m{n}"), 0) };
    for (n, expires_ms) in [(1, 0), (2, T0 + 30_000), (3, 0)] {
        assert!(matches!(s.append(&expiring(n, expires_ms), T0), Ok(Appended::New { .. })));
    }
    let batch = [expiring(4, T0 + 1), expiring(5, 0), expiring(6, u64::MAX)];
    assert!(s.append_batch(&batch, T0).iter().all(|r| matches!(r, Ok(Appended::New { .. }))));
    s.sync().unwrap();
    let want = [0, T0 + 30_000, 0, T0 + 1, 0, u64::MAX];
    let expiries = |p: &Page| p.messages.iter().map(|m| m.expires_ms).collect::<Vec<_>>();
    let page = s.read("alice", 0, 100).unwrap();
    assert_eq!(expiries(&page), want, "as appended");
    assert_eq!(seqs(&page), (1..=6).collect::<Vec<_>>(), "an expired one (4) is read too");
    assert_eq!(page.messages[1].payload, &b"m2"[..]);
    if subject.restart() {
        let page = subject.store().read("alice", 0, 100).unwrap();
        assert_eq!(expiries(&page), want, "after a restart");
        assert_eq!(page.messages[3].ts_ms, T0 + 4);
    }
}

/// The retention pass drops a message whose own expiry passed, as it drops
/// one `ttl_ms` old, from the oldest of its inbox: one behind a message
/// still kept waits for it.
fn retention_drops_expired_messages_from_the_front(make: Make) {
    let mut subject = make(StoreLimits::default());
    let s = subject.store();
    let m = |n: u64, expires_ms: u64| NewMessage { expires_ms, ..msg("ann", "app", n, T0, &format!("m{n}"), 0) };
    for (n, expires_ms) in [(1, T0 + 100), (2, 0), (3, T0 + 50), (4, T0 + 10_000)] {
        assert!(matches!(s.append(&m(n, expires_ms), T0), Ok(Appended::New { .. })));
    }
    s.sync().unwrap();
    assert_eq!(s.expire(T0 + 99).unwrap(), 0, "none expired yet at the front");
    assert_eq!(s.expire(T0 + 100).unwrap(), 1, "1 expired; 3 expired too, behind 2");
    assert_eq!(seqs(&s.read("ann", 0, 10).unwrap()), [2, 3, 4]);
    // A device acknowledges 2: 2 goes, and 3 with it (expired); 4 is
    // neither acknowledged nor expired.
    login_acked(s, "ann", "phone", 2, T0 + 200);
    assert_eq!(s.expire(T0 + 200).unwrap(), 2);
    let st = s.inbox_state("ann").unwrap();
    assert_eq!((st.first_seq, st.messages, st.head_seq), (4, 1, 4));
    assert_eq!(s.expire(T0 + 10_000).unwrap(), 1, "4 at its expiry, unacknowledged");
    assert_eq!(s.inbox_state("ann").unwrap().messages, 0);
}
