//! The sans-IO protocol core: bytes in, events out, the clock passed in.
//!
//! Owns: the raw TCP frame codec (`frame`), the wire codes (`codes`), the
//! per-connection session state machine (`session`), the WebSocket transport
//! (`ws`: handshake and frame codec), the HTTP/1.1 request heads and
//! responses it and the admin API share (`http`) and the JSON form of the
//! frames that WebSocket clients exchange (`json`).
//! Must not: import a runtime, touch a socket, read a clock, or use `unsafe`.

#![forbid(unsafe_code)]

pub mod codes;
pub mod conn;
pub mod frame;
pub mod http;
pub mod json;
pub mod rate;
pub mod reliable;
pub mod session;
pub mod wire;
pub mod ws;
