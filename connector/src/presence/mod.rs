//! Presence: who is subscribed to a channel, on every connector node.
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
//! - a node that died (SIGKILL, lost host): its members are visible only while its heartbeat is fresh
//!   (`cluster` keeps the node registry), so they drop out after `presence.node_ttl_secs`.
//!
//! A join or leave with `announce` makes the store tell every node (the PostgreSQL store by
//! `pg_notify('relay_presence')` from the transaction that changes the table); `cluster`
//! hears it and hands the `join` / `leave` push to the hub. Presence knows neither the hub nor the
//! sessions: a session's memberships come and go through the node.
//!
//! The store is a seam ([`PresenceStore`]): [`pg::PgStore`] (the default, shared by every node) and
//! [`memory::MemoryStore`] (one process; `presence.engine = "memory"`), which pass one test suite
//! together with their cluster stores (`cluster::conformance`, built for tests and the `test-util`
//! feature). [`Presence`] is the node's side: the
//! members its sessions hold (registered again if they were lost), failed leaves retried, and the
//! reconciliation.

pub mod memory;
pub mod pg;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

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

/// A join or leave a store announces to every node (the PostgreSQL store by
/// `pg_notify('relay_presence')`, the in-memory one to its listeners).
#[derive(Debug, Clone)]
pub enum Announcement {
    /// `member` joined `channel`.
    Join {
        /// The channel.
        channel: String,
        /// Who.
        member: Member,
    },
    /// `member` left `channel`.
    Leave {
        /// The channel.
        channel: String,
        /// Who.
        member: Member,
    },
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
    /// Tell every node (a join push).
    pub announce: bool,
}

/// Where presence lives. Every method is one atomic step; joins with `announce` and leaves are
/// announced to every node (how is the store's: see [`pg`] and [`memory`]).
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
    /// The memberships `(channel, client, membership id)` the store holds for `node` (for the
    /// reconciliation).
    fn node_members<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String, String)>>>;
    /// The live members of `channel` (those of nodes whose heartbeat is fresh), in join order.
    fn members<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>>>;
    /// (members, distinct users) of `channel`.
    fn stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(u64, u64)>>;
    /// Live members per channel.
    fn channel_counts(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>>>;
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

struct LocalMember {
    member: Member,
    id: String,
    announce: bool,
}

/// This node's presence: its id, the store, the members its sessions hold.
pub struct Presence {
    /// This node's id (its members are stored under it).
    node: String,
    config: PresenceConfig,
    store: Arc<dyn PresenceStore>,
    members: Mutex<HashMap<(String, String), LocalMember>>,
    /// (channel, client) of joins on their way (in the store, not yet in `members`).
    joining: Mutex<HashMap<(String, String), usize>>,
    /// Leaves that failed, retried every second: (client, one membership or all).
    retry: Mutex<Vec<FailedLeave>>,
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
    /// Presence for the node `node`, on `store`.
    pub fn new(node: String, config: PresenceConfig, store: Arc<dyn PresenceStore>) -> Self {
        Self {
            node,
            config,
            store,
            members: Mutex::default(),
            joining: Mutex::default(),
            retry: Mutex::default(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The presence entry of `channel` (None: no presence there).
    pub fn rule_for(&self, channel: &str) -> Option<&PresenceRule> {
        self.config.rule_for(channel)
    }

    /// Removes every membership of a connection that ended, everywhere (leaves announced). During
    /// shutdown (`bulk`), the store's rows are left to the node's deregistration, one step for all.
    pub async fn leave_all(&self, client: &str, bulk: bool) {
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

    /// Presence memberships held by this node's sessions.
    pub fn local_members(&self) -> usize {
        self.members.lock().len()
    }

    /// Puts every membership of this node's sessions back in the store, each announced as its first
    /// join was (after the node's heartbeat had lapsed and other nodes removed its members).
    pub(crate) async fn rejoin(&self) -> Result<()> {
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
        Ok(())
    }

    /// Retries failed leaves every second, and reconciles the members every
    /// `reconcile_interval_secs`, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
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

    #[tokio::test]
    async fn a_connection_s_end_removes_its_memberships() {
        let store = Arc::new(memory::MemoryStore::default());
        store.heartbeat("n1", Value::Null, Duration::from_secs(60));
        let p = Presence::new("n1".into(), PresenceConfig::default(), store.clone());
        let member = |client: &str| Member {
            user: "alice".into(),
            client: client.into(),
            conn_info: None,
            chan_info: None,
        };
        assert!(p.join("ch", member("c1"), false).await.is_ok());
        assert!(p.join("ch", member("c2"), false).await.is_ok());
        assert_eq!(p.local_members(), 2);
        p.leave_all("c1", false).await;
        assert_eq!(p.local_members(), 1);
        assert_eq!(p.stats("ch").await.ok(), Some((1, 1)));
    }
}
