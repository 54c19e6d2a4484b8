//! Capture triggers generated from the table mappings.
//!
//! Each mapping becomes `AFTER` triggers and their functions in the `relay` schema ([`sql`]: one per
//! operation; statement-level for INSERT and DELETE). They record the change in `relay.changelog` in
//! the writer's own transaction and call `relay.wake()` (an empty NOTIFY, skipped when the queue is
//! half full), so they never make the application's write fail because of the relay: the row image
//! lives in a table, not in a NOTIFY payload, whatever its size.
//!
//! # Ownership: nodes with different mappings side by side
//! Every running node registers the triggers its mappings need in `relay.capture_owners` (migration
//! 0010) and renews the entry every `stream.capture_check_secs` ([`watch`]); the entry lives three
//! periods (at least 15 s) and a node that shuts down removes it. A sync ([`sync`]: a node's
//! start-up, `connector triggers sync`) installs its own triggers and drops only the relay capture
//! triggers that neither its configuration nor a live entry names — so during a rolling deploy that
//! changes a mapping, the old nodes keep their triggers (and their rows) until they stop, and the next
//! sync after that removes them.
//!
//! [`watch`] also checks, on the same timer, that each of the node's triggers is still in place as the
//! node installed it (present, enabled, calling the function with the body it generated). If not —
//! an older connector version's sync dropped it, someone disabled or replaced it — the node says so in
//! its log (error) and in `/readyz` (503 with the reason) until the trigger is back.
//!
//! # Releases side by side
//! A mapping's triggers from an earlier release (one row-level trigger, the *legacy* one) and this
//! release's would each capture every write: a rolling deploy must never have both. [`upgrade`]
//! keeps the legacy trigger while a live node of the earlier release runs it, and swaps it for this
//! release's triggers, in one transaction, once none does (and back, if one starts again).

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::config::{Mapping, TemplatePart};
use crate::error::{Error, Result};

pub mod sql;
pub mod upgrade;
mod watch;

pub use sql::{MappingTriggers, TriggerSpec, mapping_triggers, name_stem, triggers_of};
pub(crate) use sql::{channel_expr, one_line, quote_ident, quote_literal, row_expr};
pub use watch::{CaptureStatus, verify, watch};

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Triggers installed or replaced (`schema.table.trigger`).
    pub installed: Vec<String>,
    /// Triggers of mappings that are gone, dropped.
    pub removed: Vec<String>,
    /// Triggers kept because a live node needs them: another configuration's, or an earlier
    /// release's trigger of one of this configuration's mappings (see [`upgrade`]).
    pub kept: Vec<String>,
}

/// A node's entry in the capture-owner registry.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    /// The node's id.
    pub node: &'a str,
    /// How long the entry lives without a renewal.
    pub ttl: Duration,
}

/// The registry entry's lifetime for a check period: three periods, at least 15 s.
pub fn owner_ttl(check_every: Duration) -> Duration {
    (check_every * 3).max(Duration::from_secs(15))
}

/// Checks that every mapping's table and columns exist; fails with the first problem.
pub async fn check_tables(pool: &PgPool, mappings: &[Mapping]) -> Result<()> {
    match mapping_problems(pool, mappings).await?.into_iter().next() {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// Every mapping whose table, `columns` or channel-template columns do not exist in the database, one
/// [`Error::Mapping`] per problem (read-only: what `connector check` reports).
pub async fn mapping_problems(pool: &PgPool, mappings: &[Mapping]) -> Result<Vec<Error>> {
    let mut problems = Vec::new();
    for (index, m) in mappings.iter().enumerate() {
        let cols: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2",
        )
        .bind(&m.schema)
        .bind(&m.table)
        .fetch_all(pool)
        .await?;
        let table = format!("{}.{}", m.schema, m.table);
        if cols.is_empty() {
            problems.push(Error::Mapping {
                index,
                table,
                problem: "table does not exist".to_owned(),
            });
            continue;
        }
        let have: HashSet<&str> = cols.iter().map(String::as_str).collect();
        let template_cols = m.channel.parts().iter().filter_map(|p| match p {
            TemplatePart::Column(c) => Some(("channel template", c.clone())),
            TemplatePart::Literal(_) => None,
        });
        let listed = m.columns.iter().flatten().map(|c| ("columns", c.clone()));
        for (place, col) in template_cols.chain(listed) {
            if !have.contains(col.as_str()) {
                problems.push(Error::Mapping {
                    index,
                    table: table.clone(),
                    problem: format!("column {col:?} ({place}) does not exist"),
                });
            }
        }
    }
    Ok(problems)
}

/// Installs this release's triggers of `mappings` (or keeps a legacy one that a live node of an
/// earlier release runs, see [`upgrade`]), registers them for `owner` (a running node) and drops the
/// relay capture triggers that neither `mappings` nor a live node's registry entry names, in one
/// transaction (serialized across nodes by an advisory lock). Without `owner` (`connector triggers
/// sync`) nothing is registered.
pub async fn sync(
    pool: &PgPool,
    mappings: &[Mapping],
    owner: Option<Owner<'_>>,
) -> Result<SyncReport> {
    check_tables(pool, mappings).await?;
    let maps = mapping_triggers(mappings)?;

    let mut tx = pool.begin().await?;
    lock(&mut tx).await?;
    if let Some(owner) = owner {
        register(&mut *tx, owner, &maps).await?;
    }
    let entries = live_entries(&mut tx).await?;
    let mut report = SyncReport::default();
    let wanted = upgrade::settle(&mut tx, &maps, &entries, &mut report).await?;
    let owned: HashSet<String> = entries.iter().flatten().cloned().collect();
    drop_unowned(&mut tx, &wanted, &owned, &mut report).await?;
    drop_unused_functions(&mut tx).await?;
    tx.commit().await?;
    Ok(report)
}

/// Takes the lock that serializes every change to the capture triggers (until the transaction ends).
async fn lock(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('relay.triggers_sync'))")
        .execute(conn)
        .await?;
    Ok(())
}

/// The live nodes' registry entries, each the triggers it names (expired entries are removed first).
async fn live_entries(conn: &mut PgConnection) -> Result<Vec<Vec<String>>> {
    sqlx::query("DELETE FROM relay.capture_owners WHERE expires_at < now()")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_scalar(
        "SELECT triggers FROM relay.capture_owners WHERE expires_at >= now() ORDER BY node",
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Installs `spec`'s function and trigger (replacing them if they exist).
async fn install(conn: &mut PgConnection, spec: &TriggerSpec) -> Result<()> {
    sqlx::query(&spec.function_sql).execute(&mut *conn).await?;
    sqlx::query(&spec.trigger_sql).execute(&mut *conn).await?;
    Ok(())
}

/// Drops the relay capture triggers that are neither `wanted` nor `owned` by a live node, and
/// reports them (and the `owned` ones kept) in `report`.
async fn drop_unowned(
    conn: &mut PgConnection,
    wanted: &HashSet<String>,
    owned: &HashSet<String>,
    report: &mut SyncReport,
) -> Result<()> {
    for (schema, table, trigger) in capture_triggers(&mut *conn).await? {
        let name = format!("{schema}.{table}.{trigger}");
        if wanted.contains(&name) {
            continue;
        }
        if owned.contains(&name) {
            report.kept.push(name);
            continue;
        }
        drop_trigger(&mut *conn, &(schema, table, trigger)).await?;
        report.removed.push(name);
    }
    Ok(())
}

/// A trigger in the catalog: (schema, table, trigger name).
pub(crate) type CatalogTrigger = (String, String, String);

/// The relay capture triggers (calling a `relay.capture_*` function), in name order.
pub(crate) async fn capture_triggers(conn: &mut PgConnection) -> Result<Vec<CatalogTrigger>> {
    Ok(sqlx::query_as(
        r"SELECT n.nspname::text, c.relname::text, t.tgname::text
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
          WHERE NOT t.tgisinternal AND pn.nspname = 'relay' AND p.proname LIKE 'capture\_%'
          ORDER BY 1, 2, 3",
    )
    .fetch_all(conn)
    .await?)
}

/// Drops `trigger` if it is still there; its names come from the catalog: quoted, not trusted.
pub(crate) async fn drop_trigger(conn: &mut PgConnection, trigger: &CatalogTrigger) -> Result<()> {
    let (schema, table, trigger) = trigger;
    sqlx::query(&format!(
        "DROP TRIGGER IF EXISTS {} ON {}.{}",
        quote_ident(trigger),
        quote_ident(schema),
        quote_ident(table)
    ))
    .execute(conn)
    .await?;
    Ok(())
}

/// Drops the capture functions that no trigger calls any more.
async fn drop_unused_functions(conn: &mut PgConnection) -> Result<()> {
    let functions: Vec<String> = sqlx::query_scalar(
        r"SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = 'relay' AND p.proname LIKE 'capture\_%'
            AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)",
    )
    .fetch_all(&mut *conn)
    .await?;
    for f in functions {
        sqlx::query(&format!(
            "DROP FUNCTION IF EXISTS relay.{}()",
            quote_ident(&f)
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Writes or renews `owner`'s registry entry: every trigger of `maps`, this release's and the legacy
/// ones (naming both is what tells a node of this release from one of an earlier release).
async fn register<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    owner: Owner<'_>,
    maps: &[MappingTriggers],
) -> Result<()> {
    let names: Vec<String> = maps
        .iter()
        .flat_map(|m| m.current.iter().chain(std::iter::once(&m.legacy)))
        .map(TriggerSpec::qualified)
        .collect();
    sqlx::query(
        "INSERT INTO relay.capture_owners (node, triggers, expires_at)
         VALUES ($1, $2, now() + make_interval(secs => $3))
         ON CONFLICT (node) DO UPDATE
            SET triggers = EXCLUDED.triggers, heartbeat_at = now(), expires_at = EXCLUDED.expires_at",
    )
    .bind(owner.node)
    .bind(&names)
    .bind(owner.ttl.as_secs_f64())
    .execute(executor)
    .await?;
    Ok(())
}

/// Removes `node`'s registry entry (at shutdown: its triggers may go at the next sync).
pub async fn deregister(pool: &PgPool, node: &str) -> Result<()> {
    sqlx::query("DELETE FROM relay.capture_owners WHERE node = $1")
        .bind(node)
        .execute(pool)
        .await?;
    Ok(())
}
