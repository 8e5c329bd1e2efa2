//! The runtime layer: worker threads, each with its own monoio runtime.
//!
//! Owns: choosing the io driver (io_uring, or an explicit, logged epoll
//! fallback), binding one `SO_REUSEPORT` listener per worker, pinning
//! workers to cores, and starting them.
//! Must not: leak monoio types out of this module: it is the only place that
//! imports monoio.

mod budgets;
mod bufring;
pub(crate) mod inbox;
mod poller;
mod shared;
mod sys;
mod worker;
pub(crate) mod write;

pub(crate) use shared::{Command, Shared};
pub use shared::{Handle, MessageHook};
pub(crate) use worker::SCRATCH_BYTES;
pub(crate) use write::deliver_at;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_utils::CachePadded;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use socket2::{Domain, Protocol, Socket, Type};

use crate::app::StartError;
use crate::auth::Authenticator;
use crate::config::{Config, IoDriver};
use crate::directory::Directory;
use crate::ids::{WorkerId, MAX_SLOTS_PER_WORKER};
use crate::mailbox::Mailbox;
use crate::outq::OutLimits;
use crate::rooms::RoomRegistry;
use crate::stats::WorkerCounters;

/// Which driver the workers actually run on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DriverKind {
    IoUring,
    Epoll,
}

impl DriverKind {
    /// As the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// What a worker's client sockets run on, as it started: its poller may
/// have fallen back to epoll, and its send ring may have been refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPath {
    /// Multishot receives on io_uring (`server.poller = "io_uring"`), else
    /// readiness from epoll and a `recv` per read.
    pub uring_receives: bool,
    /// Batched sends (`server.batch_sends`), else one `sendmsg` per write.
    pub batched_sends: bool,
}

/// Tries to create an io_uring with the configured sizes.
fn probe_io_uring(config: &Config) -> std::io::Result<()> {
    io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_cqsize(config.uring.cq_entries)
        .build(config.uring.sq_entries)
        .map(drop)
}

/// Picks the driver: io_uring unless the config says epoll; with `auto`, a
/// kernel that refuses io_uring (old kernel, seccomp, `io_uring_disabled`)
/// gets epoll and a warning saying why.
pub fn choose_driver(config: &Config) -> Result<DriverKind, StartError> {
    let driver = pick_driver(config)?;
    // What needs io_uring goes with the epoll driver, said once here.
    if driver == DriverKind::Epoll {
        if config.server.poller == crate::config::PollerKind::IoUring {
            tracing::warn!(
                "server.poller = \"io_uring\" needs the io_uring driver; the epoll driver runs: client sockets use epoll"
            );
        }
        if config.server.batch_sends {
            tracing::warn!(
                "server.batch_sends needs the io_uring driver; the epoll driver runs: one sendmsg per write"
            );
        }
    }
    Ok(driver)
}

fn pick_driver(config: &Config) -> Result<DriverKind, StartError> {
    match config.server.io_driver {
        IoDriver::Epoll => Ok(DriverKind::Epoll),
        IoDriver::IoUring => probe_io_uring(config).map(|_| DriverKind::IoUring).map_err(|e| StartError::Worker {
            worker: 0,
            message: format!(
                "io_uring is unavailable ({e}); check /proc/sys/kernel/io_uring_disabled and seccomp, \
                     or set server.io_driver = \"epoll\" (or \"auto\" to fall back)"
            ),
        }),
        IoDriver::Auto => match probe_io_uring(config) {
            Ok(()) => Ok(DriverKind::IoUring),
            Err(e) => {
                tracing::warn!(
                    "io_uring is unavailable ({e}); FALLING BACK TO EPOLL. Set server.io_driver = \"io_uring\" to refuse instead."
                );
                Ok(DriverKind::Epoll)
            }
        },
    }
}

/// Refuses to join a port another process already listens on (our
/// SO_REUSEPORT listeners would silently share it) unless configured to,
/// naming the holder and what to do instead (`crate::portholder`).
fn check_port_free(
    addr: SocketAddr,
    config: &Config,
    raw: SocketAddr,
    ws: Option<SocketAddr>,
) -> Result<(), StartError> {
    if addr.port() == 0 || config.server.share_listen_port {
        return Ok(());
    }
    probe_port(addr, |holder| crate::portholder::advice(addr, holder, raw, ws))
}

/// Binds `addr` once (with SO_REUSEADDR, as the listeners are) and lets go:
/// a port in use is refused with `advice` (given who holds it), before
/// anything has started, unless only a dead server's listeners hold it:
/// then it waits up to [`UNOWNED_LISTENER_WAIT`] for the kernel to free
/// them. Port 0 always passes.
pub(crate) fn probe_port(
    addr: SocketAddr,
    advice: impl FnOnce(Option<&crate::portholder::Holder>) -> String,
) -> Result<(), StartError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let err = |source| StartError::Bind { addr, source };
    let bind = || -> std::io::Result<()> {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())
    };
    let in_use = |r: &std::io::Result<()>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE));
    let mut result = bind();
    if in_use(&result) && crate::portholder::unowned_listener(addr.port()) {
        // The listeners of a server killed a moment ago, still being torn
        // down by the kernel (`portholder::unowned_listener`): a restart
        // at once (kill -9, a supervisor without a delay) waits for them
        // instead of failing. Joining them is not an option: with
        // SO_REUSEPORT the real listeners could bind beside them, and the
        // connections the kernel handed to them meanwhile would go with
        // them (unless net.ipv4.tcp_migrate_req moves them).
        tracing::info!(
            "{addr} is still held by a listener no process owns (a server that just exited, being torn down): waiting up to {} ms",
            UNOWNED_LISTENER_WAIT.as_millis()
        );
        let end = std::time::Instant::now() + UNOWNED_LISTENER_WAIT;
        while in_use(&result) && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(5));
            result = bind();
        }
    }
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            let holder = crate::portholder::find(addr.port());
            Err(StartError::Bind { addr, source: std::io::Error::new(e.kind(), advice(holder.as_ref())) })
        }
        Err(e) => Err(err(e)),
        Ok(()) => Ok(()),
    }
}

/// How long a start waits for a dead server's listeners to go: they
/// lingered for up to tens of milliseconds in the measurements behind
/// `a_server_restarted_right_after_a_sigkill_takes_its_port_back`
/// (tests/deploy.rs); a hundredfold margin on a loaded host.
const UNOWNED_LISTENER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn bind_listener(addr: SocketAddr, config: &Config) -> Result<std::net::TcpListener, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    // Accepted sockets inherit these buffer sizes from the listener: no
    // setsockopt per connection. 0: not set, the kernel autotunes them.
    if config.socket.rcvbuf_bytes > 0 {
        s.set_recv_buffer_size(config.socket.rcvbuf_bytes).map_err(err)?;
    }
    if config.socket.sndbuf_bytes > 0 {
        s.set_send_buffer_size(config.socket.sndbuf_bytes).map_err(err)?;
    }
    s.set_nodelay(config.socket.nodelay).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(config.server.listen_backlog.min(i32::MAX as u32) as i32).map_err(err)?;
    Ok(s.into())
}

/// Starts the workers and returns once every one is accepting.
pub(crate) fn start(
    config: Config,
    authenticator: Arc<dyn Authenticator>,
    hook: Option<MessageHook>,
    custom_store: Option<Box<dyn crate::store::Store>>,
) -> Result<Started, StartError> {
    let addr = config.listen_addr()?;
    let cpus = sys::allowed_cpus();
    let workers = config.server.worker_count(cpus.len());
    if config.server.workers == 0 && cpus.len() > crate::ids::MAX_WORKERS {
        tracing::warn!(
            cpus = cpus.len(),
            "more CPUs than workers a server can run: starting {workers} (server.workers = 0 means one per CPU, at most {})",
            crate::ids::MAX_WORKERS
        );
    }
    let ring_bytes = crate::limits::uring_bytes_per_worker(&config);
    // What the process holds already (an embedding application's files and
    // sockets) is not the clients' to take either.
    let besides = crate::limits::descriptors_besides_clients(&config, workers) + crate::limits::open_descriptors();
    let report =
        crate::limits::check(config.server.max_connections, workers, besides, config.server.listen_backlog, ring_bytes)
            .map_err(StartError::Limits)?;
    for w in &report.warnings {
        tracing::warn!("{w}");
    }
    // The same audit `switchboard check` prints, for what start-up does not
    // refuse on: each shortfall is logged with its fix.
    let fixed = crate::limits::fixed_memory(&config, workers);
    let audit =
        crate::limits::audit(report.max_connections as u64, workers, besides, config.server.listen_backlog, &fixed);
    // An application's own store takes no room under store.path.
    let disk = crate::limits::disk_item(&config).filter(|_| custom_store.is_none());
    for i in audit.into_iter().chain(disk) {
        if i.status != crate::limits::Status::Pass && i.name != "RLIMIT_NOFILE (hard)" {
            tracing::warn!("check {}: have {}, need {}; fix: {}", i.name, i.have, i.need, i.fix);
        }
    }
    let max_conns_per_worker = report.max_connections.div_ceil(workers).clamp(1, MAX_SLOTS_PER_WORKER);
    let driver = choose_driver(&config)?;

    // The store before the listeners: a data directory that cannot be
    // opened (permissions, another server holding it) stops the start
    // before any port is taken, and the time opening takes is not spent
    // with a listener up and no worker behind it.
    // The node id defaults to <hostname>:<configured listen port> (a port
    // of 0 gives ":0": set cluster.node_id when nodes share a host).
    // An application's own store (`ServerBuilder::custom_store`) is one
    // shard, whatever `store.kind` and `store.shards` say.
    let custom = custom_store.is_some();
    let store = match custom_store {
        Some(s) => vec![s],
        None => crate::store::open_store_shards(
            &config.store,
            config.store.shards,
            config.delivery.dedup_window_ms,
            &config.cluster,
            addr.port(),
        )
        .map_err(|e| StartError::Store { path: config.store.path.display().to_string(), message: e.to_string() })?,
    };
    let ws_addr = config.websocket.listen_addr()?;
    check_port_free(addr, &config, addr, ws_addr)?;
    if let Some(a) = ws_addr {
        check_port_free(a, &config, addr, ws_addr)?;
    }
    // What takes time to set up (the mailboxes are allocated and written
    // whole) comes before the listeners, so that a port that accepts has
    // its workers moments later: another server probing the port (or a
    // client) meets a server that is up, not one still allocating.
    let mailboxes = (0..workers)
        .map(|_| Mailbox::new(config.limits.mailbox_capacity))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_boxed_slice();
    let directory = Directory::with_capacity(config.limits.max_conns_per_user, report.max_connections);
    let outs: Box<[write::OutSlots]> = (0..workers).map(|_| write::OutSlots::new(max_conns_per_worker)).collect();
    let mut listeners = Vec::with_capacity(workers);
    let mut ws_listeners = Vec::with_capacity(workers);
    let mut bound = addr;
    let mut ws_bound = ws_addr;
    for i in 0..workers {
        let l = bind_listener(bound, &config)?;
        if i == 0 {
            bound = l.local_addr()?;
        }
        listeners.push(l);
        if let Some(a) = ws_bound {
            let l = bind_listener(a, &config)?;
            if i == 0 {
                ws_bound = Some(l.local_addr()?);
            }
            ws_listeners.push(Some(l));
        } else {
            ws_listeners.push(None);
        }
    }
    let shared = Arc::new(Shared {
        timeouts: config.timeouts_in_ticks(),
        max_conns_per_worker,
        mailboxes,
        directory,
        rooms: RoomRegistry::new(
            config.rooms.max_rooms,
            config.rooms.max_members_per_room,
            config.rooms.max_rooms_created_per_user,
        ),
        outs,
        write_rules: write::WriteRules {
            limits: OutLimits {
                max_frames: config.limits.outbound_max_frames,
                max_bytes: config.limits.outbound_max_bytes,
            },
            policy: config.limits.slow_consumer,
        },
        foreign_counters: crate::stats::ForeignCounters::default(),
        counters: (0..workers).map(|_| CachePadded::new(WorkerCounters::default())).collect(),
        authenticator,
        hook,
        shutdown: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        next_msg_id: AtomicU64::new(1),
        device_logins: AtomicU64::new(0),
        local_addr: bound,
        ws_addr: ws_bound,
        epoch: Instant::now(),
        failure: std::sync::Mutex::new(None),
        store: std::sync::OnceLock::new(),
        cluster: std::sync::OnceLock::new(),
        custom_store: custom,
        budgets: budgets::Budgets::new(),
        config,
    });
    // The cluster thread before the store's: the store thread hands it
    // stored messages for users on other nodes.
    let cluster = match shared.config.cluster.redis {
        Some(_) => {
            // The configured port, as the store's presence writes use
            // (the pid keeps ids apart when it is 0).
            let id: Arc<str> = Arc::from(shared.config.cluster.node_id_or_default(addr.port()));
            let (link, rx) =
                crate::cluster::queue(shared.config.cluster.queue_capacity, shared.config.cluster.queue_max_bytes, id);
            let _ = shared.cluster.set(link.clone());
            Some(crate::cluster::node::ClusterThread::start(shared.clone(), link, rx)?)
        }
        None => None,
    };
    let store = if store.is_empty() {
        None
    } else {
        // Each shard's queue holds an even share of store.queue_capacity.
        let shards = store.len();
        let cfg = crate::store::ServiceConfig {
            // An application's store waits only if asked to: its cost
            // per turn is not known here.
            batch_wait: if custom {
                std::time::Duration::from_micros(shared.config.store.batch_wait_us.unwrap_or(0))
            } else {
                shared.config.store.batch_wait()
            },
            queue_max_bytes: shared.config.store.queue_max_bytes,
            expire_interval: std::time::Duration::from_millis(shared.config.store.retention_interval_ms),
            ..crate::store::ServiceConfig::new(shared.config.store.queue_capacity.div_ceil(shards))
        };
        let parts = store.into_iter().map(|s| (s, inbox::StoreSink::new(shared.clone()))).collect();
        let service = crate::store::Service::start_shards(parts, cfg)?;
        if custom {
            tracing::info!("the application's message store started");
        } else {
            tracing::info!(shards, kind = ?shared.config.store.kind, "message store started");
        }
        let _ = shared.store.set(service.submitter());
        Some(service)
    };

    let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<DataPath, String>)>();
    let mut threads = Vec::with_capacity(workers);
    for (i, (listener, ws_listener)) in listeners.into_iter().zip(ws_listeners).enumerate() {
        let shared = shared.clone();
        let ready_tx = ready_tx.clone();
        let cpu = if shared.config.server.pin_workers { Some(cpus[i % cpus.len().max(1)]) } else { None };
        let t = std::thread::Builder::new()
            .name(format!("sb-worker-{i}"))
            .spawn(move || worker_thread(shared, i, listener, ws_listener, driver, cpu, ready_tx))?;
        threads.push(t);
    }
    drop(ready_tx);
    let sweeper = Sweeper::start(shared.clone())?;
    let mut paths = Vec::with_capacity(workers);
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok((_, Ok(path))) => paths.push(path),
            Ok((worker, Err(message))) => {
                shared.request_shutdown();
                return Err(StartError::Worker { worker, message });
            }
            Err(_) => {
                shared.request_shutdown();
                for t in threads {
                    let _ = t.join();
                }
                return Err(StartError::Worker { worker: 0, message: "a worker thread exited during start".into() });
            }
        }
    }
    // Every worker starts alike on one host; a difference is named.
    let receives = match (paths.iter().all(|p| p.uring_receives), paths.iter().any(|p| p.uring_receives)) {
        (true, _) => "io_uring",
        (false, true) => "io_uring on some workers, epoll on others",
        (false, false) => "epoll",
    };
    let sends = match (paths.iter().all(|p| p.batched_sends), paths.iter().any(|p| p.batched_sends)) {
        (true, _) => "batched",
        (false, true) => "batched on some workers",
        (false, false) => "one sendmsg each",
    };
    tracing::info!(
        addr = %bound,
        workers,
        driver = driver.name(),
        poller = receives,
        sends,
        max_connections = max_conns_per_worker * workers,
        "switchboard accepting raw TCP"
    );
    if let Some(a) = ws_bound {
        let demo = shared.config.websocket.serves_demo();
        tracing::info!(addr = %a, demo_page = demo, "switchboard accepting WebSocket");
    }
    Ok(Started { handle: Handle { shared }, threads, sweeper, store, cluster })
}

/// A started server's parts, for `Server` (`server.rs`) to own.
pub(crate) struct Started {
    pub handle: Handle,
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub sweeper: Sweeper,
    /// The store thread, stopped after the workers.
    pub store: Option<crate::store::Service<inbox::Token>>,
    /// The cluster thread, stopped after the store.
    pub cluster: Option<crate::cluster::node::ClusterThread>,
}

/// The directory's sweeper: a thread (`sb-directory`) that removes the
/// entries of users offline for a while, in batches, off the workers (see
/// `directory.rs`). Stopped and joined when dropped.
pub(crate) struct Sweeper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sweeper {
    /// How often the sweeper looks at the directory.
    const PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

    fn start(shared: Arc<Shared>) -> std::io::Result<Sweeper> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("sb-directory".into()).spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::park_timeout(Self::PERIOD);
                let d = &shared.directory;
                let removed = d.sweep(crate::directory::OFFLINE_LINGER_S);
                if removed > 0 {
                    tracing::trace!(removed, offline_left = d.offline_count(), "directory sweep");
                }
            }
        })?;
        Ok(Sweeper { stop, thread: Some(thread) })
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn worker_thread(
    shared: Arc<Shared>,
    i: usize,
    listener: std::net::TcpListener,
    ws_listener: Option<std::net::TcpListener>,
    driver: DriverKind,
    cpu: Option<usize>,
    ready_tx: mpsc::Sender<(usize, Result<DataPath, String>)>,
) {
    if let Some(cpu) = cpu {
        if let Err(e) = sys::pin_to_cpu(cpu) {
            tracing::warn!(worker = i, cpu, "cannot pin worker: {e}");
        }
    }
    let id = WorkerId::from_index(i).expect("the worker count is at most MAX_WORKERS");
    let tx = ready_tx.clone();
    let ready = move |r: Result<DataPath, String>| {
        let _ = tx.send((i, r));
    };
    // A panic anywhere in the worker (a bug: the application's hook and
    // authenticator are isolated where they are called) ends up here. The
    // dead worker's connections must not stay half-alive, and the server
    // must not go on with a part of it missing: cut them off, record the
    // failure for `Server::join`, and stop the other workers.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_worker(&shared, i, id, listener, ws_listener, driver, ready, &ready_tx)
    }));
    if let Err(panic) = run {
        let message = worker::panic_text(&*panic).to_string();
        tracing::error!(worker = i, "worker died: {message}; cutting off its connections and stopping the server");
        let cut = shared.outs[i].cut_off_all();
        tracing::error!(worker = i, connections = cut, "connections of the dead worker closed");
        shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(crate::app::ServerError::WorkerDied { worker: i, message });
        Handle { shared: shared.clone() }.shutdown();
    }
}

/// Builds the worker's runtime and runs it until the worker stops.
#[allow(clippy::too_many_arguments)]
fn run_worker(
    shared: &Arc<Shared>,
    i: usize,
    id: WorkerId,
    listener: std::net::TcpListener,
    ws_listener: Option<std::net::TcpListener>,
    driver: DriverKind,
    ready: impl FnOnce(Result<DataPath, String>),
    ready_tx: &mpsc::Sender<(usize, Result<DataPath, String>)>,
) {
    let built = match driver {
        DriverKind::IoUring => {
            let urb = {
                let mut b = io_uring::IoUring::builder();
                b.setup_cqsize(shared.config.uring.cq_entries);
                b
            };
            RuntimeBuilder::<IoUringDriver>::new()
                .enable_timer()
                .with_entries(shared.config.uring.sq_entries)
                .uring_builder(urb)
                .build()
                .map(|mut rt| rt.block_on(worker::run(shared.clone(), id, listener, ws_listener, driver, ready)))
        }
        DriverKind::Epoll => {
            let nb = listener.set_nonblocking(true).and_then(|_| match &ws_listener {
                Some(l) => l.set_nonblocking(true),
                None => Ok(()),
            });
            if let Err(e) = nb {
                let _ = ready_tx.send((i, Err(format!("cannot make listener non-blocking: {e}"))));
                return;
            }
            RuntimeBuilder::<LegacyDriver>::new()
                .enable_timer()
                .build()
                .map(|mut rt| rt.block_on(worker::run(shared.clone(), id, listener, ws_listener, driver, ready)))
        }
    };
    if let Err(e) = built {
        let _ = ready_tx.send((i, Err(format!("cannot build the {driver:?} runtime: {e}"))));
    }
}
