//! The behaviour every [`PresenceStore`] must have, as one test suite: run against the in-memory
//! store (a unit test) and PostgreSQL (`connector/tests/presence_store.rs`). It panics on the first
//! difference.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{DisconnectOrder, Event, Join, Member, NodeInfo, PresenceStore};

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

async fn next(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(e)) => e,
        other => panic!("no presence event within 10 s ({other:?})"),
    }
}

async fn quiet(rx: &mut mpsc::UnboundedReceiver<Event>) {
    if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("unexpected presence event {e:?}");
    }
}

fn describe(e: &Event) -> (&'static str, String, String) {
    match e {
        Event::Join { channel, info } => ("join", channel.clone(), info.client.clone()),
        Event::Leave { channel, info } => ("leave", channel.clone(), info.client.clone()),
        Event::Disconnect(o) => ("disconnect", String::new(), o.user.clone()),
    }
}

/// Runs the suite against `store` (a fresh one: no nodes, no members).
pub async fn run(store: Arc<dyn PresenceStore>) {
    let shutdown = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listening = tokio::spawn(store.clone().listen(tx, shutdown.clone()));
    let ttl = Duration::from_secs(2);

    // The event stream is up once a probe comes back (a LISTEN takes a moment to start).
    let probe = DisconnectOrder {
        user: "probe".into(),
        client: None,
        whitelist: vec![],
        code: 3503,
        reason: "probe".into(),
    };
    let mut up = false;
    for _ in 0..50 {
        store.disconnect(&probe).await.ok();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            up = true;
            break;
        }
    }
    assert!(up, "the store's event stream never delivered");
    while tokio::time::timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_ok_and(|e| e.is_some())
    {}

    // Nodes: the first heartbeat registers, the next ones renew.
    assert!(store.heartbeat(&node("n1"), ttl).await.is_ok_and(|b| b));
    assert!(store.heartbeat(&node("n1"), ttl).await.is_ok_and(|b| !b));
    let nodes = store.nodes().await.unwrap_or_default();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["uid"], "n1");
    assert_eq!(nodes[0]["name"], "host-n1");
    assert_eq!(nodes[0]["num_clients"], 1);

    // Join (announced) and not announced.
    let a = member("a", "alice");
    let b = member("b", "alice");
    let d = member("d", "dave");
    assert!(
        store
            .join(join("ch", &a, "a1", 0, true))
            .await
            .is_ok_and(|j| j)
    );
    assert_eq!(
        describe(&next(&mut rx).await),
        ("join", "ch".into(), "a".into())
    );
    assert!(
        store
            .join(join("ch", &b, "b1", 0, false))
            .await
            .is_ok_and(|j| j)
    );
    quiet(&mut rx).await;
    let members = store.members("ch").await.unwrap_or_default();
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
    assert_eq!(store.stats("ch").await.ok(), Some((2, 1)));

    // The cap counts the others: a renewal of a member is fine, a third member is not.
    assert!(
        store
            .join(join("ch", &a, "a2", 2, false))
            .await
            .is_ok_and(|j| j)
    );
    assert!(
        store
            .join(join("ch", &d, "d1", 2, true))
            .await
            .is_ok_and(|j| !j)
    );
    quiet(&mut rx).await;
    assert_eq!(store.stats("ch").await.ok(), Some((2, 1)));

    // A leave of an older membership removes nothing; the current one goes, announced.
    store.leave("a", Some(("ch", "a1"))).await.ok();
    quiet(&mut rx).await;
    assert_eq!(store.stats("ch").await.ok(), Some((2, 1)));
    store.leave("a", Some(("ch", "a2"))).await.ok();
    assert_eq!(
        describe(&next(&mut rx).await),
        ("leave", "ch".into(), "a".into())
    );
    assert_eq!(store.stats("ch").await.ok(), Some((1, 1)));

    // A client's end removes every membership.
    assert!(
        store
            .join(join("other", &b, "b2", 0, true))
            .await
            .is_ok_and(|j| j)
    );
    assert_eq!(describe(&next(&mut rx).await).0, "join");
    let counts = store.channel_counts().await.unwrap_or_default();
    assert_eq!(counts.len(), 2, "{counts:?}");
    store.leave("b", None).await.ok();
    let mut left = vec![
        describe(&next(&mut rx).await),
        describe(&next(&mut rx).await),
    ];
    left.sort();
    assert_eq!(
        left,
        [
            ("leave", "ch".to_owned(), "b".to_owned()),
            ("leave", "other".to_owned(), "b".to_owned())
        ]
    );
    assert!(store.channel_counts().await.unwrap_or_default().is_empty());

    // A node that stops heartbeating: its members vanish after the TTL; expiry announces the leaves.
    assert!(store.heartbeat(&node("n2"), ttl).await.is_ok_and(|b| b));
    let doomed = member("x", "xavier");
    let on_n2 = Join {
        channel: "ch",
        member: &doomed,
        node: "n2",
        id: "x1",
        max_members: 0,
        announce: true,
    };
    assert!(store.join(on_n2).await.is_ok_and(|j| j));
    assert_eq!(describe(&next(&mut rx).await).2, "x");
    assert_eq!(store.stats("ch").await.ok().map(|s| s.0), Some(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        store.heartbeat(&node("n1"), ttl).await.ok();
        if store.stats("ch").await.ok().map(|s| s.0) == Some(0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2's member never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.expire().await.ok(), Some(1));
    assert_eq!(
        describe(&next(&mut rx).await),
        ("leave", "ch".into(), "x".into())
    );
    let nodes = store.nodes().await.unwrap_or_default();
    assert_eq!(nodes.len(), 1, "n2 is gone: {nodes:?}");

    // Disconnect orders reach the listeners; a node's removal takes its members.
    let order = DisconnectOrder {
        user: "alice".into(),
        client: Some("a".into()),
        whitelist: vec![],
        code: 4000,
        reason: "bye".into(),
    };
    store.disconnect(&order).await.ok();
    match next(&mut rx).await {
        Event::Disconnect(o) => assert_eq!((o.user.as_str(), o.code), ("alice", 4000)),
        other => panic!("expected the disconnect order, got {other:?}"),
    }
    assert!(
        store
            .join(join("ch", &d, "d2", 0, false))
            .await
            .is_ok_and(|j| j)
    );
    store.remove_node("n1").await.ok();
    assert_eq!(
        describe(&next(&mut rx).await),
        ("leave", "ch".into(), "d".into())
    );
    assert!(store.nodes().await.unwrap_or_default().is_empty());
    assert_eq!(store.stats("ch").await.ok(), Some((0, 0)));

    shutdown.cancel();
    let _ = listening.await;
}
