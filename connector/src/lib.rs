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
//!   a logical replication slot). `mod.rs` holds the set-up of both (the publication, replica
//!   identity) and the status; [`capture::pgoutput`] decodes the stream; [`capture::wal`] is the
//!   leader, one file per step: `leader.rs` (the leader lock, the replication connection),
//!   `slot.rs` (slot checks, creation, loss, hand-over from the triggers), `stream.rs` (the
//!   pipelined receive/write loop), `events.rs` (events into transactions), `batch.rs`
//!   (transactions into record literals) and `apply.rs` (the batch statement).
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
//!   clients marked); a `hub::Delivery` is a publication, a join or a leave push; the connected
//!   sessions by user, which `disconnect` orders close (a session holds a registration that leaves
//!   the index when dropped).
//! - [`node`]: the channel operations a client connection and the server API share — publish (to a
//!   rule's target or into the history), history, a subscription's position and recovery,
//!   presence, presence stats, channels, info, disconnect, rpc — over the services it owns (pool,
//!   hub, presence, cluster, publish targets, metrics, stream and capture status); `publish.rs`
//!   holds publications and rpc calls (a rule's target, or the history); `sessions.rs` what a
//!   session registers (its registration for disconnect orders, hub subscriptions, presence
//!   memberships). Each answers with a reply error or a disconnect.
//! - [`edge`]: what only the HTTP layer and its sessions need ([`Edge`]): the node, the
//!   configuration sections a session runs with (`EdgeConfig`), the token verifier, per-IP and
//!   per-user publish rates, connection slots, the shutdown token and the task tracker, and the
//!   clock of token expiry.
//! - [`session`]: one task per connection, generic over its transport, an adapter over the node
//!   (parse, authorize, call the node, encode): the loop and its steps (`mod.rs`: timers, client
//!   messages, hub deliveries, the close), dispatch and the channel commands (`commands.rs`), the
//!   connection's identity and token expiry (`connect.rs`, on the [`clock`], so the unit tests
//!   run it on paused time), subscriptions and delivery (`subscriptions.rs`:
//!   client-side and server-side, the pure offset/gap decision; `subs.rs`, the session's map of
//!   them), typed replies and pushes encoded at the edge (`encode.rs`), pings, close codes.
//! - [`auth`]: who a connection is (JWT connection and subscription tokens) and what it may do on a
//!   channel (permissions from `channels[]`).
//! - [`limits`]: publish and subscribe rates (per connection, per client IP, per user), the client
//!   IP behind trusted proxies, and the WebSocket `Origin` allow-list.
//! - [`rules`]: the targets of client publications and `rpc` calls (the writer Lambda or a
//!   webhook), called by the node: the envelope, one delivery with retries and its signature
//!   (`delivery.rs`), the AWS SDK clients (`lambda.rs`), the outcome contract (`outcome.rs`).
//! - [`demo`]: the demo token endpoint (off by default).
//! - [`http`]: the router (WebSocket, `/healthz`, `/readyz`, `/metrics`, and the routes of the
//!   page, the API, the demo and the emulation); `accept.rs`, the accept loop (handshake timeout,
//!   cap on connections not yet WebSockets, socket options, closes that are not overtaken by a
//!   reset, each request's connection metadata); `emulation/`, the HTTP-streaming and SSE
//!   transports (`stream.rs`) and `/emulation` (`command.rs`), adapters onto the same session
//!   loop (the session names its id and node in its typed connect reply).
//! - [`clock`]: Unix time on tokio's clock (token expiry), so tests can pause time.
//! - [`page`]: the chat page at `/` (static files built into the binary).
//! - [`presence`]: channel members on every node behind a small [`presence::PresenceStore`]
//!   (PostgreSQL or in memory: join, leave, members, stats, counts, and a node's members for the
//!   reconciliation); failed leaves retried, members reconciled with the node's sessions. It imports
//!   no other feature.
//! - [`cluster`]: the nodes of a deployment: the heartbeat and node registry (`info`, dead nodes'
//!   members expired), and the cross-node events ([`cluster::ClusterEvent`]: presence joins and
//!   leaves, `disconnect` orders) heard on the node's listener and handed to the hub.
//! - [`api`]: the Centrifugo-compatible HTTP server API (`/api`), an adapter over the node (parse,
//!   call, encode; the key is its authorization).
//! - [`metrics`]: the node's Prometheus registry (`prometheus-client`): typed counters, gauges and
//!   the delivery lag histogram, the values read at scrape time (`scrape.rs`), the `/metrics`
//!   exposition by the crate's encoder.
//! - [`error`]: error types.
//!
//! Data flows one way. Changes: `db` (listener, stream) → `hub` → `session` → socket; cluster
//! events: `db::listener` → `cluster` → `hub` → `session`. Client publishes and calls: `session` /
//! `api` → `node` → `rules` / `db` / `presence` / `cluster`. `config` and `protocol` import
//! no feature.
//!
//! Checked by a script over `use crate::…` paths: no two top-level modules import each other,
//! directly or through others.
//!
//! # Against the architecture review (`shared/reviews/architecture.md`)
//! 1. *No `Node`; session and API each implement publish, history, presence*: gone — [`node`]
//!    owns the operations, the session and the API are adapters; `AppState` is gone.
//! 2. *Config not a leaf*: gone — [`config`] imports only [`error`]; parsed once into ready types.
//!    Every feature takes its sections, never the whole `Config`: the node a `NodeConfig` (client
//!    limits, rules, rpc, mappings, retention), the edge an `EdgeConfig` (client, channels, auth,
//!    api, demo, shutdown grace); only [`run`] and the binary see the whole.
//! 3. *Presence three jobs, owns the session registry*: gone — [`presence`] (a small store: join, leave,
//!    members, stats, counts, a node's members),
//!    [`cluster`] (registry, heartbeat, typed events), the hub indexes sessions by user; join and
//!    leave are their own `hub::Delivery`; the store suite is compiled only for tests
//!    (`test-util`).
//! 4. *Two LISTEN stacks on a second driver, a hand-built TLS layer*: one LISTEN connection per
//!    node ([`db::listener`]), one backoff, typed events. Kept on purpose: tokio-postgres (the
//!    driver the project's owners chose; sqlx's `PgListener` would replace it) and therefore
//!    `db/tls.rs`, the adapter that gives it libpq's `sslmode`/`sslrootcert` meaning from the same
//!    URL as the pool — tokio-postgres has no `verify-*` modes or `sslrootcert`.
//! 5. *A monolithic session, replies spliced as strings*: gone — `session/` generic over its
//!    transport, typed replies and pushes encoded at the edge, a registration guard, unit tests of
//!    the offset/gap/recovery decision and of the loop on paused time (pings, expiry).
//! 6. *Everything `pub`, hand-rolled metrics*: gone — `unreachable_pub` below, `prometheus-client`,
//!    `subtle`, `humantime`, `parking_lot`, `cargo deny`. Kept on purpose: [`backoff`] instead of
//!    `backon` (the review's alternative: one shared policy of a few lines, used by the listener and
//!    the rules; no retry combinators are needed), the token bucket in [`limits`] (the review: fine as
//!    is).
//! 7. *Tests leak databases, bundle scenarios, three harnesses*: gone — test databases are dropped
//!    on panic (a `Drop` guard, as `#[sqlx::test]` does, kept so the same helper also serves the
//!    throwaway `wal_level = logical` clusters), one test per behaviour, a clock seam, one Python
//!    harness (`tests-support/relaytest`), the benchmark in its own crate (`bench/`).

// `pub` is the library's surface (what the binary, the tests, the fuzz targets and the examples
// use); everything else is `pub(crate)`. On the crate, not in `[workspace.lints]`: test support
// modules and the other crates are not converted yet.
#![warn(unreachable_pub)]

pub(crate) mod api;
pub mod auth;
pub(crate) mod backoff;
pub mod capture;
pub(crate) mod clock;
pub mod cluster;
pub mod config;
pub mod db;
pub(crate) mod demo;
mod edge;
pub mod error;
pub(crate) mod http;
pub(crate) mod hub;
pub(crate) mod limits;
pub(crate) mod metrics;
mod node;
pub(crate) mod page;
pub mod presence;
pub(crate) mod rules;
pub mod session;
mod tasks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use edge::Edge;
pub use error::{Error, Result};

use crate::db::stream::{Stream, StreamStatus};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::node::Node;

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
    let node_id = uuid::Uuid::new_v4().to_string();
    let capture_status = Arc::new(capture::CaptureStatus::default());
    let capture_specs = prepare_capture(&pool, &config, &node_id, &capture_status).await?;
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let tasks = tasks::Tasks::new(tracker.clone(), token.clone());
    let grace = config.shutdown_grace();
    let verifier = auth::Verifier::new(&config.auth)?;
    // With a JWKS URL: the first fetch, then a refresh task.
    verifier.start(token.clone(), &tracker).await;
    let config = Arc::new(config);
    let started = start(
        &config,
        Services {
            pool: pool.clone(),
            lambda,
            node_id,
            capture: capture_status,
            capture_specs,
        },
        &verifier,
        &token,
        &tasks,
    )
    .await?;
    let edge = Edge::new(
        started.node,
        edge::EdgeConfig::of(&config),
        verifier,
        token.clone(),
        tracker.clone(),
    );

    tracing::info!(addr = %listener.local_addr()?, "listening");
    let stop = token.clone();
    http::serve(listener, Arc::new(edge), async move {
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
    started.stream_pool.close().await;
    tracing::info!("stopped");
    tasks.panicked().map_or(Ok(()), Err)
}

/// Puts change capture in place before the node serves: in trigger mode, the capture triggers this
/// node needs (returned, to be watched while it runs); in wal mode, the replication slot, so nothing
/// committed from here on is missed.
async fn prepare_capture(
    pool: &sqlx::PgPool,
    config: &Config,
    node_id: &str,
    status: &Arc<capture::CaptureStatus>,
) -> Result<Option<Vec<db::triggers::MappingTriggers>>> {
    capture::prepare(pool, &config.capture, &config.mappings, status).await?;
    if config.capture.mode == capture::CaptureMode::Trigger {
        let owner = db::triggers::Owner {
            node: node_id,
            ttl: db::triggers::owner_ttl(config.stream.capture_check),
        };
        let report = db::triggers::sync(pool, &config.mappings, Some(owner)).await?;
        tracing::info!(installed = ?report.installed, removed = ?report.removed,
            kept_for_other_nodes = ?report.kept, "capture triggers in place");
        return Ok(Some(db::triggers::mapping_triggers(&config.mappings)?));
    }
    db::triggers::check_tables(pool, &config.mappings).await?;
    let slot = status.slot.get().cloned().unwrap_or_default();
    let lock_url = config.database.listen_url().to_owned();
    capture::wal::ensure_started(pool, &lock_url, &slot, status)
        .await
        .map_err(|e| Error::Capture(format!("{e:#}")))?;
    Ok(None)
}

/// What [`start`] builds the node from.
struct Services {
    pool: sqlx::PgPool,
    lambda: rules::LambdaClients,
    node_id: String,
    capture: Arc<capture::CaptureStatus>,
    /// The capture triggers to watch (trigger mode).
    capture_specs: Option<Vec<db::triggers::MappingTriggers>>,
}

/// A node whose tasks run.
struct Started {
    node: Arc<Node>,
    /// The stream's own pool, closed after the tasks.
    stream_pool: sqlx::PgPool,
}

/// Builds the node and starts its tasks on `tasks` (supervised) until `token` is cancelled: the LISTEN
/// connection, the change stream, presence (registered before this returns: a member is visible
/// only while its node is), the capture watch or the wal capture, and retention.
async fn start(
    config: &Arc<Config>,
    services: Services,
    verifier: &auth::Verifier,
    token: &CancellationToken,
    tasks: &tasks::Tasks,
) -> Result<Started> {
    let Services {
        pool,
        lambda,
        node_id,
        capture,
        capture_specs,
    } = services;
    let hub = Arc::new(Hub::new());
    let status = Arc::new(StreamStatus::default());
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
    let listen_url = config.database.listen_url().to_owned();
    // The stream has its own small pool, so sessions' history and recovery reads can never starve the
    // reads every subscriber depends on.
    let stream_pool = small_pool(config)?;
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
    let (store, cluster_store) = presence_stores(config, &pool, &mut pg_listener);
    let presence = Arc::new(presence::Presence::new(
        node_id.clone(),
        config.presence.clone(),
        store,
    ));
    let metrics = Arc::new(Metrics::new(&hub, &status, &capture, verifier));
    let cluster = Arc::new(cluster::Cluster::new(cluster::Parts {
        store: cluster_store,
        ttl: config.presence.node_ttl,
        hub: hub.clone(),
        presence: presence.clone(),
        metrics: metrics.clone(),
    }));
    let node = Arc::new(Node::new(node::Parts {
        config: node::NodeConfig::of(config),
        pool: pool.clone(),
        hub: hub.clone(),
        presence: presence.clone(),
        cluster: cluster.clone(),
        http,
        lambda,
        metrics: metrics.clone(),
        stream: status.clone(),
        capture: capture.clone(),
    }));
    cluster.start().await?;
    tasks.spawn("cluster", cluster.run(token.clone()));
    tasks.spawn("presence", presence.run(token.clone()));
    tasks.spawn("listener", pg_listener.run(token.clone()));
    tasks.spawn("stream", stream.run(token.clone()));
    let watch = CaptureWatch {
        pool,
        specs: capture_specs,
        node: node_id,
        status: status.capture.clone(),
    };
    spawn_capture(config, watch, capture, token, tasks)?;
    let retention = Arc::new(config.retention.clone());
    let retention = db::retention::run(stream_pool.clone(), retention, token.clone());
    tasks.spawn("retention", retention);
    Ok(Started { node, stream_pool })
}

/// The presence store and the cluster store beside it (they share their tables): in PostgreSQL,
/// the cluster hearing its events on the node's LISTEN connection; or both in this process.
fn presence_stores(
    config: &Config,
    pool: &sqlx::PgPool,
    pg_listener: &mut db::listener::Listener,
) -> (
    Arc<dyn presence::PresenceStore>,
    Arc<dyn cluster::ClusterStore>,
) {
    match config.presence.engine {
        presence::Engine::Postgres => (
            Arc::new(presence::pg::PgStore::new(pool.clone())),
            Arc::new(cluster::pg::PgCluster::with_listener(
                pool.clone(),
                pg_listener.subscribe(&[cluster::pg::CHANNEL]),
            )),
        ),
        presence::Engine::Memory => {
            let store = Arc::new(presence::memory::MemoryStore::default());
            (
                store.clone(),
                Arc::new(cluster::memory::MemoryCluster::new(store)),
            )
        }
    }
}

/// What the watch over this node's capture triggers needs (trigger mode: `specs`).
struct CaptureWatch {
    pool: sqlx::PgPool,
    specs: Option<Vec<db::triggers::MappingTriggers>>,
    node: String,
    status: Arc<db::triggers::CaptureStatus>,
}

/// Starts what keeps capture running on this node: the watch over its capture triggers (trigger
/// mode), or the wal capture (a leader among the nodes reads the slot).
fn spawn_capture(
    config: &Config,
    watch: CaptureWatch,
    capture: Arc<capture::CaptureStatus>,
    token: &CancellationToken,
    tasks: &tasks::Tasks,
) -> Result<()> {
    if let Some(specs) = watch.specs {
        tasks.spawn(
            "capture watch",
            db::triggers::watch(
                watch.pool,
                specs,
                watch.node,
                config.stream.capture_check,
                watch.status,
                token.clone(),
            ),
        );
    }
    if config.capture.mode == capture::CaptureMode::Wal {
        let listen_url = config.database.listen_url().to_owned();
        // Its own small pool: the history writes never wait behind the stream's reads.
        let wal = capture::wal::WalCapture {
            pool: small_pool(config)?,
            lock_url: listen_url.clone(),
            replication_url: config.capture.replication_url.clone().unwrap_or(listen_url),
            config: config.capture.clone(),
            mappings: Arc::new(config.mappings.clone()),
            status: capture,
        };
        tasks.spawn("wal capture", wal.run(token.clone()));
    }
    Ok(())
}

/// A pool of two connections on the configured database, for a task that must not wait behind the
/// sessions' queries.
fn small_pool(config: &Config) -> Result<sqlx::PgPool> {
    db::pool(&config::DatabaseConfig {
        pool_size: 2,
        ..config.database.clone()
    })
}
