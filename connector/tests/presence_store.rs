//! The store suite (`connector::cluster::conformance`: the presence store with the cluster store
//! that shares its tables) against PostgreSQL; the in-memory pair runs the same suite as a unit test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use connector::cluster::{conformance, pg::PgCluster};
use connector::presence::pg::PgStore;
use support::TestDb;

#[tokio::test]
async fn the_postgres_store_passes_the_store_suite() {
    let db = TestDb::new().await;
    connector::db::migrate(&db.pool).await.unwrap();
    conformance::run(
        Arc::new(PgStore::new(db.pool.clone())),
        Arc::new(PgCluster::new(db.pool.clone(), db.url.clone())),
    )
    .await;
    db.drop_db().await;
}
