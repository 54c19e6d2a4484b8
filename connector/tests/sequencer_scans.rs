//! The trigger-mode sequencer walks the changelog by its primary key (migrations 0019, 0020): with
//! thousands of dead rows in `relay.changelog` (every batch deletes what it moved; autovacuum comes
//! later), neither a batch nor the "anything to move?" check reads pages in proportion to them,
//! whether the statistics were taken while many changes were pending or the connection's plans were
//! made while the changelog was empty.
#![allow(clippy::unwrap_used)]

mod support;

use sqlx::{Connection as _, PgConnection, PgPool};
use support::TestDb;

/// Changes left dead in the changelog before the measured calls.
const DEAD: i64 = 30_000;
/// Measured calls: more than the five after which PL/pgSQL may switch a statement to its generic
/// plan, the plan that chose a sequential scan.
const CALLS: usize = 12;

async fn changes(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO relay.changelog (channel, data)
         SELECT 'scan:' || (g % 7), '{}'::json FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// Shared buffers (hit or read) that one `relay.sequence_batch()` call touched, itself included.
async fn blocks_of_a_batch(conn: &mut PgConnection) -> i64 {
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM relay.sequence_batch(1000, false)",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let top = &plan[0]["Plan"];
    top["Shared Hit Blocks"].as_i64().unwrap() + top["Shared Read Blocks"].as_i64().unwrap()
}

async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM relay.changelog")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Moves every change (through `db.pool`, not the measured connection), so that the changelog holds
/// only dead rows; the number of its pages.
async fn drained_changelog(db: &TestDb) -> i64 {
    let mut drained = false;
    for _ in 0..100 {
        let moved: i32 = sqlx::query_scalar("SELECT moved FROM relay.sequence_batch(1000, false)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if moved == 0 {
            drained = true;
            break;
        }
    }
    assert!(drained, "the changelog did not drain");
    assert_eq!(pending(&db.pool).await, 0);
    let dead_pages: i64 = sqlx::query_scalar(
        "SELECT pg_relation_size('relay.changelog') / current_setting('block_size')::int8",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(dead_pages > 100, "only {dead_pages} pages of dead rows");
    dead_pages
}

/// `CALLS` times: 3 changes, a batch on `conn` that moves them, a call on `conn` with nothing to
/// move; checks that none of them read a quarter of the changelog's `dead_pages`, and that
/// `earlier` changes plus these are in the history.
async fn assert_calls_skip_dead_rows(
    db: &TestDb,
    conn: &mut PgConnection,
    dead_pages: i64,
    earlier: i64,
) {
    let mut seen = Vec::new();
    for _ in 0..CALLS {
        changes(&db.pool, 3).await;
        let batch = blocks_of_a_batch(conn).await;
        assert_eq!(pending(&db.pool).await, 0, "a batch left changes behind");
        let nothing = blocks_of_a_batch(conn).await;
        seen.push((batch, nothing));
    }
    let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.publications")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(moved, earlier + 3 * CALLS as i64);
    for &(batch, nothing) in &seen {
        assert!(
            batch < dead_pages / 4 && nothing < dead_pages / 4,
            "sequencer calls read {seen:?} blocks (a batch, then nothing to move) with \
             {dead_pages} pages of dead rows"
        );
    }
}

/// The measured connection, its plans made: a batch of 3 changes and a call with nothing to move
/// (the first calls read the catalogs to plan, so they are not measured).
async fn planned_connection(db: &TestDb) -> PgConnection {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    changes(&db.pool, 3).await;
    blocks_of_a_batch(&mut conn).await;
    blocks_of_a_batch(&mut conn).await;
    conn
}

/// A fresh, migrated database whose changelog autovacuum leaves alone (its dead rows stay).
async fn migrated_without_autovacuum() -> TestDb {
    let db = TestDb::new().await;
    connector::db::migrate(&db.pool).await.unwrap();
    sqlx::query("ALTER TABLE relay.changelog SET (autovacuum_enabled = false)")
        .execute(&db.pool)
        .await
        .unwrap();
    db
}

#[tokio::test]
async fn the_sequencer_does_not_read_the_dead_rows_of_the_changelog() {
    let db = migrated_without_autovacuum().await;
    // Statistics taken while many changes were pending (as autovacuum's analyze may take them),
    // then every change moved: the changelog is all dead rows.
    changes(&db.pool, DEAD).await;
    sqlx::query("ANALYZE relay.changelog")
        .execute(&db.pool)
        .await
        .unwrap();
    let dead_pages = drained_changelog(&db).await;
    // One connection, so that its cached plans are the ones measured.
    let mut conn = planned_connection(&db).await;
    assert_calls_skip_dead_rows(&db, &mut conn, dead_pages, DEAD + 3).await;
    conn.close().await.unwrap();
    db.drop_db().await;
}

/// The function's plans are generic, made once per connection (migration 0020): made while the
/// changelog was empty, they must still walk it by its key once it is full of dead rows (a plan
/// costed for an empty table would scan it whole, on every call, until the next ANALYZE).
#[tokio::test]
async fn plans_made_on_an_empty_changelog_do_not_read_its_dead_rows() {
    let db = migrated_without_autovacuum().await;
    sqlx::query("VACUUM ANALYZE relay.changelog")
        .execute(&db.pool)
        .await
        .unwrap();
    // The measured connection makes its plans now, on the empty changelog.
    let mut conn = planned_connection(&db).await;
    changes(&db.pool, DEAD).await;
    let dead_pages = drained_changelog(&db).await;
    assert_calls_skip_dead_rows(&db, &mut conn, dead_pages, DEAD + 3).await;
    conn.close().await.unwrap();
    db.drop_db().await;
}
