//! Fuzz target for the WebSocket input side: the upgrade request parser,
//! the client frame decoder (fed in pieces, as reads arrive) and the JSON
//! message parser. Run: `cargo +nightly fuzz run websocket` from the
//! repository root (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::proto::json::ClientFrame;
use switchboard::proto::ws::{handshake, Decoder, WsEvent};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the message limit and the read size.
    let Some((&pick, rest)) = data.split_first() else { return };
    if let Ok(Some((_, n))) = handshake::parse_request(rest, 1024 + pick as usize * 16) {
        assert!(n <= rest.len());
    }
    let _ = ClientFrame::parse_bytes(rest);

    let mut dec = Decoder::new(64 + pick as usize * 64);
    let step = 1 + (pick as usize % 17);
    // The decoder takes whole frames from the front of what it is given
    // (unmasking in place); the caller keeps what it did not consume and
    // appends the next read, as the worker does.
    let mut pending: Vec<u8> = Vec::new();
    for chunk in rest.chunks(step) {
        pending.extend_from_slice(chunk);
        loop {
            let before = pending.len();
            match dec.decode(&mut pending) {
                Ok(Some((ev, n))) => {
                    assert!(n > 0 && n <= before);
                    if let WsEvent::Text(t) = ev {
                        let _ = ClientFrame::parse(t);
                    }
                    pending.drain(..n);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
