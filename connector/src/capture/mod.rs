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

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64};

use prometheus_client::metrics::counter::Counter;

use sqlx::{PgConnection, PgPool};

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

/// What the capture reports at `/metrics` (the counters are registered in
/// [`crate::metrics::Metrics`] in `wal` mode).
#[derive(Debug, Default)]
pub struct CaptureStatus {
    /// The running mode.
    pub mode: OnceLock<CaptureMode>,
    /// The slot name (`wal` mode).
    pub slot: OnceLock<String>,
    /// This node is the `wal` leader.
    pub leader: AtomicBool,
    /// Times this node became the leader.
    pub leaderships: Counter,
    /// Transactions the leader applied (written or found already written).
    pub transactions: Counter,
    /// Publications the leader wrote.
    pub publications: Counter,
    /// Batches (history transactions) the leader wrote.
    pub batches: Counter,
    /// Times the slot was found lost or invalidated (channels got new epochs).
    pub slot_losses: Counter,
    /// New values of unchanged TOASTed columns that could not be filled (no old row: the table is not
    /// `REPLICA IDENTITY FULL`); they were published as null.
    pub toast_unavailable: Counter,
    /// Replication stream interruptions.
    pub stream_errors: Counter,
    /// Seconds the leader spent turning received transactions into batch parameters (record
    /// literals; the connector's CPU between two batches).
    pub prepare_seconds: Counter<f64, AtomicU64>,
    /// Seconds the leader's batch statements took, from sending to their result: conversion,
    /// history write and commit on the database (the next batch is received meanwhile).
    pub apply_seconds: Counter<f64, AtomicU64>,
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

/// A table, as (schema, name).
type Table = (String, String);

/// What the publication must be, from the mappings.
struct PublicationPlan {
    /// The mapped tables, each once.
    tables: Vec<Table>,
    /// The tables that capture UPDATE or DELETE, which need `REPLICA IDENTITY FULL`.
    full: Vec<Table>,
    /// The `publish` option: the operations any mapping captures.
    publish: String,
}

impl PublicationPlan {
    fn new(mappings: &[Mapping]) -> Self {
        let mut tables: Vec<Table> = Vec::new();
        let mut full: Vec<Table> = Vec::new();
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
        let publish = if ops.is_empty() {
            "insert".to_owned()
        } else {
            ops.join(", ")
        };
        PublicationPlan {
            tables,
            full,
            publish,
        }
    }
}

/// `"schema"."table"`. Names were validated as plain identifiers by the configuration; they are
/// still quoted.
fn quoted((s, t): &Table) -> String {
    format!("\"{s}\".\"{t}\"")
}

/// Makes the publication cover exactly the mapped tables, with the operations they capture, and sets
/// or checks their replica identity. Serialized across nodes with a transaction-level advisory lock.
async fn sync_publication(
    pool: &PgPool,
    config: &CaptureConfig,
    mappings: &[Mapping],
) -> Result<()> {
    let plan = PublicationPlan::new(mappings);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('relay.capture_publication'))")
        .execute(&mut *tx)
        .await?;
    write_publication(&mut tx, config, &plan).await?;
    replica_identity(&mut tx, config, &plan.full).await?;
    tx.commit().await?;
    Ok(())
}

/// Creates the publication as `plan` says, or alters it to match.
async fn write_publication(
    conn: &mut PgConnection,
    config: &CaptureConfig,
    plan: &PublicationPlan,
) -> Result<()> {
    let publication = format!("\"{}\"", config.publication);
    let publish = &plan.publish;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(&config.publication)
            .fetch_one(&mut *conn)
            .await?;
    let list = plan
        .tables
        .iter()
        .map(quoted)
        .collect::<Vec<_>>()
        .join(", ");
    if !exists {
        let for_tables = if list.is_empty() {
            String::new()
        } else {
            format!(" FOR TABLE {list}")
        };
        sqlx::query(&format!(
            "CREATE PUBLICATION {publication}{for_tables} WITH (publish = '{publish}')"
        ))
        .execute(&mut *conn)
        .await?;
        return Ok(());
    }
    let current: Vec<Table> = sqlx::query_as(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
    )
    .bind(&config.publication)
    .fetch_all(&mut *conn)
    .await?;
    let same =
        current.len() == plan.tables.len() && current.iter().all(|t| plan.tables.contains(t));
    if !same {
        if list.is_empty() {
            for t in &current {
                sqlx::query(&format!(
                    "ALTER PUBLICATION {publication} DROP TABLE {}",
                    quoted(t)
                ))
                .execute(&mut *conn)
                .await?;
            }
        } else {
            sqlx::query(&format!("ALTER PUBLICATION {publication} SET TABLE {list}"))
                .execute(&mut *conn)
                .await?;
        }
    }
    sqlx::query(&format!(
        "ALTER PUBLICATION {publication} SET (publish = '{publish}')"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Sets `REPLICA IDENTITY FULL` on the tables in `full` that lack it, or (without
/// `capture.set_replica_identity`) warns about them.
async fn replica_identity(
    conn: &mut PgConnection,
    config: &CaptureConfig,
    full: &[Table],
) -> Result<()> {
    for t in full {
        let identity: String = sqlx::query_scalar(
            "SELECT c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
        )
        .bind(&t.0)
        .bind(&t.1)
        .fetch_one(&mut *conn)
        .await?;
        if identity == "f" {
            continue;
        }
        if config.set_replica_identity {
            sqlx::query(&format!("ALTER TABLE {} REPLICA IDENTITY FULL", quoted(t)))
                .execute(&mut *conn)
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
    Ok(())
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
