//! Embedding Switchboard in an application.
//!
//! Starts the server in-process with the application's own login check and
//! a message hook, then pushes to users from a plain thread through the
//! cloneable handle, while a client (here in the same process, normally a
//! phone) receives.
//!
//! Run: `cargo run --example embed`

use std::time::Duration;

use switchboard::client::Client;
use switchboard::proto::frame::Frame;
use switchboard::{AuthError, Server};

pub fn main() {
    // The application decides who may log in: here, any user whose token is
    // "letmein-<user>". A real app would look the token up in its session
    // store (quickly: this runs on a worker thread).
    // It binds only what it is asked for, here on ports of its own choosing
    // (0: any free port), so it runs beside `switchboard serve` on 7700/7710.
    // Reliable delivery keeps inboxes on disk; a directory of its own,
    // since `switchboard serve` uses `switchboard-data` here.
    let data = std::env::temp_dir().join(format!("switchboard-embed-{}", std::process::id()));
    let server = Server::builder()
        .listen("127.0.0.1:0") // raw TCP, for apps
        .ws_listen("127.0.0.1:0") // WebSocket, for browsers (leave out: none)
        .workers(2)
        .data_dir(&data)
        .authenticator(|user: &str, token: &[u8], _now: u64| {
            if token == format!("letmein-{user}").as_bytes() {
                Ok(())
            } else {
                Err(AuthError::Rejected("unknown session".into()))
            }
        })
        .on_message(|msg, handle| {
            // MESSAGE frames from clients land here; answer through the handle.
            println!("app got {:?} from {}: {:?}", msg.kind, msg.user, msg.payload);
            let _ = handle.push_to_user(&msg.user, b"ack from the app");
        })
        .start()
        .expect("server starts");
    let addr = server.local_addr();
    println!("embedded switchboard on {addr}, WebSocket on {:?}", server.ws_addr());

    // A client logs in (normally a phone or a browser).
    let mut phone = Client::connect(addr).expect("connect");
    phone.login("alice", "letmein-alice").expect("login");
    phone.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // The application pushes from any thread: the handle is Clone + Send + Sync.
    let handle = server.handle();
    let pusher = std::thread::spawn(move || {
        for i in 0..3 {
            let pushed = handle.push_to_user("alice", format!("news #{i}")).expect("push");
            println!("pushed msg {} to {} connection(s)", pushed.msg_id, pushed.connections);
        }
    });
    pusher.join().unwrap();
    for _ in 0..3 {
        if let Frame::Push { msg_id, payload, .. } = phone.recv_skipping_pings().unwrap().frame() {
            println!("phone received #{msg_id}: {}", String::from_utf8_lossy(payload));
        }
    }

    // The client talks to the application through a MESSAGE frame.
    phone.send_frame(&Frame::Message { req_id: 1, payload: b"hello app" }).unwrap();
    if let Frame::Push { payload, .. } = phone.recv_skipping_pings().unwrap().frame() {
        println!("phone received: {}", String::from_utf8_lossy(payload));
    }

    let h = server.handle();
    println!("online: alice={} connections={}", h.is_online("alice"), h.connection_count());
    server.shutdown().expect("no worker died"); // CLOSE 1001 to every client, then the workers exit
    let _ = std::fs::remove_dir_all(&data);
}
