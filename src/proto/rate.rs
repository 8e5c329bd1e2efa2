//! What one user may originate through one server (SEND, SEND_EX,
//! PUBLISH, MESSAGE; FETCH, one message without bytes): a token bucket
//! of messages and one of payload bytes (`limits.send_rate`,
//! `limits.send_bytes_rate` and their bursts), without I/O or a clock of
//! its own.
//!
//! Owns: [`SendLimit`] (the server-wide rates) and [`Budget`] (one
//! user's two buckets, the millisecond they were last
//! filled at, and how many messages in a row it refused), and the rule: a
//! message is taken when both buckets hold its cost (one message; its
//! payload's bytes, at most a full bucket), and then both pay; a message
//! refused pays nothing, and after `limits.send_max_refused` refusals in
//! a row the connection is to be closed (4009).
//! Must not: hold anything for a user that sends nothing. A budget lives
//! in the server's side table only while it is below full
//! ([`Budget::is_full`]: the workers' sweep drops it then), so an idle
//! connection's slot stays the size it is (`runtime/budgets.rs`).
//!
//! Why these choices. Per user and not per connection: a budget per
//! connection started full at every login, so a client that logged in
//! again for every burst (1,512 logins in 5 s in a review) was not
//! limited at all; a user's connections share one budget, which outlives
//! them until it is full again, so logging in again gains nothing. Per
//! server and not per worker thread (as it first was, checked without a
//! lock): a user whose connections landed on every worker got
//! `server.workers` times the budget (`runtime/budgets.rs`). Filled by
//! the millisecond (the caller's clock), not
//! by the tick: filled once a tick and capped at the burst, a bucket lost
//! what a tick added beyond the burst, so a client keeping to the rate
//! was refused whenever the burst was under a tick's worth. Closing after
//! refusals in a row: a refused message still costs its decoding and an
//! ERROR frame, and a client that ignores its 118s (millions a second in
//! a review) took the worker from every connection on it.

/// Thousandths: one message, or one byte, costs this many units.
const UNIT: u64 = 1000;

/// The rates of the server's users. A rate of 0 leaves its dimension
/// unlimited.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SendLimit {
    /// Messages a second; units a millisecond, as UNIT is 1000.
    msgs_per_s: u64,
    msgs_burst: u64,
    bytes_per_s: u64,
    bytes_burst: u64,
    /// Refusals in a row after which the connection is closed; 0: never.
    max_refused: u32,
}

/// Which bucket refused a message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// `limits.send_rate` (messages per second).
    Messages,
    /// `limits.send_bytes_rate` (payload bytes per second).
    Bytes,
}

/// A message the budget refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub which: Exceeded,
    /// The rate of that bucket, per second, as configured.
    pub per_second: u64,
    /// How long until the bucket holds this message, in milliseconds.
    pub wait_ms: u64,
    /// `limits.send_max_refused` refusals in a row: close the connection.
    pub close: bool,
}

impl SendLimit {
    /// The limit for `msgs_per_s` messages (burst `msgs_burst`) and
    /// `bytes_per_s` payload bytes (burst `bytes_burst`) a second; the
    /// connection is closed after `max_refused` refusals in a row (0:
    /// never). `None` when both rates are 0: nothing to limit. The
    /// config checks the bursts (`config.rs`): at least one message, and
    /// at least the largest frame, when their rate is set.
    pub fn new(msgs_per_s: u64, msgs_burst: u64, bytes_per_s: u64, bytes_burst: u64, max_refused: u32) -> Option<Self> {
        if msgs_per_s == 0 && bytes_per_s == 0 {
            return None;
        }
        Some(SendLimit {
            msgs_per_s,
            msgs_burst: msgs_burst.saturating_mul(UNIT),
            bytes_per_s,
            bytes_burst: bytes_burst.saturating_mul(UNIT),
            max_refused,
        })
    }
}

/// One user's two buckets. 32 bytes, kept in a side table
/// only while below full (module doc).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    msgs: u64,
    bytes: u64,
    /// The caller's millisecond clock when the buckets were last filled.
    at_ms: u64,
    /// Messages refused since the last one taken.
    refused: u32,
}

impl Budget {
    /// Both buckets full, at `now_ms`: what a user that has not sent
    /// lately has.
    pub fn full(limit: &SendLimit, now_ms: u64) -> Budget {
        Budget { msgs: limit.msgs_burst, bytes: limit.bytes_burst, at_ms: now_ms, refused: 0 }
    }

    /// Fills the buckets for the milliseconds since the last fill (a
    /// clock that went back fills nothing).
    fn fill(&mut self, limit: &SendLimit, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        if elapsed == 0 {
            return;
        }
        // rate/s × elapsed/1000 s × UNIT units = rate × elapsed units.
        self.msgs = self.msgs.saturating_add(limit.msgs_per_s.saturating_mul(elapsed)).min(limit.msgs_burst);
        self.bytes = self.bytes.saturating_add(limit.bytes_per_s.saturating_mul(elapsed)).min(limit.bytes_burst);
        self.at_ms = now_ms;
    }

    /// Takes one message of `payload_len` bytes at `now_ms`, if both
    /// buckets hold it; otherwise takes nothing and says why. A payload
    /// larger than the bytes burst costs a full bucket (it could never
    /// fit otherwise: a WebSocket message may be larger than
    /// `max_frame_bytes`, and the size checks after the budget refuse it
    /// if it is too large to deliver). An unlimited dimension (rate 0)
    /// never refuses.
    pub fn spend(&mut self, limit: &SendLimit, now_ms: u64, payload_len: usize) -> Result<(), Refused> {
        self.fill(limit, now_ms);
        let bytes = (payload_len as u64).saturating_mul(UNIT).min(limit.bytes_burst);
        let short = if limit.msgs_per_s > 0 && self.msgs < UNIT {
            Some((Exceeded::Messages, limit.msgs_per_s, UNIT - self.msgs))
        } else if limit.bytes_per_s > 0 && self.bytes < bytes {
            Some((Exceeded::Bytes, limit.bytes_per_s, bytes - self.bytes))
        } else {
            None
        };
        if let Some((which, per_second, missing)) = short {
            self.refused = self.refused.saturating_add(1);
            let close = limit.max_refused > 0 && self.refused >= limit.max_refused;
            return Err(Refused { which, per_second, wait_ms: missing.div_ceil(per_second), close });
        }
        if limit.msgs_per_s > 0 {
            self.msgs -= UNIT;
        }
        if limit.bytes_per_s > 0 {
            self.bytes -= bytes;
        }
        self.refused = 0;
        Ok(())
    }

    /// Whether the buckets are full again at `now_ms`: the budget is then
    /// the same as none, and its side-table entry can go.
    pub fn is_full(&self, limit: &SendLimit, now_ms: u64) -> bool {
        let mut b = *self;
        b.fill(limit, now_ms);
        (limit.msgs_per_s == 0 || b.msgs >= limit.msgs_burst)
            && (limit.bytes_per_s == 0 || b.bytes >= limit.bytes_burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 messages/s (burst 5) and 1,000 bytes/s (burst 2,000); closed
    /// after 4 refusals in a row.
    fn limit() -> SendLimit {
        SendLimit::new(10, 5, 1000, 2000, 4).unwrap()
    }

    #[test]
    fn no_rate_is_no_limit() {
        assert_eq!(SendLimit::new(0, 0, 0, 0, 10), None);
        let only_bytes = SendLimit::new(0, 0, 100, 100, 0).unwrap();
        let mut b = Budget::full(&only_bytes, 0);
        for _ in 0..10_000 {
            b.spend(&only_bytes, 0, 0).unwrap();
        }
        assert_eq!(b.spend(&only_bytes, 0, 60).map_err(|r| r.which), Ok(()));
        assert_eq!(b.spend(&only_bytes, 0, 60).map_err(|r| r.which), Err(Exceeded::Bytes));
    }

    #[test]
    fn a_burst_then_the_rate_by_the_millisecond() {
        let l = limit();
        let mut b = Budget::full(&l, 1_000);
        for _ in 0..5 {
            b.spend(&l, 1_000, 1).unwrap();
        }
        let r = b.spend(&l, 1_000, 1).unwrap_err();
        assert_eq!((r.which, r.per_second, r.wait_ms, r.close), (Exceeded::Messages, 10, 100, false));
        // One message every 100 ms: 99 ms is not enough, 100 is.
        assert!(b.spend(&l, 1_099, 1).is_err());
        b.spend(&l, 1_100, 1).unwrap();
        assert!(!b.is_full(&l, 1_100));
        assert!(!b.is_full(&l, 1_599));
        assert!(b.is_full(&l, 1_600), "5 messages' worth after 500 ms");
    }

    /// A client keeping to the rate is never refused, whatever the burst
    /// (with buckets filled once a tick and capped at a burst below a
    /// tick's worth, it was).
    #[test]
    fn a_client_keeping_to_the_rate_is_never_refused() {
        for burst in [1, 2, 5, 10] {
            let l = SendLimit::new(10, burst, 0, 0, 0).unwrap();
            let mut b = Budget::full(&l, 0);
            for i in 0..1_000u64 {
                b.spend(&l, i * 100, 10).unwrap_or_else(|r| panic!("burst {burst}: message {i} refused: {r:?}"));
            }
        }
        // Bytes: 60,000-byte payloads at 96% of 100,000 bytes/s.
        let l = SendLimit::new(0, 0, 100_000, 100_000, 0).unwrap();
        let mut b = Budget::full(&l, 0);
        for i in 0..100u64 {
            b.spend(&l, i * 625, 60_000).unwrap_or_else(|r| panic!("payload {i} refused: {r:?}"));
        }
    }

    #[test]
    fn a_refused_message_pays_nothing_and_bytes_refuse_alone() {
        let l = limit();
        let mut b = Budget::full(&l, 7);
        b.spend(&l, 7, 1500).unwrap();
        // 500 bytes left: a 600-byte message is refused for its bytes and
        // takes no message either; 100 bytes come in 100 ms.
        let r = b.spend(&l, 7, 600).unwrap_err();
        assert_eq!((r.which, r.per_second, r.wait_ms), (Exceeded::Bytes, 1000, 100));
        for _ in 0..4 {
            b.spend(&l, 7, 100).unwrap();
        }
        assert_eq!(b.spend(&l, 7, 0).unwrap_err().which, Exceeded::Messages);
        // A second fills 1,000 bytes (and the messages to the burst).
        b.spend(&l, 1_007, 1000).unwrap();
        assert_eq!(b.spend(&l, 1_007, 600).unwrap_err().which, Exceeded::Bytes);
    }

    /// A payload above the bytes burst costs a full bucket instead of
    /// being refused for ever.
    #[test]
    fn a_payload_above_the_bytes_burst_waits_for_a_full_bucket() {
        let l = SendLimit::new(0, 0, 1000, 2000, 0).unwrap();
        let mut b = Budget::full(&l, 0);
        b.spend(&l, 0, 5000).unwrap();
        assert_eq!(b.spend(&l, 1_000, 5000).unwrap_err().wait_ms, 1000);
        b.spend(&l, 2_000, 5000).unwrap();
    }

    #[test]
    fn refusals_in_a_row_ask_for_the_close_and_a_taken_message_starts_them_again() {
        let l = limit();
        let mut b = Budget::full(&l, 0);
        for _ in 0..5 {
            b.spend(&l, 0, 1).unwrap();
        }
        for _ in 0..3 {
            assert!(!b.spend(&l, 0, 1).unwrap_err().close);
        }
        b.spend(&l, 100, 1).unwrap();
        for _ in 0..3 {
            assert!(!b.spend(&l, 100, 1).unwrap_err().close);
        }
        assert!(b.spend(&l, 100, 1).unwrap_err().close, "the 4th in a row");
        let never = SendLimit::new(1, 1, 0, 0, 0).unwrap();
        let mut b = Budget::full(&never, 0);
        b.spend(&never, 0, 1).unwrap();
        for _ in 0..10_000 {
            assert!(!b.spend(&never, 0, 1).unwrap_err().close);
        }
    }

    #[test]
    fn a_clock_that_goes_back_fills_nothing() {
        let l = limit();
        let mut b = Budget::full(&l, 5_000);
        for _ in 0..5 {
            b.spend(&l, 5_000, 1).unwrap();
        }
        assert!(b.spend(&l, 4_000, 1).is_err());
        assert!(b.spend(&l, 5_050, 1).is_err(), "half a message since the last fill");
        b.spend(&l, 5_100, 1).unwrap();
    }
}
