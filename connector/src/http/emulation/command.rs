//! `POST /emulation`: the commands of an emulated transport's client, handed to its session as a
//! frame, as if read from a WebSocket.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, Utf8Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prost::Message as _;
use relay_protocol::reply::Encoding;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Registry, is_octet_stream, origin_allowed, with_cors};
use crate::edge::Edge;

/// The JSON form of an emulation request.
#[derive(Debug, Deserialize)]
struct JsonEmulation {
    #[serde(default)]
    session: String,
    #[serde(default)]
    node: String,
    data: Box<RawValue>,
}

/// The Protobuf form (Centrifugo's `EmulationRequest`).
#[derive(Clone, PartialEq, prost::Message)]
struct PbEmulation {
    #[prost(string, tag = "1")]
    node: String,
    #[prost(string, tag = "2")]
    session: String,
    #[prost(bytes = "bytes", tag = "3")]
    data: Bytes,
}

/// `POST /emulation`: a command frame for a stream's session. 204 when handed to the session or
/// when no such session is on this node (dropped, as Centrifugo does), 400 for a malformed request,
/// 413 for a body over the limit, 500 for another node's session, 503 when the session does not
/// take it within the write timeout.
pub(super) async fn emulation(
    State(state): State<Arc<Edge>>,
    Extension(registry): Extension<Arc<Registry>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let reply = |status: StatusCode| with_cors(&headers, status.into_response());
    if !origin_allowed(&state, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let limit = state.config.client.max_message_bytes;
    // JSON escapes can make the command string longer than the frame it carries.
    let Ok(body) = axum::body::to_bytes(body, limit.saturating_mul(2).saturating_add(1024)).await
    else {
        return reply(StatusCode::PAYLOAD_TOO_LARGE);
    };
    let protobuf_request = is_octet_stream(&headers);
    let (session, node, data) = if protobuf_request {
        match PbEmulation::decode(body) {
            Ok(r) => (r.session, r.node, Err(r.data)),
            Err(_) => return reply(StatusCode::BAD_REQUEST),
        }
    } else {
        match serde_json::from_slice::<JsonEmulation>(&body) {
            Ok(r) => (r.session, r.node, Ok(r.data)),
            Err(_) => return reply(StatusCode::BAD_REQUEST),
        }
    };
    if !node.is_empty() && node != registry.node {
        return reply(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let Some(entry) = registry.sessions.lock().get(&session).cloned() else {
        return reply(StatusCode::NO_CONTENT);
    };
    let frame = match (entry.encoding, data) {
        // A JSON session's commands: the lines, as a JSON string.
        (Encoding::Json, Ok(raw)) => match serde_json::from_str::<String>(raw.get()) {
            Ok(text) if text.len() <= limit => Message::Text(Utf8Bytes::from(text)),
            Ok(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE),
            Err(_) => return reply(StatusCode::BAD_REQUEST),
        },
        (Encoding::Protobuf, Err(bytes)) if bytes.len() <= limit => Message::Binary(bytes),
        (Encoding::Protobuf, Err(_)) => return reply(StatusCode::PAYLOAD_TOO_LARGE),
        // A request in the other encoding than the session's.
        _ => return reply(StatusCode::BAD_REQUEST),
    };
    let wait = Duration::from_secs(state.config.client.write_timeout_secs);
    match tokio::time::timeout(wait, entry.inbound.send(frame)).await {
        Ok(Ok(())) => reply(StatusCode::NO_CONTENT),
        // The session ended meanwhile: as for an unknown session.
        Ok(Err(_)) => reply(StatusCode::NO_CONTENT),
        Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE),
    }
}
