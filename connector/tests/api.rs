//! The server API and publishing from SQL: keys, every method, rule channels through the rule,
//! `relay.publish` in rolled-back and committed transactions, user notifications.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

const KEY: &str = "test-api-key-0123456789";
const SECRET: &str = "api-test-secret-api-test-secret-0123";

async fn api(server: &Server, method: &str, params: Value) -> Value {
    server.api(KEY, method, params).await
}

/// A fake writer that records the envelopes of a rule.
async fn fake_target() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State(seen): State<Arc<Mutex<Vec<Value>>>>, body: String| async move {
                    seen.lock()
                        .unwrap()
                        .push(serde_json::from_str(&body).unwrap());
                    "{}"
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), seen)
}

fn token(sub: &str) -> String {
    let claims = json!({"sub": sub, "exp": 4_000_000_000u64});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn connected_as(url: &str, user: &str) -> Client {
    let mut c = Client::connect(url).await;
    let r = c
        .call(json!({"connect": {"token": token(user), "name": "test"}}))
        .await;
    assert!(r["connect"]["client"].is_string(), "{r}");
    c
}

/// A server with the API on, a rule on `outgoing-chat` to a fake target (its envelopes), and
/// presence on `news`.
async fn api_server() -> (TestDb, Server, Arc<Mutex<Vec<Value>>>) {
    let db = TestDb::new().await;
    let (hook, seen) = fake_target().await;
    let config = config_json(
        &db.url,
        json!({
            "api": {"key": KEY},
            "rules": [{"channel": "outgoing-chat", "target": {"type": "http", "url": hook}}],
            "presence": {"channels": [{"channel": "news"}]}
        }),
    );
    let server = Server::start(&config).await;
    (db, server, seen)
}

/// A client subscribed to `news`, after two publications there through the API (`publish` of
/// `{"n":1}`, then `broadcast` of `{"n":2}`) that it received.
async fn news_with_two_publications(server: &Server) -> Client {
    let mut c = Client::connected(&server.ws_url()).await;
    c.call(json!({"subscribe": {"channel": "news"}})).await;
    api(
        server,
        "publish",
        json!({"channel": "news", "data": {"n": 1}}),
    )
    .await;
    api(
        server,
        "broadcast",
        json!({"channels": ["news"], "data": {"n": 2}}),
    )
    .await;
    c.next_pub("news").await;
    c.next_pub("news").await;
    c
}

#[tokio::test]
async fn the_api_key_is_required_in_either_header_form() {
    let (db, server, _seen) = api_server().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);

    // Keys: none or wrong → 401; both header forms work.
    let r = http
        .post(format!("{base}/api/info"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{base}/api/info"))
        .header("X-API-Key", "wrong-key-wrong-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{base}/api/info"))
        .header("Authorization", format!("apikey {KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(
        info["result"]["nodes"].as_array().unwrap().len(),
        1,
        "{info}"
    );
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn the_old_envelope_and_errors_are_centrifugos() {
    let (db, server, _seen) = api_server().await;
    let r: Value = reqwest::Client::new()
        .post(format!("http://{}/api", server.addr))
        .header("X-API-Key", KEY)
        .json(&json!({"method": "nope", "params": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 104, "{r}");
    let r = api(&server, "publish", json!({"channel": "news"})).await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn publish_and_broadcast_reach_subscribers_and_history() {
    let (db, server, _seen) = api_server().await;
    // publish on a plain channel: delivered to subscribers through the stream, kept in history.
    let mut c = Client::connected(&server.ws_url()).await;
    c.call(json!({"subscribe": {"channel": "news"}})).await;
    let r = api(
        &server,
        "publish",
        json!({"channel": "news", "data": {"n": 1}}),
    )
    .await;
    // The answer says where the publication landed (as Centrifugo's, with history on).
    assert_eq!(r["result"]["offset"], 1, "{r}");
    assert!(
        r["result"]["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{r}"
    );
    let p = c.next_pub("news").await;
    assert_eq!(
        (p["data"].clone(), p["offset"].clone()),
        (json!({"n": 1}), json!(1))
    );
    let r = api(
        &server,
        "broadcast",
        json!({"channels": ["news", "other", "bad channel"], "data": {"n": 2}}),
    )
    .await;
    let responses = r["result"]["responses"].as_array().unwrap();
    assert_eq!(responses[0]["result"]["offset"], 2, "{r}");
    assert_eq!(responses[1]["result"]["offset"], 1, "{r}");
    assert_eq!(responses[2]["error"]["code"], 102, "{r}");
    assert_eq!(c.next_pub("news").await["data"], json!({"n": 2}));
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn history_channels_and_presence_describe_a_channel() {
    let (db, server, _seen) = api_server().await;
    let _subscriber = news_with_two_publications(&server).await;
    let h = api(&server, "history", json!({"channel": "news", "limit": -1})).await;
    assert_eq!(h["result"]["offset"], 2, "{h}");
    assert_eq!(h["result"]["publications"].as_array().unwrap().len(), 2);
    let h = api(
        &server,
        "history",
        json!({"channel": "news", "limit": 1, "reverse": true}),
    )
    .await;
    assert_eq!(h["result"]["publications"][0]["data"], json!({"n": 2}));
    let ch = api(&server, "channels", json!({})).await;
    assert_eq!(ch["result"]["channels"]["news"]["num_clients"], 1, "{ch}");
    let ch = api(&server, "channels", json!({"pattern": "x*"})).await;
    assert_eq!(ch["result"]["channels"], json!({}));
    let pr = api(&server, "presence", json!({"channel": "news"})).await;
    assert_eq!(
        pr["result"]["presence"].as_object().unwrap().len(),
        1,
        "{pr}"
    );
    let ps = api(&server, "presence_stats", json!({"channel": "news"})).await;
    assert_eq!(ps["result"], json!({"num_clients": 1, "num_users": 1}));
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn history_remove_starts_a_new_epoch() {
    let (db, server, _seen) = api_server().await;
    let _subscriber = news_with_two_publications(&server).await;
    let h = api(
        &server,
        "history",
        json!({"channel": "news", "limit": 1, "reverse": true}),
    )
    .await;
    // history_remove: a new epoch; the subscriber is told to resubscribe.
    let epoch = h["result"]["epoch"].clone();
    assert_eq!(
        api(&server, "history_remove", json!({"channel": "news"})).await,
        json!({"result": {}})
    );
    let h = api(&server, "history", json!({"channel": "news", "limit": -1})).await;
    assert_ne!(h["result"]["epoch"], epoch);
    assert_eq!(h["result"]["publications"], json!([]));
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn an_api_publish_on_a_rule_channel_goes_through_the_rule() {
    let (db, server, seen) = api_server().await;
    // A channel with a rule: the API's publication goes through the rule (the idempotency key is the
    // message id).
    let r = api(
        &server,
        "publish",
        json!({"channel": "outgoing-chat", "data": {"name": "chatMsg", "data": {"username": "backend", "content": "hi"}}, "idempotency_key": "k-1"}),
    )
    .await;
    assert_eq!(r, json!({"result": {}}), "{r}");
    let env = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(env["channel"], "outgoing-chat");
    assert_eq!(env["messages"][0]["id"], "k-1");
    assert_eq!(env["messages"][0]["clientId"], "api");
    assert_eq!(env["messages"][0]["name"], "chatMsg");
    let r = api(
        &server,
        "publish",
        json!({"channel": "outgoing-chat", "data": {"no": "name"}}),
    )
    .await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn api_is_off_without_a_key() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/info", server.addr))
        .header("X-API-Key", "anything-anything")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn relay_publish_follows_its_transaction() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let mut c = Client::connected(&server.ws_url()).await;
    c.call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;

    // Rolled back: nothing, neither the row nor the publication.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT relay.publish('incoming-chat', '{\"note\":\"rolled back\"}')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // Committed: the row change and the publication, once each, in the transaction's order.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
         VALUES ('m1', 'sql', 'first', 'c', 0)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("SELECT relay.publish('incoming-chat', '{\"note\":\"between\"}')")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE chat_data SET msg_data = 'second' WHERE msg_id = 'm1'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let first = c.next_pub("incoming-chat").await;
    let second = c.next_pub("incoming-chat").await;
    let third = c.next_pub("incoming-chat").await;
    assert_eq!(first["data"]["type"], "INSERT");
    assert_eq!(second["data"], json!({"note": "between"}));
    assert_eq!(third["data"]["type"], "UPDATE");
    assert_eq!(
        [&first, &second, &third].map(|p| p["offset"].as_u64().unwrap()),
        [1, 2, 3]
    );
    assert!(
        c.try_next(std::time::Duration::from_millis(500))
            .await
            .is_none_or(|m| m["push"].is_null()),
        "nothing else (the rolled-back publication never comes)"
    );
    let h: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.publications")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(h, 3);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn user_notifications_reach_every_connection_of_the_user_and_no_one_else() {
    let db = TestDb::new().await;
    let config = config_json(
        &db.url,
        json!({
            "api": {"key": KEY},
            "auth": {"hmac_secret_key": SECRET},
            "channels": [
                {"channel": "notifications#*", "subscribe": "authenticated", "user_limited": true},
                {"channel": "news", "subscribe": "anyone"}
            ]
        }),
    );
    let server = Server::start(&config).await;
    let mut alice1 = connected_as(&server.ws_url(), "alice").await;
    let mut alice2 = connected_as(&server.ws_url(), "alice").await;
    let mut bob = connected_as(&server.ws_url(), "bob").await;
    for c in [&mut alice1, &mut alice2] {
        let r = c
            .call(json!({"subscribe": {"channel": "notifications#alice"}}))
            .await;
        assert!(r["subscribe"].is_object(), "{r}");
    }
    let r = bob
        .call(json!({"subscribe": {"channel": "notifications#alice"}}))
        .await;
    assert_eq!(
        r["error"]["code"], 103,
        "another user's personal channel: {r}"
    );
    bob.call(json!({"subscribe": {"channel": "notifications#bob"}}))
        .await;

    // Through the API (broadcast to the users' personal channels) and through SQL.
    let r = api(
        &server,
        "broadcast",
        json!({"channels": ["notifications#alice"], "data": {"text": "order shipped"}}),
    )
    .await;
    assert_eq!(r["result"]["responses"][0]["result"]["offset"], 1, "{r}");
    let n: i32 =
        sqlx::query_scalar("SELECT relay.notify_users(ARRAY['alice'], '{\"text\":\"from sql\"}')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(n, 1);
    for c in [&mut alice1, &mut alice2] {
        assert_eq!(
            c.next_pub("notifications#alice").await["data"]["text"],
            "order shipped"
        );
        assert_eq!(
            c.next_pub("notifications#alice").await["data"]["text"],
            "from sql"
        );
    }
    let m = bob.try_next(std::time::Duration::from_millis(500)).await;
    assert!(
        m.as_ref().is_none_or(|m| m["push"].is_null()),
        "bob got {m:?}"
    );

    let r = api(&server, "disconnect", json!({"user": ""})).await;
    assert_eq!(r["error"]["code"], 107, "{r}");

    // disconnect: every connection of the user, on every node, with the given code.
    let r = api(
        &server,
        "disconnect",
        json!({"user": "alice", "disconnect": {"code": 4501, "reason": "account closed"}}),
    )
    .await;
    assert_eq!(r, json!({"result": {}}));
    for c in [&mut alice1, &mut alice2] {
        let closed = c.closed().await;
        assert_eq!(
            (closed.code, closed.reason.as_str()),
            (4501, "account closed")
        );
    }
    let r = bob
        .call(json!({"presence_stats": {"channel": "news"}}))
        .await;
    assert!(r["error"].is_object(), "bob's connection still works: {r}");
    server.stop().await;
    db.drop_db().await;
}
