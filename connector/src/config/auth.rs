//! `auth`: the keys tokens are verified with, loaded and checked here ([`AuthConfig::keys`],
//! [`AuthConfig::jwks_url`]) so that a bad key stops `connector check` and start-up alike.
//! [`crate::auth::Verifier`] is built from what these return.

use std::path::Path;

use jsonwebtoken::DecodingKey;
use serde::Deserialize;

use crate::error::ConfigError;

/// The `auth` section of the configuration: the keys tokens are verified with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC secret for HS256/HS384/HS512 tokens; also what `connector token` mints with. Prefer the
    /// environment (`RELAY__AUTH__HMAC_SECRET_KEY`) to the file.
    pub hmac_secret_key: Option<String>,
    /// RSA public key for RS256/RS384/RS512: PEM text, or the path of a PEM file.
    pub rsa_public_key: Option<String>,
    /// EC public key (P-256 or P-384) for ES256/ES384: PEM text, or the path of a PEM file.
    pub ecdsa_public_key: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (default 0).
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub leeway_secs: u64,
    /// Seconds after a connection or subscription token expired before the connection is closed
    /// (3005) or the subscription ended (2501), giving the SDK time to `refresh` (default 25).
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub expired_close_delay_secs: u64,
    /// A JWKS URL (http or https). When set, its keys are the only ones used: tokens must carry a
    /// `kid` of the set, and the static keys above must not be configured.
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again, in seconds (default 3600).
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub jwks_refresh_secs: u64,
    /// A token with an unknown `kid` makes the connector fetch the JWKS again, at most once per this
    /// many seconds (default 30).
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub jwks_min_refetch_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hmac_secret_key: None,
            rsa_public_key: None,
            ecdsa_public_key: None,
            audience: None,
            issuer: None,
            leeway_secs: 0,
            expired_close_delay_secs: 25,
            jwks_url: None,
            jwks_refresh_secs: 3600,
            jwks_min_refetch_secs: 30,
        }
    }
}

/// The static keys of the `auth` section, loaded.
#[derive(Clone, Default)]
pub struct AuthKeys {
    /// From `hmac_secret_key`.
    pub hmac: Option<DecodingKey>,
    /// From `rsa_public_key`.
    pub rsa: Option<DecodingKey>,
    /// From `ecdsa_public_key`.
    pub ec: Option<DecodingKey>,
}

impl AuthConfig {
    /// Checks the section: the keys load, and the JWKS settings hold together.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.jwks_url()?;
        self.keys().map(drop)
    }

    /// Loads the static keys (PEM text or files).
    pub fn keys(&self) -> Result<AuthKeys, ConfigError> {
        let hmac = match self.hmac_secret_key.as_deref() {
            Some("") => {
                return Err(ConfigError::new(
                    "auth.hmac_secret_key",
                    "must not be empty (omit it to disable HMAC tokens)",
                ));
            }
            Some(s) if s.len() < 32 => {
                return Err(ConfigError::new(
                    "auth.hmac_secret_key",
                    "must be at least 32 bytes (256 bits)",
                ));
            }
            Some(s) => Some(DecodingKey::from_secret(s.as_bytes())),
            None => None,
        };
        let rsa = load_pem(
            "auth.rsa_public_key",
            self.rsa_public_key.as_deref(),
            DecodingKey::from_rsa_pem,
        )?;
        let ec = load_pem(
            "auth.ecdsa_public_key",
            self.ecdsa_public_key.as_deref(),
            DecodingKey::from_ec_pem,
        )?;
        Ok(AuthKeys { hmac, rsa, ec })
    }

    /// The JWKS URL, checked (http or https with a host; the static keys unset), when configured.
    pub fn jwks_url(&self) -> Result<Option<reqwest::Url>, ConfigError> {
        if self.jwks_refresh_secs == 0 {
            return Err(ConfigError::new(
                "auth.jwks_refresh_secs",
                "must be at least 1",
            ));
        }
        if self.jwks_min_refetch_secs == 0 {
            return Err(ConfigError::new(
                "auth.jwks_min_refetch_secs",
                "must be at least 1",
            ));
        }
        let Some(url) = self.jwks_url.as_deref() else {
            return Ok(None);
        };
        if self.hmac_secret_key.is_some()
            || self.rsa_public_key.is_some()
            || self.ecdsa_public_key.is_some()
        {
            return Err(ConfigError::new(
                "auth.jwks_url",
                "JWKS keys are used exclusively: remove hmac_secret_key, rsa_public_key and \
                 ecdsa_public_key (or jwks_url)",
            ));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| ConfigError::new("auth.jwks_url", format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(ConfigError::new(
                "auth.jwks_url",
                "must be an http:// or https:// URL with a host",
            ));
        }
        Ok(Some(parsed))
    }
}

fn load_pem(
    field: &str,
    value: Option<&str>,
    parse: impl Fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>,
) -> Result<Option<DecodingKey>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let pem = if value.trim_start().starts_with("-----BEGIN") {
        value.as_bytes().to_vec()
    } else {
        read_pem_file(Path::new(value))
            .map_err(|e| ConfigError::new(field, format!("cannot read PEM file {value:?}: {e}")))?
    };
    parse(&pem)
        .map(Some)
        .map_err(|e| ConfigError::new(field, format!("not a usable public key in PEM: {e}")))
}

/// The largest PEM file read (a public key is a few KiB at most).
const MAX_PEM_BYTES: u64 = 64 * 1024;

/// Reads a PEM file: a regular file (not a FIFO or a device such as `/dev/zero`), at most
/// [`MAX_PEM_BYTES`].
fn read_pem_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // Before opening: opening a FIFO would block.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let file = std::fs::File::open(path)?;
    let mut pem = Vec::new();
    file.take(MAX_PEM_BYTES + 1).read_to_end(&mut pem)?;
    if pem.len() as u64 > MAX_PEM_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_PEM_BYTES} bytes"
        )));
    }
    Ok(pem)
}
