//! `api`: the HTTP server API (`/api`), off without a key. Used by [`crate::api`].

use serde::Deserialize;

use crate::error::ConfigError;

/// The `api` section of the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The key backends present (`X-API-Key` or `Authorization: apikey …`); unset = API off. Prefer
    /// the environment (`RELAY__API__KEY`) to the file.
    #[serde(default)]
    pub key: Option<String>,
}

impl ApiConfig {
    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.key {
            Some(k) if k.len() < 16 || k.chars().any(char::is_whitespace) => Err(ConfigError::new(
                "api.key",
                "must be at least 16 characters without spaces (or unset: API off)",
            )),
            _ => Ok(()),
        }
    }
}
