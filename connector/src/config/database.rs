//! `database` and `stream`: where the connector's PostgreSQL is, and how the change stream reads it.
//! URLs are checked by parsing them as [`PgConnectOptions`] (what the pool connects with), not by
//! their prefix.

use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::PgConnectOptions;

use super::duration;
use super::{check_range, invalid};
use crate::error::ConfigError;

/// Database settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connection URL for queries (may go through a pooler in session or transaction mode).
    pub url: String,
    /// Direct connection URL for LISTEN (never through a transaction-mode pooler); default `url`.
    #[serde(default)]
    pub listen_url: Option<String>,
    /// Query pool size (default 10).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// How long to wait for a connection (key `connect_timeout_secs`, default 5 s).
    #[serde(
        rename = "connect_timeout_secs",
        alias = "connect_timeout",
        default = "default_connect_timeout",
        deserialize_with = "duration::secs"
    )]
    pub connect_timeout: Duration,
}

fn default_pool_size() -> u32 {
    10
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl DatabaseConfig {
    /// The options the query pool connects with (from `url`).
    pub fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        pg_options("database.url", &self.url)
    }

    /// The URL of the LISTEN connection: `listen_url`, else `url`.
    pub fn listen_url(&self) -> &str {
        self.listen_url.as_deref().unwrap_or(&self.url)
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url("database.url", &self.url)?;
        if let Some(url) = &self.listen_url {
            check_url("database.listen_url", url)?;
        }
        check_range("database.pool_size", self.pool_size.into(), 1, 1000)?;
        duration::check(
            "database.connect_timeout_secs",
            self.connect_timeout,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )
    }
}

/// Checks a PostgreSQL URL: the scheme, and that it parses as connect options.
pub(crate) fn check_url(field: &str, url: &str) -> Result<(), ConfigError> {
    pg_options(field, url).map(drop)
}

fn pg_options(field: &str, url: &str) -> Result<PgConnectOptions, ConfigError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(
            field,
            "must be a PostgreSQL URL starting with postgres:// or postgresql://",
        ));
    }
    // The parser's message may quote the URL; never show a password.
    PgConnectOptions::from_str(url).map_err(|_| {
        invalid(
            field,
            "is not a valid PostgreSQL URL (postgres://user:password@host:port/database?sslmode=...)",
        )
    })
}

/// Change-stream settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Safety-net poll interval (key `poll_interval_ms`, default 250 ms): bounds the delay when a
    /// NOTIFY is lost.
    #[serde(
        rename = "poll_interval_ms",
        alias = "poll_interval",
        deserialize_with = "duration::millis"
    )]
    pub poll_interval: Duration,
    /// Changes moved or read per query (default 1000).
    pub batch_size: u32,
    /// The sequencer's poll interval while changes flow (key `active_poll_ms`, default 2 ms).
    /// Writers do not NOTIFY while the sequencer polls, so this bounds the delay a change waits to
    /// be sequenced.
    #[serde(
        rename = "active_poll_ms",
        alias = "active_poll",
        deserialize_with = "duration::millis"
    )]
    pub active_poll: Duration,
    /// Time between checks that this node's capture triggers are still in place as it installed
    /// them (key `capture_check_secs`, default 5 s; also the period of its entry in the
    /// capture-owner registry, which lives 3× this, at least 15 s). A node whose capture was
    /// changed is not ready until it is back.
    #[serde(
        rename = "capture_check_secs",
        alias = "capture_check",
        deserialize_with = "duration::secs"
    )]
    pub capture_check: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(250),
            batch_size: 1000,
            active_poll: Duration::from_millis(2),
            capture_check: Duration::from_secs(5),
        }
    }
}

impl StreamConfig {
    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ms = Duration::from_millis;
        duration::check(
            "stream.poll_interval_ms",
            self.poll_interval,
            ms(10),
            ms(60_000),
        )?;
        duration::check("stream.active_poll_ms", self.active_poll, ms(1), ms(1_000))?;
        duration::check(
            "stream.capture_check_secs",
            self.capture_check,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        check_range("stream.batch_size", self.batch_size.into(), 1, 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_as_connect_options() {
        assert!(check_url("f", "postgres://u@h:5432/db?sslmode=require").is_ok());
        let e = check_url("f", "mysql://x").unwrap_err();
        assert!(e.problem.contains("postgres://"), "{e}");
        let e = check_url("f", "postgres://u:secret@h:notaport/db").unwrap_err();
        assert!(!e.problem.contains("secret"), "{e}");
        assert!(check_url("f", "postgres://u@h/db?sslmode=sometimes").is_err());
    }
}
