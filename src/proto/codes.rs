//! Numeric codes carried on the wire: close codes, login error codes and
//! non-fatal error codes.
//!
//! Owns: the numbers and their meaning (mirrored in `docs/PROTOCOL.md`).
//! Must not: change a published number; new codes get new numbers.
//! Close codes below 4000 match WebSocket's (RFC 6455 §7.4.1) where the
//! meaning is the same, so the WebSocket transport can reuse them.

/// Why a connection is closed; sent in CLOSE before the socket is shut down.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The peer asked to close.
    Normal = 1000,
    /// The server is shutting down or draining; reconnect later.
    GoingAway = 1001,
    /// A malformed frame (the reason names the field).
    ProtocolError = 1002,
    /// A frame, or a fragmented WebSocket message, not completed within
    /// `timeouts.message_timeout_ms`.
    PolicyViolation = 1008,
    /// A frame longer than the server's `max_frame_bytes` (before login:
    /// longer than the largest LOGIN).
    FrameTooLarge = 1009,
    /// The worker's budget for incomplete frames
    /// (`limits.partial_bytes_per_worker`) ran out, and this connection had
    /// held one longest. Retry later.
    TryAgainLater = 1013,
    /// A frame with a protocol version this server does not speak.
    UnsupportedVersion = 4000,
    /// No LOGIN within the login deadline.
    LoginTimeout = 4001,
    /// Nothing received for the idle timeout (no PONG to our PING).
    IdleTimeout = 4002,
    /// The application kicked this user.
    Kicked = 4003,
    /// The client read too slowly: its outbound queue passed the limit.
    SlowConsumer = 4004,
    /// The worker's connection table is full.
    ServerFull = 4005,
    /// A valid frame that is not allowed now (SEND before LOGIN, a second
    /// LOGIN, a server-only frame from a client).
    UnexpectedFrame = 4006,
    /// Reliable delivery: `delivery.max_retransmits` retransmits in a row
    /// went by without the device's ACK position moving.
    AckTimeout = 4007,
    /// Reliable delivery: a LOGIN of the same user and device on another
    /// connection of this server took over (the newest login wins).
    Replaced = 4008,
    /// The connection's `limits.send_max_refused`th SEND in a row over its
    /// user's send budget (the ones before got ERROR 118).
    RateLimited = 4009,
}

impl CloseCode {
    /// Human-readable reason sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal close",
            CloseCode::GoingAway => "server going away",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::PolicyViolation => "message not completed in time",
            CloseCode::FrameTooLarge => "frame too large",
            CloseCode::TryAgainLater => "server busy: buffer budget exhausted, try again later",
            CloseCode::UnsupportedVersion => "unsupported protocol version",
            CloseCode::LoginTimeout => "login timeout",
            CloseCode::IdleTimeout => "idle timeout",
            CloseCode::Kicked => "kicked",
            CloseCode::SlowConsumer => "slow consumer: outbound queue over limit",
            CloseCode::ServerFull => "server full",
            CloseCode::UnexpectedFrame => "unexpected frame",
            CloseCode::AckTimeout => "no ACK after repeated retransmits",
            CloseCode::Replaced => "this device logged in on another connection",
            CloseCode::RateLimited => "went on sending over the send budget",
        }
    }

    /// Maps a wire number back to a known code.
    pub fn from_u16(v: u16) -> Option<CloseCode> {
        Some(match v {
            1000 => CloseCode::Normal,
            1001 => CloseCode::GoingAway,
            1002 => CloseCode::ProtocolError,
            1008 => CloseCode::PolicyViolation,
            1009 => CloseCode::FrameTooLarge,
            1013 => CloseCode::TryAgainLater,
            4000 => CloseCode::UnsupportedVersion,
            4001 => CloseCode::LoginTimeout,
            4002 => CloseCode::IdleTimeout,
            4003 => CloseCode::Kicked,
            4004 => CloseCode::SlowConsumer,
            4005 => CloseCode::ServerFull,
            4006 => CloseCode::UnexpectedFrame,
            4007 => CloseCode::AckTimeout,
            4008 => CloseCode::Replaced,
            4009 => CloseCode::RateLimited,
            _ => return None,
        })
    }
}

/// Why a LOGIN was refused; sent in LOGIN_ERROR, then the server closes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum LoginErrorCode {
    /// The token is not a well-formed JWT.
    MalformedToken = 1,
    /// The signature does not match the server's secret.
    BadSignature = 2,
    /// `exp` is in the past.
    Expired = 3,
    /// `nbf` is in the future.
    NotYetValid = 4,
    /// The token's `sub` is not the user id in the LOGIN.
    UserMismatch = 5,
    /// The application's own check refused the login.
    Rejected = 6,
    /// The JWT header names an algorithm other than HS256.
    UnsupportedAlgorithm = 7,
    /// The user already holds `limits.max_conns_per_user` connections.
    TooManyConnections = 8,
}

/// A request failed but the connection stays open; sent in ERROR.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Client-to-client SEND is disabled on this server.
    SendDisabled = 100,
    /// A MESSAGE arrived but the application registered no handler.
    NoHandler = 101,
    /// A worker's mailbox was full; the message was not delivered. Retry.
    Overloaded = 102,
    /// The message would make a frame longer than `max_frame_bytes` once
    /// the server adds the sender's id; it was not delivered.
    PayloadTooLarge = 103,
    /// SUBSCRIBE: the connection is already in `rooms.max_rooms_per_conn`
    /// rooms.
    RoomLimit = 104,
    /// SUBSCRIBE: the room holds `rooms.max_members_per_room` connections.
    RoomFull = 105,
    /// SUBSCRIBE: the server holds `rooms.max_rooms` rooms.
    TooManyRooms = 106,
    /// PUBLISH to a room the connection has not joined.
    NotMember = 107,
    /// PUBLISH while `rooms.client_publish` is off.
    PublishDisabled = 108,
    /// SUBSCRIBE/UNSUBSCRIBE while `rooms.client_subscribe` is off.
    SubscribeDisabled = 109,
    /// A room name that is empty or longer than 255 bytes.
    InvalidRoom = 110,
    /// MESSAGE (or SEND passed to the application): the application's
    /// handler failed (panicked) on it; it may not have been processed.
    HandlerFailed = 111,
    /// SUBSCRIBE to a room that does not exist yet, while this user's
    /// SUBSCRIBEs already created `rooms.max_rooms_created_per_user` rooms
    /// that still exist.
    RoomCreationLimit = 112,
    /// SEND/SEND_EX: the recipient's inbox holds
    /// `store.max_messages_per_inbox` messages; nothing was stored.
    InboxFull = 113,
    /// SEND/SEND_EX: the store holds `store.max_bytes`; nothing was stored.
    StoreFull = 114,
    /// The store could not take the request (its queue was full, or an I/O
    /// error): nothing was stored. Retry later.
    StoreUnavailable = 115,
    /// ACK or FETCH on a connection that logged in without a device id, or
    /// on a server without a store.
    NotReliable = 116,
    /// ACK of a seq beyond the inbox's head; ignored.
    BadAck = 117,
    /// SEND, SEND_EX, PUBLISH, MESSAGE or FETCH over its user's send budget
    /// (`limits.send_rate`, `limits.send_bytes_rate`); not acted on.
    RateLimited = 118,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_map_back_from_their_numbers() {
        for code in [
            CloseCode::Normal,
            CloseCode::GoingAway,
            CloseCode::ProtocolError,
            CloseCode::PolicyViolation,
            CloseCode::FrameTooLarge,
            CloseCode::TryAgainLater,
            CloseCode::UnsupportedVersion,
            CloseCode::LoginTimeout,
            CloseCode::IdleTimeout,
            CloseCode::Kicked,
            CloseCode::SlowConsumer,
            CloseCode::ServerFull,
            CloseCode::UnexpectedFrame,
            CloseCode::AckTimeout,
            CloseCode::Replaced,
            CloseCode::RateLimited,
        ] {
            assert_eq!(CloseCode::from_u16(code as u16), Some(code));
            assert!(!code.reason().is_empty());
        }
        assert_eq!(CloseCode::AckTimeout as u16, 4007);
        assert_eq!(CloseCode::Replaced as u16, 4008);
        assert_eq!(CloseCode::RateLimited as u16, 4009);
        assert_eq!(CloseCode::from_u16(4010), None);
    }

    #[test]
    fn reliable_delivery_error_codes_have_their_published_numbers() {
        assert_eq!(
            [
                ErrorCode::InboxFull,
                ErrorCode::StoreFull,
                ErrorCode::StoreUnavailable,
                ErrorCode::NotReliable,
                ErrorCode::BadAck,
                ErrorCode::RateLimited
            ]
            .map(|c| c as u16),
            [113, 114, 115, 116, 117, 118]
        );
    }
}
