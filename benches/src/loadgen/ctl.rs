//! Messages between the bench coordinator and its loader processes: one
//! JSON object per line, commands on the child's stdin, events on its
//! stdout.

use serde::{Deserialize, Serialize};

/// Coordinator → loader.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Open-loop client-to-client SENDs: `rate_per_s` from this loader, to
    /// users chosen uniformly from `0..users_total`, for `duration_ms`. The
    /// users are `<to_prefix><index>`: by default this loader's own prefix
    /// (its fleet's users); another fleet's prefix sends to its users (the
    /// cluster scenario: a fleet on one node sending to one on another).
    Unicast {
        rate_per_s: u64,
        duration_ms: u64,
        users_total: u32,
        payload_bytes: usize,
        seed: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_prefix: Option<String>,
    },
    /// PUBLISH to `room` from this loader's first ready connection: timed
    /// payloads with sequence numbers from `first_seq`, open loop at
    /// `rate_per_s` for `count` messages.
    Publish { room: String, rate_per_s: f64, count: u32, payload_bytes: usize, first_seq: u32 },
    /// Report latencies and counters recorded since the last collect, then
    /// reset them.
    Collect,
    /// Close every connection and exit.
    Quit,
}

/// Loader → coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Event {
    /// While connecting.
    Progress { connected: u32, ready: u32, failed: u32 },
    /// Every connection is logged in (or failed).
    Ready { ready: u32, failed: u32, elapsed_ms: u64, first_error: Option<String> },
    /// A unicast run finished sending.
    Sent { sent: u64, blocked: u64, elapsed_ms: u64 },
    /// Answer to `Collect`.
    Collected {
        /// PUSH frames received.
        received: u64,
        /// PINGs answered.
        pongs: u64,
        /// Connections closed by the server.
        closed: u32,
        /// End-to-end latency histogram (µs), hdrhistogram V2, base64.
        hist: String,
        /// Per sequence number of timed ROOM_MSGs: (seq, receivers here,
        /// latest arrival µs).
        per_seq: Vec<(u32, u32, u64)>,
        /// SKIPPED notices summed.
        skipped: u64,
        /// Device connections: INBOX frames with a seq already received
        /// (retransmits), and the ACKs and FETCHes sent.
        #[serde(default)]
        duplicates: u64,
        #[serde(default)]
        acks: u64,
        #[serde(default)]
        fetches: u64,
    },
    /// Something went wrong; the loader exits after sending this.
    Error { message: String },
}
