//! A worker's provided buffer ring: the memory multishot receives land in.
//!
//! Owns: one anonymous mapping of `count` buffers of `size` bytes, the ring
//! of buffer descriptors the kernel takes them from (registered on the
//! worker's poller ring as buffer group [`GROUP`]), and the bookkeeping of
//! which buffer is ours and how much of it the kernel has filled.
//! Must not: hand a buffer back to the kernel while a slice of it is in use
//! (the worker feeds a buffer's bytes to one connection, then calls
//! [`BufRing::done`]), or keep a buffer across I/O-loop turns.
//!
//! Why a shared ring instead of a buffer per connection: the kernel picks a
//! buffer only when bytes arrive, so an idle connection pins none (a
//! receive armed with its own buffer would hold 4 KiB per connection, 4 GiB
//! for a million). The buffers are touched once at start (`MAP_POPULATE`):
//! their memory is a fixed per-worker cost, visible from the first moment,
//! rather than pages that fault in under the first burst and then look like
//! memory per connection.
//!
//! Incremental consumption (`IOU_PBUF_RING_INC`, Linux 6.12): the kernel
//! fills a buffer from where the last receive stopped, across connections,
//! and flags each completion whose buffer it will go on filling
//! (`IORING_CQE_F_BUF_MORE`). Small messages (PINGs, acks, chat lines) then
//! share a buffer instead of taking a whole one each, so a burst of N small
//! messages between two loop turns needs N × their size, not N buffers.
//! On a kernel without it, registration falls back to whole buffers per
//! completion and the same code runs (the flag is never set).

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

/// Buffer group id of the ring on its worker's poller ring (one per ring).
pub const GROUP: u16 = 0;

/// `io_uring_register` opcode registering a provided buffer ring.
const REGISTER_PBUF_RING: libc::c_uint = 22;
/// `io_uring_register` opcode unregistering it.
const UNREGISTER_PBUF_RING: libc::c_uint = 23;
/// Registration flag: incremental consumption (Linux 6.12).
const PBUF_RING_INC: u16 = 2;
/// Completion flag: a buffer was selected (its id in the upper 16 bits).
const CQE_F_BUFFER: u32 = 1;
/// Completion flag: the kernel goes on filling this buffer (incremental).
const CQE_F_BUF_MORE: u32 = 1 << 4;

/// `struct io_uring_buf_reg`.
#[repr(C)]
struct BufReg {
    ring_addr: u64,
    ring_entries: u32,
    bgid: u16,
    flags: u16,
    resv: [u64; 3],
}

/// `struct io_uring_buf`: one descriptor in the ring. The first entry's
/// `resv` field is the ring's tail.
#[repr(C)]
struct BufDesc {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// An anonymous, page-aligned mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize, populate: bool) -> io::Result<Mapping> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr as *mut u8, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// See the module doc.
pub struct BufRing {
    /// The poller ring it is registered on (to unregister it on drop).
    ring_fd: RawFd,
    descs: Mapping,
    mem: Mapping,
    count: u16,
    size: u32,
    /// Our copy of the tail: descriptors published so far.
    tail: Cell<u16>,
    /// Bytes of each buffer the kernel filled so far (incremental mode).
    filled: Box<[Cell<u32>]>,
    incremental: bool,
}

fn register(ring_fd: RawFd, reg: &BufReg, opcode: libc::c_uint) -> io::Result<()> {
    // SAFETY: io_uring_register with a live, correctly laid out argument.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_register, ring_fd, opcode, reg as *const BufReg, 1) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl BufRing {
    /// Maps `count` buffers (a power of two, at most 32,768) of `size`
    /// bytes and registers them on the io_uring `ring_fd`, incrementally
    /// consumed where the kernel can.
    pub fn new(ring_fd: RawFd, count: u16, size: u32) -> io::Result<BufRing> {
        assert!(count.is_power_of_two() && count <= 1 << 15, "ring entries: a power of two up to 32768");
        let descs = Mapping::new(count as usize * std::mem::size_of::<BufDesc>(), false)?;
        let mem = Mapping::new(count as usize * size as usize, true)?;
        let mut reg = BufReg {
            ring_addr: descs.ptr as u64,
            ring_entries: count as u32,
            bgid: GROUP,
            flags: PBUF_RING_INC,
            resv: [0; 3],
        };
        let incremental = match register(ring_fd, &reg, REGISTER_PBUF_RING) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                reg.flags = 0;
                register(ring_fd, &reg, REGISTER_PBUF_RING)?;
                false
            }
            Err(e) => return Err(e),
        };
        let ring = BufRing {
            ring_fd,
            descs,
            mem,
            count,
            size,
            tail: Cell::new(0),
            filled: (0..count).map(|_| Cell::new(0)).collect(),
            incremental,
        };
        for bid in 0..count {
            ring.put(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Whether the kernel consumes buffers incrementally.
    pub fn incremental(&self) -> bool {
        self.incremental
    }

    /// Bytes mapped for buffers.
    pub fn bytes(&self) -> usize {
        self.mem.len
    }

    fn desc(&self, i: u16) -> *mut BufDesc {
        // SAFETY: `i & (count - 1)` is within the mapping of `count` entries.
        unsafe { (self.descs.ptr as *mut BufDesc).add((i & (self.count - 1)) as usize) }
    }

    /// Appends buffer `bid`, whole, at our tail (published by `publish`).
    fn put(&self, bid: u16) {
        let t = self.tail.get();
        // SAFETY: the descriptor at our tail is not the kernel's: the kernel
        // reads only between its head and the published tail, and at most
        // `count` buffers are ever in the ring.
        unsafe {
            let d = self.desc(t);
            (*d).addr = self.mem.ptr.add(bid as usize * self.size as usize) as u64;
            (*d).len = self.size;
            (*d).bid = bid;
        }
        self.filled[bid as usize].set(0);
        self.tail.set(t.wrapping_add(1));
    }

    /// Makes the appended descriptors visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail overlays the first descriptor's `resv` field; the
        // kernel reads it with acquire semantics, we store with release.
        let tail = unsafe { &*(std::ptr::addr_of_mut!((*self.desc(0)).resv) as *const AtomicU16) };
        tail.store(self.tail.get(), Ordering::Release);
    }

    /// The `len` bytes a receive completion with `flags` delivered: the
    /// buffer's id and the bytes. `None`: the completion carries no buffer.
    ///
    /// # Safety
    /// `flags` and `len` are those of one completion of a receive on this
    /// ring, taken once; the slice must not be used after the matching
    /// [`BufRing::done`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn take(&self, flags: u32, len: usize) -> Option<(u16, &mut [u8])> {
        if flags & CQE_F_BUFFER == 0 {
            return None;
        }
        let bid = (flags >> 16) as u16;
        if bid >= self.count {
            return None;
        }
        let at = self.filled[bid as usize].get() as usize;
        debug_assert!(at + len <= self.size as usize, "a completion stays within its buffer");
        let start = self.mem.ptr.add(bid as usize * self.size as usize + at);
        Some((bid, std::slice::from_raw_parts_mut(start, len.min(self.size as usize - at))))
    }

    /// The bytes of buffer `bid` from the completion with `flags` and `len`
    /// were used: the buffer goes back to the kernel unless the kernel goes
    /// on filling it.
    pub fn done(&self, bid: u16, flags: u32, len: usize) {
        if flags & CQE_F_BUF_MORE != 0 {
            let f = &self.filled[bid as usize];
            f.set(f.get() + len as u32);
            return;
        }
        self.put(bid);
        self.publish();
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // Every receive on the ring was cancelled by then (a worker stops
        // after its last connection), and the worker drops its last handle
        // to this ring before its poller: unregister, then unmap.
        let reg = BufReg { ring_addr: 0, ring_entries: 0, bgid: GROUP, flags: 0, resv: [0; 3] };
        let _ = register(self.ring_fd, &reg, UNREGISTER_PBUF_RING);
    }
}
