//! The HTTP router: the WebSocket endpoint, HTTP-streaming and SSE ([`emulation`]), health,
//! readiness, metrics, the server API (`/api`) and the chat page at `/`; the accept loop in front
//! of it is [`accept`].

pub(crate) mod accept;
pub(crate) mod emulation;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Extension, RawQuery, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use relay_protocol::reply::Encoding;
use tokio::net::TcpListener;

use crate::edge::Edge;
use crate::session;

use accept::{ConnMeta, READ_BUFFER};

/// Serves HTTP and WebSockets on `listener` until `shutdown` completes; then asks every connection
/// to finish (upgraded sessions end through the state's shutdown token).
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<Edge>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let router = router(state.clone());
    accept::serve(listener, state, router, shutdown).await;
}

/// Builds the router.
pub(crate) fn router(state: Arc<Edge>) -> Router {
    Router::new()
        .route("/connection/websocket", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::page::routes())
        .merge(crate::api::routes())
        .merge(crate::http::emulation::routes())
        .merge(crate::demo::routes(state.config.demo.token_endpoint))
        .with_state(state)
}

/// Upgrades to the Centrifugo client protocol, JSON or Protobuf ([`encoding`]). `centrifuge-json`
/// and `centrifuge-protobuf` are echoed when offered; no or an empty `Sec-WebSocket-Protocol` is
/// accepted too (the JSON SDKs send none by default).
///
/// Refused before the upgrade: a browser `Origin` that `client.allowed_origins` does not allow (403),
/// and a connection over `client.max_connections` (503; the SDKs retry with backoff, perhaps reaching
/// another node).
async fn websocket(
    State(state): State<Arc<Edge>>,
    meta: Option<Extension<ConnMeta>>,
    headers: axum::http::HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let header = |name: axum::http::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if !crate::limits::origin_allowed(
        state.config.client.allowed_origins.as_deref(),
        header(axum::http::header::ORIGIN),
        header(axum::http::header::HOST),
    ) {
        tracing::debug!(origin = ?header(axum::http::header::ORIGIN), "WebSocket origin refused");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let Ok(slot) = state.connection_slots.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "connection limit").into_response();
    };
    let peer = meta
        .as_ref()
        .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |m| m.peer.ip());
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let ip = crate::limits::client_ip(peer, &state.limits.trusted_proxies, &forwarded);
    if let Some(Extension(meta)) = &meta {
        meta.upgrading();
    }
    let max = state.config.client.max_message_bytes;
    let tracker = state.tracker.clone();
    // The write buffer stays at the default (128 KiB): a session's batch of pushes leaves in one
    // write. A 4 KiB one cost fan-out 20-40 % more CPU per frame (docs/benchmarks.md).
    let ws = ws.protocols(["centrifuge-json", "centrifuge-protobuf"]);
    let encoding = encoding(ws.selected_protocol(), query.as_deref());
    ws.read_buffer_size(READ_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // Made here and mapped, not awaited inside an `async` block, which would keep room for
            // the socket and for a second copy of the session's future.
            let session = session::serve(socket, state, ip, encoding);
            tracker.track_future(futures_util::FutureExt::map(session, move |()| drop(slot)))
        })
}

/// The encoding a WebSocket asks for: Protobuf when it selected the `centrifuge-protobuf`
/// subprotocol or has `cf_protocol=protobuf` or `format=protobuf` in its query (as Centrifugo reads
/// them), JSON otherwise (no subprotocol, `centrifuge-json`, anything else).
fn encoding(subprotocol: Option<&axum::http::HeaderValue>, query: Option<&str>) -> Encoding {
    if subprotocol.is_some_and(|p| p.as_bytes() == b"centrifuge-protobuf") {
        return Encoding::Protobuf;
    }
    let asks_protobuf = query.unwrap_or("").split('&').any(|pair| {
        matches!(
            pair.split_once('='),
            Some(("cf_protocol" | "format", "protobuf"))
        )
    });
    if asks_protobuf {
        Encoding::Protobuf
    } else {
        Encoding::Json
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<Edge>>) -> Response {
    if let Some(problem) = state.node.stream().capture.problem() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("capture changed under this node: {problem}"),
        )
            .into_response();
    }
    if state.node.stream().ready.load(Ordering::Relaxed) && !state.shutdown.is_cancelled() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "change stream not ready").into_response()
    }
}

/// `/metrics`: the node's registry with the values read now ([`crate::metrics`]).
async fn metrics(
    State(state): State<Arc<Edge>>,
    meta: Option<Extension<ConnMeta>>,
) -> impl IntoResponse {
    let pending = meta.map(|Extension(meta)| meta.pending());
    let node = &state.node;
    let scrape = node.scrape(pending).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        node.metrics().encode(scrape),
    )
}
