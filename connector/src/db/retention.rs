//! History retention: a task that prunes each channel's history to the limits of the retention rule
//! that matches it (count and age), in small batches that never block writers.
//!
//! The work is in `relay.prune_channel()`; this task walks `relay.channels` page by page on a timer.
//! A channel whose rule changed gets a new epoch there, so clients positioned in its old stream are told
//! `recovered: false` instead of being handed a history with a silent gap.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::error::Result;

/// Channels handled per query page.
const PAGE: i64 = 500;

/// Runs pruning passes every `prune_interval_secs` until `shutdown`.
pub async fn run(pool: PgPool, config: Arc<RetentionConfig>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(config.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match prune_all(&pool, &config, &shutdown).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "history pruned"),
            Err(e) => tracing::warn!(error = %e, "history pruning failed; will retry"),
        }
    }
}

/// One pass over every channel. Returns the number of publications deleted.
pub async fn prune_all(
    pool: &PgPool,
    config: &RetentionConfig,
    shutdown: &CancellationToken,
) -> Result<u64> {
    let mut after = String::new();
    let mut deleted = 0u64;
    loop {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM relay.channels WHERE name > $1 ORDER BY name LIMIT $2",
        )
        .bind(&after)
        .bind(PAGE)
        .fetch_all(pool)
        .await?;
        for name in &names {
            if shutdown.is_cancelled() {
                return Ok(deleted);
            }
            let rule = config.rule_for(name);
            let n: i64 = sqlx::query_scalar("SELECT relay.prune_channel($1, $2, $3, $4)")
                .bind(name)
                .bind(i64::try_from(rule.max_publications).unwrap_or(i64::MAX))
                .bind(i64::try_from(rule.max_age_secs).unwrap_or(i64::MAX))
                .bind(rule.signature())
                .fetch_one(pool)
                .await?;
            deleted += u64::try_from(n).unwrap_or(0);
        }
        match names.last() {
            Some(last) if names.len() as i64 == PAGE => after.clone_from(last),
            _ => return Ok(deleted),
        }
    }
}
