//! Per-worker readiness poller for client sockets.
//!
//! Owns: the I/O interest of every connection of one worker, in one of two
//! modes (`server.poller`):
//! - `io_uring`: one multishot receive per connection (`IORING_OP_RECV`
//!   with `IORING_RECV_MULTISHOT`), armed at accept, that lands bytes in
//!   the worker's provided buffer ring (`bufring.rs`) and posts them as
//!   completions; plus a one-shot `POLL_ADD` while waiting for room to
//!   write. Each request is tagged with the connection's token. No read
//!   syscall and no readiness wait per message: the bytes arrive with the
//!   completion.
//! - `epoll`: one epoll set (level-triggered) reporting readiness; the
//!   worker then reads with `recv` into its scratch buffer.
//!
//! Either mode can also send: `send_batch` hands many connections' writes
//! to the kernel as `IORING_OP_SENDMSG` submissions in one
//! `io_uring_enter` (`server.batch_sends`). The io_uring poller submits
//! them on its own ring; the epoll poller keeps a small ring for nothing
//! else (`Poller::epoll`), which no connection holds anything in.
//!
//! The poller's own descriptor is pollable, and the worker's monoio runtime
//! waits on it like on any other fd.
//! Must not: allocate per connection or per event. Arming a request is one
//! submission-queue entry; an event is one completion carrying the token;
//! nothing is stored on our side.
//!
//! Why not a monoio task per connection: measured on this design's first
//! version, a task waiting in `readable()` costs ~400 bytes per connection
//! in user space (task cell ~224 B, op slot ~40 B, shared fd ~48 B, the
//! stream ~96 B), against a 512-byte budget for everything. Here the cost
//! is zero, and an event needs no task wake-up or re-poll either.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::bufring::{BufRing, GROUP};

/// What became ready.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Ready {
    /// Readable (epoll): read the socket.
    Read,
    /// A completion of the connection's multishot receive (io_uring): `res`
    /// bytes in the buffer named by `flags` (see `BufRing::take`), 0 at
    /// end of stream, or `-errno`; `more`: the receive stays armed (clear:
    /// the kernel ended it, and it must be armed again if the connection
    /// stays open).
    Recv {
        res: i32,
        flags: u32,
        more: bool,
    },
    Write,
    /// The worker's mailbox eventfd was written (epoll).
    Mailbox,
}

/// Token of a connection: `generation << 32 | slot << 1 | write-bit`.
pub fn token(slot: u32, generation: u32) -> u64 {
    ((generation as u64) << 32) | ((slot as u64) << 1)
}

/// Splits a token into (slot, generation, what).
pub fn untoken(t: u64) -> (u32, u32, Ready) {
    let ready = if t & 1 == 1 { Ready::Write } else { Ready::Read };
    (((t & 0xFFFF_FFFF) >> 1) as u32, (t >> 32) as u32, ready)
}

/// `IORING_ENTER_GETEVENTS`.
const ENTER_GETEVENTS: u32 = 1;

/// Reserved token for waking the poller itself (never a connection: its
/// slot would be 2^31 - 1, beyond any table).
const WAKE: u64 = u64::MAX;
/// Reserved token of the mailbox eventfd in the epoll set (slot 2^31 - 2,
/// read side).
const MAILBOX: u64 = u64::MAX - 3;
/// Reserved token of the cancellations and closes `close` submits (slot
/// 2^31 - 3, read side); their completions are consumed silently.
const CANCEL: u64 = u64::MAX - 5;
/// `user_data` of a batched send (`send_batch`) is its index in the batch:
/// the high half is zero, and no connection's token has generation 0.
const SEND_INDEX_MAX: u64 = u32::MAX as u64;

/// A completion of a connection's request, as `reap` reports it.
fn ready_of(cqe: &io_uring::cqueue::Entry) -> (u64, Ready) {
    let t = cqe.user_data();
    let ready = if t & 1 == 1 {
        Ready::Write
    } else {
        Ready::Recv { res: cqe.result(), flags: cqe.flags(), more: io_uring::cqueue::more(cqe.flags()) }
    };
    (t & !1, ready)
}

/// Per-worker I/O interest: io_uring or epoll. One per worker, so the size
/// difference between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Poller {
    /// The ring, the buffer ring its receives fill, and the worker's
    /// mailbox eventfd, which the kernel also signals when work for the
    /// ring is pending (what the runtime waits on, see `uring`; -1 until
    /// `watch_mailbox`). Field order is drop order: the buffer ring is
    /// unregistered while the ring is still open.
    Uring {
        bufs: std::rc::Rc<BufRing>,
        ring: IoUring,
        efd: RawFd,
        /// Completions `send_batch` found in the queue besides its own
        /// (receives posted before it ran): `reap` hands them out first,
        /// in the order they came.
        stash: Vec<(u64, Ready)>,
    },
    Epoll {
        epfd: OwnedFd,
        wake: OwnedFd,
        events: Vec<libc::epoll_event>,
        mailbox: RawFd,
        /// A ring for batched sends only (`send_batch`); `None`: one
        /// `sendmsg(2)` per write.
        sends: Option<IoUring>,
    },
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Poller {
    /// An io_uring poller with room for `sq` submissions per batch and `cq`
    /// completions outstanding (overflow beyond it is kept by the kernel,
    /// never dropped, on every kernel that has IORING_FEAT_NODROP), and a
    /// buffer ring of `buffers` × `buffer_bytes` for its receives.
    pub fn uring(sq: u32, cq: u32, buffers: u16, buffer_bytes: u32) -> io::Result<Poller> {
        // Cooperative task work: the kernel runs the receives' work (and
        // posts their completions) when the worker next enters the kernel,
        // or wakes the worker for it when it sleeps; it never interrupts a
        // running worker with an IPI per arriving message. The completions
        // signal a registered eventfd: the worker's mailbox eventfd
        // (`watch_mailbox`), so the runtime waits on one descriptor for
        // both. `TASKRUN_FLAG` tells `reap` and `idle` whether work is
        // pending without a syscall. One thread submits and reaps (the
        // worker's): `SINGLE_ISSUER`. Since completions may thus be posted
        // at any return of the worker from the kernel, nothing but the
        // ring reads a socket the ring receives on (`Worker::recheck_runs`).
        //
        // Not `DEFER_TASKRUN`, which runs the work only inside the worker's
        // own `io_uring_enter` and signals the eventfd when work arrives:
        // on Linux 6.18 that signal came 9–29 ms after the bytes, so an
        // idle worker answered every request that much late (16 ms per
        // reliable SEND → SEND_ACK round trip; the test
        // `uring_fd_wakes_as_soon_as_a_plain_socket_does`), against
        // 0.1–0.2 ms with cooperative task work, the same as a thread
        // asleep on a plain socket.
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(sq)?;
        let bufs = std::rc::Rc::new(BufRing::new(ring.as_raw_fd(), buffers, buffer_bytes)?);
        Ok(Poller::Uring { bufs, ring, efd: -1, stash: Vec::new() })
    }

    /// The buffer ring receives land in (io_uring only).
    pub fn buffers(&self) -> Option<std::rc::Rc<BufRing>> {
        match self {
            Poller::Uring { bufs, .. } => Some(bufs.clone()),
            Poller::Epoll { .. } => None,
        }
    }

    /// An epoll poller (level-triggered), with an eventfd to wake it.
    pub fn epoll() -> io::Result<Poller> {
        // SAFETY: plain syscalls; results are checked before use.
        unsafe {
            let epfd = OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?);
            let wake = OwnedFd::from_raw_fd(cvt(libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))?);
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: WAKE };
            cvt(libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, wake.as_raw_fd(), &mut ev))?;
            Ok(Poller::Epoll { epfd, wake, events: Vec::with_capacity(1024), mailbox: -1, sends: None })
        }
    }

    /// Epoll: adds a ring of `entries` submissions for batched sends
    /// (`send_batch`), created on the calling thread, the only one that may
    /// submit to it. It holds no request between batches (every send has
    /// completed when `send_batch` returns), so it costs its queues and
    /// nothing per connection: at 256 entries, 16 KiB of submission
    /// entries and 12 KiB (whole pages) for 512 completions and the rings'
    /// indexes.
    /// The io_uring poller sends on its own ring and needs none.
    pub fn with_send_ring(&mut self, entries: u32) -> io::Result<()> {
        if let Poller::Epoll { sends, .. } = self {
            *sends = Some(IoUring::builder().setup_single_issuer().build(entries)?);
        }
        Ok(())
    }

    /// The descriptor the runtime polls for "events are waiting".
    pub fn fd(&self) -> RawFd {
        match self {
            Poller::Uring { efd, .. } => *efd,
            Poller::Epoll { epfd, .. } => epfd.as_raw_fd(),
        }
    }

    fn push(ring: &mut IoUring, sqe: squeue::Entry) {
        Self::push_all(ring, &[sqe]);
    }

    /// Queues `sqes` together (a linked chain is never split across two
    /// submissions).
    fn push_all(ring: &mut IoUring, sqes: &[squeue::Entry]) {
        loop {
            // SAFETY: the entries (POLL_ADD, RECV with a provided buffer,
            // ASYNC_CANCEL, CLOSE, NOP) reference no memory of ours but the
            // registered buffer ring, which outlives every request.
            if unsafe { ring.submission().push_multiple(sqes) }.is_ok() {
                return;
            }
            // Submission queue full: hand the batch to the kernel.
            if let Err(e) = ring.submit() {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
    }

    fn epoll_ctl(epfd: &OwnedFd, op: libc::c_int, fd: RawFd, events: u32, data: u64) {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` is a live epoll_event; errors (fd already closed) are
        // harmless here and ignored.
        unsafe { libc::epoll_ctl(epfd.as_raw_fd(), op, fd, &mut ev) };
    }

    /// Starts reading a new connection. On io_uring: its multishot receive,
    /// which stays armed and posts a completion with the bytes each time
    /// data arrives (and one at end of stream or error, which ends it).
    pub fn add(&mut self, fd: RawFd, tok: u64) {
        match self {
            Poller::Uring { ring, .. } => {
                let sqe = opcode::RecvMulti::new(types::Fd(fd), GROUP).build().user_data(tok);
                Self::push(ring, sqe);
            }
            Poller::Epoll { epfd, .. } => Self::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, tok),
        }
    }

    /// Watches the worker's mailbox eventfd, so a cross-worker wake and
    /// the connections' events are one wait. On epoll it joins the set
    /// (level-triggered; `reap` reads it when it reports the event). On
    /// io_uring it becomes the ring's registered eventfd and `fd()`: it
    /// fires for a mailbox wake and for ring work alike, `reap` reports no
    /// mailbox event, and the worker checks its mailbox's flag each turn
    /// instead (`Mailbox::signalled`). Why not a poll on the eventfd: a
    /// write to one eventfd that wakes a ring whose own eventfd must then
    /// be signalled is a nested eventfd signal, which the kernel defers
    /// (measured: the worker slept through its shutdown command).
    pub fn watch_mailbox(&mut self, mailbox: RawFd) -> io::Result<()> {
        match self {
            Poller::Uring { ring, efd, .. } => {
                ring.submitter().register_eventfd(mailbox)?;
                *efd = mailbox;
            }
            Poller::Epoll { epfd, mailbox: m, .. } => {
                *m = mailbox;
                Self::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, mailbox, libc::EPOLLIN as u32, MAILBOX)
            }
        }
        Ok(())
    }

    /// Whether mailbox wakes come as `Ready::Mailbox` events (epoll) rather
    /// than only through the mailbox's flag (io_uring).
    pub fn reports_mailbox(&self) -> bool {
        matches!(self, Poller::Epoll { .. })
    }

    /// Arms the receive again after the kernel ended it (a `Recv` event
    /// with `more` clear).
    pub fn rearm_read(&mut self, fd: RawFd, tok: u64) {
        if let Poller::Uring { .. } = self {
            self.add(fd, tok);
        }
    }

    /// io_uring: cancels the connection's multishot receive. Its last
    /// completion (`-ECANCELED`, `more` clear) then comes behind every
    /// completion of bytes it took, and the caller arms a new receive
    /// (`rearm_read`), which starts by reading whatever waits in the
    /// socket: every byte still goes through the ring, in order. Epoll:
    /// nothing (its reads are the worker's own).
    pub fn restart_read(&mut self, tok: u64) {
        if let Poller::Uring { ring, .. } = self {
            Self::push(ring, opcode::AsyncCancel::new(tok).build().user_data(CANCEL));
        }
    }

    /// Watches for room in the socket's send buffer (one event).
    pub fn want_write(&mut self, fd: RawFd, tok: u64) {
        match self {
            Poller::Uring { ring, .. } => {
                let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32).build().user_data(tok | 1);
                Self::push(ring, sqe);
            }
            Poller::Epoll { epfd, .. } => {
                Self::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, (libc::EPOLLIN | libc::EPOLLOUT) as u32, tok)
            }
        }
    }

    /// The socket drained: stop watching for writability.
    pub fn write_done(&mut self, fd: RawFd, tok: u64) {
        if let Poller::Epoll { epfd, .. } = self {
            Self::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, libc::EPOLLIN as u32, tok);
        }
    }

    /// Stops watching a connection and closes its descriptor `fd`. Neither
    /// mechanism forgets a socket when its descriptor is closed while
    /// something else still holds the socket:
    /// - an io_uring request holds its own reference, so the socket would
    ///   stay open (in CLOSE_WAIT, the peer never told) for as long as the
    ///   request stays armed, which for the multishot receive is forever:
    ///   both of the connection's requests are cancelled by token, and the
    ///   close is linked behind the cancellations, so the descriptor closes
    ///   only once nothing holds the socket (all three go out with the next
    ///   `flush`, this turn);
    /// - an epoll registration lives as long as the open file, which another
    ///   process may share (a child that inherited the descriptor): it would
    ///   go on reporting the closed connection's token, level-triggered,
    ///   forever, so it is deleted explicitly before the close.
    ///
    /// The caller must not use `fd` again.
    pub fn close(&mut self, fd: RawFd, tok: u64) {
        match self {
            Poller::Uring { ring, .. } => {
                // Hard links: the chain goes on when a cancellation finds
                // nothing to cancel (-ENOENT).
                let hard = squeue::Flags::IO_HARDLINK;
                Self::push_all(
                    ring,
                    &[
                        opcode::AsyncCancel::new(tok).build().user_data(CANCEL).flags(hard),
                        opcode::AsyncCancel::new(tok | 1).build().user_data(CANCEL).flags(hard),
                        opcode::Close::new(types::Fd(fd)).build().user_data(CANCEL),
                    ],
                );
            }
            Poller::Epoll { epfd, .. } => {
                Self::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0, tok);
                // SAFETY: the caller gives up `fd`.
                unsafe { super::sys::close(fd) };
            }
        }
    }

    /// Whether writes can go out as batched submissions (`send_batch`):
    /// on the io_uring poller's ring, or the epoll poller's send ring.
    pub fn batches_sends(&self) -> bool {
        match self {
            Poller::Uring { .. } => true,
            Poller::Epoll { sends, .. } => sends.is_some(),
        }
    }

    /// Sends `msgs[i]` on `fds[i]` for every `i`, all in one
    /// `io_uring_enter`, and stores each send's result (bytes written, or
    /// `-errno`) in `res[i]`. Every send is non-blocking: with
    /// `MSG_DONTWAIT` the kernel completes a send that finds the socket
    /// full with `-EAGAIN` at once (and a partial one with its count), as
    /// `sendmsg(2)` would, instead of parking it in the ring until there is
    /// room; so all of them have completed when this returns, and the
    /// headers and the memory they point at need only live until then.
    /// Needs `batches_sends()`. On the io_uring poller, completions of
    /// other requests met on the way are kept for `reap`.
    pub fn send_batch(&mut self, fds: &[RawFd], msgs: &[libc::msghdr], res: &mut [i32]) {
        match self {
            Poller::Uring { ring, stash, .. } => submit_sends(ring, fds, msgs, res, |cqe| {
                let t = cqe.user_data();
                if t != WAKE && t != CANCEL {
                    stash.push(ready_of(cqe));
                }
            }),
            Poller::Epoll { sends: Some(ring), .. } => submit_sends(ring, fds, msgs, res, |cqe| {
                debug_assert!(false, "the send ring holds sends only: {}", cqe.user_data())
            }),
            Poller::Epoll { sends: None, .. } => panic!("send_batch needs a ring (batches_sends)"),
        }
    }

    /// Hands queued submissions to the kernel (io_uring; one syscall per
    /// batch).
    pub fn flush(&mut self) {
        if let Poller::Uring { ring, .. } = self {
            if !ring.submission().is_empty() {
                if let Err(e) = ring.submit() {
                    tracing::error!("io_uring submit failed: {e}");
                }
            }
        }
    }

    /// Makes `fd()` readable so a waiting runtime task wakes up.
    pub fn wake(&mut self) {
        match self {
            Poller::Uring { ring, .. } => {
                Self::push(ring, opcode::Nop::new().build().user_data(WAKE));
                self.flush();
            }
            Poller::Epoll { wake, .. } => {
                let one: u64 = 1;
                // SAFETY: 8 bytes from a live u64 to our own eventfd.
                unsafe { libc::write(wake.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
            }
        }
    }

    /// Called before the runtime waits on `fd()`: returns false when work
    /// is pending already, so the caller reaps again instead of waiting.
    /// io_uring: clears the eventfd (completions this thread posted signal
    /// it too), then looks for work that arrived before the clear; work
    /// arriving after it signals the eventfd again.
    pub fn idle(&mut self) -> bool {
        match self {
            Poller::Uring { ring, efd, stash, .. } => {
                if !stash.is_empty() {
                    return false;
                }
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a live u64 from the mailbox's
                // non-blocking eventfd (its wakes are flagged in the
                // mailbox, not counted: the caller checks that flag after
                // this).
                unsafe { libc::read(*efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                let sq = ring.submission();
                let pending = sq.taskrun() || sq.cq_overflow() || !sq.is_empty();
                drop(sq);
                !pending && ring.completion().is_empty()
            }
            Poller::Epoll { .. } => true,
        }
    }

    /// Appends up to `max` ready events (connection tokens with what is
    /// ready) to `out`, without blocking. Wake-ups are consumed silently.
    pub fn reap(&mut self, out: &mut Vec<(u64, Ready)>, max: usize) {
        match self {
            Poller::Uring { ring, stash, .. } => {
                // What `send_batch` set aside comes first: it was posted
                // before anything the enter below brings.
                let take = stash.len().min(max);
                out.extend(stash.drain(..take));
                let max = max - take;
                if max == 0 {
                    return;
                }
                // Pending task work (the receives of every socket that got
                // data, the polls that fired) runs here, in one enter that
                // also submits what is queued, if no other system call of
                // the worker ran it already; none when nothing waits.
                let (queued, pending) = {
                    let sq = ring.submission();
                    (sq.len() as u32, sq.taskrun() || sq.cq_overflow())
                };
                if pending || queued > 0 {
                    // SAFETY: no timeout or signal mask arguments.
                    let r = unsafe { ring.submitter().enter::<libc::sigset_t>(queued, 0, ENTER_GETEVENTS, None) };
                    if let Err(e) = r {
                        tracing::error!("io_uring enter failed: {e}");
                    }
                }
                for cqe in ring.completion().take(max) {
                    let t = cqe.user_data();
                    if t == WAKE || t == CANCEL {
                        continue;
                    }
                    out.push(ready_of(&cqe));
                }
            }
            Poller::Epoll { epfd, wake, events, mailbox, .. } => {
                events.clear();
                // SAFETY: the kernel writes at most `capacity` entries into
                // the vector's spare capacity; we set the length after.
                let n = unsafe {
                    libc::epoll_wait(epfd.as_raw_fd(), events.as_mut_ptr(), events.capacity().min(max) as i32, 0)
                };
                if n <= 0 {
                    return;
                }
                // SAFETY: the first `n` entries were written by the kernel.
                unsafe { events.set_len(n as usize) };
                for ev in events.iter() {
                    let (t, bits) = (ev.u64, ev.events);
                    if t == WAKE {
                        let mut v = 0u64;
                        // SAFETY: reads 8 bytes into a live u64.
                        unsafe { libc::read(wake.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
                        continue;
                    }
                    if t == MAILBOX {
                        // Level-triggered: reset the counter now, or the
                        // event repeats until the mailbox loop runs.
                        let mut v = 0u64;
                        // SAFETY: reads 8 bytes into a live u64 from the
                        // worker's non-blocking eventfd.
                        unsafe { libc::read(*mailbox, &mut v as *mut u64 as *mut libc::c_void, 8) };
                        out.push((t, Ready::Mailbox));
                        continue;
                    }
                    if bits & libc::EPOLLOUT as u32 != 0 {
                        out.push((t, Ready::Write));
                    }
                    if bits & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32 != 0 {
                        out.push((t, Ready::Read));
                    }
                }
            }
        }
    }
}

/// `Poller::send_batch` on `ring`: queues one `SENDMSG` per connection,
/// tagged with its index, submits them, and collects their results;
/// `other` gets every other completion found in the queue, in order.
fn submit_sends(
    ring: &mut IoUring,
    fds: &[RawFd],
    msgs: &[libc::msghdr],
    res: &mut [i32],
    mut other: impl FnMut(&io_uring::cqueue::Entry),
) {
    let n = fds.len();
    assert!(msgs.len() == n && res.len() == n && n as u64 <= SEND_INDEX_MAX);
    if n == 0 {
        return;
    }
    let flags = (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32;
    for (i, (&fd, msg)) in fds.iter().zip(msgs).enumerate() {
        let sqe = opcode::SendMsg::new(types::Fd(fd), msg).flags(flags).build().user_data(i as u64);
        loop {
            // SAFETY: `msg` and the iovecs and bytes it points at are the
            // caller's and live until `send_batch` returns; every send has
            // completed by then (see there, and the wait below).
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                break;
            }
            if let Err(e) = ring.submit() {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
    }
    let mut left = n;
    let mut wait = 0;
    loop {
        // Submits what is queued; the sends run inline and post their
        // completions before the call returns. Waiting (for a send the
        // kernel did not finish inline) also runs pending task work.
        if let Err(e) = ring.submit_and_wait(wait) {
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
        for cqe in ring.completion() {
            let t = cqe.user_data();
            if t < n as u64 {
                res[t as usize] = cqe.result();
                left -= 1;
            } else {
                other(&cqe);
            }
        }
        if left == 0 {
            return;
        }
        wait = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip() {
        let t = token(0xFF_FFFF, u32::MAX);
        assert_eq!(untoken(t), (0xFF_FFFF, u32::MAX, Ready::Read));
        assert_eq!(untoken(t | 1), (0xFF_FFFF, u32::MAX, Ready::Write));
        assert_ne!(t | 1, WAKE);
        for reserved in [WAKE, MAILBOX, CANCEL] {
            assert!(untoken(reserved).0 as usize > crate::ids::MAX_SLOTS_PER_WORKER, "{reserved:x} is no slot's token");
        }
    }

    fn pair() -> (std::os::unix::net::UnixStream, std::os::unix::net::UnixStream) {
        std::os::unix::net::UnixStream::pair().unwrap()
    }

    /// Write readiness is reported once asked for, and not after
    /// `write_done` (both modes).
    fn check_write(p: &mut Poller, b: &std::os::unix::net::UnixStream) {
        let mut out = Vec::new();
        p.want_write(b.as_raw_fd(), token(3, 9));
        p.flush();
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.reap(&mut out, 16);
        assert!(out.contains(&(token(3, 9), Ready::Write)), "{out:?}");
        out.clear();
        p.write_done(b.as_raw_fd(), token(3, 9));
        p.wake();
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.reap(&mut out, 16);
        assert!(!out.contains(&(token(3, 9), Ready::Write)), "{out:?}");
    }

    fn reap_after(p: &mut Poller, ms: u64) -> Vec<(u64, Ready)> {
        p.flush();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let mut out = Vec::new();
        p.reap(&mut out, 64);
        out
    }

    /// An io_uring poller watching a mailbox eventfd, as a worker's is
    /// (none where the kernel refuses io_uring).
    fn uring(buffers: u16, bytes: u32) -> Option<(Poller, OwnedFd)> {
        let mut p = Poller::uring(256, 512, buffers, bytes).ok()?;
        // SAFETY: a plain syscall; checked before use.
        let efd = unsafe { OwnedFd::from_raw_fd(cvt(libc::eventfd(0, libc::EFD_NONBLOCK)).unwrap()) };
        p.watch_mailbox(efd.as_raw_fd()).unwrap();
        Some((p, efd))
    }

    /// The bytes of the receive completions of connection (3, 9) reaped
    /// after `ms`, their buffers handed back; each completion must carry
    /// bytes and leave the receive armed.
    fn received(p: &mut Poller, bufs: &BufRing, ms: u64) -> Vec<u8> {
        let mut got = Vec::new();
        for (t, ready) in reap_after(p, ms) {
            assert_eq!(t, token(3, 9));
            let Ready::Recv { res, flags, more } = ready else { panic!("{ready:?}") };
            assert!(res > 0 && more, "{res} {more}");
            // SAFETY: one completion, taken once, released below.
            let (bid, data) = unsafe { bufs.take(flags, res as usize) }.expect("a buffer");
            got.extend_from_slice(data);
            bufs.done(bid, flags, res as usize);
        }
        got
    }

    #[test]
    fn uring_restarted_receive_ends_cancelled_and_a_new_one_reads_what_waits() {
        use std::io::Write;
        let Some((mut p, _mailbox)) = uring(4, 4096) else { return };
        let bufs = p.buffers().unwrap();
        let (mut a, b) = pair();
        p.add(b.as_raw_fd(), token(3, 9));
        a.write_all(b"first").unwrap();
        assert_eq!(received(&mut p, &bufs, 20), b"first");
        // The restart: bytes written meanwhile wait in the socket until
        // the cancelled receive's last completion, behind which a new
        // receive takes them, in order.
        p.restart_read(token(3, 9));
        a.write_all(b"second").unwrap();
        let mut got = Vec::new();
        let mut ended = false;
        for (t, ready) in reap_after(&mut p, 20) {
            assert_eq!(t, token(3, 9));
            let Ready::Recv { res, flags, more } = ready else { panic!("{ready:?}") };
            if res == -libc::ECANCELED {
                assert!(!more, "the cancelled receive's last completion");
                ended = true;
                continue;
            }
            assert!(res > 0 && !ended, "bytes before the end: {res}");
            // SAFETY: one completion, taken once, released below.
            let (bid, data) = unsafe { bufs.take(flags, res as usize) }.expect("a buffer");
            got.extend_from_slice(data);
            bufs.done(bid, flags, res as usize);
        }
        assert!(ended, "the receive was cancelled");
        p.rearm_read(b.as_raw_fd(), token(3, 9));
        got.extend(received(&mut p, &bufs, 20));
        assert_eq!(got, b"second");
        a.write_all(b"third").unwrap();
        assert_eq!(received(&mut p, &bufs, 20), b"third", "the new receive stays armed");
    }

    #[test]
    fn uring_receives_into_the_buffer_ring_and_closes_after_cancelling() {
        use std::io::{Read, Write};
        let Some((mut p, _mailbox)) = uring(4, 4096) else { return };
        let bufs = p.buffers().unwrap();
        let (mut a, b) = pair();
        p.add(b.as_raw_fd(), token(3, 9));
        assert!(reap_after(&mut p, 10).is_empty(), "nothing to read yet");
        // Bytes arrive with the completion, the receive stays armed.
        let mut got = Vec::new();
        for msg in [&b"hello"[..], b"again", b"and a third"] {
            a.write_all(msg).unwrap();
            got.extend(received(&mut p, &bufs, 20));
        }
        assert_eq!(got, b"helloagainand a third");
        // A runtime asleep on `fd()` (the registered eventfd) wakes when
        // bytes arrive.
        assert!(p.idle(), "nothing pending");
        let (lat, mut a) = wake_after_write(p.fd(), a, b"wake");
        assert!(lat < std::time::Duration::from_secs(2), "woken by the bytes, not the timeout");
        assert_eq!(received(&mut p, &bufs, 0), b"wake");
        // More completions than buffers: incremental consumption (or the
        // recycling in `received`) keeps the ring from running dry.
        for i in 0..32u8 {
            a.write_all(&[i; 100]).unwrap();
            assert_eq!(received(&mut p, &bufs, 2), [i; 100]);
        }
        check_write(&mut p, &b);
        // Closing cancels the receive before the descriptor goes: the peer
        // sees end of stream (a socket left held would keep it waiting).
        // The linked close is task work of the ring, run by the next
        // turns (the ring's descriptor reads ready until it has run).
        p.close(std::os::fd::IntoRawFd::into_raw_fd(b), token(3, 9));
        for _ in 0..3 {
            let _ = reap_after(&mut p, 10);
        }
        a.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut rest = Vec::new();
        assert_eq!(a.read_to_end(&mut rest).unwrap(), 0, "the peer sees EOF");
    }

    /// How long after another thread's write of `bytes` into `w` a
    /// `poll(2)` on `fd` returns (`w` is handed back).
    fn wake_after_write(
        fd: RawFd,
        w: std::os::unix::net::UnixStream,
        bytes: &'static [u8],
    ) -> (std::time::Duration, std::os::unix::net::UnixStream) {
        use std::io::Write;
        let writer = std::thread::spawn(move || {
            let mut w = w;
            std::thread::sleep(std::time::Duration::from_millis(20));
            let t = std::time::Instant::now();
            w.write_all(bytes).unwrap();
            (t, w)
        });
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5_000) }, 1, "woken at all");
        let woke = std::time::Instant::now();
        let (t, w) = writer.join().unwrap();
        (woke.saturating_duration_since(t), w)
    }

    /// A worker asleep on `fd()` wakes as soon as a connection's bytes
    /// arrive: as soon as a thread asleep on a plain socket does, not a
    /// kernel timer later. (With deferred task work, `DEFER_TASKRUN`, the
    /// ring signalled its eventfd 9–29 ms after the bytes on Linux 6.18,
    /// and every reply of an idle io_uring worker waited that long: 16 ms
    /// per reliable SEND → SEND_ACK round trip.) Medians of alternated
    /// rounds, with a margin a loaded host does not reach.
    #[test]
    fn uring_fd_wakes_as_soon_as_a_plain_socket_does() {
        let Some((mut p, _mailbox)) = uring(4, 4096) else { return };
        let bufs = p.buffers().unwrap();
        let (mut a, b) = pair();
        p.add(b.as_raw_fd(), token(3, 9));
        p.flush();
        let (mut c, d) = pair();
        let (mut ring, mut plain) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            assert!(p.idle(), "nothing pending");
            let (lat, back) = wake_after_write(p.fd(), a, b"x");
            a = back;
            ring.push(lat);
            assert_eq!(received(&mut p, &bufs, 0), b"x");
            let (lat, back) = wake_after_write(d.as_raw_fd(), c, b"x");
            c = back;
            plain.push(lat);
            let mut x = [0u8; 1];
            std::io::Read::read_exact(&mut &d, &mut x).unwrap();
        }
        ring.sort();
        plain.sort();
        let (ring, plain) = (ring[3], plain[3]);
        assert!(
            ring < plain + std::time::Duration::from_millis(5),
            "the ring's descriptor woke {ring:?} after the bytes (median), a plain socket's {plain:?}"
        );
    }

    #[test]
    fn uring_reports_a_dry_buffer_ring_and_loses_no_bytes() {
        use std::io::Write;
        // One 64-byte buffer: the second message finds the ring empty while
        // the first is still held.
        let Some((mut p, _mailbox)) = uring(1, 64) else { return };
        let bufs = p.buffers().unwrap();
        let (mut a, b) = pair();
        p.add(b.as_raw_fd(), token(1, 1));
        a.write_all(&[7u8; 64]).unwrap();
        let first = reap_after(&mut p, 20);
        let [(_, Ready::Recv { res: 64, flags, .. })] = first[..] else { panic!("{first:?}") };
        a.write_all(b"tail").unwrap();
        let dry = reap_after(&mut p, 20);
        assert!(
            dry.iter().any(|&(_, r)| matches!(r, Ready::Recv { res, more: false, .. } if res == -libc::ENOBUFS)),
            "{dry:?}"
        );
        // SAFETY: the first completion, taken once.
        let (bid, _) = unsafe { bufs.take(flags, 64) }.unwrap();
        bufs.done(bid, flags, 64);
        // Re-armed with a buffer back: the bytes were waiting in the socket.
        p.rearm_read(b.as_raw_fd(), token(1, 1));
        let again = reap_after(&mut p, 20);
        let [(_, Ready::Recv { res: 4, flags, .. })] = again[..] else { panic!("{again:?}") };
        // SAFETY: as above.
        let (_, data) = unsafe { bufs.take(flags, 4) }.unwrap();
        assert_eq!(data, b"tail");
    }

    /// One header per buffer, for `send_batch`.
    fn headers(iov: &[libc::iovec]) -> Vec<libc::msghdr> {
        iov.iter()
            .map(|v| {
                // SAFETY: msghdr is plain data; zeroed is a valid empty header.
                let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
                m.msg_iov = v as *const libc::iovec as *mut libc::iovec;
                m.msg_iovlen = 1;
                m
            })
            .collect()
    }

    /// Batched sends on two sockets in one call; then sends that fill a
    /// socket nobody reads until one completes with -EAGAIN at once (it
    /// does not wait in the ring); then a broken socket's error. Returns
    /// with nothing left pending in the ring (both modes).
    fn check_batched_sends(p: &mut Poller) {
        use std::io::Read;
        assert!(p.batches_sends());
        let (mut a, b) = pair();
        let (mut c, d) = pair();
        let (x, y) = (b"to a".to_vec(), b"to c!".to_vec());
        let iov = [
            libc::iovec { iov_base: x.as_ptr() as *mut _, iov_len: x.len() },
            libc::iovec { iov_base: y.as_ptr() as *mut _, iov_len: y.len() },
        ];
        let mut res = [0; 2];
        p.send_batch(&[b.as_raw_fd(), d.as_raw_fd()], &headers(&iov), &mut res);
        assert_eq!(res, [4, 5]);
        let mut got = [0u8; 5];
        a.read_exact(&mut got[..4]).unwrap();
        assert_eq!(&got[..4], b"to a");
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to c!");
        let big = vec![1u8; 1 << 16];
        let iov = [libc::iovec { iov_base: big.as_ptr() as *mut _, iov_len: big.len() }];
        let mut res = [0];
        let mut sent = 0usize;
        let t0 = std::time::Instant::now();
        loop {
            p.send_batch(&[d.as_raw_fd()], &headers(&iov), &mut res);
            if res[0] < 0 {
                break;
            }
            sent += res[0] as usize;
            assert!(sent < 64 << 20, "a unix socket holds far less than 64 MiB");
        }
        assert_eq!(res[0], -libc::EAGAIN);
        assert!(sent > 0 && t0.elapsed() < std::time::Duration::from_secs(5));
        assert!(p.idle(), "no send left pending in the ring");
        drop(c);
        p.send_batch(&[d.as_raw_fd()], &headers(&iov), &mut res);
        assert_eq!(res[0], -libc::EPIPE);
    }

    #[test]
    fn uring_batched_sends_complete_before_the_call_returns_and_never_wait_for_room() {
        use std::io::Write;
        let Some((mut p, _mailbox)) = uring(4, 4096) else { return };
        let bufs = p.buffers().unwrap();
        let (mut a, b) = pair();
        // A receive completion waits in the queue when the batch runs: it
        // must survive for `reap`, in order.
        p.add(b.as_raw_fd(), token(3, 9));
        p.flush();
        a.write_all(b"in").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // SAFETY: no arguments; runs the pending receive, posting its
        // completion without reaping it.
        unsafe { p_ring(&mut p).submitter().enter::<libc::sigset_t>(0, 0, ENTER_GETEVENTS, None) }.unwrap();
        let iov = [libc::iovec { iov_base: b"out".as_ptr() as *mut _, iov_len: 3 }];
        let mut res = [0];
        p.send_batch(&[b.as_raw_fd()], &headers(&iov), &mut res);
        assert_eq!(res, [3]);
        assert_eq!(received(&mut p, &bufs, 0), b"in", "the stashed receive comes out of reap");
        check_batched_sends(&mut p);
    }

    #[test]
    fn epoll_batches_sends_on_a_ring_of_its_own() {
        use std::io::Write;
        let mut p = Poller::epoll().unwrap();
        assert!(!p.batches_sends(), "no ring unless asked for");
        if p.with_send_ring(8).is_err() {
            return; // io_uring refused here
        }
        // Readiness goes on being reported by epoll alongside.
        let (mut a, b) = pair();
        p.add(b.as_raw_fd(), token(3, 9));
        a.write_all(b"x").unwrap();
        // More sends than the ring has entries: submitted in several rounds.
        let iov: Vec<_> = (0..20).map(|_| libc::iovec { iov_base: b"y".as_ptr() as *mut _, iov_len: 1 }).collect();
        let fds = vec![b.as_raw_fd(); 20];
        let mut res = [0; 20];
        p.send_batch(&fds, &headers(&iov), &mut res);
        assert_eq!(res, [1; 20]);
        assert_eq!(reap_after(&mut p, 20), vec![(token(3, 9), Ready::Read)]);
        check_batched_sends(&mut p);
    }

    fn p_ring(p: &mut Poller) -> &mut IoUring {
        let Poller::Uring { ring, .. } = p else { unreachable!() };
        ring
    }

    #[test]
    fn epoll_reports_read_and_write_readiness() {
        use std::io::Write;
        let mut p = Poller::epoll().unwrap();
        let (mut a, b) = pair();
        p.add(b.as_raw_fd(), token(3, 9));
        assert!(reap_after(&mut p, 0).is_empty(), "nothing to read yet");
        a.write_all(b"x").unwrap();
        assert_eq!(reap_after(&mut p, 20), vec![(token(3, 9), Ready::Read)]);
        check_write(&mut p, &b);
        p.close(std::os::fd::IntoRawFd::into_raw_fd(b), token(3, 9));
    }
}
