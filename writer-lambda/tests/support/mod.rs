//! Helpers shared by the integration tests: event builders and row readers.

#![allow(dead_code)] // each test binary uses a different subset

use base64::Engine as _;
use serde_json::{Value, json};
use sqlx::PgPool;
use writer_lambda::{InvocationResult, Status};

/// Publish time used by the builders.
pub const TIMESTAMP: i64 = 1_700_000_000_123;

/// A `chatMsg` with object data.
pub fn chat(id: &str, client: &str, content: &str) -> Value {
    json!({
        "id": id, "clientId": client, "connectionId": format!("conn-{client}"),
        "timestamp": TIMESTAMP, "name": "chatMsg",
        "data": {"username": format!("user-{client}"), "content": content}
    })
}

/// An `editedMsg` with data as a JSON string and `encoding: "json"` (what the connector sends).
pub fn edit(id: &str, client: &str, target: &str, content: &str) -> Value {
    let data =
        json!({"username": format!("user-{client}"), "content": content, "msgIdToEdit": target});
    json!({
        "id": id, "clientId": client, "connectionId": format!("conn-{client}"),
        "timestamp": TIMESTAMP + 1, "name": "editedMsg",
        "data": data.to_string(), "encoding": "json"
    })
}

/// `data` base64-encoded as Ably does for binary-safe transports.
pub fn base64_json(data: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(data.to_string())
}

/// The envelope around `messages`.
pub fn envelope(messages: Vec<Value>) -> Value {
    json!({"source": "channel.message", "channel": "outgoing-chat", "messages": messages})
}

/// The statuses of a result, in order.
pub fn statuses(result: &InvocationResult) -> Vec<Status> {
    result.results.iter().map(|r| r.status).collect()
}

/// A `chat_data` row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Row {
    pub msg_id: String,
    pub username: String,
    pub msg_data: String,
    pub client_id: String,
    pub created_at_timestamp: i64,
    pub is_edited: bool,
}

/// The row `msg_id`, if any.
pub async fn row(pool: &PgPool, msg_id: &str) -> Option<Row> {
    sqlx::query_as(
        "SELECT msg_id, username, msg_data, client_id, created_at_timestamp, is_edited \
         FROM chat_data WHERE msg_id = $1",
    )
    .bind(msg_id)
    .fetch_optional(pool)
    .await
    .expect("select row")
}

/// Number of rows in `table` (a fixed name from the test itself).
pub async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Makes every write of `op` (INSERT or UPDATE) on chat_data fail, until [`unbreak`].
pub async fn break_writes(pool: &PgPool, op: &str) {
    sqlx::query(
        "CREATE OR REPLACE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
    )
    .execute(pool)
    .await
    .expect("create function");
    sqlx::query(&format!(
        "CREATE TRIGGER test_fail BEFORE {op} ON chat_data FOR EACH ROW EXECUTE FUNCTION test_fail()"
    ))
    .execute(pool)
    .await
    .expect("create trigger");
}

/// Undoes [`break_writes`].
pub async fn unbreak(pool: &PgPool) {
    sqlx::query("DROP TRIGGER test_fail ON chat_data")
        .execute(pool)
        .await
        .expect("drop trigger");
}
