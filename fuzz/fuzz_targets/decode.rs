//! Fuzz target for the raw TCP frame decoder: arbitrary bytes, decoded
//! greedily as a stream. Run: `cargo +nightly fuzz run decode` from the
//! repository root (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::proto::frame::decode;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a frame limit so the size check is exercised too.
    let Some((&pick, mut rest)) = data.split_first() else { return };
    let max = 4096 + (pick as usize) * 256;
    while let Ok(Some((frame, n))) = decode(rest, max) {
        assert!(n <= rest.len() && n <= max);
        // A decoded frame re-encodes to the bytes it came from.
        let again = frame.to_bytes().expect("decoded frames re-encode");
        assert_eq!(&again[..], &rest[..n]);
        rest = &rest[n..];
    }
});
