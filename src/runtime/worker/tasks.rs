//! A worker's tasks: the I/O loop, the accept loops, the tick loop, the
//! mailbox loop, the drain, and `run`, which starts them and shuts the
//! worker down. None per connection.
//!
//! Owns: when each part of the worker runs, and the order of a shutdown.
//! Must not: hold a `RefCell` borrow across an `.await`.

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use monoio::net::{TcpListener, UnixStream};

use super::{Worker, YieldNow, FLUSH_EVERY, IO_BATCH, MAILBOX_BATCH, TICK_BATCH};
use crate::ids::WorkerId;
use crate::outq::MAX_IOV_PER_WRITE;
use crate::proto::codes::CloseCode;
use crate::proto::conn::Connection;
use crate::runtime::poller::{token, Poller, Ready};
use crate::runtime::shared::{Command, Shared};
use crate::runtime::sys;

/// Resolves once the I/O loop reports a mailbox wake.
struct MailboxWake<'a>(&'a Worker);

impl Future for MailboxWake<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let w = self.0;
        if w.mailbox_ready.replace(false) || w.stopped.get() {
            return Poll::Ready(());
        }
        w.mailbox_waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// Resolves once the worker is stopped (the tick loop's way out of its
/// sleep at shutdown).
struct Stopped<'a>(&'a Worker);

impl Future for Stopped<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.stopped.get() {
            return Poll::Ready(());
        }
        self.0.stop_waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

fn tick_ms_of(shared: &Shared) -> u64 {
    shared.config.timeouts.tick_ms
}

/// Wraps a duplicate of `fd` in monoio's thinnest pollable type (a bare
/// shared fd), used only to wait for readability: the mailbox eventfd and
/// the poller's descriptor.
fn pollable(fd: RawFd) -> std::io::Result<UnixStream> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; the result is checked.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let std_stream = unsafe { <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(dup) };
    UnixStream::from_std(std_stream)
}

/// Waits on the poller's descriptor and handles every ready connection.
async fn io_loop(w: Rc<Worker>, ready_fd: UnixStream) {
    let mut events = Vec::with_capacity(IO_BATCH);
    // io_uring: the mailbox's wakes arrive only as its flag (see
    // `Poller::watch_mailbox`), looked at once per turn.
    let flagged = !w.out.poller.borrow().reports_mailbox();
    loop {
        if flagged {
            w.poke_mailbox();
        }
        // Connections cut short by the per-wake read limit come first.
        let again = std::mem::take(&mut *w.read_again.borrow_mut());
        w.store_turn(|| {
            for (slot, generation) in again {
                w.on_ready(token(slot, generation), Ready::Read);
            }
        });
        w.out.poller.borrow_mut().reap(&mut events, IO_BATCH);
        if events.is_empty() {
            if w.stopped.get() {
                return;
            }
            if !w.read_again.borrow().is_empty() {
                w.out.flush_dirty();
                YieldNow(false).await;
                continue;
            }
            // io_uring: long receive runs that ended are looked at once
            // more (`Worker::track_run`); only here, where no completion
            // is left unhandled.
            if !w.recheck.borrow().is_empty() {
                w.recheck_runs();
                w.out.flush_dirty();
                w.out.poller.borrow_mut().flush();
                YieldNow(false).await;
                continue;
            }
            w.out.poller.borrow_mut().flush();
            // After `idle` cleared the eventfd: a flag raised before that is
            // seen here, one raised after it writes the eventfd again.
            if !w.out.poller.borrow_mut().idle() || (flagged && w.poke_mailbox()) {
                YieldNow(false).await;
                continue;
            }
            if ready_fd.readable(false).await.is_err() {
                return;
            }
            continue;
        }
        // The store thread is woken once for the turn's requests (SENDs,
        // logins, pages), not at each.
        w.store_turn(|| {
            for (i, (tok, ready)) in events.drain(..).enumerate() {
                w.on_ready(tok, ready);
                if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
                    // A busy turn (thousands of reads) would otherwise hold
                    // the replies to its first reads, and its first store
                    // requests, until its end.
                    w.out.flush_dirty();
                    w.wake_store();
                }
            }
        });
        w.rearm_starved();
        w.out.flush_dirty();
        w.out.poller.borrow_mut().flush();
        // Every turn gives the other tasks (mailbox, timers, accepts) their
        // turn: events that keep coming cannot starve them.
        YieldNow(false).await;
    }
}

async fn accept_loop(w: Rc<Worker>, listener: Rc<TcpListener>, websocket: bool) {
    struct Running(Rc<Worker>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.accepting.set(self.0.accepting.get() - 1);
        }
    }
    w.accepting.set(w.accepting.get() + 1);
    let _running = Running(w.clone());
    let mut backoff_logged = false;
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                backoff_logged = false;
                // SAFETY: `into_raw_fd` hands over the stream's descriptor,
                // which nothing else owns.
                w.on_accept(unsafe { OwnedFd::from_raw_fd(stream.into_raw_fd()) }, websocket, false);
            }
            Err(e) => {
                if w.stopping() {
                    return;
                }
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                if !backoff_logged {
                    tracing::warn!(worker = w.id.0, "accept failed: {e}; retrying in 100 ms");
                    backoff_logged = true;
                }
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if w.stopping() {
            return;
        }
    }
}

async fn tick_loop(w: Rc<Worker>) {
    let tick_ms = w.shared.config.timeouts.tick_ms;
    let mut due = Vec::new();
    loop {
        let next = w.now.get().wrapping_add(1);
        let at = w.shared.epoch + Duration::from_millis(next as u64 * tick_ms);
        monoio::select! {
            _ = monoio::time::sleep_until(monoio::time::Instant::from_std(at)) => {}
            _ = Stopped(&w) => return,
        }
        let now = w.refresh_now();
        w.expire_held(now);
        w.drop_full_budgets();
        w.log_over_budget();
        // One wake of the store thread for the tick's device positions.
        w.store_turn(|| w.reliable_tick(now));
        w.wheel.borrow_mut().advance(now, &mut due);
        let mut handled = 0;
        for e in due.drain(..) {
            w.on_due(e);
            handled += 1;
            if handled % TICK_BATCH == 0 {
                w.out.flush_dirty();
                YieldNow(false).await;
            }
        }
        w.out.flush_dirty();
    }
}

async fn mailbox_loop(w: Rc<Worker>) {
    let mb = &w.shared.mailboxes[w.id.0 as usize];
    let mut batch: std::collections::VecDeque<Command> = std::collections::VecDeque::with_capacity(MAILBOX_BATCH);
    let mut frames: Vec<Bytes> = Vec::with_capacity(MAX_IOV_PER_WRITE);
    loop {
        if w.shared.shutdown.load(Ordering::Acquire) || w.drained.get() {
            return;
        }
        if w.shared.draining.load(Ordering::Acquire) && !w.drain_started.replace(true) {
            monoio::spawn(drain(w.clone()));
        }
        // Re-arm wakes first, then look at both things a wake announces:
        // write-slot requests and commands. (Waiting on commands alone lost
        // requests: a wake for a request left `notified` set, so no later
        // wake reached the eventfd until a command happened to arrive.)
        mb.begin_drain(false);
        w.on_requests();
        if mb.is_empty() {
            MailboxWake(&w).await;
            if w.stopped.get() {
                return;
            }
            continue;
        }
        while batch.len() < MAILBOX_BATCH {
            let Some(cmd) = mb.pop() else { break };
            batch.push_back(cmd);
        }
        let full = batch.len() == MAILBOX_BATCH;
        let mut handled = 0;
        while let Some(cmd) = batch.pop_front() {
            handled += 1;
            if handled % FLUSH_EVERY == 0 {
                // As in the I/O loop: replies to the first commands do not
                // wait for the last of thousands.
                w.out.flush_dirty();
            }
            match cmd {
                // Consecutive messages for the same room (or consecutive
                // broadcasts) go out together: one sendmsg per member
                // carries all of them. Only consecutive ones, so every
                // member still sees messages in publish order.
                // Timed from the oldest message of the batch (the first).
                Command::Publish { room, frame, accepted_ns } => {
                    frames.push(frame);
                    while frames.len() < MAX_IOV_PER_WRITE {
                        match batch.front() {
                            Some(Command::Publish { room: next, .. }) if *next == room => {}
                            _ => break,
                        }
                        if let Some(Command::Publish { frame, .. }) = batch.pop_front() {
                            frames.push(frame);
                        }
                    }
                    w.fan_out(Some(&room), &frames, accepted_ns).await;
                    frames.clear();
                }
                Command::Broadcast { frame, accepted_ns } => {
                    frames.push(frame);
                    while frames.len() < MAX_IOV_PER_WRITE && matches!(batch.front(), Some(Command::Broadcast { .. })) {
                        if let Some(Command::Broadcast { frame, .. }) = batch.pop_front() {
                            frames.push(frame);
                        }
                    }
                    w.fan_out(None, &frames, accepted_ns).await;
                    frames.clear();
                }
                other => w.on_command(other),
            }
        }
        w.out.flush_dirty();
        w.out.poller.borrow_mut().flush();
        if full {
            YieldNow(false).await;
        }
    }
}

/// A graceful drain: stop accepting, then CLOSE 1001 with a reconnect hint
/// to every connection, spread over the drain window, then wait for the
/// peers to close (bounded by the linger). The mailbox loop keeps running
/// meanwhile (write-room requests, room commands); it ends when this sets
/// `drained`.
async fn drain(w: Rc<Worker>) {
    let cfg = &w.shared.config;
    // Closing the listener moves connections still in its accept queue to
    // another listener of the port when net.ipv4.tcp_migrate_req = 1.
    sys::shutdown(w.listener_fd.get(), libc::SHUT_RDWR);
    if w.ws_listener_fd.get() >= 0 {
        sys::shutdown(w.ws_listener_fd.get(), libc::SHUT_RDWR);
    }
    // Logged-in connections only: one still logging in gets its LOGIN_OK
    // first (its attempt succeeded), and its CLOSE right after (on_login).
    let ids = w.select(Connection::is_active);
    // At least 1,000 closes per second: a worker with few connections does
    // not sit out the whole window.
    let window = Duration::from_millis(cfg.drain.window_ms.min(ids.len() as u64));
    let t0 = std::time::Instant::now();
    let mut done = 0;
    while done < ids.len() {
        // Everyone whose share of the window has come.
        let due = if window.is_zero() {
            ids.len()
        } else {
            ((t0.elapsed().as_secs_f64() / window.as_secs_f64()) * ids.len() as f64).ceil() as usize
        };
        while done < due.min(ids.len()) {
            let (slot, generation) = ids[done];
            w.close_conn(slot, generation, CloseCode::GoingAway, &w.going_away());
            done += 1;
        }
        w.out.flush_dirty();
        if done < ids.len() {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(cfg.timeouts.close_linger_ms);
    while (w.connection_count() > 0 || w.accepting.get() > 0) && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    // Connections still not logged in at the deadline get the CLOSE too
    // (left open until the process exits, a LOGIN the server never read
    // would turn that exit into a reset).
    for (slot, generation) in w.select(|c| !c.is_closing()) {
        w.close_conn(slot, generation, CloseCode::GoingAway, &w.going_away());
    }
    w.out.flush_dirty();
    w.drained.set(true);
    w.mailbox_ready.set(true);
    if let Some(waker) = w.mailbox_waker.take() {
        waker.wake();
    }
}

/// The worker's main future: accept, tick and mailbox loops until shutdown,
/// then a graceful close of every connection.
pub(crate) async fn run(
    shared: Arc<Shared>,
    id: WorkerId,
    listener: std::net::TcpListener,
    ws_listener: Option<std::net::TcpListener>,
    driver: crate::runtime::DriverKind,
    ready: impl FnOnce(Result<crate::runtime::DataPath, String>),
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => Rc::new(l),
        Err(e) => return ready(Err(format!("cannot register listener: {e}"))),
    };
    let ws_listener = match ws_listener.map(TcpListener::from_std).transpose() {
        Ok(l) => l.map(Rc::new),
        Err(e) => return ready(Err(format!("cannot register the WebSocket listener: {e}"))),
    };
    let poller = match (driver, shared.config.server.poller) {
        (crate::runtime::DriverKind::IoUring, crate::config::PollerKind::IoUring) => {
            let u = &shared.config.uring;
            // Multishot receives (6.0), buffer rings (5.19) and deferred
            // task work (6.1): an older kernel, or one that limits io_uring,
            // gets the epoll data path, with a warning, as `io_driver =
            // "auto"` does for the runtime.
            Poller::uring(u.sq_entries, u.cq_entries, u.recv_buffers, u.recv_buffer_bytes).or_else(|e| {
                if id.0 == 0 {
                    tracing::warn!(
                        "server.poller = \"io_uring\" is not available on this kernel ({e}); using epoll for client sockets"
                    );
                }
                Poller::epoll()
            })
        }
        _ => Poller::epoll(),
    };
    let poller = match poller {
        Ok(p) => p,
        Err(e) => return ready(Err(format!("cannot create the connection poller: {e}"))),
    };
    let mut poller = poller;
    if shared.config.server.batch_sends && driver == crate::runtime::DriverKind::IoUring {
        // The epoll poller's ring for batched sends (the io_uring poller
        // has its own). Refused (io_uring limited by a sysctl or seccomp):
        // one sendmsg per write, as before.
        if let Err(e) = poller.with_send_ring(256) {
            if id.0 == 0 {
                tracing::warn!("server.batch_sends: no io_uring for sends on this host ({e}); one sendmsg per write");
            }
        }
    }
    let path = crate::runtime::DataPath {
        uring_receives: poller.buffers().is_some(),
        batched_sends: shared.config.server.batch_sends && poller.batches_sends(),
    };
    if let Some(b) = poller.buffers() {
        tracing::debug!(
            worker = id.0,
            bytes = b.bytes(),
            incremental = b.incremental(),
            "multishot receives on a provided buffer ring"
        );
    }
    if let Err(e) = poller.watch_mailbox(shared.mailboxes[id.0 as usize].eventfd()) {
        return ready(Err(format!("cannot register the mailbox eventfd on the connection ring: {e}")));
    }
    poller.flush();
    let poller_ready = match pollable(poller.fd()) {
        Ok(s) => s,
        Err(e) => return ready(Err(format!("cannot register the poller: {e}"))),
    };
    let w = Rc::new(Worker::new(id, shared.clone(), poller));
    w.listener_fd.set(listener.as_raw_fd());
    for _ in 0..shared.config.server.accepts_per_worker {
        monoio::spawn(accept_loop(w.clone(), listener.clone(), false));
    }
    if let Some(l) = &ws_listener {
        w.ws_listener_fd.set(l.as_raw_fd());
        for _ in 0..shared.config.server.accepts_per_worker {
            monoio::spawn(accept_loop(w.clone(), l.clone(), true));
        }
    }
    monoio::spawn(io_loop(w.clone(), poller_ready));
    monoio::spawn(tick_loop(w.clone()));
    ready(Ok(path));
    mailbox_loop(w.clone()).await;

    // Graceful shutdown. Everything is released while the runtime still
    // runs: monoio 0.2 does not close the descriptors of tasks still
    // pending when a runtime is dropped.
    // 1. Stop listening: shutdown() on a listening socket ends it and fails
    //    the pending accepts, so the accept loops return.
    sys::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
    drop(listener);
    if let Some(l) = ws_listener {
        sys::shutdown(l.as_raw_fd(), libc::SHUT_RDWR);
    }
    // 2. CLOSE 1001 to everyone, then wait for peers to close, bounded by
    //    the linger. A drain did both already (spread over its window): its
    //    stragglers are cut off at once, so a drain takes its window plus
    //    one linger, as documented.
    if !w.drained.get() {
        w.close_all(CloseCode::GoingAway);
        let linger = Duration::from_millis(shared.config.timeouts.close_linger_ms);
        let deadline = std::time::Instant::now() + linger;
        while (w.connection_count() > 0 || w.accepting.get() > 0) && std::time::Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // 3. Whoever is left is cut off; their readers release them.
    let left = w.connection_count();
    w.abort_all();
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while (w.connection_count() > 0 || Rc::strong_count(&w) > 2) && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    // Positions the closes could not hand to a full store queue: a moment
    // more for room (the store stops after the workers, so what is queued
    // is written).
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while w.positions_waiting() && std::time::Instant::now() < deadline {
        w.store_turn(|| w.save_positions());
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    // 4. Stop the tick and I/O loops (at once, not at the next tick); the
    //    last Rc to the worker then goes with them and closes the poller.
    w.stopped.set(true);
    if let Some(waker) = w.stop_waker.take() {
        waker.wake();
    }
    w.out.poller.borrow_mut().wake();
    let deadline = std::time::Instant::now() + Duration::from_millis(tick_ms_of(&shared) + 5);
    while Rc::strong_count(&w) > 1 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
    tracing::debug!(worker = id.0, cut_off = left, "worker stopped");
}
