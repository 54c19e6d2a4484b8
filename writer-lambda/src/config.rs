//! Configuration from environment variables, read once at start-up, and the database pool built from it.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/postgres` | the database the writer writes to |
//! | `WRITER_DB_MAX_CONNECTIONS` | `4` | size of the pool (a Lambda instance runs one invocation at a time) |
//! | `WRITER_DB_ACQUIRE_TIMEOUT_MS` | `3000` | how long an invocation waits for a connection (incl. connecting) |
//! | `WRITER_LISTEN` | `127.0.0.1:9000` | local mode only: address of the invoke server (loopback unless told) |
//! | `PORT` | | local mode only: used as `127.0.0.1:$PORT` when `WRITER_LISTEN` is not set |
//! | `WRITER_SECRET` | | local mode: the secret invocations are signed with ([`crate::auth`]); required unless `--insecure-no-auth` |
//!
//! The URL and the secret are secrets, so [`Config`]'s `Debug` hides them and
//! [`Config::database_description`] is what gets logged.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::auth::Secret;
use crate::error::{Error, Result};

/// `DATABASE_URL` when the variable is not set: the local PostgreSQL of a development machine.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Default size of the connection pool.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;
/// Default time an invocation waits for a database connection, connecting included.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_millis(3000);
/// Default address of the local invoke server: loopback, reachable only from this machine.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9000";

/// The writer's configuration.
#[derive(Clone)]
pub struct Config {
    /// Connection string of the database (contains the password: never log it).
    pub database_url: String,
    /// Maximum number of pooled connections.
    pub max_connections: u32,
    /// How long to wait for a pooled connection (connecting included) before the invocation fails.
    pub acquire_timeout: Duration,
    /// Local mode: the address the invoke server listens on.
    pub listen: SocketAddr,
    /// Local mode: the secret every invocation must be signed with (`WRITER_SECRET`).
    pub secret: Option<Secret>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database", &self.database_description())
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("listen", &self.listen)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (a variable name to its value), so tests need not touch
    /// the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let database_url = lookup("DATABASE_URL")
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        // Validate now, without echoing the URL (it may hold a password).
        parse_database_url(&database_url)?;

        let max_connections = match lookup("WRITER_DB_MAX_CONNECTIONS") {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(value) => value
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "WRITER_DB_MAX_CONNECTIONS must be an integer from 1 to 1000, got {value:?}"
                    ))
                })?,
        };

        let acquire_timeout = match lookup("WRITER_DB_ACQUIRE_TIMEOUT_MS") {
            None => DEFAULT_ACQUIRE_TIMEOUT,
            Some(value) => value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "WRITER_DB_ACQUIRE_TIMEOUT_MS must be a positive integer, got {value:?}"
                    ))
                })?,
        };

        let listen = match (lookup("WRITER_LISTEN"), lookup("PORT")) {
            (Some(addr), _) => addr.trim().parse::<SocketAddr>().map_err(|_| {
                Error::Config(format!(
                    "WRITER_LISTEN must be an address such as 127.0.0.1:9000, got {addr:?}"
                ))
            })?,
            (None, Some(port)) => {
                let port = port.trim().parse::<u16>().map_err(|_| {
                    Error::Config(format!("PORT must be a port number, got {port:?}"))
                })?;
                SocketAddr::from(([127, 0, 0, 1], port))
            }
            (None, None) => DEFAULT_LISTEN
                .parse()
                .map_err(|_| Error::Config("bad default listen address".to_owned()))?,
        };

        let secret = match lookup("WRITER_SECRET").filter(|s| !s.is_empty()) {
            None => None,
            Some(secret) => Some(Secret::new(&secret).map_err(Error::Config)?),
        };

        Ok(Config {
            database_url,
            max_connections,
            acquire_timeout,
            listen,
            secret,
        })
    }

    /// The database as `postgres://user@host:port/database`, without the password: safe to log.
    pub fn database_description(&self) -> String {
        match parse_database_url(&self.database_url) {
            Ok(options) => format!(
                "postgres://{}@{}:{}/{}",
                options.get_username(),
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or(options.get_username()),
            ),
            Err(_) => "<invalid DATABASE_URL>".to_owned(),
        }
    }

    /// Builds the pool. It connects lazily: building never blocks or fails on an unreachable database;
    /// an invocation that cannot get a connection within the acquire timeout fails with a retryable
    /// [`Error::Database`]. Build it once per process, before serving.
    pub fn pool(&self) -> Result<PgPool> {
        let options = parse_database_url(&self.database_url)?;
        Ok(PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(0)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy_with(options))
    }
}

/// Parses a `postgres://` (or `postgresql://`) URL. The error never contains the URL.
fn parse_database_url(url: &str) -> Result<PgConnectOptions> {
    let invalid =
        || Error::Config("DATABASE_URL is not a valid postgres:// connection URL".to_owned());
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid());
    }
    PgConnectOptions::from_str(url).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults() {
        let config = config(&[]).expect("defaults are valid");
        assert_eq!(config.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(config.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.acquire_timeout, DEFAULT_ACQUIRE_TIMEOUT);
        assert_eq!(config.listen, "127.0.0.1:9000".parse().expect("address"));
        assert!(config.secret.is_none());
    }

    #[test]
    fn the_secret_is_checked_and_never_shown() {
        let c = config(&[("WRITER_SECRET", "0123456789abcdef0123456789abcdef")]).expect("valid");
        assert!(c.secret.is_some());
        assert!(!format!("{c:?}").contains("0123456789"));
        let err = config(&[("WRITER_SECRET", "too-short-s3cr3t")]).expect_err("short");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn listen_from_writer_listen_or_port() {
        let c = config(&[("PORT", "8081")]).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:8081".parse().expect("address"));
        let c = config(&[("PORT", "8081"), ("WRITER_LISTEN", "127.0.0.1:7000")]).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:7000".parse().expect("address"));
        assert!(config(&[("PORT", "x")]).is_err());
        assert!(config(&[("WRITER_LISTEN", "nowhere")]).is_err());
    }

    #[test]
    fn bad_numbers_are_rejected() {
        assert!(config(&[("WRITER_DB_MAX_CONNECTIONS", "0")]).is_err());
        assert!(config(&[("WRITER_DB_ACQUIRE_TIMEOUT_MS", "-5")]).is_err());
        let c = config(&[
            ("WRITER_DB_MAX_CONNECTIONS", "2"),
            ("WRITER_DB_ACQUIRE_TIMEOUT_MS", "250"),
        ])
        .expect("valid");
        assert_eq!(c.max_connections, 2);
        assert_eq!(c.acquire_timeout, Duration::from_millis(250));
    }

    #[test]
    fn the_password_is_never_shown() {
        let c = config(&[("DATABASE_URL", "postgres://app:s3cr3t@db.example:6543/chat")])
            .expect("valid");
        assert_eq!(
            c.database_description(),
            "postgres://app@db.example:6543/chat"
        );
        assert!(!format!("{c:?}").contains("s3cr3t"));

        let err = config(&[("DATABASE_URL", "mysql://app:s3cr3t@x/y")]).expect_err("invalid");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }
}
