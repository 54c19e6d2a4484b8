//! `rules[]`: where client publications on matching channels go (first match wins), and how a
//! delivery is timed and retried. Used by [`crate::rules`].

use std::time::Duration;

use serde::Deserialize;

use super::channel_rules::{ChannelRules, PatternEntry};
use super::{check_range, duration, invalid};
use crate::error::ConfigError;

/// A publish rule: client publications on matching channels go to `target`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Channel pattern (`*` matches any run of characters); in `rpc[]`, the method pattern (key
    /// `method`).
    #[serde(alias = "method")]
    pub channel: String,
    /// Where publications go.
    pub target: Target,
    /// How long the whole delivery may take, retries included (key `timeout_ms`, default 4 s: below
    /// the SDKs' 5 s publish timeout).
    #[serde(
        rename = "timeout_ms",
        alias = "timeout",
        default = "default_rule_timeout",
        deserialize_with = "duration::millis"
    )]
    pub timeout: Duration,
    /// Retries after a failure a retry can cure (unreachable, timeout, throttled, 5xx); default 2.
    #[serde(default = "default_rule_retries")]
    pub retries: u32,
    /// The wait before the first retry, doubling after each (key `retry_backoff_ms`, default 100 ms).
    #[serde(
        rename = "retry_backoff_ms",
        alias = "retry_backoff",
        default = "default_retry_backoff",
        deserialize_with = "duration::millis"
    )]
    pub retry_backoff: Duration,
    /// Most deliveries to this rule's target at once, from this process (default 32). A publish
    /// that finds them all busy waits for a free one within `timeout_ms`, else error 111.
    #[serde(default = "default_rule_concurrency")]
    pub max_concurrency: u32,
}

/// A publish target.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// An AWS Lambda function, invoked through the Lambda Invoke API: in AWS (signed with the standard
    /// credential chain: environment, profile, web identity, ECS task role, EC2 instance role), or at
    /// `endpoint` (the local writer).
    Lambda {
        /// Function name, partial ARN or ARN (optionally with a `:qualifier`).
        function: String,
        /// Base URL of an Invoke API endpoint (the local writer: `http://127.0.0.1:9000`); when absent,
        /// the real AWS Lambda is invoked.
        #[serde(default)]
        endpoint: Option<String>,
        /// AWS region of the function (default: the standard chain, `AWS_REGION` and the AWS profile);
        /// only without `endpoint`.
        #[serde(default)]
        region: Option<String>,
    },
    /// An HTTP webhook: the envelope is POSTed as JSON; any 2xx is success.
    Http {
        /// The webhook URL.
        url: String,
    },
}

impl PatternEntry for Rule {
    fn channel(&self) -> &str {
        &self.channel
    }
}

fn default_rule_timeout() -> Duration {
    Duration::from_millis(4_000)
}
fn default_rule_retries() -> u32 {
    2
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_rule_concurrency() -> u32 {
    32
}

/// Checks `rules[]` (or `rpc[]`: `list`); the error names the field.
pub(crate) fn validate(rules: &ChannelRules<Rule>, list: &str) -> Result<(), ConfigError> {
    rules.check_patterns(list)?;
    for (i, r) in rules.iter().enumerate() {
        let field = |f: &str| format!("{list}[{i}].{f}");
        duration::check(
            &field("timeout_ms"),
            r.timeout,
            Duration::from_millis(1),
            Duration::from_secs(900),
        )?;
        check_range(&field("retries"), r.retries.into(), 0, 10)?;
        duration::check(
            &field("retry_backoff_ms"),
            r.retry_backoff,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?;
        check_range(
            &field("max_concurrency"),
            r.max_concurrency.into(),
            1,
            100_000,
        )?;
        match &r.target {
            Target::Lambda {
                function,
                endpoint,
                region,
            } => {
                let ok = !function.is_empty()
                    && function.len() <= 140
                    && function
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b));
                if !ok {
                    return Err(invalid(
                        &field("target.function"),
                        "must be a Lambda function name or ARN",
                    ));
                }
                if let Some(e) = endpoint {
                    check_url(&field("target.endpoint"), e)?;
                }
                if let Some(region) = region {
                    if endpoint.is_some() {
                        return Err(invalid(
                            &field("target.region"),
                            "applies only to AWS Lambda: remove it, or remove target.endpoint",
                        ));
                    }
                    if !is_region(region) {
                        return Err(invalid(
                            &field("target.region"),
                            format!("{region:?} is not an AWS region like us-east-1"),
                        ));
                    }
                    if let Some(arn_region) = arn_region(function)
                        && arn_region != region
                    {
                        return Err(invalid(
                            &field("target.region"),
                            format!(
                                "{region:?} differs from the function ARN's region {arn_region:?}"
                            ),
                        ));
                    }
                }
            }
            Target::Http { url } => check_url(&field("target.url"), url)?,
        }
    }
    Ok(())
}

fn check_url(field: &str, value: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(invalid(field, format!("{value:?} is not an http(s) URL"))),
    }
}

/// Whether `s` looks like an AWS region: lowercase words and a number joined by `-` (`us-east-1`,
/// `us-gov-west-1`, `eu-central-2`).
pub(super) fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    s.len() <= 50
        && parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The region of a function ARN (`arn:aws:lambda:us-east-1:123456789012:function:name`).
fn arn_region(function: &str) -> Option<&str> {
    let mut parts = function.split(':');
    (parts.next() == Some("arn"))
        .then(|| parts.nth(2))
        .flatten()
        .filter(|r| !r.is_empty())
}
