//! The process-wide counters of the node (the shared services are the [`crate::node::Node`]'s, the
//! edge's state is [`crate::edge::Edge`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide counters (exported at `/metrics`).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: AtomicU64,
    /// Client publications accepted (by a target or the database).
    pub publications_in: AtomicU64,
    /// Publications written to client sockets.
    pub publications_out: AtomicU64,
    /// Recoveries that filled the gap.
    pub recovered: AtomicU64,
    /// Recoveries that could not.
    pub not_recovered: AtomicU64,
}

impl Metrics {
    /// Counts a recovery attempt.
    pub fn record_recovery(&self, recovered: bool) {
        let counter = if recovered {
            &self.recovered
        } else {
            &self.not_recovered
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
