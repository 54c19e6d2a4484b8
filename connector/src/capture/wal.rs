//! The `wal` capture leader: reads the pgoutput slot and writes committed transactions into the
//! history.
//!
//! Every node runs this task; one at a time leads. **Election**: a session-level advisory lock held
//! on a dedicated connection; the others retry every second, so a dead leader (its connections
//! closed) is replaced within about a second, and a leader that loses its lock connection stops.
//!
//! **Position and replay.** `relay.wal_state.lsn` is the end LSN of the last transaction whose
//! publications are in the history. The leader streams from it, and writes each batch of
//! transactions with `relay.wal_apply()`, which drops the publications of any transaction at or below
//! the stored position and moves the position, in the same transaction as the publications. Only
//! after that commit is the slot confirmed. So a crash anywhere replays at most a batch, and the
//! replay writes nothing twice; two leaders that briefly overlap cannot both write a transaction.
//! Offsets and `seq` come from the same `relay.channels` / `relay.sequencer` as trigger mode, in
//! commit order (the order pgoutput sends transactions), so every node reads identical offsets.
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
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::FutureExt as _;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
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
    /// The conversion statement (record literals → channel, old channel, payload).
    sql: String,
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

/// The conversion statement of a mapping: for arrays of (index, operation, new record literal, old
/// record literal) it returns (index, channel, old channel, payload) with the trigger's expressions.
fn mapping_sql(m: &Mapping) -> anyhow::Result<String> {
    let parts = m.channel.parts();
    let cols = m.columns.as_deref();
    let new = r#"(r."NEW")"#;
    let old = r#"(r."OLD")"#;
    Ok(format!(
        r#"SELECT u.i,
       CASE WHEN u.op = 'DELETE' THEN {ch_old} ELSE {ch_new} END,
       CASE WHEN u.op = 'UPDATE' THEN {ch_old} END,
       (jsonb_build_object('type', u.op, 'schema', {schema}, 'table', {table}, 'row',
            CASE WHEN u.op = 'DELETE' THEN {row_old} ELSE {row_new} END)
        || CASE WHEN u.op = 'UPDATE' THEN jsonb_build_object('old', {row_old}) ELSE '{{}}'::jsonb END)::text
FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[]) AS u(i, op, n, o)
CROSS JOIN LATERAL (SELECT u.n::"{s}"."{t}" AS "NEW", u.o::"{s}"."{t}" AS "OLD") AS r"#,
        ch_old = channel_expr(old, parts),
        ch_new = channel_expr(new, parts),
        row_old = row_expr(old, cols),
        row_new = row_expr(new, cols),
        schema = quote_literal(&m.schema),
        table = quote_literal(&m.table),
        s = m.schema,
        t = m.table,
    ))
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
                    sql: mapping_sql(m)?,
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
        let mut leader = Leader {
            cap: &self,
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

struct Leader<'a> {
    cap: &'a WalCapture,
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
        let mut current: Option<Txn> = None;
        let mut pending: Vec<Txn> = Vec::new();
        let mut pending_changes = 0usize;
        loop {
            if !pending.is_empty() {
                // Take what is already received into the same batch; write when nothing is.
                if pending_changes < max
                    && let Some(ev) = client.recv().now_or_never()
                {
                    let ev = ev?.context("replication stream ended")?;
                    self.handle(ev, &mut current, &mut pending, &mut pending_changes)?;
                    continue;
                }
                self.write(client, std::mem::take(&mut pending)).await?;
                pending_changes = 0;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
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
                ev = client.recv() => {
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

    /// Writes `txns` into the history in one transaction, then confirms the slot up to the last one.
    async fn write(&mut self, client: &ReplicationClient, txns: Vec<Txn>) -> anyhow::Result<()> {
        let Some(upto) = txns.last().map(|t| t.end_lsn) else {
            return Ok(());
        };
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

        // Per mapping: (index, op, new literal, old literal) of the rows it captures.
        struct Input {
            idx: Vec<i32>,
            op: Vec<&'static str>,
            new: Vec<Option<String>>,
            old: Vec<Option<String>>,
        }
        let mut inputs: HashMap<usize, Input> = HashMap::new();
        // One slot per change, in order; each gets its publications (channel, data, info).
        let mut slots: Vec<(usize, Vec<usize>)> = Vec::new(); // (txn, mappings) per change
        let mut toast_unavailable = 0u64;
        let mut k = 0i32;
        for (ti, txn) in txns.iter().enumerate() {
            for c in &txn.changes {
                let mut wanted = Vec::new();
                if let Change::Row {
                    relation,
                    op,
                    new,
                    old,
                } = c
                {
                    // pgoutput describes every table before its first change in a stream.
                    let info = self.relations.get(relation).with_context(|| {
                        format!("row of relation {relation} before its description")
                    })?;
                    let cols = &self.table_columns[relation];
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
                        if !self.sqls[m].operations.contains(op) {
                            continue;
                        }
                        wanted.push(m);
                        let input = inputs.entry(m).or_insert_with(|| Input {
                            idx: Vec::new(),
                            op: Vec::new(),
                            new: Vec::new(),
                            old: Vec::new(),
                        });
                        input.idx.push(k);
                        input.op.push(op.sql());
                        input.new.push(new_lit.clone());
                        input.old.push(old_lit.clone());
                    }
                }
                slots.push((ti, wanted));
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

        // The conversions only read (they are pure functions of the values and the row type), so
        // they run outside the history transaction; relay.wal_apply() is that transaction, one
        // statement: two round trips per batch for one mapping.
        // (change index, mapping) → [(channel, payload)]
        let mut converted: HashMap<(i32, usize), Vec<(String, String)>> = HashMap::new();
        for (m, input) in &inputs {
            let rows: Vec<(i32, Option<String>, Option<String>, String)> =
                sqlx::query_as(&self.sqls[*m].sql)
                    .bind(&input.idx)
                    .bind(&input.op)
                    .bind(&input.new)
                    .bind(&input.old)
                    .fetch_all(pool)
                    .await
                    .with_context(|| {
                        format!(
                            "converting rows of {}.{}",
                            self.sqls[*m].schema, self.sqls[*m].table
                        )
                    })?;
            for (i, ch, ch_old, payload) in rows {
                let mut out = Vec::new();
                let ch = ch.filter(|c| !c.is_empty());
                if let Some(c) = &ch {
                    out.push((c.clone(), payload.clone()));
                }
                if let Some(o) = ch_old.filter(|c| !c.is_empty())
                    && Some(&o) != ch.as_ref()
                {
                    out.push((o, payload));
                }
                converted.insert((i, *m), out);
            }
        }

        let mut lsns = Vec::new();
        let mut channels = Vec::new();
        let mut datas = Vec::new();
        let mut infos: Vec<Option<String>> = Vec::new();
        let mut micros = Vec::new();
        let mut k = 0i32;
        for txn in &txns {
            let lsn = txn.end_lsn.to_string();
            for c in &txn.changes {
                match c {
                    Change::Publish {
                        channel,
                        data,
                        info,
                    } => {
                        lsns.push(lsn.clone());
                        channels.push(channel.clone());
                        datas.push(data.get().to_owned());
                        infos.push(info.as_ref().map(|i| i.get().to_owned()));
                        micros.push(txn.commit_micros);
                    }
                    Change::Row { .. } => {
                        for m in &slots[k as usize].1 {
                            for (channel, payload) in converted.remove(&(k, *m)).unwrap_or_default()
                            {
                                lsns.push(lsn.clone());
                                channels.push(channel);
                                datas.push(payload);
                                infos.push(None);
                                micros.push(txn.commit_micros);
                            }
                        }
                    }
                }
                k += 1;
            }
        }
        let written: i32 =
            sqlx::query_scalar("SELECT relay.wal_apply($1, $2, $3, $4, $5, $6, $7::text::pg_lsn)")
                .bind(&self.slot)
                .bind(&lsns)
                .bind(&channels)
                .bind(&datas)
                .bind(&infos)
                .bind(&micros)
                .bind(upto.to_string())
                .fetch_one(pool)
                .await
                .context("writing the history")?;
        client.update_applied_lsn(upto);
        let status = &self.cap.status;
        status.transactions.inc_by(txns.len() as u64);
        status
            .publications
            .inc_by(u64::try_from(written).unwrap_or(0));
        status.batches.inc();
        Ok(())
    }
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
