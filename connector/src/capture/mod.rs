//! Change capture: how committed row changes get into the history (`relay.publications`).
//!
//! Two modes, chosen by `capture.mode` (environment: `RELAY__CAPTURE__MODE`), behind one sequencer
//! and one history, so offsets, epochs, history and recovery are the same whichever runs:
//!
//! - `trigger` (default): the generated triggers of [`crate::db::triggers`] write `relay.changelog`
//!   and the stream task sequences it. Works on any PostgreSQL.
//! - `wal`: logical replication. No capture trigger exists; a publication covers the mapped tables,
//!   and one node at a time (the leader, chosen with a session-level advisory lock) reads a persistent
//!   `pgoutput` slot and writes each batch of committed transactions into the history, together with
//!   its position, in one transaction ([`wal`]). Needs `wal_level = logical` (on RDS:
//!   `rds.logical_replication = 1`). `relay.publish()` then emits a transactional logical-decoding
//!   message instead of a table row, so client publications keep their place in commit order.
//!
//! Every node's stream task reads the history by `seq`, as in trigger mode; the leader's one NOTIFY
//! per batch wakes them.
//!
//! **Crates.** The replication connection is `pgwire-replication` (pure Rust, SCRAM, explicit
//! start and acknowledged LSNs, feedback kept up under backpressure). It is built without its
//! `tls-rustls` feature: that feature turns on the default `aws-lc-rs` provider of `rustls` and
//! `tokio-rustls` (a C/cmake build, and a second crypto provider next to our `ring`, which makes
//! rustls' process-default provider ambiguous). So the replication connection is plain TCP: point
//! `capture.replication_url` at a trusted network path (the same host, a VPC-internal endpoint), or
//! keep `trigger` mode where TLS to the database is required. pgoutput rows are decoded by the
//! small in-house [`pgoutput`] decoder (v1 needs seven message types; `pg_walstream`'s parser would
//! add a dependency for the same work).

pub mod pgoutput;
pub mod wal;

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sqlx::PgPool;

use crate::config::{Mapping, Operation};
use crate::error::{Error, Result};

pub use crate::config::{CaptureConfig, CaptureMode, is_slot_name};

/// The default slot name for database `db`: `relay_` and the database name made a valid slot name
/// (with a hash suffix when anything had to change, so two databases never share it).
pub fn default_slot_name(db: &str) -> String {
    let clean: String = db
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if clean == db {
        format!("relay_{clean}")
    } else {
        let mut h: u32 = 0x811c_9dc5;
        for b in db.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("relay_{clean}_{h:08x}")
    }
}

/// What the capture reports at `/metrics`.
#[derive(Debug, Default)]
pub struct CaptureStatus {
    /// The running mode.
    pub mode: OnceLock<CaptureMode>,
    /// The slot name (`wal` mode).
    pub slot: OnceLock<String>,
    /// This node is the `wal` leader.
    pub leader: AtomicBool,
    /// Times this node became the leader.
    pub leaderships: AtomicU64,
    /// Transactions the leader applied (written or found already written).
    pub transactions: AtomicU64,
    /// Publications the leader wrote.
    pub publications: AtomicU64,
    /// Batches (history transactions) the leader wrote.
    pub batches: AtomicU64,
    /// Times the slot was found lost or invalidated (channels got new epochs).
    pub slot_losses: AtomicU64,
    /// New values of unchanged TOASTed columns that could not be filled (no old row: the table is not
    /// `REPLICA IDENTITY FULL`); they were published as null.
    pub toast_unavailable: AtomicU64,
    /// Replication stream interruptions.
    pub stream_errors: AtomicU64,
    /// Microseconds the leader spent turning received transactions into batch parameters (record
    /// literals; the connector's CPU between two batches).
    pub prepare_micros: AtomicU64,
    /// Microseconds the leader's batch statements took, from sending to their result: conversion,
    /// history write and commit on the database (the next batch is received meanwhile).
    pub apply_micros: AtomicU64,
}

/// Prepares the database for the configured mode on start-up (every node): records the mode, and
/// in `wal` mode checks `wal_level`, keeps the publication equal to the mapped tables and sets (or
/// checks) `REPLICA IDENTITY FULL`. Capture triggers are dropped by the `wal` leader, once its slot
/// exists, in the same transaction that hands capture over (see [`wal`]).
pub async fn prepare(
    pool: &PgPool,
    config: &CaptureConfig,
    mappings: &[Mapping],
    status: &CaptureStatus,
) -> Result<()> {
    let _ = status.mode.set(config.mode);
    if config.mode == CaptureMode::Trigger {
        sqlx::query(
            "INSERT INTO relay.settings (key, value) VALUES ('capture.mode', 'trigger')
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
             WHERE relay.settings.value IS DISTINCT FROM EXCLUDED.value",
        )
        .execute(pool)
        .await?;
        return Ok(());
    }
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await?;
    if wal_level != "logical" {
        return Err(Error::Capture(format!(
            "capture.mode is \"wal\" but the server runs with wal_level = {wal_level}: set \
             wal_level = logical and restart PostgreSQL (on RDS: rds.logical_replication = 1 in the \
             parameter group, then reboot), or use capture.mode \"trigger\""
        )));
    }
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await?;
    let slot = config
        .slot
        .clone()
        .unwrap_or_else(|| default_slot_name(&db));
    let _ = status.slot.set(slot);
    sync_publication(pool, config, mappings).await
}

/// Makes the publication cover exactly the mapped tables, with the operations they capture, and sets
/// or checks their replica identity. Serialized across nodes with a transaction-level advisory lock.
async fn sync_publication(
    pool: &PgPool,
    config: &CaptureConfig,
    mappings: &[Mapping],
) -> Result<()> {
    let mut tables: Vec<(String, String)> = Vec::new();
    let mut full: Vec<(String, String)> = Vec::new();
    let mut ops: Vec<&str> = Vec::new();
    for m in mappings {
        let t = (m.schema.clone(), m.table.clone());
        if !tables.contains(&t) {
            tables.push(t.clone());
        }
        for op in &m.operations {
            let name = match op {
                Operation::Insert => "insert",
                Operation::Update => "update",
                Operation::Delete => "delete",
            };
            if !ops.contains(&name) {
                ops.push(name);
            }
            if *op != Operation::Insert && !full.contains(&t) {
                full.push(t.clone());
            }
        }
    }
    // Names were validated as plain identifiers by the configuration; they are still quoted.
    let quoted = |(s, t): &(String, String)| format!("\"{s}\".\"{t}\"");
    let publication = format!("\"{}\"", config.publication);
    let publish = if ops.is_empty() {
        "insert".to_owned()
    } else {
        ops.join(", ")
    };

    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('relay.capture_publication'))")
        .execute(&mut *tx)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(&config.publication)
            .fetch_one(&mut *tx)
            .await?;
    let list = tables.iter().map(quoted).collect::<Vec<_>>().join(", ");
    if !exists {
        let for_tables = if list.is_empty() {
            String::new()
        } else {
            format!(" FOR TABLE {list}")
        };
        sqlx::query(&format!(
            "CREATE PUBLICATION {publication}{for_tables} WITH (publish = '{publish}')"
        ))
        .execute(&mut *tx)
        .await?;
    } else {
        let current: Vec<(String, String)> = sqlx::query_as(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
        )
        .bind(&config.publication)
        .fetch_all(&mut *tx)
        .await?;
        let same = current.len() == tables.len() && current.iter().all(|t| tables.contains(t));
        if !same {
            if list.is_empty() {
                for t in &current {
                    sqlx::query(&format!(
                        "ALTER PUBLICATION {publication} DROP TABLE {}",
                        quoted(t)
                    ))
                    .execute(&mut *tx)
                    .await?;
                }
            } else {
                sqlx::query(&format!("ALTER PUBLICATION {publication} SET TABLE {list}"))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query(&format!(
            "ALTER PUBLICATION {publication} SET (publish = '{publish}')"
        ))
        .execute(&mut *tx)
        .await?;
    }
    for t in &full {
        let identity: String = sqlx::query_scalar(
            "SELECT c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
        )
        .bind(&t.0)
        .bind(&t.1)
        .fetch_one(&mut *tx)
        .await?;
        if identity == "f" {
            continue;
        }
        if config.set_replica_identity {
            sqlx::query(&format!("ALTER TABLE {} REPLICA IDENTITY FULL", quoted(t)))
                .execute(&mut *tx)
                .await?;
            tracing::info!(table = %quoted(t), "set REPLICA IDENTITY FULL (wal capture of UPDATE/DELETE)");
        } else {
            tracing::warn!(
                table = %quoted(t),
                "not REPLICA IDENTITY FULL: in wal mode `old`, DELETE rows and template columns \
                 outside the key are incomplete (set capture.set_replica_identity or ALTER TABLE)"
            );
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The capture's metrics in Prometheus text; in `wal` mode with the slot's retained WAL, read now.
pub async fn render_metrics(pool: &PgPool, status: &CaptureStatus) -> String {
    let mut out = String::new();
    if status.mode.get() != Some(&CaptureMode::Wal) {
        return out;
    }
    let mut line = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
    line(
        "relay_wal_leader",
        "gauge",
        "1 while this node is the wal capture leader.",
        u64::from(status.leader.load(Ordering::Relaxed)).to_string(),
    );
    line(
        "relay_wal_transactions_total",
        "counter",
        "Transactions this node applied as the wal leader.",
        load(&status.transactions),
    );
    line(
        "relay_wal_publications_total",
        "counter",
        "Publications this node wrote as the wal leader.",
        load(&status.publications),
    );
    line(
        "relay_wal_batches_total",
        "counter",
        "History transactions this node wrote as the wal leader.",
        load(&status.batches),
    );
    let seconds = |c: &AtomicU64| format!("{:.6}", c.load(Ordering::Relaxed) as f64 / 1e6);
    line(
        "relay_wal_prepare_seconds_total",
        "counter",
        "Time the leader spent preparing batches (record literals) on this node.",
        seconds(&status.prepare_micros),
    );
    line(
        "relay_wal_apply_seconds_total",
        "counter",
        "Time the leader's batch statements took (conversion, history write, commit).",
        seconds(&status.apply_micros),
    );
    line(
        "relay_wal_slot_losses_total",
        "counter",
        "Times this node found the slot lost or invalidated (every channel got a new epoch).",
        load(&status.slot_losses),
    );
    line(
        "relay_wal_toast_unavailable_total",
        "counter",
        "Unchanged TOASTed values published as null (table not REPLICA IDENTITY FULL).",
        load(&status.toast_unavailable),
    );
    line(
        "relay_wal_stream_errors_total",
        "counter",
        "Interruptions of the replication stream on this node.",
        load(&status.stream_errors),
    );
    let Some(slot) = status.slot.get() else {
        return out;
    };
    let query = sqlx::query_as::<_, (Option<i64>, Option<String>, Option<i64>, bool)>(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, wal_status,
                safe_wal_size, active
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool);
    let row = match tokio::time::timeout(std::time::Duration::from_secs(2), query).await {
        Ok(Ok(row)) => row,
        _ => return out,
    };
    let (retained, wal_status, safe, exists) = match row {
        Some((r, s, safe, _active)) => (r.unwrap_or(0), s, safe, 1),
        None => (0, None, None, 0),
    };
    let _ = writeln!(
        out,
        "# HELP relay_wal_slot_exists 1 while the capture slot exists.\n\
         # TYPE relay_wal_slot_exists gauge\nrelay_wal_slot_exists {exists}\n\
         # HELP relay_wal_slot_retained_bytes WAL the slot keeps on the server (current WAL position \
         minus the slot's restart_lsn); bound it with max_slot_wal_keep_size.\n\
         # TYPE relay_wal_slot_retained_bytes gauge\nrelay_wal_slot_retained_bytes {retained}"
    );
    if let Some(safe) = safe {
        let _ = writeln!(
            out,
            "# HELP relay_wal_slot_safe_bytes WAL that can still be written before the slot is at \
             risk of invalidation (pg_replication_slots.safe_wal_size).\n\
             # TYPE relay_wal_slot_safe_bytes gauge\nrelay_wal_slot_safe_bytes {safe}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP relay_wal_slot_status pg_replication_slots.wal_status of the capture slot (1 for the \
         current value).\n# TYPE relay_wal_slot_status gauge"
    );
    for s in ["reserved", "extended", "unreserved", "lost"] {
        let v = u8::from(wal_status.as_deref() == Some(s));
        let _ = writeln!(out, "relay_wal_slot_status{{status=\"{s}\"}} {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        assert_eq!(default_slot_name("app"), "relay_app");
        let odd = default_slot_name("My-App");
        assert!(
            odd.starts_with("relay_my_app_") && is_slot_name(&odd),
            "{odd}"
        );
        assert_ne!(default_slot_name("a-b"), default_slot_name("a_b"));
        assert!(is_slot_name(&default_slot_name(&"x".repeat(63))));
        assert!(!is_slot_name("Relay") && !is_slot_name("") && !is_slot_name("a b"));
    }

    #[test]
    fn mode_is_validated_with_the_valid_values() {
        let c = crate::Config::from_json(
            r#"{"database":{"url":"postgres://x"},"capture":{"mode":"wal"}}"#,
        )
        .unwrap();
        assert_eq!(c.capture.mode, CaptureMode::Wal);
        let e = crate::Config::from_json(
            r#"{"database":{"url":"postgres://x"},"capture":{"mode":"logical"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("capture.mode") && e.contains("\"trigger\", \"wal\""),
            "{e}"
        );
        let c = crate::Config::from_json(r#"{"database":{"url":"postgres://x"}}"#).unwrap();
        assert_eq!(c.capture.mode, CaptureMode::Trigger);
    }

    #[test]
    fn config_errors_name_the_field() {
        let c = CaptureConfig {
            slot: Some("Bad Slot".into()),
            ..CaptureConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "capture.slot");
        let c = CaptureConfig {
            publication: "x; drop".into(),
            ..CaptureConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "capture.publication");
        let c = CaptureConfig {
            heartbeat: std::time::Duration::ZERO,
            ..CaptureConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "capture.heartbeat_secs");
    }
}
