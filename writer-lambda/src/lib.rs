//! The writer: an AWS Lambda that turns published chat events into rows of `chat_data`.
//!
//! A client publishes `chatMsg` / `editedMsg` on a channel bound to the writer; the connector (or Ably's
//! reactor, in the seed's architecture) invokes the writer with an Ably-style envelope of messages. The
//! writer inserts new messages and applies edits by their author, each message exactly once however
//! often the event is retried or replayed. It never runs migrations: the connector owns the schema.
//!
//! One binary, two modes: with `AWS_LAMBDA_RUNTIME_API` set it runs under `lambda_runtime`
//! ([`lambda::run`]); without it, it serves the Lambda Invoke API locally ([`local::serve`]). Both build
//! the database pool once, before serving, and call the same [`handler::handle`].
//!
//! # Layout
//! - [`auth`]: the signature that local invocations must carry (`WRITER_SECRET`).
//! - [`config`]: environment variables, the pool.
//! - [`event`]: the envelope, message parsing and `data` decoding, input limits.
//! - [`handler`]: one invocation: [`handler::State`], [`handler::handle`], the result format.
//! - [`rooms`]: rooms, direct messages, read receipts (parsing and SQL).
//! - [`store`]: the SQL, one transaction per message, idempotent on message id.
//! - [`error`]: [`Error`], with whether a retry can help.
//! - [`lambda`]: the `lambda_runtime` mode.
//! - [`local`]: the local invoke server (`POST /2015-03-31/functions/{name}/invocations`, `/healthz`,
//!   `/readyz`).
//! - [`shutdown`]: SIGTERM / SIGINT.
//!
//! # Messages
//! - `chatMsg`, data `{username, content}`: inserts `chat_data(msg_id = id, username,
//!   msg_data = content, client_id = clientId, client_kind = clientKind, created_at_timestamp = timestamp)`.
//! - `editedMsg`, data `{username, content, msgIdToEdit}`: sets `msg_data`, `is_edited = true`,
//!   `updated_at = now()` on row `msgIdToEdit` only if its `client_kind` and `client_id` are the
//!   sender's (see [`event`]: the same id in another namespace is another author).
//! - `createRoom`, `roomMsg`, `directMsg`, `editMsg`, `readMsg`: the chat page's rooms, direct messages
//!   and read receipts, for signed-in users only (see [`rooms`]).
//! - any other name: skipped.
//!
//! The result is `{"results": [{"index", "id", "name", "status", "reason"?}]}` with status `inserted`,
//! `updated`, `duplicate`, `rejected`, `skipped` or `invalid` (see [`handler`]). Only a malformed envelope
//! (`InvalidEvent`, not retryable) or a database failure (`DatabaseError`, retryable) fails the
//! invocation.

pub mod auth;
pub mod config;
pub mod error;
pub mod event;
pub mod handler;
pub mod lambda;
pub mod local;
pub mod rooms;
pub mod shutdown;
pub mod store;

pub use config::Config;
pub use error::{Error, Result};
pub use handler::{InvocationResult, MessageResult, State, Status, handle};
