//! The chat page at `/`: plain HTML, CSS and JavaScript built into the binary (`connector/static/`),
//! so a running connector serves it with no build step and no files beside it.
//!
//! The page uses the official `centrifuge` JavaScript SDK (the pinned browser build of
//! `centrifuge@5.8.0`, vendored with its license header) to talk to this connector's
//! `/connection/websocket`: the same protocol every other client speaks.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../static/index.html");
const CHAT_JS: &str = include_str!("../static/chat.js");
const CHAT_CSS: &str = include_str!("../static/chat.css");
const CENTRIFUGE_JS: &str = include_str!("../static/centrifuge-5.8.0.js");

/// Same-origin scripts, styles and WebSocket only; the page cannot be framed.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The page's routes (no state needed).
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/static/chat.js",
            get(|| async { asset("text/javascript; charset=utf-8", CHAT_JS) }),
        )
        .route(
            "/static/chat.css",
            get(|| async { asset("text/css; charset=utf-8", CHAT_CSS) }),
        )
        .route(
            "/static/centrifuge-5.8.0.js",
            get(|| async { asset("text/javascript; charset=utf-8", CENTRIFUGE_JS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The files change only with the binary; revalidate so an upgrade is picked up.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}
