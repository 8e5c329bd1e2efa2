//! Property tests of the sans-IO codec: every frame survives encode→decode,
//! any split of the bytes decodes the same, and arbitrary bytes never panic
//! the decoder (they give a frame, "need more" or an error).

use proptest::prelude::*;
use switchboard::proto::frame::{decode, Frame, HEADER_LEN, MAX_PING_DATA};

const MAX: usize = 64 * 1024;

fn user() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_\\-\\.é中]{1,40}"
}

fn frame_strategy() -> impl Strategy<Value = (u8, u64, u32, u16, String, String, Vec<u8>)> {
    (
        0u8..11,
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
    match k {
        0 => Frame::Login { user: s, token: p },
        1 => Frame::LoginOk {
            conn_id: n64,
            heartbeat_interval_ms: n32,
            idle_timeout_ms: n32 ^ 1,
            max_frame_bytes: n32 >> 3,
        },
        2 => Frame::LoginError { code: n16, reason: text },
        3 => Frame::Ping { data: ping },
        4 => Frame::Pong { data: ping },
        5 => Frame::Push { msg_id: n64, from: if n16 % 2 == 0 { "" } else { s }, payload: p },
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
    fn valid_headers_with_random_bodies_never_panic(ty in 0u8..16, body in proptest::collection::vec(any::<u8>(), 0..300)) {
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
}
