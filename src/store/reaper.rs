//! Memtable reaping for [`super::DiskStore`]: a small thread that holds a
//! reference to each of fjall's memtables while they are written to, and
//! frees a memtable itself once it is the last holder, that is once fjall
//! has flushed it and let it go.
//!
//! Why: fjall frees a flushed memtable when it drops the last version that
//! refers to it, and it does that while it holds the write lock of the
//! keyspace's version history (`SuperVersions::maintenance`, run for every
//! keyspace when one rotates its memtable, in lsm-tree 3.1): freeing a
//! write buffer's worth of skiplist nodes, one by one, takes the fjall
//! thread about 100 ms of CPU, and every append to that keyspace waits
//! for the lock meanwhile. Seen with reliable unicast at 20,000 msgs/s
//! (`os`, 4,000 device connections, 2 workers): the store thread asleep
//! on that lock for 95–145 ms, three to five times in 34 s, while a fjall
//! thread ran (`/proc` sampled every 0.3 ms), and `maintenance` dropping
//! memtables was 23% of the fjall threads' CPU (`perf record --call-graph
//! dwarf`). With a reference held here, fjall's drop is a decrement, and
//! the nodes are freed on this thread, which holds no lock anyone waits
//! for.
//!
//! Owns: the thread, clones of the store's keyspaces (handles), and one
//! reference to each memtable it has seen active and fjall still holds.
//! Memory: a memtable lives at most one [`INTERVAL`] longer than it would.
//! Must not: hold anything fjall locks, or a memtable fjall no longer
//! holds for longer than a turn.
//!
//! It reaches the memtables through `Keyspace::tree`, which fjall marks
//! as hidden (not part of its stable API): the test
//! `the_memtable_reaper_frees_the_memtables_fjall_flushed` fails if a
//! version of fjall stops giving them out this way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fjall::{AbstractTree, Keyspace};

use super::periodic::Periodic;

/// Time between two looks at the keyspaces' active memtables: a memtable
/// that is active for less than this may be freed by fjall, as before.
pub const INTERVAL: Duration = Duration::from_millis(25);

/// The running reaper; dropping it stops it (within a turn) and frees
/// what it holds.
pub struct MemtableReaper {
    thread: Option<Periodic>,
    freed: Arc<AtomicU64>,
}

impl MemtableReaper {
    /// Starts the thread for `keyspaces`. `None` if the thread cannot be
    /// started (the store works without it, with the stalls above).
    pub fn start(keyspaces: Vec<Keyspace>) -> Option<Self> {
        let freed = Arc::new(AtomicU64::new(0));
        let counter = freed.clone();
        // Type-erased: fjall does not name the memtable type.
        let mut held: Vec<Arc<dyn Send + Sync>> = Vec::new();
        let thread = Periodic::start("switchboard-reap", INTERVAL, move || {
            for ks in &keyspaces {
                let active: Arc<dyn Send + Sync> = ks.tree.active_memtable();
                if !held.iter().any(|m| Arc::ptr_eq(m, &active)) {
                    held.push(active);
                }
            }
            let before = held.len();
            // The last holder: fjall flushed it and let it go.
            held.retain(|m| Arc::strong_count(m) > 1);
            counter.fetch_add((before - held.len()) as u64, Ordering::Relaxed);
        })?;
        Some(MemtableReaper { thread: Some(thread), freed })
    }

    /// Memtables this thread has freed so far (the test that guards it).
    #[cfg(test)]
    pub fn freed(&self) -> u64 {
        self.freed.load(Ordering::Relaxed)
    }
}

impl Drop for MemtableReaper {
    fn drop(&mut self) {
        drop(self.thread.take()); // joins it
        tracing::debug!(memtables = self.freed.load(Ordering::Relaxed), "memtable reaper stopped");
    }
}
