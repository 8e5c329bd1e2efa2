//! Thin, checked wrappers over the socket syscalls the worker issues itself.
//!
//! Owns: non-blocking `recv`, vectored `sendmsg`, `shutdown`, CPU pinning.
//! Must not: keep state or retry anything but `EINTR`.
//!
//! Why plain syscalls next to io_uring: reads come from the multishot
//! receives of `poller.rs` (or, on the epoll data path, a non-blocking
//! `recv` into one per-worker scratch buffer); writes go out with one
//! non-blocking `sendmsg` per connection per batch, from any thread, which
//! costs the same kernel time as an io_uring send (measured; see DESIGN.md,
//! "the kernel's floor", and the README's table: `sendmsg` is half the
//! server's CPU, nearly all of it TCP itself) and needs no per-write
//! allocation or completion. Only a connection whose socket buffer is full
//! waits, on a poll.
//! Accepted sockets are blocking fds, hence `MSG_DONTWAIT` on every call.

use std::io;
use std::os::fd::RawFd;

use crate::outq::MAX_IOV_PER_WRITE;

// The hot syscalls go through `libc::syscall` rather than the glibc
// wrappers: `send`/`recv`/`sendmsg` are pthread cancellation points, and the
// wrapper's enable/disable of asynchronous cancellation around every call
// measured as about a quarter of the worker's user-space time in a fan-out
// (perf, cpu-clock). Workers are never cancelled, so nothing is lost.

/// Result of a non-blocking read.
pub enum Recv {
    /// This many bytes were read.
    Data(usize),
    /// The peer closed (or the socket was shut down for reading).
    Eof,
    /// Nothing to read now.
    WouldBlock,
    /// The connection is broken.
    Error(io::Error),
}

/// Bytes waiting unread in a socket's receive queue (`FIONREAD`); 0 if
/// the call fails.
pub fn unread_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into a live local.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        0
    } else {
        n.max(0) as usize
    }
}

/// Reads what is available into `buf` without blocking.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> Recv {
    loop {
        // SAFETY: recvfrom(fd, buf, len, flags, NULL, NULL) into a live,
        // writable slice of `buf.len()` bytes.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        };
        if n > 0 {
            return Recv::Data(n as usize);
        }
        if n == 0 {
            return Recv::Eof;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Recv::WouldBlock,
            _ => return Recv::Error(e),
        }
    }
}

/// Result of a non-blocking write.
pub enum Send {
    /// This many bytes were accepted by the kernel (possibly fewer than
    /// offered: the socket buffer filled).
    Wrote(usize),
    /// The socket buffer is full.
    WouldBlock,
    /// The connection is broken (EPIPE, ECONNRESET, ...).
    Error(io::Error),
}

/// Writes `iov` without blocking and without SIGPIPE. The kernel reads
/// exactly the iovecs of the slice: its length is the count, so no count
/// can reach past the array (callers pass `&iov[..n]`, bounds-checked).
pub fn sendmsg(fd: RawFd, iov: &[libc::iovec]) -> Send {
    debug_assert!(!iov.is_empty() && iov.len() <= MAX_IOV_PER_WRITE);
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: `msg` points at the slice's initialised iovecs, which
        // reference live buffers owned by the caller for the duration of
        // the call.
        let r = unsafe {
            libc::syscall(libc::SYS_sendmsg, fd, &msg as *const libc::msghdr, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if r >= 0 {
            return Send::Wrote(r as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Send::WouldBlock,
            _ => return Send::Error(e),
        }
    }
}

/// Best-effort single write of a small frame (used to refuse a connection).
pub fn send_once(fd: RawFd, data: &[u8]) {
    // SAFETY: `data` is a live slice; the result is ignored on purpose.
    unsafe {
        libc::send(fd, data.as_ptr() as *const libc::c_void, data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
}

/// Writes all of `data` with plain `send` calls, waiting for room with
/// poll(2), but not past `deadline`. Returns whether all of it went out.
/// Benchmark use only: the reference loop a fan-out is compared with.
pub fn send_all_until(fd: RawFd, mut data: &[u8], deadline: std::time::Instant) -> bool {
    while !data.is_empty() {
        // SAFETY: `data` is a live slice.
        let n = unsafe {
            libc::send(fd, data.as_ptr() as *const libc::c_void, data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n > 0 {
            data = &data[n as usize..];
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return false;
                }
                let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
                // SAFETY: one live pollfd.
                unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
            }
            _ => return false,
        }
    }
    true
}

/// `shutdown(2)`. Wakes any pending poll on the socket; errors (already
/// closed by the peer) are ignored.
pub fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown has no memory-safety preconditions.
    unsafe { libc::shutdown(fd, how) };
}

/// `close(2)`.
///
/// # Safety
/// The caller owns `fd` (no `OwnedFd` or other owner will close it) and
/// never uses it again: closing a descriptor someone else still uses makes
/// their next call act on whatever file reuses the number.
pub unsafe fn close(fd: RawFd) {
    // SAFETY: the caller's contract above.
    unsafe { libc::close(fd) };
}

/// FD_CLOEXEC on a descriptor (best effort: it cannot fail on a valid one).
pub fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own, no memory passed.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// TCP_NODELAY on an accepted socket (best effort).
pub fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: passes a live c_int of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data filled in by the kernel.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}
