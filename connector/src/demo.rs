//! The demo token endpoint: `POST /demo/token` with `{"user": "alice"}` answers
//! `{"token": "<JWT>", "user": "alice", "expires_in": 3600}`, a connection token for that user minted
//! with the configured HMAC key.
//!
//! For demos and development only: anyone who can reach it can become any user. It is off unless
//! `demo.token_endpoint` is true, and the configuration refuses to turn it on without an HMAC key.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use crate::auth::verifier::mint_hs256;
use crate::edge::Edge;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    user: String,
}

/// The routes (none when the endpoint is off).
pub(crate) fn routes(enabled: bool) -> Router<Arc<Edge>> {
    if enabled {
        Router::new().route("/demo/token", post(token))
    } else {
        Router::new()
    }
}

async fn token(
    State(state): State<Arc<Edge>>,
    body: Result<Json<TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(request)) = body else {
        return (StatusCode::BAD_REQUEST, "expected {\"user\": \"name\"}").into_response();
    };
    let user = request.user.trim();
    let valid = !user.is_empty()
        && user.len() <= 64
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if !valid {
        return (
            StatusCode::BAD_REQUEST,
            "user must be 1-64 letters, digits, '_', '-' or '.'",
        )
            .into_response();
    }
    let Some(secret) = state.config.auth.hmac_secret_key.as_deref() else {
        return (StatusCode::NOT_FOUND, "no HMAC key configured").into_response();
    };
    let ttl = state.config.demo.ttl();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims =
        serde_json::json!({"sub": user, "iat": now, "exp": now + ttl, "info": {"name": user}});
    if let Some(aud) = &state.config.auth.audience {
        claims["aud"] = aud.as_str().into();
    }
    if let Some(iss) = &state.config.auth.issuer {
        claims["iss"] = iss.as_str().into();
    }
    match mint_hs256(secret, &claims) {
        Ok(token) => Json(serde_json::json!({"token": token, "user": user, "expires_in": ttl}))
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "demo token minting failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}
