//! Newtype identifiers shared by every layer.
//!
//! Owns: `WorkerId` and `ConnId`, and how a `ConnId` packs into one `u64`.
//! Must not: carry any state; an id is only a name, the owning worker's
//! connection table decides whether it still refers to a live connection.

use std::fmt;

/// Index of a worker thread (one per core). At most [`MAX_WORKERS`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u8);

/// Largest number of workers a server can run: the worker index is 8 bits of
/// a [`ConnId`].
pub const MAX_WORKERS: usize = 256;

impl WorkerId {
    /// The id of worker `i`, or `None` past [`MAX_WORKERS`] (an index cast
    /// to 8 bits would wrap, and two workers' connection ids would alias).
    pub fn from_index(i: usize) -> Option<WorkerId> {
        u8::try_from(i).ok().map(WorkerId)
    }
}

/// Largest slot index a worker's connection table can hold: 24 bits of a
/// [`ConnId`], about 16.7 million connections per worker.
pub const MAX_SLOTS_PER_WORKER: usize = (1 << 24) - 1;

/// A connection, named by the worker that owns it, its slot in that worker's
/// table and the generation the slot had when the connection was accepted.
///
/// A stale id (the connection closed and the slot was reused) carries an old
/// generation and is ignored by the owning worker: it never reaches the new
/// occupant of the slot. Generations come from a per-worker 32-bit counter,
/// so a false match needs 2^32 accepts on one worker between lookup and use.
///
/// Packed into a `u64`: `worker << 56 | slot << 32 | generation`.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// Builds an id. `slot` must fit in 24 bits.
    pub fn new(worker: WorkerId, slot: u32, generation: u32) -> ConnId {
        debug_assert!(slot as usize <= MAX_SLOTS_PER_WORKER);
        ConnId(((worker.0 as u64) << 56) | (((slot as u64) & 0xFF_FFFF) << 32) | generation as u64)
    }

    /// The worker that owns this connection.
    pub fn worker(self) -> WorkerId {
        WorkerId((self.0 >> 56) as u8)
    }

    /// The slot in the owning worker's connection table.
    pub fn slot(self) -> u32 {
        ((self.0 >> 32) & 0xFF_FFFF) as u32
    }

    /// The slot's generation when this connection was accepted.
    pub fn generation(self) -> u32 {
        self.0 as u32
    }

    /// The packed form, as sent to clients in LOGIN_OK.
    pub fn to_u64(self) -> u64 {
        self.0
    }

    /// Inverse of [`ConnId::to_u64`].
    pub fn from_u64(raw: u64) -> ConnId {
        ConnId(raw)
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnId({}:{}#{})", self.worker().0, self.slot(), self.generation())
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_never_wrap() {
        assert_eq!(WorkerId::from_index(0), Some(WorkerId(0)));
        assert_eq!(WorkerId::from_index(MAX_WORKERS - 1), Some(WorkerId(255)));
        assert_eq!(WorkerId::from_index(MAX_WORKERS), None, "worker 256 would alias worker 0");
        assert_eq!(WorkerId::from_index(300), None);
    }

    #[test]
    fn packs_and_unpacks() {
        let id = ConnId::new(WorkerId(255), MAX_SLOTS_PER_WORKER as u32, u32::MAX);
        assert_eq!(id.worker(), WorkerId(255));
        assert_eq!(id.slot(), MAX_SLOTS_PER_WORKER as u32);
        assert_eq!(id.generation(), u32::MAX);
        assert_eq!(ConnId::from_u64(id.to_u64()), id);
        let id = ConnId::new(WorkerId(3), 17, 9);
        assert_eq!((id.worker().0, id.slot(), id.generation()), (3, 17, 9));
    }
}
