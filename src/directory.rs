//! The user directory: user id → that user's live connections.
//!
//! Owns: the map read by every push to a user, from any thread, and written
//! by workers when a connection logs in or closes.
//! Must not: hold a lock across anything but a hash lookup and a copy of at
//! most `max_conns_per_user` ids; know anything about sockets or workers.
//!
//! A lock-free hash map (papaya): a lookup takes no lock and writes no
//! shared memory, so pushes and SENDs on different cores never bounce a
//! lock's cache line between them (with a sharded `RwLock`, that bounce was
//! ~40% of a worker's user time per relayed message, measured with perf
//! at 60,000 msgs/s). Writers (logins, logouts) replace a user's entry
//! atomically. Per user the entry holds the name (an `Arc<str>` shared with
//! the connections, one allocation per user) and the user's connections,
//! inline when there is one (the common case), on the heap for several
//! devices.
//!
//! The map resizes in papaya's blocking mode: the write that finds the
//! table full finishes the copy (other writers help). In papaya 0.2.5's
//! default incremental mode a copy advances a chunk at a time in `insert`
//! and `remove`, never in `compute` (nor in `update`, built on it) — and
//! `compute` is how every write here is done (the per-user limit is checked
//! and applied in one step). A removed user leaves a tombstone, and an
//! insert never reuses one, so every few tens of thousands of logins fill
//! the table and start a copy to a fresh table that no write ever
//! finished: each old table stayed alive in a chain, and every operation
//! probed through all of them. Measured: a server sized for 19,920
//! connections kept one more 295 KB table per ~33,000 logins (~9 bytes per
//! login/logout, without end; issue 9). In blocking mode the old table is
//! retired as soon as the copy is done; `tests/directory_churn.rs` pins it.
//!
//! A user whose last connection closes is not removed at once: the entry
//! stays, marked offline (an update in place, which leaves no tombstone),
//! and a later login of the same user revives it in place. Removing it at
//! once made a user who logs in and out again and again fill its own probe
//! sequence with tombstones, and every ~5·log2(slots) of its logins copied
//! the whole table (measured with `cargo bench -p switchboard-bench --bench
//! directory_churn` in a table sized for a million with 500,000 users online: 2.09 ms per login
//! on average, pauses of 0.2 s): one hostile client could keep a worker
//! busy rebuilding. Each user going offline is queued with the time it
//! went; [`Directory::sweep`] (the server's `sb-directory` thread, once a
//! second) removes those still offline since then after
//! [`OFFLINE_LINGER_S`], off the workers. A user who logs in again within
//! the linger costs no removal at all, so a flapping user leaves no
//! tombstones (`tests/directory_flap.rs` pins that it never rebuilds the
//! table). What it costs: the users who went offline in the last
//! [`OFFLINE_LINGER_S`] keep their entry (~100 bytes with its slot and
//! queue item): 10,000 disconnects a second keep about 10 MB.
//!
//! What blocking mode still costs: when removed users' tombstones have
//! filled a table, the write that finds it full copies it whole, and other
//! writers to that table wait (lookups do not). The users are spread over
//! `SHARDS` independent maps, so a copy is 1/64 of the users: with
//! 500,000 users online in a directory sized for a million, the slowest of
//! 3,000,000 logins took 8.1 ms, against 416 ms with one map (`cargo bench
//! -p switchboard-bench --bench directory_churn`, sweeping every 1,000 logins with no linger,
//! the most tombstones). A flapping user there: 0.52 µs per login, against
//! 2.09 ms when its entry was removed at each logout. Lookups pay one more
//! hash to pick the shard (`cargo bench -p switchboard-bench --bench micro -- directory`: a miss
//! ~38 → ~42 ns; hits within the run-to-run noise of ±20% on this host).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_queue::SegQueue;

use papaya::{Compute, Operation};
use smallvec::SmallVec;

use crate::ids::ConnId;

/// Connections of one user, as returned by lookups (inline up to two).
pub type ConnList = SmallVec<[ConnId; 2]>;

/// Registering one more connection would pass `max_conns_per_user`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TooManyConnections {
    pub limit: usize,
}

/// How long a user's entry is kept after its last connection closed (so a
/// reconnect revives it in place instead of leaving a tombstone), at least.
pub const OFFLINE_LINGER_S: u32 = 10;

/// A user's connections: none (offline since a time, kept for a while),
/// one inline, several on the heap.
#[derive(Clone, Debug)]
enum Conns {
    /// Offline since this many seconds after the directory's epoch.
    Offline(u32),
    One(ConnId),
    Many(Box<[ConnId]>),
}

impl Conns {
    fn as_slice(&self) -> &[ConnId] {
        match self {
            Conns::Offline(_) => &[],
            Conns::One(c) => std::slice::from_ref(c),
            Conns::Many(v) => v,
        }
    }

    fn with(&self, conn: ConnId) -> Conns {
        if let Conns::Offline(_) = self {
            return Conns::One(conn);
        }
        let mut v = self.as_slice().to_vec();
        v.push(conn);
        Conns::Many(v.into_boxed_slice())
    }

    fn without(&self, conn: ConnId) -> Conns {
        let v: Vec<ConnId> = self.as_slice().iter().copied().filter(|&c| c != conn).collect();
        match v.as_slice() {
            [one] => Conns::One(*one),
            _ => Conns::Many(v.into_boxed_slice()),
        }
    }
}

/// Independent maps the users are spread over (by a hash of their id): a
/// table rebuild copies one of them, so it pauses writers 1/64 as long.
const SHARDS: usize = 64;

type Map = papaya::HashMap<Arc<str>, Conns, hashbrown::DefaultHashBuilder>;

/// Concurrent user directory.
pub struct Directory {
    /// Each with its own hasher seed, independent of `pick`'s, so the users
    /// of one shard still spread over its whole table.
    shards: Box<[Map]>,
    /// Chooses a user's shard.
    pick: hashbrown::DefaultHashBuilder,
    max_conns_per_user: usize,
    /// Entries marked offline and not yet swept.
    offline: AtomicUsize,
    /// Users who went offline, with when, oldest first (roughly: pushes
    /// from different threads may be a second out of order).
    went_offline: SegQueue<(Arc<str>, u32)>,
    /// The sweeper's look at the queue's head that was not due yet.
    next_due: Mutex<Option<(Arc<str>, u32)>>,
    /// Time base of the offline marks.
    epoch: Instant,
}

impl Directory {
    pub fn new(max_conns_per_user: usize) -> Directory {
        Directory::with_capacity(max_conns_per_user, 0)
    }

    /// A directory sized for `users` users up front, so it does not grow
    /// (and copy itself) while a connect storm logs users in.
    pub fn with_capacity(max_conns_per_user: usize, users: usize) -> Directory {
        let per_shard = users.div_ceil(SHARDS);
        let shards = (0..SHARDS)
            .map(|_| {
                papaya::HashMap::builder()
                    .capacity(per_shard)
                    .resize_mode(papaya::ResizeMode::Blocking)
                    .hasher(hashbrown::DefaultHashBuilder::default())
                    .build()
            })
            .collect();
        Directory {
            shards,
            pick: hashbrown::DefaultHashBuilder::default(),
            max_conns_per_user,
            offline: AtomicUsize::new(0),
            went_offline: SegQueue::new(),
            next_due: Mutex::new(None),
            epoch: Instant::now(),
        }
    }

    /// The map holding `user`.
    fn map(&self, user: &str) -> &Map {
        &self.shards[self.pick.hash_one(user) as usize % SHARDS]
    }

    fn now_s(&self) -> u32 {
        self.epoch.elapsed().as_secs().min(u32::MAX as u64) as u32
    }

    /// Adds `conn` to `user`'s connections. Returns the shared name to keep
    /// in the connection (one allocation per user, not per device).
    pub fn register(&self, user: &str, conn: ConnId) -> Result<Arc<str>, TooManyConnections> {
        let map = self.map(user).pin();
        let limit = self.max_conns_per_user;
        let r = map.compute(Arc::from(user), |entry| match entry {
            Some((_, v)) if v.as_slice().len() >= limit => Operation::Abort(()),
            Some((_, v)) => {
                debug_assert!(!v.as_slice().contains(&conn), "{conn:?} registered twice");
                Operation::Insert(v.with(conn))
            }
            None => Operation::Insert(Conns::One(conn)),
        });
        match r {
            Compute::Updated { old: (k, Conns::Offline(_)), .. } => {
                self.offline.fetch_sub(1, Ordering::Relaxed);
                Ok(k.clone())
            }
            Compute::Inserted(k, _) | Compute::Updated { old: (k, _), .. } => Ok(k.clone()),
            Compute::Aborted(()) => Err(TooManyConnections { limit }),
            Compute::Removed(..) => unreachable!("register never removes"),
        }
    }

    /// Removes `conn` from `user`'s connections; returns whether it was there.
    /// The user's last connection leaves the entry marked offline (see the
    /// module doc), for [`Directory::sweep`] to remove later.
    pub fn unregister(&self, user: &str, conn: ConnId) -> bool {
        let map = self.map(user).pin();
        let now = self.now_s();
        let r = map.compute(Arc::from(user), |entry| match entry {
            Some((_, v)) if !v.as_slice().contains(&conn) => Operation::Abort(()),
            Some((_, v)) if v.as_slice().len() == 1 => Operation::Insert(Conns::Offline(now)),
            Some((_, v)) => Operation::Insert(v.without(conn)),
            None => Operation::Abort(()),
        });
        match r {
            Compute::Updated { new: (k, Conns::Offline(since)), .. } => {
                self.offline.fetch_add(1, Ordering::Relaxed);
                self.went_offline.push((k.clone(), *since));
                true
            }
            Compute::Aborted(()) => false,
            _ => true,
        }
    }

    /// Removes the users who went offline at least `min_age_s` seconds ago
    /// and have stayed offline since (one who logged in again, or went
    /// offline again later, is not touched). Returns how many went. Work in
    /// proportion to the users who went offline, never a pass over the
    /// table; meant for a background thread, about once a second.
    pub fn sweep(&self, min_age_s: u32) -> usize {
        let now = self.now_s();
        let mut next_due = self.next_due.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        while let Some((user, since)) = next_due.take().or_else(|| self.went_offline.pop()) {
            if now.saturating_sub(since) < min_age_s {
                *next_due = Some((user, since));
                break;
            }
            let map = self.map(&user).pin();
            if let Ok(Some(_)) = map.remove_if(&user, |_, v| matches!(v, Conns::Offline(s) if *s == since)) {
                removed += 1;
            }
        }
        self.offline.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Copies `user`'s connections into `out` (cleared first).
    pub fn lookup_into(&self, user: &str, out: &mut ConnList) {
        out.clear();
        if let Some(v) = self.map(user).pin().get(user) {
            out.extend_from_slice(v.as_slice());
        }
    }

    /// `user`'s connections.
    pub fn lookup(&self, user: &str) -> ConnList {
        let mut out = ConnList::new();
        self.lookup_into(user, &mut out);
        out
    }

    /// Whether `user` has at least one live connection.
    pub fn is_online(&self, user: &str) -> bool {
        self.map(user).pin().get(user).is_some_and(|v| !v.as_slice().is_empty())
    }

    /// Calls `f` with every user who has at least one connection (a walk
    /// over the whole table: for rare, whole-node work such as re-writing
    /// a cluster node's presence after Redis came back).
    pub fn for_each_online(&self, mut f: impl FnMut(&Arc<str>)) {
        for shard in self.shards.iter() {
            for (user, conns) in shard.pin().iter() {
                if !conns.as_slice().is_empty() {
                    f(user);
                }
            }
        }
    }

    /// Users with at least one connection.
    pub fn user_count(&self) -> usize {
        let entries: usize = self.shards.iter().map(|m| m.len()).sum();
        entries.saturating_sub(self.offline.load(Ordering::Relaxed))
    }

    /// Entries of users whose last connection closed, not swept yet.
    pub fn offline_count(&self) -> usize {
        self.offline.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::WorkerId;

    fn c(slot: u32) -> ConnId {
        ConnId::new(WorkerId(0), slot, 1)
    }

    #[test]
    fn register_lookup_unregister() {
        let d = Directory::new(3);
        let k1 = d.register("alice", c(1)).unwrap();
        let k2 = d.register("alice", c(2)).unwrap();
        assert!(Arc::ptr_eq(&k1, &k2), "devices share one name");
        assert!(d.is_online("alice"));
        assert_eq!(d.lookup("alice").as_slice(), &[c(1), c(2)]);
        assert!(d.unregister("alice", c(1)));
        assert!(!d.unregister("alice", c(1)), "removing twice finds nothing");
        assert_eq!(d.lookup("alice").as_slice(), &[c(2)]);
        assert!(!d.unregister("alice", c(7)), "a connection the user never had");
        assert!(d.unregister("alice", c(2)));
        assert!(!d.is_online("alice"));
        assert_eq!(d.user_count(), 0);
    }

    #[test]
    fn per_user_limit_is_enforced() {
        let d = Directory::new(2);
        d.register("u", c(1)).unwrap();
        d.register("u", c(2)).unwrap();
        assert_eq!(d.register("u", c(3)), Err(TooManyConnections { limit: 2 }));
        assert_eq!(d.lookup("u").len(), 2);
    }

    #[test]
    fn many_users_many_devices() {
        let d = Directory::new(8);
        for u in 0..500u32 {
            for dev in 0..(u % 4 + 1) {
                d.register(&format!("user{u}"), c(u * 10 + dev)).unwrap();
            }
        }
        assert_eq!(d.user_count(), 500);
        for u in 0..500u32 {
            let mut got: Vec<_> = d.lookup(&format!("user{u}")).to_vec();
            got.sort();
            let want: Vec<_> = (0..(u % 4 + 1)).map(|dev| c(u * 10 + dev)).collect();
            assert_eq!(got, want);
        }
        for u in 0..500u32 {
            for dev in 0..(u % 4 + 1) {
                assert!(d.unregister(&format!("user{u}"), c(u * 10 + dev)));
            }
        }
        assert_eq!(d.user_count(), 0);
    }

    #[test]
    fn a_user_going_offline_is_kept_until_swept_and_a_login_revives_it() {
        let d = Directory::new(4);
        let k1 = d.register("ann", c(1)).unwrap();
        assert!(d.unregister("ann", c(1)));
        assert!(!d.is_online("ann"));
        assert!(d.lookup("ann").is_empty());
        assert_eq!((d.user_count(), d.offline_count()), (0, 1));
        assert!(!d.unregister("ann", c(1)), "nothing to remove from an offline user");
        // A login revives the entry in place.
        let k2 = d.register("ann", c(2)).unwrap();
        assert_eq!(k1, k2);
        assert_eq!((d.user_count(), d.offline_count()), (1, 0));
        assert!(d.unregister("ann", c(2)));
        d.register("bob", c(3)).unwrap();
        // Too young to sweep with a linger; swept with none.
        assert_eq!(d.sweep(OFFLINE_LINGER_S), 0);
        assert_eq!(d.sweep(0), 1);
        assert_eq!((d.user_count(), d.offline_count()), (1, 0));
        assert!(d.is_online("bob") && !d.is_online("ann"));
        // A user who went offline, came back and went again is removed once,
        // for the last time it went.
        for i in 0..3 {
            let k = d.register("cy", c(10 + i)).unwrap();
            assert!(d.unregister(&k, c(10 + i)));
        }
        assert_eq!(d.offline_count(), 1);
        assert_eq!(d.sweep(0), 1);
        assert_eq!(d.offline_count(), 0);
        assert_eq!(d.sweep(0), 0);
    }

    #[test]
    fn concurrent_readers_and_writers() {
        let d = Arc::new(Directory::new(4));
        let writers: Vec<_> = (0..4u32)
            .map(|w| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u32 {
                        let user = format!("u{}", i % 100);
                        let conn = ConnId::new(WorkerId(w as u8), i, 1);
                        if d.register(&user, conn).is_ok() {
                            assert!(d.unregister(&user, conn));
                        }
                    }
                })
            })
            .collect();
        for i in 0..20_000 {
            let _ = d.lookup(&format!("u{}", i % 100));
        }
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(d.user_count(), 0);
    }
}
