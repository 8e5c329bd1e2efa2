//! What one connection may originate: a token bucket of messages and one
//! of payload bytes (`limits.send_rate`, `limits.send_bytes_rate` and
//! their bursts), without I/O or a clock of its own.
//!
//! Owns: [`SendLimit`] (the worker-wide rates, converted to the worker's
//! ticks) and [`Budget`] (one connection's two buckets and the tick they
//! were last filled at), and the rule: a message is taken when both
//! buckets hold its cost (one message; its payload's bytes), and then
//! both pay; a message refused pays nothing.
//! Must not: hold anything for a connection that sends nothing. A budget
//! lives in its worker's side table only while it is below full
//! ([`Budget::is_full`]: the worker drops it then), so an idle
//! connection's slot stays the size it is (`runtime/worker/`).
//!
//! Why a bucket per connection, and these units. The machine sees time
//! in ticks (`timeouts.tick_ms`, 1 s by default), so the buckets fill once
//! a tick, by the rate times the tick, in thousandths of a message (or of
//! a byte) so that a rate below one message a tick loses nothing. A
//! client that keeps to the rate is never refused; one that sends a burst
//! gets `burst` at once and then the rate. Per connection and not per
//! user, because the machine holds its connection only: a user has at
//! most `limits.max_conns_per_user` connections, so a user originates at
//! most that many times the rate.

use super::session::Tick;

/// Thousandths: one message, or one byte, costs this many units.
const UNIT: u64 = 1000;

/// The rates of a worker's connections, in units per tick. A rate of 0
/// leaves its dimension unlimited.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SendLimit {
    msgs_per_tick: u64,
    msgs_burst: u64,
    bytes_per_tick: u64,
    bytes_burst: u64,
}

/// Which bucket refused a message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// `limits.send_rate` (messages per second).
    Messages,
    /// `limits.send_bytes_rate` (payload bytes per second).
    Bytes,
}

impl SendLimit {
    /// The limit for `msgs_per_s` messages (burst `msgs_burst`) and
    /// `bytes_per_s` payload bytes (burst `bytes_burst`) a second, with
    /// ticks of `tick_ms`. `None` when both rates are 0: nothing to limit.
    /// The config checks the bursts (`config.rs`): at least one message,
    /// and at least the largest payload, when their rate is set.
    pub fn new(msgs_per_s: u64, msgs_burst: u64, bytes_per_s: u64, bytes_burst: u64, tick_ms: u64) -> Option<Self> {
        if msgs_per_s == 0 && bytes_per_s == 0 {
            return None;
        }
        // rate/s × tick_ms/1000 s × UNIT units = rate × tick_ms units.
        Some(SendLimit {
            msgs_per_tick: msgs_per_s.saturating_mul(tick_ms),
            msgs_burst: msgs_burst.saturating_mul(UNIT),
            bytes_per_tick: bytes_per_s.saturating_mul(tick_ms),
            bytes_burst: bytes_burst.saturating_mul(UNIT),
        })
    }

    /// Messages per second ([`Exceeded::Messages`]'s rate) and payload
    /// bytes per second, as configured, for error reasons.
    pub fn per_second(&self, which: Exceeded, tick_ms: u64) -> u64 {
        let per_tick = match which {
            Exceeded::Messages => self.msgs_per_tick,
            Exceeded::Bytes => self.bytes_per_tick,
        };
        per_tick / tick_ms.max(1)
    }
}

/// One connection's two buckets. 24 bytes, kept in a side table only
/// while below full (module doc).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    msgs: u64,
    bytes: u64,
    /// The tick the buckets were last filled at.
    at: Tick,
}

impl Budget {
    /// Both buckets full, at `now`: what a connection that has not sent
    /// lately has.
    pub fn full(limit: &SendLimit, now: Tick) -> Budget {
        Budget { msgs: limit.msgs_burst, bytes: limit.bytes_burst, at: now }
    }

    /// Fills the buckets for the ticks since the last fill. Ticks wrap;
    /// a clock that went back (it never does) fills nothing.
    fn fill(&mut self, limit: &SendLimit, now: Tick) {
        let elapsed = now.wrapping_sub(self.at);
        if elapsed == 0 || elapsed > u32::MAX / 2 {
            return;
        }
        let ticks = u64::from(elapsed);
        self.msgs = self.msgs.saturating_add(limit.msgs_per_tick.saturating_mul(ticks)).min(limit.msgs_burst);
        self.bytes = self.bytes.saturating_add(limit.bytes_per_tick.saturating_mul(ticks)).min(limit.bytes_burst);
        self.at = now;
    }

    /// Takes one message of `payload_len` bytes at `now`, if both buckets
    /// hold it; otherwise takes nothing and says which one is short. An
    /// unlimited dimension (rate 0) never refuses.
    pub fn spend(&mut self, limit: &SendLimit, now: Tick, payload_len: usize) -> Result<(), Exceeded> {
        self.fill(limit, now);
        let bytes = (payload_len as u64).saturating_mul(UNIT);
        if limit.msgs_per_tick > 0 && self.msgs < UNIT {
            return Err(Exceeded::Messages);
        }
        if limit.bytes_per_tick > 0 && self.bytes < bytes {
            return Err(Exceeded::Bytes);
        }
        if limit.msgs_per_tick > 0 {
            self.msgs -= UNIT;
        }
        if limit.bytes_per_tick > 0 {
            self.bytes -= bytes;
        }
        Ok(())
    }

    /// Whether the buckets are full again at `now`: the budget is then
    /// the same as none, and its side-table entry can go.
    pub fn is_full(&self, limit: &SendLimit, now: Tick) -> bool {
        let mut b = *self;
        b.fill(limit, now);
        (limit.msgs_per_tick == 0 || b.msgs >= limit.msgs_burst)
            && (limit.bytes_per_tick == 0 || b.bytes >= limit.bytes_burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 messages/s (burst 5) and 1,000 bytes/s (burst 2,000), 1 s ticks.
    fn limit() -> SendLimit {
        SendLimit::new(10, 5, 1000, 2000, 1000).unwrap()
    }

    #[test]
    fn no_rate_is_no_limit() {
        assert_eq!(SendLimit::new(0, 0, 0, 0, 1000), None);
        let only_bytes = SendLimit::new(0, 0, 100, 100, 1000).unwrap();
        let mut b = Budget::full(&only_bytes, 0);
        for _ in 0..10_000 {
            b.spend(&only_bytes, 0, 0).unwrap();
        }
        assert_eq!(b.spend(&only_bytes, 0, 101), Err(Exceeded::Bytes));
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = limit();
        let mut b = Budget::full(&l, 100);
        for _ in 0..5 {
            b.spend(&l, 100, 1).unwrap();
        }
        assert_eq!(b.spend(&l, 100, 1), Err(Exceeded::Messages));
        // A tick later the bucket got 10 more, capped at the burst.
        for _ in 0..5 {
            b.spend(&l, 101, 1).unwrap();
        }
        assert_eq!(b.spend(&l, 101, 1), Err(Exceeded::Messages));
        assert!(!b.is_full(&l, 101));
        assert!(b.is_full(&l, 102));
    }

    #[test]
    fn a_refused_message_pays_nothing_and_bytes_refuse_alone() {
        let l = limit();
        let mut b = Budget::full(&l, 7);
        b.spend(&l, 7, 1500).unwrap();
        // 500 bytes left: a 600-byte message is refused for its bytes and
        // takes no message either.
        assert_eq!(b.spend(&l, 7, 600), Err(Exceeded::Bytes));
        for _ in 0..4 {
            b.spend(&l, 7, 100).unwrap();
        }
        assert_eq!(b.spend(&l, 7, 0), Err(Exceeded::Messages));
        // One tick fills 1,000 bytes.
        b.spend(&l, 8, 1000).unwrap();
        assert_eq!(b.spend(&l, 8, 600), Err(Exceeded::Bytes));
    }

    #[test]
    fn a_rate_below_one_message_a_tick_keeps_its_fractions() {
        // 5 messages/s with 100 ms ticks: one message every second tick.
        let l = SendLimit::new(5, 1, 0, 0, 100).unwrap();
        let mut b = Budget::full(&l, 0);
        let mut taken = 0;
        for now in 0..100u32 {
            while b.spend(&l, now, 10).is_ok() {
                taken += 1;
            }
        }
        // The burst of 1, then one per two ticks over 99 ticks.
        assert_eq!(taken, 1 + 49);
        assert_eq!(l.per_second(Exceeded::Messages, 100), 5);
    }

    #[test]
    fn ticks_wrap() {
        let l = limit();
        let mut b = Budget::full(&l, u32::MAX);
        for _ in 0..5 {
            b.spend(&l, u32::MAX, 1).unwrap();
        }
        assert!(b.spend(&l, u32::MAX, 1).is_err());
        b.spend(&l, 0, 1).unwrap();
        assert!(b.is_full(&l, 1));
    }
}
