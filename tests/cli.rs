//! The `switchboard` binary as a newcomer runs it, each test a child
//! process: `serve` whose log pipe has closed (it must still drain on
//! SIGTERM and exit, and a second signal must end it at once).

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use switchboard::client::Client;
use switchboard::config::DEV_JWT_SECRET;
use switchboard::JwtHs256;

const SB: &str = env!("CARGO_BIN_EXE_switchboard");

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors, which we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The write end of a pipe whose read end is already closed: every write
/// to it fails with EPIPE, as a log pipe does once `tee` or `grep` exits.
fn closed_pipe() -> Stdio {
    let (read, write) = pipe();
    drop(read);
    Stdio::from(write)
}

/// A child process killed (SIGKILL) if a test ends without waiting for it,
/// and the store directory it was given (if any), removed then.
struct Proc(Child, Option<std::path::PathBuf>);

impl Proc {
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }

    /// Waits up to `limit` for the exit; `None` if it is still running.
    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(dir) = &self.1 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `switchboard serve` on 127.0.0.1:`port`, raw TCP only, with `--log
/// log`, `extra` arguments and environment, and its stdout and stderr as
/// given; returns once the port accepts.
fn serve_with(port: u16, log: &str, extra: &[&str], env: &[(&str, &str)], stdout: Stdio, stderr: Stdio) -> Proc {
    serve_tuned(port, log, extra, env, stdout, stderr, |_| {})
}

/// `serve_with`, with `tune` applied to the command before it starts.
fn serve_tuned(
    port: u16,
    log: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
    tune: impl FnOnce(&mut Command),
) -> Proc {
    common::arm_watchdog();
    let listen = format!("127.0.0.1:{port}");
    // Each server its own store directory (two cannot share one).
    let data = std::env::temp_dir().join(format!("sb-cli-{}-{port}", std::process::id()));
    let mut cmd = Command::new(SB);
    cmd.args(["serve", "--listen", &listen, "--workers", "2", "--log", log])
        .arg("--data-dir")
        .arg(&data)
        .args(if extra.contains(&"--ws-listen") { &[][..] } else { &["--ws-listen", ""][..] })
        .args(extra)
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    tune(&mut cmd);
    let child = cmd.spawn().expect("switchboard serve starts");
    let mut p = Proc(child, Some(data));
    let addr: SocketAddr = listen.parse().unwrap();
    // Its own listeners, on every port it was given (the WebSocket one is
    // bound after the raw one, the admin API's after both).
    let mut ports = vec![addr];
    for flag in ["--ws-listen", "--admin"] {
        if let Some(a) = extra.iter().position(|a| *a == flag).and_then(|i| extra.get(i + 1)) {
            ports.extend(a.parse::<SocketAddr>().ok());
        }
    }
    let up = common::wait_until(Duration::from_secs(10), || {
        if let Ok(Some(s)) = p.0.try_wait() {
            panic!("switchboard serve exited at start: {s}");
        }
        ports.iter().all(|&a| common::listens(p.0.id(), a))
    });
    assert!(up, "switchboard serve did not listen on {ports:?} within 10 s");
    p
}

fn serve(port: u16, log: &str, stdout: Stdio, stderr: Stdio) -> Proc {
    serve_with(port, log, &[], &[], stdout, stderr)
}

/// Reads `r` to its end (or an error: a pty's master reads EIO once the
/// last process holding its other side exits) on a thread.
fn read_all_later(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// SIGTERM, then the exit status (which must come within 10 s).
fn stop(mut p: Proc) -> ExitStatus {
    p.signal(libc::SIGTERM);
    p.wait_for(Duration::from_secs(10)).expect("serve exits within 10 s of SIGTERM")
}

/// The names of process `pid`'s threads (a worker that died is missing).
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut names: Vec<String> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// `user` logged in to `server` (on `port`) with the development secret.
/// A login that fails says what became of the server: whether it exited
/// (and how) and whether its port still accepts, since a test whose server
/// logs nowhere (stderr closed) has no other trace of why, and which
/// threads it runs (seen once on a loaded host: a reset login while the
/// server ran on and its port accepted).
fn dev_login(server: &mut Proc, port: u16, user: &str) -> Client {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Client::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let token = JwtHs256::new(DEV_JWT_SECRET).mint(user, common::unix_now() + 600);
    if let Err(e) = c.login(user, &token) {
        let exited = server.wait_for(Duration::from_millis(500));
        panic!(
            "login with the development secret: {e:?}; the server (pid {}) then: {}; its port accepts: {}; its threads: {:?}; listening on the port: {:?}",
            server.0.id(),
            exited.map_or("still running".to_string(), |s| format!("exited, {s}")),
            common::listening(addr),
            thread_names(server.0.id()),
            switchboard::portholder::holders(port).iter().map(|h| (h.pid, h.cmdline.as_str())).collect::<Vec<_>>()
        );
    }
    c
}

/// With `server.max_connections` automatic, clients were given every
/// descriptor but a reserve of 64 (and 8 per worker) that did not count
/// the admin API's connections: a server full of clients failed its
/// operators' `accept` with EMFILE, its health check and metrics
/// unreachable (a review saw `/healthz` fail at the 53rd admin connection
/// with a limit of 200 descriptors).
#[test]
fn a_server_full_of_clients_still_answers_every_admin_connection_it_allows() {
    const NOFILE: libc::rlim_t = 400;
    const ADMIN_CONNS: usize = 96;
    let (port, admin_port) = (common::free_port(), common::free_port());
    let cfg = std::env::temp_dir().join(format!("sb-cli-fds-{}-{port}.toml", std::process::id()));
    std::fs::write(&cfg, format!("[admin]\nmax_connections = {ADMIN_CONNS}\n")).unwrap();
    let admin = format!("127.0.0.1:{admin_port}");
    let args = ["--config", cfg.to_str().unwrap(), "--admin", &admin, "--store", "memory"];
    let mut server = serve_tuned(port, "warn", &args, &[], Stdio::null(), Stdio::null(), |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit in the child before exec: async-signal-safe,
        // touches nothing of the parent's.
        unsafe {
            cmd.pre_exec(|| {
                let r = libc::rlimit { rlim_cur: NOFILE, rlim_max: NOFILE };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    let _ = std::fs::remove_file(&cfg);
    // Logged-in clients until the server refuses one (full: 4005).
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut clients = vec![dev_login(&mut server, port, "u0")];
    loop {
        assert!(clients.len() < NOFILE as usize, "more clients than the server has descriptors");
        let mut c = Client::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let user = format!("u{}", clients.len());
        let token = JwtHs256::new(DEV_JWT_SECRET).mint(&user, common::unix_now() + 600);
        if c.login(&user, &token).is_err() {
            break;
        }
        clients.push(c);
    }
    // Every admin connection the configuration allows, open at once, each
    // answered.
    let mut conns: Vec<std::net::TcpStream> = (0..ADMIN_CONNS)
        .map(|i| std::net::TcpStream::connect(&admin).unwrap_or_else(|e| panic!("admin connection {i}: {e}")))
        .collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::io::Write::write_all(s, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut head = [0u8; 12];
        let got = s.read_exact(&mut head).map(|_| String::from_utf8_lossy(&head).into_owned());
        assert_eq!(
            got.as_deref().ok(),
            Some("HTTP/1.1 200"),
            "admin connection {i} of {ADMIN_CONNS}, beside {} clients: {got:?}",
            clients.len()
        );
    }
}

/// `serve_with` returns once the server it started listens, not once
/// anything does. A port from `common::free_port` is free for any bind(0)
/// until the server binds it: another test thread's `free_port` listened
/// on it for a moment, took the readiness probe and the first LOGIN, and
/// reset both as it let go ("Connection reset by peer" at login, with the
/// server up and well). Here a listener of the test's own stands in: the
/// server cannot start on its port, and `serve` must say so, not return.
#[test]
fn serve_waits_for_the_servers_own_listener_not_any_on_its_port() {
    let stand_in = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stand_in.local_addr().unwrap().port();
    let started = std::panic::catch_unwind(|| serve(port, "warn", Stdio::null(), Stdio::null()));
    assert!(started.is_err(), "serve returned while only the stand-in listened on {port}");
    drop(stand_in);
}

/// The bug of issue 11: `serve 2>&1 | tee log`, then tee exits. Every log
/// write fails with EPIPE from then on; the server must still drain on
/// SIGTERM and exit 0. Its workers log at debug (logins), the signal
/// thread logs the drain: none of them may die of it.
#[test]
fn a_server_whose_log_pipe_closed_drains_on_sigterm_and_exits() {
    let port = common::free_port();
    let (read, write) = pipe();
    let write2 = write.try_clone().unwrap();
    let mut server = serve(port, "debug", Stdio::from(write), Stdio::from(write2));
    drop(read); // tee exits
    let mut alice = dev_login(&mut server, port, "alice");
    server.signal(libc::SIGTERM);
    assert_eq!(alice.recv_close_code().unwrap(), Some(1001), "the client gets the drain's CLOSE");
    drop(alice);
    let status = server.wait_for(Duration::from_secs(10)).expect("the server exits within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
}

/// A second signal ends the server at once, even while a client that never
/// closes keeps the drain waiting, and even with its stdout and stderr
/// closed before it starts (the banner and the start-up log fail too).
#[test]
fn a_second_signal_exits_at_once() {
    let port = common::free_port();
    let mut server = serve(port, "info", closed_pipe(), closed_pipe());
    let _stays = dev_login(&mut server, port, "bob"); // never reads, never closes
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.wait_for(Duration::ZERO).is_none(), "the drain waits for the client");
    let t = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_for(Duration::from_secs(2)).expect("the second signal ends the server");
    assert!(t.elapsed() < Duration::from_secs(1), "at once: {:?}", t.elapsed());
    assert!(status.code().is_some(), "an exit, not a kill: {status}");
}

/// A pseudo-terminal: (master, slave). The master is close-on-exec, so
/// only the slave reaches the child.
fn pty() -> (std::fs::File, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors; the other arguments may
    // be null.
    let r = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fcntl on the descriptor just created.
    unsafe { libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: both descriptors are new and owned here.
    unsafe { (std::fs::File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// What `serve` writes to stderr from start to SIGTERM, with stderr a pipe
/// (`tty = false`) or a terminal.
fn stderr_of_serve(tty: bool, env: &[(&str, &str)]) -> String {
    let port = common::free_port();
    if tty {
        let (master, slave) = pty();
        let reader = read_all_later(master);
        let p = serve_with(port, "info", &[], env, Stdio::null(), Stdio::from(slave));
        assert!(stop(p).success());
        reader.join().unwrap()
    } else {
        let (read, write) = pipe();
        let reader = read_all_later(std::fs::File::from(read));
        let p = serve_with(port, "info", &[], env, Stdio::null(), Stdio::from(write));
        assert!(stop(p).success());
        reader.join().unwrap()
    }
}

/// `serve 2>&1 | tee serve.log` must not fill the file with escape codes;
/// a terminal gets colours unless NO_COLOR says otherwise.
#[test]
fn log_colours_only_on_a_terminal_and_never_with_no_color() {
    let piped = stderr_of_serve(false, &[]);
    assert!(piped.contains("INFO") && piped.contains("accepting raw TCP"), "{piped}");
    assert!(!piped.contains('\x1b'), "escape codes in a pipe:\n{piped:?}");

    let tty = stderr_of_serve(true, &[]);
    assert!(tty.contains("accepting raw TCP"), "{tty:?}");
    assert!(tty.contains("\x1b["), "a terminal gets colours:\n{tty:?}");

    let no_color = stderr_of_serve(true, &[("NO_COLOR", "1")]);
    assert!(no_color.contains("accepting raw TCP"), "{no_color:?}");
    assert!(!no_color.contains('\x1b'), "NO_COLOR on a terminal:\n{no_color:?}");
}

/// A filter that does not parse is refused (it used to fall back to info,
/// silently), and so is a bare word that is not a level (tracing would take
/// `inf` for a target and log nothing).
#[test]
fn a_bad_log_filter_is_an_error() {
    for bad in ["inf", "switchboard=debg", "warn,=x"] {
        let child = Command::new(SB)
            .args(["serve", "--listen", "127.0.0.1:0", "--ws-listen", "", "--log", bad])
            .env_remove("SWITCHBOARD_JWT_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut p = Proc(child, None);
        let stderr = read_all_later(p.0.stderr.take().unwrap());
        let status = p.wait_for(Duration::from_secs(10));
        drop(p);
        let stderr = stderr.join().unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(2), "--log {bad}: refused at once, got {status:?}: {stderr}");
        assert!(stderr.contains("invalid --log filter"), "--log {bad}: {stderr}");
    }
}

/// `--log-format json`: one JSON object per line, and at debug every login
/// and every refusal with its reason; a refusal is also logged at info (at
/// most once per 10 s).
#[test]
fn json_logs_show_logins_and_refusals_with_their_reason() {
    let port = common::free_port();
    let (read, write) = pipe();
    let reader = read_all_later(std::fs::File::from(read));
    let mut p =
        serve_with(port, "info,switchboard=debug", &["--log-format", "json"], &[], Stdio::null(), Stdio::from(write));
    drop(dev_login(&mut p, port, "alice"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut mallory = Client::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    mallory.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let forged = JwtHs256::new("not-the-server-secret-at-all").mint("mallory", common::unix_now() + 600);
    assert!(mallory.login("mallory", &forged).is_err());
    let status = stop(p);
    let text = reader.join().unwrap();
    assert!(status.success(), "serve exited with {status} after SIGTERM; its log:\n{text}");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    let find = |level: &str, message: &str| {
        events.iter().find(|e| e["level"] == level && e["message"].as_str().is_some_and(|m| m.contains(message)))
    };
    let ok = find("DEBUG", "login accepted").unwrap_or_else(|| panic!("no login line in {text}"));
    assert_eq!(ok["user"], "alice", "the user id as it is, not quoted: {ok}");
    let refused = find("DEBUG", "login refused").unwrap_or_else(|| panic!("no refusal line in {text}"));
    assert_eq!(refused["user"], "mallory", "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("signature"), "the reason: {refused}");
    assert!(find("INFO", "1 login(s) refused").is_some(), "the info line: {text}");
    assert!(find("INFO", "accepting raw TCP").is_some(), "{text}");
}

/// A second `serve` on a port a first one holds: the message names the
/// holder as a Switchboard with its pid, suggests other ports with
/// --listen/--ws-listen, and says sharing is for overlapping restarts only
/// (it used to suggest share_listen_port, which splits the users of two dev
/// servers so that SENDs between them reach no one).
#[test]
fn port_in_use_names_the_switchboard_holding_it_and_suggests_other_ports() {
    let port = common::free_port();
    let mut first = serve(port, "warn", Stdio::null(), Stdio::null());
    // Up, not starting: its port accepts (into the backlog) a moment
    // before its worker threads, which tell it from other programs, are
    // there; on a busy host that moment was long enough for the second
    // server to look (7 failures in 40 runs with two CPU hogs). A login
    // is answered by a worker.
    drop(dev_login(&mut first, port, "alice"));
    let out = Command::new(SB)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--ws-listen", "", "--log", "warn"])
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let pid = first.0.id();
    assert!(stderr.contains(&format!("another Switchboard server is listening on it (pid {pid}: ")), "{stderr}");
    assert!(stderr.contains(&format!("--listen 127.0.0.1:{}", port.wrapping_add(100).max(1024))), "{stderr}");
    assert!(stderr.contains("--ws-listen"), "{stderr}");
    assert!(stderr.contains("overlapping restarts of one service only"), "{stderr}");
    assert!(stop(first).success());
}

/// `switchboard check` states the memory of N idle connections twice, in
/// its memory item and in the summary under the items: the same figures
/// both times. (Found by an outside check of docs/DEPLOY.md: for 10,000
/// connections the item said 2 MiB ours + 37 MiB kernel, the summary 1 MiB
/// in the server and 36 MiB in the kernel, one rounding up, one down.)
#[test]
fn check_states_the_memory_of_idle_connections_alike_in_the_item_and_the_summary() {
    let cfg = TempConfig::new(
        "check-memory",
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n[websocket]\nlisten = \"\"\n[store]\nkind = \"none\"\n",
    );
    let out = Command::new(SB)
        .args(["check", "--connections", "10000", "--config"])
        .arg(cfg.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    // "(2 MiB ours + 37 MiB kernel, idle, ..." and
    // "about 39 MiB (2 MiB in the server, 37 MiB in the kernel)".
    let mib_before = |line: &str, what: &str| -> u64 {
        let head = &line[..line.find(what).unwrap_or_else(|| panic!("{what:?} in {line:?}"))];
        let head = head.trim_end().strip_suffix("MiB").unwrap().trim_end();
        head.rsplit([' ', '(']).next().unwrap().parse().unwrap()
    };
    let item = report.lines().find(|l| l.contains("memory for idle connections")).unwrap_or_else(|| panic!("{report}"));
    let summary = report.lines().find(|l| l.starts_with("memory for 10000 idle")).unwrap_or_else(|| panic!("{report}"));
    let in_item = (mib_before(item, " ours"), mib_before(item, " kernel, idle"));
    let in_summary = (mib_before(summary, " in the server"), mib_before(summary, " in the kernel"));
    assert_eq!(in_item, in_summary, "item: {item}\nsummary: {summary}");
    // 10,000 × 200 B and × 4,000 B, in MiB rounded up.
    assert_eq!(in_summary, (2, 39), "{summary}");
    let total: u64 = summary.split("about ").nth(1).unwrap().split(" MiB").next().unwrap().parse().unwrap();
    assert_eq!(total, 41, "{summary}");
}

/// `switchboard check` and `serve`, under one `RLIMIT_NOFILE`, agree on
/// whether a `server.max_connections` fits. `serve` counts what its process
/// has open at start (stdin, stdout, stderr, what the parent passed down);
/// `check` left those out, so it passed a limit 3 or more files short, and
/// the server then refused to start on it.
#[test]
fn check_and_serve_agree_on_the_open_files_a_limit_allows() {
    let nofile = 2000u64;
    // 2 workers, memory store, no admin API: 64 + 2 × 8 reserved.
    for conns in [nofile - 80, nofile - 80 - 40] {
        let cfg = TempConfig::new(
            &format!("nofile-{conns}"),
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\nmax_connections = {conns}\n\
                 [websocket]\nlisten = \"\"\n[store]\nkind = \"memory\"\n"
            ),
        );
        let under_limit = |args: &str| {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -n {nofile} && exec \"$0\" {args} --config \"$1\""))
                .arg(SB)
                .arg(cfg.path());
            c.env_remove("SWITCHBOARD_JWT_SECRET").stdin(Stdio::null());
            c
        };
        let check = under_limit(&format!("check --connections {conns}")).output().unwrap();
        let report = String::from_utf8_lossy(&check.stdout);
        let line = report.lines().find(|l| l.contains("RLIMIT_NOFILE")).unwrap_or_else(|| panic!("{report}"));
        let check_passes = line.starts_with("PASS");

        let mut serve = under_limit("serve --log info").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let log = read_all_later(serve.stderr.take().unwrap());
        let t0 = Instant::now();
        let exited = loop {
            if let Some(status) = serve.try_wait().unwrap() {
                break Some(status);
            }
            if t0.elapsed() > Duration::from_secs(3) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if exited.is_none() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
            serve.wait().unwrap();
        }
        let log = log.join().unwrap();
        let serves = exited.is_none() && log.contains("accepting raw TCP");
        assert_eq!(check_passes, serves, "max_connections = {conns}: check said {line:?}; serve's log:\n{log}");
    }
}

/// The log (at `level`) of `serve --config cfg` on `port` through one
/// login, up to its exit on SIGTERM.
fn log_of_a_login(port: u16, level: &str, cfg: &TempConfig) -> String {
    let mut p = serve_with(port, level, &["--config", cfg.path()], &[], Stdio::null(), Stdio::piped());
    let log = read_all_later(p.0.stderr.take().unwrap());
    drop(dev_login(&mut p, port, "alice"));
    assert!(stop(p).success());
    log.join().unwrap()
}

/// With `server.io_driver = "epoll"`, what needs io_uring is off: the log
/// says so (README's `server.batch_sends` and docs/DEPLOY.md promise it),
/// and the start line names the data path that runs, not the driver's
/// Rust name. Before, both went without a word and the line said
/// `driver=IoUring` whatever the poller.
#[test]
fn the_epoll_driver_says_what_it_turns_off_and_the_start_line_names_what_runs() {
    let port = common::free_port();
    let cfg = TempConfig::new(
        "epoll",
        "[server]\nio_driver = \"epoll\"\npoller = \"io_uring\"\n[store]\nkind = \"memory\"\n",
    );
    let log = log_of_a_login(port, "info", &cfg);
    assert!(log.contains("server.poller = \"io_uring\" needs the io_uring driver"), "{log}");
    assert!(log.contains("server.batch_sends needs the io_uring driver"), "{log}");
    let start = log.lines().find(|l| l.contains("accepting raw TCP")).unwrap_or_else(|| panic!("{log}"));
    for field in ["driver=\"epoll\"", "poller=\"epoll\"", "sends=\"one sendmsg each\""] {
        assert!(start.contains(field), "{field} in {start}");
    }
}

/// An admin key without `admin.listen` means the operator expected the
/// API to be on; it is off, and the log says so (it said nothing).
#[test]
fn an_admin_key_without_an_admin_address_is_named_in_the_log() {
    let port = common::free_port();
    let cfg =
        TempConfig::new("admin-off", "[admin]\ntoken = \"a-key-of-16-bytes-or-more\"\n[store]\nkind = \"memory\"\n");
    let log = log_of_a_login(port, "warn", &cfg);
    assert!(log.contains("but admin.listen is not: the admin API is off"), "{log}");
}

/// `switchboard token` exit status and output for `args`.
fn token(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(SB).arg("token").args(args).env_remove("SWITCHBOARD_JWT_SECRET").output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `switchboard token` refuses what the server would refuse, with the
/// server's words, instead of minting a token no login can use.
#[test]
fn token_refuses_what_the_server_refuses() {
    let long = "u".repeat(256);
    for (args, why) in [
        (vec!["--user", ""], "user id must be 1 to 255 bytes"),
        (vec!["--user", long.as_str()], "user id must be 1 to 255 bytes"),
        (vec!["--user", "alice", "--secret", "short"], "must be at least 16 bytes"),
        (vec!["--user", "alice", "--secret", ""], "must be at least 16 bytes"),
    ] {
        let (code, out, err) = token(&args);
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{args:?}: no token: {out}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // What the server accepts is minted: a 255-byte user, a 16-byte
    // secret, the development secret by default.
    let longest = "u".repeat(255);
    for args in [vec!["--user", longest.as_str()], vec!["--user", "alice", "--secret", "0123456789abcdef"]] {
        let (code, out, err) = token(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(out.trim().split('.').count(), 3, "{args:?}: a JWT: {out}");
    }
}

/// `switchboard client` as a child: lines typed on its stdin, lines it
/// prints read back with a deadline.
struct CliClient {
    proc: Proc,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl CliClient {
    fn start(user: &str, addr: &str) -> CliClient {
        CliClient::start_with(user, addr, &[], &[])
    }

    /// With `extra` arguments and environment.
    fn start_with(user: &str, addr: &str, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> CliClient {
        let child = Command::new(SB)
            .args(["client", "--user", user, "--addr", addr])
            .args(extra)
            .env_remove("SWITCHBOARD_JWT_SECRET")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut proc = Proc(child, None);
        let stdin = proc.0.stdin.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        for out in
            [Box::new(proc.0.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(proc.0.stderr.take().unwrap())]
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        CliClient { proc, stdin, lines, seen: Vec::new() }
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").unwrap();
    }

    /// The next line printed, which must contain `want`.
    fn expect(&mut self, want: &str) -> String {
        match self.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => {
                self.seen.push(line.clone());
                assert!(
                    line.contains(want),
                    "expected a line with {want:?}, got {line:?}; so far:\n{}",
                    self.seen.join("\n")
                );
                line
            }
            Err(_) => panic!("no line with {want:?} within 10 s; so far:\n{}", self.seen.join("\n")),
        }
    }
}

/// `switchboard client` used to exit 0 however the server closed it: a
/// script could not tell a kick (4003) or a slow-consumer close from a
/// quit. A close other than 1000/1001 now exits 3; a drain (1001) and a
/// quit exit 0.
#[test]
fn cli_client_exit_status_tells_a_server_close_with_an_error_from_a_quit() {
    let (port, admin_port) = (common::free_port(), common::free_port());
    let admin = format!("127.0.0.1:{admin_port}");
    let server = serve_with(port, "warn", &["--admin", &admin], &[], Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let mut eve = CliClient::start("eve", &addr);
    eve.expect("logged in as eve");
    let mut s = std::net::TcpStream::connect(&admin).unwrap();
    let body = r#"{"user": "eve"}"#;
    let req = format!(
        "POST /api/v1/kick HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let status = eve.proc.wait_for(Duration::from_secs(10)).expect("the client exits when kicked");
    assert_eq!(status.code(), Some(3), "kicked (4003); printed:\n{}", eve.seen.join("\n"));

    let mut ann = CliClient::start("ann", &addr);
    ann.expect("logged in as ann");
    ann.type_line("/quit");
    assert_eq!(ann.proc.wait_for(Duration::from_secs(5)).and_then(|s| s.code()), Some(0));
    assert!(stop(server).success());
}

/// `switchboard client` fed from a pipe sent CLOSE at the end of its input
/// and exited 0 at once, before the answers to what it sent: a script
/// never saw a refusal. It now waits for them (5 s at most), prints them,
/// and exits 4 when the server refused a request.
/// `switchboard client --user USER` fed `input` on its standard input:
/// its exit status and what it printed.
fn piped_client(addr: &str, user: &str, input: &str) -> (Option<i32>, String) {
    let mut child = Command::new(SB)
        .args(["client", "--user", user, "--addr", addr])
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn cli_client_at_the_end_of_its_input_waits_for_the_answers_and_reports_a_refusal() {
    let port = common::free_port();
    let server = serve(port, "warn", Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let piped = |input: &str| piped_client(&addr, "carl", input);
    let (code, out) = piped("@dana hello\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("(send #1: "), "the SEND's answer is printed before the exit:\n{out}");
    // PUBLISH to a room carl is not in: refused with an ERROR.
    let (code, out) = piped("/pub lobby hi\n");
    assert!(out.contains("(error "), "the refusal is printed:\n{out}");
    assert_eq!(code, Some(4), "a refused request: exit 4\n{out}");
    // A /ping's answer is one too: the client closed without waiting for
    // the PONG, and never printed it (10 runs of 10).
    let (code, out) = piped("/ping\n/ping\n");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("(pong)").count(), 2, "both PONGs are printed before the exit:\n{out}");
    assert!(stop(server).success());
}

/// `/expire MS @USER TEXT` stores a message that expires: a device that
/// logs in after it gets only what was sent without one.
#[test]
fn cli_client_sends_a_message_that_expires() {
    let port = common::free_port();
    let server = serve(port, "warn", Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let (code, out) = piped_client(&addr, "carl", "/expire 300 @erin ring ring\n@erin kept\n/expire 0 @erin no\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("(send #1: Stored as #1, delivered to 0 connection(s))"), "{out}");
    assert!(out.contains("(send #2: delivered to 0 connection(s))"), "{out}");
    assert!(out.contains("usage: /expire MS @USER TEXT"), "a TTL of 0 is refused here:\n{out}");
    std::thread::sleep(Duration::from_millis(600));
    let state = std::env::temp_dir().join(format!("sb-cli-expire-{}-{port}.seq", std::process::id()));
    let mut erin = CliClient::start_with("erin", &addr, &["--device", "d", "--state", state.to_str().unwrap()], &[]);
    erin.expect("logged in as erin");
    erin.expect("(device d: stored up to #0");
    erin.expect("(inbox: stored up to 0, head 2, this page up to 2)");
    assert!(erin.expect("[#").starts_with("[#2 "), "only the message without an expiry");
    erin.type_line("/quit");
    assert!(erin.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));
    let _ = std::fs::remove_file(&state);
    assert!(stop(server).success());
}

/// The default `--state` file of a long user id and device was past
/// NAME_MAX and failed with "File name too long"; it is now cut and ends
/// in a hash of the pair, one file per pair.
#[test]
fn cli_client_state_file_of_a_long_user_and_device_is_one_valid_name_per_pair() {
    let port = common::free_port();
    let mut server = serve(port, "warn", Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let home = std::env::temp_dir().join(format!("sb-cli-home-long-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let env = [("HOME", home.as_os_str())];
    let user = "ü".repeat(100); // 200 bytes, each written as %XX%XX
    let mut alice = dev_login(&mut server, port, "alice");
    // A message for each device, which its client stores (and so saves
    // its seq); the first device's ACK may drop the first before the
    // second logs in (PROTOCOL.md 15.2).
    for (i, device) in [(1, "d".repeat(64)), (2, "e".repeat(64))] {
        send_stored(&mut alice, i, &user, &format!("hi{i}"));
        let mut c = CliClient::start_with(&user, &addr, &["--device", &device], &env);
        c.expect(&format!("logged in as {user}"));
        c.expect("stored up to #0");
        c.expect("(inbox: stored up to 0");
        assert!(c.expect(&format!("[#{i} ")).ends_with(&format!("from alice] hi{i}")));
        c.type_line("/quit");
        assert_eq!(c.proc.wait_for(Duration::from_secs(5)).and_then(|s| s.code()), Some(0), "{}", c.seen.join("\n"));
    }
    let names: Vec<String> =
        std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "one state file per pair: {names:?}");
    assert!(names.iter().all(|n| n.len() <= 255 && n.ends_with(".seq")), "{names:?}");
    let _ = std::fs::remove_dir_all(&home);
    assert!(stop(server).success());
}

/// The CLI client's room commands: /join, /pub, /leave, each acknowledged,
/// room messages printed with room and sender, nothing after /leave.
#[test]
fn cli_client_joins_publishes_to_and_leaves_rooms() {
    let port = common::free_port();
    let server = serve(port, "warn", Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let mut bob = CliClient::start("bob", &addr);
    bob.expect("logged in as bob");
    bob.type_line("/join lobby");
    bob.expect("(joined lobby)");
    let mut alice = CliClient::start("alice", &addr);
    alice.expect("logged in as alice");
    alice.type_line("/join lobby");
    alice.expect("(joined lobby)");
    alice.type_line("/pub lobby hi all");
    // Her own copy and the acknowledgement, in either order.
    let mut mine = [alice.expect("lobby"), alice.expect("lobby")];
    mine.sort();
    assert!(mine[0].contains("(published to lobby)"), "{mine:?}");
    assert!(mine[1].contains("in lobby from alice] hi all"), "{mine:?}");
    bob.expect("in lobby from alice] hi all");
    bob.type_line("/leave lobby");
    bob.expect("(left lobby)");
    alice.type_line("/pub lobby only me");
    alice.expect("lobby");
    alice.expect("lobby");
    bob.type_line("/ping");
    bob.expect("(pong)"); // and not the second message
    bob.type_line("/join");
    bob.expect("/join ROOM");
    bob.type_line("/quit");
    assert!(bob.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));
    assert!(stop(server).success());
}

/// Sends `payload` from `c` to `to` (stored: the server runs with its disk
/// store) and waits for its SEND_ACK.
fn send_stored(c: &mut Client, req_id: u32, to: &str, payload: &str) {
    c.send(req_id, to, payload.as_bytes()).unwrap();
    match c.recv_skipping_pings().unwrap().frame() {
        switchboard::proto::frame::Frame::SendAck { req_id: r, .. } => assert_eq!(r, req_id),
        other => panic!("expected SEND_ACK {req_id}, got {other:?}"),
    }
}

/// `switchboard client --device`: stored messages print with their seq,
/// once; they are acknowledged; the last seq is kept in the state file (by
/// default in the home directory), so a second run resumes after it and
/// fetches a backlog longer than the first page; a third run with a fresh
/// state file sees the server's position, i.e. that everything was ACKed.
#[test]
fn cli_client_with_a_device_acknowledges_and_resumes_across_runs() {
    let port = common::free_port();
    let mut server = serve(port, "warn", Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let home = std::env::temp_dir().join(format!("sb-cli-home-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let env = [("HOME", home.as_os_str())];
    let state = home.join(".switchboard-client-carol@cli-1.seq");
    let mut alice = dev_login(&mut server, port, "alice");
    for i in 1..=3 {
        send_stored(&mut alice, i, "carol", &format!("m{i}"));
    }

    // First run: the three stored ones, then one live.
    let mut carol = CliClient::start_with("carol", &addr, &["--device", "cli-1"], &env);
    carol.expect("logged in as carol");
    carol.expect(&format!("(device cli-1: stored up to #0, kept in {})", state.display()));
    carol.expect("(inbox: stored up to 0, head 3, this page up to 3)");
    for i in 1..=3 {
        assert!(carol.expect(&format!("[#{i} ")).ends_with(&format!("from alice] m{i}")));
    }
    send_stored(&mut alice, 4, "carol", "m4");
    assert!(carol.expect("[#4 ").ends_with("from alice] m4"));
    carol.type_line("/quit");
    assert!(carol.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "4\n");

    // Away: 26 more, past the server's first page of 20.
    for i in 5..=30 {
        send_stored(&mut alice, i, "carol", &format!("m{i}"));
    }
    let mut carol = CliClient::start_with("carol", &addr, &["--device", "cli-1"], &env);
    carol.expect("logged in as carol");
    carol.expect("(device cli-1: stored up to #4");
    carol.expect("(inbox: stored up to 4, head 30, this page up to 24)");
    for i in 5..=24 {
        assert!(carol.expect(&format!("[#{i} ")).ends_with(&format!("from alice] m{i}")));
    }
    carol.expect("(inbox: stored up to 24, head 30, this page up to 30)"); // its FETCH
    for i in 25..=30 {
        assert!(carol.expect(&format!("[#{i} ")).ends_with(&format!("from alice] m{i}")));
    }
    carol.type_line("/ping");
    carol.expect("(pong)"); // and nothing printed twice before it
    carol.type_line("/quit");
    assert!(carol.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "30\n");

    // A fresh state file: the server's own record of the device says 30.
    let fresh = home.join("fresh.seq");
    let fresh_arg = fresh.to_str().unwrap();
    let mut carol = CliClient::start_with("carol", &addr, &["--device", "cli-1", "--state", fresh_arg], &env);
    carol.expect("logged in as carol");
    carol.expect("(device cli-1: stored up to #0");
    carol.expect("(inbox: stored up to 30, head 30, this page up to 30)");
    carol.type_line("/quit");
    assert!(carol.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));
    let _ = std::fs::remove_dir_all(&home);
    assert!(stop(server).success());
}

/// `switchboard client --device` with nothing to read on its input (a
/// script, cron: `< /dev/null`) used to close before the login's SYNC
/// arrived, so what was stored for it never printed, however often it
/// ran. The end of input now waits (within its 5 s) for the SYNC and for
/// what it says is waiting, pages past the first included.
#[test]
fn cli_client_with_a_device_and_no_input_prints_what_was_waiting() {
    let port = common::free_port();
    let mut server = serve(port, "warn", Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let state = std::env::temp_dir().join(format!("sb-cli-noinput-{}-{port}.seq", std::process::id()));
    let mut alice = dev_login(&mut server, port, "alice");
    for i in 1..=25 {
        send_stored(&mut alice, i, "ivan", &format!("m{i}"));
    }
    let run = || {
        let out = Command::new(SB)
            .args(["client", "--user", "ivan", "--addr", &addr, "--device", "cron", "--state"])
            .arg(&state)
            .env_remove("SWITCHBOARD_JWT_SECRET")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = run();
    assert_eq!(code, Some(0), "{out}");
    let seqs: Vec<&str> = out.lines().filter(|l| l.starts_with("[#")).collect();
    assert_eq!(seqs.len(), 25, "the first page of 20 and the FETCHed rest, once each:\n{out}");
    for (i, line) in (1..=25).zip(&seqs) {
        assert!(line.starts_with(&format!("[#{i} ")) && line.ends_with(&format!("from alice] m{i}")), "{out}");
    }
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "25\n");
    // Acknowledged: the next run has nothing new.
    let (code, out) = run();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("(inbox: stored up to 25, head 25, this page up to 25)"), "{out}");
    assert!(!out.contains("[#"), "{out}");
    let _ = std::fs::remove_file(&state);
    assert!(stop(server).success());
}

/// `switchboard client --device` whose state file cannot take the last
/// seq: it used to print the message, fail to save it, acknowledge it all
/// the same and exit 0, so the server dropped it and the next run, which
/// resumes from the file, never got it. A state file that cannot be
/// written is now refused at start (exit 2, before connecting); one that
/// fails later stops the client (exit 1) with the message unacknowledged,
/// and the next run gets it.
#[test]
fn cli_client_with_a_device_acknowledges_nothing_it_could_not_save() {
    let port = common::free_port();
    let mut server = serve(port, "warn", Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("sb-cli-unsaved-{}-{port}", std::process::id()));
    let state = dir.join("fay.seq");
    let state_arg = ["--device", "cli-1", "--state", state.to_str().unwrap()];

    // The directory does not exist: said at start.
    let mut fay = CliClient::start_with("fay", &addr, &state_arg, &[]);
    let status = fay.proc.wait_for(Duration::from_secs(5)).expect("it exits at start");
    let said = fay.lines.iter().collect::<Vec<_>>().join("\n"); // all of it: both pipes are closed
    assert_eq!(status.code(), Some(2), "{said}");
    assert!(said.contains("cannot save the last seq") && !said.contains("logged in"), "{said}");

    // It exists at start and is gone when #2 arrives.
    std::fs::create_dir_all(&dir).unwrap();
    let mut alice = dev_login(&mut server, port, "alice");
    send_stored(&mut alice, 1, "fay", "m1");
    let mut fay = CliClient::start_with("fay", &addr, &state_arg, &[]);
    fay.expect("logged in as fay");
    fay.expect("(device cli-1: stored up to #0");
    fay.expect("(inbox: stored up to 0, head 1, this page up to 1)");
    assert!(fay.expect("[#1 ").ends_with("from alice] m1"));
    std::thread::sleep(Duration::from_millis(300)); // its ACK goes
    std::fs::remove_dir_all(&dir).unwrap();
    send_stored(&mut alice, 2, "fay", "m2");
    // Printed (stdout), then not saved (stderr): two pipes, either first.
    let two = [fay.expect(""), fay.expect("")];
    assert!(two.iter().any(|l| l.starts_with("[#2 ") && l.ends_with("from alice] m2")), "{two:?}");
    let why = two.iter().find(|l| l.starts_with("switchboard: cannot save the last seq")).expect("the failure is said");
    assert!(why.contains("#2 is not acknowledged"), "{why}");
    let status = fay.proc.wait_for(Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", fay.seen.join("\n"));

    // The file as it was saved: the next run gets #2.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&state, "1\n").unwrap();
    let mut fay = CliClient::start_with("fay", &addr, &state_arg, &[]);
    fay.expect("logged in as fay");
    fay.expect("(device cli-1: stored up to #1");
    fay.expect("(inbox: stored up to 1, head 2, this page up to 2)");
    assert!(fay.expect("[#2 ").ends_with("from alice] m2"));
    fay.type_line("/quit");
    assert!(fay.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "2\n");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stop(server).success());
}

/// `switchboard client --device` against a server whose inbox is not the
/// one it stored from (a memory store restarted, PROTOCOL.md 15.8): the
/// seqs it kept name other messages, so it starts over from the position
/// the new inbox has for it (#0) and gets what that inbox holds, also
/// once the new inbox's head has passed what it stored. (The login used
/// to move the position to the head, so that what it held counted as
/// acknowledged and could be dropped before the client's FETCH from #1
/// reached it; and up to 2026-12-06 it took the client's seq as the
/// position once the new head had passed it, so the client never got the
/// new messages up to it.)
#[test]
fn cli_client_with_a_device_gets_everything_from_a_store_that_started_over() {
    let port = common::free_port();
    let memory = ["--store", "memory"];
    let mut server = serve_with(port, "warn", &memory, &[], Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let home = std::env::temp_dir().join(format!("sb-cli-home-over-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let env = [("HOME", home.as_os_str())];
    let mut alice = dev_login(&mut server, port, "alice");
    for i in 1..=5 {
        send_stored(&mut alice, i, "dora", &format!("old{i}"));
    }
    let mut dora = CliClient::start_with("dora", &addr, &["--device", "cli-1"], &env);
    dora.expect("logged in as dora");
    dora.expect("(device cli-1: stored up to #0");
    dora.expect("(inbox: stored up to 0, head 5, this page up to 5)");
    for i in 1..=5 {
        assert!(dora.expect(&format!("[#{i} ")).ends_with(&format!("from alice] old{i}")));
    }
    dora.type_line("/quit");
    assert!(dora.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));

    // The memory store starts over: seven new messages are #1 to #7, past
    // the #5 the client stored.
    assert!(stop(server).success());
    let mut server = serve_with(port, "warn", &memory, &[], Stdio::null(), Stdio::null());
    let mut alice = dev_login(&mut server, port, "alice");
    for i in 1..=7 {
        send_stored(&mut alice, i, "dora", &format!("new{i}"));
    }
    let mut dora = CliClient::start_with("dora", &addr, &["--device", "cli-1"], &env);
    dora.expect("logged in as dora");
    dora.expect("(device cli-1: stored up to #5");
    // The login left the device where the new store had it (15.6): its
    // first page brings all seven.
    dora.expect("(inbox: stored up to 0, head 7, this page up to 7)");
    dora.expect("another inbox, or this device was forgotten; going on from #0");
    for i in 1..=7 {
        assert!(dora.expect(&format!("[#{i} ")).ends_with(&format!("from alice] new{i}")));
    }
    // And what comes next is taken, not dropped as a copy of an old one.
    send_stored(&mut alice, 8, "dora", "new8");
    assert!(dora.expect("[#8 ").ends_with("from alice] new8"));
    dora.type_line("/quit");
    assert!(dora.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));
    let _ = std::fs::remove_dir_all(&home);
    assert!(stop(server).success());
}

/// `--help` explains every option and the commands one types.
#[test]
fn cli_client_help_explains_its_options_and_commands() {
    let out = Command::new(SB).args(["client", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    for line in help.lines().filter(|l| l.trim_start().starts_with("--")) {
        let option = line.split_whitespace().next().unwrap();
        let explained = line.split_whitespace().count() > 2
            || help.lines().skip_while(|l| !l.contains(option)).nth(1).is_some_and(|n| n.starts_with("          "));
        assert!(explained, "{option} has no help text:\n{help}");
    }
    for cmd in ["@USER", "/join", "/leave", "/pub", "/ping", "/quit"] {
        assert!(help.contains(cmd), "{cmd} is not explained:\n{help}");
    }
}

/// `--addr` takes a host name, as a server's address usually is one:
/// `--addr localhost:PORT` was refused as "invalid socket address syntax"
/// (exit 2), only an IP address and port passed. Each address the name
/// has is tried (localhost may be ::1 first, where this server does not
/// listen); a name that does not resolve is exit 1, as a server that
/// cannot be reached is, and an address without a port is a bad argument.
#[test]
fn cli_client_addr_takes_a_host_name() {
    let port = common::free_port();
    let server = serve(port, "warn", Stdio::null(), Stdio::null());
    let (status, printed) = piped_client(&format!("localhost:{port}"), "gus", "@gus hi\n");
    assert_eq!(status, Some(0), "{printed}");
    assert!(printed.contains("logged in as gus") && printed.contains("(send #1: "), "{printed}");
    for (addr, code, said) in [("localhost", 2, "HOST:PORT"), ("no-such-host.invalid:7700", 1, "no-such-host.invalid")]
    {
        let out = Command::new(SB)
            .args(["client", "--user", "gus", "--addr", addr])
            .env_remove("SWITCHBOARD_JWT_SECRET")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "--addr {addr}: {stderr}");
        assert!(stderr.contains(said), "--addr {addr}: {stderr}");
    }
    assert!(stop(server).success());
}

/// `switchboard client` pointed at the WebSocket port: the server answers
/// in HTTP, and the client says which mistake that probably is, instead of
/// "frame of 1213486164 bytes".
#[test]
fn cli_client_on_the_websocket_port_names_the_likely_mistake() {
    let (port, ws_port) = (common::free_port(), common::free_port());
    let server =
        serve_with(port, "warn", &["--ws-listen", &format!("127.0.0.1:{ws_port}")], &[], Stdio::null(), Stdio::null());
    let mut c = CliClient::start("alice", &format!("127.0.0.1:{ws_port}"));
    let line = c.expect("switchboard:");
    assert!(line.contains("answered in HTTP") && line.contains("WebSocket"), "{line}");
    assert!(line.contains("raw TCP port") && line.contains("7700"), "{line}");
    let status = c.proc.wait_for(Duration::from_secs(5)).expect("the client exits");
    assert_eq!(status.code(), Some(1));
    assert!(stop(server).success());
}

/// The commands the banner suggests work as printed from the checkout,
/// where `switchboard` is not on PATH (it names the binary by its path
/// then), and it says how to turn on the admin API, which is off.
#[test]
fn the_banner_commands_work_from_the_checkout() {
    let port = common::free_port();
    let (read, write) = pipe();
    let reader = read_all_later(std::fs::File::from(read));
    let server = serve_with(port, "warn", &[], &[("PATH", "/usr/bin:/bin")], Stdio::from(write), Stdio::null());
    assert!(stop(server).success());
    let banner = reader.join().unwrap();
    let quoted: Vec<&str> = banner.split('`').skip(1).step_by(2).collect();
    let token_cmd = quoted.iter().find(|c| c.contains(" token ")).unwrap_or_else(|| panic!("{banner}"));
    let client_cmd = quoted.iter().find(|c| c.contains(" client ")).unwrap_or_else(|| panic!("{banner}"));
    assert!(banner.contains("--admin 127.0.0.1:7701"), "how to turn the admin API on:\n{banner}");
    for cmd in [token_cmd, client_cmd] {
        let program = cmd.split_whitespace().next().unwrap();
        assert!(program != "switchboard", "not on PATH here:\n{banner}");
        let found = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(program);
        assert!(found.exists(), "{program} from the checkout:\n{banner}");
    }
    // Run the token command as printed (the shell splits it as a user's would).
    let out = Command::new("sh")
        .arg("-c")
        .arg(token_cmd)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{token_cmd}: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim().split('.').count(), 3);
}

/// `scripts/capacity.sh --help` answers at once, before (and without) the
/// two release builds the runs need: here with no cargo on the PATH at all.
#[test]
fn capacity_sh_help_comes_before_any_build() {
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/capacity.sh"))
        .arg("--help")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}{}", String::from_utf8_lossy(&out.stderr));
    for option in ["--full", "--no-peers", "--no-nchan", "--ws-only", "--ws-connections", "--out"] {
        assert!(help.contains(option), "{option}:\n{help}");
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let out = Command::new("bash")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/capacity.sh"))
        .arg("--fulll")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown option is refused before building");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fulll"));
}

/// The measurement scripts that take numbers, and the suite's own scripts,
/// answer `--help` at once and refuse an argument that is not a number
/// before (and without) a build: `--help` used to build the release
/// binaries (minutes on a cold tree) and then fail inside the measurement
/// (`ValueError: invalid literal for int() with base 10: '--help'`, or
/// the load generator's `--connections` refused), and test.sh ran clippy
/// first and then printed cargo's help. Here with no cargo on the PATH.
#[test]
fn measurement_scripts_help_comes_before_any_build() {
    let run = |script: &str, arg: &str| {
        Command::new("bash")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(script))
            .arg(arg)
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap()
    };
    for (script, usage) in [
        ("churn.sh", "--warmup"),
        ("idle-memory.sh", "[N] [RUNS]"),
        ("recovery-memory.sh", "[FILES] [MIB] [BYTES]"),
        ("metrics-scrape.sh", "[N] [SCRAPES]"),
        ("test.sh", "test filter"),
        ("autobahn.sh", "[--release]"),
    ] {
        let t = Instant::now();
        let out = run(script, "--help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{script}: {help}{}", String::from_utf8_lossy(&out.stderr));
        assert!(help.contains(usage), "{script}: {usage}:\n{help}");
        assert!(t.elapsed() < Duration::from_secs(5), "{script}: {:?}", t.elapsed());
    }
    for script in ["idle-memory.sh", "recovery-memory.sh", "metrics-scrape.sh"] {
        let out = run(script, "lots");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{script}: {stderr}");
        assert!(stderr.contains("lots is not a positive number"), "{script}: {stderr}");
    }
}

/// `switchboard client --device` on a server with a send budget, where
/// each FETCH spends one message of it (PROTOCOL.md 15.7): a catch-up of
/// more pages than the budget's burst gets ERROR 118 for some FETCHes and
/// sends each again after the wait the error names, until every message
/// is in, in order, once (before, the client left its FETCH marked as out
/// and the catch-up stopped at the first refusal).
#[test]
fn cli_client_catch_up_waits_out_the_send_budget() {
    let port = common::free_port();
    let dir = std::env::temp_dir().join(format!("sb-cli-budget-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("budget.toml");
    // One message a page: eleven FETCHes for twelve messages, against a
    // burst of four and four a second.
    std::fs::write(&cfg, "[limits]\nsend_rate = 4\nsend_burst = 4\n[delivery]\nfirst_page = 1\nmax_fetch = 1\n")
        .unwrap();
    let mut server = serve_with(port, "warn", &["--config", cfg.to_str().unwrap()], &[], Stdio::null(), Stdio::null());
    let addr = format!("127.0.0.1:{port}");
    let mut alice = dev_login(&mut server, port, "alice");
    // alice has a budget too: her SENDs wait out their own ERROR 118s.
    let mut req_id = 0;
    for i in 1..=12 {
        loop {
            req_id += 1;
            alice.send(req_id, "erin", format!("m{i}").as_bytes()).unwrap();
            match alice.recv_skipping_pings().unwrap().frame() {
                switchboard::proto::frame::Frame::SendAck { .. } => break,
                switchboard::proto::frame::Frame::Error { code: 118, .. } => {
                    std::thread::sleep(Duration::from_millis(250))
                }
                other => panic!("expected SEND_ACK or ERROR 118, got {other:?}"),
            }
        }
    }
    let state = dir.join("erin.seq");
    let mut erin =
        CliClient::start_with("erin", &addr, &["--device", "cli-1", "--state", state.to_str().unwrap()], &[]);
    erin.expect("logged in as erin");
    let (mut printed, mut refused) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while printed.len() < 12 {
        assert!(Instant::now() < deadline, "caught up on {printed:?} only; so far:\n{}", erin.seen.join("\n"));
        let line = erin.lines.recv_timeout(Duration::from_secs(10)).expect("a line within 10 s");
        erin.seen.push(line.clone());
        if let Some(rest) = line.strip_prefix("[#") {
            let seq: u32 = rest.split(' ').next().unwrap().parse().unwrap();
            assert!(line.ends_with(&format!("from alice] m{seq}")), "{line}");
            printed.push(seq);
        } else if line.contains("(error 118: rate limited") {
            refused += 1;
        } else {
            assert!(line.starts_with("(device ") || line.starts_with("(inbox: "), "unexpected: {line}");
        }
    }
    assert_eq!(printed, (1..=12).collect::<Vec<u32>>(), "every message once, in order");
    assert!(refused > 0, "the burst of 4 cannot cover 11 FETCHes: some must have been refused and sent again");
    erin.type_line("/quit");
    assert!(erin.proc.wait_for(Duration::from_secs(5)).is_some_and(|s| s.success()));
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "12\n");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stop(server).success());
}

/// A config file of this test's own, removed when dropped.
struct TempConfig(std::path::PathBuf);

impl TempConfig {
    fn new(name: &str, text: &str) -> TempConfig {
        let path = std::env::temp_dir().join(format!("sb-cli-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `serve --help` says the flags override the file: what is checked is
/// the file with the flags applied, not the file alone. A file whose
/// address is public (where the development secret is refused) serves on
/// the loopback address `--listen` gives; a file naming a Redis for the
/// cluster is refused for the store `--store` replaces, not the one the
/// file alone would get.
#[test]
fn flags_override_the_file_before_it_is_checked() {
    let port = common::free_port();
    let file = TempConfig::new("override-listen", &format!("[server]\nlisten = \"0.0.0.0:{port}\"\n"));
    let p =
        serve_with(port, "warn", &["--config", file.path(), "--store", "memory"], &[], Stdio::null(), Stdio::null());
    assert!(stop(p).success());
    // The merged result is still checked: a public --listen over a
    // loopback file is refused (exit 2), naming the secret.
    // `serve --config FILE ARGS…` refused as a bad configuration: its stderr.
    let refused = |file: &TempConfig, args: &[&str]| {
        let out = Command::new(SB)
            .args(["serve", "--config", file.path(), "--ws-listen", ""])
            .args(args)
            .env_remove("SWITCHBOARD_JWT_SECRET")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        stderr
    };
    let file = TempConfig::new("override-public", "[server]\nlisten = \"127.0.0.1:0\"\n");
    let stderr = refused(&file, &["--listen", "0.0.0.0:0", "--store", "none"]);
    assert!(stderr.contains("auth.jwt_secret"), "{stderr}");
    // cluster.redis with the file's default disk store is refused; with
    // --store memory the refusal names the memory store (the one in force).
    let file = TempConfig::new("override-store", "[cluster]\nredis = \"redis://127.0.0.1:1\"\n");
    let stderr = refused(&file, &["--listen", "127.0.0.1:0", "--store", "memory"]);
    assert!(stderr.contains("\"memory\""), "the store in force is named: {stderr}");
    assert!(!stderr.contains("\"disk\""), "not the file's default: {stderr}");
}

/// `client --device` takes 1 to 64 bytes, as `--help` says: anything else
/// is a bad argument (exit 2), said before connecting, as a bad `--user`
/// is. Nothing listens on the address: a client that connected first
/// would fail on that instead.
#[test]
fn cli_client_refuses_a_bad_device_before_connecting() {
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let long = "d".repeat(65);
    for device in ["", long.as_str()] {
        let out = Command::new(SB)
            .args(["client", "--user", "alice", "--addr", &nobody, "--device", device])
            .env_remove("SWITCHBOARD_JWT_SECRET")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--device of {} bytes: {stderr}", device.len());
        assert!(stderr.contains("device id must be 1 to 64 bytes"), "{stderr}");
        assert!(!stderr.contains("connect"), "{stderr}");
    }
}
