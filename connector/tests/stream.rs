//! The change stream under concurrent writers: everything arrives, once, in offset order, matching
//! history — including transactions that commit out of sequence order — and large rows are delivered.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};

const WRITERS: usize = 8;
const ROWS: usize = 10_000;

/// [`WRITERS`] tasks writing [`ROWS`] rows in all. Each writer commits transactions of 1–20 rows; a
/// third of them wait before committing, so transactions with lower ids and xids often commit after
/// higher ones.
fn spawn_writers(db: &TestDb) -> Vec<tokio::task::JoinHandle<()>> {
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = db.pool.clone();
        writers.push(tokio::spawn(async move {
            let mut written = 0;
            let per_writer = ROWS / WRITERS;
            while written < per_writer {
                let (size, delay) = {
                    let mut rng = rand::rng();
                    (rng.random_range(1..=20).min(per_writer - written), rng.random_range(0..3) == 0)
                };
                let mut tx = pool.begin().await.unwrap();
                for i in 0..size {
                    let id = format!("w{w}-{}", written + i);
                    sqlx::query(
                        "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
                         VALUES ($1, $2, $3, $2, 0)",
                    )
                    .bind(&id)
                    .bind(format!("writer{w}"))
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
                if delay {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tx.commit().await.unwrap();
                written += size;
            }
        }));
    }

    writers
}

/// The channel's whole history, read in pages of 300.
async fn history_of(client: &mut Client) -> Vec<Value> {
    let mut from = 0u64;
    let mut history = Vec::new();
    loop {
        let h = client
            .call(json!({"history": {"channel": "incoming-chat", "limit": 300, "since": {"offset": from, "epoch": ""}}}))
            .await;
        let pubs = h["history"]["publications"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if pubs.is_empty() {
            break;
        }
        from = pubs.last().unwrap()["offset"].as_u64().unwrap();
        history.extend(pubs);
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_rows_from_eight_writers_arrive_once_in_order() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(
        &db.url,
        json!({"client": {"outbound_queue": 20000, "outbound_queue_bytes": 67108864}}),
    ))
    .await;
    let mut client = Client::connected(&server.ws_url()).await;
    let r = client
        .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true}}))
        .await;
    assert_eq!(r["subscribe"]["offset"], 0);

    let writers = spawn_writers(&db);

    let mut seen = HashSet::new();
    let mut last_offset = 0u64;
    while seen.len() < ROWS {
        let p = client.next_pub("incoming-chat").await;
        let offset = p["offset"].as_u64().unwrap();
        assert_eq!(
            offset,
            last_offset + 1,
            "offsets strictly increase without gaps"
        );
        last_offset = offset;
        let id = p["data"]["row"]["msg_id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "duplicate delivery of {id}");
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        client
            .try_next(Duration::from_millis(500))
            .await
            .is_none_or(|m| m == json!({})),
        "nothing extra"
    );

    // History agrees: the same rows at the same offsets.
    let history = history_of(&mut client).await;
    assert_eq!(history.len(), ROWS);
    for (i, p) in history.iter().enumerate() {
        assert_eq!(p["offset"].as_u64().unwrap(), i as u64 + 1);
    }
    let history_ids: HashSet<String> = history
        .iter()
        .map(|p| p["data"]["row"]["msg_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(history_ids, seen);
    // The node sequenced every row itself: its batches went to its hub without a history read.
    let handed = metric(&server.metrics().await, "relay_stream_batches_handed_total");
    assert!(handed > 0, "no batch was handed over: {handed}");

    server.stop().await;
    db.drop_db().await;
}

/// A counter's value in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics"))
}

/// Two nodes on one database: whichever sequences a batch hands it to its own hub, the other reads
/// it from the history; a subscriber of each gets every row once, in offset order, at the same
/// offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_deliver_the_same_stream_whichever_sequences() {
    let db = TestDb::new().await;
    let cfg = config_json(
        &db.url,
        json!({"client": {"outbound_queue": 20000, "outbound_queue_bytes": 67108864}}),
    );
    let (a, b) = (Server::start(&cfg).await, Server::start(&cfg).await);
    let mut clients = Vec::new();
    for server in [&a, &b] {
        let mut client = Client::connected(&server.ws_url()).await;
        let r = client
            .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true}}))
            .await;
        assert_eq!(r["subscribe"]["offset"], 0);
        clients.push(client);
    }
    let writers = spawn_writers(&db);
    let mut streams = Vec::new();
    for client in &mut clients {
        let mut ids = Vec::with_capacity(ROWS);
        while ids.len() < ROWS {
            let p = client.next_pub("incoming-chat").await;
            assert_eq!(
                p["offset"].as_u64().unwrap(),
                ids.len() as u64 + 1,
                "in order, no gap"
            );
            ids.push(p["data"]["row"]["msg_id"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            ROWS,
            "each row once"
        );
        streams.push(ids);
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        streams[0], streams[1],
        "the same row at the same offset on both nodes"
    );
    let handed = [
        metric(&a.metrics().await, "relay_stream_batches_handed_total"),
        metric(&b.metrics().await, "relay_stream_batches_handed_total"),
    ];
    assert!(
        handed.iter().sum::<u64>() > 0,
        "no node handed a batch over: {handed:?}"
    );

    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_100kb_row_is_written_and_delivered() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;

    // 100 KB of text with newlines, quotes and non-ASCII: far over NOTIFY's 8000-byte limit.
    let text: String = "line \"quoted\" ünïcødé\n".repeat(100 * 1024 / 24);
    assert!(text.len() >= 100 * 1024);
    db.insert_chat("big", &text).await;
    let p = client.next_pub("incoming-chat").await;
    assert_eq!(p["data"]["row"]["msg_data"], Value::String(text.clone()));

    // The same through history.
    let h = client
        .call(json!({"history": {"channel": "incoming-chat", "limit": 1}}))
        .await;
    assert_eq!(
        h["history"]["publications"][0]["data"]["row"]["msg_data"],
        Value::String(text)
    );

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn changes_committed_while_the_connector_is_down_are_recovered() {
    let db = TestDb::new().await;
    let config = config_json(&db.url, json!({}));
    let server = Server::start(&config).await;
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true}}))
        .await;
    db.insert_chat("a", "before").await;
    let p = client.next_pub("incoming-chat").await;
    let epoch = client
        .call(json!({"history": {"channel": "incoming-chat"}}))
        .await["history"]["epoch"]
        .clone();
    server.stop().await;

    for i in 0..50 {
        db.insert_chat(&format!("down-{i}"), "while down").await;
    }
    let server = Server::start(&config).await;
    let mut client = Client::connected(&server.ws_url()).await;
    let r = client
        .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true, "recover": true, "offset": p["offset"], "epoch": epoch}}))
        .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let pubs = client.recovered_then_live(&r, "incoming-chat", 50).await;
    assert_eq!(pubs.len(), 50);
    for (i, p) in pubs.iter().enumerate() {
        assert_eq!(p["offset"].as_u64().unwrap(), i as u64 + 2);
    }
    assert_eq!(pubs[0]["offset"], 2);
    assert_eq!(pubs[49]["offset"], 51);

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn channel_templates_and_column_lists() {
    let db = TestDb::new().await;
    sqlx::query(
        "CREATE TABLE accounts (id int PRIMARY KEY, room_id int, name text, password_hash text)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let config = config_json(
        &db.url,
        json!({"mappings": [
            {"table": "accounts", "operations": ["INSERT", "UPDATE", "DELETE"], "channel": "room:{room_id}", "columns": ["id", "name", "room_id"]},
            {"table": "accounts", "operations": ["INSERT"], "channel": "odd$relay$';--{id}"}
        ]}),
    );
    let server = Server::start(&config).await;
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "room:7"}}))
        .await;
    client
        .call(json!({"subscribe": {"channel": "room:8"}}))
        .await;
    client
        .call(json!({"subscribe": {"channel": "odd$relay$';--2"}}))
        .await;
    sqlx::query("INSERT INTO accounts VALUES (1, 8, 'other room', 'x'), (2, 7, 'alice', 'secret-hash'), (3, NULL, 'no room', 'y')")
        .execute(&db.pool)
        .await
        .unwrap();
    let odd = client.next_pub("odd$relay$';--2").await;
    assert_eq!(
        odd["data"]["row"]["name"], "alice",
        "quotes and dollar tags in templates are only text"
    );
    let p = client.next_pub("room:7").await;
    assert_eq!(p["data"]["type"], "INSERT");
    assert_eq!(
        p["data"]["row"],
        json!({"id": 2, "name": "alice", "room_id": 7}),
        "only the listed columns leave the database"
    );
    // A row that moves to another channel is published on both: the old one learns it left.
    sqlx::query("UPDATE accounts SET room_id = 8 WHERE id = 2")
        .execute(&db.pool)
        .await
        .unwrap();
    let moved_old = client.next_pub("room:7").await;
    assert_eq!(
        client.next_pub("room:8").await["data"]["row"]["id"],
        1,
        "row 1 was inserted in room 8"
    );
    let moved_new = client.next_pub("room:8").await;
    assert_eq!(moved_new["data"]["row"]["id"], 2);
    assert_eq!(moved_old["data"]["type"], "UPDATE");
    assert_eq!(moved_old["data"]["old"]["room_id"], 7);
    assert_eq!(moved_new["data"]["row"]["room_id"], 8);
    sqlx::query("DELETE FROM accounts WHERE id = 2")
        .execute(&db.pool)
        .await
        .unwrap();
    let d = client.next_pub("room:8").await;
    assert_eq!(d["data"]["type"], "DELETE");
    assert_eq!(d["data"]["row"]["id"], 2);
    assert!(!d.to_string().contains("secret-hash"));
    server.stop().await;

    // Dropping the mapping removes its trigger: writes are no longer captured.
    let config = config_json(&db.url, json!({"mappings": []}));
    let server = Server::start(&config).await;
    sqlx::query("INSERT INTO accounts VALUES (4, 7, 'bob', 'z')")
        .execute(&db.pool)
        .await
        .unwrap();
    let triggers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'relay\\_%'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(triggers, 0);
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.changelog")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(pending, 0);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_long_transaction_holds_changes_back_visibly_and_loses_nothing() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;

    // A writer transaction that has taken an xid and stays open...
    let mut long = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
         VALUES ('long', 'l', 'from the long transaction', 'l', 0)",
    )
    .execute(&mut *long)
    .await
    .unwrap();
    // ...holds back a change committed after it: it is not delivered yet, and /metrics shows it.
    db.insert_chat("short", "committed while the long one is open")
        .await;
    assert!(
        client
            .try_next(Duration::from_millis(600))
            .await
            .is_none_or(|m| m == json!({}))
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("relay_changelog_unsequenced 1"),
        "{metrics}"
    );
    let age_line = metrics
        .lines()
        .find(|l| l.starts_with("relay_changelog_oldest_unsequenced_seconds "))
        .unwrap();
    let age: f64 = age_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(age > 0.3, "{age_line}");
    assert!(metrics.contains("relay_pg_notification_queue_usage "));

    // Once it commits, both arrive, in (xid, id) order: the long transaction's row first.
    long.commit().await.unwrap();
    let a = client.next_pub("incoming-chat").await;
    let b = client.next_pub("incoming-chat").await;
    assert_eq!(
        (a["offset"].as_u64(), b["offset"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(a["data"]["row"]["msg_id"], "long");
    assert_eq!(b["data"]["row"]["msg_id"], "short");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("relay_delivery_lag_seconds_count 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("relay_delivery_lag_seconds_bucket{le=\"+Inf\"} 2"),
        "{metrics}"
    );
    // Both rows waited for the long transaction: at least the 600 ms the test held it open.
    assert!(
        metrics.contains("relay_delivery_lag_seconds_bucket{le=\"0.5\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("relay_stream_catch_up_reads_total 1"),
        "{metrics}"
    );

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn without_writer_notify_the_poll_delivers() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(
        &db.url,
        json!({"stream": {"poll_interval_ms": 50}}),
    ))
    .await;
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL relay.writer_notify = 'off'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
         VALUES ('quiet', 'q', 'no notify', 'q', 0)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let p = client.next_pub("incoming-chat").await;
    assert_eq!(p["data"]["row"]["msg_id"], "quiet");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn the_listen_connection_uses_tls_when_asked() {
    let db = TestDb::new().await;
    let ssl_on: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let listen_url = format!("{}?sslmode=require&application_name=relay-listen", db.url);
    let config = config_json(
        &db.url,
        json!({"database": {"url": db.url, "listen_url": listen_url}}),
    );
    assert_eq!(
        ssl_on, "on",
        "this test needs a PostgreSQL with ssl = on (Debian's default)"
    );
    let server = Server::start(&config).await;
    let encrypted: bool = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
         WHERE a.application_name = 'relay-listen' AND a.datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(encrypted, "the LISTEN connection is encrypted");
    let mut client = Client::connected(&server.ws_url()).await;
    client
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    db.insert_chat("tls", "over tls").await;
    assert_eq!(
        client.next_pub("incoming-chat").await["data"]["row"]["msg_id"],
        "tls"
    );
    server.stop().await;
    db.drop_db().await;
}
