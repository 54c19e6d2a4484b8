//! Server-side subscriptions: the personal channel (`client.personal_channel`) and the token's
//! `channels` claim are subscribed at connect, reported in the connect reply's `subs`, delivered like
//! any subscription, and recovered through the connect request's `subs` on reconnect.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

const SECRET: &str = "server-side-test-secret-0123456789abcdef";

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn config(db: &TestDb) -> String {
    config_json(
        &db.url,
        json!({
            "client": {"allow_anonymous": true, "personal_channel": "#{user}"},
            "auth": {"hmac_secret_key": SECRET},
            "channels": [
                {"channel": "#*", "user_limited": true, "publish": "subscriber", "history": "subscriber"},
                {"channel": "news", "history": "subscriber"}
            ]
        }),
    )
}

async fn publish_sql(db: &TestDb, channel: &str, n: u32) {
    sqlx::query("SELECT relay.publish($1, jsonb_build_object('n', $2::int))")
        .bind(channel)
        .bind(i32::try_from(n).unwrap())
        .execute(&db.pool)
        .await
        .unwrap();
}

async fn connect(server: &Server, connect: Value) -> (Client, Value) {
    let mut c = Client::connect(&server.ws_url()).await;
    let r = c.call(json!({ "connect": connect })).await;
    (c, r)
}

#[tokio::test]
async fn personal_channel_and_claimed_channels_are_subscribed_at_connect() {
    let db = TestDb::new().await;
    let server = Server::start(&config(&db)).await;
    let t =
        token(json!({"sub": "42", "exp": 4_000_000_000u64, "channels": ["news", "bad channel!"]}));
    let (mut c, r) = connect(&server, json!({"token": t})).await;
    let subs = r["connect"]["subs"]
        .as_object()
        .unwrap_or_else(|| panic!("{r}"));
    let mut names: Vec<&String> = subs.keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["#42", "news"],
        "invalid claimed names are left out: {r}"
    );
    assert_eq!(subs["#42"]["recoverable"], true);
    assert!(subs["#42"]["epoch"].is_string(), "{r}");

    // Publications reach it like any subscription's; the personal channel counts as subscribed for
    // the `subscriber` permissions.
    publish_sql(&db, "#42", 1).await;
    assert_eq!(c.next_pub("#42").await["data"]["n"], 1);
    publish_sql(&db, "news", 2).await;
    assert_eq!(c.next_pub("news").await["data"]["n"], 2);
    let h = c
        .call(json!({"history": {"channel": "#42", "limit": -1}}))
        .await;
    assert_eq!(h["history"]["offset"], 1, "{h}");
    // A client-side subscribe of the same channel is a duplicate.
    let dup = c.call(json!({"subscribe": {"channel": "news"}})).await;
    assert_eq!(dup["error"]["code"], 105, "{dup}");

    // An anonymous connection has no personal channel.
    let (_anon, r) = connect(&server, json!({})).await;
    assert!(r["connect"].get("subs").is_none(), "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn server_side_subscriptions_recover_through_the_connect_request() {
    let db = TestDb::new().await;
    let server = Server::start(&config(&db)).await;
    let t = token(json!({"sub": "7", "exp": 4_000_000_000u64}));
    let (c, r) = connect(&server, json!({"token": t})).await;
    let epoch = r["connect"]["subs"]["#7"]["epoch"].clone();
    drop(c);
    for n in 1..=3 {
        publish_sql(&db, "#7", n).await;
    }
    // The history holds them before the reconnect (relay.publish is sequenced after its commit).
    let mut probe = Client::connect(&server.ws_url()).await;
    probe.call(json!({"connect": {"token": t}})).await;
    for _ in 0..300 {
        let h = probe
            .call(json!({"history": {"channel": "#7", "limit": 0}}))
            .await;
        if h["history"]["offset"] == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (_c, r) = connect(
        &server,
        json!({"token": t, "subs": {"#7": {"recover": true, "offset": 0, "epoch": epoch}}}),
    )
    .await;
    let sub = &r["connect"]["subs"]["#7"];
    assert_eq!(sub["was_recovering"], true, "{r}");
    assert_eq!(sub["recovered"], true, "{r}");
    let offsets: Vec<u64> = sub["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2, 3]);
    // Another epoch cannot be recovered: recovered=false and the current position.
    let (_c, r) = connect(
        &server,
        json!({"token": t, "subs": {"#7": {"recover": true, "offset": 1, "epoch": "elsewhere"}}}),
    )
    .await;
    let sub = &r["connect"]["subs"]["#7"];
    assert!(sub.get("recovered").is_none(), "{r}");
    assert_eq!(sub["offset"], 3);
    server.stop().await;
    db.drop_db().await;
}
