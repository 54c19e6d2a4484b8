//! Who may invoke the local invoke server: only a caller holding the shared secret (`WRITER_SECRET`),
//! the connector.
//!
//! In AWS the Lambda Invoke API authenticates callers with IAM (the connector's task role holds
//! `lambda:InvokeFunction`); outside AWS the local server is just an HTTP port, so each invocation carries
//! a signature of its body made with a secret both sides know:
//!
//! ```text
//! X-Relay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
//! ```
//!
//! The server accepts an invocation only when `v1` matches (compared in constant time) and `t` is within
//! [`MAX_SKEW_SECS`] of its clock, so a captured request cannot be replayed later (and a replay within
//! the window changes nothing: the writer applies each message id once). The secret never travels: a
//! network observer sees signatures only. Refusals are `403` with `x-amzn-ErrorType`
//! `MissingAuthenticationTokenException` (no header) or `InvalidSignatureException` (bad or stale), as the
//! real Invoke API answers unsigned or badly signed calls, so the connector does not retry them.
//!
//! The connector signs with the same scheme (`connector/src/rules.rs`) whenever `WRITER_SECRET` is set
//! in its environment, for every `lambda` target with an `endpoint` and every `http` target.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;

/// The request header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-relay-signature";
/// Largest accepted difference between the signature's time and the server's clock, in seconds.
pub const MAX_SKEW_SECS: u64 = 300;
/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// The shared secret, ready to sign and verify. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct Secret {
    key: hmac::Key,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

/// Why an invocation's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `X-Relay-Signature` header.
    #[error("missing X-Relay-Signature header: invocations must be signed with WRITER_SECRET")]
    Missing,
    /// The header is not `t=<seconds>,v1=<hex>`.
    #[error("malformed X-Relay-Signature header")]
    Malformed,
    /// The signature's time is too far from the server's clock.
    #[error("signature expired or from the future (more than {MAX_SKEW_SECS} s off)")]
    Stale,
    /// The signature does not match the body.
    #[error("signature does not match")]
    Mismatch,
}

impl Secret {
    /// Wraps the secret; refuses one shorter than [`MIN_SECRET_BYTES`].
    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "WRITER_SECRET must be at least {MIN_SECRET_BYTES} bytes (it is {})",
                secret.len()
            ));
        }
        Ok(Secret {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        })
    }

    /// The header value for `body`, signed at `unix_secs`.
    pub fn sign(&self, unix_secs: u64, body: &[u8]) -> String {
        let tag = hmac::sign(&self.key, &signed_bytes(unix_secs, body));
        format!("t={unix_secs},v1={}", hex(tag.as_ref()))
    }

    /// Checks `header` (the value of [`SIGNATURE_HEADER`], if any) against `body` at the current time.
    pub fn verify(&self, header: Option<&str>, body: &[u8]) -> Result<(), Refusal> {
        self.verify_at(now_secs(), header, body)
    }

    /// [`Secret::verify`] at a given time (seconds since the Unix epoch).
    pub fn verify_at(&self, now: u64, header: Option<&str>, body: &[u8]) -> Result<(), Refusal> {
        let header = header.ok_or(Refusal::Missing)?;
        let (mut t, mut v1) = (None, None);
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", value)) => t = value.parse::<u64>().ok(),
                Some(("v1", value)) => v1 = unhex(value),
                _ => {}
            }
        }
        let (Some(t), Some(v1)) = (t, v1) else {
            return Err(Refusal::Malformed);
        };
        if now.abs_diff(t) > MAX_SKEW_SECS {
            return Err(Refusal::Stale);
        }
        hmac::verify(&self.key, &signed_bytes(t, body), &v1).map_err(|_| Refusal::Mismatch)
    }
}

/// The current time in seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn signed_bytes(unix_secs: u64, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!("{unix_secs}.").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    #[test]
    fn a_signature_verifies_only_for_its_body_secret_and_time() {
        let secret = Secret::new(SECRET).expect("long enough");
        let body = br#"{"messages":[]}"#;
        let header = secret.sign(1_000_000, body);
        assert!(header.starts_with("t=1000000,v1="), "{header}");
        assert_eq!(secret.verify_at(1_000_000, Some(&header), body), Ok(()));
        assert_eq!(secret.verify_at(1_000_300, Some(&header), body), Ok(()));
        assert_eq!(
            secret.verify_at(1_000_301, Some(&header), body),
            Err(Refusal::Stale)
        );
        assert_eq!(
            secret.verify_at(999_699, Some(&header), body),
            Err(Refusal::Stale)
        );
        assert_eq!(
            secret.verify_at(1_000_000, Some(&header), br#"{"messages":[1]}"#),
            Err(Refusal::Mismatch)
        );
        let other = Secret::new("another-secret-of-at-least-32-bytes!").expect("long enough");
        assert_eq!(
            other.verify_at(1_000_000, Some(&header), body),
            Err(Refusal::Mismatch)
        );
        // The time is signed too: moving it forward breaks the signature.
        let moved = header.replacen("t=1000000", "t=1000100", 1);
        assert_eq!(
            secret.verify_at(1_000_100, Some(&moved), body),
            Err(Refusal::Mismatch)
        );
    }

    #[test]
    fn malformed_or_missing_headers_are_refused() {
        let secret = Secret::new(SECRET).expect("long enough");
        assert_eq!(secret.verify_at(5, None, b""), Err(Refusal::Missing));
        for header in [
            "",
            "t=5",
            "v1=00",
            "t=x,v1=00",
            "t=5,v1=zz",
            &format!("t=5,v1={}", "g".repeat(64)),
            &format!("t=5,v1={}", "0".repeat(62)),
        ] {
            assert_eq!(
                secret.verify_at(5, Some(header), b""),
                Err(Refusal::Malformed),
                "{header:?}"
            );
        }
    }

    #[test]
    fn short_secrets_are_refused_and_never_shown() {
        assert!(Secret::new("short").is_err());
        let secret = Secret::new(SECRET).expect("long enough");
        assert!(!format!("{secret:?}").contains("secret-of"));
    }
}
