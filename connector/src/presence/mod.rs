//! Presence: who is subscribed to a channel, on every connector node, with join and leave pushes.
//!
//! A member is a subscription to a channel that has presence (`presence.channels[]` in the
//! configuration): the pair (client id, user) with the connection's `conn_info` (token `info`) and the
//! subscription's `chan_info` (subscription token `info`, or — where the entry allows it — the
//! subscribe request's `data`, as a display name). Members live in PostgreSQL (`relay.presence`,
//! migration 0006), so `presence` and `presence_stats` answer the same on every node, and
//! `presence.channels[].max_members` caps a channel across nodes.
//!
//! When members go:
//! - unsubscribe, or a connection that closes (the client closed it, its process was killed and the OS
//!   reset the socket, the server closed it): at once (the session's end removes its memberships);
//! - a connection whose peer vanished without a FIN (network cut): when the server notices — the pong
//!   deadline (`client.ping_interval_secs` + `client.pong_timeout_secs`, 25 + 10 s by default) or a
//!   failed write;
//! - a leave that failed (pool timeout, database blip): retried every second, and at the latest
//!   removed by the node's reconciliation of its members with its live sessions
//!   (`presence.reconcile_interval_secs`);
//! - a node that died (SIGKILL, lost host): its heartbeat (every `node_ttl_secs` / 3) stops, its members
//!   drop out of presence after `presence.node_ttl_secs` (default 15 s) and the next heartbeat of any
//!   node announces their leave.
//!
//! Join and leave events travel to every node by `pg_notify('relay_presence')` from the transaction
//! that changes the table. Each node keeps one LISTEN connection for them and pushes `join` / `leave`
//! to its subscribers that asked for them (`join_leave` in subscribe, allowed by the channel's entry).
//! Like Centrifugo's, these pushes are best-effort: while a node's LISTEN connection is down it misses
//! events; presence queries stay exact. The same notification channel carries the server API's
//! `disconnect` orders.
//!
//! The store is a seam ([`PresenceStore`]): [`pg::PgStore`] (the default, shared by every node) and
//! [`memory::MemoryStore`] (one process; `presence.engine = "memory"`), which pass one test suite
//! ([`conformance`]). [`Presence`] is the node's side: its sessions (for `disconnect` orders), its
//! members (registered again if its heartbeat ever lapsed), the heartbeat and the event task.

pub mod conformance;
pub mod memory;
pub mod pg;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::hub::Hub;
use crate::metrics::Metrics;

pub use crate::config::{Engine, PresenceConfig, PresenceRule};

/// Leaves removed per store call when retrying or reconciling.
const LEAVE_BATCH: usize = 500;

/// Most failed leaves kept for a retry; beyond it, the reconciliation removes them.
const MAX_RETRY_LEAVES: usize = 100_000;

/// A member of a channel's presence.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// The user ("" when anonymous).
    pub user: String,
    /// The connection's client id.
    pub client: String,
    /// Connection info.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Arc<RawValue>>,
    /// Channel info.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Arc<RawValue>>,
}

impl Member {
    /// The member as a `ClientInfo` JSON value.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The member as the protocol's `ClientInfo` (for join/leave pushes and presence replies).
    pub fn client_info(&self) -> relay_protocol::reply::ClientInfo {
        relay_protocol::reply::ClientInfo {
            user: self.user.clone(),
            client: self.client.clone(),
            conn_info: self.conn_info.as_deref().map(ToOwned::to_owned),
            chan_info: self.chan_info.as_deref().map(ToOwned::to_owned),
        }
    }
}

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

/// What a session gives presence so that a `disconnect` order can reach it.
#[derive(Debug, Default)]
pub struct Kick {
    token: CancellationToken,
    advice: Mutex<Option<(u16, String)>>,
}

impl Kick {
    /// Completes when the connection is ordered closed.
    pub async fn kicked(&self) {
        self.token.cancelled().await;
    }

    /// The close code and reason of the order.
    pub fn advice(&self) -> (u16, String) {
        self.advice
            .lock()
            .clone()
            .unwrap_or((3503, "force disconnect".to_owned()))
    }

    fn fire(&self, code: u16, reason: String) {
        *self.advice.lock() = Some((code, reason));
        self.token.cancel();
    }
}

/// A join, leave or disconnect order, as every node receives it.
#[derive(Debug, Clone)]
pub enum Event {
    /// `info` joined `channel`.
    Join {
        /// The channel.
        channel: String,
        /// Who.
        info: Member,
    },
    /// `info` left `channel`.
    Leave {
        /// The channel.
        channel: String,
        /// Who.
        info: Member,
    },
    /// Close connections of a user.
    Disconnect(DisconnectOrder),
}

/// One membership to add.
#[derive(Debug, Clone, Copy)]
pub struct Join<'a> {
    /// The channel.
    pub channel: &'a str,
    /// The member.
    pub member: &'a Member,
    /// The node serving the member's connection.
    pub node: &'a str,
    /// The membership id (a later leave names it).
    pub id: &'a str,
    /// Refuse when the channel has this many other live members (0: no cap).
    pub max_members: u32,
    /// Send a join event.
    pub announce: bool,
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

/// Where presence lives. Every method is one atomic step; events (join, leave, disconnect) reach
/// every node's [`PresenceStore::listen`] sink.
pub trait PresenceStore: Send + Sync + std::fmt::Debug {
    /// Adds or renews a membership; `false` when the channel is full (`max_members`).
    fn join<'a>(&'a self, join: Join<'a>) -> BoxFuture<'a, Result<bool>>;
    /// Removes the membership `(channel, id)` of `client`, or all of its memberships (`None`),
    /// announcing each leave. An id that is no longer current removes nothing.
    fn leave<'a>(
        &'a self,
        client: &'a str,
        membership: Option<(&'a str, &'a str)>,
    ) -> BoxFuture<'a, Result<()>>;
    /// [`PresenceStore::leave`] for many at once (a store may do it in a few statements); on an
    /// error, some may have been removed (removing again is harmless).
    fn leave_many<'a>(&'a self, leaves: &'a [FailedLeave]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            for (client, membership) in leaves {
                let m = membership.as_ref().map(|(c, i)| (c.as_str(), i.as_str()));
                self.leave(client, m).await?;
            }
            Ok(())
        })
    }
    /// The memberships `(channel, client, membership id)` the store holds for `node`.
    fn node_members<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String, String)>>>;
    /// Deregisters a node and removes its members (leaves announced).
    fn remove_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<()>>;
    /// The live members of `channel`, in join order.
    fn members<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>>>;
    /// (members, distinct users) of `channel`.
    fn stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(u64, u64)>>;
    /// Live members per channel.
    fn channel_counts(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>>>;
    /// Registers or renews a node for `ttl`; `true` when it was not registered (first beat, or it
    /// had expired).
    fn heartbeat<'a>(&'a self, node: &'a NodeInfo, ttl: Duration) -> BoxFuture<'a, Result<bool>>;
    /// Removes expired nodes and the members of nodes that are gone (leaves announced); how many.
    fn expire(&self) -> BoxFuture<'_, Result<u64>>;
    /// The live nodes (`info` objects).
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Value>>>;
    /// Sends a disconnect order to every node.
    fn disconnect<'a>(&'a self, order: &'a DisconnectOrder) -> BoxFuture<'a, Result<()>>;
    /// Delivers every event to `sink` until `shutdown`.
    fn listen(
        self: Arc<Self>,
        sink: mpsc::UnboundedSender<Event>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}

/// A node as the server API's `info` shows it.
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

/// Marks a (channel, client) as joining while it lives.
struct Joining<'a> {
    map: &'a Mutex<HashMap<(String, String), usize>>,
    key: (String, String),
}

impl<'a> Joining<'a> {
    fn new(map: &'a Mutex<HashMap<(String, String), usize>>, key: (String, String)) -> Self {
        *map.lock().entry(key.clone()).or_default() += 1;
        Self { map, key }
    }
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// A leave: the client, and one (channel, membership id) or all of its memberships.
pub type FailedLeave = (String, Option<(String, String)>);

struct LocalSession {
    user: String,
    kick: Arc<Kick>,
}

struct LocalMember {
    member: Member,
    id: String,
    announce: bool,
}

/// This node's presence: its id, the store, the sessions and members it serves.
pub struct Presence {
    /// This node's id (a new one per process).
    pub node: String,
    config: PresenceConfig,
    store: Arc<dyn PresenceStore>,
    sessions: Mutex<HashMap<String, LocalSession>>,
    members: Mutex<HashMap<(String, String), LocalMember>>,
    /// (channel, client) of joins on their way (in the store, not yet in `members`).
    joining: Mutex<HashMap<(String, String), usize>>,
    /// Leaves that failed, retried every second: (client, one membership or all).
    retry: Mutex<Vec<FailedLeave>>,
    started: std::time::Instant,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("node", &self.node)
            .field("store", &self.store)
            .finish()
    }
}

/// Why a join did not happen.
#[derive(Debug)]
pub enum JoinError {
    /// The channel has `max_members` members.
    Full,
    /// The store failed.
    Store(crate::Error),
}

impl Presence {
    /// Presence for a new node, on `store`.
    pub fn new(config: PresenceConfig, store: Arc<dyn PresenceStore>) -> Self {
        Self {
            node: uuid::Uuid::new_v4().to_string(),
            config,
            store,
            sessions: Mutex::default(),
            members: Mutex::default(),
            joining: Mutex::default(),
            retry: Mutex::default(),
            started: std::time::Instant::now(),
        }
    }

    /// The store.
    pub fn store(&self) -> &dyn PresenceStore {
        &*self.store
    }

    /// The presence entry of `channel` (None: no presence there).
    pub fn rule_for(&self, channel: &str) -> Option<&PresenceRule> {
        self.config.rule_for(channel)
    }

    /// Registers a connected session, so `disconnect` orders can reach it.
    pub fn register_session(&self, client: &str, user: &str) -> Arc<Kick> {
        let kick = Arc::new(Kick::default());
        self.sessions.lock().insert(
            client.to_owned(),
            LocalSession {
                user: user.to_owned(),
                kick: kick.clone(),
            },
        );
        kick
    }

    /// Forgets a session and removes its memberships everywhere (leaves announced). During shutdown
    /// (`bulk`), the store's rows are left to the node's deregistration, one step for all.
    pub async fn end_session(&self, client: &str, bulk: bool) {
        self.sessions.lock().remove(client);
        let had = {
            let mut members = self.members.lock();
            let before = members.len();
            members.retain(|(_, c), _| c != client);
            before != members.len()
        };
        if had
            && !bulk
            && let Err(e) = self.store.leave(client, None).await
        {
            tracing::warn!(error = %e, client, "presence: leave at close failed (retried)");
            self.retry_later(client, None);
        }
    }

    /// Keeps a failed leave for the retry task (bounded: past the bound the reconciliation removes it).
    fn retry_later(&self, client: &str, membership: Option<(&str, &str)>) {
        let mut retry = self.retry.lock();
        if retry.len() < MAX_RETRY_LEAVES {
            retry.push((
                client.to_owned(),
                membership.map(|(c, i)| (c.to_owned(), i.to_owned())),
            ));
        }
    }

    /// Retries the failed leaves once, in batches; those that fail again stay for the next round.
    async fn retry_leaves(&self) {
        let batch = std::mem::take(&mut *self.retry.lock());
        if batch.is_empty() {
            return;
        }
        let mut failed = 0usize;
        for chunk in batch.chunks(LEAVE_BATCH) {
            if self.store.leave_many(chunk).await.is_err() {
                failed += chunk.len();
                for (client, m) in chunk {
                    self.retry_later(client, m.as_ref().map(|(c, i)| (c.as_str(), i.as_str())));
                }
            }
        }
        if failed > 0 {
            tracing::warn!(
                failed,
                "presence: leaves failed again (retried in a second)"
            );
        }
    }

    /// Makes the store's members of this node match its live sessions: memberships the store has
    /// and no session holds (failed leaves) are removed, leaves announced; memberships a session holds
    /// and the store lost are put back. Returns (removed, restored).
    pub async fn reconcile(&self) -> Result<(usize, usize)> {
        // Members held before the store is read: their joins had committed, so one the store does not
        // have was lost (a join that commits during the read is not in this snapshot).
        let before: Vec<(String, Member, String, bool)> = self
            .members
            .lock()
            .iter()
            .map(|((ch, _), m)| (ch.clone(), m.member.clone(), m.id.clone(), m.announce))
            .collect();
        let stored = self.store.node_members(&self.node).await?;
        let stored_keys: std::collections::HashSet<(&str, &str)> = stored
            .iter()
            .map(|(ch, cl, _)| (ch.as_str(), cl.as_str()))
            .collect();
        let missing: Vec<(String, Member, String, bool)> = before
            .into_iter()
            .filter(|(ch, m, _, _)| !stored_keys.contains(&(ch.as_str(), m.client.as_str())))
            .collect();
        // Rows the store has that no session holds now (read after the store: a join on its way is
        // in `joining`, a finished one in `members`).
        let ghosts: Vec<(String, String, String)> = {
            let members = self.members.lock();
            let joining = self.joining.lock();
            stored
                .iter()
                .filter(|(ch, cl, id)| {
                    let key = (ch.clone(), cl.clone());
                    !joining.contains_key(&key) && members.get(&key).is_none_or(|m| &m.id != id)
                })
                .cloned()
                .collect()
        };
        let leaves: Vec<FailedLeave> = ghosts
            .iter()
            .map(|(channel, client, id)| (client.clone(), Some((channel.clone(), id.clone()))))
            .collect();
        for chunk in leaves.chunks(LEAVE_BATCH) {
            self.store.leave_many(chunk).await?;
        }
        for (channel, member, id, announce) in &missing {
            // Only if the session still holds it (it may have left meanwhile).
            let current = self
                .members
                .lock()
                .get(&(channel.clone(), member.client.clone()))
                .is_some_and(|m| &m.id == id);
            if current {
                self.store
                    .join(Join {
                        channel,
                        member,
                        node: &self.node,
                        id,
                        max_members: 0,
                        announce: *announce,
                    })
                    .await?;
            }
        }
        Ok((ghosts.len(), missing.len()))
    }

    /// Adds `member` to `channel`'s presence; returns the membership id (for [`Presence::leave`]).
    pub async fn join(
        &self,
        channel: &str,
        member: Member,
        announce: bool,
    ) -> std::result::Result<String, JoinError> {
        let max_members = self.rule_for(channel).map_or(0, |r| r.max_members);
        let id = uuid::Uuid::new_v4().to_string();
        let key = (channel.to_owned(), member.client.clone());
        // Marked as joining until the membership is in `members` (also if this future is dropped).
        let _joining = Joining::new(&self.joining, key.clone());
        let joined = self
            .join_store(channel, &member, &id, max_members, announce)
            .await;
        if let Ok(true) = joined {
            self.members.lock().insert(
                key.clone(),
                LocalMember {
                    member,
                    id: id.clone(),
                    announce,
                },
            );
        }
        match joined {
            Ok(true) => Ok(id),
            Ok(false) => Err(JoinError::Full),
            Err(e) => Err(JoinError::Store(e)),
        }
    }

    async fn join_store(
        &self,
        channel: &str,
        member: &Member,
        id: &str,
        max_members: u32,
        announce: bool,
    ) -> Result<bool> {
        self.store
            .join(Join {
                channel,
                member,
                node: &self.node,
                id,
                max_members,
                announce,
            })
            .await
    }

    /// Removes one membership (a late call for an older membership of the same pair removes nothing).
    pub async fn leave(&self, channel: &str, client: &str, id: &str) {
        {
            let mut members = self.members.lock();
            let key = (channel.to_owned(), client.to_owned());
            if members.get(&key).is_some_and(|m| m.id == id) {
                members.remove(&key);
            }
        }
        if let Err(e) = self.store.leave(client, Some((channel, id))).await {
            tracing::warn!(error = %e, client, channel, "presence: leave failed (retried)");
            self.retry_later(client, Some((channel, id)));
        }
    }

    /// Members of `channel` on every live node, as its presence entry lists them: one per user
    /// where `per_user` is set, at most `max_listed`, oldest first.
    pub async fn members(&self, channel: &str) -> Result<Vec<Member>> {
        let members = self.store.members(channel).await?;
        Ok(match self.rule_for(channel) {
            Some(rule) => listed(members, rule.per_user, rule.max_listed as usize),
            None => members,
        })
    }

    /// (clients, distinct users) of `channel` on every live node.
    pub async fn stats(&self, channel: &str) -> Result<(u64, u64)> {
        self.store.stats(channel).await
    }

    /// Live presence members per channel, on every node.
    pub async fn channel_counts(&self) -> Result<Vec<(String, u64)>> {
        self.store.channel_counts().await
    }

    /// The live nodes, as the server API's `info` shows them.
    pub async fn nodes(&self) -> Result<Vec<Value>> {
        self.store.nodes().await
    }

    /// Sends a disconnect order to every node (this one included).
    pub async fn disconnect(&self, order: &DisconnectOrder) -> Result<()> {
        self.store.disconnect(order).await
    }

    /// Presence memberships held by this node's sessions.
    pub fn local_members(&self) -> usize {
        self.members.lock().len()
    }

    /// Users of the sessions on this node.
    fn local_users(&self) -> usize {
        let sessions = self.sessions.lock();
        let users: std::collections::HashSet<&str> =
            sessions.values().map(|s| s.user.as_str()).collect();
        users.len()
    }

    /// Carries out a disconnect order on this node's sessions.
    fn apply_disconnect(&self, order: &DisconnectOrder) -> usize {
        let sessions = self.sessions.lock();
        let mut n = 0;
        for (client, s) in sessions.iter() {
            if s.user == order.user
                && order.client.as_ref().is_none_or(|c| c == client)
                && !order.whitelist.contains(client)
            {
                s.kick.fire(
                    u16::try_from(order.code).unwrap_or(3503),
                    order.reason.clone(),
                );
                n += 1;
            }
        }
        n
    }

    /// Writes this node's heartbeat; when it had lapsed (the node was stalled longer than its TTL and
    /// others removed its members), puts its members back; then expires dead nodes.
    async fn heartbeat(&self, hub: &Hub, metrics: &Metrics) -> Result<()> {
        let info = NodeInfo {
            id: self.node.clone(),
            name: node_name(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            stats: json!({
                "num_clients": metrics.connections.get(),
                "num_subs": hub.subscription_count(),
                "num_channels": hub.channel_count(),
                "num_users": self.local_users(),
                "uptime": self.started.elapsed().as_secs(),
            }),
        };
        let ttl = self.config.node_ttl;
        if self.store.heartbeat(&info, ttl).await? {
            let again: Vec<(String, Member, String, bool)> = self
                .members
                .lock()
                .iter()
                .map(|((c, _), m)| (c.clone(), m.member.clone(), m.id.clone(), m.announce))
                .collect();
            if !again.is_empty() {
                tracing::warn!(
                    members = again.len(),
                    "presence: this node's heartbeat had lapsed; members registered again"
                );
            }
            for (channel, member, id, announce) in again {
                self.store
                    .join(Join {
                        channel: &channel,
                        member: &member,
                        node: &self.node,
                        id: &id,
                        max_members: 0,
                        announce,
                    })
                    .await?;
            }
        }
        let gone = self.store.expire().await?;
        if gone > 0 {
            tracing::info!(members = gone, "presence: members of expired nodes removed");
        }
        Ok(())
    }

    /// Registers the node before it serves (its members are only visible while it is registered).
    pub async fn start(&self, hub: &Hub, metrics: &Metrics) -> Result<()> {
        self.heartbeat(hub, metrics).await
    }

    /// Heartbeats and hands events (join/leave pushes, disconnect orders) to this node's sessions
    /// until `shutdown`; then removes the node and its remaining members. `hub` receives the
    /// join/leave pushes; it and `metrics` give the counts of the heartbeat.
    pub async fn run(
        self: Arc<Self>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let (sink, events) = mpsc::unbounded_channel();
        let listen = self.store.clone().listen(sink, shutdown.clone());
        tokio::join!(
            self.beat(&hub, &metrics, &shutdown),
            listen,
            self.hand_out(&hub, events, &shutdown),
            self.repair(&shutdown),
        );
        // Leaving: this node's members go now rather than after the TTL.
        match tokio::time::timeout(Duration::from_secs(3), self.store.remove_node(&self.node)).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "presence: could not deregister the node"),
            Err(_) => tracing::warn!("presence: deregistering the node timed out"),
        }
    }

    /// Heartbeats every `node_ttl` / 3 until `shutdown`.
    async fn beat(&self, hub: &Hub, metrics: &Metrics, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.config.node_ttl.div_f64(3.0));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.heartbeat(hub, metrics).await {
                tracing::warn!(error = %e, "presence heartbeat failed");
            }
        }
    }

    /// Hands events to this node: join/leave pushes to the hub, disconnect orders to the sessions.
    async fn hand_out(
        &self,
        hub: &Hub,
        mut events: mpsc::UnboundedReceiver<Event>,
        shutdown: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(e) => self.handle_event(hub, e),
                    None => break,
                },
            }
        }
    }

    /// Retries failed leaves every second, and reconciles the members every
    /// `reconcile_interval_secs`, until `shutdown`.
    async fn repair(&self, shutdown: &CancellationToken) {
        let reconcile_every = self.config.reconcile_interval;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_reconcile = tokio::time::Instant::now() + reconcile_every;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.retry_leaves().await;
            if tokio::time::Instant::now() >= next_reconcile {
                next_reconcile = tokio::time::Instant::now() + reconcile_every;
                match self.reconcile().await {
                    Ok((0, 0)) => {}
                    Ok((removed, restored)) => tracing::info!(
                        removed,
                        restored,
                        "presence: reconciled this node's members with its sessions"
                    ),
                    Err(e) => tracing::warn!(error = %e, "presence: reconciliation failed"),
                }
            }
        }
    }
}

fn node_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "connector".to_owned())
}

impl Presence {
    fn handle_event(&self, hub: &Hub, event: Event) {
        match event {
            Event::Join { channel, info } => push(hub, &channel, crate::hub::Presence::Join, &info),
            Event::Leave { channel, info } => {
                push(hub, &channel, crate::hub::Presence::Leave, &info)
            }
            Event::Disconnect(order) => {
                let n = self.apply_disconnect(&order);
                if n > 0 {
                    tracing::info!(user = %order.user, connections = n, "disconnected by the server API");
                }
            }
        }
    }
}

/// Hands a `join` / `leave` push to the channel's subscribers on this node.
fn push(hub: &Hub, channel: &str, kind: crate::hub::Presence, info: &Member) {
    if hub.has_subscribers(channel) {
        hub.push_join_leave(channel, kind, &info.client_info());
    }
}

/// The members a `presence` answer lists: one per user (its oldest connection; anonymous members
/// are each their own) when `per_user`, at most `max`.
fn listed(members: Vec<Member>, per_user: bool, max: usize) -> Vec<Member> {
    let mut seen = std::collections::HashSet::new();
    members
        .into_iter()
        .filter(|m| !per_user || m.user.is_empty() || seen.insert(m.user.clone()))
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_validation() {
        let c: PresenceConfig = serde_json::from_str(
            r#"{"channels":[{"channel":"chat:*","max_members":2},{"channel":"incoming-chat","info_from_subscribe_data":true}]}"#,
        )
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.rule_for("chat:1").unwrap().max_members, 2);
        assert!(c.rule_for("chat:1").unwrap().join_leave);
        assert!(
            c.rule_for("incoming-chat")
                .unwrap()
                .info_from_subscribe_data
        );
        assert!(c.rule_for("other").is_none());
        let bad: PresenceConfig = serde_json::from_str(r#"{"node_ttl_secs":1}"#).unwrap();
        assert_eq!(bad.validate().unwrap_err().field, "presence.node_ttl_secs");
        assert!(serde_json::from_str::<PresenceConfig>(r#"{"chanels":[]}"#).is_err());
    }

    #[test]
    fn kicks_carry_their_advice() {
        let p = Presence::new(
            PresenceConfig::default(),
            Arc::new(memory::MemoryStore::default()),
        );
        let a = p.register_session("c1", "alice");
        let b = p.register_session("c2", "alice");
        let c = p.register_session("c3", "bob");
        let n = p.apply_disconnect(&DisconnectOrder {
            user: "alice".into(),
            client: None,
            whitelist: vec!["c2".into()],
            code: 4000,
            reason: "bye".into(),
        });
        assert_eq!(n, 1);
        assert!(a.token.is_cancelled() && !b.token.is_cancelled() && !c.token.is_cancelled());
        assert_eq!(a.advice(), (4000, "bye".to_owned()));
    }
}
