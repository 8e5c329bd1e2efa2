//! Microbenchmarks of the library's building blocks: the codec, the timing
//! wheel, the mailbox, the user directory, the JWT check, the outbound
//! queue, and the bare cost of a system call on the host. Each group opens
//! with the question it answers and why these sizes.
//!
//! Run: `cargo bench -p switchboard-bench --bench micro` (short: `-- --warm-up-time 1
//! --measurement-time 3`; one group: `-- codec`).
//!
//! The global allocator is mimalloc, as in the server binary, so the groups
//! that allocate (`to_bytes`, JWT, directory register, outbound queue) cost
//! what they cost in production.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use switchboard::auth::JwtHs256;
use switchboard::config::{Config, LimitsConfig};
use switchboard::directory::{ConnList, Directory};
use switchboard::ids::{ConnId, WorkerId};
use switchboard::mailbox::Mailbox;
use switchboard::outq::{OutLimits, OutQueue, MAX_IOV_PER_WRITE};
use switchboard::proto::frame::{decode, Frame, FrameType};
use switchboard::wheel::Wheel;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A fixed "now" for the JWT checks (2027-01-15), far from any expiry.
const NOW_UNIX_S: u64 = 1_800_000_000;

fn limits() -> LimitsConfig {
    LimitsConfig::default()
}

// ---- codec ---------------------------------------------------------------------

// Question: what does the codec cost per frame on the two hot paths, encoding
// a delivery (PUSH, ROOM_MSG) and decoding what clients send (SEND, LOGIN)?
// Is encoding into a reused buffer worth it over `to_bytes`' fresh allocation?
// Why these sizes: 64 B is a typical chat/notification payload, where the
// per-frame fixed cost dominates; 1 KiB shows the copy starting to matter. The
// batch of 64 back-to-back 64 B SENDs (78 B each, 4,992 B) is what one read
// from a pipelining client can hold: it measures the decode loop's per-byte
// rate, walking frame boundaries as the worker does. LOGIN carries a
// real minted JWT (~150 B), as every connection sends once.
fn codec(c: &mut Criterion) {
    let max = limits().max_frame_bytes;
    let p64 = [0xabu8; 64];
    let p1k = [0xcdu8; 1024];
    let push64 = Frame::Push { msg_id: 0x0102_0304_0506_0708, from: "alice", payload: &p64 };
    let push1k = Frame::Push { msg_id: 0x0102_0304_0506_0708, from: "alice", payload: &p1k };
    let room = Frame::RoomMsg { msg_id: 0x0102_0304_0506_0708, room: "lobby", from: "alice", payload: &p64 };
    let token = JwtHs256::new("bench-secret-of-32-bytes-length!").mint("alice", NOW_UNIX_S + 3600);
    let login = Frame::Login { user: "alice", token: token.as_bytes(), device: None, last_seq: 0 };

    let mut g = c.benchmark_group("codec");
    let mut buf = BytesMut::with_capacity(4096);
    for (name, f) in [("push_64", &push64), ("push_1k", &push1k), ("room_msg_64", &room)] {
        let bytes = f.to_bytes().unwrap();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("encode_reused/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                black_box(f).encode(&mut buf).unwrap();
                black_box(buf.len())
            })
        });
        g.bench_function(format!("to_bytes/{name}"), |b| b.iter(|| black_box(f).to_bytes().unwrap()));
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| {
                let (frame, n) = decode(black_box(&bytes), max).unwrap().unwrap();
                black_box(frame);
                n
            })
        });
    }

    let login_bytes = login.to_bytes().unwrap();
    g.throughput(Throughput::Bytes(login_bytes.len() as u64));
    g.bench_function("decode/login_jwt", |b| {
        b.iter(|| {
            let (frame, n) = decode(black_box(&login_bytes), max).unwrap().unwrap();
            black_box(frame);
            n
        })
    });

    let mut batch = BytesMut::new();
    for i in 0..64u32 {
        Frame::Send { req_id: i + 1, to: "bob", payload: &p64 }.encode(&mut batch).unwrap();
    }
    let batch = batch.freeze();
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("decode/64x_send_64", |b| {
        b.iter(|| {
            let mut rest: &[u8] = black_box(&batch);
            let mut frames = 0u32;
            while let Some((frame, n)) = decode(rest, max).unwrap() {
                black_box(frame);
                rest = &rest[n..];
                frames += 1;
            }
            assert_eq!(frames, 64);
            frames
        })
    });
    g.finish();
}

// ---- timing wheel --------------------------------------------------------------

// Question: what does the wheel cost per connection, to file a deadline and to
// hand out the ones that come due on a tick? The tick path is what every
// heartbeat interval pays once per connection.
// Why these sizes: 100,000 inserts is one worker's share of a large host
// (the wheel is per worker); the deadlines are scattered over the default
// heartbeat horizon (241 one-second ticks), so ~415 entries share a bucket as
// they would in steady state. 10,000 due on one tick is that worker's load if
// 2.4M connections' heartbeats were spread evenly over 240 s; the
// `advance_reinsert` variant adds what the worker does next with each entry
// (file it again one heartbeat ahead, into a bucket that `advance` emptied).
fn wheel(c: &mut Criterion) {
    let hb = Config::default().timeouts_in_ticks().heartbeat;
    let mut g = c.benchmark_group("wheel");

    const INSERTS: u32 = 100_000;
    g.throughput(Throughput::Elements(INSERTS as u64));
    g.bench_function("insert_100k_spread", |b| {
        b.iter_batched(
            || Wheel::new(0),
            |mut w| {
                for i in 0..INSERTS {
                    // Scatter over the horizon in no particular order.
                    let at = 1 + i.wrapping_mul(2_654_435_761) % hb;
                    w.insert(at, i, 1);
                }
                w
            },
            BatchSize::LargeInput,
        )
    });

    const DUE: u32 = 10_000;
    let due_wheel = || {
        let mut w = Wheel::new(0);
        for i in 0..DUE {
            w.insert(1, i, 1);
        }
        // Some later entries, so the wheel is not otherwise empty.
        for i in 0..DUE {
            w.insert(2 + i % (hb - 1), DUE + i, 1);
        }
        // The caller's `due` keeps the capacity of the last tick's drain.
        (w, Vec::with_capacity(DUE as usize))
    };
    g.throughput(Throughput::Elements(DUE as u64));
    g.bench_function("advance_1_tick_10k_due", |b| {
        b.iter_batched(
            due_wheel,
            |(mut w, mut due)| {
                w.advance(1, &mut due);
                assert_eq!(due.len(), DUE as usize);
                (w, due)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("advance_reinsert_10k_due", |b| {
        b.iter_batched(
            due_wheel,
            |(mut w, mut due)| {
                w.advance(1, &mut due);
                for e in due.drain(..) {
                    w.insert(1 + hb, e.slot, e.generation);
                }
                (w, due)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

// ---- mailbox -------------------------------------------------------------------

// Question: what does handing one command to a worker cost? Single-threaded,
// the floor: push + pop with a wake already pending (one atomic swap, no
// syscall), and the same with the worker re-armed each time (an eventfd write
// by the producer and a read by the worker: the idle-worker case). Across two
// threads, the sustained rate one producer can feed one worker.
// Why these sizes: capacity is the default `mailbox_capacity` (65,536); 1M u64
// commands is ~15 queue-fulls, long enough (tens of ms) that thread start-up
// is noise, and two threads because the machine has two cores. `busy` spins
// on pop (pure queue throughput); `eventfd` follows the worker's protocol:
// re-arm, drain, and block in poll(2) on the eventfd when empty.
fn mailbox(c: &mut Criterion) {
    let cap = limits().mailbox_capacity;
    let mut g = c.benchmark_group("mailbox");

    let m = Mailbox::<u64>::new(cap).unwrap();
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_pop", |b| {
        b.iter(|| {
            m.push(black_box(7)).unwrap();
            m.pop()
        })
    });
    g.bench_function("push_pop_with_wake", |b| {
        b.iter(|| {
            m.begin_drain(true);
            m.push(black_box(7)).unwrap();
            m.pop()
        })
    });

    const N: u64 = 1_000_000;
    g.sample_size(10);
    g.throughput(Throughput::Elements(N));
    for blocking in [false, true] {
        let name = if blocking { "spsc_1m_eventfd" } else { "spsc_1m_busy" };
        g.bench_function(name, |b| b.iter_custom(|iters| spsc_run(cap, N, blocking, iters)));
    }
    g.finish();
}

fn spsc_run(cap: usize, n: u64, blocking: bool, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let m = Mailbox::<u64>::new(cap).unwrap();
        let go = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                for v in 0..n {
                    while m.push(v).is_err() {
                        std::hint::spin_loop();
                    }
                }
            });
            let start = Instant::now();
            go.store(true, Ordering::Release);
            let (mut got, mut sum) = (0u64, 0u64);
            while got < n {
                if blocking {
                    let mut pfd = libc::pollfd { fd: m.eventfd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd on the stack.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                    m.begin_drain(true);
                }
                while let Some(v) = m.pop() {
                    sum = sum.wrapping_add(v);
                    got += 1;
                }
            }
            total += start.elapsed();
            assert_eq!(sum, n * (n - 1) / 2);
        });
    }
    total
}

// ---- directory -----------------------------------------------------------------

// Question: what does a push to a user pay to find that user's connections
// (hit), to learn the user is offline (miss), and what does a login + logout
// pay to update the directory?
// Why these sizes: 100,000 registered users makes the table (~3.2 MB of
// entries plus the names) bigger than this machine's L2 (1 MiB per core) though
// not its L3, so the cycling lookups pay the cache misses a push to a random
// user pays on a host of that size; `hit_hot` repeats one
// user for the in-cache floor. Names are looked up in a shuffled order so the
// hardware prefetcher cannot follow them.
fn directory(c: &mut Criterion) {
    const USERS: u32 = 100_000;
    let d = Directory::with_capacity(limits().max_conns_per_user, USERS as usize);
    let mut names: Vec<String> = (0..USERS).map(|i| format!("user{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        d.register(name, ConnId::new(WorkerId((i % 2) as u8), i as u32, 1)).unwrap();
    }
    // Fisher-Yates with a fixed xorshift, so runs compare.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..names.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        names.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let absent: Vec<String> = (0..USERS).map(|i| format!("nobody{i}")).collect();

    let mut g = c.benchmark_group("directory");
    g.throughput(Throughput::Elements(1));
    let mut out = ConnList::new();
    let cycle = |list: &[String], i: &mut usize| -> usize {
        *i += 1;
        if *i == list.len() {
            *i = 0;
        }
        *i
    };
    let mut i = 0;
    g.bench_function("lookup_into/hit", |b| {
        b.iter(|| {
            let k = cycle(&names, &mut i);
            d.lookup_into(black_box(&names[k]), &mut out);
            debug_assert_eq!(out.len(), 1);
            out.len()
        })
    });
    g.bench_function("lookup_into/hit_hot", |b| {
        b.iter(|| {
            d.lookup_into(black_box("user4242"), &mut out);
            out.len()
        })
    });
    let mut i = 0;
    g.bench_function("lookup_into/miss", |b| {
        b.iter(|| {
            let k = cycle(&absent, &mut i);
            d.lookup_into(black_box(&absent[k]), &mut out);
            out.len()
        })
    });
    let mut i = 0;
    g.bench_function("is_online/hit", |b| {
        b.iter(|| {
            let k = cycle(&names, &mut i);
            d.is_online(black_box(&names[k]))
        })
    });
    let conn = ConnId::new(WorkerId(0), 123_456, 7);
    // With the sweep the server's `sb-directory` thread runs (here every
    // 1,024 logins, without its linger), so the queue of users gone offline
    // does not grow for the length of the run.
    let mut n = 0u32;
    g.bench_function("register_unregister", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            if n.is_multiple_of(1024) {
                d.sweep(0);
            }
            let name = d.register(black_box("newcomer"), conn).unwrap();
            let removed = d.unregister(black_box("newcomer"), conn);
            (name, removed)
        })
    });
    // The same hits while another core logs users in and out as fast as it
    // can (the two cores of the reference machine, one reading, one
    // writing): what a push pays on a server whose users come and go.
    // Every login takes a fresh slot (a removed user leaves a tombstone), so
    // the writer makes the table fill and be rebuilt over and over during
    // the measurement; a directory that kept its old tables (issue 9) shows
    // here as hits that get slower the longer the run.
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if n.is_multiple_of(1000) {
                    d.sweep(0);
                }
                let user = format!("churner{}", n % 200_000);
                let conn = ConnId::new(WorkerId(1), n % 50_000, 1);
                let name = d.register(&user, conn).unwrap();
                d.unregister(&name, conn);
                n = n.wrapping_add(1);
            }
        });
        let mut i = 0;
        g.bench_function("lookup_into/hit_during_login_churn", |b| {
            b.iter(|| {
                let k = cycle(&names, &mut i);
                d.lookup_into(black_box(&names[k]), &mut out);
                out.len()
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    g.finish();
}

// ---- JWT -----------------------------------------------------------------------

// Question: what does the built-in HS256 check cost per LOGIN? It runs on the
// worker thread between two socket reads, so it bounds the login rate of a
// reconnect storm per core.
// Why this size: a token as `mint` makes it (sub + exp, ~150 B), the shape
// Centrifugo/EMQX-style backends issue; the secret is 32 bytes.
fn jwt(c: &mut Criterion) {
    let j = JwtHs256::new("bench-secret-of-32-bytes-length!");
    let token = j.mint("alice", NOW_UNIX_S + 3600);
    assert_eq!(j.verify(token.as_bytes(), NOW_UNIX_S).unwrap(), "alice");
    let mut g = c.benchmark_group("jwt");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify", |b| b.iter(|| j.verify(black_box(token.as_bytes()), NOW_UNIX_S).unwrap()));
    g.finish();
}

// ---- outbound queue ------------------------------------------------------------

// Question: what does a delivery cost in the outbound queue when the socket
// would block, i.e. the frame is queued and later written from the queue
// with a vectored write (queue push, iovec fill, advance past what was
// written)? Compared with a queue that already holds a backlog, this shows
// what the empty-queue representation (no allocation while idle) costs.
// Why these sizes: a 64 B PUSH, the common delivery; limits are the
// defaults (1024 frames / 256 KiB). The backlog of 16 frames is a slow
// reader a few messages behind, well under the limits.
fn outq(c: &mut Criterion) {
    let l = limits();
    let limits = OutLimits { max_frames: l.outbound_max_frames, max_bytes: l.outbound_max_bytes };
    let frame: Bytes = Frame::Push { msg_id: 1, from: "", payload: &[0x5a; 64] }.to_bytes().unwrap();
    let len = frame.len();
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV_PER_WRITE];

    let mut g = c.benchmark_group("outq");
    g.throughput(Throughput::Elements(1));
    let mut q = OutQueue::default();
    g.bench_function("push_fill_advance/empty", |b| {
        b.iter(|| {
            q.push(black_box(&frame).clone(), FrameType::Push as u8, &limits).unwrap();
            let n = q.fill_iovecs(&mut iov);
            q.advance(black_box(len));
            n
        })
    });
    assert!(q.is_empty());

    let mut q = OutQueue::default();
    for _ in 0..16 {
        q.push(frame.clone(), FrameType::Push as u8, &limits).unwrap();
    }
    g.bench_function("push_fill_advance/backlog_16", |b| {
        b.iter(|| {
            q.push(black_box(&frame).clone(), FrameType::Push as u8, &limits).unwrap();
            let n = q.fill_iovecs(&mut iov);
            q.advance(black_box(len));
            n
        })
    });
    assert_eq!(q.frames(), 16);
    g.finish();
}

// ---- system call ---------------------------------------------------------------

// Question: what does the bare round trip into the kernel and back cost on
// this host (`getppid`, which does no work)? Every send, recv and epoll_wait
// pays it on top of its own work, so it bounds what submitting many of them
// in one io_uring_enter can save: against the ~15 µs of kernel time of one
// 64-byte loopback TCP send measured by the fan-out bench's send ceiling,
// it is the whole of the possible saving per send.
fn syscall(c: &mut Criterion) {
    let mut g = c.benchmark_group("syscall");
    g.throughput(Throughput::Elements(1));
    // SAFETY: getppid takes no arguments and cannot fail.
    g.bench_function("getppid_round_trip", |b| b.iter(|| unsafe { libc::syscall(libc::SYS_getppid) }));
    g.finish();
}

criterion_group!(benches, codec, wheel, mailbox, directory, jwt, outq, syscall);
criterion_main!(benches);
