//! The realtime relay: rows that change in PostgreSQL reach the WebSocket clients subscribed to their
//! channels, in commit order, with nothing lost; clients publish events that a writer turns into rows.
//!
//! Clients speak the Centrifugo protocol (JSON or Protobuf) at `/connection/websocket`, or over
//! HTTP-streaming / SSE with `/emulation` for their commands, so the official SDKs work unmodified. Changes flow: capture trigger → `relay.changelog` → `relay.sequence_changes()`
//! (per-channel offsets, global commit-ordered `seq`) → `relay.publications` (the history) → the
//! stream task of every node → the hub → each subscriber's session.
//!
//! # Layout
//! - [`backoff`]: the one retry policy (doubling delays with a cap), for the LISTEN connection and
//!   publish rules.
//! - [`capture`]: how changes reach the history: `trigger` mode, or `wal` mode (a leader node reads
//!   a logical replication slot; [`capture::wal`], [`capture::pgoutput`]).
//! - [`config`]: a leaf (imports no feature): one file per section, parsed at load into ready types
//!   (channel patterns compiled into [`config::ChannelRules`], parsed mapping templates, durations,
//!   PostgreSQL connect options, loaded auth keys); environment overrides; one
//!   [`config::ConfigError`] naming the field. Every limit lives here; features take their section.
//! - [`db`]: pool and migrations; [`db::listener`] (the node's one LISTEN connection, on
//!   tokio-postgres, the driver the project chose for it, with TLS read from the same URL as libpq
//!   would (`sslmode`, `sslrootcert`); one backoff, typed events; a reconnect is a gap; the one
//!   module that owns that driver);
//!   [`db::triggers`] (generated capture triggers); [`db::stream`] (wake-ups from the listener +
//!   gapless reads into the hub); [`db::history`] (positions, history, recovery, publishing).
//! - [`hub`]: channel registry and fan-out (each publication encoded once per encoding in use, and
//!   its fossil delta computed once for the channel's delta subscribers; bounded mailboxes, slow
//!   clients marked).
//! - [`session`]: one task per connection, generic over its transport: commands (`commands.rs`),
//!   subscriptions and delivery (`subscriptions.rs`: client-side and server-side, the pure
//!   offset/gap decision), typed replies and pushes encoded at the edge (`encode.rs`), pings, close
//!   codes.
//! - [`emulation`]: the HTTP-streaming and SSE transports and `/emulation`, adapters onto the same
//!   session loop.
//! - [`auth`]: who a connection is (JWT connection and subscription tokens) and what it may do on a
//!   channel (permissions from `channels[]`).
//! - [`limits`]: publish and subscribe rates (per connection, per client IP, per user), the client
//!   IP behind trusted proxies, and the WebSocket `Origin` allow-list.
//! - [`rules`]: client publications and `rpc` calls to the writer Lambda or a webhook.
//! - [`demo`]: the demo token endpoint (off by default).
//! - [`http`]: the accept loop (handshake timeout, cap on connections not yet WebSockets, socket
//!   options, closes that are not overtaken by a reset) and the router (WebSocket, `/healthz`,
//!   `/readyz`, `/metrics`).
//! - [`page`]: the chat page at `/` (static files built into the binary).
//! - [`presence`]: channel members on every node (a PostgreSQL or in-memory store), join/leave
//!   pushes (heard on the node's listener), the node heartbeat.
//! - [`api`]: the Centrifugo-compatible HTTP server API (`/api`).
//! - [`metrics`]: the node's Prometheus registry (`prometheus-client`): typed counters, gauges and
//!   the delivery lag histogram, the values read at scrape time, the `/metrics` exposition by the
//!   crate's encoder.
//! - [`state`]: the shared state.
//! - [`error`]: error types.
//!
//! Not yet in this shape (issue 10): `AppState`
//! still carries the whole [`Config`] for the session and the HTTP layer, so [`auth::connect`]
//! keeps a `&Config` adapter over [`auth::connect_with`].

// `pub` is the library's surface (what the binary, the tests, the fuzz targets and the examples
// use); everything else is `pub(crate)`. On the crate, not in `[workspace.lints]`: test support
// modules and the other crates are not converted yet. Modules whose types appear in `AppState`
// (reached through `session::serve` and `http::serve`) stay `pub` until the `Node` replaces it.
#![warn(unreachable_pub)]

pub(crate) mod api;
pub mod auth;
pub(crate) mod backoff;
pub mod capture;
pub mod config;
pub mod db;
pub(crate) mod demo;
pub mod emulation;
pub mod error;
// TODO(issue 10): remove after the session/hub/http restructuring merges and converts its items.
#[allow(unreachable_pub)]
pub mod http;
// TODO(issue 10): remove after the session/hub/http restructuring merges and converts its items.
#[allow(unreachable_pub)]
pub mod hub;
pub mod limits;
pub mod metrics;
pub(crate) mod page;
pub mod presence;
pub mod rules;
// TODO(issue 10): remove after the session/hub/http restructuring merges and converts its items.
#[allow(unreachable_pub)]
pub mod session;
pub mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use error::{Error, Result};

use crate::db::stream::{Stream, StreamStatus};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::state::AppState;

/// Prepares the database (migrations, triggers) and serves on `listener` until `shutdown` completes;
/// then closes every session with the shutdown code, stops the stream and closes the pool.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // First, so a rule whose AWS region cannot be determined stops start-up before anything else.
    let lambda =
        rules::LambdaClients::for_rules(&[&config.rules[..], &config.rpc[..]].concat()).await?;
    let pool = db::pool(&config.database)?;
    db::migrate(&pool).await?;
    // The node's id: its presence identity and its entry in the capture-owner registry.
    let node = uuid::Uuid::new_v4().to_string();
    let capture_every = config.stream.capture_check;
    let capture_status = Arc::new(capture::CaptureStatus::default());
    capture::prepare(&pool, &config.capture, &config.mappings, &capture_status).await?;
    // Trigger mode: the capture triggers this node needs, watched while it runs (wal mode has none).
    let capture_specs = if config.capture.mode == capture::CaptureMode::Trigger {
        let owner = db::triggers::Owner {
            node: &node,
            ttl: db::triggers::owner_ttl(capture_every),
        };
        let report = db::triggers::sync(&pool, &config.mappings, Some(owner)).await?;
        tracing::info!(installed = ?report.installed, removed = ?report.removed,
            kept_for_other_nodes = ?report.kept, "capture triggers in place");
        Some(db::triggers::specs(&config.mappings)?)
    } else {
        db::triggers::check_tables(&pool, &config.mappings).await?;
        // The slot exists before this node serves: nothing committed from here on is missed.
        let slot = capture_status.slot.get().cloned().unwrap_or_default();
        let lock_url = config.database.listen_url().to_owned();
        capture::wal::ensure_started(&pool, &lock_url, &slot, &capture_status)
            .await
            .map_err(|e| Error::Capture(format!("{e:#}")))?;
        None
    };

    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let hub = Arc::new(Hub::new());
    let status = Arc::new(StreamStatus::default());
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
    let grace = config.shutdown_grace();
    let listen_url = config.database.listen_url().to_owned();
    // The stream has its own small pool, so sessions' history and recovery reads can never starve the
    // reads every subscriber depends on.
    let stream_pool = db::pool(&config::DatabaseConfig {
        pool_size: 2,
        ..config.database.clone()
    })?;
    // The node's one LISTEN connection, for the stream and (with the PostgreSQL store) presence.
    let mut pg_listener =
        db::listener::Listener::new(&listen_url, config.database.connect_timeout)?;
    let stream = Stream {
        pool: stream_pool.clone(),
        events: pg_listener.subscribe(&Stream::CHANNELS),
        config: config.stream.clone(),
        hub: hub.clone(),
        status: status.clone(),
    };
    let verifier = auth::Verifier::new(&config.auth)?;
    // With a JWKS URL: the first fetch, then a refresh task.
    verifier.start(token.clone(), &tracker).await;
    let max_connections = config.client.max_connections;
    let store: Arc<dyn presence::PresenceStore> = match config.presence.engine {
        presence::Engine::Postgres => Arc::new(presence::pg::PgStore::with_listener(
            pool.clone(),
            pg_listener.subscribe(&[presence::pg::CHANNEL]),
        )),
        presence::Engine::Memory => Arc::new(presence::memory::MemoryStore::default()),
    };
    let mut presence = presence::Presence::new(config.presence.clone(), store);
    presence.node = node.clone();
    let presence = Arc::new(presence);
    let limits = limits::Shared::new(&config.client, &config.rules, &config.rpc);
    let metrics = Metrics::new(&hub, &status, &capture_status, &verifier);
    let state = Arc::new(AppState {
        config: Arc::new(config),
        pool: pool.clone(),
        hub,
        http,
        lambda,
        stream: status,
        capture: capture_status.clone(),
        metrics,
        verifier,
        connection_slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        limits,
        presence,
        shutdown: token.clone(),
        tracker: tracker.clone(),
    });
    // Registered before serving: a member is visible only while its node is.
    state.presence.start(&state).await?;
    tracker.spawn(presence::Presence::run(state.clone(), token.clone()));
    tracker.spawn(pg_listener.run(token.clone()));
    tracker.spawn(stream.run(token.clone()));
    if let Some(capture_specs) = capture_specs {
        tracker.spawn(db::triggers::watch(
            pool.clone(),
            capture_specs,
            node,
            capture_every,
            state.stream.capture.clone(),
            token.clone(),
        ));
    }
    if state.config.capture.mode == capture::CaptureMode::Wal {
        // Its own small pool: the history writes never wait behind the stream's reads.
        let wal = capture::wal::WalCapture {
            pool: db::pool(&config::DatabaseConfig {
                pool_size: 2,
                ..state.config.database.clone()
            })?,
            lock_url: listen_url.clone(),
            replication_url: state
                .config
                .capture
                .replication_url
                .clone()
                .unwrap_or_else(|| listen_url.clone()),
            config: state.config.capture.clone(),
            mappings: Arc::new(state.config.mappings.clone()),
            status: capture_status,
        };
        tracker.spawn(wal.run(token.clone()));
    }
    tracker.spawn(db::retention::run(
        stream_pool.clone(),
        Arc::new(state.config.retention.clone()),
        token.clone(),
    ));

    tracing::info!(addr = %listener.local_addr()?, "listening");
    let stop = token.clone();
    http::serve(listener, state, async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop.cancelled() => {}
        }
        tracing::info!("shutting down");
        stop.cancel();
    })
    .await;
    token.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "tasks still running after the grace period"
        );
    }
    pool.close().await;
    stream_pool.close().await;
    tracing::info!("stopped");
    Ok(())
}
