//! The transports the SDKs fall back to when a WebSocket cannot be used: HTTP-streaming
//! (`POST /connection/http_stream`, JSON or Protobuf) and Server-Sent Events (`GET` or `POST
//! /connection/sse`, JSON only), with the emulation endpoint (`POST /emulation`) through which the
//! client sends its later commands.
//!
//! Each stream runs the very session the WebSocket runs ([`crate::session::serve_on`]) over an
//! adapter: the session's outgoing messages become the response body, its incoming frames come from
//! the request that opened the stream (the `connect` command: the body, or SSE's `cf_connect` query
//! parameter) and then from `/emulation` requests. The limits are the WebSocket's: a connection slot
//! per stream, `client.max_message_bytes` per command frame, the session's publish and subscribe
//! rates, outbound budget and write timeout.
//!
//! Wire format (as Centrifugo's, which centrifuge-js 5.8 speaks):
//! - HTTP-streaming, JSON: one reply or push per line (`\n` after each); Protobuf (request
//!   `Content-Type: application/octet-stream`): varint-length-delimited `Reply` messages;
//! - SSE: one `data: <JSON>` event per reply or push;
//! - the connect reply carries `session` and `node`; the client posts `{"session", "node", "data"}`
//!   to `/emulation` (`data`: the JSON commands as a string), or the Protobuf `EmulationRequest`
//!   with `Content-Type: application/octet-stream` (`data`: length-delimited commands);
//! - a close is the push `{"push":{"disconnect":{"code","reason"}}}` (the SDK reconnects or not
//!   by the code, as after a WebSocket close frame), then the end of the response.
//!
//! The session id is 128 random bits, known only to the client that opened the stream; an
//! `/emulation` request carries nothing else the session trusts (the commands run with the
//! session's identity). The statuses are Centrifugo's: a session that is not (or no longer) on
//! this node gets 204 and its commands are dropped (Centrifugo's survey finds no client and
//! reports success); another `node` gets 500 (Centrifugo answers so when its survey of that node
//! times out; the relay has no routing between nodes and answers at once), on which centrifuge-js
//! closes the stream and reconnects.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, Utf8Bytes};
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use futures_util::StreamExt;
use prost::Message as _;
use relay_protocol::pb::messages;
use relay_protocol::reply::Encoding;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::edge::Edge;
use crate::http::ConnMeta;

/// Command frames waiting for their session (each up to `client.max_message_bytes`).
const INBOUND_FRAMES: usize = 16;

/// Response chunks waiting for the socket (the session's write timeout bounds the wait).
const OUTBOUND_CHUNKS: usize = 16;

/// How a stream frames what the session sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// HTTP-streaming, JSON: a line per message.
    JsonLines,
    /// HTTP-streaming, Protobuf: length-delimited messages.
    Protobuf,
    /// SSE: a `data:` event per message.
    Sse,
}

/// The emulated sessions of this node, by session id.
#[derive(Debug)]
pub(crate) struct Registry {
    node: String,
    sessions: parking_lot::Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    inbound: mpsc::Sender<Message>,
    encoding: Encoding,
}

impl Registry {
    fn new() -> Self {
        Self {
            node: random_id(),
            sessions: parking_lot::Mutex::new(HashMap::new()),
        }
    }
}

/// Removes a session from the registry when it ends.
struct Registered {
    registry: Arc<Registry>,
    session: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.sessions.lock().remove(&self.session);
    }
}

/// The routes of the streaming transports and of `/emulation`.
pub(crate) fn routes() -> Router<Arc<Edge>> {
    let registry = Arc::new(Registry::new());
    Router::new()
        .route("/connection/http_stream", any(http_stream))
        .route("/connection/sse", any(sse))
        .route("/emulation", post(emulation).options(preflight))
        .layer(Extension(registry))
}

#[derive(Debug, Deserialize)]
struct SseQuery {
    cf_connect: Option<String>,
}

async fn preflight(headers: HeaderMap) -> Response {
    with_cors(&headers, StatusCode::OK.into_response())
}

async fn http_stream(
    State(state): State<Arc<Edge>>,
    Extension(registry): Extension<Arc<Registry>>,
    meta: Option<Extension<ConnMeta>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method == Method::OPTIONS {
        return preflight(headers).await;
    }
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let framing = if is_octet_stream(&headers) {
        Framing::Protobuf
    } else {
        Framing::JsonLines
    };
    let limit = state.config.client.max_message_bytes;
    let Ok(first) = axum::body::to_bytes(body, limit).await else {
        return with_cors(&headers, StatusCode::PAYLOAD_TOO_LARGE.into_response());
    };
    open(state, registry, meta, &headers, framing, first)
}

async fn sse(
    State(state): State<Arc<Edge>>,
    Extension(registry): Extension<Arc<Registry>>,
    meta: Option<Extension<ConnMeta>>,
    method: Method,
    headers: HeaderMap,
    Query(query): Query<SseQuery>,
    body: Body,
) -> Response {
    let limit = state.config.client.max_message_bytes;
    let first = match method {
        Method::OPTIONS => return preflight(headers).await,
        Method::GET => match query.cf_connect {
            Some(c) if c.len() > limit => {
                return with_cors(&headers, StatusCode::PAYLOAD_TOO_LARGE.into_response());
            }
            Some(c) if !c.is_empty() => Bytes::from(c),
            _ => return with_cors(&headers, StatusCode::BAD_REQUEST.into_response()),
        },
        Method::POST => match axum::body::to_bytes(body, limit).await {
            Ok(b) => b,
            Err(_) => return with_cors(&headers, StatusCode::PAYLOAD_TOO_LARGE.into_response()),
        },
        _ => return StatusCode::METHOD_NOT_ALLOWED.into_response(),
    };
    open(state, registry, meta, &headers, Framing::Sse, first)
}

/// Opens a stream: the same checks as the WebSocket upgrade (shutdown, origin, connection slot),
/// then the session on its own task, its output as the response body.
fn open(
    state: Arc<Edge>,
    registry: Arc<Registry>,
    meta: Option<Extension<ConnMeta>>,
    headers: &HeaderMap,
    framing: Framing,
    first: Bytes,
) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if !origin_allowed(&state, headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let encoding = if framing == Framing::Protobuf {
        Encoding::Protobuf
    } else {
        Encoding::Json
    };
    let first = match encoding {
        Encoding::Json => match String::from_utf8(first.to_vec()) {
            Ok(text) if !text.trim().is_empty() => Message::Text(Utf8Bytes::from(text)),
            _ => return with_cors(headers, StatusCode::BAD_REQUEST.into_response()),
        },
        Encoding::Protobuf if first.is_empty() => {
            return with_cors(headers, StatusCode::BAD_REQUEST.into_response());
        }
        Encoding::Protobuf => Message::Binary(first),
    };
    let Ok(slot) = state.connection_slots.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "connection limit").into_response();
    };
    let ip = client_ip(&state, meta.as_ref(), headers);
    // A stream lives as long as a WebSocket: it leaves the set of idle connections that may be
    // evicted to admit new ones.
    if let Some(Extension(meta)) = &meta {
        meta.upgrading();
    }

    let session = random_id();
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<Message>(INBOUND_FRAMES);
    // The channel is empty and ours: the connect frame goes first.
    let _ = inbound_tx.try_send(first);
    registry.sessions.lock().insert(
        session.clone(),
        Entry {
            inbound: inbound_tx,
            encoding,
        },
    );
    let registered = Registered {
        registry: registry.clone(),
        session: session.clone(),
    };

    let (body_tx, mut body_rx) = mpsc::channel::<Bytes>(OUTBOUND_CHUNKS);
    let gone_tx = body_tx.clone();
    let writer = Writer {
        tx: body_tx,
        framing,
        ids: Some((session, registry.node.clone())),
    };
    let sink = Box::pin(futures_util::sink::unfold(
        writer,
        |mut writer, message: Message| async move {
            if let Some(chunk) = writer.render(message) {
                writer.tx.send(chunk).await.map_err(|_| {
                    axum::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
                })?;
            }
            Ok::<_, axum::Error>(writer)
        },
    ));
    let inbound =
        futures_util::stream::poll_fn(move |cx| inbound_rx.poll_recv(cx)).map(Ok::<_, axum::Error>);
    // The client went away (the response body was dropped): the session ends at once, as when a
    // WebSocket closes.
    let gone = futures_util::stream::once(async move {
        gone_tx.closed().await;
        Ok(Message::Close(None))
    });
    let stream = Box::pin(futures_util::stream::select(inbound, gone));

    let tracker = state.tracker.clone();
    tracker.spawn(async move {
        crate::session::serve_on(sink, stream, state, ip, encoding).await;
        drop(registered);
        drop(slot);
    });

    let mut chunks: Vec<Bytes> = Vec::new();
    if framing == Framing::Sse {
        // Sent at once, so the client sees the stream open before the first event.
        chunks.push(Bytes::from_static(b"\r\n"));
    }
    let mut prelude = chunks.into_iter();
    let body = futures_util::stream::poll_fn(move |cx| {
        if let Some(chunk) = prelude.next() {
            return std::task::Poll::Ready(Some(chunk));
        }
        body_rx.poll_recv(cx)
    })
    .map(Ok::<_, Infallible>);
    let content_type = match framing {
        Framing::JsonLines => "application/json",
        Framing::Protobuf => "application/octet-stream",
        Framing::Sse => "text/event-stream; charset=utf-8",
    };
    let response = (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CACHE_CONTROL,
                "private, no-cache, no-store, must-revalidate, max-age=0",
            ),
            (header::PRAGMA, "no-cache"),
            (header::EXPIRES, "0"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response();
    with_cors(headers, response)
}

/// Turns the session's messages into response bytes.
struct Writer {
    tx: mpsc::Sender<Bytes>,
    framing: Framing,
    /// The session id and node, added to the connect reply (then `None`).
    ids: Option<(String, String)>,
}

impl Writer {
    fn render(&mut self, message: Message) -> Option<Bytes> {
        match message {
            Message::Text(text) => {
                let mut out = String::with_capacity(text.len() + 16);
                for line in text.as_str().split('\n').filter(|l| !l.is_empty()) {
                    let annotated = self.annotate_json(line);
                    let line = annotated.as_deref().unwrap_or(line);
                    match self.framing {
                        Framing::Sse => {
                            out.push_str("data: ");
                            out.push_str(line);
                            out.push_str("\n\n");
                        }
                        _ => {
                            out.push_str(line);
                            out.push('\n');
                        }
                    }
                }
                Some(Bytes::from(out))
            }
            Message::Binary(bytes) => Some(self.annotate_protobuf(bytes)),
            Message::Close(Some(frame)) => Some(self.disconnect(frame.code, frame.reason.as_str())),
            Message::Close(None) | Message::Ping(_) | Message::Pong(_) => None,
        }
    }

    /// The connect reply gets `session` and `node` (JSON).
    fn annotate_json(&mut self, line: &str) -> Option<String> {
        let (session, node) = self.ids.as_ref()?;
        if !line.contains("\"connect\"") {
            return None;
        }
        let mut value: serde_json::Value = serde_json::from_str(line).ok()?;
        let connect = value.get_mut("connect")?.as_object_mut()?;
        connect.insert("session".into(), session.clone().into());
        connect.insert("node".into(), node.clone().into());
        self.ids = None;
        Some(value.to_string())
    }

    /// The connect reply gets `session` and `node` (Protobuf: the frame is decoded and re-encoded
    /// only until the connect reply has passed).
    fn annotate_protobuf(&mut self, frame: Bytes) -> Bytes {
        let Some((session, node)) = self.ids.clone() else {
            return frame;
        };
        let Ok(parts) = relay_protocol::pb::split_frame(&frame) else {
            return frame;
        };
        let mut replies = Vec::with_capacity(parts.len());
        let mut found = false;
        for part in parts {
            let Ok(mut reply) = messages::Reply::decode(part) else {
                return frame;
            };
            if let Some(connect) = reply.connect.as_mut() {
                connect.session.clone_from(&session);
                connect.node.clone_from(&node);
                found = true;
            }
            replies.push(reply);
        }
        if !found {
            return frame;
        }
        self.ids = None;
        let mut out = Vec::with_capacity(frame.len() + 80);
        for reply in replies {
            // Encoding into a Vec cannot fail.
            let _ = reply.encode_length_delimited(&mut out);
        }
        Bytes::from(out)
    }

    /// What a WebSocket close frame says, as the disconnect push of an emulated transport.
    fn disconnect(&self, code: u16, reason: &str) -> Bytes {
        match self.framing {
            Framing::Protobuf => {
                let reply = messages::Reply {
                    push: Some(messages::Push {
                        disconnect: Some(messages::Disconnect {
                            code: u32::from(code),
                            reason: reason.to_owned(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                Bytes::from(reply.encode_length_delimited_to_vec())
            }
            framing => {
                let push =
                    serde_json::json!({"push": {"disconnect": {"code": code, "reason": reason}}});
                if framing == Framing::Sse {
                    Bytes::from(format!("data: {push}\n\n"))
                } else {
                    Bytes::from(format!("{push}\n"))
                }
            }
        }
    }
}

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
async fn emulation(
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

/// 128 bits from the operating system's CSPRNG, in hex: a session id nobody can guess.
fn random_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // The OS generator does not fail on supported platforms; a random UUID is the fallback.
        return uuid::Uuid::new_v4().simple().to_string();
    }
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
        s
    })
}

fn is_octet_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/octet-stream")
}

fn origin_allowed(state: &Edge, headers: &HeaderMap) -> bool {
    let get = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    crate::limits::origin_allowed(
        state.config.client.allowed_origins.as_deref(),
        get(header::ORIGIN),
        get(header::HOST),
    )
}

/// CORS for a browser page on another origin (reached only when the origin is allowed): the
/// origin echoed, with credentials, and the headers the preflight asks for.
fn with_cors(request: &HeaderMap, mut response: Response) -> Response {
    let Some(origin) = request.get(header::ORIGIN) else {
        return response;
    };
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    if let Some(asked) = request
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| !v.is_empty() && v.as_bytes() != b"null")
    {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    response
}

fn client_ip(state: &Edge, meta: Option<&Extension<ConnMeta>>, headers: &HeaderMap) -> IpAddr {
    let peer = meta.map_or(IpAddr::from([127, 0, 0, 1]), |m| m.peer.ip());
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    crate::limits::client_ip(peer, &state.limits.trusted_proxies, &forwarded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(framing: Framing) -> Writer {
        let (tx, _rx) = mpsc::channel(1);
        Writer {
            tx,
            framing,
            ids: Some(("s1".into(), "n1".into())),
        }
    }

    #[test]
    fn json_lines_get_the_session_in_the_connect_reply_and_a_newline_each() {
        let mut w = writer(Framing::JsonLines);
        let out = w
            .render(Message::Text(Utf8Bytes::from(
                "{\"id\":1,\"connect\":{\"client\":\"c\"}}\n{\"id\":2,\"subscribe\":{}}",
            )))
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap_or_default();
        assert_eq!(first["connect"]["session"], "s1");
        assert_eq!(first["connect"]["node"], "n1");
        assert_eq!(lines[1], "{\"id\":2,\"subscribe\":{}}");
        assert!(text.ends_with('\n'));
        // Only the first connect reply is touched.
        assert!(w.ids.is_none());
    }

    #[test]
    fn sse_events_and_the_disconnect_push() {
        let mut w = writer(Framing::Sse);
        let out = w
            .render(Message::Text(Utf8Bytes::from("{}\n{\"push\":{}}")))
            .unwrap_or_default();
        assert_eq!(&out[..], b"data: {}\n\ndata: {\"push\":{}}\n\n");
        let close = w
            .render(Message::Close(Some(axum::extract::ws::CloseFrame {
                code: 3001,
                reason: Utf8Bytes::from_static("shutdown"),
            })))
            .unwrap_or_default();
        assert_eq!(
            &close[..],
            b"data: {\"push\":{\"disconnect\":{\"code\":3001,\"reason\":\"shutdown\"}}}\n\n"
        );
    }

    #[test]
    fn protobuf_connect_reply_gets_the_session() {
        let mut w = writer(Framing::Protobuf);
        let reply = messages::Reply {
            id: 1,
            connect: Some(messages::ConnectResult {
                client: "c".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let frame = Bytes::from(reply.encode_length_delimited_to_vec());
        let out = w.render(Message::Binary(frame)).unwrap_or_default();
        let decoded = messages::Reply::decode_length_delimited(out).unwrap_or_default();
        let connect = decoded.connect.unwrap_or_default();
        assert_eq!(
            (connect.session.as_str(), connect.node.as_str()),
            ("s1", "n1")
        );
        assert_eq!(connect.client, "c");
        let close = w
            .render(Message::Close(Some(axum::extract::ws::CloseFrame {
                code: 3012,
                reason: Utf8Bytes::from_static("no pong"),
            })))
            .unwrap_or_default();
        let push = messages::Reply::decode_length_delimited(close)
            .unwrap_or_default()
            .push
            .and_then(|p| p.disconnect)
            .unwrap_or_default();
        assert_eq!((push.code, push.reason.as_str()), (3012, "no pong"));
    }
}
