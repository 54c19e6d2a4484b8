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
//!
//! # Files
//! - this file: the rules' concurrency limits and the two entry points, [`deliver_limited`]
//!   (a publication) and [`call_limited`] (an `rpc`);
//! - `envelope.rs`: the envelope and the sender's identity;
//! - `delivery.rs`: one delivery with the rule's retries (the POST to a local endpoint or webhook,
//!   signed);
//! - `lambda.rs`: the AWS SDK clients and the invocation in AWS;
//! - `outcome.rs`: what the answer means for the message ([`TargetError`], refusals, rpc data).

mod delivery;
mod envelope;
mod lambda;
mod outcome;
#[cfg(test)]
mod tests;

use serde_json::value::RawValue;

use crate::config::Rule;

use self::delivery::deliver_raw;
pub(crate) use self::envelope::{Envelope, NamedData, envelope, rpc_envelope};
pub(crate) use self::lambda::LambdaClients;
pub(crate) use self::outcome::TargetError;
use self::outcome::{outcome, rpc_answer};

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

/// The id of the envelope's (single) message.
fn message_id<'e>(envelope: &'e Envelope<'_>) -> &'e str {
    envelope.messages.first().map_or("", |m| m.id.as_str())
}

/// The first [`MAX_DETAIL_CHARS`] characters of `text`: an error detail kept from a target's answer.
fn truncate(text: &str) -> String {
    text.chars().take(MAX_DETAIL_CHARS).collect()
}
