//! An intrusive lock-free list of element indices ("requests"): any thread
//! lists an element that needs its owner's attention, the owner takes the
//! whole list at once.
//!
//! Owns: the list head, each element's link and the ordering that makes a
//! lister's writes (made under the element's lock, before listing) visible
//! to the owner that takes the list. The list is a stack: listing CASes
//! the head; taking swaps the whole list out, so there is no pop and no
//! ABA (a head that went and came back is still the list's first element).
//! Each element is on the list at most once (its `listed` flag, under its
//! lock), so the list needs no memory of its own: one `u32` link per
//! element.
//! Must not: list an element twice, lose a listing, or wake anyone (the
//! caller wakes the owner when `request` returns true).
//!
//! Encoding: links and the head hold `index + 1`, 0 is the end of the list,
//! so an all-zero list and all-zero links are empty and unlisted.

use std::sync::atomic::Ordering;

use super::facade::AtomicU32;

/// The end of the list (links hold `index + 1`).
const NIL: u32 = 0;

/// One element's link (all-zero: not on the list).
pub(crate) struct Link {
    next: AtomicU32,
}

impl Link {
    // The server's links are allocated zeroed with their slots; the loom
    // models build them one by one.
    #[allow(dead_code)]
    pub(crate) fn new() -> Link {
        Link { next: AtomicU32::new(NIL) }
    }
}

/// The head of a request list (all-zero: empty).
pub(crate) struct RequestList {
    head: AtomicU32,
}

impl RequestList {
    pub(crate) fn new() -> RequestList {
        RequestList { head: AtomicU32::new(NIL) }
    }

    /// Lists element `i`, whose link is `link`, unless `listed` says it is
    /// already listed; sets `listed`. The caller holds the element's lock,
    /// which guards `listed` (and what the owner is asked to do); the owner
    /// clears `listed` under that lock after taking the element. Returns
    /// whether the element was listed now (the caller then wakes the
    /// owner).
    pub(crate) fn request(&self, i: u32, link: &Link, listed: &mut bool) -> bool {
        if *listed {
            return false;
        }
        debug_assert!(i < u32::MAX, "element index {i} has no encoding");
        *listed = true;
        let me = i + 1;
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            link.next.store(head, Ordering::Relaxed);
            match self.head.compare_exchange_weak(head, me, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(h) => head = h,
            }
        }
    }

    /// Owner side: appends every listed element to `out` (most recent
    /// first) and empties the list; `link(i)` is element `i`'s link.
    pub(crate) fn take<'a>(&self, out: &mut Vec<u32>, link: impl Fn(u32) -> &'a Link) {
        let mut e = self.head.swap(NIL, Ordering::Acquire);
        while e != NIL {
            out.push(e - 1);
            e = link(e - 1).next.load(Ordering::Relaxed);
        }
    }
}
