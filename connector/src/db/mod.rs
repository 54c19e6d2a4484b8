//! Everything that talks to PostgreSQL: the query pool and migrations, the generated capture
//! triggers, the LISTEN connection, the change stream (wake-ups + gapless reads) and the history
//! queries.
//!
//! - [`triggers`]: capture triggers generated from the mappings.
//! - [`stream`]: the task that sequences the changelog and reads new publications for the hub.
//! - [`history`]: stream positions, history and recovery reads, client publications.
//! - [`fence`]: read-your-writes, the wait for a write's publication to be sequenced.
//! - [`listener`]: the node's one LISTEN connection, handing typed events to the stream and to
//!   presence. It uses tokio-postgres, the driver the project chose for LISTEN (sqlx is the
//!   query pool's); [`listener`] and [`tls`] are the only modules that use it.
//! - [`tls`]: the LISTEN connection's TLS, reading the URL's `sslmode` and `sslrootcert` as libpq
//!   and the pool do (tokio-postgres knows neither `verify-*` nor `sslrootcert`), so one URL
//!   configures both connections.
//! - [`retention`]: the pruning task that keeps each channel's history within its retention rule.

pub mod fence;
pub mod history;
pub(crate) mod listener;
pub mod retention;
pub mod stream;
mod tls;
pub mod triggers;

use std::str::FromStr as _;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::DatabaseConfig;
use crate::error::Result;

/// The migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The `application_name` of the connector's PostgreSQL sessions (unless the URL sets one), so
/// `pg_stat_activity` shows who they are.
pub const APPLICATION_NAME: &str = "pg-relay connector";

/// The connection options of `url`, with [`APPLICATION_NAME`] unless the URL names one.
pub fn connect_options(url: &str) -> Result<PgConnectOptions> {
    Ok(named(PgConnectOptions::from_str(url)?))
}

/// `options` with [`APPLICATION_NAME`] unless they name one.
pub(crate) fn named(options: PgConnectOptions) -> PgConnectOptions {
    if options.get_application_name().is_some() {
        options
    } else {
        options.application_name(APPLICATION_NAME)
    }
}

/// `host:port/database` of `url`, for messages (never the password).
pub fn describe(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or(o.get_username())
        ),
        Err(_) => "an unparsable database URL".to_owned(),
    }
}

/// The database `url` names (PostgreSQL's default: the user's name).
pub fn database_name(url: &str) -> Result<String> {
    let o = PgConnectOptions::from_str(url)?;
    Ok(o.get_database().unwrap_or(o.get_username()).to_owned())
}

/// An error and its sources, each named once (tokio-postgres says only `db error` and keeps the
/// server's message in its source; sqlx repeats its sources in its own text).
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Builds the query pool (connections are opened lazily, so start-up does not fail on a slow database).
pub fn pool(config: &DatabaseConfig) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(config.connect_timeout)
        .connect_lazy_with(named(config.connect_options()?));
    Ok(pool)
}

/// Opens one connection within `timeout` and closes it: the real cause (refused, unknown host,
/// authentication, missing database) where a pool would only say that it timed out.
pub async fn probe(url: &str, timeout: Duration) -> Result<()> {
    use sqlx::Connection as _;
    let options = connect_options(url)?;
    match tokio::time::timeout(timeout, sqlx::PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(crate::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {} s", timeout.as_secs()),
        ))),
    }
}

/// Applies the migrations.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("db error")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_text_names_each_cause_once() {
        let e = Outer(std::io::Error::other("FATAL: terminating connection"));
        assert_eq!(
            super::error_text(&e),
            "db error: FATAL: terminating connection"
        );
        let repeated = anyhow::anyhow!("x: inner").context("outer: x: inner");
        assert_eq!(super::error_text(repeated.as_ref()), "outer: x: inner");
        assert!(super::describe("postgres://u:secret@h:6543/db").ends_with("h:6543/db"));
        assert!(!super::describe("postgres://u:secret@h:6543/db").contains("secret"));
        assert_eq!(
            super::database_name("postgres://postgres@h/").unwrap(),
            "postgres"
        );
    }
}
