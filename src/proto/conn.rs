//! One connection's protocol, from accept to close, without I/O.
//!
//! Owns: what a connection's bytes are ([`Transport`]: sniffing, the HTTP
//! request of a WebSocket upgrade, raw protocol v1 frames, WebSocket
//! frames), the bytes of an incomplete frame or message between reads, the
//! login phase and the heartbeat, idle and linger deadlines (through
//! [`Session`]), the WebSocket handshake and closing handshake, and the
//! decision for every frame a client sends.
//! Must not: do I/O, read a clock, take a lock or know about threads. The
//! caller feeds it bytes ([`Connection::on_read`]) and clock values
//! ([`Connection::on_tick`]); what the connection needs done outside itself
//! goes through the caller's [`Env`]: frames to write, logging in (the
//! authenticator and the directory), a message to route, a room to join or
//! publish to, the close. The worker (`runtime/worker/`) is the I/O glue
//! around it, and unit tests drive it with a virtual clock and a recording
//! `Env` (`tests` below).
//!
//! Size: one `Connection` lives in every slot of a worker's table, so it is
//! kept to 32 bytes (asserted; the transport rides in the session's
//! padding): a buffer is held only while a frame or a
//! fragmented message is incomplete.

use std::sync::Arc;

use bytes::Bytes;

use super::codes::{CloseCode, ErrorCode};
use super::frame::{
    clip_reason, decode, Frame, RoomOp, SendOutcome, MAX_LOGIN_FRAME_BYTES, PING_EMPTY, SEND_EX_AT_MOST_ONCE,
};
use super::json::ClientFrame;
use super::rate::{Budget, Exceeded, SendLimit};
use super::session::{Inbound, Phase, Session, Tick, TickAction, Timeouts};
use super::wire::{Wire, MAX_LOGIN_MESSAGE_BYTES, SUBPROTOCOLS};
use super::ws::{self, handshake, Decoder, WsEvent};
use crate::app::ClientMessageKind;
use crate::config::Config;
use crate::rooms::RoomError;

/// What a connection's bytes are.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Not known yet: the raw port with `websocket.sniff_on_raw_port`,
    /// before the first bytes.
    Sniff,
    /// An HTTP request: the WebSocket upgrade (or a page) is being read.
    Http,
    /// Raw protocol v1 frames.
    Raw,
    /// WebSocket frames, carrying protocol v1 as `wire` says (binary
    /// frames or JSON text).
    Ws(Wire),
}

/// The listener a connection came from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The raw TCP port; `sniff`: an HTTP request there is served as on the
    /// WebSocket port (`websocket.sniff_on_raw_port`).
    Raw { sniff: bool },
    /// The WebSocket port.
    WebSocket,
}

/// The worker-wide settings a connection obeys, taken from the config once.
#[derive(Clone, Debug)]
pub struct Rules {
    pub timeouts: Timeouts,
    /// `limits.max_frame_bytes`.
    pub max_frame_bytes: usize,
    /// The largest WebSocket message once logged in.
    pub ws_max_message: usize,
    pub client_send: bool,
    pub client_subscribe: bool,
    pub client_publish: bool,
    /// The application takes what the server does not route itself.
    pub has_hook: bool,
    pub allowed_origins: Vec<String>,
    pub max_handshake_bytes: usize,
    /// For LOGIN_OK.
    pub heartbeat_interval_ms: u32,
    pub idle_timeout_ms: u32,
    /// The body of the 400 an HTTP request on the raw port gets.
    pub wrong_port_text: String,
    /// `websocket.conformance_echo` (tests only, loopback only): WebSocket
    /// text and binary messages go back as they came, no login.
    pub conformance_echo: bool,
    /// The server has a message store (`store.kind` is not `none`).
    pub has_store: bool,
    /// A plain SEND is stored (`delivery.send_default = "reliable"` and a
    /// store).
    pub reliable_send: bool,
    /// What one user may originate through this worker
    /// (`limits.send_rate` and friends); `None`: no limit.
    pub send_limit: Option<SendLimit>,
}

impl Rules {
    pub fn new(
        config: &Config,
        timeouts: Timeouts,
        ws_addr: Option<std::net::SocketAddr>,
        has_hook: bool,
        has_store: bool,
    ) -> Rules {
        let wrong_port_text = match ws_addr {
            Some(a) => format!(
                "this is Switchboard's raw TCP port (protocol v1, docs/PROTOCOL.md); \
                 WebSocket and HTTP are served on ws://{a}/"
            ),
            None => "this is Switchboard's raw TCP port (protocol v1, docs/PROTOCOL.md); \
                     this server has no WebSocket port (websocket.listen is empty)"
                .to_string(),
        };
        Rules {
            timeouts,
            max_frame_bytes: config.limits.max_frame_bytes,
            ws_max_message: config.websocket.message_limit(config.limits.max_frame_bytes),
            client_send: config.routing.client_send,
            client_subscribe: config.rooms.client_subscribe,
            client_publish: config.rooms.client_publish,
            has_hook,
            allowed_origins: config.websocket.allowed_origins.clone(),
            max_handshake_bytes: config.websocket.max_handshake_bytes,
            heartbeat_interval_ms: config.timeouts.heartbeat_interval_ms as u32,
            idle_timeout_ms: config.timeouts.idle_timeout_ms as u32,
            wrong_port_text,
            conformance_echo: config.websocket.conformance_echo,
            has_store,
            reliable_send: has_store && config.delivery.send_default == crate::config::SendDefault::Reliable,
            send_limit: config.limits.send_limit(),
        }
    }

    /// Largest PUSH payload from user `from`: frames from the server are
    /// never longer than `limits.max_frame_bytes`, the size LOGIN_OK
    /// announces.
    pub fn max_push_payload(&self, from: &str) -> usize {
        (self.max_frame_bytes - super::frame::HEADER_LEN - 8 - 1).saturating_sub(from.len())
    }

    /// Largest payload of a message that goes to the store: its INBOX
    /// frame (seq, msg_id and timestamp more than a PUSH) fits too.
    pub fn max_inbox_payload(&self, from: &str) -> usize {
        super::frame::max_inbox_payload(self.max_frame_bytes, from)
    }
}

/// Events the counters count.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Count {
    /// A client frame of this type.
    FrameIn(super::frame::FrameType),
    /// A protocol error, closed with this code (0: an HTTP request on the
    /// raw port, answered with a 400 instead of a CLOSE).
    ProtocolError(u16),
    /// A refused LOGIN, with its LOGIN_ERROR code.
    LoginFailure(u16),
    Login,
    /// A connection on the sniffing raw port turned out to speak raw v1
    /// (one from the raw port without sniffing is raw from its accept).
    RawTransport,
    WsUpgrade,
    WsHandshakeFailure,
    HttpRequest,
    PingSent,
    LoginTimeout,
    IdleTimeout,
    /// A SEND, SEND_EX, PUBLISH or MESSAGE refused by its user's send
    /// budget (ERROR 118).
    RateLimited,
}

/// A refused login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginRefused {
    /// The LOGIN_ERROR code.
    pub code: u16,
    pub reason: String,
}

/// How a SEND to be stored is stored (SEND_EX's fields; a plain SEND
/// has neither).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreOpts {
    /// The sender's idempotency key; 0 = none.
    pub client_id: u64,
    /// The message expires this long after it is stored; 0 = only
    /// `store.ttl_ms` applies.
    pub ttl_ms: u32,
}

/// What a connection needs from the server around it. The worker carries
/// these out against its write slot, the directory, the rooms and the
/// application; tests record them.
pub trait Env {
    /// Queues a raw v1 server frame, encoded for the connection's wire.
    fn reply(&mut self, frame: Bytes);
    /// Queues bytes already in the connection's wire form (an HTTP response,
    /// a WebSocket control frame).
    fn reply_encoded(&mut self, bytes: Bytes);
    /// From now on frames for this connection are encoded as `wire`.
    fn set_wire(&mut self, wire: Wire);
    /// Checks a LOGIN (the authenticator) and enters the connection in the
    /// directory. Ok: the connection's id, for LOGIN_OK, and the user id as
    /// the directory keeps it.
    fn login(&mut self, user: &str, token: &[u8]) -> Result<(u64, Arc<str>), LoginRefused>;
    /// Opens the logged-in connection to deliveries with `login_ok` as its
    /// first frame.
    fn open(&mut self, login_ok: Bytes);
    /// While the server drains: the CLOSE reason with a reconnect hint for
    /// a connection that logs in now.
    fn draining(&mut self) -> Option<String>;
    /// SEND, at most once: `payload` from `from` to every connection of
    /// `to` online now. Returns the PUSH's msg_id and how many connections
    /// it was handed to.
    fn send(&mut self, from: &Arc<str>, to: &str, payload: &[u8]) -> (u64, u32);
    /// A reliable SEND (`ex`: SEND_EX) to store in `to`'s inbox, as
    /// `opts` says. Its answer (SEND_ACK, SEND_RESULT or ERROR) comes
    /// later, from the runtime, once the store has it. Err: the ERROR to
    /// answer now.
    fn store_send(
        &mut self,
        from: &Arc<str>,
        to: &str,
        payload: &[u8],
        req_id: u32,
        opts: StoreOpts,
        ex: bool,
    ) -> Result<(), (ErrorCode, String)>;
    /// A device logged in (LOGIN with a device id, after LOGIN_OK): its
    /// delivery window opens when the store answers with its position.
    /// Err: close the connection with this.
    fn device_login(&mut self, user: &Arc<str>, device: &str, last_seq: u64) -> Result<(), (CloseCode, String)>;
    /// The client's cumulative ACK, for the connection's window. Err: the
    /// ERROR to answer (not a device connection).
    fn ack(&mut self, seq: u64) -> Result<(), (ErrorCode, String)>;
    /// The client's FETCH, for the connection's window.
    fn fetch(&mut self, req_id: u32, after_seq: u64, limit: u16) -> Result<(), (ErrorCode, String)>;
    /// A message for the application. Err: the ERROR to answer with.
    fn to_application(
        &mut self,
        user: &Arc<str>,
        kind: ClientMessageKind,
        req_id: u32,
        payload: &[u8],
    ) -> Result<(), (ErrorCode, &'static str)>;
    /// Joins `room`; `creator`: the user a new room counts against
    /// (`rooms.max_rooms_created_per_user`), `None` when the application
    /// asked. Joining a room twice is not an error.
    fn join(&mut self, room: &str, creator: Option<&Arc<str>>) -> Result<(), RoomError>;
    /// Leaves `room` (nothing if not in it).
    fn leave(&mut self, room: &str);
    /// PUBLISH from `from` to `room`: membership, size, then the fan-out.
    /// Err: the ERROR to answer with.
    fn publish(&mut self, from: &Arc<str>, room: &str, payload: &[u8]) -> Result<(), (ErrorCode, String)>;
    /// The answer to a plain GET of `path` on the WebSocket port.
    fn page(&mut self, path: &str) -> Vec<u8>;
    /// The connection starts closing: it leaves the directory (if `user`)
    /// and its rooms, takes no more deliveries, and gets `last` (raw v1, or
    /// `encoded`) after what is queued, or instead of it (`discard_queue`),
    /// then FIN.
    fn closing(&mut self, user: Option<Arc<str>>, last: Bytes, encoded: bool, discard_queue: bool);
    /// Runs `f` on `user`'s send budget on this worker, shared by its
    /// connections here (`None`: none kept, its buckets are full), and
    /// keeps what `f` leaves (`None`: full, nothing to keep) until the
    /// next message one of them sends.
    fn with_budget<R>(&mut self, user: &Arc<str>, f: impl FnOnce(&mut Option<Budget>) -> R) -> R;
    /// A monotonic clock in milliseconds, for the send budget (read only
    /// when one is set).
    fn clock_ms(&mut self) -> u64;
    /// This connection of `user` is being closed (4009) for going on
    /// sending over its send budget: for the operator's log, which the
    /// caller keeps to a line a tick however many there are.
    fn over_budget_close(&mut self, user: &Arc<str>);
    /// Counts an event.
    fn count(&mut self, what: Count);
    /// Whether the connection's outbound queue refused a frame for it since
    /// the connection was handed this environment (a reply, or a delivery
    /// to itself): it is a slow consumer, to close with 4004 before acting
    /// on anything more.
    fn overflowed(&self) -> bool;
}

/// What a connection keeps between reads while a frame or a fragmented
/// WebSocket message is incomplete.
#[derive(Default)]
pub struct Held {
    /// Bytes of an incomplete frame.
    partial: Vec<u8>,
    /// WebSocket, mid-message: the decoder holding the fragments so far.
    ws: Option<Decoder>,
    /// The caller's bookkeeping for what this connection holds (the worker
    /// charges it to its budget); the connection never reads it.
    pub ticket: Option<HoldTicket>,
    /// A read completed a frame (or a WebSocket data message) and left the
    /// next one incomplete: the next [`Connection::settle`] hands the
    /// ticket back, so that the caller lists the holder anew, timed from
    /// now. `timeouts.message_timeout_ms` is per frame: a stream of frames
    /// larger than a read must not be timed from its first one.
    restart: bool,
}

/// The worker's record of a holder: its key in the worker's list and the
/// bytes charged.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HoldTicket {
    pub seq: u64,
    pub charged: usize,
}

/// Capacity an incomplete frame's buffer may keep beyond twice its length
/// between reads (more is given back).
const KEEP_PARTIAL_CAPACITY: usize = 4096;

/// What a timer visit leaves to the caller.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// Visit again at this tick.
    At(Tick),
    /// The linger after a close ran out: cut the connection off (and visit
    /// again a linger later in case that is lost).
    Finish,
}

/// One connection's protocol state. See the module doc.
pub struct Connection {
    /// Set once logged in; shared with the directory key.
    user: Option<Arc<str>>,
    held: Option<Box<Held>>,
    /// The session's timers and phase, with the transport as its tag.
    session: Session<Transport>,
}

const _: () = assert!(std::mem::size_of::<Connection>() <= 32);

/// Input that cannot be acted on.
enum Bad {
    /// Not decidable yet: wait for more bytes.
    Wait,
    /// An HTTP request on the raw port.
    WrongPort,
    /// Close with this code and reason.
    Close(u16, String),
}

/// A unit of input: a raw v1 frame or a WebSocket event.
enum Unit<'a> {
    Frame(Frame<'a>),
    Ws(WsEvent<'a>),
}

impl Connection {
    /// A connection accepted at `now` from `listener`.
    pub fn new(listener: Listener, now: Tick) -> Connection {
        let transport = match listener {
            Listener::WebSocket => Transport::Http,
            Listener::Raw { sniff: true } => Transport::Sniff,
            Listener::Raw { sniff: false } => Transport::Raw,
        };
        Connection { user: None, held: None, session: Session::with_tag(now, transport) }
    }

    /// How frames for a connection from `listener` are encoded at first.
    pub fn initial_wire(listener: Listener) -> Wire {
        match listener {
            Listener::WebSocket => Wire::Http,
            Listener::Raw { .. } => Wire::Raw,
        }
    }

    pub fn phase(&self) -> Phase {
        self.session.phase()
    }

    pub fn is_active(&self) -> bool {
        self.session.is_active()
    }

    pub fn is_closing(&self) -> bool {
        self.session.phase() == Phase::Closing
    }

    pub fn transport(&self) -> Transport {
        self.session.tag()
    }

    /// The user, once logged in (until the close starts).
    pub fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// When the connection next needs a timer visit.
    pub fn next_deadline(&self, t: &Timeouts) -> Tick {
        self.session.next_deadline(t)
    }

    /// What it holds between reads, if anything.
    pub fn held(&self) -> Option<&Held> {
        self.held.as_deref()
    }

    pub fn held_mut(&mut self) -> Option<&mut Held> {
        self.held.as_deref_mut()
    }

    /// Bytes an incomplete frame or message holds (buffer capacities, and
    /// the box holding them).
    pub fn held_bytes(&self) -> usize {
        self.held.as_deref().map_or(0, |h| {
            std::mem::size_of::<Held>() + h.partial.capacity() + h.ws.as_ref().map_or(0, Decoder::buffered_capacity)
        })
    }

    /// Takes the held buffers away (the caller is done with a connection).
    pub fn take_held(&mut self) -> Option<Box<Held>> {
        self.held.take()
    }

    // ---- input ------------------------------------------------------------------

    /// Bytes read from the socket at `now`. What completes a frame or a
    /// message is acted on; the rest is kept until the next read. (`data`
    /// may be changed: WebSocket payloads are unmasked in place.)
    pub fn on_read(&mut self, data: &mut [u8], now: Tick, rules: &Rules, env: &mut impl Env) {
        let mut held = self.held.take();
        let (mut partial, mut dec) = match held.as_deref_mut() {
            Some(h) => (std::mem::take(&mut h.partial), h.ws.take()),
            None => (Vec::new(), None),
        };
        let mut done = false;
        if partial.is_empty() {
            let used = self.consume(data, &mut dec, &mut done, now, rules, env);
            partial.extend_from_slice(&data[used..]);
        } else {
            partial.extend_from_slice(data);
            let used = self.consume(&mut partial, &mut dec, &mut done, now, rules, env);
            partial.drain(..used);
        }
        // Input is discarded once closing; what is incomplete is kept.
        let incomplete = !partial.is_empty() || dec.is_some();
        let keep = incomplete && !self.is_closing();
        match held {
            Some(mut h) => {
                if keep {
                    h.partial = partial;
                    h.ws = dec;
                    h.restart |= done;
                }
                // Emptied: `settle` lets it go and hands back its ticket.
                self.held = Some(h);
            }
            None if keep => self.held = Some(Box::new(Held { partial, ws: dec, ticket: None, restart: false })),
            None => {}
        }
    }

    /// After every call that may have changed what the connection holds:
    /// lets go of what no longer needs holding (an emptied buffer, or any
    /// buffer once closing) and gives back the capacity a shrunken one no
    /// longer uses. Returns the ticket of held buffers that went, for the
    /// caller to un-charge.
    pub fn settle(&mut self) -> Option<HoldTicket> {
        let h = self.held.as_deref_mut()?;
        if self.session.phase() == Phase::Closing || (h.partial.is_empty() && h.ws.is_none()) {
            return self.held.take().and_then(|h| h.ticket);
        }
        if std::mem::take(&mut h.restart) {
            return h.ticket.take();
        }
        if h.partial.is_empty() {
            h.partial = Vec::new();
        } else if h.partial.capacity() > 2 * h.partial.len().max(KEEP_PARTIAL_CAPACITY) {
            h.partial.shrink_to_fit();
        }
        None
    }

    /// Acts on the whole frames (or the HTTP request) at the start of
    /// `data`; returns the bytes consumed (all of them once closing: input
    /// is then discarded).
    fn consume(
        &mut self,
        data: &mut [u8],
        dec: &mut Option<Decoder>,
        done: &mut bool,
        now: Tick,
        rules: &Rules,
        env: &mut impl Env,
    ) -> usize {
        let mut off = 0;
        while off < data.len() && !self.is_closing() {
            let used = match self.session.tag() {
                Transport::Sniff => {
                    match handshake::looks_like_http(&data[off..]) {
                        None => break,
                        Some(true) => {
                            self.session.set_tag(Transport::Http);
                            env.set_wire(Wire::Http);
                        }
                        Some(false) => {
                            self.session.set_tag(Transport::Raw);
                            env.count(Count::RawTransport);
                        }
                    }
                    continue;
                }
                Transport::Http => self.http_request(&data[off..], now, rules, env),
                Transport::Raw | Transport::Ws(_) => self.frames(&mut data[off..], dec, done, now, rules, env),
            };
            if used == 0 {
                break;
            }
            off += used;
        }
        if self.is_closing() {
            *dec = None;
            return data.len();
        }
        off
    }

    /// Raw v1 frames or WebSocket frames: decodes and acts on every whole
    /// one. Before login nothing larger than the largest LOGIN is
    /// accepted, so a connection that has not logged in cannot make the
    /// server hold more.
    fn frames(
        &mut self,
        data: &mut [u8],
        kept: &mut Option<Decoder>,
        done: &mut bool,
        now: Tick,
        rules: &Rules,
        env: &mut impl Env,
    ) -> usize {
        let ws = matches!(self.session.tag(), Transport::Ws(_));
        let mut dec = if ws { Some(kept.take().unwrap_or_else(|| Decoder::new(rules.ws_max_message))) } else { None };
        let mut off = 0;
        while off < data.len() {
            let logged_in = match self.session.phase() {
                Phase::Active => true,
                Phase::AwaitingLogin => false,
                Phase::Closing => return data.len(),
            };
            let rest = &mut data[off..];
            let unit = match dec.as_mut() {
                None => {
                    let max = if logged_in { rules.max_frame_bytes } else { MAX_LOGIN_FRAME_BYTES };
                    decode(rest, max).map(|o| o.map(|(f, n)| (Unit::Frame(f), n))).map_err(|e| {
                        // The first bytes of a connection: an HTTP client on
                        // the wrong port (a browser, curl) gets an answer it
                        // can show, naming the right one.
                        let http = if logged_in { Some(false) } else { handshake::looks_like_http_request(rest) };
                        match http {
                            None => Bad::Wait, // could still be a method
                            Some(true) => Bad::WrongPort,
                            Some(false) => Bad::Close(e.close_code() as u16, e.to_string()),
                        }
                    })
                }
                Some(d) => {
                    // Before login, messages no larger than the largest
                    // login (a message already started keeps its limit).
                    // (The conformance echo has no login: the full limit.)
                    let full = logged_in || rules.conformance_echo;
                    d.set_max_message_bytes(if full { rules.ws_max_message } else { MAX_LOGIN_MESSAGE_BYTES });
                    d.decode(rest)
                        .map(|o| o.map(|(ev, n)| (Unit::Ws(ev), n)))
                        .map_err(|e| Bad::Close(e.close_code(), e.to_string()))
                }
            };
            match unit {
                Ok(None) | Err(Bad::Wait) => break,
                Ok(Some((unit, n))) => {
                    off += n;
                    // A control frame between a message's fragments does
                    // not restart its time.
                    *done |= matches!(unit, Unit::Frame(_) | Unit::Ws(WsEvent::Text(_) | WsEvent::Binary(_)));
                    match unit {
                        Unit::Frame(f) => self.on_frame(f, now, rules, env),
                        Unit::Ws(ev) => self.on_ws_event(ev, now, rules, env),
                    }
                    if self.closed_if_overflowed(now, env) {
                        return data.len();
                    }
                }
                Err(Bad::WrongPort) => {
                    env.count(Count::ProtocolError(0));
                    let response = handshake::response_error(400, &rules.wrong_port_text, &[]);
                    self.close_with(Bytes::from(response), true, false, now, env);
                    return data.len();
                }
                Err(Bad::Close(code, reason)) => {
                    env.count(Count::ProtocolError(code));
                    self.close(code, &reason, now, env);
                    return data.len();
                }
            }
        }
        // Kept mid-message, or mid-way through checking a text frame's
        // UTF-8 (so a large frame is not checked again from its start).
        if let Some(d) = dec.filter(|d| !d.is_idle()) {
            *kept = Some(d);
        }
        off
    }

    /// An HTTP request on the WebSocket port (or a sniffed raw port): the
    /// upgrade, a page, or an error response. Returns 0 until the whole
    /// head is in (bounded by `websocket.max_handshake_bytes`), then the
    /// bytes of the head; what follows is WebSocket frames.
    fn http_request(&mut self, data: &[u8], now: Tick, rules: &Rules, env: &mut impl Env) -> usize {
        match handshake::parse_request(data, rules.max_handshake_bytes) {
            Ok(None) => 0,
            Ok(Some((hs, n))) => {
                self.on_upgrade(&hs, now, rules, env);
                n
            }
            Err(handshake::HandshakeError::NotUpgrade { path }) => {
                env.count(Count::HttpRequest);
                let page = env.page(&path);
                self.close_with(Bytes::from(page), true, false, now, env);
                data.len()
            }
            Err(e) => {
                self.refuse_http(e.response(), now, env);
                data.len()
            }
        }
    }

    fn refuse_http(&mut self, response: Vec<u8>, now: Tick, env: &mut impl Env) {
        env.count(Count::WsHandshakeFailure);
        self.close_with(Bytes::from(response), true, false, now, env);
    }

    /// A valid upgrade request: Origin and subprotocol checks, the 101, and
    /// the login from the query string if there is one.
    fn on_upgrade(&mut self, hs: &handshake::Handshake, now: Tick, rules: &Rules, env: &mut impl Env) {
        if !handshake::origin_allowed(hs.origin.as_deref(), &rules.allowed_origins) {
            let reason = format!("origin {:?} is not in websocket.allowed_origins", hs.origin.as_deref().unwrap_or(""));
            return self.refuse_http(handshake::response_error(403, &reason, &[]), now, env);
        }
        let protocol = if hs.protocols.is_empty() {
            None
        } else {
            match handshake::choose_protocol(&hs.protocols, &SUBPROTOCOLS) {
                Some(p) => Some(p),
                None => {
                    let reason = format!(
                        "no supported subprotocol in Sec-WebSocket-Protocol; this server speaks {} and {}",
                        SUBPROTOCOLS[0], SUBPROTOCOLS[1]
                    );
                    return self.refuse_http(handshake::response_error(400, &reason, &[]), now, env);
                }
            }
        };
        env.reply_encoded(Bytes::from(handshake::response_101(&hs.accept(), protocol)));
        let wire = Wire::for_subprotocol(protocol);
        self.session.set_tag(Transport::Ws(wire));
        env.set_wire(wire);
        env.count(Count::WsUpgrade);
        if let Some(login) = hs.login() {
            self.on_frame(login, now, rules, env);
        }
    }

    fn on_ws_event(&mut self, ev: WsEvent<'_>, now: Tick, rules: &Rules, env: &mut impl Env) {
        if rules.conformance_echo {
            // Control frames and errors take the normal paths below.
            let echo = match ev {
                WsEvent::Text(text) => Some(ws::text_frame(text)),
                WsEvent::Binary(bytes) => Some(ws::binary_frame(bytes)),
                _ => None,
            };
            if let Some(frame) = echo {
                return env.reply_encoded(Bytes::from(frame));
            }
        }
        match ev {
            WsEvent::Text(text) => match ClientFrame::parse(text) {
                Ok(f) => self.on_frame(f.as_frame(), now, rules, env),
                Err(e) => {
                    env.count(Count::ProtocolError(e.close_code()));
                    self.close(e.close_code(), &e.to_string(), now, env);
                }
            },
            // JSON in a binary message (a browser's Blob or Uint8Array): a
            // binary message holds a raw v1 frame on either subprotocol
            // (PROTOCOL.md 13.5), and `{` would be read as the first byte
            // of a length of some 2 GB; say what went wrong instead.
            WsEvent::Binary(bytes) if bytes.first() == Some(&b'{') => {
                env.count(Count::ProtocolError(ws::close::UNSUPPORTED_DATA));
                let reason = "a binary message holds one raw protocol v1 frame; send JSON as a text message";
                self.close(ws::close::UNSUPPORTED_DATA, reason, now, env);
            }
            // Before login, at most the largest LOGIN, as on raw TCP.
            WsEvent::Binary(bytes) => match decode(
                bytes,
                if self.session.phase() == Phase::AwaitingLogin {
                    MAX_LOGIN_FRAME_BYTES
                } else {
                    rules.max_frame_bytes
                },
            ) {
                Ok(Some((frame, n))) if n == bytes.len() => self.on_frame(frame, now, rules, env),
                Ok(_) => {
                    env.count(Count::ProtocolError(ws::close::PROTOCOL_ERROR));
                    let reason = "a binary message must hold exactly one whole protocol v1 frame";
                    self.close(ws::close::PROTOCOL_ERROR, reason, now, env);
                }
                Err(e) => {
                    env.count(Count::ProtocolError(e.close_code() as u16));
                    self.close(e.close_code() as u16, &e.to_string(), now, env);
                }
            },
            WsEvent::Ping(data) => {
                self.alive(now);
                env.reply_encoded(Bytes::from(ws::pong_frame(data)));
            }
            WsEvent::Pong(_) => self.alive(now),
            WsEvent::Close { code, .. } => {
                // The closing handshake: echo the code, then close.
                let echo = match code {
                    Some(code) => Bytes::from(ws::close_frame(code, "")),
                    None => Bytes::from_static(&ws::CLOSE_EMPTY),
                };
                self.close_with(echo, true, false, now, env);
            }
            WsEvent::Fragment => {}
        }
    }

    /// A WebSocket ping or pong: liveness, like any frame, once logged in
    /// (before login only LOGIN counts, as on raw TCP).
    fn alive(&mut self, now: Tick) {
        if self.session.is_active() {
            let _ = self.session.on_frame(super::frame::FrameType::Pong, now);
        }
    }

    /// The decision for one client frame.
    fn on_frame(&mut self, frame: Frame<'_>, now: Tick, rules: &Rules, env: &mut impl Env) {
        env.count(Count::FrameIn(frame.frame_type()));
        match self.session.on_frame(frame.frame_type(), now) {
            Ok(Inbound::Process) => {}
            Ok(Inbound::Ignore) => return,
            Err(e) => {
                env.count(Count::ProtocolError(e.close_code() as u16));
                self.close(e.close_code() as u16, &e.to_string(), now, env);
                return;
            }
        }
        if let Some(limit) = &rules.send_limit {
            if !self.within_budget(&frame, limit, now, env) {
                return;
            }
        }
        match frame {
            Frame::Login { user, token, device, last_seq } => {
                self.login(user, token, device, last_seq, now, rules, env)
            }
            Frame::Ping { data } => {
                env.reply(Frame::Pong { data }.to_bytes().expect("PING data is bounded by the decoder"))
            }
            Frame::Pong { .. } => {}
            Frame::Send { req_id, to, payload } => {
                let store = rules.reliable_send.then_some(StoreOpts::default());
                self.send(req_id, to, payload, false, store, rules, env)
            }
            Frame::SendEx { req_id, flags, client_id, ttl_ms, to, payload } => {
                // Without a store it is relayed as a SEND is, and its
                // SEND_RESULT says so (outcome relayed, seq 0); its
                // `ttl_ms` then has nothing to expire.
                let store =
                    (flags & SEND_EX_AT_MOST_ONCE == 0 && rules.has_store).then_some(StoreOpts { client_id, ttl_ms });
                self.send(req_id, to, payload, true, store, rules, env)
            }
            Frame::Ack { seq } => {
                if let Err((code, reason)) = env.ack(seq) {
                    error(env, code, 0, &reason);
                }
            }
            Frame::Fetch { req_id, after_seq, limit } => {
                if let Err((code, reason)) = env.fetch(req_id, after_seq, limit) {
                    error(env, code, req_id, &reason);
                }
            }
            Frame::Message { req_id, payload } => {
                self.for_application(ClientMessageKind::Message, req_id, payload, env)
            }
            Frame::Close { .. } => {
                self.close(CloseCode::Normal as u16, "closed by client", now, env);
            }
            Frame::Subscribe { req_id, .. } | Frame::Unsubscribe { req_id, .. } if !rules.client_subscribe => {
                let reason = "clients may not join or leave rooms on this server (rooms.client_subscribe)";
                error(env, ErrorCode::SubscribeDisabled, req_id, reason);
            }
            Frame::Subscribe { req_id, room } => self.join(room, Some(req_id), env),
            Frame::Unsubscribe { req_id, room } => self.leave(room, Some(req_id), env),
            Frame::Publish { req_id, room, payload } => self.publish(req_id, room, payload, rules, env),
            // The session refuses server-only frames before we get here.
            Frame::LoginOk { .. }
            | Frame::LoginError { .. }
            | Frame::Push { .. }
            | Frame::SendAck { .. }
            | Frame::Error { .. }
            | Frame::RoomAck { .. }
            | Frame::RoomMsg { .. }
            | Frame::Skipped { .. }
            | Frame::Sync { .. }
            | Frame::Inbox { .. }
            | Frame::SendResult { .. } => {
                self.close(CloseCode::UnexpectedFrame as u16, "server-only frame", now, env);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn login(
        &mut self,
        user: &str,
        token: &[u8],
        device: Option<&str>,
        last_seq: u64,
        now: Tick,
        rules: &Rules,
        env: &mut impl Env,
    ) {
        let (conn_id, key) = match env.login(user, token) {
            Ok(granted) => granted,
            Err(refused) => {
                env.count(Count::LoginFailure(refused.code));
                let frame = Frame::LoginError { code: refused.code, reason: clip_reason(&refused.reason) }
                    .to_bytes()
                    .expect("reason clipped");
                self.close_with(frame, false, false, now, env);
                return;
            }
        };
        let ok = self.session.login_ok(now);
        debug_assert!(ok, "the session accepted LOGIN, so it was awaiting login");
        self.user = Some(key);
        env.count(Count::Login);
        let login_ok = Frame::LoginOk {
            conn_id,
            heartbeat_interval_ms: rules.heartbeat_interval_ms,
            idle_timeout_ms: rules.idle_timeout_ms,
            max_frame_bytes: rules.max_frame_bytes as u32,
        }
        .to_bytes()
        .expect("fixed-size frame");
        env.open(login_ok);
        if let (Some(device), Some(user)) = (device, self.user.clone()) {
            if let Err((code, reason)) = env.device_login(&user, device, last_seq) {
                self.close(code as u16, &reason, now, env);
                return;
            }
        }
        // Logged in while draining (it was logging in when the drain began,
        // or its accept completed as the listener was shut): its attempt
        // succeeded; now it gets the same CLOSE as everyone else.
        if let Some(reason) = env.draining() {
            self.close(CloseCode::GoingAway as u16, &reason, now, env);
        }
    }

    /// SEND (`ex`: SEND_EX, answered with SEND_RESULT instead of
    /// SEND_ACK): stored (`store`: how) or relayed at most once.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        req_id: u32,
        to: &str,
        payload: &[u8],
        ex: bool,
        store: Option<StoreOpts>,
        rules: &Rules,
        env: &mut impl Env,
    ) {
        if !rules.client_send {
            if rules.has_hook {
                let kind = ClientMessageKind::Send { to: to.to_string() };
                self.for_application(kind, req_id, payload, env);
            } else {
                error(env, ErrorCode::SendDisabled, req_id, "client-to-client SEND is disabled");
            }
            return;
        }
        let Some(from) = self.user.as_ref() else { return };
        let (max, fits) = match store {
            Some(_) => (rules.max_inbox_payload(from), "an INBOX"),
            None => (rules.max_push_payload(from), "a PUSH"),
        };
        if payload.len() > max {
            let reason = format!("payload of {} bytes: at most {max} fit {fits} from this user", payload.len());
            return error(env, ErrorCode::PayloadTooLarge, req_id, &reason);
        }
        if let Some(opts) = store {
            // Answered by the runtime once the store has it.
            if let Err((code, reason)) = env.store_send(from, to, payload, req_id, opts, ex) {
                error(env, code, req_id, &reason);
            }
            return;
        }
        let (msg_id, delivered) = env.send(from, to, payload);
        if req_id == 0 {
            return;
        }
        let answer = if ex {
            Frame::SendResult { req_id, outcome: SendOutcome::Relayed, seq: 0, msg_id, delivered }
        } else {
            Frame::SendAck { req_id, delivered }
        };
        env.reply(answer.to_bytes().expect("fixed-size frame"));
    }

    /// Whether the connection may originate `frame` now (`proto::rate`):
    /// SEND, SEND_EX, PUBLISH and MESSAGE spend its user's budget on this
    /// worker, one message and their payload's bytes; a FETCH one message
    /// and no bytes (it makes the store read a page and the server send
    /// it, again if the FETCH rewinds: unbudgeted, one client looping on
    /// it took a whole core of the server and a quarter of the store
    /// thread every user shares, DEPLOY.md "Abuse"); anything else is
    /// free. A frame over the budget is answered with ERROR 118 and not
    /// acted on (it pays nothing); after `limits.send_max_refused` of
    /// them in a row the connection is closed with 4009.
    fn within_budget(&mut self, frame: &Frame<'_>, limit: &SendLimit, now: Tick, env: &mut impl Env) -> bool {
        let (req_id, len) = match frame {
            Frame::Send { req_id, payload, .. }
            | Frame::SendEx { req_id, payload, .. }
            | Frame::Publish { req_id, payload, .. }
            | Frame::Message { req_id, payload } => (*req_id, payload.len()),
            Frame::Fetch { req_id, .. } => (*req_id, 0),
            _ => return true,
        };
        // The session lets these through only once logged in.
        let Some(user) = self.user.as_ref() else { return true };
        let now_ms = env.clock_ms();
        let spent = env.with_budget(user, |kept| {
            let mut budget = kept.unwrap_or_else(|| Budget::full(limit, now_ms));
            let spent = budget.spend(limit, now_ms, len);
            *kept = (!budget.is_full(limit, now_ms)).then_some(budget);
            spent
        });
        let Err(refused) = spent else { return true };
        env.count(Count::RateLimited);
        let (unit, key) = match (refused.which, refused.per_second) {
            (Exceeded::Messages, 1) => ("message", "limits.send_rate"),
            (Exceeded::Messages, _) => ("messages", "limits.send_rate"),
            (Exceeded::Bytes, 1) => ("payload byte", "limits.send_bytes_rate"),
            (Exceeded::Bytes, _) => ("payload bytes", "limits.send_bytes_rate"),
        };
        let rate = refused.per_second;
        if refused.close {
            env.over_budget_close(user);
            let reason = format!("went on sending over the send budget ({rate} {unit} a second, {key})");
            self.close(CloseCode::RateLimited as u16, &reason, now, env);
            return false;
        }
        let wait = refused.wait_ms;
        let reason = format!("rate limited: {rate} {unit} a second per user ({key}); retry in {wait} ms");
        error(env, ErrorCode::RateLimited, req_id, &reason);
        false
    }

    fn for_application(&mut self, kind: ClientMessageKind, req_id: u32, payload: &[u8], env: &mut impl Env) {
        let Some(user) = self.user.as_ref() else { return };
        if let Err((code, reason)) = env.to_application(user, kind, req_id, payload) {
            error(env, code, req_id, reason);
        }
    }

    /// Joins `room` and acknowledges it: a client's SUBSCRIBE (`req_id`),
    /// or the application's join (`None`: acknowledged with `req_id` 0, and
    /// a new room does not count against the user). Only once logged in.
    pub fn join(&mut self, room: &str, req_id: Option<u32>, env: &mut impl Env) {
        if !self.session.is_active() {
            return;
        }
        let creator = if req_id.is_some() { self.user.as_ref() } else { None };
        let req_id_or_0 = req_id.unwrap_or(0);
        match env.join(room, creator) {
            Ok(()) => room_ack(env, req_id_or_0, RoomOp::Subscribed, room),
            Err(e) => error(env, e.code(), req_id_or_0, &e.to_string()),
        }
    }

    /// Leaves `room` and acknowledges it (even if it was not in it).
    pub fn leave(&mut self, room: &str, req_id: Option<u32>, env: &mut impl Env) {
        if !self.session.is_active() {
            return;
        }
        env.leave(room);
        room_ack(env, req_id.unwrap_or(0), RoomOp::Unsubscribed, room);
    }

    fn publish(&mut self, req_id: u32, room: &str, payload: &[u8], rules: &Rules, env: &mut impl Env) {
        if !rules.client_publish {
            let reason = "clients may not publish on this server (rooms.client_publish)";
            return error(env, ErrorCode::PublishDisabled, req_id, reason);
        }
        let Some(from) = self.user.as_ref() else { return };
        match env.publish(from, room, payload) {
            Ok(()) if req_id != 0 => room_ack(env, req_id, RoomOp::Published, room),
            Ok(()) => {}
            Err((code, reason)) => error(env, code, req_id, &reason),
        }
    }

    // ---- time ------------------------------------------------------------------------

    /// A timer visit at `now` (the caller's wheel entry came due).
    pub fn on_tick(&mut self, now: Tick, rules: &Rules, env: &mut impl Env) -> Due {
        match self.session.on_tick(now, &rules.timeouts) {
            TickAction::Wait { next } => Due::At(next),
            TickAction::Ping { next } => {
                env.count(Count::PingSent);
                env.reply(Bytes::from_static(&PING_EMPTY));
                if self.closed_if_overflowed(now, env) {
                    return Due::At(self.next_deadline(&rules.timeouts));
                }
                Due::At(next)
            }
            TickAction::Close(code) => {
                match code {
                    CloseCode::LoginTimeout => env.count(Count::LoginTimeout),
                    CloseCode::IdleTimeout => env.count(Count::IdleTimeout),
                    _ => {}
                }
                self.close(code as u16, code.reason(), now, env);
                Due::At(self.next_deadline(&rules.timeouts))
            }
            TickAction::Finish => Due::Finish,
        }
    }

    // ---- closing -----------------------------------------------------------------------

    /// Starts closing with a CLOSE frame (`code`: one of ours, or a
    /// WebSocket one such as 1007). Returns false if it was closing
    /// already.
    pub fn close(&mut self, code: u16, reason: &str, now: Tick, env: &mut impl Env) -> bool {
        if self.is_closing() {
            return false;
        }
        tracing::debug!(code, "closing: {reason}");
        let frame = Frame::Close { code, reason: clip_reason(reason) }.to_bytes().expect("reason clipped");
        // A slow consumer's backlog is not worth waiting for.
        let discard = code == CloseCode::SlowConsumer as u16;
        self.close_with(frame, false, discard, now, env)
    }

    /// A write for this connection was refused by its full queue: closes
    /// it as a slow consumer (its backlog discarded) and says so, so that
    /// the caller acts on nothing more.
    fn closed_if_overflowed(&mut self, now: Tick, env: &mut impl Env) -> bool {
        if !env.overflowed() {
            return false;
        }
        self.close(CloseCode::SlowConsumer as u16, CloseCode::SlowConsumer.reason(), now, env);
        true
    }

    /// Starts closing with `last` as the final bytes (raw v1, or `encoded`
    /// in the connection's wire form). Returns false if it was closing
    /// already.
    fn close_with(&mut self, last: Bytes, encoded: bool, discard: bool, now: Tick, env: &mut impl Env) -> bool {
        if !self.session.start_close(now) {
            return false;
        }
        env.closing(self.user.take(), last, encoded, discard);
        true
    }
}

fn error(env: &mut impl Env, code: ErrorCode, req_id: u32, reason: &str) {
    env.reply(
        Frame::Error { code: code as u16, req_id, reason: clip_reason(reason) }.to_bytes().expect("reason clipped"),
    );
}

fn room_ack(env: &mut impl Env, req_id: u32, op: RoomOp, room: &str) {
    env.reply(Frame::RoomAck { req_id, op, room }.to_bytes().expect("room names are at most 255 bytes"));
}

/// The deterministic harness: a connection driven by a virtual clock and
/// byte streams split and merged at will, with an `Env` that records what
/// it is asked and answers logins and rooms by simple rules.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::SEND_EX_TTL;

    /// What the connection asked of its environment.
    #[derive(Clone, Debug, PartialEq)]
    enum Ev {
        Reply(Bytes),
        Encoded(Bytes),
        Wire(Wire),
        Open(Bytes),
        Send { to: String, payload: Vec<u8> },
        Store { to: String, req_id: u32, opts: StoreOpts, ex: bool },
        Device { device: String, last_seq: u64 },
        Ack(u64),
        Fetch { req_id: u32, after_seq: u64, limit: u16 },
        App { kind: ClientMessageKind, payload: Vec<u8> },
        Join(String),
        Leave(String),
        Publish(String),
        Closing { user: Option<String>, last: Bytes, encoded: bool, discard: bool },
    }

    #[derive(Default)]
    struct Rec {
        evs: Vec<Ev>,
        counts: Vec<Count>,
        /// Answers to `draining`.
        draining: bool,
        /// Users online (for SEND's delivered count).
        online: Vec<String>,
        /// Replies the outbound queue still takes (`None`: any number); a
        /// reply past them is refused and `overflowed` answers true.
        queue_room: Option<usize>,
        refused: bool,
        /// The send budget kept (`Env::with_budget`), and for whom.
        budget: Option<(String, Budget)>,
        /// `Env::clock_ms`.
        ms: u64,
        /// `Env::over_budget_close`'s users.
        over_budget: Vec<String>,
    }

    impl Env for Rec {
        fn reply(&mut self, frame: Bytes) {
            match &mut self.queue_room {
                Some(0) => self.refused = true,
                room => {
                    if let Some(n) = room {
                        *n -= 1;
                    }
                    self.evs.push(Ev::Reply(frame));
                }
            }
        }
        fn reply_encoded(&mut self, bytes: Bytes) {
            self.evs.push(Ev::Encoded(bytes));
        }
        fn set_wire(&mut self, wire: Wire) {
            self.evs.push(Ev::Wire(wire));
        }
        fn login(&mut self, user: &str, token: &[u8]) -> Result<(u64, Arc<str>), LoginRefused> {
            if token == b"good" {
                self.online.push(user.to_string());
                Ok((7, Arc::from(user)))
            } else {
                Err(LoginRefused { code: 1, reason: "bad token".into() })
            }
        }
        fn open(&mut self, login_ok: Bytes) {
            self.evs.push(Ev::Open(login_ok));
        }
        fn draining(&mut self) -> Option<String> {
            self.draining.then(|| "server going away; reconnect_ms=5".to_string())
        }
        fn send(&mut self, _from: &Arc<str>, to: &str, payload: &[u8]) -> (u64, u32) {
            self.evs.push(Ev::Send { to: to.into(), payload: payload.into() });
            (42, self.online.iter().filter(|u| *u == to).count() as u32)
        }
        fn store_send(
            &mut self,
            _from: &Arc<str>,
            to: &str,
            _payload: &[u8],
            req_id: u32,
            opts: StoreOpts,
            ex: bool,
        ) -> Result<(), (ErrorCode, String)> {
            self.evs.push(Ev::Store { to: to.into(), req_id, opts, ex });
            Ok(())
        }
        fn device_login(&mut self, _user: &Arc<str>, device: &str, last_seq: u64) -> Result<(), (CloseCode, String)> {
            self.evs.push(Ev::Device { device: device.into(), last_seq });
            Ok(())
        }
        fn ack(&mut self, seq: u64) -> Result<(), (ErrorCode, String)> {
            if !self.evs.iter().any(|e| matches!(e, Ev::Device { .. })) {
                return Err((ErrorCode::NotReliable, "no device".into()));
            }
            self.evs.push(Ev::Ack(seq));
            Ok(())
        }
        fn fetch(&mut self, req_id: u32, after_seq: u64, limit: u16) -> Result<(), (ErrorCode, String)> {
            self.evs.push(Ev::Fetch { req_id, after_seq, limit });
            Ok(())
        }
        fn to_application(
            &mut self,
            _user: &Arc<str>,
            kind: ClientMessageKind,
            _req_id: u32,
            payload: &[u8],
        ) -> Result<(), (ErrorCode, &'static str)> {
            self.evs.push(Ev::App { kind, payload: payload.into() });
            Ok(())
        }
        fn join(&mut self, room: &str, _creator: Option<&Arc<str>>) -> Result<(), RoomError> {
            self.evs.push(Ev::Join(room.into()));
            if room == "full" {
                return Err(RoomError::RoomFull { limit: 1 });
            }
            Ok(())
        }
        fn leave(&mut self, room: &str) {
            self.evs.push(Ev::Leave(room.into()));
        }
        fn publish(&mut self, _from: &Arc<str>, room: &str, _payload: &[u8]) -> Result<(), (ErrorCode, String)> {
            self.evs.push(Ev::Publish(room.into()));
            Ok(())
        }
        fn page(&mut self, path: &str) -> Vec<u8> {
            handshake::response_error(404, &format!("no page {path}"), &[])
        }
        fn closing(&mut self, user: Option<Arc<str>>, last: Bytes, encoded: bool, discard: bool) {
            let user = user.map(|u| u.to_string());
            self.evs.push(Ev::Closing { user, last, encoded, discard });
        }
        fn with_budget<R>(&mut self, user: &Arc<str>, f: impl FnOnce(&mut Option<Budget>) -> R) -> R {
            let mut kept = self.budget.as_ref().filter(|(u, _)| **u == **user).map(|(_, b)| *b);
            let r = f(&mut kept);
            self.budget = kept.map(|b| (user.to_string(), b));
            r
        }
        fn clock_ms(&mut self) -> u64 {
            self.ms
        }
        fn over_budget_close(&mut self, user: &Arc<str>) {
            self.over_budget.push(user.to_string());
        }
        fn count(&mut self, what: Count) {
            self.counts.push(what);
        }
        fn overflowed(&self) -> bool {
            self.refused
        }
    }

    impl Rec {
        /// The frames written, decoded as raw v1 (WebSocket-encoded bytes
        /// and HTTP answers as their first line).
        fn written(&self) -> Vec<String> {
            self.evs
                .iter()
                .filter_map(|e| match e {
                    Ev::Reply(b) | Ev::Open(b) => Some(describe(b)),
                    Ev::Closing { last, encoded: false, .. } => Some(format!("last {}", describe(last))),
                    Ev::Closing { last, encoded: true, .. } | Ev::Encoded(last) => {
                        let text = String::from_utf8_lossy(last);
                        Some(text.lines().next().unwrap_or("").to_string())
                    }
                    _ => None,
                })
                .collect()
        }

        fn closed_with(&self) -> Option<u16> {
            self.evs.iter().find_map(|e| match e {
                Ev::Closing { last, encoded: false, .. } => match decode(last, 1 << 20) {
                    Ok(Some((Frame::Close { code, .. }, _))) => Some(code),
                    Ok(Some((Frame::LoginError { code, .. }, _))) => Some(code),
                    _ => None,
                },
                _ => None,
            })
        }
    }

    fn describe(raw: &[u8]) -> String {
        match decode(raw, 1 << 20) {
            Ok(Some((f, _))) => format!("{:?}", f.frame_type()),
            other => format!("undecodable {other:?}"),
        }
    }

    fn rules() -> Rules {
        let mut config = Config::default();
        config.websocket.allowed_origins = vec!["*".into()];
        let t = Timeouts { login: 10, heartbeat: 30, idle: 60, linger: 2, message: 30 };
        Rules::new(&config, t, Some("127.0.0.1:7710".parse().unwrap()), false, false)
    }

    fn login(user: &str, token: &str) -> Vec<u8> {
        Frame::Login { user, token: token.as_bytes(), device: None, last_seq: 0 }.to_bytes().unwrap().to_vec()
    }

    /// Feeds `stream` in pieces ending at `cuts` (the rest at the end), all
    /// at tick `now`.
    fn feed(c: &mut Connection, env: &mut Rec, stream: &[u8], cuts: &[usize], now: Tick) {
        let rules = rules();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let mut piece = stream[from..cut].to_vec();
            if !piece.is_empty() {
                c.on_read(&mut piece, now, &rules, env);
                c.settle();
            }
            from = cut;
        }
    }

    fn raw() -> Connection {
        Connection::new(Listener::Raw { sniff: false }, 0)
    }

    #[test]
    fn a_login_split_anywhere_or_merged_with_what_follows_is_handled_once_in_order() {
        let mut stream = login("alice", "good");
        stream.extend_from_slice(&Frame::Ping { data: b"x" }.to_bytes().unwrap());
        stream.extend_from_slice(&Frame::Send { req_id: 9, to: "alice", payload: b"hi" }.to_bytes().unwrap());
        for cut in 0..=stream.len() {
            for cut2 in [cut, (cut + 3).min(stream.len())] {
                let (mut c, mut env) = (raw(), Rec::default());
                feed(&mut c, &mut env, &stream, &[cut, cut2], 1);
                assert_eq!(env.written(), ["LoginOk", "Pong", "SendAck"], "cuts at {cut} and {cut2}");
                assert!(c.is_active() && c.held().is_none(), "nothing held once every frame is whole");
            }
        }
    }

    #[test]
    fn an_incomplete_frame_is_held_and_let_go_when_it_completes() {
        let (mut c, mut env) = (raw(), Rec::default());
        let stream = login("bob", "good");
        let rules = rules();
        c.on_read(&mut stream[..10].to_vec(), 0, &rules, &mut env);
        assert!(c.settle().is_none());
        assert!(c.held_bytes() >= 10, "the first 10 bytes are held");
        c.held_mut().unwrap().ticket = Some(HoldTicket { seq: 3, charged: 99 });
        c.on_read(&mut stream[10..].to_vec(), 0, &rules, &mut env);
        assert_eq!(c.settle(), Some(HoldTicket { seq: 3, charged: 99 }), "the caller gets its ticket back");
        assert_eq!(c.held_bytes(), 0);
        assert!(c.is_active());
    }

    /// Each incomplete frame is timed on its own: a read that completes
    /// one frame and leaves the next incomplete hands the ticket back (the
    /// worker lists the holder anew, timed from then), while a read that
    /// completes nothing keeps it (the first frame's time runs on).
    #[test]
    fn a_read_that_completes_a_frame_and_starts_the_next_hands_the_ticket_back() {
        let (mut c, mut env) = (raw(), Rec::default());
        let rules = rules();
        feed(&mut c, &mut env, &login("bob", "good"), &[], 0);
        let ping = |i: u8| Frame::Ping { data: &[i; 8] }.to_bytes().unwrap();
        c.on_read(&mut ping(0)[..3].to_vec(), 1, &rules, &mut env);
        assert!(c.settle().is_none());
        c.held_mut().unwrap().ticket = Some(HoldTicket { seq: 7, charged: 10 });
        c.on_read(&mut ping(0)[3..5].to_vec(), 2, &rules, &mut env);
        assert!(c.settle().is_none(), "nothing completed: the first frame's time runs on");
        let mut rest = ping(0)[5..].to_vec();
        rest.extend_from_slice(&ping(1)[..3]);
        c.on_read(&mut rest, 3, &rules, &mut env);
        assert_eq!(c.settle(), Some(HoldTicket { seq: 7, charged: 10 }), "PING 0 done, PING 1 started");
        assert!(c.held().is_some() && c.held().unwrap().ticket.is_none(), "PING 1 is held, to be listed anew");
        assert_eq!(env.written().iter().filter(|w| w.starts_with("Pong")).count(), 1);
    }

    #[test]
    fn before_login_a_first_length_over_the_login_limit_closes_at_once() {
        let (mut c, mut env) = (raw(), Rec::default());
        feed(&mut c, &mut env, &[0x90], &[], 0);
        assert_eq!(env.closed_with(), Some(CloseCode::FrameTooLarge as u16));
        assert!(c.is_closing() && c.held().is_none());
    }

    #[test]
    fn an_http_request_on_the_raw_port_gets_a_400_naming_the_websocket_port() {
        let (mut c, mut env) = (raw(), Rec::default());
        feed(&mut c, &mut env, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &[2], 0);
        let Some(Ev::Closing { last, encoded: true, .. }) = env.evs.last() else { panic!("{:?}", env.evs) };
        let text = String::from_utf8_lossy(last);
        assert!(text.starts_with("HTTP/1.1 400") && text.contains("ws://127.0.0.1:7710/"), "{text}");
    }

    #[test]
    fn frames_before_login_and_server_frames_are_refused() {
        let (mut c, mut env) = (raw(), Rec::default());
        feed(&mut c, &mut env, &Frame::Ping { data: b"" }.to_bytes().unwrap(), &[], 0);
        assert_eq!(env.closed_with(), Some(CloseCode::UnexpectedFrame as u16));
        let (mut c, mut env) = (raw(), Rec::default());
        let mut s = login("a", "good");
        s.extend_from_slice(&Frame::SendAck { req_id: 1, delivered: 1 }.to_bytes().unwrap());
        feed(&mut c, &mut env, &s, &[], 0);
        assert_eq!(env.closed_with(), Some(CloseCode::UnexpectedFrame as u16));
    }

    #[test]
    fn a_refused_login_ends_with_login_error_and_nothing_after_it_is_read() {
        let (mut c, mut env) = (raw(), Rec::default());
        let mut s = login("mallory", "bad");
        s.extend_from_slice(&login("mallory", "good"));
        feed(&mut c, &mut env, &s, &[], 0);
        assert_eq!(env.written(), ["last LoginError"]);
        assert!(!env.evs.iter().any(|e| matches!(e, Ev::Open(_))));
        assert!(env.counts.contains(&Count::LoginFailure(1)));
    }

    #[test]
    fn a_login_while_draining_gets_login_ok_then_the_going_away_close() {
        let (mut c, mut env) = (raw(), Rec { draining: true, ..Rec::default() });
        feed(&mut c, &mut env, &login("late", "good"), &[], 0);
        assert_eq!(env.written(), ["LoginOk", "last Close"]);
        assert_eq!(env.closed_with(), Some(CloseCode::GoingAway as u16));
        let Some(Ev::Closing { user, .. }) = env.evs.last() else { panic!() };
        assert_eq!(user.as_deref(), Some("late"), "it leaves the directory");
    }

    #[test]
    fn the_login_deadline_heartbeat_and_idle_timeout_follow_the_virtual_clock() {
        let r = rules();
        // Never logs in: closed at the login deadline, not a tick earlier.
        let (mut c, mut env) = (raw(), Rec::default());
        assert_eq!(c.next_deadline(&r.timeouts), 10);
        assert_eq!(c.on_tick(9, &r, &mut env), Due::At(10));
        assert!(env.evs.is_empty());
        assert_eq!(c.on_tick(10, &r, &mut env), Due::At(12), "then the linger");
        assert_eq!(env.closed_with(), Some(CloseCode::LoginTimeout as u16));
        assert_eq!(c.on_tick(12, &r, &mut env), Due::Finish);

        // Logged in at 5: PING at 35, due to be answered by 65 (idle counts
        // from the last frame received); traffic at 40 answers it; silence
        // after the next PING (at 70) is fatal at 100.
        let (mut c, mut env) = (raw(), Rec::default());
        feed(&mut c, &mut env, &login("hb", "good"), &[], 5);
        assert_eq!(c.next_deadline(&r.timeouts), 35);
        assert_eq!(c.on_tick(35, &r, &mut env), Due::At(65));
        assert_eq!(env.written().last().map(String::as_str), Some("Ping"));
        feed(&mut c, &mut env, &Frame::Pong { data: b"" }.to_bytes().unwrap(), &[], 40);
        assert_eq!(c.next_deadline(&r.timeouts), 70);
        assert_eq!(c.on_tick(70, &r, &mut env), Due::At(100));
        assert_eq!(c.on_tick(99, &r, &mut env), Due::At(100));
        assert!(c.is_active());
        c.on_tick(100, &r, &mut env);
        assert_eq!(env.closed_with(), Some(CloseCode::IdleTimeout as u16));
        assert!(env.counts.contains(&Count::IdleTimeout) && env.counts.contains(&Count::PingSent));
    }

    /// A reply the full queue refused makes the connection a slow consumer:
    /// it closes with 4004 at once, and what followed in the same read (a
    /// SEND, a PING) is not acted on.
    #[test]
    fn a_refused_reply_closes_before_the_rest_of_the_read_is_acted_on() {
        let (mut c, mut env) = (raw(), Rec::default());
        feed(&mut c, &mut env, &login("hoarder", "good"), &[], 1);
        env.queue_room = Some(1);
        let mut s = Vec::new();
        for _ in 0..2 {
            s.extend_from_slice(&Frame::Ping { data: b"p" }.to_bytes().unwrap());
        }
        s.extend_from_slice(&Frame::Send { req_id: 3, to: "bob", payload: b"hi" }.to_bytes().unwrap());
        s.extend_from_slice(&Frame::Ping { data: b"q" }.to_bytes().unwrap());
        feed(&mut c, &mut env, &s, &[], 2);
        assert!(!env.evs.iter().any(|e| matches!(e, Ev::Send { .. })), "the SEND after the overflow is not relayed");
        assert_eq!(env.written(), ["LoginOk", "Pong", "last Close"]);
        assert_eq!(env.closed_with(), Some(CloseCode::SlowConsumer as u16));
        let Some(Ev::Closing { discard, .. }) = env.evs.last() else { panic!("{:?}", env.evs) };
        assert!(discard, "a slow consumer's backlog is not waited for");
        assert!(c.held().is_none());
    }

    /// A heartbeat PING the full queue refused closes the connection, and
    /// its next visit is the linger's end, not the idle deadline: the
    /// socket is released `close_linger_ms` later.
    #[test]
    fn a_refused_heartbeat_ping_closes_and_lingers_only_the_linger() {
        let r = rules();
        let (mut c, mut env) = (raw(), Rec::default());
        feed(&mut c, &mut env, &login("hb", "good"), &[], 5);
        env.queue_room = Some(0);
        assert_eq!(c.on_tick(35, &r, &mut env), Due::At(37), "closing: visited again after the linger (2)");
        assert_eq!(env.closed_with(), Some(CloseCode::SlowConsumer as u16));
        assert_eq!(c.on_tick(37, &r, &mut env), Due::Finish);
    }

    #[test]
    fn once_closing_input_is_discarded_and_nothing_is_held() {
        let (mut c, mut env) = (raw(), Rec::default());
        let mut s = login("c", "good");
        s.extend_from_slice(&Frame::Close { code: 1000, reason: "bye" }.to_bytes().unwrap());
        s.extend_from_slice(&Frame::Ping { data: b"" }.to_bytes().unwrap());
        s.extend_from_slice(&[0, 0, 0, 50, 1]); // the start of a frame
        feed(&mut c, &mut env, &s, &[], 0);
        assert_eq!(env.written(), ["LoginOk", "last Close"]);
        assert!(c.is_closing() && c.held().is_none());
        feed(&mut c, &mut env, &login("c", "good"), &[], 1);
        assert_eq!(env.written().len(), 2, "nothing after the close is acted on");
    }

    #[test]
    fn send_subscribe_publish_and_message_reach_the_environment_with_their_answers() {
        let (mut c, mut env) = (raw(), Rec::default());
        let mut s = login("u", "good");
        for f in [
            Frame::Send { req_id: 1, to: "u", payload: b"p" },
            Frame::Subscribe { req_id: 2, room: "news" },
            Frame::Subscribe { req_id: 3, room: "full" },
            Frame::Publish { req_id: 4, room: "news", payload: b"x" },
            Frame::Unsubscribe { req_id: 5, room: "news" },
            Frame::Message { req_id: 6, payload: b"m" },
        ] {
            s.extend_from_slice(&f.to_bytes().unwrap());
        }
        feed(&mut c, &mut env, &s, &[], 0);
        assert_eq!(env.written(), ["LoginOk", "SendAck", "RoomAck", "Error", "RoomAck", "RoomAck"]);
        assert!(env.evs.contains(&Ev::Send { to: "u".into(), payload: b"p".to_vec() }));
        assert!(env.evs.contains(&Ev::Join("full".into())) && env.evs.contains(&Ev::Leave("news".into())));
        assert!(env.evs.contains(&Ev::Publish("news".into())));
        assert!(env.evs.contains(&Ev::App { kind: ClientMessageKind::Message, payload: b"m".to_vec() }));
    }

    /// `limits.send_rate` 2 a second (burst 2) and `limits.send_bytes_rate`
    /// 100 bytes a second: what passes the budget is acted on, what does
    /// not gets ERROR 118 with its req_id (and how long to wait) and
    /// reaches nothing; ACK and SUBSCRIBE are free; the buckets fill by
    /// the millisecond; after `limits.send_max_refused` (3) refusals in a
    /// row the connection is closed with 4009.
    #[test]
    fn the_send_budget_refuses_with_118_then_closes_with_4009() {
        let mut config = Config::default();
        config.limits.send_rate = 2;
        config.limits.send_burst = 2;
        config.limits.send_bytes_rate = 100;
        config.limits.send_bytes_burst = 100;
        config.limits.send_max_refused = 3;
        config.limits.max_frame_bytes = 200;
        let r = Rules::new(&config, rules().timeouts, None, false, false);
        let (mut c, mut env) = (raw(), Rec::default());
        let frames = |fs: &[Frame<'_>]| fs.iter().flat_map(|f| f.to_bytes().unwrap().to_vec()).collect::<Vec<u8>>();
        // (code, req_id, reason) of every ERROR written.
        let errors = |env: &Rec| -> Vec<(u16, u32, String)> {
            env.evs
                .iter()
                .filter_map(|e| match e {
                    Ev::Reply(b) => match decode(b, 1 << 20) {
                        Ok(Some((Frame::Error { code, req_id, reason }, _))) => {
                            Some((code, req_id, reason.to_string()))
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        };
        env.ms = 10_000;
        let mut s = login("u", "good");
        s.extend(frames(&[
            Frame::Send { req_id: 1, to: "v", payload: b"one" },
            Frame::Subscribe { req_id: 2, room: "news" },
            Frame::Publish { req_id: 3, room: "news", payload: b"two" },
            Frame::Message { req_id: 4, payload: b"three" },
            Frame::Send { req_id: 5, to: "v", payload: b"four" },
        ]));
        c.on_read(&mut s, 10, &r, &mut env);
        assert_eq!(env.written(), ["LoginOk", "SendAck", "RoomAck", "RoomAck", "Error", "Error"]);
        let refused = errors(&env);
        assert_eq!(refused.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(), [(118, 4), (118, 5)]);
        assert_eq!(
            refused[0].2, "rate limited: 2 messages a second per user (limits.send_rate); retry in 500 ms",
            "half a second until one message's worth"
        );
        let acted: Vec<&Ev> =
            env.evs.iter().filter(|e| matches!(e, Ev::Send { .. } | Ev::Publish(_) | Ev::App { .. })).collect();
        assert_eq!(acted, [&Ev::Send { to: "v".into(), payload: b"one".to_vec() }, &Ev::Publish("news".into())]);
        assert_eq!(env.counts.iter().filter(|c| **c == Count::RateLimited).count(), 2);
        assert_eq!(env.budget.as_ref().map(|(u, _)| u.as_str()), Some("u"), "kept for the user, below full");

        // 600 ms later: 1.2 messages' worth, and the bytes full again
        // (100): a 90-byte payload fits. The ACK costs nothing (refused
        // as not reliable: no device).
        env.ms += 600;
        let big = [b'x'; 90];
        let mut s = frames(&[Frame::Send { req_id: 6, to: "v", payload: &big }, Frame::Ack { seq: 1 }]);
        env.evs.clear();
        c.on_read(&mut s, 10, &r, &mut env);
        assert_eq!(env.written(), ["SendAck", "Error"]);
        env.ms += 600;
        let mut s = frames(&[Frame::Send { req_id: 7, to: "v", payload: &big }]);
        env.evs.clear();
        c.on_read(&mut s, 10, &r, &mut env);
        // 600 ms more: 70 bytes, 20 short of the next 90 (200 ms).
        let refused = errors(&env);
        assert_eq!(refused.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(), [(118, 7)]);
        assert_eq!(
            refused[0].2,
            "rate limited: 100 payload bytes a second per user (limits.send_bytes_rate); retry in 200 ms"
        );

        // The refusals before the SEND taken do not count: the third in a
        // row since (req 9) closes, and what follows is not acted on.
        env.evs.clear();
        let mut s = frames(&[
            Frame::Send { req_id: 8, to: "v", payload: &big },
            Frame::Send { req_id: 9, to: "v", payload: &big },
            Frame::Send { req_id: 10, to: "v", payload: b"" },
        ]);
        c.on_read(&mut s, 10, &r, &mut env);
        assert_eq!(env.written(), ["Error", "last Close"]);
        assert_eq!(env.closed_with(), Some(CloseCode::RateLimited as u16));
        assert_eq!(env.over_budget, ["u"], "named for the log");
        assert!(!env.evs.iter().any(|e| matches!(e, Ev::Send { .. })), "nothing after the close is acted on");
    }

    /// A FETCH makes the store read a page and the server send it again
    /// (a FETCH at or below the position rewinds the window: PROTOCOL.md
    /// 15.7), so it spends one message of the send budget (no bytes): a
    /// client looping on FETCH gets ERROR 118 with the FETCH's req_id,
    /// the store sees nothing of it, and after `limits.send_max_refused`
    /// in a row it is closed with 4009, as for SENDs.
    #[test]
    fn a_fetch_spends_one_message_of_the_send_budget() {
        let mut config = Config::default();
        config.limits.send_rate = 2;
        config.limits.send_burst = 2;
        config.limits.send_bytes_rate = 100;
        config.limits.send_max_refused = 2;
        let r = Rules::new(&config, rules().timeouts, None, false, true);
        let (mut c, mut env) = (raw(), Rec::default());
        env.ms = 10_000;
        let mut s =
            Frame::Login { user: "u", token: b"good", device: Some("phone"), last_seq: 0 }.to_bytes().unwrap().to_vec();
        for req_id in 1..=4 {
            s.extend_from_slice(&Frame::Fetch { req_id, after_seq: 0, limit: 100 }.to_bytes().unwrap());
        }
        c.on_read(&mut s, 10, &r, &mut env);
        let fetched: Vec<u32> = env
            .evs
            .iter()
            .filter_map(|e| match e {
                Ev::Fetch { req_id, .. } => Some(*req_id),
                _ => None,
            })
            .collect();
        assert_eq!(fetched, [1, 2], "two a second, burst 2: the third and fourth are not acted on");
        assert_eq!(env.written(), ["LoginOk", "Error", "last Close"]);
        assert_eq!(env.closed_with(), Some(CloseCode::RateLimited as u16));
        assert_eq!(env.counts.iter().filter(|c| **c == Count::RateLimited).count(), 2);
        let refused = env.evs.iter().find_map(|e| match e {
            Ev::Reply(b) => match decode(b, 1 << 20) {
                Ok(Some((Frame::Error { code, req_id, .. }, _))) => Some((code, req_id)),
                _ => None,
            },
            _ => None,
        });
        assert_eq!(refused, Some((ErrorCode::RateLimited as u16, 3)));
    }

    #[test]
    fn a_device_login_sends_acks_and_fetches_reach_the_store_side() {
        let mut config = Config::default();
        config.limits.max_frame_bytes = 8192;
        let r = Rules::new(&config, rules().timeouts, None, false, true);
        assert!(r.reliable_send, "with a store, a plain SEND is stored by default");
        let (mut c, mut env) = (raw(), Rec::default());
        let mut s =
            Frame::Login { user: "u", token: b"good", device: Some("phone"), last_seq: 7 }.to_bytes().unwrap().to_vec();
        let too_big = vec![0u8; r.max_inbox_payload("u") + 1];
        for f in [
            Frame::Send { req_id: 1, to: "v", payload: b"stored" },
            Frame::SendEx { req_id: 2, flags: 0, client_id: 99, ttl_ms: 0, to: "v", payload: b"once" },
            Frame::SendEx {
                req_id: 3,
                flags: SEND_EX_AT_MOST_ONCE,
                client_id: 0,
                ttl_ms: 0,
                to: "u",
                payload: b"live",
            },
            Frame::SendEx {
                req_id: 7,
                flags: SEND_EX_TTL,
                client_id: 0,
                ttl_ms: 30_000,
                to: "v",
                payload: b"soon gone",
            },
            Frame::Send { req_id: 4, to: "v", payload: &too_big },
            Frame::Ack { seq: 5 },
            Frame::Fetch { req_id: 6, after_seq: 5, limit: 100 },
        ] {
            s.extend_from_slice(&f.to_bytes().unwrap());
        }
        for piece in s.chunks_mut(37) {
            c.on_read(piece, 0, &r, &mut env);
            c.settle();
        }
        assert!(env.evs.contains(&Ev::Device { device: "phone".into(), last_seq: 7 }));
        let opts = |client_id, ttl_ms| StoreOpts { client_id, ttl_ms };
        assert!(env.evs.contains(&Ev::Store { to: "v".into(), req_id: 1, opts: opts(0, 0), ex: false }));
        assert!(env.evs.contains(&Ev::Store { to: "v".into(), req_id: 2, opts: opts(99, 0), ex: true }));
        assert!(env.evs.contains(&Ev::Store { to: "v".into(), req_id: 7, opts: opts(0, 30_000), ex: true }));
        assert!(env.evs.contains(&Ev::Send { to: "u".into(), payload: b"live".to_vec() }));
        assert!(!env.evs.iter().any(|e| matches!(e, Ev::Store { req_id: 4, .. })), "too large to store");
        assert!(env.evs.contains(&Ev::Ack(5)));
        assert!(env.evs.contains(&Ev::Fetch { req_id: 6, after_seq: 5, limit: 100 }));
        // Stored SENDs are answered later by the runtime; the at-most-once
        // one at once, and the oversized one with ERROR 103.
        assert_eq!(env.written(), ["LoginOk", "SendResult", "Error"]);
        // Without a store, SEND_EX is relayed as a SEND is, and its
        // SEND_RESULT says so (PROTOCOL.md 3.22: outcome relayed, seq 0).
        let r = Rules::new(&config, rules().timeouts, None, false, false);
        let (mut c, mut env) = (raw(), Rec::default());
        let mut s = login("u", "good");
        s.extend_from_slice(
            &Frame::SendEx { req_id: 8, flags: 0, client_id: 1, ttl_ms: 0, to: "v", payload: b"x" }.to_bytes().unwrap(),
        );
        for (i, b) in s.iter().enumerate() {
            c.on_read(&mut [*b], i as Tick, &r, &mut env);
        }
        assert_eq!(env.written(), ["LoginOk", "SendResult"]);
        assert!(env.evs.contains(&Ev::Send { to: "v".into(), payload: b"x".to_vec() }));
        assert!(!env.evs.iter().any(|e| matches!(e, Ev::Store { .. })));
    }

    #[test]
    fn a_send_too_large_for_a_push_is_refused_without_routing() {
        let mut config = Config::default();
        config.limits.max_frame_bytes = 4096;
        let r = Rules::new(&config, rules().timeouts, None, false, false);
        let (mut c, mut env) = (raw(), Rec::default());
        let mut s = login("u", "good");
        let big = vec![b'x'; r.max_push_payload("u") + 1];
        s.extend_from_slice(&Frame::Send { req_id: 1, to: "v", payload: &big }.to_bytes().unwrap());
        c.on_read(&mut s, 0, &r, &mut env);
        assert_eq!(env.written(), ["LoginOk", "Error"]);
        assert!(!env.evs.iter().any(|e| matches!(e, Ev::Send { .. })));
    }

    // ---- WebSocket ----

    fn upgrade(query: &str) -> Vec<u8> {
        format!(
            "GET /{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: switchboard.v1.bin\r\n\r\n"
        )
        .into_bytes()
    }

    /// A client frame (masked, as clients must).
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(fin as u8) << 7 | opcode];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        let key = [1, 2, 3, 4];
        f.extend_from_slice(&key);
        let mut body = payload.to_vec();
        ws::apply_mask(&mut body, key);
        f.extend_from_slice(&body);
        f
    }

    fn ws_conn() -> Connection {
        Connection::new(Listener::WebSocket, 0)
    }

    #[test]
    fn an_upgrade_with_login_and_frames_split_anywhere_is_handled_once_in_order() {
        let mut stream = upgrade("?user=wendy&token=good");
        let head = stream.len();
        stream.extend_from_slice(&client_frame(0x9, true, b"hb"));
        stream.extend_from_slice(&client_frame(0x2, true, &Frame::Ping { data: b"" }.to_bytes().unwrap()));
        for cut in 1..stream.len() {
            let (mut c, mut env) = (ws_conn(), Rec::default());
            feed(&mut c, &mut env, &stream, &[cut], 0);
            assert_eq!(c.transport(), Transport::Ws(Wire::WsBinary), "cut at {cut}");
            let w = env.written();
            assert_eq!(w.len(), 4, "cut at {cut}: {w:?}");
            assert!(w[0].starts_with("HTTP/1.1 101"), "{w:?}");
            assert_eq!([&w[1][..], &w[3][..]], ["LoginOk", "Pong"], "cut at {cut} (head {head})");
            assert_eq!(env.evs.iter().filter(|e| **e == Ev::Encoded(Bytes::from(ws::pong_frame(b"hb")))).count(), 1);
            assert!(env.evs.contains(&Ev::Wire(Wire::WsBinary)));
        }
    }

    #[test]
    fn a_fragmented_message_is_held_until_its_last_fragment() {
        let (mut c, mut env) = (ws_conn(), Rec::default());
        feed(&mut c, &mut env, &upgrade("?user=f&token=good"), &[], 0);
        let ping = Frame::Ping { data: b"abc" }.to_bytes().unwrap();
        let (a, b) = ping.split_at(3);
        feed(&mut c, &mut env, &client_frame(0x2, false, a), &[], 1);
        assert!(c.held().is_some(), "the decoder holds the first fragment");
        feed(&mut c, &mut env, &client_frame(0x0, true, b), &[], 2);
        assert!(c.held().is_none());
        assert_eq!(env.written().last().map(String::as_str), Some("Pong"));
    }

    #[test]
    fn the_websocket_closing_handshake_echoes_the_code() {
        let (mut c, mut env) = (ws_conn(), Rec::default());
        feed(&mut c, &mut env, &upgrade(""), &[], 0);
        feed(&mut c, &mut env, &client_frame(0x8, true, &1000u16.to_be_bytes()), &[], 0);
        let Some(Ev::Closing { last, encoded: true, user: None, .. }) = env.evs.last() else { panic!("{:?}", env.evs) };
        assert_eq!(&last[..], &ws::close_frame(1000, "")[..]);
    }

    #[test]
    fn a_wrong_origin_or_subprotocol_is_refused_before_any_frame() {
        let mut config = Config::default();
        config.websocket.allowed_origins = vec!["https://good.example".into()];
        let r = Rules::new(&config, rules().timeouts, None, false, false);
        let (mut c, mut env) = (ws_conn(), Rec::default());
        let mut req = upgrade("");
        let at = req.len() - 2;
        req.splice(at..at, b"Origin: https://evil.example\r\n".iter().copied());
        c.on_read(&mut req, 0, &r, &mut env);
        assert!(env.written()[0].starts_with("HTTP/1.1 403"), "{:?}", env.written());
        assert!(env.counts.contains(&Count::WsHandshakeFailure));
        assert!(c.is_closing());

        let (mut c, mut env) = (ws_conn(), Rec::default());
        let req = String::from_utf8(upgrade("")).unwrap().replace("switchboard.v1.bin", "mqtt");
        feed(&mut c, &mut env, req.as_bytes(), &[], 0);
        let w = env.written();
        assert!(w[0].starts_with("HTTP/1.1 400"), "{w:?}");
        assert!(c.is_closing() && c.transport() == Transport::Http);
    }

    #[test]
    fn before_login_a_websocket_message_is_limited_to_the_largest_login() {
        let (mut c, mut env) = (ws_conn(), Rec::default());
        feed(&mut c, &mut env, &upgrade(""), &[], 0);
        let big = vec![0u8; MAX_LOGIN_MESSAGE_BYTES + 1];
        feed(&mut c, &mut env, &client_frame(0x2, true, &big), &[], 0);
        assert!(c.is_closing());
        assert_eq!(env.closed_with(), Some(ws::close::MESSAGE_TOO_BIG));
    }

    /// A binary message before login holds a frame of at most the largest
    /// LOGIN (4,433 bytes, PROTOCOL.md 2.3), as on raw TCP: a 5,000-byte
    /// LOGIN (within the 8,192 bytes of a WebSocket message before login)
    /// closes with 1009, not with a login error.
    #[test]
    fn before_login_a_binary_message_holds_at_most_the_largest_login_frame() {
        let (mut c, mut env) = (ws_conn(), Rec::default());
        feed(&mut c, &mut env, &upgrade(""), &[], 0);
        let token = "t".repeat(4_600);
        let frame = login("alice", &token);
        assert!(frame.len() > MAX_LOGIN_FRAME_BYTES && frame.len() < MAX_LOGIN_MESSAGE_BYTES);
        feed(&mut c, &mut env, &client_frame(0x2, true, &frame), &[], 0);
        assert!(c.is_closing());
        assert_eq!(env.closed_with(), Some(ws::close::MESSAGE_TOO_BIG), "{:?}", env.written());
    }

    /// JSON sent as a binary message (what a browser sends from a Blob or
    /// a Uint8Array) was read as a raw frame whose length is `{"ty`, and
    /// closed with 1009 "frame of 2065855613 bytes exceeds the limit": a
    /// browser developer could not tell what was wrong. It is 1003 with a
    /// reason that says.
    #[test]
    fn json_in_a_binary_message_is_refused_as_such() {
        for logged_in in [false, true] {
            let (mut c, mut env) = (ws_conn(), Rec::default());
            feed(&mut c, &mut env, &upgrade(if logged_in { "?user=alice&token=good" } else { "" }), &[], 0);
            assert_eq!(c.is_active(), logged_in);
            let json = br#"{"type":"send","to":"bob","payload":"hi"}"#;
            feed(&mut c, &mut env, &client_frame(0x2, true, json), &[], 0);
            assert!(c.is_closing());
            assert_eq!(env.closed_with(), Some(ws::close::UNSUPPORTED_DATA), "{:?}", env.written());
            assert!(format!("{:?}", env.evs).contains("send JSON as a text message"), "{:?}", env.evs);
        }
    }

    #[test]
    fn a_sniffing_raw_port_serves_either_protocol() {
        let (mut c, mut env) = (Connection::new(Listener::Raw { sniff: true }, 0), Rec::default());
        feed(&mut c, &mut env, &upgrade("?user=s&token=good"), &[1], 0);
        assert_eq!(env.evs[0], Ev::Wire(Wire::Http));
        assert!(c.is_active());
        let (mut c, mut env) = (Connection::new(Listener::Raw { sniff: true }, 0), Rec::default());
        feed(&mut c, &mut env, &login("s", "good"), &[1], 0);
        assert_eq!(c.transport(), Transport::Raw);
        assert_eq!(env.written(), ["LoginOk"]);
    }

    #[test]
    fn a_plain_get_is_answered_by_the_page_and_closed() {
        let (mut c, mut env) = (ws_conn(), Rec::default());
        feed(&mut c, &mut env, b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", &[], 0);
        assert!(env.written()[0].starts_with("HTTP/1.1 404"));
        assert!(c.is_closing());
        assert!(env.counts.contains(&Count::HttpRequest));
    }

    #[test]
    fn the_conformance_echo_returns_messages_without_a_login() {
        let mut config = Config::default();
        config.websocket.conformance_echo = true;
        let r = Rules::new(&config, rules().timeouts, None, false, false);
        let (mut c, mut env) = (ws_conn(), Rec::default());
        let mut s = upgrade("");
        s.extend_from_slice(&client_frame(0x1, true, "héllo".as_bytes()));
        s.extend_from_slice(&client_frame(0x2, true, &[0, 255]));
        c.on_read(&mut s, 0, &r, &mut env);
        assert!(env.evs.contains(&Ev::Encoded(Bytes::from(ws::text_frame("héllo")))));
        assert!(env.evs.contains(&Ev::Encoded(Bytes::from(ws::binary_frame(&[0, 255])))));
        assert!(!c.is_closing() && !c.is_active(), "echoed, not logged in");
    }

    #[test]
    fn the_machine_fits_its_slot() {
        assert!(std::mem::size_of::<Connection>() <= 32);
    }
}
