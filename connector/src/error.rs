//! Errors of the connector library.

use thiserror::Error;

/// A configuration that cannot be loaded or is invalid; the message names the field and the problem.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read or parsed (missing file, bad JSON, wrong type, unknown field).
    #[error("config: {0}")]
    Load(String),
    /// A field has a value the connector cannot run with.
    #[error("config: {field}: {problem}")]
    Invalid {
        /// The field, as a path (`mappings[0].table`).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Errors of the connector.
#[derive(Debug, Error)]
pub enum Error {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A database error.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A mapping does not match the database (missing table or column).
    #[error("mapping {index} ({table}): {problem}")]
    Mapping {
        /// Index in `mappings`.
        index: usize,
        /// `schema.table`.
        table: String,
        /// What is wrong.
        problem: String,
    },
    /// The capture mode cannot run against this database (for `wal`: `wal_level` is not `logical`).
    #[error("capture: {0}")]
    Capture(String),
    /// An I/O error (binding the listener, ...).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Result with the connector's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
