//! Connection authentication: who a connection is.
//!
//! This release accepts anonymous connections when `client.allow_anonymous` is set and refuses the
//! rest; JWT verification (HMAC, RSA, EC, JWKS) plugs in here without changing the session.

use relay_protocol::Disconnect;
use relay_protocol::command::ConnectRequest;

use crate::config::Config;

/// The authenticated identity of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The user id ("" for anonymous connections).
    pub user: String,
}

/// Decides whether a `connect` is accepted, and as whom.
pub fn authenticate(config: &Config, _request: &ConnectRequest) -> Result<Identity, Disconnect> {
    if config.client.allow_anonymous {
        Ok(Identity::default())
    } else {
        Err(Disconnect::PERMISSION_DENIED)
    }
}
