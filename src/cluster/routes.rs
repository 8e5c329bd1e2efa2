//! The route cache: which other nodes hold connections of a user, as last
//! read from Redis, for at most `cluster.route_cache_ms`.
//!
//! Owns: the bounded map user → nodes (an empty list, "on no other node",
//! is cached too: most pushes are for users who are local or offline) and
//! its rules: an entry is used for at most `ttl_ms` after it was read; a
//! login of the user on any node drops it (the `Login` record every node
//! receives); a reconnection to Redis drops them all.
//! Must not: do I/O or read a clock (the caller passes `now_ms`); grow
//! past its bound: when full, expired entries go first, then an eighth of
//! the rest, whichever the map's order yields (it is a cache: an entry
//! dropped early costs one more lookup).

use std::sync::Arc;

use hashbrown::HashMap;
use smallvec::SmallVec;

/// The other nodes holding connections of one user.
pub type Nodes = SmallVec<[Arc<str>; 2]>;

struct Entry {
    nodes: Nodes,
    read_ms: u64,
}

/// See the module doc.
pub struct RouteCache {
    map: HashMap<Arc<str>, Entry>,
    max_entries: usize,
    ttl_ms: u64,
}

impl RouteCache {
    pub fn new(max_entries: usize, ttl_ms: u64) -> RouteCache {
        RouteCache { map: HashMap::new(), max_entries: max_entries.max(1), ttl_ms }
    }

    /// The cached nodes of `user`, if read less than `ttl_ms` ago.
    pub fn get(&self, user: &str, now_ms: u64) -> Option<&Nodes> {
        self.map.get(user).filter(|e| now_ms.saturating_sub(e.read_ms) < self.ttl_ms).map(|e| &e.nodes)
    }

    /// Records what Redis said about `user` at `read_ms`.
    pub fn insert(&mut self, user: Arc<str>, nodes: Nodes, read_ms: u64) {
        if self.map.len() >= self.max_entries && !self.map.contains_key(&*user) {
            self.make_room(read_ms);
        }
        self.map.insert(user, Entry { nodes, read_ms });
    }

    /// `user` logged in somewhere: the next push looks it up again.
    pub fn forget(&mut self, user: &str) {
        self.map.remove(user);
    }

    /// Forgets every entry (after a reconnection to Redis, when `Login`
    /// records may have been missed).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn make_room(&mut self, now_ms: u64) {
        let ttl = self.ttl_ms;
        self.map.retain(|_, e| now_ms.saturating_sub(e.read_ms) < ttl);
        if self.map.len() >= self.max_entries {
            let drop = (self.max_entries / 8).max(1);
            let victims: Vec<Arc<str>> = self.map.keys().take(drop).cloned().collect();
            for k in victims {
                self.map.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: &[&str]) -> Nodes {
        n.iter().map(|s| Arc::from(*s)).collect()
    }

    #[test]
    fn an_entry_lives_for_the_ttl_and_a_login_drops_it() {
        let mut c = RouteCache::new(10, 1000);
        c.insert("u".into(), nodes(&["b"]), 5_000);
        assert_eq!(c.get("u", 5_999).map(|n| n.len()), Some(1));
        assert!(c.get("u", 6_000).is_none(), "used at most ttl_ms after it was read");
        c.insert("u".into(), nodes(&[]), 6_000);
        assert_eq!(c.get("u", 6_001).map(|n| n.len()), Some(0), "on no other node is cached too");
        c.forget("u");
        assert!(c.get("u", 6_001).is_none());
    }

    #[test]
    fn it_never_holds_more_than_its_bound_and_drops_the_expired_first() {
        let mut c = RouteCache::new(64, 1000);
        for i in 0..32 {
            c.insert(format!("old{i}").into(), nodes(&[]), 0);
        }
        for i in 0..32 {
            c.insert(format!("new{i}").into(), nodes(&["x"]), 900);
        }
        assert_eq!(c.len(), 64);
        c.insert("one-more".into(), nodes(&[]), 1_500);
        assert_eq!(c.len(), 33, "the 32 expired entries went, nothing else");
        for i in 0..10_000 {
            c.insert(format!("u{i}").into(), nodes(&[]), 1_600);
            assert!(c.len() <= 64);
        }
        assert!(c.get("u9999", 1_600).is_some(), "the newest entry is kept");
        c.clear();
        assert!(c.is_empty());
    }
}
