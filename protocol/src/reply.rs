//! Replies and pushes: what the server sends, as typed values encoded once at the edge.
//!
//! A [`Reply`] answers a command (its `id` and either a result or an error); a [`Push`] is an
//! asynchronous message about a channel; the ping is an empty reply. Each has two encodings
//! ([`Encoding`]): JSON, one object on one line (the result object always present, even when empty:
//! the SDKs dereference it), and Protobuf, one varint-length-delimited `Reply` message
//! ([`crate::pb`]). Application data (publication payloads, connection and channel info) is JSON in
//! both: embedded as raw JSON in the first, its raw bytes in the `bytes` fields of the second.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::codes::ReplyError;

/// The server ping in JSON: an empty reply.
pub const PING: &str = "{}";

/// How a connection's messages are encoded (chosen once, at the WebSocket upgrade).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// JSON objects, `\n`-separated, in text frames.
    #[default]
    Json,
    /// Varint-length-delimited Protobuf messages, concatenated, in binary frames.
    Protobuf,
}

impl Encoding {
    /// The encoded server ping (an empty reply).
    pub fn ping(self) -> &'static [u8] {
        match self {
            Self::Json => PING.as_bytes(),
            // The length (0) of an empty `Reply`.
            Self::Protobuf => &[0],
        }
    }

    /// Joins encoded messages into one frame's payload: `\n` between JSON objects, nothing between
    /// length-delimited Protobuf messages.
    pub fn join<B: AsRef<[u8]>>(self, messages: &[B]) -> Vec<u8> {
        let len: usize = messages.iter().map(|m| m.as_ref().len() + 1).sum();
        let mut frame = Vec::with_capacity(len);
        for (i, m) in messages.iter().enumerate() {
            if i > 0 && self == Self::Json {
                frame.push(b'\n');
            }
            frame.extend_from_slice(m.as_ref());
        }
        frame
    }
}

/// An empty result object, for `publish`, `unsubscribe` and the like.
#[derive(Debug, Default, Serialize)]
pub struct Empty {}

/// Who published, or who joined or left: `ClientInfo` of the protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientInfo {
    /// The user id ("" when anonymous).
    #[serde(default)]
    pub user: String,
    /// The connection's client id.
    #[serde(default)]
    pub client: String,
    /// Connection info (from the token), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Box<RawValue>>,
    /// Channel info (from the subscription token), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Box<RawValue>>,
}

/// Result of `connect`.
#[derive(Debug, Serialize)]
pub struct ConnectResult<'a> {
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
    /// The server-side subscriptions made at connect, by channel (with their positions, and what
    /// they recovered).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: BTreeMap<String, SubscribeResult<'a>>,
    /// The session id of an emulated transport (HTTP-streaming, SSE): what the client names in
    /// its `/emulation` requests. Absent on a WebSocket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The node serving that session (absent on a WebSocket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
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
    /// The publisher, for client publications: the JSON of a [`ClientInfo`].
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
    /// Fossil delta compression was negotiated: publications may come as deltas, and in JSON
    /// every publication's `data` is a JSON string holding the JSON text.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub delta: bool,
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

/// Result of `presence`: the members, keyed by their client id on the wire.
#[derive(Debug, Default)]
pub struct PresenceResult {
    /// The members.
    pub presence: Vec<ClientInfo>,
}

impl Serialize for PresenceResult {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Members<'a>(&'a [ClientInfo]);
        impl Serialize for Members<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(self.0.len()))?;
                for m in self.0 {
                    map.serialize_entry(&m.client, m)?;
                }
                map.end()
            }
        }
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("presence", &Members(&self.presence))?;
        map.end()
    }
}

/// Result of `presence_stats`.
#[derive(Debug, Serialize)]
pub struct PresenceStatsResult {
    /// Number of connections.
    pub num_clients: u32,
    /// Number of distinct users.
    pub num_users: u32,
}

/// The answer to a command: its id and a result or an error.
#[derive(Debug)]
pub struct Reply<'a> {
    /// The command's id (> 0).
    pub id: u32,
    /// The result or the error.
    pub body: ReplyBody<'a>,
}

/// What a reply carries.
#[derive(Debug)]
pub enum ReplyBody<'a> {
    /// The command failed.
    Error(ReplyError),
    /// `connect` succeeded.
    Connect(ConnectResult<'a>),
    /// `subscribe` succeeded.
    Subscribe(SubscribeResult<'a>),
    /// `unsubscribe` done (empty result).
    Unsubscribe,
    /// `publish` done (empty result).
    Publish,
    /// `presence` result.
    Presence(PresenceResult),
    /// `presence_stats` result.
    PresenceStats(PresenceStatsResult),
    /// `history` result.
    History(HistoryResult<'a>),
    /// `refresh` succeeded.
    Refresh(RefreshResult),
    /// `sub_refresh` succeeded.
    SubRefresh(SubRefreshResult),
    /// `rpc` answered: the data of the answer, if any.
    Rpc(Option<Box<RawValue>>),
}

impl<'a> Reply<'a> {
    /// A reply with a result (or an error).
    pub fn new(id: u32, body: ReplyBody<'a>) -> Self {
        Self { id, body }
    }

    /// An error reply.
    pub fn error(id: u32, error: ReplyError) -> Self {
        Self {
            id,
            body: ReplyBody::Error(error),
        }
    }

    /// The JSON encoding: one line.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_else(|_| format!("{{\"id\":{}}}", self.id))
    }

    /// The message in `encoding`, ready to be joined into a frame ([`Encoding::join`]).
    pub fn encode(&self, encoding: Encoding) -> Vec<u8> {
        match encoding {
            Encoding::Json => self.to_json().into_bytes(),
            Encoding::Protobuf => crate::pb::encode_reply(self),
        }
    }
}

impl Serialize for Reply<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("id", &self.id)?;
        match &self.body {
            ReplyBody::Error(e) => map.serialize_entry("error", e)?,
            ReplyBody::Connect(r) => map.serialize_entry("connect", r)?,
            ReplyBody::Subscribe(r) => map.serialize_entry("subscribe", r)?,
            ReplyBody::Unsubscribe => map.serialize_entry("unsubscribe", &Empty {})?,
            ReplyBody::Publish => map.serialize_entry("publish", &Empty {})?,
            ReplyBody::Presence(r) => map.serialize_entry("presence", r)?,
            ReplyBody::PresenceStats(r) => map.serialize_entry("presence_stats", r)?,
            ReplyBody::History(r) => map.serialize_entry("history", r)?,
            ReplyBody::Refresh(r) => map.serialize_entry("refresh", r)?,
            ReplyBody::SubRefresh(r) => map.serialize_entry("sub_refresh", r)?,
            ReplyBody::Rpc(data) => {
                #[derive(Serialize)]
                struct RpcResult<'a> {
                    #[serde(skip_serializing_if = "Option::is_none")]
                    data: Option<&'a RawValue>,
                }
                map.serialize_entry(
                    "rpc",
                    &RpcResult {
                        data: data.as_deref(),
                    },
                )?;
            }
        }
        map.end()
    }
}

/// A `pub` push for a subscription with fossil delta compression: `text` is the JSON text of the
/// payload (`delta` false) or the fossil delta against the previous publication (`delta` true). In
/// JSON, `data` is a JSON string holding that text (what the SDKs parse in delta mode); in
/// Protobuf, its bytes.
#[derive(Debug, Clone, Copy)]
pub struct DeltaPub<'a> {
    /// The channel.
    pub channel: &'a str,
    /// The payload's JSON text, or the delta.
    pub text: &'a str,
    /// Offset in the channel's stream.
    pub offset: u64,
    /// The publisher: the JSON of a [`ClientInfo`].
    pub info: Option<&'a RawValue>,
    /// `text` is a delta.
    pub delta: bool,
}

impl DeltaPub<'_> {
    /// The push in `encoding`, ready to be joined into a frame ([`Encoding::join`]).
    pub fn encode(&self, encoding: Encoding) -> Vec<u8> {
        #[derive(Serialize)]
        struct Pub<'a> {
            data: &'a str,
            offset: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            info: Option<&'a RawValue>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            delta: bool,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            channel: &'a str,
            #[serde(rename = "pub")]
            publication: Pub<'a>,
        }
        #[derive(Serialize)]
        struct Envelope<'a> {
            push: Body<'a>,
        }
        match encoding {
            Encoding::Json => serde_json::to_vec(&Envelope {
                push: Body {
                    channel: self.channel,
                    publication: Pub {
                        data: self.text,
                        offset: self.offset,
                        info: self.info,
                        delta: self.delta,
                    },
                },
            })
            .unwrap_or_else(|_| b"{\"push\":{}}".to_vec()),
            Encoding::Protobuf => crate::pb::encode_delta_pub(self),
        }
    }
}

/// An asynchronous message about a channel (no id).
#[derive(Debug)]
pub enum Push<'a> {
    /// A publication (`pub`).
    Pub {
        /// The channel.
        channel: &'a str,
        /// The publication.
        publication: Publication<'a>,
    },
    /// Someone subscribed (`join`).
    Join {
        /// The channel.
        channel: &'a str,
        /// Who.
        info: &'a ClientInfo,
    },
    /// Someone unsubscribed (`leave`).
    Leave {
        /// The channel.
        channel: &'a str,
        /// Who.
        info: &'a ClientInfo,
    },
    /// The server ended the subscription (`unsubscribe`, with a code of [`crate::codes`]).
    Unsubscribe {
        /// The channel.
        channel: &'a str,
        /// Unsubscribe code (2500–2999: the SDK resubscribes).
        code: u32,
        /// Why (mandatory for centrifuge-python).
        reason: &'a str,
    },
}

impl Push<'_> {
    /// The JSON encoding: `{"push":{"channel":C,"<kind>":{...}}}` on one line.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Info<'a> {
            info: &'a ClientInfo,
        }
        #[derive(Serialize)]
        struct Unsub<'a> {
            code: u32,
            reason: &'a str,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            channel: &'a str,
            #[serde(rename = "pub", skip_serializing_if = "Option::is_none")]
            publication: Option<&'a Publication<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            join: Option<Info<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            leave: Option<Info<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            unsubscribe: Option<Unsub<'a>>,
        }
        #[derive(Serialize)]
        struct Envelope<'a> {
            push: Body<'a>,
        }
        let (channel, publication, join, leave, unsubscribe) = match self {
            Push::Pub {
                channel,
                publication,
            } => (*channel, Some(publication), None, None, None),
            Push::Join { channel, info } => (*channel, None, Some(Info { info }), None, None),
            Push::Leave { channel, info } => (*channel, None, None, Some(Info { info }), None),
            Push::Unsubscribe {
                channel,
                code,
                reason,
            } => (
                *channel,
                None,
                None,
                None,
                Some(Unsub {
                    code: *code,
                    reason,
                }),
            ),
        };
        let envelope = Envelope {
            push: Body {
                channel,
                publication,
                join,
                leave,
                unsubscribe,
            },
        };
        serde_json::to_string(&envelope).unwrap_or_else(|_| "{\"push\":{}}".to_owned())
    }

    /// The message in `encoding`, ready to be joined into a frame ([`Encoding::join`]).
    pub fn encode(&self, encoding: Encoding) -> Vec<u8> {
        match encoding {
            Encoding::Json => self.to_json().into_bytes(),
            Encoding::Protobuf => crate::pb::encode_push(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::ErrorCode;

    #[test]
    fn encodings() {
        assert_eq!(
            Reply::new(3, ReplyBody::Publish).to_json(),
            r#"{"id":3,"publish":{}}"#
        );
        assert_eq!(
            Reply::error(4, ReplyError::new(ErrorCode::NotAvailable)).to_json(),
            r#"{"id":4,"error":{"code":108,"message":"not available"}}"#
        );
        let data = RawValue::from_string(r#"{"a":"x\ny"}"#.to_owned()).unwrap();
        let push = Push::Pub {
            channel: "news",
            publication: Publication {
                data: &data,
                offset: 5,
                info: None,
            },
        }
        .to_json();
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
            delta: false,
        };
        assert_eq!(
            Reply::new(2, ReplyBody::Subscribe(sub)).to_json(),
            r#"{"id":2,"subscribe":{"recoverable":true,"positioned":true,"epoch":"e","offset":0}}"#
        );
    }

    #[test]
    fn rpc_replies_and_delta_pushes() {
        let data = RawValue::from_string(r#"{"x":1}"#.to_owned()).unwrap();
        assert_eq!(
            Reply::new(5, ReplyBody::Rpc(Some(data))).to_json(),
            r#"{"id":5,"rpc":{"data":{"x":1}}}"#
        );
        assert_eq!(
            Reply::new(6, ReplyBody::Rpc(None)).to_json(),
            r#"{"id":6,"rpc":{}}"#
        );
        let full = DeltaPub {
            channel: "c",
            text: r#"{"a":"é"}"#,
            offset: 3,
            info: None,
            delta: false,
        };
        assert_eq!(
            String::from_utf8(full.encode(Encoding::Json)).unwrap(),
            r#"{"push":{"channel":"c","pub":{"data":"{\"a\":\"é\"}","offset":3}}}"#
        );
        let delta = DeltaPub {
            text: "9\n3@0,1:x3;",
            delta: true,
            ..full
        };
        assert_eq!(
            String::from_utf8(delta.encode(Encoding::Json)).unwrap(),
            r#"{"push":{"channel":"c","pub":{"data":"9\n3@0,1:x3;","offset":3,"delta":true}}}"#
        );
    }

    #[test]
    fn push_and_presence_json() {
        assert_eq!(
            Push::Unsubscribe {
                channel: "c",
                code: 2500,
                reason: "insufficient state"
            }
            .to_json(),
            r#"{"push":{"channel":"c","unsubscribe":{"code":2500,"reason":"insufficient state"}}}"#
        );
        let info = ClientInfo {
            user: "u".into(),
            client: "c1".into(),
            conn_info: None,
            chan_info: Some(RawValue::from_string(r#"{"n":1}"#.into()).unwrap()),
        };
        assert_eq!(
            Push::Join {
                channel: "room",
                info: &info
            }
            .to_json(),
            r#"{"push":{"channel":"room","join":{"info":{"user":"u","client":"c1","chan_info":{"n":1}}}}}"#
        );
        let presence = PresenceResult {
            presence: vec![info.clone()],
        };
        assert_eq!(
            Reply::new(9, ReplyBody::Presence(presence)).to_json(),
            r#"{"id":9,"presence":{"presence":{"c1":{"user":"u","client":"c1","chan_info":{"n":1}}}}}"#
        );
    }

    #[test]
    fn frames_join_by_encoding() {
        assert_eq!(Encoding::Json.join(&[b"{}", b"{}"]), b"{}\n{}");
        assert_eq!(Encoding::Protobuf.join(&[&[0u8][..], &[0u8][..]]), [0, 0]);
        assert_eq!(Encoding::Json.ping(), b"{}");
        assert_eq!(Encoding::Protobuf.ping(), [0]);
    }
}
