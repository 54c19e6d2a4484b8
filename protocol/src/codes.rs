//! Error and disconnect codes of the Centrifugo protocol.
//!
//! A reply error fails one command; a [`Disconnect`] closes the socket with a code whose range tells
//! the SDK whether to reconnect (3000–3499, 4000–4499: reconnect; 3500–3999, 4500–4999: terminal).
//!
//! Reply codes 100–112 are Centrifugo's own. Codes the relay adds are taken from the range Centrifugo
//! leaves to applications (400–1999; 0–399 are reserved):
//!
//! | code | meaning | temporary |
//! |---|---|---|
//! | 420 | publication refused by the rule's target (status `rejected`: e.g. an edit of another user's message) | no |
//! | 421 | publication invalid for the rule's target (status `invalid`: malformed or out-of-limit data) | no |
//! | 422 | publication not handled by the rule's target (status `skipped`: a name it does not handle) | no |
//!
//! The reply's `message` of 420–422 is the target's `reason`, so the SDK shows the writer's own words.

use serde::Serialize;

/// The error codes of command replies (`{"id":N,"error":{"code":C,"message":"…"}}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 100: internal server error (temporary: the SDK retries).
    Internal,
    /// 101: unauthorized.
    Unauthorized,
    /// 102: unknown channel.
    UnknownChannel,
    /// 103: permission denied.
    PermissionDenied,
    /// 104: method not found.
    MethodNotFound,
    /// 105: already subscribed.
    AlreadySubscribed,
    /// 106: limit exceeded.
    LimitExceeded,
    /// 107: bad request.
    BadRequest,
    /// 108: not available.
    NotAvailable,
    /// 109: token expired.
    TokenExpired,
    /// 111: too many requests (temporary).
    TooManyRequests,
    /// 112: unrecoverable position.
    UnrecoverablePosition,
    /// 420: the rule's target refused the publication (its status `rejected`).
    PublishRejected,
    /// 421: the rule's target found the publication invalid (its status `invalid`).
    PublishInvalid,
    /// 422: the rule's target does not handle the publication (its status `skipped`).
    PublishSkipped,
}

impl ErrorCode {
    /// The numeric code.
    pub fn code(self) -> u32 {
        match self {
            Self::Internal => 100,
            Self::Unauthorized => 101,
            Self::UnknownChannel => 102,
            Self::PermissionDenied => 103,
            Self::MethodNotFound => 104,
            Self::AlreadySubscribed => 105,
            Self::LimitExceeded => 106,
            Self::BadRequest => 107,
            Self::NotAvailable => 108,
            Self::TokenExpired => 109,
            Self::TooManyRequests => 111,
            Self::UnrecoverablePosition => 112,
            Self::PublishRejected => 420,
            Self::PublishInvalid => 421,
            Self::PublishSkipped => 422,
        }
    }

    /// The standard message for the code.
    pub fn message(self) -> &'static str {
        match self {
            Self::Internal => "internal server error",
            Self::Unauthorized => "unauthorized",
            Self::UnknownChannel => "unknown channel",
            Self::PermissionDenied => "permission denied",
            Self::MethodNotFound => "method not found",
            Self::AlreadySubscribed => "already subscribed",
            Self::LimitExceeded => "limit exceeded",
            Self::BadRequest => "bad request",
            Self::NotAvailable => "not available",
            Self::TokenExpired => "token expired",
            Self::TooManyRequests => "too many requests",
            Self::UnrecoverablePosition => "unrecoverable position",
            Self::PublishRejected => "publication rejected",
            Self::PublishInvalid => "publication invalid",
            Self::PublishSkipped => "publication not handled",
        }
    }

    /// Whether the SDK should retry the command (sent as `temporary: true`).
    pub fn temporary(self) -> bool {
        matches!(self, Self::Internal | Self::TooManyRequests)
    }
}

/// The error object of a reply. `message` is always present (centrifuge-python reads it with `[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplyError {
    /// The numeric code.
    pub code: u32,
    /// Human-readable text.
    pub message: String,
    /// Present and true when a retry can help.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub temporary: bool,
}

impl ReplyError {
    /// An error with the code's standard message.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code: code.code(),
            message: code.message().to_owned(),
            temporary: code.temporary(),
        }
    }

    /// An error with a specific message (it must not contain secrets: clients see it).
    pub fn with_message(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.code(),
            message: message.into(),
            temporary: code.temporary(),
        }
    }

    /// Marks the error as temporary (the SDK retries with backoff).
    pub fn temporary(mut self) -> Self {
        self.temporary = true;
        self
    }
}

impl From<ErrorCode> for ReplyError {
    fn from(code: ErrorCode) -> Self {
        Self::new(code)
    }
}

/// Why the server closes a connection: the WebSocket close code and a short, non-empty reason
/// (centrifuge-js ignores the terminal range when the reason is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    /// Close code.
    pub code: u16,
    /// Close reason: non-empty, not JSON, at most 123 bytes.
    pub reason: &'static str,
}

impl Disconnect {
    /// 3001: the server shuts down; reconnect (to another node) and recover.
    pub const SHUTDOWN: Self = Self {
        code: 3001,
        reason: "shutdown",
    };
    /// 3004: internal server error; reconnect.
    pub const INTERNAL: Self = Self {
        code: 3004,
        reason: "internal server error",
    };
    /// 3008: the client does not read fast enough; reconnect and recover from history.
    pub const SLOW: Self = Self {
        code: 3008,
        reason: "slow",
    };
    /// 3010: the server lost track of a stream; reconnect and recover.
    pub const INSUFFICIENT_STATE: Self = Self {
        code: 3010,
        reason: "insufficient state",
    };
    /// 3012: no pong within the pong timeout; reconnect.
    pub const NO_PONG: Self = Self {
        code: 3012,
        reason: "no pong",
    };
    /// 3500: invalid token; terminal.
    pub const INVALID_TOKEN: Self = Self {
        code: 3500,
        reason: "invalid token",
    };
    /// 3501: malformed frame, unknown command or protocol violation; terminal.
    pub const BAD_REQUEST: Self = Self {
        code: 3501,
        reason: "bad request",
    };
    /// 3502: no connect command in time; terminal.
    pub const STALE: Self = Self {
        code: 3502,
        reason: "stale",
    };
    /// 3504: too many connections; terminal.
    pub const CONNECTION_LIMIT: Self = Self {
        code: 3504,
        reason: "connection limit",
    };
    /// 3505: too many channels; terminal.
    pub const CHANNEL_LIMIT: Self = Self {
        code: 3505,
        reason: "channel limit",
    };
    /// 3506: a binary frame on the JSON protocol; terminal.
    pub const INAPPROPRIATE_PROTOCOL: Self = Self {
        code: 3506,
        reason: "inappropriate protocol",
    };
    /// 3507: permission denied (for example anonymous connections disabled); terminal.
    pub const PERMISSION_DENIED: Self = Self {
        code: 3507,
        reason: "permission denied",
    };

    /// Whether the SDKs reconnect after this disconnect.
    pub fn reconnect(self) -> bool {
        !((3500..4000).contains(&self.code) || (4500..5000).contains(&self.code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_serializes_with_message_and_without_false_temporary() {
        let e = serde_json::to_string(&ReplyError::new(ErrorCode::PermissionDenied)).unwrap();
        assert_eq!(e, r#"{"code":103,"message":"permission denied"}"#);
        let t = serde_json::to_string(&ReplyError::new(ErrorCode::Internal)).unwrap();
        assert_eq!(
            t,
            r#"{"code":100,"message":"internal server error","temporary":true}"#
        );
    }

    #[test]
    fn disconnect_ranges() {
        assert!(Disconnect::SHUTDOWN.reconnect());
        assert!(Disconnect::SLOW.reconnect());
        assert!(!Disconnect::BAD_REQUEST.reconnect());
        assert!(!Disconnect::INVALID_TOKEN.reconnect());
    }
}
