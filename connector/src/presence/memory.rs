//! The in-memory presence store (`presence.engine = "memory"`): one process only, no database
//! writes per subscription. For a single node (development, a one-box deployment) — with several
//! nodes, each would see only its own members, so the shipped configurations use PostgreSQL.
//!
//! It keeps the PostgreSQL store's semantics (live nodes, member ids, caps, expiry), so both pass the
//! same suite ([`super::conformance`]); events go straight to the listeners' sinks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{DisconnectOrder, Event, Join, Member, NodeInfo, PresenceStore};
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
    sinks: Vec<mpsc::UnboundedSender<Event>>,
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
    info: NodeInfo,
    expires: Instant,
    started: Instant,
}

impl Inner {
    fn live(&self, node: &str, now: Instant) -> bool {
        self.nodes.get(node).is_some_and(|n| n.expires > now)
    }

    fn emit(&mut self, event: Event) {
        self.sinks.retain(|s| s.send(event.clone()).is_ok());
    }

    fn live_rows<'a>(&'a self, channel: &'a str) -> impl Iterator<Item = &'a Row> + 'a {
        let now = Instant::now();
        self.members
            .range((channel.to_owned(), String::new())..)
            .take_while(move |((c, _), _)| c == channel)
            .map(|(_, r)| r)
            .filter(move |r| self.live(&r.node, now))
    }
}

impl MemoryStore {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }
}

impl PresenceStore for MemoryStore {
    fn join<'a>(&'a self, j: Join<'a>) -> BoxFuture<'a, Result<bool>> {
        let mut inner = self.lock();
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
                inner.emit(Event::Join {
                    channel: j.channel.to_owned(),
                    info: j.member.clone(),
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
        let mut inner = self.lock();
        let gone: Vec<(String, String)> = inner
            .members
            .iter()
            .filter(|((c, cl), r)| {
                cl == client && membership.is_none_or(|(channel, id)| c == channel && r.id == id)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(row) = inner.members.remove(&key) {
                inner.emit(Event::Leave {
                    channel: key.0,
                    info: row.member,
                });
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn node_members<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String, String)>>> {
        let rows = self
            .lock()
            .members
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|((channel, client), r)| (channel.clone(), client.clone(), r.id.clone()))
            .collect();
        Box::pin(std::future::ready(Ok(rows)))
    }

    fn remove_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<()>> {
        let mut inner = self.lock();
        inner.nodes.remove(node);
        let gone: Vec<(String, String)> = inner
            .members
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(row) = inner.members.remove(&key) {
                inner.emit(Event::Leave {
                    channel: key.0,
                    info: row.member,
                });
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn members<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>>> {
        let inner = self.lock();
        let mut rows: Vec<&Row> = inner.live_rows(channel).collect();
        rows.sort_by_key(|r| r.seq);
        let members = rows.into_iter().map(|r| r.member.clone()).collect();
        Box::pin(std::future::ready(Ok(members)))
    }

    fn stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(u64, u64)>> {
        let inner = self.lock();
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
        let inner = self.lock();
        let now = Instant::now();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for ((channel, _), r) in &inner.members {
            if inner.live(&r.node, now) {
                *counts.entry(channel.clone()).or_default() += 1;
            }
        }
        Box::pin(std::future::ready(Ok(counts.into_iter().collect())))
    }

    fn heartbeat<'a>(&'a self, node: &'a NodeInfo, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        let mut inner = self.lock();
        let now = Instant::now();
        let inserted = match inner.nodes.get_mut(&node.id) {
            Some(n) => {
                n.info = node.clone();
                n.expires = now + ttl;
                false
            }
            None => {
                inner.nodes.insert(
                    node.id.clone(),
                    NodeRow {
                        info: node.clone(),
                        expires: now + ttl,
                        started: now,
                    },
                );
                true
            }
        };
        Box::pin(std::future::ready(Ok(inserted)))
    }

    fn expire(&self) -> BoxFuture<'_, Result<u64>> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.nodes.retain(|_, n| n.expires >= now);
        let gone: Vec<(String, String)> = inner
            .members
            .iter()
            .filter(|(_, r)| !inner.nodes.contains_key(&r.node))
            .map(|(k, _)| k.clone())
            .collect();
        let n = gone.len() as u64;
        for key in gone {
            if let Some(row) = inner.members.remove(&key) {
                inner.emit(Event::Leave {
                    channel: key.0,
                    info: row.member,
                });
            }
        }
        Box::pin(std::future::ready(Ok(n)))
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Value>>> {
        let inner = self.lock();
        let now = Instant::now();
        let mut nodes: Vec<&NodeRow> = inner.nodes.values().filter(|n| n.expires > now).collect();
        nodes.sort_by_key(|n| n.started);
        let out = nodes
            .into_iter()
            .map(|n| {
                super::node_json(
                    &n.info.id,
                    &n.info.name,
                    &n.info.version,
                    Some(n.info.stats.clone()),
                )
            })
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn disconnect<'a>(&'a self, order: &'a DisconnectOrder) -> BoxFuture<'a, Result<()>> {
        self.lock().emit(Event::Disconnect(order.clone()));
        Box::pin(std::future::ready(Ok(())))
    }

    fn listen(
        self: Arc<Self>,
        sink: mpsc::UnboundedSender<Event>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        self.lock().sinks.push(sink);
        Box::pin(async move { shutdown.cancelled().await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_store_suite() {
        super::super::conformance::run(Arc::new(MemoryStore::default())).await;
    }
}
