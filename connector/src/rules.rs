//! Publish rules: a client publication on a channel bound by a rule goes to the rule's target — the
//! writer Lambda (through the Lambda Invoke API) or an HTTP webhook — as an Ably-style envelope.
//!
//! The client's publish is answered only after the target answered: success, or an error reply. The
//! sender's identity comes from the connection, never from the message body, and the message id is
//! assigned here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::config::{Rule, Target};

/// Why a target did not accept a publication.
#[derive(Debug, Error)]
pub enum TargetError {
    /// The target could not be reached or did not answer in time (a retry may help).
    #[error("target unreachable: {0}")]
    Unreachable(String),
    /// The target answered with an error.
    #[error("target failed: {0}")]
    Failed(String),
}

/// One message of the envelope.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvelopeMessage<'a> {
    /// Message id, assigned by the connector.
    pub id: String,
    /// The sender: the connection's user, or its client id when anonymous.
    pub client_id: &'a str,
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
pub struct Envelope<'a> {
    /// Always `channel.message`.
    pub source: &'static str,
    /// The channel published on.
    pub channel: &'a str,
    /// The messages (one per client publish).
    pub messages: Vec<EnvelopeMessage<'a>>,
}

/// The client's publication data for a rule-bound channel: `{"name": N, "data": D}`.
#[derive(Debug, serde::Deserialize)]
pub struct NamedData<'a> {
    /// Message name.
    pub name: String,
    /// Message data.
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// Builds the envelope for one client publication.
pub fn envelope<'a>(
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
            connection_id,
            timestamp,
            name: &named.name,
            data,
            encoding,
        }],
    }
}

/// Sends `envelope` to the rule's target and waits for its answer.
pub async fn deliver(
    http: &reqwest::Client,
    rule: &Rule,
    envelope: &Envelope<'_>,
) -> Result<(), TargetError> {
    let timeout = Duration::from_millis(rule.timeout_ms);
    let request = match &rule.target {
        Target::Lambda { function, endpoint } => {
            let base = endpoint
                .as_deref()
                .unwrap_or_default()
                .trim_end_matches('/');
            http.post(format!(
                "{base}/2015-03-31/functions/{function}/invocations"
            ))
            .header("X-Amz-Invocation-Type", "RequestResponse")
        }
        Target::Http { url } => http.post(url),
    };
    let response = request
        .timeout(timeout)
        .json(envelope)
        .send()
        .await
        .map_err(|e| TargetError::Unreachable(e.without_url().to_string()))?;
    let status = response.status();
    let function_error = response.headers().get("X-Amz-Function-Error").is_some();
    if status.is_success() && !function_error {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let detail: String = body.chars().take(500).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(v["messages"][0]["encoding"], "json");
        let inner: serde_json::Value =
            serde_json::from_str(v["messages"][0]["data"].as_str().unwrap()).unwrap();
        assert_eq!(inner["content"], "hi");
    }
}
