//! What only the edge needs — the HTTP layer and the sessions it starts, not the channel
//! operations: the [`Node`] they call, the configuration a session runs with, the token verifier,
//! the per-IP and per-user publish rates and trusted proxies, the connection slots, and the
//! shutdown handle with the task tracker.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::clock::Clock;
use crate::config::Config;
use crate::limits;
use crate::node::Node;

/// The state of the HTTP layer and of every session it starts.
#[derive(Debug)]
pub struct Edge {
    /// The channel operations and the services behind them.
    pub(crate) node: Arc<Node>,
    /// The validated configuration (client limits, permissions, auth settings).
    pub(crate) config: Arc<Config>,
    /// Verifies connection and subscription tokens.
    pub(crate) verifier: Verifier,
    /// Publish rates per client IP and per user, and the proxies whose `X-Forwarded-For` is
    /// believed.
    pub(crate) limits: limits::Shared,
    /// One permit per open connection (`client.max_connections`).
    pub(crate) connection_slots: Arc<Semaphore>,
    /// Cancelled when the connector shuts down.
    pub(crate) shutdown: CancellationToken,
    /// Tracks every task, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Unix time for the sessions' token expiry, on tokio's clock (paused in unit tests).
    pub(crate) clock: Clock,
}

impl Edge {
    /// The edge of `node`, serving with `config`.
    pub(crate) fn new(
        node: Arc<Node>,
        config: Arc<Config>,
        verifier: Verifier,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            limits: limits::Shared::new(&config.client),
            connection_slots: Arc::new(Semaphore::new(config.client.max_connections)),
            node,
            config,
            verifier,
            shutdown,
            tracker,
            clock: Clock::new(),
        }
    }
}
