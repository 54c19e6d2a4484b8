//! Keys from a JWKS URL (`auth.jwks_url`), chosen by the token's `kid`.
//!
//! The set is fetched at start-up and every `auth.jwks_refresh_secs` (default 3600), and kept in
//! memory: verifying a token does no network I/O. The one exception is a token whose `kid` is not in
//! the cached set (the identity provider rotated its keys): the set is fetched again, **at most once
//! per `auth.jwks_min_refetch_secs`** (default 30) however many such tokens arrive, so tokens with
//! made-up `kid`s cannot make the relay hammer the identity provider. Concurrent callers share one
//! fetch, and each waits for it at most [`REFETCH_WAIT`]; the fetch itself runs on to completion (at
//! most [`FETCH_TIMEOUT`]), so a slow provider delays a `connect` by a few seconds, never more.
//!
//! Every fetch has a [`FETCH_TIMEOUT`], a body limit of [`MAX_BODY_BYTES`] and at most
//! [`MAX_REDIRECTS`] redirects; a failed fetch keeps the keys already cached.
//!
//! Usable keys: `kty: RSA` (RS256/384/512, or the single RS*/PS* algorithm its `alg` names), `kty:
//! EC` with `crv` P-256 (ES256) or P-384 (ES384), `kty: OKP` with `crv` Ed25519 (EdDSA). Keys without
//! a `kid`, keys marked `use: enc`, symmetric (`oct`) keys — an HMAC secret must never come from a URL
//! — and keys of other types or curves are skipped; the rest of the set is still used.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long one fetch of the set may take, connection and body included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a `connect` (or `subscribe`, `refresh`) waits for a refetch caused by its unknown `kid`.
/// Below the SDKs' 5 s command timeout.
pub const REFETCH_WAIT: Duration = Duration::from_secs(3);
/// The largest JWKS body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Keys beyond this many in one set are ignored.
pub const MAX_KEYS: usize = 256;
/// Redirects followed when fetching the set.
pub const MAX_REDIRECTS: usize = 3;

/// One usable key of the set.
#[derive(Clone)]
pub struct JwkKey {
    /// The verification key.
    pub key: DecodingKey,
    /// The algorithms a token verified with this key may name.
    pub algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for JwkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwkKey")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// Keys by `kid`.
pub type KeySet = HashMap<String, Arc<JwkKey>>;

/// The result of looking a `kid` up, fetching the set again if need be.
#[derive(Debug)]
pub enum Lookup {
    /// The key.
    Found(Arc<JwkKey>),
    /// Not in the set, even after a refetch (or a refetch was not allowed yet and the last one
    /// worked): the token is invalid.
    Unknown,
    /// The set could not be fetched (error, timeout, too large) and the key is not cached: a
    /// temporary failure, the client may retry.
    Unavailable,
}

/// The JWKS cache of one connector.
pub struct Jwks {
    url: reqwest::Url,
    http: reqwest::Client,
    refresh: Duration,
    min_refetch: Duration,
    keys: RwLock<Arc<KeySet>>,
    demand: Mutex<Demand>,
    fetches: Counter,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url.as_str())
            .field("refresh", &self.refresh)
            .field("min_refetch", &self.min_refetch)
            .finish_non_exhaustive()
    }
}

/// The state of fetches caused by unknown `kid`s.
#[derive(Default)]
struct Demand {
    /// When the last one started.
    last: Option<Instant>,
    /// Whether it succeeded (`None` while it runs).
    outcome: Option<watch::Receiver<Option<bool>>>,
}

impl Jwks {
    /// A cache for `url`, empty until [`Jwks::start`] or the first refetch. No network I/O here.
    pub fn new(
        url: reqwest::Url,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .user_agent(concat!("relay-connector/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            url,
            http,
            refresh,
            min_refetch,
            keys: RwLock::new(Arc::new(KeySet::new())),
            demand: Mutex::new(Demand::default()),
            fetches: Counter::default(),
        })
    }

    /// The cached key for `kid`, if any (no network I/O).
    pub fn cached(&self, kid: &str) -> Option<Arc<JwkKey>> {
        self.keys.read().get(kid).cloned()
    }

    /// How many fetches were started (start-up, periodic and on demand).
    pub fn fetches(&self) -> u64 {
        self.fetches.get()
    }

    /// The counter of [`Jwks::fetches`], for the registry ([`crate::metrics::Metrics`]).
    pub fn fetches_counter(&self) -> Counter {
        self.fetches.clone()
    }

    /// Fetches the set once (start-up) and spawns the periodic refresh. A failed start-up fetch is
    /// logged, not fatal: tokens are then refused until a refetch or the next refresh succeeds.
    pub async fn start(self: &Arc<Self>, shutdown: CancellationToken, tracker: &TaskTracker) {
        match self.fetch_and_store().await {
            Ok(n) => tracing::info!(url = %self.url, keys = n, "JWKS fetched"),
            Err(e) => {
                tracing::error!(url = %self.url, error = %e, "JWKS fetch failed at start-up; tokens are refused until it succeeds")
            }
        }
        tracker.spawn(self.clone().refresh_loop(shutdown));
    }

    async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut wait = self.refresh;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = match self.fetch_and_store().await {
                Ok(n) => {
                    tracing::debug!(url = %self.url, keys = n, "JWKS refreshed");
                    self.refresh
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed; keeping the cached keys");
                    // Try again sooner than a full period, but not more often than on demand.
                    self.min_refetch
                        .max(Duration::from_secs(1))
                        .min(self.refresh)
                }
            };
        }
    }

    /// The key for `kid`: from the cache, else after a refetch — unless one started less than
    /// `min_refetch` ago, in which case its outcome stands. Waits for the refetch at most
    /// [`REFETCH_WAIT`].
    pub async fn lookup(self: &Arc<Self>, kid: &str) -> Lookup {
        if let Some(key) = self.cached(kid) {
            return Lookup::Found(key);
        }
        let mut outcome = {
            let mut demand = self.demand.lock();
            // Running: no outcome yet, and its task is alive (a task that died sends nothing).
            let running = demand
                .outcome
                .as_ref()
                .is_some_and(|rx| rx.borrow().is_none() && rx.has_changed().is_ok());
            let recent = demand
                .last
                .is_some_and(|at| at.elapsed() < self.min_refetch);
            match &demand.outcome {
                Some(rx) if running || recent => rx.clone(),
                _ => {
                    demand.last = Some(Instant::now());
                    let (tx, rx) = watch::channel(None);
                    demand.outcome = Some(rx.clone());
                    let this = self.clone();
                    let kid = kid.to_owned();
                    // A task of its own: it completes even if this caller stops waiting.
                    tokio::spawn(async move {
                        let ok = match this.fetch_and_store().await {
                            Ok(n) => {
                                tracing::info!(url = %this.url, keys = n, kid, "JWKS fetched for an unknown kid");
                                true
                            }
                            Err(e) => {
                                tracing::warn!(url = %this.url, error = %e, kid, "JWKS fetch for an unknown kid failed");
                                false
                            }
                        };
                        let _ = tx.send(Some(ok));
                    });
                    rx
                }
            }
        };
        let fetched =
            match tokio::time::timeout(REFETCH_WAIT, outcome.wait_for(Option::is_some)).await {
                Ok(Ok(done)) => done.unwrap_or(false),
                Ok(Err(_)) | Err(_) => false,
            };
        match self.cached(kid) {
            Some(key) => Lookup::Found(key),
            None if fetched => Lookup::Unknown,
            None => Lookup::Unavailable,
        }
    }

    /// Fetches the set and replaces the cached one; the number of usable keys.
    async fn fetch_and_store(&self) -> Result<usize, String> {
        self.fetches.inc();
        let body = self.fetch_body().await?;
        let set = parse_set(&body)?;
        let n = set.len();
        if n == 0 {
            tracing::warn!(url = %self.url, "the JWKS has no usable key");
        }
        *self.keys.write() = Arc::new(set);
        Ok(n)
    }

    async fn fetch_body(&self) -> Result<Vec<u8>, String> {
        let mut response = self
            .http
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP status {status}"));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(format!("body larger than {MAX_BODY_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("body: {e}"))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(format!("body larger than {MAX_BODY_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Parses a JWKS document into its usable keys. Unusable keys are skipped (and logged); a body that
/// is not a JWKS at all is an error.
pub fn parse_set(body: &[u8]) -> Result<KeySet, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    if raw.keys.len() > MAX_KEYS {
        tracing::warn!(
            keys = raw.keys.len(),
            max = MAX_KEYS,
            "JWKS too long; the first keys are used"
        );
    }
    let mut set = KeySet::new();
    for value in raw.keys.into_iter().take(MAX_KEYS) {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                tracing::debug!(error = %e, "JWKS key skipped: not a supported JWK");
                continue;
            }
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            tracing::debug!("JWKS key skipped: no kid");
            continue;
        };
        match usable(&jwk) {
            Ok(key) => match set.entry(kid) {
                Entry::Occupied(e) => {
                    tracing::warn!(
                        kid = e.key(),
                        "JWKS has the kid twice; the first key is used"
                    );
                }
                Entry::Vacant(e) => {
                    e.insert(Arc::new(key));
                }
            },
            Err(why) => tracing::debug!(kid, why, "JWKS key skipped"),
        }
    }
    Ok(set)
}

/// The key and its algorithms, or why it cannot verify tokens here.
fn usable(jwk: &Jwk) -> Result<JwkKey, &'static str> {
    if !matches!(
        jwk.common.public_key_use,
        None | Some(PublicKeyUse::Signature)
    ) {
        return Err("use is not sig");
    }
    let declared = jwk.common.key_algorithm;
    let algorithms = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => match declared {
            None => vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
            Some(KeyAlgorithm::RS256) => vec![Algorithm::RS256],
            Some(KeyAlgorithm::RS384) => vec![Algorithm::RS384],
            Some(KeyAlgorithm::RS512) => vec![Algorithm::RS512],
            Some(KeyAlgorithm::PS256) => vec![Algorithm::PS256],
            Some(KeyAlgorithm::PS384) => vec![Algorithm::PS384],
            Some(KeyAlgorithm::PS512) => vec![Algorithm::PS512],
            Some(_) => return Err("RSA key for another algorithm"),
        },
        AlgorithmParameters::EllipticCurve(ec) => match (&ec.curve, declared) {
            (EllipticCurve::P256, None | Some(KeyAlgorithm::ES256)) => vec![Algorithm::ES256],
            (EllipticCurve::P384, None | Some(KeyAlgorithm::ES384)) => vec![Algorithm::ES384],
            (EllipticCurve::P256 | EllipticCurve::P384, Some(_)) => {
                return Err("EC key whose alg does not match its curve");
            }
            _ => return Err("EC curve not supported (P-256 and P-384 are)"),
        },
        AlgorithmParameters::OctetKeyPair(okp) => {
            if okp.curve != EllipticCurve::Ed25519 {
                return Err("OKP curve not supported (Ed25519 is)");
            }
            match declared {
                None | Some(KeyAlgorithm::EdDSA) => vec![Algorithm::EdDSA],
                Some(_) => return Err("OKP key whose alg is not EdDSA"),
            }
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (oct) key: HMAC secrets are never taken from a URL");
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "key parameters do not decode")?;
    Ok(JwkKey { key, algorithms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_keys_and_skipped_ones() {
        let body = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/jwks.json"))
            .unwrap_or_default();
        let set = parse_set(&body).unwrap_or_default();
        let algs = |kid: &str| set.get(kid).map(|k| k.algorithms.clone());
        assert_eq!(
            algs("rsa-1"),
            Some(vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512])
        );
        assert_eq!(algs("ec-1"), Some(vec![Algorithm::ES256]));
        assert_eq!(algs("ed-1"), Some(vec![Algorithm::EdDSA]));

        let mixed = serde_json::json!({"keys": [
            {"kid": "oct", "kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"},
            {"kid": "enc", "kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kid": "oaep", "kty": "RSA", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
            {"kid": "p521", "kty": "EC", "crv": "P-521", "x": "AQAB", "y": "AQAB"},
            {"kid": "x25519", "kty": "OKP", "crv": "X25519", "x": "AQAB"},
            {"kid": "weird", "kty": "future-kind"},
            {"kid": "es-mismatch", "kty": "EC", "crv": "P-256", "alg": "ES384", "x": "AQAB", "y": "AQAB"},
            {"kid": "ps", "kty": "RSA", "alg": "PS256", "n": "AQAB", "e": "AQAB"},
            {"kid": "ps", "kty": "RSA", "alg": "RS256", "n": "AQAB", "e": "AQAB"},
            "not even an object"
        ]});
        let set = parse_set(mixed.to_string().as_bytes()).unwrap_or_default();
        let kids: Vec<&str> = set.keys().map(String::as_str).collect();
        assert_eq!(kids, vec!["ps"], "{set:?}");
        assert_eq!(set["ps"].algorithms, vec![Algorithm::PS256]);

        for bad in ["", "[]", "{}", "{\"keys\": 1}", "null"] {
            assert!(parse_set(bad.as_bytes()).is_err(), "{bad}");
        }
        let too_many: Vec<_> = (0..MAX_KEYS + 10)
            .map(|i| serde_json::json!({"kid": i.to_string(), "kty": "RSA", "n": "AQAB", "e": "AQAB"}))
            .collect();
        let set = parse_set(
            serde_json::json!({ "keys": too_many })
                .to_string()
                .as_bytes(),
        )
        .unwrap_or_default();
        assert_eq!(set.len(), MAX_KEYS);
    }
}
