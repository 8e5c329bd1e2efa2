//! Who holds a TCP port, for the message a server that cannot bind prints.
//!
//! Owns: finding the process listening on a port (the LISTEN sockets of
//! `/proc/net/tcp` and `tcp6`, then the process whose `/proc/PID/fd` holds
//! one), telling whether it is a Switchboard (a thread named `sb-worker-N`,
//! whatever the binary is called: `switchboard serve` or an application
//! embedding the library), and the advice for each case.
//! Must not: bind, connect, signal or change anything; be on any path but
//! a failed start. Everything is best effort: without /proc, or without the
//! right to read another user's `/proc/PID/fd`, the holder is unknown and
//! the message says how to find it.

use std::net::SocketAddr;
use std::path::Path;

/// A process listening on the port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command line, arguments joined by spaces.
    pub cmdline: String,
    /// Whether it runs Switchboard workers.
    pub switchboard: bool,
}

/// The (owner uid, inode) of each LISTEN socket on `port` in one
/// `/proc/net/tcp{,6}` text.
fn listening(table: &str, port: u16) -> Vec<(u32, u64)> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (p == port && *f.get(3)? == LISTEN).then(|| Some((f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?)))?
        })
        .filter(|&(_, inode)| inode != 0)
        .collect()
}

/// Inodes of the LISTEN sockets on `port` in one `/proc/net/tcp{,6}` text.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    listening(table, port).into_iter().map(|(_, inode)| inode).collect()
}

/// Whether a LISTEN socket on `port` is held by no process: what a server
/// killed a moment ago leaves behind while the kernel tears down its
/// io_uring instances (they hold its listeners' files a few to tens of
/// milliseconds past the process's exit; measured on Linux 6.18, a
/// restart at once met them in three rounds of four). Only sockets of this
/// process's effective user count (root: of anyone), since another user's
/// listener is one whose holder cannot be seen, not one without a holder.
pub fn unowned_listener(port: u16) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mine = |uid: u32| me == 0 || uid == me;
    let mut found = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            found |= listening(&text, port).iter().any(|&(uid, _)| mine(uid));
        }
    }
    found && holders(port).is_empty()
}

/// The process (one of them, if several share it) listening on `port`.
pub fn find(port: u16) -> Option<Holder> {
    holders(port).into_iter().next()
}

/// Every process listening on `port`, each once (several share a port
/// through SO_REUSEPORT), in the order of /proc.
pub fn holders(port: u16) -> Vec<Holder> {
    let wanted = listen_links(port);
    if wanted.is_empty() {
        return Vec::new();
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            holds_one(&entry.path(), &wanted).then(|| describe(pid, &entry.path()))
        })
        .collect()
}

/// Whether process `pid` holds a LISTEN socket on `port`: a test that
/// started a server on a port it picked waits for this, since a connect
/// that succeeds may have reached another process's listener (a port
/// picked with bind(0) and released can be bound again by anyone, for a
/// moment, before the server takes it).
pub fn listens(pid: u32, port: u16) -> bool {
    let wanted = listen_links(port);
    !wanted.is_empty() && holds_one(Path::new(&format!("/proc/{pid}")), &wanted)
}

/// The /proc/PID/fd link texts of the LISTEN sockets on `port`.
fn listen_links(port: u16) -> Vec<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    inodes.iter().map(|i| format!("socket:[{i}]")).collect()
}

/// Whether the process whose /proc directory is `dir` has one of `wanted`
/// open.
fn holds_one(dir: &Path, wanted: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(dir.join("fd")) else { return false };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| wanted.iter().any(|w| l.as_os_str() == w.as_str())))
}

fn describe(pid: u32, dir: &Path) -> Holder {
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|b| {
            b.split(|&c| c == 0).filter(|a| !a.is_empty()).map(String::from_utf8_lossy).collect::<Vec<_>>().join(" ")
        })
        .unwrap_or_default();
    let switchboard = std::fs::read_dir(dir.join("task")).is_ok_and(|tasks| {
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end().starts_with("sb-worker-"))
        })
    });
    Holder { pid, cmdline, switchboard }
}

/// Who holds `addr`'s port, as [`find`] saw it. Without a listener found:
/// one this process may not look at (another user's), or the local end of
/// a connection, which blocks a listener as well (the kernel gives the
/// ports of `net.ipv4.ip_local_port_range` to outgoing connections).
fn who(addr: SocketAddr, holder: Option<&Holder>) -> String {
    match holder {
        Some(h) if h.switchboard => format!(
            "another Switchboard server is listening on it (pid {}: {})",
            h.pid,
            if h.cmdline.is_empty() { "?" } else { &h.cmdline }
        ),
        Some(h) => format!("pid {} listens on it ({})", h.pid, if h.cmdline.is_empty() { "?" } else { &h.cmdline }),
        None => format!(
            "another socket holds it: a listener of a process this one cannot look into, or the local end of a \
             connection (ports in net.ipv4.ip_local_port_range go to outgoing connections); \
             `ss -tanp 'sport = :{}'` shows which",
            addr.port()
        ),
    }
}

/// What to tell someone whose admin API cannot listen on `addr`, with
/// `holder` as [`find`] saw it.
pub fn admin_advice(addr: SocketAddr, holder: Option<&Holder>) -> String {
    let who = who(addr, holder);
    format!(
        "address in use: {who}. Give the admin API another port: admin.listen in the config file \
         (port 0 picks a free one; Server::admin_addr tells which when embedded)"
    )
}

/// What to tell someone whose server cannot listen on `addr` (the raw TCP
/// or WebSocket address of `what`), with `holder` as [`find`] saw it.
/// `raw` and `ws` are the two addresses configured, for the suggestion.
pub fn advice(addr: SocketAddr, holder: Option<&Holder>, raw: SocketAddr, ws: Option<SocketAddr>) -> String {
    // Port 0 (any free port) is never the one in use: kept as it is.
    let other = |a: SocketAddr| match a.port() {
        0 => a,
        port => SocketAddr::new(a.ip(), port.wrapping_add(100).max(1024)),
    };
    let suggestion = match ws {
        Some(ws) => format!("--listen {} --ws-listen {}", other(raw), other(ws)),
        None => format!("--listen {} --ws-listen \"\"", other(raw)),
    };
    let who = who(addr, holder);
    format!(
        "address in use: {who}. To run this server beside it, give it other ports, e.g. `serve {suggestion}` \
         (server.listen and websocket.listen in a config file, ServerBuilder::listen and ws_listen \
         when embedded; port 0 picks a free one). server.share_listen_port = true is for overlapping restarts of \
         one service only: two processes on one port split new connections between them, and a SEND reaches only \
         users connected to the same process"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_sockets_are_found_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1E14 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n   1: 0100007F:1E14 0100007F:9920 01 00000000:00000000 03:000000E2 00000000     0        0 4343 3 0\n   2: 00000000:1E1E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0\n";
        assert_eq!(listening_inodes(table, 7700), vec![4242], "the LISTEN one, not the established one");
        assert_eq!(listening_inodes(table, 7710), vec![4444]);
        assert!(listening_inodes(table, 7701).is_empty());
        assert_eq!(listening(table, 7700), vec![(0, 4242)], "with the owner's uid");
    }

    #[test]
    fn a_listener_is_found_in_its_own_process_only() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = std::process::id();
        assert!(listens(me, port), "this process listens on {port}");
        assert!(holders(port).iter().any(|h| h.pid == me), "{:?}", holders(port));
        assert!(!listens(1, port), "pid 1 does not");
        drop(l);
        assert!(!listens(me, port), "not after the listener is closed");
        assert!(holders(port).is_empty());
    }

    #[test]
    fn advice_names_a_switchboard_holder_and_other_ports() {
        let raw: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let ws: SocketAddr = "127.0.0.1:7710".parse().unwrap();
        let h = Holder { pid: 42, cmdline: "switchboard serve".into(), switchboard: true };
        let a = advice(raw, Some(&h), raw, Some(ws));
        assert!(a.contains("another Switchboard server is listening on it (pid 42: switchboard serve)"), "{a}");
        assert!(a.contains("--listen 127.0.0.1:7800 --ws-listen 127.0.0.1:7810"), "{a}");
        assert!(a.contains("overlapping restarts"), "{a}");
        let a = advice(raw, None, raw, None);
        assert!(a.contains("ss -tanp 'sport = :7700'") && a.contains("--ws-listen \"\""), "{a}");
    }

    /// A WebSocket address on port 0 (any free port) cannot be what is in
    /// use: the suggestion keeps it, rather than naming port 1024.
    #[test]
    fn advice_keeps_a_port_0_address_as_it_is() {
        let raw: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let ws: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let a = advice(raw, None, raw, Some(ws));
        assert!(a.contains("--listen 127.0.0.1:7800 --ws-listen 127.0.0.1:0`"), "{a}");
    }
}
