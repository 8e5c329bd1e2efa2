//! Which embedded engine should hold the per-user inboxes: fjall (an LSM
//! tree with a write-ahead journal) or redb (a copy-on-write B-tree)?
//!
//! Question: on the inbox workload, which engine appends more per second
//! when appends are group-committed (N appends, then one durable sync, for
//! N = 1, 16 and 256), how many syncs per second that is, how long a page
//! read takes, and what device-position (cursor) updates and trimming cost,
//! in both durability modes: `fsync` (acknowledged data survives power
//! loss) and `os` (written to the kernel, survives a process crash).
//! Both engines get the same keys and values as `switchboard::store::disk`:
//! messages under `len(user) user seq_be`, a per-user record read and
//! rewritten on every append and cursor update.
//!
//! Sizes: 10,000 users, each with 20 messages to start with (200,000
//! records, ~30 MB: larger than any cache the store keeps per user, small
//! enough to set up in seconds), 100-byte payloads (a chat message), pages
//! of 20 (`delivery.first_page`). Each phase is bounded in time
//! (`STORE_BENCH_PHASE_MS`, default 1,500 ms) so the whole run takes about a
//! minute on the 2-core development VM, where one `fdatasync` costs ~3 ms.
//!
//! redb's `Durability::None` is the closest it has to `os`, but it is not
//! the same: a commit without `Immediate` is not recovered after a process
//! crash (redb recovers to the last durable commit), so redb's `os` figures
//! are for a weaker guarantee than fjall's (`PersistMode::Buffer`: the
//! journal is in the kernel's page cache, a crashed process loses nothing).
//!
//! Result (fjall 3.1.13, redb 4.6.0; 2-core VM, ext4; one run):
//!
//! | mode  | N   | fjall appends/s | redb appends/s | fjall syncs/s | redb syncs/s |
//! |-------|-----|-----------------|----------------|---------------|--------------|
//! | fsync | 1   | 3,834           | 1,236          | 3,834         | 1,236        |
//! | fsync | 16  | 22,295          | 5,615          | 1,393         | 351          |
//! | fsync | 256 | 43,151          | 10,827         | 169           | 42           |
//! | os    | 1   | 71,635          | 18,843         | 71,635        | 18,843       |
//! | os    | 16  | 50,013          | 39,097         | 3,126         | 2,444        |
//! | os    | 256 | 80,736          | 45,632         | 315           | 178          |
//!
//! Page of 20, p50/p99: fjall 20.6/50.8 us, redb 5.7/9.8 us (fsync run).
//! Trims: fjall 476,000 msgs/s, redb 28,600 (fsync). Cursor updates at
//! N = 256, fsync: fjall 85,781/s, redb 44,703/s. Chosen: fjall
//! (`src/store/disk.rs` says why).
//!
//! Run: `cargo bench -p switchboard-bench --bench store_engines`. Data goes
//! to a fresh directory under `STORE_BENCH_DIR` (default: the system's
//! temporary directory; it must be a real disk, not tmpfs, or the fsync
//! figures mean nothing), removed at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use redb::ReadableDatabase;

const USERS: u64 = 10_000;
const PREFILL_PER_USER: u64 = 20;
const PAYLOAD_BYTES: usize = 100;
const PAGE: usize = 20;
const GROUPS: [usize; 3] = [1, 16, 256];
const READS: usize = 20_000;
/// Users whose inbox is trimmed to its last message in the trim phase.
const TRIM_USERS: u64 = 2_000;

fn user(i: u64) -> String {
    format!("user-{i:06}")
}

fn msg_key(user: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.len() + 8);
    k.push(user.len() as u8);
    k.extend_from_slice(user.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn user_key(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.len());
    k.push(user.len() as u8);
    k.extend_from_slice(user.as_bytes());
    k
}

/// msg_id, ts_ms, from (len + bytes), payload: what the store keeps.
fn msg_value(seq: u64, payload: &[u8]) -> Vec<u8> {
    let from = b"sender-1";
    let mut v = Vec::with_capacity(17 + from.len() + payload.len());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&1_800_000_000_000u64.to_be_bytes());
    v.push(from.len() as u8);
    v.extend_from_slice(from);
    v.extend_from_slice(payload);
    v
}

/// The per-user record: head, first kept seq, one device position.
fn meta_value(head: u64, first: u64, position: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&head.to_be_bytes());
    v.extend_from_slice(&first.to_be_bytes());
    v.extend_from_slice(&position.to_be_bytes());
    v
}

fn meta_parse(v: &[u8]) -> (u64, u64, u64) {
    let f = |i: usize| u64::from_be_bytes(v[i * 8..i * 8 + 8].try_into().unwrap());
    (f(0), f(1), f(2))
}

#[derive(Copy, Clone, PartialEq)]
enum Mode {
    Fsync,
    Os,
}

/// The operations each engine implements the same way.
trait Engine {
    fn name(&self) -> &'static str;
    /// Applies `users.len()` appends (one per user in the slice), then one
    /// sync per the mode.
    fn append_group(&mut self, users: &[u64], payload: &[u8]);
    fn cursor_group(&mut self, users: &[u64]);
    fn read_page(&mut self, user: u64, after: u64) -> usize;
    fn head(&mut self, user: u64) -> u64;
    /// Deletes messages first..=upto, updates the record, returns deleted.
    fn trim(&mut self, user: u64, upto: u64) -> u64;
    fn sync(&mut self);
}

struct Fjall {
    db: fjall::Database,
    msgs: fjall::Keyspace,
    meta: fjall::Keyspace,
    mode: Mode,
}

impl Fjall {
    fn open(dir: &Path, mode: Mode) -> Self {
        let db = fjall::Database::builder(dir).manual_journal_persist(true).open().unwrap();
        let msgs = db.keyspace("msgs", fjall::KeyspaceCreateOptions::default).unwrap();
        let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default).unwrap();
        Fjall { db, msgs, meta, mode }
    }

    fn meta_of(&self, k: &[u8]) -> (u64, u64, u64) {
        self.meta.get(k).unwrap().map(|v| meta_parse(&v)).unwrap_or((0, 1, 0))
    }
}

impl Engine for Fjall {
    fn name(&self) -> &'static str {
        "fjall"
    }

    fn append_group(&mut self, users: &[u64], payload: &[u8]) {
        for &u in users {
            let name = user(u);
            let uk = user_key(&name);
            let (head, first, pos) = self.meta_of(&uk);
            let mut b = self.db.batch();
            b.insert(&self.msgs, msg_key(&name, head + 1), msg_value(head + 1, payload));
            b.insert(&self.meta, uk, meta_value(head + 1, first, pos));
            b.commit().unwrap();
        }
        self.sync();
    }

    fn cursor_group(&mut self, users: &[u64]) {
        for &u in users {
            let uk = user_key(&user(u));
            let (head, first, _) = self.meta_of(&uk);
            let mut b = self.db.batch();
            b.insert(&self.meta, uk, meta_value(head, first, head));
            b.commit().unwrap();
        }
        self.sync();
    }

    fn read_page(&mut self, u: u64, after: u64) -> usize {
        let name = user(u);
        let mut n = 0;
        for kv in self.msgs.range(msg_key(&name, after + 1)..=msg_key(&name, u64::MAX)).take(PAGE) {
            let (_k, v) = kv.into_inner().unwrap();
            n += v.len().min(1);
        }
        n
    }

    fn head(&mut self, u: u64) -> u64 {
        self.meta_of(&user_key(&user(u))).0
    }

    fn trim(&mut self, u: u64, upto: u64) -> u64 {
        let name = user(u);
        let uk = user_key(&name);
        let (head, first, pos) = self.meta_of(&uk);
        let mut b = self.db.batch();
        let mut n = 0;
        for seq in first..=upto.min(head) {
            b.remove(&self.msgs, msg_key(&name, seq));
            n += 1;
        }
        b.insert(&self.meta, uk, meta_value(head, upto.min(head) + 1, pos));
        b.commit().unwrap();
        n
    }

    fn sync(&mut self) {
        let m = match self.mode {
            Mode::Fsync => fjall::PersistMode::SyncData,
            Mode::Os => fjall::PersistMode::Buffer,
        };
        self.db.persist(m).unwrap();
    }
}

const MSGS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("msgs");
const META: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("meta");

struct Redb {
    db: redb::Database,
    mode: Mode,
}

impl Redb {
    fn open(dir: &Path, mode: Mode) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let db = redb::Database::create(dir.join("inbox.redb")).unwrap();
        Redb { db, mode }
    }

    fn write(&self) -> redb::WriteTransaction {
        let mut tx = self.db.begin_write().unwrap();
        let d = match self.mode {
            Mode::Fsync => redb::Durability::Immediate,
            Mode::Os => redb::Durability::None,
        };
        tx.set_durability(d).unwrap();
        tx
    }
}

fn redb_meta(t: &impl redb::ReadableTable<&'static [u8], &'static [u8]>, k: &[u8]) -> (u64, u64, u64) {
    t.get(k).unwrap().map(|v| meta_parse(v.value())).unwrap_or((0, 1, 0))
}

impl Engine for Redb {
    fn name(&self) -> &'static str {
        "redb"
    }

    fn append_group(&mut self, users: &[u64], payload: &[u8]) {
        let tx = self.write();
        {
            let mut msgs = tx.open_table(MSGS).unwrap();
            let mut meta = tx.open_table(META).unwrap();
            for &u in users {
                let name = user(u);
                let uk = user_key(&name);
                let (head, first, pos) = redb_meta(&meta, &uk);
                msgs.insert(msg_key(&name, head + 1).as_slice(), msg_value(head + 1, payload).as_slice()).unwrap();
                meta.insert(uk.as_slice(), meta_value(head + 1, first, pos).as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    fn cursor_group(&mut self, users: &[u64]) {
        let tx = self.write();
        {
            let mut meta = tx.open_table(META).unwrap();
            for &u in users {
                let uk = user_key(&user(u));
                let (head, first, _) = redb_meta(&meta, &uk);
                meta.insert(uk.as_slice(), meta_value(head, first, head).as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    fn read_page(&mut self, u: u64, after: u64) -> usize {
        let name = user(u);
        let tx = self.db.begin_read().unwrap();
        let t = tx.open_table(MSGS).unwrap();
        let (lo, hi) = (msg_key(&name, after + 1), msg_key(&name, u64::MAX));
        let mut n = 0;
        for kv in t.range(lo.as_slice()..=hi.as_slice()).unwrap().take(PAGE) {
            let (_k, v) = kv.unwrap();
            n += v.value().len().min(1);
        }
        n
    }

    fn head(&mut self, u: u64) -> u64 {
        let tx = self.db.begin_read().unwrap();
        let t = tx.open_table(META).unwrap();
        redb_meta(&t, &user_key(&user(u))).0
    }

    fn trim(&mut self, u: u64, upto: u64) -> u64 {
        // One transaction per user, as the store's retention pass would
        // commit them (the batch's sync comes after, in `sync`).
        let name = user(u);
        let uk = user_key(&name);
        let tx = self.write();
        let mut n = 0;
        {
            let mut msgs = tx.open_table(MSGS).unwrap();
            let mut meta = tx.open_table(META).unwrap();
            let (head, first, pos) = redb_meta(&meta, &uk);
            for seq in first..=upto.min(head) {
                msgs.remove(msg_key(&name, seq).as_slice()).unwrap();
                n += 1;
            }
            meta.insert(uk.as_slice(), meta_value(head, upto.min(head) + 1, pos).as_slice()).unwrap();
        }
        tx.commit().unwrap();
        n
    }

    fn sync(&mut self) {
        // An empty durable commit makes the earlier non-durable ones durable.
        let mut tx = self.db.begin_write().unwrap();
        tx.set_durability(redb::Durability::Immediate).unwrap();
        tx.commit().unwrap();
    }
}

/// A tiny deterministic generator (xorshift), so both engines see the same users.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let md = e.metadata().unwrap();
        total += if md.is_dir() { dir_bytes(&e.path()) } else { md.len() };
    }
    total
}

fn run(engine: &mut dyn Engine, mode: Mode, dir: &Path, phase: Duration) {
    let mode_name = if mode == Mode::Fsync { "fsync" } else { "os" };
    let payload = vec![0x5a; PAYLOAD_BYTES];
    let t = Instant::now();
    // Prefill in large groups: setup, not measured beyond its total.
    let mut users: Vec<u64> = Vec::with_capacity(1000);
    for _ in 0..PREFILL_PER_USER {
        for chunk in (0..USERS).collect::<Vec<_>>().chunks(5_000) {
            users.clear();
            users.extend_from_slice(chunk);
            engine.append_group(&users, &payload);
        }
    }
    engine.sync();
    println!(
        "{:<6} {:<5} prefill {} msgs in {:.1} s",
        engine.name(),
        mode_name,
        USERS * PREFILL_PER_USER,
        t.elapsed().as_secs_f64()
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for n in GROUPS {
        let (mut appends, mut syncs) = (0u64, 0u64);
        let t = Instant::now();
        while t.elapsed() < phase {
            users.clear();
            users.extend((0..n).map(|_| rng.next() % USERS));
            engine.append_group(&users, &payload);
            appends += n as u64;
            syncs += 1;
        }
        let s = t.elapsed().as_secs_f64();
        let (mut cursors, mut csyncs) = (0u64, 0u64);
        let t = Instant::now();
        while t.elapsed() < phase {
            users.clear();
            users.extend((0..n).map(|_| rng.next() % USERS));
            engine.cursor_group(&users);
            cursors += n as u64;
            csyncs += 1;
        }
        let cs = t.elapsed().as_secs_f64();
        println!(
            "{:<6} {:<5} N={:<4} appends/s {:>9.0}  syncs/s {:>7.0}  cursor updates/s {:>9.0}  (syncs/s {:>6.0})",
            engine.name(),
            mode_name,
            n,
            appends as f64 / s,
            syncs as f64 / s,
            cursors as f64 / cs,
            csyncs as f64 / cs
        );
    }
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let mut got = 0;
    for _ in 0..READS {
        let u = rng.next() % USERS;
        let head = engine.head(u);
        let after = rng.next() % head.saturating_sub(PAGE as u64).max(1);
        let t = Instant::now();
        got += engine.read_page(u, after);
        hist.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    assert!(got >= READS * PAGE / 2, "pages came back short: {got}");
    let t = Instant::now();
    let mut trimmed = 0;
    for u in 0..TRIM_USERS {
        let head = engine.head(u);
        trimmed += engine.trim(u, head - 1);
    }
    engine.sync();
    let ts = t.elapsed().as_secs_f64();
    println!(
        "{:<6} {:<5} read page of {PAGE}: p50 {:.1} us  p99 {:.1} us  max {:.1} us;  trim {:.0} msgs/s ({} users, one sync);  disk {:.1} MB",
        engine.name(),
        mode_name,
        hist.value_at_quantile(0.5) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.max() as f64 / 1e3,
        trimmed as f64 / ts,
        TRIM_USERS,
        dir_bytes(dir) as f64 / 1e6
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let phase =
        Duration::from_millis(std::env::var("STORE_BENCH_PHASE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_500));
    let base: PathBuf = std::env::var_os("STORE_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let root = base.join(format!("switchboard-store-bench-{}", std::process::id()));
    for mode in [Mode::Fsync, Mode::Os] {
        for which in ["fjall", "redb"] {
            let dir = root.join(format!("{which}-{}", if mode == Mode::Fsync { "fsync" } else { "os" }));
            let _ = std::fs::remove_dir_all(&dir);
            {
                let mut engine: Box<dyn Engine> = match which {
                    "fjall" => Box::new(Fjall::open(&dir, mode)),
                    _ => Box::new(Redb::open(&dir, mode)),
                };
                run(engine.as_mut(), mode, &dir, phase);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
