//! End-to-end protocol tests: a real connector on port 0, a fresh database, raw WebSocket clients.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Client, Server, TestDb, config_json};

#[tokio::test]
async fn changes_arrive_in_order_and_history_keeps_them() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;

    let mut c = Client::connected(&server.ws_url()).await;
    let sub = c.call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true, "positioned": true}})).await;
    assert_eq!(sub["subscribe"]["recoverable"], true, "{sub}");
    assert_eq!(sub["subscribe"]["offset"], 0);
    let first_epoch = sub["subscribe"]["epoch"].as_str().unwrap().to_owned();
    assert!(
        !first_epoch.is_empty(),
        "a fresh channel has an epoch: {sub}"
    );

    db.insert_chat("m1", "hello").await;
    let p1 = c.next_pub("incoming-chat").await;
    assert_eq!(p1["offset"], 1);
    assert_eq!(p1["data"]["type"], "INSERT");
    assert_eq!(p1["data"]["table"], "chat_data");
    assert_eq!(p1["data"]["row"]["msg_data"], "hello");
    sqlx::query("UPDATE chat_data SET msg_data = 'edited', is_edited = true WHERE msg_id = 'm1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let p2 = c.next_pub("incoming-chat").await;
    assert_eq!(p2["offset"], 2);
    assert_eq!(p2["data"]["type"], "UPDATE");
    assert_eq!(p2["data"]["old"]["msg_data"], "hello");
    assert_eq!(p2["data"]["row"]["is_edited"], true);

    let h = c
        .call(json!({"history": {"channel": "incoming-chat", "limit": 10}}))
        .await;
    let pubs = h["history"]["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 2);
    assert_eq!(pubs[0]["offset"], 1);
    assert_eq!(pubs[1]["offset"], 2);
    assert_eq!(h["history"]["offset"], 2);
    let epoch = h["history"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        epoch, first_epoch,
        "the epoch given at subscribe is the one publications carry"
    );

    // Position only, reverse, since.
    let h0 = c
        .call(json!({"history": {"channel": "incoming-chat", "limit": 0}}))
        .await;
    assert!(h0["history"].get("publications").is_none());
    assert_eq!(h0["history"]["offset"], 2);
    let hr = c
        .call(json!({"history": {"channel": "incoming-chat", "limit": 1, "reverse": true}}))
        .await;
    assert_eq!(hr["history"]["publications"][0]["offset"], 2);
    let hs = c.call(json!({"history": {"channel": "incoming-chat", "limit": -1, "since": {"offset": 1, "epoch": epoch}}})).await;
    assert_eq!(hs["history"]["publications"].as_array().unwrap().len(), 1);
    let bad = c.call(json!({"history": {"channel": "incoming-chat", "limit": 5, "since": {"offset": 1, "epoch": "other"}}})).await;
    assert_eq!(bad["error"]["code"], 112);
    server.stop().await;
    db.drop_db().await;
}

/// A client subscribed to `incoming-chat` (recoverable, positioned) that has received `n` inserted
/// rows (`m1`..); the channel's epoch.
async fn subscribed_after(db: &TestDb, server: &Server, n: usize) -> (Client, String) {
    let mut c = Client::connected(&server.ws_url()).await;
    let sub = c
        .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true, "positioned": true}}))
        .await;
    let epoch = sub["subscribe"]["epoch"].as_str().unwrap().to_owned();
    for i in 1..=n {
        db.insert_chat(&format!("m{i}"), "before").await;
        c.next_pub("incoming-chat").await;
    }
    (c, epoch)
}

#[tokio::test]
async fn changes_while_away_are_recovered_on_resubscribe() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let (c, epoch) = subscribed_after(&db, &server, 2).await;
    drop(c);

    // Changes committed while the client is away are recovered on resubscribe.
    db.insert_chat("m12", "while away 1").await;
    db.insert_chat("m13", "while away 2").await;
    let mut c = Client::connected(&server.ws_url()).await;
    let r = c
        .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true, "positioned": true, "recover": true, "offset": 2, "epoch": epoch}}))
        .await;
    assert_eq!(r["subscribe"]["was_recovering"], true, "{r}");
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    // What was sequenced before the subscribe comes in the reply, the rest live: together, every
    // missed row once, in order.
    let recovered = c.recovered_then_live(&r, "incoming-chat", 2).await;
    assert_eq!(
        recovered
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(recovered[1]["data"]["row"]["msg_data"], "while away 2");
    db.insert_chat("m14", "live again").await;
    assert_eq!(c.next_pub("incoming-chat").await["offset"], 5);

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_wrong_epoch_is_not_recovered() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let _c = subscribed_after(&db, &server, 5).await;

    // A wrong epoch cannot be recovered: recovered=false with the current position, no publications.
    let mut d = Client::connected(&server.ws_url()).await;
    let r = d
        .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true, "recover": true, "offset": 1, "epoch": "stale-epoch"}}))
        .await;
    assert_eq!(r["subscribe"]["was_recovering"], true);
    assert!(r["subscribe"].get("recovered").is_none(), "{r}");
    assert!(r["subscribe"].get("publications").is_none());
    assert_eq!(r["subscribe"]["offset"], 5);
    // ...and with flag 2 (reject unrecovered) it is error 112.
    let mut e = Client::connected(&server.ws_url()).await;
    let r = e
        .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true, "recover": true, "offset": 1, "epoch": "stale-epoch", "flag": 2}}))
        .await;
    assert_eq!(r["error"]["code"], 112);

    server.stop().await;
    db.drop_db().await;
}

/// A server whose clients' frames are limited to 4096 bytes.
async fn bad_input_server(db: &TestDb) -> Server {
    Server::start(&config_json(
        &db.url,
        json!({"client": {"max_message_bytes": 4096}}),
    ))
    .await
}

#[tokio::test]
async fn bad_frames_close_with_documented_codes_and_others_are_unaffected() {
    let db = TestDb::new().await;
    let server = bad_input_server(&db).await;
    let url = server.ws_url();

    // A bystander subscribed the whole time.
    let mut bystander = Client::connected(&url).await;
    bystander
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;

    let cases: Vec<(&str, String, u16)> = vec![
        ("malformed json", "{not json".to_owned(), 3501),
        (
            "unknown command",
            r#"{"id":1,"frobnicate":{}}"#.to_owned(),
            3501,
        ),
        (
            "command before connect",
            r#"{"id":1,"subscribe":{"channel":"x"}}"#.to_owned(),
            3501,
        ),
        (
            "blank line",
            "{\"id\":1,\"connect\":{}}\n\n{}".to_owned(),
            3501,
        ),
        ("json array", "[1,2]".to_owned(), 3501),
        (
            "oversized frame",
            format!(r#"{{"id":1,"connect":{{"data":"{}"}}}}"#, "x".repeat(5000)),
            1009,
        ),
    ];
    for (name, frame, code) in cases {
        let mut c = Client::connect(&url).await;
        c.send_raw(&frame).await;
        let closed = c.closed().await;
        assert_eq!(closed.code, code, "{name}: {closed:?}");
        assert!(
            !closed.reason.is_empty(),
            "{name}: close reason must not be empty"
        );
    }

    let mut c = Client::connected(&url).await;
    c.send_raw(r#"{"id":9,"connect":{}}"#).await;
    assert_eq!(c.closed().await.code, 3501, "second connect");

    // A binary frame on the JSON protocol.
    let mut b = Client::connected(&url).await;
    b.send_binary(vec![1, 2, 3]).await;
    assert_eq!(b.closed().await.code, 3506);

    // Nothing was written, and the bystander still gets changes.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_data")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    db.insert_chat("after", "still here").await;
    let p = bystander.next_pub("incoming-chat").await;
    assert_eq!(p["offset"], 1);

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn bad_commands_get_documented_errors() {
    let db = TestDb::new().await;
    let server = bad_input_server(&db).await;
    let url = server.ws_url();

    let mut c = Client::connected(&url).await;
    let r = c
        .call(
            json!({"publish": {"channel": "incoming-chat", "data": {"type": "INSERT", "row": {}}}}),
        )
        .await;
    assert_eq!(
        r["error"]["code"], 103,
        "table-fed channels are not publishable: {r}"
    );
    let r = c
        .call(json!({"subscribe": {"channel": "bad channel"}}))
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");
    let r = c
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    assert!(r.get("error").is_none());
    let r = c
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    assert_eq!(r["error"]["code"], 105, "already subscribed");
    let r = c.call(json!({"rpc": {"method": "nope"}})).await;
    assert_eq!(r["error"]["code"], 108, "no rpc[] rule: not available");
    let r = c
        .call(json!({"presence": {"channel": "incoming-chat"}}))
        .await;
    assert_eq!(r["error"]["code"], 108);
    let r = c
        .call(json!({"unsubscribe": {"channel": "never-subscribed"}}))
        .await;
    assert_eq!(r["unsubscribe"], json!({}));
    let r = c.call(json!({"history": {"channel": "incoming-chat", "since": {"offset": 0, "epoch": ""}, "reverse": true, "limit": 1}})).await;
    assert_eq!(r["error"]["code"], 107);

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_data")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing written");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn plain_pubsub_pings_and_batched_first_frame() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(
        &db.url,
        json!({"client": {"ping_interval_secs": 1, "pong_timeout_secs": 1}}),
    ))
    .await;

    // centrifuge-js sends connect and subscribe in one frame.
    let mut a = Client::connect(&server.ws_url()).await;
    a.send_raw("{\"connect\":{\"name\":\"js\"},\"id\":1}\n{\"subscribe\":{\"channel\":\"news\",\"recoverable\":true,\"positioned\":true,\"flag\":1},\"id\":2}")
        .await;
    let r1 = a.next_message().await;
    assert_eq!(r1["id"], 1);
    let r2 = a.next_message().await;
    assert_eq!(r2["id"], 2, "{r2}");
    assert_eq!(r2["subscribe"]["offset"], 0);

    let mut b = Client::connected(&server.ws_url()).await;
    let r = b
        .call(json!({"publish": {"channel": "news", "data": {"text": "hi"}}}))
        .await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let p = a.next_pub("news").await;
    assert_eq!(p["data"]["text"], "hi");
    assert_eq!(p["offset"], 1);
    assert_eq!(p["info"]["client"].as_str().unwrap().len(), 36);

    // Pings arrive as {} on a timer; a client that answers stays connected past the pong timeout.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while tokio::time::Instant::now() < until {
        if let Some(m) = a.try_next(Duration::from_millis(200)).await
            && m == json!({})
        {
            pings += 1;
            a.send_raw("{}").await;
        }
    }
    assert!(pings >= 2, "pings: {pings}");
    // b never answered its pings: closed with 3012 (no pong).
    let closed = b.closed().await;
    assert_eq!(closed.code, 3012, "{closed:?}");

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn graceful_shutdown_closes_with_reconnect_code() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let mut c = Client::connected(&server.ws_url()).await;
    c.call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    let stopping = tokio::spawn(server.stop());
    let closed = c.closed().await;
    assert_eq!(closed.code, 3001);
    assert_eq!(closed.reason, "shutdown");
    stopping.await.unwrap();
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_dropped_and_never_slows_the_others() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(
        &db.url,
        json!({"client": {"outbound_queue": 256, "outbound_queue_bytes": 8388608, "write_timeout_secs": 3}}),
    ))
    .await;
    let mut reader = Client::connected(&server.ws_url()).await;
    reader
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    let mut stalled = Client::connected(&server.ws_url()).await;
    stalled
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;

    // ~24 MB of rows: more than socket buffers (a few MB) and the mailbox (8 MiB) hold, so the
    // stalled client's mailbox fills, while the reader (generous limits, so a loaded machine does not
    // make it look stalled too) keeps up.
    let text = "x".repeat(40 * 1024);
    let rows = 600;
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            for i in 0..rows {
                sqlx::query(
                    "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
                     VALUES ($1, 'w', $2, 'w', 0)",
                )
                .bind(format!("r{i}"))
                .bind(&text)
                .execute(&pool)
                .await
                .unwrap();
            }
        })
    };
    for i in 1..=rows {
        assert_eq!(reader.next_pub("incoming-chat").await["offset"], i);
    }
    writer.await.unwrap();

    // The stalled client was cut off: it holds only part of the stream, then the connection ends.
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stalled.raw_next())
            .await
            .unwrap()
        {
            Some(m) if m["push"]["pub"].is_object() => got += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert!(got < rows, "stalled client got {got} of {rows}");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("relay_slow_disconnects_total 1"),
        "{metrics}"
    );

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_subscription_type_that_is_not_a_stream_is_refused() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let mut c = Client::connected(&server.ws_url()).await;
    // Centrifugo 6.8's map (1) and shared-poll (2) subscriptions: an explicit 108, never a stream.
    for kind in [1, 2] {
        let r = c
            .call(json!({"subscribe": {"channel": "incoming-chat", "type": kind}}))
            .await;
        assert_eq!(r["error"]["code"], 108, "{r}");
    }
    let r = c
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    assert!(
        r["subscribe"].is_object(),
        "no subscription was left behind: {r}"
    );
    server.stop().await;
    db.drop_db().await;
}
