//! What a scrape reads at scrape time ([`Scrape`]): numbers other parts of the node own, and the
//! database's own (the changelog, the NOTIFY queue, the replication slot), encoded by a collector so
//! that a database read that failed leaves its lines out.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use sqlx::PgPool;

use crate::capture::{CaptureMode, CaptureStatus};
use crate::hub::Hub;

/// How long a scrape waits for one of its database reads.
const DB_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What a scrape reads from the other parts of the node and from the database.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scrape {
    /// The accept loop's connections that are not WebSockets yet (absent outside `http::serve`).
    pub(crate) pending: Option<Pending>,
    /// Channels with subscribers on this node.
    pub(crate) channels: u64,
    /// Subscriptions on this node.
    pub(crate) subscriptions: u64,
    /// Presence memberships of this node's connections.
    pub(crate) presence_members: u64,
    /// The changelog and NOTIFY queue gauges (absent when the read failed).
    pub(crate) changelog: Option<Changelog>,
    /// Whether this node is the `wal` leader (`wal` mode only).
    pub(crate) wal_leader: Option<bool>,
    /// The replication slot (`wal` mode; absent when the read failed).
    pub(crate) slot: Option<Slot>,
}

/// The accept loop's pending connections.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pending {
    /// TCP connections that are not WebSockets (yet).
    pub(crate) connections: u64,
    /// Connections closed to admit a new one over `client.max_pending_connections`.
    pub(crate) evictions: u64,
}

/// How far the stream is behind, and how full PostgreSQL's NOTIFY queue is (a full queue makes
/// notifying commits fail).
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub(crate) struct Changelog {
    /// Changes committed but not yet sequenced.
    pub(crate) unsequenced: i64,
    /// Age of the oldest of them, in seconds.
    pub(crate) oldest_unsequenced_secs: f64,
    /// `pg_notification_queue_usage()`.
    pub(crate) notify_queue_usage: f64,
}

/// The capture slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot {
    /// The slot exists.
    pub(crate) exists: bool,
    /// WAL the slot keeps: the current WAL position minus its `restart_lsn`.
    pub(crate) retained_bytes: i64,
    /// `safe_wal_size`, when PostgreSQL reports it (`max_slot_wal_keep_size` is set).
    pub(crate) safe_bytes: Option<i64>,
    /// `wal_status`: `reserved`, `extended`, `unreserved` or `lost`.
    pub(crate) wal_status: Option<String>,
}

/// The values of `pg_replication_slots.wal_status`, one series each.
const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Encodes the [`Scrape`] of the scrape in progress.
#[derive(Debug)]
pub(super) struct ScrapeCollector(pub(super) Arc<Mutex<Scrape>>);

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().clone();
        let e = &mut encoder;
        if let Some(p) = s.pending {
            encode_pending(e, p)?;
        }
        if let Some(c) = s.changelog {
            encode_changelog(e, c)?;
        }
        gauge(
            e,
            "relay_channels",
            "Channels with subscribers on this node.",
            s.channels,
        )?;
        gauge(
            e,
            "relay_subscriptions",
            "Subscriptions on this node.",
            s.subscriptions,
        )?;
        gauge(
            e,
            "relay_presence_members",
            "Presence memberships of this node's connections.",
            s.presence_members,
        )?;
        if let Some(leader) = s.wal_leader {
            gauge(
                e,
                "relay_wal_leader",
                "1 while this node is the wal capture leader.",
                u64::from(leader),
            )?;
        }
        if let Some(slot) = &s.slot {
            encode_slot(e, slot)?;
        }
        Ok(())
    }
}

/// The accept loop's pending connections and evictions.
fn encode_pending(e: &mut DescriptorEncoder<'_>, p: Pending) -> Result<(), std::fmt::Error> {
    gauge(
        e,
        "relay_pending_connections",
        "TCP connections that are not WebSockets (yet).",
        p.connections,
    )?;
    let evictions = ConstCounter::new(p.evictions);
    evictions.encode(e.encode_descriptor(
        "relay_pending_evictions",
        "Connections closed to admit a new one over client.max_pending_connections.",
        None,
        evictions.metric_type(),
    )?)
}

/// The changelog's backlog and the NOTIFY queue.
fn encode_changelog(e: &mut DescriptorEncoder<'_>, c: Changelog) -> Result<(), std::fmt::Error> {
    gauge(
        e,
        "relay_changelog_unsequenced",
        "Changes committed but not yet sequenced (held back by the oldest open \
         transaction, or waiting for the next wake-up).",
        c.unsequenced,
    )?;
    gauge(
        e,
        "relay_changelog_oldest_unsequenced_seconds",
        "Age of the oldest change not yet sequenced: the delivery delay a long-running \
         writer transaction causes.",
        c.oldest_unsequenced_secs,
    )?;
    gauge(
        e,
        "relay_pg_notification_queue_usage",
        "pg_notification_queue_usage(): fraction of the NOTIFY queue in use.",
        c.notify_queue_usage,
    )
}

/// The `wal` capture slot: whether it exists, what it retains, its status.
fn encode_slot(e: &mut DescriptorEncoder<'_>, slot: &Slot) -> Result<(), std::fmt::Error> {
    gauge(
        e,
        "relay_wal_slot_exists",
        "1 while the capture slot exists.",
        u64::from(slot.exists),
    )?;
    gauge(
        e,
        "relay_wal_slot_retained_bytes",
        "WAL the slot keeps on the server (current WAL position minus the slot's \
         restart_lsn); bound it with max_slot_wal_keep_size.",
        slot.retained_bytes,
    )?;
    if let Some(safe) = slot.safe_bytes {
        gauge(
            e,
            "relay_wal_slot_safe_bytes",
            "WAL that can still be written before the slot is at risk of invalidation \
             (pg_replication_slots.safe_wal_size).",
            safe,
        )?;
    }
    let mut family = e.encode_descriptor(
        "relay_wal_slot_status",
        "pg_replication_slots.wal_status of the capture slot (1 for the current value).",
        None,
        MetricType::Gauge,
    )?;
    for status in WAL_STATUSES {
        let current = u64::from(slot.wal_status.as_deref() == Some(status));
        ConstGauge::new(current).encode(family.encode_family(&[("status", status)])?)?;
    }
    Ok(())
}

/// Encodes one gauge read at scrape time.
fn gauge<N>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let value = ConstGauge::new(value);
    value.encode(encoder.encode_descriptor(name, help, None, value.metric_type())?)
}

/// Reads the changelog and NOTIFY queue gauges (at most [`DB_READ_TIMEOUT`]; `None` on failure).
pub(crate) async fn read_changelog(pool: &PgPool) -> Option<Changelog> {
    let query = sqlx::query_as::<_, Changelog>(
        "SELECT count(*) AS unsequenced,
                coalesce(extract(epoch FROM clock_timestamp() - min(written_at)), 0)::float8
                    AS oldest_unsequenced_secs,
                pg_notification_queue_usage() AS notify_queue_usage
         FROM relay.changelog",
    )
    .fetch_one(pool);
    match tokio::time::timeout(DB_READ_TIMEOUT, query).await {
        Ok(Ok(g)) => Some(g),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics query failed");
            None
        }
        Err(_) => None,
    }
}

/// Reads the capture slot `slot` (at most [`DB_READ_TIMEOUT`]; `None` on failure).
pub(crate) async fn read_slot(pool: &PgPool, slot: &str) -> Option<Slot> {
    let query = sqlx::query_as::<_, (Option<i64>, Option<String>, Option<i64>)>(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, wal_status, safe_wal_size
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool);
    let row = match tokio::time::timeout(DB_READ_TIMEOUT, query).await {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics query failed");
            return None;
        }
        Err(_) => return None,
    };
    Some(match row {
        Some((retained, wal_status, safe_bytes)) => Slot {
            exists: true,
            retained_bytes: retained.unwrap_or(0),
            safe_bytes,
            wal_status,
        },
        None => Slot::default(),
    })
}

/// What a scrape reads from `state`, `pending` (the accept loop's, when served by
/// [`crate::http::serve`]) and the database.
pub(crate) async fn scrape(
    pool: &PgPool,
    hub: &Hub,
    presence: &crate::presence::Presence,
    capture: &CaptureStatus,
    pending: Option<Pending>,
) -> Scrape {
    let wal = capture.mode.get() == Some(&CaptureMode::Wal);
    let slot = match capture.slot.get() {
        Some(slot) if wal => read_slot(pool, slot).await,
        _ => None,
    };
    Scrape {
        pending,
        channels: hub.channel_count() as u64,
        subscriptions: hub.subscription_count(),
        presence_members: presence.local_members() as u64,
        changelog: read_changelog(pool).await,
        wal_leader: wal.then(|| capture.leader.load(std::sync::atomic::Ordering::Relaxed)),
        slot,
    }
}
