//! The server API: what a backend calls over HTTP, compatible with Centrifugo's server API so its
//! libraries (`cent` on PyPI, `gocent`, …) work unchanged.
//!
//! `POST /api/<method>` with the method's parameters as the JSON body (Centrifugo ≥ v5), or `POST /api`
//! with `{"method": M, "params": P}` (the older envelope). The key from `api.key` goes in `X-API-Key: K`
//! or `Authorization: apikey K`; without a configured key the API is off (404). A wrong or missing key
//! is HTTP 401. Everything else is HTTP 200 with `{"result": …}` or `{"error": {"code", "message"}}`
//! (the codes of the client protocol: 102 unknown channel, 104 method not found, 107 bad request, 100
//! internal, …).
//!
//! Methods:
//! - `publish {channel, data, idempotency_key?}`: on a channel with a publish rule, `data` must be
//!   `{"name", "data"}` and goes through the rule exactly like a client's publication (the envelope's
//!   `clientId` / `connectionId` are `"api"`; `idempotency_key`, when given, is the message id, so the
//!   writer applies a retried call once); on any other channel it is recorded with `relay.publish()`,
//!   delivered in commit order through the change stream like every publication. The answer comes
//!   once the publication is in the history (read-your-writes, [`crate::db::fence`]), so a `history`
//!   call after it sees it. On a channel without a rule the result is the publication's `{offset,
//!   epoch}` (as Centrifugo's, whose history is on); it is `{}` when that position cannot be told
//!   ([`crate::db::history::publish_located`]). Through a rule the result is `{}`: the writer may turn one
//!   publish into any number of rows, or none.
//! - `broadcast {channels, data}`: `publish` to each channel; one response per channel.
//! - `history {channel, limit?, since?, reverse?}`: as the client command (limit 0 = position only,
//!   −1 = all up to `client.history_max_limit`).
//! - `history_remove {channel}`: `relay.reset_channel()`: the history goes, the channel gets a new
//!   epoch, subscribers are told to resubscribe.
//! - `channels {pattern?}`: channels with subscribers (on the node that answers, and presence members
//!   on every node), with their subscriber counts.
//! - `info`: the connector nodes alive (they heartbeat in the database) with their counts.
//! - `presence {channel}`, `presence_stats {channel}`: the channel's members on every node.
//! - `disconnect {user, client?, whitelist?, disconnect?}`: closes the user's connections on every node.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use relay_protocol::channel::{ChannelPattern, validate_channel};
use relay_protocol::{ErrorCode, ReplyError};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::cluster::DisconnectOrder;
use crate::edge::Edge;
use crate::node::{HistoryQuery, Node, NodeError, Publisher, reply_too_large};

/// The API's routes.
pub(crate) fn routes() -> Router<Arc<Edge>> {
    Router::new()
        .route("/api", post(envelope))
        .route("/api/{method}", post(method))
}

type ApiResult = Result<Value, ReplyError>;

async fn method(
    State(edge): State<Arc<Edge>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = authorize(&edge, &headers) {
        return refused;
    }
    let params = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(json!({}))
    } else {
        serde_json::from_slice::<Value>(&body)
            .map_err(|e| ReplyError::with_message(ErrorCode::BadRequest, format!("body: {e}")))
    };
    let result = match params {
        Ok(p) => call(&edge, &name, p).await,
        Err(e) => Err(e),
    };
    answer(result)
}

/// `POST /api` with `{"method": M, "params": P}`.
async fn envelope(State(edge): State<Arc<Edge>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = authorize(&edge, &headers) {
        return refused;
    }
    #[derive(Deserialize)]
    struct Envelope {
        method: String,
        #[serde(default)]
        params: Option<Value>,
    }
    let result = match serde_json::from_slice::<Envelope>(&body) {
        Ok(e) => call(&edge, &e.method, e.params.unwrap_or_else(|| json!({}))).await,
        Err(e) => Err(ReplyError::with_message(
            ErrorCode::BadRequest,
            format!("body must be {{\"method\": …, \"params\": …}}: {e}"),
        )),
    };
    answer(result)
}

/// `None` when the request may go on; otherwise the refusal (404 when the API is off, 401 for a wrong
/// key).
fn authorize(edge: &Edge, headers: &HeaderMap) -> Option<Response> {
    let Some(key) = edge.config.api.key.as_deref() else {
        return Some((StatusCode::NOT_FOUND, "server API disabled (no api.key)").into_response());
    };
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (scheme, rest) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("apikey").then(|| rest.trim())
                })
        });
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => None,
        _ => Some((StatusCode::UNAUTHORIZED, "unauthorized").into_response()),
    }
}

/// Whether the keys are equal, in time that does not depend on where they differ (`subtle`; a
/// different length answers at once: the length is not the secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    bool::from(a.ct_eq(b))
}

fn answer(result: ApiResult) -> Response {
    let body = match result {
        Ok(v) => json!({ "result": v }),
        Err(e) => json!({ "error": e }),
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn bad(message: impl Into<String>) -> ReplyError {
    ReplyError::with_message(ErrorCode::BadRequest, message)
}

fn params<T: serde::de::DeserializeOwned>(p: Value) -> Result<T, ReplyError> {
    serde_json::from_value(p).map_err(|e| bad(e.to_string()))
}

async fn call(edge: &Edge, method: &str, p: Value) -> ApiResult {
    let node = &*edge.node;
    match method {
        "publish" => publish(node, params(p)?).await,
        "broadcast" => broadcast(node, params(p)?).await,
        "history" => history(edge, params(p)?).await,
        "history_remove" => history_remove(node, params(p)?).await,
        "channels" => channels(edge, params(p)?).await,
        "info" => info(node).await,
        "presence" => presence(edge, params(p)?).await,
        "presence_stats" => presence_stats(node, params(p)?).await,
        "disconnect" => disconnect(node, params(p)?).await,
        _ => Err(ErrorCode::MethodNotFound.into()),
    }
}

fn check_channel(channel: &str) -> Result<(), ReplyError> {
    validate_channel(channel)
        .map_err(|e| ReplyError::with_message(ErrorCode::UnknownChannel, e.to_string()))
}

#[derive(Deserialize)]
struct PublishParams {
    channel: String,
    data: Box<RawValue>,
    #[serde(default)]
    idempotency_key: Option<String>,
    // Accepted and ignored: every publication is kept in history; tags are not supported.
    #[serde(default, rename = "skip_history")]
    _skip_history: Option<bool>,
    #[serde(default, rename = "tags")]
    _tags: Option<Value>,
}

async fn publish(node: &Node, p: PublishParams) -> ApiResult {
    publish_one(node, &p.channel, &p.data, p.idempotency_key.as_deref()).await
}

async fn publish_one(
    node: &Node,
    channel: &str,
    data: &RawValue,
    idempotency_key: Option<&str>,
) -> Result<Value, ReplyError> {
    check_channel(channel)?;
    let key_ok = idempotency_key.is_none_or(|k| !k.is_empty() && k.len() <= 256);
    let message_id = idempotency_key.filter(|_| key_ok).map(str::to_owned);
    let publication = node
        .publication(
            channel.to_owned(),
            data.to_owned(),
            Publisher::Api { message_id },
        )
        .map_err(NodeError::into_reply)?;
    // The key is the message id a rule's target sees; elsewhere it is not used.
    if !key_ok && node.has_rule(channel) {
        return Err(bad("idempotency_key must be 1-256 bytes"));
    }
    let located = node
        .publish(publication)
        .await
        .map_err(NodeError::into_reply)?;
    Ok(located.map_or_else(
        || json!({}),
        |at| json!({"offset": at.offset, "epoch": at.epoch}),
    ))
}

#[derive(Deserialize)]
struct BroadcastParams {
    channels: Vec<String>,
    data: Box<RawValue>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default, rename = "skip_history")]
    _skip_history: Option<bool>,
    #[serde(default, rename = "tags")]
    _tags: Option<Value>,
}

/// Most channels of one broadcast.
const MAX_BROADCAST: usize = 1000;

async fn broadcast(node: &Node, p: BroadcastParams) -> ApiResult {
    if p.channels.is_empty() || p.channels.len() > MAX_BROADCAST {
        return Err(bad(format!("channels: 1 to {MAX_BROADCAST} channels")));
    }
    let mut responses = Vec::with_capacity(p.channels.len());
    for channel in &p.channels {
        // Each channel's message gets its own id: the key is made distinct per channel.
        let key = p.idempotency_key.as_ref().map(|k| format!("{k}:{channel}"));
        responses.push(
            match publish_one(node, channel, &p.data, key.as_deref()).await {
                Ok(result) => json!({ "result": result }),
                Err(e) => json!({"error": e}),
            },
        );
    }
    Ok(json!({ "responses": responses }))
}

#[derive(Deserialize)]
struct Position {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

#[derive(Deserialize)]
struct HistoryParams {
    channel: String,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    since: Option<Position>,
    #[serde(default)]
    reverse: Option<bool>,
}

async fn history(edge: &Edge, p: HistoryParams) -> ApiResult {
    check_channel(&p.channel)?;
    let query = HistoryQuery {
        limit: p.limit.unwrap_or(0),
        since: p.since.as_ref().map(|s| (s.offset, s.epoch.as_str())),
        reverse: p.reverse.unwrap_or(false),
    };
    let mut budget = reply_budget(edge);
    // Held while the reply is built (the process-wide allowance of large replies).
    let slice = edge
        .node
        .history(&p.channel, query, &mut budget)
        .await
        .map_err(NodeError::into_reply)?;
    let publications: Vec<Value> = slice
        .value
        .publications
        .iter()
        .map(|pb| {
            let mut v = json!({"data": &pb.data, "offset": pb.offset});
            if let Some(info) = &pb.info {
                v["info"] = serde_json::from_str(info.get()).unwrap_or(Value::Null);
            }
            v
        })
        .collect();
    Ok(json!({"publications": publications, "offset": slice.value.top, "epoch": slice.value.epoch}))
}

#[derive(Deserialize)]
struct ChannelParams {
    channel: String,
}

async fn history_remove(node: &Node, p: ChannelParams) -> ApiResult {
    check_channel(&p.channel)?;
    node.remove_history(&p.channel)
        .await
        .map_err(NodeError::into_reply)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
struct ChannelsParams {
    #[serde(default)]
    pattern: Option<String>,
}

async fn channels(edge: &Edge, p: ChannelsParams) -> ApiResult {
    let pattern = p
        .pattern
        .filter(|s| !s.is_empty())
        .map(|s| ChannelPattern::new(&s));
    let mut out = serde_json::Map::new();
    let budget = reply_budget(edge);
    let mut bytes = 0usize;
    for (name, n) in edge.node.channels().await.map_err(NodeError::into_reply)? {
        if pattern.as_ref().is_none_or(|p| p.matches(&name)) {
            bytes += name.len() + 40;
            if bytes > budget {
                return Err(reply_too_large());
            }
            out.insert(name, json!({"num_clients": n}));
        }
    }
    Ok(json!({ "channels": out }))
}

async fn info(node: &Node) -> ApiResult {
    let nodes = node.info().await.map_err(NodeError::into_reply)?;
    Ok(json!({ "nodes": nodes }))
}

async fn presence(edge: &Edge, p: ChannelParams) -> ApiResult {
    check_channel(&p.channel)?;
    let members = edge
        .node
        .presence_members(&p.channel, reply_budget(edge))
        .await
        .map_err(NodeError::into_reply)?;
    let mut map = serde_json::Map::new();
    for m in &members.value {
        map.insert(m.client.clone(), m.to_json());
    }
    Ok(json!({ "presence": map }))
}

/// The most bytes one reply of the API may take: the same budget as a client connection's
/// (`client.outbound_queue_bytes`, less the eighth a connection keeps for pushes).
fn reply_budget(edge: &Edge) -> usize {
    let b = edge.config.client.outbound_queue_bytes;
    b - b / 8
}

async fn presence_stats(node: &Node, p: ChannelParams) -> ApiResult {
    check_channel(&p.channel)?;
    let (clients, users) = node
        .presence_stats(&p.channel)
        .await
        .map_err(NodeError::into_reply)?;
    Ok(json!({"num_clients": clients, "num_users": users}))
}

#[derive(Deserialize)]
struct DisconnectAdvice {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
struct DisconnectParams {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    whitelist: Vec<String>,
    #[serde(default)]
    disconnect: Option<DisconnectAdvice>,
}

async fn disconnect(node: &Node, p: DisconnectParams) -> ApiResult {
    if p.user.is_empty() {
        // Anonymous connections all have the empty user: never a way to close them all at once.
        return Err(bad("user must not be empty"));
    }
    let (code, reason) = match p.disconnect {
        Some(d) if d.code != 0 => {
            if !(3000..5000).contains(&d.code) || d.reason.is_empty() || d.reason.len() > 100 {
                return Err(bad(
                    "disconnect: code 3000-4999 and a reason of 1-100 bytes",
                ));
            }
            (d.code, d.reason)
        }
        _ => (3503, "force disconnect".to_owned()),
    };
    node.disconnect(&DisconnectOrder {
        user: p.user,
        client: p.client.filter(|c| !c.is_empty()),
        whitelist: p.whitelist,
        code,
        reason,
    })
    .await
    .map_err(NodeError::into_reply)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiConfig;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn short_keys_are_refused() {
        let c = ApiConfig {
            key: Some("short".into()),
        };
        assert_eq!(c.validate().unwrap_err().field, "api.key");
        let c = ApiConfig {
            key: Some("a-long-enough-api-key".into()),
        };
        assert!(c.validate().is_ok());
        assert!(ApiConfig::default().validate().is_ok());
    }
}
