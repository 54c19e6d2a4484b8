//! JWT verification: the configured keys, the algorithms they allow, and the standard checks
//! (signature, `exp`, `nbf`, and `aud` / `iss` when configured).
//!
//! The algorithm allow-list is derived from the key kinds that are configured: an HMAC secret allows
//! HS256/384/512, an RSA public key RS256/384/512, an EC public key ES256/ES384. A token whose header
//! names any other algorithm — `none`, or HS256 when only an RSA public key is configured (the classic
//! key-confusion attack) — is refused before any key is used. Tokens are Centrifugo's, so tokens minted
//! for Centrifugo verify here unchanged.

use std::collections::HashSet;
use std::path::Path;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// The `auth` section of the configuration: the keys tokens are verified with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC secret for HS256/HS384/HS512 tokens; also what `connector token` mints with. Prefer the
    /// environment (`RELAY__AUTH__HMAC_SECRET_KEY`) to the file.
    #[serde(default)]
    pub hmac_secret_key: Option<String>,
    /// RSA public key for RS256/RS384/RS512: PEM text, or the path of a PEM file.
    #[serde(default)]
    pub rsa_public_key: Option<String>,
    /// EC public key (P-256 or P-384) for ES256/ES384: PEM text, or the path of a PEM file.
    #[serde(default)]
    pub ecdsa_public_key: Option<String>,
    /// When set, tokens must carry this `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// When set, tokens must carry this `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (default 0).
    #[serde(default)]
    pub leeway_secs: u64,
    /// Seconds after a connection or subscription token expired before the connection is closed
    /// (3005) or the subscription ended (2501), giving the SDK time to `refresh` (default 25).
    #[serde(default = "default_expired_close_delay")]
    pub expired_close_delay_secs: u64,
}

fn default_expired_close_delay() -> u64 {
    25
}

/// Why a token was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Correctly signed, but past its `exp`: the client should fetch a new one.
    #[error("token expired")]
    Expired,
    /// Anything else: bad signature, algorithm not allowed, malformed, `nbf` in the future, wrong
    /// `aud` or `iss`, claims of the wrong shape. The text is for logs, never for clients.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// A key-loading problem (reported by configuration validation).
#[derive(Debug, Error)]
#[error("{field}: {problem}")]
pub struct KeyError {
    /// The configuration field.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

/// Verifies tokens against the configured keys.
#[derive(Clone)]
pub struct Verifier {
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ec: Option<DecodingKey>,
    base: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hmac", &self.hmac.is_some())
            .field("rsa", &self.rsa.is_some())
            .field("ec", &self.ec.is_some())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Loads the configured keys (PEM text or files).
    pub fn new(config: &AuthConfig) -> Result<Self, KeyError> {
        let hmac = match config.hmac_secret_key.as_deref() {
            Some("") => {
                return Err(KeyError {
                    field: "auth.hmac_secret_key",
                    problem: "must not be empty (omit it to disable HMAC tokens)".into(),
                });
            }
            Some(s) if s.len() < 32 => {
                return Err(KeyError {
                    field: "auth.hmac_secret_key",
                    problem: "must be at least 32 bytes (256 bits)".into(),
                });
            }
            Some(s) => Some(DecodingKey::from_secret(s.as_bytes())),
            None => None,
        };
        let rsa = load_pem(
            "auth.rsa_public_key",
            config.rsa_public_key.as_deref(),
            DecodingKey::from_rsa_pem,
        )?;
        let ec = load_pem(
            "auth.ecdsa_public_key",
            config.ecdsa_public_key.as_deref(),
            DecodingKey::from_ec_pem,
        )?;
        let mut base = Validation::new(Algorithm::HS256);
        base.leeway = config.leeway_secs;
        base.validate_exp = true;
        base.validate_nbf = true;
        // Centrifugo tokens may omit `exp` (never expire); `aud` and `iss` are required only when
        // configured.
        let mut required: Vec<&str> = Vec::new();
        match &config.audience {
            Some(aud) => {
                base.set_audience(&[aud]);
                required.push("aud");
            }
            None => base.validate_aud = false,
        }
        if let Some(iss) = &config.issuer {
            base.set_issuer(&[iss]);
            required.push("iss");
        }
        base.required_spec_claims = required
            .into_iter()
            .map(str::to_owned)
            .collect::<HashSet<_>>();
        Ok(Self {
            hmac,
            rsa,
            ec,
            base,
        })
    }

    /// Whether any key is configured (without one, every token is invalid).
    pub fn has_keys(&self) -> bool {
        self.hmac.is_some() || self.rsa.is_some() || self.ec.is_some()
    }

    /// The algorithms tokens may use, from the configured key kinds.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        let mut algs = Vec::new();
        if self.hmac.is_some() {
            algs.extend([Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]);
        }
        if self.rsa.is_some() {
            algs.extend([Algorithm::RS256, Algorithm::RS384, Algorithm::RS512]);
        }
        if self.ec.is_some() {
            algs.extend([Algorithm::ES256, Algorithm::ES384]);
        }
        algs
    }

    /// Verifies `token` and returns its claims.
    pub fn verify<T: DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        // An unknown `alg` (including "none") fails here: the header does not parse.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Invalid(format!("header: {e}")))?;
        let key = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => self.hmac.as_ref(),
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => self.rsa.as_ref(),
            Algorithm::ES256 | Algorithm::ES384 => self.ec.as_ref(),
            _ => None,
        }
        .ok_or_else(|| TokenError::Invalid(format!("algorithm {:?} not allowed", header.alg)))?;
        let mut validation = self.base.clone();
        validation.algorithms = vec![header.alg];
        jsonwebtoken::decode::<T>(token, key, &validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            })
    }
}

fn load_pem(
    field: &'static str,
    value: Option<&str>,
    parse: impl Fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>,
) -> Result<Option<DecodingKey>, KeyError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let pem = if value.trim_start().starts_with("-----BEGIN") {
        value.as_bytes().to_vec()
    } else {
        std::fs::read(Path::new(value)).map_err(|e| KeyError {
            field,
            problem: format!("cannot read PEM file {value:?}: {e}"),
        })?
    };
    parse(&pem).map(Some).map_err(|e| KeyError {
        field,
        problem: format!("not a usable public key in PEM: {e}"),
    })
}

/// Mints an HS256 token with `claims` (for `connector token` and tests).
pub fn mint_hs256(secret: &str, claims: &serde_json::Value) -> Result<String, TokenError> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| TokenError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier(extra: impl FnOnce(&mut AuthConfig)) -> Verifier {
        let mut c = AuthConfig {
            hmac_secret_key: Some(SECRET.into()),
            ..Default::default()
        };
        extra(&mut c);
        Verifier::new(&c).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn hmac_tokens() {
        let v = verifier(|_| {});
        let t = mint_hs256(SECRET, &json!({"sub": "alice", "exp": now() + 60})).unwrap();
        let c: serde_json::Value = v.verify(&t).unwrap();
        assert_eq!(c["sub"], "alice");
        // no exp at all: valid (never expires)
        let t = mint_hs256(SECRET, &json!({"sub": "alice"})).unwrap();
        assert!(v.verify::<serde_json::Value>(&t).is_ok());
        let t = mint_hs256(SECRET, &json!({"sub": "a", "exp": now() - 10})).unwrap();
        assert_eq!(v.verify::<serde_json::Value>(&t), Err(TokenError::Expired));
        let t = mint_hs256(SECRET, &json!({"sub": "a", "nbf": now() + 600})).unwrap();
        assert!(matches!(
            v.verify::<serde_json::Value>(&t),
            Err(TokenError::Invalid(_))
        ));
        let forged = mint_hs256("another-secret-another-secret-xx", &json!({"sub": "a"})).unwrap();
        assert!(matches!(
            v.verify::<serde_json::Value>(&forged),
            Err(TokenError::Invalid(_))
        ));
        // an expired token with a bad signature is invalid, not expired
        let forged = mint_hs256(
            "another-secret-another-secret-xx",
            &json!({"sub": "a", "exp": 1}),
        )
        .unwrap();
        assert!(matches!(
            v.verify::<serde_json::Value>(&forged),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        let v = verifier(|_| {});
        // {"alg":"none","typ":"JWT"} . {"sub":"alice"} . (empty)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSJ9.";
        assert!(matches!(
            v.verify::<serde_json::Value>(none),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn audience_and_issuer() {
        let v = verifier(|c| {
            c.audience = Some("relay".into());
            c.issuer = Some("https://auth.example".into());
        });
        let ok = mint_hs256(
            SECRET,
            &json!({"sub": "a", "aud": "relay", "iss": "https://auth.example"}),
        )
        .unwrap();
        assert!(v.verify::<serde_json::Value>(&ok).is_ok());
        for claims in [
            json!({"sub": "a", "aud": "other", "iss": "https://auth.example"}),
            json!({"sub": "a", "iss": "https://auth.example"}),
            json!({"sub": "a", "aud": "relay", "iss": "https://evil.example"}),
            json!({"sub": "a", "aud": "relay"}),
        ] {
            let t = mint_hs256(SECRET, &claims).unwrap();
            assert!(
                matches!(
                    v.verify::<serde_json::Value>(&t),
                    Err(TokenError::Invalid(_))
                ),
                "{claims}"
            );
        }
        // without configured audience, a token's aud is not checked
        let v = verifier(|_| {});
        let t = mint_hs256(SECRET, &json!({"sub": "a", "aud": "anything"})).unwrap();
        assert!(v.verify::<serde_json::Value>(&t).is_ok());
    }

    #[test]
    fn key_errors_name_the_field() {
        let e = Verifier::new(&AuthConfig {
            hmac_secret_key: Some("short".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "auth.hmac_secret_key");
        let e = Verifier::new(&AuthConfig {
            rsa_public_key: Some("/nonexistent.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "auth.rsa_public_key");
        let e = Verifier::new(&AuthConfig {
            rsa_public_key: Some("-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "auth.rsa_public_key");
    }
}
