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
}

/// Per-worker counter blocks, each on its own cache line.
pub(crate) type CounterTable = Box<[CachePadded<WorkerCounters>]>;
