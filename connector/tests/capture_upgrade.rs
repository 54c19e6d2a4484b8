//! A rolling deploy from a release whose capture trigger was one row-level trigger per mapping (the
//! legacy trigger) never captures a write twice and never misses one: a node of this release keeps
//! the legacy trigger while a node of the earlier release runs it, swaps it for its own triggers once
//! none does (rows written during the swap arrive once each), and swaps back on a rollback.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use connector::db::triggers::{self, MappingTriggers};
use serde_json::json;
use support::{Client, Server, TestDb, config_json};

const CHANNEL: &str = "incoming-chat";

fn config(db: &TestDb) -> String {
    config_json(&db.url, json!({"stream": {"capture_check_secs": 1}}))
}

fn chat_triggers(db: &TestDb) -> MappingTriggers {
    let mappings = connector::Config::from_json(&config(db)).unwrap().mappings;
    triggers::mapping_triggers(&mappings).unwrap().remove(0)
}

/// What a node of the earlier release does at start-up: installs its trigger and registers it (the
/// entry lives a minute, as a live node's renewals would keep it).
async fn old_node_starts(db: &TestDb, t: &MappingTriggers) {
    sqlx::query(&t.legacy.function_sql)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(&t.legacy.trigger_sql)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO relay.capture_owners (node, triggers, expires_at)
         VALUES ('old-node', $1, now() + interval '1 minute')
         ON CONFLICT (node) DO UPDATE SET triggers = EXCLUDED.triggers, expires_at = EXCLUDED.expires_at",
    )
    .bind(vec![t.legacy.qualified()])
    .execute(&db.pool)
    .await
    .unwrap();
}

/// What a node of the earlier release does when it stops: removes its entry.
async fn old_node_stops(db: &TestDb) {
    sqlx::query("DELETE FROM relay.capture_owners WHERE node = 'old-node'")
        .execute(&db.pool)
        .await
        .unwrap();
}

/// The capture triggers on `chat_data`, by name.
async fn installed(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'chat_data'::regclass
           AND NOT tgisinternal ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Waits (at most 20 s) until the triggers on `chat_data` are `want`.
async fn installed_until(db: &TestDb, want: &[String]) {
    for _ in 0..200 {
        if installed(db).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("triggers never became {want:?}: {:?}", installed(db).await);
}

fn names(specs: &[connector::db::triggers::TriggerSpec]) -> Vec<String> {
    let mut n: Vec<String> = specs.iter().map(|s| s.trigger.clone()).collect();
    n.sort();
    n
}

/// Reads publications on the channel until `ids` have all arrived; fails on a duplicate, on one
/// that is not in `ids`, or on an offset out of order.
async fn each_once(client: &mut Client, ids: &[String]) {
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut seen = HashSet::new();
    let mut last = 0;
    while seen.len() < want.len() {
        let p = client.next_pub(CHANNEL).await;
        let id = p["data"]["row"]["msg_id"].as_str().unwrap().to_owned();
        assert!(want.contains(id.as_str()), "unexpected row {id}: {p}");
        assert!(seen.insert(id.clone()), "row {id} delivered twice: {p}");
        let offset = p["offset"].as_u64().unwrap();
        assert!(offset > last, "offset {offset} after {last}");
        last = offset;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_keeps_the_old_trigger_then_swaps_without_losing_or_repeating_a_row() {
    let db = TestDb::new().await;
    connector::db::migrate(&db.pool).await.unwrap();
    let t = chat_triggers(&db);
    let legacy = vec![t.legacy.trigger.clone()];
    let current = names(&t.current);
    assert_eq!(current.len(), 3, "INSERT, UPDATE, DELETE: {current:?}");

    // A node of the earlier release runs; a node of this release starts beside it.
    old_node_starts(&db, &t).await;
    let node = Server::start(&config(&db)).await;
    assert_eq!(
        installed(&db).await,
        legacy,
        "the old node's trigger is kept alone"
    );
    let mut client = Client::connected(&node.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": CHANNEL}}))
        .await;
    db.insert_chat("before-1", "x").await;
    db.insert_chat("before-2", "x").await;
    each_once(&mut client, &["before-1".into(), "before-2".into()]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // a check: still the legacy trigger
    assert_eq!(installed(&db).await, legacy);
    let ready = reqwest::get(format!("http://{}/readyz", node.addr))
        .await
        .unwrap();
    assert_eq!(
        ready.status().as_u16(),
        200,
        "{}",
        ready.text().await.unwrap()
    );

    // The old node stops while writers write: the next check swaps the triggers; every row written
    // before, during and after the swap arrives once.
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..400 {
                let id = format!("during-{i}");
                sqlx::query(
                    "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
                     SELECT $1 || '-' || g, 'w', 'x', 'w', 0 FROM generate_series(1, 3) g",
                )
                .bind(&id)
                .execute(&pool)
                .await
                .unwrap();
                ids.extend((1..=3).map(|g| format!("{id}-{g}")));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    old_node_stops(&db).await;
    installed_until(&db, &current).await;
    let ids = writer.await.unwrap();
    each_once(&mut client, &ids).await;
    assert!(
        client.try_next(Duration::from_millis(500)).await.is_none(),
        "nothing more"
    );

    // A rollback: a node of the earlier release starts again. This node swaps back to its trigger.
    old_node_starts(&db, &t).await;
    installed_until(&db, &legacy).await;
    db.insert_chat("after-rollback", "x").await;
    each_once(&mut client, &["after-rollback".into()]).await;
    assert!(client.try_next(Duration::from_millis(500)).await.is_none());

    node.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_sync_keeps_the_legacy_trigger_only_while_a_node_of_the_earlier_release_runs_it() {
    let db = TestDb::new().await;
    connector::db::migrate(&db.pool).await.unwrap();
    let t = chat_triggers(&db);
    let mappings = connector::Config::from_json(&config(&db)).unwrap().mappings;
    old_node_starts(&db, &t).await;

    let report = triggers::sync(&db.pool, &mappings, None).await.unwrap();
    assert!(report.installed.is_empty(), "{report:?}");
    assert_eq!(report.kept, [t.legacy.qualified()], "{report:?}");
    assert_eq!(
        installed(&db).await,
        std::slice::from_ref(&t.legacy.trigger)
    );

    // Its entry expires (the node died): the next sync swaps.
    sqlx::query("UPDATE relay.capture_owners SET expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    let report = triggers::sync(&db.pool, &mappings, None).await.unwrap();
    assert_eq!(report.installed.len(), 3, "{report:?}");
    assert_eq!(report.removed, [t.legacy.qualified()], "{report:?}");
    assert_eq!(installed(&db).await, names(&t.current));
    let functions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc WHERE proname = $1 AND pronamespace = 'relay'::regnamespace",
    )
    .bind(&t.legacy.function)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(functions, 0, "the legacy trigger's function goes with it");
    db.drop_db().await;
}
