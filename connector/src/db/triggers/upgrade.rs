//! The swap between a mapping's legacy trigger (earlier releases: one row-level trigger named with the
//! mapping's stem) and this release's triggers, so that a rolling deploy never captures a write twice
//! and never misses one.
//!
//! A node of an earlier release names only the legacy trigger in its registry entry; a node of this
//! release names both its own triggers and the legacy one. So, for each mapping:
//! - while the legacy trigger is installed and a live entry names it but none of this release's
//!   triggers of the mapping (a node of the earlier release runs it), this release's triggers of the
//!   mapping are not installed (and dropped, if a rollback finds them installed): the legacy trigger
//!   captures for every node, whose changelog rows are the same;
//! - otherwise this release's triggers are installed and the legacy trigger is dropped, in the same
//!   transaction.
//!
//! A node's start-up ([`super::sync`]) decides this, and its watch ([`reconcile`]) decides it again on
//! every check while a legacy trigger of its mappings is installed. A writer's transaction holds its
//! table's lock until it ends and the swap's DDL waits for it, so every transaction is captured by
//! one version or the other, never both, never neither. What stays: after a rollback (a node of the
//! earlier release started while this release's triggers are in place), both capture until the next
//! check of a node of this release (`stream.capture_check_secs`).

use std::collections::HashSet;

use sqlx::{PgConnection, PgPool};

use super::{MappingTriggers, SyncReport, TriggerSpec};
use crate::error::Result;

/// Whether a live node of an earlier release runs `m`'s legacy trigger, which is `installed`.
fn legacy_in_use(
    m: &MappingTriggers,
    installed: &HashSet<String>,
    entries: &[Vec<String>],
) -> bool {
    let legacy = m.legacy.qualified();
    let current: Vec<String> = m.current.iter().map(TriggerSpec::qualified).collect();
    installed.contains(&legacy)
        && entries
            .iter()
            .any(|e| e.contains(&legacy) && !current.iter().any(|c| e.contains(c)))
}

/// Puts each mapping of `maps` in the state the module docs describe, given the live registry
/// `entries`; reports what it installed, dropped and kept. Returns the triggers the mappings use now.
/// Runs in the caller's transaction, which must hold the sync lock.
pub(super) async fn settle(
    conn: &mut PgConnection,
    maps: &[MappingTriggers],
    entries: &[Vec<String>],
    report: &mut SyncReport,
) -> Result<HashSet<String>> {
    let mut installed = installed_names(conn).await?;
    let mut wanted = HashSet::new();
    for m in maps {
        if legacy_in_use(m, &installed, entries) {
            for s in &m.current {
                if installed.remove(&s.qualified()) {
                    drop_spec(conn, s).await?;
                    report.removed.push(s.qualified());
                }
            }
            if wanted.insert(m.legacy.qualified()) {
                report.kept.push(m.legacy.qualified());
            }
            continue;
        }
        for s in &m.current {
            super::install(conn, s).await?;
            if wanted.insert(s.qualified()) {
                report.installed.push(s.qualified());
            }
        }
        if installed.remove(&m.legacy.qualified()) {
            drop_spec(conn, &m.legacy).await?;
            report.removed.push(m.legacy.qualified());
        }
    }
    Ok(wanted)
}

/// The relay capture triggers in the catalog, as `schema.table.trigger`.
async fn installed_names(conn: &mut PgConnection) -> Result<HashSet<String>> {
    Ok(super::capture_triggers(conn)
        .await?
        .into_iter()
        .map(|(schema, table, trigger)| format!("{schema}.{table}.{trigger}"))
        .collect())
}

async fn drop_spec(conn: &mut PgConnection, s: &TriggerSpec) -> Result<()> {
    super::drop_trigger(
        conn,
        &(s.schema.clone(), s.table.clone(), s.trigger.clone()),
    )
    .await
}

/// How long a swap waits for a table's lock (writers' transactions in progress) before it gives up
/// until the next check: DDL waiting for a lock makes every later writer of the table wait behind it.
const SWAP_LOCK_TIMEOUT: &str = "2s";

/// [`settle`] again for the mappings of `maps` whose legacy trigger is installed (nothing, and no
/// lock, when none is): what a node's watch runs on every check. Reports what it changed.
pub async fn reconcile(pool: &PgPool, maps: &[MappingTriggers]) -> Result<SyncReport> {
    let installed = installed_names(&mut *pool.acquire().await?).await?;
    let concerned: Vec<MappingTriggers> = maps
        .iter()
        .filter(|m| installed.contains(&m.legacy.qualified()))
        .cloned()
        .collect();
    let mut report = SyncReport::default();
    if concerned.is_empty() {
        return Ok(report);
    }
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'"))
        .execute(&mut *tx)
        .await?;
    super::lock(&mut tx).await?;
    let entries = super::live_entries(&mut tx).await?;
    settle(&mut tx, &concerned, &entries, &mut report).await?;
    super::drop_unused_functions(&mut tx).await?;
    tx.commit().await?;
    Ok(report)
}
