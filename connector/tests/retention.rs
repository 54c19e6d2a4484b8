//! History retention: pruning by count and age, epochs that change with the rule or a reset, and
//! recovery that says `recovered: false` rather than hand out a history with a gap.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

async fn history(c: &mut Client) -> Value {
    c.call(json!({"history": {"channel": "incoming-chat", "limit": -1}}))
        .await["history"]
        .clone()
}

/// A server keeping at most 5 publications per `incoming-*` channel (pruning every second), and a
/// client subscribed to `incoming-chat` that received 12 changes; the channel's epoch.
async fn twelve_changes_kept_five(db: &TestDb) -> (Server, Client, String) {
    let retention = json!({"retention": {"prune_interval_secs": 1, "rules": [
        {"channel": "incoming-*", "max_publications": 5, "max_age_secs": 3600}
    ]}});
    let server = Server::start(&config_json(&db.url, retention)).await;
    let mut c = Client::connected(&server.ws_url()).await;
    c.call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    for i in 0..12 {
        db.insert_chat(&format!("m{i}"), "x").await;
    }
    for _ in 0..12 {
        c.next_pub("incoming-chat").await;
    }
    let epoch = history(&mut c).await["epoch"].as_str().unwrap().to_owned();

    (server, c, epoch)
}

/// Waits until the pruning task has kept the newest 5 in storage; what `history` returned last.
async fn pruned(db: &TestDb, c: &mut Client) -> Vec<Value> {
    // The pruning task (every second) keeps the newest 5 in storage; reads never return more (they
    // are bounded by the rule before any pruning, see read_your_writes.rs).
    let mut kept = Vec::new();
    for _ in 0..100 {
        let h = history(c).await;
        kept = h["publications"].as_array().cloned().unwrap_or_default();
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.publications")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if stored == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kept
}

#[tokio::test]
async fn pruning_keeps_the_newest_and_the_epoch() {
    let db = TestDb::new().await;
    let (server, mut c, epoch) = twelve_changes_kept_five(&db).await;
    let kept = pruned(&db, &mut c).await;
    let offsets: Vec<u64> = kept.iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, [8, 9, 10, 11, 12]);
    assert_eq!(
        history(&mut c).await["epoch"],
        json!(epoch),
        "pruning under an unchanged rule keeps the epoch"
    );

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn recovery_never_hides_a_gap_left_by_pruning() {
    let db = TestDb::new().await;
    let (server, mut c, epoch) = twelve_changes_kept_five(&db).await;
    pruned(&db, &mut c).await;

    // A client that saw offset 9 recovers; one that saw offset 2 cannot: recovered=false, new position.
    let mut r = Client::connected(&server.ws_url()).await;
    let ok = r
        .call(json!({"subscribe": {"channel": "incoming-chat", "recover": true, "recoverable": true, "offset": 9, "epoch": epoch}}))
        .await;
    assert_eq!(ok["subscribe"]["recovered"], true, "{ok}");
    assert_eq!(ok["subscribe"]["publications"].as_array().unwrap().len(), 3);
    let mut late = Client::connected(&server.ws_url()).await;
    let gone = late
        .call(json!({"subscribe": {"channel": "incoming-chat", "recover": true, "recoverable": true, "offset": 2, "epoch": epoch}}))
        .await;
    assert_eq!(gone["subscribe"]["was_recovering"], true);
    assert!(gone["subscribe"].get("recovered").is_none(), "{gone}");
    assert!(
        gone["subscribe"].get("publications").is_none(),
        "never a partial history: {gone}"
    );
    assert_eq!(gone["subscribe"]["offset"], 12);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_changed_rule_and_a_reset_change_the_epoch() {
    let db = TestDb::new().await;
    let (server, mut c, epoch) = twelve_changes_kept_five(&db).await;
    pruned(&db, &mut c).await;
    server.stop().await;

    // A changed rule gives the channel a new epoch at the next pass.
    let tighter = json!({"retention": {"prune_interval_secs": 1, "rules": [
        {"channel": "incoming-*", "max_publications": 3, "max_age_secs": 3600}
    ]}});
    let server = Server::start(&config_json(&db.url, tighter)).await;
    let mut c = Client::connected(&server.ws_url()).await;
    let mut new_epoch = epoch.clone();
    for _ in 0..100 {
        new_epoch = history(&mut c).await["epoch"].as_str().unwrap().to_owned();
        if new_epoch != epoch {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(new_epoch, epoch, "changing retention changes the epoch");
    let r = c
        .call(json!({"subscribe": {"channel": "incoming-chat", "recover": true, "recoverable": true, "offset": 11, "epoch": epoch}}))
        .await;
    assert!(r["subscribe"].get("recovered").is_none(), "old epoch: {r}");

    // Resetting a channel's history empties it and changes the epoch again.
    let n: i64 = sqlx::query_scalar("SELECT relay.reset_channel('incoming-chat')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(n > 0);
    let h = history(&mut c).await;
    assert!(h.get("publications").is_none());
    assert_ne!(h["epoch"], json!(new_epoch));
    assert_eq!(h["offset"], 12, "offsets keep increasing across epochs");
    // `c` is still subscribed from the failed recovery, positioned in the previous epoch: the first
    // publication of the new epoch makes the server tell it to resubscribe (2500), never a silent switch.
    db.insert_chat("after-reset", "x").await;
    let unsub = loop {
        let m = c.next_message().await;
        if m["push"]["unsubscribe"].is_object() {
            break m;
        }
        assert!(
            m["push"]["pub"].is_null(),
            "no publication across an epoch change: {m}"
        );
    };
    assert_eq!(unsub["push"]["unsubscribe"]["code"], 2500, "{unsub}");
    let h = history(&mut c).await;
    assert_eq!(h["publications"][0]["offset"], 13);

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn pruning_by_age() {
    let db = TestDb::new().await;
    let config = json!({"retention": {"prune_interval_secs": 3600, "rules": [
        {"channel": "*", "max_publications": 1000, "max_age_secs": 1}
    ]}});
    let text = config_json(&db.url, config);
    let server = Server::start(&text).await;
    let mut c = Client::connected(&server.ws_url()).await;
    c.call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    db.insert_chat("old", "x").await;
    c.next_pub("incoming-chat").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    db.insert_chat("new", "y").await;
    c.next_pub("incoming-chat").await;
    let cfg = connector::Config::from_json(&text).unwrap();
    let deleted =
        connector::db::retention::prune_all(&db.pool, &cfg.retention, &Default::default())
            .await
            .unwrap();
    assert_eq!(deleted, 1);
    let h = history(&mut c).await;
    let pubs = h["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 1);
    assert_eq!(pubs[0]["data"]["row"]["msg_id"], "new");
    server.stop().await;
    db.drop_db().await;
}
