//! The `wal` capture leader: reads the pgoutput slot and writes committed transactions into the
//! history.
//!
//! Every node runs this task; one at a time leads. **Election**: a session-level advisory lock held
//! on a dedicated connection; the others retry every second, so a dead leader (its connections
//! closed) is replaced within about a second, and a leader that loses its lock connection stops.
//!
//! **Position and replay.** `relay.wal_state.lsn` is the end LSN of the last transaction whose
//! publications are in the history. The leader streams from it, and writes each batch of
//! transactions with one statement (`relay.wal_apply_batch()`, migration 0014), which drops the
//! publications of any transaction at or below the stored position and moves the position, in the
//! same transaction as the publications. Only after that commit is the slot confirmed. So a crash anywhere replays at most a batch, and the
//! replay writes nothing twice; two leaders that briefly overlap cannot both write a transaction.
//! Offsets and `seq` come from the same `relay.channels` / `relay.sequencer` as trigger mode, in
//! commit order (the order pgoutput sends transactions), so every node reads identical offsets.
//!
//! **Pipeline.** One batch statement is in flight at a time, on a connection the leader holds; while
//! it runs (conversion, history write, commit), the next batch is received and decoded, and it is
//! written with everything that arrived meanwhile. So batches grow with the load (up to
//! `capture.batch_max_publications` changes), and there are as many history transactions (and WAL
//! flushes) per second as the database can commit, not one per source transaction.
//!
//! **Rows.** Column values arrive in PostgreSQL's text format. The leader hands them back to
//! PostgreSQL as a record literal of the table's row type (`$n::text::"schema"."table"`) and builds
//! the channel and the JSON with the very expressions the capture trigger uses
//! ([`crate::db::triggers`]), so numbers, booleans, timestamps, JSON columns, channel templates and
//! `columns` projections come out byte-identical to trigger mode.
//!
//! **Hand-over.** The first node to start in `wal` mode creates the slot during start-up
//! ([`ensure_started`], under the leader lock), then, in one transaction, drops the capture
//! triggers, switches `relay.publish()` to logical messages and stores the position: with triggers,
//! the current WAL insert position (transactions at or below it went through the triggers, whose drop
//! waited for them; later ones have no trigger and come from the slot); without, the slot's
//! consistent point.
//!
//! **Slot safety.** A heartbeat message every `capture.heartbeat_secs` moves the slot forward on an
//! idle database. A slot that is gone while a position is stored, invalidated (`wal_status = 'lost'`)
//! or confirmed beyond the stored position is a gap the slot cannot replay: every channel gets a new
//! epoch (`relay.wal_slot_lost()`), so clients get `recovered: false`, and the slot is recreated.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::FutureExt as _;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::pgoutput::{self, Message, OldKind, Tuple, Value};
use super::{CaptureConfig, CaptureStatus};
use crate::config::{Mapping, Operation};
use crate::db::triggers::{channel_expr, row_expr};

/// Prefix of the logical messages `relay.publish()` emits in `wal` mode.
const PUBLISH_PREFIX: &str = "relay";
/// Prefix of the leader's heartbeat messages.
const HEARTBEAT_PREFIX: &str = "relay-heartbeat";
/// `application_name` of the leader's lock and replication connections.
pub const APPLICATION_NAME: &str = "relay-wal-leader";
/// How often a follower tries to become the leader, and the leader checks its lock connection.
const ELECTION_INTERVAL: Duration = Duration::from_secs(1);

/// What the leader task needs.
pub struct WalCapture {
    /// Pool for the history writes and heartbeats.
    pub pool: PgPool,
    /// Direct URL for the leader lock connection.
    pub lock_url: String,
    /// Direct URL for the replication connection.
    pub replication_url: String,
    /// The `capture` section.
    pub config: CaptureConfig,
    /// The table mappings.
    pub mappings: Arc<Vec<Mapping>>,
    /// Shared status (metrics).
    pub status: Arc<CaptureStatus>,
}

/// One change of a committed transaction.
enum Change {
    /// A row of a published table.
    Row {
        relation: u32,
        op: Operation,
        new: Option<Tuple>,
        old: Option<(OldKind, Tuple)>,
    },
    /// A `relay.publish()` call.
    Publish {
        channel: String,
        data: Box<RawValue>,
        info: Option<Box<RawValue>>,
    },
}

/// A committed transaction.
struct Txn {
    end_lsn: Lsn,
    commit_micros: i64,
    changes: Vec<Change>,
}

/// A table as the stream described it, and the mappings that capture it.
struct RelationInfo {
    columns: Vec<String>,
    /// Mapping indices, in the order their triggers would fire (by trigger name).
    mappings: Vec<usize>,
}

/// Precomputed per mapping.
struct MappingSql {
    operations: Vec<Operation>,
    schema: String,
    table: String,
    trigger_name: String,
}

#[derive(Deserialize)]
struct PublishMessage {
    channel: String,
    data: Box<RawValue>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

/// The replication connection's target, from a `postgres://` URL.
struct Target {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
}

fn parse_target(url: &str) -> anyhow::Result<Target> {
    let u = reqwest::Url::parse(url).context("replication URL")?;
    for (k, v) in u.query_pairs() {
        if k == "sslmode" && !matches!(&*v, "disable" | "allow" | "prefer") {
            bail!(
                "the wal replication connection does not support TLS (sslmode={v}); set \
                 capture.replication_url to a URL with sslmode=disable on a trusted network path, \
                 or use capture.mode \"trigger\""
            );
        }
    }
    let decode = |s: &str| {
        percent_decode(s).with_context(|| format!("replication URL: bad escape in {s:?}"))
    };
    Ok(Target {
        host: u.host_str().unwrap_or("localhost").to_owned(),
        port: u.port().unwrap_or(5432),
        user: decode(u.username())?,
        password: decode(u.password().unwrap_or(""))?,
        database: decode(u.path().trim_start_matches('/'))?,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A record literal (`record_in` syntax) of `columns`, taking each value by name from the stream's
/// tuple: every value double-quoted with `"` and `\` escaped; NULL is an empty field.
fn record_literal(
    columns: &[String],
    wal_columns: &[String],
    tuple: &Tuple,
    old: Option<&Tuple>,
    toast_unavailable: &mut u64,
) -> String {
    let mut out = String::from("(");
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let Some(pos) = wal_columns.iter().position(|w| w == c) else {
            continue;
        };
        let mut value = tuple.get(pos);
        if value == Some(&Value::UnchangedToast) {
            value = old.and_then(|o| o.get(pos));
            if !matches!(value, Some(Value::Text(_))) {
                *toast_unavailable += 1;
                continue;
            }
        }
        if let Some(Value::Text(s)) = value {
            out.push('"');
            for ch in s.chars() {
                if ch == '"' || ch == '\\' {
                    out.push('\\');
                }
                out.push(ch);
            }
            out.push('"');
        }
    }
    out.push(')');
    out
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Multiplier of a change's index in a batch in the order key of its publications; below it, the
/// mapping's rank (by trigger name) times two plus 0 (new channel) or 1 (old channel).
const KEY_CHANGE: i64 = 1 << 20;
/// Parameters of the batch statement before the first mapping's: slot, upto, and the six arrays of
/// the `relay.publish()` messages.
const FIXED_PARAMS: usize = 8;
/// Batches of at most this many changes run the batch statement with a generic plan: planning it
/// (and the history write inside `relay.wal_apply_batch()`) for each small batch costs about as much
/// as executing it, and at a few rows a generic plan is as good. Larger batches get custom plans,
/// which see the arrays' lengths (hash joins instead of nested loops over thousands of rows).
const GENERIC_PLAN_MAX_CHANGES: usize = 64;
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
        r#"SELECT u.k * {KEY_CHANGE} + {rank2} + v.sub, u.lsn::pg_lsn, v.channel, x.payload::json, NULL::jsonb, u.micros
FROM unnest(${p0}::int8[], ${p1}::text[], ${p2}::int8[], ${p3}::text[], ${p4}::text[], ${p5}::text[])
     AS u(k, lsn, micros, op, n, o)
CROSS JOIN LATERAL (SELECT u.n::"{s}"."{t}" AS "NEW", u.o::"{s}"."{t}" AS "OLD" OFFSET 0) AS r
CROSS JOIN LATERAL (
    SELECT CASE WHEN u.op = 'DELETE' THEN {ch_old} ELSE {ch_new} END,
           CASE WHEN u.op = 'UPDATE' THEN {ch_old} END,
           jsonb_build_object('type', u.op, 'schema', {schema}, 'table', {table}, 'row',
                CASE WHEN u.op = 'DELETE' THEN {row_old} ELSE {row_new} END)
           || CASE WHEN u.op = 'UPDATE' THEN jsonb_build_object('old', {row_old}) ELSE '{{}}'::jsonb END
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
        schema = quote_literal(&m.schema),
        table = quote_literal(&m.table),
        s = m.schema,
        t = m.table,
    )
}

/// The one statement that writes a batch: the `relay.publish()` messages and every mapping's
/// converted rows, gathered into arrays for `relay.wal_apply_batch()` (migration 0014), which
/// orders them by key and writes them with the position. The statement is its own transaction.
/// `ranks[i]` is mapping `i`'s rank by trigger name.
fn batch_sql(mappings: &[Mapping], ranks: &[usize]) -> String {
    let mut sql = format!(
        r#"SELECT relay.wal_apply_batch($1, $2::text::pg_lsn, array_agg(c.key), array_agg(c.lsn),
       array_agg(c.channel), array_agg(c.data), array_agg(c.info), array_agg(c.micros))
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

impl WalCapture {
    /// Runs until `shutdown` is cancelled: tries to lead every second, leads while it can.
    pub async fn run(self, shutdown: CancellationToken) {
        let slot = self.status.slot.get().cloned().unwrap_or_default();
        let sqls = match self
            .mappings
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok(MappingSql {
                    operations: m.operations.clone(),
                    schema: m.schema.clone(),
                    table: m.table.clone(),
                    trigger_name: crate::db::triggers::spec(i, m)?.trigger,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "wal capture cannot start");
                return;
            }
        };
        // A mapping's rank: its place in the order its trigger would fire among all (by name).
        let mut by_name: Vec<usize> = (0..sqls.len()).collect();
        by_name.sort_by(|a, b| sqls[*a].trigger_name.cmp(&sqls[*b].trigger_name));
        let mut ranks = vec![0; sqls.len()];
        for (rank, i) in by_name.into_iter().enumerate() {
            ranks[i] = rank;
        }
        let mut leader = Leader {
            cap: &self,
            batch_sql: batch_sql(&self.mappings, &ranks).into(),
            slot,
            sqls,
            relations: HashMap::new(),
            table_columns: HashMap::new(),
        };
        while !shutdown.is_cancelled() {
            match leader.lead(&shutdown).await {
                Ok(true) => {}
                Ok(false) => {}
                Err(e) => {
                    self.status.stream_errors.inc();
                    tracing::warn!(error = %format!("{e:#}"), "wal capture interrupted");
                }
            }
            if self.status.leader.swap(false, Ordering::Relaxed) {
                tracing::info!("no longer the wal capture leader");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(ELECTION_INTERVAL) => {}
            }
        }
        self.status.leader.store(false, Ordering::Relaxed);
    }
}

/// A mapping's rows of one batch: the parameters of its part of the batch statement.
#[derive(Default)]
struct RowsInput {
    k: Vec<i64>,
    lsn: Vec<String>,
    micros: Vec<i64>,
    op: Vec<&'static str>,
    new: Vec<Option<String>>,
    old: Vec<Option<String>>,
}

/// The `relay.publish()` messages of one batch.
#[derive(Default)]
struct PublishInput {
    k: Vec<i64>,
    lsn: Vec<String>,
    micros: Vec<i64>,
    channel: Vec<String>,
    data: Vec<String>,
    info: Vec<Option<String>>,
}

/// A batch of committed transactions, ready for the batch statement.
struct Batch {
    /// End LSN of the last transaction: the position stored with it, and confirmed after it.
    upto: Lsn,
    /// Changes in it.
    changes: usize,
    /// Transactions in it.
    txns: usize,
    publish: PublishInput,
    /// Per mapping, in mapping order.
    rows: Vec<RowsInput>,
}

/// What a written batch reports.
struct Applied {
    upto: Lsn,
    txns: usize,
    written: i32,
    took: Duration,
}

/// The history connection, handed to a batch write and back.
type HistoryConn = sqlx::pool::PoolConnection<sqlx::Postgres>;
/// A batch write in flight: gives the connection back with the outcome.
type InFlight = std::pin::Pin<
    Box<dyn std::future::Future<Output = (HistoryConn, anyhow::Result<Applied>)> + Send>,
>;

/// The outcome of the write in flight (never ready without one).
async fn in_flight(f: &mut Option<InFlight>) -> (HistoryConn, anyhow::Result<Applied>) {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Runs the batch statement on `conn` (one transaction: the conversions, the publications, the
/// position); the slot is confirmed by the caller once this has returned.
async fn apply_batch(
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
    let mut q = sqlx::query_scalar::<_, i32>(&sql)
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
        .map(|written| Applied {
            upto: batch.upto,
            txns: batch.txns,
            written,
            took: started.elapsed(),
        });
    (conn, result)
}

struct Leader<'a> {
    cap: &'a WalCapture,
    /// The batch statement ([`batch_sql`]).
    batch_sql: Arc<str>,
    slot: String,
    sqls: Vec<MappingSql>,
    relations: HashMap<u32, RelationInfo>,
    /// The current columns of each table (the record type the literals are cast to).
    table_columns: HashMap<u32, Vec<String>>,
}

impl Leader<'_> {
    /// One attempt: returns `Ok(false)` when another node leads, `Ok(true)` after leading until
    /// shutdown, `Err` when leading broke.
    async fn lead(&mut self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        let options: PgConnectOptions = self.cap.lock_url.parse().context("leader lock URL")?;
        let mut lock = PgConnection::connect_with(&options.application_name(APPLICATION_NAME))
            .await
            .context("leader lock connection")?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(format!("relay.wal_leader:{}", self.slot))
            .fetch_one(&mut lock)
            .await?;
        if !got {
            let _ = lock.close().await;
            return Ok(false);
        }
        // Relation messages come again on every new stream.
        self.relations.clear();
        self.table_columns.clear();

        let start = prepare_slot(&self.cap.pool, &self.slot, &self.cap.status).await?;
        let t = parse_target(&self.cap.replication_url)?;
        let mut cfg = ReplicationConfig::new(
            t.host,
            t.user,
            t.password,
            t.database,
            self.slot.clone(),
            self.cap.config.publication.clone(),
        )
        .with_port(t.port)
        .with_start_lsn(start)
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1))
        .with_buffer_size(8192);
        cfg.application_name = Some(APPLICATION_NAME.to_owned());
        let mut client = ReplicationClient::connect(cfg)
            .await
            .context("replication connection")?;
        // Leading from here: the slot is ready and streaming.
        self.cap.status.leader.store(true, Ordering::Relaxed);
        self.cap.status.leaderships.inc();
        tracing::info!(slot = %self.slot, start = %start, "wal capture leader: streaming from the slot");

        let result = self.stream(&mut client, &mut lock, shutdown).await;
        client.abort();
        let _ = lock.close().await;
        result.map(|()| true)
    }

    /// Streams from the slot and writes the history, pipelined: while one batch's statement runs
    /// (conversion, history write, commit), the next batch is received and decoded; it is written as
    /// soon as the previous one has committed and the slot has been confirmed up to it, with
    /// everything received meanwhile (up to `capture.batch_max_publications` changes). So batches
    /// grow with the load and at most one history transaction is open at a time, in commit order.
    async fn stream(
        &mut self,
        client: &mut ReplicationClient,
        lock: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut election = tokio::time::interval(ELECTION_INTERVAL);
        election.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(self.cap.config.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max = self.cap.config.batch_max_publications as usize;
        let slot: Arc<str> = self.slot.as_str().into();
        // One connection for the history writes while leading: its prepared batch statement is
        // reused, and no batch waits for the pool.
        let mut conn = Some(
            self.cap
                .pool
                .acquire()
                .await
                .context("history connection")?,
        );
        let mut inflight: Option<InFlight> = None;
        // The history connection's plan_cache_mode: generic (true) or auto; unknown at first.
        let mut generic: Option<bool> = None;
        let mut current: Option<Txn> = None;
        let mut pending: Vec<Txn> = Vec::new();
        let mut pending_changes = 0usize;
        loop {
            if inflight.is_none() && !pending.is_empty() {
                // Take what is already received into the same batch.
                while pending_changes < max {
                    let Some(ev) = client.recv().now_or_never() else {
                        break;
                    };
                    let ev = ev?.context("replication stream ended")?;
                    self.handle(ev, &mut current, &mut pending, &mut pending_changes)?;
                }
                let batch = self.prepare(std::mem::take(&mut pending)).await?;
                pending_changes = 0;
                let want = batch.changes <= GENERIC_PLAN_MAX_CHANGES;
                let set_plan_mode = (generic != Some(want)).then_some(want);
                generic = Some(want);
                let c = conn.take().context("history connection in use")?;
                inflight = Some(Box::pin(apply_batch(
                    c,
                    self.batch_sql.clone(),
                    slot.clone(),
                    batch,
                    set_plan_mode,
                )));
            }
            // A full next batch waits for the write in flight (the stream backs up meanwhile).
            let receive = pending_changes < max || inflight.is_none();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                (c, result) = in_flight(&mut inflight), if inflight.is_some() => {
                    inflight = None;
                    conn = Some(c);
                    let applied = result?;
                    // Only now, after the commit: the slot may release what this batch held.
                    client.update_applied_lsn(applied.upto);
                    let status = &self.cap.status;
                    status.transactions.inc_by(applied.txns as u64);
                    status
                        .publications
                        .inc_by(u64::try_from(applied.written).unwrap_or(0));
                    status.batches.inc();
                    status_add_seconds(&status.apply_seconds, applied.took);
                }
                _ = election.tick() => {
                    tokio::time::timeout(Duration::from_secs(3), sqlx::query("SELECT 1").execute(&mut *lock))
                        .await
                        .context("leader lock connection timed out")?
                        .context("leader lock connection lost")?;
                }
                _ = heartbeat.tick() => {
                    sqlx::query("SELECT pg_logical_emit_message(true, $1, '')")
                        .bind(HEARTBEAT_PREFIX)
                        .execute(&self.cap.pool)
                        .await
                        .context("heartbeat")?;
                }
                ev = client.recv(), if receive => {
                    let ev = ev?.context("replication stream ended")?;
                    self.handle(ev, &mut current, &mut pending, &mut pending_changes)?;
                }
            }
        }
    }

    fn handle(
        &mut self,
        ev: ReplicationEvent,
        current: &mut Option<Txn>,
        pending: &mut Vec<Txn>,
        pending_changes: &mut usize,
    ) -> anyhow::Result<()> {
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                *current = Some(Txn {
                    end_lsn: Lsn::ZERO,
                    commit_micros: commit_time_micros,
                    changes: Vec::new(),
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let mut txn = current.take().context("commit without a transaction")?;
                txn.end_lsn = end_lsn;
                *pending_changes += txn.changes.len().max(1);
                pending.push(txn);
            }
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                ..
            } => {
                if !transactional || prefix != PUBLISH_PREFIX {
                    return Ok(());
                }
                let Some(txn) = current.as_mut() else {
                    bail!("transactional message outside a transaction");
                };
                match serde_json::from_slice::<PublishMessage>(&content) {
                    Ok(m) if !m.channel.is_empty() => txn.changes.push(Change::Publish {
                        channel: m.channel,
                        data: m.data,
                        info: m.info.filter(|i| i.get() != "null"),
                    }),
                    Ok(_) => tracing::warn!("relay message with an empty channel skipped"),
                    Err(e) => tracing::warn!(error = %e, "malformed relay message skipped"),
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                let msg = pgoutput::decode(&data)?;
                let change = match msg {
                    Message::Relation(r) => {
                        let mut mappings: Vec<usize> = self
                            .sqls
                            .iter()
                            .enumerate()
                            .filter(|(_, m)| m.schema == r.schema && m.table == r.name)
                            .map(|(i, _)| i)
                            .collect();
                        mappings.sort_by(|a, b| {
                            self.sqls[*a].trigger_name.cmp(&self.sqls[*b].trigger_name)
                        });
                        self.table_columns.remove(&r.id);
                        self.relations.insert(
                            r.id,
                            RelationInfo {
                                columns: r.columns,
                                mappings,
                            },
                        );
                        None
                    }
                    Message::Insert { relation, new } => Some(Change::Row {
                        relation,
                        op: Operation::Insert,
                        new: Some(new),
                        old: None,
                    }),
                    Message::Update { relation, old, new } => Some(Change::Row {
                        relation,
                        op: Operation::Update,
                        new: Some(new),
                        old,
                    }),
                    Message::Delete { relation, old } => Some(Change::Row {
                        relation,
                        op: Operation::Delete,
                        new: None,
                        old: Some(old),
                    }),
                    Message::Truncate | Message::Other => None,
                };
                if let Some(change) = change {
                    current
                        .as_mut()
                        .context("row change outside a transaction")?
                        .changes
                        .push(change);
                }
            }
            ReplicationEvent::KeepAlive { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// Turns `txns` into the batch statement's parameters (record literals of every row, per
    /// mapping that captures it).
    async fn prepare(&mut self, txns: Vec<Txn>) -> anyhow::Result<Batch> {
        let started = std::time::Instant::now();
        let upto = txns.last().map_or(Lsn::ZERO, |t| t.end_lsn);
        let count = txns.len();
        let pool = &self.cap.pool;
        // The current columns of every table in the batch.
        for txn in &txns {
            for c in &txn.changes {
                if let Change::Row { relation, .. } = c
                    && !self.table_columns.contains_key(relation)
                {
                    let cols: Vec<String> = sqlx::query_scalar(
                        "SELECT attname::text FROM pg_attribute
                         WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped
                         ORDER BY attnum",
                    )
                    .bind(i64::from(*relation))
                    .fetch_all(pool)
                    .await?;
                    self.table_columns.insert(*relation, cols);
                }
            }
        }

        let mut inputs: Vec<RowsInput> =
            (0..self.sqls.len()).map(|_| RowsInput::default()).collect();
        let mut publish = PublishInput::default();
        let mut toast_unavailable = 0u64;
        // A change's index in the batch: its publications' order key (with the mapping's rank).
        let mut k = 0i64;
        for txn in txns {
            let lsn = txn.end_lsn.to_string();
            for c in txn.changes {
                match c {
                    Change::Publish {
                        channel,
                        data,
                        info,
                    } => {
                        publish.k.push(k);
                        publish.lsn.push(lsn.clone());
                        publish.micros.push(txn.commit_micros);
                        publish.channel.push(channel);
                        publish.data.push(data.get().to_owned());
                        publish.info.push(info.map(|i| i.get().to_owned()));
                    }
                    Change::Row {
                        relation,
                        op,
                        new,
                        old,
                    } => {
                        // pgoutput describes every table before its first change in a stream.
                        let info = self.relations.get(&relation).with_context(|| {
                            format!("row of relation {relation} before its description")
                        })?;
                        let cols = &self.table_columns[&relation];
                        let old_tuple = old.as_ref().map(|(_, t)| t);
                        let old_full = old
                            .as_ref()
                            .filter(|(kind, _)| *kind == OldKind::Full)
                            .map(|(_, t)| t);
                        let new_lit = new.as_ref().map(|t| {
                            record_literal(cols, &info.columns, t, old_full, &mut toast_unavailable)
                        });
                        let old_lit = old_tuple.map(|t| {
                            record_literal(cols, &info.columns, t, None, &mut toast_unavailable)
                        });
                        for &m in &info.mappings {
                            if !self.sqls[m].operations.contains(&op) {
                                continue;
                            }
                            let input = &mut inputs[m];
                            input.k.push(k);
                            input.lsn.push(lsn.clone());
                            input.micros.push(txn.commit_micros);
                            input.op.push(op.sql());
                            input.new.push(new_lit.clone());
                            input.old.push(old_lit.clone());
                        }
                    }
                }
                k += 1;
            }
        }
        if toast_unavailable > 0 {
            self.cap.status.toast_unavailable.inc_by(toast_unavailable);
            tracing::warn!(
                values = toast_unavailable,
                "unchanged TOASTed values without an old row (table not REPLICA IDENTITY FULL) \
                 published as null"
            );
        }

        status_add_seconds(&self.cap.status.prepare_seconds, started.elapsed());
        Ok(Batch {
            upto,
            changes: usize::try_from(k).unwrap_or(usize::MAX),
            txns: count,
            publish,
            rows: inputs,
        })
    }
}

fn status_add_seconds(counter: &Counter<f64, AtomicU64>, d: Duration) {
    counter.inc_by(d.as_secs_f64());
}

/// On a database where wal capture never started (no stored position): creates the slot and hands
/// capture over before this node serves, so nothing committed after start-up is missed (the leader
/// task would do it too, but only after the node is ready). Takes the leader lock for it, so nodes
/// starting together do it once.
pub async fn ensure_started(
    pool: &PgPool,
    lock_url: &str,
    slot: &str,
    status: &CaptureStatus,
) -> anyhow::Result<()> {
    let started: bool = sqlx::query_scalar("SELECT lsn IS NOT NULL FROM relay.wal_state")
        .fetch_one(pool)
        .await?;
    if started {
        return Ok(());
    }
    let options: PgConnectOptions = lock_url.parse().context("leader lock URL")?;
    let mut lock = PgConnection::connect_with(&options.application_name(APPLICATION_NAME))
        .await
        .context("leader lock connection")?;
    tokio::time::timeout(
        Duration::from_secs(60),
        sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
            .bind(format!("relay.wal_leader:{slot}"))
            .execute(&mut lock),
    )
    .await
    .context("waiting 60 s for the wal leader lock")??;
    let result = prepare_slot(pool, slot, status).await;
    let _ = lock.close().await;
    result.map(|_| ())
}

/// Makes sure the slot exists and matches the stored position; hands capture over from the
/// triggers on the first start; handles a lost slot. Returns the LSN to stream from.
async fn prepare_slot(pool: &PgPool, slot: &str, status: &CaptureStatus) -> anyhow::Result<Lsn> {
    let slot = slot.to_owned();
    let (stored_slot, stored): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT slot_name, lsn::text FROM relay.wal_state")
            .fetch_one(pool)
            .await?;
    let stored = stored.map(|s| Lsn::parse(&s)).transpose()?;
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
    .bind(&slot)
    .fetch_optional(pool)
    .await?;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await?;
    let mut exists = false;
    let mut confirmed = None;
    if let Some((wal_status, flush, active_pid, plugin, database)) = row {
        if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(db.as_str()) {
            bail!(
                "replication slot {slot:?} exists but is not a pgoutput slot of database \
                 {db:?}: choose another capture.slot"
            );
        }
        if let Some(pid) = active_pid {
            // We hold the leader lock: whoever streams from the slot is a leader that lost it.
            tracing::warn!(pid, "terminating a stale walsender of the capture slot");
            terminate_walsender(pool, &slot, pid).await?;
        }
        if wal_status.as_deref() == Some("lost") {
            tracing::error!(slot = %slot, "the capture slot was invalidated (max_slot_wal_keep_size exceeded?); recreating it");
            sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&slot)
                .execute(pool)
                .await?;
        } else {
            exists = true;
            confirmed = flush.map(|f| Lsn::parse(&f)).transpose()?;
        }
    }
    let mut lost = false;
    if !exists {
        if stored.is_some() {
            lost = true;
        }
        let (_, lsn): (String, String) = sqlx::query_as(
            "SELECT slot_name::text, lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        )
        .bind(&slot)
        .fetch_one(pool)
        .await
        .context("creating the replication slot")?;
        confirmed = Some(Lsn::parse(&lsn)?);
        tracing::info!(slot = %slot, lsn = %lsn, "created the capture slot");
    } else if stored.is_some()
        && (stored_slot.as_deref() != Some(slot.as_str())
            || confirmed.is_some_and(|c| Some(c) > stored))
    {
        // The slot is confirmed beyond what we stored (recreated by someone, or another slot's
        // position): what lies between cannot be replayed.
        lost = true;
    }

    let mut tx = pool.begin().await?;
    // Hand-over (idempotent): no capture trigger, relay.publish() through messages. The trigger
    // drops wait for every transaction that wrote a mapped table through a trigger.
    let triggers: Vec<(String, String, String)> = sqlx::query_as(
        r"SELECT n.nspname::text, c.relname::text, t.tgname::text
          FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_proc p ON p.oid = t.tgfoid
          JOIN pg_namespace pn ON pn.oid = p.pronamespace
          WHERE NOT t.tgisinternal AND pn.nspname = 'relay' AND p.proname LIKE 'capture\_%'",
    )
    .fetch_all(&mut *tx)
    .await?;
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for (schema, table, trigger) in &triggers {
        sqlx::query(&format!(
            "DROP TRIGGER IF EXISTS {} ON {}.{}",
            q(trigger),
            q(schema),
            q(table)
        ))
        .execute(&mut *tx)
        .await?;
        tracing::info!(trigger = %format!("{schema}.{table}.{trigger}"), "dropped capture trigger (wal mode)");
    }
    sqlx::query(
        "INSERT INTO relay.settings (key, value) VALUES ('capture.mode', 'wal')
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
         WHERE relay.settings.value IS DISTINCT FROM EXCLUDED.value",
    )
    .execute(&mut *tx)
    .await?;
    let start = if lost {
        let at = confirmed.context("slot position")?;
        let channels: i64 = sqlx::query_scalar("SELECT relay.wal_slot_lost($1, $2::text::pg_lsn)")
            .bind(&slot)
            .bind(at.to_string())
            .fetch_one(&mut *tx)
            .await?;
        status.slot_losses.inc();
        tracing::error!(
            slot = %slot, stored = ?stored.map(|s| s.to_string()), resume = %at, channels,
            "the capture slot lost changes it had not delivered: every channel got a new epoch \
             (clients get recovered: false)"
        );
        at
    } else if let Some(stored) = stored {
        stored
    } else {
        // First start. With capture triggers (trigger mode ran before): every transaction that
        // wrote through them has committed below the current insert position (the drops waited
        // for them), and none can write through them later. Without: nothing captured before
        // the slot existed, so the stream starts at the slot's consistent point.
        let at: String = if triggers.is_empty() {
            confirmed.context("slot position")?.to_string()
        } else {
            sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
                .fetch_one(&mut *tx)
                .await?
        };
        sqlx::query(
            "UPDATE relay.wal_state SET slot_name = $1, lsn = $2::text::pg_lsn, updated_at = now()",
        )
        .bind(&slot)
        .bind(&at)
        .execute(&mut *tx)
        .await?;
        tracing::info!(slot = %slot, lsn = %at, "capture handed over from triggers to the slot");
        Lsn::parse(&at)?
    };
    tx.commit().await?;
    Ok(start)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_literals_quote_every_value() {
        let cols = vec![
            "a".to_owned(),
            "b".to_owned(),
            "c".to_owned(),
            "d".to_owned(),
        ];
        let wal = vec!["b".to_owned(), "a".to_owned(), "d".to_owned()];
        let t = vec![
            Value::Text(r#"x"y\z,(1)"#.into()),
            Value::Null,
            Value::Text(String::new()),
        ];
        let mut toast = 0;
        assert_eq!(
            record_literal(&cols, &wal, &t, None, &mut toast),
            r#"(,"x\"y\\z,(1)",,"")"#
        );
        let new = vec![Value::UnchangedToast, Value::Null, Value::Null];
        let old = vec![Value::Text("big".into()), Value::Null, Value::Null];
        assert_eq!(
            record_literal(&cols, &wal, &new, Some(&old), &mut toast),
            r#"(,"big",,)"#
        );
        assert_eq!(toast, 0);
        record_literal(&cols, &wal, &new, None, &mut toast);
        assert_eq!(toast, 1);
    }

    #[test]
    fn replication_urls() {
        let t =
            parse_target("postgres://us%40er:p%2Fw@db.example:6543/app?sslmode=disable").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_str(),
                t.password.as_str(),
                t.database.as_str()
            ),
            ("db.example", 6543, "us@er", "p/w", "app")
        );
        let e = parse_target("postgres://u@h/db?sslmode=verify-full")
            .err()
            .unwrap();
        assert!(e.to_string().contains("TLS"), "{e}");
    }
}
