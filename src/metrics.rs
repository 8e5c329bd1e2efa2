//! `GET /metrics`: the server's counters in the Prometheus text exposition
//! format (version 0.0.4), encoded by the `prometheus-client` crate.
//!
//! Owns: the metric names, their help text and labels (listed with their
//! meaning in `docs/METRICS.md`), and the one [`Collector`] that reads the
//! live counters at each scrape and hands them to the encoder.
//! Must not: walk connections, users or rooms (a scrape costs the same at
//! ten connections as at a million: a few hundred atomic loads per worker,
//! the mailboxes' lengths, the store's and the cluster's counters and two
//! reads of `/proc`), take a lock a worker takes, or add a per-user label.
//! The counters themselves are elsewhere (`stats.rs`, the workers', the
//! store thread's, `cluster::ClusterCounters`); this module only reads
//! them. The `switchboard_cluster_*` families are there only when the node
//! is in a cluster (`cluster.redis` set), as the `switchboard_store_*`
//! ones only with a store: an absent family says "not configured", a zero
//! would read as "configured and idle".

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::cluster::ClusterCounters;
use crate::server::Handle;
use crate::stats::{
    Histogram, WorkerCounters, DELIVERY_KINDS, LATENCY_BOUNDS_NS, LOGIN_FAILURE_REASONS, MESSAGE_IN_KINDS,
    PROTOCOL_ERROR_CODES,
};

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The metrics of a running server, ready to encode at each scrape.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Metrics for the server behind `handle`.
    pub fn new(handle: Handle) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Live(handle)));
        Metrics { registry }
    }

    /// The text exposition of every metric, read now.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(32 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// [`Metrics::render`] for a server, without keeping a [`Metrics`].
pub fn render(h: &Handle) -> String {
    Metrics::new(h.clone()).render()
}

/// The collector: reads the live counters when the registry is encoded.
struct Live(Handle);

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("switchboard::metrics::Live")
    }
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// One metric family: a descriptor, then one sample per label set.
struct Family<'a, 'e> {
    enc: &'a mut DescriptorEncoder<'e>,
}

impl<'e> Family<'_, 'e> {
    /// A counter with one sample per worker (`worker="i"`).
    fn per_worker_counter(
        &mut self,
        name: &str,
        help: &str,
        workers: &[&WorkerCounters],
        value: impl Fn(&WorkerCounters) -> u64,
    ) -> fmt::Result {
        let mut m = self.enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (i, c) in workers.iter().enumerate() {
            let labels = [("worker", i.to_string())];
            ConstCounter::new(value(c)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A gauge with one sample per worker.
    fn per_worker_gauge(
        &mut self,
        name: &str,
        help: &str,
        workers: &[&WorkerCounters],
        value: impl Fn(usize, &WorkerCounters) -> i64,
    ) -> fmt::Result {
        let mut m = self.enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (i, c) in workers.iter().enumerate() {
            let labels = [("worker", i.to_string())];
            ConstGauge::new(value(i, c)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A counter per worker and per value of one more label (`names`, a
    /// fixed set), read from an array of counters per worker.
    fn per_worker_labelled(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        names: &[&str],
        workers: &[&WorkerCounters],
        values: impl Fn(&WorkerCounters) -> &[AtomicU64],
    ) -> fmt::Result {
        let mut m = self.enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (i, c) in workers.iter().enumerate() {
            for (n, v) in names.iter().zip(values(c)) {
                let labels = [("worker", i.to_string()), (label, n.to_string())];
                ConstCounter::new(get(v)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        let m = self.enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v).encode(m)
    }

    fn gauge(&mut self, name: &str, help: &str, v: i64) -> fmt::Result {
        let m = self.enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(m)
    }

    /// A histogram in seconds, summed over `parts`.
    fn histogram<'h>(&mut self, name: &str, help: &str, parts: impl Iterator<Item = &'h Histogram>) -> fmt::Result {
        let (mut counts, mut sum_ns) = ([0u64; LATENCY_BOUNDS_NS.len()], 0u64);
        for h in parts {
            h.add_to(&mut counts, &mut sum_ns);
        }
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_NS
            .iter()
            .zip(counts)
            .map(|(&b, n)| (if b == u64::MAX { f64::INFINITY } else { b as f64 / 1e9 }, n))
            .collect();
        let count = counts.iter().sum();
        let mut m = self.enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
        m.encode_histogram::<NoLabelSet>(sum_ns as f64 / 1e9, count, &buckets, None)
    }
}

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let shared = &self.0.shared;
        let workers: Vec<&WorkerCounters> = shared.counters.iter().map(|c| &**c).collect();
        // Threads that wrote to connections they do not own (handles, and
        // workers relaying to another worker's connections): summed into
        // one block, which the totals below add to the workers'.
        let foreign = WorkerCounters::default();
        shared.foreign_counters.for_each(|c| sum_into(&foreign, c));
        let all: Vec<&WorkerCounters> = workers.iter().copied().chain(std::iter::once(&foreign)).collect();
        let total = |f: &dyn Fn(&WorkerCounters) -> u64| all.iter().map(|c| f(c)).sum::<u64>();
        let mut f = Family { enc: &mut enc };

        // ---- connections ----
        f.per_worker_gauge(
            "switchboard_connections",
            "Open client connections (logged in or not).",
            &workers,
            |_, c| get(&c.connections) as i64,
        )?;
        {
            let mut m = f.enc.encode_descriptor(
                "switchboard_connections_by_transport",
                "Open client connections by transport: raw TCP (protocol v1 frames) or WebSocket (after the 101); \
                 a connection still in its HTTP handshake or not yet sniffed is in neither.",
                None,
                MetricType::Gauge,
            )?;
            for (i, c) in workers.iter().enumerate() {
                for (t, v) in [("raw", &c.detail.raw_connections), ("websocket", &c.detail.ws_connections)] {
                    let labels = [("worker", i.to_string()), ("transport", t.to_string())];
                    ConstGauge::new(get(v) as i64).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        f.per_worker_gauge(
            "switchboard_logged_in_connections",
            "Open connections that are logged in.",
            &workers,
            |_, c| get(&c.logged_in) as i64,
        )?;
        f.per_worker_counter("switchboard_connections_accepted", "Connections accepted.", &workers, |c| {
            get(&c.accepted)
        })?;
        f.per_worker_counter("switchboard_connections_closed", "Connections released (closed).", &workers, |c| {
            get(&c.closed)
        })?;
        f.per_worker_counter(
            "switchboard_connections_handed_off",
            "Connections a worker whose share of server.max_connections was full handed to the worker with the \
             most free slots.",
            &workers,
            |c| get(&c.handed_off),
        )?;
        f.per_worker_counter(
            "switchboard_connections_refused_full",
            "Connections refused at accept because every worker's table was full (CLOSE 4005).",
            &workers,
            |c| get(&c.refused_full),
        )?;

        // ---- logins ----
        f.per_worker_counter("switchboard_logins", "Successful logins.", &workers, |c| get(&c.logins))?;
        f.per_worker_labelled(
            "switchboard_login_failures",
            "Logins that failed, by reason: the LOGIN_ERROR code's name, or timeout (no LOGIN within the login \
             deadline).",
            "reason",
            &LOGIN_FAILURE_REASONS,
            &workers,
            |c| &c.detail.login_failures,
        )?;

        // ---- messages and bytes ----
        f.per_worker_labelled(
            "switchboard_messages_in",
            "Frames received from clients, by kind (subscribe: SUBSCRIBE and UNSUBSCRIBE; ping: PING and PONG; \
             send: SEND and SEND_EX).",
            "kind",
            &MESSAGE_IN_KINDS,
            &workers,
            |c| &c.detail.messages_in,
        )?;
        {
            let mut m = f.enc.encode_descriptor(
                "switchboard_deliveries",
                "Messages handed to a connection to write (written at once or queued), by kind: push (a handle's \
                 push or a client's SEND), room (ROOM_MSG), broadcast, inbox (a stored message's INBOX frame, \
                 retransmits included). worker=\"other\": written by threads that are not the connection's worker.",
                None,
                MetricType::Counter,
            )?;
            for (i, c) in all.iter().enumerate() {
                let w = if i < workers.len() { i.to_string() } else { "other".to_string() };
                for (k, v) in DELIVERY_KINDS.iter().zip(&c.detail.deliveries) {
                    let labels = [("worker", w.clone()), ("kind", k.to_string())];
                    ConstCounter::new(get(v)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        f.counter(
            "switchboard_frames_out",
            "Frames queued or written to connections (deliveries, replies, PINGs); not the frame a connection is closed with.",
            total(&|c| get(&c.frames_out)),
        )?;
        f.per_worker_counter("switchboard_received_bytes", "Bytes read from client sockets.", &workers, |c| {
            get(&c.detail.bytes_in)
        })?;
        f.counter(
            "switchboard_sent_bytes",
            "Bytes written to client sockets (what the kernel took), by workers and by handle threads.",
            total(&|c| get(&c.detail.bytes_out)),
        )?;
        f.counter("switchboard_writes", "sendmsg calls that wrote to a client socket.", total(&|c| get(&c.writes)))?;
        f.counter(
            "switchboard_write_waits",
            "Writes that found a socket buffer full and waited for room.",
            total(&|c| get(&c.write_waits)),
        )?;

        // ---- mailboxes ----
        f.per_worker_gauge(
            "switchboard_mailbox_depth",
            "Commands waiting in a worker's mailbox now.",
            &workers,
            |i, _| shared.mailboxes[i].len() as i64,
        )?;
        {
            let mut m = f.enc.encode_descriptor(
                "switchboard_mailbox_rejections",
                "Commands refused because a worker's mailbox was full (mailbox_full).",
                None,
                MetricType::Counter,
            )?;
            for (i, mb) in shared.mailboxes.iter().enumerate() {
                let labels = [("worker", i.to_string())];
                ConstCounter::new(mb.full_count()).encode(m.encode_family(&labels)?)?;
            }
        }

        // ---- closes ----
        f.per_worker_counter(
            "switchboard_slow_consumer_closes",
            "Connections closed because their outbound queue passed its limit (CLOSE 4004).",
            &workers,
            |c| get(&c.slow_consumers),
        )?;
        f.per_worker_counter(
            "switchboard_rate_limited",
            "SEND, SEND_EX, PUBLISH, MESSAGE and FETCH frames refused by their user's send budget \
             (ERROR 118, or CLOSE 4009 after limits.send_max_refused in a row; limits.send_rate, \
             limits.send_bytes_rate).",
            &workers,
            |c| get(&c.rate_limited),
        )?;
        f.counter(
            "switchboard_skipped_messages",
            "Messages dropped from slow consumers' queues (limits.slow_consumer = drop_oldest).",
            total(&|c| get(&c.skipped)),
        )?;
        f.per_worker_counter(
            "switchboard_idle_timeouts",
            "Connections closed for silence past the idle timeout: no PONG to the heartbeat's PING (CLOSE 4002).",
            &workers,
            |c| get(&c.idle_timeouts),
        )?;
        f.per_worker_counter("switchboard_pings_sent", "Heartbeat PINGs sent by the server.", &workers, |c| {
            get(&c.pings_sent)
        })?;
        f.per_worker_labelled(
            "switchboard_protocol_errors",
            "Connections closed for a malformed or unexpected frame, by close code (http_on_raw_port: an HTTP \
             request on the raw TCP port, answered with a 400).",
            "code",
            &PROTOCOL_ERROR_CODES,
            &workers,
            |c| &c.detail.protocol_errors,
        )?;
        f.counter(
            "switchboard_message_timeouts",
            "Connections closed because a frame was not completed in time (CLOSE 1008).",
            total(&|c| get(&c.message_timeouts)),
        )?;
        f.counter(
            "switchboard_partial_budget_closes",
            "Connections closed because the worker's budget for incomplete frames ran out (CLOSE 1013).",
            total(&|c| get(&c.partial_budget_closes)),
        )?;
        f.counter(
            "switchboard_recv_buffers_exhausted",
            "Receives ended because the worker's io_uring buffer ring was empty (re-armed, no bytes lost).",
            total(&|c| get(&c.recv_buffers_exhausted)),
        )?;
        f.counter(
            "switchboard_recv_lost_wakeups",
            "io_uring: direct reads after a long receive run that found bytes waiting (a missed kernel wake-up, at most that many).",
            total(&|c| get(&c.recv_lost_wakeups)),
        )?;
        f.counter("switchboard_kicked", "Connections kicked by the application.", total(&|c| get(&c.kicked)))?;
        f.counter(
            "switchboard_ws_upgrades",
            "WebSocket handshakes completed (101 sent).",
            total(&|c| get(&c.ws_upgrades)),
        )?;
        f.counter(
            "switchboard_http_requests",
            "Plain HTTP requests answered on the WebSocket port (the demo page, its script, 404s).",
            total(&|c| get(&c.http_requests)),
        )?;
        f.counter(
            "switchboard_ws_handshake_failures",
            "WebSocket upgrade requests refused (bad request, Origin, subprotocol, size).",
            total(&|c| get(&c.ws_handshake_failures)),
        )?;
        f.counter(
            "switchboard_hook_panics",
            "Panics caught in the application's message hook or authenticator.",
            total(&|c| get(&c.hook_panics)),
        )?;

        // ---- latency ----
        f.histogram(
            "switchboard_push_to_written_seconds",
            "Seconds from a push being accepted to its frame being written to a socket, for the writes a socket \
             took at once: Handle::push_to_user (accepted after its checks, timed at each connection's sendmsg \
             return) and room publishes and broadcasts (accepted when posted to the workers, timed per fan-out \
             step of up to 2048 members, from the oldest message of a coalesced batch). Frames a full socket left \
             queued, and client SENDs, are not timed.",
            all.iter().map(|c| &c.detail.push_to_written),
        )?;

        // ---- reliable delivery ----
        f.per_worker_counter(
            "switchboard_retransmits",
            "Reliable windows that went back to the device's ACK position and sent again after the ACK timeout.",
            &workers,
            |c| get(&c.detail.retransmits),
        )?;
        f.per_worker_counter(
            "switchboard_ack_timeout_closes",
            "Device connections closed because their window made no ACK progress through delivery.max_retransmits \
             retransmits (CLOSE 4007): a frozen app, or a path that died without a close.",
            &workers,
            |c| get(&c.detail.ack_timeout_closes),
        )?;
        f.per_worker_counter(
            "switchboard_replaced_closes",
            "Device connections closed because the device logged in on another connection, of this node or of \
             another node of the cluster (CLOSE 4008): mostly connections that died silently at a network change.",
            &workers,
            |c| get(&c.detail.replaced_closes),
        )?;
        if let Some(s) = self.0.store_counters() {
            f.counter("switchboard_store_appends", "Messages stored in inboxes.", get(&s.appends))?;
            f.counter(
                "switchboard_store_duplicates",
                "Appends answered as duplicates of an earlier client_id.",
                get(&s.duplicates),
            )?;
            f.counter(
                "switchboard_store_syncs",
                "Store syncs (group commits, and syncs of positions and retention drops no append synced).",
                get(&s.syncs),
            )?;
            f.counter(
                "switchboard_store_refusals",
                "Appends refused by a limit (inbox full, store full).",
                get(&s.refusals),
            )?;
            f.counter("switchboard_store_errors", "Store requests that failed with an I/O error.", get(&s.errors))?;
            f.counter(
                "switchboard_store_busy",
                "Store requests refused because its queue was full (store.queue_capacity or store.queue_max_bytes).",
                get(&s.busy),
            )?;
            f.counter("switchboard_store_reads", "Inbox pages read.", get(&s.reads))?;
            f.counter(
                "switchboard_store_expired",
                "Messages dropped by retention passes (not those the hot log drops as acknowledged in time).",
                get(&s.expired),
            )?;
            f.counter(
                "switchboard_store_expired_unacknowledged",
                "Of the messages retention passes dropped, those some known device of their user had not \
                 acknowledged (all, for a user with no device): expired undelivered, by store.ttl_ms or their own \
                 ttl_ms.",
                get(&s.expired_unacknowledged),
            )?;
            f.gauge(
                "switchboard_store_queue_depth",
                "Store requests queued, not yet taken by the store thread.",
                get(&s.queue_depth) as i64,
            )?;
            f.gauge(
                "switchboard_store_queue_bytes",
                "Bytes of the appends queued for the store thread (bounded by store.queue_max_bytes).",
                get(&s.queue_bytes) as i64,
            )?;
            f.gauge(
                "switchboard_store_pending_messages",
                "Messages held in inboxes (stored, not yet dropped by a retention pass, or by the disk store's \
                 hot log, after every known device acknowledged them or they expired), as of the store's last \
                 batch.",
                get(&s.held_messages) as i64,
            )?;
            f.gauge(
                "switchboard_store_pending_bytes",
                "Bytes of the messages held in inboxes, as counted against store.max_bytes.",
                get(&s.held_bytes) as i64,
            )?;
            if let Some(max) = self.0.store_max_bytes() {
                f.gauge(
                    "switchboard_store_max_bytes",
                    "store.max_bytes: the bytes of messages the store holds at most; past it reliable sends are \
                     refused (ERROR 114). Compare switchboard_store_pending_bytes.",
                    max as i64,
                )?;
            }
            if let Some(free) = self.0.store_disk_free_bytes() {
                f.gauge(
                    "switchboard_store_disk_free_bytes",
                    "Bytes free to the server on the filesystem of store.path, read at this scrape (statvfs): a \
                     disk that fills before store.max_bytes is reached stops the store (ERROR 115).",
                    free.min(i64::MAX as u64) as i64,
                )?;
            }
            f.gauge(
                "switchboard_store_stopped",
                "1 while the store is stopped after a failed write (disk full, I/O error): every reliable \
                 request fails until the store thread opens it again (every 10 s, once the cause is gone); what \
                 was synced before is kept.",
                i64::from(s.stopped()),
            )?;
            f.histogram(
                "switchboard_store_commit_seconds",
                "Seconds from the store thread taking a batch that stores messages to that batch's sync returning \
                 (apply, then one sync); one sample per batch.",
                std::iter::once(&s.commit),
            )?;
            f.histogram(
                "switchboard_store_queue_wait_seconds",
                "Seconds a store request (append, read, login, position, state query) waited in the store's queue, \
                 from a worker queueing it to the store thread taking it into a batch; one sample per request.",
                std::iter::once(&s.queue_wait),
            )?;
        }

        // ---- cluster (only when `cluster.redis` is set) ----
        if let Some(c) = self.0.cluster_counters() {
            cluster(&mut f, &c)?;
        }

        // ---- process ----
        f.gauge("switchboard_workers", "Worker threads.", workers.len() as i64)?;
        if let Some(rss) = resident_bytes() {
            f.gauge("process_resident_memory_bytes", "Resident memory of the process (/proc/self/statm).", rss)?;
        }
        if let Some(fds) = open_fds() {
            f.gauge(
                "process_open_fds",
                "Open file descriptors of the process (the size of /proc/self/fd: Linux 6.2 or later).",
                fds,
            )?;
        }
        Ok(())
    }
}

/// The families of cross-node work, read from the `sb-cluster` thread's
/// counters (one writer each: that thread, or a producer's refused send).
fn cluster(f: &mut Family<'_, '_>, c: &ClusterCounters) -> fmt::Result {
    let counters: [(&str, &str, &AtomicU64); 15] = [
        (
            "switchboard_cluster_redis_commands",
            "Commands sent to Redis (PUBLISH, HGETALL, HSET, the heartbeat script, ...).",
            &c.redis_commands,
        ),
        (
            "switchboard_cluster_redis_round_trips",
            "Waits for Redis: one per group of commands sent together (a turn's lookups, then its publishes and \
             presence writes; a heartbeat).",
            &c.redis_round_trips,
        ),
        (
            "switchboard_cluster_redis_errors",
            "Redis commands (or connections) that failed or timed out.",
            &c.redis_errors,
        ),
        (
            "switchboard_cluster_records_sent",
            "Records sent to other nodes: forwards to users, room and broadcast frames, kicks, joins, login notices.",
            &c.records_sent,
        ),
        ("switchboard_cluster_batches_sent", "PUBLISHes that carried the records sent.", &c.batches_sent),
        ("switchboard_cluster_records_received", "Records received from other nodes.", &c.records_received),
        ("switchboard_cluster_batches_received", "Batches (PUBLISHes) received from other nodes.", &c.batches_received),
        (
            "switchboard_cluster_batches_malformed",
            "Received batches that could not be read, dropped whole.",
            &c.batches_malformed,
        ),
        (
            "switchboard_cluster_deliveries",
            "Local connections written to (or whose worker was handed the work) for records from other nodes.",
            &c.deliveries,
        ),
        (
            "switchboard_cluster_queue_full",
            "Cross-node events refused because the queue to the Redis thread was full (cluster.queue_capacity or \
                 cluster.queue_max_bytes).",
            &c.queue_full,
        ),
        (
            "switchboard_cluster_forwards_failed",
            "Records to other nodes dropped because their PUBLISH failed (at-most-once messages lost; stored ones \
             stay in the inbox).",
            &c.forwards_failed,
        ),
        (
            "switchboard_cluster_route_cache_hits",
            "Routes of users on other nodes answered from the route cache.",
            &c.route_cache_hits,
        ),
        (
            "switchboard_cluster_route_lookups",
            "Routes of users read from Redis (HGETALL of presence).",
            &c.route_lookups,
        ),
        (
            "switchboard_cluster_presence_writes",
            "Presence writes to Redis (HSET and PEXPIRE at a login, HDEL at a user's last logout here, resyncs).",
            &c.presence_writes,
        ),
        (
            "switchboard_cluster_presence_resyncs",
            "Full re-registrations of this node's users in Redis (at start and after Redis came back).",
            &c.presence_resyncs,
        ),
    ];
    for (name, help, v) in counters {
        f.counter(name, help, get(v))?;
    }
    f.gauge(
        "switchboard_cluster_connected",
        "1 while the pub/sub connection to Redis is up and the last heartbeat succeeded, else 0.",
        get(&c.connected) as i64,
    )?;
    f.gauge("switchboard_cluster_live_nodes", "Other nodes alive at the last heartbeat.", get(&c.live_nodes) as i64)?;
    f.gauge(
        "switchboard_cluster_room_subscriptions",
        "Room channels this node subscribes to (rooms with members here).",
        get(&c.room_subscriptions) as i64,
    )?;
    f.gauge(
        "switchboard_cluster_queue_bytes",
        "Bytes of the messages waiting for the Redis thread; forwards are refused past cluster.queue_max_bytes.",
        get(&c.queue_bytes) as i64,
    )
}

/// Adds one block's plain counters and detail into `into` (a scrape's own
/// block, read by this thread only).
fn sum_into(into: &WorkerCounters, c: &WorkerCounters) {
    let add = |a: &AtomicU64, b: &AtomicU64| a.store(get(a) + get(b), Ordering::Relaxed);
    add(&into.frames_out, &c.frames_out);
    add(&into.skipped, &c.skipped);
    add(&into.writes, &c.writes);
    add(&into.write_waits, &c.write_waits);
    add(&into.detail.bytes_out, &c.detail.bytes_out);
    for (a, b) in into.detail.deliveries.iter().zip(&c.detail.deliveries) {
        add(a, b);
    }
    for (a, b) in into.detail.push_to_written.buckets.iter().zip(&c.detail.push_to_written.buckets) {
        add(a, b);
    }
    add(&into.detail.push_to_written.sum_ns, &c.detail.push_to_written.sum_ns);
}

/// Resident set size in bytes: the second field of `/proc/self/statm`, in
/// pages.
fn resident_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as i64)
}

/// Open descriptors: the size Linux (6.2 and later) reports for
/// `/proc/self/fd`, which is the count of open descriptors, taken from the
/// descriptor table's bitmap: one `statx`, a few microseconds at any
/// count. Listing the directory instead costs the kernel a dentry lookup
/// per descriptor (measured here: ~80 ms at 19,000 descriptors; a `poll`
/// over every descriptor, ~34 ms), far too much for a scrape at a million
/// connections; so an older kernel, which reports 0, gets no sample.
fn open_fds() -> Option<i64> {
    let n = std::fs::metadata("/proc/self/fd").ok()?.len();
    (n > 0).then_some(n as i64)
}
