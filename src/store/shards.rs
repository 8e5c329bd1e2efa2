//! Shards of a store: users hashed to N stores, each served by a thread
//! of its own (`service`), so that storing is not one serial stage.
//!
//! Owns: the hash that puts a user in a shard ([`shard_of`]), the on-disk
//! layout of a sharded disk store (a directory per shard and a file that
//! records the count), and opening a configured store as its shards
//! ([`open_store_shards`]).
//! Must not: change [`shard_of`]: the users of a disk store's shards were
//! put there by it, and a user hashed elsewhere would find an empty inbox
//! at a new seq 1.
//!
//! What a shard holds: the whole inbox of each of its users (messages,
//! head, devices' positions) and the dedup entries of the SENDs to them:
//! a retry of a SEND goes to the same recipient, so it meets its entry in
//! the same shard. `max_bytes` and the queue are divided evenly among the
//! shards (the hash spreads users evenly), and so are the disk store's
//! block cache, user cache and hot messages; each shard has write
//! buffers of `store.write_buffer_mib` of its own. Halved with two
//! shards, each shard flushes as often as one store did, so the server
//! flushes (and stalls appends) twice as often in all; measured against
//! whole buffers in two alternated rounds at 60,000 and 68,000 msgs/s
//! (`os`), its p99 was the higher in each: 77 / 396 / 83 / 292 ms
//! against 37 / 114 / 22 / 51.
//!
//! Layout of a disk store at `store.path`: one shard is a store in the
//! directory itself (as every store before shards); N > 1 shards are
//! `shard-0` … `shard-<N-1>` in it and a file [`SHARDS_FILE`] holding N.
//! The count is fixed when the directory is first opened: a later start
//! with another `store.shards` keeps the count on disk and says so in the
//! log (moving users between shards is not supported).
//!
//! When more than one pays (measured on the 2-core development VM,
//! 2026-12-03). The store's threads alone (`cargo bench -p
//! switchboard-bench --bench store_shards`: two submitting threads, no
//! network) take 729,267 appends/s with one shard, 1,075,535 with two
//! (1.47×) and 924,872 with four, medians of three alternated rounds. In
//! the server, where the workers and the load generator share the two
//! cores, one store thread is far from that: at 40,000 reliable msgs/s
//! (`os`) it runs about 26% of a core, a third of it in parking and being
//! woken (6,400 times a second: `perf`, `/proc/<tid>/status`), and two
//! shards cost the server 6–13% more CPU at the same rate (887–917
//! against 813–839 ticks in three alternated rounds) for no p99 gain
//! beyond the host's noise (four alternated rounds at 64,000 msgs/s of
//! one shard, two, and one with a larger write buffer read p99s from 16
//! to 961 ms, each of the three the best in some round). Hence one shard
//! by default;
//! more pay where the store thread, not the host, is the limit: a host
//! with cores to spare whose `switchboard_store_queue_wait_seconds` grows
//! while `switchboard_store_commit_seconds` stays short
//! (docs/DEPLOY.md, "Shards").

use std::path::{Path, PathBuf};

use super::disk::DiskTuning;
use super::{DiskStore, MemoryStore, Store, StoreError};
use crate::config::{ClusterConfig, StoreConfig, StoreKind};

/// Most shards a store may have (`store.shards`).
pub const MAX_SHARDS: usize = 64;

/// The file in a sharded disk store's directory that holds its count.
pub const SHARDS_FILE: &str = "SHARDS";

/// The shard of `user` among `shards`: FNV-1a (64-bit) of the user id's
/// bytes, mixed by MurmurHash3's 64-bit finalizer, modulo the count.
/// Why the finalizer: FNV-1a alone spreads ids that differ in their last
/// byte badly: its low bits depend only on the bytes' low bits (its low
/// bit is their parity) and its last byte barely reaches its high bits
/// (4,000 ids "lad-os-u0" … "lad-os-u3999" fell 3,190 / 810 into two
/// shards by the high bits). Mixed, they fall 2,020 / 1,980. Fixed
/// forever (module doc).
pub fn shard_of(user: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h % shards as u64) as usize
}

/// The directories of the disk store at `path`, one per shard, for a
/// store that should have `wanted` shards if it is new (module doc: an
/// existing store keeps its count). Creates the layout of a new sharded
/// store.
pub fn disk_shard_dirs(path: &Path, wanted: usize) -> Result<Vec<PathBuf>, StoreError> {
    let wanted = wanted.clamp(1, MAX_SHARDS);
    let io = |what: &str, e: std::io::Error| StoreError::Unavailable(format!("{what} {}: {e}", path.display()));
    let recorded = match std::fs::read_to_string(path.join(SHARDS_FILE)) {
        Ok(text) => Some(parse_count(path, &text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("cannot read the shard count of", e)),
    };
    let count = match recorded {
        Some(n) => n,
        // A store in the directory itself: one written before shards, or
        // created with one.
        None if DiskStore::exists_in(path) || wanted == 1 => 1,
        None => {
            std::fs::create_dir_all(path).map_err(|e| io("cannot create", e))?;
            write_count(path, wanted).map_err(|e| io("cannot record the shard count in", e))?;
            wanted
        }
    };
    if count != wanted {
        tracing::warn!(
            path = %path.display(),
            shards = count,
            configured = wanted,
            "the store keeps the shard count it was created with ({count}); store.shards asks for {wanted}"
        );
    }
    Ok(if count == 1 && recorded.is_none() {
        vec![path.to_path_buf()]
    } else {
        (0..count).map(|i| path.join(format!("shard-{i}"))).collect()
    })
}

/// How many shards the disk store at `path` has, if one is there (read
/// only: for estimates, which must count what the open will run, not
/// what `store.shards` asks for).
pub fn recorded_count(path: &Path) -> Option<usize> {
    match std::fs::read_to_string(path.join(SHARDS_FILE)) {
        Ok(text) => parse_count(path, &text).ok(),
        Err(_) => DiskStore::exists_in(path).then_some(1),
    }
}

fn parse_count(path: &Path, text: &str) -> Result<usize, StoreError> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_SHARDS).contains(&n) => Ok(n),
        _ => Err(StoreError::Unavailable(format!(
            "{} does not hold a shard count from 1 to {MAX_SHARDS}: {:?}",
            path.join(SHARDS_FILE).display(),
            text.trim()
        ))),
    }
}

/// Writes the count durably: a file written and synced under a temporary
/// name, renamed, and the directory synced, so that a crash leaves either
/// no count (the directory is new again) or the whole one.
fn write_count(path: &Path, count: usize) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.join(format!("{SHARDS_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{count}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path.join(SHARDS_FILE))?;
    std::fs::File::open(path)?.sync_all()
}

/// Opens the store `[store]` configures as its shards: none for
/// `kind = "none"`, one for `redis` (Redis is shared by every node and
/// serves its own clients in parallel), and for `disk` and `memory`
/// `shards` of them (a disk store that exists keeps its own count:
/// [`disk_shard_dirs`]), each with an even share of `max_bytes` and of
/// the disk store's RAM budget. `dedup_window_ms`, `cluster` and
/// `listen_port` are as [`super::open_store_with`] takes them.
pub fn open_store_shards(
    cfg: &StoreConfig,
    shards: usize,
    dedup_window_ms: u64,
    cluster: &ClusterConfig,
    listen_port: u16,
) -> Result<Vec<Box<dyn Store>>, StoreError> {
    let share = |n: usize| {
        let mut limits = cfg.limits(dedup_window_ms);
        limits.max_bytes = (limits.max_bytes / n as u64).max(1);
        limits
    };
    Ok(match cfg.kind {
        StoreKind::None => Vec::new(),
        StoreKind::Redis => super::open_store_with(cfg, dedup_window_ms, cluster, listen_port)?.into_iter().collect(),
        StoreKind::Memory => {
            let n = shards.clamp(1, MAX_SHARDS);
            (0..n).map(|_| Box::new(MemoryStore::new(share(n))) as Box<dyn Store>).collect()
        }
        StoreKind::Disk => {
            let dirs = disk_shard_dirs(&cfg.path, shards)?;
            let n = dirs.len();
            let mut stores = Vec::with_capacity(n);
            for dir in dirs {
                // Each shard's write buffers are whole: measured, halving
                // them with two shards did worse (module doc).
                let store = DiskStore::open_shard(&dir, cfg.durability, share(n), DiskTuning::of(cfg), n)?;
                stores.push(Box::new(store) as Box<dyn Store>);
            }
            stores
        }
    })
}
