//! The WebSocket scenarios of the capacity run: Switchboard over WebSocket
//! (subprotocol `switchboard.v1.bin`) next to nginx + nchan, with the same
//! loaders and the same load. Their figures are report.rs's [`WsSuite`];
//! the ratios and the report's WebSocket section are rendered there.
//!
//! Owns: finding nginx and the nchan module, writing an nginx.conf for them
//! in a temp dir and running nginx (a master and as many workers as
//! Switchboard has) on loopback; the WebSocket scenarios, measured the same
//! way on both servers: idle memory per connection (RSS, and PSS, summed
//! over the server's processes), room fan-out (one message at a time: until
//! the last subscriber has it; sustained publish rates: deliveries/s),
//! publish→deliver latency from the timestamp in the payload, and server
//! CPU per delivery (every thread of every server process, from /proc).
//! Must not: fail the report when nginx or nchan is missing or misbehaves:
//! the nchan peer is then reported absent, with the reason and the command
//! that installs it.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use switchboard_bench::loadgen::loader::Transport;
use switchboard_bench::loadgen::{timed_payload, Command, Fleet, ProcStat};

use super::report::{
    NchanPeer, NchanRun, WsFanout, WsIdle, WsRatios, WsRun, WsSingle, WsSuite, NCHAN_INSTALL, WS_WARMUP,
};
use super::scenarios::{completion_ms, free_port, note, q, Runner, ServerProc};
use super::Plan;

/// Overrides where nginx is looked for.
pub const NGINX_ENV: &str = "SWITCHBOARD_NGINX";
/// The room (nchan: channel) of the fan-out scenario.
const WS_ROOM: &str = "capacity-ws-room";
/// After the last publish, time for the deliveries in flight.
const DRAIN: Duration = Duration::from_millis(1000);
/// Single fan-out messages per second.
const SINGLE_RATE: f64 = 8.0;

/// The two servers of the WebSocket comparison.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum WsServer {
    /// Switchboard's WebSocket port, `switchboard.v1.bin`; members publish
    /// with PUBLISH frames.
    Switchboard,
    /// nginx + nchan: `/sub/<channel>` (websocket subscriber),
    /// `/pub/<channel>` (HTTP POST publisher).
    Nchan,
}

/// nchan's publisher: HTTP/1.1 POSTs to `/pub/<channel>`, pipelined on one
/// keep-alive connection (open loop, like a Switchboard member's PUBLISH
/// frames: a POST does not wait for the previous one's answer; a reader
/// thread checks every answer).
struct HttpPublisher {
    stream: TcpStream,
}

/// Reads `count` HTTP responses; returns how many were not 2xx.
fn read_responses(mut stream: TcpStream, count: u32) -> Result<u32, String> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut got, mut bad) = (0, 0);
    while got < count {
        let mut off = 0;
        while let Some(end) = buf[off..].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[off..off + end]).to_ascii_lowercase();
            let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
            if buf.len() < off + end + 4 + len {
                break;
            }
            off += end + 4 + len;
            got += 1;
            if !(200..300).contains(&status) {
                bad += 1;
            }
        }
        buf.drain(..off);
        if got >= count {
            break;
        }
        let n = stream.read(&mut chunk).map_err(|e| format!("publish responses: {e}"))?;
        if n == 0 {
            return Err(format!("nchan closed the publisher connection after {got} of {count} answers"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(bad)
}

impl HttpPublisher {
    fn connect(addr: SocketAddr) -> Result<HttpPublisher, String> {
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("publisher: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        Ok(HttpPublisher { stream })
    }

    /// Open loop: `count` timed messages at `rate_per_s`. Returns how many
    /// went out more than 10 ms behind their schedule (the socket was full:
    /// nginx was not reading them).
    fn run(&mut self, channel: &str, rate_per_s: f64, count: u32, first_seq: u32) -> Result<u64, String> {
        use std::io::Write;
        let reader = self.stream.try_clone().map_err(|e| e.to_string())?;
        let answers = std::thread::spawn(move || read_responses(reader, count));
        let t0 = Instant::now();
        let mut late = 0;
        for k in 0..count {
            let due = t0 + Duration::from_secs_f64(k as f64 / rate_per_s);
            let now = Instant::now();
            if now < due {
                std::thread::sleep(due - now);
            } else if now - due > Duration::from_millis(10) {
                late += 1;
            }
            let body = timed_payload(first_seq + k, 64);
            let mut req = format!(
                "POST /pub/{channel} HTTP/1.1\r\nHost: capacity\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            self.stream.write_all(&req).map_err(|e| format!("publish: {e}"))?;
        }
        let bad = answers.join().map_err(|_| "publish reader panicked".to_string())??;
        if bad > 0 {
            return Err(format!("nchan refused {bad} of {count} publishes"));
        }
        Ok(late)
    }
}

/// The nginx executable: `$SWITCHBOARD_NGINX` if set, else from PATH or
/// the usual sbin directories.
fn find_nginx() -> Result<PathBuf, String> {
    match std::env::var_os(NGINX_ENV) {
        Some(p) if Path::new(&p).is_file() => Ok(PathBuf::from(p)),
        Some(p) => Err(format!("nginx is not installed at {NGINX_ENV}={}", Path::new(&p).display())),
        None => find_in_path("nginx").ok_or_else(|| "nginx is not installed (no nginx in PATH or /usr/sbin)".into()),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The nchan module to `load_module`: `Ok(None)` when nginx has it built in.
fn find_nchan_module(nginx: &Path) -> Result<Option<PathBuf>, String> {
    let mut candidates: Vec<PathBuf> = [
        "/usr/lib/nginx/modules/ngx_nchan_module.so",
        "/usr/lib64/nginx/modules/ngx_nchan_module.so",
        "/usr/local/nginx/modules/ngx_nchan_module.so",
        "/usr/share/nginx/modules/ngx_nchan_module.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    // What the distribution's modules-enabled snippets load.
    for dir in ["/etc/nginx/modules-enabled", "/usr/share/nginx/modules-available"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("load_module") {
                    let p = rest.trim().trim_end_matches(';').trim().trim_matches('"');
                    if p.contains("nchan") {
                        candidates.insert(0, PathBuf::from(p));
                    }
                }
            }
        }
    }
    if let Some(p) = candidates.into_iter().find(|p| p.is_file()) {
        return Ok(Some(p));
    }
    let v = Proc::new(nginx).arg("-V").output().map_err(|e| format!("{} -V: {e}", nginx.display()))?;
    if String::from_utf8_lossy(&v.stderr).contains("nchan") {
        return Ok(None);
    }
    Err("the nchan module (ngx_nchan_module.so) is not installed".into())
}

fn nofile_hard() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills a plain struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    r.rlim_max
}

/// nginx + nchan on loopback in its own temp dir: (server, the dir).
fn start_nchan(out: &Path, plan: &Plan) -> Result<(ServerProc, PathBuf), String> {
    let nginx = find_nginx()?;
    let module = find_nchan_module(&nginx)?;
    let dir = std::env::temp_dir().join(format!("switchboard-capacity-nchan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let port = free_port();
    // Every process under 20,000 descriptors, and under this host's limit.
    let nofile = nofile_hard().min(19_500);
    let load = module.map(|m| format!("load_module {};\n", m.display())).unwrap_or_default();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 { "user root;\n" } else { "" };
    let d = dir.display();
    let conf = format!(
        "# Generated by switchboard-bench capacity: nginx + nchan, the WebSocket peer.\n\
         {load}daemon off;\nmaster_process on;\n{user}worker_processes {workers};\n\
         worker_rlimit_nofile {nofile};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{\n    worker_connections {conns};\n}}\n\
         http {{\n    access_log off;\n\
         \x20   client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
         \x20   nchan_shared_memory_size 256M;\n\
         \x20   server {{\n        listen 127.0.0.1:{port} backlog=4096;\n\
         \x20       location ~ ^/sub/(.+)$ {{\n            nchan_subscriber websocket;\n            nchan_channel_id $1;\n\
         \x20           # New subscribers get new messages only, like a room's new members.\n\
         \x20           nchan_subscriber_first_message newest;\n        }}\n\
         \x20       location ~ ^/pub/(.+)$ {{\n            nchan_publisher http;\n            nchan_channel_id $1;\n        }}\n\
         \x20   }}\n}}\n",
        workers = plan.workers,
        conns = nofile.saturating_sub(500),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, &conf).map_err(|e| e.to_string())?;
    let _ = std::fs::write(out.join("nginx-nchan.conf"), &conf);
    let log = std::fs::File::create(out.join("nginx-nchan.log")).map_err(|e| e.to_string())?;
    let child = Proc::new(&nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", nginx.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = ServerProc { name: "nginx-nchan", child, addr, admin: None, ws: Some(addr) };
    match s.wait_listening(Duration::from_secs(15)) {
        Ok(s) => {
            // The workers are up once the port answers; let them all start.
            std::thread::sleep(Duration::from_millis(300));
            Ok((s, dir))
        }
        Err(e) => {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            Err(format!("{e}; nginx error log: {}", log.trim()))
        }
    }
}

impl Runner {
    fn ws_fleet(
        &mut self,
        s: &ServerProc,
        kind: WsServer,
        n: u32,
        prefix: &str,
        room: Option<&str>,
    ) -> Result<(Fleet, u32, Duration), String> {
        let addr = s.ws.ok_or_else(|| format!("{} has no WebSocket address", s.name))?;
        let mut spec = self.spec(addr, n, prefix, None);
        match kind {
            WsServer::Switchboard => {
                spec.transport = Transport::Ws;
                spec.room = room.map(String::from);
            }
            WsServer::Nchan => {
                spec.transport = Transport::WsPlain;
                // Idle: a channel per user (a personal push channel, like a
                // logged-in Switchboard user's address); fan-out: the room.
                spec.ws_path = Some(match room {
                    Some(r) => format!("/sub/{r}"),
                    None => "/sub/{user}".into(),
                });
            }
        }
        self.spawn_ready(&spec)
    }

    /// Publishes `count` timed messages to the fan-out room at `rate`:
    /// Switchboard from a member's connection (PUBLISH frames), nchan by
    /// HTTP POSTs from this process. Returns how many went out late.
    fn ws_publish(
        &mut self,
        fleet: &mut Fleet,
        s: &ServerProc,
        kind: WsServer,
        rate: f64,
        count: u32,
        first_seq: u32,
    ) -> Result<u64, String> {
        match kind {
            WsServer::Switchboard => {
                let cmd =
                    Command::Publish { room: WS_ROOM.into(), rate_per_s: rate, count, payload_bytes: 64, first_seq };
                fleet.send(0, &cmd);
                Ok(fleet.wait_sent_from(1)?.1)
            }
            WsServer::Nchan => HttpPublisher::connect(s.addr)?.run(WS_ROOM, rate, count, first_seq),
        }
    }

    /// The WebSocket scenarios against one server.
    pub(super) fn ws_suite(&mut self, s: &ServerProc, kind: WsServer) -> Result<WsSuite, String> {
        let n = self.plan.ws_connections;
        let name = s.name;
        // Idle.
        let (w, _, _) = self.ws_fleet(s, kind, WS_WARMUP, "wsw-u", None)?;
        w.quit();
        std::thread::sleep(Duration::from_millis(500));
        let tree0 = ProcStat::process_tree(s.pid());
        let (rss0, pss0) = (ProcStat::rss_sum(&tree0), ProcStat::pss_sum(&tree0));
        note(format!("{name}: WebSocket idle, {n} connections ({} processes)", tree0.len()));
        let (idle_fleet, idle_ready, ramp) = self.ws_fleet(s, kind, n, "wsi-u", None)?;
        std::thread::sleep(Duration::from_secs(1));
        let tree1 = ProcStat::process_tree(s.pid());
        let (rss1, pss1) = (ProcStat::rss_sum(&tree1), ProcStat::pss_sum(&tree1));
        idle_fleet.quit();
        let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if idle_ready > 0 && tree0 == tree1 => Some((b as f64 - a as f64) / idle_ready as f64),
            _ => None,
        };
        let idle = WsIdle {
            connections: idle_ready,
            connect_rate_per_s: idle_ready as f64 / ramp.as_secs_f64(),
            processes: tree1.len(),
            server_rss_before_bytes: rss0,
            server_rss_after_bytes: rss1,
            server_user_bytes_per_conn: per(rss0, rss1),
            server_pss_bytes_per_conn: per(pss0, pss1),
        };
        note(format!(
            "  {:.0} bytes (RSS) / {:.0} bytes (PSS) per idle WebSocket connection",
            idle.server_user_bytes_per_conn.unwrap_or(f64::NAN),
            idle.server_pss_bytes_per_conn.unwrap_or(f64::NAN)
        ));

        // Fan-out.
        note(format!("{name}: WebSocket fan-out to {n} subscribers"));
        std::thread::sleep(Duration::from_millis(500));
        let tree = ProcStat::process_tree(s.pid());
        let (rss0, pss0) = (ProcStat::rss_sum(&tree), ProcStat::pss_sum(&tree));
        let (mut fleet, members, _) = self.ws_fleet(s, kind, n, "wsf-u", Some(WS_ROOM))?;
        std::thread::sleep(Duration::from_secs(1));
        let (rss1, pss1) = (ProcStat::rss_sum(&tree), ProcStat::pss_sum(&tree));
        let per_member = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if members > 0 && ProcStat::process_tree(s.pid()) == tree => {
                Some((b as f64 - a as f64) / members as f64)
            }
            _ => None,
        };
        let (sub_rss, sub_pss) = (per_member(rss0, rss1), per_member(pss0, pss1));
        let _ = fleet.collect()?;
        let repeats = self.plan.ws_repeats;
        self.ws_publish(&mut fleet, s, kind, SINGLE_RATE, repeats, 0)?;
        std::thread::sleep(Duration::from_millis(500));
        let single = fleet.collect()?;
        let single_done = completion_ms(&single, 0..repeats, members);
        note(format!(
            "  one message: the last of {members} subscribers has it after p50 {} ms ({} of {repeats} reached everyone)",
            super::report::f(q(&single_done, 0.5), 3),
            single_done.len()
        ));
        let mut runs = Vec::new();
        for (k, &target) in self.plan.ws_rates.clone().iter().enumerate() {
            let rate = (target / members.max(1) as f64).max(1.0);
            let count = ((rate * self.plan.ws_sustain_s as f64) as u32).max(1);
            let base = 100_000 * (k as u32 + 1);
            let cpu0 = ProcStat::processes_cpu(&tree);
            let t0 = Instant::now();
            let late = self.ws_publish(&mut fleet, s, kind, rate, count, base)?;
            let publish_s = t0.elapsed().as_secs_f64();
            std::thread::sleep(DRAIN);
            let c = fleet.collect()?;
            let (user, sys) = ProcStat::processes_cpu(&tree).since(&cpu0);
            let done = completion_ms(&c, base..base + count, members);
            let complete = done.len() == count as usize && c.closed == 0;
            let window = super::scenarios::window_s(&c, base..base + count, rate).max(publish_s).max(0.001);
            let delivered = c.received as f64 / window;
            let kept_up = WsRun::judge(complete, late, count, delivered, target);
            let run = WsRun {
                target_deliveries_per_s: target,
                publish_rate_per_s: rate,
                messages: count,
                published_late: late,
                complete,
                kept_up,
                subscribers_cut_off: c.closed,
                deliveries: c.received,
                deliveries_per_s: delivered,
                p50_ms: c.hist.value_at_quantile(0.5) as f64 / 1e3,
                p99_ms: c.hist.value_at_quantile(0.99) as f64 / 1e3,
                max_ms: c.hist.max() as f64 / 1e3,
                server_user_ns_per_delivery: user / c.received.max(1) as f64,
                server_sys_ns_per_delivery: sys / c.received.max(1) as f64,
            };
            note(format!(
                "  sustained {target:.0} deliveries/s offered: {delivered:.0} delivered/s, p50 {:.1} ms, p99 {:.1} ms, server user / sys {:.0} / {:.0} ns per delivery, {late} published late, kept up: {kept_up}",
                run.p50_ms, run.p99_ms, run.server_user_ns_per_delivery, run.server_sys_ns_per_delivery,
            ));
            runs.push(run);
            if !kept_up {
                break;
            }
        }
        fleet.quit();
        let single = WsSingle {
            p50_ms: q(&single_done, 0.5),
            p99_ms: q(&single_done, 0.99),
            reached_everyone: single_done.len(),
            messages: repeats,
        };
        Ok(WsSuite {
            server: name.into(),
            transport: match kind {
                WsServer::Switchboard => "WebSocket, subprotocol switchboard.v1.bin; members publish with PUBLISH frames",
                WsServer::Nchan => "WebSocket subscribers at /sub/<channel>; HTTP POSTs to /pub/<channel> from the runner, pipelined on one keep-alive connection (open loop)",
            }
            .into(),
            idle,
            // Memory growth while the subscribers joined the one room (after
            // the idle connections above were closed).
            fanout: WsFanout::of(members, sub_rss, sub_pss, single, runs),
        })
    }

    /// nginx + nchan through the same scenarios; absent (with the reason)
    /// if it is not installed or fails.
    /// `sb` is Switchboard's suite, for the ratios.
    pub(super) fn nchan_peer(&mut self, sb: &WsSuite) -> NchanPeer {
        let absent = |reason: String| {
            note(format!("nginx + nchan peer absent: {reason}"));
            if reason.contains("not installed") {
                note(format!("  for the nchan column install it: {NCHAN_INSTALL}"));
            }
            NchanPeer::absent(reason)
        };
        let (s, dir) = match start_nchan(&self.out, &self.plan) {
            Ok(x) => x,
            Err(e) => return absent(e),
        };
        let version = find_nginx()
            .ok()
            .and_then(|n| Proc::new(n).arg("-v").output().ok())
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string());
        let r = self.ws_suite(&s, WsServer::Nchan);
        s.stop();
        let _ = std::fs::remove_dir_all(&dir);
        match r {
            Ok(websocket) => NchanPeer::Ran(Box::new(NchanRun {
                what: "nginx + nchan (nchan_subscriber websocket; nchan_publisher http), worker_processes = Switchboard's workers, config in nginx-nchan.conf".into(),
                nginx_version: version,
                ratios_switchboard_over_peer: WsRatios::between(sb, &websocket),
                websocket,
            })),
            Err(e) => absent(format!("the nchan run failed: {e}")),
        }
    }
}
