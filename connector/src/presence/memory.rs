//! The in-memory presence store (`presence.engine = "memory"`): one process only, no database
//! writes per subscription. For a single node (development, a one-box deployment) — with several
//! nodes, each would see only its own members, so the shipped configurations use PostgreSQL.
//!
//! It plays the part PostgreSQL plays for the default store: it holds the members and the node
//! table their visibility depends on (kept by `cluster::memory`, as `relay.nodes` is by
//! `cluster::pg`), and announces joins and leaves ([`Announcement`], what
//! `pg_notify('relay_presence')` carries). It keeps the PostgreSQL store's semantics (live nodes,
//! member ids, caps, expiry), so both pass the same suite (`cluster::conformance`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Announcement, Join, Member, PresenceStore};
use crate::error::Result;

/// Presence in this process's memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// (channel, client) → membership.
    members: BTreeMap<(String, String), Row>,
    nodes: HashMap<String, NodeRow>,
    sinks: Vec<mpsc::UnboundedSender<Announcement>>,
    seq: u64,
}

#[derive(Debug)]
struct Row {
    member: Member,
    node: String,
    id: String,
    seq: u64,
}

#[derive(Debug)]
struct NodeRow {
    info: Value,
    expires: Instant,
    started: Instant,
}

impl Inner {
    fn live(&self, node: &str, now: Instant) -> bool {
        self.nodes.get(node).is_some_and(|n| n.expires > now)
    }

    fn announce(&mut self, announcement: Announcement) {
        self.sinks.retain(|s| s.send(announcement.clone()).is_ok());
    }

    fn live_rows<'a>(&'a self, channel: &'a str) -> impl Iterator<Item = &'a Row> + 'a {
        let now = Instant::now();
        self.members
            .range((channel.to_owned(), String::new())..)
            .take_while(move |((c, _), _)| c == channel)
            .map(|(_, r)| r)
            .filter(move |r| self.live(&r.node, now))
    }

    /// Removes the memberships `gone` selects, announcing each leave; how many.
    fn remove_where(&mut self, gone: impl Fn(&(String, String), &Row) -> bool) -> u64 {
        let keys: Vec<(String, String)> = self
            .members
            .iter()
            .filter(|(k, r)| gone(k, r))
            .map(|(k, _)| k.clone())
            .collect();
        let n = keys.len() as u64;
        for key in keys {
            if let Some(row) = self.members.remove(&key) {
                self.announce(Announcement::Leave {
                    channel: key.0,
                    member: row.member,
                });
            }
        }
        n
    }
}

impl MemoryStore {
    /// Registers or renews `node` with its `info` (what [`MemoryStore::nodes`] lists) for `ttl`;
    /// `true` when it was not registered (first beat, or it had expired and was removed).
    pub fn heartbeat(&self, node: &str, info: Value, ttl: Duration) -> bool {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        if let Some(n) = inner.nodes.get_mut(node) {
            n.info = info;
            n.expires = now + ttl;
            return false;
        }
        let row = NodeRow {
            info,
            expires: now + ttl,
            started: now,
        };
        inner.nodes.insert(node.to_owned(), row);
        true
    }

    /// Removes expired nodes and the members of nodes that are gone (leaves announced); how many
    /// members.
    pub fn expire(&self) -> u64 {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        inner.nodes.retain(|_, n| n.expires >= now);
        let nodes: HashSet<String> = inner.nodes.keys().cloned().collect();
        inner.remove_where(|_, r| !nodes.contains(&r.node))
    }

    /// Deregisters `node` and removes its members (leaves announced).
    pub fn remove_node(&self, node: &str) {
        let mut inner = self.inner.lock();
        inner.nodes.remove(node);
        inner.remove_where(|_, r| r.node == node);
    }

    /// The `info` of the live nodes, oldest first.
    pub fn nodes(&self) -> Vec<Value> {
        let inner = self.inner.lock();
        let now = Instant::now();
        let mut nodes: Vec<&NodeRow> = inner.nodes.values().filter(|n| n.expires > now).collect();
        nodes.sort_by_key(|n| n.started);
        nodes.into_iter().map(|n| n.info.clone()).collect()
    }

    /// Every join and leave announced from now on.
    pub fn announcements(&self) -> mpsc::UnboundedReceiver<Announcement> {
        let (sink, announcements) = mpsc::unbounded_channel();
        self.inner.lock().sinks.push(sink);
        announcements
    }
}

impl PresenceStore for MemoryStore {
    fn join<'a>(&'a self, j: Join<'a>) -> BoxFuture<'a, Result<bool>> {
        let mut inner = self.inner.lock();
        let others = inner
            .live_rows(j.channel)
            .filter(|r| r.member.client != j.member.client)
            .count();
        let result = if j.max_members > 0 && others >= j.max_members as usize {
            false
        } else {
            inner.seq += 1;
            let seq = inner.seq;
            inner.members.insert(
                (j.channel.to_owned(), j.member.client.clone()),
                Row {
                    member: j.member.clone(),
                    node: j.node.to_owned(),
                    id: j.id.to_owned(),
                    seq,
                },
            );
            if j.announce {
                inner.announce(Announcement::Join {
                    channel: j.channel.to_owned(),
                    member: j.member.clone(),
                });
            }
            true
        };
        Box::pin(std::future::ready(Ok(result)))
    }

    fn leave<'a>(
        &'a self,
        client: &'a str,
        membership: Option<(&'a str, &'a str)>,
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.lock().remove_where(|(c, cl), r| {
            cl == client && membership.is_none_or(|(channel, id)| c == channel && r.id == id)
        });
        Box::pin(std::future::ready(Ok(())))
    }

    fn node_members<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String, String)>>> {
        let rows = self
            .inner
            .lock()
            .members
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|((channel, client), r)| (channel.clone(), client.clone(), r.id.clone()))
            .collect();
        Box::pin(std::future::ready(Ok(rows)))
    }

    fn members<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>>> {
        let inner = self.inner.lock();
        let mut rows: Vec<&Row> = inner.live_rows(channel).collect();
        rows.sort_by_key(|r| r.seq);
        let members = rows.into_iter().map(|r| r.member.clone()).collect();
        Box::pin(std::future::ready(Ok(members)))
    }

    fn stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(u64, u64)>> {
        let inner = self.inner.lock();
        let mut users = HashSet::new();
        let mut clients = 0u64;
        for r in inner.live_rows(channel) {
            clients += 1;
            users.insert(r.member.user.as_str());
        }
        let result = (clients, users.len() as u64);
        Box::pin(std::future::ready(Ok(result)))
    }

    fn channel_counts(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>>> {
        let inner = self.inner.lock();
        let now = Instant::now();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for ((channel, _), r) in &inner.members {
            if inner.live(&r.node, now) {
                *counts.entry(channel.clone()).or_default() += 1;
            }
        }
        Box::pin(std::future::ready(Ok(counts.into_iter().collect())))
    }
}
