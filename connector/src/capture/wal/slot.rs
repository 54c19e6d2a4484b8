//! The slot before streaming: checked (a pgoutput slot of this database, no stale walsender on it),
//! created when missing, found lost when it cannot replay from the stored position, and capture
//! handed over from the triggers, all under the leader lock ([`prepare_slot`]).

use std::time::Duration;

use anyhow::{Context as _, bail};
use pgwire_replication::Lsn;
use sqlx::{PgConnection, PgPool};

use crate::capture::CaptureStatus;
use crate::db::triggers::{capture_triggers, drop_trigger};

/// What [`existing_slot`] found.
enum Found {
    /// No usable slot: none, or an invalidated one that was dropped.
    Nothing,
    /// A usable slot, confirmed up to this position.
    Usable { confirmed: Option<Lsn> },
}

/// Where the stream can start, as found before the hand-over transaction.
struct Position {
    /// The stored position (`relay.wal_state.lsn`), if capture ever started.
    stored: Option<Lsn>,
    /// The slot's confirmed position (its consistent point when just created).
    confirmed: Option<Lsn>,
    /// The slot cannot replay from the stored position: channels need new epochs.
    lost: bool,
}

/// Makes sure the slot exists and matches the stored position; hands capture over from the
/// triggers on the first start; handles a lost slot. Returns the LSN to stream from.
pub(super) async fn prepare_slot(
    pool: &PgPool,
    slot: &str,
    status: &CaptureStatus,
) -> anyhow::Result<Lsn> {
    let (stored_slot, stored): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT slot_name, lsn::text FROM relay.wal_state")
            .fetch_one(pool)
            .await?;
    let stored = stored.map(|s| Lsn::parse(&s)).transpose()?;
    let found = existing_slot(pool, slot).await?;
    let position = ensure_slot(pool, slot, found, stored_slot.as_deref(), stored).await?;

    let mut tx = pool.begin().await?;
    let had_triggers = hand_over(&mut tx).await?;
    let start = if position.lost {
        resume_after_loss(&mut tx, slot, status, &position).await?
    } else if let Some(stored) = position.stored {
        stored
    } else {
        store_first_position(&mut tx, slot, had_triggers, position.confirmed).await?
    };
    tx.commit().await?;
    Ok(start)
}

/// The slot as `pg_replication_slots` shows it (an invalidated slot is dropped here). Refuses a
/// slot of another plugin or database; ends a stale walsender streaming from it.
async fn existing_slot(pool: &PgPool, slot: &str) -> anyhow::Result<Found> {
    type SlotRow = (
        Option<String>,
        Option<String>,
        Option<i32>,
        Option<String>,
        Option<String>,
    );
    let row: Option<SlotRow> = sqlx::query_as(
        "SELECT wal_status, confirmed_flush_lsn::text, active_pid, plugin::text, database::text
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await?;
    let Some((wal_status, flush, active_pid, plugin, database)) = row else {
        return Ok(Found::Nothing);
    };
    if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(db.as_str()) {
        bail!(
            "replication slot {slot:?} exists but is not a pgoutput slot of database \
             {db:?}: choose another capture.slot"
        );
    }
    if let Some(pid) = active_pid {
        // We hold the leader lock: whoever streams from the slot is a leader that lost it.
        tracing::warn!(pid, "terminating a stale walsender of the capture slot");
        terminate_walsender(pool, slot, pid).await?;
    }
    if wal_status.as_deref() == Some("lost") {
        tracing::error!(slot = %slot, "the capture slot was invalidated (max_slot_wal_keep_size exceeded?); recreating it");
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot)
            .execute(pool)
            .await?;
        return Ok(Found::Nothing);
    }
    Ok(Found::Usable {
        confirmed: flush.map(|f| Lsn::parse(&f)).transpose()?,
    })
}

/// Creates the slot when none was `found`, and decides whether the slot can replay from the
/// stored position.
async fn ensure_slot(
    pool: &PgPool,
    slot: &str,
    found: Found,
    stored_slot: Option<&str>,
    stored: Option<Lsn>,
) -> anyhow::Result<Position> {
    let Found::Usable { confirmed } = found else {
        let (_, lsn): (String, String) = sqlx::query_as(
            "SELECT slot_name::text, lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        )
        .bind(slot)
        .fetch_one(pool)
        .await
        .context("creating the replication slot")?;
        let confirmed = Some(Lsn::parse(&lsn)?);
        tracing::info!(slot = %slot, lsn = %lsn, "created the capture slot");
        // A slot that is gone while a position is stored lost what it held.
        return Ok(Position {
            stored,
            confirmed,
            lost: stored.is_some(),
        });
    };
    // The slot is confirmed beyond what we stored (recreated by someone, or another slot's
    // position): what lies between cannot be replayed.
    let lost = stored.is_some()
        && (stored_slot != Some(slot) || confirmed.is_some_and(|c| Some(c) > stored));
    Ok(Position {
        stored,
        confirmed,
        lost,
    })
}

/// Hand-over (idempotent): no capture trigger, relay.publish() through messages. The trigger
/// drops wait for every transaction that wrote a mapped table through a trigger. Returns whether
/// there were capture triggers.
async fn hand_over(conn: &mut PgConnection) -> anyhow::Result<bool> {
    let triggers = capture_triggers(&mut *conn).await?;
    for found in &triggers {
        drop_trigger(&mut *conn, found).await?;
        let (schema, table, trigger) = found;
        tracing::info!(trigger = %format!("{schema}.{table}.{trigger}"), "dropped capture trigger (wal mode)");
    }
    sqlx::query(
        "INSERT INTO relay.settings (key, value) VALUES ('capture.mode', 'wal')
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
         WHERE relay.settings.value IS DISTINCT FROM EXCLUDED.value",
    )
    .execute(&mut *conn)
    .await?;
    Ok(!triggers.is_empty())
}

/// A lost slot: every channel gets a new epoch and the position moves to the slot's; returns it.
async fn resume_after_loss(
    conn: &mut PgConnection,
    slot: &str,
    status: &CaptureStatus,
    position: &Position,
) -> anyhow::Result<Lsn> {
    let at = position.confirmed.context("slot position")?;
    let channels: i64 = sqlx::query_scalar("SELECT relay.wal_slot_lost($1, $2::text::pg_lsn)")
        .bind(slot)
        .bind(at.to_string())
        .fetch_one(&mut *conn)
        .await?;
    status.slot_losses.inc();
    tracing::error!(
        slot = %slot, stored = ?position.stored.map(|s| s.to_string()), resume = %at, channels,
        "the capture slot lost changes it had not delivered: every channel got a new epoch \
         (clients get recovered: false)"
    );
    Ok(at)
}

/// First start: stores the position the slot takes over from, and returns it. With capture
/// triggers (trigger mode ran before): every transaction that wrote through them has committed
/// below the current insert position (the drops waited for them), and none can write through
/// them later. Without: nothing captured before the slot existed, so the stream starts at the
/// slot's consistent point.
async fn store_first_position(
    conn: &mut PgConnection,
    slot: &str,
    had_triggers: bool,
    confirmed: Option<Lsn>,
) -> anyhow::Result<Lsn> {
    let at: String = if had_triggers {
        sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(&mut *conn)
            .await?
    } else {
        confirmed.context("slot position")?.to_string()
    };
    sqlx::query(
        "UPDATE relay.wal_state SET slot_name = $1, lsn = $2::text::pg_lsn, updated_at = now()",
    )
    .bind(slot)
    .bind(&at)
    .execute(&mut *conn)
    .await?;
    tracing::info!(slot = %slot, lsn = %at, "capture handed over from triggers to the slot");
    Ok(Lsn::parse(&at)?)
}

/// Ends walsender `pid` and waits (up to 5 s) until the slot is free.
async fn terminate_walsender(pool: &PgPool, slot: &str, pid: i32) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(pool)
        .await?;
    for _ in 0..100 {
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(pool)
                .await?;
        if active != Some(true) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the capture slot stays active after terminating walsender {pid}")
}
