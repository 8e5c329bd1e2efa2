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

/// The README's "Embedding" snippet, as it stands there (between the
/// markers), compiled here: an embedder copies it first. Never called (it
/// binds 0.0.0.0 ports and reads JWT_SECRET).
#[allow(dead_code, unused_variables)]
#[rustfmt::skip] // kept as the README shows it, comments aligned
fn readme_embedding_snippet() -> Result<(), Box<dyn std::error::Error>> {
    // README snippet begins
    use switchboard::Server;

    let server = Server::builder()
        .listen("0.0.0.0:7800")               // raw TCP for your apps (port 0: any free port)
        .ws_listen("0.0.0.0:7810")            // WebSocket for browsers; leave out for none
        .jwt_secret(std::env::var("JWT_SECRET")?)
        .data_dir("/var/lib/myapp/inboxes")   // the message store: one server per directory
        .on_message(|msg, handle| {           // MESSAGE frames from clients, on a worker thread
            let _ = handle.push_to_user(&msg.user, b"got it");
        })
        .start()?;
    let handle = server.handle();             // Clone + Send + Sync
    let r = handle.push("alice", b"hello")?.wait()?;  // stored: Receipt { seq, msg_id, connections, .. } once durable
    handle.push_reliable("alice", b"order #7 shipped", 7)?; // idempotent with client id 7 (0: none); returns a PendingPush
    let call = switchboard::ReliablePush { ttl: Some(std::time::Duration::from_secs(30)), ..Default::default() };
    handle.push_reliable_with("alice", b"call from bob", call)?; // not delivered once 30 s old
    handle.push_to_user("alice", "typing…")?;  // live, at most once: Ok(Pushed { msg_id, connections })
    handle.inbox_state("alice", std::time::Duration::from_secs(1))?; // head seq, each device's position
    handle.forget_device("alice", "tablet-7f3c", std::time::Duration::from_secs(1))?; // signed out: keeps no messages
    handle.kick_user("mallory")?;             // CLOSE 4003 on every device
    handle.join_room("alice", "lobby")?;      // every device of alice joins (ROOM_ACK to each)
    handle.publish_to_room("lobby", b"hi")?;  // one ROOM_MSG to every member, on every worker
    handle.broadcast(b"maintenance at 2am")?; // every logged-in connection
    handle.room_size("lobby");                // connections in the room, all workers
    handle.is_online("alice");
    handle.connection_count();
    server.shutdown()?;                      // CLOSE 1001 to everyone, then exit; Err if a worker died
    // README snippet ends
    Ok(())
}

/// The README's snippet is the one above, line for line (leading spaces
/// aside): what compiles here is what the README shows.
#[test]
fn the_readme_embedding_snippet_is_the_one_that_compiles_here() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let shown = readme
        .split_once("## Embedding\n\n```rust\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .map(|(block, _)| block)
        .expect("README has an Embedding section opening with a rust block");
    let here = include_str!("embed_example.rs");
    let compiled = here
        .split_once("    // README snippet begins\n")
        .and_then(|(_, rest)| rest.split_once("    // README snippet ends\n"))
        .map(|(block, _)| block)
        .expect("the markers above");
    let lines = |t: &str| t.lines().map(|l| l.trim().to_string()).collect::<Vec<_>>();
    assert_eq!(lines(shown), lines(compiled), "README.md's Embedding snippet differs from tests/embed_example.rs");
}
