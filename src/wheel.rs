//! A coarse timing wheel: every connection deadline of one worker, with no
//! timer per connection.
//!
//! Owns: buckets of `(slot, generation)` entries keyed by the tick they are
//! due at.
//! Must not: know what a deadline means. The wheel only returns due entries;
//! the caller asks the connection's session what to do and re-inserts it at
//! its next deadline. Activity never touches the wheel: an entry that comes
//! due early (the connection was active since) is simply re-inserted at its
//! real deadline ("lazy re-bucketing"). Stale entries (the connection closed,
//! the slot's generation moved on) are dropped by the caller.
//!
//! Memory: one 12-byte entry per live connection (plus superseded entries
//! until they come due).

use crate::proto::session::Tick;

/// Buckets in the wheel: deadlines up to this many ticks ahead get their own
/// bucket; later ones are parked in the last bucket and re-inserted when it
/// comes round. 4096 × 1 s ticks is over an hour.
pub const WHEEL_BUCKETS: usize = 4096;
const _: () = assert!(WHEEL_BUCKETS.is_power_of_two());

/// One entry: a connection slot, its generation, and the tick the entry is
/// filed under. A connection remembers the tick of its current entry; an
/// entry whose tick differs was superseded (the connection was rescheduled
/// earlier, e.g. to close) and is dropped when it comes due.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub slot: u32,
    pub generation: u32,
    pub at: Tick,
}

/// The wheel of one worker.
pub struct Wheel {
    buckets: Box<[Vec<Entry>]>,
    /// Every tick up to and including `now` has been handed out.
    now: Tick,
    len: usize,
}

impl Wheel {
    /// An empty wheel whose current tick is `now`.
    pub fn new(now: Tick) -> Wheel {
        Wheel { buckets: (0..WHEEL_BUCKETS).map(|_| Vec::new()).collect(), now, len: 0 }
    }

    /// The last tick handed out.
    pub fn now(&self) -> Tick {
        self.now
    }

    /// Entries in the wheel.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the wheel is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `(slot, generation)` at tick `at` and returns the tick it
    /// was filed under: a deadline at or before `now` is due at the next
    /// tick; one beyond the wheel's span is parked at its end.
    pub fn insert(&mut self, at: Tick, slot: u32, generation: u32) -> Tick {
        let ahead = at.wrapping_sub(self.now) as i32;
        let ahead = ahead.clamp(1, WHEEL_BUCKETS as i32 - 1) as u32;
        let tick = self.now.wrapping_add(ahead);
        self.buckets[tick as usize & (WHEEL_BUCKETS - 1)].push(Entry { slot, generation, at: tick });
        self.len += 1;
        tick
    }

    /// Moves the wheel to `to`, appending every entry due on the way to
    /// `due` (in deadline order, bucket by bucket).
    pub fn advance(&mut self, to: Tick, due: &mut Vec<Entry>) {
        let steps = to.wrapping_sub(self.now) as i32;
        if steps <= 0 {
            return;
        }
        let steps = (steps as usize).min(WHEEL_BUCKETS);
        for i in 1..=steps {
            let b = &mut self.buckets[self.now.wrapping_add(i as u32) as usize & (WHEEL_BUCKETS - 1)];
            self.len -= b.len();
            // Take the bucket's allocation with it: a burst of deadlines
            // (a connect storm) must not leave its capacity behind in 4096
            // buckets.
            let taken = std::mem::take(b);
            if due.is_empty() {
                *due = taken;
            } else {
                due.extend_from_slice(&taken);
            }
        }
        self.now = to;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(due: &[Entry]) -> Vec<u32> {
        due.iter().map(|e| e.slot).collect()
    }

    #[test]
    fn entries_come_due_at_their_tick() {
        let mut w = Wheel::new(100);
        assert_eq!(w.insert(103, 1, 0), 103);
        w.insert(101, 2, 0);
        w.insert(103, 3, 0);
        let mut due = Vec::new();
        w.advance(102, &mut due);
        assert_eq!(slots(&due), vec![2]);
        assert_eq!(due[0].at, 101);
        due.clear();
        w.advance(103, &mut due);
        assert_eq!(slots(&due), vec![1, 3]);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadlines_are_due_next_tick() {
        let mut w = Wheel::new(50);
        assert_eq!(w.insert(10, 1, 0), 51);
        w.insert(50, 2, 0);
        let mut due = Vec::new();
        w.advance(51, &mut due);
        assert_eq!(due.len(), 2);
    }

    #[test]
    fn far_deadlines_park_at_the_end() {
        let mut w = Wheel::new(0);
        assert_eq!(w.insert(1_000_000, 1, 0), WHEEL_BUCKETS as u32 - 1);
        let mut due = Vec::new();
        w.advance(WHEEL_BUCKETS as u32 - 2, &mut due);
        assert!(due.is_empty());
        w.advance(WHEEL_BUCKETS as u32 - 1, &mut due);
        assert_eq!(slots(&due), vec![1], "parked entry surfaces for re-insertion");
    }

    #[test]
    fn a_long_jump_hands_out_everything_once() {
        let mut w = Wheel::new(0);
        for i in 1..100 {
            w.insert(i * 7, i, 0);
        }
        let mut due = Vec::new();
        w.advance(100_000, &mut due);
        assert_eq!(due.len(), 99);
        assert!(w.is_empty());
    }

    #[test]
    fn wraps_around_u32() {
        let mut w = Wheel::new(u32::MAX - 1);
        w.insert(1, 7, 0);
        let mut due = Vec::new();
        w.advance(0, &mut due);
        assert!(due.is_empty());
        w.advance(1, &mut due);
        assert_eq!(slots(&due), vec![7]);
    }
}
