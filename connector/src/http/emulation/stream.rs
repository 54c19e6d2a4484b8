//! The streams: `POST /connection/http_stream` (JSON lines, or length-delimited Protobuf) and
//! `GET`/`POST /connection/sse` (`data:` events). Opening one makes the checks of a WebSocket
//! upgrade, starts the session on its own task over an adapter, and answers with the session's
//! messages as the response body.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, Utf8Bytes};
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use prost::Message as _;
use relay_protocol::pb::messages;
use relay_protocol::reply::Encoding;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc;

use super::{
    Entry, INBOUND_FRAMES, OUTBOUND_CHUNKS, Registry, client_ip, is_octet_stream, origin_allowed,
    preflight, random_id, with_cors,
};
use crate::edge::Edge;
use crate::http::accept::ConnMeta;
use crate::session::Emulated;

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

impl Framing {
    /// The session's encoding: Protobuf for a Protobuf stream, JSON for the others.
    fn encoding(self) -> Encoding {
        match self {
            Self::Protobuf => Encoding::Protobuf,
            Self::JsonLines | Self::Sse => Encoding::Json,
        }
    }

    /// The response's `Content-Type`.
    fn content_type(self) -> &'static str {
        match self {
            Self::JsonLines => "application/json",
            Self::Protobuf => "application/octet-stream",
            Self::Sse => "text/event-stream; charset=utf-8",
        }
    }
}

/// SSE's query: a `GET` carries the connect command in `cf_connect`.
#[derive(Debug, Deserialize)]
pub(super) struct SseQuery {
    cf_connect: Option<String>,
}

pub(super) async fn http_stream(
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

pub(super) async fn sse(
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
    let Some(first) = first_frame(framing.encoding(), first) else {
        return with_cors(headers, StatusCode::BAD_REQUEST.into_response());
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
    let body = start_session(state, &registry, framing, first, ip, slot);
    with_cors(headers, response(framing, body))
}

/// The connect frame of the request that opens a stream, as a message in `encoding` (none when
/// there is none).
fn first_frame(encoding: Encoding, first: Bytes) -> Option<Message> {
    match encoding {
        Encoding::Json => match String::from_utf8(first.to_vec()) {
            Ok(text) if !text.trim().is_empty() => Some(Message::Text(Utf8Bytes::from(text))),
            _ => None,
        },
        Encoding::Protobuf if first.is_empty() => None,
        Encoding::Protobuf => Some(Message::Binary(first)),
    }
}

/// Runs the session of a new stream on its own task, registered for `/emulation` under a new
/// session id, with `first` as its first frame; returns the chunks of the response body. The
/// session holds the connection `slot` until it ends.
fn start_session(
    state: Arc<Edge>,
    registry: &Arc<Registry>,
    framing: Framing,
    first: Message,
    ip: IpAddr,
    slot: OwnedSemaphorePermit,
) -> mpsc::Receiver<Bytes> {
    let encoding = framing.encoding();
    let session = random_id();
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<Message>(INBOUND_FRAMES);
    // The channel is empty and ours: the connect frame goes first.
    let _ = inbound_tx.try_send(first);
    let entry = Entry {
        inbound: inbound_tx,
        encoding,
    };
    let registered = registry.register(session.clone(), entry);
    let emulated = Emulated {
        session,
        node: registry.node.clone(),
    };

    let (body_tx, body_rx) = mpsc::channel::<Bytes>(OUTBOUND_CHUNKS);
    let gone_tx = body_tx.clone();
    let sink = Box::pin(futures_util::sink::unfold(
        body_tx,
        move |tx, message: Message| async move {
            if let Some(chunk) = render(framing, message) {
                tx.send(chunk).await.map_err(|_| {
                    axum::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
                })?;
            }
            Ok::<_, axum::Error>(tx)
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
        crate::session::serve_on(sink, stream, state, ip, encoding, Some(emulated)).await;
        drop(registered);
        drop(slot);
    });
    body_rx
}

/// The streaming response: its headers, and the body's chunks as they come.
fn response(framing: Framing, mut chunks: mpsc::Receiver<Bytes>) -> Response {
    // SSE: sent at once, so the client sees the stream open before the first event.
    let mut prelude = (framing == Framing::Sse).then_some(Bytes::from_static(b"\r\n"));
    let body = futures_util::stream::poll_fn(move |cx| {
        if let Some(chunk) = prelude.take() {
            return std::task::Poll::Ready(Some(chunk));
        }
        chunks.poll_recv(cx)
    })
    .map(Ok::<_, Infallible>);
    (
        [
            (header::CONTENT_TYPE, framing.content_type()),
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
        .into_response()
}

/// A message of the session as response bytes: the lines of a text frame each as a line or an
/// SSE event, a binary frame's length-delimited messages as they are, and a close frame as the
/// disconnect push.
fn render(framing: Framing, message: Message) -> Option<Bytes> {
    match message {
        Message::Text(text) => {
            let mut out = String::with_capacity(text.len() + 16);
            for line in text.as_str().split('\n').filter(|l| !l.is_empty()) {
                if framing == Framing::Sse {
                    out.push_str("data: ");
                    out.push_str(line);
                    out.push_str("\n\n");
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            Some(Bytes::from(out))
        }
        Message::Binary(bytes) => Some(bytes),
        Message::Close(Some(frame)) => Some(disconnect(framing, frame.code, frame.reason.as_str())),
        Message::Close(None) | Message::Ping(_) | Message::Pong(_) => None,
    }
}

/// What a WebSocket close frame says, as the disconnect push of an emulated transport.
fn disconnect(framing: Framing, code: u16, reason: &str) -> Bytes {
    match framing {
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
        Framing::JsonLines | Framing::Sse => {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What a close frame with `code` and `reason` becomes in `framing`.
    fn render_close(framing: Framing, code: u16, reason: &'static str) -> Bytes {
        render(
            framing,
            Message::Close(Some(axum::extract::ws::CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            })),
        )
        .unwrap_or_default()
    }

    #[test]
    fn json_lines_get_a_newline_each_and_pass_unchanged() {
        let out = render(
            Framing::JsonLines,
            Message::Text(Utf8Bytes::from(
                "{\"id\":1,\"connect\":{\"client\":\"c\"}}\n{\"id\":2,\"subscribe\":{}}",
            )),
        )
        .unwrap_or_default();
        assert_eq!(
            &out[..],
            b"{\"id\":1,\"connect\":{\"client\":\"c\"}}\n{\"id\":2,\"subscribe\":{}}\n"
        );
    }

    #[test]
    fn sse_events_and_the_disconnect_push() {
        let out = render(
            Framing::Sse,
            Message::Text(Utf8Bytes::from("{}\n{\"push\":{}}")),
        )
        .unwrap_or_default();
        assert_eq!(&out[..], b"data: {}\n\ndata: {\"push\":{}}\n\n");
        let close = render_close(Framing::Sse, 3001, "shutdown");
        assert_eq!(
            &close[..],
            b"data: {\"push\":{\"disconnect\":{\"code\":3001,\"reason\":\"shutdown\"}}}\n\n"
        );
    }

    #[test]
    fn protobuf_frames_pass_unchanged_and_a_close_is_the_disconnect_push() {
        let reply = messages::Reply {
            id: 1,
            connect: Some(messages::ConnectResult {
                client: "c".into(),
                session: "s1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let frame = Bytes::from(reply.encode_length_delimited_to_vec());
        let out = render(Framing::Protobuf, Message::Binary(frame.clone())).unwrap_or_default();
        assert_eq!(out, frame);
        let close = render_close(Framing::Protobuf, 3012, "no pong");
        let push = messages::Reply::decode_length_delimited(close)
            .unwrap_or_default()
            .push
            .and_then(|p| p.disconnect)
            .unwrap_or_default();
        assert_eq!((push.code, push.reason.as_str()), (3012, "no pong"));
    }
}
