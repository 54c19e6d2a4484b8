//! The trigger-mode wake-up and horizon (issue 8): writers notify only while the sequencer sleeps, a
//! change after a quiet spell is delivered by the writer's NOTIFY (not by the safety-net timer), bursts
//! separated by quiet spells lose nothing to the arming race, a transaction held open in another
//! database of the cluster holds nothing back, and the writers' `relay.wake()` is inlined into the
//! capture trigger's call.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgListener;
use support::{Client, Server, TestDb, config_json};

/// A safety-net poll so long that a test relying on it would time out: delivery must come from the
/// sequencer's own polling or from a writer's NOTIFY.
const NO_SAFETY_NET: u64 = 60_000;

async fn armed(db: &TestDb) -> bool {
    let v: i64 = sqlx::query_scalar("SELECT last_value FROM relay.wakeup_armed")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    v == 1
}

async fn insert(db: &TestDb, id: &str) {
    sqlx::query(
        "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
         VALUES ($1, 'w', $1, 'w', 0)",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Inserts a row whose id is `mode` in a transaction with `relay.writer_notify = mode`.
async fn insert_with_writer_notify(db: &TestDb, mode: &str) {
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('relay.writer_notify', $1, true)")
        .bind(mode)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
         VALUES ($1, 'w', $1, 'w', 0)",
    )
    .bind(mode)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Arms or disarms the writers' wake-up by hand.
async fn set_armed(db: &TestDb, on: bool) {
    sqlx::query("SELECT setval('relay.wakeup_armed', $1)")
        .bind(i64::from(on))
        .execute(&db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn writers_notify_only_while_the_sequencer_is_armed() {
    let db = TestDb::new().await;
    // Migrations and triggers, without a running stream that would flip the flag.
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    server.stop().await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("relay_changes").await.unwrap();

    set_armed(&db, false).await;
    insert(&db, "disarmed").await;
    let got = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(got.is_err(), "a writer notified while disarmed: {got:?}");

    set_armed(&db, true).await;
    insert(&db, "armed").await;
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("no NOTIFY from a writer while armed")
        .unwrap();
    assert_eq!(n.channel(), "relay_changes");

    // relay.writer_notify = 'off' wins over the flag; 'on' notifies even when disarmed.
    insert_with_writer_notify(&db, "off").await;
    let got = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(got.is_err(), "writer_notify = off notified: {got:?}");

    set_armed(&db, false).await;
    insert_with_writer_notify(&db, "on").await;
    tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("writer_notify = on did not notify")
        .unwrap();

    // The flag as installed, never set (the sequence starts at 1): armed.
    sqlx::query("ALTER SEQUENCE relay.wakeup_armed RESTART")
        .execute(&db.pool)
        .await
        .unwrap();
    insert(&db, "fresh").await;
    tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("no NOTIFY from a writer with the flag as installed")
        .unwrap();
    drop(listener);
    db.drop_db().await;
}

/// `relay.wake()`, which every captured row calls, is inlined into the statement that calls it
/// (migration 0018): no function call and no executor run of its own per row. A SET clause, SECURITY
/// DEFINER or a PL/pgSQL body would each stop the planner from inlining it.
#[tokio::test]
async fn the_wake_up_is_inlined_into_the_capture_trigger() {
    let db = TestDb::new().await;
    connector::db::migrate(&db.pool).await.unwrap();
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN (VERBOSE, COSTS OFF) SELECT relay.wake()")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("pg_notify"), "not inlined:\n{plan}");
    assert!(!plan.contains("wake()"), "not inlined:\n{plan}");
    db.drop_db().await;
}

#[tokio::test]
async fn the_sequencer_arms_when_quiet_and_a_writer_wakes_it() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(
        &db.url,
        json!({"stream": {"poll_interval_ms": NO_SAFETY_NET}}),
    ))
    .await;
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    for round in 0..5 {
        // Quiet: the sequencer arms the writers' wake-up and sleeps.
        let mut waited = 0;
        while !armed(&db).await {
            waited += 1;
            assert!(waited < 200, "the sequencer never armed the wake-up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Only the writer's NOTIFY can wake it now (the safety net is a minute away).
        let id = format!("after-quiet-{round}");
        insert(&db, &id).await;
        let p = client.next_pub("incoming-chat").await;
        assert_eq!(p["data"]["row"]["msg_id"], id.as_str());
    }
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_between_quiet_spells_lose_nothing_to_the_arming_race() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(
        &db.url,
        json!({"stream": {"poll_interval_ms": NO_SAFETY_NET, "active_poll_ms": 1}}),
    ))
    .await;
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    // Bursts from 4 writers, separated by pauses around the sequencer's quiet spell (a few ms), so
    // writers keep committing just as it arms. A change lost to the race would wait for the
    // one-minute safety net, and the test would time out waiting for it.
    const BURSTS: usize = 60;
    const WRITERS: usize = 4;
    let mut expected = HashSet::new();
    for b in 0..BURSTS {
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let pool = db.pool.clone();
            let id = format!("b{b}-w{w}");
            expected.insert(id.clone());
            tasks.push(tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(
                    "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
                     VALUES ($1, 'w', $1, 'w', 0)",
                )
                .bind(&id)
                .execute(&mut *tx)
                .await
                .unwrap();
                // Hold the transaction a little, across the sequencer's decision to arm.
                tokio::time::sleep(Duration::from_millis((w as u64 * 3) % 7)).await;
                tx.commit().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2 + (b as u64 * 5) % 23)).await;
    }
    let mut last = 0;
    let mut seen = HashSet::new();
    while seen.len() < expected.len() {
        let p = client.next_pub("incoming-chat").await;
        let offset = p["offset"].as_u64().unwrap();
        assert_eq!(offset, last + 1, "offsets are contiguous");
        last = offset;
        let id = p["data"]["row"]["msg_id"].as_str().unwrap().to_owned();
        assert!(expected.contains(&id), "unexpected row {id}");
        assert!(seen.insert(id), "a row arrived twice");
    }
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_transaction_open_in_another_database_holds_nothing_back() {
    let db = TestDb::new().await;
    let other = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;

    // A transaction in another database of the cluster takes an xid and stays open.
    let mut stranger = other.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *stranger)
        .await
        .unwrap();
    for i in 0..3 {
        let id = format!("while-open-{i}");
        insert(&db, &id).await;
        // next_pub waits up to 20 s; before issue 8 the row waited for the stranger to end.
        let p = client.next_pub("incoming-chat").await;
        assert_eq!(p["data"]["row"]["msg_id"], id.as_str());
    }
    // The stranger was open the whole time.
    sqlx::query("SELECT 1")
        .execute(&mut *stranger)
        .await
        .unwrap();
    stranger.rollback().await.unwrap();

    // A transaction of this database that took an xid still holds later changes back (ordering needs
    // it), and they arrive once it ends.
    let mut local = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *local)
        .await
        .unwrap();
    insert(&db, "after-local").await;
    assert!(
        client.try_next(Duration::from_millis(700)).await.is_none(),
        "a change passed a running transaction of its own database"
    );
    local.rollback().await.unwrap();
    let p = client.next_pub("incoming-chat").await;
    assert_eq!(p["data"]["row"]["msg_id"], "after-local");

    server.stop().await;
    other.drop_db().await;
    db.drop_db().await;
}

/// A writer whose role holds only what writing through a capture trigger needs (its table, USAGE on
/// schema `relay`, INSERT on `relay.changelog`) writes, and wakes an armed sequencer: `relay.wake()`
/// runs as its caller (migration 0017), and every role may read the wake-up flag.
#[tokio::test]
async fn a_writer_with_only_the_capture_privileges_writes_and_wakes_the_connectors() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    server.stop().await;
    let role = format!("relay_writer_{}", uuid::Uuid::new_v4().simple());
    for sql in [
        format!("CREATE ROLE {role} NOLOGIN"),
        format!("GRANT USAGE ON SCHEMA relay TO {role}"),
        format!("GRANT INSERT ON relay.changelog TO {role}"),
        format!("GRANT INSERT ON chat_data TO {role}"),
    ] {
        sqlx::query(&sql).execute(&db.pool).await.unwrap();
    }
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("relay_changes").await.unwrap();
    set_armed(&db, true).await;

    let mut writer = db.pool.acquire().await.unwrap();
    sqlx::query(&format!("SET ROLE {role}"))
        .execute(&mut *writer)
        .await
        .unwrap();
    let me: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    assert_eq!(me, role);
    sqlx::query(
        "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
         VALUES ('restricted', 'w', 'x', 'w', 0)",
    )
    .execute(&mut *writer)
    .await
    .unwrap();
    sqlx::query("RESET ROLE")
        .execute(&mut *writer)
        .await
        .unwrap();
    drop(writer);
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("no NOTIFY from the restricted writer while armed")
        .unwrap();
    assert_eq!(n.channel(), "relay_changes");
    let captured: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.changelog")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(captured, 1);
    drop(listener);
    db.drop_db().await;
    let admin = sqlx::PgPool::connect(&support::admin_url()).await.unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
}
