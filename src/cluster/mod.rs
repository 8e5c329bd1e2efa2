//! Many gateways, one system: presence, routing and room fan-out across
//! nodes through Redis or Redis Cluster (docs/SCALING.md).
//!
//! Owns: the events the runtime hands over for other nodes (`Event`),
//! the bounded queue they wait in (`Link`), the counters of cross-node
//! work ([`ClusterCounters`]), and the `sb-cluster` thread ([`node`]) that
//! talks to Redis on a current-thread tokio runtime of its own.
//! Must not: let an io_uring worker wait on Redis. A worker or handle only
//! does `Link::send`, which never blocks: a full queue refuses the event
//! and counts it. What arrives from other nodes is delivered the way a
//! local push is (directory lookup, then the write path or the worker
//! mailboxes), from the `sb-cluster` thread.
//!
//! In Redis (every key of a user shares the hash tag `{<user>}`):
//! - `sb:{<user>}:nodes`: hash node id → unix ms of the login that wrote
//!   it; one write per login and per last logout of the user on a node.
//! - `sb:nodes`: sorted set node id → the Redis clock (ms) of its last
//!   heartbeat. A node not heard of for `cluster.node_ttl_ms` is dead:
//!   readers ignore its presence fields and delete the ones they meet.
//! - `{sb:nodes}:caps`: hash node id → what its build can do
//!   ([`node::CAPS`]), written at each heartbeat; the Redis store reads it
//!   before it stores an entry an older build would misread.
//!
//! Channels (classic pub/sub; in a Redis Cluster a PUBLISH reaches
//! subscribers on every shard):
//! - `sb:n:<node>`: batches of forwards for the users on that node;
//! - `sb:r:<room>`: batches of ROOM_MSG frames, subscribed by the nodes
//!   that have members of the room, only while they have them;
//! - `sb:all`: broadcasts; `sb:login`: logins, which drop cached routes.

pub mod node;
pub mod routes;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::store::{unix_ms, StoredMessage};

/// Cross-node work handed to the `sb-cluster` thread.
#[derive(Debug)]
pub(crate) enum Event {
    /// A connection of `user` logged in on this node.
    Online(Arc<str>),
    /// A connection of `user` on this node closed (the thread looks at the
    /// directory: only a user with none left here is removed).
    Offline(Arc<str>),
    /// An encoded PUSH for `user`'s connections on other nodes.
    ToUser { user: Arc<str>, frame: Bytes },
    /// A message stored in `user`'s inbox, for the windows of its device
    /// connections on other nodes.
    Stored { user: Arc<str>, msg: Arc<StoredMessage> },
    /// Close `user`'s connections on other nodes (4003).
    Kick(Arc<str>),
    /// Join (or leave) `user`'s connections on other nodes to a room.
    Join { user: Arc<str>, room: Arc<str>, join: bool },
    /// An encoded ROOM_MSG for the room's members on other nodes.
    Room { room: Arc<str>, frame: Bytes },
    /// An encoded ROOM_MSG (empty room name) for every other node.
    Broadcast(Bytes),
    /// This node's members of `room` may have gone from none to some or
    /// back: the thread subscribes or unsubscribes as the room is now.
    RoomChanged(Arc<str>),
    /// A device logged in here: its older connections on other nodes go
    /// (CLOSE 4008; PROTOCOL.md 15.2).
    Replaced(Box<DeviceReplaced>),
}

/// A device's login, for its connections on other nodes ([`Event::Replaced`]).
#[derive(Debug)]
pub(crate) struct DeviceReplaced {
    pub user: Arc<str>,
    pub device: Arc<str>,
    /// When the device logged in, in ms of the cluster's clock ([`Link::now_ms`]).
    pub at_ms: u64,
    /// `None`: to every other node holding a connection of the user, read
    /// from Redis after this turn's presence writes. `Some(node)`: to that
    /// node only: the answer to its notice of a login older than one here.
    pub to: Option<Arc<str>>,
}

impl Event {
    /// The bytes of message the event carries, counted against
    /// `cluster.queue_max_bytes` while it waits for the thread.
    pub(crate) fn queued_bytes(&self) -> u64 {
        match self {
            Event::ToUser { frame, .. } | Event::Room { frame, .. } | Event::Broadcast(frame) => frame.len() as u64,
            Event::Stored { msg, .. } => msg.payload.len() as u64,
            Event::Online(_)
            | Event::Offline(_)
            | Event::Kick(_)
            | Event::Join { .. }
            | Event::RoomChanged(_)
            | Event::Replaced(_) => 0,
        }
    }
}

/// `cluster.queue_max_bytes`' default: 64 MiB of messages may wait for the
/// `sb-cluster` thread (a thousand of the largest frames; the whole
/// default queue of messages up to 1 KiB). Past it, forwards are refused
/// and counted as past `cluster.queue_capacity`.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 64 << 20;

// Queued by the million under load: keep it small.
const _: () = assert!(std::mem::size_of::<Event>() <= 56);

/// Counters of cross-node work, readable from any thread.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Commands sent to Redis (PUBLISH, HSET, HGETALL, ...).
    pub redis_commands: AtomicU64,
    /// Waits for Redis: one per group of commands sent together (a batch's
    /// lookups, then its publishes and presence writes).
    pub redis_round_trips: AtomicU64,
    /// Commands that failed or timed out.
    pub redis_errors: AtomicU64,
    /// Records sent to other nodes (forwards, room and broadcast frames,
    /// login notices).
    pub records_sent: AtomicU64,
    /// PUBLISHes that carried them.
    pub batches_sent: AtomicU64,
    /// Records received from other nodes.
    pub records_received: AtomicU64,
    /// Batches received from other nodes.
    pub batches_received: AtomicU64,
    /// Received batches that could not be read (dropped whole).
    pub batches_malformed: AtomicU64,
    /// Local connections written to (or notified) for received records.
    pub deliveries: AtomicU64,
    /// Events refused because the queue to the `sb-cluster` thread was full
    /// (`cluster.queue_capacity` events or `cluster.queue_max_bytes`).
    pub queue_full: AtomicU64,
    /// Bytes of the messages queued for the thread (`Event::queued_bytes`).
    pub queue_bytes: AtomicU64,
    /// Forwards dropped because Redis failed (at-most-once messages lost;
    /// a stored message stays in the inbox).
    pub forwards_failed: AtomicU64,
    /// Route lookups answered from the cache, and those read from Redis.
    pub route_cache_hits: AtomicU64,
    pub route_lookups: AtomicU64,
    /// Presence writes (HSET at login, HDEL at the last logout).
    pub presence_writes: AtomicU64,
    /// Full re-registrations of this node's users (after Redis came back).
    pub presence_resyncs: AtomicU64,
    /// 1 while the pub/sub connection is up and the last heartbeat
    /// succeeded, else 0.
    pub connected: AtomicU64,
    /// Other nodes alive at the last heartbeat.
    pub live_nodes: AtomicU64,
    /// Rooms this node is subscribed to.
    pub room_subscriptions: AtomicU64,
}

impl ClusterCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// [`Link`]'s clock offset before the first heartbeat has measured it.
const CLOCK_UNKNOWN: i64 = i64::MIN;

/// The producers' end of the queue to the `sb-cluster` thread.
#[derive(Clone)]
pub(crate) struct Link {
    tx: tokio::sync::mpsc::Sender<Event>,
    pub counters: Arc<ClusterCounters>,
    pub node_id: Arc<str>,
    /// A presence or room change was refused: the thread re-registers the
    /// node's users and re-subscribes its rooms at its next heartbeat.
    pub repair: Arc<std::sync::atomic::AtomicBool>,
    /// `cluster.queue_max_bytes`.
    max_bytes: u64,
    /// Redis's clock minus this host's, in ms, as the last heartbeat read
    /// it ([`CLOCK_UNKNOWN`] before the first): device logins on different
    /// nodes are ordered on one clock ([`Link::now_ms`]).
    clock_offset_ms: Arc<std::sync::atomic::AtomicI64>,
}

impl Link {
    /// Now, in ms of the cluster's clock: this host's, corrected by the
    /// offset to Redis's that the last heartbeat measured. Nodes' own
    /// clocks may differ by seconds; this one differs between nodes by
    /// at most half a heartbeat's round trip to Redis. 0 (older than any
    /// time) until the first heartbeat: a device login here before then
    /// loses to any login elsewhere, rather than win on a host clock that
    /// may be ahead and keep a dead connection over the device's new one.
    pub(crate) fn now_ms(&self) -> u64 {
        let offset = self.clock_offset_ms.load(Ordering::Relaxed);
        if offset == CLOCK_UNKNOWN {
            return 0;
        }
        unix_ms().saturating_add_signed(offset)
    }

    /// Records Redis's clock as a heartbeat read it: `redis_ms`, read
    /// between this host's `sent_ms` and `answered_ms`.
    pub(crate) fn set_clock(&self, redis_ms: u64, sent_ms: u64, answered_ms: u64) {
        let local = sent_ms + answered_ms.saturating_sub(sent_ms) / 2;
        let offset = redis_ms as i64 - local as i64;
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
    }

    /// Hands `ev` over without waiting; false (and counted) when the queue
    /// is full or the thread has stopped.
    pub(crate) fn send(&self, ev: Event) -> bool {
        let state = matches!(ev, Event::Online(_) | Event::Offline(_) | Event::RoomChanged(_));
        let bytes = ev.queued_bytes();
        let room = crate::limits::take_bytes(&self.counters.queue_bytes, bytes, self.max_bytes);
        match if room { self.tx.try_send(ev).map_err(|_| ()) } else { Err(()) } {
            Ok(()) => true,
            Err(()) => {
                if room && bytes > 0 {
                    self.counters.queue_bytes.fetch_sub(bytes, Ordering::Relaxed);
                }
                if state {
                    // Lost state is repaired whole; a lost forward is only counted.
                    self.repair.store(true, Ordering::Release);
                }
                let n = self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(
                        refused = n + 1,
                        "cluster: the queue to the Redis thread is full (cluster.queue_capacity or \
                         cluster.queue_max_bytes); \
                         cross-node work is refused until Redis keeps up"
                    );
                }
                false
            }
        }
    }
}

/// Makes the queue of at most `capacity` events holding at most
/// `max_bytes` of messages: the producers' end and the thread's end, which
/// gives the bytes back as it takes events ([`taken`]).
pub(crate) fn queue(capacity: usize, max_bytes: u64, node_id: Arc<str>) -> (Link, tokio::sync::mpsc::Receiver<Event>) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    let link = Link {
        tx,
        counters: Arc::default(),
        node_id,
        repair: Arc::default(),
        max_bytes,
        clock_offset_ms: Arc::new(std::sync::atomic::AtomicI64::new(CLOCK_UNKNOWN)),
    };
    (link, rx)
}

/// The thread took `events` from the queue: their bytes leave its count.
pub(crate) fn taken(counters: &ClusterCounters, events: &[Event]) {
    let bytes: u64 = events.iter().map(Event::queued_bytes).sum();
    if bytes > 0 {
        counters.queue_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cluster's clock is Redis's: a heartbeat that read Redis at
    /// 10,000 ms while this host read 4,000 before and 4,010 after sets
    /// it 5,995 ms ahead of this host. Before any heartbeat it reads 0.
    #[test]
    fn the_clock_is_redis_as_the_heartbeat_read_it_and_zero_before() {
        let (link, _rx) = queue(16, DEFAULT_QUEUE_MAX_BYTES, Arc::from("n1"));
        assert_eq!(link.now_ms(), 0, "no heartbeat yet");
        link.set_clock(10_000, 4_000, 4_010);
        let local = unix_ms();
        let now = link.now_ms();
        assert!((local + 5_995..=local + 5_995 + 1_000).contains(&now), "{now} against {local}");
        // A clock behind this host's.
        link.set_clock(1_000, 4_000, 4_000);
        assert!(link.now_ms() < local, "3 s behind");
    }

    /// The queue to the `sb-cluster` thread is bounded in bytes too: with
    /// the thread not taking anything (Redis slow), forwards of 64 KiB
    /// frames are refused once 64 MiB of them wait, long before the
    /// queue's count (here 4,096: 256 MiB) would; presence changes, which
    /// carry no message, still go; what the thread takes is given back.
    #[test]
    fn the_queue_refuses_forwards_past_its_bytes() {
        let (link, mut rx) = queue(4096, DEFAULT_QUEUE_MAX_BYTES, Arc::from("n1"));
        let frame = Bytes::from(vec![0u8; 64 * 1024]);
        let forward = || Event::ToUser { user: Arc::from("u"), frame: frame.clone() };
        let taken_count = (0..4096).take_while(|_| link.send(forward())).count() as u64;
        assert_eq!(taken_count * frame.len() as u64, 64 << 20, "{taken_count} forwards queued");
        assert_eq!(link.counters.queue_full.load(Ordering::Relaxed), 1);
        assert!(link.send(Event::Online(Arc::from("u"))), "no bytes: still room");
        let mut events = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            events.push(ev);
        }
        taken(&link.counters, &events);
        assert_eq!(link.counters.queue_bytes.load(Ordering::Relaxed), 0);
        assert!(link.send(forward()));
    }
}
