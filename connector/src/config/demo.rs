//! `demo`: the demo token endpoint (off by default; never in production). Used by [`crate::demo`].

use serde::Deserialize;

/// Settings of the demo token endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// Serve `POST /demo/token` (default false; never in production).
    #[serde(default)]
    pub token_endpoint: bool,
    /// Lifetime of the tokens it mints, in seconds (default 3600).
    #[serde(default, deserialize_with = "super::duration::opt_whole_secs")]
    pub token_ttl_secs: Option<u64>,
}

impl DemoConfig {
    /// The tokens' lifetime.
    pub fn ttl(&self) -> u64 {
        self.token_ttl_secs.unwrap_or(3600)
    }
}
