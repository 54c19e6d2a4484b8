//! The AWS Lambda target without `endpoint`: the SDK clients built once at start-up
//! ([`LambdaClients`], which also hold the signing key of POSTed envelopes), the synchronous
//! invocation, and which SDK errors a retry may cure.

use std::fmt;
use std::time::Duration;

use aws_sdk_lambda::config::{BehaviorVersion, Region};
use aws_sdk_lambda::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::operation::RequestId;
use aws_sdk_lambda::operation::invoke::InvokeError;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use ring::hmac;

use super::{Envelope, TargetError, WRITER_SECRET_ENV, truncate};
use crate::config::{Rule, Target};
use crate::error::ConfigError;

/// The AWS Lambda clients of the rules whose `lambda` target has no `endpoint`: one per distinct
/// (region override, timeout), built once at start-up, sharing one HTTPS connection pool and one
/// cached credential chain (environment, profile, web identity, ECS task role, EC2 instance role).
#[derive(Clone, Default)]
pub(crate) struct LambdaClients {
    clients: Vec<(LambdaKey, aws_sdk_lambda::Client)>,
    /// `WRITER_SECRET`: signs the POSTs to local endpoints and webhooks.
    pub(super) signer: Option<hmac::Key>,
}

/// What tells two rules' clients apart.
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

    /// The SDK clients of the rules that invoke AWS Lambda (no `endpoint`), without a signer.
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
            clients.push((key, client_for(&sdk, i, rule, region)?));
        }
        Ok(Self {
            clients,
            signer: None,
        })
    }

    /// The client of a rule whose target has region override `region` and timeout `timeout`.
    pub(super) fn client(
        &self,
        region: Option<&str>,
        timeout: Duration,
    ) -> Option<&aws_sdk_lambda::Client> {
        self.clients
            .iter()
            .find(|(k, _)| k.region.as_deref() == region && k.timeout == timeout)
            .map(|(_, c)| c)
    }
}

/// The client of rule `i` (`rules[i]`): in `region`, or the SDK configuration's region; the rule's
/// timeout for the whole call, and no SDK retries.
fn client_for(
    sdk: &aws_config::SdkConfig,
    i: usize,
    rule: &Rule,
    region: Option<&String>,
) -> Result<aws_sdk_lambda::Client, ConfigError> {
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
    let config = aws_sdk_lambda::config::Builder::from(sdk)
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
    Ok(aws_sdk_lambda::Client::from_conf(config))
}

/// Invokes the function synchronously (RequestResponse) with the envelope as its event.
pub(super) async fn invoke_aws(
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
