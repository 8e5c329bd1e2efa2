//! The users' send budgets on this server (`limits.send_rate`,
//! `limits.send_bytes_rate`; the buckets and their rule are
//! `proto::rate`): one per user, shared by the user's connections on every
//! worker thread.
//!
//! Owns: the table user → [`Budget`], in [`SHARDS`] maps under a lock each,
//! and the sweep that drops the budgets that are full again.
//! Must not: hold an entry for a user whose budget is full (an idle user
//! then costs nothing here, and a table of every user who ever sent would
//! grow without bound); hold a lock across anything but a hash lookup and
//! a budget's arithmetic.
//!
//! Why shared and not one table per worker, as the first version had it: a
//! user's connections land on the workers as the kernel spreads them, so a
//! client opening one connection per worker got `server.workers` budgets
//! (`tests/hardening.rs`, `a_users_connections_on_every_worker_share_one_budget`:
//! 10 SENDs taken on two workers where a burst of 5 was set; a 32-core
//! host would have given 32 times the rate set). What it costs: a lock per
//! budgeted frame (SEND, SEND_EX, PUBLISH, MESSAGE, FETCH), and only while
//! a budget is configured (off by default). With 64 shards two workers
//! meet on one lock only for users of one shard at the same moment.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_utils::CachePadded;

use crate::proto::rate::{Budget, SendLimit};

/// Maps of the table; each a lock of its own on a cache line of its own.
const SHARDS: usize = 64;

type Map = hashbrown::HashMap<Arc<str>, Budget>;

pub(crate) struct Budgets {
    shards: Box<[CachePadded<Mutex<Map>>]>,
    /// Chooses a user's shard.
    pick: hashbrown::DefaultHashBuilder,
}

impl Budgets {
    pub(crate) fn new() -> Budgets {
        Budgets {
            shards: (0..SHARDS).map(|_| CachePadded::new(Mutex::new(Map::default()))).collect(),
            pick: hashbrown::DefaultHashBuilder::default(),
        }
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Map> {
        // A panic under the lock leaves at worst one user's budget as it
        // was: nothing to refuse the others for.
        self.shards[shard].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on `user`'s budget (`None`: full, no entry) and keeps what
    /// it leaves there: an entry while `Some`, none once `None`.
    pub(crate) fn with<R>(&self, user: &Arc<str>, f: impl FnOnce(&mut Option<Budget>) -> R) -> R {
        let mut map = self.lock(self.pick.hash_one(&**user) as usize % SHARDS);
        // One lookup while the user's budget stays kept; a second only to
        // add or drop its entry.
        if let Some(b) = map.get_mut(&**user) {
            let mut kept = Some(*b);
            let r = f(&mut kept);
            match kept {
                Some(k) => *b = k,
                None => {
                    map.remove(&**user);
                }
            }
            return r;
        }
        let mut kept = None;
        let r = f(&mut kept);
        if let Some(k) = kept {
            map.insert(user.clone(), k);
        }
        r
    }

    /// Drops the budgets that are full again at `now_ms` from the shards
    /// that are `part`'s of `parts` (each worker sweeps its own share, so
    /// every shard is swept once a tick and no two workers wait on one
    /// another for it), and gives their memory back when most is unused.
    pub(crate) fn drop_full(&self, limit: &SendLimit, now_ms: u64, part: usize, parts: usize) {
        for shard in (part..SHARDS).step_by(parts.max(1)) {
            let mut map = self.lock(shard);
            if map.is_empty() && map.capacity() == 0 {
                continue;
            }
            map.retain(|_, b| !b.is_full(limit, now_ms));
            let len = map.len();
            if map.capacity() > 64 && len < map.capacity() / 4 {
                map.shrink_to(len * 2);
            }
        }
    }

    /// Budgets below full (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        (0..SHARDS).map(|s| self.lock(s).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(b: &Budgets, user: &Arc<str>, limit: &SendLimit, now_ms: u64) -> bool {
        b.with(user, |kept| {
            let mut budget = kept.unwrap_or_else(|| Budget::full(limit, now_ms));
            let spent = budget.spend(limit, now_ms, 1).is_ok();
            *kept = (!budget.is_full(limit, now_ms)).then_some(budget);
            spent
        })
    }

    /// Two threads spending one user's budget at once share its burst:
    /// exactly the burst is taken, whichever thread takes it; and the
    /// entry goes once the buckets are full again, swept in parts.
    #[test]
    fn threads_share_a_users_budget_and_full_budgets_go() {
        let limit = SendLimit::new(1, 100, 0, 0, 0).unwrap();
        let budgets = Arc::new(Budgets::new());
        let user: Arc<str> = Arc::from("wide");
        let taken: usize = (0..2)
            .map(|_| {
                let (budgets, user) = (budgets.clone(), user.clone());
                std::thread::spawn(move || (0..150).filter(|_| spend(&budgets, &user, &limit, 1_000)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(taken, 100, "one burst of 100 over both threads");
        assert!(spend(&budgets, &Arc::from("other"), &limit, 1_000), "another user's budget is its own");
        assert_eq!(budgets.len(), 2);
        // 100 s later both are full again; each part sweeps its own shards.
        budgets.drop_full(&limit, 101_000, 0, 2);
        budgets.drop_full(&limit, 101_000, 1, 2);
        assert_eq!(budgets.len(), 0);
    }
}
