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
use crate::config::{
    ApiConfig, AuthConfig, ChannelRule, ChannelRules, ClientConfig, Config, DemoConfig,
};
use crate::limits;
use crate::node::Node;

/// The sections of the configuration the HTTP layer and its sessions read: the edge takes these,
/// never the whole `Config`.
#[derive(Debug, Clone)]
pub(crate) struct EdgeConfig {
    /// Connection limits, rates, timers, origins (`client`).
    pub(crate) client: ClientConfig,
    /// Channel permissions (`channels[]`).
    pub(crate) channels: ChannelRules<ChannelRule>,
    /// Token settings (`auth`).
    pub(crate) auth: AuthConfig,
    /// The server API's key (`api`).
    pub(crate) api: ApiConfig,
    /// The demo token endpoint (`demo`).
    pub(crate) demo: DemoConfig,
    /// How long sessions get to finish at shutdown (`shutdown_grace_secs`).
    pub(crate) shutdown_grace_secs: u64,
}

impl EdgeConfig {
    /// The sections of `config` the edge reads.
    pub(crate) fn of(config: &Config) -> Self {
        Self {
            client: config.client.clone(),
            channels: config.channels.clone(),
            auth: config.auth.clone(),
            api: config.api.clone(),
            demo: config.demo.clone(),
            shutdown_grace_secs: config.shutdown_grace_secs,
        }
    }
}

/// The state of the HTTP layer and of every session it starts.
#[derive(Debug)]
pub struct Edge {
    /// The channel operations and the services behind them.
    pub(crate) node: Arc<Node>,
    /// The sections of the validated configuration it reads.
    pub(crate) config: EdgeConfig,
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
        config: EdgeConfig,
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
