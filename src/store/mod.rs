//! The per-user inbox: stored messages, dense per-user seqs, per-device
//! positions, retention.
//!
//! Owns: the [`Store`] trait every backend implements, the types it speaks
//! ([`NewMessage`], [`StoredMessage`], [`Page`], [`InboxState`]), the limits
//! ([`StoreLimits`]), the rules the backends share (how a device position
//! moves, what a record costs against `max_bytes`), and the backends:
//! [`MemoryStore`] (bounded, lost on restart), [`DiskStore`] (fjall,
//! durable per [`Durability`]) and [`RedisStore`] (shared by the nodes of a
//! cluster, durable as Redis is configured). [`service`] runs a store on its
//! own thread with group commit.
//! Must not: be called from an io_uring worker. Every `Store` method may do
//! disk I/O (a `sync` is an `fdatasync`, ~3 ms on the development VMs); the
//! workers reach a store only through [`service::Submitter::try_submit`],
//! which never blocks.
//!
//! Seqs are dense per user (1, 2, 3, …) and never go back: the head is kept
//! per user for as long as the store exists, through trimming and restarts.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod conformance;
pub mod disk;
mod hotlog;
pub mod memory;
mod periodic;
mod reaper;
pub mod redis;
pub mod service;
pub mod shards;
mod writeback;

#[cfg(test)]
mod tests;

pub use disk::DiskStore;
pub use memory::MemoryStore;
pub use redis::RedisStore;
pub use service::{
    Busy, Done, Request, Service, ServiceConfig, Sink, StoreCounters, Submitter, DEFAULT_QUEUE_MAX_BYTES,
    EXPIRE_INTERVAL, POSITION_SYNC_INTERVAL,
};
pub use shards::{open_store_shards, shard_of, MAX_SHARDS};

use crate::config::{ClusterConfig, StoreConfig, StoreKind};

/// A message to append to `to`'s inbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub to: Arc<str>,
    /// The sending user; "" = the application.
    pub from: Arc<str>,
    pub msg_id: u64,
    pub ts_ms: u64,
    pub payload: Bytes,
    /// The sender's idempotency key; 0 = none.
    pub client_id: u64,
    /// When the message expires (unix ms, the clock of `ts_ms`): it is
    /// not delivered from then on ([`StoredMessage::expired`]). 0 = only
    /// `store.ttl_ms` applies.
    pub expires_ms: u64,
}

/// A message as stored in an inbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub msg_id: u64,
    pub ts_ms: u64,
    pub from: Arc<str>,
    pub payload: Bytes,
    /// [`NewMessage::expires_ms`], as appended.
    pub expires_ms: u64,
}

impl StoredMessage {
    /// `m` as stored under `seq` (its payload and sender shared, not copied).
    pub fn of(seq: u64, m: &NewMessage) -> StoredMessage {
        StoredMessage {
            seq,
            msg_id: m.msg_id,
            ts_ms: m.ts_ms,
            from: m.from.clone(),
            payload: m.payload.clone(),
            expires_ms: m.expires_ms,
        }
    }

    /// Whether the message's own expiry has passed at `now_ms` (never for
    /// one appended without: `expires_ms` 0). It is not delivered from
    /// then on, and the retention pass drops it once no message before it
    /// is kept ([`Store::expire`]).
    pub fn expired(&self, now_ms: u64) -> bool {
        own_expiry_passed(self.expires_ms, now_ms)
    }
}

/// The outcome of an append.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this seq.
    New { seq: u64 },
    /// `(to, from, client_id)` was appended within the dedup window: this
    /// is the original's seq and msg_id, nothing was stored.
    Duplicate { seq: u64, msg_id: u64 },
}

/// Why a store refused or failed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StoreError {
    /// The inbox holds `limit` messages (`store.max_messages_per_inbox`).
    #[error("inbox full: it holds the most messages allowed ({limit})")]
    InboxFull { limit: u64 },
    /// The store holds `limit_bytes` (`store.max_bytes`).
    #[error("store full: it holds the most bytes allowed ({limit_bytes})")]
    StoreFull { limit_bytes: u64 },
    /// The store cannot serve: I/O error, queue full, stopped, or an
    /// argument it cannot store (said in the text).
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Up to `limit` messages after a seq, and the inbox's head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub messages: Vec<StoredMessage>,
    pub head_seq: u64,
}

/// One device of a user: its acknowledged position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    pub device: String,
    /// Everything ≤ position is stored on the device.
    pub position: u64,
    pub last_seen_ms: u64,
}

/// What a store holds for one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxState {
    /// The last seq given out (0 = none ever).
    pub head_seq: u64,
    /// The oldest seq still kept; `head_seq + 1` when nothing is kept.
    pub first_seq: u64,
    pub messages: u64,
    /// Bytes kept for this user, counted as [`record_bytes`].
    pub bytes: u64,
    /// Known devices, in the order they were first seen, and the
    /// [`PUSHED_OUT`] entry (id `""`) if devices were pushed out of the
    /// list at [`MAX_DEVICES_PER_USER`].
    pub devices: Vec<DeviceState>,
}

/// A per-user inbox store. Every method runs on the store thread
/// ([`service`]); none may be called from an io_uring worker. An
/// implementation of one's own is checked with [`conformance::run_all`].
pub trait Store: Send + 'static {
    /// Appends to m.to's inbox: seq = head + 1. Not durable until `sync`.
    /// The message's `expires_ms` is kept with it and given back by
    /// `read` ([`conformance`] checks it survives a reopen).
    /// Dedup: (m.to, m.from, m.client_id) seen within the dedup window →
    /// Duplicate. Per recipient in every store: an application pushes as
    /// sender "" and numbers its keys per user, so the same key to another
    /// user is another message (and a cluster's Redis store can check
    /// only the recipient's hash slot atomically).
    fn append(&mut self, m: &NewMessage, now_ms: u64) -> Result<Appended, StoreError>;
    /// Appends `msgs` in order, as many `append`s would (same outcomes, in
    /// the same order); a backend overrides it to save round trips (the
    /// Redis store sends the run as one pipeline).
    fn append_batch(&mut self, msgs: &[NewMessage], now_ms: u64) -> Vec<Result<Appended, StoreError>> {
        msgs.iter().map(|m| self.append(m, now_ms)).collect()
    }
    /// Makes everything appended/positioned so far durable per the durability mode.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Up to `limit` messages with seq > after_seq, in order, and the head.
    /// Messages whose own expiry ([`StoredMessage::expired`]) has passed
    /// are returned too: the store thread leaves them out of what it
    /// hands on (`service`), so that every backend pages alike.
    fn read(&mut self, user: &str, after_seq: u64, limit: usize) -> Result<Page, StoreError>;
    /// A device logs in: registers it (position = max(stored, client_seq),
    /// or the stored one when client_seq is past the head: `login_device`)
    /// and returns (position, head_seq). Durable at next sync. client_seq
    /// counts only for a device the store knows: `login_device`.
    fn device_login(
        &mut self,
        user: &str,
        device: &str,
        client_seq: u64,
        now_ms: u64,
    ) -> Result<(u64, u64), StoreError>;
    /// Cumulative ACK: position = max(position, seq); a seq past the head
    /// is dropped (it counts an inbox that is gone), and so is a position
    /// of a device the store does not know (forgotten, or lost with the
    /// store's data: only a login adds a device, `move_device`). Durable
    /// at next sync.
    fn set_position(&mut self, user: &str, device: &str, seq: u64, now_ms: u64) -> Result<(), StoreError>;
    /// Several `set_position`s (user, device, seq): the outcome of each,
    /// in order, with the same effect as that many calls; a backend
    /// overrides it to write them together (the disk store: one write
    /// batch, one write to its journal, for the positions a store turn
    /// hands over).
    fn set_positions(&mut self, positions: &[(&str, &str, u64)], now_ms: u64) -> Vec<Result<(), StoreError>> {
        positions.iter().map(|&(user, device, seq)| self.set_position(user, device, seq, now_ms)).collect()
    }
    fn inbox_state(&mut self, user: &str) -> Result<InboxState, StoreError>;
    /// Forgets `user`'s `device` (its app signed out, or was uninstalled),
    /// as `store.ttl_ms` unseen would: its position no longer holds the
    /// inbox, so what every remaining device has acknowledged goes (at the
    /// next retention pass; the disk store drops its hot messages at once,
    /// as at an acknowledgement), and with no device left the messages are
    /// kept for the TTL. A LOGIN with that device id later is a new
    /// device's; so is a position (`set_position`), which adds the device
    /// at its seq (the store thread drops those of a forgotten device until
    /// it logs in again: `service`). A store that several nodes share
    /// should drop them itself, as the Redis store does (marked at
    /// `now_ms`, for `ttl_ms`): another node's store thread never saw the
    /// forget. Returns whether the device was known. Durable at next sync.
    fn forget_device(&mut self, user: &str, device: &str, now_ms: u64) -> Result<bool, StoreError>;
    /// Retention pass: drops messages older than ttl, messages every known
    /// device has acknowledged (only if the user has ≥1 known device) and
    /// messages whose own expiry passed, each from the oldest of its
    /// inbox while every message before it went too (an inbox keeps no
    /// holes but those its ACKs made); devices unseen for ttl, dedup
    /// entries older than the window. Returns messages dropped.
    fn expire(&mut self, now_ms: u64) -> Result<u64, StoreError>;
    /// The retention pass in slices: goes on with the pass under way (or
    /// starts one), does about `budget` units of work (a user looked at, a
    /// message or dedup entry dropped: one unit each, at least one), and
    /// returns the messages it dropped and whether the pass is over. The
    /// store thread runs one slice per turn, so that the writes and reads
    /// queued meanwhile are served between slices instead of after a whole
    /// pass. What a pass drops is what `expire` drops, each user judged as
    /// of the slice that looks at it. The Redis store goes one round of its
    /// pass per slice, whatever the budget (its work is done in Redis; the
    /// thread waits for two round trips). The default runs the whole pass
    /// at once (the memory store, whose pass is in RAM).
    fn expire_slice(&mut self, now_ms: u64, _budget: usize) -> Result<(u64, bool), StoreError> {
        self.expire(now_ms).map(|n| (n, true))
    }
    /// Work the store thread hands the backend between requests, when its
    /// queue is empty: about `budget` units of whatever the backend would
    /// otherwise do within a later request. The disk store resolves its
    /// hot messages that are due (disk.rs), as the next appends would;
    /// the default has nothing to do.
    fn tidy(&mut self, _now_ms: u64, _budget: usize) -> Result<(), StoreError> {
        Ok(())
    }
    /// When (on the `now_ms` clock) [`Store::tidy`] next has work, if it
    /// has any coming; `None`: none until the next request. Cheap.
    fn tidy_due(&self) -> Option<u64> {
        None
    }
    /// Messages and bytes (as [`record_bytes`]) kept over all inboxes
    /// now: kept until every known device of the user acknowledged them
    /// (or they expired) and a retention pass dropped them. Cheap: a
    /// running count, not a scan.
    fn held(&self) -> (u64, u64);
    /// Of the messages this store's retention passes dropped since it was
    /// opened, how many some known device of their user had not
    /// acknowledged (all of them, for a user with no device known): they
    /// expired undelivered, by `store.ttl_ms` or their own expiry. A
    /// running count, read after each pass (the
    /// `switchboard_store_expired_unacknowledged_total` metric); the
    /// default, for a store that does not count them, is 0.
    fn expired_unacknowledged(&self) -> u64 {
        0
    }
    /// Whether the store has stopped serving after a failed write (the
    /// disk store: disk.rs, `DiskStore::guard`); every request then fails
    /// until the store is opened again. Cheap.
    fn stopped(&self) -> bool {
        false
    }
    /// How to open this store again from what it keeps, which the store
    /// thread does while it is [`Store::stopped`] (`service`,
    /// `ServiceConfig::reopen_interval`); `None`: it cannot be.
    fn reopener(&self) -> Option<Reopen> {
        None
    }
    /// What survives a message once `sync` returned, reported in receipts:
    /// `None` = nothing (the memory store) or unknown.
    fn durability(&self) -> Option<Durability> {
        None
    }
    /// After a `sync`: when the writes began that it left short of the
    /// durability mode, which waits for no acknowledgement (the disk
    /// store with `fsync` syncs fjall's journal, which alone holds logins
    /// and the positions of users not cached, at most once a second). The
    /// store thread syncs again [`service::POSITION_SYNC_INTERVAL`] after
    /// it. `None`: nothing is owed.
    fn unsynced_since(&self) -> Option<std::time::Instant> {
        None
    }
}

/// Opens a store again ([`Store::reopener`]).
pub type Reopen = Arc<dyn Fn() -> Result<Box<dyn Store>, StoreError> + Send + Sync>;

/// How durable a `sync` makes what came before it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Survives power loss: `sync` is an `fdatasync` of the journal (the
    /// disk store's hot log; device positions and logins, in fjall's
    /// journal, within a second after: `disk.rs`).
    Fsync,
    /// Survives a crash of the process, not of the machine: `sync` hands the
    /// journal to the kernel (a `write`), without waiting for the disk.
    Os,
}

/// The limits a store enforces.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// An append to an inbox holding this many messages is refused
    /// ([`StoreError::InboxFull`]).
    pub max_messages_per_inbox: u64,
    /// An append that would take the store past this many bytes (counted as
    /// [`record_bytes`]) is refused ([`StoreError::StoreFull`]).
    pub max_bytes: u64,
    /// Messages and devices older than this are dropped by `expire`.
    pub ttl_ms: u64,
    /// `(to, from, client_id)` keys are remembered this long.
    pub dedup_window_ms: u64,
}

/// `delivery.dedup_window_ms`'s default: an hour.
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 3_600_000;

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_messages_per_inbox: 100_000,
            max_bytes: 1 << 30,
            ttl_ms: 7 * 24 * 3_600_000,
            dedup_window_ms: DEFAULT_DEDUP_WINDOW_MS,
        }
    }
}

/// Known devices kept per user. A login of one more device forgets the one
/// seen least recently (it counts as new if it comes back, from 0), and
/// folds its position into the [`PUSHED_OUT`] entry, which keeps what it
/// had not acknowledged until its TTL. Bounds the per-user record: each
/// device costs 17 bytes + its id (at most [`MAX_DEVICE_BYTES`]), and the
/// list holds at most one entry more.
pub const MAX_DEVICES_PER_USER: usize = 32;

/// Longest device id stored (the protocol's limit).
pub const MAX_DEVICE_BYTES: usize = 64;

/// Longest user id (`to`, `from`) stored: the protocol's `str8`.
pub const MAX_USER_BYTES: usize = 255;

/// Fixed cost of one stored message against `max_bytes`, beside its user,
/// sender and payload: the key's length byte and seq (9), msg_id and ts_ms
/// (16), the sender's length byte (1).
pub const RECORD_OVERHEAD_BYTES: u64 = 26;

/// What one message costs against `max_bytes`: the same figure in every
/// backend, close to what the disk store writes (before compression).
pub fn record_bytes(to: &str, from: &str, payload_len: usize) -> u64 {
    RECORD_OVERHEAD_BYTES + to.len() as u64 + from.len() as u64 + payload_len as u64
}

fn check_ids(user: &str, from: &str, device: &str) -> Result<(), StoreError> {
    if user.is_empty() || user.len() > MAX_USER_BYTES || from.len() > MAX_USER_BYTES {
        return Err(StoreError::Unavailable(format!("user ids must be 1 to {MAX_USER_BYTES} bytes")));
    }
    if device.len() > MAX_DEVICE_BYTES {
        return Err(StoreError::Unavailable(format!("device ids must be at most {MAX_DEVICE_BYTES} bytes")));
    }
    Ok(())
}

/// A device logs in: its position becomes max(stored, client_seq), or
/// stays the stored one when client_seq is past the head: the client then
/// stored from another inbox (a memory store restarted, a backup
/// restored, an `os` store that lost its last writes), and its seqs name
/// other messages than this inbox's, which must not count as its own
/// (PROTOCOL.md 15.6). A device the store does not know starts at 0,
/// whatever client_seq: the inbox it stored from may be gone with the
/// device's record (a memory store's restart, a Redis without an AOF
/// restarted, a wiped data directory), and once the new inbox's head has
/// passed client_seq nothing else tells; taken, it would skip every new
/// message up to it. A device forgotten or unseen for the TTL pays with
/// copies of what the inbox still holds. An unknown device is added
/// (forgetting the least recently seen one past [`MAX_DEVICES_PER_USER`]).
/// Returns the position.
fn login_device(devices: &mut Vec<DeviceState>, device: &str, client_seq: u64, head: u64, now_ms: u64) -> u64 {
    if device == PUSHED_OUT {
        return 0; // not a device's id (the protocol's are 1 to 64 bytes)
    }
    let known = devices.iter().any(|d| d.device == device);
    let client_seq = if client_seq > head || !known { 0 } else { client_seq };
    advance_device(devices, device, client_seq, head, now_ms)
}

/// A position (an ACK) of `device`: moves a device the store knows to
/// max(position, seq), as [`advance_device`]; returns its position, 0 for
/// a device the store does not know, which stays unknown: only a login
/// adds a device. Such a position counts seqs of an inbox the device is
/// not in: it was forgotten (the last ACKs of its connection, handed over
/// after the forget), or the store lost its data while the connection
/// stayed (a Redis restarted without its AOF: a position handed over
/// before the node saw the loss), where, once the new inbox's head had
/// passed it, it marked the new messages up to it as acknowledged and
/// the device's next login skipped them.
fn move_device(devices: &mut Vec<DeviceState>, device: &str, seq: u64, head: u64, now_ms: u64) -> u64 {
    if device == PUSHED_OUT || !devices.iter().any(|d| d.device == device) {
        return 0;
    }
    advance_device(devices, device, seq, head, now_ms)
}

/// Moves (or adds) a device's position to max(position, seq). A seq past
/// the head moves nothing: it counts seqs of an inbox that is gone (the
/// store lost its data under a connection that stayed: a Redis restarted
/// without its AOF), and taken, even capped at the head, it would mark the
/// new inbox's messages up to it as acknowledged. (A window never
/// acknowledges past the head it knows: such an ACK is ERROR 117.)
fn advance_device(devices: &mut Vec<DeviceState>, device: &str, seq: u64, head: u64, now_ms: u64) -> u64 {
    if seq > head {
        return devices.iter().find(|d| d.device == device).map_or(0, |d| d.position);
    }
    if let Some(d) = devices.iter_mut().find(|d| d.device == device) {
        d.position = d.position.max(seq);
        d.last_seen_ms = d.last_seen_ms.max(now_ms);
        return d.position;
    }
    if devices.iter().filter(|d| d.device != PUSHED_OUT).count() >= MAX_DEVICES_PER_USER {
        let oldest = (0..devices.len())
            .filter(|&i| devices[i].device != PUSHED_OUT)
            .min_by_key(|&i| devices[i].last_seen_ms)
            .expect("a full list is not empty");
        let gone = devices.remove(oldest);
        push_out(devices, gone.position, gone.last_seen_ms);
    }
    devices.push(DeviceState { device: device.to_string(), position: seq, last_seen_ms: now_ms });
    seq
}

/// The entry of the devices forgotten at [`MAX_DEVICES_PER_USER`]: its id
/// is empty (a device's is 1 to [`MAX_DEVICE_BYTES`] bytes), its position
/// the lowest of theirs and its last seen the latest. It holds what they
/// had not acknowledged for as long as the TTL would have kept it for
/// them, and goes with that TTL like a device, while no login or ACK ever
/// moves it: a device pushed out of the list loses nothing it was owed
/// (it comes back as a new device, from 0, and gets what the inbox keeps).
pub const PUSHED_OUT: &str = "";

/// Folds a device pushed out of the list (at `position`, last seen at
/// `last_seen_ms`) into the [`PUSHED_OUT`] entry.
fn push_out(devices: &mut Vec<DeviceState>, position: u64, last_seen_ms: u64) {
    match devices.iter_mut().find(|d| d.device == PUSHED_OUT) {
        Some(d) => {
            d.position = d.position.min(position);
            d.last_seen_ms = d.last_seen_ms.max(last_seen_ms);
        }
        None => devices.push(DeviceState { device: PUSHED_OUT.to_string(), position, last_seen_ms }),
    }
}

/// Removes `device` from `devices`; whether it was there.
fn forget_device(devices: &mut Vec<DeviceState>, device: &str) -> bool {
    let before = devices.len();
    devices.retain(|d| d.device != device);
    devices.len() != before
}

/// Forgets devices unseen for `ttl_ms`; returns the seq every remaining
/// device has acknowledged (0 when none is known: nothing may be trimmed).
fn expire_devices(devices: &mut Vec<DeviceState>, ttl_ms: u64, now_ms: u64) -> u64 {
    devices.retain(|d| !expired(d.last_seen_ms, ttl_ms, now_ms));
    acked_by_all(devices)
}

/// The seq every device in `devices` has acknowledged (0 when none is
/// known: nothing is acknowledged then).
fn acked_by_all(devices: &[DeviceState]) -> u64 {
    devices.iter().map(|d| d.position).min().unwrap_or(0)
}

/// This host's clock in Unix milliseconds: the clock of a message's
/// `ts_ms` and `expires_ms`, of the store thread, and of the cluster's
/// records (which add Redis's offset to it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The `expires_ms` of a message stored at `ts_ms` to expire `ttl_ms`
/// later (0: no expiry of its own, for a `ttl_ms` of 0).
pub fn expires_at(ts_ms: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        ts_ms.saturating_add(ttl_ms)
    }
}

/// Whether a message's own expiry (`expires_ms`, 0: none) has passed.
fn own_expiry_passed(expires_ms: u64, now_ms: u64) -> bool {
    expires_ms != 0 && expires_ms <= now_ms
}

/// Whether something stamped `ts_ms` is past an age limit of `age_ms`.
fn expired(ts_ms: u64, age_ms: u64, now_ms: u64) -> bool {
    ts_ms.saturating_add(age_ms) <= now_ms
}

/// Opens the store `[store]` configures: `None` for `kind = "none"` (live
/// relay only). `dedup_window_ms` is `delivery.dedup_window_ms`; `cluster`
/// is `[cluster]` (the Redis to use with `kind = "redis"`, the node id and
/// the command timeout); `listen_port` names this node when
/// `cluster.node_id` is empty.
pub fn open_store_with(
    cfg: &StoreConfig,
    dedup_window_ms: u64,
    cluster: &ClusterConfig,
    listen_port: u16,
) -> Result<Option<Box<dyn Store>>, StoreError> {
    let limits = cfg.limits(dedup_window_ms);
    Ok(match cfg.kind {
        StoreKind::None => None,
        StoreKind::Redis => {
            let Some(addrs) = &cluster.redis else {
                return Err(StoreError::Unavailable(
                    "store.kind = \"redis\" needs cluster.redis (the Redis URL or the cluster's seeds)".into(),
                ));
            };
            let timeout = std::time::Duration::from_millis(cluster.command_timeout_ms);
            let mut store = RedisStore::open(addrs, &cluster.node_id_or_default(listen_port), limits, timeout)?;
            store.set_node_ttl(std::time::Duration::from_millis(cluster.node_ttl_ms));
            Some(Box::new(store))
        }
        StoreKind::Memory => Some(Box::new(MemoryStore::new(limits))),
        StoreKind::Disk => {
            Some(Box::new(DiskStore::open_tuned(&cfg.path, cfg.durability, limits, disk::DiskTuning::of(cfg))?))
        }
    })
}

/// [`open_store_with`] the default dedup window ([`DEFAULT_DEDUP_WINDOW_MS`])
/// and no `[cluster]` (so not for `kind = "redis"`).
pub fn open_store(cfg: &StoreConfig) -> Result<Option<Box<dyn Store>>, StoreError> {
    open_store_with(cfg, DEFAULT_DEDUP_WINDOW_MS, &ClusterConfig::default(), 0)
}
