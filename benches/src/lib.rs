//! Benchmarking Switchboard: the load generator that the `switchboard-bench`
//! binary, the criterion benches (`benches/benches/`) and the smoke tests
//! drive.
//!
//! Owns: everything that measures a server from the outside: loader
//! processes, their control protocol, /proc readings, a minimal HTTP client
//! for the admin API.
//! Must not: be a dependency of the server. An embedder compiles the
//! `switchboard` crate alone and never builds mio, hdrhistogram or clap for
//! these tools.

pub mod loadgen;
