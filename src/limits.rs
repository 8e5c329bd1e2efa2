//! Start-up checks of the configuration against the system's limits.
//!
//! Owns: reading `RLIMIT_NOFILE` (and raising the soft limit to the hard
//! one), `net.core.somaxconn`, `RLIMIT_MEMLOCK` and available memory, and
//! turning a configuration that cannot work into a refusal that says what
//! is wrong and which command fixes it.
//! Must not: change anything but this process's soft file limit.

use std::fs;

use crate::config::{Config, IoDriver, PollerKind, StoreKind};

/// File descriptors kept back for everything that is not a client socket:
/// listeners, eventfds, io_uring rings, timers, logs, config reads.
pub const RESERVED_FDS: u64 = 64;

/// Takes `bytes` of a queue's byte budget (`used` of at most `max`,
/// shared by every producer): false, with nothing taken, when they do not
/// fit. A queue holding no bytes takes anything, however large, so one
/// message never waits forever. Taken before the push, so the consumer's
/// [`std::sync::atomic::AtomicU64::fetch_sub`] never comes first; a push
/// that fails after must give the bytes back.
pub(crate) fn take_bytes(used: &std::sync::atomic::AtomicU64, bytes: u64, max: u64) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    if bytes == 0 {
        return true;
    }
    let before = used.fetch_add(bytes, Relaxed);
    if before > 0 && before + bytes > max {
        used.fetch_sub(bytes, Relaxed);
        return false;
    }
    true
}
/// Extra descriptors per worker (listener, eventfd, ring, timer).
pub const FDS_PER_WORKER: u64 = 8;
/// Descriptors kept for the connections to Redis of the store or of the
/// cluster, each: one or two to a single Redis, one or two per master of
/// a Redis Cluster.
pub const REDIS_FDS: u64 = 64;

/// File descriptors the server may hold besides its clients' sockets,
/// with `config` and `workers` workers: the reserve, each worker's own,
/// the admin API's connections (`admin.max_connections`), the store's
/// files and the connections to Redis. The automatic connection limit is
/// what `RLIMIT_NOFILE` leaves beyond them, so that a server full of
/// clients still answers its operators and still opens its store's files.
pub fn descriptors_besides_clients(config: &Config, workers: usize) -> u64 {
    let mut n = RESERVED_FDS + FDS_PER_WORKER * workers as u64;
    if !config.admin.listen.is_empty() {
        n += config.admin.max_connections as u64;
    }
    n += match config.store.kind {
        StoreKind::Disk => crate::store::disk::descriptors(config.store.shards),
        StoreKind::Redis => REDIS_FDS,
        StoreKind::Memory | StoreKind::None => 0,
    };
    if config.cluster.redis.is_some() {
        n += REDIS_FDS;
    }
    n
}
/// Memory per idle, logged-in connection: the one place these figures
/// live. The start-up check, `switchboard check` (which prints them as
/// `per idle connection: user_bytes=… kernel_bytes=…`) and
/// `tuning/apply.sh` (which reads that line) estimate with them; README and
/// docs/DEPLOY.md quote them.
///
/// Ours, in the server process: the quick capacity run (`scripts/capacity.sh`,
/// 4,000 connections, RSS growth per connection after a warm-up) measured
/// 180–182 B, rounded up to the next 100 B.
pub const USER_BYTES_PER_IDLE_CONN: u64 = 200;
/// The kernel's, for one idle TCP socket (tcp_sock, inode, file, dentry)
/// and its epoll entry: counting the objects in `/proc/slabinfo`, Linux
/// 6.18.44 takes 3,950-3,980 B per server socket (docs/DEPLOY.md, "Memory
/// per connection"), rounded up to the next 100 B. An idle socket holds no
/// buffer pages. (Until 2026-12-08 this was 3,800 B, from the same run's
/// slab growth, at most 3,701 B; slab growth misses objects placed in slabs
/// already allocated.)
pub const KERNEL_BYTES_PER_IDLE_CONN: u64 = 4_000;

/// What the checks found.
#[derive(Clone, Debug)]
pub struct LimitReport {
    /// Soft `RLIMIT_NOFILE` after raising it.
    pub nofile: u64,
    /// Connections the server will accept in total.
    pub max_connections: usize,
    /// Non-fatal findings, each with its fix.
    pub warnings: Vec<String>,
}

fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.split_whitespace().next()?.parse().ok()
}

/// `MemAvailable` in bytes.
pub fn mem_available_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Descriptors this process has open now (`/proc/self/fd`; 0 without
/// /proc). At start these count against the automatic connection limit
/// with the server's own: in an application that embeds the server, they
/// are the application's files and sockets, which its clients must not
/// crowd out.
pub fn open_descriptors() -> u64 {
    // The directory read holds one descriptor of its own while it runs.
    fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1) as u64)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft, hard).
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit fill and read a plain struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        Ok((r.rlim_cur as u64, r.rlim_max as u64))
    }
}

fn memlock_bytes() -> Option<u64> {
    // SAFETY: as above.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) != 0 {
            return None;
        }
        Some(r.rlim_cur as u64)
    }
}

/// Kernel (major, minor) from `uname`.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = release.trim().split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Checks `max_connections` (0 = auto) for `workers` workers, beside
/// `overhead` descriptors that are not clients'
/// ([`descriptors_besides_clients`]).
pub fn check(
    max_connections: usize,
    workers: usize,
    overhead: u64,
    listen_backlog: u32,
    ring_bytes_per_worker: u64,
) -> Result<LimitReport, String> {
    let mut warnings = Vec::new();
    let (soft, hard) = raise_nofile().map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    if soft <= overhead {
        return Err(format!(
            "RLIMIT_NOFILE is {soft}: not even enough for the {overhead} descriptors the server keeps besides its clients' \
             (its own, admin.max_connections, the store's files, and those the process had open at start). \
             Raise it: `ulimit -n 1048576` (shell), LimitNOFILE=1048576 (systemd), or see tuning/README.md; \
             or lower admin.max_connections"
        ));
    }
    let usable = soft - overhead;
    let max_connections = if max_connections == 0 {
        let auto = usable.min(crate::ids::MAX_SLOTS_PER_WORKER as u64 * workers as u64) as usize;
        if soft < 100_000 {
            warnings.push(format!(
                "server.max_connections is auto: {auto} connections (RLIMIT_NOFILE {soft}, hard {hard}). \
                 For more, raise the hard limit: LimitNOFILE= in the systemd unit, or tuning/apply.sh"
            ));
        }
        auto
    } else {
        let most = crate::ids::MAX_SLOTS_PER_WORKER as u64 * workers as u64;
        if max_connections as u64 > most {
            return Err(format!(
                "server.max_connections = {max_connections} is more than {workers} worker(s) can hold ({} each, {most} in all). \
                 Fix: more workers (server.workers), or lower server.max_connections to {most}{}.",
                crate::ids::MAX_SLOTS_PER_WORKER,
                if max_connections as u64 > usable {
                    format!("; RLIMIT_NOFILE {soft} allows {usable} besides (raise it too: see tuning/README.md)")
                } else {
                    String::new()
                }
            ));
        }
        if max_connections as u64 > usable {
            return Err(format!(
                "server.max_connections = {max_connections} needs {} open files, but RLIMIT_NOFILE is {soft} (hard limit {hard}). \
                 Fix: raise the limit (`ulimit -n {}` in the shell that starts the server, LimitNOFILE={} in the systemd unit, \
                 fs.nr_open if the hard limit is the cap: see tuning/apply.sh), or lower server.max_connections to {usable}.",
                max_connections as u64 + overhead,
                max_connections as u64 + overhead,
                max_connections as u64 + overhead,
            ));
        }
        max_connections
    };
    if let Some(somaxconn) = read_u64("/proc/sys/net/core/somaxconn") {
        if (listen_backlog as u64) > somaxconn {
            warnings.push(format!(
                "server.listen_backlog = {listen_backlog} is capped by net.core.somaxconn = {somaxconn}; \
                 connect storms may see refused connections. Fix: `sysctl -w net.core.somaxconn={listen_backlog}`"
            ));
        }
    }
    if let Some((major, minor)) = kernel_version() {
        // Before 5.12 io_uring rings are charged to RLIMIT_MEMLOCK.
        if (major, minor) < (5, 12) {
            let need = ring_bytes_per_worker * workers as u64;
            if let Some(memlock) = memlock_bytes() {
                if memlock < need {
                    return Err(format!(
                        "kernel {major}.{minor} charges io_uring rings to RLIMIT_MEMLOCK: {need} bytes needed, limit is {memlock}. \
                         Fix: LimitMEMLOCK=infinity (systemd) or `ulimit -l unlimited`, or lower uring.sq_entries / uring.cq_entries"
                    ));
                }
            }
        }
    }
    if let Some(avail) = mem_available_bytes() {
        let need = max_connections as u64 * (KERNEL_BYTES_PER_IDLE_CONN + USER_BYTES_PER_IDLE_CONN);
        if need > avail {
            warnings.push(format!(
                "{max_connections} idle connections need about {} MiB (kernel {KERNEL_BYTES_PER_IDLE_CONN} B + ours {USER_BYTES_PER_IDLE_CONN} B each), \
                 more than the {} MiB available; busy connections need more (socket buffers). Lower server.max_connections or add memory.",
                need >> 20,
                avail >> 20
            ));
        }
    }
    Ok(LimitReport { nofile: soft, max_connections, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_fits_the_file_limit() {
        let besides = RESERVED_FDS + 2 * FDS_PER_WORKER;
        let r = check(0, 2, besides, 128, 0).unwrap();
        assert!(r.max_connections as u64 + besides <= r.nofile);
    }

    /// An explicit limit past what the workers' connection ids can address
    /// was cut to it without a word.
    #[test]
    fn more_connections_than_the_workers_can_hold_is_refused_naming_the_workers() {
        let e = check(crate::ids::MAX_SLOTS_PER_WORKER + 1, 1, RESERVED_FDS, 128, 0).unwrap_err();
        assert!(e.contains("server.workers") && e.contains("1 worker(s)"), "{e}");
        assert!(check(0, 1, RESERVED_FDS, 128, 0).is_ok(), "auto stays within the workers' reach");
    }

    #[test]
    fn too_many_connections_is_refused_with_the_fix() {
        // Within what two workers hold (2 × 16,777,215), past any usual file limit.
        let e = check(30_000_000, 2, RESERVED_FDS, 128, 0).unwrap_err();
        assert!(e.contains("server.max_connections") && e.contains("LimitNOFILE"), "{e}");
    }
}

/// Outcome of one audited item.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of `switchboard check`.
#[derive(Clone, Debug)]
pub struct CheckItem {
    pub name: &'static str,
    pub status: Status,
    /// The live value.
    pub have: String,
    /// What N connections need.
    pub need: String,
    /// The command or setting that fixes it (empty when passing).
    pub fix: String,
}

fn item(name: &'static str, ok: bool, fail: Status, have: String, need: String, fix: String) -> CheckItem {
    let status = if ok { Status::Pass } else { fail };
    CheckItem { name, status, have, need, fix: if ok { String::new() } else { fix } }
}

fn sysctl(key: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/"))).ok().map(|s| s.trim().to_string())
}

fn nofile_limits() -> (u64, u64) {
    // SAFETY: getrlimit fills a plain struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        (r.rlim_cur as u64, r.rlim_max as u64)
    }
}

/// Memory `connections` idle connections need: (user space, kernel), bytes.
pub fn memory_estimate(connections: u64) -> (u64, u64) {
    (connections.saturating_mul(USER_BYTES_PER_IDLE_CONN), connections.saturating_mul(KERNEL_BYTES_PER_IDLE_CONN))
}

/// Memory the server takes whatever the number of connections, from its
/// configuration and `workers`: (what, bytes at most), for the estimates
/// of the start-up audit and `switchboard check`.
pub fn fixed_memory(config: &Config, workers: usize) -> Vec<(&'static str, u64)> {
    let w = workers as u64;
    let mut v = vec![
        (
            "worker mailboxes (limits.mailbox_capacity commands per worker, allocated at start)",
            w * crate::mailbox::Mailbox::<crate::runtime::Command>::bytes(config.limits.mailbox_capacity),
        ),
        ("worker read buffers (64 KiB per worker)", w * crate::runtime::SCRATCH_BYTES as u64),
        (
            "io_uring rings (uring.sq_entries x 68 B + uring.cq_entries x 16 B: per worker one for the runtime \
             unless server.io_driver = \"epoll\", and one for client sockets with server.poller = \"io_uring\")",
            w * uring_bytes_per_worker(config),
        ),
    ];
    if config.server.poller == PollerKind::IoUring {
        let ring = config.uring.recv_buffers as u64 * config.uring.recv_buffer_bytes as u64;
        v.push(("receive buffer rings ([uring] recv_buffers x recv_buffer_bytes per worker)", ring * workers as u64));
    }
    match config.store.kind {
        StoreKind::Disk => v.push((
            "disk store write buffers and caches (3 x store.write_buffer_mib x 4 keyspaces per shard, + caches, + hot messages)",
            crate::store::disk::ram_budget(
                config.store.write_buffer_mib,
                disk_shards(config),
            ),
        )),
        StoreKind::Memory => v.push(("memory store messages (store.max_bytes)", config.store.max_bytes)),
        StoreKind::None | StoreKind::Redis => {}
    }
    if config.store.kind != StoreKind::None {
        v.push(("appends waiting for the store thread (store.queue_max_bytes)", config.store.queue_max_bytes));
    }
    if config.cluster.redis.is_some() {
        v.push((
            "messages waiting for the cluster's Redis thread (cluster.queue_max_bytes)",
            config.cluster.queue_max_bytes,
        ));
    }
    v
}

/// What one io_uring of `sq` submission and `cq` completion entries
/// takes: 64 B per submission entry and 4 B for its index in the
/// submission ring, 16 B per completion entry (the kernel's own, mapped
/// into the process).
pub fn ring_bytes(sq: u32, cq: u32) -> u64 {
    sq as u64 * 68 + cq as u64 * 16
}

/// A worker's io_uring rings, at most: the runtime's, unless
/// `server.io_driver = "epoll"` (`"auto"` counts it: it is io_uring
/// wherever the kernel allows it); the client sockets' with
/// `server.poller = "io_uring"`, else, with `server.batch_sends`, the
/// 256-entry ring for batched sends (`Poller::with_send_ring`).
pub fn uring_bytes_per_worker(config: &Config) -> u64 {
    let (sq, cq) = (config.uring.sq_entries, config.uring.cq_entries);
    let runtime = config.server.io_driver != IoDriver::Epoll;
    let mut bytes = if runtime { ring_bytes(sq, cq) } else { 0 };
    if config.server.poller == PollerKind::IoUring {
        bytes += ring_bytes(sq, cq);
    } else if config.server.batch_sends && runtime {
        bytes += ring_bytes(256, 512);
    }
    bytes
}

/// `bytes` in MiB, rounded up: half a MiB is not "0 MiB".
pub fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Audits this host for `connections` connections served by `workers`
/// workers beside `besides` other descriptors
/// ([`descriptors_besides_clients`]), with a listen backlog of `backlog`,
/// and `fixed`, the memory that does not depend on connections
/// (`fixed_memory`): the live kernel values and this process's limits,
/// each with the fix when it falls short.
pub fn audit(
    connections: u64,
    workers: usize,
    besides: u64,
    backlog: u32,
    fixed: &[(&'static str, u64)],
) -> Vec<CheckItem> {
    let fds = connections.saturating_add(besides);
    let mut out = Vec::new();
    let (soft, hard) = nofile_limits();
    out.push(item(
        "RLIMIT_NOFILE (hard)",
        hard >= fds,
        Status::Fail,
        format!("{hard} (soft {soft}; the server raises soft to hard)"),
        format!(">= {fds}"),
        format!(
            "LimitNOFILE={fds} in the systemd unit (tuning/switchboard.service), or `ulimit -Hn {fds}` before starting"
        ),
    ));
    let nr_open = sysctl("fs.nr_open").and_then(|v| v.parse::<u64>().ok());
    out.push(item(
        "fs.nr_open",
        nr_open.is_some_and(|v| v >= fds),
        Status::Fail,
        nr_open.map_or("n/a".into(), |v| v.to_string()),
        format!(">= {fds} (caps RLIMIT_NOFILE)"),
        format!("sysctl -w fs.nr_open={fds} (persist: tuning/apply.sh --connections {connections})"),
    ));
    let file_max = sysctl("fs.file-max").and_then(|v| v.parse::<u64>().ok());
    let want_files = fds.saturating_add(fds / 10);
    out.push(item(
        "fs.file-max",
        file_max.is_some_and(|v| v >= want_files),
        Status::Fail,
        file_max.map_or("n/a".into(), |v| v.to_string()),
        format!(">= {want_files} (system-wide)"),
        format!("sysctl -w fs.file-max={want_files}"),
    ));
    let somaxconn = sysctl("net.core.somaxconn").and_then(|v| v.parse::<u64>().ok());
    out.push(item(
        "net.core.somaxconn",
        somaxconn.is_some_and(|v| v >= backlog as u64),
        Status::Warn,
        somaxconn.map_or("n/a".into(), |v| v.to_string()),
        format!(">= {backlog} (server.listen_backlog)"),
        format!("sysctl -w net.core.somaxconn={backlog}: connect storms overflow a shorter queue"),
    ));
    let syn = sysctl("net.ipv4.tcp_max_syn_backlog").and_then(|v| v.parse::<u64>().ok());
    out.push(item(
        "net.ipv4.tcp_max_syn_backlog",
        syn.is_some_and(|v| v >= backlog as u64),
        Status::Warn,
        syn.map_or("n/a".into(), |v| v.to_string()),
        format!(">= {backlog}"),
        format!("sysctl -w net.ipv4.tcp_max_syn_backlog={backlog}"),
    ));
    // tcp_mem's third field (pages) bounds all TCP buffer memory; an idle
    // connection holds none, so budget 1 KiB each for the busy ones.
    let page = 4096u64;
    let tcp_mem_high =
        sysctl("net.ipv4.tcp_mem").and_then(|v| v.split_whitespace().nth(2).and_then(|x| x.parse::<u64>().ok()));
    let want_pages = connections.saturating_mul(1024).div_ceil(page);
    out.push(item(
        "net.ipv4.tcp_mem (max pages)",
        tcp_mem_high.is_some_and(|v| v >= want_pages),
        Status::Warn,
        tcp_mem_high.map_or("n/a".into(), |v| v.to_string()),
        format!(">= {want_pages} (1 KiB of buffers per connection)"),
        "tuning/apply.sh sizes net.ipv4.tcp_mem from RAM".into(),
    ));
    let migrate = sysctl("net.ipv4.tcp_migrate_req");
    out.push(item(
        "net.ipv4.tcp_migrate_req",
        migrate.as_deref() == Some("1"),
        Status::Warn,
        migrate.clone().unwrap_or_else(|| "n/a".into()),
        "1 (zero-downtime restarts)".into(),
        "sysctl -w net.ipv4.tcp_migrate_req=1: connections queued on a draining process move to the new one".into(),
    ));
    let disabled = sysctl("kernel.io_uring_disabled");
    out.push(item(
        "kernel.io_uring_disabled",
        disabled.as_deref().is_none_or(|v| v == "0"),
        Status::Warn,
        disabled.clone().unwrap_or_else(|| "n/a (not present)".into()),
        "0".into(),
        "sysctl -w kernel.io_uring_disabled=0, or run with server.io_driver = \"epoll\"".into(),
    ));
    if let Some((major, minor)) = kernel_version() {
        let old = (major, minor) < (5, 12);
        out.push(item(
            "kernel version",
            (major, minor) >= (5, 11),
            Status::Warn,
            format!("{major}.{minor}"),
            ">= 5.11 (io_uring features used); >= 5.14 for tcp_migrate_req".into(),
            "upgrade the kernel, or run with server.io_driver = \"epoll\"".into(),
        ));
        if old {
            let memlock = memlock_bytes().unwrap_or(0);
            out.push(item(
                "RLIMIT_MEMLOCK",
                memlock >= (8 << 20) * workers as u64,
                Status::Fail,
                memlock.to_string(),
                "io_uring rings are charged to it before 5.12".into(),
                "LimitMEMLOCK=infinity in the systemd unit".into(),
            ));
        }
    }
    let (user, kernel) = memory_estimate(connections);
    let fixed_sum = fixed.iter().fold(0u64, |a, (_, b)| a.saturating_add(*b));
    let total = user.saturating_add(kernel).saturating_add(fixed_sum);
    let avail = mem_available_bytes();
    // The fix names what takes the most: a setting that holds more than the
    // connections do is the one to lower, not max_connections.
    let fix = match fixed.iter().max_by_key(|(_, b)| *b).filter(|(_, b)| *b > user.saturating_add(kernel)) {
        Some((what, b)) => {
            format!("add memory, or lower what holds most of it: {what}, {} MiB whatever the connections", mib_up(*b))
        }
        None => "add memory or lower server.max_connections".into(),
    };
    out.push(item(
        "memory for idle connections",
        avail.is_some_and(|a| a >= total),
        Status::Fail,
        avail.map_or("n/a".into(), |a| format!("{} MiB available", a >> 20)),
        format!(
            ">= {} MiB ({} MiB ours + {} MiB kernel, idle, + {} MiB fixed by the config; busy sockets add their buffers, within net.ipv4.tcp_rmem/tcp_wmem and tcp_mem)",
            mib_up(total),
            mib_up(user),
            mib_up(kernel),
            mib_up(fixed_sum)
        ),
        fix,
    ));
    out
}

/// Shards of the disk store: the count an existing store directory was
/// created with, which it keeps, else `store.shards`.
fn disk_shards(config: &Config) -> usize {
    crate::store::shards::recorded_count(&config.store.path).unwrap_or(config.store.shards)
}

/// Bytes free to this process on the filesystem that holds `path` (or
/// would: its nearest existing ancestor), from `statvfs`.
pub(crate) fn free_bytes_at(path: &std::path::Path) -> Option<(std::path::PathBuf, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let abs = std::path::absolute(path).ok()?;
    let mut at = abs.as_path();
    while !at.exists() {
        at = at.parent()?;
    }
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills a plain struct from a NUL-terminated path.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    Some((at.to_path_buf(), (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)))
}

/// Bytes of the files under `dir` (0 if it does not exist).
fn tree_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The disk a disk store may fill, against what its filesystem has: the
/// messages up to `store.max_bytes` (past which SENDs get ERROR 114, as
/// counted: before compression) and the storage engine's journals up to
/// `store.max_journal_mib` per shard, against the space free plus what the
/// store directory holds already. A WARN: the store stops at a write the
/// disk refuses (docs/DEPLOY.md, "A failed write"), where the limit would
/// have refused the SEND with a code the sender can act on. `None`
/// without a disk store.
pub fn disk_item(config: &Config) -> Option<CheckItem> {
    if config.store.kind != StoreKind::Disk {
        return None;
    }
    let path = &config.store.path;
    let shards = disk_shards(config).max(1) as u64;
    let journals = shards.saturating_mul(config.store.max_journal_mib << 20);
    let need = config.store.max_bytes.saturating_add(journals);
    let (fs_at, free) = free_bytes_at(path)?;
    let held = tree_bytes(path);
    let have = free.saturating_add(held);
    Some(item(
        "disk for the message store",
        have >= need,
        Status::Warn,
        format!("{} MiB free at {} + {} MiB in store.path", free >> 20, fs_at.display(), held >> 20),
        format!(
            ">= {} MiB (store.max_bytes {} MiB + store.max_journal_mib {} x {shards} shard(s))",
            need >> 20,
            config.store.max_bytes >> 20,
            config.store.max_journal_mib
        ),
        format!(
            "free space there, move store.path ({}) to a larger filesystem, or lower store.max_bytes: past it \
             SENDs get ERROR 114, where a full disk stops the store (docs/DEPLOY.md, \"Disk\")",
            path.display()
        ),
    ))
}

#[cfg(test)]
mod audit_tests {
    use super::*;

    /// A disk store whose limits the filesystem cannot hold is flagged,
    /// with the keys to change; one it can hold passes; no disk store, no
    /// item. The directory need not exist yet (`serve` creates it).
    #[test]
    fn the_disk_item_weighs_the_store_limits_against_the_free_space() {
        let dir = std::env::temp_dir().join(format!("switchboard-disk-item-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut cfg = Config::default();
        cfg.store.path = dir.join("not-yet");
        cfg.store.max_bytes = 64 << 20;
        let small = disk_item(&cfg).expect("a disk store is audited");
        assert_eq!(small.status, Status::Pass, "{small:?}");
        assert!(small.need.contains(">= 192 MiB"), "{}", small.need);
        // An exbibyte of messages: no filesystem here holds that.
        cfg.store.max_bytes = 1 << 60;
        cfg.store.shards = 4;
        let big = disk_item(&cfg).unwrap();
        assert_eq!(big.status, Status::Warn, "{big:?}");
        assert!(big.need.contains("x 4 shard(s)"), "{}", big.need);
        assert!(big.fix.contains("store.max_bytes") && big.fix.contains("ERROR 114"), "{}", big.fix);
        // What the directory holds already counts as room: it is part of
        // what the limits allow.
        fs::create_dir_all(dir.join("not-yet/sub")).unwrap();
        fs::write(dir.join("not-yet/sub/f"), vec![0u8; 3 << 20]).unwrap();
        cfg.store.max_bytes = 64 << 20;
        assert!(disk_item(&cfg).unwrap().have.ends_with("+ 3 MiB in store.path"));
        cfg.store.kind = StoreKind::Memory;
        assert!(disk_item(&cfg).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What the automatic connection limit keeps back from the clients:
    /// the admin API's connections when it listens, and the disk store's
    /// files, bounded however many shards it has.
    #[test]
    fn the_descriptors_kept_from_clients_count_the_admin_api_and_the_store() {
        let mut cfg = Config::default();
        cfg.store.kind = StoreKind::None;
        let base = descriptors_besides_clients(&cfg, 2);
        assert_eq!(base, RESERVED_FDS + 2 * FDS_PER_WORKER);
        cfg.admin.listen = "127.0.0.1:7701".into();
        cfg.admin.max_connections = 500;
        assert_eq!(descriptors_besides_clients(&cfg, 2), base + 500);
        cfg.admin.listen.clear();
        cfg.store.kind = StoreKind::Disk;
        let one = descriptors_besides_clients(&cfg, 2) - base;
        assert!((256..512).contains(&one), "one shard: {one}");
        cfg.store.shards = crate::store::MAX_SHARDS;
        let many = descriptors_besides_clients(&cfg, 2) - base;
        assert!(many < 4_000, "{} shards: {many}", cfg.store.shards);
    }

    /// `switchboard check --connections N` with an N near u64::MAX wrapped
    /// around and passed the descriptor checks.
    #[test]
    fn a_count_too_large_for_any_host_fails_rather_than_wrapping() {
        let items = audit(u64::MAX, 2, RESERVED_FDS, 128, &[("test", 1 << 30)]);
        for name in ["RLIMIT_NOFILE (hard)", "fs.nr_open", "memory for idle connections"] {
            let i = items.iter().find(|i| i.name == name).unwrap();
            assert_eq!(i.status, Status::Fail, "{name}: {i:?}");
        }
    }

    /// `switchboard check` counts what the configuration takes whatever the
    /// connections: each worker's receive buffer ring in io_uring mode,
    /// and the disk store's bounded buffers, which grow with its setting.
    #[test]
    fn the_estimate_counts_buffer_rings_and_store_buffers() {
        let total = |cfg: &Config, workers| fixed_memory(cfg, workers).iter().map(|(_, b)| b).sum::<u64>();
        let mut cfg = Config::default();
        cfg.store.kind = StoreKind::None;
        cfg.server.poller = PollerKind::Epoll;
        let base = total(&cfg, 4);
        cfg.server.poller = PollerKind::IoUring;
        let ring = cfg.uring.recv_buffers as u64 * cfg.uring.recv_buffer_bytes as u64;
        let rings = ring_bytes(cfg.uring.sq_entries, cfg.uring.cq_entries) - ring_bytes(256, 512);
        assert_eq!(total(&cfg, 4) - base, 4 * (ring + rings), "a buffer ring and an io_uring per worker");
        cfg.server.poller = PollerKind::Epoll;
        cfg.store.kind = StoreKind::Disk;
        cfg.store.write_buffer_mib = 8;
        let small = total(&cfg, 4);
        cfg.store.write_buffer_mib = 16;
        assert_eq!(total(&cfg, 4) - small, 3 * 4 * (8 << 20), "three times the buffer, four keyspaces");
        cfg.store.kind = StoreKind::Memory;
        assert_eq!(total(&cfg, 4) - base, cfg.store.max_bytes + cfg.store.queue_max_bytes);
        cfg.store.kind = StoreKind::Redis;
        assert_eq!(total(&cfg, 4) - base, cfg.store.queue_max_bytes, "the appends waiting for Redis");
    }

    /// `switchboard check` and the start-up check left out what every
    /// worker takes whatever its connections (about 5.8 MiB at the
    /// defaults: 0.37 GiB at 64 workers): its mailbox, allocated in full
    /// at start, its read buffer and its io_uring rings.
    #[test]
    fn the_estimate_counts_each_workers_mailbox_read_buffer_and_rings() {
        let total = |cfg: &Config, workers| fixed_memory(cfg, workers).iter().map(|(_, b)| b).sum::<u64>();
        let mut cfg = Config::default();
        cfg.store.kind = StoreKind::None;
        cfg.server.poller = PollerKind::Epoll;
        cfg.server.io_driver = IoDriver::Epoll;
        let mailbox = cfg.limits.mailbox_capacity as u64 * 72;
        assert_eq!(total(&cfg, 1), mailbox + 64 * 1024, "a mailbox of 72 B commands and a read buffer");
        assert_eq!(total(&cfg, 64), 64 * total(&cfg, 1), "per worker");
        cfg.limits.mailbox_capacity *= 2;
        assert_eq!(total(&cfg, 1), 2 * mailbox + 64 * 1024);
        cfg.limits.mailbox_capacity /= 2;
        // The runtime's ring, 1.25 MiB and 16 KiB of indexes at the
        // defaults (4,096 and 65,536 entries), and the small one for
        // batched sends.
        cfg.server.io_driver = IoDriver::Auto;
        assert_eq!(total(&cfg, 1) - mailbox - 64 * 1024, (1280 + 16 + 25) * 1024);
        cfg.server.batch_sends = false;
        assert_eq!(total(&cfg, 1) - mailbox - 64 * 1024, (1280 + 16) * 1024);
        // Receives on io_uring: a second ring of the same size.
        cfg.server.poller = PollerKind::IoUring;
        let bufs = cfg.uring.recv_buffers as u64 * cfg.uring.recv_buffer_bytes as u64;
        assert_eq!(total(&cfg, 1) - mailbox - 64 * 1024 - bufs, 2 * (1280 + 16) * 1024);
        // The fix names the largest: a server with many workers and few
        // connections is told to lower the mailboxes, not max_connections.
        let items = audit(10, 64, RESERVED_FDS, 128, &fixed_memory(&cfg, 64));
        let memory = items.iter().find(|i| i.name == "memory for idle connections").unwrap();
        assert!(memory.need.contains(&format!("{} MiB fixed by the config", mib_up(total(&cfg, 64)))), "{memory:?}");
    }

    /// A disk store keeps the shard count it was created with, whatever
    /// `store.shards` says now: its buffers are counted for that many.
    #[test]
    fn the_estimate_counts_the_shards_the_store_on_disk_has() {
        let dir = std::env::temp_dir().join(format!("sb-limits-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(crate::store::shards::SHARDS_FILE), "4\n").unwrap();
        let mut cfg = Config::default();
        cfg.server.poller = PollerKind::Epoll;
        cfg.store.kind = StoreKind::Disk;
        cfg.store.path = dir.clone();
        cfg.store.shards = 1;
        let total = |cfg: &Config| fixed_memory(cfg, 2).iter().map(|(_, b)| b).sum::<u64>();
        let disk = total(&cfg);
        let _ = std::fs::remove_dir_all(&dir);
        cfg.store.kind = StoreKind::None;
        let store = disk - total(&cfg);
        assert_eq!(store, crate::store::disk::ram_budget(cfg.store.write_buffer_mib, 4) + cfg.store.queue_max_bytes);
    }

    #[test]
    fn fixed_memory_beyond_the_host_fails_the_memory_check() {
        let Some(avail) = mem_available_bytes() else { return };
        let memory = |fixed: &[(&'static str, u64)]| {
            audit(100, 2, RESERVED_FDS, 128, fixed).into_iter().find(|i| i.name == "memory for idle connections")
        };
        assert_eq!(memory(&[]).map(|i| i.status), Some(Status::Pass));
        let over = memory(&[("memory store messages (store.max_bytes)", avail + (1 << 30))]).expect("the memory item");
        assert_eq!(over.status, Status::Fail);
        assert!(over.need.contains("fixed by the config"), "{}", over.need);
        // The fix names the setting that holds it, not max_connections
        // (which it named before, whatever took the memory).
        assert!(over.fix.contains("store.max_bytes") && !over.fix.contains("max_connections"), "{}", over.fix);
    }

    #[test]
    fn a_small_load_passes_the_file_limit_and_a_huge_one_does_not() {
        let (_, hard) = nofile_limits();
        let small = audit(100, 2, RESERVED_FDS, 128, &[]);
        assert_eq!(small[0].name, "RLIMIT_NOFILE (hard)");
        assert_eq!(small[0].status, Status::Pass);
        let huge = audit(hard, 2, RESERVED_FDS, 128, &[]);
        assert_eq!(huge[0].status, Status::Fail, "{:?}", huge[0]);
        assert!(huge[0].fix.contains("LimitNOFILE"), "{}", huge[0].fix);
    }

    #[test]
    fn descriptors_open_now_count_the_processs_own_files() {
        let before = open_descriptors();
        let files: Vec<_> = (0..200).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let during = open_descriptors();
        drop(files);
        // Other tests of this binary open and close files meanwhile.
        assert!(during >= before + 150, "{before} open, then {during} with 200 more");
    }
}
