//! Errors of the connector library.

use thiserror::Error;

/// A configuration that cannot be loaded or is invalid: the field, as a path (`mappings[0].table`;
/// empty when the file as a whole could not be read), and the problem, which names the valid values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, as a path (`mappings[0].table`); empty when no single field is at fault.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A problem with the file as a whole (missing, not JSON).
    pub fn load(problem: impl std::fmt::Display) -> Self {
        Self::new("", problem.to_string())
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "config: {}", self.problem)
        } else {
            write!(f, "config: {}: {}", self.field, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

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
    /// One of the node's long-lived tasks panicked, and the node shut down (see `tasks`).
    #[error("the {task} task panicked: {panic}")]
    TaskPanicked {
        /// The task's name (`cluster`, `stream`, ...).
        task: &'static str,
        /// The panic's message.
        panic: String,
    },
}

/// Result with the connector's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
