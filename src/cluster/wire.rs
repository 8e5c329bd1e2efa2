//! What nodes send each other through Redis pub/sub: batches of records,
//! encoded and decoded without I/O.
//!
//! Owns: the byte layout of one PUBLISH payload (docs/SCALING.md, "What
//! crosses between nodes"), its encoder ([`BatchWriter`], which stops at a
//! byte budget) and its decoder ([`decode`], which rejects a malformed
//! batch whole and never panics on any input).
//! Must not: know Redis, channels or the runtime; the node thread decides
//! where a batch goes and what a record does.
//!
//! Layout, all integers big-endian:
//! ```text
//! batch  = version:u8 (1) origin:str8 record*
//! record = kind:u8 body
//!   1 User    user:str8 frame:bytes32        an encoded PUSH for the user's connections
//!   2 Stored  user:str8 seq:u64 msg_id:u64 ts_ms:u64 from:str8 payload:bytes32
//!   3 Kick    user:str8
//!   4 Join    user:str8 room:str8
//!   5 Leave   user:str8 room:str8
//!   6 Frame   frame:bytes32                  an encoded ROOM_MSG (room channel or broadcast)
//!   7 Login   user:str8                      drop cached routes of the user
//!   8 Reset                                  drop every cached route
//!   9 Replaced user:str8 device:str8 at_ms:u64
//!                                            the device logged in at the origin
//! str8 = len:u8 bytes, bytes32 = len:u32 bytes
//! ```
//!
//! A node that reads an older layout drops a batch holding a kind it does
//! not know, whole. The sender therefore puts records of kinds added
//! later (9) in batches of their own, so that in a cluster being upgraded
//! node by node an older node loses only those, never a forward.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// The layout version this node writes and reads.
pub const VERSION: u8 = 1;

/// One thing a node asks of another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Write this PUSH frame to the user's connections on the receiving node.
    User { user: Bytes, frame: Bytes },
    /// A message stored in the user's inbox: its connections' windows take it.
    Stored { user: Bytes, seq: u64, msg_id: u64, ts_ms: u64, from: Bytes, payload: Bytes },
    /// Close the user's connections there (4003).
    Kick { user: Bytes },
    /// Join the user's connections there to a room.
    Join { user: Bytes, room: Bytes },
    /// Take the user's connections there out of a room.
    Leave { user: Bytes, room: Bytes },
    /// A ROOM_MSG for the room the channel names, or for everyone.
    Frame { frame: Bytes },
    /// The user logged in on the origin node: forget cached routes.
    Login { user: Bytes },
    /// The origin node re-registered all its users (after Redis came
    /// back): forget every cached route.
    Reset,
    /// `device` of the user logged in on the origin node at `at_ms` (the
    /// cluster's clock): close the user's older connections of the device
    /// here (CLOSE 4008), or answer if one here is the later login.
    Replaced { user: Bytes, device: Bytes, at_ms: u64 },
}

impl Record {
    /// Bytes this record takes in a batch.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Record::User { user, frame } => 1 + user.len() + 4 + frame.len(),
            Record::Stored { user, from, payload, .. } => 1 + user.len() + 24 + 1 + from.len() + 4 + payload.len(),
            Record::Kick { user } | Record::Login { user } => 1 + user.len(),
            Record::Join { user, room } | Record::Leave { user, room } => 2 + user.len() + room.len(),
            Record::Frame { frame } => 4 + frame.len(),
            Record::Reset => 0,
            Record::Replaced { user, device, .. } => 2 + user.len() + device.len() + 8,
        }
    }
}

/// A batch that cannot be read. The whole batch is dropped (and counted):
/// a record boundary cannot be trusted after a bad length.
#[derive(Copy, Clone, Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("batch of version {0}; this node reads version {VERSION}")]
    Version(u8),
    #[error("batch cut short inside a record")]
    Truncated,
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("a name longer than 255 bytes or a frame longer than 4 GiB")]
    TooLong,
}

/// Builds one batch up to a byte budget.
pub struct BatchWriter {
    buf: BytesMut,
    records: usize,
    budget: usize,
}

impl BatchWriter {
    /// A batch from node `origin`, of at most `budget` bytes (one record
    /// larger than the budget is still taken when the batch is empty).
    pub fn new(origin: &str, budget: usize) -> Result<BatchWriter, WireError> {
        let mut buf = BytesMut::with_capacity(budget.min(64 << 10));
        buf.put_u8(VERSION);
        put_str8(&mut buf, origin.as_bytes())?;
        Ok(BatchWriter { buf, records: 0, budget })
    }

    /// Records written so far.
    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Whether `r` still fits the budget.
    pub fn fits(&self, r: &Record) -> bool {
        self.records == 0 || self.buf.len() + r.encoded_len() <= self.budget
    }

    /// Appends `r`. The caller checked [`BatchWriter::fits`]; a name over
    /// 255 bytes is refused (ids and room names never are: the protocol's
    /// `str8`).
    pub fn push(&mut self, r: &Record) -> Result<(), WireError> {
        let start = self.buf.len();
        let out = &mut self.buf;
        let result = (|| {
            match r {
                Record::User { user, frame } => {
                    out.put_u8(1);
                    put_str8(out, user)?;
                    put_bytes32(out, frame)?;
                }
                Record::Stored { user, seq, msg_id, ts_ms, from, payload } => {
                    out.put_u8(2);
                    put_str8(out, user)?;
                    out.put_u64(*seq);
                    out.put_u64(*msg_id);
                    out.put_u64(*ts_ms);
                    put_str8(out, from)?;
                    put_bytes32(out, payload)?;
                }
                Record::Kick { user } => {
                    out.put_u8(3);
                    put_str8(out, user)?;
                }
                Record::Join { user, room } | Record::Leave { user, room } => {
                    out.put_u8(if matches!(r, Record::Join { .. }) { 4 } else { 5 });
                    put_str8(out, user)?;
                    put_str8(out, room)?;
                }
                Record::Frame { frame } => {
                    out.put_u8(6);
                    put_bytes32(out, frame)?;
                }
                Record::Login { user } => {
                    out.put_u8(7);
                    put_str8(out, user)?;
                }
                Record::Reset => out.put_u8(8),
                Record::Replaced { user, device, at_ms } => {
                    out.put_u8(9);
                    put_str8(out, user)?;
                    put_str8(out, device)?;
                    out.put_u64(*at_ms);
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.records += 1;
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(start);
                Err(e)
            }
        }
    }

    /// The encoded batch.
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

fn put_str8(out: &mut BytesMut, s: &[u8]) -> Result<(), WireError> {
    let len = u8::try_from(s.len()).map_err(|_| WireError::TooLong)?;
    out.put_u8(len);
    out.put_slice(s);
    Ok(())
}

fn put_bytes32(out: &mut BytesMut, s: &[u8]) -> Result<(), WireError> {
    let len = u32::try_from(s.len()).map_err(|_| WireError::TooLong)?;
    out.put_u32(len);
    out.put_slice(s);
    Ok(())
}

/// A cursor over a received batch; every slice it hands out shares the
/// batch's buffer (no copy per record).
struct Reader {
    buf: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(WireError::Truncated)?;
        let b = self.buf.slice(self.at..end);
        self.at = end;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?[..].try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?[..].try_into().expect("8 bytes")))
    }
    fn str8(&mut self) -> Result<Bytes, WireError> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn bytes32(&mut self) -> Result<Bytes, WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// Reads a whole batch: its origin node and its records.
pub fn decode(batch: Bytes) -> Result<(Bytes, Vec<Record>), WireError> {
    let mut r = Reader { buf: batch, at: 0 };
    let v = r.u8()?;
    if v != VERSION {
        return Err(WireError::Version(v));
    }
    let origin = r.str8()?;
    let mut records = Vec::new();
    while r.at < r.buf.len() {
        let rec = match r.u8()? {
            1 => Record::User { user: r.str8()?, frame: r.bytes32()? },
            2 => Record::Stored {
                user: r.str8()?,
                seq: r.u64()?,
                msg_id: r.u64()?,
                ts_ms: r.u64()?,
                from: r.str8()?,
                payload: r.bytes32()?,
            },
            3 => Record::Kick { user: r.str8()? },
            4 => Record::Join { user: r.str8()?, room: r.str8()? },
            5 => Record::Leave { user: r.str8()?, room: r.str8()? },
            6 => Record::Frame { frame: r.bytes32()? },
            7 => Record::Login { user: r.str8()? },
            8 => Record::Reset,
            9 => Record::Replaced { user: r.str8()?, device: r.str8()?, at_ms: r.u64()? },
            k => return Err(WireError::Kind(k)),
        };
        records.push(rec);
    }
    Ok((origin, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn every_kind() -> Vec<Record> {
        vec![
            Record::User { user: b("alice"), frame: b("\x01\x02frame") },
            Record::Stored {
                user: b("bob"),
                seq: 7,
                msg_id: 1 << 40,
                ts_ms: 1_700_000_000_000,
                from: b("carol"),
                payload: b("hi"),
            },
            Record::Kick { user: b("dave") },
            Record::Join { user: b("erin"), room: b("lobby") },
            Record::Leave { user: b("erin"), room: b("lobby") },
            Record::Frame { frame: b("roommsg") },
            Record::Login { user: b("frank") },
            Record::Reset,
            Record::Replaced { user: b("gina"), device: b("phone"), at_ms: 1_700_000_000_123 },
        ]
    }

    #[test]
    fn every_record_kind_round_trips_with_its_length() {
        let mut w = BatchWriter::new("gw-1", 1 << 20).unwrap();
        let recs = every_kind();
        let mut expected = 2 + 4;
        for r in &recs {
            assert!(w.fits(r));
            w.push(r).unwrap();
            expected += r.encoded_len();
        }
        assert_eq!(w.len(), recs.len());
        let bytes = w.finish();
        assert_eq!(bytes.len(), expected);
        let (origin, back) = decode(bytes).unwrap();
        assert_eq!(&origin[..], b"gw-1");
        assert_eq!(back, recs);
    }

    #[test]
    fn the_budget_bounds_a_batch_but_one_large_record_still_goes() {
        let big = Record::User { user: b("u"), frame: Bytes::from(vec![0u8; 5000]) };
        let mut w = BatchWriter::new("n", 4096).unwrap();
        assert!(w.fits(&big), "an empty batch takes one record of any size");
        w.push(&big).unwrap();
        assert!(!w.fits(&Record::Kick { user: b("x") }));
        let small = Record::Kick { user: b("x") };
        let mut w = BatchWriter::new("n", 64).unwrap();
        let mut n = 0;
        while w.fits(&small) {
            w.push(&small).unwrap();
            n += 1;
        }
        assert_eq!(w.finish().len(), 3 + n * small.encoded_len());
        assert!(3 + (n + 1) * small.encoded_len() > 64);
    }

    #[test]
    fn a_name_over_255_bytes_is_refused_and_leaves_the_batch_as_it_was() {
        let mut w = BatchWriter::new("n", 1 << 20).unwrap();
        w.push(&Record::Kick { user: b("ok") }).unwrap();
        let long = Bytes::from(vec![b'a'; 256]);
        assert_eq!(w.push(&Record::Kick { user: long }), Err(WireError::TooLong));
        assert_eq!(w.len(), 1);
        let (_, recs) = decode(w.finish()).unwrap();
        assert_eq!(recs, vec![Record::Kick { user: b("ok") }]);
        assert!(BatchWriter::new(&"x".repeat(300), 100).is_err());
    }

    #[test]
    fn malformed_batches_are_errors() {
        assert_eq!(decode(Bytes::new()), Err(WireError::Truncated));
        assert_eq!(decode(Bytes::from_static(b"\x02\x01n")), Err(WireError::Version(2)));
        assert_eq!(decode(Bytes::from_static(b"\x01\x01n\x0a")), Err(WireError::Kind(10)));
        assert_eq!(decode(Bytes::from_static(b"\x01\x01n\x09\x01u\x01d\x00")), Err(WireError::Truncated));
        assert_eq!(decode(Bytes::from_static(b"\x01\x01n\x01\x05ab")), Err(WireError::Truncated));
        assert_eq!(decode(Bytes::from_static(b"\x01\x01n\x06\xff\xff\xff\xff")), Err(WireError::Truncated));
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(Bytes::from(data));
        }

        #[test]
        fn cut_batches_are_truncated_never_misread(cut in 0usize..80) {
            let mut w = BatchWriter::new("gw", 1 << 20).unwrap();
            for r in every_kind() {
                w.push(&r).unwrap();
            }
            let full = w.finish();
            let cut = cut.min(full.len() - 1);
            let r = decode(full.slice(..cut));
            // A cut on a record boundary reads the records before it;
            // anywhere else it is an error, never a different record.
            if let Ok((_, recs)) = r {
                prop_assert_eq!(&recs[..], &every_kind()[..recs.len()]);
            }
        }
    }
}
