//! The publish path: client publications on rule-bound channels reach the rule's target as an
//! Ably-style envelope, and the client's reply waits for the target's answer.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

#[derive(Clone, Default)]
struct Target {
    seen: Arc<Mutex<Vec<(String, Value)>>>,
}

async fn invoke(
    State(t): State<Target>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: String,
) -> (StatusCode, HeaderMap, String) {
    let env: Value = serde_json::from_str(&body).unwrap();
    let fail = env["messages"][0]["name"] == "fail";
    let unavailable = env["messages"][0]["name"] == "unavailable";
    assert_eq!(headers.get("content-type").unwrap(), "application/json");
    t.seen.lock().unwrap().push((uri.path().to_owned(), env));
    let mut h = HeaderMap::new();
    if fail {
        h.insert("X-Amz-Function-Error", "Unhandled".parse().unwrap());
        return (
            StatusCode::OK,
            h,
            r#"{"errorMessage":"boom","errorType":"Error"}"#.into(),
        );
    }
    if unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, h, "try later".into());
    }
    (StatusCode::OK, h, r#"{"ok":true}"#.into())
}

async fn fake_target() -> (String, Target) {
    let target = Target::default();
    let app = Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .route("/hook", post(invoke))
        .with_state(target.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), target)
}

#[tokio::test]
async fn rule_targets_get_the_envelope_and_the_reply_waits_for_them() {
    let db = TestDb::new().await;
    let (base, target) = fake_target().await;
    let config = config_json(
        &db.url,
        json!({
            "client": {"allow_publish": false},
            "rules": [
                {"channel": "outgoing-chat", "target": {"type": "lambda", "function": "chat-writer", "endpoint": base}},
                {"channel": "hooks:*", "target": {"type": "http", "url": format!("{base}/hook")}, "timeout_ms": 2000}
            ]
        }),
    );
    let server = Server::start(&config).await;
    let mut c = Client::connected(&server.ws_url()).await;

    let r = c
        .call(json!({"publish": {"channel": "outgoing-chat", "data": {"name": "chatMsg", "data": {"username": "alice", "content": "hi", "clientId": "forged"}}}}))
        .await;
    assert_eq!(r["publish"], json!({}), "{r}");
    {
        let seen = target.seen.lock().unwrap();
        let (path, env) = &seen[0];
        assert_eq!(path, "/2015-03-31/functions/chat-writer/invocations");
        assert_eq!(env["source"], "channel.message");
        assert_eq!(env["channel"], "outgoing-chat");
        let m = &env["messages"][0];
        assert_eq!(m["name"], "chatMsg");
        assert_eq!(m["encoding"], "json");
        let data: Value = serde_json::from_str(m["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["content"], "hi");
        let sender = m["clientId"].as_str().unwrap();
        assert_ne!(sender, "forged", "identity comes from the connection");
        assert_eq!(
            sender,
            m["connectionId"].as_str().unwrap(),
            "anonymous: the client id"
        );
        assert!(!m["id"].as_str().unwrap().is_empty());
        assert!(m["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    }

    // A function error is an error reply, never silence.
    let r = c
        .call(
            json!({"publish": {"channel": "outgoing-chat", "data": {"name": "fail", "data": {}}}}),
        )
        .await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["temporary"], true);
    let r = c.call(json!({"publish": {"channel": "hooks:a", "data": {"name": "unavailable", "data": "text"}}})).await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    let r = c.call(json!({"publish": {"channel": "hooks:a", "data": {"name": "ok", "data": "plain text"}}})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    {
        let seen = target.seen.lock().unwrap();
        let (path, env) = seen.last().unwrap();
        assert_eq!(path, "/hook");
        assert_eq!(env["messages"][0]["data"], "plain text");
        assert!(env["messages"][0].get("encoding").is_none());
    }

    // Data not of the {name, data} shape is refused before reaching the target.
    let before = target.seen.lock().unwrap().len();
    let r = c
        .call(json!({"publish": {"channel": "outgoing-chat", "data": [1, 2]}}))
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    // Without allow_publish, a channel with no rule is not publishable.
    let r = c
        .call(json!({"publish": {"channel": "free", "data": {}}}))
        .await;
    assert_eq!(r["error"]["code"], 103, "{r}");
    assert_eq!(target.seen.lock().unwrap().len(), before);

    // An unreachable target is an error reply too.
    let dead = config_json(
        &db.url,
        json!({"rules": [{"channel": "outgoing-chat", "target": {"type": "lambda", "function": "f", "endpoint": "http://127.0.0.1:9"}, "timeout_ms": 1000}]}),
    );
    server.stop().await;
    let server = Server::start(&dead).await;
    let mut c = Client::connected(&server.ws_url()).await;
    let r = c.call(json!({"publish": {"channel": "outgoing-chat", "data": {"name": "chatMsg", "data": {}}}})).await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["message"], "publish target unavailable");

    server.stop().await;
    db.drop_db().await;
}

#[test]
fn check_refuses_an_invalid_config_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("relay-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"database":{"url":"postgres://x/y"},"mappings":[{"table":"chat_data; drop table x","operations":["INSERT"],"channel":"c"}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_connector"))
        .args(["--config", bad.to_str().unwrap(), "check"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mappings[0].table"), "{stderr}");

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_connector"))
        .args(["--config", shipped, "check"])
        // No database there: the file's checks pass; the database checks are reported as not run.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/relay")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_connector"))
        .args(["--config", "/nonexistent/config.json", "check"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_failing_target_is_retried_with_the_same_message_id() {
    use std::collections::HashMap;

    #[derive(Clone, Default)]
    struct Flaky {
        attempts: Arc<Mutex<HashMap<String, u32>>>,
    }
    async fn flaky(State(f): State<Flaky>, body: String) -> StatusCode {
        let env: Value = serde_json::from_str(&body).unwrap();
        let id = env["messages"][0]["id"].as_str().unwrap().to_owned();
        let mut attempts = f.attempts.lock().unwrap();
        let n = attempts.entry(id).or_insert(0);
        *n += 1;
        if *n == 1 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    }
    let flaky_state = Flaky::default();
    let app = Router::new()
        .route("/hook", post(flaky))
        .with_state(flaky_state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let db = TestDb::new().await;
    let config = config_json(
        &db.url,
        json!({"rules": [{"channel": "flaky", "target": {"type": "http", "url": format!("http://{addr}/hook")}, "retries": 2, "retry_backoff_ms": 10}]}),
    );
    let server = Server::start(&config).await;
    let mut c = Client::connected(&server.ws_url()).await;
    let r = c
        .call(json!({"publish": {"channel": "flaky", "data": {"name": "n", "data": {}}}}))
        .await;
    assert_eq!(r["publish"], json!({}), "the retry succeeded: {r}");
    let attempts = flaky_state.attempts.lock().unwrap().clone();
    assert_eq!(
        attempts.len(),
        1,
        "one message id across the attempts: {attempts:?}"
    );
    assert_eq!(attempts.values().copied().collect::<Vec<_>>(), [2]);
    server.stop().await;
    db.drop_db().await;
}
