//! [`MemoryStore`]: the inboxes in RAM, bounded, lost on restart.
//!
//! Owns: a map user → inbox (head, messages, devices) and the dedup table.
//! For tests, and for deployments that accept losing undelivered messages
//! when the process stops. `sync` does nothing: there is nothing to make
//! durable.
//! Must not: grow without bound. Messages are bounded by `max_bytes` and
//! `max_messages_per_inbox`; what is not bounded by a limit is said here
//! (computed from the type sizes asserted below, on 64-bit targets, with
//! hashbrown's 1 control byte per slot and up to 1/8 of slots empty):
//! - every user with a message kept or a device known keeps an entry with
//!   its head: ~100 bytes (an 88-byte slot) + the user id's `Arc<str>`
//!   (16 + its bytes); a million users with 10-byte ids ≈ 130 MB. The
//!   retention pass removes an entry left with neither (its seqs then
//!   start again at 1, which only a device the store forgot could notice,
//!   and it starts over: PROTOCOL.md 15.8), so users sent to once do not
//!   stay for the life of the process;
//! - each kept message: an 80-byte `VecDeque` slot (+ its payload `Bytes`
//!   and sender `Arc<str>`, shared with the caller's); an inbox's queue
//!   gives back what a backlog grew it to once the retention pass drops
//!   the messages (down to twice what it holds, past 64 slots), as the
//!   dedup table and its queue do;
//! - each dedup entry (one per append with a client_id, kept for the dedup
//!   window): ~74 bytes of map slot + a 48-byte queue entry, dropped by
//!   `expire`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{
    check_ids, expire_devices, expired, forget_device, login_device, move_device, record_bytes, Appended, DeviceState,
    InboxState, NewMessage, Page, Store, StoreError, StoreLimits, StoredMessage,
};

#[derive(Default)]
struct Inbox {
    head: u64,
    messages: VecDeque<StoredMessage>,
    bytes: u64,
    devices: Vec<DeviceState>,
}

/// A dedup entry's key: recipient, sender, client id (per recipient, as
/// every store keeps it: the [`Store::append`] doc).
type DedupKey = (Arc<str>, Arc<str>, u64);

#[derive(Copy, Clone)]
struct Seen {
    seq: u64,
    msg_id: u64,
    ts_ms: u64,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<(Arc<str>, Inbox)>() == 88);
    assert!(std::mem::size_of::<StoredMessage>() == 80);
    assert!(std::mem::size_of::<(DedupKey, Seen)>() == 64);
    assert!(std::mem::size_of::<(u64, DedupKey)>() == 48);
};

/// The in-memory store. See the module doc for what it costs.
pub struct MemoryStore {
    limits: StoreLimits,
    inboxes: HashMap<Arc<str>, Inbox>,
    /// `(to, from, client_id)` → the original append.
    dedup: HashMap<DedupKey, Seen>,
    /// The dedup keys in the order they were added (with the time), for
    /// `expire`.
    dedup_order: VecDeque<(u64, DedupKey)>,
    total_bytes: u64,
    /// Messages kept over all inboxes.
    total_messages: u64,
    /// [`Store::expired_unacknowledged`].
    expired_unacknowledged: u64,
}

impl MemoryStore {
    pub fn new(limits: StoreLimits) -> Self {
        MemoryStore {
            limits,
            inboxes: HashMap::new(),
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            total_bytes: 0,
            total_messages: 0,
            expired_unacknowledged: 0,
        }
    }

    /// Bytes kept over all inboxes (as [`record_bytes`]).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}

impl Store for MemoryStore {
    fn append(&mut self, m: &NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        check_ids(&m.to, &m.from, "")?;
        if m.client_id != 0 {
            if let Some(seen) = self.dedup.get(&(m.to.clone(), m.from.clone(), m.client_id)) {
                if !expired(seen.ts_ms, self.limits.dedup_window_ms, now_ms) {
                    return Ok(Appended::Duplicate { seq: seen.seq, msg_id: seen.msg_id });
                }
            }
        }
        let bytes = record_bytes(&m.to, &m.from, m.payload.len());
        // Checked before the inbox is made: a refused append to a user
        // never seen leaves nothing behind.
        let held = self.inboxes.get(&m.to).map_or(0, |i| i.messages.len() as u64);
        if held >= self.limits.max_messages_per_inbox {
            return Err(StoreError::InboxFull { limit: self.limits.max_messages_per_inbox });
        }
        if self.total_bytes + bytes > self.limits.max_bytes {
            return Err(StoreError::StoreFull { limit_bytes: self.limits.max_bytes });
        }
        let inbox = self.inboxes.entry(m.to.clone()).or_default();
        inbox.head += 1;
        let seq = inbox.head;
        inbox.messages.push_back(StoredMessage::of(seq, m));
        inbox.bytes += bytes;
        self.total_bytes += bytes;
        self.total_messages += 1;
        if m.client_id != 0 {
            let key = (m.to.clone(), m.from.clone(), m.client_id);
            self.dedup.insert(key.clone(), Seen { seq, msg_id: m.msg_id, ts_ms: now_ms });
            self.dedup_order.push_back((now_ms, key));
        }
        Ok(Appended::New { seq })
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn expired_unacknowledged(&self) -> u64 {
        self.expired_unacknowledged
    }

    fn held(&self) -> (u64, u64) {
        (self.total_messages, self.total_bytes)
    }

    fn read(&mut self, user: &str, after_seq: u64, limit: usize) -> Result<Page, StoreError> {
        let Some(inbox) = self.inboxes.get(user) else {
            return Ok(Page { messages: Vec::new(), head_seq: 0 });
        };
        // Seqs are dense from the first kept one: index straight in.
        let first = inbox.messages.front().map_or(inbox.head + 1, |m| m.seq);
        let skip = after_seq.saturating_add(1).saturating_sub(first).min(inbox.messages.len() as u64) as usize;
        let messages = inbox.messages.range(skip..).take(limit).cloned().collect();
        Ok(Page { messages, head_seq: inbox.head })
    }

    fn device_login(
        &mut self,
        user: &str,
        device: &str,
        client_seq: u64,
        now_ms: u64,
    ) -> Result<(u64, u64), StoreError> {
        check_ids(user, "", device)?;
        let inbox = self.inboxes.entry(Arc::from(user)).or_default();
        let position = login_device(&mut inbox.devices, device, client_seq, inbox.head, now_ms);
        Ok((position, inbox.head))
    }

    fn set_position(&mut self, user: &str, device: &str, seq: u64, now_ms: u64) -> Result<(), StoreError> {
        check_ids(user, "", device)?;
        let inbox = self.inboxes.entry(Arc::from(user)).or_default();
        move_device(&mut inbox.devices, device, seq, inbox.head, now_ms);
        Ok(())
    }

    fn forget_device(&mut self, user: &str, device: &str, _now_ms: u64) -> Result<bool, StoreError> {
        check_ids(user, "", device)?;
        Ok(self.inboxes.get_mut(user).is_some_and(|inbox| forget_device(&mut inbox.devices, device)))
    }

    fn inbox_state(&mut self, user: &str) -> Result<InboxState, StoreError> {
        Ok(match self.inboxes.get(user) {
            None => InboxState { head_seq: 0, first_seq: 1, messages: 0, bytes: 0, devices: Vec::new() },
            Some(i) => InboxState {
                head_seq: i.head,
                first_seq: i.messages.front().map_or(i.head + 1, |m| m.seq),
                messages: i.messages.len() as u64,
                bytes: i.bytes,
                devices: i.devices.clone(),
            },
        })
    }

    fn expire(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        let ttl_ms = self.limits.ttl_ms;
        let mut dropped = 0;
        let (total_bytes, total_messages) = (&mut self.total_bytes, &mut self.total_messages);
        let unacknowledged = &mut self.expired_unacknowledged;
        // An inbox left with no message and no device goes: nothing in it
        // needs keeping but its head, and the only client that could hold
        // its seqs is a device the store forgot, which starts over anyway
        // (PROTOCOL.md 15.8). Kept, every user ever sent to cost an entry
        // for the life of the process.
        self.inboxes.retain(|user, inbox| {
            let acked = expire_devices(&mut inbox.devices, ttl_ms, now_ms);
            while let Some(m) = inbox.messages.front() {
                if m.seq > acked && !expired(m.ts_ms, ttl_ms, now_ms) && !m.expired(now_ms) {
                    break;
                }
                let bytes = record_bytes(user, &m.from, m.payload.len());
                inbox.bytes -= bytes;
                *total_bytes -= bytes;
                *total_messages -= 1;
                *unacknowledged += u64::from(m.seq > acked);
                inbox.messages.pop_front();
                dropped += 1;
            }
            give_back(&mut inbox.messages);
            !(inbox.messages.is_empty() && inbox.devices.is_empty())
        });
        if shrinkable(self.inboxes.capacity(), self.inboxes.len()) {
            self.inboxes.shrink_to(2 * self.inboxes.len());
        }
        while let Some((ts_ms, _)) = self.dedup_order.front() {
            if !expired(*ts_ms, self.limits.dedup_window_ms, now_ms) {
                break;
            }
            let (ts_ms, key) = self.dedup_order.pop_front().expect("front exists");
            // A key re-added after it expired has a later entry of its own.
            if self.dedup.get(&key).is_some_and(|s| s.ts_ms == ts_ms) {
                self.dedup.remove(&key);
            }
        }
        give_back(&mut self.dedup_order);
        if shrinkable(self.dedup.capacity(), self.dedup.len()) {
            self.dedup.shrink_to(2 * self.dedup.len());
        }
        Ok(dropped)
    }
}

/// Whether a collection of `capacity` holding `len` should give room back:
/// more than 64 slots, over four times what it holds (hysteresis, so an
/// inbox that fills and drains each pass is not reallocated each time).
fn shrinkable(capacity: usize, len: usize) -> bool {
    capacity > 64 && capacity > 4 * len
}

/// Gives back the room a queue kept from a backlog since dropped (a
/// `VecDeque` never shrinks by itself), down to twice what it holds.
fn give_back<T>(q: &mut VecDeque<T>) {
    if shrinkable(q.capacity(), q.len()) {
        q.shrink_to(2 * q.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(to: &str, payload: &'static [u8]) -> NewMessage {
        NewMessage {
            to: Arc::from(to),
            from: Arc::from("alice"),
            msg_id: 1,
            ts_ms: 0,
            payload: Bytes::from_static(payload),
            client_id: 0,
            expires_ms: 0,
        }
    }

    /// A store at `max_bytes` refuses sends to users it never saw without
    /// keeping an inbox for each: nothing else would ever remove them.
    #[test]
    fn a_refused_append_leaves_no_inbox_behind() {
        let mut s = MemoryStore::new(StoreLimits { max_bytes: 100, ..StoreLimits::default() });
        assert!(matches!(s.append(&msg("bob", &[0; 50]), 0), Ok(Appended::New { seq: 1 })));
        for i in 0..1000 {
            let r = s.append(&msg(&format!("u{i}"), &[0; 50]), 0);
            assert!(matches!(r, Err(StoreError::StoreFull { .. })), "{r:?}");
        }
        assert_eq!(s.inboxes.len(), 1, "only bob's inbox");
    }

    /// An inbox that held many messages gives the room back once they are
    /// dropped: a user who was offline for a while does not keep the RAM
    /// of their backlog for the life of the process.
    #[test]
    fn a_drained_inbox_gives_its_room_back() {
        let mut s = MemoryStore::new(StoreLimits::default());
        s.device_login("bob", "phone", 0, 0).unwrap();
        for _ in 0..10_000 {
            s.append(&msg("bob", b"x"), 0).unwrap();
        }
        s.set_position("bob", "phone", 10_000, 0).unwrap();
        assert_eq!(s.expire(1).unwrap(), 10_000);
        let room = s.inboxes["bob"].messages.capacity();
        assert!(room <= 64, "{room} slots kept for an empty inbox");
        // And it still works.
        assert!(matches!(s.append(&msg("bob", b"y"), 2), Ok(Appended::New { seq: 10_001 })));
    }

    /// A security review sent one message each to 5.7 million made-up user
    /// ids, round after round, waiting out the TTL between rounds: the
    /// store's bytes went back to 0 each time, its RSS grew by ~700 MB a
    /// round and never came back (an inbox entry per user ever seen). An
    /// inbox with no message and no device left is removed by the
    /// retention pass: nothing in it needs keeping (a device that comes
    /// back after being forgotten starts over, PROTOCOL.md 15.8).
    #[test]
    fn the_retention_pass_removes_inboxes_with_nothing_left_in_them() {
        let ttl_ms = 1_000;
        let mut s = MemoryStore::new(StoreLimits { ttl_ms, ..StoreLimits::default() });
        for i in 0..10_000 {
            s.append(&msg(&format!("made-up-{i}"), b"spam"), 0).unwrap();
        }
        s.device_login("bob", "phone", 0, 0).unwrap();
        s.append(&msg("bob", b"hi"), 0).unwrap();
        s.device_login("carol", "phone", 0, 0).unwrap();
        assert_eq!(s.expire(ttl_ms / 2).unwrap(), 0, "nothing due yet");
        assert_eq!(s.inboxes.len(), 10_002);
        // Past the TTL the messages go; bob's and carol's devices were
        // seen within it (a login at 0, a position at 900).
        s.set_position("bob", "phone", 0, 900).unwrap();
        s.set_position("carol", "phone", 0, 900).unwrap();
        assert_eq!(s.expire(ttl_ms + 1).unwrap(), 10_001);
        assert_eq!(s.inboxes.len(), 2, "the emptied inboxes are gone");
        let mut left: Vec<&str> = s.inboxes.keys().map(|k| &**k).collect();
        left.sort();
        assert_eq!(left, ["bob", "carol"], "the inboxes of users with a device stay");
        assert!(s.inboxes.capacity() < 1_000, "the map gives its room back: {}", s.inboxes.capacity());
        assert_eq!(s.held(), (0, 0));
        // Bob's inbox kept its head: his next message is 2.
        assert!(matches!(s.append(&msg("bob", b"again"), ttl_ms + 2), Ok(Appended::New { seq: 2 })));
        // A device forgotten with its inbox (not seen for the TTL) starts
        // over: position 0, below the last_seq it sends (PROTOCOL.md 15.8).
        assert_eq!(s.expire(3 * ttl_ms).unwrap(), 1);
        assert!(!s.inboxes.contains_key("carol"));
        assert_eq!(s.device_login("carol", "phone", 7, 3 * ttl_ms).unwrap(), (0, 0));
    }
}
