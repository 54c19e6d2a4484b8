//! Refusals are refusals: the writer's per-message outcomes (`rejected`, `invalid`, `skipped`) reach
//! the publisher as error replies 420 / 421 / 422 with the writer's reason, on the WebSocket and in the
//! server API, and nothing is written; an invalid outcome is error 100, never success.
#![allow(clippy::unwrap_used)]

mod support;

use axum::Json;
use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

const KEY: &str = "outcome-test-api-key-0123";

/// A webhook that answers each message name with a canned body.
async fn canned_hook() -> String {
    async fn hook(Json(env): Json<Value>) -> String {
        let id = env["messages"][0]["id"].as_str().unwrap().to_owned();
        match env["messages"][0]["name"].as_str().unwrap() {
            "no-outcome" => "OK".to_owned(),
            "not-array" => r#"{"results":{"status":"inserted"}}"#.to_owned(),
            "other-id" => r#"{"results":[{"id":"someone-else","status":"inserted"}]}"#.to_owned(),
            "unknown" => json!({"results": [{"id": id, "status": "perhaps"}]}).to_string(),
            _ => json!({"results": [{"id": id, "status": "accepted"}]}).to_string(),
        }
    }
    let app = Router::new().route("/hook", post(hook));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook")
}

async fn api(server: &Server, method: &str, params: Value) -> Value {
    reqwest::Client::new()
        .post(format!("http://{}/api/{method}", server.addr))
        .header("X-API-Key", KEY)
        .json(&params)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn rows(db: &TestDb) -> Vec<(String, String, bool)> {
    sqlx::query_as("SELECT msg_id, msg_data, is_edited FROM chat_data ORDER BY msg_id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// A server whose `outgoing-chat` rule goes to the real writer and `hooks` to [`canned_hook`].
async fn outcome_server(db: &TestDb) -> Server {
    let endpoint = db.local_writer().await;
    let hook = canned_hook().await;
    let config = config_json(
        &db.url,
        json!({
            "client": {"allow_publish": false},
            "api": {"key": KEY},
            "rules": [
                {"channel": "outgoing-chat", "target": {"type": "lambda", "function": "chat-writer", "endpoint": endpoint}},
                {"channel": "hooks", "target": {"type": "http", "url": hook}, "timeout_ms": 2000}
            ]
        }),
    );
    Server::start(&config).await
}

#[tokio::test]
async fn an_edit_of_someone_elses_message_is_refused_with_420_and_the_writers_reason() {
    let db = TestDb::new().await;
    let server = outcome_server(&db).await;
    let mut alice = Client::connected(&server.ws_url()).await;
    let mut mallory = Client::connected(&server.ws_url()).await;
    let sub = alice
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    assert!(sub["subscribe"].is_object(), "{sub}");

    // Alice's message is written; the reply is a success.
    let r = alice
        .call(json!({"publish": {"channel": "outgoing-chat", "data": {"name": "chatMsg", "data": {"username": "alice", "content": "mine"}}}}))
        .await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let row = alice.next_pub("incoming-chat").await;
    let msg_id = row["data"]["row"]["msg_id"].as_str().unwrap().to_owned();

    // The attack: Mallory edits Alice's message. Error 420 with the writer's reason; nothing changed.
    let r = mallory
        .call(json!({"publish": {"channel": "outgoing-chat", "data": {"name": "editedMsg", "data": {"username": "mallory", "content": "FORGED", "msgIdToEdit": msg_id}}}}))
        .await;
    assert_eq!(r["error"]["code"], 420, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only its author can edit it"),
        "{r}"
    );
    assert!(r["error"].get("temporary").is_none(), "not temporary: {r}");
    // The server API answers the forged edit with the same error.
    let r = api(
        &server,
        "publish",
        json!({"channel": "outgoing-chat", "data": {"name": "editedMsg", "data": {"username": "x", "content": "FORGED", "msgIdToEdit": msg_id}}}),
    )
    .await;
    assert_eq!(r["error"]["code"], 420, "{r}");
    // The author's own edit still succeeds.
    let r = alice
        .call(json!({"publish": {"channel": "outgoing-chat", "data": {"name": "editedMsg", "data": {"username": "alice", "content": "edited", "msgIdToEdit": msg_id}}}}))
        .await;
    assert_eq!(r["publish"], json!({}), "{r}");
    assert_eq!(rows(&db).await, vec![(msg_id, "edited".to_owned(), true)]);

    // The other clients were unaffected: Alice's connection still works.
    let r = alice
        .call(json!({"history": {"channel": "incoming-chat", "limit": -1}}))
        .await;
    assert_eq!(
        r["history"]["publications"].as_array().unwrap().len(),
        2,
        "{r}"
    );

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn invalid_and_unhandled_messages_get_421_and_422_and_write_nothing() {
    let db = TestDb::new().await;
    let server = outcome_server(&db).await;
    let mut mallory = Client::connected(&server.ws_url()).await;
    // Invalid data (no username) → 421; a name the writer does not handle → 422.
    let r = mallory
        .call(json!({"publish": {"channel": "outgoing-chat", "data": {"name": "chatMsg", "data": {}}}}))
        .await;
    assert_eq!(r["error"]["code"], 421, "{r}");
    assert!(!r["error"]["message"].as_str().unwrap().is_empty());
    let r = mallory
        .call(json!({"publish": {"channel": "outgoing-chat", "data": {"name": "deleteEverything", "data": {}}}}))
        .await;
    assert_eq!(r["error"]["code"], 422, "{r}");
    // Content over the writer's 64 KiB limit (but within the frame limit... of the API: 2 MB).
    let big = "x".repeat(70_000);
    let r = api(
        &server,
        "publish",
        json!({"channel": "outgoing-chat", "data": {"name": "chatMsg", "data": {"username": "bot", "content": big}}}),
    )
    .await;
    assert_eq!(r["error"]["code"], 421, "{r}");
    assert!(r.get("result").is_none(), "{r}");
    assert_eq!(rows(&db).await, vec![]);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_missing_outcome_is_success_and_an_invalid_one_is_error_100() {
    let db = TestDb::new().await;
    let server = outcome_server(&db).await;
    let mut mallory = Client::connected(&server.ws_url()).await;
    // The contract's edge cases, through a webhook: a missing outcome is success; an invalid one
    // (results not an array, no entry for the message, an unknown status) is error 100, never success.
    for (name, code) in [
        ("no-outcome", None),
        ("fine", None),
        ("not-array", Some(100)),
        ("other-id", Some(100)),
        ("unknown", Some(100)),
    ] {
        let r = mallory
            .call(json!({"publish": {"channel": "hooks", "data": {"name": name, "data": {}}}}))
            .await;
        match code {
            None => assert_eq!(r["publish"], json!({}), "{name}: {r}"),
            Some(c) => assert_eq!(r["error"]["code"], c, "{name}: {r}"),
        }
    }
    server.stop().await;
    db.drop_db().await;
}
