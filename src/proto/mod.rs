//! The sans-IO protocol core: bytes in, events out, the clock passed in.
//!
//! Owns: the raw TCP frame codec (`frame`), the wire codes (`codes`) and the
//! per-connection session state machine (`session`).
//! Must not: import a runtime, touch a socket, read a clock, or use `unsafe`.

#![forbid(unsafe_code)]

pub mod codes;
pub mod frame;
pub mod json;
pub mod session;
pub mod ws;
