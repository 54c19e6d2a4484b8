//! Capture triggers generated from the table mappings.
//!
//! Each mapping becomes one row-level `AFTER` trigger and its function in the `relay` schema. The
//! function records the change in `relay.changelog` in the writer's own transaction and calls
//! `relay.wake()` (an empty NOTIFY, skipped when the queue is half full), so it never makes the
//! application's write fail because of the relay: the row image lives in a table, not in a NOTIFY
//! payload, whatever its size.
//!
//! Names are derived from a hash of the mapping's whole definition (schema, table, operations, channel
//! template, columns: `relay_<hash>` / `relay.capture_<hash>`), so installing is idempotent and two
//! different mappings of one table never share a trigger. Identifiers come from a validated
//! configuration (plain identifiers only) and are always double-quoted; literal text from channel
//! templates is single-quoted with quotes doubled.
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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{Mapping, TemplatePart};
use crate::error::{Error, Result};

/// The SQL of one mapping's trigger.
#[derive(Debug, Clone)]
pub struct TriggerSpec {
    /// Index of the mapping in the configuration.
    pub index: usize,
    /// Trigger name (`relay_<hash>`).
    pub trigger: String,
    /// Function name in schema `relay` (`capture_<hash>`).
    pub function: String,
    /// Schema of the table.
    pub schema: String,
    /// The table.
    pub table: String,
    /// `CREATE OR REPLACE FUNCTION ...`.
    pub function_sql: String,
    /// `CREATE OR REPLACE TRIGGER ...`.
    pub trigger_sql: String,
    /// The function's body, as the catalog keeps it (`pg_proc.prosrc`).
    pub body: String,
}

impl TriggerSpec {
    /// `schema.table.trigger`, as reports and the owner registry name it.
    pub fn qualified(&self) -> String {
        format!("{}.{}.{}", self.schema, self.table, self.trigger)
    }
}

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Triggers installed or replaced (`schema.table.trigger`).
    pub installed: Vec<String>,
    /// Triggers of mappings that are gone, dropped.
    pub removed: Vec<String>,
    /// Triggers not in this configuration, kept because a live node's mappings need them.
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

/// FNV-1a, 64 bit: a hash that is stable across builds (the trigger names depend on it).
fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `s` as an SQL string literal: single-quoted, quotes doubled.
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `s` as an SQL identifier: double-quoted, quotes doubled (for names read from the catalog).
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub(crate) fn row_expr(rec: &str, columns: Option<&[String]>) -> String {
    match columns {
        None => format!("to_jsonb({rec})"),
        Some(cols) => cols
            .chunks(40)
            .map(|chunk| {
                let pairs: Vec<String> = chunk
                    .iter()
                    .map(|c| format!("{}, {rec}.\"{c}\"", quote_literal(c)))
                    .collect();
                format!("jsonb_build_object({})", pairs.join(", "))
            })
            .collect::<Vec<_>>()
            .join(" || "),
    }
}

pub(crate) fn channel_expr(rec: &str, parts: &[TemplatePart]) -> String {
    parts
        .iter()
        .map(|p| match p {
            TemplatePart::Literal(s) => quote_literal(s),
            TemplatePart::Column(c) => format!("({rec}.\"{c}\")::text"),
        })
        .collect::<Vec<_>>()
        .join(" || ")
}

/// Builds the trigger SQL for a (validated) mapping.
pub fn spec(index: usize, m: &Mapping) -> Result<TriggerSpec> {
    let ops: Vec<&str> = m.operations.iter().map(|o| o.sql()).collect();
    let canonical = canonical(m, &ops);
    // The name must change whenever what the trigger does changes, so that nodes of two versions
    // never replace each other's function: a change to the generated body ([`function_body`]) must
    // add a version marker to `canonical` (it has none yet, so names are unchanged from earlier
    // releases).
    let hash = format!("{:016x}", stable_hash(&canonical));
    let trigger = format!("relay_{hash}");
    let function = format!("capture_{hash}");
    // The body is dollar-quoted with a tag derived from the mapping's hash; a template literal that
    // happens to contain the tag is refused rather than allowed to end the body early.
    let tag = format!("$relay_{hash}$");
    let body = function_body(m, &canonical);
    if body.contains(&tag) {
        return Err(Error::Mapping {
            index,
            table: format!("{}.{}", m.schema, m.table),
            problem: format!("channel template must not contain {tag}"),
        });
    }
    let function_sql = format!(
        "CREATE OR REPLACE FUNCTION relay.\"{function}\"() RETURNS trigger\nLANGUAGE plpgsql VOLATILE AS {tag}{body}{tag}"
    );
    let trigger_sql = format!(
        r#"CREATE OR REPLACE TRIGGER "{trigger}" AFTER {ops} ON "{schema}"."{table}"
FOR EACH ROW EXECUTE FUNCTION relay."{function}"()"#,
        ops = ops.join(" OR "),
        schema = m.schema,
        table = m.table,
    );
    Ok(TriggerSpec {
        index,
        trigger,
        function,
        schema: m.schema.clone(),
        table: m.table.clone(),
        function_sql,
        trigger_sql,
        body,
    })
}

/// The mapping's whole definition as one string (`ops`: its operations' SQL names): what the
/// trigger's name hashes, and what its body names.
fn canonical(m: &Mapping, ops: &[&str]) -> String {
    format!(
        "{}|{}|{}|{}|{}",
        m.schema,
        m.table,
        ops.join(","),
        m.channel,
        m.columns.as_ref().map(|c| c.join(",")).unwrap_or_default()
    )
}

/// The trigger function's PL/pgSQL body for mapping `m` (`canonical`: its definition, named in a
/// comment). Mostly the generated SQL text.
fn function_body(m: &Mapping, canonical: &str) -> String {
    // Parsed when the configuration was loaded.
    let parts = m.channel.parts();
    let cols = m.columns.as_deref();
    format!(
        r#"
-- Generated by the relay connector for mapping {mapping}; do not edit.
DECLARE
    r jsonb;
    o jsonb;
    ch text;
    ch_old text;
    payload jsonb;
BEGIN
    IF TG_OP = 'DELETE' THEN
        ch := {ch_old};
        r := {row_old};
    ELSE
        ch := {ch_new};
        r := {row_new};
        IF TG_OP = 'UPDATE' THEN
            o := {row_old};
            ch_old := {ch_old};
        END IF;
    END IF;
    payload := jsonb_build_object('type', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'row', r)
        || CASE WHEN o IS NULL THEN '{{}}'::jsonb ELSE jsonb_build_object('old', o) END;
    IF ch IS NOT NULL AND ch <> '' THEN
        INSERT INTO relay.changelog (channel, data) VALUES (ch, payload);
    END IF;
    -- An UPDATE that moves the row to another channel is published on the old channel too, so its
    -- subscribers learn that the row left.
    IF ch_old IS NOT NULL AND ch_old <> '' AND ch_old IS DISTINCT FROM ch THEN
        INSERT INTO relay.changelog (channel, data) VALUES (ch_old, payload);
    END IF;
    PERFORM relay.wake();
    RETURN NULL;
END
"#,
        mapping = canonical,
        ch_old = channel_expr("OLD", parts),
        ch_new = channel_expr("NEW", parts),
        row_old = row_expr("OLD", cols),
        row_new = row_expr("NEW", cols),
    )
}

/// The trigger specs of every mapping.
pub fn specs(mappings: &[Mapping]) -> Result<Vec<TriggerSpec>> {
    mappings
        .iter()
        .enumerate()
        .map(|(i, m)| spec(i, m))
        .collect()
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

/// Installs the triggers of `mappings`, registers them for `owner` (a running node) and drops the
/// relay capture triggers that neither `mappings` nor a live node's registry entry names, in one
/// transaction (serialized across nodes by an advisory lock). Without `owner` (`connector triggers
/// sync`) nothing is registered.
pub async fn sync(
    pool: &PgPool,
    mappings: &[Mapping],
    owner: Option<Owner<'_>>,
) -> Result<SyncReport> {
    check_tables(pool, mappings).await?;
    let specs = specs(mappings)?;

    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('relay.triggers_sync'))")
        .execute(&mut *tx)
        .await?;
    let mut report = SyncReport::default();
    let mut wanted: HashSet<String> = HashSet::new();
    for s in &specs {
        sqlx::query(&s.function_sql).execute(&mut *tx).await?;
        sqlx::query(&s.trigger_sql).execute(&mut *tx).await?;
        if wanted.insert(s.qualified()) {
            report.installed.push(s.qualified());
        }
    }
    if let Some(owner) = owner {
        register(&mut *tx, owner, &specs).await?;
    }
    let owned = live_owned(&mut tx).await?;
    drop_unowned(&mut tx, &wanted, &owned, &mut report).await?;
    drop_unused_functions(&mut tx).await?;
    tx.commit().await?;
    Ok(report)
}

/// The triggers a live node's registry entry names (expired entries are removed first).
async fn live_owned(conn: &mut PgConnection) -> Result<HashSet<String>> {
    sqlx::query("DELETE FROM relay.capture_owners WHERE expires_at < now()")
        .execute(&mut *conn)
        .await?;
    let owned: HashSet<String> = sqlx::query_scalar(
        "SELECT DISTINCT unnest(triggers) FROM relay.capture_owners WHERE expires_at >= now()",
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    Ok(owned)
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

/// Writes or renews `owner`'s registry entry: the triggers of `specs`.
async fn register<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    owner: Owner<'_>,
    specs: &[TriggerSpec],
) -> Result<()> {
    let names: Vec<String> = specs.iter().map(TriggerSpec::qualified).collect();
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

/// What is wrong with the node's capture triggers: one line per trigger that is not in place as the
/// node installed it (empty: all fine).
pub async fn verify(pool: &PgPool, specs: &[TriggerSpec]) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for s in specs {
        let found: Option<(String, String, String, String)> = sqlx::query_as(
            r"SELECT t.tgenabled::text, pn.nspname::text, p.proname::text, p.prosrc
              FROM pg_trigger t
              JOIN pg_class c ON c.oid = t.tgrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_proc p ON p.oid = t.tgfoid
              JOIN pg_namespace pn ON pn.oid = p.pronamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname = $3",
        )
        .bind(&s.schema)
        .bind(&s.table)
        .bind(&s.trigger)
        .fetch_optional(pool)
        .await?;
        let what = format!(
            "capture trigger {} of mapping {} ({}.{})",
            s.trigger, s.index, s.schema, s.table
        );
        match found {
            None => problems.push(format!(
                "{what} is gone (dropped by a sync with another configuration, or by hand)"
            )),
            Some((enabled, _, _, _)) if enabled == "D" => {
                problems.push(format!("{what} is disabled"));
            }
            Some((_, schema, function, source)) => {
                if schema != "relay" || function != s.function || source != s.body {
                    problems.push(format!(
                        "{what} was replaced: it no longer runs the function this node installed"
                    ));
                }
            }
        }
    }
    Ok(problems)
}

/// Removes `node`'s registry entry (at shutdown: its triggers may go at the next sync).
pub async fn deregister(pool: &PgPool, node: &str) -> Result<()> {
    sqlx::query("DELETE FROM relay.capture_owners WHERE node = $1")
        .bind(node)
        .execute(pool)
        .await?;
    Ok(())
}

/// Where [`watch`] reports the state of the node's capture.
#[derive(Debug, Default)]
pub struct CaptureStatus {
    problem: parking_lot::Mutex<Option<String>>,
}

impl CaptureStatus {
    /// Why the node's capture is not in place, if it is not.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().clone()
    }

    fn set(&self, problem: Option<String>) -> Option<String> {
        std::mem::replace(&mut *self.problem.lock(), problem)
    }
}

/// Every `every` until `shutdown`: renews the node's registry entry and checks its triggers (see the
/// module docs); on shutdown removes the entry.
pub async fn watch(
    pool: PgPool,
    specs: Vec<TriggerSpec>,
    node: String,
    every: Duration,
    status: Arc<CaptureStatus>,
    shutdown: CancellationToken,
) {
    let owner = Owner {
        node: &node,
        ttl: owner_ttl(every),
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = register(&pool, owner, &specs).await {
            tracing::warn!(error = %e, "capture: renewing this node's trigger registration failed");
        }
        match verify(&pool, &specs).await {
            Ok(problems) if problems.is_empty() => {
                if let Some(was) = status.set(None) {
                    tracing::warn!(was = %was, "capture: this node's triggers are back in place; \
                        changes written while they were missing were not captured");
                }
            }
            Ok(problems) => {
                let problem = problems.join("; ");
                if status.set(Some(problem.clone())).as_deref() != Some(problem.as_str()) {
                    tracing::error!(problem = %problem, "capture: this node's triggers were changed \
                        under it; it receives no changes of those mappings (not ready). Run \
                        `connector triggers sync` with this node's configuration, or restart it");
                }
            }
            Err(e) => tracing::warn!(error = %e, "capture: checking the triggers failed"),
        }
    }
    match tokio::time::timeout(Duration::from_secs(3), deregister(&pool, &node)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "capture: removing this node's registration failed")
        }
        Err(_) => tracing::warn!("capture: removing this node's registration timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Operation;

    #[test]
    fn generated_sql_quotes_everything() {
        let m = Mapping {
            schema: "public".into(),
            table: "rooms".into(),
            operations: vec![Operation::Insert, Operation::Delete],
            channel: crate::config::ChannelTemplate::parse("room's:{room_id}").unwrap(),
            columns: Some(vec!["room_id".into(), "body".into()]),
        };
        let s = spec(0, &m).unwrap();
        assert!(
            s.function_sql
                .contains(r#"'room''s:' || (NEW."room_id")::text"#),
            "{}",
            s.function_sql
        );
        assert!(
            s.function_sql
                .contains(r#"jsonb_build_object('room_id', NEW."room_id", 'body', NEW."body")"#)
        );
        assert!(
            s.trigger_sql
                .contains(r#"AFTER INSERT OR DELETE ON "public"."rooms""#)
        );
        assert_eq!(spec(0, &m).unwrap().trigger, s.trigger, "names are stable");
    }
}
