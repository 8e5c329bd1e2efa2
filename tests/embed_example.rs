//! The embedding example, `cargo run --example embed`, while a
//! `switchboard serve` holds the default ports 7700 and 7710. Its own test
//! binary: the example's server runs in this process, and a test in the
//! same process that spawns a child at the wrong moment would hand the
//! child the example's client socket (accepted sockets are not
//! close-on-exec yet: tests/spawned_children.rs).

mod common;

use std::net::TcpListener;

/// A listener on `addr` held for the test, or `None` when something else
/// already holds the port (which serves the test just as well).
fn hold(addr: &str) -> Option<TcpListener> {
    match TcpListener::bind(addr) {
        Ok(l) => Some(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => None,
        Err(e) => panic!("cannot bind {addr}: {e}"),
    }
}

/// The example itself, compiled into this test so it is always the
/// current one (a test filter such as `--test cli` does not rebuild
/// `target/*/examples/`).
#[path = "../examples/embed.rs"]
mod embed_example;

/// `cargo run --example embed` while `switchboard serve` runs on its
/// default ports: an embedded server binds only what its builder asks for,
/// so the example (raw TCP and WebSocket, each on a port of its own
/// choosing) does not collide with 7700 or 7710. It panics on any failure.
#[test]
fn the_embed_example_runs_while_a_server_holds_the_default_ports() {
    common::arm_watchdog();
    let _raw = hold("127.0.0.1:7700");
    let _ws = hold("127.0.0.1:7710");
    embed_example::main();
}
