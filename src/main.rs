//! The `switchboard` binary: `serve`, `token`, `client`.
//!
//! Owns: command-line parsing, logging set-up, signal handling for `serve`.
//! Must not: contain server logic; everything runs through the library.
//! Must not panic on a failed write to stdout or stderr: `serve 2>&1 | tee
//! log` keeps running after tee exits, and must still drain on SIGTERM. So
//! `serve` writes through [`say`] and the log sink, which drop what they
//! cannot write, never `println!`/`eprintln!` (which panic on EPIPE).

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use switchboard::client::{Client, ClientError};
use switchboard::config::Config;
use switchboard::proto::frame::{Frame, RoomOp};
use switchboard::{JwtHs256, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Connection server and push tier on io_uring")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (built-in defaults: 127.0.0.1:7700, development JWT secret).
    Serve {
        /// TOML configuration file (every key optional; see README).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override server.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Override server.workers (0 = one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Override admin.listen (the admin HTTP API), e.g. 127.0.0.1:7701.
        #[arg(long)]
        admin: Option<String>,
        /// Override websocket.listen (`""` turns WebSocket off).
        #[arg(long)]
        ws_listen: Option<String>,
        /// Override store.path: the directory of the disk message store
        /// (created if missing; default `switchboard-data` in the working
        /// directory; no effect with store.kind "memory", "none" or "redis").
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override store.kind: `disk` (default), `memory` (lost on
        /// restart) or `none` (no reliable delivery: live relay only).
        /// Inboxes in Redis (`redis`) need cluster.redis: set both in the
        /// config file (docs/SCALING.md).
        #[arg(long)]
        store: Option<String>,
        /// Log filter: a level (error, warn, info, debug, trace, off), or
        /// TARGET=LEVEL pairs separated by commas (RUST_LOG syntax), e.g.
        /// `warn,switchboard=debug`. Debug shows every login, refusal and
        /// its reason. A filter that does not parse is an error; a target
        /// nothing in the program logs under (a typo) is warned about.
        #[arg(long, default_value = "info")]
        log: String,
        /// Log format on stderr: `text` (coloured on a terminal unless
        /// NO_COLOR is set) or `json` (one object per line, for log
        /// shippers).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Check this host for N connections: kernel values and limits, each
    /// with the fix when it falls short, and the memory N idle connections
    /// need. Exits 1 if anything fails.
    Check {
        /// Connections to plan for.
        #[arg(long)]
        connections: u64,
        /// Configuration file (workers, backlog).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Mint a JWT (HS256) for a user, signed with the configured secret.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_s: u64,
        /// Configuration file whose auth.jwt_secret to use (without it, or
        /// without that key: $SWITCHBOARD_JWT_SECRET, else the development
        /// secret).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The secret itself (overrides --config).
        #[arg(long)]
        secret: Option<String>,
    },
    /// Connect as a user over the raw TCP protocol: print what arrives, send
    /// what you type.
    #[command(after_help = CLIENT_COMMANDS)]
    Client {
        /// The user id to log in as (1 to 255 bytes).
        #[arg(long)]
        user: String,
        /// The server's raw TCP address (server.listen), not its WebSocket
        /// port (7710 by default, for browsers): HOST:PORT, HOST a name or
        /// an IP address (IPv6 in brackets); each address a name has is
        /// tried in turn.
        #[arg(long, default_value = "127.0.0.1:7700")]
        addr: String,
        /// Token to log in with; if absent, minted from --config's
        /// auth.jwt_secret, else $SWITCHBOARD_JWT_SECRET, else the
        /// development secret (as the server picks its secret).
        #[arg(long)]
        token: Option<String>,
        /// Configuration file whose auth.jwt_secret signs the token.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log in as this device (1 to 64 bytes, stable per install) for
        /// reliable delivery: stored messages print as `[#SEQ ...]`, are
        /// acknowledged, and what is waiting is fetched page by page. The
        /// last seq printed is kept in the --state file, so the next run
        /// resumes after it. Without it: live messages only (PUSH).
        #[arg(long)]
        device: Option<String>,
        /// The file that keeps the last seq stored, with --device (default:
        /// ~/.switchboard-client-USER@DEVICE.seq, with bytes other than
        /// A-Z a-z 0-9 . _ - written as %XX; a name past 255 bytes is cut
        /// and ends in a hash of the pair).
        #[arg(long, requires = "device")]
        state: Option<PathBuf>,
    },
}

/// What one types into `switchboard client`.
const CLIENT_COMMANDS: &str = "Commands, one per line:
  @USER TEXT        send TEXT to every device of USER (SEND)
  /expire MS @USER TEXT
                    the same, stored to expire MS milliseconds later: a
                    device that has not had it by then never gets it
                    (SEND_EX with ttl_ms)
  /join ROOM        join ROOM (SUBSCRIBE)
  /leave ROOM       leave ROOM (UNSUBSCRIBE)
  /pub ROOM TEXT    publish TEXT to ROOM, which you must have joined (PUBLISH)
  /ping             ping the server
  /quit             close the connection (so does end of input)

Arriving messages print as `[ID from USER] TEXT` (to you) and
`[ID in ROOM from USER] TEXT` (to a room; `everyone` for a broadcast);
with --device, messages stored for you print as `[#SEQ ID from USER] TEXT`,
each once, in seq order.

At /quit or the end of input it waits (5 s at most) for the answers to
what you sent and, with --device, for what was waiting for you (the rest
comes at the next start), then closes. Exit status: 0 when you quit or
the server closes with 1000 or 1001 (a drain: reconnect), 4 when the
server refused a request you sent (ERROR), 3 when the server closes with
any other code (e.g. 4004 slow consumer, 4007 ACK timeout, 1008 policy),
1 on a refused login, a lost connection, no answer within the 5 s, a
--state file that can no longer be written (what it could not keep is
not acknowledged), or another error, 2 on bad arguments (a --state file
that cannot be written among them).";

/// How `serve` writes its log.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn load_config(path: &Option<PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::from_file(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A token for `user`, refused (with the server's words) when the server
/// would refuse it: a user id the protocol cannot carry, a secret the
/// server would not start with.
fn mint(config: &Option<PathBuf>, secret: Option<String>, user: &str, ttl_s: u64) -> Result<String, String> {
    if !switchboard::proto::frame::is_valid_user_id(user) {
        return Err(format!(
            "user id must be 1 to {} bytes (the server refuses others), is {}",
            switchboard::proto::frame::MAX_USER_ID_BYTES,
            user.len()
        ));
    }
    let (secret, given) = match secret {
        Some(s) => (s, "--secret: "),
        None => (load_config(config)?.jwt_secret().0, ""),
    };
    switchboard::config::check_jwt_secret(&secret).map_err(|e| format!("{given}{e}"))?;
    let exp = unix_now().checked_add(ttl_s).filter(|&e| e <= i64::MAX as u64).ok_or("--ttl-s is too large")?;
    Ok(JwtHs256::new(secret).mint(user, exp))
}

/// Blocks SIGINT and SIGTERM in this thread (and the workers it spawns), so
/// `wait_for_signal` can take them synchronously.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data manipulated by the libc calls below.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Writes a line to stdout or stderr, dropping it if the stream is gone
/// (a closed pipe): unlike `println!`, never panics.
fn say(to_stderr: bool, line: std::fmt::Arguments<'_>) {
    let _ = if to_stderr {
        std::io::stderr().lock().write_fmt(format_args!("{line}\n"))
    } else {
        let mut out = std::io::stdout().lock();
        out.write_fmt(format_args!("{line}\n")).and_then(|_| out.flush())
    };
}

macro_rules! out {
    ($($t:tt)*) => { say(false, format_args!($($t)*)) };
}

macro_rules! err {
    ($($t:tt)*) => { say(true, format_args!($($t)*)) };
}

/// The log sink: stderr, one write per event, and a failed write is
/// dropped. tracing-subscriber reports a failed write with `eprintln!`,
/// which panics when stderr is the broken pipe; with this sink (and
/// `log_internal_errors(false)`) no thread ever sees the error.
struct LogSink;

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Parses `--log`. A bare word must be a level: tracing would read a typo
/// such as `inf` or `debg` as a target name and log nothing from the server,
/// silently.
fn log_filter(spec: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !d.contains(['=', '[']) && d.parse::<tracing_subscriber::filter::LevelFilter>().is_err() {
            return Err(format!(
                "invalid --log filter {spec:?}: {d:?} is not a level (error, warn, info, debug, trace, off); \
                 for one target write {d}=LEVEL"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder().parse(spec).map_err(|e| format!("invalid --log filter {spec:?}: {e}"))
}

/// Targets that log records of this program start with: its own modules,
/// and the libraries under it that log.
const LOG_TARGETS: &[&str] = &["switchboard", "fjall", "lsm_tree", "value_log", "redis", "tokio", "hyper", "monoio"];

/// The targets `--log` names that no record of this program has (a typo
/// such as `swithcboard=debug` parses, and matches nothing: the
/// directive is silently useless, and without a bare level besides it
/// the server logged nothing at all).
fn unknown_log_targets(spec: &str) -> Vec<&str> {
    spec.split(',')
        .map(str::trim)
        .filter_map(|d| {
            let target = d.split(['[', '=']).next().unwrap_or("").trim();
            let known =
                |t: &str| LOG_TARGETS.iter().any(|k| t == *k || t.strip_prefix(k).is_some_and(|r| r.starts_with("::")));
            (!target.is_empty() && target.parse::<tracing_subscriber::filter::LevelFilter>().is_err() && !known(target))
                .then_some(target)
        })
        .collect()
}

/// Colours in the text log: only on a terminal, and never with `NO_COLOR`
/// set to anything but the empty string (no-color.org).
fn log_colours(stderr_is_terminal: bool) -> bool {
    stderr_is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised signal set; sigwait writes `sig`.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Takes SIGINT/SIGTERM for the whole process (they are blocked in every
/// other thread, so nothing else ever gets them): the first starts the
/// drain, the next exits at once. It must outlive anything: the drain is
/// started before anything is logged, and a panic (there should be none:
/// logging cannot fail) is caught and the loop goes on, since a dead signal
/// thread would leave a server only SIGKILL can stop.
fn signal_thread(set: &libc::sigset_t, handle: &switchboard::Handle) {
    let mut draining = false;
    loop {
        let sig = wait_for_signal(set);
        if draining {
            let _ = std::panic::catch_unwind(|| {
                tracing::warn!(signal = sig, "signal received again: exiting at once, the drain cut short");
            });
            std::process::exit(0);
        }
        draining = true;
        handle.drain();
        let _ = std::panic::catch_unwind(|| {
            tracing::info!(signal = sig, "signal received: draining (send it again to exit at once)");
        });
    }
}

/// How to run this binary again, for the commands the banner suggests:
/// `switchboard` when that is what the PATH finds, else its path (relative
/// to the working directory when under it, e.g.
/// `target/release/switchboard` in a checkout), so a printed command works
/// as printed.
fn self_command() -> String {
    let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize()) else { return "switchboard".into() };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("switchboard").canonicalize().is_ok_and(|p| p == me))
    });
    if on_path {
        return "switchboard".into();
    }
    let cwd = std::env::current_dir().and_then(|d| d.canonicalize()).unwrap_or_default();
    match me.strip_prefix(&cwd) {
        Ok(rel) if !cwd.as_os_str().is_empty() => rel.display().to_string(),
        _ => me.display().to_string(),
    }
}

/// `serve`'s store overrides.
struct StoreArgs {
    data_dir: Option<PathBuf>,
    kind: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn serve(
    config: Option<PathBuf>,
    listen: Option<String>,
    workers: Option<usize>,
    admin: Option<String>,
    ws_listen: Option<String>,
    store: StoreArgs,
    log: String,
    log_format: LogFormat,
) -> ExitCode {
    let filter = match log_filter(&log) {
        Ok(f) => f,
        Err(e) => {
            err!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    for target in unknown_log_targets(&log) {
        err!(
            "switchboard: warning: --log names target {target:?}, which nothing in this program logs under; \
             its directive matches nothing (the server's own targets start with \"switchboard\", e.g. \
             switchboard::runtime; its libraries log under {})",
            LOG_TARGETS[1..].join(", ")
        );
    }
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| LogSink).log_internal_errors(false);
    match log_format {
        LogFormat::Text => logs.with_ansi(log_colours(std::io::stderr().is_terminal())).init(),
        LogFormat::Json => logs.json().flatten_event(true).with_ansi(false).init(),
    }
    // The file, then the flags over it, then one check of the result: a
    // value of the file's that a flag replaces is not checked on its own.
    let parsed = match &config {
        Some(p) => Config::parse_file(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    };
    let mut cfg = match parsed {
        Ok(c) => c,
        Err(e) => {
            err!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    if let Some(w) = workers {
        cfg.server.workers = w;
    }
    if let Some(a) = admin {
        cfg.admin.listen = a;
    }
    if let Some(w) = ws_listen {
        cfg.websocket.listen = w;
    }
    if let Some(d) = store.data_dir {
        cfg.store.path = d;
    }
    if let Some(k) = store.kind {
        cfg.store.kind = match k.as_str() {
            "disk" => switchboard::config::StoreKind::Disk,
            "memory" => switchboard::config::StoreKind::Memory,
            "none" => switchboard::config::StoreKind::None,
            other => {
                err!(
                    "switchboard: --store {other}: use disk, memory or none (inboxes in Redis: store.kind = \"redis\" \
                     and cluster.redis in the config file, docs/SCALING.md)"
                );
                return ExitCode::from(2);
            }
        };
    }
    if let Err(e) = cfg.validate() {
        err!("switchboard: {e}");
        return ExitCode::from(2);
    }
    let (_, dev_secret) = cfg.jwt_secret();
    let cfg_demo = cfg.websocket.serves_demo();
    let cfg_echo = cfg.websocket.conformance_echo;
    let set = block_signals();
    let server = match Server::builder().config(cfg).start() {
        Ok(s) => s,
        Err(e) => {
            err!("switchboard: {e}");
            return ExitCode::from(1);
        }
    };
    out!("switchboard listening on {} (raw TCP protocol v1, docs/PROTOCOL.md)", server.local_addr());
    if let Some(a) = server.ws_addr() {
        if cfg_demo {
            out!("WebSocket on ws://{a} (docs/PROTOCOL.md section 13); demo page: http://{a}/");
        } else {
            out!("WebSocket on ws://{a} (docs/PROTOCOL.md section 13)");
        }
        if cfg_echo {
            out!("TEST MODE (websocket.conformance_echo): messages on ws://{a} are echoed back, no login");
        }
    }
    if let Some(a) = server.admin_addr() {
        out!("admin API on http://{a} (/healthz /readyz /metrics /api/v1/push /api/v1/stats ..., docs/API.md)");
    } else {
        out!("admin API off (start with --admin 127.0.0.1:7701 for /healthz /stats /push ...)");
    }
    if dev_secret {
        let me = self_command();
        out!("development JWT secret in use: mint a token with `{me} token --user alice`,");
        out!("or connect at once with `{me} client --user alice --addr {}`", server.local_addr());
    }
    // First SIGTERM/SIGINT: drain (stop accepting, CLOSE 1001 with a
    // reconnect hint spread over drain.window_ms, exit when the clients are
    // gone). A second one: exit at once.
    let handle = server.handle();
    std::thread::Builder::new()
        .name("sb-signals".into())
        .spawn(move || signal_thread(&set, &handle))
        .expect("a thread for signals");
    match server.join() {
        Ok(()) => {
            tracing::info!("drained; exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("stopped: {e}");
            err!("switchboard: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(connections: u64, config: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(&config) {
        Ok(c) => c,
        Err(e) => {
            err!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    let workers = cfg.server.worker_count(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let fixed = switchboard::limits::fixed_memory(&cfg, workers);
    // What this process has open already (stdin, stdout, stderr and what
    // its parent passed down) counts as it does at `serve`'s start: a
    // server started the same way holds the same.
    let besides =
        switchboard::limits::descriptors_besides_clients(&cfg, workers) + switchboard::limits::open_descriptors();
    let mut items = switchboard::limits::audit(connections, workers, besides, cfg.server.listen_backlog, &fixed);
    items.extend(switchboard::limits::disk_item(&cfg));
    out!("switchboard check: {connections} connections, {workers} workers\n");
    out!("{:<6} {:<30} {:<40} need", "", "item", "have");
    for i in &items {
        out!("{:<6} {:<30} {:<40} {}", i.status.label(), i.name, i.have, i.need);
        if !i.fix.is_empty() {
            out!("{:<6} {:<30} fix: {}", "", "", i.fix);
        }
    }
    let (user, kernel) = switchboard::limits::memory_estimate(connections);
    out!(
        "\nmemory for {connections} idle connections: about {} MiB ({} MiB in the server, {} MiB in the kernel), from the measured per-connection figures",
        // Rounded up, as the memory item above states them.
        switchboard::limits::mib_up(user + kernel),
        switchboard::limits::mib_up(user),
        switchboard::limits::mib_up(kernel)
    );
    for (what, bytes) in &fixed {
        out!("  + up to {} MiB whatever the connections: {what}", switchboard::limits::mib_up(*bytes));
    }
    // One line in a fixed form: tuning/apply.sh reads the figures from it.
    out!(
        "per idle connection: user_bytes={} kernel_bytes={} (measured, rounded up; src/limits.rs)",
        switchboard::limits::USER_BYTES_PER_IDLE_CONN,
        switchboard::limits::KERNEL_BYTES_PER_IDLE_CONN
    );
    let fails = items.iter().filter(|i| i.status == switchboard::limits::Status::Fail).count();
    let warns = items.iter().filter(|i| i.status == switchboard::limits::Status::Warn).count();
    out!("{fails} failing, {warns} warnings");
    if fails > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_frame(f: &Frame<'_>) {
    let who = |from: &str| if from.is_empty() { "server".to_string() } else { from.to_string() };
    match f {
        Frame::Push { msg_id, from, payload } => {
            out!("[{msg_id} from {}] {}", who(from), String::from_utf8_lossy(payload));
        }
        Frame::RoomMsg { msg_id, room, from, payload } => {
            let room = if room.is_empty() { "everyone" } else { room };
            out!("[{msg_id} in {room} from {}] {}", who(from), String::from_utf8_lossy(payload));
        }
        Frame::SendAck { req_id, delivered } => {
            out!("(send #{req_id}: delivered to {delivered} connection(s))")
        }
        Frame::RoomAck { op, room, .. } => match op {
            RoomOp::Subscribed => out!("(joined {room})"),
            RoomOp::Unsubscribed => out!("(left {room})"),
            RoomOp::Published => out!("(published to {room})"),
        },
        Frame::Skipped { count } => out!("({count} message(s) skipped: this client read too slowly)"),
        Frame::Inbox { seq, msg_id, from, payload, .. } => {
            out!("[#{seq} {msg_id} from {}] {}", who(from), String::from_utf8_lossy(payload));
        }
        Frame::Sync { position, head_seq, page_end, .. } => {
            out!("(inbox: stored up to {position}, head {head_seq}, this page up to {page_end})")
        }
        Frame::SendResult { req_id, outcome, seq, delivered, .. } => {
            out!("(send #{req_id}: {outcome:?} as #{seq}, delivered to {delivered} connection(s))")
        }
        Frame::Pong { .. } => out!("(pong)"),
        Frame::Error { code, reason, .. } => out!("(error {code}: {reason})"),
        Frame::Close { code, reason } => out!("(closed by server: {code} {reason})"),
        other => out!("({other:?})"),
    }
}

/// The frame for one typed line, `Ok(None)` for `/quit`, or what to tell
/// the user.
fn typed_frame(line: &str, req_id: &mut u32) -> Result<Option<bytes::Bytes>, String> {
    let (verb, rest) = line.split_once(' ').map_or((line, ""), |(v, r)| (v, r.trim()));
    let mut next = || {
        *req_id += 1;
        *req_id
    };
    let frame = match verb {
        "/quit" => return Ok(None),
        "/ping" => Frame::Ping { data: b"" }.to_bytes(),
        "/join" | "/leave" if rest.is_empty() || rest.contains(' ') => return Err(format!("usage: {verb} ROOM")),
        "/join" => Frame::Subscribe { req_id: next(), room: rest }.to_bytes(),
        "/leave" => Frame::Unsubscribe { req_id: next(), room: rest }.to_bytes(),
        "/pub" => match rest.split_once(' ') {
            Some((room, text)) => Frame::Publish { req_id: next(), room, payload: text.as_bytes() }.to_bytes(),
            None => return Err("usage: /pub ROOM TEXT".into()),
        },
        "/expire" => {
            let usage = || "usage: /expire MS @USER TEXT (MS from 1 to 4294967295)".to_string();
            let mut parts = rest.splitn(3, ' ');
            let ttl_ms = parts.next().and_then(|ms| ms.parse::<u32>().ok()).filter(|&ms| ms > 0).ok_or_else(usage)?;
            let to = parts.next().and_then(|t| t.strip_prefix('@')).filter(|t| !t.is_empty()).ok_or_else(usage)?;
            let text = parts.next().unwrap_or("").trim();
            let flags = switchboard::proto::frame::SEND_EX_TTL;
            Frame::SendEx { req_id: next(), flags, client_id: 0, ttl_ms, to, payload: text.as_bytes() }.to_bytes()
        }
        v if v.starts_with('@') && v.len() > 1 => {
            Frame::Send { req_id: next(), to: &v[1..], payload: rest.as_bytes() }.to_bytes()
        }
        _ => {
            let what =
                "type `@USER TEXT`, /expire MS @USER TEXT, /join ROOM, /leave ROOM, /pub ROOM TEXT, /ping or /quit";
            return Err(what.into());
        }
    };
    frame.map(Some).map_err(|e| format!("cannot send: {e}"))
}

/// ACK after this many new INBOX frames, or after [`ACK_AFTER`] (PROTOCOL.md 15.4).
const ACK_EVERY: u64 = 32;
const ACK_AFTER: Duration = Duration::from_millis(100);
/// FETCH page size: the server's default `delivery.max_fetch`.
const FETCH_LIMIT: u16 = 1000;

/// `--state`'s default: `~/.switchboard-client-USER@DEVICE.seq`, bytes
/// other than `A-Z a-z 0-9 . _ -` as `%XX` (so any user id and device
/// make one plain file name, and different pairs never the same one).
fn default_state_path(user: &str, device: &str) -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).ok_or("HOME is not set: give --state FILE")?;
    let escape = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let mut name = format!(".switchboard-client-{}@{}.seq", escape(user), escape(device));
    if name.len() > MAX_FILE_NAME_BYTES {
        // Past NAME_MAX (a long user id or device, or many escaped bytes):
        // a readable start and a hash of the whole pair keep it one file
        // per pair.
        let hash = fnv1a(format!("{user}\0{device}").as_bytes());
        let start: String = name.chars().take(MAX_FILE_NAME_BYTES - 30).collect();
        name = format!("{start}-{hash:016x}.seq");
    }
    Ok(PathBuf::from(home).join(name))
}

/// Linux's NAME_MAX.
const MAX_FILE_NAME_BYTES: usize = 255;

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The last seq stored, from the state file (0 if there is none yet).
fn read_state(path: &std::path::Path) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            format!(
                "{}: not a seq ({:?}); delete it to go on from the server's record of this device",
                path.display(),
                text.trim()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The wait an ERROR 118 names: "... retry in N ms" (PROTOCOL.md 4.3).
fn retry_in(reason: &str) -> Option<Duration> {
    let (_, after) = reason.rsplit_once("retry in ")?;
    let ms: u64 = after.strip_suffix(" ms")?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// Reliable delivery in `switchboard client --device` (PROTOCOL.md 15):
/// what is stored (the state file), what is acknowledged, and the last SYNC.
struct Inbox {
    state: PathBuf,
    /// The highest seq printed and saved.
    last_seq: u64,
    acked: u64,
    /// When the oldest unacknowledged INBOX was printed.
    unacked_since: Option<std::time::Instant>,
    /// A copy arrived: the server missed an ACK, so send one again.
    ack_again: bool,
    /// The last SYNC: the page ends here, the inbox there.
    page_end: u64,
    head_seq: u64,
    /// A FETCH is out and its SYNC has not come yet.
    fetching: bool,
    fetch_id: u32,
    /// The server refused the last FETCH for now (ERROR 115 or 118):
    /// not sent again before this.
    fetch_retry_at: Option<std::time::Instant>,
    /// The login's SYNC has come.
    synced: bool,
    /// The device's position on the server, as the last SYNC said: past
    /// `last_seq` when the state file is behind the server's record (a
    /// fresh `--state`), and nothing up to it will come.
    position: u64,
    /// A seq could not be saved: why. What was not saved is not
    /// acknowledged (15.4), nothing after it is taken, and the client
    /// stops (the next run, resuming from the file, gets it again).
    save_failed: Option<String>,
}

impl Inbox {
    /// A device's inbox that has stored up to `last_seq` (read from
    /// `state`), before its login's SYNC.
    fn new(state: PathBuf, last_seq: u64) -> Inbox {
        Inbox {
            state,
            last_seq,
            acked: last_seq,
            unacked_since: None,
            ack_again: false,
            page_end: 0,
            head_seq: 0,
            fetching: false,
            fetch_id: 0,
            fetch_retry_at: None,
            synced: false,
            position: 0,
            save_failed: None,
        }
    }

    /// Saves `last_seq`: a new file renamed over the old, so a crash
    /// leaves one or the other.
    fn save(&self) -> Result<(), String> {
        let tmp = self.state.with_extension("seq.tmp");
        std::fs::write(&tmp, format!("{}\n", self.last_seq))
            .and_then(|_| std::fs::rename(&tmp, &self.state))
            .map_err(|e| format!("cannot save the last seq to {}: {e}", self.state.display()))
    }

    /// Stores `seq` as the last seq, or, if the file cannot take it, keeps
    /// the one saved before and stops taking messages: what is not saved
    /// must not be acknowledged, by an ACK or a FETCH.
    fn store(&mut self, seq: u64) -> bool {
        let before = self.last_seq;
        self.last_seq = seq;
        match self.save() {
            Ok(()) => true,
            Err(e) => {
                self.last_seq = before;
                self.save_failed = Some(format!("{e}; #{seq} is not acknowledged and comes again at the next start"));
                false
            }
        }
    }

    /// Takes one frame: prints it unless it is a copy of a stored INBOX;
    /// returns the ACK or FETCH to send now, if any. Whatever the frame,
    /// an ACK that is due goes with it: a read that never times out
    /// (steady room traffic) must not hold it back until 4007.
    fn take(&mut self, f: &Frame<'_>) -> Option<Frame<'static>> {
        self.react(f).or_else(|| self.due())
    }

    /// What is due with no frame in: a FETCH refused earlier whose wait
    /// is over, else the batched ACK.
    fn due(&mut self) -> Option<Frame<'static>> {
        if self.save_failed.is_some() {
            return None;
        }
        self.fetch_if_page_done().or_else(|| self.ack_if_due())
    }

    fn react(&mut self, f: &Frame<'_>) -> Option<Frame<'static>> {
        if self.save_failed.is_some() {
            return None;
        }
        match *f {
            Frame::Sync { req_id, position, head_seq, page_end } => {
                print_frame(f);
                self.synced |= req_id == 0;
                self.position = position;
                if req_id == 0 && position < self.last_seq {
                    // The login left the device below what it stored. A
                    // store takes a login's seq unless it is past the head
                    // or the device is one it does not know (15.6): this
                    // is another inbox than the one stored from (a memory
                    // store restarted, a store restored from a backup),
                    // whose seqs name other messages, or the device was
                    // forgotten. Start over from the position, as its
                    // first page and the pages after it come (15.8).
                    out!(
                        "(the server has this device at #{position}, before #{} stored here: another inbox, or this device was forgotten; going on from #{position})",
                        self.last_seq
                    );
                    if !self.store(position) {
                        return None;
                    }
                    (self.acked, self.unacked_since, self.ack_again) = (position, None, false);
                }
                (self.page_end, self.head_seq, self.fetching) = (page_end, head_seq, false);
                self.fetch_if_page_done()
            }
            Frame::Inbox { seq, .. } if seq <= self.last_seq => {
                self.ack_again = true;
                None
            }
            Frame::Error { code, req_id, reason } if self.fetching && req_id == self.fetch_id => {
                print_frame(f);
                // Refused for now: over the send budget (the reason says
                // how long to wait, PROTOCOL.md 4.3), or the store busy.
                // Anything else would be refused again: the FETCH stays
                // out, and the error printed says why paging stopped.
                let wait = match code {
                    118 => retry_in(reason).unwrap_or(Duration::from_secs(1)),
                    115 => Duration::from_secs(1),
                    _ => return None,
                };
                self.fetching = false;
                self.fetch_retry_at = Some(std::time::Instant::now() + wait);
                None
            }
            Frame::Inbox { seq, .. } => {
                print_frame(f);
                if !self.store(seq) {
                    return None;
                }
                self.unacked_since.get_or_insert_with(std::time::Instant::now);
                self.fetch_if_page_done()
            }
            _ => {
                print_frame(f);
                None
            }
        }
    }

    /// Whether everything the SYNCs said was waiting has arrived (the
    /// connection is live, PROTOCOL.md 15.6).
    fn caught_up(&self) -> bool {
        self.synced && !self.fetching && self.last_seq.max(self.position) >= self.head_seq
    }

    /// Once the page a SYNC announced is in and more wait: FETCH the next
    /// (which acknowledges everything up to `after_seq`, 15.7).
    fn fetch_if_page_done(&mut self) -> Option<Frame<'static>> {
        if self.fetching || self.last_seq < self.page_end || self.page_end >= self.head_seq {
            return None;
        }
        if self.fetch_retry_at.is_some_and(|t| std::time::Instant::now() < t) {
            return None;
        }
        self.fetch_retry_at = None;
        self.fetching = true;
        self.fetch_id += 1;
        self.mark_acked();
        Some(Frame::Fetch { req_id: self.fetch_id, after_seq: self.last_seq, limit: FETCH_LIMIT })
    }

    /// The batched ACK, when due: 32 new messages, 100 ms since the first
    /// unacknowledged one, or a copy that says the server missed an ACK.
    fn ack_if_due(&mut self) -> Option<Frame<'static>> {
        let due = self.last_seq >= self.acked + ACK_EVERY
            || self.unacked_since.is_some_and(|t| t.elapsed() >= ACK_AFTER)
            || (self.ack_again && self.last_seq > 0);
        due.then(|| self.ack_now()).flatten()
    }

    /// The ACK of everything stored, unless there is nothing to acknowledge.
    fn ack_now(&mut self) -> Option<Frame<'static>> {
        if self.save_failed.is_some() || (self.last_seq == self.acked && !self.ack_again) {
            return None;
        }
        self.mark_acked();
        Some(Frame::Ack { seq: self.last_seq })
    }

    fn mark_acked(&mut self) {
        self.acked = self.last_seq;
        self.unacked_since = None;
        self.ack_again = false;
    }
}

/// What the end of input waits for: the requests typed (by `req_id`)
/// that the server has not answered yet, the /pings not answered yet,
/// and, with a device, the inbox's catch-up; and how many requests the
/// server refused.
#[derive(Default)]
struct Pending {
    state: std::sync::Mutex<PendingState>,
    answered: std::sync::Condvar,
    /// The main thread sent CLOSE and exits with the status it chose:
    /// the reader, seeing the connection end, leaves the exit to it.
    quitting: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct PendingState {
    req_ids: std::collections::BTreeSet<u32>,
    refused: u32,
    pings: u32,
    /// With a device: the login's SYNC has not come yet, or what it (or
    /// a later SYNC) said is waiting has not all arrived.
    catching_up: bool,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sent(&self, req_id: u32) {
        self.lock().req_ids.insert(req_id);
    }

    /// A /ping went: its PONG (which carries no request id) is waited for.
    fn pinged(&self) {
        self.lock().pings += 1;
    }

    /// Whether the inbox is still catching up (set at a device login,
    /// cleared by the reader once it has everything the SYNCs named).
    fn catching_up(&self, yes: bool) {
        let mut st = self.lock();
        if st.catching_up != yes {
            st.catching_up = yes;
            self.answered.notify_all();
        }
    }

    /// An answer (SEND_ACK, SEND_RESULT, ROOM_ACK, or an ERROR) to a typed
    /// request, or a PONG.
    fn answer(&self, f: &Frame<'_>) {
        let (req_id, refused) = match *f {
            Frame::Pong { .. } => {
                let mut st = self.lock();
                if st.pings > 0 {
                    st.pings -= 1;
                    self.answered.notify_all();
                }
                return;
            }
            Frame::SendAck { req_id, .. } | Frame::SendResult { req_id, .. } | Frame::RoomAck { req_id, .. } => {
                (req_id, false)
            }
            Frame::Error { req_id, .. } if req_id != 0 => (req_id, true),
            _ => return,
        };
        let mut st = self.lock();
        if st.req_ids.remove(&req_id) {
            st.refused += u32::from(refused);
            self.answered.notify_all();
        }
    }

    /// Waits up to `limit` for every answer and the catch-up; returns
    /// (unanswered, refused, still catching up).
    fn wait(&self, limit: Duration) -> (usize, u32, bool) {
        let (st, _) = self
            .answered
            .wait_timeout_while(self.lock(), limit, |st| !st.req_ids.is_empty() || st.pings > 0 || st.catching_up)
            .unwrap_or_else(|e| e.into_inner());
        (st.req_ids.len() + st.pings as usize, st.refused, st.catching_up)
    }
}

/// How long the end of input waits for the answers to what was sent.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// The socket's writing side, shared by the reader thread (PONG, ACK,
/// FETCH) and the main thread (what is typed): one frame per lock, so
/// that two frames never interleave when a write has to wait for room in
/// the send buffer and is taken in parts.
type Writer = std::sync::Arc<std::sync::Mutex<std::net::TcpStream>>;

/// Writes `bytes` whole under the writer's lock.
fn write_frame(out: &Writer, bytes: &[u8]) -> std::io::Result<()> {
    out.lock().unwrap_or_else(|e| e.into_inner()).write_all(bytes)
}

/// Whether `addr` is HOST:PORT: a host (a name, an IPv4 address or an
/// IPv6 one in brackets) and a port.
fn is_host_port(addr: &str) -> bool {
    if addr.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains(':') && !host.contains('[') && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

/// Connects to `addr` (HOST:PORT), trying each address the host name
/// resolves to (localhost may be ::1 first where the server listens on
/// 127.0.0.1 only), 5 s each at most.
fn connect(addr: &str) -> Result<Client, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(|e| format!("cannot resolve {addr}: {e}"))?.collect();
    let mut last = format!("cannot resolve {addr}: no address");
    for a in addrs {
        match Client::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(c) => return Ok(c),
            Err(e) if a.to_string() == addr => last = format!("cannot connect to {addr}: {e}"),
            Err(e) => last = format!("cannot connect to {addr} ({a}): {e}"),
        }
    }
    Err(last)
}

/// The reader thread, once the main thread sent CLOSE: the main thread
/// exits, with the status it chose.
fn leave_to_main() -> ! {
    loop {
        std::thread::park();
    }
}

/// The reader thread could not write a reply: exit 1, unless the main
/// thread is quitting (the connection may be closing under it then).
fn failed(pending: &Pending, e: impl std::fmt::Display) -> ! {
    if pending.quitting.load(std::sync::atomic::Ordering::Acquire) {
        leave_to_main();
    }
    err!("switchboard: {e}");
    std::process::exit(1);
}

/// Reads and prints frames until the connection ends, then exits the
/// process (unless the main thread is quitting: its exit status is
/// the one that counts); with `inbox`, also acknowledges and fetches.
fn read_loop(
    mut c: Client,
    out: Writer,
    inbox: Option<std::sync::Arc<std::sync::Mutex<Inbox>>>,
    pending: std::sync::Arc<Pending>,
) -> ! {
    if inbox.is_some() {
        // Wake up for batched ACKs even when nothing arrives.
        let _ = c.set_read_timeout(Some(ACK_AFTER / 2));
    }
    // The server's CLOSE code, once it sent one: the exit status.
    let mut closed_with = None;
    loop {
        let f = c.recv();
        match f.as_ref().map(|f| f.frame()) {
            Ok(Frame::Ping { data }) => {
                let pong = Frame::Pong { data }.to_bytes().expect("a PING's data fits a PONG");
                if let Err(e) = write_frame(&out, &pong) {
                    failed(&pending, e);
                }
                continue;
            }
            Ok(Frame::Close { code, .. }) => closed_with = Some(code),
            _ => {}
        }
        // The reply is written with the inbox locked: the main thread's
        // last ACK and CLOSE, at /quit, then come after it, not before.
        let mut locked = inbox.as_ref().map(|i| i.lock().unwrap_or_else(|e| e.into_inner()));
        let reply = match (&f, &mut locked) {
            (Ok(f), Some(inbox)) => inbox.take(&f.frame()),
            (Ok(f), None) => {
                print_frame(&f.frame());
                None
            }
            (Err(e), Some(inbox)) if e.is_timeout() => inbox.due(),
            (Err(_), _) if pending.quitting.load(std::sync::atomic::Ordering::Acquire) => leave_to_main(),
            (Err(ClientError::Closed), _) => {
                out!("(connection closed)");
                std::process::exit(match closed_with {
                    None | Some(1000 | 1001) => 0,
                    Some(_) => 3,
                });
            }
            (Err(e), _) => {
                err!("switchboard: {e}");
                std::process::exit(1);
            }
        };
        if let Some(e) = locked.as_ref().and_then(|i| i.save_failed.as_ref()) {
            err!("switchboard: {e}");
            std::process::exit(1);
        }
        if let Some(reply) = reply {
            if let Err(e) = reply.to_bytes().map_err(ClientError::from).and_then(|b| Ok(write_frame(&out, &b)?)) {
                failed(&pending, e);
            }
        }
        let caught_up = locked.as_ref().map(|i| i.caught_up());
        drop(locked);
        // Once printed: the main thread may exit as soon as it is told.
        if let Some(caught_up) = caught_up {
            pending.catching_up(!caught_up);
        }
        if let Ok(frame) = f.as_ref().map(|f| f.frame()) {
            pending.answer(&frame);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn client(
    user: String,
    addr: String,
    token: Option<String>,
    config: Option<PathBuf>,
    device: Option<String>,
    state: Option<PathBuf>,
) -> ExitCode {
    // Bad arguments are said before connecting (exit 2), not found by the
    // encoder after.
    if !is_host_port(&addr) {
        err!(
            "switchboard: --addr {addr:?}: expected HOST:PORT (a name or an IP address, IPv6 in brackets, and a port)"
        );
        return ExitCode::from(2);
    }
    if let Some(d) = &device {
        let max = switchboard::proto::frame::MAX_DEVICE_ID_BYTES;
        if d.is_empty() || d.len() > max {
            err!(
                "switchboard: --device: device id must be 1 to {max} bytes (the server refuses others), is {}",
                d.len()
            );
            return ExitCode::from(2);
        }
    }
    let token = match token.map(Ok).unwrap_or_else(|| mint(&config, None, &user, 86_400)) {
        Ok(t) => t,
        Err(e) => {
            err!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    // With a device: where the last stored seq is kept, and what it says.
    let inbox = match &device {
        None => None,
        Some(d) => {
            let loaded = match state {
                Some(p) => Ok(p),
                None => default_state_path(&user, d),
            }
            .and_then(|p| read_state(&p).map(|seq| (p, seq)));
            let inbox = loaded.map(|(state, last_seq)| Inbox::new(state, last_seq));
            // A state file that cannot be written is said now, not after
            // the first message arrived (and could not be kept).
            match inbox.and_then(|i| i.save().map(|()| i)) {
                Ok(i) => Some(i),
                Err(e) => {
                    err!("switchboard: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let mut c = match connect(&addr) {
        Ok(c) => c,
        Err(e) => {
            err!("switchboard: {e}");
            return ExitCode::from(1);
        }
    };
    let login = match (&device, &inbox) {
        (Some(d), Some(i)) => c.login_device(&user, &token, d, i.last_seq),
        _ => c.login(&user, &token),
    };
    match login {
        Ok(info) => {
            out!(
                "logged in as {user} (conn {:#x}, server pings after {} s of silence); type `@USER TEXT`, /expire MS @USER TEXT, /join ROOM, /leave ROOM, /pub ROOM TEXT, /ping, /quit",
                info.conn_id,
                info.heartbeat_interval_ms / 1000
            );
            if let (Some(d), Some(i)) = (&device, &inbox) {
                out!("(device {d}: stored up to #{}, kept in {})", i.last_seq, i.state.display());
            }
        }
        Err(e) => {
            err!("switchboard: {e}");
            return ExitCode::from(1);
        }
    }
    let out: Writer = match c.stream().try_clone() {
        Ok(s) => std::sync::Arc::new(std::sync::Mutex::new(s)),
        Err(e) => {
            err!("switchboard: {e}");
            return ExitCode::from(1);
        }
    };
    let inbox = inbox.map(|i| std::sync::Arc::new(std::sync::Mutex::new(i)));
    let reader_inbox = inbox.clone();
    let pending = std::sync::Arc::new(Pending::default());
    // A device's login is answered by a SYNC and what it says is waiting.
    pending.catching_up(inbox.is_some());
    let reader_pending = pending.clone();
    let reader_out = out.clone();
    std::thread::spawn(move || read_loop(c, reader_out, reader_inbox, reader_pending));
    let mut req_id = 0u32;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let before = req_id;
        match typed_frame(line, &mut req_id) {
            Ok(Some(b)) => {
                if req_id != before {
                    pending.sent(req_id);
                } else if line.split(' ').next() == Some("/ping") {
                    pending.pinged();
                }
                if write_frame(&out, &b).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => out!("({e})"),
        }
    }
    // The answers to what was sent, and with a device what was waiting
    // for it, printed by the reader, before the CLOSE: a client fed from
    // a pipe (or from nothing) reaches the end of its input first.
    let (unanswered, refused, catching_up) = pending.wait(ANSWER_WAIT);
    // Acknowledge what was printed since the last ACK before leaving
    // (holding the lock to the CLOSE, so the reader sends nothing in
    // between).
    let mut inbox = inbox.as_ref().map(|i| i.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(inbox) = &mut inbox {
        if catching_up && !inbox.synced {
            out!("(no SYNC for this device within {} s: does the server store messages?)", ANSWER_WAIT.as_secs());
        } else if catching_up {
            out!("(more is waiting past #{}: it comes at the next start)", inbox.last_seq);
        }
        if let Some(Ok(ack)) = inbox.ack_now().map(|f| f.to_bytes()) {
            let _ = write_frame(&out, &ack);
        }
    }
    pending.quitting.store(true, std::sync::atomic::Ordering::Release);
    let _ = write_frame(&out, &Frame::Close { code: 1000, reason: "bye" }.to_bytes().expect("static frame"));
    drop(inbox);
    if unanswered > 0 {
        err!("switchboard: no answer to {unanswered} request(s) within {} s", ANSWER_WAIT.as_secs());
        return ExitCode::from(1);
    }
    if refused > 0 {
        return ExitCode::from(4);
    }
    ExitCode::SUCCESS
}

/// mimalloc's default on Linux commits whole arenas eagerly, and memory in
/// an eagerly committed arena is never returned to the OS: a transient peak
/// (the replies of a connect storm, a fan-out backlog) then stays resident.
/// Measured with `scripts/idle-memory.sh 16000`: 262 bytes/connection with
/// the default, 113 with lazy arena commit. The option must be set before
/// mimalloc reserves its first arena, i.e. before the first allocation, so
/// it is set from an early ELF constructor (priority 101 runs before
/// mimalloc's own initialiser and long before `main`).
extern "C" fn tune_allocator() {
    /// `mi_option_arena_eager_commit` in mimalloc v2's `mimalloc.h` (the
    /// Rust bindings do not name it).
    const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: mi_option_set only stores an option value; it allocates nothing.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[used]
#[link_section = ".init_array.00101"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Serve { config, listen, workers, admin, ws_listen, data_dir, store, log, log_format } => {
            serve(config, listen, workers, admin, ws_listen, StoreArgs { data_dir, kind: store }, log, log_format)
        }
        Cmd::Check { connections, config } => check(connections, config),
        Cmd::Token { user, ttl_s, config, secret } => match mint(&config, secret, &user, ttl_s) {
            Ok(t) => {
                out!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                err!("switchboard: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Client { user, addr, token, config, device, state } => client(user, addr, token, config, device, state),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox() -> Inbox {
        let state = std::env::temp_dir().join(format!(
            "sb-main-test-{}-{:?}.seq",
            std::process::id(),
            std::thread::current().id()
        ));
        Inbox::new(state, 0)
    }

    #[test]
    fn a_log_target_nothing_logs_under_is_named() {
        assert_eq!(unknown_log_targets("swithcboard=debug"), ["swithcboard"]);
        assert_eq!(unknown_log_targets("warn, switchbord::store=debug,switchboard=info"), ["switchbord::store"]);
        assert_eq!(unknown_log_targets("switchboardx=debug"), ["switchboardx"], "a prefix of the name is not a module");
        for fine in [
            "info",
            "warn,switchboard=debug",
            "switchboard::runtime[conn]=trace",
            "fjall=debug,lsm_tree",
            "[span]=debug",
            "",
            "off",
        ] {
            assert!(unknown_log_targets(fine).is_empty(), "{fine}");
        }
    }

    /// A state file behind the server's record of the device (a fresh
    /// `--state`, another copy of the client): the server has the device
    /// at its position and sends nothing up to it, so a login whose
    /// position is the head is caught up, and the end of input need not
    /// wait its 5 s for seqs that never come.
    #[test]
    fn a_device_the_server_has_at_the_head_is_caught_up_whatever_the_state_file_says() {
        let mut i = inbox();
        i.take(&Frame::Sync { req_id: 0, position: 30, head_seq: 30, page_end: 30 });
        assert!(i.caught_up());
        assert_eq!(i.ack_now(), None, "nothing of its own to acknowledge");
        // Behind the head, it is caught up once the rest has come.
        let mut i = inbox();
        i.take(&Frame::Sync { req_id: 0, position: 30, head_seq: 32, page_end: 32 });
        assert!(!i.caught_up());
        i.take(&inbox_frame(31));
        assert!(!i.caught_up());
        i.take(&inbox_frame(32));
        assert!(i.caught_up());
    }

    fn inbox_frame(seq: u64) -> Frame<'static> {
        Frame::Inbox { seq, msg_id: seq, ts_ms: 0, from: "alice", payload: b"hi" }
    }

    /// PROTOCOL.md 15.4: an ACK within 100 ms of the first unacknowledged
    /// INBOX, whatever else arrives meanwhile (room traffic kept the read
    /// from ever timing out, and no ACK went).
    #[test]
    fn an_ack_goes_when_due_even_while_other_frames_keep_arriving() {
        let mut i = inbox();
        i.take(&Frame::Sync { req_id: 0, position: 0, head_seq: 0, page_end: 0 });
        assert_eq!(i.take(&inbox_frame(1)), None, "not due yet");
        i.unacked_since = Some(std::time::Instant::now() - ACK_AFTER);
        let room = Frame::RoomMsg { room: "lobby", msg_id: 9, from: "bob", payload: b"chatter" };
        assert_eq!(i.take(&room), Some(Frame::Ack { seq: 1 }));
        let _ = std::fs::remove_file(&i.state);
    }

    /// PROTOCOL.md 15.8: a copy of a stored INBOX means the server missed
    /// an ACK: acknowledge at once.
    #[test]
    fn a_copy_of_a_stored_message_is_acknowledged_at_once() {
        let mut i = inbox();
        i.take(&Frame::Sync { req_id: 0, position: 0, head_seq: 0, page_end: 0 });
        i.take(&inbox_frame(1));
        i.take(&inbox_frame(2));
        i.mark_acked();
        assert_eq!(i.take(&inbox_frame(2)), Some(Frame::Ack { seq: 2 }));
        let _ = std::fs::remove_file(&i.state);
    }

    /// A message whose seq could not be saved (the state file's directory
    /// gone, the disk full) is not acknowledged (PROTOCOL.md 15.4), by the
    /// batched ACK, the ACK at /quit or a FETCH: the next run, which
    /// resumes from the file, must still get it. It was acknowledged, so
    /// the server dropped it and the next run never saw it.
    #[test]
    fn a_message_whose_seq_could_not_be_saved_is_not_acknowledged() {
        let mut i = inbox();
        i.state = std::env::temp_dir().join(format!("sb-main-test-gone-{}", std::process::id())).join("s.seq");
        i.take(&Frame::Sync { req_id: 0, position: 0, head_seq: 3, page_end: 1 });
        assert_eq!(i.take(&inbox_frame(1)), None, "no FETCH of the next page past an unsaved seq");
        i.unacked_since = Some(std::time::Instant::now() - ACK_AFTER);
        assert_eq!(i.due(), None, "no batched ACK of it");
        assert_eq!(i.ack_now(), None, "nor the ACK at /quit");
        assert_eq!(i.take(&inbox_frame(2)), None, "nor one of a later message");
        assert_eq!(i.ack_now(), None);
        assert_eq!(i.last_seq, 0, "the seq saved last");
        let why = i.save_failed.as_deref().expect("the client is told to stop");
        assert!(why.contains("cannot save the last seq") && why.contains("#1 is not acknowledged"), "{why}");
    }

    /// A FETCH the server refuses for now (ERROR 118 over the send budget,
    /// with how long to wait; 115, the store busy) is sent again once that
    /// time has passed, as PROTOCOL.md 15.7 says, instead of the catch-up
    /// stopping for good with the page's FETCH marked as out.
    #[test]
    fn a_fetch_refused_for_now_is_sent_again_after_the_wait() {
        let mut i = inbox();
        i.take(&Frame::Sync { req_id: 0, position: 0, head_seq: 5, page_end: 2 });
        i.take(&inbox_frame(1));
        assert_eq!(
            i.take(&inbox_frame(2)),
            Some(Frame::Fetch { req_id: 1, after_seq: 2, limit: FETCH_LIMIT }),
            "the page is in: the next one is asked for"
        );
        let reason = "rate limited: 2 messages a second per user (limits.send_rate); retry in 40 ms";
        assert_eq!(i.take(&Frame::Error { code: 118, req_id: 1, reason }), None, "not at once");
        assert_eq!(i.due(), None, "nor before the wait");
        std::thread::sleep(Duration::from_millis(45));
        assert_eq!(i.due(), Some(Frame::Fetch { req_id: 2, after_seq: 2, limit: FETCH_LIMIT }));
        // The store busy: again after a second.
        let busy = "the message store is busy; try again shortly";
        assert_eq!(i.take(&Frame::Error { code: 115, req_id: 2, reason: busy }), None);
        assert_eq!(i.due(), None);
        i.fetch_retry_at = Some(std::time::Instant::now());
        assert_eq!(i.due(), Some(Frame::Fetch { req_id: 3, after_seq: 2, limit: FETCH_LIMIT }));
        // An ERROR for another request leaves the FETCH out.
        assert_eq!(i.take(&Frame::Error { code: 118, req_id: 77, reason }), None);
        assert_eq!(i.due(), None);
        // One that would be refused again (117: beyond the head) is not
        // retried, let alone in a loop.
        let beyond = "FETCH after seq 2, beyond the inbox head 1";
        assert_eq!(i.take(&Frame::Error { code: 117, req_id: 3, reason: beyond }), None);
        i.fetch_retry_at = None;
        assert_eq!(i.due(), None);
        let _ = std::fs::remove_file(&i.state);
    }
}
