//! The store thread: one [`Store`] behind a bounded queue, with group
//! commit; one such thread per shard of the store.
//!
//! Shards (`shards.rs`): a store may be split into shards, each a `Store`
//! of its own holding the inboxes of the users [`super::shard_of`] puts
//! in it. The [`Submitter`] queues each request in its user's shard, and
//! each shard's thread runs the loop below on its own queue, independent
//! of the others; the counters are shared (every shard adds into them).
//! Everything about one user goes through one thread, in the order it
//! was queued, as with a single thread.
//!
//! Owns: the thread that owns the store, its request queue (a lock-free
//! `ArrayQueue` of `queue_capacity`), the batching loop, the periodic
//! retention pass and the counters.
//! Must not: block a caller. [`Submitter::try_submit`] either queues the
//! request or returns [`Busy`] at once; answers go to a [`Sink`], which the
//! runtime implements by posting into worker mailboxes. The store thread is
//! never an io_uring worker.
//!
//! Waking: the thread parks (`std::thread::park_timeout`) when its queue is
//! empty, and a submitter unparks it after queueing. `unpark` makes the
//! next `park` return at once and publishes what was written before it
//! to the parked thread (std's documented guarantee), so a request queued
//! while the thread looks at an empty queue is never left behind; a stale
//! wake only costs one empty turn. A worker queues the requests of one
//! turn of its I/O loop with [`Submitter::try_submit_unwoken`] and wakes
//! the thread once, after the turn ([`Submitter::wake`]): woken at each
//! SEND, the store thread took the worker's CPU in the middle of its turn
//! on a busy host, and went back to sleep after one request. (The std
//! channel this replaces also held a mutex between its receiver and the
//! senders that woke it: 10% of the in-memory store thread's time was
//! spent contending for it, `perf` at 30,000 reliable msgs/s.)
//!
//! The loop: wait for one request, take up to [`MAX_BATCH`] more that are
//! already queued; apply every append and login in order; ONE `sync` for
//! the batch; then hand out the outcomes of the writes in order; then
//! write a slice of the device positions waiting ([`POSITION_SLICE`]);
//! then serve the reads and state queries of the batch; the sink is
//! flushed ([`Sink::flush`]) after the writes' answers and again after
//! the rest. A turn that found no request gives the store a slice of
//! [`Store::tidy`] ([`TIDY_SLICE`]) if it has work due then
//! ([`Store::tidy_due`], which the thread also wakes for): the disk store
//! resolves its hot messages there, two epochs after their append,
//! instead of in the next burst's appends. Nothing is answered before the sync
//! that made it durable, so no reader ever sees a message that a crash
//! could still take back. If the sync fails, every write of the batch is
//! answered with that error.
//!
//! Device positions wait in a map, one entry per device (a newer position
//! replaces an older one), and are written a slice per turn: every
//! worker hands over the positions acknowledged since its last tick at
//! once, thousands in one batch, and written in one go they held up the
//! appends queued behind them by 25–35 ms (measured under reliable
//! unicast at 20,000 messages/s, 4,000 devices). A device login, a state
//! query, a retention pass and the stop first write every waiting
//! position, so none of them sees an older one.
//!
//! Waiting for a batch (`store.batch_wait_us`, [`ServiceConfig::batch_wait`]):
//! a turn that serves only writes (appends and device positions) starts
//! at least that long (1 ms by default with `os` durability and with the
//! memory store) after the last turn that served requests; the loop
//! sleeps out the rest and takes what came meanwhile into the same turn.
//! A request that finds the thread idle for longer is served at once, and
//! so is a turn with a read, a state query or a device login: a device
//! catching up reads page after page, each read waiting for the one
//! before, and held a millisecond
//! each it caught up ten times slower (55,520 msgs/s instead of 563,569,
//! `switchboard-bench catch-up` against `os` servers with and without the
//! wait, medians of 12 runs; not held, 445,485 with the wait against
//! 419,832 without). So while writes keep coming the thread takes them at
//! most once per wait, instead of being woken by every worker's turn.
//! While it sleeps, a submitter's wake is an atomic swap; every turn
//! serves more requests and posts their answers to the workers once, so
//! the store thread and the workers are woken less often. Why:
//! at 40,000 reliable msgs/s with `os`, a third of the store thread's
//! time was switching in and out (`perf`: `finish_task_switch` 26%, about
//! 5,600 turns a second of seven requests each). Measured with a 1 ms wait
//! against none (2 workers, 4,000 device connections, the loader on the
//! same 2 cores, thread times from `/proc/<pid>/task/*/schedstat`, two
//! alternated rounds each): at 20,000 msgs/s the store thread took 15–16%
//! of a core instead of 23–25% and each worker 24–27% instead of 30–37%
//! (the server 64–69% of a core instead of 87–96%; the store's turns
//! about 1,000 a second instead of 6,100–12,100), p50 1.1–1.2 ms against
//! 0.1–0.3 ms, p99 8.0–12.9 ms against 3.0–11.1; at 40,000 the server took
//! 93–96% instead of 101–108%, p99 15.6–19.3 ms against 17.2 (and 105.8
//! in a minute of 9% steal); at 55,000, near what the host can carry, three
//! rounds each were within its noise (p99 31–58 ms against 28–243). The
//! README's measured changes give the command. With `fsync` the default
//! is no wait: the `fdatasync` of one batch already gathers the next. The
//! memory store, which has no sync at all, waits 1 ms by default too: at
//! 40,000 msgs/s without the wait its thread ran about 18,000 turns a
//! second and took 20% of a core, with it about 1,800 and 9%.
//!
//! A store that stopped after a failed write ([`Store::stopped`]) is
//! closed and opened again every [`REOPEN_INTERVAL`] (10 s) by the loop,
//! from its own [`Store::reopener`], until that works: a disk that filled
//! up and got space back serves again without a restart of the server.
//!
//! The retention pass ([`Store::expire_slice`]) runs in slices of
//! [`EXPIRE_SLICE`] units of work, one per turn after the batch, until it
//! is over; the next starts [`EXPIRE_INTERVAL`] after that. Run whole, the
//! pass after a minute of reliable unicast at 20,000 messages/s (about
//! 1.2 million acknowledged messages to drop, `os`) held the thread for about
//! 2.5 s: its queue rose to 45,000–48,000 requests and every SEND of
//! those seconds waited, so the p99 of an 80 s run was 2.0–2.1 s; in
//! slices, the queue peaked at 500–2,900 and the p99 was 0.2–0.3 s, what
//! the host gave a run without a pass that hour (README, measured
//! changes).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};

use crossbeam_queue::ArrayQueue;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{unix_ms, Appended, Durability, InboxState, NewMessage, Page, Reopen, Store, StoreError};

/// Requests drained after the first one into one batch (one sync). At
/// 100-byte messages a batch holds well under a megabyte of payloads.
pub const MAX_BATCH: usize = 4096;

/// [`Store::read`] without the messages whose own expiry has passed at
/// `now_ms` ([`super::StoredMessage::expired`]). A page that held nothing
/// else is followed by the next one, until a page has a message to hand
/// on or the inbox ends: an empty page tells the window that nothing is
/// kept up to the head, and it moves past (`proto::reliable`,
/// `Window::on_page`), so it must not be empty while unexpired messages
/// come after it. Each store skips an expired message the same way, here,
/// so that paging is alike in all of them; the message stays stored until
/// it is acknowledged past or `store.ttl_ms` drops it.
pub(crate) fn read_unexpired(
    store: &mut dyn Store,
    user: &str,
    mut after_seq: u64,
    limit: usize,
    now_ms: u64,
) -> Result<super::Page, StoreError> {
    loop {
        let mut page = store.read(user, after_seq, limit)?;
        let Some(last) = page.messages.last().map(|m| m.seq) else { return Ok(page) };
        page.messages.retain(|m| !m.expired(now_ms));
        if !page.messages.is_empty() || last >= page.head_seq {
            return Ok(page);
        }
        after_seq = last;
    }
}

/// Time from the end of one retention pass to the start of the next.
pub const EXPIRE_INTERVAL: Duration = Duration::from_secs(60);

/// Work of the retention pass per turn of the loop
/// ([`Store::expire_slice`]'s budget: users looked at plus messages
/// dropped). The disk store drops about one message per 2 µs, so a slice
/// is about a millisecond (module doc).
pub const EXPIRE_SLICE: usize = 512;

/// Device positions and logins that came without an append are synced
/// within this long, not at once: nothing waits on their durability (a
/// position lost with a crash only means the device gets some messages
/// again, which it drops by seq), and a sync per ACK would put an
/// `fdatasync` between every page a catching-up device reads.
pub const POSITION_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Device positions written per turn of the loop (module doc): this many,
/// or an eighth of those waiting if that is more, so that a backlog is
/// written within a few turns whatever the number of devices. 256 are
/// about 1.5 ms of store-thread time with the disk store.
pub const POSITION_SLICE: usize = 256;

/// Budget of [`Store::tidy`] per idle turn of the loop (module doc):
/// about a millisecond of resolving hot messages with the disk store.
pub const TIDY_SLICE: usize = 512;

/// How long the loop leaves [`Store::tidy`] alone after it failed.
const TIDY_RETRY: Duration = Duration::from_secs(1);

/// `ServiceConfig::reopen_interval`'s default: how often the loop opens a
/// stopped store again.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(10);

/// `store.queue_max_bytes`' default: 64 MiB of appends may wait for the
/// store's threads. Why that much: it holds the whole default queue
/// (65,536 requests) of messages up to about 900 bytes, and a thousand of
/// the largest frames (64 KiB); an admin push of a large payload to many
/// users, each user a copy, meets it first (then 503, retry later)
/// instead of queueing gigabytes behind a store that fell behind.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 64 << 20;

/// What the store thread can be asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Append(NewMessage),
    Read {
        user: Arc<str>,
        after_seq: u64,
        limit: usize,
    },
    DeviceLogin {
        user: Arc<str>,
        device: Arc<str>,
        client_seq: u64,
    },
    Position {
        user: Arc<str>,
        device: Arc<str>,
        seq: u64,
    },
    State {
        user: Arc<str>,
    },
    /// [`Store::forget_device`]: written, and synced, before its answer.
    ForgetDevice {
        user: Arc<str>,
        device: Arc<str>,
    },
}

impl Request {
    /// The user whose inbox the request is about: its shard's
    /// ([`super::shard_of`]).
    pub fn user(&self) -> &str {
        match self {
            Request::Append(m) => &m.to,
            Request::Read { user, .. }
            | Request::DeviceLogin { user, .. }
            | Request::Position { user, .. }
            | Request::State { user }
            | Request::ForgetDevice { user, .. } => user,
        }
    }

    /// The bytes the request holds while it waits in the queue, counted
    /// against [`ServiceConfig::queue_max_bytes`]: an append's record
    /// ([`super::record_bytes`]: its payload and ids, each a copy of its
    /// own); nothing for the others, whose ids are shared with the
    /// connection that asks.
    pub fn queued_bytes(&self) -> u64 {
        match self {
            Request::Append(m) => super::record_bytes(&m.to, &m.from, m.payload.len()),
            _ => 0,
        }
    }
}

/// The answer to one request, of the matching kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    Appended(Result<Appended, StoreError>),
    Read(Result<Page, StoreError>),
    /// `(position, head_seq)`.
    DeviceLogin(Result<(u64, u64), StoreError>),
    Position(Result<(), StoreError>),
    State(Result<InboxState, StoreError>),
    /// Whether the device was known.
    ForgetDevice(Result<bool, StoreError>),
}

/// Where answers go, called on the store thread. Must not block for long
/// (the runtime posts into a worker mailbox and drops the answer when it is
/// full).
pub trait Sink<T>: Send + 'static {
    fn done(&self, token: T, result: Done);

    /// Called after each group of answers (a batch's writes, its reads, a
    /// turn's positions), before the thread goes on or waits: a sink that
    /// queues answers without waking their receivers wakes them here.
    fn flush(&self) {}

    /// Whether the sink holds answers it could not hand over yet (a full
    /// mailbox), to offer again at a flush: the thread then comes back
    /// for a flush within [`HELD_RETRY`] even with nothing to serve.
    fn held_back(&self) -> bool {
        false
    }
}

/// How soon the loop flushes again while the sink holds answers back
/// ([`Sink::held_back`]).
pub const HELD_RETRY: Duration = Duration::from_millis(1);

/// The queue is full, or the store thread has stopped: the request was not
/// taken (answer the client with StoreUnavailable).
#[derive(Copy, Clone, Debug, Error, PartialEq, Eq)]
#[error("store busy: its queue is full or it has stopped")]
pub struct Busy;

/// Counters of the store's threads (every shard adds into the same
/// ones), readable from any thread.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Messages stored (not counting duplicates or refusals).
    pub appends: AtomicU64,
    /// Appends answered as duplicates.
    pub duplicates: AtomicU64,
    /// Syncs done (one per batch with a write, and one for positions,
    /// logins or retention drops no append synced within
    /// [`POSITION_SYNC_INTERVAL`]).
    pub syncs: AtomicU64,
    /// Messages stored by the batches that were synced: divided by
    /// `syncs`, the messages per sync that group commit achieved.
    pub appended_per_sync_sum: AtomicU64,
    /// Reads served.
    pub reads: AtomicU64,
    /// Appends refused by a limit (InboxFull, StoreFull).
    pub refusals: AtomicU64,
    /// Requests that failed with an I/O error (sync or store).
    pub errors: AtomicU64,
    /// Requests refused because the queue was full.
    pub busy: AtomicU64,
    /// Requests queued and not yet taken by the store thread.
    pub queue_depth: AtomicU64,
    /// Their bytes ([`Request::queued_bytes`]), bounded by
    /// [`ServiceConfig::queue_max_bytes`].
    pub queue_bytes: AtomicU64,
    /// Messages dropped by retention passes.
    pub expired: AtomicU64,
    /// Of those, the ones some known device had not acknowledged
    /// ([`Store::expired_unacknowledged`]), over every shard.
    pub expired_unacknowledged: AtomicU64,
    /// Messages kept in inboxes ([`Store::held`]) over every shard, as of
    /// each shard's last batch.
    pub held_messages: AtomicU64,
    /// Their bytes, counted as [`super::record_bytes`].
    pub held_bytes: AtomicU64,
    /// Shards stopped after a failed write ([`Store::stopped`]), as of
    /// their last batch ([`StoreCounters::stopped`]).
    pub stopped_shards: AtomicU64,
    /// Commit latency of the batches that stored messages: from a store
    /// thread taking the batch to its sync returning (applying the batch,
    /// then one `sync`), once per batch.
    pub commit: crate::stats::Histogram,
    /// Time each request waited in the queue: from being queued
    /// ([`Submitter::try_submit_unwoken`]) to its shard's store thread
    /// taking it into a batch. With `commit`, it
    /// tells where a slow SEND_ACK waited: for the thread (a backlog, or
    /// a thread that got no CPU) or for the disk.
    pub queue_wait: crate::stats::Histogram,
    /// [`StoreCounters::durability`]: 0 none, 1 `os`, 2 `fsync`.
    durability: AtomicU8,
}

impl StoreCounters {
    /// What a message stored now survives, as the store said at its last
    /// batch ([`Store::durability`]); receipts report it. It can change
    /// while the server runs: the Redis store reads Redis's persistence
    /// settings again at each reconnect and every
    /// [`super::redis::DURABILITY_RECHECK`], and learns them only once
    /// Redis answers.
    pub fn durability(&self) -> Option<Durability> {
        match self.durability.load(Ordering::Relaxed) {
            2 => Some(Durability::Fsync),
            1 => Some(Durability::Os),
            _ => None,
        }
    }

    fn set_durability(&self, d: Option<Durability>) {
        let v = match d {
            Some(Durability::Fsync) => 2,
            Some(Durability::Os) => 1,
            None => 0,
        };
        self.durability.store(v, Ordering::Relaxed);
    }

    /// Whether a shard of the store has stopped after a failed write (it
    /// serves nothing until it is opened again: the module doc).
    pub fn stopped(&self) -> bool {
        self.stopped_shards.load(Ordering::Relaxed) > 0
    }
}

/// Settings of the store thread.
#[derive(Copy, Clone, Debug)]
pub struct ServiceConfig {
    /// Requests that may wait for the store thread (`store.queue_capacity`).
    pub queue_capacity: usize,
    /// Bytes the requests waiting may hold (`store.queue_max_bytes`,
    /// [`Request::queued_bytes`]) over every shard; past it a request
    /// with bytes is refused as by a full queue. A request always goes
    /// into an empty queue, however large.
    pub queue_max_bytes: u64,
    /// Time between retention passes.
    pub expire_interval: Duration,
    /// The clock, in Unix milliseconds (a test passes its own).
    pub clock: fn() -> u64,
    /// While the store is stopped ([`Store::stopped`]: a write failed),
    /// the loop opens it again this often ([`REOPEN_INTERVAL`]).
    pub reopen_interval: Duration,
    /// The least time from one turn that serves requests to the next
    /// (`store.batch_wait_us`; the module doc says why). Zero: a turn
    /// starts as soon as a request is there.
    pub batch_wait: Duration,
}

impl ServiceConfig {
    pub fn new(queue_capacity: usize) -> Self {
        ServiceConfig {
            queue_capacity,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
            expire_interval: EXPIRE_INTERVAL,
            clock: unix_ms,
            reopen_interval: REOPEN_INTERVAL,
            batch_wait: Duration::ZERO,
        }
    }
}

enum Msg<T> {
    /// A request, with when it was queued ([`crate::timed::mono_ns`]).
    Req(T, Request, u64),
    Stop,
}

/// One shard's queue and the thread that serves it.
struct Shard<T> {
    queue: Arc<ArrayQueue<Msg<T>>>,
    /// The shard's store thread, to unpark.
    thread: Thread,
}

/// Submits requests to the store's threads (one per shard, each request
/// to the shard of its user: [`super::shard_of`]); cheap to clone,
/// usable from any thread.
pub struct Submitter<T> {
    shards: Arc<[Shard<T>]>,
    counters: Arc<StoreCounters>,
    stopped: Arc<AtomicBool>,
    /// [`ServiceConfig::queue_max_bytes`].
    max_bytes: u64,
}

impl<T> Clone for Submitter<T> {
    fn clone(&self) -> Self {
        Submitter {
            shards: self.shards.clone(),
            counters: self.counters.clone(),
            stopped: self.stopped.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

impl<T> Submitter<T> {
    /// Wakes the store threads for what was queued before: each shard
    /// that has a request waiting (an atomic swap if its thread is awake,
    /// a futex wake if it is parked).
    pub fn wake(&self) {
        for shard in self.shards.iter().filter(|s| !s.queue.is_empty()) {
            shard.thread.unpark();
        }
    }

    /// The shards, each served by a thread of its own.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Queues the stop in every shard, waiting while a queue is full (its
    /// thread is draining it, unless `ended(shard)`), and wakes them.
    fn stop(&self, ended: impl Fn(usize) -> bool) {
        for (i, shard) in self.shards.iter().enumerate() {
            let mut msg = Msg::Stop;
            while let Err(back) = shard.queue.push(msg) {
                if ended(i) {
                    break;
                }
                msg = back;
                shard.thread.unpark();
                std::thread::sleep(Duration::from_millis(1));
            }
            shard.thread.unpark();
        }
    }
}

impl<T: Send + 'static> Submitter<T> {
    /// Queues a request and wakes the store thread; its answer goes to the
    /// sink with `token`. Never blocks: a full queue or a stopped thread
    /// is `Err(Busy)`.
    pub fn try_submit(&self, token: T, request: Request) -> Result<(), Busy> {
        self.try_submit_unwoken(token, request)?;
        self.wake();
        Ok(())
    }

    /// Queues a request without waking the store thread: the caller must
    /// call [`Submitter::wake`] once it has queued what it has to queue
    /// now (module doc). Until then the request waits, unless the thread
    /// is awake anyway.
    pub fn try_submit_unwoken(&self, token: T, request: Request) -> Result<(), Busy> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(Busy);
        }
        let shard = &self.shards[super::shard_of(request.user(), self.shards.len())];
        // Counted before the push, so the thread's decrement never comes first.
        let bytes = request.queued_bytes();
        if !crate::limits::take_bytes(&self.counters.queue_bytes, bytes, self.max_bytes) {
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            return Err(Busy);
        }
        self.counters.queue_depth.fetch_add(1, Ordering::Relaxed);
        match shard.queue.push(Msg::Req(token, request, crate::timed::mono_ns())) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.counters.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.counters.queue_bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.counters.busy.fetch_add(1, Ordering::Relaxed);
                Err(Busy)
            }
        }
    }

    pub fn counters(&self) -> &Arc<StoreCounters> {
        &self.counters
    }
}

/// The running store threads. Dropping it stops them as
/// [`Service::stop`] does.
pub struct Service<T> {
    submitter: Submitter<T>,
    /// One per shard, in shard order.
    threads: Vec<JoinHandle<Result<(), StoreError>>>,
}

impl<T: Send + 'static> Service<T> {
    /// Starts the store thread (named `sb-store-0`), which owns `store`
    /// and answers through `sink`: a store of one shard.
    pub fn start<S: Sink<T>>(store: Box<dyn Store>, sink: S, cfg: ServiceConfig) -> std::io::Result<Self> {
        Self::start_shards(vec![(store, sink)], cfg)
    }

    /// Starts one thread per shard (named `sb-store-<i>`), each owning
    /// its store and answering through its sink; shard `i` serves the
    /// users [`super::shard_of`] puts in `i` (the stores must hold those
    /// users' inboxes: `open_store_shards`). Each shard has a queue of
    /// `cfg.queue_capacity`. At least one shard.
    pub fn start_shards<S: Sink<T>>(parts: Vec<(Box<dyn Store>, S)>, cfg: ServiceConfig) -> std::io::Result<Self> {
        assert!(!parts.is_empty(), "a store has at least one shard");
        let counters = Arc::new(StoreCounters::default());
        let stopped = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(parts.len());
        let mut shards = Vec::with_capacity(parts.len());
        for (i, (store, sink)) in parts.into_iter().enumerate() {
            let queue = Arc::new(ArrayQueue::new(cfg.queue_capacity.max(1)));
            let worker = Worker {
                store,
                sink,
                queue: queue.clone(),
                counters: counters.clone(),
                stopped: stopped.clone(),
                cfg,
                unsynced_since: None,
                positions: hashbrown::HashMap::new(),
                forgotten: Forgotten::default(),
                tidy_after: Instant::now(),
                reopen: None,
                reopen_after: Instant::now(),
                published: (0, 0, false),
                published_unacknowledged: 0,
            };
            match std::thread::Builder::new().name(format!("sb-store-{i}")).spawn(move || worker.run()) {
                Ok(t) => {
                    shards.push(Shard { queue, thread: t.thread().clone() });
                    threads.push(t);
                }
                Err(e) => {
                    // Stop the shards already running (nothing was queued).
                    let started = Service {
                        submitter: Submitter {
                            shards: shards.into(),
                            counters,
                            stopped,
                            max_bytes: cfg.queue_max_bytes,
                        },
                        threads,
                    };
                    drop(started);
                    return Err(e);
                }
            }
        }
        let shards: Arc<[Shard<T>]> = shards.into();
        let submitter = Submitter { shards, counters, stopped, max_bytes: cfg.queue_max_bytes };
        Ok(Service { submitter, threads })
    }

    /// A handle for submitting from other threads.
    pub fn submitter(&self) -> Submitter<T> {
        self.submitter.clone()
    }

    /// [`Submitter::try_submit`] on the service's own submitter.
    pub fn try_submit(&self, token: T, request: Request) -> Result<(), Busy> {
        self.submitter.try_submit(token, request)
    }

    pub fn counters(&self) -> &Arc<StoreCounters> {
        &self.submitter.counters
    }

    /// Stops the threads: what was queued before is applied and
    /// answered, each shard's store is synced a last time, and the threads
    /// are joined. Later submits get `Busy`; one racing with the stop may
    /// be dropped unanswered (stop after the workers have stopped
    /// submitting). Returns the first shard's last-sync error, if any.
    pub fn stop(mut self) -> Result<(), StoreError> {
        self.stop_inner()
    }
}

impl<T> Service<T> {
    fn stop_inner(&mut self) -> Result<(), StoreError> {
        let threads = std::mem::take(&mut self.threads);
        if threads.is_empty() {
            return Ok(()); // stopped before
        }
        self.submitter.stop(|i| threads[i].is_finished());
        let mut outcome = Ok(());
        for t in threads {
            let r = t.join().unwrap_or_else(|_| Err(StoreError::Unavailable("a store thread panicked".into())));
            if outcome.is_ok() {
                outcome = r;
            }
        }
        outcome
    }
}

impl<T> Drop for Service<T> {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

struct Worker<T, S> {
    store: Box<dyn Store>,
    sink: S,
    /// This shard's queue.
    queue: Arc<ArrayQueue<Msg<T>>>,
    counters: Arc<StoreCounters>,
    stopped: Arc<AtomicBool>,
    cfg: ServiceConfig,
    /// Positions or device logins were written and not synced since.
    unsynced_since: Option<Instant>,
    /// Positions not written yet: (user, device) → the highest seq asked
    /// and the tokens to answer once it is written (module doc). Bounded
    /// by the devices with a position waiting (one entry each), and
    /// emptied within a few turns: each writes at least an eighth.
    positions: hashbrown::HashMap<DeviceKey, (u64, Vec<T>)>,
    /// Devices forgotten ([`Request::ForgetDevice`]) that have not logged
    /// in since: their positions are dropped (see [`Forgotten`]).
    forgotten: Forgotten,
    /// [`Store::tidy`] is not tried before this (it failed).
    tidy_after: Instant,
    /// How to open the store again, taken from it when it stopped.
    reopen: Option<Reopen>,
    /// A stopped store is not opened again before this.
    reopen_after: Instant,
    /// What this shard last added into the shared counters' held
    /// messages, held bytes and stopped shards ([`Worker::publish_held`]).
    published: (u64, u64, bool),
    /// The store's [`Store::expired_unacknowledged`] as last added into
    /// the shared counter (0 again for a store opened again).
    published_unacknowledged: u64,
}

/// (user, device).
type DeviceKey = (Arc<str>, Arc<str>);

/// The most devices [`Forgotten`] remembers per shard; past it the
/// oldest forget is dropped (its connections' last positions, handed
/// over within a tick or two of their close, are long written).
const FORGOTTEN_MAX: usize = 65_536;

/// Devices forgotten and not logged in since. A position for one is
/// dropped here: the last ACKs of a connection closed just before the
/// forget (the app signed out) reach the queue after it, handed over at
/// the close or a tick later, and a store that added a device it did not
/// know at its position (every store here did before 2026-12-07; the
/// `Store` trait now asks them to drop it, `store::move_device`) brought
/// the device back at its old position while the API had answered that
/// it was forgotten. Kept for an application's own store written to the
/// older rule. Its next LOGIN ends this (a new device's). In RAM only: a restart closes every
/// connection first, and what they hand over is written before the store
/// thread stops. Positions of the same device handed over by another
/// cluster node go through that node's store thread, which never saw the
/// forget: the Redis store drops them itself (its `:df` marks).
#[derive(Default)]
struct Forgotten {
    /// Each device forgotten, with the number of its forget.
    devices: hashbrown::HashMap<DeviceKey, u64>,
    /// (device, number) in the order of the forgets, for the bound; an
    /// entry whose number is no longer the device's is stale.
    order: std::collections::VecDeque<(DeviceKey, u64)>,
    next: u64,
}

impl Forgotten {
    fn insert(&mut self, key: DeviceKey) {
        self.next += 1;
        self.devices.insert(key.clone(), self.next);
        self.order.push_back((key, self.next));
        while self.devices.len() > FORGOTTEN_MAX || self.order.len() > 2 * FORGOTTEN_MAX {
            let Some((old, n)) = self.order.pop_front() else { break };
            if self.devices.get(&old) == Some(&n) {
                self.devices.remove(&old);
            }
        }
    }

    /// Whether `key`'s positions are dropped. Costs nothing while no device
    /// is forgotten.
    fn contains(&self, key: &DeviceKey) -> bool {
        !self.devices.is_empty() && self.devices.contains_key(key)
    }

    /// `key` logged in: a device of its own again.
    fn remove(&mut self, key: &DeviceKey) {
        if !self.devices.is_empty() {
            self.devices.remove(key);
        }
    }
}

impl<T: Send + 'static, S: Sink<T>> Worker<T, S> {
    fn run(mut self) -> Result<(), StoreError> {
        // What the store held when it was opened (a disk store's messages
        // from before a restart) shows from the start, not only after this
        // shard's first request or retention pass.
        self.publish_held();
        let mut batch: Vec<(T, Request)> = Vec::with_capacity(MAX_BATCH + 1);
        let mut next_expire = Instant::now() + self.cfg.expire_interval;
        let mut expiring = false;
        let mut stopping = false;
        // When the last turn that served requests took them.
        let mut last_turn: Option<Instant> = None;
        while !stopping {
            let mut due = next_expire;
            if let Some(t) = self.unsynced_since {
                due = due.min(t + POSITION_SYNC_INTERVAL);
            }
            if let Some(t) = self.tidy_at() {
                due = due.min(t);
            }
            if self.store.stopped() {
                due = due.min(self.reopen_after);
            }
            if !self.positions.is_empty() || expiring {
                due = Instant::now(); // look for requests, then do the next slice
            }
            if self.sink.held_back() {
                due = due.min(Instant::now() + HELD_RETRY);
            }
            stopping = self.take(&mut batch);
            if batch.is_empty() && !stopping {
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    // Returns at an unpark (or a stale one: an empty turn).
                    std::thread::park_timeout(wait);
                    stopping = self.take(&mut batch);
                }
            }
            if !stopping && self.pace(last_turn, &batch) {
                stopping = self.take(&mut batch);
            }
            if !batch.is_empty() {
                last_turn = Some(Instant::now());
            }
            if stopping {
                self.stopped.store(true, Ordering::Release);
                // What was queued before the stop is served too.
                let now = crate::timed::mono_ns();
                while let Some(Msg::Req(t, r, queued)) = self.queue.pop() {
                    self.counters.queue_wait.observe_shared(now.saturating_sub(queued), 1);
                    batch.push((t, r));
                }
            }
            self.counters.queue_depth.fetch_sub(batch.len() as u64, Ordering::Relaxed);
            let bytes: u64 = batch.iter().map(|(_, r)| r.queued_bytes()).sum();
            if bytes > 0 {
                self.counters.queue_bytes.fetch_sub(bytes, Ordering::Relaxed);
            }
            if !stopping {
                self.reopen_if_due();
            }
            let idle = batch.is_empty();
            self.serve(&mut batch);
            if idle && !stopping {
                self.tidy();
            }
            self.sink.flush();
            if stopping {
                self.write_positions(true);
            }
            if self.unsynced_since.is_some_and(|t| t.elapsed() >= POSITION_SYNC_INTERVAL) {
                self.sync_positions();
            }
            if !expiring && !stopping && Instant::now() >= next_expire {
                // The pass starts from every position acknowledged so far.
                self.write_positions(true);
                expiring = true;
            }
            if expiring && !stopping && self.expire_slice() {
                expiring = false;
                next_expire = Instant::now() + self.cfg.expire_interval;
            }
            self.sink.flush();
        }
        self.store.sync()
    }

    /// Sleeps until [`ServiceConfig::batch_wait`] after `last_turn`, the
    /// start of the last turn that served requests, if that is later and
    /// `batch` holds only writes (appends and positions; the module doc,
    /// "Waiting for a batch"); returns whether it slept. A sleep, not a
    /// park: a submitter's wake meanwhile is an atomic swap, not a futex
    /// wake.
    fn pace(&self, last_turn: Option<Instant>, batch: &[(T, Request)]) -> bool {
        let writes_only =
            !batch.is_empty() && batch.iter().all(|(_, r)| matches!(r, Request::Append(_) | Request::Position { .. }));
        match last_turn.and_then(|t| self.cfg.batch_wait.checked_sub(t.elapsed())) {
            Some(left) if writes_only && !left.is_zero() => {
                std::thread::sleep(left);
                true
            }
            _ => false,
        }
    }

    /// Moves up to [`MAX_BATCH`] + 1 queued requests into `batch`; whether
    /// the stop was among them (what was queued after it stays). One clock
    /// read for the lot: the wait of each is timed to the start of the take.
    fn take(&self, batch: &mut Vec<(T, Request)>) -> bool {
        let now = crate::timed::mono_ns();
        while batch.len() <= MAX_BATCH {
            match self.queue.pop() {
                Some(Msg::Req(t, r, queued)) => {
                    self.counters.queue_wait.observe_shared(now.saturating_sub(queued), 1);
                    batch.push((t, r));
                }
                Some(Msg::Stop) => return true,
                None => break,
            }
        }
        false
    }

    /// When the store next has work for [`Store::tidy`], on this
    /// thread's clock (`None`: none coming); not before [`TIDY_RETRY`]
    /// after a failure.
    fn tidy_at(&self) -> Option<Instant> {
        let due_ms = self.store.tidy_due()?;
        let now = Instant::now();
        if now < self.tidy_after {
            return Some(self.tidy_after);
        }
        Some(now + Duration::from_millis(due_ms.saturating_sub((self.cfg.clock)())))
    }

    /// An idle turn's slice of [`Store::tidy`], if it has work due.
    fn tidy(&mut self) {
        let now_ms = (self.cfg.clock)();
        if Instant::now() < self.tidy_after || self.store.tidy_due().is_none_or(|due| due > now_ms) {
            return;
        }
        match self.store.tidy(now_ms, TIDY_SLICE) {
            Ok(()) => {
                // A message written into fjall, or an epoch ended, waits
                // for a sync; nothing is lost meanwhile (disk.rs).
                self.unsynced_since.get_or_insert_with(Instant::now);
                self.publish_held();
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("store: resolving between requests failed (retried): {e}");
                self.tidy_after = Instant::now() + TIDY_RETRY;
            }
        }
    }

    /// While the store is stopped (a write failed), opens it again every
    /// `reopen_interval`: once the cause is gone (space freed, say), it
    /// recovers what it had synced and serves again, and a million
    /// connections need not be dropped by a restart for it. Until then
    /// every request gets the stopped store's error (or, if opening it
    /// failed, [`Closed`]'s).
    fn reopen_if_due(&mut self) {
        if !self.store.stopped() || Instant::now() < self.reopen_after {
            return;
        }
        self.reopen_after = Instant::now() + self.cfg.reopen_interval;
        if let Some(r) = self.store.reopener() {
            self.reopen = Some(r);
        }
        let Some(reopen) = self.reopen.clone() else { return };
        // The old store first: it holds the directory's lock. What it held
        // is still on disk, waiting: the gauges keep showing it.
        let held = self.store.held();
        drop(std::mem::replace(&mut self.store, Box::new(Closed { held })));
        // Whatever opens next counts from 0.
        self.published_unacknowledged = 0;
        match reopen() {
            Ok(store) => {
                tracing::info!("store: opened again after its failed write; serving again");
                self.store = store;
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("store: opening it again failed (retried in {:?}): {e}", self.cfg.reopen_interval);
            }
        }
        self.publish_held();
    }

    /// Syncs positions and logins written since the last sync.
    fn sync_positions(&mut self) {
        match self.store.sync() {
            Ok(()) => {
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                self.unsynced_since = self.store.unsynced_since();
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("syncing device positions failed (retried): {e}");
                self.unsynced_since = Some(Instant::now());
            }
        }
    }

    /// Applies one batch: writes in order, one sync if messages were
    /// appended (positions alone wait for `POSITION_SYNC_INTERVAL`), their
    /// answers, then the reads.
    fn serve(&mut self, batch: &mut Vec<(T, Request)>) {
        if batch.is_empty() {
            self.write_positions(false);
            return;
        }
        let now_ms = (self.cfg.clock)();
        let started = Instant::now();
        let mut written: Vec<(T, Done)> = Vec::with_capacity(batch.len());
        let mut reads: Vec<(T, Request)> = Vec::new();
        let mut appended = 0u64;
        // A forgotten device is answered once synced: the backend that
        // asked may rely on it (a login needs no such wait: its client
        // logs in again if a crash took it back).
        let mut forgets = false;
        // A run of consecutive appends goes to the store in one call
        // (`Store::append_batch`: one pipeline for the Redis store); a
        // login or position ends the run, so writes still apply in order.
        // Reads are served after the sync whatever their place: they do
        // not end a run.
        let mut run_tokens: Vec<T> = Vec::new();
        let mut run: Vec<NewMessage> = Vec::new();
        for (token, req) in batch.drain(..) {
            let done = match req {
                Request::Append(m) => {
                    run_tokens.push(token);
                    run.push(m);
                    continue;
                }
                Request::DeviceLogin { user, device, client_seq } => {
                    self.append_run(&mut run_tokens, &mut run, now_ms, &mut written, &mut appended);
                    self.write_positions(true);
                    let key = (user, device);
                    self.forgotten.remove(&key);
                    let (user, device) = key;
                    Done::DeviceLogin(self.store.device_login(&user, &device, client_seq, now_ms))
                }
                Request::ForgetDevice { user, device } => {
                    self.append_run(&mut run_tokens, &mut run, now_ms, &mut written, &mut appended);
                    // A position waiting for this device would add it back.
                    self.write_positions(true);
                    forgets = true;
                    let done = self.store.forget_device(&user, &device, now_ms);
                    if done.is_ok() {
                        self.forgotten.insert((user, device));
                    }
                    Done::ForgetDevice(done)
                }
                Request::Position { user, device, seq } => {
                    let key = (user, device);
                    if self.forgotten.contains(&key) {
                        // Of a connection closed before the forget (above).
                        self.sink.done(token, Done::Position(Ok(())));
                        continue;
                    }
                    let (at, tokens) = self.positions.entry(key).or_insert((seq, Vec::new()));
                    *at = (*at).max(seq);
                    tokens.push(token);
                    continue;
                }
                read @ (Request::Read { .. } | Request::State { .. }) => {
                    reads.push((token, read));
                    continue;
                }
            };
            written.push((token, done));
        }
        self.append_run(&mut run_tokens, &mut run, now_ms, &mut written, &mut appended);
        if appended == 0 && !forgets && !written.is_empty() {
            // Positions, logins, duplicates and refusals: nothing that is
            // read out or acknowledged as stored waits for this sync.
            self.unsynced_since.get_or_insert_with(Instant::now);
        } else if !written.is_empty() {
            match self.store.sync() {
                Ok(()) => {
                    // What the store left for its next sync, if anything.
                    self.unsynced_since = self.store.unsynced_since();
                    self.counters.commit.observe_shared(started.elapsed().as_nanos() as u64, 1);
                    self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                    self.counters.appends.fetch_add(appended, Ordering::Relaxed);
                    self.counters.appended_per_sync_sum.fetch_add(appended, Ordering::Relaxed);
                }
                Err(e) => {
                    // Not durable: none of the batch's writes may be acknowledged.
                    self.counters.errors.fetch_add(written.len() as u64, Ordering::Relaxed);
                    for (_, done) in written.iter_mut() {
                        *done = match done {
                            Done::Appended(_) => Done::Appended(Err(e.clone())),
                            Done::DeviceLogin(_) => Done::DeviceLogin(Err(e.clone())),
                            Done::ForgetDevice(_) => Done::ForgetDevice(Err(e.clone())),
                            _ => Done::Position(Err(e.clone())),
                        };
                    }
                }
            }
        }
        self.publish_held();
        for (token, done) in written {
            self.sink.done(token, done);
        }
        self.sink.flush();
        let states = reads.iter().any(|(_, r)| matches!(r, Request::State { .. }));
        self.write_positions(states);
        let now_ms = (self.cfg.clock)();
        for (token, req) in reads {
            let done = match req {
                Request::Read { user, after_seq, limit } => {
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    Done::Read(read_unexpired(&mut *self.store, &user, after_seq, limit, now_ms))
                }
                Request::State { user } => Done::State(self.store.inbox_state(&user)),
                _ => unreachable!("only reads are deferred"),
            };
            self.sink.done(token, done);
        }
    }

    /// Writes every waiting device position (`all`) or a slice of them
    /// ([`POSITION_SLICE`]), not synced (that waits for the next append's
    /// sync or [`POSITION_SYNC_INTERVAL`]), and answers their tokens.
    fn write_positions(&mut self, all: bool) {
        if self.positions.is_empty() {
            return;
        }
        let most = if all { usize::MAX } else { POSITION_SLICE.max(self.positions.len() / 8) };
        let now_ms = (self.cfg.clock)();
        // Dropped after `most` entries, extract_if keeps the rest.
        let slice: Vec<_> = self.positions.extract_if(|_, _| true).take(most).collect();
        let moves: Vec<(&str, &str, u64)> =
            slice.iter().map(|((user, device), (seq, _))| (&user[..], &device[..], *seq)).collect();
        let results = self.store.set_positions(&moves, now_ms);
        debug_assert_eq!(results.len(), slice.len(), "one outcome per position");
        for ((_, (_, tokens)), r) in slice.into_iter().zip(results) {
            if r.is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            for token in tokens {
                self.sink.done(token, Done::Position(r.clone()));
            }
        }
        self.unsynced_since.get_or_insert_with(Instant::now);
    }

    /// Appends a run of consecutive appends in one `append_batch` call and
    /// queues their outcomes, in order, behind the writes before them.
    fn append_run(
        &mut self,
        tokens: &mut Vec<T>,
        run: &mut Vec<NewMessage>,
        now_ms: u64,
        written: &mut Vec<(T, Done)>,
        appended: &mut u64,
    ) {
        if run.is_empty() {
            return;
        }
        let results = self.store.append_batch(run, now_ms);
        debug_assert_eq!(results.len(), run.len(), "one outcome per append");
        for (token, r) in tokens.drain(..).zip(results) {
            match &r {
                Ok(Appended::New { .. }) => *appended += 1,
                Ok(Appended::Duplicate { .. }) => {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Err(StoreError::InboxFull { .. } | StoreError::StoreFull { .. }) => {
                    self.counters.refusals.fetch_add(1, Ordering::Relaxed);
                }
                Err(StoreError::Unavailable(_)) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            written.push((token, Done::Appended(r)));
        }
        run.clear();
    }

    /// Moves the shared counters' held counts and stopped shards by how
    /// this shard's changed since it last did (every shard adds into the
    /// same counters).
    fn publish_held(&mut self) {
        self.counters.set_durability(self.store.durability());
        let (messages, bytes) = self.store.held();
        let stopped = self.store.stopped();
        let (m0, b0, s0) = std::mem::replace(&mut self.published, (messages, bytes, stopped));
        let c = &self.counters;
        c.held_messages.fetch_add(messages.wrapping_sub(m0), Ordering::Relaxed);
        c.held_bytes.fetch_add(bytes.wrapping_sub(b0), Ordering::Relaxed);
        match (s0, stopped) {
            (false, true) => c.stopped_shards.fetch_add(1, Ordering::Relaxed),
            (true, false) => c.stopped_shards.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Runs the next slice of the retention pass; whether the pass is over
    /// (done, or failed: the next starts after the interval). What it
    /// dropped is synced with the next batch, or within
    /// [`POSITION_SYNC_INTERVAL`]: a drop lost with a crash is done again.
    fn expire_slice(&mut self) -> bool {
        let now_ms = (self.cfg.clock)();
        match self.store.expire_slice(now_ms, EXPIRE_SLICE) {
            Ok((dropped, over)) => {
                self.counters.expired.fetch_add(dropped, Ordering::Relaxed);
                let unacknowledged = self.store.expired_unacknowledged();
                let new = unacknowledged.saturating_sub(self.published_unacknowledged);
                self.published_unacknowledged = unacknowledged;
                self.counters.expired_unacknowledged.fetch_add(new, Ordering::Relaxed);
                self.unsynced_since.get_or_insert_with(Instant::now);
                self.publish_held();
                over
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("store retention pass failed: {e}");
                true
            }
        }
    }
}

/// The store thread's store between closing a stopped store and opening it
/// again, while that fails ([`Worker::reopen_if_due`]): it refuses every
/// request. `held`: what the store it replaced held (still on disk).
struct Closed {
    held: (u64, u64),
}

impl Closed {
    fn refuse<R>() -> Result<R, StoreError> {
        Err(StoreError::Unavailable(
            "the store stopped at a failed write, and opening it again failed (retried; the server's log says \
             why)"
                .into(),
        ))
    }
}

impl Store for Closed {
    fn append(&mut self, _: &NewMessage, _: u64) -> Result<Appended, StoreError> {
        Self::refuse()
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        Self::refuse()
    }
    fn read(&mut self, _: &str, _: u64, _: usize) -> Result<Page, StoreError> {
        Self::refuse()
    }
    fn device_login(&mut self, _: &str, _: &str, _: u64, _: u64) -> Result<(u64, u64), StoreError> {
        Self::refuse()
    }
    fn set_position(&mut self, _: &str, _: &str, _: u64, _: u64) -> Result<(), StoreError> {
        Self::refuse()
    }
    fn inbox_state(&mut self, _: &str) -> Result<InboxState, StoreError> {
        Self::refuse()
    }
    fn forget_device(&mut self, _: &str, _: &str, _: u64) -> Result<bool, StoreError> {
        Self::refuse()
    }
    fn expire(&mut self, _: u64) -> Result<u64, StoreError> {
        Self::refuse()
    }
    fn held(&self) -> (u64, u64) {
        self.held
    }
    fn stopped(&self) -> bool {
        true
    }
}
