//! Property tests of the sans-IO codec: every frame survives encode→decode,
//! any split of the bytes decodes the same, and arbitrary bytes never panic
//! the decoder (they give a frame, "need more" or an error). The reliable
//! delivery frames (LOGIN with a device, SYNC, INBOX, ACK, FETCH, SEND_EX,
//! SEND_RESULT) are among them.

use proptest::prelude::*;
use switchboard::proto::frame::{
    decode, DecodeError, Frame, FrameType, SendOutcome, HEADER_LEN, MAX_DEVICE_ID_BYTES, MAX_PING_DATA,
    SEND_EX_AT_MOST_ONCE, SEND_EX_TTL,
};

const MAX: usize = 64 * 1024;

fn user() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_\\-\\.é中]{1,40}"
}

fn frame_strategy() -> impl Strategy<Value = (u8, u64, u32, u16, String, String, Vec<u8>)> {
    (
        0u8..19,
        any::<u64>(),
        any::<u32>(),
        any::<u16>(),
        user(),
        "[ -~]{0,80}",
        proptest::collection::vec(any::<u8>(), 0..2000),
    )
}

fn build<'a>(k: u8, n64: u64, n32: u32, n16: u16, s: &'a str, text: &'a str, p: &'a [u8]) -> Frame<'a> {
    let ping = &p[..p.len().min(MAX_PING_DATA)];
    // A device id: 1 to 64 bytes, cut on a char boundary.
    let mut end = s.len().min(MAX_DEVICE_ID_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let device = &s[..end];
    let outcomes = [SendOutcome::Stored, SendOutcome::Duplicate, SendOutcome::Relayed];
    match k {
        0 => Frame::Login { user: s, token: p, device: None, last_seq: 0 },
        11 => Frame::Login { user: s, token: p, device: Some(device), last_seq: n64 },
        12 => Frame::Sync { req_id: n32, position: n64 >> 1, head_seq: n64, page_end: n64 ^ 7 },
        13 => Frame::Inbox {
            seq: n64,
            msg_id: n64.rotate_left(9),
            ts_ms: n64 >> 20,
            from: if n16.is_multiple_of(2) { "" } else { s },
            payload: p,
        },
        14 => Frame::Ack { seq: n64 },
        15 => Frame::Fetch { req_id: n32, after_seq: n64, limit: n16.max(1) },
        16 => {
            // Bit 1 of n16 chooses an expiry (SEND_EX_TTL and a ttl_ms of at least 1).
            let ttl_ms = if n16 & 2 != 0 { n32.max(1) } else { 0 };
            let flags = ((n16 as u8) & SEND_EX_AT_MOST_ONCE) | if ttl_ms != 0 { SEND_EX_TTL } else { 0 };
            Frame::SendEx { req_id: n32, flags, client_id: n64, ttl_ms, to: s, payload: p }
        }
        17 | 18 => Frame::SendResult {
            req_id: n32,
            outcome: outcomes[n16 as usize % 3],
            seq: n64,
            msg_id: n64.rotate_left(3),
            delivered: n32 >> 4,
        },
        1 => Frame::LoginOk {
            conn_id: n64,
            heartbeat_interval_ms: n32,
            idle_timeout_ms: n32 ^ 1,
            max_frame_bytes: n32 >> 3,
        },
        2 => Frame::LoginError { code: n16, reason: text },
        3 => Frame::Ping { data: ping },
        4 => Frame::Pong { data: ping },
        5 => Frame::Push { msg_id: n64, from: if n16.is_multiple_of(2) { "" } else { s }, payload: p },
        6 => Frame::Send { req_id: n32, to: s, payload: p },
        7 => Frame::SendAck { req_id: n32, delivered: n32.rotate_left(7) },
        8 => Frame::Message { req_id: n32, payload: p },
        9 => Frame::Close { code: n16, reason: text },
        _ => Frame::Error { code: n16, req_id: n32, reason: text },
    }
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity((k, n64, n32, n16, s, text, p) in frame_strategy()) {
        let f = build(k, n64, n32, n16, &s, &text, &p);
        let bytes = f.to_bytes().unwrap();
        prop_assert_eq!(bytes.len(), HEADER_LEN + f.body_len());
        let (g, n) = decode(&bytes, MAX).unwrap().unwrap();
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(g, f);
    }

    #[test]
    fn a_stream_decodes_the_same_however_it_is_split(
        frames in proptest::collection::vec(frame_strategy(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut stream = Vec::new();
        let built: Vec<_> = frames.iter().map(|(k, a, b, c, s, t, p)| build(*k, *a, *b, *c, s, t, p)).collect();
        for f in &built {
            stream.extend_from_slice(&f.to_bytes().unwrap());
        }
        // Feed the stream in pieces, as reads would deliver it.
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        let mut fed = 0;
        for p in points {
            buf.extend_from_slice(&stream[fed..p]);
            fed = p;
            while let Some((f, n)) = decode(&buf, MAX).unwrap() {
                got.push(f.to_bytes().unwrap());
                buf.drain(..n);
            }
        }
        prop_assert!(buf.is_empty());
        let want: Vec<_> = built.iter().map(|f| f.to_bytes().unwrap()).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut rest = &data[..];
        // Decode greedily; every outcome is a value, never a panic, and a
        // decoded frame re-encodes to exactly the bytes it came from.
        while let Ok(Some((f, n))) = decode(rest, MAX) {
            prop_assert!(n >= HEADER_LEN && n <= rest.len());
            prop_assert_eq!(&f.to_bytes().unwrap()[..], &rest[..n]);
            rest = &rest[n..];
        }
    }

    #[test]
    fn valid_headers_with_random_bodies_never_panic(ty in 0u8..0x20, body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut data = ((body.len() + 2) as u32).to_be_bytes().to_vec();
        data.push(1);
        data.push(ty);
        data.extend_from_slice(&body);
        match decode(&data, MAX) {
            Ok(Some((f, n))) => {
                prop_assert_eq!(n, data.len());
                prop_assert_eq!(&f.to_bytes().unwrap()[..], &data[..]);
            }
            Ok(None) => prop_assert!(false, "a whole frame is never 'need more'"),
            Err(_) => {}
        }
    }

    /// Random bodies for the reliable-delivery frames: a whole frame is a
    /// frame or an error naming that frame, never "need more", and what
    /// decodes re-encodes to the same bytes.
    #[test]
    fn reliable_frames_with_random_bodies_decode_or_name_the_frame(
        ty in 0x16u8..=0x1b,
        body in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let mut data = ((body.len() + 2) as u32).to_be_bytes().to_vec();
        data.extend_from_slice(&[1, ty]);
        data.extend_from_slice(&body);
        let name = FrameType::from_u8(ty).unwrap().name();
        match decode(&data, MAX) {
            Ok(Some((f, n))) => {
                prop_assert_eq!(n, data.len());
                prop_assert_eq!(f.frame_type() as u8, ty);
                prop_assert_eq!(&f.to_bytes().unwrap()[..], &data[..]);
            }
            Ok(None) => prop_assert!(false, "a whole frame is never 'need more'"),
            Err(e) => {
                let named = match e {
                    DecodeError::Truncated { frame, .. }
                    | DecodeError::TrailingBytes { frame, .. }
                    | DecodeError::InvalidUtf8 { frame, .. }
                    | DecodeError::EmptyField { frame, .. }
                    | DecodeError::FieldTooLong { frame, .. }
                    | DecodeError::BadValue { frame, .. }
                    | DecodeError::UnknownFlags { frame, .. }
                    | DecodeError::Zero { frame, .. } => frame,
                    other => return Err(TestCaseError::fail(format!("{other:?}"))),
                };
                prop_assert_eq!(named, name);
            }
        }
    }

    /// A valid old-style LOGIN followed by random bytes: a LOGIN with a
    /// device, or an error naming a LOGIN field.
    #[test]
    fn login_with_a_random_tail_is_a_device_login_or_a_named_error(
        tail in proptest::collection::vec(any::<u8>(), 1..80),
    ) {
        let mut body = vec![1, b'u', 0, 1, b't'];
        body.extend_from_slice(&tail);
        let mut data = ((body.len() + 2) as u32).to_be_bytes().to_vec();
        data.extend_from_slice(&[1, 1]);
        data.extend_from_slice(&body);
        match decode(&data, MAX) {
            Ok(Some((Frame::Login { device: Some(d), .. }, n))) => {
                prop_assert_eq!(n, data.len());
                prop_assert!(!d.is_empty() && d.len() <= MAX_DEVICE_ID_BYTES);
                prop_assert_eq!(tail.len(), 1 + d.len() + 8);
            }
            Ok(other) => prop_assert!(false, "{:?}", other),
            Err(
                DecodeError::Truncated { frame: "LOGIN", field: "device" | "last_seq" }
                | DecodeError::EmptyField { frame: "LOGIN", field: "device" }
                | DecodeError::FieldTooLong { frame: "LOGIN", field: "device", .. }
                | DecodeError::InvalidUtf8 { frame: "LOGIN", field: "device" }
                | DecodeError::TrailingBytes { frame: "LOGIN", .. },
            ) => {}
            Err(e) => prop_assert!(false, "{:?}", e),
        }
    }
}
