//! Fuzz target for the reliable-delivery wire: LOGIN with its optional
//! `device`/`last_seq` tail, SYNC, INBOX, ACK, FETCH, SEND_EX and
//! SEND_RESULT, in binary and (the client side) in JSON. Run:
//! `cargo +nightly fuzz run reliable -- -dict=fuzz/reliable.dict` from the
//! repository root (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::proto::frame::{decode, FrameType};
use switchboard::proto::json::{encode_json, ClientFrame};

/// LOGIN and the reliable-delivery types: the first input byte picks one,
/// so every input reaches a body decoder instead of the header check.
const TYPES: [u8; 7] = [0x01, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let ty = TYPES[pick as usize % TYPES.len()];
    let mut frame = ((body.len() + 2) as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&[1, ty]);
    frame.extend_from_slice(body);
    match decode(&frame, usize::MAX) {
        Ok(Some((f, n))) => {
            assert_eq!(n, frame.len());
            assert_eq!(f.frame_type() as u8, ty);
            // A decoded frame re-encodes to the bytes it came from.
            assert_eq!(&f.to_bytes().expect("decoded frames re-encode")[..], &frame[..]);
            // The server's frames have a JSON form, the client's none.
            let server = matches!(f.frame_type(), FrameType::Sync | FrameType::Inbox | FrameType::SendResult);
            assert_eq!(encode_json(&f).is_some(), server);
        }
        Ok(None) => panic!("a whole frame is never 'need more'"),
        Err(_) => {}
    }
    // The body as a JSON client message: whatever parses is a frame the
    // binary protocol carries, and decodes back to the same frame.
    if let Ok(c) = ClientFrame::parse_bytes(body) {
        let bytes = c.as_frame().to_bytes().expect("parsed messages encode");
        let (g, n) = decode(&bytes, usize::MAX).expect("encoded frames decode").expect("whole");
        assert_eq!(n, bytes.len());
        assert_eq!(g, c.as_frame());
    }
});
