//! `rpc` end to end: a method with an `rpc[]` rule goes to the rule's target (a webhook here) and
//! the caller gets the target's data; a refusal maps like a publish refusal (420-422 with the
//! target's reason); a method without a rule is 108 "not available"; JSON and Protobuf.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::routing::post;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use relay_protocol::pb::messages::{Command, ConnectRequest, Reply, RpcRequest};
use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

/// A webhook answering by method (the envelope's message name).
async fn hook() -> String {
    async fn answer(Json(env): Json<Value>) -> axum::response::Response {
        use axum::response::IntoResponse;
        assert_eq!(env["source"], json!("rpc"));
        let m = &env["messages"][0];
        let id = m["id"].as_str().unwrap().to_owned();
        let data: Value = match m["encoding"].as_str() {
            Some("json") => serde_json::from_str(m["data"].as_str().unwrap()).unwrap(),
            _ => m["data"].clone(),
        };
        match m["name"].as_str().unwrap() {
            "app.echo" => Json(json!({"results": [{"id": id, "status": "accepted",
                "data": {"echo": data, "caller": m["clientId"]}}]}))
            .into_response(),
            "app.plain" => Json(json!({"sum": 3})).into_response(),
            "app.empty" => axum::http::StatusCode::NO_CONTENT.into_response(),
            "app.refuse" => Json(json!({"results": [{"id": id, "status": "rejected",
                "reason": "not for you"}]}))
            .into_response(),
            "app.invalid" => {
                Json(json!({"results": [{"id": id, "status": "invalid"}]})).into_response()
            }
            _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    }
    let app = Router::new().route("/rpc", post(answer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/rpc")
}

/// A server whose `app.*` methods go to [`hook`] and `writer.*` methods to the real writer.
async fn rpc_server(db: &TestDb) -> Server {
    let url = hook().await;
    let endpoint = db.local_writer().await;
    let config = config_json(
        &db.url,
        json!({"rpc": [{"method": "app.*", "target": {"type": "http", "url": url},
            "retries": 0, "timeout_ms": 2000},
            {"method": "writer.*", "target": {"type": "lambda", "function": "writer",
            "endpoint": endpoint}}]}),
    );
    Server::start(&config).await
}

#[tokio::test]
async fn an_rpc_gets_the_targets_data_and_the_caller_is_identified() {
    let db = TestDb::new().await;
    let server = rpc_server(&db).await;
    let mut c = Client::connected(&server.ws_url()).await;
    let client_id = {
        // The anonymous caller's identity is its connection id.
        let r = c
            .call(json!({"rpc": {"method": "app.echo", "data": {"a": 1}}}))
            .await;
        assert_eq!(r["rpc"]["data"]["echo"], json!({"a": 1}), "{r}");
        r["rpc"]["data"]["caller"].as_str().unwrap().to_owned()
    };
    assert!(!client_id.is_empty());

    let r = c
        .call(json!({"rpc": {"method": "app.plain", "data": {}}}))
        .await;
    assert_eq!(
        r["rpc"]["data"],
        json!({"sum": 3}),
        "an answer without results is the data: {r}"
    );
    let r = c.call(json!({"rpc": {"method": "app.empty"}})).await;
    assert_eq!(r["rpc"], json!({}), "no answer body, no data: {r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_targets_refusal_or_failure_is_the_callers_error() {
    let db = TestDb::new().await;
    let server = rpc_server(&db).await;
    let mut c = Client::connected(&server.ws_url()).await;
    let r = c
        .call(json!({"rpc": {"method": "app.refuse", "data": {}}}))
        .await;
    assert_eq!(r["error"]["code"], json!(420), "{r}");
    assert_eq!(r["error"]["message"], json!("not for you"), "{r}");
    let r = c
        .call(json!({"rpc": {"method": "app.invalid", "data": {}}}))
        .await;
    assert_eq!(r["error"]["code"], json!(421), "{r}");
    let r = c
        .call(json!({"rpc": {"method": "app.broken", "data": {}}}))
        .await;
    assert_eq!(r["error"]["code"], json!(100), "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn the_writer_reports_an_rpc_skipped() {
    let db = TestDb::new().await;
    let server = rpc_server(&db).await;
    let mut c = Client::connected(&server.ws_url()).await;
    // The writer handles no rpc method: it reports the message skipped, which is 422.
    let r = c
        .call(json!({"rpc": {"method": "writer.stats", "data": {}}}))
        .await;
    assert_eq!(r["error"]["code"], json!(422), "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_method_without_a_rule_is_not_available() {
    let db = TestDb::new().await;
    let server = rpc_server(&db).await;
    let mut c = Client::connected(&server.ws_url()).await;
    for method in ["other", "", "app"] {
        let r = c.call(json!({"rpc": {"method": method, "data": {}}})).await;
        assert_eq!(r["error"]["code"], json!(108), "{method:?}: {r}");
    }
    let r = c
        .call(json!({"rpc": {"method": "x".repeat(300), "data": {}}}))
        .await;
    assert_eq!(r["error"]["code"], json!(107), "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn protobuf_rpc_carries_the_data_as_bytes() {
    let db = TestDb::new().await;
    let server = rpc_server(&db).await;
    // Protobuf: the same call, the data as the reply's bytes.
    let (mut ws, _) = connect_async(format!("{}?cf_protocol=protobuf", server.ws_url()))
        .await
        .unwrap();
    let mut frame = Vec::new();
    Command {
        id: 1,
        connect: Some(ConnectRequest::default()),
        ..Default::default()
    }
    .encode_length_delimited(&mut frame)
    .unwrap();
    Command {
        id: 2,
        rpc: Some(RpcRequest {
            method: "app.echo".into(),
            data: br#"{"b":2}"#.to_vec().into(),
        }),
        ..Default::default()
    }
    .encode_length_delimited(&mut frame)
    .unwrap();
    Command {
        id: 3,
        rpc: Some(RpcRequest {
            method: "nothing".into(),
            data: b"{}".to_vec().into(),
        }),
        ..Default::default()
    }
    .encode_length_delimited(&mut frame)
    .unwrap();
    ws.send(Message::Binary(frame.into())).await.unwrap();
    let mut replies: Vec<Reply> = Vec::new();
    while replies.iter().filter(|r| r.id > 1).count() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Binary(b))) => {
                let mut rest = &b[..];
                while !rest.is_empty() {
                    replies.push(Reply::decode_length_delimited(&mut rest).unwrap());
                }
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let echo = replies.iter().find(|r| r.id == 2).unwrap();
    let data: Value = serde_json::from_slice(&echo.rpc.as_ref().unwrap().data).unwrap();
    assert_eq!(data["echo"], json!({"b": 2}));
    let none = replies.iter().find(|r| r.id == 3).unwrap();
    assert_eq!(none.error.as_ref().unwrap().code, 108);
    server.stop().await;
    db.drop_db().await;
}
