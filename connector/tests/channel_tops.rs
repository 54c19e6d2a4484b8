//! How a batch moves its channels' top offsets (migration 0016), in both capture modes' functions:
//! channels that exist are updated, a channel seen for the first time is inserted with its first
//! epoch, and a channel another transaction creates while the batch runs is taken over by the
//! INSERT's ON CONFLICT branch, continuing from that transaction's top offset.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use sqlx::PgPool;
use support::TestDb;

/// (channel, offset, epoch) of every publication, in `seq` order.
async fn publications(pool: &PgPool) -> Vec<(String, i64, String)> {
    sqlx::query_as(r#"SELECT channel, "offset", epoch FROM relay.publications ORDER BY seq"#)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn first_epoch(pool: &PgPool, channel: &str) -> String {
    sqlx::query_scalar("SELECT relay.first_epoch($1)")
        .bind(channel)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn publish(pool: &PgPool, channel: &str) {
    sqlx::query("SELECT relay.publish($1, '{}'::jsonb)")
        .bind(channel)
        .execute(pool)
        .await
        .unwrap();
}

/// Trigger mode: `relay.sequence_batch()` moves the changelog into the history.
async fn sequence(pool: &PgPool) -> i32 {
    sqlx::query_scalar("SELECT moved FROM relay.sequence_batch(1000, false)")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Wal mode: `relay.wal_apply_batch()` with one publication per channel of `channels`, as the
/// transaction ending at `lsn`.
async fn apply(pool: &PgPool, lsn: &str, channels: &[&str]) -> i32 {
    let n = channels.len();
    let keys: Vec<i64> = (0..n as i64).collect();
    sqlx::query_scalar(
        "SELECT relay.wal_apply_batch('t', $1::pg_lsn, $2, array_fill($1::pg_lsn, ARRAY[$4]),
             $3, array_fill('{}'::json, ARRAY[$4]), array_fill(NULL::jsonb, ARRAY[$4]),
             array_fill(0::int8, ARRAY[$4]))",
    )
    .bind(lsn)
    .bind(&keys)
    .bind(channels)
    .bind(i32::try_from(n).unwrap())
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Owned (channel, offset, epoch) rows, to compare with [`publications`].
fn rows(want: &[(&str, i64, &str)]) -> Vec<(String, i64, String)> {
    want.iter()
        .map(|(c, o, e)| ((*c).to_owned(), *o, (*e).to_owned()))
        .collect()
}

/// Runs `batch` while another transaction has created `channel` at `top_offset` and not yet
/// committed: the batch must wait for it, then finish once it commits. Returns what the batch moved.
async fn beside_an_uncommitted_channel(
    db: &TestDb,
    channel: &str,
    top_offset: i64,
    batch: impl Future<Output = i32> + Send + 'static,
) -> i32 {
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO relay.channels (name, epoch, top_offset) VALUES ($1, 'x', $2)")
        .bind(channel)
        .bind(top_offset)
        .execute(&mut *other)
        .await
        .unwrap();
    let batch = tokio::spawn(batch);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !batch.is_finished(),
        "the batch must wait for the other insert"
    );
    other.commit().await.unwrap();
    batch.await.unwrap()
}

#[tokio::test]
async fn trigger_mode_batches_update_existing_channels_and_insert_new_ones() {
    let db = TestDb::new().await;
    connector::db::migrate(&db.pool).await.unwrap();
    for ch in ["a", "a", "a"] {
        publish(&db.pool, ch).await;
    }
    assert_eq!(sequence(&db.pool).await, 3);
    for ch in ["a", "b", "a"] {
        publish(&db.pool, ch).await;
    }
    assert_eq!(sequence(&db.pool).await, 3);
    let (ea, eb) = (
        first_epoch(&db.pool, "a").await,
        first_epoch(&db.pool, "b").await,
    );
    let want = rows(&[
        ("a", 1, &ea),
        ("a", 2, &ea),
        ("a", 3, &ea),
        ("a", 4, &ea),
        ("b", 1, &eb),
        ("a", 5, &ea),
    ]);
    assert_eq!(publications(&db.pool).await, want);
    let tops: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, top_offset FROM relay.channels ORDER BY name")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(tops, vec![("a".to_owned(), 5), ("b".to_owned(), 1)]);

    // A channel another transaction creates while the batch runs: the batch's UPDATE cannot see
    // the uncommitted row, its INSERT waits for that transaction and then continues from the top
    // offset it committed.
    publish(&db.pool, "c").await;
    let pool = db.pool.clone();
    let moved =
        beside_an_uncommitted_channel(&db, "c", 7, async move { sequence(&pool).await }).await;
    assert_eq!(moved, 1);
    let last = publications(&db.pool).await.pop().unwrap();
    assert_eq!(last, ("c".to_owned(), 8, first_epoch(&db.pool, "c").await));
    db.drop_db().await;
}

#[tokio::test]
async fn wal_mode_batches_update_existing_channels_and_insert_new_ones() {
    let db = TestDb::new().await;
    connector::db::migrate(&db.pool).await.unwrap();
    sqlx::query("UPDATE relay.wal_state SET slot_name = 't'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(apply(&db.pool, "0/10", &["a", "a", "b"]).await, 3);
    assert_eq!(apply(&db.pool, "0/20", &["b", "c", "a"]).await, 3);
    // A replay of an applied transaction writes nothing, and moves no top offset.
    assert_eq!(apply(&db.pool, "0/20", &["a"]).await, 0);
    let (ea, eb, ec) = (
        first_epoch(&db.pool, "a").await,
        first_epoch(&db.pool, "b").await,
        first_epoch(&db.pool, "c").await,
    );
    let want = rows(&[
        ("a", 1, &ea),
        ("a", 2, &ea),
        ("b", 1, &eb),
        ("b", 2, &eb),
        ("c", 1, &ec),
        ("a", 3, &ea),
    ]);
    assert_eq!(publications(&db.pool).await, want);

    let pool = db.pool.clone();
    let moved = beside_an_uncommitted_channel(&db, "d", 4, async move {
        apply(&pool, "0/30", &["d", "a"]).await
    })
    .await;
    assert_eq!(moved, 2);
    let got = publications(&db.pool).await;
    assert_eq!(
        got[got.len() - 2..],
        [
            ("d".to_owned(), 5, first_epoch(&db.pool, "d").await),
            ("a".to_owned(), 4, ea)
        ]
    );
    db.drop_db().await;
}
