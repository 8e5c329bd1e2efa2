//! The capacity run: servers under test in their own processes, and every
//! scenario driven against them with the same loaders.
//!
//! Owns: starting and stopping the servers (Switchboard's release binary,
//! the tokio baseline, the bare ceiling relay), the raw TCP scenarios (idle
//! hold, unicast ladder, room fan-out, broadcast, heartbeats; churn.rs and
//! ws.rs add theirs to [`Runner`]) and reading /proc while they run.
//! Must not: estimate or judge. Each scenario returns the typed figures it
//! measured (report.rs); verdicts and ratios are the report's.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use switchboard::config::PollerKind;
use switchboard_bench::loadgen::{http, percentiles, timed_payload, Collected, Command, Fleet, FleetSpec, ProcStat};

use super::churn;
use super::report::{
    poller_name, ratio, ApiBench, Broadcast, Churn, Completion, DataPath, DataPathMode, Fanout, FanoutRun,
    FanoutSummary, Heartbeat, Idle, Machine, MetricsScrape, NchanPeer, Peers, Projection, Reliable, Report, RssPoint,
    StoreStep, TcpReport, TokioPeer, TokioRatios, Unicast, UnicastCeiling, UnicastStep, UnicastSummary, WsSuite,
};
use super::ws::WsServer;
use super::Plan;

/// The admin API's `GET /stats`, the parts a scenario reads.
#[derive(Deserialize)]
pub(super) struct AdminStats {
    pub stats: switchboard::Stats,
    /// Users with at least one connection.
    pub users: u64,
    /// Users whose entry outlives their last close for a while.
    pub users_offline_retained: u64,
    /// The inbox store's counters; none without a store.
    #[serde(default)]
    pub store: Option<StoreCounts>,
    /// The cluster counters; none when the node is not in a cluster.
    #[serde(default)]
    pub cluster: Option<super::cluster::ClusterCounts>,
}

/// The store counters of `/stats` that the bench reads.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub(super) struct StoreCounts {
    pub appends: u64,
    pub syncs: u64,
    pub appended_per_sync_sum: u64,
    pub refusals: u64,
    pub busy: u64,
    pub errors: u64,
}

impl StoreCounts {
    /// What happened between `earlier` and `self`, over `secs`.
    pub fn since(&self, earlier: &StoreCounts, secs: f64, c: &Collected) -> StoreStep {
        let appends = self.appends.saturating_sub(earlier.appends);
        let syncs = self.syncs.saturating_sub(earlier.syncs);
        let per_sync = self.appended_per_sync_sum.saturating_sub(earlier.appended_per_sync_sum);
        StoreStep {
            appends,
            appends_per_s: appends as f64 / secs,
            syncs_per_s: syncs as f64 / secs,
            messages_per_sync: (syncs > 0).then(|| per_sync as f64 / syncs as f64),
            refused: (self.refusals + self.busy + self.errors)
                .saturating_sub(earlier.refusals + earlier.busy + earlier.errors),
            busy: self.busy.saturating_sub(earlier.busy),
            failed: self.errors.saturating_sub(earlier.errors),
            duplicates_received: c.duplicates,
            acks_sent: c.acks,
        }
    }
}

/// One worker's sample from `POST /bench/send_ceiling`.
#[derive(Deserialize)]
struct CeilingSample {
    sends: u64,
    elapsed_ns: u64,
}

impl CeilingSample {
    fn sends_per_s(&self) -> f64 {
        self.sends as f64 / (self.elapsed_ns.max(1) as f64 / 1e9)
    }
}

pub(super) fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free loopback ports: all bound at once, then released.
/// Why at once: a port bound and released at once can be handed out
/// again by the next bind, and a server given the same port for two of
/// its listeners exits at start ("Address already in use"), which a
/// capacity run once took for an `os` ladder that delivered nothing.
pub(super) fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<Option<TcpListener>> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0").ok()).collect();
    std::array::from_fn(|i| held[i].as_ref().and_then(|l| l.local_addr().ok()).map_or(7890 + i as u16, |a| a.port()))
}

/// What a Switchboard server of the run stores, and what a plain SEND gets.
/// Every server with a store gets a fresh one of its own in the run's
/// output directory (`store-<tag>`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    /// The default disk store, but a plain SEND relayed live as before
    /// reliable delivery (`delivery.send_default = "at_most_once"`): the
    /// at-most-once scenarios, comparable with earlier runs and with the
    /// peers, which speak plain SEND.
    AtMostOnce,
    /// The server's defaults (a plain SEND stored, SEND_ACK after the
    /// store's sync) with `store.durability` = `"fsync"` or `"os"`, and
    /// `delivery.window` if given.
    Reliable { durability: &'static str, window: Option<u32> },
    /// No store (`store.kind = "none"`): live relay only, the server as it
    /// was before reliable delivery.
    NoStore,
}

impl Delivery {
    /// The `[delivery]` and `[store]` tables, the store in `dir`.
    pub fn toml(self, dir: &Path) -> String {
        // A Rust string literal is a TOML basic string for any path.
        let path = format!("{:?}", dir.display().to_string());
        match self {
            Delivery::AtMostOnce => {
                format!("\n[delivery]\nsend_default = \"at_most_once\"\n\n[store]\npath = {path}\n")
            }
            Delivery::Reliable { durability, window } => {
                let window = window.map(|w| format!("window = {w}\n")).unwrap_or_default();
                format!("\n[delivery]\nsend_default = \"reliable\"\n{window}\n[store]\npath = {path}\ndurability = \"{durability}\"\n")
            }
            Delivery::NoStore => "\n[store]\nkind = \"none\"\n".into(),
        }
    }
}

/// A server under test, in its own process.
pub(super) struct ServerProc {
    pub name: &'static str,
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// The WebSocket port, if it has one.
    pub ws: Option<SocketAddr>,
}

impl ServerProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_listening(mut self, timeout: Duration) -> Result<ServerProc, String> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited at start: {status}", self.name));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
                return Ok(self);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("{} did not listen on {} within {timeout:?}", self.name, self.addr))
    }

    /// `switchboard serve` with a config of its own in `out`, storing as
    /// `delivery` says in a fresh `out/store-<tag>`; `extra` follows the
    /// `[server]` table's own keys ([`ServerProc::config`]).
    pub fn switchboard(
        bin: &Path,
        out: &Path,
        tag: &str,
        workers: usize,
        delivery: Delivery,
        extra: &str,
    ) -> Result<ServerProc, String> {
        let [port, admin_port, ws_port] = free_ports::<3>();
        let store = out.join(format!("store-{tag}"));
        if store.exists() {
            std::fs::remove_dir_all(&store).map_err(|e| format!("{}: {e}", store.display()))?;
        }
        let config = ServerProc::config((port, admin_port, ws_port), workers, &delivery.toml(&store), extra);
        let path = out.join(format!("switchboard-{tag}.toml"));
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(out.join(format!("switchboard-{tag}.log"))).map_err(|e| e.to_string())?;
        let child = Proc::new(bin)
            .args(["serve", "--log", "warn", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let admin = Some(SocketAddr::from(([127, 0, 0, 1], admin_port)));
        let ws = Some(SocketAddr::from(([127, 0, 0, 1], ws_port)));
        ServerProc { name: "switchboard", child, addr, admin, ws }.wait_listening(Duration::from_secs(15))
    }

    /// The config text of [`ServerProc::switchboard`]: the `[server]`
    /// table's keys, then `extra`, then the admin and WebSocket ports and
    /// the `delivery` tables. Keys at the top of `extra`, before its first
    /// table header, are therefore more `[server]` keys (the plan's
    /// `poller`: a second `[server]` table would be a TOML error); its
    /// tables must not be `[server]`, `[admin]`, `[websocket]`,
    /// `[delivery]` or `[store]`.
    pub fn config((port, admin_port, ws_port): (u16, u16, u16), workers: usize, delivery: &str, extra: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = {workers}\n{extra}\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\nbench_endpoints = true\n\n[websocket]\nlisten = \"127.0.0.1:{ws_port}\"\n{delivery}"
        )
    }

    pub fn peer(name: &'static str, bin: &Path, args: &[&str], plan: &Plan) -> Result<ServerProc, String> {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let workers = plan.workers.to_string();
        let mut child = Proc::new(bin)
            .args(args)
            .args(["--listen", &listen, "--workers", &workers])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        // Drain its stdout so it never blocks on a full pipe.
        let out = child.stdout.take().expect("piped");
        std::thread::spawn(move || for _ in BufReader::new(out).lines() {});
        ServerProc { name, child, addr: SocketAddr::from(([127, 0, 0, 1], port)), admin: None, ws: None }
            .wait_listening(Duration::from_secs(15))
    }

    pub fn stop(self) {
        drop(self);
    }

    /// The server's `/stats` (admin API); none if it cannot be read.
    pub fn stats(&self) -> Option<AdminStats> {
        let (s, body) = http(self.admin?, "GET", "/stats", b"", None).ok()?;
        if s != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }
}

/// A server is stopped when dropped, on errors too: SIGTERM (nginx's
/// master then stops its workers), SIGKILL after 10 s.
impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs everything the plan says and returns the report.
pub struct Runner {
    pub plan: Plan,
    pub out: PathBuf,
    pub bench_exe: PathBuf,
    pub switchboard_bin: PathBuf,
    pub tokio_bin: Option<PathBuf>,
    /// Run nginx + nchan as the WebSocket peer.
    pub nchan: bool,
    src_base: u8,
    pub(super) log: Vec<String>,
}

pub(super) fn note(msg: impl AsRef<str>) {
    eprintln!("capacity: {}", msg.as_ref());
}

impl Runner {
    pub fn new(
        plan: Plan,
        out: PathBuf,
        bench_exe: PathBuf,
        switchboard_bin: PathBuf,
        tokio_bin: Option<PathBuf>,
        nchan: bool,
    ) -> Runner {
        // A run that is not the server's default says so in its report.
        let log = match plan.socket_buffers {
            Some(b) => vec![format!(
                "every Switchboard server of this run had socket.rcvbuf_bytes = sndbuf_bytes = {b}{}",
                if b == 0 { " (left to the kernel)" } else { "" }
            )],
            None => Vec::new(),
        };
        Runner { plan, out, bench_exe, switchboard_bin, tokio_bin, nchan, src_base: 10, log }
    }

    pub(super) fn spec(&mut self, addr: SocketAddr, n: u32, prefix: &str, room: Option<&str>) -> FleetSpec {
        let mut s = FleetSpec::new(self.bench_exe.clone(), addr, n);
        s.user_prefix = prefix.into();
        s.room = room.map(String::from);
        // A fresh block of source addresses per fleet: no fleet meets the
        // previous one's TIME_WAIT ports.
        s.src_base = self.src_base;
        self.src_base = self.src_base.wrapping_add(4).max(10);
        s
    }

    fn fleet(
        &mut self,
        addr: SocketAddr,
        n: u32,
        prefix: &str,
        room: Option<&str>,
    ) -> Result<(Fleet, u32, Duration), String> {
        let spec = self.spec(addr, n, prefix, room);
        self.spawn_ready(&spec)
    }

    pub(super) fn spawn_ready(&mut self, spec: &FleetSpec) -> Result<(Fleet, u32, Duration), String> {
        let mut f = Fleet::spawn(spec).map_err(|e| e.to_string())?;
        let (ready, failed, ramp) = f.wait_ready(Duration::from_secs(180))?;
        if failed > 0 {
            let n = spec.connections;
            self.log.push(format!("{failed} of {n} {} connections failed during a ramp", spec.transport.name()));
        }
        Ok((f, ready, ramp))
    }

    /// Idle hold: ramps in four steps, recording server RSS and the host's
    /// kernel slab after each.
    pub(super) fn idle(&mut self, s: &ServerProc) -> Result<Idle, String> {
        let (idle, fleets) = self.idle_hold(s)?;
        for f in fleets {
            f.quit();
        }
        Ok(idle)
    }

    /// [`Runner::idle`], leaving the connections open: their loaders are
    /// returned.
    pub(super) fn idle_hold(&mut self, s: &ServerProc) -> Result<(Idle, Vec<Fleet>), String> {
        self.idle_hold_as(s, None)
    }

    /// [`Runner::idle_hold`], the connections logged in as `device` of
    /// their users if given.
    pub(super) fn idle_hold_as(&mut self, s: &ServerProc, device: Option<&str>) -> Result<(Idle, Vec<Fleet>), String> {
        let n = self.plan.connections;
        let what = if device.is_some() { " device" } else { "" };
        note(format!("{}: idle, {n}{what} connections in 4 steps", s.name));
        std::thread::sleep(Duration::from_millis(500));
        let (rss0, slab0) = (ProcStat::rss_bytes(s.pid()), ProcStat::slab_bytes());
        let mut curve = vec![RssPoint { connections: 0, rss_bytes: rss0 }];
        let mut fleets = Vec::new();
        let (mut total, mut ramp) = (0u32, Duration::ZERO);
        for step in 0..4 {
            let mut spec = self.spec(s.addr, n / 4, &format!("idle{step}-u"), None);
            spec.device = device.map(String::from);
            let (f, ready, t) = self.spawn_ready(&spec)?;
            total += ready;
            ramp += t;
            fleets.push(f);
            std::thread::sleep(Duration::from_secs(1));
            curve.push(RssPoint { connections: total, rss_bytes: ProcStat::rss_bytes(s.pid()) });
        }
        let (rss1, slab1) = (ProcStat::rss_bytes(s.pid()), ProcStat::slab_bytes());
        let per = |a: Option<u64>, b: Option<u64>, div: f64| match (a, b) {
            (Some(a), Some(b)) if total > 0 => Some((b as f64 - a as f64) / (total as f64 * div)),
            _ => None,
        };
        let idle = Idle {
            connections: total,
            connect_rate_per_s: total as f64 / ramp.as_secs_f64(),
            server_user_bytes_per_conn: per(rss0, rss1, 1.0),
            // Both ends of each connection are on this host and the loaders'
            // epoll entries are in the delta too: half the host's slab growth
            // per connection, an upper bound for the server's end.
            server_kernel_bytes_per_conn: per(slab0, slab1, 2.0),
            rss_curve: curve,
            metrics_scrape: match s.admin {
                Some(admin) => Some(metrics_scrape(admin, total)?),
                None => None,
            },
        };
        Ok((idle, fleets))
    }

    /// Unicast at rising rates until the system stops keeping up; the
    /// best rate it kept up with ("sustainable": at least 97% of the offered
    /// load delivered, p99 under 50 ms); then half of that rate.
    fn unicast(&mut self, s: &ServerProc) -> Result<Unicast, String> {
        let n = self.plan.connections;
        note(format!("{}: unicast over {n} connections", s.name));
        let (mut fleet, ready, _) = self.fleet(s.addr, n, "uni-u", None)?;
        let mut steps = Vec::new();
        let mut best: Option<UnicastStep> = None;
        let rates = self.plan.unicast_rates.clone();
        for rate in rates {
            let r = unicast_step(&mut fleet, s, ready, rate, self.plan.unicast_s)?;
            let keeps_up = r.keeps_up();
            note(format!("  {rate}/s offered: {:.0}/s delivered, p99 {} us", r.msgs_per_s, r.p99_us));
            steps.push(r.clone());
            if !keeps_up {
                break;
            }
            best = Some(r);
        }
        // The ladder's first rate missed (seen: the bare relay at 10,000/s
        // in a minute when the shared host was saturated): halve it until
        // a rate is kept up with, so that the report carries a lower best
        // rather than no report at all.
        if best.is_none() {
            for rate in rates_below(self.plan.unicast_rates.first().copied().unwrap_or(0)) {
                let r = unicast_step(&mut fleet, s, ready, rate, self.plan.unicast_s)?;
                note(format!(
                    "  below the ladder, {rate}/s offered: {:.0}/s delivered, p99 {} us",
                    r.msgs_per_s, r.p99_us
                ));
                steps.push(r.clone());
                if r.keeps_up() {
                    best = Some(r);
                    break;
                }
            }
        }
        let best = best.ok_or("not even 1,000 unicast messages/s were sustained")?;
        // The last step may have left a backlog in socket buffers and
        // queues: let it drain so it does not count against the next one.
        std::thread::sleep(Duration::from_secs(3));
        let _ = fleet.collect()?;
        let half = (best.msgs_per_s / 2.0) as u64;
        let at_half = unicast_step(&mut fleet, s, ready, half.max(1000), self.plan.unicast_s)?;
        note(format!("  at half of the best rate ({half}/s): p99 {} us", at_half.p99_us));
        fleet.quit();
        Ok(Unicast {
            connections: ready,
            sustainable: Unicast::sustainable_rule(),
            steps,
            max: best,
            at_half_max: at_half,
        })
    }

    /// Room fan-out: the ceiling (Switchboard only), single messages, a
    /// sustained rate above the ceiling. The sustained rates are multiples
    /// of `ladder_ceiling` (sends/s per core) if given, else of the ceiling
    /// this server measured: a peer without the admin API gets
    /// Switchboard's (and reports it as its own ceiling), another data path
    /// gets the main pass's, so both are offered the same rates.
    fn fanout(&mut self, s: &ServerProc, ladder_ceiling: Option<f64>) -> Result<Fanout, String> {
        let n = self.plan.members;
        let room = "capacity-room";
        note(format!("{}: fan-out to {n} members", s.name));
        let (mut fleet, ready, _) = self.fleet(s.addr, n, "fan-u", Some(room))?;
        let _ = fleet.collect()?;
        let repeats = self.plan.fanout_repeats;
        let mut ceiling_rate = ladder_ceiling;
        let mut ceiling_done = Vec::new();
        if let Some(admin) = s.admin {
            let mut rates = Vec::new();
            for r in 0..repeats {
                let path = format!("/bench/send_ceiling?room={room}&bytes=64&seq={r}");
                let (st, body) = http(admin, "POST", &path, b"", None).map_err(|e| e.to_string())?;
                if st != 200 {
                    return Err(format!("send ceiling: HTTP {st}: {body}"));
                }
                let samples: Vec<CeilingSample> = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
                let per_core: Vec<f64> = samples.iter().map(CeilingSample::sends_per_s).collect();
                rates.push(per_core.iter().sum::<f64>() / per_core.len().max(1) as f64);
                std::thread::sleep(Duration::from_millis(150));
            }
            let c = fleet.collect()?;
            ceiling_done = completion_ms(&c, 0..repeats, ready);
            rates.sort_by(|a, b| a.total_cmp(b));
            ceiling_rate = Some(rates[rates.len() / 2]);
        }
        // Single messages from a member, 4 per second.
        let base = 1_000;
        fleet.send(
            0,
            &Command::Publish {
                room: room.into(),
                rate_per_s: 4.0,
                count: repeats,
                payload_bytes: 64,
                first_seq: base,
            },
        );
        fleet.wait_sent_from(1)?;
        std::thread::sleep(Duration::from_millis(500));
        let single = fleet.collect()?;
        let single_done = completion_ms(&single, base..base + repeats, ready);
        // Sustained: publish rates at which one send per delivery would need
        // 1.5, 3 and 6 times the ceiling. A run counts only if every member
        // got every message (the loaders share the cores, so past some rate
        // they cannot keep up and members get cut off as slow consumers).
        let total_ceiling = ladder_ceiling.or(ceiling_rate).unwrap_or(100_000.0) * self.plan.workers as f64;
        let mut runs = Vec::new();
        let mut best: Option<FanoutRun> = None;
        for (k, factor) in [1.5, 3.0, 6.0].into_iter().enumerate() {
            let rate = (factor * total_ceiling / ready as f64).max(1.0);
            let count = (rate * self.plan.sustain_s as f64) as u32;
            let base = 100_000 * (k as u32 + 1);
            let cpu0 = ProcStat::process_cpu(s.pid());
            let t0 = Instant::now();
            fleet.send(
                0,
                &Command::Publish { room: room.into(), rate_per_s: rate, count, payload_bytes: 64, first_seq: base },
            );
            fleet.wait_sent_from(1)?;
            std::thread::sleep(Duration::from_secs(2));
            let c = fleet.collect()?;
            let (user, sys) = ProcStat::process_cpu(s.pid()).since(&cpu0);
            let done = completion_ms(&c, base..base + count, ready);
            let complete = done.len() == count as usize && c.closed == 0;
            // Each message's send slot with its own completion (pairing the
            // sorted completions with the slots in order put the slowest
            // last and overstated the window).
            let window = window_s(&c, base..base + count, rate).max(t0.elapsed().as_secs_f64() - 2.0).max(0.001);
            let run = FanoutRun {
                offered_vs_ceiling: factor,
                publish_rate_per_s: rate,
                messages: count,
                complete,
                members_cut_off: c.closed,
                deliveries: c.received,
                deliveries_per_s: c.received as f64 / window,
                vs_ceiling: c.received as f64 / window / total_ceiling,
                p50_ms: c.hist.value_at_quantile(0.5) as f64 / 1e3,
                p99_ms: c.hist.value_at_quantile(0.99) as f64 / 1e3,
                server_user_ns_per_delivery: user / c.received.max(1) as f64,
                server_sys_ns_per_delivery: sys / c.received.max(1) as f64,
            };
            note(format!(
                "  sustained {factor}x ceiling: {:.0} deliveries/s, p99 {:.1} ms, complete: {complete}",
                run.deliveries_per_s, run.p99_ms
            ));
            runs.push(run.clone());
            if !complete {
                break;
            }
            best = Some(run);
        }
        fleet.quit();
        Ok(Fanout {
            members: ready,
            send_ceiling_per_s_per_core: ceiling_rate,
            ceiling_completion_p50_ms: q(&ceiling_done, 0.5),
            single: Completion { p50_ms: q(&single_done, 0.5), p99_ms: q(&single_done, 0.99) },
            sustained: best,
            sustained_runs: runs,
        })
    }

    fn broadcast(&mut self, s: &ServerProc) -> Result<Broadcast, String> {
        let admin = s.admin.ok_or("broadcast needs the admin API")?;
        let n = self.plan.connections;
        note(format!("{}: broadcast to {n} connections", s.name));
        let (mut fleet, ready, _) = self.fleet(s.addr, n, "bc-u", None)?;
        let _ = fleet.collect()?;
        let repeats = self.plan.fanout_repeats;
        for r in 0..repeats {
            let (st, body) =
                http(admin, "POST", "/broadcast", &timed_payload(r, 64), None).map_err(|e| e.to_string())?;
            if st != 200 {
                return Err(format!("broadcast: HTTP {st}: {body}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let c = fleet.collect()?;
        let done = completion_ms(&c, 0..repeats, ready);
        fleet.quit();
        Ok(Broadcast { connections: ready, p50_ms: q(&done, 0.5), p99_ms: q(&done, 0.99) })
    }

    /// Heartbeats: a server (`tag`) that PINGs after 250 ms of silence;
    /// every connection answers.
    fn heartbeat(&mut self, tag: &str) -> Result<Heartbeat, String> {
        // Every connection pinged after 250 ms of silence: enough heartbeats
        // in the window for the tick-sampled user/system split to be
        // precise. The PING goes at the first 50 ms tick past that, so each
        // connection gets about 3.3-3.5 a second (13,300-14,000/s over
        // 4,000), not 4: the report gives the rate it measured.
        let extra = "\n[timeouts]\ntick_ms = 50\nheartbeat_interval_ms = 250\nidle_timeout_ms = 2000\n";
        let s = ServerProc::switchboard(
            &self.switchboard_bin,
            &self.out,
            tag,
            self.plan.workers,
            Delivery::AtMostOnce,
            &self.plan.server_config(extra),
        )?;
        let n = self.plan.connections;
        note(format!("{}: heartbeats, {n} connections pinged after 250 ms of silence", self.server_name()));
        let (mut fleet, ready, _) = self.fleet(s.addr, n, "hb-u", None)?;
        std::thread::sleep(Duration::from_secs(3));
        let pings = |s: &ServerProc| s.stats().map(|v| v.stats.pings_sent).unwrap_or(0);
        let (p0, cpu0, t0) = (pings(&s), ProcStat::process_cpu(s.pid()), Instant::now());
        std::thread::sleep(Duration::from_secs(self.plan.heartbeat_s));
        let (p1, cpu1, dt) = (pings(&s), ProcStat::process_cpu(s.pid()), t0.elapsed());
        let c = fleet.collect()?;
        fleet.quit();
        s.stop();
        let beats = p1.saturating_sub(p0).max(1) as f64;
        let (user, sys) = cpu1.since(&cpu0);
        Ok(Heartbeat {
            connections: ready,
            per_s: beats / dt.as_secs_f64(),
            server_user_ns_each: user / beats,
            server_sys_ns_each: sys / beats,
            closed_by_server: c.closed,
        })
    }

    /// Login/logout churn against a fresh server (`tag`): RSS after a
    /// warm-up and at the end (churn.rs).
    fn churn(&mut self, tag: &str) -> Result<Churn, String> {
        let p = churn::ChurnPlan {
            warmup: self.plan.churn_warmup,
            workers: self.plan.workers,
            server_config: self.plan.server_config(""),
            tag: tag.into(),
            ..churn::ChurnPlan::new(self.plan.churn_cycles)
        };
        let name = self.server_name();
        note(format!("{name}: login/logout churn, {} cycles after {} of warm-up", p.cycles, p.warmup));
        let r = churn::run(&self.switchboard_bin, &self.out, &p)?;
        note(format!("  {}", r.summary()));
        Ok(r)
    }

    /// Switchboard over WebSocket, then nginx + nchan (unless disabled).
    fn websocket(&mut self) -> Result<(WsSuite, NchanPeer), String> {
        let s = ServerProc::switchboard(
            &self.switchboard_bin,
            &self.out,
            "ws",
            self.plan.workers,
            Delivery::AtMostOnce,
            &self.plan.server_config(""),
        )?;
        let r = self.ws_suite(&s, WsServer::Switchboard);
        s.stop();
        let ws = r?;
        let nchan =
            if self.nchan { self.nchan_peer(&ws) } else { NchanPeer::absent("not run (--no-peers or --no-nchan)") };
        Ok((ws, nchan))
    }

    /// Only the WebSocket comparison (`--ws-only`).
    fn run_ws_only(&mut self) -> Result<Report, String> {
        let t0 = Instant::now();
        let (websocket, nchan) = self.websocket()?;
        Ok(Report {
            mode: format!("{} (WebSocket only)", self.plan.mode),
            machine: machine(),
            elapsed_s: t0.elapsed().as_secs_f64(),
            tcp: None,
            websocket,
            peers: Peers { tokio: None, nchan },
            notes: self.log.clone(),
        })
    }

    /// `switchboard (<poller>)` for the pass in progress, in progress notes.
    fn server_name(&self) -> &'static str {
        match self.plan.poller {
            Some(PollerKind::Epoll) => "switchboard (epoll)",
            Some(PollerKind::IoUring) => "switchboard (io_uring)",
            None => "switchboard",
        }
    }

    pub fn run(&mut self) -> Result<Report, String> {
        std::fs::create_dir_all(&self.out).map_err(|e| e.to_string())?;
        // Every server of the main pass gets its mode written into its
        // config, so the report says which mode it measured whatever the
        // binary's default.
        let main_poller = self.plan.main_poller();
        self.plan.poller = Some(main_poller);
        let default = switchboard::config::Config::default().server.poller;
        if main_poller != default || self.plan.other_pollers().is_empty() {
            self.log.push(format!(
                "every Switchboard server of the main pass had server.poller = \"{}\" (this build's default: \"{}\"){}",
                poller_name(main_poller),
                poller_name(default),
                if self.plan.other_pollers().is_empty() { "; no other data path was selected (--pollers)" } else { "" }
            ));
        }
        if self.plan.ws_only {
            return self.run_ws_only();
        }
        let t0 = Instant::now();
        let plan = self.plan.clone();
        let no_extra = "";
        // Switchboard.
        let mut sb = ServerProc::switchboard(
            &self.switchboard_bin,
            &self.out,
            "main",
            plan.workers,
            Delivery::AtMostOnce,
            &plan.server_config(no_extra),
        )?;
        sb.name = self.server_name();
        let idle = self.idle(&sb)?;
        let unicast = self.unicast(&sb)?;
        let fanout = self.fanout(&sb, None)?;
        let broadcast = self.broadcast(&sb)?;
        sb.stop();
        let reliable = self.reliable(&idle, &unicast)?;
        let heartbeat = self.heartbeat("heartbeat")?;
        let churn = self.churn("churn")?;
        let main_mode = DataPathMode {
            poller: main_poller,
            main_pass: true,
            idle: idle.clone(),
            unicast: unicast.clone(),
            fanout: fanout.clone(),
            heartbeat: heartbeat.clone(),
            churn: churn.clone(),
        };
        let data_path = self.data_path(main_mode);
        let api = self.api()?;
        let cluster = self.cluster_if_redis()?;
        let ceiling = fanout.send_ceiling_per_s_per_core;

        // The kernel's floor for relays: the bare relay, same loaders.
        let relay = ServerProc::peer("ceiling-relay", &self.bench_exe.clone(), &["ceiling-relay"], &plan)?;
        let relay_unicast = self.unicast(&relay)?;
        relay.stop();

        // Peers.
        let tokio = match self.tokio_bin.clone() {
            Some(bin) => {
                let t = ServerProc::peer("tokio-baseline", &bin, &[], &plan)?;
                let t_idle = self.idle(&t)?;
                let t_unicast = self.unicast(&t)?;
                let t_fanout = self.fanout(&t, ceiling)?;
                t.stop();
                Some(TokioPeer {
                    what: "benches/src/bin/tokio-baseline.rs: the same protocol, a tokio task (plus a writer task and a channel) per connection".into(),
                    ratios_switchboard_over_peer: TokioRatios::between(&idle, &unicast, &fanout, &t_idle, &t_unicast, &t_fanout),
                    idle: t_idle,
                    unicast: t_unicast,
                    fanout: t_fanout,
                })
            }
            None => None,
        };
        let (websocket, nchan) = self.websocket()?;
        let mut tcp = self.assemble(idle, unicast, fanout, broadcast, heartbeat, relay_unicast, churn, reliable, api);
        tcp.cluster = cluster;
        tcp.data_path = data_path;
        Ok(Report {
            mode: self.plan.mode.into(),
            machine: machine(),
            elapsed_s: t0.elapsed().as_secs_f64(),
            tcp: Some(tcp),
            websocket,
            peers: Peers { tokio, nchan },
            notes: self.log.clone(),
        })
    }

    /// Switchboard's raw TCP figures, with the bare relay's unicast as the
    /// kernel's floor.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        &self,
        idle: Idle,
        unicast: Unicast,
        fanout: Fanout,
        broadcast: Broadcast,
        heartbeat: Heartbeat,
        relay: Unicast,
        churn: Churn,
        reliable: Reliable,
        api: ApiBench,
    ) -> TcpReport {
        let (user_b, kern_b) = (idle.server_user_bytes_per_conn, idle.server_kernel_bytes_per_conn);
        let sb_max = &unicast.max;
        let relay_max = &relay.max;
        let relay_per_core = relay_max.msgs_per_server_core_s();
        let sb_per_core = sb_max.msgs_per_server_core_s();
        let per_core_ceiling = fanout.send_ceiling_per_s_per_core;
        TcpReport {
            connections: idle.connections,
            server_user_bytes_per_conn: user_b,
            server_kernel_bytes_per_conn: kern_b,
            kernel_bytes_method: "half of the host's /proc/meminfo Slab growth per connection (both ends of every connection, and the loaders' epoll entries, are on this host): an upper bound for the server's end".into(),
            connect_rate_per_s: idle.connect_rate_per_s,
            unicast: UnicastSummary {
                msgs_per_s: sb_max.msgs_per_s,
                p50_us: sb_max.p50_us,
                p99_us: sb_max.p99_us,
                p999_us: sb_max.p999_us,
                max_us: sb_max.max_us,
                at_half_max: unicast.at_half_max.clone(),
                server_user_ns_per_msg: sb_max.server_user_ns_per_msg,
                server_sys_ns_per_msg: sb_max.server_sys_ns_per_msg,
                msgs_per_server_core_s: sb_per_core,
                fraction_of_kernel_ceiling_per_core: ratio(sb_per_core, relay_per_core),
                steps: unicast.steps,
            },
            unicast_ceiling: UnicastCeiling {
                what: "the bare relay (switchboard-bench ceiling-relay): epoll, recv, one blocking send per message; same loaders and load".into(),
                msgs_per_s: relay_max.msgs_per_s,
                msgs_per_server_core_s: relay_per_core,
                server_user_ns_per_msg: relay_max.server_user_ns_per_msg,
                server_sys_ns_per_msg: relay_max.server_sys_ns_per_msg,
            },
            fanout: FanoutSummary::of(fanout),
            broadcast,
            heartbeat,
            send_ceiling_per_s: per_core_ceiling.map(|c| c * self.plan.workers as f64),
            send_ceiling_per_s_per_core: per_core_ceiling,
            projection_1m: Projection::one_million(user_b, kern_b),
            rss_curve: idle.rss_curve,
            metrics_scrape: idle.metrics_scrape,
            churn,
            reliable: Some(reliable),
            api: Some(api),
            cluster: None,
            data_path: None,
        }
    }

    /// The data paths side by side: `main`, the main pass's figures, and
    /// for every other selected mode a pass of its own; none when only one
    /// mode was selected. A pass that fails is reported as not measured
    /// rather than ending the run.
    fn data_path(&mut self, main: DataPathMode) -> Option<DataPath> {
        let others = self.plan.other_pollers();
        if others.is_empty() {
            return None;
        }
        let t0 = Instant::now();
        let ladder_ceiling = main.fanout.send_ceiling_per_s_per_core;
        let main_poller = main.poller;
        let (mut epoll, mut io_uring) = (None, None);
        let mut not_measured = Vec::new();
        let mut put = |m: DataPathMode| match m.poller {
            PollerKind::Epoll => epoll = Some(m),
            PollerKind::IoUring => io_uring = Some(m),
        };
        put(main);
        for p in others {
            let main_setting = self.plan.poller.replace(p);
            let r = self.data_path_pass(p, ladder_ceiling);
            self.plan.poller = main_setting;
            match r {
                Ok(m) => put(m),
                Err(e) => {
                    note(format!("data path {}: {e}", poller_name(p)));
                    not_measured.push(format!("server.poller = \"{}\": {e}", poller_name(p)));
                }
            }
        }
        let p = &self.plan;
        let method = format!(
            "each mode is `server.poller` in the config of every server it ran on, the rest of the config as in the main pass (at-most-once SENDs, {} workers). The mode of the main pass ({}) has the figures at the top of this report; the other ran the same scenarios against fresh servers of its own right after the main pass's churn run: the 4-step idle hold and the unicast ladder over {} connections (the same offered rates, {} s each), fan-out to {} members (its sustained rates built on the main pass's send ceiling, so both modes are offered the same rates), heartbeats (a PING after 250 ms of silence on every connection, at the first 50 ms tick past it, {} s) and {} churn cycles after {} of warm-up. \"Same offered rate\" is the highest rate of the ladder that both modes kept up with. One run of each mode on a shared host: read the ratios with the run's noise in mind.",
            p.workers,
            poller_name(main_poller),
            p.connections,
            p.unicast_s,
            p.members,
            p.heartbeat_s,
            p.churn_cycles,
            p.churn_warmup
        );
        Some(DataPath::judge(main_poller, epoll, io_uring, not_measured, method, t0.elapsed().as_secs_f64()))
    }

    /// One data path's pass (the plan's `poller` set to `p`): idle, unicast
    /// and fan-out against one fresh server, then heartbeats and churn
    /// against theirs, as the main pass runs them.
    fn data_path_pass(&mut self, p: PollerKind, ladder_ceiling: Option<f64>) -> Result<DataPathMode, String> {
        let name = poller_name(p);
        let mut s = ServerProc::switchboard(
            &self.switchboard_bin,
            &self.out,
            &format!("datapath-{name}"),
            self.plan.workers,
            Delivery::AtMostOnce,
            &self.plan.server_config(""),
        )?;
        s.name = self.server_name();
        let idle = self.idle(&s)?;
        let unicast = self.unicast(&s)?;
        let fanout = self.fanout(&s, ladder_ceiling)?;
        s.stop();
        let heartbeat = self.heartbeat(&format!("heartbeat-{name}"))?;
        let churn = self.churn(&format!("churn-{name}"))?;
        Ok(DataPathMode { poller: p, main_pass: false, idle, unicast, fanout, heartbeat, churn })
    }
}

impl UnicastStep {
    /// One measured window at `rate`: (sent, blocked) by the loaders, what
    /// they collected, over `elapsed` seconds, with the servers' (user,
    /// system) CPU nanoseconds in it.
    pub(super) fn measured(
        rate: u64,
        (sent, blocked): (u64, u64),
        c: &Collected,
        elapsed: f64,
        (user, sys): (f64, f64),
        store: Option<StoreStep>,
    ) -> UnicastStep {
        let p = percentiles(&c.hist);
        UnicastStep {
            offered_per_s: rate,
            sent,
            blocked,
            received: c.received,
            msgs_per_s: c.received as f64 / elapsed,
            p50_us: p.p50_us,
            p99_us: p.p99_us,
            p999_us: p.p999_us,
            max_us: p.max_us,
            server_user_ns_per_msg: user / c.received.max(1) as f64,
            server_sys_ns_per_msg: sys / c.received.max(1) as f64,
            store,
            closed: c.closed,
        }
    }
}

/// One unicast rate for `secs`; with `s`'s store counters when it has a
/// store.
pub(super) fn unicast_step(
    fleet: &mut Fleet,
    s: &ServerProc,
    users: u32,
    rate: u64,
    secs: u64,
) -> Result<UnicastStep, String> {
    let pid = s.pid();
    let _ = fleet.collect()?;
    let store0 = s.stats().and_then(|st| st.store);
    let cpu0 = ProcStat::process_cpu(pid);
    let t0 = Instant::now();
    fleet.start_unicast(rate, secs * 1000, users, 64, 0x5EED + rate);
    let (sent, blocked) = fleet.wait_sent()?;
    std::thread::sleep(Duration::from_millis(500));
    let elapsed = t0.elapsed().as_secs_f64() - 0.5;
    let (user, sys) = ProcStat::process_cpu(pid).since(&cpu0);
    let c = fleet.collect()?;
    let store1 = store0.and_then(|_| s.stats()).and_then(|st| st.store);
    let store = store0.zip(store1).map(|(a, b)| b.since(&a, elapsed, &c));
    Ok(UnicastStep::measured(rate, (sent, blocked), &c, elapsed, (user, sys), store))
}

/// The end of the window the deliveries of `seqs` took, in seconds after
/// the first publish: each message's send slot at `rate` plus the time its
/// last delivery took.
pub(super) fn window_s(c: &Collected, seqs: std::ops::Range<u32>, rate: f64) -> f64 {
    let first = seqs.start;
    seqs.filter_map(|s| c.per_seq.get(&s).map(|&(_, m)| (s - first) as f64 / rate + m as f64 / 1e6)).fold(0.0, f64::max)
}

/// Completion time (ms) of each message in `seqs`: when its last receiver
/// got it. Messages not received by everyone count as missing (skipped).
pub(super) fn completion_ms(c: &Collected, seqs: std::ops::Range<u32>, receivers: u32) -> Vec<f64> {
    let mut v: Vec<f64> = seqs
        .filter_map(|s| c.per_seq.get(&s).filter(|(n, _)| *n >= receivers as u64).map(|&(_, m)| m as f64 / 1e3))
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The `q` quantile of sorted `v`; none of an empty one.
/// Scrapes in [`metrics_scrape`].
const SCRAPES: u32 = 50;

/// Times [`SCRAPES`] scrapes of `GET /metrics` (and a `/healthz` after
/// each) with `connections` open: the report's "metrics scrape at N
/// connections" (scripts/metrics-scrape.sh measures the same on its own).
fn metrics_scrape(admin: SocketAddr, connections: u32) -> Result<MetricsScrape, String> {
    let time = |path: &str| -> Result<f64, String> {
        let t0 = Instant::now();
        let (status, body) = http(admin, "GET", path, b"", None).map_err(|e| format!("GET {path}: {e}"))?;
        if status != 200 {
            return Err(format!("GET {path}: {status} {body}"));
        }
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    let (mut scrape, mut health) = (Vec::new(), Vec::new());
    for _ in 0..SCRAPES {
        scrape.push(time("/metrics")?);
        health.push(time("/healthz")?);
    }
    scrape.sort_by(f64::total_cmp);
    health.sort_by(f64::total_cmp);
    let s = MetricsScrape {
        connections,
        scrapes: SCRAPES,
        median_ms: q(&scrape, 0.5).unwrap_or(0.0),
        max_ms: scrape.last().copied().unwrap_or(0.0),
        healthz_median_ms: q(&health, 0.5).unwrap_or(0.0),
        healthz_max_ms: health.last().copied().unwrap_or(0.0),
    };
    note(s.line());
    Ok(s)
}

pub(super) fn q(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    Some(v[((v.len() - 1) as f64 * q).round() as usize])
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let mem = switchboard::limits::mem_available_bytes();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string());
    Machine {
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model: cpu,
        mem_available_bytes: mem,
        kernel,
        nofile_limit: switchboard::limits::raise_nofile().ok().map(|(s, _)| s),
    }
}

/// The rates tried when a unicast ladder misses its first rate: halving,
/// down to 1,000/s.
fn rates_below(first: u64) -> impl Iterator<Item = u64> {
    std::iter::successors(Some(first / 2), |r| Some(r / 2)).take_while(|&r| r >= 1_000)
}

#[cfg(test)]
mod ladder_tests {
    use super::rates_below;

    #[test]
    fn a_missed_first_rate_is_halved_down_to_a_thousand() {
        assert_eq!(rates_below(10_000).collect::<Vec<_>>(), [5_000, 2_500, 1_250]);
        assert_eq!(rates_below(1_500).count(), 0, "nothing below 1,000/s");
    }
}

#[cfg(test)]
mod port_tests {
    use super::free_ports;

    #[test]
    fn the_ports_of_one_server_are_distinct() {
        for _ in 0..200 {
            let [a, b, c] = free_ports::<3>();
            assert!(a != b && b != c && a != c, "{a} {b} {c}");
        }
    }
}

#[cfg(test)]
mod window_tests {
    use super::window_s;
    use switchboard_bench::loadgen::Collected;

    /// The fan-out's window pairs each message's send slot with its own
    /// last delivery. Pairing the sorted completions with the slots in
    /// order put the slowest last: here 1.0 s instead of 0.901 s.
    #[test]
    fn each_message_keeps_its_own_send_slot() {
        let mut c = Collected {
            hist: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            received: 0,
            pongs: 0,
            closed: 0,
            per_seq: Default::default(),
            skipped: 0,
            duplicates: 0,
            acks: 0,
            fetches: 0,
        };
        // 10 messages at 10/s from seq 100: the first took 100 ms to reach
        // its last member, the others 1 ms.
        for s in 100..110 {
            c.per_seq.insert(s, (4, if s == 100 { 100_000 } else { 1_000 }));
        }
        let w = window_s(&c, 100..110, 10.0);
        assert!((w - 0.901).abs() < 1e-9, "{w}");
    }
}
