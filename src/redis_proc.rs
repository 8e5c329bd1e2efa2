//! Real `redis-server` processes for tests and benchmarks: one server, or a
//! Redis Cluster of N masters, on loopback ports picked here.
//!
//! Owns: the child processes it starts (each with its own temporary
//! directory, killed with SIGKILL and its directory removed on drop), the
//! choice of their ports, and the waiting until they answer.
//! Must not: be used by the server itself (it is test and bench tooling,
//! hidden from the docs), mock anything (these are the Debian `redis-server`
//! and `redis-cli` binaries), or skip silently: when `redis-server` is not
//! installed every constructor panics saying so (`scripts/test.sh` installs
//! it).
//!
//! Children are spawned by one long-lived thread of this process with
//! `PR_SET_PDEATHSIG = SIGKILL`, so a test process that dies (even by
//! SIGKILL, or a `static` cluster that is never dropped) takes its Redis
//! processes with it. The kernel sends that signal when the spawning
//! *thread* exits, hence the one thread that never does.
//!
//! ```no_run
//! use switchboard::redis_proc::{AppendFsync, RedisServer, RedisCluster};
//! let one = RedisServer::builder().appendonly(AppendFsync::Always).start();
//! let url = one.url(); // "redis://127.0.0.1:<port>"
//! let three = RedisCluster::start(3);
//! let seeds = three.urls();
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a server may take to answer PING after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a new cluster may take to reach `cluster_state:ok` on every node.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Ports tried before giving up when another process takes the one picked.
const PORT_ATTEMPTS: usize = 20;

/// `appendfsync`: when Redis fsyncs its append-only file.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AppendFsync {
    /// Before answering each write: an acknowledged write survives power loss.
    Always,
    /// Once a second: power loss may take the last second.
    EverySec,
    /// When the kernel decides.
    No,
}

impl AppendFsync {
    fn as_str(self) -> &'static str {
        match self {
            AppendFsync::Always => "always",
            AppendFsync::EverySec => "everysec",
            AppendFsync::No => "no",
        }
    }
}

/// How to start a [`RedisServer`]: no persistence by default.
#[derive(Clone, Debug, Default)]
pub struct RedisBuilder {
    appendonly: Option<AppendFsync>,
    cluster: bool,
    extra: Vec<(String, String)>,
}

impl RedisBuilder {
    /// `appendonly yes` with this `appendfsync`: a restart reloads the AOF.
    pub fn appendonly(mut self, fsync: AppendFsync) -> Self {
        self.appendonly = Some(fsync);
        self
    }

    /// `cluster-enabled yes` (the node answers once a cluster is created;
    /// [`RedisCluster`] does that).
    pub fn cluster(mut self, on: bool) -> Self {
        self.cluster = on;
        self
    }

    /// Any other `redis.conf` directive, e.g. `("maxmemory", "10mb")`.
    pub fn config(mut self, name: &str, value: &str) -> Self {
        self.extra.push((name.to_string(), value.to_string()));
        self
    }

    /// Starts the server and waits until it answers PING. Panics with the
    /// reason (not installed, no free port, its log) if it cannot.
    pub fn start(self) -> RedisServer {
        require_redis_server();
        let dir = temp_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let bus_port = if self.cluster { free_port() } else { 0 };
            let mut server = RedisServer { port, bus_port, dir: dir.clone(), child: None, opts: self.clone() };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(Spawn::PortTaken) => {
                    server.dir = PathBuf::new(); // kept for the next attempt
                    continue;
                }
                Err(Spawn::Failed(why)) => panic!("redis-server on port {port} did not start: {why}"),
            }
        }
        panic!("redis-server: no free loopback port after {PORT_ATTEMPTS} attempts");
    }
}

enum Spawn {
    PortTaken,
    Failed(String),
}

/// One `redis-server` process on `127.0.0.1:<port>`, killed on drop.
pub struct RedisServer {
    port: u16,
    /// The cluster bus port (`cluster-port`), 0 when not a cluster node.
    bus_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    opts: RedisBuilder,
}

impl RedisServer {
    /// A server without persistence.
    pub fn start() -> RedisServer {
        RedisBuilder::default().start()
    }

    /// Options: `appendonly`, cluster mode, other directives.
    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its working directory (AOF, `nodes.conf`, `redis.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client for this server (connect with `get_connection`).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a loopback URL is valid")
    }

    /// Runs one command on a fresh connection, e.g. `["CLUSTER", "KEYSLOT", "k"]`.
    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut con = self.client().get_connection_with_timeout(Duration::from_secs(5))?;
        con.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut con)
    }

    /// SIGSTOP: the process stops answering (its socket still accepts).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL, and waits for the process to be gone. What Redis had not
    /// written to its AOF is lost, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process if it runs, then starts it again on the same port
    /// with the same directory (so an AOF and `nodes.conf` are reloaded),
    /// and waits until it answers PING (after loading).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The port of the killed process may linger a moment.
                Err(Spawn::PortTaken) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(Spawn::PortTaken) => panic!("redis-server: port {} stays taken after a restart", self.port),
                Err(Spawn::Failed(why)) => panic!("redis-server on port {} did not restart: {why}", self.port),
            }
        }
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("the server is running");
        // SAFETY: kill(2) on the pid of a child we have not yet waited for.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}): {}", child.id(), std::io::Error::last_os_error());
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), Spawn> {
        let mut cmd = Command::new("redis-server");
        let mut arg = |name: &str, value: &str| {
            cmd.arg(format!("--{name}")).arg(value);
        };
        arg("port", &self.port.to_string());
        arg("bind", "127.0.0.1");
        arg("dir", self.dir.to_str().expect("a UTF-8 temp dir"));
        arg("logfile", self.log_path().to_str().expect("a UTF-8 temp dir"));
        arg("daemonize", "no");
        arg("protected-mode", "no");
        arg("save", "");
        match self.opts.appendonly {
            Some(fsync) => {
                arg("appendonly", "yes");
                arg("appendfsync", fsync.as_str());
            }
            None => arg("appendonly", "no"),
        }
        if self.opts.cluster {
            arg("cluster-enabled", "yes");
            arg("cluster-config-file", "nodes.conf");
            arg("cluster-port", &self.bus_port.to_string());
            arg("cluster-node-timeout", "5000");
        }
        for (name, value) in &self.opts.extra {
            arg(name, value);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let log_len = std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
        let mut child = spawn(cmd).map_err(|e| Spawn::Failed(format!("spawning redis-server: {e}")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let log = log.get(log_len as usize..).unwrap_or(&log).to_string();
                if log.contains("Address already in use") {
                    return Err(Spawn::PortTaken);
                }
                return Err(Spawn::Failed(format!("it exited ({status}); its log:\n{log}")));
            }
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Spawn::Failed(format!("no PONG within {START_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A paused process dies of SIGKILL too; resume anyway so that
            // nothing is left stopped if the kill races.
            // SAFETY: kill(2) on our own unwaited child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.kill();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A Redis Cluster of N masters and no replicas, every node a
/// [`RedisServer`] with `cluster-enabled yes`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3, Redis's minimum), creates the
    /// cluster with `redis-cli --cluster create`, and waits until every
    /// node says `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        Self::start_with(masters, RedisBuilder::default())
    }

    /// [`start`](Self::start) with options for every node (e.g. `appendonly`).
    pub fn start_with(masters: usize, opts: RedisBuilder) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters, not {masters}");
        require_redis_cli();
        let nodes: Vec<RedisServer> = (0..masters).map(|_| opts.clone().cluster(true).start()).collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = create.output().expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        for n in &self.nodes {
            loop {
                let info = match n.cmd(&["CLUSTER", "INFO"]) {
                    Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
                    Ok(redis::Value::VerbatimString { text, .. }) => text,
                    other => format!("{other:?}"),
                };
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "node {} not ok within {CLUSTER_TIMEOUT:?}: {info}", n.port);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The seed URLs, one per node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i`, to pause, resume, kill or restart.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }
}

/// Panics, saying how to fix it, when `redis-server` cannot be run.
fn require_redis_server() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| require("redis-server"));
}

fn require_redis_cli() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| require("redis-cli"));
}

fn require(program: &str) {
    match Command::new(program).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("`{program} --version` failed ({}): is Redis installed correctly?", o.status),
        Err(e) => panic!(
            "cannot run `{program}` ({e}): these tests start real Redis servers. Install Redis \
             (`apt-get install redis-server`, as scripts/test.sh does) and run them again"
        ),
    }
}

/// A loopback port that was free a moment ago (the OS picks it).
fn free_port() -> u16 {
    // Ports above 55535 are skipped: Redis's default cluster bus is port + 10000.
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = l.local_addr().expect("a bound address").port();
        if port <= 55_535 {
            return port;
        }
    }
}

const DIR_PREFIX: &str = "switchboard-redis-";

fn temp_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(remove_dirs_of_dead_processes);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()))
}

/// Removes the directories left by test processes that are gone (a
/// `static` cluster is never dropped, so its directories outlive it).
fn remove_dirs_of_dead_processes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<libc::pid_t>().ok()) else { continue };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Whether Redis on `port` answers PING with PONG (not LOADING, not silence).
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

type SpawnReq = (Command, Sender<std::io::Result<Child>>);

/// Spawns `cmd` on the process's spawner thread (see the module doc).
fn spawn(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<Sender<SpawnReq>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<SpawnReq>();
        std::thread::Builder::new()
            .name("redis-proc-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // SAFETY: prctl and getppid are async-signal-safe; the
                    // closure allocates nothing.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the redis-proc spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = channel();
    tx.lock().unwrap_or_else(|e| e.into_inner()).send((cmd, reply_tx)).expect("the spawner thread runs");
    reply_rx.recv().expect("the spawner thread answers")
}
