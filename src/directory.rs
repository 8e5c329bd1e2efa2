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
//! What blocking mode costs: the write that finds the table full copies it
//! whole, so that one login waits for the copy (`cargo bench --bench
//! directory_churn`: a few ms at this host's 19,920 connections, about
//! 0.3 s with 500,000 users online in a table sized for a million), once
//! per table's worth of logins. One user logging in and out again and
//! again fills its own probe sequence with tombstones and brings that copy
//! every ~5·log2(slots) of its logins. Both were there before too (the
//! incremental copies never finished, and every operation walked the chain).

use std::sync::Arc;

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

/// A user's connections: one inline, several on the heap.
#[derive(Clone, Debug)]
enum Conns {
    One(ConnId),
    Many(Box<[ConnId]>),
}

impl Conns {
    fn as_slice(&self) -> &[ConnId] {
        match self {
            Conns::One(c) => std::slice::from_ref(c),
            Conns::Many(v) => v,
        }
    }

    fn with(&self, conn: ConnId) -> Conns {
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

/// Concurrent user directory.
pub struct Directory {
    map: papaya::HashMap<Arc<str>, Conns, hashbrown::DefaultHashBuilder>,
    max_conns_per_user: usize,
}

impl Directory {
    pub fn new(max_conns_per_user: usize) -> Directory {
        Directory::with_capacity(max_conns_per_user, 0)
    }

    /// A directory sized for `users` users up front, so it does not grow
    /// (and copy itself) while a connect storm logs users in.
    pub fn with_capacity(max_conns_per_user: usize, users: usize) -> Directory {
        let map = papaya::HashMap::builder()
            .capacity(users)
            .resize_mode(papaya::ResizeMode::Blocking)
            .hasher(hashbrown::DefaultHashBuilder::default())
            .build();
        Directory { map, max_conns_per_user }
    }

    /// Adds `conn` to `user`'s connections. Returns the shared name to keep
    /// in the connection (one allocation per user, not per device).
    pub fn register(&self, user: &str, conn: ConnId) -> Result<Arc<str>, TooManyConnections> {
        let map = self.map.pin();
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
            Compute::Inserted(k, _) | Compute::Updated { old: (k, _), .. } => Ok(k.clone()),
            Compute::Aborted(()) => Err(TooManyConnections { limit }),
            Compute::Removed(..) => unreachable!("register never removes"),
        }
    }

    /// Removes `conn` from `user`'s connections; returns whether it was there.
    pub fn unregister(&self, user: &str, conn: ConnId) -> bool {
        let map = self.map.pin();
        let r = map.compute(Arc::from(user), |entry| match entry {
            Some((_, v)) if !v.as_slice().contains(&conn) => Operation::Abort(()),
            Some((_, v)) if v.as_slice().len() == 1 => Operation::Remove,
            Some((_, v)) => Operation::Insert(v.without(conn)),
            None => Operation::Abort(()),
        });
        !matches!(r, Compute::Aborted(()))
    }

    /// Copies `user`'s connections into `out` (cleared first).
    pub fn lookup_into(&self, user: &str, out: &mut ConnList) {
        out.clear();
        if let Some(v) = self.map.pin().get(user) {
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
        self.map.pin().contains_key(user)
    }

    /// Users with at least one connection.
    pub fn user_count(&self) -> usize {
        self.map.len()
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
