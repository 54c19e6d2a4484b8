//! Nodes with different mappings cannot silently break each other: capture triggers are owned per
//! mapping, a sync drops only triggers that no live node needs, and a node whose capture is changed
//! under it says so in `/readyz` and its log.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connector::db::triggers;
use serde_json::json;
use support::{Client, Server, TestDb, config_json};

/// Log lines of the connectors run by this test (a tracing subscriber for the test's thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn config(db: &TestDb, channel: &str) -> String {
    config_json(
        &db.url,
        json!({
            "stream": {"poll_interval_ms": 100, "capture_check_secs": 1},
            "mappings": [{"table": "chat_data", "operations": ["INSERT", "UPDATE"], "channel": channel}]
        }),
    )
}

fn mappings(db: &TestDb, channel: &str) -> Vec<connector::config::Mapping> {
    connector::Config::from_json(&config(db, channel))
        .unwrap()
        .mappings
}

async fn readyz(server: &Server) -> (u16, String) {
    let r = reqwest::get(format!("http://{}/readyz", server.addr))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Polls `/readyz` until its status is `want` (at most 20 s); returns the body.
async fn readyz_until(server: &Server, want: u16) -> String {
    for _ in 0..200 {
        let (status, body) = readyz(server).await;
        if status == want {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {want}: {:?}", readyz(server).await);
}

async fn subscribed(server: &Server, channel: &str) -> Client {
    let mut c = Client::connected(&server.ws_url()).await;
    let r = c.call(json!({"subscribe": {"channel": channel}})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    c
}

#[tokio::test]
async fn nodes_with_different_mappings_coexist_and_a_sync_keeps_what_live_nodes_need() {
    let db = TestDb::new().await;
    // Node A (the old version) and node B (a changed mapping of the same table), side by side.
    let a = Server::start(&config(&db, "incoming-chat")).await;
    let mut on_a = subscribed(&a, "incoming-chat").await;
    let b = Server::start(&config(&db, "room-chat")).await;
    let mut on_b = subscribed(&b, "room-chat").await;

    db.insert_chat("m1", "after B started").await;
    let p = on_a.next_pub("incoming-chat").await;
    assert_eq!(
        p["data"]["row"]["msg_id"], "m1",
        "A still gets its rows: {p}"
    );
    let p = on_b.next_pub("room-chat").await;
    assert_eq!(p["data"]["row"]["msg_id"], "m1", "{p}");
    assert_eq!(readyz(&a).await.0, 200);
    assert_eq!(readyz(&b).await.0, 200);

    // `connector triggers sync` with a third configuration: installs its own, keeps both nodes'.
    let report = triggers::sync(&db.pool, &mappings(&db, "third"), None)
        .await
        .unwrap();
    // Each node's mapping has two triggers (INSERT, UPDATE).
    assert_eq!(report.kept.len(), 4, "{report:?}");
    assert!(report.removed.is_empty(), "{report:?}");
    db.insert_chat("m2", "after a foreign sync").await;
    assert_eq!(
        on_a.next_pub("incoming-chat").await["data"]["row"]["msg_id"],
        "m2"
    );
    assert_eq!(
        on_b.next_pub("room-chat").await["data"]["row"]["msg_id"],
        "m2"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // a capture check of each node
    assert_eq!(readyz(&a).await.0, 200);
    assert_eq!(readyz(&b).await.0, 200);

    // B stops (its registration goes with it): the next sync with A's configuration drops B's trigger
    // and the third one, and keeps A's.
    b.stop().await;
    let report = triggers::sync(&db.pool, &mappings(&db, "incoming-chat"), None)
        .await
        .unwrap();
    assert_eq!(report.removed.len(), 4, "{report:?}");
    assert!(report.kept.is_empty(), "{report:?}");
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'chat_data'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, 2);
    db.insert_chat("m3", "after B stopped").await;
    assert_eq!(
        on_a.next_pub("incoming-chat").await["data"]["row"]["msg_id"],
        "m3"
    );

    a.stop().await;
    let owners: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.capture_owners")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(owners, 0, "stopped nodes deregister");
    db.drop_db().await;
}

#[tokio::test]
async fn a_node_whose_capture_is_changed_under_it_is_not_ready_and_says_why() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let db = TestDb::new().await;
    let a = Server::start(&config(&db, "incoming-chat")).await;
    let trigger: String = sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'chat_data'::regclass
           AND NOT tgisinternal AND tgname LIKE '%\\_insert'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    // What an older connector's sync with another mapping did: drop the trigger.
    sqlx::query(&format!("DROP TRIGGER \"{trigger}\" ON chat_data"))
        .execute(&db.pool)
        .await
        .unwrap();
    let body = readyz_until(&a, 503).await;
    assert!(body.contains("capture changed under this node"), "{body}");
    assert!(
        body.contains(&trigger) && body.contains("is gone"),
        "{body}"
    );
    assert!(
        logs.text().contains("triggers were changed under it"),
        "the log says it: {}",
        logs.text()
    );

    // Put back (a sync with the node's own configuration): ready again.
    triggers::sync(&db.pool, &mappings(&db, "incoming-chat"), None)
        .await
        .unwrap();
    readyz_until(&a, 200).await;

    // Replaced: the same trigger now runs other code (e.g. another version's function body).
    sqlx::query(&format!(
        "CREATE OR REPLACE FUNCTION relay.\"capture_{}\"() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RETURN NULL; END $$",
        trigger.trim_start_matches("relay_")
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let body = readyz_until(&a, 503).await;
    assert!(body.contains("was replaced"), "{body}");
    // Disabled.
    triggers::sync(&db.pool, &mappings(&db, "incoming-chat"), None)
        .await
        .unwrap();
    readyz_until(&a, 200).await;
    sqlx::query(&format!(
        "ALTER TABLE chat_data DISABLE TRIGGER \"{trigger}\""
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let body = readyz_until(&a, 503).await;
    assert!(body.contains("is disabled"), "{body}");

    a.stop().await;
    db.drop_db().await;
}
