//! The user directory: user id → that user's live connections.
//!
//! Owns: the map read by every push to a user, from any thread, and written
//! by workers when a connection logs in or closes.
//! Must not: hold a lock across anything but a hash lookup and a copy of at
//! most `max_conns_per_user` ids; know anything about sockets or workers.
//!
//! Sharded: 64 shards, each a `RwLock` over a raw hash table. A push takes
//! one shard's read lock for one lookup, so pushes to different users never
//! contend and pushes to the same user share the lock. Per user an entry is
//! 32 bytes in the table: the name (an `Arc<str>` shared with the
//! connections, one allocation per user) and the user's connections, inline
//! when there is one (the common case), on the heap for several devices.

use std::hash::BuildHasher;
use std::sync::{Arc, RwLock};

use hashbrown::HashTable;
use smallvec::SmallVec;

use crate::ids::ConnId;

const SHARDS: usize = 64;
const _: () = assert!(SHARDS.is_power_of_two());

/// Connections of one user, as returned by lookups (inline up to two).
pub type ConnList = SmallVec<[ConnId; 2]>;

/// Registering one more connection would pass `max_conns_per_user`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TooManyConnections {
    pub limit: usize,
}

/// A user's connections: one inline, several on the heap.
enum Conns {
    One(ConnId),
    Many(Box<Vec<ConnId>>),
}

impl Conns {
    fn as_slice(&self) -> &[ConnId] {
        match self {
            Conns::One(c) => std::slice::from_ref(c),
            Conns::Many(v) => v,
        }
    }
}

struct UserEntry {
    name: Arc<str>,
    conns: Conns,
}

const _: () = assert!(std::mem::size_of::<UserEntry>() == 32);

type Shard = RwLock<HashTable<UserEntry>>;

/// Concurrent user directory.
pub struct Directory {
    shards: Box<[Shard]>,
    hasher: hashbrown::DefaultHashBuilder,
    max_conns_per_user: usize,
}

impl Directory {
    pub fn new(max_conns_per_user: usize) -> Directory {
        Directory::with_capacity(max_conns_per_user, 0)
    }

    /// A directory sized for `users` users up front: a table that grows by
    /// doubling leaves its old buckets behind in the allocator, which costs
    /// more resident memory than reserving once (untouched buckets are not
    /// resident).
    pub fn with_capacity(max_conns_per_user: usize, users: usize) -> Directory {
        let per_shard = users.div_ceil(SHARDS);
        Directory {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::with_capacity(per_shard))).collect(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            max_conns_per_user,
        }
    }

    fn hash(&self, user: &str) -> u64 {
        self.hasher.hash_one(user)
    }

    fn shard(&self, hash: u64) -> &Shard {
        // The table uses the low bits; the top bits pick the shard.
        &self.shards[(hash >> 58) as usize & (SHARDS - 1)]
    }

    /// Adds `conn` to `user`'s connections. Returns the shared name to keep
    /// in the connection (one allocation per user, not per device).
    pub fn register(&self, user: &str, conn: ConnId) -> Result<Arc<str>, TooManyConnections> {
        let h = self.hash(user);
        let mut table = self.shard(h).write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.find_mut(h, |e| &*e.name == user) {
            let n = e.conns.as_slice().len();
            if n >= self.max_conns_per_user {
                return Err(TooManyConnections { limit: self.max_conns_per_user });
            }
            debug_assert!(!e.conns.as_slice().contains(&conn), "{conn:?} registered twice");
            match &mut e.conns {
                Conns::One(first) => e.conns = Conns::Many(Box::new(vec![*first, conn])),
                Conns::Many(v) => v.push(conn),
            }
            return Ok(e.name.clone());
        }
        let name: Arc<str> = Arc::from(user);
        let hasher = &self.hasher;
        table
            .insert_unique(h, UserEntry { name: name.clone(), conns: Conns::One(conn) }, |e| hasher.hash_one(&*e.name));
        Ok(name)
    }

    /// Removes `conn` from `user`'s connections; returns whether it was there.
    pub fn unregister(&self, user: &str, conn: ConnId) -> bool {
        let h = self.hash(user);
        let mut table = self.shard(h).write().unwrap_or_else(|e| e.into_inner());
        let Ok(mut slot) = table.find_entry(h, |e| &*e.name == user) else {
            return false;
        };
        let e = slot.get_mut();
        match &mut e.conns {
            Conns::One(c) if *c == conn => {
                slot.remove();
                true
            }
            Conns::One(_) => false,
            Conns::Many(v) => {
                let Some(pos) = v.iter().position(|c| *c == conn) else { return false };
                v.swap_remove(pos);
                if v.len() == 1 {
                    e.conns = Conns::One(v[0]);
                }
                true
            }
        }
    }

    /// Copies `user`'s connections into `out` (cleared first).
    pub fn lookup_into(&self, user: &str, out: &mut ConnList) {
        out.clear();
        let h = self.hash(user);
        let table = self.shard(h).read().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.find(h, |e| &*e.name == user) {
            out.extend_from_slice(e.conns.as_slice());
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
        let h = self.hash(user);
        self.shard(h).read().unwrap_or_else(|e| e.into_inner()).find(h, |e| &*e.name == user).is_some()
    }

    /// Users with at least one connection (walks every shard; for stats).
    pub fn user_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len()).sum()
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
