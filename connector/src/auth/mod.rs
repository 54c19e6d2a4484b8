//! Authentication: who a connection is, and what it may do on a channel.
//!
//! - [`verifier`]: JWT verification with the configured keys (HMAC, RSA, EC, or a JWKS URL), the
//!   algorithm allow-list derived from them, `exp` / `nbf` / `aud` / `iss`.
//! - [`jwks`]: the JWKS cache: fetched at start-up and periodically, refetched for an unknown `kid` at
//!   a bounded rate.
//! - [`permissions`]: channel permissions from `channels[]` in the configuration.
//! - This module: the Centrifugo token claims and what each token problem becomes on the wire
//!   (`reference/centrifugo-protocol.md` §5.2): an expired connection token is error 109 on `connect`
//!   (the SDK fetches a new token and reconnects), an invalid one closes with 3500; an expired
//!   subscription token is error 109, an invalid one error 103, one for another channel, user or
//!   connection closes with 3500. When the key of a token cannot be had because the JWKS cannot be
//!   fetched, the command gets error 100 (temporary: the SDK retries).
//!
//! Claims as Centrifugo defines them: `sub` (the user; empty = anonymous), `exp`, `expire_at`
//! (connection expiry decoupled from `exp`; 0 = never), `nbf`, `aud`, `iss`, `info` (→ `conn_info` /
//! `chan_info`). A `channel` claim in a connection token makes it invalid (it is a subscription
//! token). `channels` and `subs` (server-side subscriptions) are accepted and ignored: this server does
//! not subscribe connections server-side, the client subscribes itself. `b64info`, `meta` and
//! `override` are ignored too.

pub mod jwks;
pub mod permissions;
pub mod verifier;

use std::sync::Arc;

use relay_protocol::Disconnect;
use serde::Deserialize;
use serde_json::value::RawValue;

pub use permissions::{Access, ChannelRule, Level, Op};
pub use verifier::{AuthConfig, TokenError, Verifier};

/// The authenticated identity of a connection.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The user id ("" for anonymous connections).
    pub user: String,
    /// Connection info from the token's `info` claim.
    pub conn_info: Option<Arc<RawValue>>,
    /// The token's other claims, for claim-based channel permissions.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// When the connection expires (Unix seconds), if the token says so.
    pub expires_at: Option<u64>,
}

/// Centrifugo token claims, connection and subscription tokens alike.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    expire_at: Option<u64>,
    #[serde(default)]
    info: Option<serde_json::Value>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    client: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// Expiry: `expire_at` when present (0 = never), else `exp`.
    fn expires_at(&self) -> Option<u64> {
        match self.expire_at {
            Some(0) => None,
            Some(at) => Some(at),
            None => self.exp,
        }
    }

    fn info(&self) -> Option<Arc<RawValue>> {
        let info = self.info.as_ref()?;
        RawValue::from_string(info.to_string()).ok().map(Arc::from)
    }
}

/// Why a `connect` or `refresh` was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The token expired: error 109 on connect (the SDK gets a new token), close 3005 on refresh.
    Expired,
    /// Close the connection.
    Disconnect(Disconnect),
    /// The token's key could not be had (JWKS unreachable): error 100, temporary.
    Unavailable,
}

/// 3501 with a reason that says what is missing.
pub const TOKEN_REQUIRED: Disconnect = Disconnect {
    code: 3501,
    reason: "token required",
};

/// 3005: a connection whose token expired and was not refreshed in time (the SDK reconnects with a
/// new token).
pub const CONNECTION_EXPIRED: Disconnect = Disconnect {
    code: 3005,
    reason: "connection expired",
};

/// Decides whether a `connect` with `token` is accepted, and as whom; `allow_anonymous`
/// (`client.allow_anonymous`) admits connections without a token or without a user.
pub async fn connect(
    allow_anonymous: bool,
    verifier: &Verifier,
    token: &str,
) -> Result<Identity, ConnectError> {
    if token.is_empty() {
        return if allow_anonymous {
            Ok(Identity::default())
        } else {
            Err(ConnectError::Disconnect(TOKEN_REQUIRED))
        };
    }
    let claims = verify_connection(verifier, token).await?;
    if claims.sub.is_empty() && !allow_anonymous {
        return Err(ConnectError::Disconnect(Disconnect::PERMISSION_DENIED));
    }
    if claims.rest.contains_key("channels") || claims.rest.contains_key("subs") {
        tracing::debug!(
            "token claims channels/subs ignored: server-side subscriptions are not supported"
        );
    }
    Ok(Identity {
        conn_info: claims.info(),
        expires_at: claims.expires_at(),
        user: claims.sub,
        claims: claims.rest,
    })
}

/// Verifies the token of a `refresh` for a connection of `user`: the new expiry.
pub async fn refresh(
    verifier: &Verifier,
    user: &str,
    token: &str,
) -> Result<Option<u64>, ConnectError> {
    if token.is_empty() {
        return Err(ConnectError::Disconnect(TOKEN_REQUIRED));
    }
    let claims = verify_connection(verifier, token).await?;
    if claims.sub != user {
        tracing::debug!("refresh token for another user");
        return Err(ConnectError::Disconnect(Disconnect::INVALID_TOKEN));
    }
    Ok(claims.expires_at())
}

async fn verify_connection(verifier: &Verifier, token: &str) -> Result<Claims, ConnectError> {
    let claims: Claims = verifier.verify(token).await.map_err(|e| match e {
        TokenError::Expired => ConnectError::Expired,
        TokenError::Unavailable => ConnectError::Unavailable,
        TokenError::Invalid(why) => {
            tracing::debug!(why, "invalid connection token");
            ConnectError::Disconnect(Disconnect::INVALID_TOKEN)
        }
    })?;
    if claims.channel.is_some() {
        tracing::debug!("connection token with a channel claim (a subscription token)");
        return Err(ConnectError::Disconnect(Disconnect::INVALID_TOKEN));
    }
    Ok(claims)
}

/// What a valid subscription token grants.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionGrant {
    /// Channel info from the token's `info` claim.
    pub chan_info: Option<Arc<RawValue>>,
    /// When the subscription expires (Unix seconds), if the token says so.
    pub expires_at: Option<u64>,
}

/// Why a subscription token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubscriptionError {
    /// Expired: error 109 (the SDK fetches a new token and resubscribes).
    Expired,
    /// Invalid: error 103.
    Invalid,
    /// For another channel, user or connection: close 3500.
    Mismatch,
    /// The token's key could not be had (JWKS unreachable): error 100, temporary.
    Unavailable,
}

/// Verifies a subscription token for `channel`, presented by connection `client` of `user`.
pub async fn subscription(
    verifier: &Verifier,
    token: &str,
    channel: &str,
    user: &str,
    client: &str,
) -> Result<SubscriptionGrant, SubscriptionError> {
    let claims: Claims = verifier.verify(token).await.map_err(|e| match e {
        TokenError::Expired => SubscriptionError::Expired,
        TokenError::Unavailable => SubscriptionError::Unavailable,
        TokenError::Invalid(why) => {
            tracing::debug!(why, channel, "invalid subscription token");
            SubscriptionError::Invalid
        }
    })?;
    let Some(token_channel) = &claims.channel else {
        tracing::debug!(channel, "subscription token without a channel claim");
        return Err(SubscriptionError::Invalid);
    };
    if token_channel != channel
        || claims.sub != user
        || claims.client.as_deref().is_some_and(|c| c != client)
    {
        tracing::debug!(
            channel,
            "subscription token for another channel, user or connection"
        );
        return Err(SubscriptionError::Mismatch);
    }
    Ok(SubscriptionGrant {
        chan_info: claims.info(),
        expires_at: claims.expires_at(),
    })
}
