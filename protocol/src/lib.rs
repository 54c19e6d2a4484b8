//! Wire and model types of the relay: the Centrifugo client protocol as the connector speaks it (JSON
//! and Protobuf), plus the small model types (channel names, stream positions) shared by its parts.
//!
//! Serde and prost only: no runtime, database or HTTP types here, so every part of the system (and a
//! fuzzer) can depend on it.
//!
//! # Layout
//! - [`command`]: what clients send — one JSON object per line, parsed into a typed [`command::Command`].
//! - [`reply`]: what the server sends — typed replies, pushes and the ping, each encoded once at the
//!   edge in the connection's [`reply::Encoding`].
//! - [`pb`]: the Protobuf encoding — the message types of `proto/client.proto` (generated, checked
//!   in), varint-delimited framing, and the conversions to and from the typed commands and replies.
//! - [`codes`]: error codes (reply errors) and disconnect codes (close frames), as the SDKs interpret them.
//! - [`channel`]: channel-name rules and glob patterns used by rules and permissions.

pub mod channel;
pub mod codes;
pub mod command;
pub mod fossil;
pub mod pb;
pub mod reply;

pub use codes::{Disconnect, ErrorCode, ReplyError};
pub use command::{Command, CommandError, Request};
pub use reply::{Encoding, Push, Reply, ReplyBody};

/// A position in a channel's stream: the offset of the last publication and the stream's epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamPosition {
    /// Offset of the last publication (0: none yet).
    #[serde(default)]
    pub offset: u64,
    /// The epoch: changes whenever the channel's history is reset.
    #[serde(default)]
    pub epoch: String,
}
