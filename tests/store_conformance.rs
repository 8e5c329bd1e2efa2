//! The store conformance suite (`switchboard::store::conformance`) as an
//! embedding application runs it against a store of its own: passed by a
//! durable store that restarts on its directory, and failed, naming the
//! check, by stores that break what the server relies on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use switchboard::store::conformance::{self, Subject};
use switchboard::store::{
    Appended, DiskStore, Durability, InboxState, MemoryStore, NewMessage, Page, Store, StoreError, StoreLimits,
};

/// An application's store: here the crate's disk store in a directory of
/// the test's, reopened there at a restart, as a database of the
/// application's would be.
struct OnDisk {
    store: Option<DiskStore>,
    dir: PathBuf,
    limits: StoreLimits,
}

impl OnDisk {
    fn new(limits: StoreLimits) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchboard-conformance-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = DiskStore::open(&dir, Durability::Os, limits).expect("opens");
        OnDisk { store: Some(store), dir, limits }
    }
}

impl Drop for OnDisk {
    fn drop(&mut self) {
        self.store = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Subject for OnDisk {
    fn store(&mut self) -> &mut dyn Store {
        self.store.as_mut().expect("open")
    }
    fn restart(&mut self) -> bool {
        let mut s = self.store.take().expect("open");
        s.sync().expect("syncs");
        drop(s);
        self.store = Some(DiskStore::open(&self.dir, Durability::Os, self.limits).expect("reopens"));
        true
    }
    fn drops_at_acknowledgement(&self) -> bool {
        true
    }
}

#[test]
fn a_durable_store_of_the_applications_passes_every_check() {
    conformance::run_all(OnDisk::new);
}

/// A store with one defect: each `Fault` changes one thing the server
/// relies on, and forwards the rest to the memory store.
struct Faulty {
    inner: MemoryStore,
    fault: Fault,
}

#[derive(Copy, Clone)]
enum Fault {
    /// Ignores the sender's client id: a retried SEND is stored twice.
    NoDedup,
    /// Takes a position past the head, capped at the head (the rule before
    /// PROTOCOL.md 15.8's store-lost-its-data case).
    CapsPositionsAtTheHead,
}

impl Subject for Faulty {
    fn store(&mut self) -> &mut dyn Store {
        self
    }
    fn restart(&mut self) -> bool {
        false
    }
    fn forgets_empty_inboxes(&self) -> bool {
        true
    }
}

impl Store for Faulty {
    fn append(&mut self, m: &NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        match self.fault {
            Fault::NoDedup => self.inner.append(&NewMessage { client_id: 0, ..m.clone() }, now_ms),
            _ => self.inner.append(m, now_ms),
        }
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        self.inner.sync()
    }
    fn read(&mut self, user: &str, after_seq: u64, limit: usize) -> Result<Page, StoreError> {
        self.inner.read(user, after_seq, limit)
    }
    fn device_login(
        &mut self,
        user: &str,
        device: &str,
        client_seq: u64,
        now_ms: u64,
    ) -> Result<(u64, u64), StoreError> {
        self.inner.device_login(user, device, client_seq, now_ms)
    }
    fn set_position(&mut self, user: &str, device: &str, seq: u64, now_ms: u64) -> Result<(), StoreError> {
        match self.fault {
            Fault::CapsPositionsAtTheHead => {
                let head = self.inner.inbox_state(user)?.head_seq;
                self.inner.set_position(user, device, seq.min(head), now_ms)
            }
            _ => self.inner.set_position(user, device, seq, now_ms),
        }
    }
    fn inbox_state(&mut self, user: &str) -> Result<InboxState, StoreError> {
        self.inner.inbox_state(user)
    }
    fn forget_device(&mut self, user: &str, device: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.inner.forget_device(user, device, now_ms)
    }
    fn expire(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        self.inner.expire(now_ms)
    }
    fn held(&self) -> (u64, u64) {
        self.inner.held()
    }
}

/// The message `run_all` panicked with against stores with `fault`.
fn failures(fault: Fault) -> String {
    let panic = catch_unwind(AssertUnwindSafe(|| {
        conformance::run_all(|limits| Faulty { inner: MemoryStore::new(limits), fault })
    }))
    .expect_err("a faulty store fails the suite");
    panic.downcast_ref::<String>().cloned().expect("a formatted message")
}

#[test]
fn a_store_that_stores_a_retried_send_twice_fails_the_dedup_checks() {
    let why = failures(Fault::NoDedup);
    assert!(why.starts_with("2 of "), "{why}");
    assert!(why.contains("\ndedup_within_window_and_not_after: "), "{why}");
    assert!(why.contains("\nappend_batch_as_one_by_one: "), "{why}");
}

#[test]
fn a_store_that_caps_a_position_past_the_head_fails_the_positions_check() {
    let why = failures(Fault::CapsPositionsAtTheHead);
    assert!(why.starts_with("1 of "), "{why}");
    assert!(why.contains("\ndevice_positions_independent_per_device: "), "{why}");
}
