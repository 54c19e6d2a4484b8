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
//! - the connect reply carries `session` and `node` (the session puts them in its typed reply,
//!   [`crate::session::Emulated`]); the client posts `{"session", "node", "data"}`
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
//!
//! # Layout
//! - this file: the routes, the registry of this node's emulated sessions, and what the stream and
//!   command endpoints share (origin check, CORS, client IP, ids);
//! - `stream`: `POST /connection/http_stream` and `/connection/sse`: the checks of an opening
//!   stream, the session on its task, and its messages framed into the response body;
//! - `command`: `POST /emulation`, a command frame handed to its session.

mod command;
mod stream;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::Extension;
use axum::extract::ws::Message;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use relay_protocol::reply::Encoding;
use tokio::sync::mpsc;

use crate::edge::Edge;
use crate::http::accept::ConnMeta;

/// Command frames waiting for their session (each up to `client.max_message_bytes`).
const INBOUND_FRAMES: usize = 16;

/// Response chunks waiting for the socket (the session's write timeout bounds the wait).
const OUTBOUND_CHUNKS: usize = 16;

/// The emulated sessions of this node, by session id.
#[derive(Debug)]
pub(crate) struct Registry {
    node: String,
    sessions: parking_lot::Mutex<HashMap<String, Entry>>,
}

/// How an `/emulation` request reaches a session.
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

    /// Adds a session; it stays until the returned guard is dropped.
    fn register(self: &Arc<Self>, session: String, entry: Entry) -> Registered {
        self.sessions.lock().insert(session.clone(), entry);
        Registered {
            registry: self.clone(),
            session,
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
        .route("/connection/http_stream", any(stream::http_stream))
        .route("/connection/sse", any(stream::sse))
        .route("/emulation", post(command::emulation).options(preflight))
        .layer(Extension(registry))
}

async fn preflight(headers: HeaderMap) -> Response {
    with_cors(&headers, StatusCode::OK.into_response())
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
