//! Timed payloads: a message that carries the time it was sent, so that
//! whoever receives it can tell the delivery latency.
//!
//! Owns: the layout, shared by the admin API's send-ceiling endpoint
//! (`POST /bench/send_ceiling`) and the load generator (the
//! `switchboard-bench` crate), which writes it and reads it back: the send
//! time as CLOCK_MONOTONIC nanoseconds (big-endian u64: the same clock in
//! every process of one host), then a sequence number (big-endian u32),
//! then padding up to the requested length.
//! Must not: be used across hosts (monotonic clocks are per host).

/// Bytes of the head: send time (8) and sequence number (4).
pub const HEAD_BYTES: usize = 12;

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one host.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A timed payload of `len` bytes (at least [`HEAD_BYTES`]), sent now.
pub fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(HEAD_BYTES)];
    p[8..HEAD_BYTES].copy_from_slice(&seq.to_be_bytes());
    restamp(&mut p);
    p
}

/// Writes the current time over the send time of `p` (at least 8 bytes):
/// one buffer reused for many sends.
pub fn restamp(p: &mut [u8]) {
    p[..8].copy_from_slice(&mono_ns().to_be_bytes());
}

/// The send time (ns) of a payload, if it is long enough to hold one.
pub fn sent_ns(p: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

/// The send time (ns) and sequence number of a timed payload.
pub fn read(p: &[u8]) -> Option<(u64, u32)> {
    let seq = u32::from_be_bytes(p.get(8..HEAD_BYTES)?.try_into().ok()?);
    Some((sent_ns(p)?, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_reads_back_its_time_and_sequence() {
        let before = mono_ns();
        let p = payload(7, 64);
        assert_eq!(p.len(), 64);
        let (sent, seq) = read(&p).unwrap();
        assert_eq!(seq, 7);
        assert!(sent >= before && sent <= mono_ns());
    }

    #[test]
    fn short_payloads_are_padded_or_not_read() {
        assert_eq!(payload(1, 0).len(), HEAD_BYTES);
        assert_eq!(read(&[0u8; 11]), None);
        assert_eq!(sent_ns(&[0u8; 7]), None);
        assert_eq!(sent_ns(&[0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
    }
}
