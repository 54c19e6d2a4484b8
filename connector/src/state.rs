//! The state shared by every part of a running connector: configuration, pool, hub, HTTP client,
//! stream status, metrics and the shutdown handle.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::db::stream::StreamStatus;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Everything a session or an HTTP handler needs.
#[derive(Debug)]
pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Query pool.
    pub pool: PgPool,
    /// Channel registry.
    pub hub: Arc<Hub>,
    /// Client for publish targets.
    pub http: reqwest::Client,
    /// AWS Lambda clients of the rules that invoke Lambda in AWS.
    pub lambda: crate::rules::LambdaClients,
    /// Change-stream status.
    pub stream: Arc<StreamStatus>,
    /// Change-capture status (the `wal` leader's counters).
    pub capture: Arc<crate::capture::CaptureStatus>,
    /// The node's metrics registry and the sessions' counters.
    pub metrics: Metrics,
    /// Verifies connection and subscription tokens.
    pub verifier: crate::auth::Verifier,
    /// Limits shared by all connections: publishes per IP and per user, rule target concurrency.
    pub limits: crate::limits::Shared,
    /// One permit per open WebSocket (`client.max_connections`).
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// This node's presence (shared with the other nodes through PostgreSQL).
    pub presence: Arc<crate::presence::Presence>,
    /// Cancelled when the connector shuts down.
    pub shutdown: CancellationToken,
    /// Tracks every task, so shutdown can wait for them.
    pub tracker: TaskTracker,
}
