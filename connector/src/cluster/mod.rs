//! The cluster: the nodes of a deployment, and what one node tells the others.
//!
//! - The node registry: every node heartbeats (every `presence.node_ttl_secs` / 3) into a shared
//!   table with its counts (the server API's `info` lists the live ones). A node that stops (SIGKILL,
//!   lost host) expires after `presence.node_ttl_secs`; the next heartbeat of any node removes it
//!   and its presence members, announcing their leaves. A node whose own heartbeat had lapsed puts
//!   its members back (`Presence::rejoin`). On shutdown a node deregisters, taking its members
//!   with it at once.
//! - Cross-node events ([`ClusterEvent`]): presence joins and leaves (announced by the presence
//!   store), and the server API's `disconnect` orders. This node hands joins and leaves to the hub as
//!   `join` / `leave` pushes, and disconnect orders to the hub, which closes the sessions they name.
//!   Like Centrifugo's, join/leave pushes are best-effort: while a node's LISTEN connection is down
//!   it misses events (presence queries stay exact).
//!
//! The registry and the event bus sit behind one seam ([`ClusterStore`]): [`pg::PgCluster`]
//! (`relay.nodes` and `pg_notify('relay_presence')`, heard on the node's LISTEN connection) and
//! [`memory::MemoryCluster`] (one process, over the in-memory presence store).

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod memory;
pub mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::hub::{Hub, JoinLeave};
use crate::metrics::Metrics;
use crate::presence::{Announcement, Member, Presence};

/// A server-API order to close connections of a user, carried to every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisconnectOrder {
    /// The user whose connections close.
    pub user: String,
    /// Only this connection, if set.
    pub client: Option<String>,
    /// Connections kept.
    pub whitelist: Vec<String>,
    /// Close code (3000–4999).
    pub code: u32,
    /// Close reason.
    pub reason: String,
}

/// What one node tells every node (itself included).
#[derive(Debug, Clone)]
pub enum ClusterEvent {
    /// A presence join or leave (announced by the presence store).
    Presence(Announcement),
    /// Close connections of a user.
    Disconnect(DisconnectOrder),
}

/// A node's heartbeat record.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node id.
    pub id: String,
    /// Host name.
    pub name: String,
    /// Connector version.
    pub version: String,
    /// Counts shown by the server API's `info`.
    pub stats: Value,
}

impl NodeInfo {
    /// The node as the server API's `info` shows it.
    pub fn to_json(&self) -> Value {
        node_json(
            &self.id,
            &self.name,
            &self.version,
            Some(self.stats.clone()),
        )
    }
}

/// A node as the server API's `info` shows it: its counts with its id, name and version.
fn node_json(uid: &str, name: &str, version: &str, stats: Option<Value>) -> Value {
    let mut v = match stats {
        Some(v @ Value::Object(_)) => v,
        _ => json!({}),
    };
    v["uid"] = json!(uid);
    v["name"] = json!(name);
    v["version"] = json!(version);
    v
}

/// Where the node registry lives and how events reach every node. Every method is one atomic step.
pub trait ClusterStore: Send + Sync + std::fmt::Debug {
    /// Registers or renews a node for `ttl`; `true` when it was not registered (first beat, or it
    /// had expired).
    fn heartbeat<'a>(&'a self, node: &'a NodeInfo, ttl: Duration) -> BoxFuture<'a, Result<bool>>;
    /// Removes expired nodes and the presence members of nodes that are gone (leaves announced);
    /// how many members.
    fn expire(&self) -> BoxFuture<'_, Result<u64>>;
    /// The live nodes (`info` objects).
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Value>>>;
    /// Deregisters a node and removes its presence members (leaves announced).
    fn remove_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Sends a disconnect order to every node.
    fn disconnect<'a>(&'a self, order: &'a DisconnectOrder) -> BoxFuture<'a, Result<()>>;
    /// Delivers every event (joins, leaves, disconnect orders) to `sink` until `shutdown`.
    fn listen(
        self: Arc<Self>,
        sink: mpsc::UnboundedSender<ClusterEvent>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}

/// This node in the cluster: its registration, and the events it hands to its hub.
#[derive(Debug)]
pub struct Cluster {
    /// This node's id.
    node: String,
    /// How long a heartbeat keeps the node registered.
    ttl: Duration,
    store: Arc<dyn ClusterStore>,
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    started: Instant,
}

/// What a [`Cluster`] is built from.
#[derive(Debug)]
pub struct Parts {
    /// The registry and event bus.
    pub store: Arc<dyn ClusterStore>,
    /// How long a heartbeat keeps the node registered (`presence.node_ttl_secs`).
    pub ttl: Duration,
    /// Where join/leave pushes and disconnect orders go.
    pub hub: Arc<Hub>,
    /// This node's presence (its id, its members put back after a lapse).
    pub presence: Arc<Presence>,
    /// The connection count of the heartbeat.
    pub metrics: Arc<Metrics>,
}

impl Cluster {
    /// This node's side of the cluster.
    pub fn new(parts: Parts) -> Self {
        Self {
            node: parts.presence.node().to_owned(),
            ttl: parts.ttl,
            store: parts.store,
            hub: parts.hub,
            presence: parts.presence,
            metrics: parts.metrics,
            started: Instant::now(),
        }
    }

    /// The live nodes, as the server API's `info` shows them.
    pub async fn nodes(&self) -> Result<Vec<Value>> {
        self.store.nodes().await
    }

    /// Sends a disconnect order to every node (this one included).
    pub async fn disconnect(&self, order: &DisconnectOrder) -> Result<()> {
        self.store.disconnect(order).await
    }

    /// Registers the node before it serves (its members are only visible while it is registered).
    pub async fn start(&self) -> Result<()> {
        self.heartbeat().await
    }

    /// Heartbeats and hands events to this node's hub until `shutdown`; then removes the node and
    /// its remaining presence members.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (sink, events) = mpsc::unbounded_channel();
        let listen = self.store.clone().listen(sink, shutdown.clone());
        tokio::join!(
            self.beat(&shutdown),
            listen,
            self.hand_out(events, &shutdown)
        );
        // Leaving: this node's members go now rather than after the TTL.
        match tokio::time::timeout(Duration::from_secs(3), self.store.remove_node(&self.node)).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cluster: could not deregister the node"),
            Err(_) => tracing::warn!("cluster: deregistering the node timed out"),
        }
    }

    /// Writes this node's heartbeat; when it had lapsed (the node was stalled longer than its TTL and
    /// others removed its members), puts its members back; then expires dead nodes.
    async fn heartbeat(&self) -> Result<()> {
        let info = NodeInfo {
            id: self.node.clone(),
            name: node_name(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            stats: json!({
                "num_clients": self.metrics.connections.get(),
                "num_subs": self.hub.subscription_count(),
                "num_channels": self.hub.channel_count(),
                "num_users": self.hub.user_count(),
                "uptime": self.started.elapsed().as_secs(),
            }),
        };
        if self.store.heartbeat(&info, self.ttl).await? {
            self.presence.rejoin().await?;
        }
        let gone = self.store.expire().await?;
        if gone > 0 {
            tracing::info!(members = gone, "presence: members of expired nodes removed");
        }
        Ok(())
    }

    /// Heartbeats every `ttl` / 3 until `shutdown`.
    async fn beat(&self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.ttl.div_f64(3.0));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.heartbeat().await {
                tracing::warn!(error = %e, "cluster heartbeat failed");
            }
        }
    }

    /// Hands events to this node's hub until `shutdown`.
    async fn hand_out(
        &self,
        mut events: mpsc::UnboundedReceiver<ClusterEvent>,
        shutdown: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(e) => self.handle(e),
                    None => break,
                },
            }
        }
    }

    /// Join/leave pushes to the channel's subscribers on this node; disconnect orders to the
    /// sessions they name.
    fn handle(&self, event: ClusterEvent) {
        match event {
            ClusterEvent::Presence(Announcement::Join { channel, member }) => {
                self.push(&channel, JoinLeave::Join, &member);
            }
            ClusterEvent::Presence(Announcement::Leave { channel, member }) => {
                self.push(&channel, JoinLeave::Leave, &member);
            }
            ClusterEvent::Disconnect(order) => {
                let advice = (
                    u16::try_from(order.code).unwrap_or(3503),
                    order.reason.clone(),
                );
                let n = self.hub.disconnect(
                    &order.user,
                    order.client.as_deref(),
                    &order.whitelist,
                    &advice,
                );
                if n > 0 {
                    tracing::info!(user = %order.user, connections = n, "disconnected by the server API");
                }
            }
        }
    }
}

impl Cluster {
    /// Hands a `join` / `leave` push to the channel's subscribers on this node.
    fn push(&self, channel: &str, kind: JoinLeave, member: &Member) {
        if self.hub.has_subscribers(channel) {
            self.hub
                .push_join_leave(channel, kind, &member.client_info());
        }
    }
}

fn node_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "connector".to_owned())
}
