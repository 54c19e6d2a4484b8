//! The handler: one invocation, from the event to the result.
//!
//! A plain async function taking the shared [`State`] (built once per process, before serving), so the
//! same code runs under `lambda_runtime` and behind the local invoke server. Messages are applied in
//! order, each in its own transaction (see [`crate::store`]); the first database error stops the
//! invocation and is returned as a retryable [`Error::Database`].
//!
//! # Result
//! ```json
//! {"results": [
//!   {"index": 0, "id": "m1", "name": "chatMsg",   "status": "inserted"},
//!   {"index": 1, "id": "e1", "name": "editedMsg", "status": "rejected",
//!    "reason": "message \"m0\" was written by another client; only its author can edit it"}
//! ]}
//! ```
//! One entry per message, in order. `id` and `name` are `null` when the message lacks them; `reason` is
//! present for every status except `inserted` and `updated`. See [`Status`] for the statuses.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use crate::{
    error::{Error, Result},
    event::{Action, Envelope, Message},
    rooms,
    store::{self, EditOutcome, InsertOutcome},
};

/// What every invocation shares: the database pool.
#[derive(Debug, Clone)]
pub struct State {
    pool: PgPool,
}

impl State {
    /// Wraps the pool. Build it once per process (see [`crate::config::Config::pool`]).
    pub fn new(pool: PgPool) -> Self {
        State { pool }
    }

    /// The database pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The result of a successful invocation: one entry per message of the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvocationResult {
    /// The outcome of each message, in the order of the event's `messages`.
    pub results: Vec<MessageResult>,
}

/// The outcome of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageResult {
    /// Position of the message in the event's `messages`.
    pub index: usize,
    /// The message id (`null` if the message has none).
    pub id: Option<String>,
    /// The message name (`null` if the message has none).
    pub name: Option<String>,
    /// What happened.
    pub status: Status,
    /// Why, for every status except `inserted` and `updated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What happened to one message. Only a database error fails an invocation; none of these is retryable,
/// and a retry of the invocation reports `duplicate` for the messages that were applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `chatMsg`: the row was inserted.
    Inserted,
    /// `editedMsg`: the author's row was updated.
    Updated,
    /// The message id was already processed (or the row already existed): nothing changed.
    Duplicate,
    /// `editedMsg` by someone other than the author, or of a message that does not exist: nothing
    /// changed.
    Rejected,
    /// A message name the writer does not handle: nothing changed.
    Skipped,
    /// The message or its data is malformed (see `reason`): nothing changed.
    Invalid,
}

/// Handles one invocation: parses the envelope and applies every message in order.
///
/// Returns [`Error::InvalidEvent`] for a malformed envelope (nothing applied) and [`Error::Database`] when
/// the database fails (messages before the failing one stay applied; a retry reports them as
/// duplicates).
pub async fn handle(state: &State, event: Value) -> Result<InvocationResult> {
    let envelope = Envelope::from_value(event)?;
    tracing::debug!(
        channel = envelope.channel.as_deref().unwrap_or(""),
        source = envelope.source.as_deref().unwrap_or(""),
        messages = envelope.messages.len(),
        "event"
    );
    let mut results = Vec::with_capacity(envelope.messages.len());
    for (index, raw) in envelope.messages.into_iter().enumerate() {
        let result = apply(state, index, raw).await?;
        tracing::info!(
            index,
            id = result.id.as_deref().unwrap_or(""),
            name = result.name.as_deref().unwrap_or(""),
            status = ?result.status,
            reason = result.reason.as_deref().unwrap_or(""),
            "message"
        );
        results.push(result);
    }
    Ok(InvocationResult { results })
}

/// Applies one message of the envelope.
async fn apply(state: &State, index: usize, raw: Value) -> Result<MessageResult> {
    let report =
        |id: Option<String>, name: Option<String>, status, reason: Option<String>| MessageResult {
            index,
            id,
            name,
            status,
            reason,
        };

    let message = match Message::from_value(raw.clone()) {
        Ok(message) => message,
        Err(invalid) => {
            let (id, name) = Message::id_and_name_of(&raw);
            return Ok(report(id, name, Status::Invalid, Some(invalid.0)));
        }
    };
    let id = Some(message.id.clone());
    let name = message.name.clone();
    let action = match message.action() {
        Ok(action) => action,
        Err(invalid) => return Ok(report(id, name, Status::Invalid, Some(invalid.0))),
    };
    let (status, reason) = perform(state, action, name.as_deref())
        .await
        .map_err(|source| Error::Database {
            message_id: message.id.clone(),
            source,
        })?;
    Ok(report(id, name, status, reason))
}

/// Performs a message's action: its status and, for anything but success, the reason.
async fn perform(
    state: &State,
    action: Action,
    name: Option<&str>,
) -> Result<(Status, Option<String>), sqlx::Error> {
    Ok(match action {
        Action::Skip => (
            Status::Skipped,
            Some(match name {
                Some(name) => format!("message name {name:?} is not handled by the writer"),
                None => "the message has no name".to_owned(),
            }),
        ),
        Action::Insert(new) => match store::insert_message(&state.pool, &new).await? {
            InsertOutcome::Inserted => (Status::Inserted, None),
            InsertOutcome::AlreadyProcessed => (
                Status::Duplicate,
                Some("message id already processed".to_owned()),
            ),
            InsertOutcome::RowExists => (
                Status::Duplicate,
                Some("a chat_data row with this msg_id already exists".to_owned()),
            ),
        },
        Action::Chat(chat) => match rooms::apply(&state.pool, &chat).await? {
            rooms::Outcome::Inserted => (Status::Inserted, None),
            rooms::Outcome::Updated => (Status::Updated, None),
            rooms::Outcome::Duplicate(reason) => (Status::Duplicate, Some(reason)),
            rooms::Outcome::Rejected(reason) => (Status::Rejected, Some(reason)),
        },
        Action::Edit(edit) => match store::edit_message(&state.pool, &edit).await? {
            EditOutcome::Updated => (Status::Updated, None),
            EditOutcome::AlreadyProcessed => (
                Status::Duplicate,
                Some("message id already processed".to_owned()),
            ),
            EditOutcome::NotFound => (
                Status::Rejected,
                Some(format!("no message {:?} to edit", edit.msg_id_to_edit)),
            ),
            EditOutcome::NotAuthor => (
                Status::Rejected,
                Some(format!(
                    "message {:?} was written by another client; only its author can edit it",
                    edit.msg_id_to_edit
                )),
            ),
        },
    })
}
