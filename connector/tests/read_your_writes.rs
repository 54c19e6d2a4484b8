//! Read-your-writes and exact history bounds: a publish reply (client, server API, through a rule)
//! means the publication is in the history, and history and recovery never hand out more than the
//! channel's retention keeps, whether or not the pruning task has run.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::{Client, Server, TestDb, config_json};

const KEY: &str = "ryw-test-api-key-0123456789";

/// Publishes this many times, each followed at once by a history read that must hold it.
const ROUNDS: usize = 15;

async fn api(server: &Server, method: &str, params: Value) -> Value {
    server.api(KEY, method, params).await
}

/// The offsets of a channel's whole history, read with a client.
async fn offsets(c: &mut Client, channel: &str) -> Vec<u64> {
    let h = c
        .call(json!({"history": {"channel": channel, "limit": -1}}))
        .await;
    h["history"]["publications"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect()
}

/// A writer (webhook) that stores each message as a chat row, as the writer Lambda does.
async fn row_writer(pool: PgPool) -> String {
    let app = Router::new()
        .route(
            "/hook",
            post(|State(pool): State<PgPool>, body: String| async move {
                let envelope: Value = serde_json::from_str(&body).unwrap();
                // The message's data is the JSON text of the publication's `data`.
                let data: Value =
                    serde_json::from_str(envelope["messages"][0]["data"].as_str().unwrap())
                        .unwrap();
                let text = data["text"].as_str().unwrap().to_owned();
                sqlx::query(
                    "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp) \
                     VALUES (gen_random_uuid()::text, 'w', $1, 'c', 0)",
                )
                .bind(text)
                .execute(&pool)
                .await
                .unwrap();
                "{}"
            }),
        )
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook")
}

#[tokio::test]
async fn a_client_publish_reply_means_the_publication_is_in_history() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let mut c = Client::connected(&server.ws_url()).await;
    for i in 0..ROUNDS {
        let r = c
            .call(json!({"publish": {"channel": "news", "data": {"n": i}}}))
            .await;
        assert!(r.get("error").is_none(), "{r}");
        let seen = offsets(&mut c, "news").await;
        assert_eq!(
            seen.len(),
            i + 1,
            "round {i}: history right after the reply"
        );
    }
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_server_api_publish_answer_means_the_publication_is_in_history() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({"api": {"key": KEY}}))).await;
    for i in 0..ROUNDS {
        let r = api(
            &server,
            "publish",
            json!({"channel": "news", "data": {"n": i}}),
        )
        .await;
        assert!(r.get("error").is_none(), "{r}");
        let h = api(&server, "history", json!({"channel": "news", "limit": -1})).await;
        let n = h["result"]["publications"].as_array().map_or(0, Vec::len);
        assert_eq!(n, i + 1, "round {i}: history right after the answer: {h}");
        // The answer carries the publication's position, as Centrifugo's does.
        assert_eq!(r["result"]["offset"], json!(i + 1), "round {i}: {r}");
        assert_eq!(
            r["result"]["epoch"], h["result"]["epoch"],
            "round {i}: {r} {h}"
        );
        let newest = &h["result"]["publications"][i];
        assert_eq!(newest["offset"], r["result"]["offset"], "{h}");
        assert_eq!(newest["data"], json!({"n": i}), "{h}");
    }
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_publish_through_a_rule_is_answered_once_the_writers_row_is_in_history() {
    let db = TestDb::new().await;
    let hook = row_writer(db.pool.clone()).await;
    let config = config_json(
        &db.url,
        json!({
            "channels": [
                {"channel": "incoming-chat", "subscribe": "anyone", "history": "anyone"},
                {"channel": "outgoing-chat", "publish": "anyone"}
            ],
            "rules": [{"channel": "outgoing-chat", "target": {"type": "http", "url": hook}}]
        }),
    );
    let server = Server::start(&config).await;
    let mut c = Client::connected(&server.ws_url()).await;
    for i in 0..ROUNDS {
        let r = c
            .call(json!({"publish": {"channel": "outgoing-chat", "data": {"name": "chatMsg", "data": {"text": format!("m{i}")}}}}))
            .await;
        assert!(r.get("error").is_none(), "{r}");
        let seen = offsets(&mut c, "incoming-chat").await;
        assert_eq!(seen.len(), i + 1, "round {i}: the writer's row in history");
    }
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn history_and_recovery_keep_the_retention_count_before_any_pruning() {
    let db = TestDb::new().await;
    // The pruning task runs once an hour: whatever is bounded here is bounded by the reads.
    let retention = json!({"retention": {"prune_interval_secs": 3600, "rules": [
        {"channel": "small", "max_publications": 3, "max_age_secs": 3600}
    ]}});
    let server = Server::start(&config_json(&db.url, retention)).await;
    let mut c = Client::connected(&server.ws_url()).await;
    for i in 0..10 {
        c.call(json!({"publish": {"channel": "small", "data": {"n": i}}}))
            .await;
    }
    assert_eq!(offsets(&mut c, "small").await, [8, 9, 10]);
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay.publications WHERE channel = 'small'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stored, 10,
        "nothing was pruned: the reads bound the history"
    );

    // Reverse and `since` reads stay inside the kept range too.
    let back = c
        .call(json!({"history": {"channel": "small", "limit": -1, "reverse": true, "since": {"offset": 9}}}))
        .await;
    let back: Vec<u64> = back["history"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(back, [8]);
    let since = c
        .call(json!({"history": {"channel": "small", "limit": -1, "since": {"offset": 2}}}))
        .await;
    assert_eq!(since["history"]["offset"], 10, "{since}");
    assert_eq!(
        since["history"]["publications"].as_array().unwrap().len(),
        3
    );

    let epoch = c
        .call(json!({"history": {"channel": "small", "limit": 0}}))
        .await["history"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    // A client that saw offset 7 gets 8..10 back; one that saw 6 missed offset 7, which the channel
    // no longer keeps: recovered=false with the current position, never a partial history.
    let mut near = Client::connected(&server.ws_url()).await;
    let ok = near
        .call(json!({"subscribe": {"channel": "small", "recover": true, "offset": 7, "epoch": epoch}}))
        .await;
    assert_eq!(ok["subscribe"]["recovered"], true, "{ok}");
    assert_eq!(ok["subscribe"]["publications"].as_array().unwrap().len(), 3);
    let mut far = Client::connected(&server.ws_url()).await;
    let gone = far
        .call(json!({"subscribe": {"channel": "small", "recover": true, "offset": 6, "epoch": epoch}}))
        .await;
    assert_eq!(gone["subscribe"]["was_recovering"], true, "{gone}");
    assert!(gone["subscribe"].get("recovered").is_none(), "{gone}");
    assert!(gone["subscribe"].get("publications").is_none(), "{gone}");
    assert_eq!(gone["subscribe"]["offset"], 10);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn history_keeps_the_retention_age_before_any_pruning() {
    let db = TestDb::new().await;
    let retention = json!({"retention": {"prune_interval_secs": 3600, "rules": [
        {"channel": "brief", "max_publications": 100, "max_age_secs": 1}
    ]}});
    let server = Server::start(&config_json(&db.url, retention)).await;
    let mut c = Client::connected(&server.ws_url()).await;
    c.call(json!({"publish": {"channel": "brief", "data": {"n": 1}}}))
        .await;
    assert_eq!(offsets(&mut c, "brief").await, [1]);
    // Older than the channel keeps: no longer returned, though still stored.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.call(json!({"publish": {"channel": "brief", "data": {"n": 2}}}))
        .await;
    assert_eq!(offsets(&mut c, "brief").await, [2]);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn concurrent_server_api_publishes_each_answer_their_own_offset() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({"api": {"key": KEY}}))).await;
    let calls = (0..20).map(|i| {
        let server = &server;
        async move {
            let r = api(
                server,
                "publish",
                json!({"channel": "busy", "data": {"n": i}}),
            )
            .await;
            (i, r)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let h = api(&server, "history", json!({"channel": "busy", "limit": -1})).await;
    let by_offset: std::collections::HashMap<u64, Value> = h["result"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["offset"].as_u64().unwrap(), p["data"].clone()))
        .collect();
    assert_eq!(by_offset.len(), 20, "{h}");
    let mut offsets: Vec<u64> = answers
        .iter()
        .map(|(i, r)| {
            let offset = r["result"]["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("{r}"));
            assert_eq!(by_offset[&offset], json!({"n": i}), "answer {r} for n={i}");
            assert_eq!(r["result"]["epoch"], h["result"]["epoch"]);
            offset
        })
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=20).collect::<Vec<u64>>());
    server.stop().await;
    db.drop_db().await;
}
