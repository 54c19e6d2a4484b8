//! The SQL: applying one message to `chat_data`, exactly once.
//!
//! Each message is applied in its own transaction, together with
//! `INSERT INTO chat_processed_messages (message_id, name) ... ON CONFLICT DO NOTHING`. If that insert
//! claims nothing, the message id was already processed (a retried or replayed event) and the
//! transaction changes nothing. Two concurrent invocations carrying the same message serialize on the
//! primary key: the second waits for the first to commit, then finds the id taken.
//!
//! Every statement is parameterized. The writer never runs migrations: the schema
//! (`migrations/0002_chat.sql`) is applied by the connector.

use sqlx::{PgPool, Postgres, Transaction};

use crate::event::{CHAT_MSG, EDITED_MSG, EditChatMessage, NewChatMessage};

/// What inserting a new chat message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The row was inserted.
    Inserted,
    /// The message id was already processed: nothing changed.
    AlreadyProcessed,
    /// A row with this `msg_id` already existed (written by other means): nothing changed.
    RowExists,
}

/// What applying an edit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditOutcome {
    /// The author's row was updated.
    Updated,
    /// The edit's message id was already processed: nothing changed.
    AlreadyProcessed,
    /// There is no row with `msgIdToEdit`: nothing changed.
    NotFound,
    /// The row belongs to another client: nothing changed.
    NotAuthor,
}

/// Claims `message_id` in `chat_processed_messages`; `false` if it was already processed.
async fn claim(
    tx: &mut Transaction<'_, Postgres>,
    message_id: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query(
        "INSERT INTO chat_processed_messages (message_id, name) VALUES ($1, $2) \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(message_id)
    .bind(name)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(claimed == 1)
}

/// Inserts a new chat message, at most once per message id.
pub async fn insert_message(
    pool: &PgPool,
    message: &NewChatMessage,
) -> Result<InsertOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !claim(&mut tx, &message.msg_id, CHAT_MSG).await? {
        tx.rollback().await?;
        return Ok(InsertOutcome::AlreadyProcessed);
    }
    let inserted = sqlx::query(
        "INSERT INTO chat_data (msg_id, username, msg_data, client_id, client_kind, created_at_timestamp) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (msg_id) DO NOTHING",
    )
    .bind(&message.msg_id)
    .bind(&message.username)
    .bind(&message.content)
    .bind(&message.client_id)
    .bind(message.client_kind.as_str())
    .bind(message.created_at_ms)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(if inserted == 1 {
        InsertOutcome::Inserted
    } else {
        InsertOutcome::RowExists
    })
}

/// Applies an edit, at most once per message id, and only to a row whose `client_id` and `client_kind`
/// are the editor's (the same id in another namespace is another author).
///
/// A rejected edit (no such row, or not the author) is still recorded as processed: replaying it later,
/// for example after the row appeared, must not apply it out of order.
pub async fn edit_message(
    pool: &PgPool,
    edit: &EditChatMessage,
) -> Result<EditOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !claim(&mut tx, &edit.message_id, EDITED_MSG).await? {
        tx.rollback().await?;
        return Ok(EditOutcome::AlreadyProcessed);
    }
    let updated = sqlx::query(
        "UPDATE chat_data SET msg_data = $1, is_edited = true, updated_at = now() \
         WHERE msg_id = $2 AND client_id = $3 AND client_kind = $4",
    )
    .bind(&edit.content)
    .bind(&edit.msg_id_to_edit)
    .bind(&edit.client_id)
    .bind(edit.client_kind.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let outcome = if updated == 1 {
        EditOutcome::Updated
    } else {
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM chat_data WHERE msg_id = $1")
            .bind(&edit.msg_id_to_edit)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            EditOutcome::NotAuthor
        } else {
            EditOutcome::NotFound
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Checks that the database answers (`SELECT 1` through the pool).
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}
