//! Logging of login outcomes: every login and every refusal with its
//! reason at debug, and refusals at info at most once per
//! [`FAILURE_REPORT_INTERVAL_MS`], with how many there were since the last
//! report.
//!
//! Owns: [`Logged`], the wrapper the server puts around whichever
//! [`Authenticator`] is in force (the JWT check or the application's), and
//! the rate limit of its info line.
//! Must not: change a verdict, block, or let a flood of bad logins (a
//! client retrying an expired token in a loop, a scan) flood the log at
//! info: that is what the `login_failures` counter is for. User ids come
//! from the network, so they are logged quoted and escaped (`?user`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::auth::{AuthError, Authenticator};

/// At most one info line about refused logins per this many milliseconds.
pub const FAILURE_REPORT_INTERVAL_MS: u64 = 10_000;

/// An authenticator that logs what the one it wraps decides.
pub struct Logged<A: ?Sized> {
    epoch: Instant,
    /// When the last info line was written, in ms since `epoch`, plus one
    /// (0: never).
    last_report_ms: AtomicU64,
    /// Refusals since the last info line.
    unreported: AtomicU64,
    inner: std::sync::Arc<A>,
}

impl<A: Authenticator + ?Sized> Logged<A> {
    pub fn new(inner: std::sync::Arc<A>) -> Logged<A> {
        Logged { epoch: Instant::now(), last_report_ms: AtomicU64::new(0), unreported: AtomicU64::new(0), inner }
    }

    /// Counts a refusal, and says whether this one gets the info line (the
    /// first ever, then the first after each interval), with how many
    /// refusals it stands for.
    fn report_due(&self, now_ms: u64) -> Option<u64> {
        self.unreported.fetch_add(1, Ordering::Relaxed);
        let last = self.last_report_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms + 1 < last + FAILURE_REPORT_INTERVAL_MS {
            return None;
        }
        // One thread wins the line; the others stay counted for the next.
        self.last_report_ms.compare_exchange(last, now_ms + 1, Ordering::Relaxed, Ordering::Relaxed).ok()?;
        Some(self.unreported.swap(0, Ordering::Relaxed))
    }
}

impl<A: Authenticator + ?Sized> Authenticator for Logged<A> {
    fn authenticate(&self, user: &str, token: &[u8], now_unix_s: u64) -> Result<(), AuthError> {
        let verdict = self.inner.authenticate(user, token, now_unix_s);
        match &verdict {
            Ok(()) => tracing::debug!(user, "login accepted"),
            Err(e) => {
                tracing::debug!(user, code = e.code() as u16, "login refused: {e}");
                if let Some(n) = self.report_due(self.epoch.elapsed().as_millis() as u64) {
                    tracing::info!(
                        refused = n,
                        user,
                        "{n} login(s) refused since the last report (at most one report per {} s; every one is \
                         counted in login_failures, and logged at debug); latest: {e}",
                        FAILURE_REPORT_INTERVAL_MS / 1000
                    );
                }
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuse(_: &str, _: &[u8], _: u64) -> Result<(), AuthError> {
        Err(AuthError::Expired)
    }

    #[test]
    fn refusals_are_reported_once_per_interval_with_their_count() {
        let l = Logged::new(std::sync::Arc::new(refuse));
        assert_eq!(l.report_due(0), Some(1), "the first refusal is reported at once");
        assert_eq!(l.report_due(10), None);
        assert_eq!(l.report_due(FAILURE_REPORT_INTERVAL_MS - 1), None);
        assert_eq!(l.report_due(FAILURE_REPORT_INTERVAL_MS + 5), Some(3), "the two held back, and this one");
        assert_eq!(l.report_due(FAILURE_REPORT_INTERVAL_MS + 6), None);
        assert_eq!(l.report_due(3 * FAILURE_REPORT_INTERVAL_MS), Some(2));
        assert_eq!(l.authenticate("u", b"t", 0), Err(AuthError::Expired), "the verdict is passed on");
    }
}
