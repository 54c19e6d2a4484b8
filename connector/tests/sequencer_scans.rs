//! The trigger-mode sequencer walks the changelog by its primary key (migration 0019): with
//! thousands of dead rows in `relay.changelog` (every batch deletes what it moved; autovacuum comes
//! later), neither a batch nor the "anything to move?" check reads pages in proportion to them.
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

#[tokio::test]
async fn the_sequencer_does_not_read_the_dead_rows_of_the_changelog() {
    let db = TestDb::new().await;
    connector::db::migrate(&db.pool).await.unwrap();
    sqlx::query("ALTER TABLE relay.changelog SET (autovacuum_enabled = false)")
        .execute(&db.pool)
        .await
        .unwrap();
    // Statistics taken while many changes were pending (as autovacuum's analyze may take them),
    // then every change moved: the changelog is all dead rows.
    changes(&db.pool, DEAD).await;
    sqlx::query("ANALYZE relay.changelog")
        .execute(&db.pool)
        .await
        .unwrap();
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

    // One connection, so that its cached plans are the ones measured; its first calls, which read
    // the catalogs to plan, are not measured.
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    changes(&db.pool, 3).await;
    blocks_of_a_batch(&mut conn).await;
    blocks_of_a_batch(&mut conn).await;
    let mut seen = Vec::new();
    for _ in 0..CALLS {
        changes(&db.pool, 3).await;
        let batch = blocks_of_a_batch(&mut conn).await;
        assert_eq!(pending(&db.pool).await, 0, "a batch left changes behind");
        let nothing = blocks_of_a_batch(&mut conn).await;
        seen.push((batch, nothing));
    }
    let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.publications")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(moved, DEAD + 3 * (CALLS as i64 + 1));
    for &(batch, nothing) in &seen {
        assert!(
            batch < dead_pages / 4 && nothing < dead_pages / 4,
            "sequencer calls read {seen:?} blocks (a batch, then nothing to move) with \
             {dead_pages} pages of dead rows"
        );
    }
    conn.close().await.unwrap();
    db.drop_db().await;
}
