//! Rooms: server-wide presence counts and per-worker membership.
//!
//! Owns: `RoomRegistry`, the one shared map (room → connections in it, on
//! every worker), which enforces the room limits and answers `room_size`;
//! and `LocalRooms`, one worker's members of each room, which a publish
//! walks.
//! Must not: sit on the publish path behind a lock. A publish is one
//! mailbox command per worker; each worker reads its own `LocalRooms`
//! without synchronisation. The registry's shard lock is taken only when a
//! connection joins or leaves a room, and to read a count.
//!
//! Memory per membership: one 8-byte `Member` in the room's vector and one
//! 8-byte `(room, position)` pair in the connection's list, so leaving is
//! O(1): swap-remove, then fix the position of the member that moved.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, RwLock};

use hashbrown::HashMap;
use slab::Slab;
use thiserror::Error;

use crate::proto::codes::ErrorCode;
use crate::sync::limit::CountLimit;

const SHARDS: usize = 32;

/// A join refused by a room limit.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
pub enum RoomError {
    #[error("room name must be 1 to 255 bytes")]
    InvalidName,
    #[error("room is full ({limit} connections, rooms.max_members_per_room)")]
    RoomFull { limit: u64 },
    #[error("too many rooms on this server ({limit}, rooms.max_rooms)")]
    TooManyRooms { limit: usize },
    #[error("connection is in too many rooms ({limit}, rooms.max_rooms_per_conn)")]
    ConnRoomLimit { limit: usize },
    #[error("this user already created {limit} rooms that still exist (rooms.max_rooms_created_per_user); join existing rooms")]
    CreatorLimit { limit: u32 },
}

impl RoomError {
    /// The ERROR code a client gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomError::InvalidName => ErrorCode::InvalidRoom,
            RoomError::RoomFull { .. } => ErrorCode::RoomFull,
            RoomError::TooManyRooms { .. } => ErrorCode::TooManyRooms,
            RoomError::ConnRoomLimit { .. } => ErrorCode::RoomLimit,
            RoomError::CreatorLimit { .. } => ErrorCode::RoomCreationLimit,
        }
    }
}

/// Checks a room name (the protocol's `str8`, non-empty).
pub fn check_room_name(name: &str) -> Result<(), RoomError> {
    if name.is_empty() || name.len() > 255 {
        return Err(RoomError::InvalidName);
    }
    Ok(())
}

/// A room in the registry: its connections over all workers, and the user
/// whose SUBSCRIBE created it (`None`: the application created it).
struct Room {
    members: u64,
    creator: Option<Arc<str>>,
}

/// One shard of the registry: room name → the room.
type Shard = RwLock<HashMap<Arc<str>, Room>>;

/// One shard of the creators: user → rooms that user's SUBSCRIBEs created
/// and that still exist.
type CreatorShard = Mutex<HashMap<Arc<str>, u32>>;

/// Server-wide room presence: connections per room, across workers.
pub struct RoomRegistry {
    shards: Box<[Shard]>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Rooms that exist, against `max_rooms`: a place is taken (in one
    /// step with the check) before a room is created, and given back when
    /// it goes.
    rooms: CountLimit,
    max_rooms: usize,
    max_members: u64,
    /// Rooms each user created and that still exist, against
    /// `max_created_per_user`. Only users who created one have an entry.
    creators: Box<[CreatorShard]>,
    max_created_per_user: u32,
}

/// A join counted in the registry ([`RoomRegistry::join`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The room's shared name.
    pub name: Arc<str>,
    /// This join made the room (it had no member before).
    pub created: bool,
}

impl RoomRegistry {
    /// A registry of at most `max_rooms` rooms of at most `max_members`
    /// connections each; a user's SUBSCRIBEs may create at most
    /// `max_created_per_user` rooms that exist at once (0: none; the
    /// application's joins are not counted).
    pub fn new(max_rooms: usize, max_members: u64, max_created_per_user: u32) -> RoomRegistry {
        RoomRegistry {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            rooms: CountLimit::new(),
            max_rooms,
            max_members,
            creators: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_created_per_user,
        }
    }

    fn shard(&self, name: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(name) >> 59) as usize % SHARDS]
    }

    fn creators_of(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, u32>> {
        let shard = &self.creators[(self.hasher.hash_one(user) >> 59) as usize % SHARDS];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more connection in `name`, creating the room if needed.
    /// `creator` is the user whose SUBSCRIBE this is (`None`: the
    /// application's join): a room it creates counts against that user's
    /// `max_created_per_user` for as long as the room exists. Returns the
    /// room's shared name, and whether this join created it, decided under
    /// the room's lock: of joins racing into a new room from several
    /// workers exactly one learns it was the first (a cluster node
    /// subscribes to the room's channel then), where a look at the size
    /// after the join could show each of them another's member too.
    pub fn join(&self, name: &str, creator: Option<&Arc<str>>) -> Result<Joined, RoomError> {
        check_room_name(name)?;
        let mut map = self.shard(name).write().unwrap_or_else(|e| e.into_inner());
        if let Some((key, room)) = map.get_key_value_mut(name) {
            if room.members >= self.max_members {
                return Err(RoomError::RoomFull { limit: self.max_members });
            }
            room.members += 1;
            return Ok(Joined { name: key.clone(), created: false });
        }
        if self.max_members == 0 {
            return Err(RoomError::RoomFull { limit: 0 });
        }
        // Lock order: room shard, then creator shard (as in `leave`).
        if let Some(user) = creator {
            let mut created = self.creators_of(user);
            let n = created.get(&**user).copied().unwrap_or(0);
            if n >= self.max_created_per_user {
                return Err(RoomError::CreatorLimit { limit: self.max_created_per_user });
            }
            if !self.rooms.try_take(self.max_rooms) {
                return Err(RoomError::TooManyRooms { limit: self.max_rooms });
            }
            created.insert(user.clone(), n + 1);
        } else if !self.rooms.try_take(self.max_rooms) {
            return Err(RoomError::TooManyRooms { limit: self.max_rooms });
        }
        let key: Arc<str> = Arc::from(name);
        map.insert(key.clone(), Room { members: 1, creator: creator.cloned() });
        Ok(Joined { name: key, created: true })
    }

    /// Counts one connection out of `name`; the room goes when empty (and
    /// stops counting against its creator). Returns whether it went,
    /// decided under its lock as in [`RoomRegistry::join`].
    pub fn leave(&self, name: &str) -> bool {
        let mut map = self.shard(name).write().unwrap_or_else(|e| e.into_inner());
        let Some(room) = map.get_mut(name) else {
            debug_assert!(false, "leave of a room nobody joined: {name}");
            return false;
        };
        room.members -= 1;
        if room.members == 0 {
            if let Some(Room { creator: Some(user), .. }) = map.remove(name) {
                let mut created = self.creators_of(&user);
                match created.get_mut(&*user) {
                    Some(n) if *n > 1 => *n -= 1,
                    Some(_) => {
                        created.remove(&*user);
                    }
                    None => debug_assert!(false, "a created room without its creator's count"),
                }
            }
            self.rooms.give_back();
            return true;
        }
        false
    }

    /// Rooms that `user`'s SUBSCRIBEs created and that still exist.
    pub fn created_by(&self, user: &str) -> u32 {
        self.creators_of(user).get(user).copied().unwrap_or(0)
    }

    /// Connections in `name` right now (0 if the room does not exist).
    pub fn size(&self, name: &str) -> u64 {
        self.shard(name).read().unwrap_or_else(|e| e.into_inner()).get(name).map_or(0, |r| r.members)
    }

    /// The names of every room with at least one connection (a walk over
    /// the whole registry, one shard lock at a time: for rare whole-node
    /// work, such as a cluster node re-subscribing after Redis came back).
    pub fn names(&self) -> Vec<Arc<str>> {
        let mut out = Vec::with_capacity(self.room_count());
        for shard in self.shards.iter() {
            out.extend(shard.read().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        }
        out
    }

    /// Rooms with at least one connection.
    pub fn room_count(&self) -> usize {
        self.rooms.taken()
    }

    /// Whether one more room can be created (an estimate for callers that
    /// check before posting a join; the join itself decides).
    pub fn would_accept(&self, name: &str) -> Result<(), RoomError> {
        check_room_name(name)?;
        let size = self.size(name);
        if size >= self.max_members {
            return Err(RoomError::RoomFull { limit: self.max_members });
        }
        if size == 0 && self.room_count() >= self.max_rooms {
            return Err(RoomError::TooManyRooms { limit: self.max_rooms });
        }
        Ok(())
    }
}

/// A connection in a worker's room: its slot and generation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub slot: u32,
    pub generation: u32,
}

/// One room's members on one worker.
pub struct LocalRoom {
    pub name: Arc<str>,
    pub members: Vec<Member>,
}

/// Index of a room in a worker's `LocalRooms`.
pub type RoomIdx = u32;

/// What a removal changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Removed {
    /// The member that moved into the freed position, and that position:
    /// its own record of where it sits must be updated.
    pub moved: Option<(Member, u32)>,
    /// The room had no member left on this worker and was dropped.
    pub emptied: bool,
}

/// One worker's room membership.
#[derive(Default)]
pub struct LocalRooms {
    index: HashMap<Arc<str>, RoomIdx>,
    rooms: Slab<LocalRoom>,
}

impl LocalRooms {
    /// The room named `name`, if it has members on this worker.
    pub fn find(&self, name: &str) -> Option<RoomIdx> {
        self.index.get(name).copied()
    }

    /// The room at `idx`.
    pub fn room(&self, idx: RoomIdx) -> &LocalRoom {
        &self.rooms[idx as usize]
    }

    /// Rooms with members on this worker.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// Whether no room has members on this worker.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Adds `m` to the room `name` (created if new); returns the room and
    /// the member's position in it. The caller guarantees `m` is not
    /// already in the room.
    pub fn add(&mut self, name: &Arc<str>, m: Member) -> (RoomIdx, u32) {
        let idx = match self.index.get(&**name) {
            Some(&i) => i,
            None => {
                let i = self.rooms.insert(LocalRoom { name: name.clone(), members: Vec::new() }) as RoomIdx;
                self.index.insert(name.clone(), i);
                i
            }
        };
        let members = &mut self.rooms[idx as usize].members;
        debug_assert!(!members.contains(&m), "{m:?} joined {name} twice");
        members.push(m);
        (idx, members.len() as u32 - 1)
    }

    /// Removes the member at `pos` of room `idx`.
    pub fn remove(&mut self, idx: RoomIdx, pos: u32, m: Member) -> Removed {
        let room = &mut self.rooms[idx as usize];
        debug_assert_eq!(room.members.get(pos as usize), Some(&m), "membership record out of date");
        room.members.swap_remove(pos as usize);
        let moved = room.members.get(pos as usize).map(|&other| (other, pos));
        if room.members.is_empty() {
            let room = self.rooms.remove(idx as usize);
            self.index.remove(&*room.name);
            return Removed { moved: None, emptied: true };
        }
        Removed { moved, emptied: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(slot: u32) -> Member {
        Member { slot, generation: 1 }
    }

    #[test]
    fn registry_counts_and_limits() {
        let r = RoomRegistry::new(2, 3, u32::MAX);
        let a = r.join("a", None).unwrap();
        let a2 = r.join("a", None).unwrap();
        assert!(Arc::ptr_eq(&a.name, &a2.name));
        assert!(a.created && !a2.created);
        r.join("a", None).unwrap();
        assert_eq!(r.join("a", None), Err(RoomError::RoomFull { limit: 3 }));
        assert_eq!(r.size("a"), 3);
        r.join("b", None).unwrap();
        assert_eq!(r.join("c", None), Err(RoomError::TooManyRooms { limit: 2 }));
        assert_eq!(r.would_accept("c"), Err(RoomError::TooManyRooms { limit: 2 }));
        assert!(r.leave("b"), "its last member left");
        assert_eq!(r.size("b"), 0);
        assert!(r.join("c", None).is_ok(), "an emptied room frees its place");
        assert_eq!(r.join("", None), Err(RoomError::InvalidName));
        assert_eq!(r.room_count(), 2);
    }

    #[test]
    fn a_user_creates_at_most_its_share_of_rooms() {
        let r = RoomRegistry::new(100, u64::MAX, 2);
        let (ann, bob): (Arc<str>, Arc<str>) = (Arc::from("ann"), Arc::from("bob"));
        r.join("a1", Some(&ann)).unwrap();
        r.join("a2", Some(&ann)).unwrap();
        assert_eq!(r.join("a3", Some(&ann)), Err(RoomError::CreatorLimit { limit: 2 }));
        assert_eq!(r.room_count(), 2, "a refused creation takes no place");
        // Joining rooms that exist, and the application's joins, are not
        // creations of hers.
        r.join("a1", Some(&bob)).unwrap();
        r.join("b1", Some(&bob)).unwrap();
        r.join("b1", Some(&ann)).unwrap();
        r.join("app", None).unwrap();
        r.join("app", Some(&ann)).unwrap();
        assert_eq!((r.created_by("ann"), r.created_by("bob")), (2, 1));
        // Her room lives on with bob in it and still counts; once it is
        // gone she may create another.
        r.leave("a1");
        assert_eq!(r.created_by("ann"), 2);
        r.leave("a1");
        assert_eq!(r.created_by("ann"), 1);
        r.join("a3", Some(&ann)).unwrap();
        // Zero: clients create no rooms at all.
        let none = RoomRegistry::new(100, u64::MAX, 0);
        assert_eq!(none.join("x", Some(&ann)), Err(RoomError::CreatorLimit { limit: 0 }));
        none.join("x", None).unwrap();
        none.join("x", Some(&ann)).unwrap();
    }

    #[test]
    fn local_membership_swap_removes_and_reports_the_move() {
        let mut l = LocalRooms::default();
        let name: Arc<str> = Arc::from("room");
        let (idx, p0) = l.add(&name, m(10));
        let (_, p1) = l.add(&name, m(11));
        let (_, p2) = l.add(&name, m(12));
        assert_eq!((p0, p1, p2), (0, 1, 2));
        // Removing the first moves the last into its place.
        assert_eq!(l.remove(idx, 0, m(10)), Removed { moved: Some((m(12), 0)), emptied: false });
        assert_eq!(l.room(idx).members, vec![m(12), m(11)]);
        // Removing the last moves nothing.
        assert_eq!(l.remove(idx, 1, m(11)), Removed { moved: None, emptied: false });
        assert_eq!(l.remove(idx, 0, m(12)), Removed { moved: None, emptied: true });
        assert!(l.find("room").is_none());
        assert!(l.is_empty());
    }

    /// Two workers joining members to a new room at the same moment: one
    /// of them, never both or neither, is told it created the room, and of
    /// the two leaves one is told it removed it. (Told by a look at the
    /// size after the join, both could see 2 and neither subscribe the
    /// node to the room's channel: its members then missed what other
    /// nodes published to it.)
    #[test]
    fn of_racing_joins_into_a_new_room_exactly_one_created_it() {
        let r = Arc::new(RoomRegistry::new(100_000, u64::MAX, u32::MAX));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (r, barrier) = (r.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut created = Vec::new();
                    let mut removed = Vec::new();
                    for i in 0..2000 {
                        let name = format!("new{i}");
                        barrier.wait();
                        created.push(r.join(&name, None).unwrap().created);
                        barrier.wait();
                        removed.push(r.leave(&name));
                    }
                    (created, removed)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for i in 0..2000 {
            assert!(results[0].0[i] ^ results[1].0[i], "room {i}: created {} / {}", results[0].0[i], results[1].0[i]);
            assert!(results[0].1[i] ^ results[1].1[i], "room {i}: removed {} / {}", results[0].1[i], results[1].1[i]);
        }
        assert_eq!(r.room_count(), 0);
    }

    #[test]
    fn concurrent_joins_and_leaves_keep_exact_counts() {
        let r = Arc::new(RoomRegistry::new(1000, u64::MAX, u32::MAX));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        let name = format!("room{}", i % 7);
                        r.join(&name, None).unwrap();
                        if (i + t) % 2 == 0 {
                            r.leave(&name);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = (0..7).map(|i| r.size(&format!("room{i}"))).sum();
        assert_eq!(total, 4 * 5000 / 2);
    }

    /// Concurrent creators of distinct rooms never get past `max_rooms`:
    /// each thread keeps up to `HOLD` rooms of its own alive (join a new
    /// one, leave its oldest), so together they want more than the limit
    /// all the time. `held` counts rooms whose creation succeeded and that
    /// are not yet left (raised after the join, lowered before the leave),
    /// so it never exceeds the rooms really in the registry.
    #[test]
    fn concurrent_creators_never_pass_max_rooms() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const MAX: usize = 6;
        const THREADS: usize = 4;
        const HOLD: usize = 3;
        const ROUNDS: usize = 300_000;
        let r = Arc::new(RoomRegistry::new(MAX, u64::MAX, u32::MAX));
        let held = Arc::new(AtomicUsize::new(0));
        let worst_held = Arc::new(AtomicUsize::new(0));
        let worst_count = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (r, held, worst_held, worst_count) =
                    (r.clone(), held.clone(), worst_held.clone(), worst_count.clone());
                std::thread::spawn(move || {
                    let names: Vec<String> = (0..2 * HOLD).map(|i| format!("t{t}-r{i}")).collect();
                    let mut mine: std::collections::VecDeque<&str> = std::collections::VecDeque::new();
                    for i in 0..ROUNDS {
                        let name = names[i % names.len()].as_str();
                        if mine.len() == HOLD || mine.contains(&name) {
                            let old = mine.pop_front().expect("holds some");
                            held.fetch_sub(1, Ordering::SeqCst);
                            r.leave(old);
                        }
                        if mine.contains(&name) {
                            continue;
                        }
                        if r.join(name, None).is_ok() {
                            let h = held.fetch_add(1, Ordering::SeqCst) + 1;
                            worst_held.fetch_max(h, Ordering::Relaxed);
                            mine.push_back(name);
                        }
                        worst_count.fetch_max(r.room_count(), Ordering::Relaxed);
                    }
                    for old in mine {
                        held.fetch_sub(1, Ordering::SeqCst);
                        r.leave(old);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (worst_held, worst_count) = (worst_held.load(Ordering::Relaxed), worst_count.load(Ordering::Relaxed));
        assert!(worst_held <= MAX, "{worst_held} rooms created and alive at once, max_rooms {MAX}");
        assert!(worst_count <= MAX, "room_count() reached {worst_count}, max_rooms {MAX}");
        assert_eq!(r.room_count(), 0);
    }

    /// Two threads in lockstep, each creating a room of its own when the
    /// registry has room for one more: at most one may succeed. The spin
    /// barriers start both joins within a few hundred nanoseconds of each
    /// other, round after round, so a check-then-count race shows.
    #[test]
    fn simultaneous_creators_of_the_last_room() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const MAX: usize = 4;
        const ROUNDS: usize = 50_000;
        let r = RoomRegistry::new(MAX, u64::MAX, u32::MAX);
        for i in 0..MAX - 1 {
            r.join(&format!("base{i}"), None).unwrap();
        }
        // Names in different shards, so the two joins do not serialise on
        // one shard lock.
        let names = [
            "new0".to_string(),
            (1..).map(|i| format!("new{i}")).find(|n| !std::ptr::eq(r.shard(n), r.shard("new0"))).unwrap(),
        ];
        let arrived = AtomicUsize::new(0);
        let created = AtomicUsize::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let started = std::time::Instant::now();
        let (mut worst_count, mut worst_created) = (0, 0);
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..2)
                .map(|t| {
                    let (r, arrived, created, stop, name) = (&r, &arrived, &created, &stop, &names[t]);
                    s.spawn(move || {
                        let barrier = |phase: &mut usize| {
                            *phase += 1;
                            arrived.fetch_add(1, Ordering::AcqRel);
                            let mut spins = 0u32;
                            while arrived.load(Ordering::Acquire) < 2 * *phase {
                                spins += 1;
                                if spins < 1000 {
                                    std::hint::spin_loop();
                                } else {
                                    std::thread::yield_now();
                                }
                            }
                        };
                        let (mut phase, mut worst) = (0, (0, 0));
                        for _ in 0..ROUNDS {
                            barrier(&mut phase);
                            let ok = r.join(name, None).is_ok();
                            if ok {
                                created.fetch_add(1, Ordering::AcqRel);
                            }
                            barrier(&mut phase);
                            if t == 0 {
                                worst = (worst.0.max(r.room_count()), worst.1.max(created.swap(0, Ordering::AcqRel)));
                                // Stop at the first violation, or after 2 s on a
                                // busy machine where lockstep is slow.
                                if worst.0 > MAX || worst.1 > 1 || started.elapsed().as_secs() >= 2 {
                                    stop.store(true, Ordering::Release);
                                }
                            }
                            barrier(&mut phase);
                            if ok {
                                r.leave(name);
                            }
                            if stop.load(Ordering::Acquire) {
                                break;
                            }
                        }
                        worst
                    })
                })
                .collect();
            for t in threads {
                let (count, created) = t.join().unwrap();
                worst_count = worst_count.max(count);
                worst_created = worst_created.max(created);
            }
        });
        assert!(worst_created <= 1, "{worst_created} rooms created at once with room for one");
        assert!(worst_count <= MAX, "room_count() reached {worst_count}, max_rooms {MAX}");
        assert_eq!(r.room_count(), MAX - 1);
    }
}
