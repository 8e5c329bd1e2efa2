//! WebSocket transport (RFC 6455), server side, plus the client end of the
//! frame codec for the tools and tests that talk to the server.
//!
//! Owns, by module:
//! - `codec`: frames. The server's decoder of client frames ([`Decoder`]),
//!   a client's decoder of server frames ([`ClientDecoder`]), the encoder
//!   of server frames ([`frame_header`], [`text_frame`], [`close_frame`],
//!   …), opcodes, close codes ([`close`]) and the errors that close a
//!   connection ([`WsError`]).
//! - `utf8`: validation of text as it arrives, across fragments and reads.
//! - [`handshake`]: the HTTP/1.1 upgrade request and every response the
//!   server writes before the connection is a WebSocket. The HTTP parsing
//!   underneath is `proto::http`, shared with the admin API.
//!
//! Must not: do I/O, read a clock, use `unsafe`, or panic on any input.
//! The paths below are the module's public surface; the split into files
//! is not.

mod codec;
pub mod handshake;
mod utf8;

pub use codec::{
    apply_mask, binary_frame, close, close_frame, encode_frame, frame_header, ping_frame, pong_frame, text_frame,
    ClientDecoder, Decoder, Opcode, WsError, WsEvent, CLOSE_EMPTY, KEEP_REASSEMBLY_CAPACITY, MAX_CLIENT_HEADER_LEN,
    MAX_CLOSE_REASON, MAX_CONTROL_PAYLOAD, MAX_SERVER_HEADER_LEN, PING_EMPTY,
};
