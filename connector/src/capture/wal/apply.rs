//! The batch statement: its text, generated once from the mappings ([`batch_sql`]), and its run
//! with a batch's parameters ([`apply_batch`]), one transaction that converts the rows, writes the
//! publications and moves the stored position.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use pgwire_replication::Lsn;

use super::batch::Batch;
use crate::config::Mapping;
use crate::db::triggers::{channel_expr, one_line, quote_literal, row_expr};

/// Multiplier of a change's index in a batch in the order key of its publications; below it, the
/// mapping's rank (by trigger name) times two plus 0 (new channel) or 1 (old channel).
const KEY_CHANGE: i64 = 1 << 20;
/// Parameters of the batch statement before the first mapping's: slot, upto, and the six arrays of
/// the `relay.publish()` messages.
const FIXED_PARAMS: usize = 8;
/// Parameters per mapping in the batch statement (index, LSN, commit time, operation, new and old
/// record literals).
const MAPPING_PARAMS: usize = 6;

/// The conversion of a mapping's rows inside the batch statement, its parameters from `$p`: for
/// arrays of (change index, end LSN, commit time, operation, new record literal, old record literal)
/// it yields (order key, LSN, channel, payload, info, commit time) with the trigger's expressions:
/// a publication on the row's channel and, for an UPDATE that moved the row to another channel, one
/// on the old channel. The two lateral subqueries are fenced with `OFFSET 0` so that each record
/// literal is parsed once and each payload built once per row (a flattened subquery would repeat the
/// cast in every expression that names the record).
fn mapping_sql(m: &Mapping, rank: usize, p: usize) -> String {
    let parts = m.channel.parts();
    let cols = m.columns.as_deref();
    let new = r#"(r."NEW")"#;
    let old = r#"(r."OLD")"#;
    format!(
        r#"SELECT u.k * {KEY_CHANGE} + {rank2} + v.sub, u.lsn::pg_lsn, v.channel, {payload}, NULL::jsonb, u.micros
FROM unnest(${p0}::int8[], ${p1}::text[], ${p2}::int8[], ${p3}::text[], ${p4}::text[], ${p5}::text[])
     AS u(k, lsn, micros, op, n, o)
CROSS JOIN LATERAL (SELECT u.n::"{s}"."{t}" AS "NEW", u.o::"{s}"."{t}" AS "OLD" OFFSET 0) AS r
CROSS JOIN LATERAL (
    SELECT CASE WHEN u.op = 'DELETE' THEN {ch_old} ELSE {ch_new} END,
           CASE WHEN u.op = 'UPDATE' THEN {ch_old} END,
           CASE WHEN u.op = 'UPDATE'
                THEN json_build_object('type', u.op, 'schema', {schema}, 'table', {table},
                    'row', {row_new}, 'old', {row_old})
                ELSE json_build_object('type', u.op, 'schema', {schema}, 'table', {table},
                    'row', CASE WHEN u.op = 'DELETE' THEN {row_old} ELSE {row_new} END) END
    OFFSET 0) AS x(ch, ch_old, payload)
CROSS JOIN LATERAL (VALUES (0, x.ch),
    (1, CASE WHEN x.ch_old IS DISTINCT FROM nullif(x.ch, '') THEN x.ch_old END)) AS v(sub, channel)
WHERE v.channel <> ''"#,
        rank2 = rank * 2,
        p0 = p,
        p1 = p + 1,
        p2 = p + 2,
        p3 = p + 3,
        p4 = p + 4,
        p5 = p + 5,
        ch_old = channel_expr(old, parts),
        ch_new = channel_expr(new, parts),
        row_old = row_expr(old, cols),
        row_new = row_expr(new, cols),
        payload = one_line("x.payload"),
        schema = quote_literal(&m.schema),
        table = quote_literal(&m.table),
        s = m.schema,
        t = m.table,
    )
}

/// The one statement that writes a batch: the `relay.publish()` messages and every mapping's
/// converted rows, gathered into arrays for `relay.wal_apply_batch()` (migration 0014), which
/// orders them by key and writes them with the position. The statement is its own transaction,
/// committed without waiting for its WAL flush (`synchronous_commit = off` for this transaction
/// only): the slot is confirmed up to a batch only once the WAL holding its commit is on disk
/// (see [`Applied::wal_insert`]), so a crash that loses the commit replays the batch from the slot.
/// It also returns the WAL insert and flush positions, read while it runs.
/// `ranks[i]` is mapping `i`'s rank by trigger name.
pub(super) fn batch_sql(mappings: &[Mapping], ranks: &[usize]) -> String {
    let mut sql = format!(
        r#"SELECT relay.wal_apply_batch($1, $2::text::pg_lsn, array_agg(c.key), array_agg(c.lsn),
       array_agg(c.channel), array_agg(c.data), array_agg(c.info), array_agg(c.micros)),
       {WAL_POSITIONS}, set_config('synchronous_commit', 'off', true)
FROM (
SELECT p.k * {KEY_CHANGE} AS key, p.lsn::pg_lsn AS lsn, p.channel, p.data::json AS data,
       p.info::jsonb AS info, p.micros
FROM unnest($3::int8[], $4::text[], $5::int8[], $6::text[], $7::text[], $8::text[])
     AS p(k, lsn, micros, channel, data, info)"#
    );
    for (i, m) in mappings.iter().enumerate() {
        sql.push_str("\nUNION ALL\n");
        sql.push_str(&mapping_sql(
            m,
            ranks[i],
            FIXED_PARAMS + 1 + i * MAPPING_PARAMS,
        ));
    }
    sql.push_str("\n) AS c");
    sql
}

/// What a written batch reports.
pub(super) struct Applied {
    pub(super) upto: Lsn,
    pub(super) txns: usize,
    pub(super) written: i32,
    pub(super) took: Duration,
    /// The WAL insert position read while the statement ran: at or after the end of the previous
    /// batch's commit record on this connection (that commit had returned before the statement
    /// began), so once the WAL is flushed past it, the previous batch is durable.
    pub(super) wal_insert: Lsn,
    /// The WAL flush position read while the statement ran: what was durable by then.
    pub(super) wal_flush: Lsn,
}

/// The WAL insert and flush positions, as text: read by the batch statement and by
/// [`wal_positions`].
const WAL_POSITIONS: &str = "pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text";

/// Parses a `pg_lsn` the statement returned as text.
fn lsn(text: &str) -> anyhow::Result<Lsn> {
    Lsn::parse(text).map_err(|e| anyhow::anyhow!("WAL position {text:?}: {e:?}"))
}

/// The WAL insert and flush positions now, on the history connection (asked when no batch runs
/// and a written batch still waits for its WAL to be flushed).
pub(super) async fn wal_positions(conn: &mut HistoryConn) -> anyhow::Result<(Lsn, Lsn)> {
    let (insert, flush): (String, String) = sqlx::query_as(&format!("SELECT {WAL_POSITIONS}"))
        .fetch_one(&mut **conn)
        .await
        .context("reading the WAL positions")?;
    Ok((lsn(&insert)?, lsn(&flush)?))
}

/// The history connection, handed to a batch write and back.
pub(super) type HistoryConn = sqlx::pool::PoolConnection<sqlx::Postgres>;

/// Runs the batch statement on `conn` (one transaction: the conversions, the publications, the
/// position); the slot is confirmed by the caller once this has returned.
pub(super) async fn apply_batch(
    mut conn: HistoryConn,
    sql: Arc<str>,
    slot: Arc<str>,
    batch: Batch,
    set_plan_mode: Option<bool>,
) -> (HistoryConn, anyhow::Result<Applied>) {
    let started = std::time::Instant::now();
    if let Some(generic) = set_plan_mode {
        let set = if generic {
            "SET plan_cache_mode = force_generic_plan"
        } else {
            "SET plan_cache_mode = auto"
        };
        if let Err(e) = sqlx::query(set).execute(&mut *conn).await {
            return (
                conn,
                Err(anyhow::Error::from(e).context("setting plan_cache_mode")),
            );
        }
    }
    let p = &batch.publish;
    let mut q = sqlx::query_as::<_, (i32, String, String, String)>(&sql)
        .bind(&*slot)
        .bind(batch.upto.to_string())
        .bind(&p.k)
        .bind(&p.lsn)
        .bind(&p.micros)
        .bind(&p.channel)
        .bind(&p.data)
        .bind(&p.info);
    for r in &batch.rows {
        q = q
            .bind(&r.k)
            .bind(&r.lsn)
            .bind(&r.micros)
            .bind(&r.op)
            .bind(&r.new)
            .bind(&r.old);
    }
    let result = q
        .fetch_one(&mut *conn)
        .await
        .context("writing the history")
        .and_then(|(written, insert, flush, _)| {
            Ok(Applied {
                upto: batch.upto,
                txns: batch.txns,
                written,
                took: started.elapsed(),
                wal_insert: lsn(&insert)?,
                wal_flush: lsn(&flush)?,
            })
        });
    (conn, result)
}
