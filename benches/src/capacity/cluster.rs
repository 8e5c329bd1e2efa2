//! The cluster scenario (`switchboard-bench cluster`, and a section of the
//! capacity report): what a message costs when it crosses nodes through
//! Redis, next to the same message kept on one node, in the same run.
//!
//! The question: with three Switchboard nodes on one Redis, how much
//! unicast throughput and latency does a cross-node message give up
//! against a same-node one (target: cross-node at least
//! [`CROSS_SHARE_TARGET`](super::report::CROSS_SHARE_TARGET) of same-node), how many Redis round trips does
//! each cross-node message cost (target: at most
//! [`ROUND_TRIPS_PER_MSG_TARGET`](super::report::ROUND_TRIPS_PER_MSG_TARGET) at the best rate, i.e. batching of ten
//! or more messages per wait), and how a room with members on every node
//! fans out from one of them.
//!
//! Sizes: one `redis-server` and three nodes, each its own process on
//! loopback with one worker (three nodes, Redis and the loaders share this
//! host's cores: more workers per node would only share the same cores),
//! `store.kind = "none"` (live relay: what crosses is the forward, not a
//! store). Unicast uses two fleets of half the plan's connections each, on
//! nodes A and B, and the same ladder of offered rates for both modes:
//! "same" (each fleet sends to its own users, on its own node) and "cross"
//! (each fleet sends to the other fleet's users), so the connections,
//! nodes, senders and offered load are identical and only the path
//! differs. The offered rates are the plan's `cluster_rates`, finer than
//! the single-server ladder's. Fan-out uses the plan's room size split over
//! the three nodes, at rising offered deliveries per second.
//!
//! Owns: starting Redis and the nodes for this scenario, the ladder, and
//! reading the nodes' cluster counters (`/stats`' `cluster` object) and
//! Redis's CPU (`INFO cpu`) around each measured window.
//! Must not: estimate. Every figure is measured here; the verdicts are
//! report.rs's (`ClusterBench::judge`).

use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use switchboard::redis_proc::{RedisCluster, RedisServer};
use switchboard_bench::loadgen::{percentiles, Collected, Command, Fleet, ProcStat};

use super::report::{
    ClusterBench, ClusterFanout, ClusterFanoutRun, ClusterNodeFanout, ClusterNodeSingle, ClusterStep, ClusterUnicast,
    RedisWork, UnicastStep,
};
use super::scenarios::{completion_ms, note, q, Delivery, ServerProc};
use super::Runner;

/// Nodes of the scenario.
const NODES: usize = 3;
/// Masters of the Redis Cluster with `--redis-cluster` (Redis's minimum).
const REDIS_CLUSTER_MASTERS: usize = 3;
/// Worker threads per node (see the module doc).
const WORKERS_PER_NODE: usize = 1;
/// Seconds of same-node, then cross-node traffic before the ladder,
/// unmeasured: fills the nodes' route caches (every SEND is also offered
/// to the cluster thread, which looks up where else its user is; the
/// first lookup of a user reads its presence from Redis, later ones use
/// the cache until `cluster.route_cache_ms`).
const WARMUP_S: u64 = 1;
/// Sustained fan-out: offered deliveries per second over all members,
/// tried in order until one does not reach everyone.
const FANOUT_DELIVERIES_PER_S: [f64; 5] = [25_000.0, 50_000.0, 100_000.0, 200_000.0, 400_000.0];

/// The counters of `/stats`' `cluster` object that the scenario reads.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub(super) struct ClusterCounts {
    pub connected: bool,
    pub live_nodes: u64,
    pub room_subscriptions: u64,
    pub redis_commands: u64,
    pub redis_round_trips: u64,
    pub redis_errors: u64,
    pub records_sent: u64,
    pub batches_sent: u64,
    pub deliveries: u64,
    pub queue_full: u64,
    pub forwards_failed: u64,
    pub route_lookups: u64,
    pub presence_writes: u64,
}

impl ClusterCounts {
    fn add(&mut self, o: &ClusterCounts) {
        self.redis_commands += o.redis_commands;
        self.redis_round_trips += o.redis_round_trips;
        self.redis_errors += o.redis_errors;
        self.records_sent += o.records_sent;
        self.batches_sent += o.batches_sent;
        self.deliveries += o.deliveries;
        self.queue_full += o.queue_full;
        self.forwards_failed += o.forwards_failed;
        self.route_lookups += o.route_lookups;
        self.presence_writes += o.presence_writes;
    }

    /// The Redis work between `earlier` and `self`, per `messages`.
    fn since(&self, earlier: &ClusterCounts, messages: u64, redis_cpu_s: Option<f64>) -> RedisWork {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (cmds, trips) =
            (d(self.redis_commands, earlier.redis_commands), d(self.redis_round_trips, earlier.redis_round_trips));
        let (records, batches) =
            (d(self.records_sent, earlier.records_sent), d(self.batches_sent, earlier.batches_sent));
        let per = |n: u64| (messages > 0).then(|| n as f64 / messages as f64);
        RedisWork {
            commands: cmds,
            round_trips: trips,
            commands_per_msg: per(cmds),
            round_trips_per_msg: per(trips),
            records_sent: records,
            batches_sent: batches,
            records_per_batch: (batches > 0).then(|| records as f64 / batches as f64),
            route_lookups: d(self.route_lookups, earlier.route_lookups),
            errors: d(self.redis_errors, earlier.redis_errors),
            queue_full: d(self.queue_full, earlier.queue_full),
            forwards_failed: d(self.forwards_failed, earlier.forwards_failed),
            redis_cpu_ns_per_msg: redis_cpu_s.filter(|_| messages > 0).map(|s| s * 1e9 / messages as f64),
        }
    }
}

/// What the nodes share: one `redis-server`, or a Redis Cluster of three
/// masters (`--redis-cluster`), from the project's harness
/// (`switchboard::redis_proc`: no persistence, killed when dropped).
enum Redis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    fn start(cluster: bool) -> Redis {
        if cluster {
            Redis::Cluster(RedisCluster::start(REDIS_CLUSTER_MASTERS))
        } else {
            Redis::One(RedisServer::start())
        }
    }

    /// `redis = ...` for a node's `[cluster]` table.
    fn toml(&self) -> String {
        match self {
            Redis::One(r) => format!("redis = {:?}", r.url()),
            Redis::Cluster(c) => format!("redis = {:?}", c.urls()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Redis::One(_) => "one redis-server (no persistence) on loopback".into(),
            Redis::Cluster(c) => {
                format!("a Redis Cluster of {} masters, no replicas, no persistence, on loopback", c.nodes().len())
            }
        }
    }

    /// Redis's CPU time so far, over every Redis process (user + system
    /// seconds, `INFO cpu`).
    fn cpu_s(&self) -> Option<f64> {
        let servers: &[RedisServer] = match self {
            Redis::One(r) => std::slice::from_ref(r),
            Redis::Cluster(c) => c.nodes(),
        };
        servers.iter().map(info_cpu_s).sum()
    }
}

/// One server's `used_cpu_user + used_cpu_sys`.
fn info_cpu_s(r: &RedisServer) -> Option<f64> {
    let info: String = redis::from_redis_value(r.cmd(&["INFO", "cpu"]).ok()?).ok()?;
    let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<f64>().ok());
    Some(field("used_cpu_user:")? + field("used_cpu_sys:")?)
}

/// Redis and the nodes of one run.
struct Cluster {
    redis: Redis,
    nodes: Vec<ServerProc>,
}

impl Cluster {
    /// Each node's `cluster` counters from its `/stats`, `None` where it
    /// has none (yet).
    fn node_counts(&self) -> Vec<Option<ClusterCounts>> {
        self.nodes.iter().map(|n| n.stats().and_then(|s| s.cluster)).collect()
    }

    fn counts(&self) -> Result<Vec<ClusterCounts>, String> {
        self.node_counts()
            .into_iter()
            .enumerate()
            .map(|(i, c)| c.ok_or_else(|| format!("node {i}: no cluster in /stats")))
            .collect()
    }

    fn total(&self) -> Result<ClusterCounts, String> {
        let mut t = ClusterCounts::default();
        for c in self.counts()? {
            t.add(&c);
        }
        Ok(t)
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(ServerProc::pid).collect()
    }

    /// Waits (at most `timeout`) until `ok` holds for every node's counters.
    /// A node whose `/stats` has no `cluster` object yet (its link to
    /// Redis is set up after its ports answer) is waited for, not an
    /// error: a capacity run once stopped on that, just after the nodes
    /// started.
    fn wait(&self, what: &str, timeout: Duration, ok: impl Fn(usize, &ClusterCounts) -> bool) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            let c = self.node_counts();
            if all_hold(&c, &ok) {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                return Err(format!("cluster: {what} not reached within {timeout:?}: {c:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether `ok` holds for the counters of every node; a node without
/// counters (`None`: no `cluster` in its `/stats` yet) does not hold.
fn all_hold(counts: &[Option<ClusterCounts>], ok: impl Fn(usize, &ClusterCounts) -> bool) -> bool {
    counts.iter().enumerate().all(|(i, c)| c.as_ref().is_some_and(|c| ok(i, c)))
}

/// Node `i`'s name in the report.
fn node_name(i: usize) -> String {
    ["A", "B", "C"].get(i).map_or_else(|| format!("node{i}"), |s| s.to_string())
}

/// Whether `redis-server` can be started from the PATH.
fn redis_installed() -> bool {
    Proc::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Runner {
    /// [`Runner::cluster`] when redis-server is installed; otherwise none,
    /// and the report's notes say why.
    pub(super) fn cluster_if_redis(&mut self) -> Result<Option<ClusterBench>, String> {
        if !redis_installed() {
            self.log.push(
                "the cluster scenario did not run: redis-server is not installed (apt-get install redis-server)".into(),
            );
            return Ok(None);
        }
        self.cluster().map(Some)
    }

    /// `switchboard-bench cluster`: the cluster scenario alone; writes
    /// cluster.json and cluster.md to the output directory.
    pub fn cluster_alone(&mut self) -> Result<String, String> {
        std::fs::create_dir_all(&self.out).map_err(|e| format!("{}: {e}", self.out.display()))?;
        let r = self.cluster()?;
        let mut md = format!("# Switchboard cluster benchmark ({} mode)\n", self.plan.mode);
        r.markdown(&mut md);
        for n in &self.log {
            md.push_str(&format!("\nNote: {n}\n"));
        }
        let json = serde_json::to_string_pretty(&r).expect("the report serialises");
        std::fs::write(self.out.join("cluster.json"), json).map_err(|e| format!("cluster.json: {e}"))?;
        std::fs::write(self.out.join("cluster.md"), &md).map_err(|e| format!("cluster.md: {e}"))?;
        Ok(md)
    }

    /// The cluster scenario: Redis and three nodes, the unicast ladder same
    /// vs cross node, then room fan-out across the nodes.
    pub(super) fn cluster(&mut self) -> Result<ClusterBench, String> {
        let t0 = Instant::now();
        let redis = Redis::start(self.plan.redis_cluster);
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let extra = format!("\n[cluster]\n{}\nnode_id = \"bench-{}\"\n", redis.toml(), node_name(i));
            let tag = format!("cluster-{}", node_name(i));
            nodes.push(ServerProc::switchboard(
                &self.switchboard_bin,
                &self.out,
                &tag,
                WORKERS_PER_NODE,
                Delivery::NoStore,
                &self.plan.server_config(&extra),
            )?);
        }
        let redis_what = redis.describe();
        let cl = Cluster { redis, nodes };
        cl.wait("every node connected and seeing the others", Duration::from_secs(15), |_, c| {
            c.connected && c.live_nodes == (NODES - 1) as u64
        })?;
        note(format!("cluster: {} and {NODES} nodes up ({WORKERS_PER_NODE} worker each)", redis_what));
        let unicast = self.cluster_unicast(&cl)?;
        let fanout = self.cluster_fanout(&cl)?;
        drop(cl);
        Ok(ClusterBench::judge(
            NODES as u32,
            WORKERS_PER_NODE as u32,
            redis_what,
            unicast,
            fanout,
            t0.elapsed().as_secs_f64(),
        ))
    }

    fn cluster_unicast(&mut self, cl: &Cluster) -> Result<ClusterUnicast, String> {
        let half = (self.plan.connections / 2).max(1);
        let prefixes = ["ca-u", "cb-u"];
        note(format!("cluster: unicast, {half} connections on node A and {half} on node B"));
        let mut fleets = Vec::new();
        let mut ready = 0;
        for (i, p) in prefixes.iter().enumerate() {
            let spec = self.spec(cl.nodes[i].addr, half, p, None);
            let (f, r, _) = self.spawn_ready(&spec)?;
            fleets.push(f);
            ready += r;
        }
        let users = half;
        // Every login's presence in Redis (HSET and PEXPIRE each) before
        // any message may need it.
        cl.wait("presence of every user written", Duration::from_secs(30), |i, c| {
            i >= prefixes.len() || c.presence_writes >= 2 * u64::from(half)
        })?;
        let lowest = self.plan.cluster_rates.first().copied().unwrap_or(5_000);
        for cross in [false, true] {
            let _ = cluster_step(cl, &mut fleets, &prefixes, users, cross, lowest, WARMUP_S)?;
        }
        std::thread::sleep(Duration::from_secs(1));
        let (mut same, mut cross) = (Vec::new(), Vec::new());
        let (mut same_on, mut cross_on) = (true, true);
        for rate in self.plan.cluster_rates.clone() {
            for (is_cross, on, steps) in [(false, &mut same_on, &mut same), (true, &mut cross_on, &mut cross)] {
                if !*on {
                    continue;
                }
                let s = cluster_step(cl, &mut fleets, &prefixes, users, is_cross, rate, self.plan.unicast_s)?;
                note(format!(
                    "  {} node, {rate}/s offered: {:.0}/s delivered, p99 {} us, {} Redis round trips per message",
                    if is_cross { "cross" } else { "same" },
                    s.unicast.msgs_per_s,
                    s.unicast.p99_us,
                    super::report::f(s.redis.round_trips_per_msg, 3),
                ));
                *on = s.unicast.keeps_up();
                steps.push(s);
                // A step that did not keep up may leave a backlog: let it
                // drain before the next one.
                if !*on {
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
            if !same_on && !cross_on {
                break;
            }
        }
        for f in fleets {
            f.quit();
        }
        Ok(ClusterUnicast { connections: ready, sustainable: super::report::Unicast::sustainable_rule(), same, cross })
    }

    fn cluster_fanout(&mut self, cl: &Cluster) -> Result<ClusterFanout, String> {
        let room = "cluster-room";
        let per_node = (self.plan.members / NODES as u32).max(1);
        note(format!("cluster: room fan-out, {per_node} members on each of {NODES} nodes, published from node A"));
        let mut fleets = Vec::new();
        let mut members = Vec::new();
        for i in 0..NODES {
            let spec = self.spec(cl.nodes[i].addr, per_node, &format!("cr{i}-u"), Some(room));
            let (f, r, _) = self.spawn_ready(&spec)?;
            fleets.push(f);
            members.push(r);
        }
        let total: u32 = members.iter().sum();
        cl.wait("every node subscribed to the room's channel", Duration::from_secs(15), |_, c| {
            c.room_subscriptions >= 1
        })?;
        for f in &mut fleets {
            let _ = f.collect()?;
        }
        // Single messages from a member on node A, 4 per second.
        let repeats = self.plan.fanout_repeats;
        let base = 1_000;
        fleets[0].send(
            0,
            &Command::Publish {
                room: room.into(),
                rate_per_s: 4.0,
                count: repeats,
                payload_bytes: 64,
                first_seq: base,
            },
        );
        fleets[0].wait_sent_from(1)?;
        std::thread::sleep(Duration::from_millis(500));
        let mut single = Vec::new();
        for (i, f) in fleets.iter_mut().enumerate() {
            let done = completion_ms(&f.collect()?, base..base + repeats, members[i]);
            single.push(ClusterNodeSingle {
                node: node_name(i),
                via_redis: i != 0,
                members: members[i],
                p50_ms: q(&done, 0.5),
                p99_ms: q(&done, 0.99),
                complete: done.len() as u32,
            });
        }
        // Sustained: rising publish rates.
        let mut runs = Vec::new();
        for (k, target) in FANOUT_DELIVERIES_PER_S.into_iter().enumerate() {
            let rate = (target / f64::from(total.max(1))).max(1.0);
            let count = ((rate * self.plan.sustain_s as f64) as u32).max(1);
            let first_seq = 100_000 * (k as u32 + 1);
            let c0 = cl.total()?;
            let cpu0 = ProcStat::processes_cpu(&cl.pids());
            let r0 = cl.redis.cpu_s();
            let t0 = Instant::now();
            fleets[0].send(
                0,
                &Command::Publish { room: room.into(), rate_per_s: rate, count, payload_bytes: 64, first_seq },
            );
            fleets[0].wait_sent_from(1)?;
            std::thread::sleep(Duration::from_secs(2));
            let window = (t0.elapsed().as_secs_f64() - 2.0).max(0.001);
            let collected: Vec<Collected> = fleets.iter_mut().map(Fleet::collect).collect::<Result<_, _>>()?;
            let (user, sys) = ProcStat::processes_cpu(&cl.pids()).since(&cpu0);
            let redis_cpu = r0.zip(cl.redis.cpu_s()).map(|(a, b)| b - a);
            let c1 = cl.total()?;
            let mut per_node = Vec::new();
            let mut delivered = 0;
            for (i, c) in collected.iter().enumerate() {
                let done = completion_ms(c, first_seq..first_seq + count, members[i]);
                delivered += c.received;
                let p = percentiles(&c.hist);
                per_node.push(ClusterNodeFanout {
                    node: node_name(i),
                    via_redis: i != 0,
                    members: members[i],
                    deliveries: c.received,
                    deliveries_per_s: c.received as f64 / window,
                    p50_ms: p.p50_us as f64 / 1e3,
                    p99_ms: p.p99_us as f64 / 1e3,
                    complete: done.len() == count as usize && c.closed == 0,
                    members_cut_off: c.closed,
                });
            }
            let run = ClusterFanoutRun {
                offered_deliveries_per_s: target,
                publish_rate_per_s: rate,
                messages: count,
                complete: per_node.iter().all(|n| n.complete),
                deliveries_per_s: delivered as f64 / window,
                nodes_user_ns_per_delivery: user / delivered.max(1) as f64,
                nodes_sys_ns_per_delivery: sys / delivered.max(1) as f64,
                redis_per_published: c1.since(&c0, u64::from(count), redis_cpu),
                per_node,
            };
            note(format!(
                "  {:.0} publishes/s ({target:.0} deliveries/s offered): {:.0} deliveries/s, complete: {}; p99 per node (ms): {}",
                rate,
                run.deliveries_per_s,
                run.complete,
                run.per_node.iter().map(|n| format!("{} {:.1}", n.node, n.p99_ms)).collect::<Vec<_>>().join(", ")
            ));
            let complete = run.complete;
            runs.push(run);
            if !complete {
                break;
            }
        }
        for f in fleets {
            f.quit();
        }
        Ok(ClusterFanout { room_members: total, publisher_node: node_name(0), single_messages: repeats, single, runs })
    }
}

/// One measured window: both fleets send at `rate` in all (half each),
/// to their own node's users or (`cross`) to the other node's.
fn cluster_step(
    cl: &Cluster,
    fleets: &mut [Fleet],
    prefixes: &[&str],
    users: u32,
    cross: bool,
    rate: u64,
    secs: u64,
) -> Result<ClusterStep, String> {
    for f in fleets.iter_mut() {
        let _ = f.collect()?;
    }
    let c0 = cl.total()?;
    let pids = cl.pids();
    let cpu0 = ProcStat::processes_cpu(&pids);
    let r0 = cl.redis.cpu_s();
    let t0 = Instant::now();
    let n = fleets.len();
    for (i, f) in fleets.iter_mut().enumerate() {
        let to = prefixes[if cross { (i + 1) % n } else { i }];
        let share = rate / n as u64 + u64::from((i as u64) < rate % n as u64);
        f.start_unicast_to(Some(to), share, secs * 1000, users, 64, 0xC1u64 * (i as u64 + 1) + rate);
    }
    let (mut sent, mut blocked) = (0, 0);
    for f in fleets.iter_mut() {
        let (s, b) = f.wait_sent()?;
        sent += s;
        blocked += b;
    }
    std::thread::sleep(Duration::from_millis(500));
    let elapsed = t0.elapsed().as_secs_f64() - 0.5;
    let (user, sys) = ProcStat::processes_cpu(&pids).since(&cpu0);
    let redis_cpu = r0.zip(cl.redis.cpu_s()).map(|(a, b)| b - a);
    let mut all: Option<Collected> = None;
    for f in fleets.iter_mut() {
        let c = f.collect()?;
        match &mut all {
            None => all = Some(c),
            Some(a) => {
                a.hist.add(&c.hist).map_err(|e| format!("{e:?}"))?;
                a.received += c.received;
            }
        }
    }
    let c = all.ok_or("no fleet")?;
    let c1 = cl.total()?;
    Ok(ClusterStep {
        cross,
        unicast: UnicastStep::measured(rate, (sent, blocked), &c, elapsed, (user, sys), None),
        redis: c1.since(&c0, c.received, redis_cpu),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_without_cluster_counters_yet_is_waited_for() {
        let up = ClusterCounts { connected: true, live_nodes: 2, ..Default::default() };
        let ok = |_: usize, c: &ClusterCounts| c.connected && c.live_nodes == 2;
        assert!(!all_hold(&[Some(up), Some(up), None], ok), "not ready, and not an error");
        assert!(!all_hold(&[Some(up), Some(ClusterCounts::default()), Some(up)], ok));
        assert!(all_hold(&[Some(up), Some(up), Some(up)], ok));
    }

    #[test]
    fn redis_work_is_per_delivered_message() {
        let a = ClusterCounts { redis_commands: 10, redis_round_trips: 4, records_sent: 0, ..Default::default() };
        let b = ClusterCounts {
            redis_commands: 110,
            redis_round_trips: 14,
            records_sent: 1000,
            batches_sent: 20,
            ..Default::default()
        };
        let w = b.since(&a, 1000, Some(0.5));
        assert_eq!((w.commands, w.round_trips), (100, 10));
        assert_eq!(w.round_trips_per_msg, Some(0.01));
        assert_eq!(w.commands_per_msg, Some(0.1));
        assert_eq!(w.records_per_batch, Some(50.0));
        assert_eq!(w.redis_cpu_ns_per_msg, Some(500_000.0));
        assert_eq!(b.since(&a, 0, None).round_trips_per_msg, None);
    }
}
