//! Rooms, direct messages and read receipts (issue 13): the messages the chat page publishes on
//! `outgoing-chat` besides the seed's `chatMsg` / `editedMsg`, and their SQL.
//!
//! | name | data | effect |
//! |---|---|---|
//! | `createRoom` | `{roomId, title}` | inserts `chat_rooms` (an existing room is `duplicate`) |
//! | `roomMsg` | `{roomId, content}` | inserts `chat_messages` (the room must exist) |
//! | `directMsg` | `{to, content}` | inserts `chat_conversations` for the pair when new (and tells both users on their personal channels), then `chat_direct_messages` |
//! | `editMsg` | `{msgId, content}` | updates the author's row of `chat_messages` or `chat_direct_messages` |
//! | `readMsg` | `{msgId}` | moves the reader's `chat_receipts` row forward to that direct message |
//!
//! # Identity
//! Every one of them needs a signed-in user (`clientKind` `user`, `clientId` the token's `sub`): the
//! author, sender or reader **is** that user, never a name from the data. Anonymous and server
//! messages are `rejected`. So no one can publish as someone else, and only the recipient of a direct
//! message can mark it read. A direct-message party must be a plain user id ([`is_user_id`]): it
//! becomes part of the user-limited channel `dm#{user_a},{user_b}`, where `,` and `#` would change who
//! may subscribe.
//!
//! Each message is applied in its own transaction, claimed in `chat_processed_messages` first, so a
//! retried invocation reports `duplicate` and changes nothing.

use serde::Deserialize;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgPool, Postgres, Transaction};

use crate::event::{ClientKind, InvalidMessage, Message, check_text};

/// Longest message text of a room or direct message, in bytes.
pub const MAX_BODY_BYTES: usize = 8 * 1024;
/// Longest room title, in characters.
pub const MAX_TITLE_CHARS: usize = 80;

/// `createRoom`.
pub const CREATE_ROOM: &str = "createRoom";
/// `roomMsg`.
pub const ROOM_MSG: &str = "roomMsg";
/// `directMsg`.
pub const DIRECT_MSG: &str = "directMsg";
/// `editMsg`.
pub const EDIT_MSG: &str = "editMsg";
/// `readMsg`.
pub const READ_MSG: &str = "readMsg";

/// Whether `name` is one of this module's message names.
pub fn handles(name: &str) -> bool {
    matches!(
        name,
        CREATE_ROOM | ROOM_MSG | DIRECT_MSG | EDIT_MSG | READ_MSG
    )
}

/// A room id: 1-40 of `a-z`, `0-9`, `_`, `-`, starting with a letter or digit (as the table's check).
pub fn is_room_id(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.len() <= 40
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A user id that may name a direct-message party: 1-64 of ASCII letters, digits, `_`, `-`, `.` (the
/// demo token endpoint's rule), so it cannot alter the channel `dm#{user_a},{user_b}`.
pub fn is_user_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Who sent the message, as the envelope says (never the data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    /// The namespace of `id`.
    pub kind: ClientKind,
    /// The client id (for `user`: the token's `sub`).
    pub id: String,
}

/// What one of this module's messages asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatAction {
    /// The message id: the key of idempotency and the new row's `msg_id`.
    pub message_id: String,
    /// Who sent it.
    pub sender: Sender,
    /// Publish time in milliseconds.
    pub created_at_ms: i64,
    /// What to do.
    pub kind: ChatKind,
}

/// The operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatKind {
    /// Create a room.
    CreateRoom {
        /// Its id (the channel is `room:{room_id}`).
        room_id: String,
        /// Its title.
        title: String,
    },
    /// A message in a room.
    RoomMsg {
        /// The room.
        room_id: String,
        /// The text.
        content: String,
    },
    /// A direct message.
    DirectMsg {
        /// The recipient.
        to: String,
        /// The text.
        content: String,
    },
    /// An edit of the sender's own room or direct message.
    Edit {
        /// The message to change.
        msg_id: String,
        /// The new text.
        content: String,
    },
    /// The sender has read the direct message `msg_id` (and every earlier one of the conversation).
    Read {
        /// The newest message read.
        msg_id: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoomData {
    room_id: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct DirectData {
    to: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EditData {
    msg_id: String,
    #[serde(default)]
    content: Option<String>,
}

fn required(field: &str, value: Option<String>) -> Result<String, InvalidMessage> {
    value.ok_or_else(|| InvalidMessage(format!("{field} is missing")))
}

/// Parses the data of one of this module's messages (`name` is one [`handles`] accepts).
pub fn parse(message: &Message, name: &str) -> Result<ChatAction, InvalidMessage> {
    let sender = Sender {
        kind: ClientKind::from_envelope(message.client_kind.as_deref())?,
        id: message.client_id()?,
    };
    let created_at_ms = match message.timestamp {
        Some(ms) if ms >= 0 => ms,
        Some(ms) => {
            return Err(InvalidMessage(format!(
                "timestamp must not be negative, got {ms}"
            )));
        }
        None => return Err(InvalidMessage("the message has no timestamp".into())),
    };
    let kind = match name {
        CREATE_ROOM | ROOM_MSG => parse_room(message, name)?,
        DIRECT_MSG => parse_direct(message)?,
        EDIT_MSG | READ_MSG => parse_edit_or_read(message, name)?,
        other => {
            return Err(InvalidMessage(format!(
                "{other:?} is not a room message name"
            )));
        }
    };
    Ok(ChatAction {
        message_id: message.id.clone(),
        sender,
        created_at_ms,
        kind,
    })
}

/// Checks a message body (`content`).
fn body(content: &str) -> Result<(), InvalidMessage> {
    check_text("content", content, MAX_BODY_BYTES)
}

/// `createRoom` or `roomMsg` (`name`): the room id, and the title or the content.
fn parse_room(message: &Message, name: &str) -> Result<ChatKind, InvalidMessage> {
    let data: RoomData = message.data_as(name)?;
    if !is_room_id(&data.room_id) {
        return Err(InvalidMessage(
            "roomId must be 1-40 of a-z, 0-9, '_' and '-', starting with a letter or digit".into(),
        ));
    }
    if name == CREATE_ROOM {
        let title = required("title", data.title)?.trim().to_owned();
        check_text("title", &title, MAX_TITLE_CHARS * 4)?;
        if title.chars().count() > MAX_TITLE_CHARS || title.chars().any(char::is_control) {
            return Err(InvalidMessage(format!(
                "title must be at most {MAX_TITLE_CHARS} characters, without control characters"
            )));
        }
        Ok(ChatKind::CreateRoom {
            room_id: data.room_id,
            title,
        })
    } else {
        let content = required("content", data.content)?;
        body(&content)?;
        Ok(ChatKind::RoomMsg {
            room_id: data.room_id,
            content,
        })
    }
}

/// `directMsg`: the recipient and the content.
fn parse_direct(message: &Message) -> Result<ChatKind, InvalidMessage> {
    let data: DirectData = message.data_as(DIRECT_MSG)?;
    if !is_user_id(&data.to) {
        return Err(InvalidMessage(
            "to must be a user id of 1-64 letters, digits, '_', '-' or '.'".into(),
        ));
    }
    body(&data.content)?;
    Ok(ChatKind::DirectMsg {
        to: data.to,
        content: data.content,
    })
}

/// `editMsg` (the message id and the new content) or `readMsg` (`name`; the message id).
fn parse_edit_or_read(message: &Message, name: &str) -> Result<ChatKind, InvalidMessage> {
    let data: EditData = message.data_as(name)?;
    check_text("msgId", &data.msg_id, crate::event::MAX_ID_BYTES)?;
    if name == EDIT_MSG {
        let content = required("content", data.content)?;
        body(&content)?;
        Ok(ChatKind::Edit {
            msg_id: data.msg_id,
            content,
        })
    } else {
        Ok(ChatKind::Read {
            msg_id: data.msg_id,
        })
    }
}

/// What applying one of these messages did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A row was inserted.
    Inserted,
    /// A row was updated.
    Updated,
    /// Already applied (the message id was processed, or the room exists): nothing changed.
    Duplicate(String),
    /// Not allowed or not possible (the reason is shown to the sender): nothing changed.
    Rejected(String),
}

/// Runs `statement`, an insert or update of one row that its conflict clause may skip: `done` when
/// it changed the row, else `Duplicate` with `reason` (what was already there is kept).
async fn one_row_or_duplicate(
    tx: &mut Transaction<'_, Postgres>,
    statement: Query<'_, Postgres, PgArguments>,
    done: Outcome,
    reason: impl FnOnce() -> String,
) -> Result<Outcome, sqlx::Error> {
    let n = statement.execute(&mut **tx).await?.rows_affected();
    Ok(if n == 1 {
        done
    } else {
        Outcome::Duplicate(reason())
    })
}

/// Why a room or direct message was not inserted: its id is taken.
const MESSAGE_EXISTS: &str = "a message with this id already exists";

/// The two parties of a conversation in channel order (`user_a < user_b`).
pub fn pair(x: &str, y: &str) -> (String, String) {
    if x < y {
        (x.to_owned(), y.to_owned())
    } else {
        (y.to_owned(), x.to_owned())
    }
}

/// Applies one message in its own transaction, exactly once per message id.
pub async fn apply(pool: &PgPool, action: &ChatAction) -> Result<Outcome, sqlx::Error> {
    if action.sender.kind != ClientKind::User {
        return Ok(Outcome::Rejected(
            "sign in first: rooms and direct messages are for signed-in users".into(),
        ));
    }
    let user = action.sender.id.as_str();
    let name = match &action.kind {
        ChatKind::CreateRoom { .. } => CREATE_ROOM,
        ChatKind::RoomMsg { .. } => ROOM_MSG,
        ChatKind::DirectMsg { .. } => DIRECT_MSG,
        ChatKind::Edit { .. } => EDIT_MSG,
        ChatKind::Read { .. } => READ_MSG,
    };
    let mut tx = pool.begin().await?;
    let claimed = sqlx::query(
        "INSERT INTO chat_processed_messages (message_id, name) VALUES ($1, $2) \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(&action.message_id)
    .bind(name)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if claimed == 0 {
        tx.rollback().await?;
        return Ok(Outcome::Duplicate("message id already processed".into()));
    }
    let outcome = match &action.kind {
        ChatKind::CreateRoom { room_id, title } => {
            create_room(&mut tx, user, room_id, title).await?
        }
        ChatKind::RoomMsg { room_id, content } => {
            room_message(&mut tx, action, room_id, content).await?
        }
        ChatKind::DirectMsg { to, content } => {
            direct_message(&mut tx, action, user, to, content).await?
        }
        ChatKind::Edit { msg_id, content } => edit(&mut tx, user, msg_id, content).await?,
        ChatKind::Read { msg_id } => read(&mut tx, user, msg_id).await?,
    };
    tx.commit().await?;
    Ok(outcome)
}

/// `createRoom`: the room, unless it exists.
async fn create_room(
    tx: &mut Transaction<'_, Postgres>,
    user: &str,
    room_id: &str,
    title: &str,
) -> Result<Outcome, sqlx::Error> {
    let statement = sqlx::query(
        "INSERT INTO chat_rooms (room_id, title, created_by) VALUES ($1, $2, $3) \
         ON CONFLICT (room_id) DO NOTHING",
    )
    .bind(room_id)
    .bind(title)
    .bind(user);
    one_row_or_duplicate(tx, statement, Outcome::Inserted, || {
        format!("room {room_id:?} already exists")
    })
    .await
}

/// `roomMsg`: the message, in a room that exists.
async fn room_message(
    tx: &mut Transaction<'_, Postgres>,
    action: &ChatAction,
    room_id: &str,
    content: &str,
) -> Result<Outcome, sqlx::Error> {
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM chat_rooms WHERE room_id = $1")
        .bind(room_id)
        .fetch_optional(&mut **tx)
        .await?;
    if exists.is_none() {
        Ok(Outcome::Rejected(format!("there is no room {room_id:?}")))
    } else {
        insert_room_message(tx, action, room_id, content).await
    }
}

/// `directMsg` from `user` to `to`: the conversation (both told of it when it is new) and the
/// message.
async fn direct_message(
    tx: &mut Transaction<'_, Postgres>,
    action: &ChatAction,
    user: &str,
    to: &str,
    content: &str,
) -> Result<Outcome, sqlx::Error> {
    if !is_user_id(user) {
        return Ok(Outcome::Rejected(
            "your user id cannot take part in direct messages (letters, digits, '_', '-', '.' only)"
                .into(),
        ));
    }
    if to == user {
        return Ok(Outcome::Rejected(
            "a direct message needs another user".into(),
        ));
    }
    let (a, b) = pair(user, to);
    let new = sqlx::query(
        "INSERT INTO chat_conversations (user_a, user_b, started_by) VALUES ($1, $2, $3) \
         ON CONFLICT (user_a, user_b) DO NOTHING",
    )
    .bind(&a)
    .bind(&b)
    .bind(user)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if new == 1 {
        // Both users learn of the conversation on their personal channels
        // (`notifications#{user}`), delivered if and only if this transaction commits.
        let notice = serde_json::json!({
            "type": "conversation",
            "channel": format!("dm#{a},{b}"),
            "user_a": a,
            "user_b": b,
            "started_by": user,
        });
        sqlx::query("SELECT relay.notify_users(ARRAY[$1, $2], $3::jsonb)")
            .bind(&a)
            .bind(&b)
            .bind(notice.to_string())
            .execute(&mut **tx)
            .await?;
    }
    let statement = sqlx::query(
        "INSERT INTO chat_direct_messages \
         (msg_id, user_a, user_b, sender, recipient, body, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (msg_id) DO NOTHING",
    )
    .bind(&action.message_id)
    .bind(&a)
    .bind(&b)
    .bind(user)
    .bind(to)
    .bind(content)
    .bind(action.created_at_ms);
    one_row_or_duplicate(tx, statement, Outcome::Inserted, || MESSAGE_EXISTS.into()).await
}

async fn insert_room_message(
    tx: &mut Transaction<'_, Postgres>,
    action: &ChatAction,
    room_id: &str,
    content: &str,
) -> Result<Outcome, sqlx::Error> {
    let statement = sqlx::query(
        "INSERT INTO chat_messages (msg_id, room_id, author, body, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (msg_id) DO NOTHING",
    )
    .bind(&action.message_id)
    .bind(room_id)
    .bind(&action.sender.id)
    .bind(content)
    .bind(action.created_at_ms);
    one_row_or_duplicate(tx, statement, Outcome::Inserted, || MESSAGE_EXISTS.into()).await
}

async fn edit(
    tx: &mut Transaction<'_, Postgres>,
    user: &str,
    msg_id: &str,
    content: &str,
) -> Result<Outcome, sqlx::Error> {
    for (table, author) in [
        ("chat_messages", "author"),
        ("chat_direct_messages", "sender"),
    ] {
        // Table and column names are constants of this function, never input.
        let n = sqlx::query(&format!(
            "UPDATE {table} SET body = $1, is_edited = true, updated_at = now() \
             WHERE msg_id = $2 AND {author} = $3"
        ))
        .bind(content)
        .bind(msg_id)
        .bind(user)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n == 1 {
            return Ok(Outcome::Updated);
        }
    }
    let exists: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM chat_messages WHERE msg_id = $1 \
         UNION ALL SELECT 1 FROM chat_direct_messages WHERE msg_id = $1 AND (user_a = $2 OR user_b = $2) \
         LIMIT 1",
    )
    .bind(msg_id)
    .bind(user)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(Outcome::Rejected(if exists.is_some() {
        format!("message {msg_id:?} was written by another user; only its author can edit it")
    } else {
        format!("no message {msg_id:?} to edit")
    }))
}

async fn read(
    tx: &mut Transaction<'_, Postgres>,
    user: &str,
    msg_id: &str,
) -> Result<Outcome, sqlx::Error> {
    let found: Option<(String, String, i64)> = sqlx::query_as(
        "SELECT user_a, user_b, seq FROM chat_direct_messages WHERE msg_id = $1 AND recipient = $2",
    )
    .bind(msg_id)
    .bind(user)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((a, b, seq)) = found else {
        return Ok(Outcome::Rejected(format!(
            "no direct message {msg_id:?} sent to you"
        )));
    };
    let statement = sqlx::query(
        "INSERT INTO chat_receipts (user_a, user_b, reader, msg_id, read_seq) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (user_a, user_b, reader) DO UPDATE \
         SET msg_id = EXCLUDED.msg_id, read_seq = EXCLUDED.read_seq, read_at = now() \
         WHERE chat_receipts.read_seq < EXCLUDED.read_seq",
    )
    .bind(&a)
    .bind(&b)
    .bind(user)
    .bind(msg_id)
    .bind(seq);
    one_row_or_duplicate(tx, statement, Outcome::Updated, || {
        "a later message was already read".into()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_room_id("general"));
        assert!(is_room_id("a-b_9"));
        assert!(!is_room_id(""));
        assert!(!is_room_id("-a"));
        assert!(!is_room_id("Room"));
        assert!(!is_room_id("a:b"));
        assert!(!is_room_id(&"a".repeat(41)));
        assert!(is_user_id("alice.b-1_"));
        assert!(!is_user_id("alice,bob"));
        assert!(!is_user_id("alice#bob"));
        assert!(!is_user_id(""));
        assert_eq!(pair("bob", "alice"), ("alice".into(), "bob".into()));
    }
}
