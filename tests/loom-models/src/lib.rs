//! loom models of the server's synchronisation primitives.
//!
//! Owns: nothing but the models in `tests/models.rs`, which compile the
//! server's own `src/sync/*.rs` (by `#[path]`, the exact files the server
//! runs) against loom's atomics and cell, and check every interleaving of
//! a few threads within a preemption bound.
//! Must not: re-type a primitive (a model of a copy checks the copy), or
//! depend on the server crate (that would build the whole server under
//! `--cfg loom`). The only code a model writes itself is what stands in
//! for the world around a primitive: the worker's loop around the wake
//! flag and request list, and the queue and eventfd, which are no weaker
//! than crossbeam's `ArrayQueue` and a kernel eventfd.
//!
//! Run (scripts/test.sh does):
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p loom-models --release`
