//! Presence: members, stats, join/leave pushes (asked for, or forced by the channel), caps, leaving on close, across two nodes, and the
//! expiry of a dead node's members.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

fn presence_config(db: &TestDb) -> String {
    presence_config_on(db, "postgres")
}

fn presence_config_on(db: &TestDb, engine: &str) -> String {
    config_json(
        &db.url,
        json!({
            "presence": {
                "engine": engine,
                "node_ttl_secs": 3,
                "channels": [
                    {"channel": "room:capped", "max_members": 2},
                    {"channel": "room:forced", "force_push_join_leave": true},
                    {"channel": "room:*", "info_from_subscribe_data": true},
                    {"channel": "quiet:*", "join_leave": false}
                ]
            }
        }),
    )
}

/// The next join or leave push on `channel` (other messages are skipped).
async fn next_event(c: &mut Client, channel: &str) -> (String, Value) {
    loop {
        let m = c.next_message().await;
        let push = &m["push"];
        if push["channel"] == json!(channel) {
            for kind in ["join", "leave"] {
                if push[kind].is_object() {
                    return (kind.to_owned(), push[kind]["info"].clone());
                }
            }
        }
    }
}

async fn presence_of(c: &mut Client, channel: &str) -> Value {
    let r = c.call(json!({"presence": {"channel": channel}})).await;
    r["presence"]["presence"].clone()
}

/// Polls the presence of `channel` until `pred` holds (at most 10 s).
async fn wait_presence(c: &mut Client, channel: &str, pred: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let p = presence_of(c, channel).await;
        if pred(&p) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "presence of {channel} never matched; last {}",
        presence_of(c, channel).await
    );
}

#[tokio::test]
async fn members_stats_join_leave_and_close() {
    members_stats_join_leave_and_close_on("postgres").await;
}

#[tokio::test]
async fn the_memory_engine_behaves_the_same_on_one_node() {
    members_stats_join_leave_and_close_on("memory").await;
}

async fn members_stats_join_leave_and_close_on(engine: &str) {
    let db = TestDb::new().await;
    let server = Server::start(&presence_config_on(&db, engine)).await;
    let mut a = Client::connected(&server.ws_url()).await;
    let r = a
        .call(json!({"subscribe": {"channel": "room:1", "join_leave": true, "data": {"username": "ada"}}}))
        .await;
    assert!(r["subscribe"].is_object(), "{r}");
    // Its own join comes after the reply.
    let (kind, info) = next_event(&mut a, "room:1").await;
    assert_eq!(kind, "join");
    let a_client = info["client"].as_str().unwrap().to_owned();
    assert_eq!(info["chan_info"], json!({"username": "ada"}));

    let mut b = Client::connected(&server.ws_url()).await;
    b.call(json!({"subscribe": {"channel": "room:1", "data": {"username": "bob"}}}))
        .await;
    let (kind, info) = next_event(&mut a, "room:1").await;
    assert_eq!(kind, "join");
    let b_client = info["client"].as_str().unwrap().to_owned();
    assert_eq!(info["chan_info"]["username"], "bob");

    let p = presence_of(&mut b, "room:1").await;
    assert_eq!(p.as_object().unwrap().len(), 2, "{p}");
    assert_eq!(p[&a_client]["client"], json!(a_client));
    assert_eq!(p[&a_client]["user"], "");
    let s = b
        .call(json!({"presence_stats": {"channel": "room:1"}}))
        .await;
    assert_eq!(
        s["presence_stats"],
        json!({"num_clients": 2, "num_users": 1})
    );

    let metrics = server.metrics().await;
    assert!(
        metrics.contains("\nrelay_presence_members 2\n"),
        "{metrics}"
    );

    // Unsubscribe: a leave.
    let r = b.call(json!({"unsubscribe": {"channel": "room:1"}})).await;
    assert_eq!(r["unsubscribe"], json!({}));
    let (kind, info) = next_event(&mut a, "room:1").await;
    assert_eq!(
        (kind.as_str(), info["client"].as_str()),
        ("leave", Some(b_client.as_str()))
    );

    // A connection that closes leaves at once.
    b.call(json!({"subscribe": {"channel": "room:1"}})).await;
    assert_eq!(next_event(&mut a, "room:1").await.0, "join");
    drop(b);
    let (kind, info) = next_event(&mut a, "room:1").await;
    assert_eq!(
        (kind.as_str(), info["client"].as_str()),
        ("leave", Some(b_client.as_str()))
    );
    let p = presence_of(&mut a, "room:1").await;
    assert_eq!(p.as_object().unwrap().len(), 1, "{p}");

    // Channels without presence: 108.
    let r = a.call(json!({"presence": {"channel": "other"}})).await;
    assert_eq!(r["error"]["code"], 108, "{r}");

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn forced_join_leave_reaches_subscribers_that_did_not_ask() {
    let db = TestDb::new().await;
    let server = Server::start(&presence_config(&db)).await;
    let mut a = Client::connected(&server.ws_url()).await;
    a.call(json!({"subscribe": {"channel": "room:forced"}}))
        .await;
    let (kind, _) = next_event(&mut a, "room:forced").await;
    assert_eq!(kind, "join", "its own join");
    let mut b = Client::connected(&server.ws_url()).await;
    let b_client = b
        .call(json!({"subscribe": {"channel": "room:forced"}}))
        .await;
    assert!(b_client["subscribe"].is_object(), "{b_client}");
    let (kind, info) = next_event(&mut a, "room:forced").await;
    assert_eq!(kind, "join", "{info}");
    drop(b);
    let (kind, _) = next_event(&mut a, "room:forced").await;
    assert_eq!(kind, "leave");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn join_leave_only_where_asked_and_allowed_and_caps() {
    let db = TestDb::new().await;
    let server = Server::start(&presence_config(&db)).await;
    let mut a = Client::connected(&server.ws_url()).await;
    // The channel's entry turns join/leave off: asking for it gets nothing.
    a.call(json!({"subscribe": {"channel": "quiet:1", "join_leave": true}}))
        .await;
    // Without asking: nothing either.
    a.call(json!({"subscribe": {"channel": "room:2"}})).await;
    let mut b = Client::connected(&server.ws_url()).await;
    b.call(json!({"subscribe": {"channel": "quiet:1"}})).await;
    b.call(json!({"subscribe": {"channel": "room:2"}})).await;
    let got = a.try_next(Duration::from_millis(700)).await;
    assert!(
        got.as_ref().is_none_or(|m| m["push"].is_null()),
        "unexpected push {got:?}"
    );
    assert_eq!(
        presence_of(&mut a, "quiet:1")
            .await
            .as_object()
            .unwrap()
            .len(),
        2
    );

    // The cap: the third member is refused with 106, and is not subscribed.
    let mut c = Client::connected(&server.ws_url()).await;
    a.call(json!({"subscribe": {"channel": "room:capped"}}))
        .await;
    b.call(json!({"subscribe": {"channel": "room:capped"}}))
        .await;
    let r = c
        .call(json!({"subscribe": {"channel": "room:capped"}}))
        .await;
    assert_eq!(r["error"]["code"], 106, "{r}");
    let r = c
        .call(json!({"subscribe": {"channel": "room:capped"}}))
        .await;
    assert_eq!(
        r["error"]["code"], 106,
        "a refused subscribe left no subscription: {r}"
    );
    // Room again once someone leaves.
    b.call(json!({"unsubscribe": {"channel": "room:capped"}}))
        .await;
    let r = c
        .call(json!({"subscribe": {"channel": "room:capped"}}))
        .await;
    assert!(r["subscribe"].is_object(), "{r}");

    // Subscribe data that is not a small object is refused where it would become chan_info.
    let r = c
        .call(json!({"subscribe": {"channel": "room:3", "data": "a string"}}))
        .await;
    assert_eq!(r["error"]["code"], 107, "{r}");

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn presence_is_shared_across_nodes_and_a_dead_node_expires() {
    let db = TestDb::new().await;
    let config = presence_config(&db);
    let one = Server::start(&config).await;
    let two = Server::start(&config).await;
    let mut a = Client::connected(&one.ws_url()).await;
    a.call(json!({"subscribe": {"channel": "room:x", "join_leave": true}}))
        .await;
    assert_eq!(next_event(&mut a, "room:x").await.0, "join");
    let mut b = Client::connected(&two.ws_url()).await;
    b.call(json!({"subscribe": {"channel": "room:x", "join_leave": true}}))
        .await;
    // B's join reaches A on the other node; both nodes answer presence the same.
    let (kind, info) = next_event(&mut a, "room:x").await;
    assert_eq!(kind, "join");
    let b_client = info["client"].as_str().unwrap().to_owned();
    let pa = presence_of(&mut a, "room:x").await;
    let pb = presence_of(&mut b, "room:x").await;
    assert_eq!(pa.as_object().unwrap().len(), 2);
    assert_eq!(pa, pb);

    // A node that stops gracefully takes its members out at once.
    two.stop().await;
    let (kind, info) = next_event(&mut a, "room:x").await;
    assert_eq!(
        (kind.as_str(), info["client"].as_str()),
        ("leave", Some(b_client.as_str()))
    );
    drop(b);

    // A node that died (here: a member of a node row whose heartbeat stopped) vanishes after its TTL,
    // and the live node's heartbeat announces the leave.
    sqlx::query(
        "INSERT INTO relay.nodes (id, name, version, expires_at) VALUES ('dead', 'gone', '0', now() + interval '1 second')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        r#"INSERT INTO relay.presence (channel, client, "user", node, member) VALUES ('room:x', 'ghost', 'g', 'dead', 'm')"#,
    )
    .execute(&db.pool)
    .await
    .unwrap();
    wait_presence(&mut a, "room:x", |p| p.get("ghost").is_some()).await;
    let (kind, info) = next_event(&mut a, "room:x").await;
    assert_eq!(
        (kind.as_str(), info["client"].as_str()),
        ("leave", Some("ghost"))
    );
    let p = presence_of(&mut a, "room:x").await;
    assert!(p.get("ghost").is_none(), "{p}");

    one.stop().await;
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.nodes")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(nodes, 0, "stopped nodes deregister");
    db.drop_db().await;
}
