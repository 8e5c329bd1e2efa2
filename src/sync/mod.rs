//! Synchronisation primitives shared across threads, small enough to be
//! model-checked: a counted limit (`limit`, the server-wide room count).
//!
//! Owns: the atomics and memory orderings of these protocols.
//! Must not: use anything from the rest of the crate (`crate::…`) or any
//! dependency other than std (and loom under `cfg(loom)`); reach std's
//! atomics other than through `facade`, which is where loom's replace
//! them under `cfg(loom)`; block.

pub(crate) mod limit;

/// What the primitives import instead of std's atomics: std's in the
/// server, loom's under `cfg(loom)`.
pub(crate) mod facade {
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::AtomicUsize;

    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::AtomicUsize;
}
