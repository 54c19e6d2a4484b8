//! The SQL of the capture triggers, generated from a (validated) mapping.
//!
//! A mapping's triggers are named from a hash of its whole definition (`relay_<hash>` /
//! `relay.capture_<hash>`, the *stem*), so installing is idempotent and two different mappings of one
//! table never share a trigger. This release installs one trigger per operation (`<stem>_insert`,
//! `<stem>_update`, `<stem>_delete`):
//! - INSERT and DELETE: statement-level, reading the statement's rows from its transition table, so a
//!   statement that writes many rows runs one changelog INSERT (one executor start-up, one wake-up)
//!   instead of one per row;
//! - UPDATE: row-level (its old and new rows are paired by the row, and a row that moves to another
//!   channel is published on both).
//!
//! Releases before it installed one row-level trigger for all of a mapping's operations, named with
//! the stem alone: the *legacy* trigger, still generated here so that a node can recognize it (and
//! check it is in place) while a node of such a release runs beside it during a rolling deploy.
//!
//! Identifiers come from a validated configuration (plain identifiers only) and are always
//! double-quoted; literal text from channel templates is single-quoted with quotes doubled.

use crate::config::{Mapping, Operation, TemplatePart};
use crate::error::{Error, Result};

/// The SQL of one capture trigger.
#[derive(Debug, Clone)]
pub struct TriggerSpec {
    /// Index of the mapping in the configuration.
    pub index: usize,
    /// Trigger name (`relay_<hash>[_<operation>]`).
    pub trigger: String,
    /// Function name in schema `relay` (`capture_<hash>[_<operation>]`).
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

/// One mapping's capture triggers: this release's, and the one earlier releases installed.
#[derive(Debug, Clone)]
pub struct MappingTriggers {
    /// Index of the mapping in the configuration.
    pub index: usize,
    /// This release's triggers, one per operation of the mapping.
    pub current: Vec<TriggerSpec>,
    /// The row-level trigger of earlier releases (named with the stem alone).
    pub legacy: TriggerSpec,
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

/// The row `rec` (all its columns, or the listed ones) as `json`, in column order: `json` is built as
/// text, without `jsonb`'s tree, key sorting and the re-parse into the changelog's `json` column.
pub(crate) fn row_expr(rec: &str, columns: Option<&[String]>) -> String {
    match columns {
        None => format!("to_json({rec})"),
        // json_build_object takes at most 100 arguments; a longer list is built as jsonb.
        Some(cols) if cols.len() > 50 => format!("({})::json", row_expr_jsonb(rec, columns)),
        Some(cols) => format!("json_build_object({})", pairs(rec, cols)),
    }
}

/// `'col', rec."col", ...` for the listed columns.
fn pairs(rec: &str, cols: &[String]) -> String {
    cols.iter()
        .map(|c| format!("{}, {rec}.\"{c}\"", quote_literal(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The row `rec` as `jsonb` (what the legacy trigger builds).
fn row_expr_jsonb(rec: &str, columns: Option<&[String]>) -> String {
    match columns {
        None => format!("to_jsonb({rec})"),
        Some(cols) => cols
            .chunks(40)
            .map(|chunk| format!("jsonb_build_object({})", pairs(rec, chunk)))
            .collect::<Vec<_>>()
            .join(" || "),
    }
}

/// `json` value `expr` (a plain reference: it is repeated) on one line. JSON-protocol frames are
/// newline-delimited, and `to_json` keeps a `json` column's text as stored, line breaks included:
/// such a value is normalized through `jsonb` (the only case that pays for it).
pub(crate) fn one_line(expr: &str) -> String {
    format!(
        "CASE WHEN strpos({expr}::text, E'\\n') > 0 OR strpos({expr}::text, E'\\r') > 0 \
         THEN {expr}::jsonb::json ELSE {expr} END"
    )
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

/// The mapping's whole definition as one string (`ops`: its operations' SQL names): what the
/// triggers' names hash, and what their bodies name.
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

/// The stem of the mapping's trigger names, `relay_<hash>`: the legacy trigger's whole name, and
/// the prefix of this release's. Triggers of one table fire in name order, so the stems order the
/// mappings of a table (wal mode orders them the same way).
pub fn name_stem(m: &Mapping) -> String {
    let ops: Vec<&str> = m.operations.iter().map(|o| o.sql()).collect();
    format!("relay_{:016x}", stable_hash(&canonical(m, &ops)))
}

/// The triggers of every mapping.
pub fn mapping_triggers(mappings: &[Mapping]) -> Result<Vec<MappingTriggers>> {
    mappings
        .iter()
        .enumerate()
        .map(|(i, m)| triggers_of(i, m))
        .collect()
}

/// The triggers of mapping `m` (number `index`).
pub fn triggers_of(index: usize, m: &Mapping) -> Result<MappingTriggers> {
    let ops: Vec<&str> = m.operations.iter().map(|o| o.sql()).collect();
    let canonical = canonical(m, &ops);
    let hash = format!("{:016x}", stable_hash(&canonical));
    let legacy = Generated {
        index,
        m,
        hash: &hash,
        suffix: "",
    }
    .spec(
        legacy_body(m, &canonical),
        &ops.join(" OR "),
        "FOR EACH ROW",
    )?;
    let current = m
        .operations
        .iter()
        .map(|op| {
            let g = Generated {
                index,
                m,
                hash: &hash,
                suffix: op_suffix(*op),
            };
            match op {
                Operation::Insert | Operation::Delete => g.spec(
                    statement_body(m, &canonical, op.sql()),
                    op.sql(),
                    statement_clause(*op),
                ),
                Operation::Update => g.spec(update_body(m, &canonical), "UPDATE", "FOR EACH ROW"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MappingTriggers {
        index,
        current,
        legacy,
    })
}

fn op_suffix(op: Operation) -> &'static str {
    match op {
        Operation::Insert => "_insert",
        Operation::Update => "_update",
        Operation::Delete => "_delete",
    }
}

/// A statement-level trigger of `op`, with the transition table it reads (`relay_rows`).
fn statement_clause(op: Operation) -> &'static str {
    if op == Operation::Delete {
        "REFERENCING OLD TABLE AS relay_rows FOR EACH STATEMENT"
    } else {
        "REFERENCING NEW TABLE AS relay_rows FOR EACH STATEMENT"
    }
}

/// The naming of one generated trigger.
struct Generated<'a> {
    index: usize,
    m: &'a Mapping,
    hash: &'a str,
    suffix: &'a str,
}

impl Generated<'_> {
    /// The trigger's SQL: `body` as its function, fired `AFTER <events> ON <table> <clause>`.
    fn spec(&self, body: String, events: &str, clause: &str) -> Result<TriggerSpec> {
        let (m, hash, suffix) = (self.m, self.hash, self.suffix);
        let trigger = format!("relay_{hash}{suffix}");
        let function = format!("capture_{hash}{suffix}");
        // The body is dollar-quoted with a tag derived from the mapping's hash; a template literal
        // that happens to contain the tag is refused rather than allowed to end the body early.
        let tag = format!("$relay_{hash}$");
        if body.contains(&tag) {
            return Err(Error::Mapping {
                index: self.index,
                table: format!("{}.{}", m.schema, m.table),
                problem: format!("channel template must not contain {tag}"),
            });
        }
        let function_sql = format!(
            "CREATE OR REPLACE FUNCTION relay.\"{function}\"() RETURNS trigger\nLANGUAGE plpgsql VOLATILE AS {tag}{body}{tag}"
        );
        let trigger_sql = format!(
            r#"CREATE OR REPLACE TRIGGER "{trigger}" AFTER {events} ON "{schema}"."{table}"
{clause} EXECUTE FUNCTION relay."{function}"()"#,
            schema = m.schema,
            table = m.table,
        );
        Ok(TriggerSpec {
            index: self.index,
            trigger,
            function,
            schema: m.schema.clone(),
            table: m.table.clone(),
            function_sql,
            trigger_sql,
            body,
        })
    }
}

/// The first line of every generated body: names the mapping (`canonical`) it was generated for.
pub(crate) fn body_marker(canonical: &str) -> String {
    format!("-- Generated by the relay connector for mapping {canonical}")
}

/// A statement-level INSERT or DELETE trigger's body: one changelog INSERT for the statement's rows
/// (in the order the statement wrote them), and one wake-up if it captured any. The payload is built
/// once per row (`OFFSET 0` keeps the subquery from being flattened into its three uses).
fn statement_body(m: &Mapping, canonical: &str, op: &str) -> String {
    let parts = m.channel.parts();
    format!(
        r#"
{marker} ({op}); do not edit.
BEGIN
    INSERT INTO relay.changelog (channel, data)
    SELECT c.ch, {payload}
    FROM (SELECT {ch} AS ch,
                 json_build_object('type', '{op}', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                     'row', {row}) AS p
          FROM relay_rows AS relay_row OFFSET 0) AS c
    WHERE c.ch <> '';
    IF FOUND THEN
        PERFORM relay.wake();
    END IF;
    RETURN NULL;
END
"#,
        marker = body_marker(canonical),
        payload = one_line("c.p"),
        ch = channel_expr("relay_row", parts),
        row = row_expr("relay_row", m.columns.as_deref()),
    )
}

/// The row-level UPDATE trigger's body: the new row on its channel, and on the old row's channel
/// too when the update moved it, so that channel's subscribers learn it left.
fn update_body(m: &Mapping, canonical: &str) -> String {
    let parts = m.channel.parts();
    let cols = m.columns.as_deref();
    format!(
        r#"
{marker} (UPDATE); do not edit.
DECLARE
    ch text := {ch_new};
    ch_old text := {ch_old};
    p json := json_build_object('type', 'UPDATE', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'row', {row_new}, 'old', {row_old});
    payload json := {payload};
BEGIN
    IF ch <> '' THEN
        INSERT INTO relay.changelog (channel, data) VALUES (ch, payload);
    END IF;
    IF ch_old <> '' AND ch_old IS DISTINCT FROM ch THEN
        INSERT INTO relay.changelog (channel, data) VALUES (ch_old, payload);
    END IF;
    PERFORM relay.wake();
    RETURN NULL;
END
"#,
        marker = body_marker(canonical),
        payload = one_line("p"),
        ch_old = channel_expr("OLD", parts),
        ch_new = channel_expr("NEW", parts),
        row_old = row_expr("OLD", cols),
        row_new = row_expr("NEW", cols),
    )
}

/// The legacy trigger's PL/pgSQL body (one row-level trigger for all operations), exactly as
/// earlier releases generated it.
fn legacy_body(m: &Mapping, canonical: &str) -> String {
    let parts = m.channel.parts();
    let cols = m.columns.as_deref();
    format!(
        r#"
{marker}; do not edit.
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
        marker = body_marker(canonical),
        ch_old = channel_expr("OLD", parts),
        ch_new = channel_expr("NEW", parts),
        row_old = row_expr_jsonb("OLD", cols),
        row_new = row_expr_jsonb("NEW", cols),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Operation;

    fn rooms() -> Mapping {
        Mapping {
            schema: "public".into(),
            table: "rooms".into(),
            operations: vec![Operation::Insert, Operation::Delete],
            channel: crate::config::ChannelTemplate::parse("room's:{room_id}").unwrap(),
            columns: Some(vec!["room_id".into(), "body".into()]),
        }
    }

    #[test]
    fn generated_sql_quotes_everything() {
        let t = triggers_of(0, &rooms()).unwrap();
        let legacy = &t.legacy;
        assert!(
            legacy
                .function_sql
                .contains(r#"'room''s:' || (NEW."room_id")::text"#),
            "{}",
            legacy.function_sql
        );
        assert!(
            legacy
                .function_sql
                .contains(r#"jsonb_build_object('room_id', NEW."room_id", 'body', NEW."body")"#)
        );
        assert!(
            t.current[0].function_sql.contains(
                r#"json_build_object('room_id', relay_row."room_id", 'body', relay_row."body")"#
            ),
            "{}",
            t.current[0].function_sql
        );
        assert!(
            legacy.trigger_sql.contains(
                r#"AFTER INSERT OR DELETE ON "public"."rooms"
FOR EACH ROW EXECUTE"#
            ),
            "{}",
            legacy.trigger_sql
        );
        let insert = &t.current[0];
        assert!(
            insert
                .function_sql
                .contains(r#"'room''s:' || (relay_row."room_id")::text"#),
            "{}",
            insert.function_sql
        );
        assert!(
            insert
                .trigger_sql
                .contains("REFERENCING NEW TABLE AS relay_rows")
        );
        assert!(
            t.current[1]
                .trigger_sql
                .contains("REFERENCING OLD TABLE AS relay_rows")
        );
    }

    #[test]
    fn names_are_stable_and_share_the_mapping_stem() {
        let m = rooms();
        let t = triggers_of(0, &m).unwrap();
        assert_eq!(triggers_of(0, &m).unwrap().legacy.trigger, t.legacy.trigger);
        assert_eq!(t.legacy.trigger, name_stem(&m));
        let names: Vec<&str> = t.current.iter().map(|s| s.trigger.as_str()).collect();
        assert_eq!(
            names,
            [
                format!("{}_insert", name_stem(&m)),
                format!("{}_delete", name_stem(&m))
            ]
        );
        assert!(t.current.iter().all(|s| s.function.starts_with("capture_")));
    }
}
