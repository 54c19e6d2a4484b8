//! Commands: what clients send.
//!
//! A WebSocket text frame holds one or more commands, one JSON object per line (`\n`-separated,
//! at most one trailing `\n`). Each line is parsed at the edge into a typed [`Command`]; raw JSON
//! never travels further in, except publication payloads, which stay [`RawValue`]s so they are
//! re-sent byte for byte.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::StreamPosition;

/// Why a frame or a line could not be turned into commands. Every variant closes the connection
/// with 3501 (bad request): the SDKs never send such frames.
#[derive(Debug, Error)]
pub enum CommandError {
    /// The line is not a JSON object of the command shape.
    #[error("malformed command: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The command has no request this server knows.
    #[error("unknown command")]
    Unknown,
    /// The command has more than one request.
    #[error("more than one request in a command")]
    Ambiguous,
    /// A request other than `send` came without an id.
    #[error("command without id")]
    MissingId,
    /// The frame has an empty line between commands.
    #[error("empty line in frame")]
    EmptyLine,
    /// A Protobuf frame whose varint length prefix is malformed or points past the frame's end.
    #[error("malformed length prefix in a Protobuf frame")]
    Framing,
    /// A Protobuf message that is not a `Command`.
    #[error("malformed Protobuf command: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

/// One parsed command.
#[derive(Debug)]
pub enum Command {
    /// The empty command `{}`: the answer to a server ping.
    Pong,
    /// `send`: fire-and-forget data to the server (no id, never answered).
    Send(SendRequest),
    /// A request with its id; the reply carries the same id.
    Request {
        /// The client's command id (> 0).
        id: u32,
        /// The request.
        request: Request,
    },
}

/// A request that is answered with a reply of the same id.
#[derive(Debug)]
pub enum Request {
    /// Authenticate the connection.
    Connect(ConnectRequest),
    /// Subscribe to a channel (with recovery).
    Subscribe(SubscribeRequest),
    /// Unsubscribe from a channel.
    Unsubscribe(ChannelRequest),
    /// Publish data to a channel.
    Publish(PublishRequest),
    /// Who is subscribed to a channel.
    Presence(ChannelRequest),
    /// How many are subscribed to a channel.
    PresenceStats(ChannelRequest),
    /// A channel's retained publications.
    History(HistoryRequest),
    /// The `ping` command (the SDKs never send it).
    Ping,
    /// An RPC call.
    Rpc(RpcRequest),
    /// Refresh the connection token.
    Refresh(RefreshRequest),
    /// Refresh a subscription token.
    SubRefresh(SubRefreshRequest),
    /// A known request whose fields could not be used (Protobuf `bytes` data that is not JSON):
    /// answered with error 107, the connection stays.
    Invalid {
        /// The request's name.
        name: &'static str,
        /// Why it is invalid (sent to the client).
        reason: &'static str,
    },
}

impl Request {
    /// The name of the request, as in the reply envelope (`"subscribe"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Subscribe(_) => "subscribe",
            Self::Unsubscribe(_) => "unsubscribe",
            Self::Publish(_) => "publish",
            Self::Presence(_) => "presence",
            Self::PresenceStats(_) => "presence_stats",
            Self::History(_) => "history",
            Self::Ping => "ping",
            Self::Rpc(_) => "rpc",
            Self::Refresh(_) => "refresh",
            Self::SubRefresh(_) => "sub_refresh",
            Self::Invalid { name, .. } => name,
        }
    }
}

/// `connect` request fields (unknown fields are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct ConnectRequest {
    /// Connection token.
    #[serde(default)]
    pub token: String,
    /// Custom connect data.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Client name (`js`, `python`).
    #[serde(default)]
    pub name: String,
    /// Client version.
    #[serde(default)]
    pub version: String,
    /// Positions of the server-side subscriptions the client had, for their recovery on
    /// reconnect (only the server's own server-side channels are looked up here).
    #[serde(default)]
    pub subs: BTreeMap<String, ServerSubRequest>,
}

/// A server-side subscription's position in a `connect` request (`subs`): what to recover from.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct ServerSubRequest {
    /// Recover what was missed since `offset` in `epoch`.
    #[serde(default)]
    pub recover: bool,
    /// The epoch of the position.
    #[serde(default)]
    pub epoch: String,
    /// The offset of the position.
    #[serde(default)]
    pub offset: u64,
}

/// `subscribe` request fields.
#[derive(Debug, Default, Deserialize)]
pub struct SubscribeRequest {
    /// The channel.
    pub channel: String,
    /// Subscription token.
    #[serde(default)]
    pub token: String,
    /// The client asks for recovery on resubscribe.
    #[serde(default)]
    pub recoverable: bool,
    /// The client asks for positioning.
    #[serde(default)]
    pub positioned: bool,
    /// The client asks for join/leave pushes.
    #[serde(default)]
    pub join_leave: bool,
    /// This is a resubscribe: recover from `offset` + `epoch`.
    #[serde(default)]
    pub recover: bool,
    /// Last offset the client saw.
    #[serde(default)]
    pub offset: u64,
    /// Epoch of that offset ("" = don't check).
    #[serde(default)]
    pub epoch: String,
    /// Feature flags (bit 2: reject unrecovered with error 112).
    #[serde(default)]
    pub flag: i64,
    /// Custom data of the subscribe request (the SDKs' subscription `data` option).
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Delta compression asked for (`"fossil"`), or "".
    #[serde(default)]
    pub delta: String,
    /// The subscription type: 0 a stream; 1 and 2 are Centrifugo 6.8's map and shared-poll
    /// subscriptions, which the relay refuses explicitly.
    #[serde(default, rename = "type")]
    pub r#type: i32,
}

/// Requests that name only a channel (`unsubscribe`, `presence`, `presence_stats`).
#[derive(Debug, Default, Deserialize)]
pub struct ChannelRequest {
    /// The channel.
    pub channel: String,
}

/// `publish` request fields.
#[derive(Debug, Deserialize)]
pub struct PublishRequest {
    /// The channel.
    pub channel: String,
    /// The payload: any JSON value.
    pub data: Box<RawValue>,
}

/// `history` request fields.
#[derive(Debug, Default, Deserialize)]
pub struct HistoryRequest {
    /// The channel.
    pub channel: String,
    /// 0: position only; -1: all (capped); N: at most N.
    #[serde(default)]
    pub limit: i64,
    /// Publications after this position (exclusive).
    #[serde(default)]
    pub since: Option<StreamPosition>,
    /// Newest first.
    #[serde(default)]
    pub reverse: bool,
}

/// `rpc` request fields.
#[derive(Debug, Deserialize)]
pub struct RpcRequest {
    /// Method name.
    #[serde(default)]
    pub method: String,
    /// Payload.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// `send` request fields.
#[derive(Debug, Deserialize)]
pub struct SendRequest {
    /// Payload.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// `refresh` request fields.
#[derive(Debug, Default, Deserialize)]
pub struct RefreshRequest {
    /// New connection token.
    #[serde(default)]
    pub token: String,
}

/// `sub_refresh` request fields.
#[derive(Debug, Default, Deserialize)]
pub struct SubRefreshRequest {
    /// The channel.
    #[serde(default)]
    pub channel: String,
    /// New subscription token.
    #[serde(default)]
    pub token: String,
}

#[derive(Deserialize)]
struct RawCommand {
    #[serde(default)]
    id: u32,
    connect: Option<ConnectRequest>,
    subscribe: Option<SubscribeRequest>,
    unsubscribe: Option<ChannelRequest>,
    publish: Option<PublishRequest>,
    presence: Option<ChannelRequest>,
    presence_stats: Option<ChannelRequest>,
    history: Option<HistoryRequest>,
    ping: Option<IgnoredAny>,
    send: Option<SendRequest>,
    rpc: Option<RpcRequest>,
    refresh: Option<RefreshRequest>,
    sub_refresh: Option<SubRefreshRequest>,
}

impl Command {
    /// Parses one line (one JSON object).
    pub fn parse(line: &str) -> Result<Self, CommandError> {
        let raw: RawCommand = serde_json::from_str(line)?;
        let id = raw.id;
        let mut requests = Vec::with_capacity(1);
        let mut send = None;
        if let Some(r) = raw.connect {
            requests.push(Request::Connect(r));
        }
        if let Some(r) = raw.subscribe {
            requests.push(Request::Subscribe(r));
        }
        if let Some(r) = raw.unsubscribe {
            requests.push(Request::Unsubscribe(r));
        }
        if let Some(r) = raw.publish {
            requests.push(Request::Publish(r));
        }
        if let Some(r) = raw.presence {
            requests.push(Request::Presence(r));
        }
        if let Some(r) = raw.presence_stats {
            requests.push(Request::PresenceStats(r));
        }
        if let Some(r) = raw.history {
            requests.push(Request::History(r));
        }
        if raw.ping.is_some() {
            requests.push(Request::Ping);
        }
        if let Some(r) = raw.rpc {
            requests.push(Request::Rpc(r));
        }
        if let Some(r) = raw.refresh {
            requests.push(Request::Refresh(r));
        }
        if let Some(r) = raw.sub_refresh {
            requests.push(Request::SubRefresh(r));
        }
        if let Some(s) = raw.send {
            send = Some(s);
        }
        Self::assemble(id, requests, send)
    }

    /// The rules shared by both encodings: exactly one request with an id, or a `send` alone, or
    /// nothing at all with id 0 (a pong).
    pub(crate) fn assemble(
        id: u32,
        mut requests: Vec<Request>,
        send: Option<SendRequest>,
    ) -> Result<Self, CommandError> {
        match (requests.len(), send) {
            (0, Some(s)) => Ok(Command::Send(s)),
            (0, None) if id == 0 => Ok(Command::Pong),
            (0, None) => Err(CommandError::Unknown),
            (1, None) if id == 0 => Err(CommandError::MissingId),
            (1, None) => Ok(Command::Request {
                id,
                request: requests.pop().ok_or(CommandError::Unknown)?,
            }),
            _ => Err(CommandError::Ambiguous),
        }
    }

    /// Splits a frame into its lines: exactly one `\n` between commands, at most one trailing.
    pub fn split_frame(frame: &str) -> Result<Vec<&str>, CommandError> {
        let body = frame.strip_suffix('\n').unwrap_or(frame);
        let lines: Vec<&str> = body.split('\n').collect();
        if lines.iter().any(|l| l.trim().is_empty()) {
            return Err(CommandError::EmptyLine);
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_js_first_frame() {
        let frame = "{\"connect\":{\"token\":\"t\",\"name\":\"js\"},\"id\":1}\n{\"subscribe\":{\"channel\":\"news\",\"positioned\":true,\"recoverable\":true,\"join_leave\":true,\"flag\":1},\"id\":2}";
        let lines = Command::split_frame(frame).unwrap();
        assert_eq!(lines.len(), 2);
        match Command::parse(lines[0]).unwrap() {
            Command::Request {
                id: 1,
                request: Request::Connect(c),
            } => assert_eq!(c.token, "t"),
            other => panic!("{other:?}"),
        }
        match Command::parse(lines[1]).unwrap() {
            Command::Request {
                id: 2,
                request: Request::Subscribe(s),
            } => {
                assert_eq!(s.channel, "news");
                assert!(s.recoverable && s.positioned && !s.recover);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pong_send_and_errors() {
        assert!(matches!(Command::parse("{}").unwrap(), Command::Pong));
        assert!(matches!(
            Command::parse(r#"{"send":{"data":{}}}"#).unwrap(),
            Command::Send(_)
        ));
        assert!(matches!(
            Command::parse(r#"{"id":3}"#),
            Err(CommandError::Unknown)
        ));
        assert!(matches!(
            Command::parse(r#"{"id":3,"nope":{}}"#),
            Err(CommandError::Unknown)
        ));
        assert!(matches!(
            Command::parse(r#"{"subscribe":{"channel":"a"}}"#),
            Err(CommandError::MissingId)
        ));
        assert!(matches!(
            Command::parse(r#"{"id":1,"subscribe":{"channel":"a"},"unsubscribe":{"channel":"a"}}"#),
            Err(CommandError::Ambiguous)
        ));
        assert!(matches!(
            Command::parse("not json"),
            Err(CommandError::Malformed(_))
        ));
        assert!(matches!(
            Command::parse("[1]"),
            Err(CommandError::Malformed(_))
        ));
        assert!(Command::split_frame("{}\n\n{}").is_err());
        assert_eq!(Command::split_frame("{}\n").unwrap().len(), 1);
    }

    #[test]
    fn python_history_with_since() {
        let c = Command::parse(r#"{"id": 7, "history": {"channel": "news", "limit": -1, "reverse": false, "since": {"offset": 0, "epoch": "ep1"}}}"#).unwrap();
        match c {
            Command::Request {
                request: Request::History(h),
                ..
            } => {
                assert_eq!(h.limit, -1);
                assert_eq!(h.since.unwrap().epoch, "ep1");
            }
            other => panic!("{other:?}"),
        }
    }
}
