//! The `sb-cluster` thread: this node's side of the cluster, on a
//! current-thread tokio runtime of its own, with the `redis` crate.
//!
//! Owns: the connections to Redis (one multiplexed data connection, a
//! Redis Cluster client when `cluster.redis` is a list, and one pub/sub
//! connection), the node's heartbeat and the live-node set, presence
//! writes, the route cache, batching of forwards, room subscriptions, and
//! the delivery of what other nodes send.
//! Must not: block a worker or a handle (they only queue, see `Link`);
//! hold a `RefCell` borrow across an `.await`; grow without bound (the
//! queue, the cache and each PUBLISH have limits from `[cluster]`; the
//! notices held for full worker mailboxes, one per connection); drop a
//! stored message's notice that a full worker mailbox refused (held and
//! offered again: `Node::notify`).
//!
//! One turn of the forwarder: take every queued event (up to
//! [`MAX_EVENTS_PER_TURN`]), look up in one go the users whose routes are
//! not cached (and, always, the users of stored messages: see
//! `Node::lookup`), then send every PUBLISH and presence write of the
//! turn together and wait once. A turn with device logins then reads
//! those users' nodes again and sends the logins to them
//! (`Node::send_replaced`). While a turn waits on Redis, new events
//! queue up for the next: the busier the node, the more messages share a
//! round trip.
//!
//! Faults: a failed or timed-out command is counted and its forwards
//! dropped (an at-most-once message is lost; a stored message stays in the
//! inbox and reaches the device at its next message or login); presence
//! writes that failed are redone whole once Redis answers again ("resync":
//! every local user re-registered, the route cache dropped, rooms
//! re-subscribed, and, with the Redis store, each local device connection
//! told its inbox's head, so that stored messages whose notices were lost
//! meanwhile reach it then: `Node::catch_up_devices`). The pub/sub connection reconnects by itself with a
//! backoff; the data connection reconnects on the next command.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::{Cmd, RedisResult, Value};

use super::routes::{Nodes, RouteCache};
use super::wire::{self, BatchWriter, Record};
use super::{unix_ms, ClusterCounters, DeviceReplaced, Event, Link};
use crate::config::{ClusterConfig, RedisAddrs};
use crate::proto::codes::CloseCode;
use crate::runtime::inbox::Held;
use crate::runtime::{Command, Shared};
use crate::store::service::HELD_RETRY;
use crate::store::StoredMessage;

/// Events taken in one turn of the forwarder.
pub const MAX_EVENTS_PER_TURN: usize = 8192;

/// A turn with at least this many events sends at once; a smaller one
/// waits up to `cluster.batch_linger_us` for more.
pub const LINGER_UNTIL_EVENTS: usize = 256;

/// Presence keys expire this long after their last write, so the fields of
/// a node that died and never came back do not stay forever; every node
/// rewrites its users' fields every [`PRESENCE_REFRESH`].
pub const PRESENCE_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// How often a node rewrites the presence of all its users.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(6 * 3600);

/// Users re-registered per round trip during a resync.
const RESYNC_CHUNK: usize = 1000;

/// A node not heard of for this long is dropped from `sb:nodes`.
const FORGET_NODE_MS: u64 = 24 * 3600 * 1000;

/// The heartbeat: Redis's clock, so nodes need not agree on the time.
/// KEYS[1] = sb:nodes, KEYS[2] = [`CAPS_KEY`]; ARGV = node id, forget_ms,
/// [`CAPS`]. Writes the node's capabilities, and forgets those of the
/// nodes it forgets. Returns Redis's time (ms), every node with its last
/// heartbeat, and this node's previous heartbeat ("" if none: a node's
/// first heartbeat finding a recent one means another live process has
/// the same id).
const HEARTBEAT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1]) or ''
redis.call('ZADD', KEYS[1], now, ARGV[1])
local before = now - tonumber(ARGV[2])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before)) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', before)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return {tostring(now), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), prev}
";

/// Deletes node `ARGV[1]`'s field of the presence hash `KEYS[1]` if it was
/// written at or before `ARGV[2]` (ms): the field's value is when the node
/// wrote it. One key, so it runs on a Redis Cluster too; in one step, so a
/// registration written between a reader's look at the hash and its
/// delete is kept.
const PRESENCE_DELETE_STALE_LUA: &str = r"
local at = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '')
if at == nil or at <= tonumber(ARGV[2]) then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
";

/// Whether a presence field written at `written_ms` (the node's clock) by
/// a node whose last heartbeat a reader saw at `last_beat_ms` (Redis's
/// clock) is a registration from before that heartbeat (deletable once
/// the node is dead), rather than one it wrote after it came back (it was
/// stalled or cut off past its TTL; its next heartbeat sees that and
/// registers its users again, while the reader may still act on a look at
/// the live set from before that heartbeat). Half a TTL of slack on either
/// side: a node writes its fields within a heartbeat of its last beat
/// (`node_ttl_ms` is at least two heartbeats), and one that came back
/// beat at least a TTL after the beat the reader saw, so clocks that
/// differ by less than half a TTL tell the two apart.
fn written_before_beat(written_ms: u64, last_beat_ms: u64, ttl_ms: u64) -> bool {
    written_ms <= last_beat_ms.saturating_add(ttl_ms / 2)
}

/// A heartbeat whose round trip took longer than this does not set the
/// cluster's clock (`Link::set_clock`), whose error is half the round
/// trip, unless the last one that did is [`CLOCK_MAX_AGE`] old.
const CLOCK_MAX_ROUND_TRIP_MS: u64 = 100;
const CLOCK_MAX_AGE: Duration = Duration::from_secs(60);

/// What [`HEARTBEAT_LUA`] returns: Redis's time (ms, as text), every
/// node with its last heartbeat, this node's previous heartbeat ("" if none).
type HeartbeatReply = (String, Vec<(String, f64)>, String);

/// The presence hash of `user`: the key the Redis store's device login
/// writes too (one function, so that the two never disagree: an id with
/// braces or a leading `#` has an escaped hash tag there).
pub use crate::store::redis::presence_key;

/// The channel of node `node`.
pub fn node_channel(node: &str) -> String {
    format!("sb:n:{node}")
}

/// The channel of room `room`.
pub fn room_channel(room: &str) -> String {
    format!("sb:r:{room}")
}

/// Broadcasts.
pub const ALL_CHANNEL: &str = "sb:all";
/// Logins (drop cached routes).
pub const LOGIN_CHANNEL: &str = "sb:login";
/// The live-node set.
pub const NODES_KEY: &str = "sb:nodes";
/// Hash node id → the capabilities of its build ([`CAPS`]), written at
/// each heartbeat. Its hash tag is [`NODES_KEY`] itself, so both are in one
/// slot of a Redis Cluster and one script reads them together. A build
/// from before it writes no field: capabilities 0.
pub const CAPS_KEY: &str = "{sb:nodes}:caps";
/// What this build can do that a node sharing its Redis must be able to
/// do too, as a level: each level includes those below it.
/// - 1: reads Redis inbox entries that carry an expiry of their own
///   (`crate::store::redis`). A node of a build before it reads one as
///   stamped 0 (its retention pass drops it at once), so the Redis store
///   stores no such entry while a node below 1 is live.
pub const CAPS: u64 = 1;

/// `fut`, failed as a timeout if it takes longer than `limit`.
async fn within<T>(limit: Duration, fut: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "redis timed out")))
    })
}

/// The running thread; stopped (after a last turn) when dropped.
pub(crate) struct ClusterThread {
    stop: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClusterThread {
    pub(crate) fn start(
        shared: Arc<Shared>,
        link: Link,
        rx: tokio::sync::mpsc::Receiver<Event>,
    ) -> std::io::Result<ClusterThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(tokio::sync::Notify::new());
        let (stop2, wake2) = (stop.clone(), wake.clone());
        let thread = std::thread::Builder::new().name("sb-cluster".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cluster: cannot start the Redis thread's runtime: {e}");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(shared, link, rx, stop2, wake2));
        })?;
        Ok(ClusterThread { stop, wake, thread: Some(thread) })
    }
}

impl Drop for ClusterThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The data connection: one multiplexed connection to a single Redis, or
/// a Redis Cluster client (one multiplexed connection per shard).
#[derive(Clone)]
enum Data {
    One(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Data {
    async fn connect(addrs: &RedisAddrs, timeout: Duration) -> RedisResult<Data> {
        match addrs {
            RedisAddrs::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(timeout);
                Ok(Data::One(redis::aio::ConnectionManager::new_with_config(client, cfg).await?))
            }
            RedisAddrs::Cluster(urls) => {
                let client = redis::cluster::ClusterClient::builder(urls.iter().map(|u| u.as_str()))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()?;
                Ok(Data::Cluster(client.get_async_connection().await?))
            }
        }
    }

    async fn run(&self, cmd: &Cmd, timeout: Duration) -> RedisResult<Value> {
        let fut = async {
            match self.clone() {
                Data::One(mut c) => cmd.query_async(&mut c).await,
                Data::Cluster(mut c) => cmd.query_async(&mut c).await,
            }
        };
        within(timeout + timeout / 2, fut).await
    }

    async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> RedisResult<T> {
        match self.clone() {
            Data::One(mut c) => inv.invoke_async(&mut c).await,
            Data::Cluster(mut c) => inv.invoke_async(&mut c).await,
        }
    }
}

/// The other nodes as the last heartbeat saw them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Liveness {
    /// Heard of within `node_ttl_ms`.
    pub alive: HashMap<Arc<str>, Arc<str>>,
    /// Not heard of for `node_ttl_ms`: node → its last heartbeat (ms,
    /// Redis's clock).
    pub dead: HashMap<Arc<str>, u64>,
}

impl Liveness {
    /// Sorts `nodes` (id, last heartbeat) by whether they beat within
    /// `ttl_ms` of `now_ms`; `me` is left out.
    pub fn from_heartbeats(me: &str, now_ms: u64, ttl_ms: u64, nodes: Vec<(String, f64)>) -> Liveness {
        let mut l = Liveness::default();
        for (node, beat) in nodes {
            if node == me {
                continue;
            }
            let beat = beat as u64;
            let id: Arc<str> = Arc::from(node.as_str());
            if beat.saturating_add(ttl_ms) >= now_ms {
                l.alive.insert(id.clone(), id);
            } else {
                l.dead.insert(id, beat);
            }
        }
        l
    }
}

/// What a turn of the forwarder found out and must send.
#[derive(Default)]
struct Outbox {
    /// Forwards per destination channel, in order.
    per_channel: Vec<(String, Vec<Record>)>,
    index: HashMap<String, usize>,
    /// Node → its entry in `per_channel`: a forward names its channel once
    /// per turn, not once per message.
    node_index: HashMap<Arc<str>, usize>,
    /// Node → its entry in `per_channel` for records an older node cannot
    /// read, which go in batches of their own (`wire`'s module doc).
    newer_index: HashMap<Arc<str>, usize>,
    /// Presence writes (HSET, PEXPIRE, HDEL).
    presence: Vec<Cmd>,
}

impl Outbox {
    fn add(&mut self, channel: String, r: Record) {
        let i = match self.index.get(&channel) {
            Some(&i) => i,
            None => {
                self.per_channel.push((channel.clone(), Vec::new()));
                self.index.insert(channel, self.per_channel.len() - 1);
                self.per_channel.len() - 1
            }
        };
        self.per_channel[i].1.push(r);
    }

    fn add_for_node(&mut self, node: &Arc<str>, r: Record) {
        // Kinds an older node does not read go apart from the forwards.
        let index = if matches!(r, Record::Replaced { .. }) { &mut self.newer_index } else { &mut self.node_index };
        let i = match index.get(node) {
            Some(&i) => i,
            None => {
                self.per_channel.push((node_channel(node), Vec::new()));
                index.insert(node.clone(), self.per_channel.len() - 1);
                self.per_channel.len() - 1
            }
        };
        self.per_channel[i].1.push(r);
    }
}

struct Node {
    shared: Arc<Shared>,
    me: Arc<str>,
    cfg: ClusterConfig,
    addrs: RedisAddrs,
    counters: Arc<ClusterCounters>,
    link: Link,
    timeout: Duration,
    data: RefCell<Option<Data>>,
    sink: RefCell<Option<redis::aio::PubSubSink>>,
    cache: RefCell<RouteCache>,
    /// The other nodes at the last heartbeat, and when it was read.
    live: RefCell<(Liveness, Option<Instant>)>,
    subscribed_rooms: RefCell<HashSet<Arc<str>>>,
    /// Users whose routes a `Login` dropped while a lookup was waiting on
    /// Redis (`None`: no lookup waiting): that lookup's answer for them may
    /// predate the login, so it is used once and not cached.
    forgotten: RefCell<Option<HashSet<Arc<str>>>>,
    /// A `Reset` arrived while a lookup was waiting: cache none of it.
    reset_during_lookup: Cell<bool>,
    /// Presence in Redis may be behind this node's users: redo it whole.
    resync: Cell<bool>,
    pubsub_up: Cell<bool>,
    /// Per worker, the notices of messages stored by other nodes that its
    /// full mailbox refused, folded per connection
    /// ([`Held`], as the store thread's sink holds its own), offered again
    /// every [`HELD_RETRY`] by [`Node::release_held`]. Dropped, a notice
    /// left a caught-up device without the message until the next one came.
    held: RefCell<Box<[Held]>>,
    /// Something was held: `release_held` has work.
    held_wake: tokio::sync::Notify,
    /// When a heartbeat last set the cluster's clock (`Link::set_clock`).
    clock_set: Cell<Option<Instant>>,
}

async fn run(
    shared: Arc<Shared>,
    link: Link,
    mut rx: tokio::sync::mpsc::Receiver<Event>,
    stop: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
) {
    let cfg = shared.config.cluster.clone();
    let Some(addrs) = cfg.redis.clone() else { return };
    let shared_workers = shared.mailboxes.len();
    let node = Rc::new(Node {
        me: link.node_id.clone(),
        counters: link.counters.clone(),
        timeout: Duration::from_millis(cfg.command_timeout_ms),
        cache: RefCell::new(RouteCache::new(cfg.route_cache_entries, cfg.route_cache_ms)),
        cfg,
        addrs,
        link,
        shared,
        data: RefCell::new(None),
        sink: RefCell::new(None),
        live: RefCell::new((Liveness::default(), None)),
        subscribed_rooms: RefCell::new(HashSet::new()),
        forgotten: RefCell::new(None),
        reset_during_lookup: Cell::new(false),
        resync: Cell::new(true),
        pubsub_up: Cell::new(false),
        held: RefCell::new((0..shared_workers).map(|_| Held::default()).collect()),
        held_wake: tokio::sync::Notify::new(),
        clock_set: Cell::new(None),
    });
    tracing::info!(node = %node.me, redis = node.addrs.redacted().join(", ").as_str(), "cluster: joining");
    let sub = tokio::task::spawn_local(node.clone().subscriber(stop.clone()));
    let beat = tokio::task::spawn_local(node.clone().heartbeat(stop.clone()));
    let held = tokio::task::spawn_local(node.clone().release_held());
    let mut events = Vec::with_capacity(MAX_EVENTS_PER_TURN);
    let linger = Duration::from_micros(node.cfg.batch_linger_us);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut events, MAX_EVENTS_PER_TURN) => {
                if n == 0 {
                    break;
                }
                if !linger.is_zero() && events.len() < LINGER_UNTIL_EVENTS {
                    // Nagle for Redis: a moment for more events to share
                    // this turn's round trips.
                    let until = tokio::time::Instant::now() + linger;
                    while events.len() < LINGER_UNTIL_EVENTS {
                        let room = MAX_EVENTS_PER_TURN - events.len();
                        tokio::select! {
                            biased;
                            more = rx.recv_many(&mut events, room) => if more == 0 { break },
                            _ = tokio::time::sleep_until(until) => break,
                        }
                    }
                }
                node.turn(&mut events).await;
            }
            _ = wake.notified() => {}
        }
        if stop.load(Ordering::Acquire) {
            // A last turn for what the workers queued while closing (their
            // users' presence), then leave the live set at once.
            while let Ok(ev) = rx.try_recv() {
                events.push(ev);
                if events.len() == MAX_EVENTS_PER_TURN {
                    node.turn(&mut events).await;
                }
            }
            node.turn(&mut events).await;
            node.leave().await;
            break;
        }
    }
    sub.abort();
    beat.abort();
    held.abort();
}

impl Node {
    /// The data connection, connecting first if needed.
    async fn data(&self) -> Option<Data> {
        if let Some(d) = self.data.borrow().clone() {
            return Some(d);
        }
        match Data::connect(&self.addrs, self.timeout).await {
            Ok(d) => {
                *self.data.borrow_mut() = Some(d.clone());
                Some(d)
            }
            Err(e) => {
                ClusterCounters::add(&self.counters.redis_errors, 1);
                tracing::warn!("cluster: cannot connect to Redis {:?}: {e}", self.addrs.redacted());
                None
            }
        }
    }

    /// Sends `cmds` together and waits once for all their answers.
    async fn exec(&self, cmds: &[Cmd]) -> Vec<RedisResult<Value>> {
        if cmds.is_empty() {
            return Vec::new();
        }
        let Some(data) = self.data().await else {
            return cmds
                .iter()
                .map(|_| Err(redis::RedisError::from(std::io::Error::other("redis unreachable"))))
                .collect();
        };
        ClusterCounters::add(&self.counters.redis_commands, cmds.len() as u64);
        ClusterCounters::add(&self.counters.redis_round_trips, 1);
        let results = futures_util::future::join_all(cmds.iter().map(|c| data.run(c, self.timeout))).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            ClusterCounters::add(&self.counters.redis_errors, failed as u64);
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                tracing::warn!(failed, "cluster: Redis commands failed: {e}");
            }
        }
        results
    }

    /// One turn: see the module doc.
    async fn turn(&self, events: &mut Vec<Event>) {
        if events.is_empty() {
            return;
        }
        super::taken(&self.counters, events);
        let now = unix_ms();
        let mut out = Outbox::default();
        // Users whose routes this turn needs from Redis: stored messages
        // always (see `lookup`), the rest on a cache miss.
        let mut fresh: Vec<Arc<str>> = Vec::new();
        let mut seen: HashSet<Arc<str>> = HashSet::new();
        let mut presence_written = false;
        for ev in events.iter() {
            let user = match ev {
                Event::Stored { user, .. } => {
                    if seen.insert(user.clone()) {
                        fresh.push(user.clone());
                    }
                    continue;
                }
                Event::ToUser { user, .. } | Event::Kick(user) | Event::Join { user, .. } => user,
                _ => continue,
            };
            if self.cache.borrow().get(user, now).is_some() {
                ClusterCounters::add(&self.counters.route_cache_hits, 1);
            } else if seen.insert(user.clone()) {
                fresh.push(user.clone());
            }
        }
        let routes = self.lookup(&fresh, now).await;
        let mut replaced = Vec::new();
        for ev in events.drain(..) {
            match ev {
                Event::Online(user) => {
                    let key = presence_key(&user);
                    out.presence.push(redis::cmd("HSET").arg(&key).arg(&*self.me).arg(now).clone());
                    out.presence.push(redis::cmd("PEXPIRE").arg(&key).arg(PRESENCE_KEY_TTL.as_millis() as u64).clone());
                    out.add(LOGIN_CHANNEL.to_string(), Record::Login { user: bytes_of(&user) });
                    presence_written = true;
                }
                Event::Offline(user) => {
                    if !self.shared.directory.is_online(&user) {
                        out.presence.push(redis::cmd("HDEL").arg(presence_key(&user)).arg(&*self.me).clone());
                        presence_written = true;
                    }
                }
                Event::ToUser { user, frame } => {
                    self.route(&routes, &user, now, &mut out, Record::User { user: bytes_of(&user), frame })
                }
                Event::Stored { user, msg } => {
                    let r = Record::Stored {
                        user: bytes_of(&user),
                        seq: msg.seq,
                        msg_id: msg.msg_id,
                        ts_ms: msg.ts_ms,
                        from: bytes_of(&msg.from),
                        payload: msg.payload.clone(),
                    };
                    self.route(&routes, &user, now, &mut out, r)
                }
                Event::Kick(user) => self.route(&routes, &user, now, &mut out, Record::Kick { user: bytes_of(&user) }),
                Event::Join { user, room, join } => {
                    let (u, r) = (bytes_of(&user), bytes_of(&room));
                    let rec = if join { Record::Join { user: u, room: r } } else { Record::Leave { user: u, room: r } };
                    self.route(&routes, &user, now, &mut out, rec)
                }
                Event::Room { room, frame } => out.add(room_channel(&room), Record::Frame { frame }),
                Event::Broadcast(frame) => out.add(ALL_CHANNEL.to_string(), Record::Frame { frame }),
                Event::RoomChanged(room) => self.room_changed(room).await,
                Event::Replaced(r) => replaced.push(*r),
            }
        }
        self.send(out, presence_written).await;
        if !replaced.is_empty() {
            self.send_replaced(replaced).await;
        }
    }

    /// The device logins of a turn, to the users' other nodes
    /// (PROTOCOL.md 15.2). Their nodes are read from Redis after the
    /// turn's presence writes have gone out, not from the cache: of two
    /// logins of one device on two nodes at once, Redis orders the two
    /// presence writes and the two reads, and the later read comes after
    /// both writes, so at least one node hears of the other's login. The
    /// node that hears keeps the later login and closes its own connection
    /// or answers (`to`), so exactly one stays.
    async fn send_replaced(&self, replaced: Vec<DeviceReplaced>) {
        let mut users = Vec::new();
        let mut seen = HashSet::new();
        for r in &replaced {
            if r.to.is_none() && seen.insert(r.user.clone()) {
                users.push(r.user.clone());
            }
        }
        let routes = self.lookup(&users, unix_ms()).await;
        let mut out = Outbox::default();
        for r in replaced {
            let DeviceReplaced { user, device, at_ms, to } = r;
            let rec = Record::Replaced { user: bytes_of(&user), device: bytes_of(&device), at_ms };
            match to {
                Some(node) => out.add_for_node(&node, rec),
                None => {
                    for node in routes.get(&user).map(|n| n.iter()).into_iter().flatten() {
                        out.add_for_node(node, rec.clone());
                    }
                }
            }
        }
        self.send(out, false).await;
    }

    /// Forwards `r` to every other node holding connections of `user`.
    fn route(&self, routes: &HashMap<Arc<str>, Nodes>, user: &Arc<str>, now: u64, out: &mut Outbox, r: Record) {
        let cached;
        let nodes = match routes.get(user) {
            Some(n) => n,
            None => match self.cache.borrow().get(user, now) {
                Some(n) => {
                    cached = n.clone();
                    &cached
                }
                None => return,
            },
        };
        for n in nodes.iter() {
            out.add_for_node(n, r.clone());
        }
    }

    /// Reads the presence of `users` from Redis (all at once) and caches
    /// it. A node not in the live set is left out, and its field deleted
    /// when the live set is fresh.
    ///
    /// Stored messages are always looked up, never taken from the cache:
    /// with a Redis store a device's login writes its node into presence
    /// before it reads the inbox head (`RedisStore::device_login`), and
    /// this lookup runs after the append, so either the login's read of
    /// the inbox includes the message or this lookup sees the node. A
    /// cached answer could predate the login.
    async fn lookup(&self, users: &[Arc<str>], now: u64) -> HashMap<Arc<str>, Nodes> {
        let mut routes = HashMap::new();
        if users.is_empty() {
            return routes;
        }
        ClusterCounters::add(&self.counters.route_lookups, users.len() as u64);
        let cmds: Vec<Cmd> = users.iter().map(|u| redis::cmd("HGETALL").arg(presence_key(u)).clone()).collect();
        *self.forgotten.borrow_mut() = Some(HashSet::new());
        self.reset_during_lookup.set(false);
        let results = self.exec(&cmds).await;
        let forgotten = self.forgotten.borrow_mut().take().unwrap_or_default();
        let cache_it = !self.reset_during_lookup.get();
        let liveness = {
            let l = self.live.borrow();
            // A snapshot older than a node TTL says nothing about who died.
            let fresh = l.1.is_some_and(|t| t.elapsed() < Duration::from_millis(self.cfg.node_ttl_ms));
            if fresh {
                l.0.clone()
            } else {
                Liveness::default()
            }
        };
        let mut stale: Vec<Cmd> = Vec::new();
        for (user, r) in users.iter().zip(results) {
            let Ok(v) = r else { continue };
            // Node → when it wrote its field (ms, its clock).
            let fields: HashMap<String, String> = redis::from_redis_value(v).unwrap_or_default();
            let mut nodes = Nodes::new();
            for (node, written) in &fields {
                if **node == *self.me {
                    continue;
                }
                let written: u64 = written.parse().unwrap_or(0);
                match liveness.dead.get(node.as_str()) {
                    // Dead: out of the map for every reader, and its field
                    // deleted if it is still the one read. An id is never
                    // reused (it ends in the process id); a node that was
                    // only stalled past its TTL sees so at its next
                    // heartbeat and registers its users again, and a field
                    // written since the beat seen is that: it is kept
                    // (`written_before_beat`).
                    Some(&beat) if written_before_beat(written, beat, self.cfg.node_ttl_ms) => {
                        let limit = beat.saturating_add(self.cfg.node_ttl_ms / 2);
                        stale.push(
                            redis::cmd("EVAL")
                                .arg(PRESENCE_DELETE_STALE_LUA)
                                .arg(1)
                                .arg(presence_key(user))
                                .arg(node)
                                .arg(limit)
                                .clone(),
                        )
                    }
                    // Alive, back since the beat seen, or not known yet
                    // (a node that just started may write presence before
                    // this node's next look at the live set): forward. A
                    // forward to a node that is gone is only wasted.
                    _ => nodes
                        .push(liveness.alive.get(node.as_str()).cloned().unwrap_or_else(|| Arc::from(node.as_str()))),
                }
            }
            if cache_it && !forgotten.contains(user) {
                self.cache.borrow_mut().insert(user.clone(), nodes.clone(), now);
            }
            routes.insert(user.clone(), nodes);
        }
        if !stale.is_empty() {
            let _ = self.exec(&stale).await;
        }
        routes
    }

    /// Sends a turn's PUBLISHes and presence writes together.
    async fn send(&self, out: Outbox, presence_written: bool) {
        let mut cmds = out.presence;
        let n_presence = cmds.len();
        let mut records_per_cmd = vec![0usize; n_presence];
        for (channel, records) in out.per_channel {
            let mut w = BatchWriter::new(&self.me, self.cfg.max_batch_bytes).expect("node ids are at most 64 bytes");
            for r in records {
                if !w.fits(&r) {
                    let full = std::mem::replace(
                        &mut w,
                        BatchWriter::new(&self.me, self.cfg.max_batch_bytes).expect("node ids are at most 64 bytes"),
                    );
                    records_per_cmd.push(full.len());
                    cmds.push(redis::cmd("PUBLISH").arg(&channel).arg(&full.finish()[..]).clone());
                }
                if w.push(&r).is_err() {
                    debug_assert!(false, "user ids and room names fit a str8");
                }
            }
            if !w.is_empty() {
                records_per_cmd.push(w.len());
                cmds.push(redis::cmd("PUBLISH").arg(&channel).arg(&w.finish()[..]).clone());
            }
        }
        let results = self.exec(&cmds).await;
        let mut presence_failed = false;
        for (i, r) in results.iter().enumerate() {
            if i < n_presence {
                presence_failed |= r.is_err();
                ClusterCounters::add(&self.counters.presence_writes, 1);
                continue;
            }
            match r {
                Ok(_) => {
                    ClusterCounters::add(&self.counters.batches_sent, 1);
                    ClusterCounters::add(&self.counters.records_sent, records_per_cmd[i] as u64);
                }
                Err(_) => ClusterCounters::add(&self.counters.forwards_failed, records_per_cmd[i] as u64),
            }
        }
        if presence_written && presence_failed {
            self.resync.set(true);
        }
    }

    /// Subscribes to `room` when this node has members of it now, and
    /// unsubscribes when it has none.
    async fn room_changed(&self, room: Arc<str>) {
        let want = self.shared.rooms.size(&room) > 0;
        let have = self.subscribed_rooms.borrow().contains(&room);
        if want == have {
            return;
        }
        if want {
            self.subscribed_rooms.borrow_mut().insert(room.clone());
        } else {
            self.subscribed_rooms.borrow_mut().remove(&room);
        }
        self.counters.room_subscriptions.store(self.subscribed_rooms.borrow().len() as u64, Ordering::Relaxed);
        let sink = self.sink.borrow().clone();
        if let Some(mut sink) = sink {
            let ch = room_channel(&room);
            let change = async {
                if want {
                    sink.subscribe(&ch).await
                } else {
                    sink.unsubscribe(&ch).await
                }
            };
            let r = within(self.timeout, change).await;
            if let Err(e) = r {
                // The pub/sub connection is going down; its reconnection
                // subscribes to every room in `subscribed_rooms`.
                tracing::debug!("cluster: (un)subscribe {ch}: {e}");
            }
        }
    }

    /// Keeps the pub/sub connection up: (re)connects with a backoff,
    /// subscribes, and delivers what arrives.
    async fn subscriber(self: Rc<Self>, stop: Arc<AtomicBool>) {
        let urls = self.addrs.urls();
        let mut attempt = 0usize;
        while !stop.load(Ordering::Acquire) {
            let url = &urls[attempt % urls.len()];
            // What the log shows: the URL without its password.
            let shown = crate::config::redacted_url(url);
            let shown = shown.as_str();
            attempt += 1;
            match self.subscribe_all(url).await {
                Ok(mut stream) => {
                    attempt = 0;
                    self.pubsub_up.set(true);
                    self.update_connected();
                    // Logins may have been missed while unsubscribed, and a
                    // restarted Redis may have lost presence: redo both.
                    self.cache.borrow_mut().clear();
                    self.resync.set(true);
                    tracing::info!(node = %self.me, url = shown, "cluster: subscribed");
                    while let Some(msg) = stream.next().await {
                        self.on_message(msg.get_channel_name(), msg.get_payload_bytes());
                    }
                    self.pubsub_up.set(false);
                    self.update_connected();
                    *self.sink.borrow_mut() = None;
                    tracing::warn!(node = %self.me, url = shown, "cluster: the pub/sub connection to Redis closed; reconnecting");
                }
                Err(e) => {
                    ClusterCounters::add(&self.counters.redis_errors, 1);
                    if attempt % urls.len() == 1 || urls.len() == 1 {
                        tracing::warn!(node = %self.me, url = shown, "cluster: cannot subscribe: {e}");
                    }
                }
            }
            let backoff = Duration::from_millis((100u64 << attempt.min(5)).min(2_000));
            tokio::time::sleep(backoff).await;
        }
    }

    async fn subscribe_all(&self, url: &str) -> RedisResult<redis::aio::PubSubStream> {
        let client = redis::Client::open(url)?;
        let pubsub = within(self.timeout, client.get_async_pubsub()).await?;
        let (mut sink, stream) = pubsub.split();
        let mut channels = vec![node_channel(&self.me), ALL_CHANNEL.to_string(), LOGIN_CHANNEL.to_string()];
        within(self.timeout, sink.subscribe(&channels)).await?;
        // Rooms as they are now; a change while this runs is applied by
        // `room_changed` through the sink stored below, or was in the set
        // read here.
        channels.clear();
        for room in self.subscribed_rooms.borrow().iter() {
            channels.push(room_channel(room));
        }
        for chunk in channels.chunks(1024) {
            within(self.timeout, sink.subscribe(chunk)).await?;
        }
        *self.sink.borrow_mut() = Some(sink);
        Ok(stream)
    }

    fn update_connected(&self) {
        let beat_ok = self.live.borrow().1.is_some_and(|t| t.elapsed() < Duration::from_millis(self.cfg.node_ttl_ms));
        self.counters.connected.store(u64::from(self.pubsub_up.get() && beat_ok), Ordering::Relaxed);
    }

    /// Renews this node's liveness, reads the live set, and re-registers
    /// presence when it may be behind.
    async fn heartbeat(self: Rc<Self>, stop: Arc<AtomicBool>) {
        let script = redis::Script::new(HEARTBEAT_LUA);
        let mut last_refresh = Instant::now();
        let mut first = true;
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Acquire) {
            tick.tick().await;
            let Some(data) = self.data().await else {
                self.resync.set(true);
                self.update_connected();
                continue;
            };
            let mut inv = script.prepare_invoke();
            inv.key(NODES_KEY).key(CAPS_KEY).arg(&*self.me).arg(FORGET_NODE_MS).arg(CAPS);
            ClusterCounters::add(&self.counters.redis_commands, 1);
            ClusterCounters::add(&self.counters.redis_round_trips, 1);
            let sent_ms = unix_ms();
            let r: RedisResult<HeartbeatReply> = within(self.timeout, data.invoke(&inv)).await;
            match r {
                Ok((now, nodes, prev)) => {
                    let now: u64 = now.parse().unwrap_or(0);
                    let answered_ms = unix_ms();
                    // The offset is known to within half the round trip:
                    // a slow answer keeps the last good one, unless that
                    // is old enough for this host's clock to have moved.
                    let fast = answered_ms.saturating_sub(sent_ms) <= CLOCK_MAX_ROUND_TRIP_MS;
                    let stale = self.clock_set.get().is_none_or(|t| t.elapsed() >= CLOCK_MAX_AGE);
                    if now > 0 && (fast || stale) {
                        self.link.set_clock(now, sent_ms, answered_ms);
                        self.clock_set.set(Some(Instant::now()));
                    }
                    let prev_ago = prev.parse::<f64>().ok().map(|p| now.saturating_sub(p as u64));
                    if prev_ago.is_some_and(|ago| ago > self.cfg.node_ttl_ms) {
                        // This node was silent past its TTL (stalled, or cut
                        // off from Redis): others took it for dead and may
                        // have deleted its presence fields.
                        self.resync.set(true);
                    }
                    if !first && prev.is_empty() && self.shared.config.store.kind == crate::config::StoreKind::Redis {
                        // This node's own entry in sb:nodes is gone though
                        // it beat a moment ago: Redis lost its data (restarted
                        // without its AOF, or flushed), and with it the
                        // inboxes this node's device connections count seqs
                        // of. They must log in again (PROTOCOL.md 15.8).
                        tracing::error!(
                            node = %self.me,
                            "cluster: Redis lost its data (this node's heartbeat entry is gone): every inbox starts \
                             again at seq 1; closing this node's device connections so that they log in again. \
                             Run Redis with appendonly yes (docs/SCALING.md)"
                        );
                        for mb in self.shared.mailboxes.iter() {
                            if mb.push(crate::runtime::Command::StoreReset).is_err() {
                                tracing::error!(
                                    "cluster: a worker's mailbox is full: its device connections stay open"
                                );
                            }
                        }
                    }
                    if first {
                        first = false;
                        if let Some(ago) = prev_ago {
                            if ago < self.cfg.node_ttl_ms {
                                tracing::error!(
                                    node = %self.me,
                                    "cluster: another live process uses this node id (its heartbeat was {ago} ms ago): \
                                     messages for either may go to the other; give each node its own cluster.node_id"
                                );
                            }
                        }
                    }
                    let l = Liveness::from_heartbeats(&self.me, now, self.cfg.node_ttl_ms, nodes);
                    self.counters.live_nodes.store(l.alive.len() as u64, Ordering::Relaxed);
                    *self.live.borrow_mut() = (l, Some(Instant::now()));
                }
                Err(e) => {
                    ClusterCounters::add(&self.counters.redis_errors, 1);
                    tracing::warn!(node = %self.me, "cluster: heartbeat failed: {e}");
                    // Others may count this node dead and delete its
                    // presence fields: re-register once Redis answers.
                    self.resync.set(true);
                    self.update_connected();
                    continue;
                }
            }
            self.update_connected();
            if last_refresh.elapsed() >= PRESENCE_REFRESH || self.link.repair.swap(false, Ordering::AcqRel) {
                self.resync.set(true);
            }
            if self.resync.get() && self.pubsub_up.get() {
                self.resync.set(false);
                last_refresh = Instant::now();
                self.reregister().await;
            }
        }
    }

    /// Writes the presence of every user with a connection on this node,
    /// tells every node to drop its cached routes, and brings the room
    /// subscriptions in line with the rooms this node has members of.
    async fn reregister(&self) {
        ClusterCounters::add(&self.counters.presence_resyncs, 1);
        let mut rooms: Vec<Arc<str>> = self.shared.rooms.names();
        rooms.extend(self.subscribed_rooms.borrow().iter().cloned());
        rooms.sort();
        rooms.dedup();
        for room in rooms {
            self.room_changed(room).await;
        }
        let mut users: Vec<Arc<str>> = Vec::new();
        self.shared.directory.for_each_online(|u| users.push(u.clone()));
        let now = unix_ms();
        let mut failed = false;
        for chunk in users.chunks(RESYNC_CHUNK) {
            let mut cmds = Vec::with_capacity(chunk.len() * 2);
            for u in chunk {
                let key = presence_key(u);
                cmds.push(redis::cmd("HSET").arg(&key).arg(&*self.me).arg(now).clone());
                cmds.push(redis::cmd("PEXPIRE").arg(&key).arg(PRESENCE_KEY_TTL.as_millis() as u64).clone());
            }
            ClusterCounters::add(&self.counters.presence_writes, cmds.len() as u64);
            failed |= self.exec(&cmds).await.iter().any(|r| r.is_err());
            if self.shared.config.store.kind == crate::config::StoreKind::Redis {
                self.catch_up_devices(chunk).await;
            }
        }
        // Other nodes may have cached "nowhere" for these users while
        // Redis had lost them.
        let mut w = BatchWriter::new(&self.me, 64).expect("node ids are at most 64 bytes");
        w.push(&Record::Reset).expect("a reset fits");
        let reset = redis::cmd("PUBLISH").arg(LOGIN_CHANNEL).arg(&w.finish()[..]).clone();
        failed |= self.exec(&[reset]).await.iter().any(|r| r.is_err());
        if failed {
            self.resync.set(true);
        } else {
            tracing::info!(node = %self.me, users = users.len(), "cluster: presence registered");
        }
    }

    /// Tells the device connections of `users` on this node how far their
    /// inboxes go, so that their windows read what they were not told of
    /// (`Command::Missed`). Runs at every re-registration, after the
    /// presence writes: what made one needed (this node taken for dead
    /// while stalled, Redis cut off or restarted, the pub/sub connection
    /// lost) is also when other nodes stored messages for these users
    /// without a notice reaching here (they did not forward to a node they
    /// took for dead, and a lost subscription drops what was published).
    /// A message stored after a head read here finds the presence written
    /// before it, and is forwarded. One HGET per user, as the presence
    /// write is one HSET.
    async fn catch_up_devices(&self, users: &[Arc<str>]) {
        let cmds: Vec<Cmd> = users
            .iter()
            .map(|u| redis::cmd("HGET").arg(crate::store::redis::inbox_head_key(u)).arg("head").clone())
            .collect();
        let results = self.exec(&cmds).await;
        for (user, r) in users.iter().zip(results) {
            let Ok(Value::BulkString(head)) = r else { continue };
            let Some(seq) = std::str::from_utf8(&head).ok().and_then(|h| h.parse::<u64>().ok()) else { continue };
            for conn in self.shared.directory.lookup(user) {
                let index = conn.worker().0 as usize;
                self.notify(index, &self.shared.mailboxes[index], Command::Missed { conn, seq });
            }
        }
    }

    /// A clean stop: out of the live set at once, so no node forwards here.
    async fn leave(&self) {
        let _ = self
            .exec(&[
                redis::cmd("ZREM").arg(NODES_KEY).arg(&*self.me).clone(),
                redis::cmd("HDEL").arg(CAPS_KEY).arg(&*self.me).clone(),
            ])
            .await;
        tracing::info!(node = %self.me, "cluster: left");
    }

    /// A batch from another node (or this one's own, on a shared channel).
    fn on_message(&self, channel: &str, payload: &[u8]) {
        let (origin, records) = match wire::decode(Bytes::copy_from_slice(payload)) {
            Ok(b) => b,
            Err(e) => {
                ClusterCounters::add(&self.counters.batches_malformed, 1);
                tracing::warn!(channel, "cluster: dropped a batch that cannot be read: {e}");
                return;
            }
        };
        if &origin[..] == self.me.as_bytes() {
            return;
        }
        ClusterCounters::add(&self.counters.batches_received, 1);
        ClusterCounters::add(&self.counters.records_received, records.len() as u64);
        let shared = &*self.shared;
        let mut delivered = 0u64;
        let room: Option<Arc<str>> = channel.strip_prefix("sb:r:").map(Arc::from);
        for r in records {
            let join = matches!(r, Record::Join { .. });
            match r {
                Record::User { user, frame } => {
                    let Some(user) = as_str(&user) else { continue };
                    let n = shared
                        .directory
                        .lookup(user)
                        .iter()
                        .filter(|&&c| crate::runtime::deliver_at(shared, c, &frame, None))
                        .count();
                    if n > 0 {
                        shared
                            .foreign_counters
                            .with(|c| crate::stats::bump(&c.detail.deliveries[crate::stats::DELIVERY_PUSH], n as u64));
                    } else {
                        self.not_here(user);
                    }
                    delivered += n as u64;
                }
                Record::Stored { user, seq, msg_id, ts_ms, from, payload } => {
                    let (Some(user), Some(from)) = (as_str(&user), as_str(&from)) else { continue };
                    // A live notice: its expiry, not on the wire, is not looked at
                    // here (it is checked where messages are read from the store).
                    let msg =
                        Arc::new(StoredMessage { seq, msg_id, ts_ms, from: Arc::from(from), payload, expires_ms: 0 });
                    let n = shared.route_stored_by(user, &msg, |index, mb, cmd| self.notify(index, mb, cmd));
                    if n == 0 {
                        self.not_here(user);
                    }
                    delivered += u64::from(n);
                }
                Record::Kick { user } => {
                    let Some(user) = as_str(&user) else { continue };
                    delivered +=
                        shared.post_to_user(user, |conn| Command::Close { conn, code: CloseCode::Kicked }).0 as u64;
                }
                Record::Join { user, room } | Record::Leave { user, room } => {
                    let (Some(user), Some(room)) = (as_str(&user), as_str(&room)) else { continue };
                    if crate::rooms::check_room_name(room).is_err() {
                        // No node writes one (a stray PUBLISH): a client would
                        // get a ROOM_ACK or ERROR for a room no room can be.
                        continue;
                    }
                    let room: Arc<str> = Arc::from(room);
                    delivered += shared
                        .post_to_user(user, |conn| {
                            if join {
                                Command::Join { conn, room: room.clone() }
                            } else {
                                Command::Leave { conn, room: room.clone() }
                            }
                        })
                        .0 as u64;
                }
                Record::Frame { frame } => {
                    let accepted_ns = shared.since_epoch_ns();
                    let posted = match &room {
                        Some(room) => {
                            shared.post_all(frame, |frame| Command::Publish { room: room.clone(), frame, accepted_ns })
                        }
                        None if channel == ALL_CHANNEL => {
                            shared.post_all(frame, |frame| Command::Broadcast { frame, accepted_ns })
                        }
                        None => continue,
                    };
                    delivered += posted.unwrap_or(0) as u64;
                }
                Record::Login { user } => {
                    if let Some(user) = as_str(&user) {
                        self.cache.borrow_mut().forget(user);
                        if let Some(f) = self.forgotten.borrow_mut().as_mut() {
                            f.insert(Arc::from(user));
                        }
                    }
                }
                Record::Reset => {
                    self.cache.borrow_mut().clear();
                    self.reset_during_lookup.set(true);
                }
                Record::Replaced { user, device, at_ms } => {
                    let (Some(user), Some(device), Some(node)) = (as_str(&user), as_str(&device), as_str(&origin))
                    else {
                        continue;
                    };
                    let (device, node): (Arc<str>, Arc<str>) = (Arc::from(device), Arc::from(node));
                    delivered += shared
                        .post_to_user(user, |conn| Command::Replaced {
                            conn,
                            device: device.clone(),
                            login: at_ms,
                            from: Some(node.clone()),
                        })
                        .0 as u64;
                }
            }
        }
        ClusterCounters::add(&self.counters.deliveries, delivered);
    }

    /// Hands a notice to worker `index`'s mailbox, or holds it if the
    /// mailbox is full or already has notices held (which go first). True
    /// either way: the connection counts as delivered to.
    fn notify(&self, index: usize, mb: &crate::mailbox::Mailbox<Command>, cmd: Command) -> bool {
        let mut held = self.held.borrow_mut();
        let cmd = if held[index].is_empty() {
            match mb.offer(cmd) {
                Ok(()) => return true,
                Err(cmd) => cmd,
            }
        } else {
            cmd
        };
        held[index].keep(cmd);
        self.held_wake.notify_one();
        true
    }

    /// Offers the held notices again every [`HELD_RETRY`] while there
    /// are any; waits for the next otherwise.
    async fn release_held(self: Rc<Self>) {
        loop {
            self.held_wake.notified().await;
            loop {
                tokio::time::sleep(HELD_RETRY).await;
                let mut left = false;
                for (held, mb) in self.held.borrow_mut().iter_mut().zip(self.shared.mailboxes.iter()) {
                    if held.release(mb) {
                        mb.wake();
                    }
                    left |= !held.is_empty();
                }
                if !left {
                    break;
                }
            }
        }
    }

    /// A forward found no connection of `user` here: this node's presence
    /// field for the user is stale (a logout raced a login, or it is left
    /// from before a restart). Queue its removal, which checks again.
    fn not_here(&self, user: &str) {
        if !self.shared.directory.is_online(user) {
            self.link.send(Event::Offline(Arc::from(user)));
        }
    }
}

fn as_str(b: &Bytes) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

fn bytes_of(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presence_field_written_after_the_beat_seen_is_a_node_that_came_back() {
        // TTL 3 s; the dead node's last beat seen at 10,000.
        assert!(written_before_beat(9_500, 10_000, 3_000), "written before its last beat");
        assert!(written_before_beat(11_000, 10_000, 3_000), "within a heartbeat after it");
        assert!(written_before_beat(11_500, 10_000, 3_000), "half a TTL of slack for clocks");
        assert!(!written_before_beat(13_200, 10_000, 3_000), "after a beat a TTL later: it came back");
        assert!(!written_before_beat(11_501, 10_000, 3_000));
        assert!(written_before_beat(0, 10_000, 3_000), "a value that did not parse");
    }

    #[test]
    fn a_node_is_dead_once_its_heartbeat_is_older_than_the_ttl() {
        let beats = vec![("me".to_string(), 10_000.0), ("b".to_string(), 9_400.0), ("c".to_string(), 9_399.0)];
        let l = Liveness::from_heartbeats("me", 10_000, 600, beats);
        assert!(l.alive.contains_key("b"), "600 ms ago is still within the TTL");
        assert_eq!(l.dead.get("c"), Some(&9_399), "601 ms ago is dead, with its last beat");
        assert!(!l.alive.contains_key("me") && !l.dead.contains_key("me"));
    }

    /// A node of an older version drops a batch holding a record kind it
    /// does not know, whole: a `Replaced` record must never share a batch
    /// with forwards, or a cluster being upgraded node by node would lose
    /// those forwards on the older nodes.
    #[test]
    fn device_logins_go_to_a_node_in_batches_of_their_own() {
        let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        let (n1, n2): (Arc<str>, Arc<str>) = (Arc::from("n1"), Arc::from("n2"));
        let replaced = |u: &str| Record::Replaced { user: b(u), device: b("phone"), at_ms: 7 };
        let mut out = Outbox::default();
        out.add_for_node(&n1, Record::Kick { user: b("u1") });
        out.add_for_node(&n1, replaced("u1"));
        out.add_for_node(&n1, Record::Kick { user: b("u2") });
        out.add_for_node(&n1, replaced("u2"));
        out.add_for_node(&n2, replaced("u3"));
        let batches: Vec<(String, Vec<Record>)> = out.per_channel;
        assert_eq!(
            batches,
            vec![
                ("sb:n:n1".to_string(), vec![Record::Kick { user: b("u1") }, Record::Kick { user: b("u2") }]),
                ("sb:n:n1".to_string(), vec![replaced("u1"), replaced("u2")]),
                ("sb:n:n2".to_string(), vec![replaced("u3")]),
            ]
        );
    }

    #[test]
    fn keys_share_the_users_hash_tag() {
        assert_eq!(presence_key("alice"), "sb:{alice}:nodes");
        assert_eq!(node_channel("gw-1"), "sb:n:gw-1");
        assert_eq!(room_channel("lobby"), "sb:r:lobby");
    }
}
