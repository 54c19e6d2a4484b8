//! The behaviour every pair of stores must have — a [`PresenceStore`] and the [`ClusterStore`] that
//! shares its tables (node liveness, announcements) — as one test suite, one function per check:
//! run against the in-memory pair (a unit test) and PostgreSQL (`connector/tests/presence_store.rs`).
//! It panics on the first difference. Here rather than in `presence/`: it needs both seams, and
//! presence does not import the cluster.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ClusterEvent, ClusterStore, DisconnectOrder, NodeInfo};
use crate::presence::{Announcement, Join, Member, PresenceStore};

fn member(client: &str, user: &str) -> Member {
    Member {
        user: user.to_owned(),
        client: client.to_owned(),
        conn_info: None,
        chan_info: serde_json::value::RawValue::from_string(format!(r#"{{"name":"{client}"}}"#))
            .ok()
            .map(Arc::from),
    }
}

/// A join on node n1.
fn join<'a>(
    channel: &'a str,
    member: &'a Member,
    id: &'a str,
    max: u32,
    announce: bool,
) -> Join<'a> {
    Join {
        channel,
        member,
        node: "n1",
        id,
        max_members: max,
        announce,
    }
}

fn node(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.to_owned(),
        name: format!("host-{id}"),
        version: "test".to_owned(),
        stats: json!({"num_clients": 1}),
    }
}

fn order(user: &str, client: Option<&str>, code: u32) -> DisconnectOrder {
    DisconnectOrder {
        user: user.into(),
        client: client.map(Into::into),
        whitelist: vec![],
        code,
        reason: user.into(),
    }
}

fn describe(e: &ClusterEvent) -> (&'static str, String, String) {
    match e {
        ClusterEvent::Presence(Announcement::Join { channel, member }) => {
            ("join", channel.clone(), member.client.clone())
        }
        ClusterEvent::Presence(Announcement::Leave { channel, member }) => {
            ("leave", channel.clone(), member.client.clone())
        }
        ClusterEvent::Disconnect(o) => ("disconnect", String::new(), o.user.clone()),
    }
}

/// The stores under test and the events they delivered.
struct Suite {
    presence: Arc<dyn PresenceStore>,
    cluster: Arc<dyn ClusterStore>,
    events: mpsc::UnboundedReceiver<ClusterEvent>,
    ttl: Duration,
}

impl Suite {
    async fn next(&mut self) -> ClusterEvent {
        match tokio::time::timeout(Duration::from_secs(10), self.events.recv()).await {
            Ok(Some(e)) => e,
            other => panic!("no cluster event within 10 s ({other:?})"),
        }
    }

    async fn quiet(&mut self) {
        let wait = Duration::from_millis(300);
        if let Ok(Some(e)) = tokio::time::timeout(wait, self.events.recv()).await {
            panic!("unexpected cluster event {e:?}");
        }
    }

    async fn stats(&self, channel: &str) -> Option<(u64, u64)> {
        self.presence.stats(channel).await.ok()
    }

    async fn joins(&self, join: Join<'_>) -> bool {
        self.presence.join(join).await.is_ok_and(|j| j)
    }
}

/// Runs the suite against `presence` and `cluster` (fresh ones: no nodes, no members).
pub async fn run(presence: Arc<dyn PresenceStore>, cluster: Arc<dyn ClusterStore>) {
    let shutdown = CancellationToken::new();
    let (tx, events) = mpsc::unbounded_channel();
    let listening = tokio::spawn(cluster.clone().listen(tx, shutdown.clone()));
    let mut suite = Suite {
        presence,
        cluster,
        events,
        ttl: Duration::from_secs(2),
    };
    events_flow(&mut suite).await;
    nodes_register_then_renew(&suite).await;
    joins_are_announced_when_asked(&mut suite).await;
    the_cap_counts_the_others(&mut suite).await;
    only_the_current_membership_leaves(&mut suite).await;
    a_client_s_end_removes_every_membership(&mut suite).await;
    a_silent_node_s_members_expire(&mut suite).await;
    disconnect_orders_reach_the_listeners(&mut suite).await;
    a_node_s_removal_takes_its_members(&mut suite).await;
    shutdown.cancel();
    let _ = listening.await;
}

/// The event stream is up once a probe comes back (a LISTEN takes a moment to start).
async fn events_flow(suite: &mut Suite) {
    let probe = order("probe", None, 3503);
    let mut up = false;
    for _ in 0..50 {
        suite.cluster.disconnect(&probe).await.ok();
        let wait = Duration::from_millis(200);
        if let Ok(Some(_)) = tokio::time::timeout(wait, suite.events.recv()).await {
            up = true;
            break;
        }
    }
    assert!(up, "the store's event stream never delivered");
    while tokio::time::timeout(Duration::from_millis(200), suite.events.recv())
        .await
        .is_ok_and(|e| e.is_some())
    {}
}

/// Nodes: the first heartbeat registers, the next ones renew.
async fn nodes_register_then_renew(suite: &Suite) {
    let cluster = &suite.cluster;
    assert!(
        cluster
            .heartbeat(&node("n1"), suite.ttl)
            .await
            .is_ok_and(|b| b)
    );
    assert!(
        cluster
            .heartbeat(&node("n1"), suite.ttl)
            .await
            .is_ok_and(|b| !b)
    );
    let nodes = cluster.nodes().await.unwrap_or_default();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["uid"], "n1");
    assert_eq!(nodes[0]["name"], "host-n1");
    assert_eq!(nodes[0]["num_clients"], 1);
}

/// Join (announced) and not announced; members in join order, with their info.
async fn joins_are_announced_when_asked(suite: &mut Suite) {
    let (a, b) = (member("a", "alice"), member("b", "alice"));
    assert!(suite.joins(join("ch", &a, "a1", 0, true)).await);
    assert_eq!(
        describe(&suite.next().await),
        ("join", "ch".into(), "a".into())
    );
    assert!(suite.joins(join("ch", &b, "b1", 0, false)).await);
    suite.quiet().await;
    let members = suite.presence.members("ch").await.unwrap_or_default();
    assert_eq!(
        members
            .iter()
            .map(|m| m.client.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"],
        "members in join order"
    );
    assert_eq!(
        members[0]
            .chan_info
            .as_deref()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok()),
        Some(json!({"name": "a"}))
    );
    assert_eq!(suite.stats("ch").await, Some((2, 1)));
}

/// The cap counts the others: a renewal of a member is fine, a third member is not.
async fn the_cap_counts_the_others(suite: &mut Suite) {
    let (a, d) = (member("a", "alice"), member("d", "dave"));
    assert!(suite.joins(join("ch", &a, "a2", 2, false)).await);
    assert!(!suite.joins(join("ch", &d, "d1", 2, true)).await);
    suite.quiet().await;
    assert_eq!(suite.stats("ch").await, Some((2, 1)));
}

/// A leave of an older membership removes nothing; the current one goes, announced.
async fn only_the_current_membership_leaves(suite: &mut Suite) {
    suite.presence.leave("a", Some(("ch", "a1"))).await.ok();
    suite.quiet().await;
    assert_eq!(suite.stats("ch").await, Some((2, 1)));
    suite.presence.leave("a", Some(("ch", "a2"))).await.ok();
    assert_eq!(
        describe(&suite.next().await),
        ("leave", "ch".into(), "a".into())
    );
    assert_eq!(suite.stats("ch").await, Some((1, 1)));
}

/// A client's end removes every membership, each leave announced.
async fn a_client_s_end_removes_every_membership(suite: &mut Suite) {
    let b = member("b", "alice");
    assert!(suite.joins(join("other", &b, "b2", 0, true)).await);
    assert_eq!(describe(&suite.next().await).0, "join");
    let counts = suite.presence.channel_counts().await.unwrap_or_default();
    assert_eq!(counts.len(), 2, "{counts:?}");
    suite.presence.leave("b", None).await.ok();
    let mut left = vec![describe(&suite.next().await), describe(&suite.next().await)];
    left.sort();
    assert_eq!(
        left,
        [
            ("leave", "ch".to_owned(), "b".to_owned()),
            ("leave", "other".to_owned(), "b".to_owned())
        ]
    );
    let counts = suite.presence.channel_counts().await.unwrap_or_default();
    assert!(counts.is_empty(), "{counts:?}");
}

/// A node that stops heartbeating: its members vanish after the TTL; expiry announces the leaves.
async fn a_silent_node_s_members_expire(suite: &mut Suite) {
    assert!(
        suite
            .cluster
            .heartbeat(&node("n2"), suite.ttl)
            .await
            .is_ok_and(|b| b)
    );
    let doomed = member("x", "xavier");
    let on_n2 = Join {
        node: "n2",
        ..join("ch", &doomed, "x1", 0, true)
    };
    assert!(suite.joins(on_n2).await);
    assert_eq!(describe(&suite.next().await).2, "x");
    assert_eq!(suite.stats("ch").await.map(|s| s.0), Some(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        suite.cluster.heartbeat(&node("n1"), suite.ttl).await.ok();
        if suite.stats("ch").await.map(|s| s.0) == Some(0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2's member never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(suite.cluster.expire().await.ok(), Some(1));
    assert_eq!(
        describe(&suite.next().await),
        ("leave", "ch".into(), "x".into())
    );
    let nodes = suite.cluster.nodes().await.unwrap_or_default();
    assert_eq!(nodes.len(), 1, "n2 is gone: {nodes:?}");
}

/// Disconnect orders reach the listeners.
async fn disconnect_orders_reach_the_listeners(suite: &mut Suite) {
    suite
        .cluster
        .disconnect(&order("alice", Some("a"), 4000))
        .await
        .ok();
    match suite.next().await {
        ClusterEvent::Disconnect(o) => {
            assert_eq!(
                (o.user.as_str(), o.client.as_deref(), o.code),
                ("alice", Some("a"), 4000)
            );
        }
        other => panic!("expected the disconnect order, got {other:?}"),
    }
}

/// A node's removal takes its members, announced.
async fn a_node_s_removal_takes_its_members(suite: &mut Suite) {
    let d = member("d", "dave");
    assert!(suite.joins(join("ch", &d, "d2", 0, false)).await);
    suite.cluster.remove_node("n1").await.ok();
    assert_eq!(
        describe(&suite.next().await),
        ("leave", "ch".into(), "d".into())
    );
    assert!(suite.cluster.nodes().await.unwrap_or_default().is_empty());
    assert_eq!(suite.stats("ch").await, Some((0, 0)));
}
