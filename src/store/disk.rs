//! [`DiskStore`]: the inboxes in an embedded LSM tree (fjall), durable per
//! [`Durability`].
//!
//! Owns: one fjall database under the configured directory, with five
//! keyspaces (`u` = a user id's length byte then its bytes):
//! - `inboxes`: `u` → first kept seq, message count, bytes, devices (id,
//!   position, last seen), then the head seq (u64 BE). Only users with
//!   messages kept or a known device have one; `expire` walks this
//!   keyspace.
//! - `heads`: `u` → head seq (u64 BE), written when a user's `inboxes`
//!   record is removed, so that seqs never go back, through trimming and
//!   restarts. Read only when a user has no record, or one written before
//!   the head moved into the records (such a record ends after the
//!   devices; versions before it wrote every head here, and it is read
//!   as it is).
//! - `msgs`: `u` + seq BE → msg_id, ts_ms, sender, payload. One user's
//!   messages are contiguous and in seq order, so a page is one range scan.
//! - `dedup`: `u` of the recipient + `u` of the sender + client_id BE →
//!   seq, msg_id, ts; `dedup_time`: ts BE + the dedup key, so `expire`
//!   finds old entries in time order. Versions before 2026-12-05 keyed an
//!   entry by sender and client_id alone (`u` of the sender + client_id
//!   BE), whatever the recipient; such entries, if any, are the oldest
//!   in `dedup_time`, and are still matched for a user's SEND until the
//!   window has passed over them (`DiskStore::legacy_dedup`).
//!
//! An append writes nothing to fjall (a SEND's dedup entry waits in RAM
//! for the `sync`, which writes it once the hot log holds the message:
//! `DiskStore::unlogged_dedup`): the
//! message goes to the hot log (`hotlog.rs`), a file written at every
//! `sync` (and `fdatasync`ed with [`Durability::Fsync`]), and stays in
//! RAM. The device position that completes its acknowledgement (every
//! known device of its user past it) drops it at once, with the record
//! that position writes carrying the new `fhead`
//! (`DiskStore::drop_acknowledged`). One epoch
//! (`hotlog::EPOCH_MS`, 2 s on the store's clock) after its append,
//! or sooner while the hot messages take more than [`HOT_MAX_BYTES`] of
//! RAM, an append resolves it if it is still there (up to 8 per append),
//! or the store thread does between requests once it is two epochs old
//! ([`Store::tidy`], [`IDLE_RESOLVE_MS`]): dropped if every known device
//! of its user has acknowledged it by then, else written into `msgs`.
//! A retention pass starts
//! by resolving every hot message. The hot log keeps one file per epoch
//! and deletes one once every message in it is resolved and fjall is
//! persisted as the durability promises. So the messages of devices that
//! are connected and acknowledge (within about a second, PROTOCOL.md
//! 15.4) never reach fjall: no memtable insert, no flush, no compaction.
//!
//! A user's record counts the messages in `msgs` and carries `fhead`, the
//! head as fjall knows it: every seq above it is a hot message, every one
//! at or below it is in `msgs` or was dropped. The record is written with
//! the user's first message in `msgs`, then every [`RECORD_LAG`] of
//! them, and whenever it is written anyway (a device logs in, a device
//! moves and the user is not cached, the retention pass, the user's cache
//! entry is dropped), so it may lag `msgs` by fewer than [`RECORD_LAG`]
//! messages. A drop moves `fhead` without a write to fjall, and so do
//! the moves of a cached user's known devices a store turn hands over
//! ([`Store::set_positions`]): those are logged in the hot log, with the
//! user's `fhead` (`DiskStore::set_positions_now`). Until the record is
//! written the user is dirty, and a rotation logs its `fhead` and devices
//! at the start of the new file unless the file it ends has them as they
//! are (hotlog.rs), so the head and the moves survive the deletion of the
//! file they were first logged in. A dirty user that nothing moved for
//! the whole epoch after the one it was logged in has its record written
//! during that epoch instead, a slice at each `sync`
//! (`DiskStore::write_idle_records`): idle users cost one record write,
//! not a log at every other rotation in one turn. Reading a record that
//! is not cached counts the messages past its head back in (`catch_up`: one range scan
//! of at most that many keys), and so does `open` for every record when it
//! sums the bytes kept. At open, every message of the hot log above its
//! user's `fhead` (the record's, or a higher one the log holds) is written
//! into `msgs` (with its dedup entry), as if resolved without a drop,
//! before anything else; after a crash, messages dropped since the last
//! rotation may so come back until the next retention pass drops them
//! again (closing logs the heads that prevent it). A crash leaves a
//! prefix of fjall's journal and of the hot log: the records never claim
//! a hot message, so the two agree again the same way.
//!
//! Why the hot log: the memtable inserts of every message were the
//! largest share of the store thread's time (below), and fjall's flushes
//! and compactions of those messages, which were dropped seconds later,
//! were most of its own threads' work and its worst stalls. Measured with
//! `os`, 4,000 device connections acknowledging as PROTOCOL.md 15.4 says,
//! 2 workers, `switchboard-bench unicast --rate 30000 --duration-s 12`,
//! this build alternated with the one before (three pairs): p99 72 / 55 /
//! 92 ms became 10 / 16 / 8 ms; the store thread's CPU 31–32% of a core
//! became 29–31%, and fjall's threads' 4–5% none; the disk writes of the
//! run 81 MB became 52 MB. With `fsync` (two pairs) p99 113 / 75 ms became
//! 55 / 40 ms. 50 s at 20,000 msgs/s with `os`: p99 29.4 / 13.5 ms became
//! 7.3 / 9.5 ms.
//!
//! Why one key per message in `msgs` and a lagging record (from before
//! the hot log, when every append wrote `msgs`): the store thread spent
//! about 45% of its time searching fjall's memtable skiplists for where
//! an insert goes (perf, reliable unicast), and a record rewritten at every append filled the `inboxes` write
//! buffer as fast as the messages filled theirs, and every flush of one
//! stalls the writes (at [`WRITE_BUFFER_MIB`]). Measured with `os`,
//! 4,000 device connections, 2 workers, the build writing the record at
//! every append alternated with this one: at 30,000 msgs/s a p99 of 268 /
//! 494 / 579 ms became 39 / 76 / 18 ms, and commits over 50 ms in 12 s
//! went from 6 / 25 / 19 to none; at 40,000 msgs/s 31,618 / 29,406
//! delivered/s became 38,390 / 38,397; at 20,000 the store thread's user
//! CPU went from 27 / 18% of a core to 21 / 16%. (For the same reason the
//! head had moved from a keyspace of its own into the record: three keys
//! per append cost the thread 8–15% more CPU per message than two.)
//!
//! Tried and taken back: one key per append another way, by keeping each
//! user's newest messages (up to 1 KiB) in the user's record, which every
//! append and position change then wrote anyway, and dropping
//! acknowledged messages with the position instead of at the retention
//! pass. It cut the store thread's CPU (40/38/43% of a core → 30/36/34%
//! with `os` at 20,000 msgs/s over 4,000 device connections, alternated;
//! 42/40% → 34/34% with `fsync`), but every rewrite of the record carried its messages again:
//! 555 bytes written to disk per message instead of 340, fjall's
//! memtables full more often, and more of the flush stalls described at
//! [`WRITE_BUFFER_MIB`]. In the capacity report's 2 s steps the `os`
//! ladder's 30,000 msgs/s step went from a p99 of 24 and 18 ms (two runs
//! without) to 227, 162 and 181 ms (three runs with), so the tail was
//! reverted.
//!
//! Each login, sync's dedup entries or resolved message is one atomic
//! fjall write batch into its journal (no sync); the position changes of users not
//! cached that the store thread writes in one turn are one batch together
//! ([`Store::set_positions`]). `sync` writes fjall's journal, then the
//! hot log, then fjall's journal again (the dedup entries), to the kernel
//! (fjall first: a head the hot log records may cover messages resolved
//! into `msgs`, `DiskStore::write_through_log`), and with
//! [`Durability::Fsync`] `fdatasync`s the hot log every time and fjall's
//! journal at most every `FJALL_SYNC_INTERVAL` (1 s), before a hot
//! log file is deleted, and before a hot log that records a head while
//! messages resolved since its last sync wait in it: what fjall holds that the hot log does not is
//! logins and the positions of users not cached, which may then be up to
//! a second older after a power loss (a device gets messages it
//! acknowledged again, and drops them by seq), and retention drops, done
//! again. Both are replayed in
//! order at open, so a crash leaves a prefix of each; an append that was
//! not synced may be lost, and then its seq is given again (it was never
//! acknowledged). With
//! [`Durability::Os`] a thread of the store starts the journal's writeback
//! every few milliseconds (`writeback.rs`), so that the journal sync fjall
//! does at each flush, while every write waits, has little left to write.
//! With either durability another thread holds a reference to each
//! memtable and frees it once fjall has let it go (`reaper.rs`), so that
//! fjall does not free it while it holds the lock every write of that
//! keyspace takes.
//!
//! A write that fails (the hot log's, fjall's, or a sync) stops the store:
//! every request after it fails until the store is opened again (the
//! store thread tries every few seconds), which recovers what was synced
//! (`DiskStore::guard`: why; docs/DEPLOY.md).
//!
//! RAM: nothing per user beyond a bounded cache. The store keeps one
//! counter (bytes kept, summed from `inboxes` at open, so opening reads
//! each user with pending messages once), fjall's own buffers, which do
//! not grow with users (a block cache of [`CACHE_BYTES`] and, per
//! keyspace, a memtable of at most [`WRITE_BUFFER_MIB`] MiB of keys and
//! values, `store.write_buffer_mib`, plus sealed ones waiting for the
//! flush thread; with its skiplist nodes and allocations a memtable of
//! small records takes over three times that in RAM, measured with inbox
//! records, docs/DEPLOY.md), and the head and `inboxes` record of at most
//! [`CACHED_USERS`] users that were appended to recently (about 200 bytes
//! each with one device; about 13 MiB when full), and the hot messages
//! (at most [`HOT_MAX_BYTES`], each counted as its value and 96 bytes).
//! [`ram_budget`] adds these up.
//!
//! The cache is written through: every write goes to fjall, and the entry
//! changes with it (dropped if the write fails), so it never holds
//! anything the database does not, but for the `fhead` a dropped hot
//! message moved (its record is written before the entry is dropped). It spares an append the lookups of the
//! user's head and record. Under reliable unicast those two lookups were a
//! third of the store thread's samples, yet removing them saved little
//! (the thread's share of the server's CPU went from 40% to 39%): the
//! memtable inserts that follow then pay the cache misses the lookups
//! paid. What it saves for certain is the lookup in table files, once a
//! user's records have been flushed out of the memtable. Only appends fill
//! it: a device logging in or acknowledging uses an entry that is there
//! but adds none, so idle device connections cost no cache memory.
//! A million offline users with pending messages therefore cost disk
//! (their messages and an `inboxes` record of 34 bytes + the id + 17
//! bytes + the id of each device, before compression; 9 bytes + the id
//! in `heads` once the record is gone), not RAM.
//!
//! Why fjall (3.1) and not redb (4.6): `cargo bench -p switchboard-bench
//! --bench store_engines` (10,000 users, 100-byte payloads, same keys as
//! here; 2-core VM, ext4). With `fsync`, appends/s for N appends per
//! sync: fjall 3,834 / 22,295 / 43,151 (N = 1 / 16 / 256), redb 1,236 /
//! 5,615 / 10,827; trims 476,000 vs 28,600 msgs/s. With `os`: fjall
//! 71,635 / 50,013 / 80,736, redb 18,843 / 39,097 / 45,632. redb reads a
//! page of 20 faster (p50 5.7 us vs 20.6 us), which matters less: every
//! message is appended, acknowledged and trimmed, and read about once. And
//! fjall's `os` mode survives a process crash (the journal is in the
//! kernel); redb's non-durable commits do not.
//!
//! Must not: be shared between processes (fjall locks the directory) or be
//! called from an io_uring worker (every method may wait on the disk).

use std::collections::VecDeque;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::hotlog::{self, HotLog, LogEntry, Recovered};
use super::{
    advance_device, check_ids, expire_devices, expired, login_device, move_device, own_expiry_passed, record_bytes,
    Appended, DeviceState, Durability, InboxState, NewMessage, Page, Reopen, Store, StoreError, StoreLimits,
    StoredMessage, MAX_USER_BYTES,
};

/// fjall's block cache: recently read data blocks, shared by every keyspace.
pub const CACHE_BYTES: u64 = 32 << 20;

/// Most MiB of keys and values one keyspace buffers before it is flushed
/// to a table file, by default (`store.write_buffer_mib`). Five
/// keyspaces: at most 5 × this in active memtables, and about three times
/// that in RAM for small records (the module doc).
///
/// Why 32 and not fjall's 16 or less: every flush (and the compaction
/// after it) ends by writing and syncing the keyspace's manifest while it
/// holds the lock every write of that keyspace takes, so appends wait for
/// two or three syncs each time, and for the disk's worst moments: 100 to
/// 160 ms, seen three times in 8 s of reliable unicast at 20,000
/// messages/s with 16 MiB here. Twice the buffer, half the flushes and
/// half those stalls. 2 MiB measured worse all round (flush threads took
/// 14% of the server's CPU instead of 6%); 64 MiB showed no stall in the
/// same 8 s.
pub const WRITE_BUFFER_MIB: u64 = 32;

/// Most MiB of journal files fjall keeps (per shard) by default
/// (`store.max_journal_mib`), and the least it accepts (fjall panics
/// below it). fjall starts a journal file once the one it writes is past
/// 64 MB (at a flush), and past this cap flushes the keyspaces that hold
/// the oldest file back, so that it can go.
///
/// Why 128 and not fjall's 512: a keyspace that takes few writes (the
/// `inboxes` records, the dedup entries) holds every journal back until
/// the cap, and a start after a crash replays them all. Measured on
/// crash images of 3 million stored 64-byte messages to 4,000 users,
/// written with each cap and then aborted, two starts of `serve` each to
/// `/readyz`: 430 MB of journals (cap 512) 4.8 / 5.0 s, 158 MB (128) 3.2
/// / 2.7 s, 67 MB (64) 1.8 / 1.8 s; the directories 692 / 433 / 346 MB.
/// Not 64: at fjall's floor every new journal file flushes every keyspace
/// holding the one before, and each flush holds appends up for its
/// syncs ([`WRITE_BUFFER_MIB`]).
pub const MAX_JOURNAL_MIB: u64 = 128;
pub const MIN_JOURNAL_MIB: u64 = 64;

/// How the engine under a disk store is sized: `store.write_buffer_mib`
/// and `store.max_journal_mib`, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskTuning {
    /// Write buffer (memtable) per keyspace.
    pub write_buffer_bytes: u64,
    /// Journal files kept, at most, before fjall flushes the write buffers
    /// that hold the oldest one back (at least [`MIN_JOURNAL_MIB`]).
    pub max_journal_bytes: u64,
}

impl Default for DiskTuning {
    fn default() -> Self {
        DiskTuning { write_buffer_bytes: WRITE_BUFFER_MIB << 20, max_journal_bytes: MAX_JOURNAL_MIB << 20 }
    }
}

impl DiskTuning {
    pub fn of(cfg: &crate::config::StoreConfig) -> Self {
        DiskTuning { write_buffer_bytes: cfg.write_buffer_mib << 20, max_journal_bytes: cfg.max_journal_mib << 20 }
    }
}

/// Users whose head and `inboxes` record the store keeps in RAM (the
/// write-through cache in the module doc). Past this, filling an entry
/// drops an arbitrary other one.
pub const CACHED_USERS: usize = 1 << 16;

/// Most messages a user's `inboxes` record may lag behind its messages in
/// `msgs` (the module doc): what `DiskStore::load` reads past the
/// record, at most, when the user is not cached.
pub const RECORD_LAG: u64 = 64;

/// RAM one cached user takes, with one device (the module doc).
const CACHED_USER_BYTES: u64 = 200;

/// Table files the engine keeps open, shared out among the shards (each
/// at least [`MIN_CACHED_FILES`], fjall's floor). A table is about 64 MiB,
/// so this covers 16 GiB of messages before a cold read reopens a file;
/// fjall's own default, 900 per database, would put up to 57,600
/// descriptors beside the clients' at 64 shards.
const CACHED_FILES: usize = 256;
const MIN_CACHED_FILES: usize = 10;
/// Descriptors a shard holds besides its cached tables, with room to
/// spare: the lock file, the journals, the hot log's files, the tables a
/// compaction writes and a directory being synced (at most 12 were seen,
/// writing 1.6 GB at 40,000 appends a second).
const FILES_PER_SHARD: u64 = 24;

fn cached_files_per_shard(shards: usize) -> usize {
    (CACHED_FILES / shards.max(1)).max(MIN_CACHED_FILES)
}

/// File descriptors the disk store may hold open with `shards` shards:
/// `limits::descriptors_besides_clients` keeps them from the clients.
pub fn descriptors(shards: usize) -> u64 {
    shards.max(1) as u64 * (cached_files_per_shard(shards) as u64 + FILES_PER_SHARD)
}

/// RAM the disk store may take with a write buffer of `write_buffer_mib`
/// and `shards` shards (`shards.rs`), whatever the number of users: about
/// three times the buffer for each of the four keyspaces of each shard
/// that take sustained writes (a memtable of small records takes that
/// much with its skiplist nodes: docs/DEPLOY.md, "RAM"), plus the block
/// cache, the user cache and the hot messages, which the shards share out.
/// `switchboard check` adds it to its estimate.
pub fn ram_budget(write_buffer_mib: u64, shards: usize) -> u64 {
    3 * 4 * (write_buffer_mib << 20) * shards.max(1) as u64
        + CACHE_BYTES
        + CACHED_USERS as u64 * CACHED_USER_BYTES
        + HOT_RAM_BYTES
}

/// Most RAM the hot messages take, counted as `hot_ram`: past it, each
/// append resolves the oldest ones, however young. About 80 seconds of
/// 4,000 msgs/s, or 2.5 s of 100,000 msgs/s, of 64-byte payloads.
pub const HOT_MAX_BYTES: u64 = 64 << 20;

/// The key in `heads` of the hot log files fjall needs
/// (`DiskStore::mark_hot_files`): a user's key starts with its length,
/// at least 1, so it is no user's.
const HOT_FILES_KEY: &[u8] = b"\0hot-files";

/// RAM the hot messages may take: [`HOT_MAX_BYTES`], and half as much
/// again for the slack of their queues.
const HOT_RAM_BYTES: u64 = HOT_MAX_BYTES * 3 / 2;

/// Bytes of messages a recovery from the hot log commits to fjall at a
/// time ([`DiskStore::recover`]): the most of the log's messages it
/// holds in RAM beside fjall's write buffers, however much the log holds.
#[cfg(not(test))]
const RECOVERY_BATCH_BYTES: u64 = 16 << 20;
/// Tests: a few messages a batch, so that every recovery the tests make
/// commits in several.
#[cfg(test)]
const RECOVERY_BATCH_BYTES: u64 = 200;

#[cfg(test)]
thread_local! {
    /// Tests: the recovery of the next open on this thread stops, as a
    /// crash would, after this many of its batches.
    pub(crate) static CRASH_RECOVERY_AFTER: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Most hot messages an append resolves because they are an epoch old
/// (past [`HOT_MAX_BYTES`], as many as it takes). Why a bound: after a
/// pause in the traffic, everything appended before it is due at once, and
/// resolving a few seconds' worth in one append held that append and its
/// batch for tens of milliseconds (the capacity report's 2 s steps, with
/// pauses between them: half-rate p99 26 ms with `os`, against 4 ms before
/// the hot log). Eight per append catch up at eight times the rate of
/// appends.
const RESOLVE_PER_APPEND: usize = 8;

/// Records of idle dirty users written per `sync`
/// ([`DiskStore::write_idle_records`]), and dirty users looked at to find
/// them. A user dirty because its devices moved, and idle since (nothing
/// moved it during the epoch that followed), had to be logged again
/// before the rotation that deletes the file it was logged in, and again
/// every other rotation until its record was written (a login, the
/// retention pass, leaving the cache). Logged all at that rotation,
/// 65,536 of them (the cache's size: every user who acknowledged
/// something lately and got nothing since) held the store thread 29 ms
/// in one turn, every other rotation; with their records written a slice
/// per `sync` instead, its longest turn was 0.7 ms
/// (`benches/benches/store_idle.rs`, README.md).
pub(super) const IDLE_RECORD_SLICE: usize = 128;
const IDLE_VISITS: usize = 32 * IDLE_RECORD_SLICE;

/// Age at which the store thread resolves a hot message between requests
/// ([`Store::tidy`]): two epochs, not one as an append does. An append
/// resolves what is due because appends keep coming; a quiet store can
/// wait, and the acknowledgements of a burst that fell behind (late by
/// the burst's own delay, then by up to a second in the worker before
/// they reach the store) still arrive in time to drop the message rather
/// than write it into fjall. Resolving between requests at one epoch,
/// one capacity run read an `os` half-rate p99 of 117.8 ms after steps
/// that fell behind; at two, a server that fell behind at 50,000 msgs/s
/// wrote none of that step's messages into fjall.
pub const IDLE_RESOLVE_MS: u64 = 2 * hotlog::EPOCH_MS;

/// RAM one hot message takes beside its value: its entry in its user's
/// queue (40 bytes) and in the append-order queue (24), allocator
/// rounding, and its share of its user's hot slot (64 bytes and an entry
/// of the slot map, per user with hot messages).
const HOT_MSG_OVERHEAD: u64 = 96;

/// What one hot message counts against [`HOT_MAX_BYTES`].
fn hot_ram(m: &HotMsg) -> u64 {
    m.value.len() as u64 + HOT_MSG_OVERHEAD
}

/// With [`Durability::Fsync`], the longest fjall's journal goes without
/// an `fdatasync` while it has writes: every `sync` writes it to the
/// kernel, and syncs it at most this often (the messages themselves, with
/// their dedup entries, are synced in the hot log at every `sync`; what
/// else fjall's journal holds between two epochs is positions and logins,
/// and retention drops, which are done again). Why: two `fdatasync`s per
/// group commit instead of one would double what an acknowledgement waits
/// for.
const FJALL_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Most writes one retention batch holds before it is committed (bounds
/// the RAM of a pass that drops many dedup entries at once).
const EXPIRE_BATCH_WRITES: usize = 8192;

/// fjall's background threads (flushes, compactions): not workers.
const ENGINE_THREADS: usize = 2;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// `len(user) user`: a prefix of none but that user's keys.
fn user_key(user: &str) -> Vec<u8> {
    debug_assert!(user.len() <= MAX_USER_BYTES);
    let mut k = Vec::with_capacity(1 + user.len() + 8);
    k.push(user.len() as u8);
    k.extend_from_slice(user.as_bytes());
    k
}

fn msg_key(user: &str, seq: u64) -> Vec<u8> {
    let mut k = user_key(user);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The `dedup` key of `client_id` from `from` to `to` (module doc).
fn dedup_key(to: &str, from: &str, client_id: u64) -> Vec<u8> {
    let mut k = user_key(to);
    k.extend_from_slice(&user_key(from));
    k.extend_from_slice(&client_id.to_be_bytes());
    k
}

/// The `dedup` key versions before 2026-12-05 wrote (module doc): the
/// sender's `u` and the client id, without the recipient.
fn legacy_dedup_key(from: &str, client_id: u64) -> Vec<u8> {
    let mut k = user_key(from);
    k.extend_from_slice(&client_id.to_be_bytes());
    k
}

/// A dedup entry not yet in fjall ([`DiskStore::unlogged_dedup`]).
struct UnloggedDedup {
    seq: u64,
    msg_id: u64,
    ts_ms: u64,
    /// The time of the expired entry of the same key in fjall, whose
    /// `dedup_time` key goes when this one is written.
    stale: Option<u64>,
}

/// Whether `dk` is a key of [`legacy_dedup_key`]'s form: one user id
/// and a client id, where [`dedup_key`]'s has two ids.
fn is_legacy_dedup_key(dk: &[u8]) -> bool {
    dk.first().is_some_and(|&len| dk.len() == 1 + len as usize + 8)
}

/// The `dedup_time` key of a dedup entry written at `ts_ms`.
fn dedup_time_key(ts_ms: u64, dk: &[u8]) -> Vec<u8> {
    [&ts_ms.to_be_bytes()[..], dk].concat()
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, StoreError> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| unavailable("corrupt record: too short"))
}

/// Appends `devices` as the store's files hold them (an `inboxes` record,
/// a head in the hot log): a count byte, then each device's id (a length
/// byte and the bytes), position and last seen (u64 BE). At most
/// [`super::MAX_DEVICES_PER_USER`] devices, ids of at most 255 bytes
/// (checked at the login that made them known).
pub(super) fn put_devices(v: &mut Vec<u8>, devices: &[DeviceState]) {
    v.push(devices.len() as u8);
    for d in devices {
        v.push(d.device.len() as u8);
        v.extend_from_slice(d.device.as_bytes());
        v.extend_from_slice(&d.position.to_be_bytes());
        v.extend_from_slice(&d.last_seen_ms.to_be_bytes());
    }
}

/// The devices [`put_devices`] wrote at the start of `b`, and the rest.
pub(super) fn take_devices(b: &[u8]) -> Result<(Vec<DeviceState>, &[u8]), StoreError> {
    let n = *b.first().ok_or_else(|| unavailable("corrupt record: no device count"))?;
    let mut rest = &b[1..];
    let mut devices = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (device, tail) = str8(rest)?;
        devices.push(DeviceState {
            device: device.to_string(),
            position: u64_at(tail, 0)?,
            last_seen_ms: u64_at(tail, 8)?,
        });
        rest = &tail[16..];
    }
    Ok((devices, rest))
}

/// A byte string with a length byte, and the rest.
fn str8(b: &[u8]) -> Result<(&str, &[u8]), StoreError> {
    let n = *b.first().ok_or_else(|| unavailable("corrupt record: no length"))? as usize;
    let s = b.get(1..1 + n).ok_or_else(|| unavailable("corrupt record: short string"))?;
    let s = std::str::from_utf8(s).map_err(|_| unavailable("corrupt record: not UTF-8"))?;
    Ok((s, &b[1 + n..]))
}

/// Counts into `rec` the messages of `user` after `head`, those written
/// into `msgs` since the user's record was (at most [`RECORD_LAG`], unless
/// the store was written by a version that kept no lag), and returns the
/// head they lead to.
fn catch_up(msgs: &Keyspace, user: &str, head: u64, rec: &mut InboxRec) -> Result<u64, StoreError> {
    let mut head = head;
    if head == u64::MAX {
        return Ok(head);
    }
    for kv in msgs.range(msg_key(user, head + 1)..=msg_key(user, u64::MAX)) {
        let (k, v) = kv.into_inner().map_err(unavailable)?;
        let (_, _, from, payload) = value_parts(&v)?;
        head = u64_at(&k, k.len() - 8)?;
        // A record that held no message starts at the first one found past
        // it (the one before may have been dropped unwritten).
        if rec.messages == 0 {
            rec.first_seq = head;
        }
        rec.messages += 1;
        rec.bytes += record_bytes(user, from, payload.len());
    }
    Ok(head)
}

/// The `inboxes` record of one user, without the head it is stored with
/// (`encode` takes it, `decode` gives it back).
#[derive(Clone, Debug, Default, PartialEq)]
struct InboxRec {
    first_seq: u64,
    messages: u64,
    bytes: u64,
    devices: Vec<DeviceState>,
}

impl InboxRec {
    fn empty(head: u64) -> Self {
        InboxRec { first_seq: head + 1, ..InboxRec::default() }
    }

    /// The record, then `head`: one write moves both.
    fn encode(&self, head: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(33 + self.devices.len() * 24);
        v.extend_from_slice(&self.first_seq.to_be_bytes());
        v.extend_from_slice(&self.messages.to_be_bytes());
        v.extend_from_slice(&self.bytes.to_be_bytes());
        put_devices(&mut v, &self.devices);
        v.extend_from_slice(&head.to_be_bytes());
        v
    }

    /// The record, and its head if it has one: records written before the
    /// head moved into them end after the devices, and their head is in
    /// `heads`.
    fn decode(b: &[u8]) -> Result<(Self, Option<u64>), StoreError> {
        let (devices, rest) = take_devices(b.get(24..).ok_or_else(|| unavailable("corrupt inbox record"))?)?;
        let r = InboxRec { first_seq: u64_at(b, 0)?, messages: u64_at(b, 8)?, bytes: u64_at(b, 16)?, devices };
        let head = match rest.len() {
            0 => None,
            8 => Some(u64_at(rest, 0)?),
            _ => return Err(unavailable("corrupt inbox record: trailing bytes")),
        };
        Ok((r, head))
    }
}

/// One user's head and `inboxes` record, as they are now: the record on
/// disk with the messages appended after it was written counted in
/// ([`DiskStore::load`]).
#[derive(Clone)]
struct Cached {
    /// The user's head: the last seq given out.
    head: u64,
    /// The head as fjall has it: every seq above it is a hot message
    /// (hotlog.rs), every seq at or below it is in `msgs` or was dropped.
    /// The `inboxes` record carries this one, never `head`.
    fhead: u64,
    /// The user's record, counting the messages in `msgs` only (the hot
    /// ones are counted in [`HotUser`]).
    rec: InboxRec,
    /// The head the user's `inboxes` record on disk carries (`None`: the
    /// user has no record). A message written into `msgs` writes the
    /// record too only when this is `None` or [`RECORD_LAG`] behind.
    rec_head: Option<u64>,
}

impl Cached {
    /// The user's `inboxes` record as it is now, to write into fjall;
    /// `rec_head` takes the head it carries.
    fn record_to_write(&mut self) -> Vec<u8> {
        self.rec_head = Some(self.fhead);
        self.rec.encode(self.fhead)
    }

    /// The highest seq every known device of the user has acknowledged
    /// (0 with no device: nothing is acknowledged then).
    fn acked(&self) -> u64 {
        super::acked_by_all(&self.rec.devices)
    }

    /// Hot message `seq`, the oldest one, was dropped: fjall's head moves
    /// past it, and so does the first seq kept if fjall holds none.
    fn dropped_hot(&mut self, seq: u64) {
        self.fhead = seq;
        if self.rec.messages == 0 {
            self.rec.first_seq = seq + 1;
        }
    }
}

/// Where a slice of the retention pass starts in a keyspace.
type KeyFrom = Bound<Vec<u8>>;

/// Where a retention pass run in slices goes on ([`Store::expire_slice`]).
enum ExpireAt {
    /// Resolving the hot messages appended before the pass started: until
    /// this many entries of the append order were ever taken.
    Hot(u64),
    /// Walking `inboxes`, from this user key on: `Included` to go on with
    /// a user who had more to drop than the last slice could.
    Users(KeyFrom),
    /// The users are done; old dedup entries are left, from this
    /// `dedup_time` key on (a slice starts after the last one it dropped,
    /// not among the tombstones of those).
    Dedup(KeyFrom),
}

/// One hot message: appended, in the hot log, not in `msgs` (yet).
struct HotMsg {
    seq: u64,
    /// The epoch it was appended in.
    epoch: u64,
    /// What it costs, as [`record_bytes`].
    bytes: u64,
    /// Its `msgs` value.
    value: Box<[u8]>,
}

/// One user's hot messages, in seq order, all above the user's `fhead`.
struct HotUser {
    /// The user's key, as [`user_key`].
    key: Arc<[u8]>,
    msgs: VecDeque<HotMsg>,
    bytes: u64,
    /// Entries of [`Hot::order`] that name this slot: the slot (and the
    /// user's entry in [`Hot::users`]) goes once none is left, so that an
    /// entry never names a slot another user took since.
    named: u32,
}

/// The hot tier: the log, and in RAM what it holds that is not resolved.
struct Hot {
    log: HotLog,
    /// User key → the user's slot in `slots`.
    users: hashbrown::HashMap<Arc<[u8]>, usize>,
    /// The users with hot messages, or with entries in `order`. Why slots:
    /// resolving a message in append order then finds its user without
    /// hashing and comparing the key, and an entry of `order` holds no
    /// reference count to touch (`perf annotate` of the `store_hot` bench
    /// had most of the append's own time on those atomics, and resolving
    /// took five to seven lookups of a key no longer in cache).
    slots: slab::Slab<HotUser>,
    /// Every hot message in append order: (user slot, seq, the store's
    /// clock at the append). Entries of messages resolved out of this
    /// order (by a rotation or a retention pass) are skipped when met.
    order: VecDeque<(usize, u64, u64)>,
    /// Entries ever taken off the front of `order`.
    popped: u64,
    /// Entries at the back of `order` appended since the hot log was last
    /// written. Their dedup entries wait in `unlogged_dedup` until the
    /// sync writes them after the log, and the next open writes the dedup
    /// entries of every logged message: so one is resolved into fjall
    /// only once it is in the log (`resolve_next`, `rotate`). Resolved
    /// before (past the RAM bound, within the batch that appended it), a
    /// message whose fjall journal reached the kernel survived a crash
    /// without its dedup entry, and its sender's retry was stored again.
    unlogged: usize,
    /// RAM of the hot messages, as [`hot_ram`].
    ram: u64,
    /// [`HOT_MAX_BYTES`], but in tests.
    max_bytes: u64,
    /// Users whose record in fjall is behind their cached state: their
    /// `fhead` moved past it by dropping a message, or their devices moved
    /// ([`DiskStore::set_positions_now`]). Each rotation logs their
    /// `fhead` and devices in the new file before the previous file goes,
    /// until their record is written (with a device's login, the retention
    /// pass, every [`RECORD_LAG`] messages into `msgs`, or before their
    /// cache entry is dropped). Only cached users are dirty. The value is
    /// the generation of the hot log file the user's state was last
    /// logged in (`None`: not since a drop moved its `fhead`): a rotation
    /// skips the users logged in the file it ends, which outlives the
    /// file it deletes, so users whose devices keep moving cost it
    /// nothing (with 65,536 dirty users a rotation that logged them all
    /// took 50–80 ms of the store thread, a test not kept). Those logged
    /// in the file the last rotation ended, and not since, have their
    /// records written a slice per `sync`
    /// ([`DiskStore::write_idle_records`]), walking the map in its order
    /// from `idle_at`.
    dirty: indexmap::IndexMap<Arc<[u8]>, Option<u64>, hashbrown::DefaultHashBuilder>,
    /// Where [`DiskStore::write_idle_records`] goes on in `dirty` (0 at
    /// each rotation). A removal elsewhere moves the last entry into its
    /// place, which the walk may so miss this epoch: the rotation logs it
    /// then.
    idle_at: usize,
    /// The epoch appended to now; a rotation resolves the one before.
    epoch: u64,
    /// When the current epoch started, on the store's clock; `None` until
    /// the first append after open.
    started_ms: Option<u64>,
    /// Hot messages of the epochs before the current one: the epoch ends
    /// only once there is none (so that ending it resolves nothing at
    /// once), or once its file is [`hotlog::EPOCH_BYTES`] long.
    previous_left: u64,
    /// Hot messages of the current epoch.
    current: u64,
    /// When fjall's journal was last `fdatasync`ed.
    fjall_synced: Instant,
    /// The file of the epoch before the previous one, deleted at the next
    /// `sync`: once the heads logged in the new file and fjall's writes of
    /// its messages are durable.
    to_delete: Option<u64>,
    /// The oldest hot log file not deleted (`DiskStore::mark_hot_files`).
    files_low: u64,
}

impl Hot {
    /// User `uk`'s hot messages, if it has a slot.
    fn user(&self, uk: &[u8]) -> Option<&HotUser> {
        self.users.get(uk).map(|&slot| &self.slots[slot])
    }

    /// A new, empty slot for the user of key `key` (who has none).
    fn slot_for(&mut self, key: Arc<[u8]>) -> usize {
        let slot = self.slots.insert(HotUser { key: key.clone(), msgs: VecDeque::new(), bytes: 0, named: 0 });
        self.users.insert(key, slot);
        slot
    }

    /// Takes the oldest hot message of the user in `slot` out of RAM (its
    /// entry in `order` stays: met later, it names a message no longer
    /// there, and is skipped).
    fn pop_front(&mut self, slot: usize) -> Option<HotMsg> {
        let h = &mut self.slots[slot];
        let m = h.msgs.pop_front()?;
        h.bytes -= m.bytes;
        if m.epoch < self.epoch {
            self.previous_left -= 1;
        } else {
            self.current -= 1;
        }
        self.ram -= hot_ram(&m);
        Some(m)
    }

    /// An entry of `order` naming `slot` was taken (and its message
    /// resolved): frees the slot once nothing names it. Its messages are
    /// then all resolved, as each one's entry comes after it is appended;
    /// a slot still holding some (only after a failed resolve, which
    /// stops the store) is kept.
    fn unname(&mut self, slot: usize) {
        let h = &mut self.slots[slot];
        h.named -= 1;
        if h.named == 0 && h.msgs.is_empty() {
            let h = self.slots.remove(slot);
            self.users.remove(&h.key[..]);
        }
    }
}

/// The inbox store on disk. See the module doc for the layout and costs.
pub struct DiskStore {
    db: Database,
    heads: Keyspace,
    inboxes: Keyspace,
    msgs: Keyspace,
    dedup: Keyspace,
    dedup_time: Keyspace,
    durability: Durability,
    limits: StoreLimits,
    /// Bytes kept over all inboxes, as [`record_bytes`].
    total_bytes: u64,
    /// Messages kept over all inboxes (counted at open, then kept up).
    total_messages: u64,
    /// [`Store::expired_unacknowledged`], since this open.
    expired_unacknowledged: u64,
    /// user key → head and record, mirroring fjall (module doc). An append
    /// moves its entry to the new head before committing (a failed commit
    /// stops the store); a device change updates it after its write.
    cache: hashbrown::HashMap<Vec<u8>, Cached>,
    cache_users: usize,
    /// With [`Durability::Os`], the thread that starts the journal's
    /// writeback (`writeback.rs`: why).
    _writeback: Option<super::writeback::JournalWriteback>,
    /// The thread that frees flushed memtables outside fjall's locks
    /// (`reaper.rs`: why).
    _reaper: Option<super::reaper::MemtableReaper>,
    /// The retention pass under way, if it runs in slices.
    expire_at: Option<ExpireAt>,
    /// Whether `dedup` may still hold entries in the form versions before
    /// 2026-12-05 wrote ([`legacy_dedup_key`]): the oldest entry was of
    /// that form at open or after the last retention slice. While it may,
    /// a user's SEND whose key is not found is looked up in that form too,
    /// so that a SEND retried across the upgrade (the restart drops the
    /// connections, and clients retry what was not answered) is not
    /// stored twice. Not for an application's push (sender ""): that form
    /// named no recipient, and an application numbers its keys per user.
    legacy_dedup: bool,
    /// The dedup entries of the appends since the last `sync`, written to
    /// fjall only once the hot log holds their messages (`sync_now`).
    /// Written at the append, an entry could reach the disk before its
    /// message: fjall's journal goes to the kernel whenever its buffer
    /// fills, and a crash before the sync then left an entry naming a seq
    /// that was lost (and given again to the next message), so that the
    /// sender's retry of the SEND nobody acknowledged was answered as a
    /// duplicate and never stored. One batch's entries at most.
    unlogged_dedup: hashbrown::HashMap<Vec<u8>, UnloggedDedup>,
    /// Hot messages resolved into `msgs` since fjall's journal was last
    /// synced, and heads logged in the hot log since its last flush: a
    /// logged head may cover such a message (`write_through_log` says
    /// why that matters).
    resolved_unsynced: bool,
    heads_logged: bool,
    /// With `fsync`: fjall's journal was written since its last sync
    /// ([`Store::unsynced_since`]).
    fjall_unsynced: bool,
    /// The messages of the last two epochs (hotlog.rs).
    hot: Hot,
    /// Why the store stopped: the I/O error of its first failed write
    /// ([`DiskStore::guard`]); `None` while it runs.
    stopped: Option<String>,
    /// The directory, tuning and shard count it was opened with
    /// ([`Store::reopener`]).
    opened_with: (PathBuf, DiskTuning, usize),
}

impl DiskStore {
    /// Opens (or creates) the store in directory `path`. Reads every
    /// `inboxes` record once, and the messages appended past it, to sum
    /// the bytes kept.
    pub fn open(path: impl AsRef<Path>, durability: Durability, limits: StoreLimits) -> Result<Self, StoreError> {
        Self::open_tuned(path, durability, limits, DiskTuning::default())
    }

    /// Flushed memtables the reaper thread has freed (`reaper.rs`).
    #[cfg(test)]
    pub(super) fn memtables_reaped(&self) -> u64 {
        self._reaper.as_ref().map_or(0, |r| r.freed())
    }

    /// [`DiskStore::open`] with the engine sized by `tuning` instead of
    /// the defaults.
    pub fn open_tuned(
        path: impl AsRef<Path>,
        durability: Durability,
        limits: StoreLimits,
        tuning: DiskTuning,
    ) -> Result<Self, StoreError> {
        Self::open_shard(path, durability, limits, tuning, 1)
    }

    /// Whether a store (of one shard) exists in directory `path`: fjall
    /// writes its `version` file when it creates a database, before
    /// anything else of ours is written there.
    pub fn exists_in(path: &Path) -> bool {
        path.join("version").exists()
    }

    /// [`DiskStore::open_tuned`] for one of `of` shards
    /// (`shards.rs`): its block cache, user cache and hot messages get an
    /// `of`-th of [`CACHE_BYTES`], [`CACHED_USERS`] and [`HOT_MAX_BYTES`],
    /// so that the shards together take what one store would. Refuses the
    /// directory of a sharded store (its shards are in directories of
    /// their own).
    pub fn open_shard(
        path: impl AsRef<Path>,
        durability: Durability,
        limits: StoreLimits,
        tuning: DiskTuning,
        of: usize,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if path.join(super::shards::SHARDS_FILE).exists() {
            return Err(unavailable(format!(
                "{} holds a sharded store: open it with its shards (store::open_store_shards)",
                path.display()
            )));
        }
        let of = of.max(1);
        std::fs::create_dir_all(path).map_err(|e| unavailable(format!("cannot create {}: {e}", path.display())))?;
        let db = Database::builder(path)
            .manual_journal_persist(true)
            // fjall panics below its floor; the config check refuses it first.
            .max_journaling_size(tuning.max_journal_bytes.max(MIN_JOURNAL_MIB << 20))
            .cache_size(CACHE_BYTES / of as u64)
            .max_cached_files(Some(cached_files_per_shard(of)))
            .worker_threads(ENGINE_THREADS)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => unavailable(format!(
                    "{} is in use by another process (one server per store directory: give this one its own \
                     store.path / --data-dir, or stop the other first)",
                    path.display()
                )),
                // Found by an outside review: the bare NotFound named no file.
                e if Self::exists_in(path) && !path.join("lock").exists() => unavailable(format!(
                    "cannot open {}: its file `lock` is missing ({e}); the store made it when it was created, and \
                     an empty file of that name in the directory restores it",
                    path.display()
                )),
                e => unavailable(format!("cannot open {}: {e}", path.display())),
            })?;
        let ks = |name: &str| {
            db.keyspace(name, || KeyspaceCreateOptions::default().max_memtable_size(tuning.write_buffer_bytes))
                .map_err(unavailable)
        };
        let (heads, inboxes, msgs, dedup, dedup_time) =
            (ks("heads")?, ks("inboxes")?, ks("msgs")?, ks("dedup")?, ks("dedup_time")?);
        let reaper = super::reaper::MemtableReaper::start(vec![
            heads.clone(),
            inboxes.clone(),
            msgs.clone(),
            dedup.clone(),
            dedup_time.clone(),
        ]);
        let (log, recovery) = HotLog::open(path, durability == Durability::Fsync)?;
        let mut store = DiskStore {
            db,
            heads,
            inboxes,
            msgs,
            dedup,
            dedup_time,
            durability,
            limits,
            total_bytes: 0,
            total_messages: 0,
            expired_unacknowledged: 0,
            cache: hashbrown::HashMap::new(),
            cache_users: (CACHED_USERS / of).max(1),
            _writeback: match durability {
                Durability::Os => super::writeback::JournalWriteback::start(path),
                Durability::Fsync => None,
            },
            _reaper: reaper,
            expire_at: None,
            legacy_dedup: false,
            unlogged_dedup: hashbrown::HashMap::new(),
            resolved_unsynced: false,
            fjall_unsynced: false,
            heads_logged: false,
            hot: Hot {
                log,
                users: hashbrown::HashMap::new(),
                slots: slab::Slab::new(),
                order: VecDeque::new(),
                unlogged: 0,
                popped: 0,
                ram: 0,
                max_bytes: HOT_MAX_BYTES / of as u64,
                dirty: indexmap::IndexMap::default(),
                idle_at: 0,
                epoch: 0,
                started_ms: None,
                previous_left: 0,
                current: 0,
                fjall_synced: Instant::now(),
                to_delete: None,
                files_low: 0,
            },
            stopped: None,
            opened_with: (path.to_path_buf(), tuning, of),
        };
        store.check_hot_files(&recovery)?;
        store.recover(&recovery)?;
        // What the found files held is in fjall now; the current file is
        // the only one needed from here, and that must be durable before
        // they go.
        let current = store.hot.log.generation();
        store.hot.files_low = current;
        store.mark_hot_files(current, current)?;
        store.persist_fjall(match durability {
            Durability::Fsync => PersistMode::SyncData,
            Durability::Os => PersistMode::Buffer,
        })?;
        store.hot.log.drop_recovered(&recovery)?;
        store.legacy_dedup = store.oldest_dedup_is_legacy()?;
        for kv in store.inboxes.iter() {
            let (uk, v) = kv.into_inner().map_err(unavailable)?;
            let user = store.caught_up(&uk, Some(InboxRec::decode(&v)?))?;
            store.total_bytes += user.rec.bytes;
            store.total_messages += user.rec.messages;
        }
        Ok(store)
    }

    /// Keeps at most `users` users in the cache (tests: a tiny cache, so
    /// that entries are dropped and filled again all the time).
    #[cfg(test)]
    pub(crate) fn set_cached_users(&mut self, users: usize) {
        self.cache_users = users.max(1);
        self.cache.clear();
    }

    /// Tests: writes `user`'s state as versions before the head moved
    /// into the `inboxes` record did: the head in `heads`, and a record of
    /// no messages and these devices (none: no record) ending after them.
    #[cfg(test)]
    pub(crate) fn write_record_without_head(&mut self, user: &str, head: u64, devices: &[DeviceState]) {
        let uk = user_key(user);
        self.heads.insert(uk.as_slice(), head.to_be_bytes().to_vec()).unwrap();
        if !devices.is_empty() {
            let rec = InboxRec { devices: devices.to_vec(), ..InboxRec::empty(head) };
            let mut v = rec.encode(head);
            v.truncate(v.len() - 8);
            self.inboxes.insert(uk.as_slice(), v).unwrap();
        }
        self.cache.remove(&uk);
    }

    /// Tests: writes a dedup entry as versions before 2026-12-05 did
    /// ([`legacy_dedup_key`]: the sender and client id, no recipient).
    #[cfg(test)]
    pub(crate) fn write_legacy_dedup(&mut self, from: &str, client_id: u64, seq: u64, msg_id: u64, ts_ms: u64) {
        let mut batch = self.db.batch();
        self.put_dedup(&mut batch, &legacy_dedup_key(from, client_id), seq, msg_id, ts_ms);
        batch.commit().unwrap();
    }

    /// Tests: `sync` up to the hot log's write, where a crash may stop it.
    #[cfg(test)]
    pub(crate) fn sync_through_the_log(&mut self) {
        self.write_through_log().unwrap();
    }

    /// Tests: a smaller bound on the hot messages than [`HOT_MAX_BYTES`].
    #[cfg(test)]
    pub(crate) fn set_hot_max_bytes(&mut self, bytes: u64) {
        self.hot.max_bytes = bytes;
    }

    /// Tests: the RAM of the hot messages, as [`hot_ram`].
    #[cfg(test)]
    pub(crate) fn hot_ram(&self) -> u64 {
        self.hot.ram
    }

    /// Tests: bytes appended to the hot log's current file.
    #[cfg(test)]
    pub(crate) fn hot_log_bytes(&self) -> u64 {
        self.hot.log.bytes()
    }

    /// Tests: users with a hot slot, slots taken, entries in the append
    /// order.
    #[cfg(test)]
    pub(crate) fn hot_slots(&self) -> (usize, usize, usize) {
        (self.hot.users.len(), self.hot.slots.len(), self.hot.order.len())
    }

    /// Bytes kept over all inboxes (as [`record_bytes`]).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Bytes the database takes on disk (journals, tables, hot log).
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.db.disk_space().map_err(unavailable)? + self.hot.log.disk_bytes())
    }

    /// A user's head and record: the cache's, else its `inboxes` record
    /// read and caught up ([`DiskStore::caught_up`]).
    fn load(&self, uk: &[u8]) -> Result<Cached, StoreError> {
        if let Some(c) = self.cache.get(uk) {
            return Ok(c.clone());
        }
        let stored = match self.inboxes.get(uk).map_err(unavailable)? {
            Some(v) => Some(InboxRec::decode(&v)?),
            None => None,
        };
        self.caught_up(uk, stored)
    }

    /// A user's head and record from its `inboxes` record as decoded
    /// (`None`: it has none), with the messages appended past the record
    /// counted in. The record's head is the one it carries, else (no
    /// record, or one from before the head moved into it) the one in
    /// `heads` (0 if none).
    fn caught_up(&self, uk: &[u8], stored: Option<(InboxRec, Option<u64>)>) -> Result<Cached, StoreError> {
        let (rec, head) = stored.map_or((None, None), |(rec, head)| (Some(rec), head));
        let written = self.head_beside(uk, head)?;
        let rec_head = rec.is_some().then_some(written);
        let mut rec = rec.unwrap_or_else(|| InboxRec::empty(written));
        let (user, _) = str8(uk)?;
        let fhead = catch_up(&self.msgs, user, written, &mut rec)?;
        let head = self.hot.user(uk).and_then(|h| h.msgs.back()).map_or(fhead, |m| m.seq.max(fhead));
        Ok(Cached { head, fhead, rec, rec_head })
    }

    /// The head a record carried (`in_record`), else the one kept in
    /// `heads` (0 if none).
    fn head_beside(&self, uk: &[u8], in_record: Option<u64>) -> Result<u64, StoreError> {
        if let Some(h) = in_record {
            return Ok(h);
        }
        Ok(match self.heads.get(uk).map_err(unavailable)? {
            Some(v) => u64_at(&v, 0)?,
            None => 0,
        })
    }

    /// A user's head alone.
    fn head(&self, uk: &[u8]) -> Result<u64, StoreError> {
        match self.cache.get(uk) {
            Some(c) => Ok(c.head),
            None => Ok(self.load(uk)?.head),
        }
    }

    /// The cache entry of `uk`, read from fjall first if it has none (and
    /// an arbitrary other entry dropped if the cache is full).
    fn entry(&mut self, uk: &[u8]) -> Result<&mut Cached, StoreError> {
        if !self.cache.contains_key(uk) {
            let loaded = self.load(uk)?;
            if self.cache.len() >= self.cache_users {
                if let Some(k) = self.cache.keys().next().cloned() {
                    let gone = self.cache.remove(&k).expect("a key of the cache");
                    if self.hot.dirty.swap_remove(&k[..]).is_some() {
                        // Its record is behind its state (a head a drop
                        // moved, devices' moves the hot log holds): read
                        // back without them, the head would go back, and
                        // the moves be lost once their file goes.
                        self.inboxes.insert(k.as_slice(), gone.rec.encode(gone.fhead)).map_err(unavailable)?;
                    }
                }
            }
            self.cache.insert(uk.to_vec(), loaded);
        }
        Ok(self.cache.get_mut(uk).expect("filled above"))
    }

    /// Applies a device change to the user's record (ids checked).
    fn with_devices<R>(
        &mut self,
        user: &str,
        f: impl FnOnce(&mut Vec<DeviceState>, u64) -> R,
    ) -> Result<(R, u64), StoreError> {
        let uk = user_key(user);
        let mut c = self.load(&uk)?;
        let r = f(&mut c.rec.devices, c.head);
        let head = c.head;
        self.write_devices(&uk, c)?;
        Ok((r, head))
    }

    /// [`Store::forget_device`] (ids checked): the record without the
    /// device, written as a login's is; nothing written for a device the
    /// record does not know.
    fn forget_device_now(&mut self, user: &str, device: &str) -> Result<bool, StoreError> {
        let uk = user_key(user);
        let mut c = self.load(&uk)?;
        if !super::forget_device(&mut c.rec.devices, device) {
            return Ok(false);
        }
        // The hot log may hold a head that lists the device (a move of
        // it): the next open takes the last logged head of a user as its
        // devices, so one without it goes after. Otherwise, forgotten and
        // logged in again (a new device, at 0) in the millisecond of that
        // move, the device got the move's position back at the next open,
        // and skipped the messages up to it (its last-seen time the same,
        // the move could not be told from a newer one).
        self.drop_acknowledged(&uk, &mut c);
        self.hot.log.append_head(user, c.fhead, &c.rec.devices);
        self.heads_logged = true;
        self.write_record(&uk, c)?;
        Ok(true)
    }

    /// Writes user `uk`'s record `c` after its devices changed, dropping
    /// first the hot messages they all have acknowledged now.
    fn write_devices(&mut self, uk: &[u8], mut c: Cached) -> Result<(), StoreError> {
        self.drop_acknowledged(uk, &mut c);
        self.write_record(uk, c)
    }

    /// Writes user `uk`'s record `c` into fjall and the cache.
    fn write_record(&mut self, uk: &[u8], c: Cached) -> Result<(), StoreError> {
        self.inboxes.insert(uk, c.rec.encode(c.fhead)).map_err(unavailable)?;
        self.record_written(uk, c.rec, c.fhead);
        Ok(())
    }

    /// Drops the oldest hot messages of user `uk` (whose state `c` is
    /// about to be written as its record) that every known device of the
    /// user has acknowledged, and moves `c`'s fhead past them, as
    /// resolving them an epoch later would. Why now: acknowledged within
    /// a round trip, they would otherwise take RAM for two to four
    /// seconds (at 50,000 msgs/s, over a hundred thousand of them), and
    /// resolving each then looked the user up again. The record written
    /// with the acknowledgement carries the new fhead, so no head is
    /// logged for it at the next rotation. If that write fails the store
    /// stops, and the next open takes these messages back from the log.
    fn drop_acknowledged(&mut self, uk: &[u8], c: &mut Cached) {
        if let Some(&slot) = self.hot.users.get(uk) {
            self.drop_acknowledged_in(slot, c);
        }
    }

    /// [`DiskStore::drop_acknowledged`] of the user in hot slot `slot`.
    fn drop_acknowledged_in(&mut self, slot: usize, c: &mut Cached) {
        let acked = c.acked();
        while self.hot.slots[slot].msgs.front().is_some_and(|m| m.seq <= acked) {
            let m = self.hot.pop_front(slot).expect("looked at above");
            self.total_bytes -= m.bytes;
            self.total_messages -= 1;
            c.dropped_hot(m.seq);
        }
    }

    /// After `uk`'s record `rec` (carrying `fhead`) was written to fjall
    /// whole: nothing of it waits for a write any more, and a cached
    /// entry takes it.
    fn record_written(&mut self, uk: &[u8], rec: InboxRec, fhead: u64) {
        self.hot.dirty.swap_remove(uk);
        if let Some(c) = self.cache.get_mut(uk) {
            c.fhead = fhead;
            c.rec = rec;
            c.rec_head = Some(fhead);
        }
    }

    /// [`Store::set_positions`] for the entries of `out` still `Ok`: every
    /// user's record is read once (from the cache or fjall) and takes all
    /// of its devices' moves. A cached user whose devices were all known
    /// then has its `fhead` and devices logged in the hot log (one record)
    /// and becomes dirty; the others' records are written to fjall, all in
    /// one batch. Why one batch: the workers hand over a tick's positions
    /// at once, up to one per device, and a batch each was a `write(2)` to
    /// fjall's journal each: 3,257 journal writes in one second of the
    /// store thread (strace, 40,000 reliable msgs/s over 4,000 devices,
    /// `os`), 42 with one batch per turn. One record per user also keeps a
    /// user that is not cached from being read twice from fjall in one
    /// batch, the second read missing the first move.
    ///
    /// Why the hot log for cached users: each move written to fjall was a
    /// new version of the user's record in the `inboxes` memtable, found
    /// by a skiplist search: with 19,000 device connections at 30,000
    /// msgs/s, positions were 29% of the store's requests and 30% of its
    /// thread's samples (`WriteBatch::commit` 13%), and the record
    /// versions filled fjall's write buffer. Measured there (`os`, 2
    /// workers, `switchboard-bench unicast --connections 19000 --device d
    /// --rate 30000 --duration-s 30`, three pairs alternated with the build
    /// before): p99 25.2 / 23.7 / 22.2 ms became 19.3 / 17.4 / 12.3 ms, the
    /// store thread 18.3 / 17.8 / 17.6% of a core 15.9 / 14.7 / 12.9%, and
    /// the server's peak RSS 131 MB 78 MB. A position of a device the
    /// record does not know is dropped (only a login adds one, and a login
    /// writes the record to fjall): a logged move applies at the next open
    /// only to a device the record in fjall knows, so that a device dropped
    /// since (a login past [`super::MAX_DEVICES_PER_USER`], the retention
    /// pass) does not come back from an older file.
    fn set_positions_now(
        &mut self,
        positions: &[(&str, &str, u64)],
        now_ms: u64,
        out: &mut [Result<(), StoreError>],
    ) -> Result<(), StoreError> {
        // Each user's state, and whether its record goes to fjall now.
        let mut users: hashbrown::HashMap<Vec<u8>, (Cached, bool)> = hashbrown::HashMap::new();
        for (&(user, device, seq), r) in positions.iter().zip(out.iter_mut()) {
            if r.is_err() {
                continue;
            }
            let uk = user_key(user);
            // Looked up before the key moves into `users`: no clone of
            // it, one lookup per map.
            let hot_slot = self.hot.users.get(&uk[..]).copied();
            let (c, _) = match users.entry(uk) {
                hashbrown::hash_map::Entry::Occupied(e) => e.into_mut(),
                hashbrown::hash_map::Entry::Vacant(e) => match self.load(e.key()) {
                    // Only a cached user's moves can wait in the hot log
                    // (a user is dirty only while cached).
                    Ok(c) => {
                        let cached = self.cache.contains_key(e.key());
                        e.insert((c, !cached))
                    }
                    // A write stops the store; anything else (a record
                    // that does not decode) fails this user's moves only.
                    Err(err @ StoreError::Unavailable(_)) => return Err(err),
                    Err(err) => {
                        *r = Err(err);
                        continue;
                    }
                },
            };
            // A device the record does not know stays unknown: only a
            // login adds one (`move_device`). So every move logged in the
            // hot log is of a device fjall's record knows, the only ones a
            // logged move applies to at the next open.
            if !c.rec.devices.iter().any(|d| d.device == device) {
                continue;
            }
            advance_device(&mut c.rec.devices, device, seq, c.head, now_ms);
            // After each move, as moves written one by one would.
            if let Some(slot) = hot_slot {
                self.drop_acknowledged_in(slot, c);
            }
        }
        let mut batch = self.db.batch();
        let mut written = Vec::new();
        for (uk, (c, to_fjall)) in users {
            if to_fjall {
                batch.insert(&self.inboxes, uk.as_slice(), c.rec.encode(c.fhead));
                written.push((uk, c));
                continue;
            }
            // Logged instead: at the next `sync` as durable as an append
            // (with `fsync`, more than fjall's journal), and logged again
            // by rotations until the record is written.
            let (user, _) = str8(&uk)?;
            self.hot.log.append_head(user, c.fhead, &c.rec.devices);
            self.heads_logged = true;
            let logged_in = Some(self.hot.log.generation());
            match self.hot.dirty.get_mut(&uk[..]) {
                Some(g) => *g = logged_in,
                None => {
                    self.hot.dirty.insert(Arc::from(&uk[..]), logged_in);
                }
            }
            let e = self.cache.get_mut(&uk[..]).expect("a user whose moves are logged is cached");
            e.fhead = c.fhead;
            e.rec = c.rec;
        }
        if written.is_empty() {
            return Ok(());
        }
        batch.commit().map_err(unavailable)?;
        for (uk, c) in written {
            self.record_written(&uk, c.rec, c.fhead);
        }
        Ok(())
    }

    /// The retention pass for one user, whose head and record are `state`
    /// (the cache's, or its record caught up): drops at most `most`
    /// messages, and returns how many and whether that was all the user
    /// had to drop. Also brings a record that lags its messages up to
    /// date.
    fn expire_user(
        &mut self,
        uk: &[u8],
        user: &str,
        state: Cached,
        now_ms: u64,
        most: u64,
    ) -> Result<(u64, bool), StoreError> {
        let Cached { fhead, mut rec, rec_head, .. } = state;
        let ttl_ms = self.limits.ttl_ms;
        let before = rec.clone();
        let acked = expire_devices(&mut rec.devices, ttl_ms, now_ms);
        let mut batch = self.db.batch();
        let mut dropped = 0;
        let mut whole = true;
        // The oldest message kept (seqs in `msgs` may have gaps: a
        // rotation drops acknowledged hot messages without writing them).
        let mut first_kept = None;
        for kv in self.msgs.range(msg_key(user, rec.first_seq)..=msg_key(user, u64::MAX)) {
            let (k, v) = kv.into_inner().map_err(unavailable)?;
            let seq = u64_at(&k, k.len() - 8)?;
            let (ts_ms, expires_ms, from, payload) = value_parts(&v)?;
            if seq > acked && !expired(ts_ms, ttl_ms, now_ms) && !own_expiry_passed(expires_ms, now_ms) {
                first_kept = Some(seq);
                break;
            }
            if dropped == most {
                whole = false;
                first_kept = Some(seq);
                break;
            }
            let bytes = record_bytes(user, from, payload.len());
            batch.remove(&self.msgs, k);
            rec.messages -= 1;
            rec.bytes -= bytes;
            self.total_bytes -= bytes;
            self.total_messages -= 1;
            self.expired_unacknowledged += u64::from(seq > acked);
            dropped += 1;
        }
        rec.first_seq = first_kept.unwrap_or(fhead + 1);
        // Read again at the user's next append (its record is written
        // below if it is behind).
        self.cache.remove(uk);
        // Dirty: fjall's record is behind the cached one (a head a drop
        // moved, or device moves the hot log holds): written below.
        let dirty = self.hot.dirty.swap_remove(uk).is_some();
        if rec.messages == 0 && rec.devices.is_empty() {
            // The head outlives the record: seqs never go back.
            batch.insert(&self.heads, uk, fhead.to_be_bytes().to_vec());
            batch.remove(&self.inboxes, uk);
        } else if dirty || rec != before || rec_head != Some(fhead) {
            batch.insert(&self.inboxes, uk, rec.encode(fhead));
        }
        batch.commit().map_err(unavailable)?;
        Ok((dropped, whole))
    }

    /// The users' part of a retention slice, from `from` on: spends at
    /// most `budget` units (a user looked at, a message dropped) and
    /// returns the messages dropped, the units spent, and where the next
    /// slice starts if the users are not all done.
    fn expire_users(
        &mut self,
        from: KeyFrom,
        now_ms: u64,
        budget: usize,
    ) -> Result<(u64, usize, Option<KeyFrom>), StoreError> {
        let (mut dropped, mut spent) = (0, 0);
        // fjall iterators read a snapshot: the writes below do not disturb it.
        for kv in self.inboxes.range::<Vec<u8>, _>((from, Bound::Unbounded)) {
            let (uk, v) = kv.into_inner().map_err(unavailable)?;
            if spent >= budget {
                return Ok((dropped, spent, Some(Bound::Included(uk.to_vec()))));
            }
            let (user, _) = str8(&uk)?;
            let user = user.to_string();
            let state = match self.cache.get(&uk[..]) {
                Some(c) => c.clone(),
                None => self.caught_up(&uk, Some(InboxRec::decode(&v)?))?,
            };
            let most = (budget - spent - 1) as u64;
            let (n, whole) = self.expire_user(&uk, &user, state, now_ms, most.max(1))?;
            dropped += n;
            spent += 1 + n as usize;
            if !whole {
                // The rest of this user's messages in the next slice.
                return Ok((dropped, spent, Some(Bound::Included(uk.to_vec()))));
            }
        }
        Ok((dropped, spent, None))
    }

    /// The dedup part of a retention slice, from `from` on: drops at most
    /// `budget` entries older than the window, and returns where the next
    /// slice starts if some are left.
    fn expire_dedup(&mut self, from: KeyFrom, now_ms: u64, budget: usize) -> Result<Option<KeyFrom>, StoreError> {
        let window = self.limits.dedup_window_ms;
        let mut batch = self.db.batch();
        let mut next = None;
        // In time order: the old entries come first.
        for (spent, kv) in self.dedup_time.range::<Vec<u8>, _>((from, Bound::Unbounded)).enumerate() {
            if batch.len() >= EXPIRE_BATCH_WRITES {
                std::mem::replace(&mut batch, self.db.batch()).commit().map_err(unavailable)?;
            }
            let k = kv.key().map_err(unavailable)?;
            if !expired(u64_at(&k, 0)?, window, now_ms) {
                break;
            }
            if spent >= budget {
                next = Some(Bound::Included(k.to_vec()));
                break;
            }
            let dk = &k[8..];
            // Only the entry this time key was written with.
            if let Some(v) = self.dedup.get(dk).map_err(unavailable)? {
                if v.get(16..24) == k.get(..8) {
                    batch.remove(&self.dedup, dk.to_vec());
                }
            }
            batch.remove(&self.dedup_time, k.to_vec());
        }
        batch.commit().map_err(unavailable)?;
        if self.legacy_dedup {
            self.legacy_dedup = self.oldest_dedup_is_legacy()?;
        }
        Ok(next)
    }

    /// Whether the oldest dedup entry is in the form versions before
    /// 2026-12-05 wrote ([`DiskStore::legacy_dedup`]).
    fn oldest_dedup_is_legacy(&self) -> Result<bool, StoreError> {
        match self.dedup_time.first_key_value() {
            Some(kv) => Ok(is_legacy_dedup_key(kv.key().map_err(unavailable)?.get(8..).unwrap_or_default())),
            None => Ok(false),
        }
    }

    /// Writes the dedup entries of the appends since the last sync, whose
    /// messages the hot log now holds (and removes the time keys of the
    /// stale entries they replace).
    fn write_unlogged_dedup(&mut self) -> Result<(), StoreError> {
        if self.unlogged_dedup.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        let mut entries = std::mem::take(&mut self.unlogged_dedup);
        for (dk, u) in entries.drain() {
            if let Some(old) = u.stale {
                batch.remove(&self.dedup_time, dedup_time_key(old, &dk));
            }
            self.put_dedup(&mut batch, &dk, u.seq, u.msg_id, u.ts_ms);
        }
        self.unlogged_dedup = entries; // its allocation, for the next batch
        batch.commit().map_err(unavailable)
    }

    /// Adds to `batch` the dedup entry of `seq` appended at `ts_ms`, and
    /// its time key.
    fn put_dedup(&self, batch: &mut fjall::OwnedWriteBatch, dk: &[u8], seq: u64, msg_id: u64, ts_ms: u64) {
        batch.insert(&self.dedup_time, dedup_time_key(ts_ms, dk), Vec::new());
        let seen = [seq.to_be_bytes(), msg_id.to_be_bytes(), ts_ms.to_be_bytes()].concat();
        batch.insert(&self.dedup, dk, seen);
    }

    /// Runs a request that writes, unless the store has stopped; stops it
    /// if the request fails with an I/O error. Why stop rather than go on:
    /// the hot log's write that failed may have written part of a record
    /// (a disk that fills up takes what fits), and the next open stops
    /// reading the file there, so nothing written after it may be
    /// acknowledged; fjall refuses every write after a failed one (it
    /// "poisons" itself); and the RAM state of a request that failed
    /// half-way (a head moved, a hot message taken out to be written) no
    /// longer matches the disk. What was synced before is on disk, and the
    /// next open recovers it: the store thread opens the store again every
    /// few seconds ([`Store::reopener`]), which works once the cause (space,
    /// the device) is gone.
    fn guard<R>(&mut self, request: impl FnOnce(&mut Self) -> Result<R, StoreError>) -> Result<R, StoreError> {
        self.running()?;
        match request(self) {
            // A nested request that stopped the store said so already.
            Err(StoreError::Unavailable(e)) if self.stopped.is_none() => {
                tracing::error!(
                    error = %e,
                    "disk store: a write failed; the store serves nothing more until it is opened again \
                     (what was synced before is kept)"
                );
                self.stopped = Some(e);
                self.running().map(|()| unreachable!("stopped above"))
            }
            r => r,
        }
    }

    /// Ok while the store runs; the error of every request once it stopped.
    fn running(&self) -> Result<(), StoreError> {
        match &self.stopped {
            None => Ok(()),
            Some(e) => Err(unavailable(format!(
                "the disk store stopped at a failed write ({e}); it is opened again once the cause is gone \
                 (what was synced before is kept)"
            ))),
        }
    }

    fn persist_fjall(&mut self, mode: PersistMode) -> Result<(), StoreError> {
        self.db.persist(mode).map_err(unavailable)?;
        if mode == PersistMode::SyncData {
            self.hot.fjall_synced = Instant::now();
            self.resolved_unsynced = false;
            self.fjall_unsynced = false;
        } else {
            self.fjall_unsynced = self.durability == Durability::Fsync;
        }
        Ok(())
    }

    /// What an append does first: resolves up to `budget` of the hot
    /// messages that are `age_ms` old ([`hotlog::EPOCH_MS`] for an append,
    /// [`IDLE_RESOLVE_MS`] between requests; and the oldest ones past
    /// that, whatever the budget, while the hot messages take more than
    /// [`HOT_MAX_BYTES`]), then ends the
    /// epoch if it is [`hotlog::EPOCH_MS`] old or its file
    /// [`hotlog::EPOCH_BYTES`] long.
    fn settle(&mut self, now_ms: u64, mut budget: usize, age_ms: u64) -> Result<(), StoreError> {
        while let Some(&(_, _, at)) = self.hot.order.front() {
            let pressed = self.hot.ram > self.hot.max_bytes;
            if !pressed && (budget == 0 || at.saturating_add(age_ms) > now_ms) {
                break;
            }
            budget = budget.saturating_sub(1);
            self.resolve_next()?;
        }
        match self.hot.started_ms {
            None => self.hot.started_ms = Some(now_ms),
            Some(t) => {
                let due = now_ms >= t.saturating_add(hotlog::EPOCH_MS) && self.hot.previous_left == 0;
                if due || self.hot.log.bytes() >= hotlog::EPOCH_BYTES {
                    self.rotate()?;
                    self.hot.started_ms = Some(now_ms);
                }
            }
        }
        Ok(())
    }

    /// Takes the front of the append order and resolves its message
    /// ([`DiskStore::resolve_one`]); `None` if the order is empty, else
    /// whether the message was dropped.
    fn resolve_next(&mut self) -> Result<Option<bool>, StoreError> {
        if !self.hot.order.is_empty() && self.hot.order.len() <= self.hot.unlogged {
            // Not in the hot log yet (`Hot::unlogged`): write it first.
            self.flush_log()?;
        }
        let Some((slot, seq, _)) = self.hot.order.pop_front() else { return Ok(None) };
        self.hot.popped += 1;
        let resolved = self.resolve_one(slot, seq);
        self.hot.unname(slot);
        resolved.map(Some)
    }

    /// Resolves hot message `seq` of the user in hot slot `slot` if it is
    /// still the user's oldest hot one (else it was resolved already):
    /// drops it if every known device of the user has acknowledged it
    /// (none if the user has no device), else writes it into `msgs` (one
    /// commit: a batch shared with the next user's could be read past, by
    /// a cache entry dropped and read back before it commits). Returns
    /// whether it was dropped.
    fn resolve_one(&mut self, slot: usize, seq: u64) -> Result<bool, StoreError> {
        let h = &self.hot.slots[slot];
        if h.msgs.front().is_none_or(|m| m.seq != seq) {
            return Ok(false);
        }
        let c = match self.cache.get_mut(&h.key[..]) {
            Some(c) => c,
            None => {
                let uk = h.key.clone();
                self.entry(&uk)?;
                self.cache.get_mut(&uk[..]).expect("filled above")
            }
        };
        let m = self.hot.pop_front(slot).expect("looked up above");
        let uk = &self.hot.slots[slot].key;
        let dropped = m.seq <= c.acked();
        if dropped {
            self.total_bytes -= m.bytes;
            self.total_messages -= 1;
            c.dropped_hot(m.seq);
            // Looked up first: most drops are of a user already dirty, and
            // the clone is an atomic increment on a line not in cache.
            match self.hot.dirty.get_mut(&uk[..]) {
                Some(g) => *g = None,
                None => {
                    self.hot.dirty.insert(uk.clone(), None);
                }
            }
        } else {
            c.fhead = m.seq;
            if c.rec.messages == 0 {
                c.rec.first_seq = m.seq;
            }
            c.rec.messages += 1;
            c.rec.bytes += m.bytes;
            // Found past the record by `catch_up` if it is read back.
            let (user, _) = str8(uk)?;
            let mut batch = self.db.batch();
            batch.insert(&self.msgs, msg_key(user, m.seq), m.value.into_vec());
            if c.rec_head.is_none_or(|h| m.seq - h >= RECORD_LAG) {
                // The retention pass walks the records: a user's first
                // message in `msgs` comes with one; later ones bring it
                // up to date every RECORD_LAG (the module doc).
                batch.insert(&self.inboxes, &uk[..], c.record_to_write());
                self.hot.dirty.swap_remove(&uk[..]);
            }
            // A failure stops the store (`guard`); the message stays in
            // the log, which the next open writes into fjall.
            batch.commit().map_err(unavailable)?;
            self.resolved_unsynced = true;
        }
        Ok(dropped)
    }

    /// Ends the epoch: resolves what is left of the previous epoch's
    /// messages, starts a new file, logs there the `fhead` of every user
    /// whose record is behind (so that the file of the dropped
    /// messages can go without a write to fjall per user: a batch of
    /// thousands of records every epoch held appends up for tens of
    /// milliseconds), makes fjall durable as the durability promises, and
    /// deletes the file of the epoch before.
    fn rotate(&mut self) -> Result<(), StoreError> {
        if self.hot.to_delete.is_some() {
            // Two rotations without a sync between (an embedding that
            // appends without syncing): finish the first one now.
            self.flush_log()?;
            self.write_unlogged_dedup()?;
            self.finish_rotation()?;
        }
        if self.hot.unlogged > 0 {
            // What is left of the epoch before may include appends of the
            // batch under way: into the log first (`Hot::unlogged`).
            self.flush_log()?;
        }
        let epoch = self.hot.epoch;
        // Slots are freed only as `order` is taken, not here.
        let left: Vec<usize> = self
            .hot
            .slots
            .iter()
            .filter(|(_, h)| h.msgs.front().is_some_and(|m| m.epoch < epoch))
            .map(|(slot, _)| slot)
            .collect();
        for slot in left {
            while let Some(seq) = self.hot.slots[slot].msgs.front().filter(|m| m.epoch < epoch).map(|m| m.seq) {
                self.resolve_one(slot, seq)?;
            }
        }
        let gone = self.hot.log.rotate()?;
        self.mark_hot_files(self.hot.files_low, self.hot.log.generation())?;
        // The file just ended goes only at the rotation after next.
        self.log_dirty_heads(self.hot.log.generation().checked_sub(1));
        self.hot.idle_at = 0;
        debug_assert_eq!(self.hot.previous_left, 0, "every message of the epoch before is resolved");
        self.hot.previous_left = std::mem::take(&mut self.hot.current);
        // The syncs that must come before the delete wait for the next
        // `sync`, which the batch of requests this append is in ends with:
        // the turn of a rotation waits for one `fdatasync` of fjall more,
        // not three. (The first version synced the files here and wrote
        // the lagging records instead of logging heads, a batch of one
        // record per active user: the capacity report's half-rate p99 with
        // `fsync` read 46.5 ms, against 12.0 ms before the hot log.)
        self.hot.to_delete = gone;
        self.hot.epoch += 1;
        Ok(())
    }

    /// Appends to the hot log the `fhead` and devices of every dirty user
    /// (whose record a drop or its devices' moves left behind), but those
    /// whose state was last logged in file `but_in` (and is as logged).
    fn log_dirty_heads(&mut self, but_in: Option<u64>) {
        let now = Some(self.hot.log.generation());
        for (uk, logged_in) in self.hot.dirty.iter_mut() {
            if but_in.is_some() && *logged_in == but_in {
                continue;
            }
            // Dirty users are cached (dropping an entry writes its record).
            debug_assert!(self.cache.contains_key(&uk[..]));
            if let (Some(c), Ok((user, _))) = (self.cache.get(&uk[..]), str8(uk)) {
                self.hot.log.append_head(user, c.fhead, &c.rec.devices);
                self.heads_logged = true;
                *logged_in = now;
            }
        }
    }

    /// Writes into fjall, in one batch, the records of up to
    /// [`IDLE_RECORD_SLICE`] dirty users last logged in the file the last
    /// rotation ended (idle since: nothing moved them this epoch), looking
    /// at up to [`IDLE_VISITS`] dirty users from where the last call
    /// stopped. They are dirty no more: the next rotation, which deletes
    /// the file before that one, need not log them, nor any later one
    /// until they move again. (Before its delete, that rotation persists
    /// fjall as the durability promises.)
    fn write_idle_records(&mut self) -> Result<(), StoreError> {
        let Some(ended) = self.hot.log.generation().checked_sub(1) else { return Ok(()) };
        let mut batch = None;
        let (mut written, mut visited) = (0, 0);
        while written < IDLE_RECORD_SLICE && visited < IDLE_VISITS {
            let i = self.hot.idle_at;
            let Some((uk, &logged_in)) = self.hot.dirty.get_index(i) else { break };
            visited += 1;
            if logged_in != Some(ended) {
                self.hot.idle_at += 1;
                continue;
            }
            // Dirty users are cached (dropping an entry writes its record).
            if let Some(c) = self.cache.get_mut(&uk[..]) {
                batch.get_or_insert_with(|| self.db.batch()).insert(&self.inboxes, &uk[..], c.record_to_write());
                written += 1;
            }
            // The last entry moves to `i`, looked at next.
            self.hot.dirty.swap_remove_index(i);
        }
        // A failure stops the store (`guard`), which the next open
        // recovers from the files: nothing above needs taking back.
        batch.map_or(Ok(()), |b| b.commit().map_err(unavailable))
    }

    /// After the log's flush at a `sync` that follows a rotation: makes
    /// fjall durable as the durability promises, then deletes the file of
    /// the epoch before the previous one.
    fn finish_rotation(&mut self) -> Result<(), StoreError> {
        let Some(g) = self.hot.to_delete else { return Ok(()) };
        let mode = match self.durability {
            Durability::Fsync => PersistMode::SyncData,
            Durability::Os => PersistMode::Buffer,
        };
        self.hot.files_low = g + 1;
        self.mark_hot_files(g + 1, self.hot.log.generation())?;
        self.persist_fjall(mode)?;
        self.hot.log.delete(g)?;
        self.hot.to_delete = None;
        Ok(())
    }

    /// Records in fjall that the hot log's files `low..=high` hold what
    /// fjall does not (each is needed at the next open), durable with
    /// fjall's next persist: before a file below `low` is deleted.
    fn mark_hot_files(&self, low: u64, high: u64) -> Result<(), StoreError> {
        let v = [low.to_be_bytes(), high.to_be_bytes()].concat();
        self.heads.insert(HOT_FILES_KEY, v).map_err(unavailable)
    }

    /// Refuses to open without a hot log file that the last persisted
    /// [`DiskStore::mark_hot_files`] says holds what fjall does not: a
    /// file deleted while the store was down (by hand, by a cleanup of
    /// the directory) took acknowledged messages with it, and opening
    /// without it would give their seqs out again. With `os`, a power
    /// loss may lose the files made or deleted in its last moments along
    /// with the mark's last writes (neither the files' directory nor
    /// fjall is synced then): only a file missing between two that are
    /// there, or all of them, counts.
    fn check_hot_files(&self, found: &hotlog::Recovery) -> Result<(), StoreError> {
        let Some(v) = self.heads.get(HOT_FILES_KEY).map_err(unavailable)? else { return Ok(()) };
        let (Some(low), Some(high)) = (v.get(..8), v.get(8..16)) else { return Ok(()) };
        let low = u64::from_be_bytes(low.try_into().expect("8 bytes"));
        let high = u64::from_be_bytes(high.try_into().expect("8 bytes"));
        let found = found.generations();
        let range = match (self.durability, found.first(), found.last()) {
            (Durability::Os, Some(&first), Some(&last)) => first.max(low)..=last.min(high),
            _ => low..=high,
        };
        let missing: Vec<String> = range
            .filter(|g| found.binary_search(g).is_err())
            .map(|g| hotlog::file_of(Path::new(""), g).display().to_string())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let dir = self.opened_with.0.join("hot");
        Err(unavailable(format!(
            "the hot log files {} are missing from {}: they held messages that were acknowledged and not yet \
             written into the store proper (deleted while the store was down?). Opening without them would lose \
             those messages and give their seqs out again. Put them back (from a backup of the whole store \
             directory); or, accepting the loss (devices that stored those seqs then skip the new messages that \
             take them: PROTOCOL.md 15.8), create each as an empty file and start again (docs/DEPLOY.md, \
             \"A damaged hot log\")",
            missing.join(", "),
            dir.display()
        )))
    }

    /// A slice of the retention pass's first part: resolves up to
    /// `budget` hot messages appended before the pass started (`until`
    /// entries of `order` ever), oldest first. Returns the messages
    /// dropped and whether that part is over.
    fn expire_hot(&mut self, until: u64, budget: usize) -> Result<(u64, bool), StoreError> {
        let mut dropped = 0;
        for _ in 0..budget {
            if self.hot.popped >= until {
                break;
            }
            let Some(was_dropped) = self.resolve_next()? else { break };
            dropped += u64::from(was_dropped);
        }
        Ok((dropped, self.hot.popped >= until || self.hot.order.is_empty()))
    }

    /// Writes into fjall the messages the hot log kept through a restart
    /// (or a crash) that are not resolved yet (above their user's
    /// `fhead`), with their dedup entries, and persists them: what the
    /// hot log held is then in fjall as if resolved without drops.
    ///
    /// The files are read twice, record by record, and never held whole
    /// (a crash can leave a few epochs of up to `hotlog::EPOCH_BYTES`
    /// each): first for the heads, then for the messages and the dedup
    /// entries, committed [`RECOVERY_BATCH_BYTES`] at a time; the users'
    /// records go in the last batch. A crash in the middle is recovered
    /// from again by the next open, the files still there: loading a
    /// user's record counts the messages the earlier batches wrote past it
    /// (`catch_up`), as it counts any written after a record, so this pass
    /// skips them and writes the rest, and writes the dedup entries again
    /// as they were, and the records and entries come out as one recovery
    /// would have written them. The RAM it holds beside fjall's write
    /// buffers is a batch and one state per user in the log, not the
    /// messages or their dedup entries (which it held whole until
    /// 2026-12-05: about 100 bytes per logged SEND with a client id).
    fn recover(&mut self, logged: &hotlog::Recovery) -> Result<(), StoreError> {
        let mut states: hashbrown::HashMap<Vec<u8>, Cached> = hashbrown::HashMap::new();
        let mut snapshots: hashbrown::HashMap<Vec<u8>, Vec<DeviceState>> = hashbrown::HashMap::new();
        let mut records = 0u64;
        // The logged heads first: messages up to one were resolved (the
        // dropped ones are not in `msgs`, and must not come back), and the
        // head must not go back.
        logged.for_each(true, |r| {
            records += 1;
            match r {
                Recovered::Head { to, head, devices } => {
                    let c = self.state_for_recovery(&mut states, &to)?;
                    c.fhead = c.fhead.max(head);
                    c.head = c.head.max(head);
                    // Each logged head lists all the user's devices as they
                    // were then: the last one is the newest (a device
                    // forgotten since is not in it: `forget_device_now`
                    // logs one), applied below.
                    snapshots.insert(user_key(&to), devices);
                }
                Recovered::Message(m) => {
                    self.state_for_recovery(&mut states, &m.to)?;
                }
            }
            Ok(())
        })?;
        for (uk, devices) in snapshots {
            let c = states.get_mut(&uk).expect("every user with a logged head was read above");
            // Positions only grow; a device fjall's record does not know
            // was dropped since (logins write the record), and one the
            // record saw later than this move is newer there (a device
            // dropped, by its TTL, and added again since, at position 0,
            // must not get its old position back).
            for logged in devices {
                if let Some(d) = c.rec.devices.iter_mut().find(|d| d.device == logged.device) {
                    if d.device == super::PUSHED_OUT {
                        // Logins alone change it (and write the record),
                        // only ever lower: the lower is the later.
                        d.position = d.position.min(logged.position);
                        d.last_seen_ms = d.last_seen_ms.max(logged.last_seen_ms);
                    } else if logged.last_seen_ms >= d.last_seen_ms {
                        d.position = d.position.max(logged.position);
                        d.last_seen_ms = logged.last_seen_ms;
                    }
                }
            }
        }
        if records == 0 {
            return Ok(());
        }
        let mut batch = self.db.batch();
        let (mut written, mut batched) = (0u64, 0u64);
        // The dedup keys in `batch`: writes of one key in one batch share
        // its sequence number, so which would win is not defined; a key
        // logged again (a client id reused after the window) ends the
        // batch first, and its later entry wins.
        let mut in_batch: hashbrown::HashSet<Vec<u8>> = hashbrown::HashSet::new();
        logged.for_each(false, |r| {
            let Recovered::Message(m) = r else { return Ok(()) };
            if m.client_id != 0 {
                // Every logged SEND's entry, its message resolved or not:
                // fjall may have lost one written after the log
                // (`DiskStore::unlogged_dedup`) with its unsynced journal.
                let dk = dedup_key(&m.to, &m.from, m.client_id);
                if in_batch.contains(&dk) {
                    self.commit_recovery_batch(&mut batch, &mut batched, &mut in_batch)?;
                }
                batched += 2 * dk.len() as u64 + 48;
                self.put_dedup(&mut batch, &dk, m.seq, m.msg_id, m.appended_ms);
                in_batch.insert(dk);
            }
            let c = states.get_mut(user_key(&m.to).as_slice()).expect("every user was read in the first pass");
            if m.seq > c.fhead {
                // Not resolved before the restart (`write_through_log`).
                if c.rec.messages == 0 {
                    c.rec.first_seq = m.seq;
                }
                c.rec.messages += 1;
                c.rec.bytes += record_bytes(&m.to, &m.from, m.payload.len());
                c.fhead = m.seq;
                c.head = m.seq;
                batched += (m.payload.len() + m.to.len() + m.from.len()) as u64 + 48;
                batch.insert(
                    &self.msgs,
                    msg_key(&m.to, m.seq),
                    msg_value(m.msg_id, m.ts_ms, m.expires_ms, &m.from, &m.payload),
                );
                written += 1;
            }
            if batched >= RECOVERY_BATCH_BYTES {
                self.commit_recovery_batch(&mut batch, &mut batched, &mut in_batch)?;
            }
            Ok(())
        })?;
        for (uk, c) in &states {
            batch.insert(&self.inboxes, uk.as_slice(), c.rec.encode(c.fhead));
        }
        batch.commit().map_err(unavailable)?;
        self.cache.clear();
        tracing::info!(messages = written, records, "disk store: hot log recovered into the store");
        self.persist_fjall(PersistMode::SyncData)
    }

    /// Commits one of [`DiskStore::recover`]'s batches and starts the next.
    fn commit_recovery_batch(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        batched: &mut u64,
        in_batch: &mut hashbrown::HashSet<Vec<u8>>,
    ) -> Result<(), StoreError> {
        std::mem::replace(batch, self.db.batch()).commit().map_err(unavailable)?;
        *batched = 0;
        in_batch.clear();
        #[cfg(test)]
        if CRASH_RECOVERY_AFTER.with(|left| left.replace(left.get().map(|n| n - 1)) == Some(1)) {
            return Err(unavailable("the process died in the middle of a recovery (a test)"));
        }
        Ok(())
    }

    /// `to`'s record as fjall holds it, read once per recovery.
    fn state_for_recovery<'a>(
        &self,
        states: &'a mut hashbrown::HashMap<Vec<u8>, Cached>,
        to: &str,
    ) -> Result<&'a mut Cached, StoreError> {
        let uk = user_key(to);
        if !states.contains_key(&uk) {
            let c = self.load(&uk)?;
            states.insert(uk.clone(), c);
        }
        Ok(states.get_mut(&uk).expect("inserted above"))
    }
}

impl Drop for DiskStore {
    /// Logs the head and devices of every dirty user, so that the next
    /// open does not count the dropped messages again (after a crash it
    /// may, until the next retention pass drops them again; the devices'
    /// moves were logged as they came).
    fn drop(&mut self) {
        if self.hot.dirty.is_empty() || self.stopped.is_some() {
            return;
        }
        self.log_dirty_heads(None);
        // fjall's journal first, as at every sync (`write_through_log`):
        // these heads may cover messages resolved since fjall's last sync.
        if let Err(e) = self.flush_log() {
            tracing::warn!(error = %e, "disk store: closing: the hot log's last heads were not written");
        }
    }
}

/// Set in a value's `ts_ms` field ([`msg_value`]) when the message's
/// expiry follows it. A timestamp of this era never has it set, so values
/// written before messages had expiries read as they did.
const HAS_EXPIRY: u64 = 1 << 63;

/// A message's value in `msgs`: msg_id, ts_ms, the sender (`str8`), the
/// payload; with an expiry (`expires_ms` ≠ 0), `ts_ms` has [`HAS_EXPIRY`]
/// set and the expiry (u64 BE) follows it. (A build from before expiries
/// reads such a value with a timestamp far in the future: a store that
/// holds them must not be opened by one.)
fn msg_value(msg_id: u64, ts_ms: u64, expires_ms: u64, from: &str, payload: &[u8]) -> Vec<u8> {
    // Exactly its length: the hot tier keeps it as a boxed slice, which
    // spare capacity would make a reallocation.
    let expiry = if expires_ms == 0 { 0 } else { 8 };
    let mut value = Vec::with_capacity(17 + expiry + from.len() + payload.len());
    value.extend_from_slice(&msg_id.to_be_bytes());
    if expires_ms == 0 {
        value.extend_from_slice(&ts_ms.to_be_bytes());
    } else {
        value.extend_from_slice(&(ts_ms | HAS_EXPIRY).to_be_bytes());
        value.extend_from_slice(&expires_ms.to_be_bytes());
    }
    value.push(from.len() as u8);
    value.extend_from_slice(from.as_bytes());
    value.extend_from_slice(payload);
    value
}

/// A [`msg_value`]'s parts: ts_ms, expires_ms (0: none), the sender and
/// the payload.
fn value_parts(v: &[u8]) -> Result<(u64, u64, &str, &[u8]), StoreError> {
    let ts = u64_at(v, 8)?;
    let (ts_ms, expires_ms, rest) =
        if ts & HAS_EXPIRY == 0 { (ts, 0, 16) } else { (ts & !HAS_EXPIRY, u64_at(v, 16)?, 24) };
    let (from, payload) = str8(v.get(rest..).ok_or_else(|| unavailable("corrupt message"))?)?;
    Ok((ts_ms, expires_ms, from, payload))
}

/// The message `seq` from its value in `msgs` ([`msg_value`]).
fn stored_message(seq: u64, v: &[u8]) -> Result<StoredMessage, StoreError> {
    let (ts_ms, expires_ms, from, payload) = value_parts(v)?;
    Ok(StoredMessage {
        seq,
        msg_id: u64_at(v, 0)?,
        ts_ms,
        from: Arc::from(from),
        payload: Bytes::copy_from_slice(payload),
        expires_ms,
    })
}

impl DiskStore {
    /// [`Store::append`] of a running store, its ids checked.
    fn append_now(&mut self, m: &NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        self.settle(now_ms, RESOLVE_PER_APPEND, hotlog::EPOCH_MS)?;
        let dk = (m.client_id != 0).then(|| dedup_key(&m.to, &m.from, m.client_id));
        let mut stale_dedup = None;
        if let Some(dk) = &dk {
            if let Some(u) = self.unlogged_dedup.get(dk) {
                if !expired(u.ts_ms, self.limits.dedup_window_ms, now_ms) {
                    return Ok(Appended::Duplicate { seq: u.seq, msg_id: u.msg_id });
                }
            }
            let mut found = self.dedup.get(dk).map_err(unavailable)?;
            if found.is_none() && self.legacy_dedup && !m.from.is_empty() {
                // Only read: the new entry is written in the new form.
                let legacy = self.dedup.get(legacy_dedup_key(&m.from, m.client_id)).map_err(unavailable)?;
                if let Some(v) = legacy {
                    if !expired(u64_at(&v, 16)?, self.limits.dedup_window_ms, now_ms) {
                        found = Some(v);
                    }
                }
            }
            if let Some(v) = found {
                let (seq, msg_id, ts_ms) = (u64_at(&v, 0)?, u64_at(&v, 8)?, u64_at(&v, 16)?);
                if !expired(ts_ms, self.limits.dedup_window_ms, now_ms) {
                    return Ok(Appended::Duplicate { seq, msg_id });
                }
                stale_dedup = Some(ts_ms);
            }
        }
        let uk = user_key(&m.to);
        let limits = self.limits;
        let bytes = record_bytes(&m.to, &m.from, m.payload.len());
        let fits = self.total_bytes + bytes <= limits.max_bytes;
        let (slot, hot_messages) = match self.hot.users.get(&uk[..]) {
            Some(&slot) => (Some(slot), self.hot.slots[slot].msgs.len() as u64),
            None => (None, 0),
        };
        let c = match self.cache.get_mut(&uk[..]) {
            Some(c) => c,
            None => self.entry(&uk)?,
        };
        if c.rec.messages + hot_messages >= limits.max_messages_per_inbox {
            return Err(StoreError::InboxFull { limit: limits.max_messages_per_inbox });
        }
        if !fits {
            return Err(StoreError::StoreFull { limit_bytes: limits.max_bytes });
        }
        let seq = c.head + 1;
        c.head = seq;
        if let Some(dk) = dk {
            // Into fjall at the sync, after the hot log (`unlogged_dedup`);
            // durable through the hot log, which recovery writes them again
            // from. An entry of this batch replaced here keeps the stale
            // one's time key to remove.
            let stale = self.unlogged_dedup.get(&dk).map_or(stale_dedup, |u| u.stale);
            self.unlogged_dedup.insert(dk, UnloggedDedup { seq, msg_id: m.msg_id, ts_ms: now_ms, stale });
        }
        // The message goes to the hot log and stays in RAM until the
        // rotation after next (hotlog.rs): nothing is written to fjall.
        self.hot.log.append(LogEntry {
            seq,
            msg_id: m.msg_id,
            ts_ms: m.ts_ms,
            appended_ms: now_ms,
            client_id: m.client_id,
            expires_ms: m.expires_ms,
            to: &m.to,
            from: &m.from,
            payload: &m.payload,
        });
        let value = msg_value(m.msg_id, m.ts_ms, m.expires_ms, &m.from, &m.payload).into_boxed_slice();
        let epoch = self.hot.epoch;
        let slot = slot.unwrap_or_else(|| self.hot.slot_for(Arc::from(uk)));
        self.hot.order.push_back((slot, seq, now_ms));
        self.hot.unlogged += 1;
        self.hot.current += 1;
        let m = HotMsg { seq, epoch, bytes, value };
        self.hot.ram += hot_ram(&m);
        let user = &mut self.hot.slots[slot];
        user.named += 1;
        user.msgs.push_back(m);
        user.bytes += bytes;
        self.total_bytes += bytes;
        self.total_messages += 1;
        Ok(Appended::New { seq })
    }

    /// The first part of a sync: the records of idle users, fjall's
    /// journal as far as it must go first, and the hot log (with
    /// `fsync`, `fdatasync`ed). A head the hot log records (a device's
    /// move, a rotation's) says that every message up to it is in `msgs`
    /// or dropped, and the next open takes it at its word: so fjall's
    /// writes of the messages resolved before it go first. Written the
    /// other way round, a crash between the two writes (SIGKILL; with
    /// `fsync`, a power loss before fjall's next periodic sync) lost
    /// those messages for the devices that had not acknowledged them.
    /// With `fsync` that costs a sync of fjall's journal in the turns
    /// that log a head while messages resolved since its last sync (those
    /// of offline devices, an epoch old) wait in it.
    fn write_through_log(&mut self) -> Result<(), StoreError> {
        self.write_idle_records()?;
        self.flush_log()
    }

    /// Writes the hot log, fjall's journal first ([`Self::write_through_log`]).
    fn flush_log(&mut self) -> Result<(), StoreError> {
        let first = match self.durability {
            Durability::Fsync if self.resolved_unsynced && self.heads_logged => PersistMode::SyncData,
            _ => PersistMode::Buffer,
        };
        self.persist_fjall(first)?;
        // The messages: `fdatasync`ed with `fsync`.
        self.hot.log.flush()?;
        self.hot.unlogged = 0;
        self.heads_logged = false;
        Ok(())
    }

    /// [`Store::sync`] of a running store.
    fn sync_now(&mut self) -> Result<(), StoreError> {
        self.write_through_log()?;
        // Then the dedup entries of the messages (`unlogged_dedup`).
        self.write_unlogged_dedup()?;
        if self.hot.to_delete.is_some() {
            return self.finish_rotation();
        }
        let mode = match self.durability {
            Durability::Fsync if self.hot.fjall_synced.elapsed() >= FJALL_SYNC_INTERVAL => PersistMode::SyncData,
            _ => PersistMode::Buffer,
        };
        self.persist_fjall(mode)
    }

    /// [`Store::expire_slice`] of a running store.
    fn expire_slice_now(&mut self, now_ms: u64, budget: usize) -> Result<(u64, bool), StoreError> {
        let budget = budget.max(1);
        // Taken: a slice that fails leaves no pass under way, and the
        // next one starts from the beginning.
        // A pass starts by resolving every hot message there is, so that
        // it judges them all (TTL, acknowledgements) in one place; the
        // acknowledged ones it drops count as the pass's.
        let at = self.expire_at.take().unwrap_or(ExpireAt::Hot(self.hot.popped + self.hot.order.len() as u64));
        let (mut dropped, mut spent) = (0, 0);
        let at = match at {
            ExpireAt::Hot(until) => {
                let (n, over) = self.expire_hot(until, budget)?;
                if !over {
                    self.expire_at = Some(ExpireAt::Hot(until));
                    return Ok((n, false));
                }
                (dropped, spent) = (n, n as usize);
                ExpireAt::Users(Bound::Unbounded)
            }
            at => at,
        };
        let dedup_from = match at {
            ExpireAt::Users(from) => {
                let next;
                let users;
                (users, spent, next) = self.expire_users(from, now_ms, budget)?;
                dropped += users;
                if let Some(next) = next {
                    self.expire_at = Some(ExpireAt::Users(next));
                    return Ok((dropped, false));
                }
                Bound::Unbounded
            }
            ExpireAt::Dedup(from) => from,
            ExpireAt::Hot(_) => unreachable!("the hot part is done above"),
        };
        match self.expire_dedup(dedup_from, now_ms, budget.saturating_sub(spent).max(1))? {
            Some(next) => {
                self.expire_at = Some(ExpireAt::Dedup(next));
                Ok((dropped, false))
            }
            None => Ok((dropped, true)),
        }
    }
}

impl Store for DiskStore {
    fn append(&mut self, m: &NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        check_ids(&m.to, &m.from, "")?;
        self.guard(|s| s.append_now(m, now_ms))
    }

    fn held(&self) -> (u64, u64) {
        (self.total_messages, self.total_bytes)
    }

    fn expired_unacknowledged(&self) -> u64 {
        self.expired_unacknowledged
    }

    /// What an append does first (`DiskStore::settle`), with `budget`
    /// hot messages in place of `RESOLVE_PER_APPEND` and for messages
    /// [`IDLE_RESOLVE_MS`] old; nothing while no message is hot (an idle
    /// store starts no epoch). Why: resolved only by appends, the
    /// messages of a burst waited for the next one, whose first appends
    /// then each resolved 8 of them while their senders waited, and the
    /// count of messages kept (`/metrics`, `/stats`) showed the last two
    /// seconds of traffic for as long as the server stayed quiet.
    fn tidy(&mut self, now_ms: u64, budget: usize) -> Result<(), StoreError> {
        if self.hot.order.is_empty() {
            return self.running();
        }
        self.guard(|s| s.settle(now_ms, budget.max(1), IDLE_RESOLVE_MS))
    }

    fn tidy_due(&self) -> Option<u64> {
        if self.stopped.is_some() {
            return None;
        }
        self.hot.order.front().map(|&(_, _, at)| at.saturating_add(IDLE_RESOLVE_MS))
    }

    fn durability(&self) -> Option<Durability> {
        Some(self.durability)
    }

    fn unsynced_since(&self) -> Option<Instant> {
        // Due a second after fjall's last sync: the next one syncs it.
        (self.fjall_unsynced && self.stopped.is_none()).then_some(self.hot.fjall_synced)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.guard(Self::sync_now)
    }

    fn read(&mut self, user: &str, after_seq: u64, limit: usize) -> Result<Page, StoreError> {
        // A stopped store's RAM may hold what was never synced.
        self.running()?;
        if user.is_empty() || user.len() > MAX_USER_BYTES {
            return Ok(Page { messages: Vec::new(), head_seq: 0 });
        }
        let uk = user_key(user);
        let head_seq = self.head(&uk)?;
        let mut messages = Vec::with_capacity(limit.min(1024));
        if after_seq < head_seq {
            let hot = self.hot.user(&uk);
            // The hot messages are the newest: `msgs` only below them.
            let hot_from = hot.and_then(|h| h.msgs.front()).map_or(u64::MAX, |m| m.seq);
            if after_seq + 1 < hot_from {
                for kv in self.msgs.range(msg_key(user, after_seq + 1)..=msg_key(user, head_seq)).take(limit) {
                    let (k, v) = kv.into_inner().map_err(unavailable)?;
                    messages.push(stored_message(u64_at(&k, k.len() - 8)?, &v)?);
                }
            }
            for m in hot.into_iter().flat_map(|h| h.msgs.iter()) {
                if messages.len() >= limit {
                    break;
                }
                if m.seq > after_seq {
                    messages.push(stored_message(m.seq, &m.value)?);
                }
            }
        }
        Ok(Page { messages, head_seq })
    }

    fn device_login(
        &mut self,
        user: &str,
        device: &str,
        client_seq: u64,
        now_ms: u64,
    ) -> Result<(u64, u64), StoreError> {
        check_ids(user, "", device)?;
        self.guard(|s| s.with_devices(user, |devices, head| login_device(devices, device, client_seq, head, now_ms)))
    }

    fn set_position(&mut self, user: &str, device: &str, seq: u64, now_ms: u64) -> Result<(), StoreError> {
        check_ids(user, "", device)?;
        self.guard(|s| s.with_devices(user, |devices, head| move_device(devices, device, seq, head, now_ms)))
            .map(|_| ())
    }

    fn set_positions(&mut self, positions: &[(&str, &str, u64)], now_ms: u64) -> Vec<Result<(), StoreError>> {
        let mut out: Vec<Result<(), StoreError>> =
            positions.iter().map(|&(user, device, _)| check_ids(user, "", device)).collect();
        if let Err(e) = self.guard(|s| s.set_positions_now(positions, now_ms, &mut out)) {
            for r in out.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(e.clone());
            }
        }
        out
    }

    fn forget_device(&mut self, user: &str, device: &str, _now_ms: u64) -> Result<bool, StoreError> {
        check_ids(user, "", device)?;
        self.guard(|s| s.forget_device_now(user, device))
    }

    fn inbox_state(&mut self, user: &str) -> Result<InboxState, StoreError> {
        self.running()?;
        if user.is_empty() || user.len() > MAX_USER_BYTES {
            return Ok(InboxState { head_seq: 0, first_seq: 1, messages: 0, bytes: 0, devices: Vec::new() });
        }
        let uk = user_key(user);
        let Cached { head: head_seq, rec, .. } = self.load(&uk)?;
        let hot = self.hot.user(&uk);
        let (hot_messages, hot_bytes) = hot.map_or((0, 0), |h| (h.msgs.len() as u64, h.bytes));
        let first_seq = match hot.and_then(|h| h.msgs.front()) {
            _ if rec.messages > 0 => rec.first_seq,
            Some(m) => m.seq,
            None => head_seq + 1,
        };
        Ok(InboxState {
            head_seq,
            first_seq,
            messages: rec.messages + hot_messages,
            bytes: rec.bytes + hot_bytes,
            devices: rec.devices,
        })
    }

    fn expire(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        // A whole pass from the start, whatever a sliced one had done.
        self.expire_at = None;
        let (dropped, done) = self.expire_slice(now_ms, usize::MAX)?;
        debug_assert!(done, "an unbounded slice is the whole pass");
        Ok(dropped)
    }

    fn expire_slice(&mut self, now_ms: u64, budget: usize) -> Result<(u64, bool), StoreError> {
        self.guard(|s| s.expire_slice_now(now_ms, budget))
    }

    fn stopped(&self) -> bool {
        self.stopped.is_some()
    }

    fn reopener(&self) -> Option<Reopen> {
        let (path, tuning, of) = self.opened_with.clone();
        let (durability, limits) = (self.durability, self.limits);
        Some(Arc::new(move || {
            DiskStore::open_shard(&path, durability, limits, tuning, of).map(|s| Box::new(s) as Box<dyn Store>)
        }))
    }
}
