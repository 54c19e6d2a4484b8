//! The `wal` capture mode against a throwaway cluster with `wal_level = logical`: the same JSON and
//! offsets as trigger mode, history and recovery, two nodes with a leader that dies, commit order for
//! overlapping transactions, open transactions that delay nothing, read-your-writes, a lost slot (`recovered: false`),
//! and a walsender killed over and over.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::Cluster;
use support::{Client, Server, TestDb, config_json};

const KINDS_DDL: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (a int, b text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE kinds (
    id int PRIMARY KEY, room_id int, t text, n numeric, f float8, r real, b boolean,
    ts timestamptz, tsn timestamp, d date, j json, jb jsonb, arr int[], tarr text[], u uuid,
    by bytea, iv interval, ip inet, ch char(5), big bigint, sm smallint, pt point, rng int4range,
    m mood, p pair, pi posint
);
CREATE TABLE other (id int);
"#;

/// The same statements, run on a trigger-mode and a wal-mode database. The `json` value of `j` spans
/// two lines, as stored: it must arrive on one (JSON-protocol frames are newline-delimited).
const SCRIPT: &[&str] = &[
    r#"INSERT INTO kinds VALUES (1, 1, E'he said "hi", (ok) \\ back''slash ü', 12345678901234567890.123456789,
        0.1, 1.5, true, '2024-02-29 12:34:56.789+02', '2024-02-29 12:34:56.789', '2024-02-29',
        E'{"a": [1, 2.50, "x"],\n "b": null}', '{"z": 1, "a": {"n": 1.0}}', '{1,2,NULL}',
        '{"a b","c,d","e\"f",NULL}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\xdeadbeef',
        '1 day 02:03:04', '192.168.0.1/24', 'ab', 9007199254740993, -32768, '(1.5,2)', '[1,10)',
        'happy', ROW(7, 'x,y'), 5)"#,
    "INSERT INTO kinds (id, room_id, t) VALUES (2, 2, '')",
    "UPDATE kinds SET t = 'changed', room_id = 2 WHERE id = 1",
    "UPDATE kinds SET f = 'NaN', r = '-Infinity', jb = '[]' WHERE id = 2; \
     SELECT relay.publish('kinds', '{\"custom\": [1, \"two\"]}', '{\"user\": \"u1\"}')",
    "DELETE FROM kinds WHERE id = 2",
    "INSERT INTO kinds (id, room_id, t) SELECT 3, 1, string_agg(md5(i::text), '') FROM generate_series(1, 5000) i",
    "UPDATE kinds SET b = false WHERE id = 3",
    "SELECT relay.publish('kinds', '{\"end\": true}')",
];

fn mappings() -> Value {
    json!([
        {"table": "chat_data", "operations": ["INSERT", "UPDATE", "DELETE"], "channel": "incoming-chat"},
        {"table": "kinds", "operations": ["INSERT", "UPDATE", "DELETE"], "channel": "kinds"},
        {"table": "kinds", "operations": ["INSERT", "UPDATE", "DELETE"], "channel": "room:{room_id}",
         "columns": ["id", "t", "b", "room_id"]}
    ])
}

fn wal_config(db: &TestDb, extra: Value) -> String {
    let mut base = json!({
        "capture": {"mode": "wal", "heartbeat_secs": 1},
        "mappings": mappings(),
        "client": {"outbound_queue": 20000, "outbound_queue_bytes": 67108864},
    });
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    config_json(&db.url, base)
}

async fn kinds_db(cluster: &Cluster) -> TestDb {
    let db = TestDb::new_on(&cluster.url("postgres")).await;
    sqlx::raw_sql(KINDS_DDL).execute(&db.pool).await.unwrap();
    db
}

/// Waits until `server` reports being the wal leader; returns how long that took.
async fn wait_leader(server: &Server) -> Duration {
    let t = Instant::now();
    for _ in 0..600 {
        if server
            .metrics()
            .await
            .lines()
            .any(|l| l == "relay_wal_leader 1")
        {
            return t.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no wal leader within 30 s");
}

/// Subscribes to `channels`; returns the client and the epochs.
async fn subscriber(server: &Server, channels: &[&str]) -> (Client, Vec<String>) {
    let mut c = Client::connected(&server.ws_url()).await;
    let mut epochs = Vec::new();
    for ch in channels {
        let r = c
            .call(json!({"subscribe": {"channel": ch, "recoverable": true, "positioned": true}}))
            .await;
        assert!(r["subscribe"].is_object(), "{r}");
        epochs.push(r["subscribe"]["epoch"].as_str().unwrap().to_owned());
    }
    (c, epochs)
}

async fn history(c: &mut Client, channel: &str) -> Vec<Value> {
    let h = c
        .call(json!({"history": {"channel": channel, "limit": 1000}}))
        .await;
    h["history"]["publications"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Runs the script, collects the live `kinds` publications up to the end marker and the history of
/// every channel.
async fn run_script(db: &TestDb, server: &Server) -> (Vec<Value>, Vec<Vec<Value>>) {
    let (mut c, _) = subscriber(server, &["kinds", "room:1", "room:2"]).await;
    for stmt in SCRIPT {
        sqlx::raw_sql(stmt).execute(&db.pool).await.unwrap();
    }
    let mut live = Vec::new();
    loop {
        let p = c.next_pub("kinds").await;
        let end = p["data"]["end"] == json!(true);
        live.push(p);
        if end {
            break;
        }
    }
    let mut hist = Vec::new();
    for ch in ["kinds", "room:1", "room:2"] {
        hist.push(history(&mut c, ch).await);
    }
    (live, hist)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_mode_publishes_what_trigger_mode_publishes() {
    let cluster = Cluster::start(&[]);
    let tdb = kinds_db(&cluster).await;
    let wdb = kinds_db(&cluster).await;

    let trigger = Server::start(&config_json(
        &tdb.url,
        json!({"mappings": mappings(), "capture": {"mode": "trigger"}}),
    ))
    .await;
    let (t_live, t_hist) = run_script(&tdb, &trigger).await;
    trigger.stop().await;

    let wal = Server::start(&wal_config(&wdb, json!({}))).await;
    wait_leader(&wal).await;
    let (w_live, w_hist) = run_script(&wdb, &wal).await;

    // No capture trigger in wal mode; the publication covers the mapped tables.
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'relay\\_%' AND NOT tgisinternal",
    )
    .fetch_one(&wdb.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0, "wal mode installs no capture trigger");
    let published: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'relay' ORDER BY 1",
    )
    .fetch_all(&wdb.pool)
    .await
    .unwrap();
    assert_eq!(published, ["chat_data", "kinds"]);

    assert_eq!(w_live.len(), 9, "{w_live:#?}");
    assert_eq!(
        w_live, t_live,
        "live publications (offsets, data, info) equal trigger mode's"
    );
    assert_eq!(w_hist, t_hist, "history equals trigger mode's");
    // A few facts, so equality is not equality of two wrong things.
    let offsets: Vec<u64> = w_live
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (1..=9).collect::<Vec<_>>());
    let first = &w_live[0]["data"];
    assert_eq!(first["type"], "INSERT");
    assert_eq!(first["row"]["f"], json!(0.1));
    assert_eq!(first["row"]["b"], json!(true));
    assert_eq!(first["row"]["j"]["a"][1], json!(2.50));
    assert_eq!(first["row"]["p"], json!({"a": 7, "b": "x,y"}));
    assert_eq!(
        first["row"]["t"],
        json!("he said \"hi\", (ok) \\ back'slash ü")
    );
    let custom = w_live
        .iter()
        .find(|p| p["data"]["custom"].is_array())
        .unwrap();
    assert_eq!(custom["info"], json!({"user": "u1"}), "{custom}");
    let toast = &w_live[7]["data"];
    assert_eq!(toast["type"], "UPDATE");
    assert_eq!(toast["row"]["t"].as_str().unwrap().len(), 160_000);
    assert_eq!(toast["old"]["t"], toast["row"]["t"]);
    // The UPDATE that moved row 1 from room:1 to room:2 is on both channels.
    assert!(w_hist[1].iter().any(|p| p["data"]["type"] == "UPDATE"
        && p["data"]["row"]["room_id"] == 2
        && p["data"]["old"]["room_id"] == 1));
    assert_eq!(w_hist[2].len(), 4, "{:#?}", w_hist[2]);

    // Recovery from history in wal mode.
    let (mut c, epochs) = subscriber(&wal, &[]).await;
    drop(epochs);
    let h = c
        .call(json!({"history": {"channel": "kinds", "limit": 0}}))
        .await;
    let epoch = h["history"]["epoch"].as_str().unwrap().to_owned();
    let r = c
        .call(
            json!({"subscribe": {"channel": "kinds", "recoverable": true, "positioned": true,
                                   "recover": true, "offset": 6, "epoch": epoch}}),
        )
        .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let got = c.recovered_then_live(&r, "kinds", 3).await;
    assert_eq!(got[0]["offset"], 7);
    assert_eq!(got[2]["data"]["end"], true);

    wal.stop().await;
    tdb.drop_db().await;
    wdb.drop_db().await;
}

/// Writers insert `per_writer` chat rows each, in transactions of 1-5 rows.
fn spawn_writers(
    db: &TestDb,
    writers: usize,
    per_writer: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut written = 0;
                while written < per_writer {
                    let size = (1 + (written + w) % 5).min(per_writer - written);
                    let mut tx = pool.begin().await.unwrap();
                    for i in 0..size {
                        let id = format!("w{w}-{}", written + i);
                        sqlx::query(
                            "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
                             VALUES ($1, 'writer', $1, 'writer', 0)",
                        )
                        .bind(&id)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    }
                    tx.commit().await.unwrap();
                    written += size;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect()
}

/// Reads `n` publications of `incoming-chat`: offsets 1..=n in order, each row once; returns
/// (offset, msg_id) pairs.
async fn read_all(c: &mut Client, n: usize) -> Vec<(u64, String)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while out.len() < n {
        let p = c.next_pub("incoming-chat").await;
        let offset = p["offset"].as_u64().unwrap();
        assert_eq!(offset, out.len() as u64 + 1, "gap or duplicate");
        let id = p["data"]["row"]["msg_id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "duplicate {id}");
        out.push((offset, id));
    }
    out
}

async fn history_pairs(c: &mut Client, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let h = c
            .call(json!({"history": {"channel": "incoming-chat", "limit": 300,
                                     "since": {"offset": out.len(), "epoch": ""}}}))
            .await;
        let pubs = h["history"]["publications"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!pubs.is_empty(), "history ends at {}: {h}", out.len());
        for p in pubs {
            out.push((
                p["offset"].as_u64().unwrap(),
                p["data"]["row"]["msg_id"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_identical_offsets_and_takeover_when_the_leader_dies() {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 750;
    let cluster = Cluster::start(&[]);
    let db = kinds_db(&cluster).await;
    let a = Server::start(&wal_config(&db, json!({}))).await;
    wait_leader(&a).await;
    let b = Server::start(&wal_config(&db, json!({}))).await;
    assert!(b.metrics().await.lines().any(|l| l == "relay_wal_leader 0"));
    let (mut ca, _) = subscriber(&a, &["incoming-chat"]).await;
    let (mut cb, _) = subscriber(&b, &["incoming-chat"]).await;

    let writers = spawn_writers(&db, WRITERS, PER_WRITER);
    // Let a third of the rows through, then kill the leader: its connections are terminated (as a
    // crashed process's would close) and the node is stopped.
    let first = read_all(&mut ca, WRITERS * PER_WRITER / 3).await;
    let killed = Instant::now();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'relay-wal-leader'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let stopping = tokio::spawn(a.stop());
    let takeover = wait_leader(&b).await;
    stopping.await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let all = read_all(&mut cb, WRITERS * PER_WRITER).await;
    assert_eq!(
        &all[..first.len()],
        &first[..],
        "both nodes delivered identical offsets"
    );
    assert_eq!(
        history_pairs(&mut cb, all.len()).await,
        all,
        "history matches"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_data")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, all.len());
    // A third node started now reads the same history.
    let c = Server::start(&wal_config(&db, json!({}))).await;
    let (mut cc, _) = subscriber(&c, &[]).await;
    assert_eq!(history_pairs(&mut cc, all.len()).await, all);
    eprintln!(
        "takeover: leader killed -> other node leading after {:.2} s (total {:.2} s)",
        takeover.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    eprintln!(
        "{}",
        b.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("relay_wal"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    c.stop().await;
    b.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_transactions_on_one_row_arrive_in_commit_order() {
    let cluster = Cluster::start(&[]);
    let db = kinds_db(&cluster).await;
    let server = Server::start(&wal_config(&db, json!({}))).await;
    wait_leader(&server).await;
    let (mut c, _) = subscriber(&server, &["incoming-chat"]).await;
    db.insert_chat("row", "v0").await;
    assert_eq!(c.next_pub("incoming-chat").await["data"]["type"], "INSERT");

    // T1 starts first (and takes the lower xid), T2 updates the row and commits, then T1 updates
    // it and commits: commit order is T2, T1.
    let mut t1 = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO other VALUES (1)")
        .execute(&mut *t1)
        .await
        .unwrap();
    let mut t2 = db.pool.begin().await.unwrap();
    sqlx::query("UPDATE chat_data SET msg_data = 't2' WHERE msg_id = 'row'")
        .execute(&mut *t2)
        .await
        .unwrap();
    t2.commit().await.unwrap();
    sqlx::query("UPDATE chat_data SET msg_data = 't1' WHERE msg_id = 'row'")
        .execute(&mut *t1)
        .await
        .unwrap();
    t1.commit().await.unwrap();

    let p1 = c.next_pub("incoming-chat").await;
    let p2 = c.next_pub("incoming-chat").await;
    assert_eq!(
        (
            p1["data"]["old"]["msg_data"].as_str(),
            p1["data"]["row"]["msg_data"].as_str()
        ),
        (Some("v0"), Some("t2"))
    );
    assert_eq!(
        (
            p2["data"]["old"]["msg_data"].as_str(),
            p2["data"]["row"]["msg_data"].as_str()
        ),
        (Some("t2"), Some("t1"))
    );
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transactions_delay_nothing() {
    let cluster = Cluster::start(&[]);
    let db = kinds_db(&cluster).await;
    let server = Server::start(&wal_config(&db, json!({}))).await;
    wait_leader(&server).await;
    let (mut c, _) = subscriber(&server, &["incoming-chat"]).await;

    // Open transactions with xids: one in our database, one in another.
    let mut same = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO other VALUES (1)")
        .execute(&mut *same)
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    let mut elsewhere = admin.begin().await.unwrap();
    sqlx::query("CREATE TEMP TABLE held (x int)")
        .execute(&mut *elsewhere)
        .await
        .unwrap();
    sqlx::query("INSERT INTO held VALUES (1)")
        .execute(&mut *elsewhere)
        .await
        .unwrap();

    for i in 0..20 {
        db.insert_chat(&format!("m{i}"), "while open").await;
    }
    // Every row arrives while both transactions are still open (in trigger mode the horizon would
    // hold them back until the transactions end).
    let got = read_all(&mut c, 20).await;
    assert_eq!(got.len(), 20);
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(open >= 2, "the transactions were open throughout");
    same.rollback().await.unwrap();
    elsewhere.rollback().await.unwrap();
    admin.close().await;
    server.stop().await;
    db.drop_db().await;
}

/// Read-your-writes in wal mode: a publish reply comes once the leader has applied the publication,
/// so a history read right after it holds it, even while a transaction stays open in the database.
#[tokio::test]
async fn a_publish_reply_means_the_publication_is_in_history() {
    let cluster = Cluster::start(&[]);
    let db = kinds_db(&cluster).await;
    let server = Server::start(&wal_config(&db, json!({}))).await;
    wait_leader(&server).await;
    let mut open = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO other VALUES (1)")
        .execute(&mut *open)
        .await
        .unwrap();
    let mut c = Client::connected(&server.ws_url()).await;
    for i in 0..15 {
        let r = c
            .call(json!({"publish": {"channel": "news", "data": {"n": i}}}))
            .await;
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(history(&mut c, "news").await.len(), i + 1, "round {i}");
    }
    // The data's text is kept as published (key order, spacing), through the logical message.
    c.send_raw(r#"{"id":900,"publish":{"channel":"news","data":{"b":1, "a":[2,3]}}}"#)
        .await;
    assert_eq!(history(&mut c, "news").await.len(), 16);
    let text: String = sqlx::query_scalar(
        "SELECT data::text FROM relay.publications WHERE channel = 'news' \
         ORDER BY \"offset\" DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(text, r#"{"b":1, "a":[2,3]}"#);
    open.rollback().await.unwrap();
    server.stop().await;
    db.drop_db().await;
}

/// Stops nothing but the client: the slot is dropped (phase 1) or invalidated by
/// max_slot_wal_keep_size (phase 2) while no connector runs; the returning client gets
/// `recovered: false` and the new epoch, and later rows continue the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_gives_recovered_false_never_a_silent_gap() {
    let cluster = Cluster::start(&["max_slot_wal_keep_size=1MB"]);
    let db = kinds_db(&cluster).await;
    let slot = "lost_test";
    let config = wal_config(
        &db,
        json!({"capture": {"mode": "wal", "heartbeat_secs": 1, "slot": slot}}),
    );
    let mut next = 0;
    for phase in ["dropped", "invalidated"] {
        let server = Server::start(&config).await;
        wait_leader(&server).await;
        let (mut c, epochs) = subscriber(&server, &["incoming-chat"]).await;
        for _ in 0..2 {
            next += 1;
            db.insert_chat(&format!("m{next}"), phase).await;
        }
        c.next_pub("incoming-chat").await;
        let p = c.next_pub("incoming-chat").await;
        assert_eq!(p["data"]["row"]["msg_id"], format!("m{next}"));
        let top = p["offset"].as_u64().unwrap();
        drop(c);
        server.stop().await;

        // While no connector runs: rows are written and the slot is lost.
        for _ in 0..2 {
            next += 1;
            db.insert_chat(&format!("m{next}"), "lost").await;
        }
        if phase == "dropped" {
            sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(slot)
                .execute(&db.pool)
                .await
                .unwrap();
        } else {
            let mut status = String::new();
            for _ in 0..30 {
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS junk (x text);
                     INSERT INTO junk SELECT repeat(md5(i::text), 20) FROM generate_series(1, 5000) i;
                     SELECT pg_switch_wal(); CHECKPOINT;",
                )
                .execute(&db.pool)
                .await
                .unwrap();
                status = sqlx::query_scalar(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                )
                .bind(slot)
                .fetch_one(&db.pool)
                .await
                .unwrap();
                if status == "lost" {
                    break;
                }
            }
            assert_eq!(status, "lost", "the slot was invalidated");
        }

        let server = Server::start(&config).await;
        wait_leader(&server).await;
        let mut c = Client::connected(&server.ws_url()).await;
        let r = c
            .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true, "positioned": true,
                                       "recover": true, "offset": top, "epoch": epochs[0]}}))
            .await;
        assert_eq!(r["subscribe"]["was_recovering"], true, "{phase}: {r}");
        assert_ne!(r["subscribe"]["recovered"], json!(true), "{phase}: {r}");
        assert_ne!(
            r["subscribe"]["epoch"],
            json!(epochs[0]),
            "{phase}: new epoch"
        );
        assert!(
            server
                .metrics()
                .await
                .lines()
                .any(|l| l == "relay_wal_slot_losses_total 1")
        );
        // The stream goes on from the new position.
        next += 1;
        db.insert_chat(&format!("m{next}"), "after").await;
        let p = c.next_pub("incoming-chat").await;
        assert_eq!(p["data"]["row"]["msg_id"], format!("m{next}"));
        drop(c);
        server.stop().await;
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsender_killed_repeatedly_loses_nothing() {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 500;
    let cluster = Cluster::start(&[]);
    let db = kinds_db(&cluster).await;
    let server = Server::start(&wal_config(&db, json!({}))).await;
    wait_leader(&server).await;
    let (mut c, _) = subscriber(&server, &["incoming-chat"]).await;
    let writers = spawn_writers(&db, WRITERS, PER_WRITER);
    let killer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut killed = 0i64;
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE backend_type = 'walsender'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                killed += n;
            }
            killed
        })
    };
    let all = read_all(&mut c, WRITERS * PER_WRITER).await;
    for w in writers {
        w.await.unwrap();
    }
    let killed = killer.await.unwrap();
    assert!(killed >= 3, "walsenders killed: {killed}");
    assert_eq!(history_pairs(&mut c, all.len()).await, all);
    assert!(
        c.try_next(Duration::from_millis(500))
            .await
            .is_none_or(|m| m["push"]["pub"].is_null())
    );
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_trigger_to_wal_keeps_offsets_and_epochs() {
    let cluster = Cluster::start(&[]);
    let db = kinds_db(&cluster).await;
    let trigger = Server::start(&config_json(
        &db.url,
        json!({"mappings": mappings(), "capture": {"mode": "trigger"}}),
    ))
    .await;
    let (mut c, epochs) = subscriber(&trigger, &["incoming-chat"]).await;
    for i in 1..=3 {
        db.insert_chat(&format!("m{i}"), "trigger mode").await;
    }
    let got = read_all(&mut c, 3).await;
    assert_eq!(got[2], (3, "m3".to_owned()));
    drop(c);
    trigger.stop().await;
    // Committed while no connector runs: through the triggers, into the changelog.
    for i in 4..=5 {
        db.insert_chat(&format!("m{i}"), "between").await;
    }
    let wal = Server::start(&wal_config(&db, json!({}))).await;
    wait_leader(&wal).await;
    for i in 6..=7 {
        db.insert_chat(&format!("m{i}"), "wal mode").await;
    }
    let mut c = Client::connected(&wal.ws_url()).await;
    let r = c
        .call(json!({"subscribe": {"channel": "incoming-chat", "recoverable": true, "positioned": true,
                                   "recover": true, "offset": 3, "epoch": epochs[0]}}))
        .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let pubs = c.recovered_then_live(&r, "incoming-chat", 4).await;
    let ids: Vec<&str> = pubs
        .iter()
        .map(|p| p["data"]["row"]["msg_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m4", "m5", "m6", "m7"]);
    assert_eq!(pubs[0]["offset"], 4);
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'relay\\_%' AND NOT tgisinternal",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0, "the leader dropped the capture triggers");
    wal.stop().await;
    db.drop_db().await;
}
