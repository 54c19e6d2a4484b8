//! The event: the Ably-style envelope the writer is invoked with, and the parsing of each message into
//! a typed [`Action`].
//!
//! ```json
//! {"source": "channel.message", "channel": "outgoing-chat",
//!  "messages": [{"id": "m1", "clientId": "c1", "clientKind": "anonymous", "connectionId": "k1",
//!                "timestamp": 1700000000000, "name": "chatMsg",
//!                "data": "{\"username\":\"ada\",\"content\":\"hi\"}", "encoding": "json"}]}
//! ```
//!
//! # Identity
//! The author of a message is the pair ([`ClientKind`], `clientId`), never `clientId` alone: `clientKind`
//! is `user` (the id is a token's `sub`), `anonymous` (the connector's id of an anonymous connection) or
//! `server` (the server API). The connector always sends it. An envelope without it (an older connector,
//! another reactor) is [`ClientKind::Legacy`], a namespace of its own. So a token whose `sub` equals an
//! anonymous client's id is a different author, and cannot edit that person's messages.
//!
//! Parsing happens in two steps so that one bad message cannot fail its neighbours:
//! [`Envelope::from_value`] rejects a malformed envelope as a whole ([`Error::InvalidEvent`]), and
//! [`Message::from_value`] + [`Message::action`] turn each message into an [`Action`] or an
//! [`InvalidMessage`] reason that is reported for that message only. Unknown fields are ignored
//! everywhere.
//!
//! # Data
//! `data` may be a JSON object, a string holding JSON (the seed's `JSON.parse(data)`), or a value encoded
//! Ably-style as described by `encoding`: a `/`-separated list of steps applied right to left when
//! decoding, e.g. `json/utf-8/base64` (base64-decode, then UTF-8, then parse JSON), `base64` or `json`.
//! Supported steps: `base64`, `utf-8` (`utf8`), `json`; anything else (e.g. `cipher+aes-128-cbc`) makes
//! the message invalid. After decoding, a string or bytes are parsed as JSON; the result must be an
//! object.
//!
//! # Limits
//! | what | limit |
//! |---|---|
//! | messages per event | [`MAX_MESSAGES`] (1000) |
//! | message `id`, `clientId`, `msgIdToEdit` | 1 to [`MAX_ID_BYTES`] (256) bytes |
//! | `username` | 1 to [`MAX_USERNAME_BYTES`] (256) bytes |
//! | `content` | 1 to [`MAX_CONTENT_BYTES`] (64 KiB) bytes |
//! | `data` when a string (before decoding) | [`MAX_DATA_BYTES`] (256 KiB) |
//! | `timestamp` | a non-negative integer (milliseconds since the epoch) |
//!
//! No text may contain a NUL character (PostgreSQL `text` cannot store it; letting it through would turn
//! bad input into a database error that a retry repeats forever).

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Most messages one event may carry.
pub const MAX_MESSAGES: usize = 1000;
/// Longest message id, client id or `msgIdToEdit`, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest username, in bytes.
pub const MAX_USERNAME_BYTES: usize = 256;
/// Longest message content, in bytes (64 KiB).
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;
/// Longest `data` string before decoding, in bytes (256 KiB).
pub const MAX_DATA_BYTES: usize = 256 * 1024;

/// Message name of a new chat message.
pub const CHAT_MSG: &str = "chatMsg";
/// Message name of an edit of an earlier chat message.
pub const EDITED_MSG: &str = "editedMsg";

/// The envelope: where the messages come from, and the messages, still unparsed so that each can be
/// judged on its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Envelope {
    /// The kind of source, e.g. `channel.message` (informational).
    #[serde(default)]
    pub source: Option<String>,
    /// The channel the messages were published on (informational).
    #[serde(default)]
    pub channel: Option<String>,
    /// The messages, in publish order; parse each with [`Message::from_value`].
    pub messages: Vec<Value>,
}

impl Envelope {
    /// Parses the envelope. Fails with [`Error::InvalidEvent`] when the event is not an object, has no
    /// `messages` array, has fields of the wrong type, or carries more than [`MAX_MESSAGES`] messages.
    pub fn from_value(event: Value) -> Result<Self> {
        if !event.is_object() {
            return Err(Error::InvalidEvent(format!(
                "the event must be a JSON object with a \"messages\" array, got {}",
                kind(&event)
            )));
        }
        let envelope: Envelope = serde_json::from_value(event)
            .map_err(|e| Error::InvalidEvent(format!("malformed envelope: {e}")))?;
        if envelope.messages.len() > MAX_MESSAGES {
            return Err(Error::InvalidEvent(format!(
                "the envelope carries {} messages; at most {MAX_MESSAGES} are allowed per event",
                envelope.messages.len()
            )));
        }
        Ok(envelope)
    }
}

/// One published message, as the envelope carries it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// The message id, unique per message: the key of idempotency and the new row's `msg_id`.
    pub id: String,
    /// The publisher's client id: a new row's `client_id`; with [`Message::client_kind`], the only
    /// author allowed to edit it.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The namespace of `client_id` (see the [module docs](self)); `None` is [`ClientKind::Legacy`].
    #[serde(default)]
    pub client_kind: Option<String>,
    /// The publisher's connection id (informational).
    #[serde(default)]
    pub connection_id: Option<String>,
    /// When the message was published, in milliseconds since the epoch.
    #[serde(default)]
    pub timestamp: Option<i64>,
    /// The message name: [`CHAT_MSG`], [`EDITED_MSG`], or anything else (skipped).
    #[serde(default)]
    pub name: Option<String>,
    /// The payload; see [`decode_data`].
    #[serde(default)]
    pub data: Value,
    /// How `data` is encoded; see [`decode_data`].
    #[serde(default)]
    pub encoding: Option<String>,
}

/// The namespace of a client id: who vouched for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKind {
    /// An authenticated user: the id is the token's `sub`.
    User,
    /// An anonymous connection: the id is the one the connector gave the connection.
    Anonymous,
    /// The server API (a trusted backend).
    Server,
    /// No `clientKind` in the envelope (an older connector or another reactor): a namespace of its own,
    /// which also holds the rows written before namespaces existed.
    Legacy,
}

impl ClientKind {
    /// The value of the envelope's `clientKind` and of the row's `client_kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::User => "user",
            ClientKind::Anonymous => "anonymous",
            ClientKind::Server => "server",
            ClientKind::Legacy => "legacy",
        }
    }

    /// Parses the envelope's `clientKind` (`None`: [`ClientKind::Legacy`]). `legacy` itself is not
    /// accepted from an envelope: it only names the absence of the field.
    pub fn from_envelope(value: Option<&str>) -> Result<Self, InvalidMessage> {
        match value {
            None => Ok(ClientKind::Legacy),
            Some("user") => Ok(ClientKind::User),
            Some("anonymous") => Ok(ClientKind::Anonymous),
            Some("server") => Ok(ClientKind::Server),
            Some(other) => Err(InvalidMessage(format!(
                "clientKind must be \"user\", \"anonymous\" or \"server\", got {:?}",
                other.chars().take(MAX_ID_BYTES).collect::<String>()
            ))),
        }
    }
}

/// Why a message cannot be applied. Reported for that message with status `invalid`; not retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidMessage(pub String);

impl InvalidMessage {
    fn new(reason: impl Into<String>) -> Self {
        InvalidMessage(reason.into())
    }
}

/// A new chat message to insert into `chat_data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChatMessage {
    /// Message id: the row's `msg_id`.
    pub msg_id: String,
    /// Author's display name.
    pub username: String,
    /// Message text: the row's `msg_data`.
    pub content: String,
    /// Author's client id.
    pub client_id: String,
    /// The namespace of `client_id`.
    pub client_kind: ClientKind,
    /// Publish time in milliseconds: the row's `created_at_timestamp`.
    pub created_at_ms: i64,
}

/// An edit of an earlier chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditChatMessage {
    /// Id of the edit message itself (the key of idempotency).
    pub message_id: String,
    /// Id of the chat message to change.
    pub msg_id_to_edit: String,
    /// Editor's display name (validated, not stored: the row keeps its author's name).
    pub username: String,
    /// The new message text.
    pub content: String,
    /// The editor's client id: the edit applies only if it and `client_kind` are the author's.
    pub client_id: String,
    /// The namespace of `client_id`.
    pub client_kind: ClientKind,
}

/// What a message asks the writer to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `chatMsg`: insert a row.
    Insert(NewChatMessage),
    /// `editedMsg`: update the author's row.
    Edit(EditChatMessage),
    /// A room, direct-message or receipt message (see [`crate::rooms`]).
    Chat(crate::rooms::ChatAction),
    /// Any other name (or none): nothing to do.
    Skip,
}

#[derive(Deserialize)]
struct ChatData {
    username: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EditedData {
    username: String,
    content: String,
    msg_id_to_edit: String,
}

impl Message {
    /// Parses one entry of the envelope's `messages`.
    pub fn from_value(value: Value) -> Result<Self, InvalidMessage> {
        if !value.is_object() {
            return Err(InvalidMessage(format!(
                "a message must be a JSON object, got {}",
                kind(&value)
            )));
        }
        let message: Message = serde_json::from_value(value)
            .map_err(|e| InvalidMessage(format!("malformed message: {e}")))?;
        check_text("id", &message.id, MAX_ID_BYTES)?;
        Ok(message)
    }

    /// Best-effort id and name of an entry that [`Message::from_value`] rejected, for the report.
    pub fn id_and_name_of(value: &Value) -> (Option<String>, Option<String>) {
        let field = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .map(|s| s.chars().take(MAX_ID_BYTES).collect())
        };
        (field("id"), field("name"))
    }

    /// Decides what the message asks for, validating its data.
    pub fn action(&self) -> Result<Action, InvalidMessage> {
        match self.name.as_deref() {
            Some(CHAT_MSG) => {
                let client_id = self.client_id()?;
                let client_kind = ClientKind::from_envelope(self.client_kind.as_deref())?;
                let created_at_ms = match self.timestamp {
                    Some(ms) if ms >= 0 => ms,
                    Some(ms) => {
                        return Err(InvalidMessage(format!(
                            "timestamp must not be negative, got {ms}"
                        )));
                    }
                    None => return Err(InvalidMessage::new("the message has no timestamp")),
                };
                let data: ChatData = self.data_as(CHAT_MSG)?;
                check_text("username", &data.username, MAX_USERNAME_BYTES)?;
                check_text("content", &data.content, MAX_CONTENT_BYTES)?;
                Ok(Action::Insert(NewChatMessage {
                    msg_id: self.id.clone(),
                    username: data.username,
                    content: data.content,
                    client_id,
                    client_kind,
                    created_at_ms,
                }))
            }
            Some(EDITED_MSG) => {
                let client_id = self.client_id()?;
                let client_kind = ClientKind::from_envelope(self.client_kind.as_deref())?;
                let data: EditedData = self.data_as(EDITED_MSG)?;
                check_text("username", &data.username, MAX_USERNAME_BYTES)?;
                check_text("content", &data.content, MAX_CONTENT_BYTES)?;
                check_text("msgIdToEdit", &data.msg_id_to_edit, MAX_ID_BYTES)?;
                Ok(Action::Edit(EditChatMessage {
                    message_id: self.id.clone(),
                    msg_id_to_edit: data.msg_id_to_edit,
                    username: data.username,
                    content: data.content,
                    client_id,
                    client_kind,
                }))
            }
            Some(name) if crate::rooms::handles(name) => {
                crate::rooms::parse(self, name).map(Action::Chat)
            }
            _ => Ok(Action::Skip),
        }
    }

    pub(crate) fn client_id(&self) -> Result<String, InvalidMessage> {
        let client_id = self
            .client_id
            .as_deref()
            .ok_or_else(|| InvalidMessage::new("the message has no clientId"))?;
        check_text("clientId", client_id, MAX_ID_BYTES)?;
        Ok(client_id.to_owned())
    }

    pub(crate) fn data_as<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<T, InvalidMessage> {
        let data = decode_data(&self.data, self.encoding.as_deref())?;
        serde_json::from_value(data)
            .map_err(|e| InvalidMessage(format!("invalid {name} data: {e}")))
    }
}

/// A value part-way through decoding.
enum Decoded {
    Json(Value),
    Text(String),
    Bytes(Vec<u8>),
}

/// Decodes a message's `data` according to its `encoding` (see the [module docs](self)) into a JSON
/// object.
pub fn decode_data(data: &Value, encoding: Option<&str>) -> Result<Value, InvalidMessage> {
    let mut value = match data {
        Value::Null => return Err(InvalidMessage::new("the message has no data")),
        Value::String(text) if text.len() > MAX_DATA_BYTES => {
            return Err(InvalidMessage(format!(
                "data is {} bytes; at most {MAX_DATA_BYTES} are allowed",
                text.len()
            )));
        }
        Value::String(text) => Decoded::Text(text.clone()),
        other => Decoded::Json(other.clone()),
    };

    let steps = encoding.unwrap_or("");
    for step in steps.rsplit('/').map(str::trim).filter(|s| !s.is_empty()) {
        value = match (step.to_ascii_lowercase().as_str(), value) {
            ("base64", Decoded::Text(text)) => Decoded::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|e| InvalidMessage(format!("data is not valid base64: {e}")))?,
            ),
            ("base64", _) => {
                return Err(InvalidMessage::new(
                    "encoding step base64 needs string data",
                ));
            }
            ("utf-8" | "utf8", Decoded::Bytes(bytes)) => Decoded::Text(
                String::from_utf8(bytes)
                    .map_err(|_| InvalidMessage::new("data is not valid UTF-8"))?,
            ),
            ("utf-8" | "utf8", Decoded::Text(text)) => Decoded::Text(text),
            ("utf-8" | "utf8", Decoded::Json(_)) => {
                return Err(InvalidMessage::new(
                    "encoding step utf-8 needs string or binary data",
                ));
            }
            ("json", Decoded::Text(text)) => Decoded::Json(parse_json(text.as_bytes())?),
            ("json", Decoded::Bytes(bytes)) => Decoded::Json(parse_json(&bytes)?),
            // Already a JSON value (a relay that decoded it but kept the encoding): accept as is.
            ("json", Decoded::Json(value)) => Decoded::Json(value),
            (other, _) => {
                return Err(InvalidMessage(format!(
                    "unsupported encoding step {other:?} in {steps:?}"
                )));
            }
        };
    }

    // What is left: a JSON value, or a string/bytes holding JSON (the seed's `JSON.parse(data)`).
    let value = match value {
        Decoded::Json(value) => value,
        Decoded::Text(text) => parse_json(text.as_bytes())?,
        Decoded::Bytes(bytes) => parse_json(&bytes)?,
    };
    if !value.is_object() {
        return Err(InvalidMessage(format!(
            "data must be a JSON object, got {}",
            kind(&value)
        )));
    }
    Ok(value)
}

fn parse_json(bytes: &[u8]) -> Result<Value, InvalidMessage> {
    serde_json::from_slice(bytes)
        .map_err(|e| InvalidMessage(format!("data is not valid JSON: {e}")))
}

/// Checks a text field: not empty, at most `max` bytes, no NUL character.
pub(crate) fn check_text(field: &str, value: &str, max: usize) -> Result<(), InvalidMessage> {
    if value.is_empty() {
        return Err(InvalidMessage(format!("{field} must not be empty")));
    }
    if value.len() > max {
        return Err(InvalidMessage(format!(
            "{field} is {} bytes; at most {max} are allowed",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(InvalidMessage(format!(
            "{field} must not contain a NUL character"
        )));
    }
    Ok(())
}

/// The JSON kind of a value, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn data_in_every_supported_form() {
        let want = json!({"username": "ada", "content": "hi"});
        let text = want.to_string();
        for (data, encoding) in [
            (want.clone(), None),
            (json!(text), None),
            (json!(text), Some("json")),
            (want.clone(), Some("json")),
            (json!(b64(&text)), Some("json/utf-8/base64")),
            (json!(b64(&text)), Some("utf-8/base64")),
            (json!(b64(&text)), Some("base64")),
            (json!(text), Some("json/utf-8")),
        ] {
            assert_eq!(
                decode_data(&data, encoding).expect("decodes"),
                want,
                "{data} {encoding:?}"
            );
        }
    }

    #[test]
    fn bad_data_is_invalid() {
        for (data, encoding, reason) in [
            (json!(null), None, "no data"),
            (json!("not json"), None, "not valid JSON"),
            (json!("[1,2]"), None, "must be a JSON object"),
            (json!(42), None, "must be a JSON object"),
            (json!("%%%"), Some("json/utf-8/base64"), "not valid base64"),
            (
                json!(b64("\u{fffd}")),
                Some("cipher+aes-128-cbc/base64"),
                "unsupported",
            ),
            (json!({"a": 1}), Some("base64"), "needs string data"),
        ] {
            let err = decode_data(&data, encoding).expect_err("invalid");
            assert!(err.0.contains(reason), "{data} {encoding:?}: {err}");
        }
        let not_utf8 = base64::engine::general_purpose::STANDARD.encode([0xff, 0xfe]);
        let err = decode_data(&json!(not_utf8), Some("utf-8/base64")).expect_err("invalid");
        assert!(err.0.contains("UTF-8"), "{err}");
        let huge = "x".repeat(MAX_DATA_BYTES + 1);
        assert!(decode_data(&json!(huge), None).is_err());
    }

    #[test]
    fn envelope_errors_are_clear() {
        for (event, reason) in [
            (json!("hello"), "must be a JSON object"),
            (json!({}), "missing field `messages`"),
            (json!({"messages": {}}), "invalid type"),
            (json!({"messages": [], "channel": 5}), "invalid type"),
        ] {
            let err = Envelope::from_value(event.clone()).expect_err("invalid");
            assert!(matches!(err, Error::InvalidEvent(_)));
            assert!(err.to_string().contains(reason), "{event}: {err}");
            assert!(!err.retryable());
        }
        let too_many = json!({ "messages": vec![json!({}); MAX_MESSAGES + 1] });
        let err = Envelope::from_value(too_many).expect_err("too many");
        assert!(err.to_string().contains("at most 1000"), "{err}");
        let ok =
            json!({"source": "channel.message", "channel": "c", "extra": true, "messages": [1]});
        assert_eq!(Envelope::from_value(ok).expect("valid").messages.len(), 1);
    }

    fn message(value: Value) -> Result<Action, InvalidMessage> {
        Message::from_value(value)?.action()
    }

    #[test]
    fn messages_become_actions() {
        let insert = message(json!({
            "id": "m1", "clientId": "c1", "connectionId": "k", "timestamp": 1700000000000_i64,
            "name": "chatMsg", "data": {"username": "ada", "content": "hi", "extra": 1}, "unknown": true
        }))
        .expect("valid");
        assert_eq!(
            insert,
            Action::Insert(NewChatMessage {
                msg_id: "m1".into(),
                username: "ada".into(),
                content: "hi".into(),
                client_id: "c1".into(),
                client_kind: ClientKind::Legacy,
                created_at_ms: 1_700_000_000_000,
            })
        );
        let edit = message(json!({
            "id": "e1", "clientId": "c1", "name": "editedMsg",
            "data": "{\"username\":\"ada\",\"content\":\"hey\",\"msgIdToEdit\":\"m1\"}"
        }))
        .expect("valid");
        assert!(
            matches!(edit, Action::Edit(ref e) if e.msg_id_to_edit == "m1" && e.content == "hey")
        );
        assert_eq!(
            message(json!({"id": "x", "name": "typing", "data": 1})),
            Ok(Action::Skip)
        );
        assert_eq!(message(json!({"id": "x"})), Ok(Action::Skip));
    }

    #[test]
    fn client_kind_names_the_namespace_of_the_client_id() {
        let chat = |kind: Value| {
            let mut m = json!({"id": "m", "clientId": "c", "timestamp": 1, "name": "chatMsg",
                               "data": {"username": "u", "content": "x"}});
            if !kind.is_null() {
                m["clientKind"] = kind;
            }
            message(m)
        };
        for (kind, want) in [
            (json!("user"), ClientKind::User),
            (json!("anonymous"), ClientKind::Anonymous),
            (json!("server"), ClientKind::Server),
            (Value::Null, ClientKind::Legacy),
        ] {
            assert!(
                matches!(chat(kind.clone()), Ok(Action::Insert(ref m)) if m.client_kind == want),
                "{kind}"
            );
        }
        // `legacy` names only the absence of the field; anything else is refused, never guessed.
        for kind in [json!("legacy"), json!("USER"), json!(""), json!(5)] {
            assert!(chat(kind.clone()).is_err(), "{kind}");
        }
    }

    #[test]
    fn invalid_messages_say_why() {
        let base = |data: Value| json!({"id": "m", "clientId": "c", "timestamp": 1, "name": "chatMsg", "data": data});
        for (value, reason) in [
            (json!("m"), "must be a JSON object"),
            (json!({"name": "chatMsg"}), "missing field `id`"),
            (json!({"id": 5}), "invalid type"),
            (json!({"id": ""}), "id must not be empty"),
            (base(json!({"content": "hi"})), "missing field `username`"),
            (base(json!({"username": "ada"})), "missing field `content`"),
            (
                base(json!({"username": 1, "content": "hi"})),
                "invalid type",
            ),
            (
                base(json!({"username": "ada", "content": ""})),
                "content must not be empty",
            ),
            (
                base(json!({"username": "ada", "content": "a\u{0}b"})),
                "NUL",
            ),
            (
                base(json!({"username": "ada", "content": "x".repeat(MAX_CONTENT_BYTES + 1)})),
                "at most 65536",
            ),
            (
                json!({"id": "m", "timestamp": 1, "name": "chatMsg", "data": {"username": "a", "content": "b"}}),
                "no clientId",
            ),
            (
                json!({"id": "m", "clientId": "c", "name": "chatMsg", "data": {"username": "a", "content": "b"}}),
                "no timestamp",
            ),
            (
                json!({"id": "m", "clientId": "c", "name": "editedMsg", "data": {"username": "a", "content": "b"}}),
                "missing field `msgIdToEdit`",
            ),
        ] {
            let err = message(value.clone()).expect_err("invalid");
            assert!(err.0.contains(reason), "{value}: {err}");
        }
    }
}
