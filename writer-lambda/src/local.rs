//! The local invoke server: the Lambda Invoke API on a local port, so the connector invokes the writer
//! outside AWS exactly as it invokes the real function.
//!
//! # Routes
//! - `POST /2015-03-31/functions/{name}/invocations` — runs [`handler::handle`] on the JSON body. Any
//!   function name is accepted. Responses follow the real Invoke API:
//!   - success: `200`, the handler's result as JSON;
//!   - handler error: `200` with header `X-Amz-Function-Error: Unhandled` and body
//!     `{"errorMessage": "...", "errorType": "..."}` (`errorType` is `InvalidEvent` or `DatabaseError`);
//!   - body that is not JSON: `400`, header `x-amzn-ErrorType: InvalidRequestContentException`, body
//!     `{"Type": "User", "message": "Could not parse request body into json: ..."}`;
//!   - body over [`MAX_PAYLOAD_BYTES`] (6 MB, Lambda's synchronous limit): `413`,
//!     `RequestEntityTooLargeException`;
//!   - `X-Amz-Invocation-Type`: `RequestResponse` (default) as above; `DryRun` answers `204` without
//!     running; `Event` runs the handler before answering `202` (errors are logged, not retried —
//!     unlike Lambda's asynchronous invocation); anything else is `400`;
//!   - an empty body is treated as `{}`, like Lambda.
//!   - every invocation must carry `X-Relay-Signature` made with the shared secret (see [`crate::auth`])
//!     unless the server runs without one (`--insecure-no-auth`): no header is `403`
//!     `MissingAuthenticationTokenException`; a bad or stale signature is `403`
//!     `InvalidSignatureException`, before the body is parsed.
//! - `GET /healthz` — liveness: `200 ok` while the process serves.
//! - `GET /readyz` — readiness: `200 ready` if the database answers `SELECT 1` within the pool's acquire
//!   timeout, else `503`.
//!
//! [`serve`] takes a bound listener, the secret (`None`: unsigned invocations are accepted) and a
//! shutdown future, so tests run the real server on port 0.

use std::{future::Future, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State as AxumState, rejection::BytesRejection},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::Instrument as _;

use crate::{
    auth::{Refusal, SIGNATURE_HEADER, Secret},
    handler::{self, State},
    store,
};

/// The invoke path of the Lambda Invoke API.
pub const INVOKE_PATH: &str = "/2015-03-31/functions/{name}/invocations";
/// Largest request body accepted: Lambda's 6 MB limit for synchronous invocations.
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// Header that marks a function error in an Invoke API response.
pub const FUNCTION_ERROR_HEADER: &str = "x-amz-function-error";
const ERROR_TYPE_HEADER: &str = "x-amzn-errortype";
const INVOCATION_TYPE_HEADER: &str = "x-amz-invocation-type";
const EXECUTED_VERSION_HEADER: &str = "x-amz-executed-version";
const REQUEST_ID_HEADER: &str = "x-amzn-requestid";

/// What the routes share: the handler's state and the secret invocations are signed with.
#[derive(Debug, Clone)]
struct Local {
    state: Arc<State>,
    secret: Option<Secret>,
}

/// The router of the local invoke server. With `secret`, every invocation must be signed with it; with
/// `None`, anyone who reaches the port may invoke.
pub fn router(state: Arc<State>, secret: Option<Secret>) -> Router {
    Router::new()
        .route(INVOKE_PATH, post(invoke))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(MAX_PAYLOAD_BYTES))
        .with_state(Arc::new(Local { state, secret }))
}

/// Serves the local invoke server on `listener` until `shutdown` completes, then finishes the requests
/// in flight and returns. See [`router`] for `secret`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    secret: Option<Secret>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, signed = secret.is_some(), "local invoke server listening");
    }
    axum::serve(listener, router(state, secret))
        .with_graceful_shutdown(shutdown)
        .await
}

/// How the caller asked to invoke (`X-Amz-Invocation-Type`).
enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

/// `POST /2015-03-31/functions/{name}/invocations`: every invocation gets a request id, returned in
/// `x-amzn-RequestId` (as Lambda does) and attached to its logs.
async fn invoke(
    AxumState(local): AxumState<Arc<Local>>,
    Path(function): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!("invoke", %function, %request_id);
    let mut response = invoke_function(&local, &headers, body)
        .instrument(span)
        .await;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
    }
    response
}

/// A request the Invoke API refuses before the function runs: its status, `x-amzn-ErrorType` and
/// message (see [`api_error`]).
struct Refused {
    status: StatusCode,
    error_type: &'static str,
    message: String,
}

impl Refused {
    fn new(status: StatusCode, error_type: &'static str, message: String) -> Self {
        Self {
            status,
            error_type,
            message,
        }
    }

    fn response(self) -> Response {
        api_error(self.status, self.error_type, self.message)
    }
}

/// Checks the request, then runs the function as the invocation type asks.
async fn invoke_function(
    local: &Local,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let checked = invocation_type(headers).and_then(|invocation_type| {
        let body = read_body(body)?;
        check_signature(local, headers, &body)?;
        Ok((invocation_type, parse_event(&body)?))
    });
    let (invocation_type, event) = match checked {
        Ok(checked) => checked,
        Err(refused) => return refused.response(),
    };
    if matches!(invocation_type, InvocationType::DryRun) {
        return StatusCode::NO_CONTENT.into_response();
    }
    let outcome = handler::handle(&local.state, event).await;
    if matches!(invocation_type, InvocationType::Event) {
        if let Err(error) = &outcome {
            tracing::error!(
                error_type = error.error_type(),
                retryable = error.retryable(),
                error = %error.message_chain(),
                "asynchronous invocation failed"
            );
        }
        return StatusCode::ACCEPTED.into_response();
    }
    answer(outcome)
}

/// The invocation type the caller asked for (`X-Amz-Invocation-Type`; `RequestResponse` without).
fn invocation_type(headers: &HeaderMap) -> Result<InvocationType, Refused> {
    match headers
        .get(INVOCATION_TYPE_HEADER)
        .map(|v| v.to_str().unwrap_or(""))
    {
        None | Some("RequestResponse") => Ok(InvocationType::RequestResponse),
        Some("Event") => Ok(InvocationType::Event),
        Some("DryRun") => Ok(InvocationType::DryRun),
        Some(other) => Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            format!(
                "X-Amz-Invocation-Type must be RequestResponse, Event or DryRun, got {other:?}"
            ),
        )),
    }
}

/// The request body, or Lambda's errors for one too large or unreadable.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Refused> {
    match body {
        Ok(body) => Ok(body),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(Refused::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            format!(
                "Request must be smaller than {MAX_PAYLOAD_BYTES} bytes for the InvokeFunction operation"
            ),
        )),
        Err(rejection) => Err(Refused::new(
            rejection.status(),
            "InvalidRequestContentException",
            rejection.body_text(),
        )),
    }
}

/// With `WRITER_SECRET` set, the body must carry its signature.
fn check_signature(local: &Local, headers: &HeaderMap, body: &[u8]) -> Result<(), Refused> {
    let Some(secret) = &local.secret else {
        return Ok(());
    };
    let header = headers
        .get(SIGNATURE_HEADER)
        .map(|v| v.to_str().unwrap_or(""));
    secret.verify(header, body).map_err(|refusal| {
        tracing::warn!(%refusal, "invocation refused: not signed with WRITER_SECRET");
        let error_type = match refusal {
            Refusal::Missing => "MissingAuthenticationTokenException",
            _ => "InvalidSignatureException",
        };
        Refused::new(StatusCode::FORBIDDEN, error_type, refusal.to_string())
    })
}

/// The event: the body's JSON (`{}` for an empty body).
fn parse_event(body: &[u8]) -> Result<Value, Refused> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        tracing::warn!(error = %e, "invocation body is not JSON");
        Refused::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            format!("Could not parse request body into json: {e}"),
        )
    })
}

/// The answer of a `RequestResponse` invocation: the function's result, or its error as Lambda
/// reports an unhandled one (`X-Amz-Function-Error: Unhandled`).
fn answer(outcome: crate::Result<crate::InvocationResult>) -> Response {
    let version = (
        HeaderName::from_static(EXECUTED_VERSION_HEADER),
        HeaderValue::from_static("$LATEST"),
    );
    match outcome {
        Ok(result) => ([version], Json(result)).into_response(),
        Err(error) => {
            let message = error.message_chain();
            tracing::error!(
                error_type = error.error_type(),
                retryable = error.retryable(),
                error = %message,
                "invocation failed"
            );
            (
                [
                    version,
                    (
                        HeaderName::from_static(FUNCTION_ERROR_HEADER),
                        HeaderValue::from_static("Unhandled"),
                    ),
                ],
                Json(json!({"errorMessage": message, "errorType": error.error_type()})),
            )
                .into_response()
        }
    }
}

/// An Invoke API error (the request itself was refused; the function did not run).
fn api_error(status: StatusCode, error_type: &'static str, message: String) -> Response {
    (
        status,
        [(
            HeaderName::from_static(ERROR_TYPE_HEADER),
            HeaderValue::from_static(error_type),
        )],
        Json(json!({"Type": "User", "message": message})),
    )
        .into_response()
}

/// `GET /readyz`.
async fn ready(AxumState(local): AxumState<Arc<Local>>) -> Response {
    match store::ping(local.state.pool()).await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(error) => {
            tracing::warn!(%error, "readiness check: database unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}
