//! Per-connection session state machine: login, liveness and closing.
//!
//! Owns: which frames a connection may send in each phase, the login
//! deadline, server-initiated heartbeats, the idle timeout and the linger
//! after a close. Time is a [`Tick`] passed in by the caller (the worker's
//! coarse wheel, or a virtual clock in tests).
//! Must not: do I/O, read a clock, or hold anything but a few words: one
//! `Session` lives in every connection slot, so it is 8 bytes (asserted).
//! The timeouts are not stored per connection: the caller passes the
//! worker-wide [`Timeouts`] to every call.

use thiserror::Error;

use super::codes::CloseCode;
use super::frame::FrameType;

/// Coarse time in wheel ticks (the worker's tick length, 1 s by default).
/// Wraps; only differences are compared.
pub type Tick = u32;

/// Session timeouts in ticks, shared by every connection of a worker.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A connection that has not logged in after this long is closed.
    pub login: Tick,
    /// After this long without receiving anything, the server sends PING.
    pub heartbeat: Tick,
    /// After this long without receiving anything, the connection is dead.
    pub idle: Tick,
    /// After a close starts, how long to wait for the peer's FIN.
    pub linger: Tick,
    /// A frame (or fragmented WebSocket message) must arrive whole within
    /// this long of the read that left it incomplete.
    pub message: Tick,
}

impl Timeouts {
    /// Checks the relations the state machine relies on.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.login == 0 || self.heartbeat == 0 || self.idle == 0 || self.linger == 0 || self.message == 0 {
            return Err("every timeout must be at least one tick");
        }
        if self.idle <= self.heartbeat {
            return Err("the idle timeout must be longer than the heartbeat interval");
        }
        Ok(())
    }
}

/// Where a connection is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, no successful LOGIN yet.
    AwaitingLogin,
    /// Logged in.
    Active,
    /// A close has started; input is discarded until the peer's FIN or the
    /// linger deadline.
    Closing,
}

/// A frame that is well-formed but not allowed now.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("{frame} is not allowed before LOGIN")]
    NotLoggedIn { frame: &'static str },
    #[error("already logged in")]
    AlreadyLoggedIn,
    #[error("{frame} is sent by the server only")]
    ServerOnly { frame: &'static str },
}

impl SessionError {
    /// The close code for this error.
    pub fn close_code(&self) -> CloseCode {
        CloseCode::UnexpectedFrame
    }
}

/// What the caller does with an inbound frame the session accepted.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Act on the frame.
    Process,
    /// Drop it: the connection is closing.
    Ignore,
}

/// What a timer visit asks the caller to do.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TickAction {
    /// Nothing now; visit again at `next`.
    Wait { next: Tick },
    /// Send a PING now; visit again at `next`.
    Ping { next: Tick },
    /// Start closing with this code (then visit at the linger deadline).
    Close(CloseCode),
    /// The linger after a close ran out: release the connection.
    Finish,
}

/// The state machine itself. 8 bytes, with a one-byte `tag` the owner may
/// keep in what would otherwise be padding (`proto::conn` keeps the
/// connection's transport there: one slot of a worker's table is 56 bytes
/// instead of 64). The session never reads the tag.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Session<T: Copy = ()> {
    /// AwaitingLogin: when accepted. Active: last time anything arrived.
    /// Closing: when the close started.
    mark: Tick,
    phase: Phase,
    /// Active only: a PING was sent and nothing arrived since.
    ping_outstanding: bool,
    tag: T,
}

const _: () = assert!(std::mem::size_of::<Session>() == 8);
const _: () = assert!(std::mem::size_of::<Session<u8>>() == 8);

impl Session {
    /// A freshly accepted connection.
    pub fn new(now: Tick) -> Session {
        Session::with_tag(now, ())
    }
}

impl<T: Copy> Session<T> {
    /// A freshly accepted connection, with the owner's tag.
    pub fn with_tag(now: Tick, tag: T) -> Session<T> {
        Session { mark: now, phase: Phase::AwaitingLogin, ping_outstanding: false, tag }
    }

    /// The owner's tag.
    pub fn tag(&self) -> T {
        self.tag
    }

    pub fn set_tag(&mut self, tag: T) {
        self.tag = tag;
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// True once logged in and not closing.
    pub fn is_active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// Checks an inbound frame against the phase; any accepted traffic
    /// counts as liveness.
    pub fn on_frame(&mut self, ty: FrameType, now: Tick) -> Result<Inbound, SessionError> {
        if matches!(
            ty,
            FrameType::LoginOk
                | FrameType::LoginError
                | FrameType::Push
                | FrameType::SendAck
                | FrameType::Error
                | FrameType::RoomAck
                | FrameType::RoomMsg
                | FrameType::Skipped
                | FrameType::Sync
                | FrameType::Inbox
                | FrameType::SendResult
        ) && self.phase != Phase::Closing
        {
            return Err(SessionError::ServerOnly { frame: ty.name() });
        }
        match (self.phase, ty) {
            (Phase::Closing, _) => Ok(Inbound::Ignore),
            (Phase::AwaitingLogin, FrameType::Login) => Ok(Inbound::Process),
            (Phase::AwaitingLogin, FrameType::Close) => Ok(Inbound::Process),
            (Phase::AwaitingLogin, _) => Err(SessionError::NotLoggedIn { frame: ty.name() }),
            (Phase::Active, FrameType::Login) => Err(SessionError::AlreadyLoggedIn),
            (Phase::Active, _) => {
                self.mark = now;
                self.ping_outstanding = false;
                Ok(Inbound::Process)
            }
        }
    }

    /// The LOGIN was accepted. Returns false (and changes nothing) unless the
    /// session was awaiting login.
    pub fn login_ok(&mut self, now: Tick) -> bool {
        if self.phase != Phase::AwaitingLogin {
            return false;
        }
        self.phase = Phase::Active;
        self.mark = now;
        self.ping_outstanding = false;
        true
    }

    /// Starts closing. Returns false if a close had already started.
    pub fn start_close(&mut self, now: Tick) -> bool {
        if self.phase == Phase::Closing {
            return false;
        }
        self.phase = Phase::Closing;
        self.mark = now;
        self.ping_outstanding = false;
        true
    }

    /// When the timer should next visit this session.
    pub fn next_deadline(&self, t: &Timeouts) -> Tick {
        match self.phase {
            Phase::AwaitingLogin => self.mark.wrapping_add(t.login),
            Phase::Active if self.ping_outstanding => self.mark.wrapping_add(t.idle),
            Phase::Active => self.mark.wrapping_add(t.heartbeat),
            Phase::Closing => self.mark.wrapping_add(t.linger),
        }
    }

    /// A timer visit at `now`. Early visits (the wheel is coarse and
    /// re-buckets lazily) just return the real deadline.
    pub fn on_tick(&mut self, now: Tick, t: &Timeouts) -> TickAction {
        let elapsed = now.wrapping_sub(self.mark);
        match self.phase {
            Phase::AwaitingLogin if elapsed >= t.login => TickAction::Close(CloseCode::LoginTimeout),
            Phase::Active if elapsed >= t.idle => TickAction::Close(CloseCode::IdleTimeout),
            Phase::Active if elapsed >= t.heartbeat && !self.ping_outstanding => {
                self.ping_outstanding = true;
                TickAction::Ping { next: self.next_deadline(t) }
            }
            Phase::Closing if elapsed >= t.linger => TickAction::Finish,
            _ => TickAction::Wait { next: self.next_deadline(t) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts { login: 10, heartbeat: 240, idle: 300, linger: 2, message: 30 };

    #[test]
    fn login_deadline_closes_a_silent_connection() {
        let mut s = Session::new(100);
        assert_eq!(s.on_tick(105, &T), TickAction::Wait { next: 110 });
        assert_eq!(s.on_tick(110, &T), TickAction::Close(CloseCode::LoginTimeout));
    }

    #[test]
    fn only_login_is_allowed_before_login() {
        let mut s = Session::new(0);
        assert_eq!(s.on_frame(FrameType::Send, 1), Err(SessionError::NotLoggedIn { frame: "SEND" }));
        assert_eq!(s.on_frame(FrameType::Ping, 1), Err(SessionError::NotLoggedIn { frame: "PING" }));
        assert_eq!(s.on_frame(FrameType::Push, 1), Err(SessionError::ServerOnly { frame: "PUSH" }));
        assert_eq!(s.on_frame(FrameType::RoomMsg, 1), Err(SessionError::ServerOnly { frame: "ROOM_MSG" }));
        assert_eq!(s.on_frame(FrameType::Subscribe, 1), Err(SessionError::NotLoggedIn { frame: "SUBSCRIBE" }));
        assert_eq!(s.on_frame(FrameType::Login, 1), Ok(Inbound::Process));
        assert!(s.login_ok(2));
        assert_eq!(s.on_frame(FrameType::Login, 3), Err(SessionError::AlreadyLoggedIn));
        assert!(!s.login_ok(3), "a second login_ok is refused");
    }

    #[test]
    fn reliable_client_frames_need_a_login_and_server_frames_are_refused() {
        let mut s = Session::new(0);
        for (ty, name) in [(FrameType::Ack, "ACK"), (FrameType::Fetch, "FETCH"), (FrameType::SendEx, "SEND_EX")] {
            assert_eq!(s.on_frame(ty, 1), Err(SessionError::NotLoggedIn { frame: name }));
        }
        for (ty, name) in
            [(FrameType::Sync, "SYNC"), (FrameType::Inbox, "INBOX"), (FrameType::SendResult, "SEND_RESULT")]
        {
            assert_eq!(s.on_frame(ty, 1), Err(SessionError::ServerOnly { frame: name }));
        }
        assert!(s.login_ok(2));
        for ty in [FrameType::Ack, FrameType::Fetch, FrameType::SendEx] {
            assert_eq!(s.on_frame(ty, 3), Ok(Inbound::Process));
        }
        for ty in [FrameType::Sync, FrameType::Inbox, FrameType::SendResult] {
            assert_eq!(s.on_frame(ty, 3), Err(SessionError::ServerOnly { frame: ty.name() }));
        }
    }

    #[test]
    fn silence_brings_a_ping_then_the_idle_close() {
        let mut s = Session::new(0);
        s.login_ok(0);
        assert_eq!(s.on_tick(1, &T), TickAction::Wait { next: 240 });
        assert_eq!(s.on_tick(240, &T), TickAction::Ping { next: 300 });
        // A second visit before the idle deadline does not ping again.
        assert_eq!(s.on_tick(250, &T), TickAction::Wait { next: 300 });
        assert_eq!(s.on_tick(300, &T), TickAction::Close(CloseCode::IdleTimeout));
    }

    #[test]
    fn any_traffic_refreshes_liveness_and_clears_the_ping() {
        let mut s = Session::new(0);
        s.login_ok(0);
        assert_eq!(s.on_tick(240, &T), TickAction::Ping { next: 300 });
        assert_eq!(s.on_frame(FrameType::Pong, 260), Ok(Inbound::Process));
        assert_eq!(s.on_tick(300, &T), TickAction::Wait { next: 500 });
        assert_eq!(s.on_tick(500, &T), TickAction::Ping { next: 560 });
        assert_eq!(s.on_frame(FrameType::Send, 520), Ok(Inbound::Process));
        assert_eq!(s.on_tick(560, &T), TickAction::Wait { next: 760 });
    }

    #[test]
    fn closing_discards_input_and_finishes_after_linger() {
        let mut s = Session::new(0);
        s.login_ok(0);
        assert!(s.start_close(50));
        assert!(!s.start_close(51), "a close starts once");
        assert_eq!(s.on_frame(FrameType::Send, 51), Ok(Inbound::Ignore));
        assert_eq!(s.on_frame(FrameType::Push, 51), Ok(Inbound::Ignore));
        assert_eq!(s.on_tick(51, &T), TickAction::Wait { next: 52 });
        assert_eq!(s.on_tick(52, &T), TickAction::Finish);
    }

    #[test]
    fn time_wraps_around() {
        let mut s = Session::new(u32::MAX - 5);
        s.login_ok(u32::MAX - 5);
        assert_eq!(s.on_tick(234, &T), TickAction::Ping { next: 294 });
    }

    #[test]
    fn timeouts_are_validated() {
        assert!(T.validate().is_ok());
        assert!(Timeouts { idle: 240, ..T }.validate().is_err());
        assert!(Timeouts { login: 0, ..T }.validate().is_err());
    }
}
