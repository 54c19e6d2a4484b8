//! What a target's answer means for the message (the outcome contract in the module docs of
//! [`super`]): [`TargetError`], the refusals, and the rpc reply's data.

use serde_json::value::RawValue;
use thiserror::Error;

use super::{MAX_OUTCOME_BYTES, MAX_REASON_CHARS, truncate};

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
