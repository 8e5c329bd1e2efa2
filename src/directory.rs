//! The user directory: user id → that user's live connections.
//!
//! Owns: the map read by every push to a user, from any thread, and written
//! by workers when a connection logs in or closes.
//! Must not: hold a lock across anything but a hash lookup and a copy of at
//! most `max_conns_per_user` ids; know anything about sockets or workers.
//!
//! Sharded: 64 shards, each a `RwLock<HashMap>`. A push takes one shard's
//! read lock for one lookup, so pushes to different users never contend and
//! pushes to the same user share the lock. Per user the entry costs the key
//! (an `Arc<str>` shared with the connections), a hash bucket and an inline
//! vector of two `ConnId`s (more devices spill to the heap).

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, RwLock};

use hashbrown::HashMap;
use smallvec::SmallVec;

use crate::ids::ConnId;

const SHARDS: usize = 64;
const _: () = assert!(SHARDS.is_power_of_two());

/// Connections of one user, inline up to two.
pub type ConnList = SmallVec<[ConnId; 2]>;

/// Registering one more connection would pass `max_conns_per_user`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TooManyConnections {
    pub limit: usize,
}

type Shard = RwLock<HashMap<Arc<str>, ConnList>>;

/// Concurrent user directory.
pub struct Directory {
    shards: Box<[Shard]>,
    hasher: hashbrown::DefaultHashBuilder,
    max_conns_per_user: usize,
}

impl Directory {
    pub fn new(max_conns_per_user: usize) -> Directory {
        Directory {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            max_conns_per_user,
        }
    }

    fn shard(&self, user: &str) -> &Shard {
        let mut h = self.hasher.build_hasher();
        user.hash(&mut h);
        // The map hashes again with its own seed; the top bits pick the shard.
        &self.shards[(h.finish() >> 58) as usize & (SHARDS - 1)]
    }

    /// Adds `conn` to `user`'s connections. Returns the shared key to keep
    /// in the connection (one allocation per user, not per device).
    pub fn register(&self, user: &str, conn: ConnId) -> Result<Arc<str>, TooManyConnections> {
        let mut map = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        if let Some((key, list)) = map.get_key_value_mut(user) {
            if list.len() >= self.max_conns_per_user {
                return Err(TooManyConnections { limit: self.max_conns_per_user });
            }
            debug_assert!(!list.contains(&conn), "{conn:?} registered twice");
            list.push(conn);
            return Ok(key.clone());
        }
        let key: Arc<str> = Arc::from(user);
        let mut list = ConnList::new();
        list.push(conn);
        map.insert(key.clone(), list);
        Ok(key)
    }

    /// Removes `conn` from `user`'s connections; returns whether it was there.
    pub fn unregister(&self, user: &str, conn: ConnId) -> bool {
        let mut map = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        let Some(list) = map.get_mut(user) else {
            return false;
        };
        let Some(pos) = list.iter().position(|c| *c == conn) else {
            return false;
        };
        list.swap_remove(pos);
        if list.is_empty() {
            map.remove(user);
        }
        true
    }

    /// Copies `user`'s connections into `out` (cleared first).
    pub fn lookup_into(&self, user: &str, out: &mut ConnList) {
        out.clear();
        let map = self.shard(user).read().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = map.get(user) {
            out.extend_from_slice(list);
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
        self.shard(user).read().unwrap_or_else(|e| e.into_inner()).contains_key(user)
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
        assert!(Arc::ptr_eq(&k1, &k2), "devices share one key");
        assert!(d.is_online("alice"));
        assert_eq!(d.lookup("alice").as_slice(), &[c(1), c(2)]);
        assert!(d.unregister("alice", c(1)));
        assert!(!d.unregister("alice", c(1)), "removing twice finds nothing");
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
