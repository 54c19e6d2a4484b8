//! The writer's error type: what makes an invocation fail as a whole.
//!
//! Problems with a single message (bad data, an edit by someone other than the author) are not errors:
//! they are reported per message in the result (see [`crate::handler::Status`]), because retrying the
//! invocation cannot change them. An [`Error`] is returned only when the whole invocation must fail: the
//! envelope itself is malformed, or the database failed. Each variant says whether a retry can help
//! ([`Error::retryable`]) and carries a stable [`Error::error_type`], which becomes the `errorType` of the
//! Lambda function error.
//!
//! Messages never contain the `DATABASE_URL` or its password: sqlx errors describe the failure, not the
//! connection string, and configuration errors name the variable, not its value.

/// Result type of the writer, with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an invocation (or the start of the writer) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event is not a valid envelope (not an object, no `messages` array, too many messages, ...).
    /// Not retryable: the same event fails the same way.
    #[error("invalid event: {0} (not retryable: the same event will fail again)")]
    InvalidEvent(String),

    /// The database failed while a message was being applied. Retryable: that message's transaction was
    /// rolled back, the messages before it were committed and a retry reports them as duplicates.
    #[error(
        "database error while applying message {message_id:?} (retryable: the message was rolled back, \
         earlier messages of the event are committed and will be reported as duplicates on retry)"
    )]
    Database {
        /// Id of the message whose transaction failed.
        message_id: String,
        /// The underlying sqlx error.
        #[source]
        source: sqlx::Error,
    },

    /// The writer's configuration (environment variables) is invalid. Only raised at start-up.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether retrying the same invocation can succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, Error::Database { .. })
    }

    /// A stable name for the kind of error: the `errorType` of the Lambda function error.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::InvalidEvent(_) => "InvalidEvent",
            Error::Database { .. } => "DatabaseError",
            Error::Config(_) => "ConfigError",
        }
    }

    /// The error and its chain of causes on one line (`outer: cause: cause`): the `errorMessage` of the
    /// Lambda function error and what the writer logs.
    pub fn message_chain(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // sqlx's outer errors often end with their cause's text already: don't repeat it.
            if !message.ends_with(&cause_text) {
                message.push_str(": ");
                message.push_str(&cause_text);
            }
            source = cause.source();
        }
        message
    }
}

impl From<Error> for lambda_runtime::Diagnostic {
    fn from(error: Error) -> Self {
        lambda_runtime::Diagnostic {
            error_type: error.error_type().to_owned(),
            error_message: error.message_chain(),
        }
    }
}
