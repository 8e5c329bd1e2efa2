//! Journal writeback for [`super::DiskStore`] with [`super::Durability::Os`]:
//! a small thread that asks the kernel, every [`INTERVAL`], to start
//! writing the journal's dirty pages to disk.
//!
//! Why: with `os` durability nothing syncs the journal file, so the kernel
//! keeps everything appended since the last flush as dirty page cache
//! (it starts writeback on its own only after 30 s or at 10% of RAM). But
//! every memtable flush in fjall first `fsync`s the whole journal while it
//! holds the journal's lock, the lock every write takes: that fsync then
//! writes tens of megabytes, and every append waits for it. Under reliable
//! unicast at 30,000 msgs/s with `os` (4,000 device connections, 2
//! workers) the store thread stood still for 92 and 144 ms in 3 s, woken
//! each time by the fjall worker leaving that fsync (scheduler trace,
//! `perf record -e sched:sched_switch -e sched:sched_wakeup -g -a`). With
//! the pages already on their way the fsync has little left to write.
//!
//! `sync_file_range(SYNC_FILE_RANGE_WRITE)` only starts the writeback: it
//! neither waits for it nor flushes the device's cache, so this promises
//! nothing more than `os` does (a power loss may still take the last
//! acknowledged messages) and costs no more disk writes than the flush's
//! fsync would have done anyway. It runs on its own thread because even
//! starting writeback can block while the device's queue is throttled.
//!
//! Owns: the thread, and a read-only descriptor of the newest journal file
//! (the highest `N.jnl` in the store directory, looked up each turn, as
//! fjall starts a new one from time to time).
//! Must not: write to the journal, or hold anything fjall locks.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::periodic::Periodic;

/// Time between two requests to start writeback: at 30,000 msgs/s about
/// 200 KB of journal each.
pub const INTERVAL: Duration = Duration::from_millis(25);

/// The running writeback thread; dropping it stops it (within a turn).
pub struct JournalWriteback {
    _thread: Periodic,
}

impl JournalWriteback {
    /// Starts the thread for the store in directory `dir`. `None` if the
    /// thread cannot be started (the store works without it, with the
    /// stalls above).
    pub fn start(dir: &Path) -> Option<Self> {
        let dir = dir.to_path_buf();
        let mut current: Option<(PathBuf, File)> = None;
        let thread = Periodic::start("switchboard-wb", INTERVAL, move || {
            let Some(newest) = newest_journal(&dir) else { return };
            if current.as_ref().is_none_or(|(p, _)| *p != newest) {
                current = File::open(&newest).ok().map(|f| (newest, f));
            }
            if let Some((_, f)) = &current {
                start_writeback(f);
            }
        })?;
        Some(JournalWriteback { _thread: thread })
    }
}

/// The journal file with the highest number in `dir`, if any.
pub(super) fn newest_journal(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let id: u64 = name.to_str()?.strip_suffix(".jnl")?.parse().ok()?;
            Some((id, dir.join(name)))
        })
        .max_by_key(|(id, _)| *id)
        .map(|(_, p)| p)
}

#[cfg(target_os = "linux")]
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor this thread owns; offset 0 and length 0
    // name the whole file; the call only starts writeback of its pages.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(f: &File) {
    let _ = f.sync_data();
}
