//! The connector's Prometheus metrics: one `prometheus-client` [`Registry`] per node ([`Metrics`]),
//! typed counters, gauges and a histogram, and the exposition at `/metrics` by the crate's encoder
//! (the Prometheus text format 0.0.4: counters are named with `_total`, which the encoder adds).
//!
//! Where each number comes from:
//! - counted here, by the sessions and the server API: connections, client publications in and out,
//!   recoveries;
//! - counted by the part that sees the event, on a `prometheus-client` handle that it owns (a
//!   counter is one `Arc`; [`Metrics::new`] registers a clone): the hub (slow disconnects), the
//!   change stream ([`StreamStatus`]: reconnects, catch-up reads, sequencer polls, cursor, the delivery
//!   lag histogram), the `wal` capture ([`CaptureStatus`]: registered only in `wal` mode) and the JWKS
//!   cache (fetches);
//! - read at scrape time ([`Scrape`]): numbers another part owns (channels, subscriptions, presence
//!   members, pending connections, the `wal` leader flag) and the database's own (the changelog's
//!   unsequenced backlog, the NOTIFY queue, the replication slot). A collector encodes them, so a
//!   database read that failed leaves its lines out instead of showing a stale value.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use crate::capture::{CaptureMode, CaptureStatus};
use crate::db::stream::StreamStatus;
use crate::hub::Hub;

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How long a scrape waits for one of its database reads.
const DB_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The node's metrics: the registry and the counters the sessions and the server API update.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The values read at this scrape (see [`Scrape`]), encoded by [`ScrapeCollector`].
    scrape: Arc<Mutex<Scrape>>,
    /// Serializes [`Metrics::encode`]: a concurrent scrape never encodes another one's values.
    encoding: Mutex<()>,
    /// Open client connections (WebSocket, HTTP-streaming, SSE).
    pub connections: Gauge,
    /// Client publications accepted (by a target or the database).
    pub publications_in: Counter,
    /// Publications written to client sockets.
    pub publications_out: Counter,
    /// Recoveries that filled the gap.
    pub recovered: Counter,
    /// Recoveries that could not.
    pub not_recovered: Counter,
}

/// What a scrape reads from the other parts of the node and from the database.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// The accept loop's connections that are not WebSockets yet (absent outside `http::serve`).
    pub pending: Option<Pending>,
    /// Channels with subscribers on this node.
    pub channels: u64,
    /// Subscriptions on this node.
    pub subscriptions: u64,
    /// Presence memberships of this node's connections.
    pub presence_members: u64,
    /// The changelog and NOTIFY queue gauges (absent when the read failed).
    pub changelog: Option<Changelog>,
    /// Whether this node is the `wal` leader (`wal` mode only).
    pub wal_leader: Option<bool>,
    /// The replication slot (`wal` mode; absent when the read failed).
    pub slot: Option<Slot>,
}

/// The accept loop's pending connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pending {
    /// TCP connections that are not WebSockets (yet).
    pub connections: u64,
    /// Connections closed to admit a new one over `client.max_pending_connections`.
    pub evictions: u64,
}

/// How far the stream is behind, and how full PostgreSQL's NOTIFY queue is (a full queue makes
/// notifying commits fail).
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct Changelog {
    /// Changes committed but not yet sequenced.
    pub unsequenced: i64,
    /// Age of the oldest of them, in seconds.
    pub oldest_unsequenced_secs: f64,
    /// `pg_notification_queue_usage()`.
    pub notify_queue_usage: f64,
}

/// The capture slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, Default)]
pub struct Slot {
    /// The slot exists.
    pub exists: bool,
    /// WAL the slot keeps: the current WAL position minus its `restart_lsn`.
    pub retained_bytes: i64,
    /// `safe_wal_size`, when PostgreSQL reports it (`max_slot_wal_keep_size` is set).
    pub safe_bytes: Option<i64>,
    /// `wal_status`: `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// The values of `pg_replication_slots.wal_status`, one series each.
const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

impl Metrics {
    /// The registry of a node, with the handles of the parts that count their own events. The
    /// `wal` capture's counters are registered when `capture` runs in `wal` mode
    /// ([`crate::capture::prepare`] has run).
    pub fn new(
        hub: &Hub,
        stream: &StreamStatus,
        capture: &CaptureStatus,
        verifier: &crate::auth::Verifier,
    ) -> Self {
        let mut registry = Registry::default();
        let connections = Gauge::default();
        let publications_in = Counter::default();
        let publications_out = Counter::default();
        let recovered = Counter::default();
        let not_recovered = Counter::default();
        // Help texts without the final period: the registry adds it.
        let r = &mut registry;
        r.register(
            "relay_connections",
            "Open client connections (WebSocket, HTTP-streaming, SSE)",
            connections.clone(),
        );
        r.register(
            "relay_publications_in",
            "Client publications accepted",
            publications_in.clone(),
        );
        r.register(
            "relay_publications_out",
            "Publications written to clients",
            publications_out.clone(),
        );
        r.register(
            "relay_slow_disconnects",
            "Connections closed for not reading fast enough",
            hub.slow_disconnects_counter(),
        );
        r.register(
            "relay_recoveries",
            "Subscriptions recovered completely",
            recovered.clone(),
        );
        r.register(
            "relay_recoveries_failed",
            "Recoveries answered with recovered=false",
            not_recovered.clone(),
        );
        r.register(
            "relay_stream_reconnects",
            "Reconnects of the LISTEN connection",
            stream.reconnects.clone(),
        );
        r.register(
            "relay_stream_cursor",
            "Sequence number of the last publication read",
            stream.cursor.clone(),
        );
        r.register(
            "relay_stream_catch_up_reads",
            "Catch-up reads of the changelog after a (re)connect of the LISTEN connection",
            stream.catch_ups.clone(),
        );
        r.register(
            "relay_sequencer_polls",
            "Calls of the sequencer (relay.sequence_batch) by this node",
            stream.polls.clone(),
        );
        r.register(
            "relay_delivery_lag_seconds",
            "From a change being written (in the writer's transaction) to its publication reaching \
             the hub",
            stream.lag.clone(),
        );
        if let Some(jwks) = verifier.jwks() {
            r.register(
                "relay_jwks_fetches",
                "Fetches of the JWKS (start-up, periodic refresh and unknown kids)",
                jwks.fetches_counter(),
            );
        }
        if capture.mode.get() == Some(&CaptureMode::Wal) {
            register_wal(r, capture);
        }
        let scrape = Arc::new(Mutex::new(Scrape::default()));
        registry.register_collector(Box::new(ScrapeCollector(scrape.clone())));
        Self {
            registry,
            scrape,
            encoding: Mutex::new(()),
            connections,
            publications_in,
            publications_out,
            recovered,
            not_recovered,
        }
    }

    /// Counts a recovery attempt.
    pub fn record_recovery(&self, recovered: bool) {
        let counter = if recovered {
            &self.recovered
        } else {
            &self.not_recovered
        };
        counter.inc();
    }

    /// The registry and `scrape` in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn encode(&self, scrape: Scrape) -> String {
        let _one_at_a_time = self.encoding.lock();
        *self.scrape.lock() = scrape;
        let mut out = String::with_capacity(4096);
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            // Writing to a String cannot fail; a metric's encoder could only if it were broken.
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        out
    }
}

/// The `wal` leader's counters.
fn register_wal(r: &mut Registry, capture: &CaptureStatus) {
    let counters = [
        (
            "relay_wal_leaderships",
            "Times this node became the wal capture leader",
            &capture.leaderships,
        ),
        (
            "relay_wal_transactions",
            "Transactions this node applied as the wal leader",
            &capture.transactions,
        ),
        (
            "relay_wal_publications",
            "Publications this node wrote as the wal leader",
            &capture.publications,
        ),
        (
            "relay_wal_batches",
            "History transactions this node wrote as the wal leader",
            &capture.batches,
        ),
        (
            "relay_wal_slot_losses",
            "Times this node found the slot lost or invalidated (every channel got a new epoch)",
            &capture.slot_losses,
        ),
        (
            "relay_wal_toast_unavailable",
            "Unchanged TOASTed values published as null (table not REPLICA IDENTITY FULL)",
            &capture.toast_unavailable,
        ),
        (
            "relay_wal_stream_errors",
            "Interruptions of the replication stream on this node",
            &capture.stream_errors,
        ),
    ];
    for (name, help, counter) in counters {
        r.register(name, help, counter.clone());
    }
    r.register(
        "relay_wal_prepare_seconds",
        "Seconds this node's wal leader spent building batches from received transactions",
        capture.prepare_seconds.clone(),
    );
    r.register(
        "relay_wal_apply_seconds",
        "Seconds this node's wal leader's batch statements took (conversion, history write, commit)",
        capture.apply_seconds.clone(),
    );
}

/// Encodes the [`Scrape`] of the scrape in progress.
#[derive(Debug)]
struct ScrapeCollector(Arc<Mutex<Scrape>>);

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().clone();
        let e = &mut encoder;
        if let Some(p) = s.pending {
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
            )?)?;
        }
        if let Some(c) = s.changelog {
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
            )?;
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
        }
        Ok(())
    }
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
pub async fn read_changelog(pool: &PgPool) -> Option<Changelog> {
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
pub async fn read_slot(pool: &PgPool, slot: &str) -> Option<Slot> {
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
pub async fn scrape(
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

/// Bucket upper bounds of the delivery lag histogram, in seconds.
pub const LAG_BUCKETS: [f64; 13] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(capture: &CaptureStatus) -> (Metrics, Hub, StreamStatus) {
        let config = crate::Config::from_json(r#"{"database":{"url":"postgres://x"}}"#).unwrap();
        let verifier = crate::auth::Verifier::new(&config.auth).unwrap();
        let hub = Hub::new();
        let stream = StreamStatus::default();
        let m = Metrics::new(&hub, &stream, capture, &verifier);
        (m, hub, stream)
    }

    /// The value of the sample line `series` (name and labels) in `text`.
    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn the_exposition_keeps_the_names_and_formats_scrapers_rely_on() {
        let (m, _hub, stream) = metrics(&CaptureStatus::default());
        m.connections.inc();
        m.connections.inc();
        m.connections.dec();
        m.publications_in.inc_by(3);
        m.record_recovery(true);
        m.record_recovery(false);
        m.record_recovery(false);
        stream.reconnects.inc();
        stream.cursor.set(42);
        stream.lag.observe(0.003);
        stream.lag.observe(0.7);
        let text = m.encode(Scrape {
            pending: Some(Pending {
                connections: 2,
                evictions: 5,
            }),
            channels: 4,
            subscriptions: 6,
            presence_members: 1,
            changelog: Some(Changelog {
                unsequenced: 1,
                oldest_unsequenced_secs: 0.25,
                notify_queue_usage: 0.0,
            }),
            wal_leader: None,
            slot: None,
        });
        for (series, value) in [
            ("relay_connections", "1"),
            ("relay_publications_in_total", "3"),
            ("relay_publications_out_total", "0"),
            ("relay_recoveries_total", "1"),
            ("relay_recoveries_failed_total", "2"),
            ("relay_slow_disconnects_total", "0"),
            ("relay_stream_reconnects_total", "1"),
            ("relay_stream_catch_up_reads_total", "0"),
            ("relay_sequencer_polls_total", "0"),
            ("relay_stream_cursor", "42"),
            ("relay_pending_connections", "2"),
            ("relay_pending_evictions_total", "5"),
            ("relay_channels", "4"),
            ("relay_subscriptions", "6"),
            ("relay_presence_members", "1"),
            ("relay_changelog_unsequenced", "1"),
            ("relay_changelog_oldest_unsequenced_seconds", "0.25"),
            ("relay_delivery_lag_seconds_bucket{le=\"0.001\"}", "0"),
            ("relay_delivery_lag_seconds_bucket{le=\"0.005\"}", "1"),
            ("relay_delivery_lag_seconds_bucket{le=\"0.5\"}", "1"),
            ("relay_delivery_lag_seconds_bucket{le=\"1\"}", "2"),
            ("relay_delivery_lag_seconds_bucket{le=\"+Inf\"}", "2"),
            ("relay_delivery_lag_seconds_count", "2"),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(sample(&text, "relay_pg_notification_queue_usage").is_some());
        assert!(text.contains("# TYPE relay_publications_in_total counter\n"));
        assert!(text.contains("# TYPE relay_connections gauge\n"));
        assert!(text.contains("# TYPE relay_delivery_lag_seconds histogram\n"));
        assert!(text.contains(
            "# HELP relay_connections Open client connections (WebSocket, HTTP-streaming, SSE).\n"
        ));
        // Trigger mode, no JWKS URL: no wal or JWKS series at all.
        assert!(
            !text.contains("relay_wal_") && !text.contains("relay_jwks_"),
            "{text}"
        );
        // One help and type line per family.
        assert_eq!(
            text.matches("# TYPE relay_delivery_lag_seconds ").count(),
            1
        );
    }

    #[test]
    fn a_failed_database_read_leaves_its_lines_out() {
        let (m, _hub, _stream) = metrics(&CaptureStatus::default());
        let text = m.encode(Scrape::default());
        for name in [
            "relay_changelog_unsequenced",
            "relay_changelog_oldest_unsequenced_seconds",
            "relay_pg_notification_queue_usage",
            "relay_pending_connections",
        ] {
            assert!(!text.contains(name), "{name} in\n{text}");
        }
        assert_eq!(sample(&text, "relay_channels"), Some("0"));
    }

    #[test]
    fn a_jwks_url_adds_the_fetch_counter() {
        let config = crate::Config::from_json(
            r#"{"database":{"url":"postgres://x"},"auth":{"jwks_url":"http://127.0.0.1:9/jwks"}}"#,
        )
        .unwrap();
        let verifier = crate::auth::Verifier::new(&config.auth).unwrap();
        let m = Metrics::new(
            &Hub::new(),
            &StreamStatus::default(),
            &CaptureStatus::default(),
            &verifier,
        );
        let text = m.encode(Scrape::default());
        assert_eq!(
            sample(&text, "relay_jwks_fetches_total"),
            Some("0"),
            "{text}"
        );
    }

    #[test]
    fn wal_mode_adds_the_leaders_counters_and_the_slot() {
        let capture = CaptureStatus::default();
        let _ = capture.mode.set(CaptureMode::Wal);
        let (m, _hub, _stream) = metrics(&capture);
        capture.slot_losses.inc();
        capture.transactions.inc_by(7);
        let text = m.encode(Scrape {
            wal_leader: Some(true),
            slot: Some(Slot {
                exists: true,
                retained_bytes: 4096,
                safe_bytes: None,
                wal_status: Some("extended".into()),
            }),
            ..Scrape::default()
        });
        for (series, value) in [
            ("relay_wal_leader", "1"),
            ("relay_wal_slot_losses_total", "1"),
            ("relay_wal_transactions_total", "7"),
            ("relay_wal_leaderships_total", "0"),
            ("relay_wal_slot_exists", "1"),
            ("relay_wal_slot_retained_bytes", "4096"),
            ("relay_wal_slot_status{status=\"reserved\"}", "0"),
            ("relay_wal_slot_status{status=\"extended\"}", "1"),
            ("relay_wal_slot_status{status=\"lost\"}", "0"),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(!text.contains("relay_wal_slot_safe_bytes"), "{text}");
        assert_eq!(
            text.matches("# TYPE relay_wal_slot_status gauge").count(),
            1
        );
    }
}
