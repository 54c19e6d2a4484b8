//! Publish rules: a client publication on a channel bound by a rule goes to the rule's target — the
//! writer Lambda (through the Lambda Invoke API) or an HTTP webhook — as an Ably-style envelope.
//!
//! The client's publish is answered only after the target answered: success, or an error reply. The
//! sender's identity comes from the connection, never from the message body, and the message id is
//! assigned here.
//!
//! A `lambda` target without `endpoint` is invoked in AWS with the AWS SDK ([`LambdaClients`], built
//! once at start-up); with `endpoint` (the local writer), by a plain HTTP POST to the same Invoke path.
//!
//! # The outcome contract between the connector and a target
//! A target that answered (Lambda: no `X-Amz-Function-Error`; webhook: a 2xx status) reports what it
//! did with the message in its answer's body (the function's result, or the webhook's response):
//!
//! ```json
//! {"results": [{"id": "<the envelope message id>", "status": "rejected",
//!               "reason": "only its author can edit it"}]}
//! ```
//!
//! - `status` `inserted`, `updated`, `duplicate` (already applied: the connector's own retries) or
//!   `accepted`: success, the publisher gets `{"publish":{}}` (API: `{"result":{}}`).
//! - `rejected` / `invalid` / `skipped`: a refusal, the publisher gets error 420 / 421 / 422 with the
//!   entry's `reason` (at most [`MAX_REASON_CHARS`] characters; the client sees it, so it must not
//!   carry secrets) as the message. Nothing is retried.
//! - **Missing outcome** — an empty body, a body that is not JSON, or JSON without a `results` key:
//!   the target does not report per-message outcomes, and its success answer is success (a plain
//!   webhook that answers `204` or `{"ok":true}` keeps working).
//! - **Invalid outcome** — `results` that is not an array, no entry whose `id` is the message id (or,
//!   without ids, `index` 0), a `status` that is not one of the above, or a body over
//!   [`MAX_OUTCOME_BYTES`]: error 100 "publish target failed" (not retried; the target may have acted,
//!   so the connector does not claim success).
//!
//! Those POSTs (and webhook POSTs) carry `X-Relay-Signature: t=<unix secs>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>` when `WRITER_SECRET` is set, which the local writer requires (see
//! `writer-lambda/src/auth.rs`); in AWS, IAM authenticates the call instead.
//!
//! # RPC
//! An `rpc` whose method matches an `rpc[]` rule goes to that rule's target the same way, as an
//! envelope with `source` `"rpc"`, the method as `channel` and as the message's `name`, and the
//! call's data as the message's data. The answer follows the same contract; on success the rpc
//! reply's `data` is the matching `results` entry's `data` (none if absent), or, for an answer
//! without `results`, the answer itself when it is JSON (none when empty or not JSON). Refusals
//! and failures are the caller's error replies exactly as for a publish.
//!
//! # Identity
//! Each message says whose it is with two fields: `clientId` and `clientKind` — `user` (the token's
//! `sub`), `anonymous` (the connection's id, which the connector generates) or `server` (the server
//! API). The pair is the author, so a token whose `sub` equals an anonymous client's id is a different
//! author and cannot edit that person's messages.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_lambda::config::{BehaviorVersion, Region};
use aws_sdk_lambda::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::operation::RequestId;
use aws_sdk_lambda::operation::invoke::InvokeError;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use ring::hmac;
use serde::Serialize;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::backoff::Backoff;
use crate::config::{Rule, Target};
use crate::error::ConfigError;

/// Longest error detail kept from a target's answer.
const MAX_DETAIL_CHARS: usize = 500;
/// Largest answer body read for the message's outcome (a larger one is an invalid outcome).
pub(crate) const MAX_OUTCOME_BYTES: usize = 64 * 1024;
/// Longest refusal reason passed on to the publisher.
pub(crate) const MAX_REASON_CHARS: usize = 300;

/// The environment variable holding the secret that invocations of local endpoints are signed with.
pub(crate) const WRITER_SECRET_ENV: &str = "WRITER_SECRET";
/// The header that carries the signature.
pub(crate) const SIGNATURE_HEADER: &str = "X-Relay-Signature";

/// Why a target did not accept a publication.
#[derive(Debug, Error)]
pub(crate) enum TargetError {
    /// The target could not be reached or did not answer in time (a retry may help).
    #[error("target unreachable: {0}")]
    Unreachable(String),
    /// The target answered with an error, or with an unreadable outcome.
    #[error("target failed: {0}")]
    Failed(String),
    /// The target answered and refused the message (a per-message outcome; not an error of the
    /// target).
    #[error("target refused the message ({}): {}", .0.status.as_str(), .0.reason)]
    Refused(Refusal),
    /// The rule's `max_concurrency` deliveries were all busy for the whole `timeout_ms`.
    #[error("target busy: {0} deliveries already in flight")]
    Busy(u32),
}

impl TargetError {
    /// The client's error reply for this outcome of a `what` ("publish", "rpc"): a refusal carries
    /// the target's code and reason (420-422); a busy target is 111 (the SDK retries); an unreachable
    /// or failing one is 100.
    pub(crate) fn reply_error(&self, what: &str) -> relay_protocol::codes::ReplyError {
        use relay_protocol::codes::{ErrorCode, ReplyError};
        match self {
            Self::Refused(r) => r.reply_error(),
            Self::Unreachable(_) => {
                ReplyError::with_message(ErrorCode::Internal, format!("{what} target unavailable"))
            }
            Self::Failed(_) => {
                ReplyError::with_message(ErrorCode::Internal, format!("{what} target failed"))
            }
            Self::Busy(_) => {
                ReplyError::with_message(ErrorCode::TooManyRequests, format!("{what} target busy"))
            }
        }
    }
}

/// A message the target refused, with its reason (see the module's outcome contract).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Which refusal.
    pub status: RefusalStatus,
    /// The target's reason (may be empty).
    pub reason: String,
}

/// The refusing statuses of the outcome contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalStatus {
    /// `rejected`: not allowed (e.g. an edit of someone else's message).
    Rejected,
    /// `invalid`: the message or its data is malformed or over a limit.
    Invalid,
    /// `skipped`: the target does not handle this message.
    Skipped,
}

impl RefusalStatus {
    /// The status as the target writes it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Invalid => "invalid",
            Self::Skipped => "skipped",
        }
    }

    /// The reply code the publisher gets.
    pub(crate) fn code(self) -> relay_protocol::codes::ErrorCode {
        use relay_protocol::codes::ErrorCode;
        match self {
            Self::Rejected => ErrorCode::PublishRejected,
            Self::Invalid => ErrorCode::PublishInvalid,
            Self::Skipped => ErrorCode::PublishSkipped,
        }
    }
}

impl Refusal {
    /// The error reply of this refusal: the status's code, the target's reason as the message (the
    /// code's standard message when the target gave none).
    pub(crate) fn reply_error(&self) -> relay_protocol::codes::ReplyError {
        let code = self.status.code();
        if self.reason.is_empty() {
            code.into()
        } else {
            relay_protocol::codes::ReplyError::with_message(code, self.reason.clone())
        }
    }
}

/// Reads the outcome of message `message_id` from a target's success answer (the contract in the
/// module docs): `Ok` for success or a missing outcome, [`TargetError::Refused`] for a refusal,
/// [`TargetError::Failed`] for an invalid outcome.
pub(crate) fn outcome(body: &[u8], message_id: &str) -> Result<(), TargetError> {
    use serde_json::Value;
    if body.len() > MAX_OUTCOME_BYTES {
        return Err(TargetError::Failed(format!(
            "invalid outcome: the answer is over {MAX_OUTCOME_BYTES} bytes"
        )));
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Ok(()); // empty or not JSON: no outcome reported
    };
    let Some(results) = value.as_object().and_then(|o| o.get("results")) else {
        return Ok(()); // no `results`: no outcome reported
    };
    let invalid = |why: String| Err(TargetError::Failed(format!("invalid outcome: {why}")));
    let Some(results) = results.as_array() else {
        return invalid("\"results\" is not an array".to_owned());
    };
    let entry = results
        .iter()
        .find(|r| r.get("id").and_then(Value::as_str) == Some(message_id))
        .or_else(|| {
            results.iter().find(|r| {
                r.get("id").is_none_or(Value::is_null) && r.get("index") == Some(&Value::from(0))
            })
        });
    let Some(entry) = entry else {
        return invalid(format!("no result for message {message_id:?}"));
    };
    let status = match entry.get("status").and_then(Value::as_str) {
        Some("inserted" | "updated" | "duplicate" | "accepted") => return Ok(()),
        Some("rejected") => RefusalStatus::Rejected,
        Some("invalid") => RefusalStatus::Invalid,
        Some("skipped") => RefusalStatus::Skipped,
        Some(other) => return invalid(format!("unknown status {:?}", truncate(other))),
        None => return invalid("the result has no \"status\" string".to_owned()),
    };
    let reason = entry
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON_CHARS)
        .collect();
    Err(TargetError::Refused(Refusal { status, reason }))
}

/// How many deliveries may run at once per rule (`rules[].max_concurrency`): one semaphore per rule,
/// so a burst of publishes from many connections opens at most that many requests to the target.
#[derive(Debug, Default)]
pub(crate) struct Concurrency {
    permits: std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>,
}

impl Concurrency {
    /// One semaphore per rule (keyed by its channel pattern: the first rule of a pattern is the
    /// only one that ever matches).
    pub(crate) fn for_rules(rules: &[Rule]) -> Self {
        let mut permits = std::collections::HashMap::new();
        for rule in rules {
            permits.entry(rule.channel.clone()).or_insert_with(|| {
                std::sync::Arc::new(tokio::sync::Semaphore::new(rule.max_concurrency as usize))
            });
        }
        Self { permits }
    }

    /// Adds one semaphore per `rpc[]` rule (keyed apart from the publish rules).
    #[must_use]
    pub(crate) fn with_rpc(mut self, rules: &[Rule]) -> Self {
        for rule in rules {
            self.permits.entry(rpc_key(rule)).or_insert_with(|| {
                std::sync::Arc::new(tokio::sync::Semaphore::new(rule.max_concurrency as usize))
            });
        }
        self
    }
}

fn rpc_key(rule: &Rule) -> String {
    format!("rpc\u{0}{}", rule.channel)
}

/// Sends `envelope` to the rule's target and waits for its answer and its outcome, holding one of
/// the rule's `max_concurrency` permits. The wait for a permit takes at most half of the rule's
/// `timeout_ms` (then [`TargetError::Busy`]), the delivery the rest.
pub(crate) async fn deliver_limited(
    limits: &Concurrency,
    http: &reqwest::Client,
    lambda: &LambdaClients,
    rule: &Rule,
    envelope: &Envelope<'_>,
) -> Result<(), TargetError> {
    let body = limited(
        limits,
        &rule.channel,
        rule,
        deliver_raw(http, lambda, rule, envelope),
    )
    .await?;
    outcome(&body, message_id(envelope))
}

/// An `rpc` through an `rpc[]` rule's target, within the rule's `max_concurrency`: the data of the
/// rpc reply (see the module's RPC section), or why there is none.
pub(crate) async fn call_limited(
    limits: &Concurrency,
    http: &reqwest::Client,
    lambda: &LambdaClients,
    rule: &Rule,
    envelope: &Envelope<'_>,
) -> Result<Option<Box<RawValue>>, TargetError> {
    let body = limited(
        limits,
        &rpc_key(rule),
        rule,
        deliver_raw(http, lambda, rule, envelope),
    )
    .await?;
    rpc_answer(&body, message_id(envelope))
}

/// The rpc reply's data in a target's success answer: the outcome contract first (refusals and
/// invalid outcomes are errors), then the entry's `data`, or the whole JSON answer without
/// `results`.
pub(crate) fn rpc_answer(
    body: &[u8],
    message_id: &str,
) -> Result<Option<Box<RawValue>>, TargetError> {
    use serde_json::Value;
    outcome(body, message_id)?;
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    let data = match value.get("results").and_then(Value::as_array) {
        Some(results) => {
            let entry = results
                .iter()
                .find(|r| r.get("id").and_then(Value::as_str) == Some(message_id))
                .or_else(|| results.first());
            match entry.and_then(|e| e.get("data")) {
                Some(d) => d.clone(),
                None => return Ok(None),
            }
        }
        None => value,
    };
    Ok(serde_json::value::to_raw_value(&data).ok())
}

/// Runs `delivery` holding one of the permits under `key`, within the rule's timeout.
async fn limited<T>(
    limits: &Concurrency,
    key: &str,
    rule: &Rule,
    delivery: impl Future<Output = Result<T, TargetError>>,
) -> Result<T, TargetError> {
    let Some(semaphore) = limits.permits.get(key) else {
        return delivery.await;
    };
    let started = tokio::time::Instant::now();
    let budget = rule.timeout;
    let _permit = match tokio::time::timeout(budget / 2, semaphore.acquire()).await {
        Ok(Ok(permit)) => permit,
        _ => return Err(TargetError::Busy(rule.max_concurrency)),
    };
    // The rule (and so its AWS client, chosen by timeout) is unchanged; the wait is taken off the
    // delivery's time from outside.
    let rest = budget.saturating_sub(started.elapsed());
    match tokio::time::timeout(rest, delivery).await {
        Ok(r) => r,
        Err(_) => Err(TargetError::Unreachable("timed out".to_owned())),
    }
}

/// One message of the envelope.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EnvelopeMessage<'a> {
    /// Message id, assigned by the connector.
    pub id: String,
    /// The sender: the connection's user, or its client id when anonymous.
    pub client_id: &'a str,
    /// The namespace of `client_id`: `user`, `anonymous` or `server` (see the module docs).
    pub client_kind: &'static str,
    /// The connection.
    pub connection_id: &'a str,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// Message name.
    pub name: &'a str,
    /// Message data: JSON text of an object (with `encoding: "json"`) or a plain string.
    pub data: String,
    /// `"json"` when `data` is JSON text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
}

/// The Ably-style envelope.
#[derive(Debug, Serialize)]
pub(crate) struct Envelope<'a> {
    /// Always `channel.message`.
    pub source: &'static str,
    /// The channel published on.
    pub channel: &'a str,
    /// The messages (one per client publish).
    pub messages: Vec<EnvelopeMessage<'a>>,
}

/// The client's publication data for a rule-bound channel: `{"name": N, "data": D}`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct NamedData<'a> {
    /// Message name.
    pub name: String,
    /// Message data.
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// The namespace of a sender id, from what the callers pass: the server API passes `"api"` as the
/// connection (a real connection id is a UUID the connector generates); a session passes its own
/// connection id as the sender when anonymous, and the token's `sub` otherwise. (A `sub` equal to the
/// connection's own freshly generated id would be filed as that anonymous connection: it can borrow
/// nobody else's identity.)
pub(crate) fn client_kind(client_id: &str, connection_id: &str) -> &'static str {
    if connection_id == "api" {
        "server"
    } else if client_id == connection_id {
        "anonymous"
    } else {
        "user"
    }
}

/// Builds the envelope of an `rpc`: source `rpc`, the method as channel and message name.
pub(crate) fn rpc_envelope<'a>(
    method: &'a str,
    client_id: &'a str,
    connection_id: &'a str,
    named: &'a NamedData<'_>,
    message_id: String,
) -> Envelope<'a> {
    Envelope {
        source: "rpc",
        ..envelope(method, client_id, connection_id, named, message_id)
    }
}

/// Builds the envelope for one client publication.
pub(crate) fn envelope<'a>(
    channel: &'a str,
    client_id: &'a str,
    connection_id: &'a str,
    named: &'a NamedData<'_>,
    message_id: String,
) -> Envelope<'a> {
    let (data, encoding) = match named.data {
        None => (String::new(), None),
        Some(raw) => match serde_json::from_str::<String>(raw.get()) {
            Ok(plain) => (plain, None),
            Err(_) => (raw.get().to_owned(), Some("json")),
        },
    };
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Envelope {
        source: "channel.message",
        channel,
        messages: vec![EnvelopeMessage {
            id: message_id,
            client_id,
            client_kind: client_kind(client_id, connection_id),
            connection_id,
            timestamp,
            name: &named.name,
            data,
            encoding,
        }],
    }
}

/// The AWS Lambda clients of the rules whose `lambda` target has no `endpoint`: one per distinct
/// (region override, timeout), built once at start-up, sharing one HTTPS connection pool and one
/// cached credential chain (environment, profile, web identity, ECS task role, EC2 instance role).
#[derive(Clone, Default)]
pub(crate) struct LambdaClients {
    clients: Vec<(LambdaKey, aws_sdk_lambda::Client)>,
    /// `WRITER_SECRET`: signs the POSTs to local endpoints and webhooks.
    signer: Option<hmac::Key>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LambdaKey {
    region: Option<String>,
    timeout: Duration,
}

impl fmt::Debug for LambdaClients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.clients.iter().map(|(key, _)| key))
            .finish()
    }
}

impl LambdaClients {
    /// Builds the clients the rules need; nothing (and no AWS configuration is read) when no rule
    /// invokes AWS Lambda. Fails, naming the rule, when a rule's region cannot be determined. Reads
    /// `WRITER_SECRET` (at least 32 bytes) for the signature of POSTed envelopes.
    pub(crate) async fn for_rules(rules: &[Rule]) -> Result<Self, ConfigError> {
        let signer = match std::env::var(WRITER_SECRET_ENV) {
            Ok(secret) if !secret.is_empty() => {
                if secret.len() < 32 {
                    return Err(ConfigError::new(
                        WRITER_SECRET_ENV,
                        format!("must be at least 32 bytes (it is {})", secret.len()),
                    ));
                }
                Some(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()))
            }
            _ => None,
        };
        let posts = rules.iter().any(|r| {
            matches!(
                r.target,
                Target::Http { .. }
                    | Target::Lambda {
                        endpoint: Some(_),
                        ..
                    }
            )
        });
        if posts && signer.is_none() {
            tracing::warn!(
                "{WRITER_SECRET_ENV} is not set: envelopes POSTed to local endpoints and webhooks are \
                 unsigned (the local writer refuses them unless started with --insecure-no-auth)"
            );
        }
        let mut built = Self::for_aws_rules(rules).await?;
        built.signer = signer;
        Ok(built)
    }

    async fn for_aws_rules(rules: &[Rule]) -> Result<Self, ConfigError> {
        let aws_rules: Vec<(usize, &Rule, Option<&String>)> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| match &rule.target {
                Target::Lambda {
                    endpoint: None,
                    region,
                    ..
                } => Some((i, rule, region.as_ref())),
                _ => None,
            })
            .collect();
        if aws_rules.is_empty() {
            return Ok(Self::default());
        }
        // TLS through rustls with ring (as reqwest and sqlx here), trusting the system's roots.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        // The standard chains: region from AWS_REGION / AWS_DEFAULT_REGION / the profile / IMDS,
        // credentials from the environment, profile, web identity, ECS container (task role) or IMDS,
        // endpoint overrides from AWS_ENDPOINT_URL_LAMBDA / AWS_ENDPOINT_URL. One credentials cache
        // for every client (refreshed before expiry).
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .identity_cache(aws_config::identity::IdentityCache::lazy().build())
            .load()
            .await;
        let mut clients: Vec<(LambdaKey, aws_sdk_lambda::Client)> = Vec::new();
        for (i, rule, region) in aws_rules {
            let key = LambdaKey {
                region: region.cloned(),
                timeout: rule.timeout,
            };
            if clients.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let region = match region {
                Some(r) => Region::new(r.clone()),
                None => sdk.region().cloned().ok_or_else(|| {
                    ConfigError::new(
                        format!("rules[{i}].target.region"),
                        format!(
                        "the rule for channel {:?} invokes AWS Lambda (no target.endpoint), but no AWS \
                         region is configured: set AWS_REGION, a region in the AWS profile, or \
                         target.region",
                        rule.channel
                    ),
                    )
                })?,
            };
            let timeout = rule.timeout;
            let config = aws_sdk_lambda::config::Builder::from(&sdk)
                .region(region.clone())
                // The whole call, retries included, within the rule's timeout.
                .timeout_config(
                    aws_sdk_lambda::config::timeout::TimeoutConfig::builder()
                        .operation_timeout(timeout)
                        .build(),
                )
                // Retries are the rule's own (`retries`, in `deliver`), the same for every target.
                .retry_config(aws_sdk_lambda::config::retry::RetryConfig::disabled())
                .build();
            tracing::info!(rule = i, channel = %rule.channel, region = %region, "AWS Lambda client ready");
            clients.push((key, aws_sdk_lambda::Client::from_conf(config)));
        }
        Ok(Self {
            clients,
            signer: None,
        })
    }

    fn client(&self, region: Option<&str>, timeout: Duration) -> Option<&aws_sdk_lambda::Client> {
        self.clients
            .iter()
            .find(|(k, _)| k.region.as_deref() == region && k.timeout == timeout)
            .map(|(_, c)| c)
    }
}

/// Sends `envelope` to the rule's target, with the rule's retries: the body of its success answer.
async fn deliver_raw(
    http: &reqwest::Client,
    lambda: &LambdaClients,
    rule: &Rule,
    envelope: &Envelope<'_>,
) -> Result<Vec<u8>, TargetError> {
    // The whole delivery, retries included, fits in the rule's timeout: the client's publish waits
    // for it (the SDKs give up after 5 s by default). Only failures a retry can cure are retried —
    // unreachable, timed out, throttled, 5xx — with the same envelope, so the same message id: the
    // writer applies a message at most once.
    let deadline = tokio::time::Instant::now() + rule.timeout;
    let mut backoff = Backoff::new(rule.retry_backoff, rule.timeout);
    let mut attempt = 0;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = match tokio::time::timeout(
            remaining,
            deliver_once(http, lambda, rule, envelope, remaining),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(TargetError::Unreachable("timed out".to_owned())),
        };
        match result {
            Err(TargetError::Unreachable(why))
                if attempt < rule.retries
                    && tokio::time::Instant::now() + backoff.peek() < deadline =>
            {
                attempt += 1;
                tracing::info!(channel = %envelope.channel, attempt, error = %why, "retrying publish target");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}

async fn deliver_once(
    http: &reqwest::Client,
    lambda: &LambdaClients,
    rule: &Rule,
    envelope: &Envelope<'_>,
    timeout: Duration,
) -> Result<Vec<u8>, TargetError> {
    let request = match &rule.target {
        Target::Lambda {
            function,
            endpoint: None,
            region,
        } => {
            let client = lambda
                .client(region.as_deref(), rule.timeout)
                .ok_or_else(|| {
                    TargetError::Failed("no AWS Lambda client for this rule".to_owned())
                })?;
            return invoke_aws(client, function, envelope).await;
        }
        // With an endpoint (the local writer's invoke server, or an emulator), a plain POST to the
        // same Invoke path: nothing there checks a signature, so no AWS region or credentials are
        // needed, and local runs and tests do not depend on the machine's AWS configuration.
        Target::Lambda {
            function,
            endpoint: Some(endpoint),
            ..
        } => {
            let base = endpoint.trim_end_matches('/');
            http.post(format!(
                "{base}/2015-03-31/functions/{function}/invocations"
            ))
            .header("X-Amz-Invocation-Type", "RequestResponse")
        }
        Target::Http { url } => http.post(url),
    };
    let body =
        serde_json::to_vec(envelope).map_err(|e| TargetError::Failed(format!("envelope: {e}")))?;
    let mut request = request
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(key) = &lambda.signer {
        request = request.header(SIGNATURE_HEADER, sign(key, unix_secs(), &body));
    }
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| TargetError::Unreachable(e.without_url().to_string()))?;
    let status = response.status();
    let function_error = response.headers().get("X-Amz-Function-Error").is_some();
    let body = read_bounded(response).await?;
    if status.is_success() && !function_error {
        return Ok(body);
    }
    let detail = truncate(&String::from_utf8_lossy(&body));
    if function_error {
        Err(TargetError::Failed(format!("function error: {detail}")))
    } else if status.is_server_error() || status.as_u16() == 429 {
        Err(TargetError::Unreachable(format!(
            "status {status}: {detail}"
        )))
    } else {
        Err(TargetError::Failed(format!("status {status}: {detail}")))
    }
}

/// Invokes the function synchronously (RequestResponse) with the envelope as its event.
async fn invoke_aws(
    client: &aws_sdk_lambda::Client,
    function: &str,
    envelope: &Envelope<'_>,
) -> Result<Vec<u8>, TargetError> {
    let payload =
        serde_json::to_vec(envelope).map_err(|e| TargetError::Failed(format!("envelope: {e}")))?;
    let output = client
        .invoke()
        .function_name(function)
        .invocation_type(InvocationType::RequestResponse)
        .payload(Blob::new(payload))
        .send()
        .await
        .map_err(classify)?;
    match output.function_error() {
        None => Ok(output
            .payload()
            .map(Blob::as_ref)
            .unwrap_or_default()
            .to_vec()),
        Some(kind) => {
            let payload = output.payload().map(Blob::as_ref).unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("errorMessage")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(payload).into_owned());
            Err(TargetError::Failed(format!(
                "function error ({kind}): {}",
                truncate(&message)
            )))
        }
    }
}

/// Throttling, 5xx, timeouts and connection failures may pass on a retry; the rest (unknown
/// function, access denied, bad request) will not.
fn classify(e: SdkError<InvokeError, aws_sdk_lambda::config::http::HttpResponse>) -> TargetError {
    let retry_helps = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            status == 429 || status >= 500
        }
        SdkError::ResponseError(re) => {
            let status = re.raw().status().as_u16();
            status == 429 || status >= 500
        }
        _ => false,
    };
    let detail = match &e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            format!(
                "{} (status {}, request id {}): {}",
                err.code().unwrap_or("unknown error"),
                se.raw().status().as_u16(),
                err.request_id().unwrap_or("-"),
                err.message().unwrap_or_default()
            )
        }
        _ => DisplayErrorContext(&e).to_string(),
    };
    let detail = truncate(&detail);
    if retry_helps {
        TargetError::Unreachable(detail)
    } else {
        TargetError::Failed(detail)
    }
}

/// The id of the envelope's (single) message.
fn message_id<'e>(envelope: &'e Envelope<'_>) -> &'e str {
    envelope.messages.first().map_or("", |m| m.id.as_str())
}

/// The answer's body, read up to one byte over [`MAX_OUTCOME_BYTES`] (enough to tell it is too large).
async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, TargetError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| TargetError::Unreachable(e.without_url().to_string()))?
    {
        let room = (MAX_OUTCOME_BYTES + 1).saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() > MAX_OUTCOME_BYTES {
            break;
        }
    }
    Ok(body)
}

/// `t=<unix_secs>,v1=<hex HMAC-SHA256(key, "<unix_secs>.<body>")>`: the writer's `X-Relay-Signature`.
pub(crate) fn sign(key: &hmac::Key, unix_secs: u64, body: &[u8]) -> String {
    let mut signed = format!("{unix_secs}.").into_bytes();
    signed.extend_from_slice(body);
    let tag = hmac::sign(key, &signed);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_secs},v1={hex}")
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn truncate(text: &str) -> String {
    text.chars().take(MAX_DETAIL_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_contract() {
        let refused = |body: &str| match outcome(body.as_bytes(), "m1") {
            Err(TargetError::Refused(r)) => Some((r.status, r.reason)),
            _ => None,
        };
        // Success and missing outcomes.
        for ok in [
            "",
            "ok",
            "{}",
            r#"{"ok":true}"#,
            "[1]",
            r#"{"results":[{"index":0,"id":"m1","status":"inserted"}]}"#,
            r#"{"results":[{"id":"m1","status":"duplicate","reason":"again"}]}"#,
            r#"{"results":[{"index":0,"id":null,"status":"accepted"}]}"#,
        ] {
            assert!(outcome(ok.as_bytes(), "m1").is_ok(), "{ok}");
        }
        assert_eq!(
            refused(
                r#"{"results":[{"index":0,"id":"m1","status":"rejected","reason":"not yours"}]}"#
            ),
            Some((RefusalStatus::Rejected, "not yours".to_owned()))
        );
        assert_eq!(
            refused(r#"{"results":[{"id":"m1","status":"invalid","reason":"a\nb"}]}"#),
            Some((RefusalStatus::Invalid, "ab".to_owned()))
        );
        assert_eq!(
            refused(r#"{"results":[{"id":"m1","status":"skipped"}]}"#),
            Some((RefusalStatus::Skipped, String::new()))
        );
        // Invalid outcomes are failures, never success.
        for bad in [
            r#"{"results":{}}"#,
            r#"{"results":[]}"#,
            r#"{"results":[{"id":"other","status":"inserted"}]}"#,
            r#"{"results":[{"id":"m1","status":"maybe"}]}"#,
            r#"{"results":[{"id":"m1"}]}"#,
        ] {
            assert!(
                matches!(outcome(bad.as_bytes(), "m1"), Err(TargetError::Failed(_))),
                "{bad}"
            );
        }
        let huge = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_OUTCOME_BYTES));
        assert!(matches!(
            outcome(huge.as_bytes(), "m1"),
            Err(TargetError::Failed(_))
        ));
        let long = format!(
            r#"{{"results":[{{"id":"m1","status":"rejected","reason":"{}"}}]}}"#,
            "x".repeat(5000)
        );
        assert_eq!(refused(&long).unwrap().1.len(), MAX_REASON_CHARS);
    }

    #[test]
    fn envelope_encodes_object_data_as_json_text() {
        let raw: Box<RawValue> =
            serde_json::from_str(r#"{"name":"chatMsg","data":{"username":"a","content":"hi"}}"#)
                .unwrap();
        let named: NamedData<'_> = serde_json::from_str(raw.get()).unwrap();
        let env = envelope("outgoing-chat", "alice", "c1", &named, "m1".into());
        let v = serde_json::to_value(&env).unwrap();
        assert_eq!(v["messages"][0]["name"], "chatMsg");
        assert_eq!(v["messages"][0]["clientId"], "alice");
        assert_eq!(v["messages"][0]["clientKind"], "user");
        assert_eq!(v["messages"][0]["encoding"], "json");
        let inner: serde_json::Value =
            serde_json::from_str(v["messages"][0]["data"].as_str().unwrap()).unwrap();
        assert_eq!(inner["content"], "hi");
    }

    #[test]
    fn the_sender_namespace_follows_the_caller() {
        let raw = r#"{"name":"chatMsg","data":{}}"#;
        let named: NamedData<'_> = serde_json::from_str(raw).unwrap();
        let kind = |client: &str, connection: &str| {
            let env = envelope("c", client, connection, &named, "m".into());
            serde_json::to_value(&env).unwrap()["messages"][0]["clientKind"].clone()
        };
        let anon = "0b8f3c2e-1d4a-4f5e-9a7b-2c3d4e5f6a7b";
        // An anonymous session sends its own connection id; a user whose `sub` is that same id, on
        // another connection, is a user.
        assert_eq!(kind(anon, anon), "anonymous");
        assert_eq!(kind(anon, "another-connection"), "user");
        assert_eq!(kind("api", "api"), "server");
    }

    #[test]
    fn the_signature_is_the_writers_scheme() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef");
        let header = sign(&key, 1_700_000_000, br#"{"messages":[]}"#);
        let (t, v1) = header.split_once(",v1=").unwrap();
        assert_eq!(t, "t=1700000000");
        assert_eq!(v1.len(), 64);
        let tag: Vec<u8> = (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).unwrap())
            .collect();
        assert!(hmac::verify(&key, br#"1700000000.{"messages":[]}"#, &tag).is_ok());
    }
}
