//! The HTTP router: the WebSocket endpoint, health, readiness, metrics, the server API (`/api`)
//! and the chat page at `/`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::session;
use crate::state::AppState;

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/connection/websocket", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::page::routes())
        .merge(crate::api::routes())
        .merge(crate::demo::routes(state.config.demo.token_endpoint))
        .with_state(state)
}

/// Upgrades to the Centrifugo JSON protocol. `centrifuge-json` is echoed when offered; no or an empty
/// `Sec-WebSocket-Protocol` is accepted too (the SDKs send none by default).
///
/// Refused before the upgrade: a browser `Origin` that `client.allowed_origins` does not allow (403),
/// and a connection over `client.max_connections` (503; the SDKs retry with backoff, perhaps reaching
/// another node).
async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
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
    let max = state.config.client.max_message_bytes;
    let tracker = state.tracker.clone();
    // Client frames are small: an 8 KiB read buffer (it grows for a larger frame) instead of the
    // default 128 KiB keeps an idle connection's memory in kilobytes.
    ws.protocols(["centrifuge-json"])
        .read_buffer_size(8 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                session::serve(socket, state).await;
                drop(slot);
            })
        })
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.stream.ready.load(Ordering::Relaxed) && !state.shutdown.is_cancelled() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "change stream not ready").into_response()
    }
}

/// Database-side gauges, read at scrape time: how far the stream is behind, and how full
/// PostgreSQL's NOTIFY queue is (a full queue makes notifying commits fail).
#[derive(sqlx::FromRow)]
struct DbGauges {
    unsequenced: i64,
    oldest_unsequenced_secs: f64,
    notify_queue_usage: f64,
}

async fn db_gauges(state: &AppState) -> Option<DbGauges> {
    let query = sqlx::query_as::<_, DbGauges>(
        "SELECT count(*) AS unsequenced,
                coalesce(extract(epoch FROM clock_timestamp() - min(written_at)), 0)::float8
                    AS oldest_unsequenced_secs,
                pg_notification_queue_usage() AS notify_queue_usage
         FROM relay.changelog",
    )
    .fetch_one(&state.pool);
    match tokio::time::timeout(std::time::Duration::from_secs(2), query).await {
        Ok(Ok(g)) => Some(g),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics query failed");
            None
        }
        Err(_) => None,
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    let m = &state.metrics;
    let mut out = String::new();
    if let Some(g) = db_gauges(&state).await {
        let _ = writeln!(
            out,
            "# HELP relay_changelog_unsequenced Changes committed but not yet sequenced (held back by \
             the oldest open transaction, or waiting for the next wake-up).\n\
             # TYPE relay_changelog_unsequenced gauge\nrelay_changelog_unsequenced {}\n\
             # HELP relay_changelog_oldest_unsequenced_seconds Age of the oldest change not yet \
             sequenced: the delivery delay a long-running writer transaction causes.\n\
             # TYPE relay_changelog_oldest_unsequenced_seconds gauge\n\
             relay_changelog_oldest_unsequenced_seconds {:.3}\n\
             # HELP relay_pg_notification_queue_usage pg_notification_queue_usage(): fraction of the \
             NOTIFY queue in use.\n# TYPE relay_pg_notification_queue_usage gauge\n\
             relay_pg_notification_queue_usage {}",
            g.unsequenced, g.oldest_unsequenced_secs, g.notify_queue_usage
        );
    }
    let mut line = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    line(
        "relay_connections",
        "gauge",
        "Open WebSocket connections.",
        m.connections.load(Ordering::Relaxed),
    );
    line(
        "relay_channels",
        "gauge",
        "Channels with subscribers on this node.",
        state.hub.channel_count() as u64,
    );
    line(
        "relay_subscriptions",
        "gauge",
        "Subscriptions on this node.",
        state.hub.subscription_count(),
    );
    line(
        "relay_presence_members",
        "gauge",
        "Presence memberships of this node's connections.",
        state.presence.local_members() as u64,
    );
    line(
        "relay_publications_in_total",
        "counter",
        "Client publications accepted.",
        m.publications_in.load(Ordering::Relaxed),
    );
    line(
        "relay_publications_out_total",
        "counter",
        "Publications written to clients.",
        m.publications_out.load(Ordering::Relaxed),
    );
    line(
        "relay_slow_disconnects_total",
        "counter",
        "Connections closed for not reading fast enough.",
        state.hub.slow_disconnects(),
    );
    line(
        "relay_recoveries_total",
        "counter",
        "Subscriptions recovered completely.",
        m.recovered.load(Ordering::Relaxed),
    );
    line(
        "relay_recoveries_failed_total",
        "counter",
        "Recoveries answered with recovered=false.",
        m.not_recovered.load(Ordering::Relaxed),
    );
    line(
        "relay_stream_reconnects_total",
        "counter",
        "Reconnects of the LISTEN connection.",
        state.stream.reconnects.load(Ordering::Relaxed),
    );
    line(
        "relay_stream_cursor",
        "gauge",
        "Sequence number of the last publication read.",
        state.stream.cursor.load(Ordering::Relaxed),
    );
    line(
        "relay_stream_catch_up_reads_total",
        "counter",
        "Catch-up reads of the changelog after a (re)connect of the LISTEN connection.",
        state.stream.catch_ups.load(Ordering::Relaxed),
    );
    out.push_str(&crate::capture::render_metrics(&state.pool, &state.capture).await);
    out.push_str(&state.stream.lag.render(
        "relay_delivery_lag_seconds",
        "From a change being written (in the writer's transaction) to its publication reaching the hub.",
    ));
    out
}
