//! [`RedisStore`]: the inboxes in Redis or a Redis Cluster, shared by every
//! Switchboard node, so a user's inbox is there whichever node they reach.
//!
//! Owns: the key layout of a user's inbox (below), the Lua scripts that
//! change it, the connections to Redis (one per master, on the store
//! thread, with connect/read/write timeouts), the routing of a user's
//! commands to the master serving the user's hash slot, the retention
//! index, and the store-wide byte and message totals as far as this
//! process knows them.
//! Must not: run on an io_uring worker (every call is a network round
//! trip, bounded by `command_timeout`); hang (every socket operation has a
//! timeout; after an I/O error or timeout the connections are dropped and
//! the next call reconnects); retry a script after an I/O error (an append
//! whose answer was lost may have been stored: running it again would store
//! it twice; the error goes to the caller, whose retry with a client id is
//! deduplicated).
//!
//! # Keys
//!
//! Every key of user `u` is `<prefix>:{u}:<suffix>` (prefix `sb`): the
//! `{u}` hash tag puts all of them in one hash slot, so one script can
//! change them atomically on a Redis Cluster. A user id holding `{` or `}`
//! (or starting with `#`) is written as `#` + its hex ([`user_tag`]).
//! - `:h` hash: `head` (last seq given out; never deleted, not by retention
//!   and not by TTL: Redis `maxmemory-policy` must be `noeviction`), `n`
//!   (messages kept), `b` (their bytes, as [`record_bytes`]), `first` (the
//!   oldest kept seq while `n > 0`), `dn` (devices ever added, for order).
//! - `:m` list: the kept messages, oldest first; element `i` holds seq
//!   `first + i` (seqs are dense, so the position is the seq and no seq is
//!   stored). Each element is one string, [`encode_entry`]:
//!   `varint(ts_ms) varint(msg_id) u8(len(from)) from payload` (varints
//!   LEB128: 7 bits a byte, low first); a message with an expiry of its
//!   own has `00 varint(expires_ms)` in front (a varint of a timestamp
//!   never starts with a zero byte). Reads are `LRANGE (after + 1 −
//!   first) (after + limit − first)`; Redis reaches the start by skipping
//!   whole quicklist nodes (~8 KB of messages each) from the nearer end of
//!   the list (on Redis 7.0, an `LRANGE` of 10 from a 100,000-element list
//!   took 1.3 µs at the front or the back, 7 µs in the middle). Retention
//!   trims the front (`LTRIM`) and moves `first` in the same script. Why a
//!   list (docs/SCALING.md has the before/after figures): a user with one
//!   kept message costs 280 bytes in it (`MEMORY USAGE`) where a stream cost
//!   4,752 (Redis 7.0 allocates a stream's first node at
//!   `stream-node-max-bytes`, 4096); in a long inbox a 100-byte message
//!   takes 116 bytes of the list, where the stream took 150 and a hash
//!   keyed by seq takes ~180 (a value over `hash-max-listpack-value`, 64
//!   bytes, makes a hash a hashtable). Deleted when it empties.
//! - `:dv` hash: device → `"<position> <last_seen_ms> <order>"`.
//! - `:df` hash: device → the time it was forgotten
//!   ([`Store::forget_device`]), kept until the device logs in again or
//!   `ttl_ms` later. In a cluster the last ACKs of a connection that
//!   closed on another node can reach Redis after the forget, from a store
//!   thread that never saw it. This build drops a position of any device
//!   the inbox does not know (only a login adds one: `DEVICE_LUA`), marked
//!   or not; the marks are still written for nodes of the builds before
//!   that (2026-12-07), which drop a position only for a marked device
//!   and add any other, so that a rolling upgrade keeps forgets. Written
//!   only for a device the store knew (or forgotten already), so it is
//!   bounded by the devices there were. Measured (`redis_store_measure`): the key with one mark
//!   of a 5-byte device id takes 104 bytes (`MEMORY USAGE`), about 12 more
//!   plus the id for each further mark; removing the device entry frees
//!   about as much. While a mark counts, its user stays in the index. A
//!   node of a build before marks, in a rolling upgrade, neither ends a
//!   mark at a login nor keeps its user in the index (its retention pass
//!   may leave the key until the user's next message or login).
//! - `:dd` hash `"<client_id>:<from>"` → `"<seq> <msg_id> <ts_ms>"` and
//!   `:dq` sorted set of the same members scored by append time: the dedup
//!   window. Dedup is per recipient: the key is (to, from, client_id), the
//!   only scope one atomic script on a cluster can check (the recipient's
//!   slot). The same client id sent by one sender to two users stores two
//!   messages (the API allows a client id only on a push to one user).
//! - `:nodes` hash node id → login time: written by `device_login` (below).
//!
//! Read, not written: the cluster's live-node set and its nodes'
//! capabilities (`sb:nodes`, `{sb:nodes}:caps`), before a message with an
//! expiry of its own is stored ([`EXPIRY_RECHECK`]).
//!
//! Per hash slot `s`, with `t(s)` a short string whose slot is `s`:
//! - `<prefix>:ix:{t(s)}` sorted set: the users of slot `s` with something
//!   retention may drop (messages, devices, dedup entries), scored by the
//!   earliest time it may (0: at the next pass). Every script that adds
//!   something lowers the score (`ZADD LT`); the retention script sets the
//!   exact next time or removes the user. In the user's slot, so kept
//!   atomically by the same script. Cost: ~70 bytes per user with kept
//!   state, and a pass reads all 16384 index keys (one pipeline per master,
//!   ~10 ms) plus one script per due user.
//! - `<prefix>:ib:{t(s)}` hash `m`, `b`: messages and bytes kept in slot
//!   `s`. Summed over the slots by [`RedisStore::refresh_totals`].
//!
//! # Atomicity and presence
//!
//! Each append is one script (EVALSHA): dedup check, inbox limit, byte
//! budget, `head + 1`, `RPUSH`, counters, dedup entry, index. `device_login`
//! is one script that first writes `HSET <prefix>:{u}:nodes <node_id>
//! <now_ms>`, then reads the head. The cluster router reads that hash to
//! pick the nodes to forward a stored message to; since the presence write
//! and the head read are one atomic step in the user's slot, and so is an
//! append, either the login's head includes the message (the device gets
//! it from the inbox) or the append came after the login, and the
//! appender's lookup that follows its append sees this node.
//!
//! # Limits
//!
//! `max_messages_per_inbox` is exact (checked in the script). `max_bytes`
//! spans the whole cluster, which no single script can see (cross-slot):
//! each append passes the budget left = `max_bytes` − the store-wide total
//! as this process knows it (the per-slot counters summed at open, after
//! every retention pass and every [`TOTALS_REFRESH_INTERVAL`], plus what
//! this process appended and dropped since). Exact with one Switchboard
//! node; with several, the total can overshoot by what the other nodes
//! append within one refresh interval.
//!
//! # Pipelining and routing
//!
//! [`Store::append_batch`] sends all the appends of a batch as EVALSHA
//! commands, one pipeline per master, all sent before any answer is read:
//! one round trip for the batch. Routing is done here, from `CLUSTER
//! SLOTS`, over plain connections, not with redis-rs's `ClusterConnection`:
//! its sync pipeline turns any error reply (one `NOSCRIPT`, one `MOVED`)
//! into an error for the whole pipeline, losing the outcomes of the
//! appends that were stored, and its single-command path retries after I/O
//! errors, which would run a non-idempotent append twice. A `MOVED` or
//! `ASK` answer (resharding) fails that call and makes the next call reload
//! the slot map. A `NOSCRIPT` (a Redis restarted without this process
//! noticing, or `SCRIPT FLUSH`) loads the scripts and retries the calls
//! that were not run, unless a later call of the same user in the same
//! pipeline ran (a retry would then reorder them: those fail instead).
//!
//! # Durability
//!
//! `sync` does nothing: what Redis acknowledged is as durable as Redis
//! makes it. `appendonly yes` + `appendfsync always`: an acknowledged
//! message survives power loss of the Redis host; `everysec`: power loss
//! can take the last second, a crash of the Redis process loses nothing
//! (Redis writes the AOF before it answers); no AOF: a Redis restart loses
//! everything. [`RedisStore::durability`] reports what the masters said
//! when last asked: at every (re)connect, and every
//! [`DURABILITY_RECHECK`] in between.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::{Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};

use super::{
    check_ids, record_bytes, Appended, DeviceState, Durability, InboxState, NewMessage, Page, Store, StoreError,
    StoreLimits, StoredMessage, MAX_DEVICES_PER_USER,
};
use crate::cluster::node::{CAPS_KEY, NODES_KEY};
use crate::config::RedisAddrs;

/// The key prefix of a production store.
pub const DEFAULT_PREFIX: &str = "sb";

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16_384;

/// How often the store-wide totals (for `max_bytes` and [`Store::held`])
/// are summed from the per-slot counters, at most: 16384 `HMGET`s, one
/// pipeline per master.
pub const TOTALS_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Messages (and dedup entries) one retention script drops, at most: bounds
/// how long one script blocks its Redis (a few ms). A user with more is
/// visited again in the same pass.
pub const EXPIRE_MAX_DROP_PER_CALL: u64 = 1_000;

/// Index keys read per round of a retention pass, and users taken from
/// each: bounds a round's pipeline to 512 × 64 scripts (~5 MB of commands).
pub(crate) const EXPIRE_SLOTS_PER_ROUND: usize = 512;
const EXPIRE_USERS_PER_SLOT: usize = 64;

/// Rounds of one chunk of slots in one pass, at most (a bound, not a
/// figure any inbox reaches: 100,000 messages per inbox take 100 rounds).
const EXPIRE_MAX_ROUNDS: u32 = 10_000;

/// Messages one read returns, at most, whatever the caller asks.
pub const MAX_READ_LIMIT: usize = 100_000;

/// The slot Redis Cluster gives `key`: CRC16 (XMODEM) of its hash tag (the
/// part between the first `{` and the next `}`, if not empty) or of the
/// whole key, mod 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tag = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(tag) % SLOTS as u16
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// How a user id appears in its keys' hash tag: itself, or `#` + hex when
/// it holds a brace (which would cut the tag) or starts with `#`.
pub fn user_tag(user: &str) -> String {
    if user.contains(['{', '}']) || user.starts_with('#') {
        let mut t = String::with_capacity(1 + 2 * user.len());
        t.push('#');
        for b in user.bytes() {
            t.push_str(&format!("{b:02x}"));
        }
        t
    } else {
        user.to_string()
    }
}

/// The user id of a [`user_tag`].
fn tag_user(tag: &str) -> Option<String> {
    let Some(hex) = tag.strip_prefix('#') else { return Some(tag.to_string()) };
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    String::from_utf8(bytes?).ok()
}

/// Key `suffix` of `user` under `prefix`: `<prefix>:{<tag>}:<suffix>`.
pub fn user_key(prefix: &str, user: &str, suffix: &str) -> String {
    format!("{prefix}:{{{}}}:{suffix}", user_tag(user))
}

/// The hash whose field `head` is the last seq `user`'s inbox gave out,
/// under [`DEFAULT_PREFIX`]: what the cluster thread reads to catch its
/// device connections up after notices may have been lost
/// (`cluster::node`, `Node::reregister`).
pub fn inbox_head_key(user: &str) -> String {
    user_key(DEFAULT_PREFIX, user, "h")
}

/// The presence hash the cluster router reads: node id → last login
/// (Unix ms) of a device of `user` on that node, under [`DEFAULT_PREFIX`].
pub fn presence_key(user: &str) -> String {
    user_key(DEFAULT_PREFIX, user, "nodes")
}

/// For each slot, the smallest number whose decimal form hashes to it:
/// the hash tag of that slot's index keys.
static SLOT_TAGS: LazyLock<Box<[u32]>> = LazyLock::new(|| {
    let mut tags = vec![u32::MAX; SLOTS];
    let mut left = SLOTS;
    let mut n: u32 = 0;
    while left > 0 {
        let slot = key_slot(n.to_string().as_bytes()) as usize;
        if tags[slot] == u32::MAX {
            tags[slot] = n;
            left -= 1;
        }
        n += 1;
    }
    tags.into_boxed_slice()
});

/// A Lua script: its code, and its SHA1 for EVALSHA (from redis::Script).
struct Lua {
    code: &'static str,
    script: redis::Script,
}

impl Lua {
    fn new(code: &'static str) -> Lua {
        Lua { code, script: redis::Script::new(code) }
    }
}

/// Append: KEYS h m dd dq ix ib; ARGV now from client_id msg_id ts entry
/// bytes max_messages budget window ttl tag expires (`entry`: the message
/// as [`encode_entry`] writes it; `expires` 0: none). Returns {0, seq} stored,
/// {1, seq, msg_id} duplicate, {2} inbox full, {3} store full.
const APPEND_LUA: &str = r#"
local function fmt(x) return string.format('%d', x) end
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[10])
local dkey = nil
if ARGV[3] ~= '0' then
  dkey = ARGV[3] .. ':' .. ARGV[2]
  local seen = redis.call('HGET', KEYS[3], dkey)
  if seen then
    local seq, mid, at = string.match(seen, '^(%d+) (%d+) (%d+)$')
    if tonumber(at) + window > now then
      return {1, tonumber(seq), mid}
    end
  end
end
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if n >= tonumber(ARGV[8]) then return {2} end
local bytes = tonumber(ARGV[7])
if bytes > tonumber(ARGV[9]) then return {3} end
local seq = redis.call('HINCRBY', KEYS[1], 'head', 1)
if n == 0 then redis.call('HSET', KEYS[1], 'first', seq) end
redis.call('RPUSH', KEYS[2], ARGV[6])
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HINCRBY', KEYS[1], 'b', bytes)
redis.call('HINCRBY', KEYS[6], 'm', 1)
redis.call('HINCRBY', KEYS[6], 'b', bytes)
local due = tonumber(ARGV[5]) + tonumber(ARGV[11])
local exp = tonumber(ARGV[13])
if exp > 0 and exp < due then due = exp end
if dkey then
  redis.call('HSET', KEYS[3], dkey, fmt(seq) .. ' ' .. ARGV[4] .. ' ' .. ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[1], dkey)
  if now + window < due then due = now + window end
end
redis.call('ZADD', KEYS[5], 'LT', fmt(due), ARGV[12])
return {0, seq}
"#;

/// Device login or position: KEYS h dv nodes ix df; ARGV device seq now
/// node_id max_devices ttl tag is_login. A login first records this node
/// in the presence hash and ends the device's forgotten mark (`:df`), then
/// reads the head; a position of a device the inbox does not know is
/// dropped (only a login adds one). Returns {position, head} ({0, head}
/// for a dropped position).
/// Runs when Redis is at `maxmemory` (`allow-oom`), as [`EXPIRE_LUA`]
/// does: the acknowledgements it records, and the retention pass that
/// drops what they acknowledged, are how a full Redis gets space back
/// (it adds at most a device entry and a presence field per user).
const DEVICE_LUA: &str = r#"#!lua flags=allow-oom
local function fmt(x) return string.format('%d', x) end
local now = tonumber(ARGV[3])
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[3])
  redis.call('HDEL', KEYS[5], ARGV[1])
end
local head = tonumber(redis.call('HGET', KEYS[1], 'head') or '0')
-- '' is the entry of the devices pushed out (store::PUSHED_OUT), never a
-- device's id: nothing moves it.
if ARGV[1] == '' then return {0, head} end
local s = tonumber(ARGV[2])
-- A login past the head stored from another inbox: its seqs do not count
-- (store::login_device). A position past the head is dropped: it counts
-- seqs of an inbox that is gone (a Redis restarted without its AOF; the
-- nodes close their device connections when they see it), and taken, even
-- capped at the head, it would mark new messages as acknowledged.
if s > head then
  if ARGV[8] == '1' then s = 0 else return {0, head} end
end
local pos
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur then
  if ARGV[8] == '1' then
    -- A login's seq counts only for a device the inbox knows
    -- (store::login_device): a Redis restarted without an AOF lost the
    -- inbox that seq came from along with the device.
    s = 0
  else
    -- Only a login adds a device. A position of one the inbox does not
    -- know is dropped: it was forgotten (the connection's last ACKs, or
    -- another node's that never saw the forget), or Redis restarted
    -- without its AOF and the position counts seqs of the lost inbox
    -- (handed over before the node saw the loss), which taken would mark
    -- the new inbox's messages up to it as acknowledged.
    return {0, head}
  end
end
if cur then
  local p, seen, ord = string.match(cur, '^(%d+) (%d+) (%d+)$')
  pos = math.max(tonumber(p), s)
  redis.call('HSET', KEYS[2], ARGV[1], fmt(pos) .. ' ' .. fmt(math.max(tonumber(seen), now)) .. ' ' .. ord)
else
  if redis.call('HLEN', KEYS[2]) - redis.call('HEXISTS', KEYS[2], '') >= tonumber(ARGV[5]) then
    -- The device seen least recently goes, its position folded into the
    -- '' entry (store::PUSHED_OUT): the lowest position of the devices
    -- pushed out, their latest last seen, which keeps what they had not
    -- acknowledged until its TTL.
    local all = redis.call('HGETALL', KEYS[2])
    local victim, vpos, vseen, vord = nil, 0, 0, 0
    for i = 1, #all, 2 do
      if all[i] ~= '' then
        local p, seen, ord = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
        seen = tonumber(seen)
        ord = tonumber(ord)
        if victim == nil or seen < vseen or (seen == vseen and ord < vord) then
          victim, vpos, vseen, vord = all[i], tonumber(p), seen, ord
        end
      end
    end
    redis.call('HDEL', KEYS[2], victim)
    local out = redis.call('HGET', KEYS[2], '')
    if out then
      local p, seen, ord = string.match(out, '^(%d+) (%d+) (%d+)$')
      vpos = math.min(vpos, tonumber(p))
      vseen = math.max(vseen, tonumber(seen))
      vord = tonumber(ord)
    end
    redis.call('HSET', KEYS[2], '', fmt(vpos) .. ' ' .. fmt(vseen) .. ' ' .. fmt(vord))
  end
  local ord = redis.call('HINCRBY', KEYS[1], 'dn', 1)
  pos = s
  redis.call('HSET', KEYS[2], ARGV[1], fmt(pos) .. ' ' .. ARGV[3] .. ' ' .. fmt(ord))
end
local due = now + tonumber(ARGV[6])
if tonumber(redis.call('HGET', KEYS[1], 'n') or '0') > 0 then due = 0 end
redis.call('ZADD', KEYS[4], 'LT', fmt(due), ARGV[7])
return {pos, head}
"#;

/// Forget a device: KEYS dv ix df; ARGV device tag now ttl. Returns 1 if
/// the device was known (and makes the user due at the next retention
/// pass, which drops what the remaining devices have acknowledged), else
/// 0. Marks it forgotten (`:df`, see the module doc) if it was known or
/// marked already (a mark counts for `ttl` from its time), and keeps the
/// user in the index until the mark's end.
/// Runs at `maxmemory` (`allow-oom`), as [`EXPIRE_LUA`] does: it frees a
/// device entry, and takes at most an index entry and the mark (a user's
/// first mark makes the `:df` key, about 100 bytes), so that the pass it
/// calls for can free the messages.
const FORGET_LUA: &str = r#"#!lua flags=allow-oom
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local gone = redis.call('HDEL', KEYS[1], ARGV[1])
local mark = redis.call('HGET', KEYS[3], ARGV[1])
if gone == 1 or (mark and tonumber(mark) + ttl > now) then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  local due = string.format('%d', now + ttl)
  if gone == 1 then due = '0' end
  redis.call('ZADD', KEYS[2], 'LT', due, ARGV[2])
end
return gone
"#;

/// Read: KEYS h m; ARGV after limit. Returns {head, seq of the first
/// entry returned, the entries (up to `limit`, seqs > after)}. Element `i`
/// of the list holds seq `first + i`.
const READ_LUA: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'head', 'n', 'first')
local head, n, first = tonumber(h[1] or '0'), tonumber(h[2] or '0'), tonumber(h[3] or '0')
local limit = tonumber(ARGV[2])
if limit == 0 or n == 0 then return {head, 0, {}} end
local start = math.max(tonumber(ARGV[1]) + 1 - first, 0)
if start >= n then return {head, 0, {}} end
return {head, first + start, redis.call('LRANGE', KEYS[2], start, start + limit - 1)}
"#;

/// State: KEYS h dv. Returns {{head, n, b, first}, HGETALL dv}.
const STATE_LUA: &str = r#"
return {redis.call('HMGET', KEYS[1], 'head', 'n', 'b', 'first'), redis.call('HGETALL', KEYS[2])}
"#;

/// Retention for one user: KEYS h m dv dd dq ix ib df; ARGV now ttl window
/// user_len tag max_drop. Drops devices unseen for ttl and forgotten marks
/// ttl old, then messages from
/// the oldest while acknowledged by every remaining device (if any) or
/// ttl old, then dedup entries past the window; sets the user's index
/// score to the next time something may be dropped (or removes it).
/// Returns {messages dropped, their bytes, more (1: max_drop reached), those
/// of them past the position every device acknowledged}.
/// Runs when Redis is at `maxmemory` (`allow-oom`): it frees memory, and
/// a plain script's first write that may take memory (its `HINCRBY`) is
/// refused there, which left a full Redis full.
const EXPIRE_LUA: &str = r#"#!lua flags=allow-oom
local function fmt(x) return string.format('%d', x) end
local now, ttl, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ulen, maxdrop = tonumber(ARGV[4]), tonumber(ARGV[6])
local due = nil
local function soon(t) if due == nil or t < due then due = t end end
-- The LEB128 varint of `e` at byte `at`: its value and the byte after it.
local function varint(e, at)
  local v, mul = 0, 1
  while true do
    local b = string.byte(e, at)
    at = at + 1
    v = v + (b % 128) * mul
    mul = mul * 128
    if b < 128 then return v, at end
  end
end
local acked = nil
local devs = redis.call('HGETALL', KEYS[3])
for i = 1, #devs, 2 do
  local p, seen = string.match(devs[i + 1], '^(%d+) (%d+)')
  seen = tonumber(seen)
  if seen + ttl <= now then
    redis.call('HDEL', KEYS[3], devs[i])
  else
    p = tonumber(p)
    if acked == nil or p < acked then acked = p end
    soon(seen + ttl)
  end
end
acked = acked or 0
local marks = redis.call('HGETALL', KEYS[8])
for i = 1, #marks, 2 do
  local at = tonumber(marks[i + 1])
  if at + ttl <= now then redis.call('HDEL', KEYS[8], marks[i]) else soon(at + ttl) end
end
local more = 0
local dropped, bytes, last, unacked = 0, 0, 0, 0
local h = redis.call('HMGET', KEYS[1], 'n', 'first')
local n, first = tonumber(h[1] or '0'), tonumber(h[2] or '0')
local stop = false
while not stop and dropped < n do
  local batch = redis.call('LRANGE', KEYS[2], dropped, dropped + 99)
  if #batch == 0 then break end
  for _, e in ipairs(batch) do
    local seq = first + dropped
    -- The entry (encode_entry): an expiry of its own in front (a zero
    -- byte and a varint; 0: none), ts_ms the leading varint after it,
    -- msg_id the next; at = the position of the sender's length byte,
    -- after which come the sender and the payload.
    local exp, ts, at = 0, 0, 1
    if string.byte(e, 1) == 0 then exp, at = varint(e, 2) end
    ts, at = varint(e, at)
    local _
    _, at = varint(e, at)
    if seq > acked and ts + ttl > now and (exp == 0 or exp > now) then
      soon(ts + ttl)
      if exp > 0 then soon(exp) end
      stop = true
      break
    end
    if dropped >= maxdrop then
      more = 1
      stop = true
      break
    end
    dropped = dropped + 1
    if seq > acked then unacked = unacked + 1 end
    bytes = bytes + 26 + ulen + #e - at
    last = seq
  end
end
if dropped > 0 then
  local left = redis.call('HINCRBY', KEYS[1], 'n', -dropped)
  redis.call('HINCRBY', KEYS[1], 'b', -bytes)
  redis.call('HSET', KEYS[1], 'first', fmt(last + 1))
  if left == 0 then
    redis.call('DEL', KEYS[2])
  else
    redis.call('LTRIM', KEYS[2], dropped, -1)
  end
  redis.call('HINCRBY', KEYS[7], 'b', -bytes)
  if redis.call('HINCRBY', KEYS[7], 'm', -dropped) <= 0 then redis.call('DEL', KEYS[7]) end
end
local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', fmt(now - window), 'LIMIT', 0, maxdrop)
for _, member in ipairs(old) do
  redis.call('HDEL', KEYS[4], member)
  redis.call('ZREM', KEYS[5], member)
end
if #old >= maxdrop then more = 1 end
local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
if #oldest > 0 then soon(tonumber(oldest[2]) + window) end
if more == 1 then due = 0 end
if due == nil then
  redis.call('ZREM', KEYS[6], ARGV[5])
else
  redis.call('ZADD', KEYS[6], fmt(due), ARGV[5])
end
return {dropped, bytes, more, unacked}
"#;

/// Nodes below a capability level: KEYS sb:nodes caps ([`NODES_KEY`],
/// [`CAPS_KEY`]); ARGV live_ms level. Returns the ids of the nodes whose
/// last heartbeat is within live_ms of Redis's clock and whose
/// capabilities (0 if they wrote none) are below level.
const CAPS_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local below = {}
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')) do
  if (tonumber(redis.call('HGET', KEYS[2], n) or '0') or 0) < tonumber(ARGV[2]) then
    below[#below + 1] = n
  end
end
return below
"#;

struct Scripts {
    append: Lua,
    device: Lua,
    read: Lua,
    state: Lua,
    expire: Lua,
    forget: Lua,
    caps: Lua,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    append: Lua::new(APPEND_LUA),
    device: Lua::new(DEVICE_LUA),
    read: Lua::new(READ_LUA),
    state: Lua::new(STATE_LUA),
    expire: Lua::new(EXPIRE_LUA),
    forget: Lua::new(FORGET_LUA),
    caps: Lua::new(CAPS_LUA),
});

impl Scripts {
    fn all(&self) -> [&Lua; 7] {
        [&self.append, &self.device, &self.read, &self.state, &self.expire, &self.forget, &self.caps]
    }
}

/// One command to run in the slot of a user (or of an index key).
struct Op {
    slot: u16,
    /// The user's tag when `cmd` is a script of that user: calls of one
    /// tag keep their order through a NOSCRIPT retry.
    tag: Option<String>,
    cmd: Cmd,
}

/// The open connections: one per master, and which master serves a slot.
struct Link {
    nodes: Vec<redis::Connection>,
    /// `host:port` of each node, for errors.
    names: Vec<String>,
    /// Slot → index in `nodes`; `None` for a single Redis.
    slots: Option<Box<[u16]>>,
}

impl Link {
    fn node_of(&self, slot: u16) -> usize {
        self.slots.as_ref().map_or(0, |s| s[slot as usize] as usize)
    }

    /// PINGs every master ([`IDLE_CHECK_AFTER`]): the first that does not
    /// answer PONG, why, and whether it did not answer in time.
    fn check(&mut self) -> Option<(String, bool)> {
        for (con, name) in self.nodes.iter_mut().zip(&self.names) {
            if let Err(e) = redis::cmd("PING").query::<String>(con) {
                return Some((format!("{name}: {e}"), e.is_timeout()));
            }
        }
        None
    }
}

/// The store-wide totals as this process knows them.
#[derive(Default)]
struct Totals {
    refreshed_at: Option<Instant>,
    /// Summed from the per-slot counters at `refreshed_at`.
    messages: u64,
    bytes: u64,
    /// What this process appended (+) and dropped (−) since.
    delta_messages: i64,
    delta_bytes: i64,
}

impl Totals {
    fn messages(&self) -> u64 {
        (self.messages as i64).saturating_add(self.delta_messages).max(0) as u64
    }
    fn bytes(&self) -> u64 {
        (self.bytes as i64).saturating_add(self.delta_bytes).max(0) as u64
    }
}

/// The Redis-backed store. See the module doc.
pub struct RedisStore {
    addrs: RedisAddrs,
    node_id: String,
    limits: StoreLimits,
    timeout: Duration,
    prefix: String,
    link: Option<Link>,
    totals: Totals,
    durability: Option<Durability>,
    /// When `durability` was last read from Redis (`None`: due now).
    durability_at: Option<Instant>,
    /// `durability` has been read from Redis at least once.
    probed: bool,
    /// The retention pass under way, if it runs in slices.
    expire_at: Option<ExpireAt>,
    /// When the link last served a request ([`IDLE_CHECK_AFTER`]).
    used_at: Instant,
    /// How long after its last heartbeat a node counts as live
    /// (`cluster.node_ttl_ms`).
    node_ttl: Duration,
    /// [`Store::expired_unacknowledged`], since this open.
    expired_unacknowledged: u64,
    /// The live nodes of builds that misread an entry with an expiry, as
    /// last read ([`EXPIRY_RECHECK`]), and when.
    older: Option<(Instant, Vec<String>)>,
    /// When Redis last let a call wait out the timeout, and that call's
    /// error: calls fail with it at once until [`Self::retry_after`] has
    /// passed.
    silent: Option<(Instant, StoreError)>,
}

/// How long the store goes by its last look at the live nodes' builds
/// before it stores another message with an expiry of its own. Why look
/// at all: in a rolling upgrade, a node of a build from before expiries
/// reads such an entry as one stamped 0, and its retention pass drops it
/// at once, acknowledged or not; so while one is live (it writes no
/// capabilities, [`crate::cluster::node::CAPS`]) such a message is
/// refused, not stored. A node of an older build that joins within this
/// long of a look, and whose retention pass runs before the message is
/// delivered or expires, can still drop one (docs/DEPLOY.md, "Expiry").
pub const EXPIRY_RECHECK: Duration = Duration::from_secs(1);

/// How often the store reads Redis's persistence settings again (`CONFIG
/// GET append*` on each master, on the store thread: well under a
/// millisecond), besides at every (re)connect. Receipts report what they
/// make of a message (`StoreCounters::durability`); read only at start,
/// they went on saying what Redis did then: nothing at all when Redis was
/// down at start, `fsync` after an operator turned the AOF off.
pub const DURABILITY_RECHECK: Duration = Duration::from_secs(5);

/// A link unused for this long is checked (one PING to each master)
/// before a request goes out on it, and opened again if that fails. Why:
/// a request sent on a connection whose Redis had restarted meanwhile
/// failed (the write went into a socket the peer had closed, the read got
/// the reset) although it never reached Redis, and such a failure cannot
/// be retried here (module doc: an append whose answer was lost may have
/// been stored); so the first device login after a Redis restart was
/// closed with 1013, the first SEND answered 115. A link in use is not
/// checked: a restart between two requests less than this apart still
/// fails the second. The check costs one round trip per master after
/// each quiet spell, none under steady traffic.
pub const IDLE_CHECK_AFTER: Duration = Duration::from_millis(250);

/// Where a retention pass run in slices goes on: a chunk of
/// [`EXPIRE_SLOTS_PER_ROUND`] slots, the slots of it that had due users
/// in the last round, and the rounds it took so far; and the users whose
/// script failed in this pass.
struct ExpireAt {
    chunk_start: usize,
    slots: Vec<u16>,
    rounds: u32,
    /// Tags of the users whose retention script failed (a key of the
    /// wrong type, say): left out of the rest of the pass, so that one
    /// user cannot stop it for every user after it, pass after pass.
    failed: std::collections::HashSet<String>,
    /// The first of those failures, reported when the pass ends.
    first_failure: Option<StoreError>,
}

impl ExpireAt {
    fn chunk(chunk_start: usize) -> Self {
        ExpireAt {
            chunk_start,
            slots: Self::slots_of(chunk_start),
            rounds: 0,
            failed: Default::default(),
            first_failure: None,
        }
    }

    /// The next chunk of the same pass.
    fn next_chunk(self, chunk_start: usize) -> Self {
        ExpireAt { chunk_start, slots: Self::slots_of(chunk_start), rounds: 0, ..self }
    }

    fn slots_of(chunk_start: usize) -> Vec<u16> {
        (chunk_start..(chunk_start + EXPIRE_SLOTS_PER_ROUND).min(SLOTS)).map(|s| s as u16).collect()
    }
}

fn unavailable(what: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {what}"))
}

fn protocol(what: impl std::fmt::Display) -> StoreError {
    unavailable(format!("unexpected answer: {what}"))
}

impl RedisStore {
    /// Connects to `addrs` (a single Redis, or a Redis Cluster through its
    /// seeds), loads the scripts on every master and sums the totals.
    /// `node_id` is this node's name in the presence hashes; every
    /// connect, read and write waits at most `command_timeout`.
    pub fn open(
        addrs: &RedisAddrs,
        node_id: &str,
        limits: StoreLimits,
        command_timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        Self::open_with_prefix(addrs, node_id, limits, command_timeout, DEFAULT_PREFIX)
    }

    /// [`open`](Self::open) with keys under `prefix` instead of `sb` (tests
    /// share one Redis this way). 1 to 32 bytes, no braces.
    #[doc(hidden)]
    pub fn open_with_prefix(
        addrs: &RedisAddrs,
        node_id: &str,
        limits: StoreLimits,
        command_timeout: Duration,
        prefix: &str,
    ) -> Result<RedisStore, StoreError> {
        if prefix.is_empty() || prefix.len() > 32 || prefix.contains(['{', '}']) {
            return Err(unavailable(format!("key prefix {prefix:?}: 1 to 32 bytes, no braces")));
        }
        if command_timeout.is_zero() {
            return Err(unavailable("the command timeout must not be zero"));
        }
        if addrs.urls().is_empty() {
            return Err(unavailable("no address to connect to"));
        }
        let mut store = RedisStore {
            addrs: addrs.clone(),
            node_id: node_id.to_string(),
            limits,
            timeout: command_timeout,
            prefix: prefix.to_string(),
            link: None,
            totals: Totals::default(),
            durability: None,
            durability_at: None,
            probed: false,
            expire_at: None,
            used_at: Instant::now(),
            node_ttl: Duration::from_millis(crate::config::ClusterConfig::default().node_ttl_ms),
            older: None,
            expired_unacknowledged: 0,
            silent: None,
        };
        // A node starts without Redis: it serves its own connections, and
        // stored messages are refused (ERROR 115) until Redis answers; the
        // first call that reaches it reads the durability and totals.
        match store.link() {
            Ok(_) => {
                if let Err(e) = store.refresh_totals() {
                    tracing::warn!("redis store: summing the totals at start failed (retried later): {e}");
                }
            }
            Err(e) => tracing::warn!(
                "redis store: Redis is unreachable at start ({e}); stored messages are refused until it answers"
            ),
        }
        Ok(store)
    }

    /// Sums the per-slot message and byte counters of the whole store
    /// (16384 `HMGET`s, one pipeline per master): what [`Store::held`] and
    /// the `max_bytes` budget start from.
    pub fn refresh_totals(&mut self) -> Result<(), StoreError> {
        let tags = &*SLOT_TAGS;
        let ops: Vec<Op> = (0..SLOTS)
            .map(|slot| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(format!("{}:ib:{{{}}}", self.prefix, tags[slot])).arg("m").arg("b");
                Op { slot: slot as u16, tag: None, cmd }
            })
            .collect();
        let (mut messages, mut bytes) = (0i64, 0i64);
        for r in self.run(ops) {
            let v = r?;
            let [m, b] = two(&v)?;
            messages += opt_i64(m)?;
            bytes += opt_i64(b)?;
        }
        self.totals = Totals {
            refreshed_at: Some(Instant::now()),
            messages: messages.max(0) as u64,
            bytes: bytes.max(0) as u64,
            delta_messages: 0,
            delta_bytes: 0,
        };
        Ok(())
    }

    fn maybe_refresh_totals(&mut self) {
        // Not while calls fail at once: the warning would repeat at every call.
        if self.still_silent().is_some() {
            return;
        }
        if self.totals.refreshed_at.is_none_or(|t| t.elapsed() >= TOTALS_REFRESH_INTERVAL) {
            if let Err(e) = self.refresh_totals() {
                tracing::warn!("summing the Redis store's totals failed (the last ones are kept): {e}");
            }
        }
    }

    /// How long after its last heartbeat a node counts as live, for the
    /// look at the live nodes' builds ([`EXPIRY_RECHECK`]):
    /// `cluster.node_ttl_ms`, set by [`super::open_store_with`].
    pub fn set_node_ttl(&mut self, ttl: Duration) {
        self.node_ttl = ttl;
    }

    /// Why a message with an expiry of its own cannot be stored now, if it
    /// cannot: a live node of a build that would misread it
    /// ([`EXPIRY_RECHECK`]). Reads Redis at most once per recheck.
    fn expiry_refused(&mut self) -> Option<StoreError> {
        let fresh = self.older.as_ref().is_some_and(|(at, _)| at.elapsed() < EXPIRY_RECHECK);
        if !fresh {
            let ms = (self.node_ttl.as_millis() as u64).to_string();
            let level = crate::cluster::node::CAPS.to_string();
            let keys = [NODES_KEY.to_string(), CAPS_KEY.to_string()];
            let op = self.script_op(&SCRIPTS.caps, NODES_KEY, &keys, &[ms.as_bytes(), level.as_bytes()]);
            let nodes = self.run_one(op).and_then(|v| {
                redis::from_redis_value::<Vec<String>>(v).map_err(|e| protocol(format!("live nodes: {e}")))
            });
            match nodes {
                Ok(nodes) => self.older = Some((Instant::now(), nodes)),
                Err(e) => return Some(e),
            }
        }
        let older = &self.older.as_ref().expect("just read").1;
        let first = older.first()?;
        Some(StoreError::Unavailable(format!(
            "a message with ttl_ms is not stored while node {first}{} is live: its build is from before message \
             expiry and would drop the message (docs/DEPLOY.md, \"Expiry\"); send without ttl_ms, or once every \
             node is upgraded",
            if older.len() > 1 { format!(" (and {} more)", older.len() - 1) } else { String::new() }
        )))
    }

    fn key(&self, tag: &str, suffix: &str) -> String {
        format!("{}:{{{tag}}}:{suffix}", self.prefix)
    }

    fn index_keys(&self, slot: u16) -> (String, String) {
        let t = SLOT_TAGS[slot as usize];
        (format!("{}:ix:{{{t}}}", self.prefix), format!("{}:ib:{{{t}}}", self.prefix))
    }

    fn script_op(&self, lua: &Lua, tag: &str, keys: &[String], args: &[&[u8]]) -> Op {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(lua.script.get_hash()).arg(keys.len());
        for k in keys {
            cmd.arg(k.as_str());
        }
        for a in args {
            cmd.arg(*a);
        }
        Op { slot: key_slot(tag.as_bytes()), tag: Some(tag.to_string()), cmd }
    }

    fn append_op(&self, m: &NewMessage, now_ms: u64, budget: u64) -> Op {
        let tag = user_tag(&m.to);
        let slot = key_slot(tag.as_bytes());
        let (ix, ib) = self.index_keys(slot);
        let keys = [self.key(&tag, "h"), self.key(&tag, "m"), self.key(&tag, "dd"), self.key(&tag, "dq"), ix, ib];
        let bytes = record_bytes(&m.to, &m.from, m.payload.len());
        let num = |n: u64| n.to_string().into_bytes();
        let args: [Vec<u8>; 13] = [
            num(now_ms),
            m.from.as_bytes().to_vec(),
            num(m.client_id),
            num(m.msg_id),
            num(m.ts_ms),
            encode_entry(m.msg_id, m.ts_ms, m.expires_ms, &m.from, &m.payload),
            num(bytes),
            num(self.limits.max_messages_per_inbox),
            num(budget),
            num(self.limits.dedup_window_ms),
            num(self.limits.ttl_ms),
            tag.clone().into_bytes(),
            num(m.expires_ms),
        ];
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        self.script_op(&SCRIPTS.append, &tag, &keys, &args)
    }

    fn device_op(&self, user: &str, device: &str, seq: u64, now_ms: u64, login: bool) -> Op {
        let tag = user_tag(user);
        let (ix, _) = self.index_keys(key_slot(tag.as_bytes()));
        let keys = [self.key(&tag, "h"), self.key(&tag, "dv"), self.key(&tag, "nodes"), ix, self.key(&tag, "df")];
        let args: [Vec<u8>; 8] = [
            device.as_bytes().to_vec(),
            seq.to_string().into_bytes(),
            now_ms.to_string().into_bytes(),
            self.node_id.as_bytes().to_vec(),
            MAX_DEVICES_PER_USER.to_string().into_bytes(),
            self.limits.ttl_ms.to_string().into_bytes(),
            tag.clone().into_bytes(),
            if login { b"1".to_vec() } else { b"0".to_vec() },
        ];
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        self.script_op(&SCRIPTS.device, &tag, &keys, &args)
    }

    /// Runs one op; see [`run`](Self::run).
    fn run_one(&mut self, op: Op) -> Result<Value, StoreError> {
        self.run(vec![op]).pop().expect("one answer per op")
    }

    /// How long after a call waited out the timeout the calls fail at once
    /// instead of trying Redis again: the timeout, at most a second. Why:
    /// the store thread serves a turn's logins, reads and positions one call
    /// after another, and each call on a silent Redis (paused, or a host
    /// that drops packets) connects again (the kernel accepts for a paused
    /// Redis) and waits out its own timeout; so every request queued behind
    /// that turn waited for many timeouts, not one (measured with Redis
    /// stopped: ERROR 115 after up to 20 s with the default 2 s). With the
    /// pause a request waits for at most the one call under way, and Redis
    /// back is used within this long.
    fn retry_after(&self) -> Duration {
        self.timeout.min(Duration::from_secs(1))
    }

    /// The error calls fail with at once, while the pause after a silent
    /// Redis lasts.
    fn still_silent(&self) -> Option<&StoreError> {
        self.silent.as_ref().filter(|(at, _)| at.elapsed() < self.retry_after()).map(|(_, e)| e)
    }

    /// Calls fail at once for [`Self::retry_after`] from now, with `e`.
    fn fell_silent(&mut self, e: &StoreError) {
        let StoreError::Unavailable(why) = e else { return };
        let again = self.retry_after().as_millis();
        let e = StoreError::Unavailable(format!("{why} (not tried again for {again} ms)"));
        self.silent = Some((Instant::now(), e));
    }

    /// The open link, connecting first if there is none.
    fn link(&mut self) -> Result<&mut Link, StoreError> {
        if let Some(e) = self.still_silent() {
            return Err(e.clone());
        }
        self.silent = None;
        if self.used_at.elapsed() >= IDLE_CHECK_AFTER {
            if let Some(link) = &mut self.link {
                if let Some((why, timed_out)) = link.check() {
                    self.link = None;
                    if timed_out {
                        let e = unavailable(why);
                        self.fell_silent(&e);
                        return Err(e);
                    }
                    tracing::info!("redis store: an idle connection is gone ({why}); connecting again");
                }
            }
        }
        self.used_at = Instant::now();
        if self.link.is_none() {
            let t = Instant::now();
            match self.connect() {
                Ok(link) => self.link = Some(link),
                Err(e) => {
                    // Refused at once (Redis restarting): the next call
                    // tries again. Waited out (no answer): it does not.
                    if t.elapsed() >= self.timeout {
                        self.fell_silent(&e);
                    }
                    return Err(e);
                }
            }
            self.durability_at = None;
        }
        // Read at every (re)connect, and again every DURABILITY_RECHECK:
        // an operator may turn the AOF on or off while the server runs
        // (CONFIG SET), or Redis may come back with other settings.
        if self.durability_at.is_none_or(|t| t.elapsed() >= DURABILITY_RECHECK) {
            let was = self.probed.then_some(self.durability);
            self.durability = self.probe_durability(was);
            self.durability_at = Some(Instant::now());
            self.probed = true;
        }
        match self.link.as_mut() {
            Some(link) => Ok(link),
            // The probe timed out and let the link go (`fell_silent`).
            None => {
                Err(self.silent.as_ref().map_or_else(|| unavailable("the connection was lost"), |(_, e)| e.clone()))
            }
        }
    }

    /// Runs `ops`: one pipeline per master, all sent before any answer is
    /// read; answers in the order of `ops`. After an I/O error or timeout
    /// the link is dropped (the next call reconnects); the ops whose answer
    /// was not read fail with `Unavailable` (they may or may not have run).
    fn run(&mut self, ops: Vec<Op>) -> Vec<Result<Value, StoreError>> {
        let n = ops.len();
        let timeout_ms = self.timeout.as_millis();
        let link = match self.link() {
            Ok(l) => l,
            Err(e) => return vec![Err(e); n],
        };
        let mut results: Vec<Option<Result<Value, StoreError>>> = (0..n).map(|_| None).collect();
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); link.nodes.len()];
        for (i, op) in ops.iter().enumerate() {
            groups[link.node_of(op.slot)].push(i);
        }
        let mut broken = false;
        let mut silent = None;
        let mut describe = |e: &redis::RedisError, node: &str| {
            if e.is_timeout() {
                let e = unavailable(format!("{node} did not answer within {timeout_ms} ms"));
                silent.get_or_insert_with(|| e.clone());
                e
            } else {
                unavailable(format!("{node}: {e}"))
            }
        };
        // Up to two rounds: the second retries what a NOSCRIPT refused.
        let mut pending = groups;
        for round in 0..2 {
            let mut sent = vec![false; pending.len()];
            for (node, idxs) in pending.iter().enumerate() {
                if idxs.is_empty() {
                    continue;
                }
                let mut buf = Vec::new();
                for &i in idxs {
                    ops[i].cmd.write_packed_command(&mut buf);
                }
                match link.nodes[node].send_packed_command(&buf) {
                    Ok(()) => sent[node] = true,
                    Err(e) => {
                        broken = true;
                        let err = describe(&e, &link.names[node]);
                        for &i in idxs {
                            results[i] = Some(Err(err.clone()));
                        }
                    }
                }
            }
            let mut retry: Vec<Vec<usize>> = vec![Vec::new(); pending.len()];
            for (node, idxs) in pending.iter().enumerate() {
                if !sent[node] {
                    continue;
                }
                let mut k = 0;
                while k < idxs.len() {
                    match link.nodes[node].recv_response() {
                        Ok(v) => results[idxs[k]] = Some(Ok(v)),
                        Err(e) => {
                            broken = true;
                            let err = describe(&e, &link.names[node]);
                            for &i in &idxs[k..] {
                                results[i] = Some(Err(err.clone()));
                            }
                            break;
                        }
                    }
                    k += 1;
                }
                // NOSCRIPT: not run. Retried in order after loading the
                // scripts, unless a later op of the same user ran.
                let noscript = |i: usize| matches!(&results[i], Some(Ok(Value::ServerError(e))) if e.kind() == Some(redis::ServerErrorKind::NoScript));
                let refused: Vec<usize> = idxs.iter().copied().filter(|&i| noscript(i)).collect();
                if refused.is_empty() || round == 1 {
                    continue;
                }
                let mut ran_after: std::collections::HashSet<&str> = std::collections::HashSet::new();
                let mut seen_refused: std::collections::HashSet<&str> = std::collections::HashSet::new();
                for &i in idxs {
                    let tag = ops[i].tag.as_deref().unwrap_or("");
                    if noscript(i) {
                        seen_refused.insert(tag);
                    } else if seen_refused.contains(tag) {
                        ran_after.insert(tag);
                    }
                }
                if let Err(e) = load_scripts(&mut link.nodes[node]) {
                    broken = true;
                    let err = describe(&e, &link.names[node]);
                    for &i in &refused {
                        results[i] = Some(Err(err.clone()));
                    }
                    continue;
                }
                for i in refused {
                    if ran_after.contains(ops[i].tag.as_deref().unwrap_or("")) {
                        results[i] = Some(Err(unavailable(
                            "the scripts were flushed from Redis mid-pipeline; not retried, to keep the order",
                        )));
                    } else {
                        retry[node].push(i);
                    }
                }
            }
            if retry.iter().all(Vec::is_empty) || broken {
                break;
            }
            pending = retry;
        }
        let mut moved = false;
        let out = results
            .into_iter()
            .map(|r| match r.expect("every op answered") {
                Ok(Value::ServerError(e)) => {
                    if matches!(e.kind(), Some(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask)) {
                        moved = true;
                    }
                    Err(unavailable(format!("{} {}", e.code(), e.details().unwrap_or(""))))
                }
                other => other,
            })
            .collect();
        if broken || moved {
            self.link = None;
        }
        if let Some(e) = silent {
            self.fell_silent(&e);
        }
        self.used_at = Instant::now();
        out
    }

    /// Opens the connections: the single Redis, or every master of the
    /// cluster (from `CLUSTER SLOTS` asked of the first seed that answers);
    /// loads the scripts on each.
    fn connect(&self) -> Result<Link, StoreError> {
        match &self.addrs {
            RedisAddrs::Single(url) => {
                // Its password never goes into a log or an error.
                let name = crate::config::redacted_url(url);
                let info = url.as_str().into_connection_info().map_err(|e| unavailable(format!("{name}: {e}")))?;
                let mut con = self.open_conn(info, &name)?;
                load_scripts(&mut con).map_err(|e| unavailable(format!("{name}: loading the scripts: {e}")))?;
                Ok(Link { nodes: vec![con], names: vec![name], slots: None })
            }
            RedisAddrs::Cluster(seeds) => {
                let mut errors = Vec::new();
                for seed in seeds {
                    match self.connect_cluster(seed) {
                        Ok(link) => return Ok(link),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                Err(unavailable(format!("no cluster seed usable: {}", errors.join("; "))))
            }
        }
    }

    fn connect_cluster(&self, url: &str) -> Result<Link, StoreError> {
        let seed = crate::config::redacted_url(url);
        let info = url.into_connection_info().map_err(|e| unavailable(format!("{seed}: {e}")))?;
        let seed_host = match info.addr() {
            ConnectionAddr::Tcp(host, _) => host.clone(),
            other => return Err(unavailable(format!("{seed}: a cluster seed must be redis://host:port, not {other}"))),
        };
        let mut con = self.open_conn(info.clone(), &seed)?;
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut con)
            .map_err(|e| unavailable(format!("{seed}: CLUSTER SLOTS: {e}")))?;
        let Value::Array(ranges) = slots else { return Err(protocol(format!("CLUSTER SLOTS: {slots:?}"))) };
        let mut map = vec![u16::MAX; SLOTS].into_boxed_slice();
        let mut masters: Vec<(String, u16)> = Vec::new();
        for r in &ranges {
            let Value::Array(r) = r else { return Err(protocol("CLUSTER SLOTS range")) };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (r.first(), r.get(1), r.get(2))
            else {
                return Err(protocol("CLUSTER SLOTS range"));
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) if !h.is_empty() && h != b"?" => String::from_utf8_lossy(h).into_owned(),
                _ => seed_host.clone(),
            };
            let Some(Value::Int(port)) = master.get(1) else { return Err(protocol("CLUSTER SLOTS port")) };
            let node = (host, *port as u16);
            let idx = masters.iter().position(|m| *m == node).unwrap_or_else(|| {
                masters.push(node);
                masters.len() - 1
            });
            for s in (*start as usize)..=(*end as usize).min(SLOTS - 1) {
                map[s] = idx as u16;
            }
        }
        if let Some(s) = map.iter().position(|&i| i == u16::MAX) {
            return Err(unavailable(format!("the cluster serves no master for slot {s} (cluster_state not ok?)")));
        }
        let mut nodes = Vec::with_capacity(masters.len());
        let mut names = Vec::with_capacity(masters.len());
        for (host, port) in masters {
            let name = format!("{host}:{port}");
            let mut c = self.open_conn(info.clone().set_addr(ConnectionAddr::Tcp(host, port)), &name)?;
            load_scripts(&mut c).map_err(|e| unavailable(format!("{name}: loading the scripts: {e}")))?;
            nodes.push(c);
            names.push(name);
        }
        Ok(Link { nodes, names, slots: Some(map) })
    }

    fn open_conn(&self, info: ConnectionInfo, name: &str) -> Result<redis::Connection, StoreError> {
        // No CLIENT SETINFO (the client library's name and version, for
        // CLIENT LIST): its two answers are read one after the other, each
        // with what is left of the timeout, so a Redis that accepts but does
        // not answer (paused) held a connect for twice the timeout.
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        let info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| unavailable(format!("{name}: {e}")))?;
        let con = client.get_connection_with_timeout(self.timeout).map_err(|e| {
            if e.is_timeout() {
                unavailable(format!("{name}: no connection within {} ms", self.timeout.as_millis()))
            } else {
                unavailable(format!("{name}: {e}"))
            }
        })?;
        con.set_read_timeout(Some(self.timeout)).map_err(|e| unavailable(format!("{name}: {e}")))?;
        con.set_write_timeout(Some(self.timeout)).map_err(|e| unavailable(format!("{name}: {e}")))?;
        Ok(con)
    }

    /// What the masters' persistence settings make of an acknowledged
    /// message (the weakest master counts). `was`: the last answer, and
    /// whether there was one: the warnings are logged at the first read
    /// and when the answer changes, not every DURABILITY_RECHECK.
    fn probe_durability(&mut self, was: Option<Option<Durability>>) -> Option<Durability> {
        let Some(link) = self.link.as_mut() else { return was.flatten() };
        let mut weakest = Some(Durability::Fsync);
        let mut warnings = Vec::new();
        for (con, name) in link.nodes.iter_mut().zip(&link.names) {
            let got: redis::RedisResult<HashMap<String, String>> =
                redis::cmd("CONFIG").arg("GET").arg("append*").query(con);
            if matches!(&got, Err(e) if e.is_timeout()) {
                // Not an answer about the settings: Redis is silent. The
                // connections go (their late answer must not meet the next
                // call's read), and the last answer stands.
                let e = unavailable(format!("{name} did not answer within {} ms", self.timeout.as_millis()));
                self.link = None;
                self.fell_silent(&e);
                return was.flatten();
            }
            let node = match got {
                Ok(cfg) => {
                    match (cfg.get("appendonly").map(String::as_str), cfg.get("appendfsync").map(String::as_str)) {
                        (Some("yes"), Some("always")) => Some(Durability::Fsync),
                        (Some("yes"), _) => Some(Durability::Os),
                        _ => {
                            warnings.push(format!(
                                "{name}: appendonly is off: a restart of this Redis loses the inboxes it holds \
                                 (docs/SCALING.md)"
                            ));
                            None
                        }
                    }
                }
                Err(e) => {
                    warnings.push(format!("{name}: CONFIG GET refused ({e}): receipts report no durability"));
                    None
                }
            };
            weakest = match (weakest, node) {
                (Some(Durability::Fsync), n) => n,
                (Some(Durability::Os), Some(_)) => Some(Durability::Os),
                _ => None,
            };
        }
        if was != Some(weakest) {
            for w in &warnings {
                tracing::warn!("{w}");
            }
            if was.is_some() {
                tracing::info!("redis store: Redis's persistence settings changed; receipts now report {weakest:?}");
            }
        }
        weakest
    }

    fn parse_append(v: Value) -> Result<Appended, StoreError> {
        let Value::Array(a) = v else { return Err(protocol(format!("append: {v:?}"))) };
        match a.first() {
            Some(Value::Int(0)) => Ok(Appended::New { seq: int(a.get(1))? }),
            Some(Value::Int(1)) => Ok(Appended::Duplicate { seq: int(a.get(1))?, msg_id: int(a.get(2))? }),
            Some(Value::Int(2)) => Err(StoreError::InboxFull { limit: 0 }),
            Some(Value::Int(3)) => Err(StoreError::StoreFull { limit_bytes: 0 }),
            _ => Err(protocol(format!("append: {a:?}"))),
        }
    }

    fn finish_append(&mut self, r: Result<Value, StoreError>, bytes: u64) -> Result<Appended, StoreError> {
        let r = r.and_then(Self::parse_append).map_err(|e| match e {
            StoreError::InboxFull { .. } => StoreError::InboxFull { limit: self.limits.max_messages_per_inbox },
            StoreError::StoreFull { .. } => StoreError::StoreFull { limit_bytes: self.limits.max_bytes },
            e => e,
        });
        if let Ok(Appended::New { .. }) = r {
            self.totals.delta_messages += 1;
            self.totals.delta_bytes += bytes as i64;
        }
        r
    }

    /// The users of `slots` whose index score is due by `now_ms`, at most
    /// [`EXPIRE_USERS_PER_SLOT`] per slot, in slot order: one pipeline.
    fn due_users(&mut self, slots: &[u16], now_ms: u64) -> Result<Vec<(u16, String)>, StoreError> {
        let ops: Vec<Op> = slots
            .iter()
            .map(|&slot| {
                let mut cmd = redis::cmd("ZRANGEBYSCORE");
                cmd.arg(self.index_keys(slot).0).arg("-inf").arg(now_ms).arg("LIMIT").arg(0).arg(EXPIRE_USERS_PER_SLOT);
                Op { slot, tag: None, cmd }
            })
            .collect();
        let mut due = Vec::new();
        for (r, &slot) in self.run(ops).into_iter().zip(slots) {
            let Value::Array(tags) = r? else { return Err(protocol("index")) };
            for t in tags {
                due.push((slot, String::from_utf8_lossy(bytes_of(&t)?).into_owned()));
            }
        }
        Ok(due)
    }

    /// The expire script for `tag` in `slot`.
    fn expire_op(&self, slot: u16, tag: &str, now_ms: u64) -> Result<Op, StoreError> {
        let user = tag_user(tag).ok_or_else(|| protocol(format!("index member {tag:?} is not a user tag")))?;
        let (ix, ib) = self.index_keys(slot);
        let keys = [
            self.key(tag, "h"),
            self.key(tag, "m"),
            self.key(tag, "dv"),
            self.key(tag, "dd"),
            self.key(tag, "dq"),
            ix,
            ib,
            self.key(tag, "df"),
        ];
        let args = [
            now_ms.to_string(),
            self.limits.ttl_ms.to_string(),
            self.limits.dedup_window_ms.to_string(),
            user.len().to_string(),
            tag.to_string(),
            EXPIRE_MAX_DROP_PER_CALL.to_string(),
        ];
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        Ok(self.script_op(&SCRIPTS.expire, tag, &keys, &args))
    }
}

/// Loads every script into the Redis of `con` (SCRIPT LOAD is idempotent).
fn load_scripts(con: &mut redis::Connection) -> redis::RedisResult<()> {
    for lua in SCRIPTS.all() {
        let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(lua.code).query(con)?;
        debug_assert_eq!(sha, lua.script.get_hash());
    }
    Ok(())
}

fn int(v: Option<&Value>) -> Result<u64, StoreError> {
    match v {
        Some(Value::Int(i)) if *i >= 0 => Ok(*i as u64),
        Some(Value::BulkString(b)) => {
            std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).ok_or_else(|| protocol("a number"))
        }
        other => Err(protocol(format!("a number, not {other:?}"))),
    }
}

fn opt_i64(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Nil => Ok(0),
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => {
            std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).ok_or_else(|| protocol("a counter"))
        }
        other => Err(protocol(format!("a counter, not {other:?}"))),
    }
}

fn two(v: &Value) -> Result<[&Value; 2], StoreError> {
    match v {
        Value::Array(a) if a.len() == 2 => Ok([&a[0], &a[1]]),
        other => Err(protocol(format!("two values, not {other:?}"))),
    }
}

fn bytes_of(v: &Value) -> Result<&[u8], StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        other => Err(protocol(format!("a string, not {other:?}"))),
    }
}

/// Appends `v` as an LEB128 varint: 7 bits a byte, low bits first, the
/// high bit set on every byte but the last.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at the start of `b`: the value and the bytes it took.
fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= ((byte & 0x7f) as u64).checked_shl(7 * i as u32)?;
        if byte < 0x80 {
            return Some((v, i + 1));
        }
    }
    None
}

/// One element of a user's `:m` list: `varint(ts_ms) varint(msg_id)
/// u8(len(from)) from payload`. The seq is not stored (it is the element's
/// position + `first`); `ts_ms` comes first because the retention script
/// reads it (and skips the rest to count the bytes: `26 + len(user) +
/// len(entry) − (position of the length byte)`, which is
/// [`record_bytes`]). Overhead beside the sender and payload: 1 + the
/// varints, 6 bytes for a timestamp of this century and 7 or 8 for a
/// msg_id a worker minted (2^48 to 2^56): a 100-byte payload from `bob` is
/// 117 or 118 bytes (checked by a test). `from` is at most
/// [`super::MAX_USER_BYTES`] (255, checked before), so its length fits in
/// the byte.
///
/// A message with an expiry (`expires_ms` ≠ 0) has a zero byte and
/// `varint(expires_ms)` in front: the varint of a timestamp never starts
/// with a zero byte (only 0 is written so, and a `ts_ms` of 0 gets the
/// prefix too, with an expiry of 0), so entries without one read as
/// before. (A build from before expiries fails to read such an entry:
/// docs/DEPLOY.md, "Expiry".)
pub fn encode_entry(msg_id: u64, ts_ms: u64, expires_ms: u64, from: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + from.len() + payload.len());
    if expires_ms != 0 || ts_ms == 0 {
        out.push(0);
        put_varint(&mut out, expires_ms);
    }
    put_varint(&mut out, ts_ms);
    put_varint(&mut out, msg_id);
    debug_assert!(from.len() <= u8::MAX as usize);
    out.push(from.len() as u8);
    out.extend_from_slice(from.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// The message in an [`encode_entry`] element, stored under `seq`.
pub(super) fn decode_entry(seq: u64, e: &[u8]) -> Result<StoredMessage, StoreError> {
    let bad = || protocol(format!("inbox entry of seq {seq} is not an encoded message"));
    let (expires_ms, e) = match e.split_first() {
        Some((0, rest)) => {
            let (x, n) = get_varint(rest).ok_or_else(bad)?;
            (x, &rest[n..])
        }
        _ => (0, e),
    };
    let (ts_ms, a) = get_varint(e).ok_or_else(bad)?;
    let (msg_id, b) = get_varint(&e[a..]).ok_or_else(bad)?;
    let rest = &e[a + b..];
    let (&from_len, rest) = rest.split_first().ok_or_else(bad)?;
    let from = rest.get(..from_len as usize).ok_or_else(bad)?;
    let payload = &rest[from_len as usize..];
    Ok(StoredMessage {
        seq,
        msg_id,
        ts_ms,
        from: String::from_utf8_lossy(from).into(),
        payload: bytes::Bytes::copy_from_slice(payload),
        expires_ms,
    })
}

impl Store for RedisStore {
    fn append(&mut self, m: &NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        check_ids(&m.to, &m.from, "")?;
        if m.expires_ms != 0 {
            if let Some(e) = self.expiry_refused() {
                return Err(e);
            }
        }
        self.maybe_refresh_totals();
        let budget = self.limits.max_bytes.saturating_sub(self.totals.bytes());
        let bytes = record_bytes(&m.to, &m.from, m.payload.len());
        let op = self.append_op(m, now_ms, budget);
        let r = self.run_one(op);
        self.finish_append(r, bytes)
    }

    /// One pipeline for the whole run (see the module doc). Near
    /// `max_bytes` (the run would not fit in the budget if every append
    /// were stored) it appends one by one, so that a duplicate or a refusal
    /// early in the run leaves its room to the later ones exactly as
    /// `append` would.
    fn append_batch(&mut self, msgs: &[NewMessage], now_ms: u64) -> Vec<Result<Appended, StoreError>> {
        self.maybe_refresh_totals();
        let sizes: Vec<u64> = msgs.iter().map(|m| record_bytes(&m.to, &m.from, m.payload.len())).collect();
        let total: u64 = sizes.iter().sum();
        if self.totals.bytes().saturating_add(total) > self.limits.max_bytes {
            return msgs.iter().map(|m| self.append(m, now_ms)).collect();
        }
        let mut out: Vec<Option<Result<Appended, StoreError>>> = Vec::with_capacity(msgs.len());
        let mut ops = Vec::with_capacity(msgs.len());
        let mut at = Vec::with_capacity(msgs.len());
        let mut used = self.totals.bytes();
        let expiry_refused = if msgs.iter().any(|m| m.expires_ms != 0) { self.expiry_refused() } else { None };
        for (i, m) in msgs.iter().enumerate() {
            match (check_ids(&m.to, &m.from, ""), &expiry_refused) {
                (Err(e), _) => out.push(Some(Err(e))),
                (Ok(()), Some(refused)) if m.expires_ms != 0 => out.push(Some(Err(refused.clone()))),
                (Ok(()), _) => {
                    out.push(None);
                    ops.push(self.append_op(m, now_ms, self.limits.max_bytes.saturating_sub(used)));
                    at.push(i);
                    used += sizes[i];
                }
            }
        }
        for (r, i) in self.run(ops).into_iter().zip(at) {
            out[i] = Some(self.finish_append(r, sizes[i]));
        }
        out.into_iter().map(|r| r.expect("every append answered")).collect()
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        // Redis made it as durable as its AOF settings say before it
        // answered (module doc): nothing to wait for here.
        Ok(())
    }

    fn read(&mut self, user: &str, after_seq: u64, limit: usize) -> Result<Page, StoreError> {
        check_ids(user, "", "")?;
        let tag = user_tag(user);
        let keys = [self.key(&tag, "h"), self.key(&tag, "m")];
        let after = after_seq.min(u64::MAX - 1).to_string();
        let limit = limit.min(MAX_READ_LIMIT).to_string();
        let op = self.script_op(&SCRIPTS.read, &tag, &keys, &[after.as_bytes(), limit.as_bytes()]);
        let v = self.run_one(op)?;
        let Value::Array(a) = v else { return Err(protocol(format!("read: {v:?}"))) };
        let (head_seq, first) = (int(a.first())?, int(a.get(1))?);
        let Some(Value::Array(entries)) = a.get(2) else { return Err(protocol("read entries")) };
        let messages = entries
            .iter()
            .enumerate()
            .map(|(i, e)| decode_entry(first + i as u64, bytes_of(e)?))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page { messages, head_seq })
    }

    fn device_login(
        &mut self,
        user: &str,
        device: &str,
        client_seq: u64,
        now_ms: u64,
    ) -> Result<(u64, u64), StoreError> {
        check_ids(user, "", device)?;
        let op = self.device_op(user, device, client_seq, now_ms, true);
        let v = self.run_one(op)?;
        let [position, head] = two(&v)?;
        Ok((int(Some(position))?, int(Some(head))?))
    }

    fn set_position(&mut self, user: &str, device: &str, seq: u64, now_ms: u64) -> Result<(), StoreError> {
        check_ids(user, "", device)?;
        let op = self.device_op(user, device, seq, now_ms, false);
        self.run_one(op).map(|_| ())
    }

    /// One pipeline per master, as [`append_batch`](Store::append_batch):
    /// the positions a store turn hands over used to be a round trip each.
    /// A node's ops run in order, so a device's later position lands later.
    fn set_positions(&mut self, positions: &[(&str, &str, u64)], now_ms: u64) -> Vec<Result<(), StoreError>> {
        let mut out = Vec::with_capacity(positions.len());
        let (mut ops, mut at) = (Vec::with_capacity(positions.len()), Vec::with_capacity(positions.len()));
        for (i, &(user, device, seq)) in positions.iter().enumerate() {
            out.push(check_ids(user, "", device));
            if out[i].is_ok() {
                ops.push(self.device_op(user, device, seq, now_ms, false));
                at.push(i);
            }
        }
        for (r, i) in self.run(ops).into_iter().zip(at) {
            out[i] = r.map(|_| ());
        }
        out
    }

    fn forget_device(&mut self, user: &str, device: &str, now_ms: u64) -> Result<bool, StoreError> {
        check_ids(user, "", device)?;
        let tag = user_tag(user);
        let (ix, _) = self.index_keys(key_slot(tag.as_bytes()));
        let keys = [self.key(&tag, "dv"), ix, self.key(&tag, "df")];
        let (now, ttl) = (now_ms.to_string(), self.limits.ttl_ms.to_string());
        let args = [device.as_bytes(), tag.as_bytes(), now.as_bytes(), ttl.as_bytes()];
        let op = self.script_op(&SCRIPTS.forget, &tag, &keys, &args);
        Ok(int(Some(&self.run_one(op)?))? == 1)
    }

    fn inbox_state(&mut self, user: &str) -> Result<InboxState, StoreError> {
        check_ids(user, "", "")?;
        let tag = user_tag(user);
        let keys = [self.key(&tag, "h"), self.key(&tag, "dv")];
        let op = self.script_op(&SCRIPTS.state, &tag, &keys, &[]);
        let v = self.run_one(op)?;
        let [h, devs] = two(&v)?;
        let Value::Array(h) = h else { return Err(protocol("state")) };
        let field = |i: usize| h.get(i).map_or(Ok(0), opt_i64).map(|v| v.max(0) as u64);
        let (head_seq, messages, bytes, first) = (field(0)?, field(1)?, field(2)?, field(3)?);
        let first_seq = if messages == 0 { head_seq + 1 } else { first };
        let Value::Array(devs) = devs else { return Err(protocol("devices")) };
        let mut devices = Vec::with_capacity(devs.len() / 2);
        for pair in devs.chunks(2) {
            let [name, v] = pair else { return Err(protocol("devices")) };
            let name = String::from_utf8_lossy(bytes_of(name)?).into_owned();
            let v = std::str::from_utf8(bytes_of(v)?).map_err(|_| protocol("a device"))?;
            let nums: Vec<u64> = v.split(' ').filter_map(|x| x.parse().ok()).collect();
            let [position, last_seen_ms, order] = nums[..] else { return Err(protocol(format!("device {v:?}"))) };
            devices.push((order, DeviceState { device: name, position, last_seen_ms }));
        }
        devices.sort_by_key(|(order, _)| *order);
        Ok(InboxState { head_seq, first_seq, messages, bytes, devices: devices.into_iter().map(|(_, d)| d).collect() })
    }

    /// Visits the users whose index score is due (see the module doc),
    /// runs the retention script for each, in rounds of 512 slots, then
    /// sums the totals again.
    fn expire(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        // A whole pass from the first slot, whatever a sliced one had done.
        self.expire_at = None;
        let mut dropped = 0;
        loop {
            let (n, over) = self.expire_slice(now_ms, usize::MAX)?;
            dropped += n;
            if over {
                return Ok(dropped);
            }
        }
    }

    /// One round of the pass, whatever the budget: the due users of the
    /// chunk's slots that had some in the last round (one pipeline), and
    /// a retention script for each (one more). A round's work is bounded
    /// by the index reads (`EXPIRE_USERS_PER_SLOT`) and each script
    /// ([`EXPIRE_MAX_DROP_PER_CALL`]); the store thread waits only for the
    /// two round trips, and serves what was queued before the next.
    fn expire_slice(&mut self, now_ms: u64, _budget: usize) -> Result<(u64, bool), StoreError> {
        // Taken: a round that fails leaves no pass under way.
        let mut at = self.expire_at.take().unwrap_or_else(|| ExpireAt::chunk(0));
        let mut dropped = 0u64;
        at.rounds += 1;
        let mut due = if at.rounds > EXPIRE_MAX_ROUNDS {
            let (start, max) = (at.chunk_start, EXPIRE_MAX_ROUNDS);
            tracing::warn!("retention: slots {start}.. still have due users after {max} rounds; the next pass goes on");
            Vec::new()
        } else {
            self.due_users(&at.slots, now_ms)?
        };
        // (A slot with more failed users than one index read returns,
        // EXPIRE_USERS_PER_SLOT, is left for the next pass.)
        due.retain(|(_, tag)| !at.failed.contains(tag));
        if due.is_empty() {
            let next = at.chunk_start + EXPIRE_SLOTS_PER_ROUND;
            if next < SLOTS {
                self.expire_at = Some(at.next_chunk(next));
                return Ok((0, false));
            }
            if let Err(e) = self.refresh_totals() {
                tracing::warn!("summing the Redis store's totals after retention failed: {e}");
            }
            return match at.first_failure {
                None => Ok((0, true)),
                Some(StoreError::Unavailable(e)) => Err(StoreError::Unavailable(format!(
                    "retention left out {} user(s) whose script failed; the first: {e}",
                    at.failed.len()
                ))),
                Some(e) => Err(e),
            };
        }
        // Each script leaves its user due only if it hit
        // EXPIRE_MAX_DROP_PER_CALL: the next round looks at those slots.
        at.slots = due.iter().map(|(s, _)| *s).collect();
        at.slots.dedup();
        let ops = due.iter().map(|(slot, tag)| self.expire_op(*slot, tag, now_ms)).collect::<Result<_, _>>()?;
        let results = self.run(ops);
        if self.link.is_none() {
            // The link broke (or a slot moved): Redis is the trouble, not
            // one user's keys. The pass stops, as on any other failure.
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                return Err(e.clone());
            }
        }
        for (r, (_, tag)) in results.into_iter().zip(&due) {
            let counted = r.and_then(|v| {
                let Value::Array(a) = v else { return Err(protocol("expire")) };
                Ok((int(a.first())?, int(a.get(1))?, int(a.get(3))?))
            });
            match counted {
                Ok((n, bytes, unacknowledged)) => {
                    dropped += n;
                    self.expired_unacknowledged += unacknowledged;
                    self.totals.delta_messages -= n as i64;
                    self.totals.delta_bytes -= bytes as i64;
                }
                Err(e) => {
                    tracing::warn!(user_tag = %tag, "retention: this user's script failed, left for the next pass: {e}");
                    at.failed.insert(tag.clone());
                    at.first_failure.get_or_insert(e);
                }
            }
        }
        self.expire_at = Some(at);
        Ok((dropped, false))
    }

    /// The whole shared store's messages and bytes as this process knows
    /// them: the per-slot counters summed at the last refresh (at most
    /// [`TOTALS_REFRESH_INTERVAL`] old, and after every retention pass),
    /// plus what this process appended and dropped since.
    fn expired_unacknowledged(&self) -> u64 {
        self.expired_unacknowledged
    }

    fn held(&self) -> (u64, u64) {
        (self.totals.messages(), self.totals.bytes())
    }

    /// What survives a message Redis acknowledged, as the masters were
    /// configured at open (`CONFIG GET appendonly appendfsync`; the weakest
    /// master counts): `Fsync` with `appendfsync always`, `Os` with an AOF
    /// fsynced less often (a crash of the Redis process loses nothing, power
    /// loss the last second or so), `None` without an AOF or when `CONFIG`
    /// is refused (a managed Redis: see its documentation).
    fn durability(&self) -> Option<Durability> {
        self.durability
    }
}
