//! Replies and pushes: what the server sends.
//!
//! Every message is one JSON object on one line. A reply carries the command's `id` and either the
//! result object (always present, even when empty: the SDKs dereference it) or an `error`. A push has
//! no id and a `push` key. The ping is the empty object `{}`.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::codes::ReplyError;

/// The server ping: an empty reply.
pub const PING: &str = "{}";

/// Encodes a successful reply: `{"id":N,"<name>":<result>}`.
pub fn encode_reply<T: Serialize>(id: u32, name: &str, result: &T) -> String {
    let body = serde_json::to_string(result).unwrap_or_else(|_| "{}".to_owned());
    format!("{{\"id\":{id},\"{name}\":{body}}}")
}

/// Encodes an error reply: `{"id":N,"error":{...}}`.
pub fn encode_error(id: u32, error: &ReplyError) -> String {
    let body = serde_json::to_string(error).unwrap_or_else(|_| "{}".to_owned());
    format!("{{\"id\":{id},\"error\":{body}}}")
}

/// An empty result object, for `publish`, `unsubscribe` and the like.
#[derive(Debug, Default, Serialize)]
pub struct Empty {}

/// Who published, or who joined or left: `ClientInfo` of the protocol.
#[derive(Debug, Clone, Serialize)]
pub struct ClientInfo {
    /// The user id ("" when anonymous).
    pub user: String,
    /// The connection's client id.
    pub client: String,
    /// Connection info (from the token), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Box<RawValue>>,
    /// Channel info (from the subscription token), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Box<RawValue>>,
}

/// Result of `connect`.
#[derive(Debug, Serialize)]
pub struct ConnectResult {
    /// The unique id of this connection (mandatory: centrifuge-python reads it with `[]`).
    pub client: String,
    /// Server version.
    pub version: String,
    /// Ping interval in seconds.
    pub ping: u32,
    /// Whether the client must answer pings.
    pub pong: bool,
    /// The connection expires: the SDK sends `refresh` with a new token after `ttl` seconds.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expires: bool,
    /// Seconds until the connection expires (present whenever `expires` is: Python reads it with `[]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
}

/// Result of `refresh`.
#[derive(Debug, Serialize)]
pub struct RefreshResult {
    /// The connection's id.
    pub client: String,
    /// Server version.
    pub version: String,
    /// The connection still expires (with the new token's expiry).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expires: bool,
    /// Seconds until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
}

/// Result of `sub_refresh`.
#[derive(Debug, Serialize)]
pub struct SubRefreshResult {
    /// The subscription still expires.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expires: bool,
    /// Seconds until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
}

/// A publication in a subscribe or history reply, or in a `pub` push.
#[derive(Debug, Serialize)]
pub struct Publication<'a> {
    /// The payload, embedded as raw JSON.
    pub data: &'a RawValue,
    /// Offset in the channel's stream.
    pub offset: u64,
    /// The publisher, for client publications.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<&'a RawValue>,
}

/// Result of `subscribe`.
#[derive(Debug, Serialize)]
pub struct SubscribeResult<'a> {
    /// The server will recover this subscription on resubscribe.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recoverable: bool,
    /// The server tracks the client's position.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub positioned: bool,
    /// The stream's epoch.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub epoch: &'a str,
    /// The stream position (the request's offset when recovered, else the top).
    pub offset: u64,
    /// A recovery was attempted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub was_recovering: bool,
    /// The recovery filled the gap completely.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
    /// The missed publications (only when recovered).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<Publication<'a>>,
    /// The subscription token expires: the SDK sends `sub_refresh` after `ttl` seconds.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expires: bool,
    /// Seconds until the subscription expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
}

/// Result of `history`.
#[derive(Debug, Serialize)]
pub struct HistoryResult<'a> {
    /// The publications, oldest first unless `reverse`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<Publication<'a>>,
    /// The stream's epoch.
    pub epoch: &'a str,
    /// The stream's top offset.
    pub offset: u64,
}

/// Result of `presence_stats`.
#[derive(Debug, Serialize)]
pub struct PresenceStatsResult {
    /// Number of connections.
    pub num_clients: u32,
    /// Number of distinct users.
    pub num_users: u32,
}

/// Encodes a `pub` push: `{"push":{"channel":C,"pub":{...}}}`.
pub fn encode_pub_push(channel: &str, publication: &Publication<'_>) -> String {
    let channel = serde_json::to_string(channel).unwrap_or_else(|_| "\"\"".to_owned());
    let body = serde_json::to_string(publication).unwrap_or_else(|_| "{}".to_owned());
    format!("{{\"push\":{{\"channel\":{channel},\"pub\":{body}}}}}")
}

/// Encodes an `unsubscribe` push with its code and reason (both mandatory for centrifuge-python).
pub fn encode_unsubscribe_push(channel: &str, code: u32, reason: &str) -> String {
    serde_json::json!({"push": {"channel": channel, "unsubscribe": {"code": code, "reason": reason}}})
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::ErrorCode;

    #[test]
    fn encodings() {
        assert_eq!(
            encode_reply(3, "publish", &Empty {}),
            r#"{"id":3,"publish":{}}"#
        );
        assert_eq!(
            encode_error(4, &ReplyError::new(ErrorCode::NotAvailable)),
            r#"{"id":4,"error":{"code":108,"message":"not available"}}"#
        );
        let data = RawValue::from_string(r#"{"a":"x\ny"}"#.to_owned()).unwrap();
        let push = encode_pub_push(
            "news",
            &Publication {
                data: &data,
                offset: 5,
                info: None,
            },
        );
        assert_eq!(
            push,
            r#"{"push":{"channel":"news","pub":{"data":{"a":"x\ny"},"offset":5}}}"#
        );
        assert!(!push.contains('\n'));
        let sub = SubscribeResult {
            recoverable: true,
            positioned: true,
            epoch: "e",
            offset: 0,
            was_recovering: false,
            recovered: false,
            publications: vec![],
            expires: false,
            ttl: None,
        };
        assert_eq!(
            encode_reply(2, "subscribe", &sub),
            r#"{"id":2,"subscribe":{"recoverable":true,"positioned":true,"epoch":"e","offset":0}}"#
        );
    }
}
