//! The Ably-style envelope a target receives: one message per client publication or `rpc`, with the
//! sender's identity (see "Identity" in the module docs of [`super`]).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::value::RawValue;

/// One message of the envelope.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EnvelopeMessage<'a> {
    /// Message id, assigned by the connector.
    pub id: String,
    /// The sender: the connection's user, or its client id when anonymous.
    pub client_id: &'a str,
    /// The namespace of `client_id`: `user`, `anonymous` or `server` (see the module docs).
    pub client_kind: &'static str,
    /// The connection.
    pub connection_id: &'a str,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// Message name.
    pub name: &'a str,
    /// Message data: JSON text of an object (with `encoding: "json"`) or a plain string.
    pub data: String,
    /// `"json"` when `data` is JSON text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
}

/// The Ably-style envelope.
#[derive(Debug, Serialize)]
pub(crate) struct Envelope<'a> {
    /// Always `channel.message`.
    pub source: &'static str,
    /// The channel published on.
    pub channel: &'a str,
    /// The messages (one per client publish).
    pub messages: Vec<EnvelopeMessage<'a>>,
}

/// The client's publication data for a rule-bound channel: `{"name": N, "data": D}`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct NamedData<'a> {
    /// Message name.
    pub name: String,
    /// Message data.
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// The namespace of a sender id, from what the callers pass: the server API passes `"api"` as the
/// connection (a real connection id is a UUID the connector generates); a session passes its own
/// connection id as the sender when anonymous, and the token's `sub` otherwise. (A `sub` equal to the
/// connection's own freshly generated id would be filed as that anonymous connection: it can borrow
/// nobody else's identity.)
pub(crate) fn client_kind(client_id: &str, connection_id: &str) -> &'static str {
    if connection_id == "api" {
        "server"
    } else if client_id == connection_id {
        "anonymous"
    } else {
        "user"
    }
}

/// Builds the envelope of an `rpc`: source `rpc`, the method as channel and message name.
pub(crate) fn rpc_envelope<'a>(
    method: &'a str,
    client_id: &'a str,
    connection_id: &'a str,
    named: &'a NamedData<'_>,
    message_id: String,
) -> Envelope<'a> {
    Envelope {
        source: "rpc",
        ..envelope(method, client_id, connection_id, named, message_id)
    }
}

/// Builds the envelope for one client publication.
pub(crate) fn envelope<'a>(
    channel: &'a str,
    client_id: &'a str,
    connection_id: &'a str,
    named: &'a NamedData<'_>,
    message_id: String,
) -> Envelope<'a> {
    let (data, encoding) = match named.data {
        None => (String::new(), None),
        Some(raw) => match serde_json::from_str::<String>(raw.get()) {
            Ok(plain) => (plain, None),
            Err(_) => (raw.get().to_owned(), Some("json")),
        },
    };
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Envelope {
        source: "channel.message",
        channel,
        messages: vec![EnvelopeMessage {
            id: message_id,
            client_id,
            client_kind: client_kind(client_id, connection_id),
            connection_id,
            timestamp,
            name: &named.name,
            data,
            encoding,
        }],
    }
}
