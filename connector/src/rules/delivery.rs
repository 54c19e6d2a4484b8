//! One delivery of an envelope to a rule's target, with the rule's retries: the AWS SDK invocation
//! ([`super::lambda`]), or a signed POST to a local Invoke endpoint or a webhook, and the bounded
//! read of its answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

use super::lambda::{LambdaClients, invoke_aws};
use super::{Envelope, MAX_OUTCOME_BYTES, SIGNATURE_HEADER, TargetError, truncate};
use crate::backoff::Backoff;
use crate::config::{Rule, Target};

/// Sends `envelope` to the rule's target, with the rule's retries: the body of its success answer.
pub(super) async fn deliver_raw(
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

/// One attempt: the AWS SDK invocation, or a POST to the endpoint or webhook within `timeout`.
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

/// Now, in seconds since the Unix epoch (the signature's timestamp).
fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
