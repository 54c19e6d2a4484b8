//! The cluster in one process (`presence.engine = "memory"`): the node table is the in-memory
//! presence store's ([`MemoryStore`], whose members are visible while their node is), events are its
//! join/leave announcements and the disconnect orders sent here.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ClusterEvent, ClusterStore, DisconnectOrder, NodeInfo};
use crate::error::Result;
use crate::presence::memory::MemoryStore;

/// The node registry and event bus of one process.
#[derive(Debug)]
pub struct MemoryCluster {
    store: Arc<MemoryStore>,
    /// The listeners of disconnect orders.
    orders: Mutex<Vec<mpsc::UnboundedSender<ClusterEvent>>>,
}

impl MemoryCluster {
    /// The cluster over `store`'s node table and announcements.
    pub fn new(store: Arc<MemoryStore>) -> Self {
        Self {
            store,
            orders: Mutex::default(),
        }
    }
}

impl ClusterStore for MemoryCluster {
    fn heartbeat<'a>(&'a self, node: &'a NodeInfo, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        let inserted = self.store.heartbeat(&node.id, node.to_json(), ttl);
        Box::pin(std::future::ready(Ok(inserted)))
    }

    fn expire(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(std::future::ready(Ok(self.store.expire())))
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Value>>> {
        Box::pin(std::future::ready(Ok(self.store.nodes())))
    }

    fn remove_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<()>> {
        self.store.remove_node(node);
        Box::pin(std::future::ready(Ok(())))
    }

    fn disconnect<'a>(&'a self, order: &'a DisconnectOrder) -> BoxFuture<'a, Result<()>> {
        self.orders
            .lock()
            .retain(|s| s.send(ClusterEvent::Disconnect(order.clone())).is_ok());
        Box::pin(std::future::ready(Ok(())))
    }

    fn listen(
        self: Arc<Self>,
        sink: mpsc::UnboundedSender<ClusterEvent>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        let mut announcements = self.store.announcements();
        self.orders.lock().push(sink.clone());
        Box::pin(async move {
            loop {
                let announcement = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = announcements.recv() => a,
                };
                let Some(announcement) = announcement else {
                    return;
                };
                if sink.send(ClusterEvent::Presence(announcement)).is_err() {
                    return;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_store_suite() {
        let store = Arc::new(MemoryStore::default());
        let cluster = Arc::new(MemoryCluster::new(store.clone()));
        super::super::conformance::run(store, cluster).await;
    }
}
