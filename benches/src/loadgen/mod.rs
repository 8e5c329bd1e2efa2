//! The load generator: loader processes and the coordinator that drives them.
//!
//! Owns: spawning loader processes (each holds at most a few thousand
//! connections: a process may hold at most 20,000 descriptors on the
//! reference machines, and each source address 127.0.0.x has its own
//! ephemeral ports), sending them commands, merging what they measured, and
//! reading a server's memory and CPU from /proc.
//! Must not: estimate anything. Every figure comes from a measurement in the
//! run; projections are labelled as such by the caller.
//!
//! Used by the `switchboard-bench` binary and by the criterion benches in
//! `benches/benches/`; a loader process is `switchboard-bench child …`.

pub mod ctl;
pub mod loader;
pub mod perfsplit;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command as Proc, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;

pub use ctl::{Command, Event};

/// Connections per loader process by default.
pub const CONNS_PER_LOADER: u32 = 8000;

/// Reads /proc figures of a process or thread.
pub struct ProcStat;

impl ProcStat {
    /// Resident set size in bytes.
    pub fn rss_bytes(pid: u32) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }

    fn ticks_of(stat: &str) -> Option<(u64, u64)> {
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
    }

    /// Sums schedstat nanoseconds and utime/stime ticks over the task
    /// directories in `/proc/<pid>/task` that `keep` accepts (by `comm`).
    fn sum_tasks(task_dir: &str, keep: impl Fn(&str) -> bool) -> ThreadCpu {
        let mut c = ThreadCpu::default();
        let Ok(dir) = std::fs::read_dir(task_dir) else { return c };
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if !keep(&comm) {
                continue;
            }
            let sched = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            c.total_ns += sched.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if let Some((u, s)) =
                std::fs::read_to_string(t.path().join("stat")).ok().as_deref().and_then(Self::ticks_of)
            {
                c.utime += u;
                c.stime += s;
            }
        }
        c
    }

    /// CPU time so far of this process's threads named `prefix*`.
    pub fn threads_cpu(prefix: &str) -> ThreadCpu {
        Self::sum_tasks("/proc/self/task", |comm| comm.starts_with(prefix))
    }

    /// Thread ids of this process's threads named `prefix*`.
    pub fn thread_ids(prefix: &str) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
        dir.flatten()
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
            .filter_map(|t| t.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// CPU time so far of every thread of process `pid`.
    pub fn process_cpu(pid: u32) -> ThreadCpu {
        Self::sum_tasks(&format!("/proc/{pid}/task"), |_| true)
    }

    /// Proportional set size in bytes (`Pss:` of smaps_rollup): shared
    /// pages divided among the processes mapping them, so a sum over
    /// processes counts them once.
    pub fn pss_bytes(pid: u32) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        let line = s.lines().find(|l| l.starts_with("Pss:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }

    /// `pid` and its direct children (a multi-process server: nginx's master
    /// and its workers).
    pub fn process_tree(pid: u32) -> Vec<u32> {
        let mut v = vec![pid];
        let Ok(dir) = std::fs::read_dir("/proc") else { return v };
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
            let ppid = stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(pid) {
                v.push(p);
            }
        }
        v
    }

    /// RSS summed over processes (`None` if one cannot be read).
    pub fn rss_sum(pids: &[u32]) -> Option<u64> {
        pids.iter().map(|&p| Self::rss_bytes(p)).sum()
    }

    /// PSS summed over processes (`None` if one cannot be read).
    pub fn pss_sum(pids: &[u32]) -> Option<u64> {
        pids.iter().map(|&p| Self::pss_bytes(p)).sum()
    }

    /// CPU time so far of every thread of every process in `pids`.
    pub fn processes_cpu(pids: &[u32]) -> ThreadCpu {
        pids.iter().map(|&p| Self::process_cpu(p)).fold(ThreadCpu::default(), |a, b| ThreadCpu {
            total_ns: a.total_ns + b.total_ns,
            utime: a.utime + b.utime,
            stime: a.stime + b.stime,
        })
    }

    /// Kernel slab memory in bytes (`Slab:` of /proc/meminfo).
    pub fn slab_bytes() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = s.lines().find(|l| l.starts_with("Slab:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }
}

/// CPU time of a set of threads: the scheduler's nanosecond total, and the
/// tick-sampled user/system split.
#[derive(Copy, Clone, Debug, Default)]
pub struct ThreadCpu {
    pub total_ns: u64,
    pub utime: u64,
    pub stime: u64,
}

impl ThreadCpu {
    /// (user ns, system ns) between `earlier` and `self`: the nanosecond
    /// total split in the ratio of the sampled ticks (the kernel's own
    /// method for utime/stime).
    pub fn since(&self, earlier: &ThreadCpu) -> (f64, f64) {
        let total = self.total_ns.saturating_sub(earlier.total_ns) as f64;
        let (u, s) = (self.utime.saturating_sub(earlier.utime), self.stime.saturating_sub(earlier.stime));
        let share = if u + s == 0 { 0.5 } else { u as f64 / (u + s) as f64 };
        (total * share, total * (1.0 - share))
    }
}

/// What a fleet of loaders connects as.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// The `switchboard-bench` executable (loaders are its `child` command).
    pub exe: PathBuf,
    pub addr: SocketAddr,
    pub connections: u32,
    /// Loader processes; 0 = one per `CONNS_PER_LOADER` connections.
    pub procs: u32,
    /// JWT secret the server checks.
    pub secret: String,
    /// User ids are `<prefix><index>`.
    pub user_prefix: String,
    /// Room every connection joins after logging in.
    pub room: Option<String>,
    /// Loader k binds to 127.0.0.<src_base + k>.
    pub src_base: u8,
    /// Raw TCP, Switchboard over WebSocket, or plain WebSocket (nchan).
    pub transport: loader::Transport,
    /// WebSocket upgrade path template (see `LoaderArgs::ws_path`).
    pub ws_path: Option<String>,
    /// Log every connection in as this device of its user: reliable
    /// delivery, INBOX frames acknowledged (raw TCP only).
    pub device: Option<String>,
}

impl FleetSpec {
    /// A spec with defaults: dev secret, prefix `u`, no room, 127.0.0.10+.
    pub fn new(exe: PathBuf, addr: SocketAddr, connections: u32) -> FleetSpec {
        FleetSpec {
            exe,
            addr,
            connections,
            procs: 0,
            secret: switchboard::config::DEV_JWT_SECRET.to_string(),
            user_prefix: "u".into(),
            room: None,
            src_base: 10,
            transport: loader::Transport::Raw,
            ws_path: None,
            device: None,
        }
    }
}

/// What the loaders recorded since the last collect, merged.
pub struct Collected {
    /// End-to-end latency of every PUSH/ROOM_MSG received (µs).
    pub hist: Histogram<u64>,
    /// PUSH and ROOM_MSG frames received.
    pub received: u64,
    pub pongs: u64,
    /// Connections closed by the server.
    pub closed: u32,
    /// Per message sequence number (room benchmarks): receivers and the
    /// latest arrival (µs after the send timestamp).
    pub per_seq: HashMap<u32, (u64, u64)>,
    /// SKIPPED notices summed.
    pub skipped: u64,
    /// Device connections: INBOX frames received again (retransmits).
    pub duplicates: u64,
    /// Device connections: ACKs and FETCHes sent.
    pub acks: u64,
    pub fetches: u64,
}

/// Loader processes of one run.
pub struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    events: mpsc::Receiver<(usize, Event)>,
    per_child: Vec<u32>,
}

impl Fleet {
    /// Starts the loaders; they connect and log in at once.
    pub fn spawn(spec: &FleetSpec) -> std::io::Result<Fleet> {
        let procs = if spec.procs == 0 { spec.connections.div_ceil(CONNS_PER_LOADER).max(1) } else { spec.procs };
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let mut per_child = Vec::new();
        let base = spec.connections / procs;
        let mut first = 0;
        for k in 0..procs {
            let count = base + u32::from(k < spec.connections % procs);
            let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, spec.src_base.wrapping_add(k as u8)));
            let mut cmd = Proc::new(&spec.exe);
            cmd.args(["child", "--addr", &spec.addr.to_string(), "--src-ip", &src.to_string()])
                .args(["--first-user", &first.to_string(), "--count", &count.to_string()])
                .args(["--secret", &spec.secret, "--user-prefix", &spec.user_prefix]);
            if let Some(room) = &spec.room {
                cmd.args(["--room", room]);
            }
            cmd.args(["--transport", spec.transport.name()]);
            if let Some(path) = &spec.ws_path {
                cmd.args(["--ws-path", path]);
            }
            if let Some(device) = &spec.device {
                cmd.args(["--device", device]);
            }
            let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
            first += count;
            per_child.push(count);
            stdins.push(child.stdin.take().expect("piped"));
            let out = child.stdout.take().expect("piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(e) => {
                            if tx.send((k as usize, e)).is_err() {
                                break;
                            }
                        }
                        Err(e) => eprintln!("loader {k}: unparsable event {line:?}: {e}"),
                    }
                }
            });
            children.push(child);
        }
        Ok(Fleet { children, stdins, events: rx, per_child })
    }

    /// Loader processes.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether there are no loaders.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Sends a command to loader `k`.
    pub fn send(&mut self, k: usize, cmd: &Command) {
        let line = serde_json::to_string(cmd).expect("commands serialise");
        let _ = writeln!(self.stdins[k], "{line}");
    }

    /// Sends a command to every loader.
    pub fn broadcast(&mut self, cmd: &Command) {
        for k in 0..self.stdins.len() {
            self.send(k, cmd);
        }
    }

    /// Waits until every loader reported `Ready`; prints progress to stderr.
    /// Returns (ready, failed, ramp time).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(u32, u32, Duration), String> {
        let t0 = Instant::now();
        let n = self.children.len();
        let mut ready = vec![None; n];
        let mut progress = vec![(0u32, 0u32); n];
        let mut last_print = Instant::now();
        let mut first_error = None;
        while ready.iter().any(|r: &Option<(u32, u32)>| r.is_none()) {
            let left = timeout.checked_sub(t0.elapsed()).ok_or_else(|| {
                format!("ramp timed out after {timeout:?}: {progress:?} (connected, ready) per loader")
            })?;
            match self.events.recv_timeout(left.min(Duration::from_millis(500))) {
                Ok((k, Event::Progress { connected, ready: r, .. })) => progress[k] = (connected, r),
                Ok((k, Event::Ready { ready: r, failed, first_error: fe, .. })) => {
                    ready[k] = Some((r, failed));
                    progress[k] = (r + failed, r);
                    if first_error.is_none() {
                        first_error = fe;
                    }
                }
                Ok((k, Event::Error { message })) => return Err(format!("loader {k}: {message}")),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err("a loader exited".into()),
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                let r: u32 = progress.iter().map(|p| p.1).sum();
                let total: u32 = self.per_child.iter().sum();
                eprintln!("  ramp: {r} / {total} ready ({:.1} s)", t0.elapsed().as_secs_f64());
            }
        }
        let (r, f) = ready.iter().flatten().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if f > 0 {
            eprintln!("  {f} connections failed; first error: {}", first_error.unwrap_or_default());
        }
        Ok((r, f, t0.elapsed()))
    }

    /// Collects and merges what every loader recorded since the last call.
    pub fn collect(&mut self) -> Result<Collected, String> {
        self.broadcast(&Command::Collect);
        let mut out = Collected {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            received: 0,
            pongs: 0,
            closed: 0,
            per_seq: HashMap::new(),
            skipped: 0,
            duplicates: 0,
            acks: 0,
            fetches: 0,
        };
        let mut got = 0;
        while got < self.children.len() {
            match self.events.recv_timeout(Duration::from_secs(30)) {
                Ok((
                    _,
                    Event::Collected { received, pongs, closed, hist, per_seq, skipped, duplicates, acks, fetches },
                )) => {
                    let raw = base64::engine::general_purpose::STANDARD.decode(hist).map_err(|e| e.to_string())?;
                    let h: Histogram<u64> =
                        Deserializer::new().deserialize(&mut raw.as_slice()).map_err(|e| format!("{e:?}"))?;
                    out.hist.add(&h).map_err(|e| format!("{e:?}"))?;
                    out.received += received;
                    out.pongs += pongs;
                    out.closed += closed;
                    out.skipped += skipped;
                    out.duplicates += duplicates;
                    out.acks += acks;
                    out.fetches += fetches;
                    for (seq, count, max_us) in per_seq {
                        let e = out.per_seq.entry(seq).or_insert((0, 0));
                        e.0 += count as u64;
                        e.1 = e.1.max(max_us);
                    }
                    got += 1;
                }
                Ok((k, Event::Error { message })) => return Err(format!("loader {k}: {message}")),
                Ok(_) => {}
                Err(e) => return Err(format!("collect: {e}")),
            }
        }
        Ok(out)
    }

    /// Starts open-loop unicast on every loader, the total `rate_per_s`
    /// split between them, to this fleet's own users; `wait_sent` waits for
    /// the end.
    pub fn start_unicast(
        &mut self,
        rate_per_s: u64,
        duration_ms: u64,
        users_total: u32,
        payload_bytes: usize,
        seed: u64,
    ) {
        self.start_unicast_to(None, rate_per_s, duration_ms, users_total, payload_bytes, seed)
    }

    /// [`Fleet::start_unicast`] to the users `<to_prefix>0..users_total`
    /// (another fleet's, e.g. on another node) when `to_prefix` is given.
    pub fn start_unicast_to(
        &mut self,
        to_prefix: Option<&str>,
        rate_per_s: u64,
        duration_ms: u64,
        users_total: u32,
        payload_bytes: usize,
        seed: u64,
    ) {
        let procs = self.len() as u64;
        for k in 0..self.len() {
            let share = rate_per_s / procs + u64::from((k as u64) < rate_per_s % procs);
            let cmd = Command::Unicast {
                rate_per_s: share,
                duration_ms,
                users_total,
                payload_bytes,
                seed: seed + k as u64,
                to_prefix: to_prefix.map(String::from),
            };
            self.send(k, &cmd);
        }
    }

    /// Waits for every loader's `Sent` after a sending command; returns
    /// (sent, blocked).
    pub fn wait_sent(&mut self) -> Result<(u64, u64), String> {
        self.wait_sent_from(self.children.len())
    }

    /// Waits for `loaders` `Sent` reports (a command sent to only some).
    pub fn wait_sent_from(&mut self, loaders: usize) -> Result<(u64, u64), String> {
        let (mut sent, mut blocked, mut got) = (0, 0, 0);
        while got < loaders {
            match self.events.recv_timeout(Duration::from_secs(600)) {
                Ok((_, Event::Sent { sent: s, blocked: b, .. })) => {
                    sent += s;
                    blocked += b;
                    got += 1;
                }
                Ok((k, Event::Error { message })) => return Err(format!("loader {k}: {message}")),
                Ok(_) => {}
                Err(e) => return Err(format!("waiting for senders: {e}")),
            }
        }
        Ok((sent, blocked))
    }

    /// Tells the loaders to close everything and waits (10 s at most)
    /// for them to exit.
    pub fn quit(mut self) {
        self.broadcast(&Command::Quit);
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Percentiles of a latency histogram (µs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// p50/p99/p99.9/max of a latency histogram.
pub fn percentiles(h: &Histogram<u64>) -> Latency {
    Latency {
        count: h.len(),
        p50_us: h.value_at_quantile(0.50),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

/// A timed payload (`switchboard::timed`): the send time and `seq`, padded
/// to `len` bytes.
pub fn timed_payload(seq: u32, len: usize) -> Vec<u8> {
    switchboard::timed::payload(seq, len)
}

/// One request to the admin API: (status, body).
pub use switchboard::client::admin_request as http;
