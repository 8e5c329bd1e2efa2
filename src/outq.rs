//! A connection's bounded outbound queue of encoded frames.
//!
//! Owns: frames waiting to be written to one socket, the byte count, the
//! limits check, and turning the backlog into one vectored write.
//! Must not: copy a payload (frames are `Bytes`, shared with every other
//! connection they go to), grow past its limits, or hold memory while empty:
//! an idle connection's queue is an empty `VecDeque`, no allocation.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

use crate::proto::frame::{Frame, FrameType};
use crate::proto::wire::Wire;

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
/// of every idle connection), a boxed ring while frames wait. All-zero is
/// the empty queue (`None`): write slots are allocated zeroed and rely on
/// it (runtime/write/slot.rs).
#[derive(Default)]
pub struct OutQueue {
    inner: Option<Box<Inner>>,
}

/// One queued frame, encoded for the connection's wire, with what the
/// drop policy needs to know about it without parsing it again.
struct Item {
    bytes: Bytes,
    /// The server frame type (`FrameType as u8`); 0 for bytes that are not
    /// a whole server frame (a handshake response, a WebSocket pong).
    kind: u8,
    /// SKIPPED notices: the count they carry, so a later drop merges in.
    count: u32,
}

struct Inner {
    frames: VecDeque<Item>,
    bytes: u32,
    /// The head frame was partly written: it must be finished (or the
    /// stream abandoned) to keep the peer's framing intact.
    head_partial: bool,
    /// The first `pinned` frames are being written by a batched send
    /// (`pin`): the kernel may be reading them, so nothing but `advance`
    /// removes them, and nothing goes in front of them.
    pinned: u8,
}

const _: () = assert!(std::mem::size_of::<OutQueue>() == 8);
const _: () = assert!(MAX_IOV_PER_WRITE <= u8::MAX as usize);

impl Inner {
    /// Frames at the front that must stay where they are: a partly
    /// written head, or what a batched send is writing.
    fn kept(&self) -> usize {
        usize::from(self.head_partial).max(usize::from(self.pinned))
    }
}

impl OutQueue {
    fn inner_mut(&mut self) -> &mut Inner {
        self.inner.get_or_insert_with(|| {
            Box::new(Inner { frames: VecDeque::with_capacity(4), bytes: 0, head_partial: false, pinned: 0 })
        })
    }

    /// Queues a frame of type `kind` (see `Item`); refuses (without
    /// queuing) past either limit. Empty frames are not queued.
    pub fn push(&mut self, frame: Bytes, kind: u8, limits: &OutLimits) -> Result<(), Overflow> {
        if !self.fits(frame.len(), limits) {
            return Err(Overflow);
        }
        if frame.is_empty() {
            return Ok(());
        }
        let i = self.inner_mut();
        i.bytes += frame.len() as u32;
        i.frames.push_back(Item { bytes: frame, kind, count: 0 });
        Ok(())
    }

    /// Whether a frame of `len` bytes fits under the limits.
    pub fn fits(&self, len: usize, limits: &OutLimits) -> bool {
        self.frames() < limits.max_frames && self.bytes() + len <= limits.max_bytes
    }

    /// Queues a frame regardless of the limits: for the one CLOSE or
    /// LOGIN_ERROR that ends a connection.
    pub fn push_final(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        let i = self.inner_mut();
        i.bytes = i.bytes.saturating_add(frame.len() as u32);
        i.frames.push_back(Item { bytes: frame, kind: 0, count: 0 });
    }

    /// Queues the unsent rest of a frame whose start was already written
    /// (the queue must be empty): it becomes a partly written head.
    pub fn push_started(&mut self, rest: Bytes) {
        debug_assert!(self.is_empty());
        let i = self.inner_mut();
        i.bytes = rest.len() as u32;
        i.frames.push_back(Item { bytes: rest, kind: 0, count: 0 });
        i.head_partial = true;
    }

    /// Puts `frame` in front of everything queued: the unsent part of a
    /// send that bypassed the queue (the owner's staged fan-out sends,
    /// `runtime/write`), which comes before what other writers queued
    /// meanwhile. Called last to first; `started`: its start was written,
    /// so it becomes a partly written head (only the first of them can
    /// be). Not checked against the limits: these frames were checked as
    /// an empty queue would have checked them when they were staged.
    pub fn push_front(&mut self, frame: Bytes, kind: u8, started: bool) {
        let i = self.inner_mut();
        debug_assert!(i.kept() == 0, "nothing goes in front of a started or pinned head");
        i.bytes = i.bytes.saturating_add(frame.len() as u32);
        i.frames.push_front(Item { bytes: frame, kind, count: 0 });
        i.head_partial = started;
    }

    /// Makes room for a frame of `incoming` bytes by dropping the oldest
    /// droppable frames (PUSH, ROOM_MSG; never a partly written head or a
    /// control frame). Returns how many were dropped, or `Overflow` (and
    /// drops nothing) if dropping every droppable frame would not be enough.
    pub fn drop_oldest_for(&mut self, incoming: usize, limits: &OutLimits) -> Result<u32, Overflow> {
        let Some(i) = self.inner.as_mut() else { return Err(Overflow) };
        let start = i.kept();
        let droppable = |f: &Item| FrameType::from_u8(f.kind).is_some_and(FrameType::is_droppable);
        // Plan first, so a refusal leaves the queue untouched.
        let (mut frames, mut bytes, mut plan) = (i.frames.len(), i.bytes as usize, 0usize);
        for f in i.frames.iter().skip(start) {
            if frames < limits.max_frames && bytes + incoming <= limits.max_bytes {
                break;
            }
            if droppable(f) {
                frames -= 1;
                bytes -= f.bytes.len();
                plan += 1;
            }
        }
        if frames >= limits.max_frames || bytes + incoming > limits.max_bytes {
            return Err(Overflow);
        }
        let mut dropped = 0;
        let mut k = start;
        while dropped < plan {
            if droppable(&i.frames[k]) {
                let f = i.frames.remove(k).expect("index in range");
                i.bytes -= f.bytes.len() as u32;
                dropped += 1;
            } else {
                k += 1;
            }
        }
        Ok(dropped as u32)
    }

    /// Records that `count` messages were dropped before the unsent frames:
    /// a SKIPPED frame (encoded for `wire`) at the front of them, merged
    /// with one already there.
    pub fn note_skipped(&mut self, count: u32, wire: Wire) {
        let i = self.inner_mut();
        let at = i.kept();
        let mut total = count;
        if let Some(f) = i.frames.get(at) {
            if f.kind == FrameType::Skipped as u8 {
                total = total.saturating_add(f.count);
                i.bytes -= f.bytes.len() as u32;
                i.frames.remove(at);
            }
        }
        let notice = wire.encode(&Frame::Skipped { count: total }.to_bytes().expect("fixed-size frame"));
        i.bytes += notice.len() as u32;
        i.frames.insert(at, Item { bytes: notice, kind: FrameType::Skipped as u8, count: total });
    }

    /// Drops every frame not yet started, keeping a partly written head so
    /// the peer still sees whole frames (a slow consumer's backlog).
    pub fn discard_unsent(&mut self) {
        let Some(i) = self.inner.as_mut() else { return };
        debug_assert_eq!(i.pinned, 0, "a batched send is reading the queue");
        if !i.head_partial {
            self.clear();
            return;
        }
        i.frames.truncate(1);
        i.bytes = i.frames.front().map_or(0, |f| f.bytes.len() as u32);
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
            *slot = libc::iovec { iov_base: f.bytes.as_ptr() as *mut libc::c_void, iov_len: f.bytes.len() };
            n += 1;
        }
        n
    }

    /// The first `n` frames (what `fill_iovecs` just offered) are handed
    /// to a send that runs without the slot's lock held (the owner's
    /// batched sends, `runtime/write`): until `unpin`, other writers may
    /// append behind them and drop droppable frames after them, but
    /// neither drop nor insert anything among them.
    pub fn pin(&mut self, n: usize) {
        let i = self.inner.as_mut().expect("pin on an empty queue");
        debug_assert!(n > 0 && n <= i.frames.len() && n <= MAX_IOV_PER_WRITE && i.pinned == 0);
        i.pinned = n as u8;
    }

    /// The send that `pin` covered has completed (`advance` by what it
    /// wrote follows).
    pub fn unpin(&mut self) {
        if let Some(i) = self.inner.as_mut() {
            i.pinned = 0;
        }
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
            let head = &mut i.frames.front_mut().expect("advance past the queued bytes").bytes;
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
        q.push(Bytes::from_static(b"aaaa"), 0, &L).unwrap();
        q.push(Bytes::from_static(b"bbbb"), 0, &L).unwrap();
        assert_eq!(q.push(Bytes::from_static(b"ccc"), 0, &L), Err(Overflow), "11 bytes > 10");
        q.push(Bytes::from_static(b"cc"), 0, &L).unwrap();
        assert_eq!(q.push(Bytes::from_static(b""), 0, &L), Err(Overflow), "4 frames > 3");
        assert_eq!((q.frames(), q.bytes()), (3, 10));
    }

    #[test]
    fn partial_writes_advance_inside_a_frame() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"hello"), 0, &L).unwrap();
        q.push(Bytes::from_static(b"world"), 0, &L).unwrap();
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
        q.push(Bytes::from_static(b"abc"), 0, &L).unwrap();
        q.push(Bytes::from_static(b"def"), 0, &L).unwrap();
        q.discard_unsent();
        assert!(q.is_empty(), "nothing started: everything goes");
        q.push(Bytes::from_static(b"abc"), 0, &L).unwrap();
        q.push(Bytes::from_static(b"def"), 0, &L).unwrap();
        q.advance(1);
        q.discard_unsent();
        assert_eq!((q.frames(), q.bytes()), (1, 2), "the rest of `abc` stays");
        q.push_final(Bytes::from_static(b"close"));
        assert_eq!(q.frames(), 2);
    }

    fn kind(f: &Bytes) -> u8 {
        crate::proto::wire::frame_type(f).map_or(0, |t| t as u8)
    }

    fn msg(n: u8) -> Bytes {
        Frame::RoomMsg { msg_id: n as u64, room: "r", from: "", payload: &[n] }.to_bytes().unwrap()
    }

    fn skipped_count(f: &Bytes) -> Option<u32> {
        match crate::proto::frame::decode(f, 1 << 20) {
            Ok(Some((Frame::Skipped { count }, _))) => Some(count),
            _ => None,
        }
    }

    #[test]
    fn drop_oldest_keeps_control_frames_and_notes_the_gap() {
        let l = OutLimits { max_frames: 4, max_bytes: 1 << 20 };
        let mut q = OutQueue::default();
        let ack = Frame::SendAck { req_id: 1, delivered: 1 }.to_bytes().unwrap();
        q.push(msg(1), kind(&msg(1)), &l).unwrap();
        q.push(ack.clone(), kind(&ack), &l).unwrap();
        q.push(msg(2), kind(&msg(2)), &l).unwrap();
        q.push(msg(3), kind(&msg(3)), &l).unwrap();
        assert_eq!(q.push(msg(4), kind(&msg(4)), &l), Err(Overflow));
        assert_eq!(q.drop_oldest_for(msg(4).len(), &l), Ok(1), "only msg 1 goes");
        q.push(msg(4), kind(&msg(4)), &l).unwrap();
        q.note_skipped(1, Wire::Raw);
        let frames: Vec<Bytes> = q.inner.as_ref().unwrap().frames.iter().map(|f| f.bytes.clone()).collect();
        assert_eq!(skipped_count(&frames[0]), Some(1));
        assert_eq!(&frames[1..], &[ack, msg(2), msg(3), msg(4)]);
        // A second drop merges into the same notice.
        let l = OutLimits { max_frames: 5, max_bytes: 1 << 20 };
        assert_eq!(q.drop_oldest_for(msg(5).len(), &l), Ok(1));
        q.push(msg(5), kind(&msg(5)), &l).unwrap();
        q.note_skipped(1, Wire::Raw);
        assert_eq!(skipped_count(&q.inner.as_ref().unwrap().frames[0].bytes), Some(2));
        assert_eq!(q.bytes(), q.inner.as_ref().unwrap().frames.iter().map(|f| f.bytes.len()).sum::<usize>());
    }

    #[test]
    fn drop_oldest_refuses_when_only_control_frames_remain() {
        let l = OutLimits { max_frames: 2, max_bytes: 1 << 20 };
        let mut q = OutQueue::default();
        let ack = Frame::SendAck { req_id: 1, delivered: 1 }.to_bytes().unwrap();
        q.push(ack.clone(), kind(&ack), &l).unwrap();
        q.push(ack.clone(), kind(&ack), &l).unwrap();
        assert_eq!(q.drop_oldest_for(10, &l), Err(Overflow));
        assert_eq!(q.frames(), 2, "nothing dropped on refusal");
    }

    #[test]
    fn frames_put_back_in_front_go_before_what_others_queued_and_stay_whole() {
        let l = OutLimits { max_frames: 8, max_bytes: 1 << 20 };
        let mut q = OutQueue::default();
        // Another writer queued msg 3 while a staged send of msg 1 and
        // msg 2 was out; the send wrote two bytes of msg 1.
        q.push(msg(3), kind(&msg(3)), &l).unwrap();
        q.push_front(msg(2), kind(&msg(2)), false);
        q.push_front(msg(1).slice(2..), kind(&msg(1)), true);
        let frames =
            |q: &OutQueue| -> Vec<Bytes> { q.inner.as_ref().unwrap().frames.iter().map(|f| f.bytes.clone()).collect() };
        assert_eq!(frames(&q), [msg(1).slice(2..), msg(2), msg(3)]);
        assert_eq!(q.bytes(), msg(1).len() - 2 + msg(2).len() + msg(3).len());
        // The started head is never dropped; msg 2 is an unsent message
        // like any other.
        let l = OutLimits { max_frames: 3, max_bytes: 1 << 20 };
        assert_eq!(q.drop_oldest_for(msg(4).len(), &l), Ok(1));
        assert_eq!(frames(&q), [msg(1).slice(2..), msg(3)]);
        q.advance(msg(1).len() - 2 + msg(3).len());
        assert!(q.is_empty());
    }

    #[test]
    fn frames_pinned_by_a_batched_send_are_neither_dropped_nor_jumped() {
        let l = OutLimits { max_frames: 4, max_bytes: 1 << 20 };
        let mut q = OutQueue::default();
        for n in 1..=3 {
            q.push(msg(n), kind(&msg(n)), &l).unwrap();
        }
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV_PER_WRITE];
        assert_eq!(q.fill_iovecs(&mut iov), 3);
        q.pin(2);
        // Another writer, meanwhile: the queue is full, and only msg 3 is
        // not being sent.
        q.push(msg(4), kind(&msg(4)), &l).unwrap();
        assert_eq!(q.drop_oldest_for(msg(5).len(), &l), Ok(1));
        q.push(msg(5), kind(&msg(5)), &l).unwrap();
        q.note_skipped(1, Wire::Raw);
        let frames =
            |q: &OutQueue| -> Vec<Bytes> { q.inner.as_ref().unwrap().frames.iter().map(|f| f.bytes.clone()).collect() };
        let now = frames(&q);
        assert_eq!(&now[..2], &[msg(1), msg(2)], "the pinned frames stay first");
        assert_eq!(skipped_count(&now[2]), Some(1), "the notice goes behind them");
        assert_eq!(&now[3..], &[msg(4), msg(5)]);
        // The send wrote the first frame and part of the second.
        q.unpin();
        q.advance(msg(1).len() + 2);
        assert_eq!(q.frames(), 4);
        assert_eq!(q.drop_oldest_for(msg(6).len(), &l), Ok(1), "msg 4 goes; the started msg 2 stays");
        assert_eq!(frames(&q)[0], msg(2).slice(2..));
    }
}
