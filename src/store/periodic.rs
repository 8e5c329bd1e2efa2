//! A named thread that runs a turn every interval until it is dropped: the
//! disk store's helper threads (`writeback.rs`, `reaper.rs`).
//!
//! Owns: the thread and the channel that stops it.
//! Must not: outlive its owner (dropping it joins the thread, within a
//! turn).

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

/// The running thread; dropping it stops and joins it.
pub struct Periodic {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Periodic {
    /// Starts thread `name`, which calls `turn` every `interval`. `None` if
    /// the thread cannot be started.
    pub fn start(name: &str, interval: Duration, mut turn: impl FnMut() + Send + 'static) -> Option<Self> {
        let (tx, rx) = channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    turn();
                }
            })
            .ok()?;
        Some(Periodic { stop: Some(tx), thread: Some(thread) })
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
