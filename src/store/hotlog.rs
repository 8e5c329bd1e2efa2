//! The hot log of [`super::DiskStore`]: the write-ahead log of the
//! messages appended in the last two epochs, before they are either
//! dropped (every device acknowledged them) or written into fjall.
//!
//! Why: with every message inserted into fjall's `msgs` memtable at once,
//! the store thread spent about 40% of its time finding where each insert
//! goes in a skiplist of a write buffer's worth of random keys (cache
//! misses, `perf`), and every message was written to disk again at the
//! flush and at each compaction, although almost every message of a
//! connected device is acknowledged within a second and dropped at the
//! next retention pass. Appending it to a file and keeping it in RAM for
//! two epochs lets the acknowledged ones go without ever reaching fjall.
//! Measured in `disk.rs`'s module doc.
//!
//! Owns: the directory `hot/` inside the store's directory, with one file
//! per epoch, `hot-<generation as 16 hex digits>.log`: the current one,
//! appended to, and the one before it, deleted once its messages are
//! dropped or in fjall (and fjall persisted). A file is a sequence of
//! records, each `len: u32 LE` (of the body), `crc32: u32 LE` (of the
//! body), then the body, whose first byte says what it is (integers
//! big-endian, `str8` = a length byte and the bytes):
//! - `0 | seq u64 | msg_id u64 | ts_ms u64 | appended_ms u64 |
//!   client_id u64 | to str8 | from str8 | payload`: a message;
//! - `2 | seq u64 | msg_id u64 | ts_ms u64 | appended_ms u64 |
//!   client_id u64 | expires_ms u64 | to str8 | from str8 | payload`: a
//!   message with an expiry of its own (a build from before expiries
//!   refuses a file that holds one, as damaged: section "Expiry" of
//!   docs/DEPLOY.md);
//! - `1 | head u64 | to str8 | n u8 | n × (device str8 | position u64 |
//!   last_seen_ms u64)`: user `to`'s messages up to `head` were all
//!   resolved (dropped or in fjall), and these devices of its are at
//!   least at these positions, although its record in fjall may say less:
//!   written when a store turn moves the user's devices, and again at the
//!   start of an epoch's file until the user's record is written (unless
//!   the file just ended has it as it is; a user idle a whole epoch since
//!   it was logged gets its record written instead, a slice at each sync),
//!   so that neither the moves nor
//!   the heads of messages dropped with them need a write to fjall, and
//!   deleting a file takes neither back. Each lists all of the user's
//!   devices, so an open applies a user's last one only (a forget logs
//!   one without the device forgotten, so that a move of it logged before
//!   does not come back). (Files
//!   of builds before the positions came here end the record after `to`:
//!   read as no devices.)
//!
//! Must not: hold anything but this epoch's and the previous epoch's
//! messages (RAM and disk are bounded by [`EPOCH_BYTES`] a file).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::disk::{put_devices, take_devices};
use super::{DeviceState, StoreError};

/// A message is resolved (dropped, or written into fjall) by an append
/// this many milliseconds of the store's clock (the `now_ms` of appends)
/// after its own, or later, so a device connected and acknowledging as
/// PROTOCOL.md 15.4 says (within 100 ms, recorded at the next tick, 1 s)
/// has acknowledged it by then. An epoch, and so a file, lasts at least as
/// long: it ends once the epoch before has no message left to resolve, or
/// at [`EPOCH_BYTES`].
pub const EPOCH_MS: u64 = 2_000;

/// An epoch ends once its file holds this many bytes.
pub const EPOCH_BYTES: u64 = 64 << 20;

/// A record's header: length and checksum.
const HEADER: usize = 8;

/// One message in the hot log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub seq: u64,
    pub msg_id: u64,
    pub ts_ms: u64,
    /// The store's clock at the append (the dedup entry's time).
    pub appended_ms: u64,
    pub client_id: u64,
    /// 0: none.
    pub expires_ms: u64,
    pub to: String,
    pub from: String,
    pub payload: Vec<u8>,
}

/// One message to log, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct LogEntry<'a> {
    pub seq: u64,
    pub msg_id: u64,
    pub ts_ms: u64,
    pub appended_ms: u64,
    pub client_id: u64,
    /// 0: none.
    pub expires_ms: u64,
    pub to: &'a str,
    pub from: &'a str,
    pub payload: &'a [u8],
}

impl Logged {
    #[cfg(test)]
    pub fn entry(&self) -> LogEntry<'_> {
        LogEntry {
            seq: self.seq,
            msg_id: self.msg_id,
            ts_ms: self.ts_ms,
            appended_ms: self.appended_ms,
            client_id: self.client_id,
            expires_ms: self.expires_ms,
            to: &self.to,
            from: &self.from,
            payload: &self.payload,
        }
    }
}

/// What a file holds, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovered {
    Message(Logged),
    /// The user's messages up to `head` were resolved, and these of its
    /// devices are at least at these positions (and seen then).
    Head {
        to: String,
        head: u64,
        devices: Vec<DeviceState>,
    },
}

const MESSAGE: u8 = 0;
const HEAD: u8 = 1;
const MESSAGE_EXPIRING: u8 = 2;

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("hot log: cannot {what} {}: {e}", path.display()))
}

/// The log's files: the current epoch's, appended to, and the previous
/// epoch's until [`HotLog::drop_previous`].
pub struct HotLog {
    dir: PathBuf,
    fsync: bool,
    generation: u64,
    file: File,
    /// Bytes in the current file, written or buffered.
    bytes: u64,
    /// Records appended since the last [`HotLog::flush`].
    buf: Vec<u8>,
    previous: Option<u64>,
}

impl HotLog {
    /// Finds the files in `store_dir/hot` (what a [`Recovery`] reads,
    /// oldest first), then starts an empty current file after them. The
    /// files found are left in place until [`HotLog::drop_recovered`].
    /// `fsync`: flushes `fdatasync` the file.
    pub fn open(store_dir: &Path, fsync: bool) -> Result<(HotLog, Recovery), StoreError> {
        let dir = store_dir.join("hot");
        std::fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io("list", &dir, e))? {
            let name = entry.map_err(|e| io("list", &dir, e))?.file_name();
            let name = name.to_string_lossy();
            if let Some(g) = name.strip_prefix("hot-").and_then(|n| n.strip_suffix(".log")) {
                if let Ok(g) = u64::from_str_radix(g, 16) {
                    found.push(g);
                }
            }
        }
        found.sort_unstable();
        let generation = found.last().map_or(0, |g| g + 1);
        let file = create(&dir, generation, fsync)?;
        let recovery = Recovery { dir: dir.clone(), generations: found };
        Ok((HotLog { dir, fsync, generation, file, bytes: 0, buf: Vec::new(), previous: None }, recovery))
    }

    /// Deletes the files [`HotLog::open`] found, once what they held is in
    /// fjall and persisted.
    pub fn drop_recovered(&self, recovery: &Recovery) -> Result<(), StoreError> {
        recovery.generations.iter().try_for_each(|&g| self.delete(g))
    }

    /// Appends `m` (written at the next [`HotLog::flush`]).
    pub fn append(&mut self, m: LogEntry<'_>) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER]);
        self.buf.push(if m.expires_ms == 0 { MESSAGE } else { MESSAGE_EXPIRING });
        for n in [m.seq, m.msg_id, m.ts_ms, m.appended_ms, m.client_id] {
            self.buf.extend_from_slice(&n.to_be_bytes());
        }
        if m.expires_ms != 0 {
            self.buf.extend_from_slice(&m.expires_ms.to_be_bytes());
        }
        for s in [m.to, m.from] {
            self.buf.push(s.len() as u8);
            self.buf.extend_from_slice(s.as_bytes());
        }
        self.buf.extend_from_slice(m.payload);
        self.seal(start);
    }

    /// Appends that user `to`'s messages up to `head` were resolved, and
    /// where its `devices` are (written at the next [`HotLog::flush`]).
    pub fn append_head(&mut self, to: &str, head: u64, devices: &[DeviceState]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER]);
        self.buf.push(HEAD);
        self.buf.extend_from_slice(&head.to_be_bytes());
        self.buf.push(to.len() as u8);
        self.buf.extend_from_slice(to.as_bytes());
        put_devices(&mut self.buf, devices);
        self.seal(start);
    }

    /// Fills in the header of the record that starts at `start`.
    fn seal(&mut self, start: usize) {
        let body = &self.buf[start + HEADER..];
        let (len, crc) = (body.len() as u32, crc32fast::hash(body));
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
        self.bytes += (self.buf.len() - start) as u64;
    }

    /// The generation of the current epoch's file (what is appended now
    /// is in it, or in a later one).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes in the current epoch's file.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes what was appended (one `write`), and `fdatasync`s it with
    /// `fsync`: after this a crash of the process (with `fsync`, of the
    /// machine) keeps it.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = file_of(&self.dir, self.generation);
        self.file.write_all(&self.buf).map_err(|e| io("write", &path, e))?;
        self.buf.clear();
        if self.fsync {
            self.file.sync_data().map_err(|e| io("sync", &path, e))?;
        }
        Ok(())
    }

    /// Ends the epoch: starts a new current file, which what is appended
    /// and not flushed yet goes to (so this waits for no `fdatasync` of the
    /// file ended: what it holds that was acknowledged was synced). The
    /// file ended becomes the previous one; the one that was previous is
    /// returned, for [`HotLog::delete`] once its messages are dropped or in
    /// fjall, fjall is persisted, and this log flushed.
    pub fn rotate(&mut self) -> Result<Option<u64>, StoreError> {
        let next = self.generation + 1;
        self.file = create(&self.dir, next, self.fsync)?;
        let gone = self.previous.replace(self.generation);
        self.generation = next;
        self.bytes = 0;
        Ok(gone)
    }

    /// Deletes the file of a generation [`HotLog::rotate`] returned.
    pub fn delete(&self, generation: u64) -> Result<(), StoreError> {
        let path = file_of(&self.dir, generation);
        std::fs::remove_file(&path).map_err(|e| io("delete", &path, e))
    }

    /// Bytes of both files on disk (or buffered for the current one).
    pub fn disk_bytes(&self) -> u64 {
        let previous = self.previous.and_then(|g| std::fs::metadata(file_of(&self.dir, g)).ok()).map_or(0, |m| m.len());
        previous + self.bytes
    }
}

pub(super) fn file_of(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("hot-{generation:016x}.log"))
}

/// Creates a generation's file; with `fsync`, its directory entry is
/// synced too, so that a power loss keeps the file.
fn create(dir: &Path, generation: u64, fsync: bool) -> Result<File, StoreError> {
    let path = file_of(dir, generation);
    let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io("create", &path, e))?;
    if fsync {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("sync", dir, e))?;
    }
    Ok(file)
}

/// The files a restart found, to be read record by record: a crash can
/// leave a few epochs' files of up to [`EPOCH_BYTES`] each, so they are
/// never held in RAM whole, nor decoded all at once.
pub struct Recovery {
    dir: PathBuf,
    generations: Vec<u64>,
}

impl Recovery {
    /// The generations of the files found, oldest first.
    pub fn generations(&self) -> &[u64] {
        &self.generations
    }

    /// Calls `f` with every record of the files, oldest first. A file
    /// ends at its first record that is cut short or fails its checksum:
    /// the tail of a write a crash interrupted, logged if `report`. Such a
    /// record followed by a whole one is no crash's (a file is appended to
    /// by one process, one `write` at a time, and the next process starts
    /// a file of its own): the file was damaged on disk, and reading on
    /// would drop the acknowledged messages after the damage and give
    /// their seqs out again, so it is an error naming the file and the
    /// offset ([`damaged`]).
    pub fn for_each(
        &self,
        report: bool,
        mut f: impl FnMut(Recovered) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut body = Vec::new();
        for &g in &self.generations {
            let path = file_of(&self.dir, g);
            let file = File::open(&path).map_err(|e| io("read", &path, e))?;
            let mut left = file.metadata().map_err(|e| io("read", &path, e))?.len();
            let size = left;
            let mut r = std::io::BufReader::with_capacity(1 << 16, file);
            let whole = loop {
                if left == 0 {
                    break true;
                }
                let mut h = [0u8; HEADER];
                if left < HEADER as u64 {
                    break false;
                }
                r.read_exact(&mut h).map_err(|e| io("read", &path, e))?;
                left -= HEADER as u64;
                let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
                let crc = u32::from_le_bytes(h[4..].try_into().expect("4 bytes"));
                if u64::from(len) > left {
                    left += HEADER as u64;
                    break false;
                }
                body.resize(len as usize, 0);
                r.read_exact(&mut body).map_err(|e| io("read", &path, e))?;
                left -= u64::from(len);
                let Some(rec) = (crc32fast::hash(&body) == crc).then(|| decode(&body)).flatten() else {
                    left += HEADER as u64 + u64::from(len);
                    break false;
                };
                f(rec)?;
            };
            if !whole {
                let at = size - left;
                if let Some(next) = whole_record_after(&path, at)? {
                    return Err(damaged(&path, at, next));
                }
                if report {
                    tracing::warn!(file = %path.display(), offset = at, "hot log: a record cut short ends the file (a write the process did not finish)");
                }
            }
        }
        Ok(())
    }

    /// Every record, oldest first (tests).
    #[cfg(test)]
    pub fn read_all(&self) -> Vec<Recovered> {
        let mut out = Vec::new();
        self.for_each(false, |r| {
            out.push(r);
            Ok(())
        })
        .expect("the files read");
        out
    }
}

/// The offset of the first whole record (its length fits, its checksum
/// matches, it decodes) that starts after byte `at` of `path`, if any.
/// Read only when a file holds a bad record: at most a file's bytes, once.
fn whole_record_after(path: &Path, at: u64) -> Result<Option<u64>, StoreError> {
    let bytes = std::fs::read(path).map_err(|e| io("read", path, e))?;
    let start = (at as usize).saturating_add(1);
    for i in start..bytes.len().saturating_sub(HEADER) {
        let len = u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes")) as usize;
        let Some(body) = bytes.get(i + HEADER..).and_then(|rest| rest.get(..len)) else { continue };
        let crc = u32::from_le_bytes(bytes[i + 4..i + HEADER].try_into().expect("4 bytes"));
        if crc32fast::hash(body) == crc && decode(body).is_some() {
            return Ok(Some(i as u64));
        }
    }
    Ok(None)
}

/// The error of a file damaged at byte `at`, a whole record at `next`.
fn damaged(path: &Path, at: u64, next: u64) -> StoreError {
    let dir = path.parent().map_or_else(|| Path::new(".").to_path_buf(), Path::to_path_buf);
    StoreError::Unavailable(format!(
        "hot log {}: the record at byte {at} is damaged (cut short or failing its checksum) and a whole record \
         follows it at byte {next}, so this is not a write a crash cut short: the file was changed on disk (a \
         failing disk, or something writing into the store directory). Starting would drop the acknowledged \
         messages after the damage and give their seqs out again. Restore the store directory from a backup; or, \
         accepting the loss of every message in this file that was not yet written into the store proper (their \
         seqs may then be given out again, and devices that stored them skip the new ones: PROTOCOL.md 15.8), \
         move it out of {} and put an empty file of its name there, then start again (docs/DEPLOY.md, \"A \
         damaged hot log\")",
        path.display(),
        dir.display()
    ))
}

fn decode(b: &[u8]) -> Option<Recovered> {
    let (&kind, b) = b.split_first()?;
    let n = |i: usize| b.get(i * 8..i * 8 + 8).map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")));
    if kind == HEAD {
        let rest = b.get(8..)?;
        let len = *rest.first()? as usize;
        let to = std::str::from_utf8(rest.get(1..1 + len)?).ok()?.to_string();
        let (devices, rest) = match &rest[1 + len..] {
            [] => (Vec::new(), &[][..]),
            more => take_devices(more).ok()?,
        };
        return rest.is_empty().then_some(Recovered::Head { to, head: n(0)?, devices });
    }
    let (expires_ms, fixed) = match kind {
        MESSAGE => (0, 40),
        MESSAGE_EXPIRING => (n(5)?, 48),
        _ => return None,
    };
    let (seq, msg_id, ts_ms, appended_ms, client_id) = (n(0)?, n(1)?, n(2)?, n(3)?, n(4)?);
    let mut rest = b.get(fixed..)?;
    let mut str8 = || -> Option<String> {
        let len = *rest.first()? as usize;
        let s = std::str::from_utf8(rest.get(1..1 + len)?).ok()?.to_string();
        rest = &rest[1 + len..];
        Some(s)
    };
    let (to, from) = (str8()?, str8()?);
    Some(Recovered::Message(Logged {
        seq,
        msg_id,
        ts_ms,
        appended_ms,
        client_id,
        expires_ms,
        to,
        from,
        payload: rest.to_vec(),
    }))
}
