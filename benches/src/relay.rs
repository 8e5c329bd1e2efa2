//! The unicast ceiling: the least a relay can do per message.
//!
//! Owns: `switchboard-bench ceiling-relay`, a deliberately bare server for
//! the raw protocol's unicast path. One thread per core, each with its own
//! SO_REUSEPORT listener and epoll set; per message exactly the syscalls a
//! relay cannot avoid: the `recv` that reads a SEND and one plain blocking
//! `send` of the PUSH to the target's socket. LOGIN is answered without
//! checking the token, there are no heartbeats, queues, limits or rooms.
//! Must not: be mistaken for a server. It exists so the capacity report can
//! state Switchboard's unicast throughput per server core as a fraction of
//! the kernel's floor for the same work, measured in the same run with the
//! same loaders and load.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use switchboard::proto::frame::{decode, Frame, PROTOCOL_MAX_FRAME_BYTES};

/// Users the relay can address: ids end in an index below this (the
/// loaders' `<prefix><index>`).
const MAX_USERS: usize = 1 << 20;

struct Shared {
    /// Socket of user `u<i>`, or -1.
    fds: Vec<AtomicI32>,
    msg_id: AtomicU64,
}

fn user_index(user: &str) -> Option<usize> {
    let digits = user.bytes().rev().take_while(u8::is_ascii_digit).count();
    user[user.len() - digits..].parse().ok().filter(|&i| i < MAX_USERS)
}

fn send_all(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: a live slice; blocking send on a blocking socket.
        let n = unsafe { libc::send(fd, data.as_ptr() as *const libc::c_void, data.len(), libc::MSG_NOSIGNAL) };
        if n <= 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        data = &data[n as usize..];
    }
}

struct Conn {
    fd: RawFd,
    user: Option<usize>,
    partial: Vec<u8>,
}

fn handle(shared: &Shared, c: &mut Conn, data: &[u8]) -> Result<usize, ()> {
    let mut off = 0;
    while let Some((frame, n)) = decode(&data[off..], PROTOCOL_MAX_FRAME_BYTES).map_err(|_| ())? {
        off += n;
        match frame {
            Frame::Login { user, .. } => {
                let idx = user_index(user).ok_or(())?;
                shared.fds[idx].store(c.fd, Ordering::Release);
                c.user = Some(idx);
                let ok = Frame::LoginOk {
                    conn_id: idx as u64,
                    heartbeat_interval_ms: 0,
                    idle_timeout_ms: 0,
                    max_frame_bytes: 65536,
                };
                send_all(c.fd, &ok.to_bytes().map_err(|_| ())?);
            }
            Frame::Send { to, payload, .. } => {
                let target = user_index(to).map(|i| shared.fds[i].load(Ordering::Acquire)).unwrap_or(-1);
                if target >= 0 {
                    let from = format!("u{}", c.user.unwrap_or(0));
                    let id = shared.msg_id.fetch_add(1, Ordering::Relaxed);
                    let push = Frame::Push { msg_id: id, from: &from, payload }.to_bytes().map_err(|_| ())?;
                    send_all(target, &push);
                }
            }
            Frame::Ping { data } => send_all(c.fd, &Frame::Pong { data }.to_bytes().map_err(|_| ())?),
            _ => {}
        }
    }
    Ok(off)
}

fn worker(listener: Socket, shared: Arc<Shared>) {
    // SAFETY: plain epoll syscalls on descriptors this thread owns.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let lfd = listener.as_raw_fd();
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: u64::MAX };
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, &mut ev) };
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the kernel fills at most `events.len()` entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        for e in events.iter().take(n.max(0) as usize) {
            if e.u64 == u64::MAX {
                // SAFETY: accept4 on our listener.
                let fd = unsafe { libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
                if fd >= 0 {
                    let one: libc::c_int = 1;
                    unsafe {
                        libc::setsockopt(
                            fd,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            &one as *const _ as *const libc::c_void,
                            4,
                        );
                    }
                    let key = conns.insert(Conn { fd, user: None, partial: Vec::new() });
                    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: key as u64 };
                    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                }
                continue;
            }
            let key = e.u64 as usize;
            let Some(c) = conns.get_mut(key) else { continue };
            // SAFETY: recv into a live buffer; MSG_DONTWAIT because the
            // accepted socket is blocking (sends block, reads must not).
            let r = unsafe { libc::recv(c.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT) };
            let ok = if r > 0 {
                let r = r as usize;
                if c.partial.is_empty() {
                    match handle(&shared, c, &buf[..r]) {
                        Ok(used) => {
                            c.partial.extend_from_slice(&buf[used..r]);
                            true
                        }
                        Err(()) => false,
                    }
                } else {
                    let mut p = std::mem::take(&mut c.partial);
                    p.extend_from_slice(&buf[..r]);
                    match handle(&shared, c, &p) {
                        Ok(used) => {
                            p.drain(..used);
                            c.partial = p;
                            true
                        }
                        Err(()) => false,
                    }
                }
            } else {
                r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
            };
            if !ok {
                let c = conns.remove(key);
                if let Some(u) = c.user {
                    let _ = shared.fds[u].compare_exchange(c.fd, -1, Ordering::AcqRel, Ordering::Relaxed);
                }
                unsafe { libc::close(c.fd) };
            }
        }
    }
}

/// Refuses `addr` if another socket holds its port. The relay's listeners
/// are SO_REUSEPORT (one per worker), so binding them beside another
/// process's SO_REUSEPORT listeners (a Switchboard server's, another
/// relay's) would succeed and split the port's connections between the
/// two: one bind without SO_REUSEPORT, as the server's own start does,
/// fails instead. Port 0 always passes.
fn check_port_free(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    match probe.bind(&addr.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            let who = match switchboard::portholder::find(addr.port()) {
                Some(h) => format!("pid {} listens on it ({})", h.pid, h.cmdline),
                None => format!("another socket holds it (`ss -tanp 'sport = :{}'` shows which)", addr.port()),
            };
            Err(std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr}: address in use: {who}; give the relay another --listen (port 0: any free one)"),
            ))
        }
        Err(e) => Err(std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))),
        Ok(()) => Ok(()),
    }
}

/// Runs the relay until killed. Prints `listening on ADDR` once bound.
pub fn run(listen: SocketAddr, workers: usize) -> std::io::Result<()> {
    check_port_free(listen)?;
    let _ = switchboard::limits::raise_nofile();
    let shared =
        Arc::new(Shared { fds: (0..MAX_USERS).map(|_| AtomicI32::new(-1)).collect(), msg_id: AtomicU64::new(1) });
    let mut addr = listen;
    let mut threads = Vec::new();
    for i in 0..workers.max(1) {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_port(true)?;
        s.set_reuse_address(true)?;
        s.set_recv_buffer_size(4096)?;
        s.set_send_buffer_size(4096)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        if i == 0 {
            addr = s.local_addr()?.as_socket().expect("inet");
        }
        let shared = shared.clone();
        threads.push(std::thread::Builder::new().name(format!("relay-{i}")).spawn(move || worker(s, shared))?);
    }
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
