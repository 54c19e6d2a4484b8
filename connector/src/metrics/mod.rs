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
//!
//! This file holds the registry and its registrations, grouped by the part that counts; `scrape.rs`
//! the values read at scrape time and their collector.

mod scrape;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::capture::{CaptureMode, CaptureStatus};
use crate::db::stream::StreamStatus;
use crate::hub::Hub;

use self::scrape::ScrapeCollector;
pub(crate) use self::scrape::{Pending, Scrape, scrape};
pub(crate) use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The node's metrics: the registry and the counters the sessions and the server API update.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The values read at this scrape (see [`Scrape`]), encoded by [`ScrapeCollector`].
    scrape: Arc<Mutex<Scrape>>,
    /// Serializes [`Metrics::encode`]: a concurrent scrape never encodes another one's values.
    encoding: Mutex<()>,
    /// Open client connections (WebSocket, HTTP-streaming, SSE).
    pub(crate) connections: Gauge,
    /// Client publications accepted (by a target or the database).
    pub(crate) publications_in: Counter,
    /// Publications written to client sockets.
    pub(crate) publications_out: Counter,
    /// Recoveries that filled the gap.
    pub(crate) recovered: Counter,
    /// Recoveries that could not.
    pub(crate) not_recovered: Counter,
}

impl Metrics {
    /// The registry of a node, with the handles of the parts that count their own events. The
    /// `wal` capture's counters are registered when `capture` runs in `wal` mode
    /// ([`crate::capture::prepare`] has run).
    pub(crate) fn new(
        hub: &Hub,
        stream: &StreamStatus,
        capture: &CaptureStatus,
        verifier: &crate::auth::Verifier,
    ) -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
            scrape: Arc::new(Mutex::new(Scrape::default())),
            encoding: Mutex::new(()),
            connections: Gauge::default(),
            publications_in: Counter::default(),
            publications_out: Counter::default(),
            recovered: Counter::default(),
            not_recovered: Counter::default(),
        };
        // The registration order is the exposition's order.
        metrics.register_clients(hub);
        let r = &mut metrics.registry;
        register_stream(r, stream);
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
        r.register_collector(Box::new(ScrapeCollector(metrics.scrape.clone())));
        metrics
    }

    /// The counters of client connections and their publications (this struct's, and the hub's
    /// slow disconnects).
    fn register_clients(&mut self, hub: &Hub) {
        // Help texts without the final period: the registry adds it.
        let r = &mut self.registry;
        r.register(
            "relay_connections",
            "Open client connections (WebSocket, HTTP-streaming, SSE)",
            self.connections.clone(),
        );
        r.register(
            "relay_publications_in",
            "Client publications accepted",
            self.publications_in.clone(),
        );
        r.register(
            "relay_publications_out",
            "Publications written to clients",
            self.publications_out.clone(),
        );
        r.register(
            "relay_slow_disconnects",
            "Connections closed for not reading fast enough",
            hub.slow_disconnects_counter(),
        );
        r.register(
            "relay_recoveries",
            "Subscriptions recovered completely",
            self.recovered.clone(),
        );
        r.register(
            "relay_recoveries_failed",
            "Recoveries answered with recovered=false",
            self.not_recovered.clone(),
        );
    }

    /// Counts a recovery attempt.
    pub(crate) fn record_recovery(&self, recovered: bool) {
        let counter = if recovered {
            &self.recovered
        } else {
            &self.not_recovered
        };
        counter.inc();
    }

    /// The registry and `scrape` in the Prometheus text format ([`CONTENT_TYPE`]).
    pub(crate) fn encode(&self, scrape: Scrape) -> String {
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

/// The change stream's counters, cursor and delivery lag histogram.
fn register_stream(r: &mut Registry, stream: &StreamStatus) {
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
        "Calls of the sequencer (relay.sequence_batch_rows) by this node",
        stream.polls.clone(),
    );
    r.register(
        "relay_stream_batches_handed",
        "Batches this node sequenced and handed to its hub without reading them back",
        stream.handed.clone(),
    );
    r.register(
        "relay_delivery_lag_seconds",
        "From a change being written (in the writer's transaction) to its publication reaching \
         the hub",
        stream.lag.clone(),
    );
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
