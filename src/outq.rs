//! A connection's bounded outbound queue of encoded frames.
//!
//! Owns: frames waiting to be written to one socket, the byte count, the
//! limits check, and turning the backlog into one vectored write.
//! Must not: copy a payload (frames are `Bytes`, shared with every other
//! connection they go to), grow past its limits, or hold memory while empty:
//! an idle connection's queue is an empty `VecDeque`, no allocation.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Frames handed to one `sendmsg`: the kernel's IOV_MAX is 1024; 64 frames
/// of a backlog per syscall already amortise it well and keep the iovec
/// array on the stack.
pub const MAX_IOV_PER_WRITE: usize = 64;

/// The queue passed a limit; the connection is a slow consumer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Overflow;

/// Limits on one connection's queue.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OutLimits {
    pub max_frames: usize,
    pub max_bytes: usize,
}

/// Frames queued for one connection: one pointer while empty (the state
/// of every idle connection), a boxed ring while frames wait.
#[derive(Default)]
pub struct OutQueue {
    inner: Option<Box<Inner>>,
}

struct Inner {
    frames: VecDeque<Bytes>,
    bytes: u32,
    /// The head frame was partly written: it must be finished (or the
    /// stream abandoned) to keep the peer's framing intact.
    head_partial: bool,
}

const _: () = assert!(std::mem::size_of::<OutQueue>() == 8);

impl OutQueue {
    fn inner_mut(&mut self) -> &mut Inner {
        self.inner.get_or_insert_with(|| {
            Box::new(Inner { frames: VecDeque::with_capacity(4), bytes: 0, head_partial: false })
        })
    }

    /// Queues a frame; refuses (without queuing) past either limit.
    pub fn push(&mut self, frame: Bytes, limits: &OutLimits) -> Result<(), Overflow> {
        if self.frames() >= limits.max_frames || self.bytes() + frame.len() > limits.max_bytes {
            return Err(Overflow);
        }
        let i = self.inner_mut();
        i.bytes += frame.len() as u32;
        i.frames.push_back(frame);
        Ok(())
    }

    /// Queues a frame regardless of the limits: for the one CLOSE or
    /// LOGIN_ERROR that ends a connection.
    pub fn push_final(&mut self, frame: Bytes) {
        let i = self.inner_mut();
        i.bytes = i.bytes.saturating_add(frame.len() as u32);
        i.frames.push_back(frame);
    }

    /// Drops every frame not yet started, keeping a partly written head so
    /// the peer still sees whole frames (a slow consumer's backlog).
    pub fn discard_unsent(&mut self) {
        let Some(i) = self.inner.as_mut() else { return };
        if !i.head_partial {
            self.clear();
            return;
        }
        i.frames.truncate(1);
        i.bytes = i.frames.front().map_or(0, |f| f.len() as u32);
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// Frames queued.
    pub fn frames(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.frames.len())
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.bytes as usize)
    }

    /// Fills `iov` with the head of the queue; returns how many were filled.
    pub fn fill_iovecs(&self, iov: &mut [libc::iovec; MAX_IOV_PER_WRITE]) -> usize {
        let Some(i) = self.inner.as_ref() else { return 0 };
        let mut n = 0;
        for (slot, f) in iov.iter_mut().zip(i.frames.iter()) {
            *slot = libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() };
            n += 1;
        }
        n
    }

    /// Drops `written` bytes from the head (whole frames, then part of one).
    pub fn advance(&mut self, mut written: usize) {
        let Some(i) = self.inner.as_mut() else {
            debug_assert_eq!(written, 0, "advance on an empty queue");
            return;
        };
        debug_assert!(written <= i.bytes as usize);
        i.bytes -= written as u32;
        while written > 0 {
            let head = i.frames.front_mut().expect("advance past the queued bytes");
            if head.len() <= written {
                written -= head.len();
                i.frames.pop_front();
                i.head_partial = false;
            } else {
                head.advance(written);
                i.head_partial = true;
                written = 0;
            }
        }
        if i.frames.is_empty() {
            // Give the memory back: an idle connection holds no queue.
            self.inner = None;
        }
    }

    /// Drops everything queued (the connection is closing).
    pub fn clear(&mut self) {
        self.inner = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: OutLimits = OutLimits { max_frames: 3, max_bytes: 10 };

    #[test]
    fn limits_refuse_without_queuing() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"aaaa"), &L).unwrap();
        q.push(Bytes::from_static(b"bbbb"), &L).unwrap();
        assert_eq!(q.push(Bytes::from_static(b"ccc"), &L), Err(Overflow), "11 bytes > 10");
        q.push(Bytes::from_static(b"cc"), &L).unwrap();
        assert_eq!(q.push(Bytes::from_static(b""), &L), Err(Overflow), "4 frames > 3");
        assert_eq!((q.frames(), q.bytes()), (3, 10));
    }

    #[test]
    fn partial_writes_advance_inside_a_frame() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"hello"), &L).unwrap();
        q.push(Bytes::from_static(b"world"), &L).unwrap();
        q.advance(7);
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV_PER_WRITE];
        assert_eq!(q.fill_iovecs(&mut iov), 1);
        let s = unsafe { std::slice::from_raw_parts(iov[0].iov_base as *const u8, iov[0].iov_len) };
        assert_eq!(s, b"rld");
        q.advance(3);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn discard_keeps_a_partly_written_head() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"), &L).unwrap();
        q.push(Bytes::from_static(b"def"), &L).unwrap();
        q.discard_unsent();
        assert!(q.is_empty(), "nothing started: everything goes");
        q.push(Bytes::from_static(b"abc"), &L).unwrap();
        q.push(Bytes::from_static(b"def"), &L).unwrap();
        q.advance(1);
        q.discard_unsent();
        assert_eq!((q.frames(), q.bytes()), (1, 2), "the rest of `abc` stays");
        q.push_final(Bytes::from_static(b"close"));
        assert_eq!(q.frames(), 2);
    }
}
