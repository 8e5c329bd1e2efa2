//! loom models of `src/sync` (see `src/lib.rs`): every interleaving of a
//! few threads, within a preemption bound, through the real primitives.
//!
//! Each model prints how many interleavings it explored and how long it
//! took (`cargo test … -- --nocapture` shows it). `LOOM_MAX_PREEMPTIONS`
//! overrides the bound each model picks for a run of a few seconds.
//!
//! The `control_*` models run the code these primitives replaced (re-typed
//! here, since it no longer exists in the server) through the same
//! checks, and expect loom to find the bug: they show the models can see
//! what they are meant to catch.
#![cfg(loom)]

#[allow(dead_code)]
#[path = "../../../src/sync/mod.rs"]
mod sync;

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::time::Instant;

use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::Arc;
use loom::thread;

use sync::limit::CountLimit;
use sync::requests::{Link, RequestList};
use sync::spin::SpinLock;
use sync::wake::WakeFlag;

/// Checks `model` in every interleaving with at most `preemptions`
/// preemptions (unless `LOOM_MAX_PREEMPTIONS` says otherwise), then prints
/// what it explored.
fn check(name: &str, preemptions: usize, model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    let bound = *builder.preemption_bound.get_or_insert(preemptions);
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    let started = Instant::now();
    builder.check(move || {
        counter.fetch_add(1, Relaxed);
        model()
    });
    println!(
        "loom model {name}: {} interleavings, preemption bound {bound}, {:.2?}",
        runs.load(Relaxed),
        started.elapsed()
    );
}

// ---- (1) the slot lock ------------------------------------------------------

/// `threads` threads (the main one among them) take the lock `rounds`
/// times each and update the value in two steps with scheduling points
/// between them. Asserts: never two holders at once (the `side` counter,
/// outside the lock), no lost update, and (loom's cell tracking) every
/// holder's access happens after the previous holder's, i.e. the lock
/// orders memory, not only turns.
fn spin_lock_model(threads: usize, rounds: u32) {
    let lock = Arc::new(SpinLock::new(0u32, AtomicUsize::new(0)));
    let bump = move |lock: &SpinLock<u32, AtomicUsize>| {
        for _ in 0..rounds {
            let mut g = lock.lock();
            let v = *g;
            assert_eq!(lock.side().fetch_add(1, Relaxed), 0, "two holders at once");
            lock.side().fetch_sub(1, Relaxed);
            *g = v + 1;
        }
    };
    let others: Vec<_> = (1..threads)
        .map(|_| {
            let lock = lock.clone();
            thread::spawn(move || bump(&lock))
        })
        .collect();
    bump(&lock);
    for t in others {
        t.join().unwrap();
    }
    assert_eq!(*lock.lock(), threads as u32 * rounds, "an update was lost");
}

/// Two threads, each taking the lock three times (so a waiter meets both
/// a first holder and a re-taker), within five preemptions.
#[test]
fn spin_lock_is_exclusive() {
    check("spin_lock_is_exclusive (2 threads x 3)", 5, || spin_lock_model(2, 3));
}

/// Three threads, within one preemption. More preemptions are out of
/// loom's reach here: with two waiters, loom explores schedules where the
/// waiters yield to each other forever while the holder never runs again
/// (an unfair scheduler no OS has), and stops at its branch limit.
#[test]
fn spin_lock_is_exclusive_three_threads() {
    check("spin_lock_is_exclusive (3 threads)", 1, || spin_lock_model(3, 1));
}

// ---- (2) the request list and its owner ------------------------------------

/// A write slot as the request list sees it: `OutState`'s `listed` and a
/// `needs_*` flag, plus how many requests writers made.
#[derive(Default)]
struct Slot {
    listed: bool,
    needs: bool,
    requests: u32,
}

struct Slots {
    slots: Vec<SpinLock<Slot, Link>>,
    list: RequestList,
    wake: WakeFlag,
    /// The owner's eventfd: how many times it was written.
    efd: AtomicUsize,
}

/// A writer asking the owner to handle slot `i`, as `runtime::deliver`
/// does: under the slot's lock set the flag and list the slot; after it,
/// wake the owner's mailbox (eventfd write only if the flag was raised).
fn request(s: &Slots, i: u32) {
    let mut g = s.slots[i as usize].lock();
    g.needs = true;
    g.requests += 1;
    let listed_now = s.list.request(i, s.slots[i as usize].side(), &mut g.listed);
    drop(g);
    if listed_now && s.wake.raise() {
        s.efd.fetch_add(1, Release);
    }
}

/// Writers (each requesting the slots in its list, in order) against the
/// owner running the worker's loop: re-arm wakes, take the list, for each
/// slot clear `listed` and the flag under its lock (as
/// `Worker::on_requests` does), then sleep unless the eventfd was written
/// since it last looked. Asserts: a slot appears once per take and is
/// taken only with a request pending (each request seen exactly once);
/// once the owner sleeps with no wake pending, it has seen every request
/// (none lost).
fn request_list_model(writers: &'static [&'static [u32]]) {
    let s = Arc::new(Slots {
        slots: (0..2).map(|_| SpinLock::new(Slot::default(), Link::new())).collect(),
        list: RequestList::new(),
        wake: WakeFlag::new(),
        efd: AtomicUsize::new(0),
    });
    let writers: Vec<_> = writers
        .iter()
        .map(|&slots| {
            let s = s.clone();
            thread::spawn(move || {
                for &i in slots {
                    request(&s, i);
                }
            })
        })
        .collect();
    let mut handled = [0u32; 2];
    let mut seen_efd = 0;
    let mut taken = Vec::new();
    loop {
        s.wake.rearm();
        taken.clear();
        s.list.take(&mut taken, |i| s.slots[i as usize].side());
        for (k, &i) in taken.iter().enumerate() {
            assert!(!taken[..k].contains(&i), "slot {i} listed twice");
            let mut g = s.slots[i as usize].lock();
            assert!(g.listed, "slot {i} on the list but not marked listed");
            g.listed = false;
            assert!(g.needs && g.requests > handled[i as usize], "slot {i} taken with no request pending");
            g.needs = false;
            handled[i as usize] = g.requests;
        }
        let efd = s.efd.load(Acquire);
        if efd == seen_efd {
            break; // asleep: nothing woke it since it last looked
        }
        seen_efd = efd;
    }
    for w in writers {
        w.join().unwrap();
    }
    if s.efd.load(Acquire) == seen_efd {
        // No wake pending: the owner stays asleep, so nothing may be left.
        for (i, slot) in s.slots.iter().enumerate() {
            let g = slot.lock();
            assert_eq!(handled[i], g.requests, "a request on slot {i} was lost");
            assert!(!g.listed && !g.needs);
        }
    }
}

/// Three writers, two of them on slot 0, within two preemptions (more
/// reach the spin lock's limit under loom, see `spin_lock_is_exclusive_three_threads`:
/// slot 0 has three takers).
#[test]
fn request_list_loses_nothing() {
    check("request_list_loses_nothing (writers 0 | 1 | 0)", 2, || request_list_model(&[&[0], &[1], &[0]]));
}

/// Two writers, one requesting slot 0 twice (again while listed, or after
/// the owner took it), within four preemptions.
#[test]
fn request_list_loses_nothing_deeper() {
    check("request_list_loses_nothing (writers 0,0 | 1)", 4, || request_list_model(&[&[0, 0], &[1]]));
}

// ---- (3) the mailbox wake ---------------------------------------------------

/// The two sides of a wake flag, so the mailbox model runs the real one
/// and the control the old one.
trait Flag: Send + Sync + 'static {
    fn new() -> Self;
    fn raise(&self) -> bool;
    fn rearm(&self);
}

impl Flag for WakeFlag {
    fn new() -> Self {
        WakeFlag::new()
    }
    fn raise(&self) -> bool {
        WakeFlag::raise(self)
    }
    fn rearm(&self) {
        WakeFlag::rearm(self)
    }
}

/// The mailbox's flag before `sync::wake`: a `store(false, SeqCst)` to
/// re-arm against the producers' `swap(true, AcqRel)`.
struct StoreRearm(AtomicBool);

impl Flag for StoreRearm {
    fn new() -> Self {
        StoreRearm(AtomicBool::new(false))
    }
    fn raise(&self) -> bool {
        !self.0.swap(true, std::sync::atomic::Ordering::AcqRel)
    }
    fn rearm(&self) {
        self.0.store(false, SeqCst)
    }
}

/// A mailbox: the queue stands in for crossbeam's `ArrayQueue`, no
/// stronger: a push is a `SeqCst` read-modify-write (its tail CAS), the
/// consumer's look is `SeqCst` loads (`is_empty`), with one counter per
/// producer instead of slots. The eventfd counts writes.
struct Mail<F> {
    pushed: Vec<AtomicUsize>,
    wake: F,
    efd: AtomicUsize,
}

/// Producers (`pushes[p]` commands each) push and wake the consumer
/// (eventfd write only when the flag was raised), as `Mailbox::push`
/// does, while the consumer runs the worker's loop (`mailbox_loop`):
/// re-arm, look at the queue, take what is there, or sleep unless the
/// eventfd was written since it last looked. Asserts: once the consumer
/// sleeps with no wake pending, it has taken every command (none
/// stranded).
fn mailbox_model<F: Flag>(pushes: &'static [usize]) {
    let m = Arc::new(Mail {
        pushed: pushes.iter().map(|_| AtomicUsize::new(0)).collect(),
        wake: F::new(),
        efd: AtomicUsize::new(0),
    });
    let producers: Vec<_> = pushes
        .iter()
        .enumerate()
        .map(|(p, &n)| {
            let m = m.clone();
            thread::spawn(move || {
                for _ in 0..n {
                    m.pushed[p].fetch_add(1, SeqCst);
                    if m.wake.raise() {
                        m.efd.fetch_add(1, Release);
                    }
                }
            })
        })
        .collect();
    let look = |m: &Mail<F>| m.pushed.iter().map(|q| q.load(SeqCst)).collect::<Vec<_>>();
    let mut taken = vec![0; pushes.len()];
    let mut seen_efd = 0;
    loop {
        m.wake.rearm();
        let now = look(&m);
        if now != taken {
            taken = now; // drain what it saw, then look again
            continue;
        }
        let efd = m.efd.load(Acquire);
        if efd == seen_efd {
            break; // asleep
        }
        seen_efd = efd;
    }
    for p in producers {
        p.join().unwrap();
    }
    if m.efd.load(Acquire) == seen_efd {
        assert_eq!(taken, look(&m), "a command is stranded: the consumer sleeps and no wake is pending");
    }
}

/// Two producers, one command each, within four preemptions.
#[test]
fn mailbox_wake_strands_nothing() {
    check("mailbox_wake_strands_nothing (pushes 1 | 1)", 4, || mailbox_model::<WakeFlag>(&[1, 1]));
}

/// Two producers, one pushing twice (a push while its own wake is still
/// pending), within four preemptions.
#[test]
fn mailbox_wake_strands_nothing_repeat_pusher() {
    check("mailbox_wake_strands_nothing (pushes 2 | 1)", 4, || mailbox_model::<WakeFlag>(&[2, 1]));
}

/// Three producers, within three preemptions (four take ~7 minutes).
#[test]
fn mailbox_wake_strands_nothing_three_producers() {
    check("mailbox_wake_strands_nothing (pushes 1 | 1 | 1)", 3, || mailbox_model::<WakeFlag>(&[1, 1, 1]));
}

/// The old re-arm strands a command (issue 9: "swap(AcqRel) against
/// store(SeqCst) + is_empty").
#[test]
#[should_panic(expected = "a command is stranded")]
fn control_store_rearm_strands_a_command() {
    check("control_store_rearm_strands_a_command", 3, || mailbox_model::<StoreRearm>(&[1, 1]));
}

// ---- (4) the room count limit -----------------------------------------------

trait Limit: Send + Sync + 'static {
    fn new() -> Self;
    fn try_take(&self, max: usize) -> bool;
    fn give_back(&self);
    fn taken(&self) -> usize;
}

impl Limit for CountLimit {
    fn new() -> Self {
        CountLimit::new()
    }
    fn try_take(&self, max: usize) -> bool {
        CountLimit::try_take(self, max)
    }
    fn give_back(&self) {
        CountLimit::give_back(self)
    }
    fn taken(&self) -> usize {
        CountLimit::taken(self)
    }
}

/// `RoomRegistry::join`'s count before `sync::limit`: check, then count.
struct CheckThenCount(AtomicUsize);

impl Limit for CheckThenCount {
    fn new() -> Self {
        CheckThenCount(AtomicUsize::new(0))
    }
    fn try_take(&self, max: usize) -> bool {
        if self.0.load(Relaxed) >= max {
            return false;
        }
        self.0.fetch_add(1, Relaxed);
        true
    }
    fn give_back(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    fn taken(&self) -> usize {
        self.0.load(Relaxed)
    }
}

/// Three creators against a limit of two, each taking a place, holding it
/// a moment and giving it back. Asserts: never more places held than the
/// limit (`held` is raised after a take and lowered before the give-back,
/// so it never exceeds the places taken), and none left taken at the end.
fn limit_model<L: Limit>() {
    const MAX: usize = 2;
    let limit = Arc::new(L::new());
    let held = Arc::new(AtomicUsize::new(0));
    let create = |limit: &L, held: &AtomicUsize| {
        if limit.try_take(MAX) {
            assert!(held.fetch_add(1, Relaxed) < MAX, "more rooms than max_rooms");
            held.fetch_sub(1, Relaxed);
            limit.give_back();
        }
    };
    let others: Vec<_> = (0..2)
        .map(|_| {
            let (limit, held) = (limit.clone(), held.clone());
            thread::spawn(move || create(&limit, &held))
        })
        .collect();
    create(&limit, &held);
    for t in others {
        t.join().unwrap();
    }
    assert_eq!(limit.taken(), 0, "a place was never given back");
}

#[test]
fn count_limit_holds() {
    check("count_limit_holds", 4, limit_model::<CountLimit>);
}

/// The old check-then-count passes the limit.
#[test]
#[should_panic(expected = "more rooms than max_rooms")]
fn control_check_then_count_passes_the_limit() {
    check("control_check_then_count_passes_the_limit", 3, limit_model::<CheckThenCount>);
}
