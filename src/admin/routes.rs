//! What each API route does: the route table, the JSON commands of
//! `/api/v1/` (one per route, or many in a `/api/v1/batch`), and the
//! legacy query-string routes kept as aliases.
//!
//! Owns: turning a parsed request into `Handle` calls and a JSON answer.
//! Must not: wait on the caller's thread. A command that waits for the
//! store (a reliable push, an inbox query) returns [`Exec::Later`], which
//! the server resolves off its event loop ([`finish`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::guard::Scope;
use crate::server::{Handle, PendingPush, PushError, ReliablePush};

/// The routes the API serves.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Healthz,
    Readyz,
    /// `GET /metrics`: text, served by the server itself.
    Metrics,
    Stats,
    Inbox,
    ForgetDevice,
    Push,
    Publish,
    Broadcast,
    Kick,
    Join,
    Leave,
    Presence,
    Connections,
    RoomSizes,
    Batch,
    /// `GET /room?room=R` (legacy).
    Room,
    BenchSendCeiling,
}

/// Whether a route's parameters come from a JSON body (`/api/v1/`) or from
/// the query string with a raw payload body (the legacy routes).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Style {
    V1,
    Legacy,
}

/// One entry of the route table.
pub(crate) struct Entry {
    pub path: &'static str,
    pub method: &'static str,
    pub route: Route,
    pub style: Style,
    pub scope: Scope,
}

const fn e(path: &'static str, method: &'static str, route: Route, style: Style, scope: Scope) -> Entry {
    Entry { path, method, route, style, scope }
}

use Route as R;
use Scope::{Public, Read, Write};
use Style::{Legacy, V1};

/// Every route. The legacy paths are the admin API's before `/api/v1/`;
/// they keep working (README, "Changelog").
pub(crate) const ROUTES: &[Entry] = &[
    e("/healthz", "GET", R::Healthz, V1, Public),
    e("/readyz", "GET", R::Readyz, V1, Public),
    e("/metrics", "GET", R::Metrics, V1, Read),
    e("/api/v1/stats", "GET", R::Stats, V1, Read),
    e("/api/v1/inbox", "GET", R::Inbox, V1, Read),
    e("/api/v1/forget_device", "POST", R::ForgetDevice, V1, Write),
    e("/api/v1/push", "POST", R::Push, V1, Write),
    e("/api/v1/publish", "POST", R::Publish, V1, Write),
    e("/api/v1/broadcast", "POST", R::Broadcast, V1, Write),
    e("/api/v1/kick", "POST", R::Kick, V1, Write),
    e("/api/v1/join", "POST", R::Join, V1, Write),
    e("/api/v1/leave", "POST", R::Leave, V1, Write),
    e("/api/v1/presence", "POST", R::Presence, V1, Read),
    e("/api/v1/connections", "GET", R::Connections, V1, Read),
    e("/api/v1/room_sizes", "POST", R::RoomSizes, V1, Read),
    e("/api/v1/batch", "POST", R::Batch, V1, Write),
    e("/stats", "GET", R::Stats, Legacy, Read),
    e("/inbox", "GET", R::Inbox, Legacy, Read),
    e("/room", "GET", R::Room, Legacy, Read),
    e("/push", "POST", R::Push, Legacy, Write),
    e("/publish", "POST", R::Publish, Legacy, Write),
    e("/broadcast", "POST", R::Broadcast, Legacy, Write),
    e("/kick", "POST", R::Kick, Legacy, Write),
    e("/join", "POST", R::Join, Legacy, Write),
    e("/leave", "POST", R::Leave, Legacy, Write),
    e("/bench/send_ceiling", "POST", R::BenchSendCeiling, Legacy, Write),
];

/// The route for `method path`: `Err(None)` for an unknown path,
/// `Err(Some(allowed))` for a known path asked with another method.
pub(crate) fn find(method: &str, path: &str, bench: bool) -> Result<&'static Entry, Option<&'static str>> {
    let mut known = None;
    for entry in ROUTES {
        if entry.path != path || (entry.route == R::BenchSendCeiling && !bench) {
            continue;
        }
        // HEAD is GET without the body (hyper drops it).
        if entry.method == method || (method == "HEAD" && entry.method == "GET") {
            return Ok(entry);
        }
        known = Some(entry.method);
    }
    Err(known)
}

/// An API answer: status and JSON body.
pub(crate) type Answer = (u16, Value);

fn error(status: u16, msg: impl Into<String>) -> Answer {
    (status, json!({ "error": msg.into() }))
}

/// A command's outcome: now, or once the store answers.
pub(crate) enum Exec {
    Now(Answer),
    /// An at-most-once push done (200): kept as figures, so that a batch
    /// of them is answered without a JSON tree per push.
    Pushed(crate::server::Pushed),
    Later(Later),
}

fn pushed(p: crate::server::Pushed) -> Answer {
    (200, json!({ "msg_id": p.msg_id, "connections": p.connections, "stored": false }))
}

/// What a command waits for.
pub(crate) enum Later {
    /// A reliable push: its receipt.
    Push(PendingPush),
    /// A push to many users: one outcome per user, in order.
    Users(Vec<(String, Exec)>),
    /// An inbox query.
    Inbox(String, crate::server::PendingInboxState),
    /// A device forgotten: (user, device).
    Forget(String, String, crate::server::PendingForget),
}

/// How long a reliable push, an inbox query or a device forgotten waits
/// for the store.
pub(crate) const STORE_WAIT: Duration = Duration::from_secs(10);

/// Waits for what `exec` waits for, until `deadline`. Blocks: the server
/// calls it on its blocking pool.
fn resolve(exec: Exec, deadline: Instant) -> Answer {
    match exec {
        Exec::Now(a) => a,
        Exec::Pushed(p) => pushed(p),
        Exec::Later(Later::Push(p)) => {
            let left = deadline.saturating_duration_since(Instant::now());
            match p.wait_timeout(left) {
                None => error(504, "the store did not answer in time; the message may or may not be stored"),
                Some(Err(e)) => store_error(e),
                Some(Ok(r)) => (
                    200,
                    json!({
                        "msg_id": r.msg_id,
                        "seq": r.seq,
                        "duplicate": r.duplicate,
                        "connections": r.connections,
                        "stored": true,
                        "durability": match r.durability {
                            Some(crate::store::Durability::Fsync) => "fsync",
                            Some(crate::store::Durability::Os) => "os",
                            None => "memory",
                        },
                    }),
                ),
            }
        }
        Exec::Later(Later::Users(parts)) => {
            let results = parts
                .into_iter()
                .map(|(user, exec)| {
                    let (status, mut v) = resolve(exec, deadline);
                    v["user"] = json!(user);
                    v["status"] = json!(status);
                    v
                })
                .collect::<Vec<_>>();
            (200, json!({ "results": results }))
        }
        Exec::Later(Later::Inbox(user, pending)) => {
            let left = deadline.saturating_duration_since(Instant::now());
            inbox(&user, pending.wait_timeout(left))
        }
        Exec::Later(Later::Forget(user, device, pending)) => {
            let left = deadline.saturating_duration_since(Instant::now());
            match pending.wait_timeout(left) {
                Ok(known) => (200, json!({ "user": user, "device": device, "forgotten": known })),
                Err(e) => store_failure(e),
            }
        }
    }
}

/// A store query's failure as an answer.
fn store_failure(e: crate::server::InboxStateError) -> Answer {
    match e {
        crate::server::InboxStateError::Push(e) => push_error(e),
        crate::server::InboxStateError::Store(e) => store_error(e),
        crate::server::InboxStateError::Timeout => error(504, "the store did not answer in time"),
    }
}

fn store_error(e: crate::store::StoreError) -> Answer {
    let (status, code) = match e {
        crate::store::StoreError::InboxFull { .. } => (507, crate::ErrorCode::InboxFull),
        crate::store::StoreError::StoreFull { .. } => (507, crate::ErrorCode::StoreFull),
        crate::store::StoreError::Unavailable(_) => (503, crate::ErrorCode::StoreUnavailable),
    };
    (status, json!({ "error": e.to_string(), "code": code as u16 }))
}

fn push_error(e: PushError) -> Answer {
    let status = match e {
        PushError::Full { .. } | PushError::ShuttingDown | PushError::StoreBusy => 503,
        PushError::PayloadTooLarge { .. } => 413,
        _ => 400,
    };
    error(status, e.to_string())
}

fn inbox(user: &str, state: Result<crate::store::InboxState, crate::server::InboxStateError>) -> Answer {
    match state {
        Ok(s) => (
            200,
            json!({
                "user": user,
                "head_seq": s.head_seq,
                "first_seq": s.first_seq,
                "messages": s.messages,
                "bytes": s.bytes,
                "devices": s.devices.iter().map(|d| json!({
                    "device": d.device,
                    "position": d.position,
                    // Kept messages past its position: those between it
                    // and the first kept seq are gone (dropped before it
                    // was known, or expired), not pending.
                    "pending": s.head_seq.saturating_sub(d.position.max(s.first_seq.saturating_sub(1))),
                    "last_seen_ms": d.last_seen_ms,
                })).collect::<Vec<_>>(),
            }),
        ),
        Err(e) => store_failure(e),
    }
}

/// The store thread's counters (each read on its own: the set is not one
/// snapshot).
fn store_counters(h: &Handle, c: &crate::store::StoreCounters) -> Value {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "appends": get(&c.appends),
        "duplicates": get(&c.duplicates),
        "syncs": get(&c.syncs),
        "appended_per_sync_sum": get(&c.appended_per_sync_sum),
        "reads": get(&c.reads),
        "refusals": get(&c.refusals),
        "errors": get(&c.errors),
        "busy": get(&c.busy),
        "queue_depth": get(&c.queue_depth),
        "queue_bytes": get(&c.queue_bytes),
        "expired": get(&c.expired),
        "expired_unacknowledged": get(&c.expired_unacknowledged),
        "pending_messages": get(&c.held_messages),
        "pending_bytes": get(&c.held_bytes),
        "stopped": c.stopped(),
        "max_bytes": h.store_max_bytes(),
        "disk_free_bytes": h.store_disk_free_bytes(),
    })
}

fn cluster_counters(node: String, c: &crate::cluster::ClusterCounters) -> Value {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "node_id": node,
        "connected": get(&c.connected) == 1,
        "live_nodes": get(&c.live_nodes),
        "room_subscriptions": get(&c.room_subscriptions),
        "redis_commands": get(&c.redis_commands),
        "redis_round_trips": get(&c.redis_round_trips),
        "redis_errors": get(&c.redis_errors),
        "records_sent": get(&c.records_sent),
        "batches_sent": get(&c.batches_sent),
        "records_received": get(&c.records_received),
        "batches_received": get(&c.batches_received),
        "batches_malformed": get(&c.batches_malformed),
        "deliveries": get(&c.deliveries),
        "queue_full": get(&c.queue_full),
        "forwards_failed": get(&c.forwards_failed),
        "route_cache_hits": get(&c.route_cache_hits),
        "route_lookups": get(&c.route_lookups),
        "presence_writes": get(&c.presence_writes),
        "presence_resyncs": get(&c.presence_resyncs),
    })
}

fn stats(h: &Handle) -> Answer {
    (
        200,
        json!({
            "stats": h.stats(),
            "users": h.user_count(),
            "users_offline_retained": h.offline_retained_count(),
            "rooms": h.room_count(),
            "connections_per_worker": h.connections_per_worker(),
            "workers": h.workers(),
            "store": h.store_counters().map(|c| store_counters(h, &c)),
            "cluster": h.cluster_counters().zip(h.node_id()).map(|(c, id)| cluster_counters(id, &c)),
        }),
    )
}

// ---- The JSON commands -------------------------------------------------

/// Longest `ttl_ms` of a push: the most SEND_EX's `ttl_ms` (u32) carries,
/// about 49.7 days (`store.ttl_ms` drops a message sooner if it is shorter).
const MAX_TTL_MS: u64 = u32::MAX as u64;

/// A message payload: `payload` (standard base64) or `text` (UTF-8), one
/// of the two.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PushParams {
    /// A raw payload (an `application/octet-stream` body), not from JSON.
    #[serde(skip)]
    raw: Option<Vec<u8>>,
    user: Option<String>,
    users: Option<Vec<String>>,
    payload: Option<String>,
    text: Option<String>,
    mode: Option<Mode>,
    client_id: Option<u64>,
    ttl_ms: Option<u64>,
}

#[derive(Deserialize, Copy, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Reliable,
    AtMostOnce,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishParams {
    #[serde(skip)]
    raw: Option<Vec<u8>>,
    room: String,
    payload: Option<String>,
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastParams {
    #[serde(skip)]
    raw: Option<Vec<u8>>,
    payload: Option<String>,
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserParams {
    user: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceParams {
    user: String,
    device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberParams {
    user: String,
    room: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersParams {
    users: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomsParams {
    rooms: Vec<String>,
}

/// One command of `/api/v1/batch`: `{"push": {...}}`, `{"publish": {...}}`, ...
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Push(PushParams),
    Publish(PublishParams),
    Broadcast(BroadcastParams),
    Kick(UserParams),
    Join(MemberParams),
    Leave(MemberParams),
    Presence(UsersParams),
    Connections(UserParams),
    RoomSizes(RoomsParams),
    Inbox(UserParams),
    ForgetDevice(DeviceParams),
}

/// A bad request, naming the field at fault (its path in the JSON).
fn bad_json(e: serde_path_to_error::Error<serde_json::Error>) -> Answer {
    let path = e.path().to_string();
    let e = e.into_inner();
    if path.is_empty() || path == "." {
        return error(400, format!("invalid request: {e}"));
    }
    error(400, format!("invalid request: {path}: {e}"))
}

/// Parses JSON, keeping the path to the field at fault.
fn parse<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, Answer> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(json)).map_err(bad_json)
}

fn payload(raw: Option<Vec<u8>>, payload: Option<String>, text: Option<String>) -> Result<Vec<u8>, Answer> {
    if let Some(raw) = raw {
        return Ok(raw);
    }
    match (payload, text) {
        (Some(b64), None) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| error(400, format!("payload: not standard base64 ({e})"))),
        (None, Some(t)) => Ok(t.into_bytes()),
        (None, None) => Err(error(400, "missing field `payload` (base64) or `text` (UTF-8)")),
        (Some(_), Some(_)) => Err(error(400, "give `payload` or `text`, not both")),
    }
}

/// Limits a request's lists are held to.
#[derive(Copy, Clone)]
pub(crate) struct Lists {
    /// Most users, rooms or commands in one request.
    pub max_items: usize,
}

/// A batch's users whose push failed, each with the index of the first
/// command that failed for them. A later push to one of them in the same
/// batch is not tried (424): retrying the failed push, then the rest,
/// then keeps that user's order, where a push stored after a refused one
/// (a store queue full for a moment, a payload to fix) would land before
/// the retry. A request of its own is command 0 of a batch of one: nothing
/// in it is skipped.
#[derive(Default)]
pub(crate) struct Stopped(std::collections::HashMap<String, usize>);

impl Stopped {
    /// The answer for a push to `user` by command `now` that is not
    /// tried, if one is due: an earlier command's push to `user` failed
    /// (a `users` list naming a user twice is one command, tried whole).
    fn skip(&self, user: &str, now: usize) -> Option<Exec> {
        if self.0.is_empty() {
            return None; // the common case: no hash of the user id
        }
        self.0.get(user).filter(|&&i| i < now).map(|i| {
            Exec::Now(error(
                424,
                format!("not tried: command {i} of this batch, a push to this user, failed; retry that one first, then this"),
            ))
        })
    }

    /// Notes command `i`'s outcome for `user`.
    fn note(&mut self, i: usize, user: &str, exec: &Exec) {
        if matches!(exec, Exec::Now((status, _)) if *status != 200) {
            self.0.entry(user.to_owned()).or_insert(i);
        }
    }

    /// Notes a failure of command `i`, whose JSON did not parse as a
    /// command, for the users of the push it names, if it names any.
    fn note_unparsed(&mut self, i: usize, raw: &str, failed: &Exec) {
        let Ok(v) = serde_json::from_str::<Value>(raw) else { return };
        let push = &v["push"];
        let users = push["users"].as_array().into_iter().flatten().chain(std::iter::once(&push["user"]));
        for user in users.filter_map(Value::as_str) {
            self.note(i, user, failed);
        }
    }
}

/// Pushes `body` to `user` (stored as `reliable` says, or at most once
/// for `None`), unless a push to `user` earlier in the batch failed
/// (`stopped`, `i`: this command's index).
fn push_one(
    h: &Handle,
    user: &str,
    body: &[u8],
    reliable: Option<ReliablePush>,
    stopped: &mut Stopped,
    i: usize,
) -> Exec {
    if let Some(skip) = stopped.skip(user, i) {
        return skip;
    }
    let exec = match reliable {
        None => match h.push_to_user(user, body) {
            Ok(p) => Exec::Pushed(p),
            Err(e) => Exec::Now(push_error(e)),
        },
        Some(opts) => match h.push_reliable_with(user, body, opts) {
            Ok(p) => Exec::Later(Later::Push(p)),
            Err(e) => Exec::Now(push_error(e)),
        },
    };
    stopped.note(i, user, &exec);
    exec
}

fn push(h: &Handle, p: PushParams, lists: Lists, stopped: &mut Stopped, i: usize) -> Exec {
    let reliable = match p.mode {
        None => h.reliable_by_default(),
        Some(m) => m == Mode::Reliable,
    };
    let client_id = p.client_id.unwrap_or(0);
    let ttl_ms = p.ttl_ms;
    let PushParams { user, users, raw, payload: b64, text, .. } = p;
    let failed = |a: Answer, stopped: &mut Stopped| {
        let exec = Exec::Now(a);
        for user in user.iter().chain(users.iter().flatten()) {
            stopped.note(i, user, &exec);
        }
        exec
    };
    let body = match payload(raw, b64, text) {
        Ok(b) => b,
        Err(a) => return failed(a, stopped),
    };
    if client_id != 0 && !reliable {
        // Nothing is stored, so there is nothing to deduplicate against.
        return failed(error(400, "client_id: only for reliable pushes"), stopped);
    }
    let ttl = match ttl_ms {
        None => None,
        Some(_) if !reliable => return failed(error(400, "ttl_ms: only for reliable pushes"), stopped),
        Some(ms @ 1..=MAX_TTL_MS) => Some(Duration::from_millis(ms)),
        Some(ms) => return failed(error(400, format!("ttl_ms: {ms} is not from 1 to {MAX_TTL_MS}")), stopped),
    };
    let reliable = reliable.then_some(ReliablePush { client_id, ttl });
    match (&user, &users) {
        (Some(user), None) => push_one(h, user, &body, reliable, stopped, i),
        (None, Some(users)) => {
            if users.len() > lists.max_items {
                let a = error(413, format!("users: {} over the limit of {}", users.len(), lists.max_items));
                return failed(a, stopped);
            }
            // One key for all: every store deduplicates per recipient, so
            // a retried push stores none of its users' messages twice.
            let parts = users
                .iter()
                .map(|u| {
                    let exec = push_one(h, u, &body, reliable, stopped, i);
                    (u.clone(), exec)
                })
                .collect();
            Exec::Later(Later::Users(parts))
        }
        (None, None) => Exec::Now(error(400, "missing field `user` (or `users`)")),
        (Some(_), Some(_)) => failed(error(400, "give `user` or `users`, not both"), stopped),
    }
}

fn published(r: Result<crate::server::Published, PushError>) -> Answer {
    match r {
        Ok(p) => (200, json!({ "msg_id": p.msg_id, "workers": p.workers })),
        Err(e) => push_error(e),
    }
}

fn counted(r: Result<usize, PushError>) -> Answer {
    match r {
        Ok(n) => (200, json!({ "connections": n })),
        Err(e) => push_error(e),
    }
}

fn too_many(what: &str, n: usize, lists: Lists) -> Option<Answer> {
    (n > lists.max_items).then(|| error(413, format!("{what}: {n} over the limit of {}", lists.max_items)))
}

/// The first entry of `names` that `valid` refuses, as a 400 naming it.
fn first_invalid<E: std::fmt::Display>(
    list: &str,
    names: &[String],
    valid: impl Fn(&str) -> Result<(), E>,
) -> Option<Answer> {
    names.iter().enumerate().find_map(|(i, n)| valid(n).err().map(|e| error(400, format!("{list}[{i}]: {e}"))))
}

fn presence(h: &Handle, users: Vec<String>, lists: Lists) -> Answer {
    if let Some(a) = too_many("users", users.len(), lists) {
        return a;
    }
    let user_id = |u: &str| {
        if crate::proto::frame::is_valid_user_id(u) {
            Ok(())
        } else {
            Err(PushError::InvalidUser)
        }
    };
    if let Some(a) = first_invalid("users", &users, user_id) {
        return a;
    }
    let users = users
        .into_iter()
        .map(|u| {
            let n = h.connections_of(&u).len();
            json!({ "user": u, "online": n > 0, "connections": n })
        })
        .collect::<Vec<_>>();
    (200, json!({ "users": users }))
}

fn connections(h: &Handle, user: &str) -> Answer {
    if !crate::proto::frame::is_valid_user_id(user) {
        return push_error(PushError::InvalidUser);
    }
    let conns = h
        .connections_of(user)
        .into_iter()
        .map(|c| json!({ "id": c.to_u64().to_string(), "worker": c.worker().0 }))
        .collect::<Vec<_>>();
    (200, json!({ "user": user, "connections": conns }))
}

fn room_sizes(h: &Handle, rooms: Vec<String>, lists: Lists) -> Answer {
    if let Some(a) = too_many("rooms", rooms.len(), lists) {
        return a;
    }
    if let Some(a) = first_invalid("rooms", &rooms, crate::rooms::check_room_name) {
        return a;
    }
    let rooms = rooms
        .into_iter()
        .map(|r| {
            let size = h.room_size(&r);
            json!({ "room": r, "size": size })
        })
        .collect::<Vec<_>>();
    (200, json!({ "rooms": rooms }))
}

/// Runs command `i` of a batch (0 for a request of its own).
fn run(h: &Handle, cmd: Command, lists: Lists, stopped: &mut Stopped, i: usize) -> Exec {
    let now = Exec::Now;
    match cmd {
        Command::Push(p) => push(h, p, lists, stopped, i),
        Command::Publish(p) => match payload(p.raw, p.payload, p.text) {
            Ok(b) => now(published(h.publish_to_room(&p.room, b))),
            Err(a) => now(a),
        },
        Command::Broadcast(p) => match payload(p.raw, p.payload, p.text) {
            Ok(b) => now(published(h.broadcast(b))),
            Err(a) => now(a),
        },
        Command::Kick(p) => now(counted(h.kick_user(&p.user))),
        Command::Join(p) => now(counted(h.join_room(&p.user, &p.room))),
        Command::Leave(p) => now(counted(h.leave_room(&p.user, &p.room))),
        Command::Presence(p) => now(presence(h, p.users, lists)),
        Command::Connections(p) => now(connections(h, &p.user)),
        Command::RoomSizes(p) => now(room_sizes(h, p.rooms, lists)),
        // Asked now, answered when the batch's waits run: the state seen
        // is the one after the commands before it.
        Command::Inbox(p) => match h.request_inbox_state(&p.user) {
            Ok(pending) => Exec::Later(Later::Inbox(p.user, pending)),
            Err(e) => Exec::Now(push_error(e)),
        },
        Command::ForgetDevice(p) => match h.request_forget_device(&p.user, &p.device) {
            Ok(pending) => Exec::Later(Later::Forget(p.user, p.device, pending)),
            Err(e) => Exec::Now(push_error(e)),
        },
    }
}

/// The result of a batch: each command's outcome, in order.
pub(crate) enum Batch {
    Now(Answer),
    Later(Vec<Exec>),
}

/// `/api/v1/batch`: `{"commands": [...]}`. Every command runs, whatever
/// the others' outcomes, but for a push to a user whose push by an
/// earlier command failed ([`Stopped`]); a malformed command gets its own
/// 400.
fn batch(h: &Handle, body: &[u8], lists: Lists) -> Batch {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        commands: Vec<Box<serde_json::value::RawValue>>,
    }
    // The common case first: every command well formed, parsed in one
    // pass. Only a batch with a bad command (or a bad body) is parsed again,
    // command by command, to answer each one on its own.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Typed {
        commands: Vec<Command>,
    }
    if let Ok(t) = serde_json::from_slice::<Typed>(body) {
        if let Some(a) = too_many("commands", t.commands.len(), lists) {
            return Batch::Now(a);
        }
        let mut stopped = Stopped::default();
        let runs = t.commands.into_iter().enumerate().map(|(i, cmd)| run(h, cmd, lists, &mut stopped, i));
        return Batch::Later(runs.collect());
    }
    let b: Body = match parse(body) {
        Ok(b) => b,
        Err(a) => return Batch::Now(a),
    };
    if let Some(a) = too_many("commands", b.commands.len(), lists) {
        return Batch::Now(a);
    }
    let mut stopped = Stopped::default();
    Batch::Later(
        b.commands
            .iter()
            .enumerate()
            .map(|(i, raw)| match parse_command(raw.get()) {
                Ok(cmd) => run(h, cmd, lists, &mut stopped, i),
                Err(a) => {
                    let failed = Exec::Now(a);
                    stopped.note_unparsed(i, raw.get(), &failed);
                    failed
                }
            })
            .collect(),
    )
}

/// One command of a batch that failed to parse as a whole: its own 400,
/// which names the command's keys when it has other than one.
fn parse_command(raw: &str) -> Result<Command, Answer> {
    parse::<Command>(raw.as_bytes()).map_err(|a| match serde_json::from_str::<serde_json::Map<String, Value>>(raw) {
        Ok(keys) if keys.len() != 1 => {
            let names: Vec<&str> = keys.keys().map(String::as_str).collect();
            error(
                400,
                format!(
                    "a command is an object of one key naming it (push, publish, broadcast, kick, join, leave, \
                     presence, connections, room_sizes, inbox, forget_device); this one has {}: {}",
                    keys.len(),
                    names.join(", ")
                ),
            )
        }
        _ => a,
    })
}

/// Resolves a batch's outcomes (blocking: the server's blocking pool).
fn resolve_batch(execs: Vec<Exec>, deadline: Instant) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(16 + execs.len() * 72);
    out.push_str("{\"results\":[");
    for (i, exec) in execs.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match exec {
            // The common case, written straight out (same fields as `pushed`).
            Exec::Pushed(p) => {
                let _ = write!(
                    out,
                    "{{\"status\":200,\"msg_id\":{},\"connections\":{},\"stored\":false}}",
                    p.msg_id, p.connections
                );
            }
            exec => {
                let (status, mut v) = resolve(exec, deadline);
                v["status"] = json!(status);
                out.push_str(&v.to_string());
            }
        }
    }
    out.push_str("]}");
    out
}

/// Runs what a call left to wait for and serialises the answer (blocking:
/// the server's blocking pool).
pub(crate) fn finish(outcome: Outcome, deadline: Instant) -> (u16, String) {
    match outcome {
        Outcome::Exec(exec) => {
            let (status, v) = resolve(exec, deadline);
            (status, v.to_string())
        }
        Outcome::Batch(Batch::Now((status, v))) => (status, v.to_string()),
        Outcome::Batch(Batch::Later(execs)) => (200, resolve_batch(execs, deadline)),
    }
}

/// A parsed request, as the routes need it.
pub(crate) struct Call<'a> {
    pub entry: &'static Entry,
    pub query: &'a [(String, String)],
    pub body: &'a [u8],
    /// The body is a raw payload (`application/octet-stream`).
    pub raw: bool,
    pub lists: Lists,
}

/// What a request asks the server to do.
pub(crate) enum Outcome {
    Exec(Exec),
    Batch(Batch),
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Answer> {
    if body.is_empty() {
        return Err(error(400, "the body must be a JSON object"));
    }
    parse(body)
}

/// The parameters of a raw-payload call, from the query string:
/// `/api/v1/push?user=U` with an `application/octet-stream` body, or a
/// legacy route.
fn from_query(c: &Call<'_>) -> Result<Command, Answer> {
    let need =
        |name: &str| param(c.query, name).map(str::to_string).ok_or_else(|| error(400, format!("missing ?{name}=")));
    let raw = || Some(c.body.to_vec());
    Ok(match c.entry.route {
        R::Push => Command::Push(PushParams {
            user: Some(need("user")?),
            raw: raw(),
            mode: match param(c.query, "mode") {
                None => None,
                Some("reliable") => Some(Mode::Reliable),
                Some("at_most_once") => Some(Mode::AtMostOnce),
                Some(m) => return Err(error(400, format!("mode={m}: use reliable or at_most_once"))),
            },
            client_id: match param(c.query, "client_id").map(str::parse::<u64>) {
                None => None,
                Some(Ok(id)) => Some(id),
                Some(Err(_)) => return Err(error(400, "client_id must be an integer 0..2^64-1")),
            },
            ttl_ms: match param(c.query, "ttl_ms").map(str::parse::<u64>) {
                None => None,
                Some(Ok(ms)) => Some(ms),
                Some(Err(_)) => return Err(error(400, format!("ttl_ms must be an integer from 1 to {MAX_TTL_MS}"))),
            },
            ..PushParams::default()
        }),
        R::Publish => Command::Publish(PublishParams { raw: raw(), room: need("room")?, payload: None, text: None }),
        R::Broadcast => Command::Broadcast(BroadcastParams { raw: raw(), payload: None, text: None }),
        R::Kick => Command::Kick(UserParams { user: need("user")? }),
        R::Join => Command::Join(MemberParams { user: need("user")?, room: need("room")? }),
        R::Leave => Command::Leave(MemberParams { user: need("user")?, room: need("room")? }),
        R::Inbox => Command::Inbox(UserParams { user: need("user")? }),
        R::Connections => Command::Connections(UserParams { user: need("user")? }),
        _ => return Err(error(415, "this route takes a JSON body")),
    })
}

/// Refuses a query parameter the call does not read, and one given
/// twice, as a JSON body's unknown field is refused: ignored, a typo
/// (`mdoe=at_most_once`) stored a message reliably, and a second `user`
/// was dropped without a word. Health checks take whatever a prober adds.
fn check_query(c: &Call<'_>) -> Result<(), Answer> {
    let legacy = c.entry.style == Legacy;
    let takes: &[&str] = match c.entry.route {
        R::Healthz | R::Readyz | R::Metrics => return Ok(()),
        R::Push if legacy || c.raw => &["user", "mode", "client_id", "ttl_ms"],
        R::Publish if legacy || c.raw => &["room"],
        R::Kick if legacy => &["user"],
        R::Join | R::Leave if legacy => &["user", "room"],
        R::Inbox | R::Connections => &["user"],
        R::Room => &["room"],
        R::BenchSendCeiling => &["room", "bytes", "seq"],
        _ => &[],
    };
    for (i, (name, _)) in c.query.iter().enumerate() {
        if !takes.contains(&name.as_str()) {
            let json_body = !c.raw && !legacy && c.entry.route != R::Stats;
            return Err(error(
                400,
                match takes {
                    [] if json_body => format!(
                        "unknown query parameter `{name}`: this call takes none (its parameters go in the JSON body)"
                    ),
                    [] => format!("unknown query parameter `{name}`: this call takes none"),
                    _ => format!("unknown query parameter `{name}`: this call takes {}", takes.join(", ")),
                },
            ));
        }
        if c.query[..i].iter().any(|(earlier, _)| earlier == name) {
            return Err(error(400, format!("query parameter `{name}` given twice")));
        }
    }
    Ok(())
}

/// Runs a call.
pub(crate) fn call(h: &Handle, c: &Call<'_>) -> Outcome {
    let now = |a| Outcome::Exec(Exec::Now(a));
    if let Err(a) = check_query(c) {
        return now(a);
    }
    let command = |r: Result<Command, Answer>| match r {
        Ok(cmd) => Outcome::Exec(run(h, cmd, c.lists, &mut Stopped::default(), 0)),
        Err(a) => now(a),
    };
    let legacy = c.entry.style == Legacy;
    match c.entry.route {
        R::Healthz => now((200, json!({ "status": "ok" }))),
        R::Readyz => now(if h.is_ready() { (200, json!({ "ready": true })) } else { (503, json!({ "ready": false })) }),
        R::Metrics => unreachable!("GET /metrics is answered by the server before the routes run"),
        R::Stats => now(stats(h)),
        R::Room => match param(c.query, "room") {
            Some(room) => match crate::rooms::check_room_name(room) {
                Ok(()) => now((200, json!({ "room": room, "size": h.room_size(room) }))),
                Err(e) => now(error(400, e.to_string())),
            },
            None => now(error(400, "missing ?room=")),
        },
        R::Inbox | R::Connections => command(from_query(c)),
        R::Push | R::Publish | R::Broadcast if legacy || c.raw => command(from_query(c)),
        R::Kick | R::Join | R::Leave if legacy => command(from_query(c)),
        R::Push => command(json_body(c.body).map(Command::Push)),
        R::Publish => command(json_body(c.body).map(Command::Publish)),
        R::Broadcast => command(json_body(c.body).map(Command::Broadcast)),
        R::Kick => command(json_body(c.body).map(Command::Kick)),
        R::Join => command(json_body(c.body).map(Command::Join)),
        R::Leave => command(json_body(c.body).map(Command::Leave)),
        R::Presence => command(json_body(c.body).map(Command::Presence)),
        R::RoomSizes => command(json_body(c.body).map(Command::RoomSizes)),
        R::ForgetDevice => command(json_body(c.body).map(Command::ForgetDevice)),
        R::Batch => Outcome::Batch(batch(h, c.body, c.lists)),
        R::BenchSendCeiling => {
            let bytes: usize = param(c.query, "bytes").and_then(|b| b.parse().ok()).unwrap_or(64);
            let seq: u32 = param(c.query, "seq").and_then(|b| b.parse().ok()).unwrap_or(u32::MAX);
            let payload = crate::timed::payload(seq, bytes);
            let Some(room) = param(c.query, "room") else {
                return now(error(400, "missing ?room="));
            };
            now(match h.bench_send_ceiling(room, &payload) {
                Ok(samples) => (
                    200,
                    json!(samples
                        .iter()
                        .map(|s| json!({ "sends": s.sends, "elapsed_ns": s.elapsed.as_nanos() as u64 }))
                        .collect::<Vec<_>>()),
                ),
                Err(e) => push_error(e),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_has_one_method_and_unknown_ones_are_told_apart() {
        assert_eq!(find("GET", "/healthz", false).unwrap().route, R::Healthz);
        assert_eq!(find("HEAD", "/healthz", false).unwrap().route, R::Healthz);
        assert_eq!(find("GET", "/api/v1/push", false).err(), Some(Some("POST")));
        assert_eq!(find("GET", "/nope", false).err(), Some(None));
        assert_eq!(find("POST", "/bench/send_ceiling", false).err(), Some(None));
        assert!(find("POST", "/bench/send_ceiling", true).is_ok());
        for a in ROUTES {
            let same = ROUTES.iter().filter(|b| b.path == a.path).count();
            assert_eq!(same, 1, "{} is in the table twice", a.path);
        }
    }

    #[test]
    fn payloads_are_base64_or_text_never_both() {
        assert_eq!(payload(None, Some("aGk=".into()), None).unwrap(), b"hi");
        assert_eq!(payload(None, None, Some("hi".into())).unwrap(), b"hi");
        assert_eq!(payload(Some(b"raw".to_vec()), None, None).unwrap(), b"raw");
        assert_eq!(payload(None, Some("!!".into()), None).unwrap_err().0, 400);
        assert_eq!(payload(None, None, None).unwrap_err().0, 400);
        assert_eq!(payload(None, Some("aGk=".into()), Some("hi".into())).unwrap_err().0, 400);
    }

    #[test]
    fn bad_commands_name_the_field_at_fault() {
        let words = |json: &str| parse_command(json).err().unwrap().1["error"].as_str().unwrap().to_string();
        assert!(words(r#"{"push": {"usr": "a", "text": "x"}}"#).contains("usr"));
        assert!(words(r#"{"kick": {}}"#).contains("user"));
        assert!(words(r#"{"explode": {}}"#).contains("explode"));
        let mode = words(r#"{"push": {"user": "a", "text": "x", "mode": "sometimes"}}"#);
        assert!(mode.contains("push.mode"), "{mode}");
        // A command of two keys, or none, says so (serde's own words were
        // "expected value at line 1 column 26").
        let two = words(r#"{"kick": {"user": "c"}, "join": {"user": "a", "room": "b"}}"#);
        assert!(two.contains("one key") && two.contains("kick, join"), "{two}");
        assert!(words("{}").contains("one key"));
    }
}
