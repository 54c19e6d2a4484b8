//! Read-your-writes: a publish is acknowledged only once its publication is in the history.
//!
//! After a write commits (a writer's rows, `relay.publish()`), [`sequenced`] takes a fence with
//! `relay.write_fence()` and waits until `relay.fence_passed()` says every transaction committed before
//! it has been sequenced (migration 0013 explains both capture modes). The wait polls with a short,
//! growing interval: the sequencer runs within milliseconds of a commit (its wake-up is armed while it
//! is idle, and it polls while changes flow), so a reply waits about one sequencing pass.
//!
//! The wait is bounded by [`MAX_WAIT`]. Sequencing can be held back by a transaction that stays open in
//! the same database (trigger mode) or by a leader change (wal mode); the write is durable either way
//! and will be delivered, so after the bound the publish is acknowledged anyway, with a warning: an
//! error reply would make the client retry a write that already happened.

use std::time::Duration;

use sqlx::PgPool;

use crate::error::Result;

/// How long a publish reply waits for its publication to be sequenced.
pub const MAX_WAIT: Duration = Duration::from_secs(3);

/// First pause between two checks; it doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(1);

/// Longest pause between two checks.
const MAX_POLL: Duration = Duration::from_millis(16);

/// Whether what this process committed before the call is in the history, waiting up to `max_wait`
/// for it. `Ok(false)` means it was not sequenced in time (the caller acknowledges anyway).
pub async fn sequenced(pool: &PgPool, max_wait: Duration) -> Result<bool> {
    let fence: String = sqlx::query_scalar("SELECT relay.write_fence()")
        .fetch_one(pool)
        .await?;
    let deadline = tokio::time::Instant::now() + max_wait;
    let mut pause = FIRST_POLL;
    loop {
        let passed: bool = sqlx::query_scalar("SELECT relay.fence_passed($1)")
            .bind(&fence)
            .fetch_one(pool)
            .await?;
        if passed {
            return Ok(true);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(
                fence,
                "a publish was acknowledged before it was sequenced: sequencing is held back \
                 (a long transaction in this database, or no wal leader)"
            );
            return Ok(false);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// [`sequenced`] for a write that has already succeeded: waits for its publication to be in the
/// history, up to [`MAX_WAIT`]. A failed check is logged, not returned: the write is durable and will be
/// delivered, so its acknowledgement must not turn into an error that makes the client retry it.
pub async fn settle(pool: &PgPool) {
    if let Err(e) = sequenced(pool, MAX_WAIT).await {
        tracing::warn!(error = %e, "could not check that a publish was sequenced; acknowledged");
    }
}
