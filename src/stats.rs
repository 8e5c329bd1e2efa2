//! Counters each worker publishes and anyone may read.
//!
//! Owns: one cache-padded block of atomics per worker, and the summed
//! snapshot the handle returns.
//! Must not: cost the hot path a locked instruction. Each counter has one
//! writer (its worker), which bumps it with a plain load + store; readers
//! see a value at most a few instructions old.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

/// Single-writer increment: no `lock` prefix, only the owning worker calls it.
#[inline]
pub(crate) fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Single-writer decrement.
#[inline]
pub(crate) fn drop_one(a: &AtomicU64) {
    a.store(a.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Relaxed);
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// One worker's counters.
        #[derive(Default)]
        pub(crate) struct WorkerCounters {
            $( pub $name: AtomicU64, )*
            /// What `/metrics` shows beside the `Stats` totals: labelled
            /// counters, transport gauges and the latency histogram.
            pub detail: Detail,
        }

        /// A snapshot of the server's counters, summed over workers (as the
        /// admin API's `/stats` serves it, and tools read it back).
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: u64, )*
            /// Pushes refused because a worker's mailbox was full.
            pub mailbox_full: u64,
        }

        impl Stats {
            pub(crate) fn add(&mut self, c: &WorkerCounters) {
                $( self.$name += c.$name.load(Ordering::Relaxed); )*
            }
        }
    };
}

counters! {
    /// Open connections (logged in or not).
    connections,
    /// Logged-in connections.
    logged_in,
    /// Connections accepted since start.
    accepted,
    /// Connections refused at accept because the table was full.
    refused_full,
    /// Connections released since start.
    closed,
    /// Frames queued to connections (pushes, PONGs, PINGs, replies).
    frames_out,
    /// Frames received from clients.
    frames_in,
    /// `sendmsg` calls (a backlog of frames goes out in one).
    writes,
    /// Writes that found the socket buffer full and waited.
    write_waits,
    /// Successful logins.
    logins,
    /// Refused logins.
    login_failures,
    /// Connections closed for not logging in in time.
    login_timeouts,
    /// Connections closed for silence past the idle timeout.
    idle_timeouts,
    /// Connections closed for a malformed or unexpected frame.
    protocol_errors,
    /// Connections closed because their outbound queue passed its limit.
    slow_consumers,
    /// SEND, SEND_EX, PUBLISH and MESSAGE frames refused by their user's
    /// send budget (ERROR 118, or CLOSE 4009; `limits.send_rate`).
    rate_limited,
    /// Server-initiated PINGs.
    pings_sent,
    /// Connections kicked by the application.
    kicked,
    /// Messages dropped from slow consumers' queues (`drop_oldest`).
    skipped,
    /// WebSocket handshakes completed (101 sent).
    ws_upgrades,
    /// WebSocket upgrade requests refused (bad request, Origin, size).
    ws_handshake_failures,
    /// Plain HTTP requests answered on the WebSocket port (demo page).
    http_requests,
    /// Connections a full worker handed to a worker with room.
    handed_off,
    /// Panics caught in the application's code (message hook,
    /// authenticator); each cost only the message or login it was called for.
    hook_panics,
    /// Connections closed because a frame or fragmented message was not
    /// completed within `timeouts.message_timeout_ms` (1008).
    message_timeouts,
    /// Connections closed because their worker's budget for incomplete
    /// frames ran out and they had held one longest (1013).
    partial_budget_closes,
    /// Receives the kernel ended because the worker's buffer ring was empty
    /// (`server.poller = "io_uring"`); each was armed again once buffers
    /// were back, with its bytes still in the socket.
    recv_buffers_exhausted,
    /// Direct reads at the end of a long receive run that found bytes
    /// waiting (`server.poller = "io_uring"`, `Worker::track_run`): mostly
    /// a wake-up the kernel missed, at most that many.
    recv_lost_wakeups,
}

/// Per-worker counter blocks, each on its own cache line.
pub(crate) type CounterTable = Box<[CachePadded<WorkerCounters>]>;

// ---- what /metrics adds (labelled, fixed label sets) ------------------------

/// Why a login failed, as `/metrics` labels it: the LOGIN_ERROR codes
/// (`proto::codes::LoginErrorCode`, 1..=8, in order), then no LOGIN within
/// the login deadline, then a code this list does not know.
pub const LOGIN_FAILURE_REASONS: [&str; 10] = [
    "malformed_token",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "user_mismatch",
    "rejected",
    "unsupported_algorithm",
    "too_many_connections",
    "timeout",
    "other",
];
/// Index of `timeout` in [`LOGIN_FAILURE_REASONS`].
pub(crate) const LOGIN_TIMEOUT_REASON: usize = 8;

/// The index in [`LOGIN_FAILURE_REASONS`] of a LOGIN_ERROR code.
pub(crate) fn login_failure_index(code: u16) -> usize {
    match code {
        1..=8 => code as usize - 1,
        _ => LOGIN_FAILURE_REASONS.len() - 1,
    }
}

/// Close codes a protocol error can close with, as `/metrics` labels them:
/// the codes a decoder or the session picks (docs/PROTOCOL.md), an HTTP
/// request on the raw TCP port (answered with a 400, no close code), and
/// any other.
pub const PROTOCOL_ERROR_CODES: [&str; 8] =
    ["1002", "1003", "1007", "1009", "4000", "4006", "http_on_raw_port", "other"];

/// `Count::ProtocolError`'s code for an HTTP request on the raw port.
pub const HTTP_ON_RAW_PORT: u16 = 0;

/// The index in [`PROTOCOL_ERROR_CODES`] of a close code.
pub(crate) fn protocol_error_index(code: u16) -> usize {
    match code {
        1002 => 0,
        1003 => 1,
        1007 => 2,
        1009 => 3,
        4000 => 4,
        4006 => 5,
        HTTP_ON_RAW_PORT => 6,
        _ => 7,
    }
}

/// Kinds of client frame, as `/metrics` labels messages in.
pub const MESSAGE_IN_KINDS: [&str; 9] =
    ["login", "send", "publish", "message", "ack", "fetch", "subscribe", "ping", "other"];

/// The index in [`MESSAGE_IN_KINDS`] of a client frame type.
pub(crate) fn message_in_index(t: crate::proto::frame::FrameType) -> usize {
    use crate::proto::frame::FrameType as T;
    match t {
        T::Login => 0,
        T::Send | T::SendEx => 1,
        T::Publish => 2,
        T::Message => 3,
        T::Ack => 4,
        T::Fetch => 5,
        T::Subscribe | T::Unsubscribe => 6,
        T::Ping | T::Pong => 7,
        _ => 8,
    }
}

/// Kinds of delivery (a message handed to a connection to write), as
/// `/metrics` labels them: a PUSH to a user (from a handle or a client's
/// at-most-once SEND), a room's ROOM_MSG, a broadcast, a stored message's
/// INBOX frame (first sends and retransmits).
pub const DELIVERY_KINDS: [&str; 4] = ["push", "room", "broadcast", "inbox"];
pub(crate) const DELIVERY_PUSH: usize = 0;
pub(crate) const DELIVERY_ROOM: usize = 1;
pub(crate) const DELIVERY_BROADCAST: usize = 2;
pub(crate) const DELIVERY_INBOX: usize = 3;

/// Upper bounds of the latency histograms' buckets, in nanoseconds (10 µs
/// to 2.5 s; one more bucket counts everything above).
pub const LATENCY_BOUNDS_NS: [u64; 18] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    u64::MAX,
];

/// A latency histogram: a fixed array of counts (bucket `i` counts
/// samples ≤ `LATENCY_BOUNDS_NS[i]`, not cumulative) and the sum, bumped
/// with plain load + store by its one writer (`Histogram::observe`), or
/// with atomic adds where several threads write it
/// (`Histogram::observe_shared`). Readers add the counts up.
#[derive(Debug, Default)]
pub struct Histogram {
    pub buckets: [AtomicU64; LATENCY_BOUNDS_NS.len()],
    pub sum_ns: AtomicU64,
}

impl Histogram {
    /// Records `n` samples of `ns` each. Only this histogram's one writer
    /// calls it.
    #[inline]
    pub(crate) fn observe(&self, ns: u64, n: u64) {
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        bump(&self.buckets[i], n);
        bump(&self.sum_ns, ns.saturating_mul(n));
    }

    /// [`Histogram::observe`] for a histogram with several writers (the
    /// shards of the store: `store::service`): atomic adds.
    #[inline]
    pub(crate) fn observe_shared(&self, ns: u64, n: u64) {
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns.saturating_mul(n), Ordering::Relaxed);
    }

    /// Adds this histogram's counts and sum into `counts` and `sum_ns`.
    pub fn add_to(&self, counts: &mut [u64; LATENCY_BOUNDS_NS.len()], sum_ns: &mut u64) {
        for (c, b) in counts.iter_mut().zip(self.buckets.iter()) {
            *c += b.load(Ordering::Relaxed);
        }
        *sum_ns = sum_ns.wrapping_add(self.sum_ns.load(Ordering::Relaxed));
    }
}

/// The labelled part of a worker's counters (single writer, like the rest).
#[derive(Default)]
pub(crate) struct Detail {
    /// Open connections whose transport is raw TCP (protocol v1 frames).
    pub raw_connections: AtomicU64,
    /// Open connections upgraded to WebSocket.
    pub ws_connections: AtomicU64,
    /// Bytes read from client sockets.
    pub bytes_in: AtomicU64,
    /// Bytes written to client sockets (what `sendmsg` took).
    pub bytes_out: AtomicU64,
    /// Reliable windows rewound to their ACK position and sent again.
    pub retransmits: AtomicU64,
    /// Device connections closed for no ACK progress after
    /// `delivery.max_retransmits` retransmits (CLOSE 4007).
    pub ack_timeout_closes: AtomicU64,
    /// Device connections closed because the device logged in on another
    /// connection, of this node or of another node of the cluster (CLOSE
    /// 4008).
    pub replaced_closes: AtomicU64,
    pub login_failures: [AtomicU64; LOGIN_FAILURE_REASONS.len()],
    pub protocol_errors: [AtomicU64; PROTOCOL_ERROR_CODES.len()],
    pub messages_in: [AtomicU64; MESSAGE_IN_KINDS.len()],
    pub deliveries: [AtomicU64; DELIVERY_KINDS.len()],
    /// Push-to-written latency (see `metrics.rs`).
    pub push_to_written: Histogram,
}

// ---- counters of threads that are not workers ---------------------------------

/// Counter blocks for the threads that write to connections they do not
/// own (an application thread pushing through a `Handle`, a worker
/// relaying to another worker's connection): one block per thread and
/// server, so each block still has one writer and a bump is a plain load +
/// store. A thread registers once (a lock, at its first delivery); a block
/// whose thread has exited is handed to the next new thread with its
/// counts, so the blocks are as many as the threads that deliver at once,
/// and totals never go back.
pub(crate) struct ForeignCounters {
    inner: std::sync::Arc<ForeignInner>,
}

struct ForeignInner {
    blocks: std::sync::Mutex<Vec<std::sync::Arc<CachePadded<WorkerCounters>>>>,
}

type ThreadBlocks = Vec<(std::sync::Weak<ForeignInner>, std::sync::Arc<CachePadded<WorkerCounters>>)>;

thread_local! {
    static MY_BLOCKS: std::cell::RefCell<ThreadBlocks> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Default for ForeignCounters {
    fn default() -> Self {
        ForeignCounters { inner: std::sync::Arc::new(ForeignInner { blocks: std::sync::Mutex::new(Vec::new()) }) }
    }
}

impl ForeignCounters {
    /// Runs `f` on this thread's block (registering one first if needed).
    /// During the thread's own teardown, when its blocks are gone, the
    /// event is not counted.
    #[inline]
    pub(crate) fn with(&self, f: impl FnOnce(&WorkerCounters)) {
        let _ = MY_BLOCKS.try_with(|mine| {
            let mut mine = mine.borrow_mut();
            let me = std::sync::Arc::as_ptr(&self.inner);
            if let Some((_, b)) = mine.iter().find(|(w, _)| w.as_ptr() == me) {
                return f(b);
            }
            // Slow path, once per thread: forget blocks of servers that are
            // gone, then take a free block or make one.
            mine.retain(|(w, _)| w.strong_count() > 0);
            let b = {
                let mut blocks = self.inner.blocks.lock().unwrap_or_else(|e| e.into_inner());
                // A count of 1: only the list holds it, its thread exited
                // (and cannot come back: only this path, under this lock,
                // hands blocks out).
                match blocks.iter().find(|b| std::sync::Arc::strong_count(b) == 1) {
                    Some(b) => b.clone(),
                    None => {
                        let b = std::sync::Arc::new(CachePadded::new(WorkerCounters::default()));
                        blocks.push(b.clone());
                        b
                    }
                }
            };
            f(&b);
            mine.push((std::sync::Arc::downgrade(&self.inner), b));
        });
    }

    /// Calls `f` on every block (for summing at a scrape).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&WorkerCounters)) {
        let blocks = self.inner.blocks.lock().unwrap_or_else(|e| e.into_inner());
        for b in blocks.iter() {
            f(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_samples_up_to_their_bound() {
        let h = Histogram::default();
        h.observe(10_000, 1); // on the first bound
        h.observe(10_001, 2);
        h.observe(u64::MAX, 1);
        let (mut counts, mut sum) = ([0u64; LATENCY_BOUNDS_NS.len()], 0);
        h.add_to(&mut counts, &mut sum);
        assert_eq!((counts[0], counts[1], counts[LATENCY_BOUNDS_NS.len() - 1]), (1, 2, 1));
        assert_eq!(counts.iter().sum::<u64>(), 4);
    }

    #[test]
    fn label_indexes_stay_in_their_sets() {
        assert_eq!(LOGIN_FAILURE_REASONS[login_failure_index(1)], "malformed_token");
        assert_eq!(LOGIN_FAILURE_REASONS[login_failure_index(8)], "too_many_connections");
        assert_eq!(LOGIN_FAILURE_REASONS[login_failure_index(99)], "other");
        assert_eq!(LOGIN_FAILURE_REASONS[LOGIN_TIMEOUT_REASON], "timeout");
        assert_eq!(PROTOCOL_ERROR_CODES[protocol_error_index(1002)], "1002");
        assert_eq!(PROTOCOL_ERROR_CODES[protocol_error_index(HTTP_ON_RAW_PORT)], "http_on_raw_port");
        assert_eq!(PROTOCOL_ERROR_CODES[protocol_error_index(4999)], "other");
    }

    #[test]
    fn a_foreign_block_has_one_thread_and_outlives_it() {
        let f = std::sync::Arc::new(ForeignCounters::default());
        let total = |f: &ForeignCounters| {
            let mut n = 0;
            f.for_each(|c| n += c.frames_out.load(Ordering::Relaxed));
            n
        };
        for _ in 0..3 {
            let f2 = f.clone();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    f2.with(|c| bump(&c.frames_out, 1));
                }
            })
            .join()
            .unwrap();
        }
        assert_eq!(total(&f), 30);
        let mut blocks = 0;
        f.for_each(|_| blocks += 1);
        assert_eq!(blocks, 1, "threads that came one after another shared one block");
    }
}
