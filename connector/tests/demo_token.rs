//! The demo token endpoint: off by default; when on, it mints a connection token the connector accepts.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

const SECRET: &str = "a-demo-secret-of-at-least-thirty-two-bytes";

#[tokio::test]
async fn off_by_default_and_mints_accepted_tokens_when_on() {
    let db = TestDb::new().await;
    let http = reqwest::Client::new();

    let server = Server::start(&config_json(
        &db.url,
        json!({"auth": {"hmac_secret_key": SECRET}}),
    ))
    .await;
    let r = http
        .post(format!("http://{}/demo/token", server.addr))
        .json(&json!({"user": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "off unless demo.token_endpoint is set");
    server.stop().await;

    let config = json!({"auth": {"hmac_secret_key": SECRET}, "demo": {"token_endpoint": true, "token_ttl_secs": 600}});
    let server = Server::start(&config_json(&db.url, config)).await;
    let url = format!("http://{}/demo/token", server.addr);
    let body: Value = http
        .post(&url)
        .json(&json!({"user": "alice"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["user"], "alice");
    assert_eq!(body["expires_in"], 600);
    let token = body["token"].as_str().unwrap();

    let mut c = Client::connect(&server.ws_url()).await;
    let reply = c.call(json!({"connect": {"token": token}})).await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    assert_eq!(reply["connect"]["expires"], true, "{reply}");

    for bad in [
        json!({"user": ""}),
        json!({"user": "a b"}),
        json!({"user": "x".repeat(65)}),
        json!({"name": "a"}),
    ] {
        let r = http.post(&url).json(&bad).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    server.stop().await;

    // It cannot be turned on without an HMAC key.
    let e = connector::Config::from_json(&config_json(
        &db.url,
        json!({"demo": {"token_endpoint": true}}),
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("demo.token_endpoint"), "{e}");
    db.drop_db().await;
}
