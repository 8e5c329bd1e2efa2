//! Start-up checks of the configuration against the system's limits.
//!
//! Owns: reading `RLIMIT_NOFILE` (and raising the soft limit to the hard
//! one), `net.core.somaxconn`, `RLIMIT_MEMLOCK` and available memory, and
//! turning a configuration that cannot work into a refusal that says what
//! is wrong and which command fixes it.
//! Must not: change anything but this process's soft file limit.

use std::fs;

/// File descriptors kept back for everything that is not a client socket:
/// listeners, eventfds, io_uring rings, timers, logs, config reads.
pub const RESERVED_FDS: u64 = 64;
/// Extra descriptors per worker (listener, eventfd, ring, timer).
pub const FDS_PER_WORKER: u64 = 8;
/// Kernel memory of one idle TCP socket (tcp_sock, inode, file, dentry),
/// for the memory estimate: see DESIGN.md.
pub const KERNEL_BYTES_PER_IDLE_CONN: u64 = 3_600;
/// The budget for our own memory per idle connection (measured by the
/// capacity benchmark; see README).
pub const USER_BYTES_PER_IDLE_CONN: u64 = 512;

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

/// Checks `max_connections` (0 = auto) for `workers` workers.
pub fn check(
    max_connections: usize,
    workers: usize,
    listen_backlog: u32,
    ring_bytes_per_worker: u64,
) -> Result<LimitReport, String> {
    let mut warnings = Vec::new();
    let (soft, hard) = raise_nofile().map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    let overhead = RESERVED_FDS + FDS_PER_WORKER * workers as u64;
    if soft <= overhead {
        return Err(format!(
            "RLIMIT_NOFILE is {soft}: not even enough for the server's own {overhead} descriptors. \
             Raise it: `ulimit -n 1048576` (shell), LimitNOFILE=1048576 (systemd), or see tuning/README.md"
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
        let r = check(0, 2, 128, 0).unwrap();
        assert!(r.max_connections as u64 + RESERVED_FDS + 2 * FDS_PER_WORKER <= r.nofile);
    }

    #[test]
    fn too_many_connections_is_refused_with_the_fix() {
        let e = check(usize::MAX / 1024, 2, 128, 0).unwrap_err();
        assert!(e.contains("server.max_connections") && e.contains("LimitNOFILE"), "{e}");
    }
}
