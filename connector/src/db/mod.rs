//! Everything that talks to PostgreSQL: the query pool and migrations, the generated capture
//! triggers, the change stream (LISTEN wake-ups + gapless reads) and the history queries.
//!
//! - [`triggers`]: capture triggers generated from the mappings.
//! - [`stream`]: the task that sequences the changelog and reads new publications for the hub.
//! - [`history`]: stream positions, history and recovery reads, client publications.
//! - [`tls`]: TLS for the LISTEN connection, with libpq's `sslmode` meanings.
//! - [`retention`]: the pruning task that keeps each channel's history within its retention rule.

pub mod history;
pub mod retention;
pub mod stream;
pub mod tls;
pub mod triggers;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseConfig;
use crate::error::Result;

/// The migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Builds the query pool (connections are opened lazily, so start-up does not fail on a slow database).
pub fn pool(config: &DatabaseConfig) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(Duration::from_secs(config.connect_timeout_secs))
        .connect_lazy(&config.url)?;
    Ok(pool)
}

/// Applies the migrations.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
