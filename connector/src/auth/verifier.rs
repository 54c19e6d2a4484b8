//! JWT verification: the configured keys, the algorithms they allow, and the standard checks
//! (signature, `exp`, `nbf`, and `aud` / `iss` when configured).
//!
//! The algorithm allow-list is derived from the key kinds that are configured: an HMAC secret allows
//! HS256/384/512, an RSA public key RS256/384/512, an EC public key ES256/ES384. A token whose header
//! names any other algorithm — `none`, or HS256 when only an RSA public key is configured (the classic
//! key-confusion attack) — is refused before any key is used. Tokens are Centrifugo's, so tokens minted
//! for Centrifugo verify here unchanged.
//!
//! With `auth.jwks_url`, the keys of that JWKS are used **instead** (as Centrifugo does; combining it
//! with the static keys is a configuration error): the token's `kid` picks the key, and the key's type
//! and curve (or its `alg`) decide which algorithms the token may name. See [`super::jwks`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::jwks::{Jwks, Lookup};
use crate::config::AuthKeys;
use crate::error::ConfigError;

pub use crate::config::AuthConfig;

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
    /// Its key could not be had: the JWKS could not be fetched for an unknown `kid`. Temporary.
    #[error("token key unavailable")]
    Unavailable,
}

/// Verifies tokens against the configured keys.
#[derive(Clone)]
pub struct Verifier {
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ec: Option<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
    base: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hmac", &self.hmac.is_some())
            .field("rsa", &self.rsa.is_some())
            .field("ec", &self.ec.is_some())
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Loads the configured keys (PEM text or files). With a JWKS URL, the cache starts empty: no
    /// network I/O here ([`Verifier::start`] fetches).
    pub fn new(config: &AuthConfig) -> Result<Self, ConfigError> {
        let jwks = jwks(config)?;
        let AuthKeys { hmac, rsa, ec } = config.keys()?;
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
            jwks,
            base,
        })
    }

    /// With a JWKS URL: fetches the set and keeps it fresh until `shutdown`. Nothing otherwise.
    pub async fn start(&self, shutdown: CancellationToken, tracker: &TaskTracker) {
        if let Some(jwks) = &self.jwks {
            jwks.start(shutdown, tracker).await;
        }
    }

    /// The JWKS cache, when `auth.jwks_url` is set.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Whether any key is configured (without one, every token is invalid).
    pub fn has_keys(&self) -> bool {
        self.hmac.is_some() || self.rsa.is_some() || self.ec.is_some() || self.jwks.is_some()
    }

    /// The algorithms tokens may use, from the configured key kinds (with JWKS, each key decides).
    pub fn algorithms(&self) -> Vec<Algorithm> {
        let mut algs = Vec::new();
        if self.jwks.is_some() {
            algs.extend([
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
                Algorithm::ES256,
                Algorithm::ES384,
                Algorithm::EdDSA,
            ]);
        }
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

    /// Verifies `token` and returns its claims. With JWKS, a `kid` missing from the cached set makes
    /// the set be fetched again (at a bounded rate, waited for a few seconds at most).
    pub async fn verify<T: DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        let header = header(token)?;
        let Some(jwks) = &self.jwks else {
            return self.verify_static(token, header.alg);
        };
        let kid = jwks_kid(&header)?;
        // No JWKS key is ever an HMAC secret: such a token is refused without a lookup or a fetch.
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} not allowed with JWKS",
                header.alg
            )));
        }
        match jwks.lookup(kid).await {
            Lookup::Found(key) => self.verify_jwk(token, header.alg, kid, &key),
            Lookup::Unknown => Err(TokenError::Invalid(format!("kid {kid:?} not in the JWKS"))),
            Lookup::Unavailable => Err(TokenError::Unavailable),
        }
    }

    /// Verifies `token` with the keys at hand, without any network I/O: with JWKS, a `kid` missing
    /// from the cached set is invalid.
    pub fn verify_cached<T: DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        let header = header(token)?;
        let Some(jwks) = &self.jwks else {
            return self.verify_static(token, header.alg);
        };
        let kid = jwks_kid(&header)?;
        match jwks.cached(kid) {
            Some(key) => self.verify_jwk(token, header.alg, kid, &key),
            None => Err(TokenError::Invalid(format!("kid {kid:?} not in the JWKS"))),
        }
    }

    fn verify_static<T: DeserializeOwned>(
        &self,
        token: &str,
        alg: Algorithm,
    ) -> Result<T, TokenError> {
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => self.hmac.as_ref(),
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => self.rsa.as_ref(),
            Algorithm::ES256 | Algorithm::ES384 => self.ec.as_ref(),
            _ => None,
        }
        .ok_or_else(|| TokenError::Invalid(format!("algorithm {alg:?} not allowed")))?;
        self.decode(token, alg, key)
    }

    fn verify_jwk<T: DeserializeOwned>(
        &self,
        token: &str,
        alg: Algorithm,
        kid: &str,
        key: &super::jwks::JwkKey,
    ) -> Result<T, TokenError> {
        if !key.algorithms.contains(&alg) {
            return Err(TokenError::Invalid(format!(
                "algorithm {alg:?} not allowed for JWKS key {kid:?}"
            )));
        }
        self.decode(token, alg, &key.key)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        token: &str,
        alg: Algorithm,
        key: &DecodingKey,
    ) -> Result<T, TokenError> {
        let mut validation = self.base.clone();
        validation.algorithms = vec![alg];
        jsonwebtoken::decode::<T>(token, key, &validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            })
    }
}

/// The token's header. An unknown `alg` (including "none") fails here: the header does not parse.
fn header(token: &str) -> Result<Header, TokenError> {
    jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(format!("header: {e}")))
}

/// With JWKS, the `kid` is required: it picks the key.
fn jwks_kid(header: &Header) -> Result<&str, TokenError> {
    match header.kid.as_deref() {
        Some(kid) if !kid.is_empty() => Ok(kid),
        _ => Err(TokenError::Invalid(
            "no kid in the header (required with JWKS)".into(),
        )),
    }
}

/// The JWKS cache from `auth.jwks_url`, checked.
fn jwks(config: &AuthConfig) -> Result<Option<Arc<Jwks>>, ConfigError> {
    let Some(url) = config.jwks_url()? else {
        return Ok(None);
    };
    let jwks = Jwks::new(
        url,
        Duration::from_secs(config.jwks_refresh_secs),
        Duration::from_secs(config.jwks_min_refetch_secs),
    )
    .map_err(|e| ConfigError::new("auth.jwks_url", e))?;
    Ok(Some(Arc::new(jwks)))
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
        let c: serde_json::Value = v.verify_cached(&t).unwrap();
        assert_eq!(c["sub"], "alice");
        // no exp at all: valid (never expires)
        let t = mint_hs256(SECRET, &json!({"sub": "alice"})).unwrap();
        assert!(v.verify_cached::<serde_json::Value>(&t).is_ok());
        let t = mint_hs256(SECRET, &json!({"sub": "a", "exp": now() - 10})).unwrap();
        assert_eq!(
            v.verify_cached::<serde_json::Value>(&t),
            Err(TokenError::Expired)
        );
        let t = mint_hs256(SECRET, &json!({"sub": "a", "nbf": now() + 600})).unwrap();
        assert!(matches!(
            v.verify_cached::<serde_json::Value>(&t),
            Err(TokenError::Invalid(_))
        ));
        let forged = mint_hs256("another-secret-another-secret-xx", &json!({"sub": "a"})).unwrap();
        assert!(matches!(
            v.verify_cached::<serde_json::Value>(&forged),
            Err(TokenError::Invalid(_))
        ));
        // an expired token with a bad signature is invalid, not expired
        let forged = mint_hs256(
            "another-secret-another-secret-xx",
            &json!({"sub": "a", "exp": 1}),
        )
        .unwrap();
        assert!(matches!(
            v.verify_cached::<serde_json::Value>(&forged),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        let v = verifier(|_| {});
        // {"alg":"none","typ":"JWT"} . {"sub":"alice"} . (empty)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSJ9.";
        assert!(matches!(
            v.verify_cached::<serde_json::Value>(none),
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
        assert!(v.verify_cached::<serde_json::Value>(&ok).is_ok());
        for claims in [
            json!({"sub": "a", "aud": "other", "iss": "https://auth.example"}),
            json!({"sub": "a", "iss": "https://auth.example"}),
            json!({"sub": "a", "aud": "relay", "iss": "https://evil.example"}),
            json!({"sub": "a", "aud": "relay"}),
        ] {
            let t = mint_hs256(SECRET, &claims).unwrap();
            assert!(
                matches!(
                    v.verify_cached::<serde_json::Value>(&t),
                    Err(TokenError::Invalid(_))
                ),
                "{claims}"
            );
        }
        // without configured audience, a token's aud is not checked
        let v = verifier(|_| {});
        let t = mint_hs256(SECRET, &json!({"sub": "a", "aud": "anything"})).unwrap();
        assert!(v.verify_cached::<serde_json::Value>(&t).is_ok());
    }

    #[test]
    fn jwks_configuration() {
        let jwks = |url: &str, extra: fn(&mut AuthConfig)| {
            let mut c = AuthConfig {
                jwks_url: Some(url.into()),
                ..Default::default()
            };
            extra(&mut c);
            Verifier::new(&c)
        };
        let v = jwks("https://idp.example/.well-known/jwks.json", |_| {}).unwrap();
        assert!(v.has_keys() && v.jwks().is_some());
        // Nothing fetched yet: a token's kid is unknown to the cache, a token without kid is invalid.
        let t = mint_hs256(SECRET, &json!({"sub": "a"})).unwrap();
        assert!(matches!(
            v.verify_cached::<serde_json::Value>(&t),
            Err(TokenError::Invalid(_))
        ));
        for (url, extra, field) in [
            (
                "https://idp.example/jwks",
                (|c: &mut AuthConfig| c.hmac_secret_key = Some(SECRET.into()))
                    as fn(&mut AuthConfig),
                "auth.jwks_url",
            ),
            (
                "https://idp.example/jwks",
                |c: &mut AuthConfig| c.rsa_public_key = Some("/some.pem".into()),
                "auth.jwks_url",
            ),
            ("file:///etc/jwks.json", |_| {}, "auth.jwks_url"),
            ("idp.example/jwks", |_| {}, "auth.jwks_url"),
            (
                "http://idp.example/jwks",
                |c: &mut AuthConfig| c.jwks_refresh_secs = 0,
                "auth.jwks_refresh_secs",
            ),
            (
                "http://idp.example/jwks",
                |c: &mut AuthConfig| c.jwks_min_refetch_secs = 0,
                "auth.jwks_min_refetch_secs",
            ),
        ] {
            assert_eq!(jwks(url, extra).unwrap_err().field, field, "{url}");
        }
    }

    #[test]
    fn key_errors_name_the_field() {
        let e = Verifier::new(&AuthConfig {
            hmac_secret_key: Some("short".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "auth.hmac_secret_key");
        for path in ["/nonexistent.pem", "/dev/zero", "/"] {
            let e = Verifier::new(&AuthConfig {
                rsa_public_key: Some(path.into()),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(e.field, "auth.rsa_public_key", "{path}");
        }
        let e = Verifier::new(&AuthConfig {
            rsa_public_key: Some("-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "auth.rsa_public_key");
    }
}
