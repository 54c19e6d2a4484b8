//! The session loop over a channel pair, without a socket or a database: what goes in and out of
//! the loop in each encoding (connect, ping/pong, refused frames and their close codes).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use prost::Message as _;
use relay_protocol::pb::messages::{Command, ConnectRequest, Reply};
use relay_protocol::reply::Encoding;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::edge::Edge;
use crate::metrics::Metrics;

/// An edge whose database is never reached (a lazy pool on a closed port) and whose presence is
/// in memory: enough for connect, pings and refused frames.
async fn state() -> Arc<Edge> {
    let config = crate::Config::from_json(
        &serde_json::json!({
            "listen": "127.0.0.1:0",
            "database": {"url": "postgres://postgres@127.0.0.1:9/none", "pool_size": 1},
            "client": {"allow_anonymous": true, "ping_interval_secs": 1, "pong_timeout_secs": 1},
            "presence": {"engine": "memory"},
            "mappings": [],
            "rules": []
        })
        .to_string(),
    )
    .unwrap();
    let pool = crate::db::pool(&config.database).unwrap();
    let store = Arc::new(crate::presence::memory::MemoryStore::default());
    let presence = Arc::new(crate::presence::Presence::new(
        "node".to_owned(),
        config.presence.clone(),
        store.clone(),
    ));
    let config = Arc::new(config);
    let hub = Arc::new(crate::hub::Hub::new());
    let stream = Arc::default();
    let capture = Arc::default();
    let verifier = crate::auth::Verifier::new(&config.auth).unwrap();
    let metrics = Arc::new(Metrics::new(&hub, &stream, &capture, &verifier));
    let cluster = Arc::new(crate::cluster::Cluster::new(crate::cluster::Parts {
        store: Arc::new(crate::cluster::memory::MemoryCluster::new(store)),
        ttl: config.presence.node_ttl,
        hub: hub.clone(),
        presence: presence.clone(),
        metrics: metrics.clone(),
    }));
    let node = crate::node::Node::new(crate::node::Parts {
        config: config.clone(),
        pool,
        metrics,
        hub,
        presence,
        cluster,
        http: reqwest::Client::new(),
        lambda: crate::rules::LambdaClients::for_rules(&[]).await.unwrap(),
        stream,
        capture,
    });
    Arc::new(Edge::new(
        Arc::new(node),
        config,
        verifier,
        CancellationToken::new(),
        TaskTracker::new(),
    ))
}

/// The client's side of a session: what it sends in, what comes out.
struct Peer {
    to_session: mpsc::UnboundedSender<Result<Message, axum::Error>>,
    from_session: mpsc::UnboundedReceiver<Message>,
}

impl Peer {
    async fn next(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(10), self.from_session.recv())
            .await
            .expect("a message within 10 s")
            .expect("session still writing")
    }

    fn send(&self, m: Message) {
        self.to_session.send(Ok(m)).unwrap();
    }

    /// Waits for the close frame; returns its code.
    async fn close_code(&mut self) -> u16 {
        loop {
            if let Message::Close(Some(f)) = self.next().await {
                return f.code;
            }
        }
    }
}

/// Starts a session on a channel pair.
async fn start(encoding: Encoding) -> Peer {
    let (to_session, mut inbound) = mpsc::unbounded_channel::<Result<Message, axum::Error>>();
    let (outbound, from_session) = mpsc::unbounded_channel::<Message>();
    let stream = futures_util::stream::poll_fn(move |cx| inbound.poll_recv(cx));
    let sink = Box::pin(futures_util::sink::unfold(
        outbound,
        |tx, m: Message| async move {
            tx.send(m)
                .map_err(|_| axum::Error::new(std::io::Error::other("peer gone")))?;
            Ok::<_, axum::Error>(tx)
        },
    ));
    let state = state().await;
    tokio::spawn(super::serve_on(
        sink,
        stream,
        state,
        std::net::IpAddr::from([127, 0, 0, 1]),
        encoding,
    ));
    Peer {
        to_session,
        from_session,
    }
}

fn delimited(c: &Command) -> Vec<u8> {
    c.encode_length_delimited_to_vec()
}

#[tokio::test]
async fn protobuf_connect_ping_pong_then_a_malformed_frame_closes_with_3501() {
    let mut peer = start(Encoding::Protobuf).await;
    peer.send(Message::Binary(
        delimited(&Command {
            id: 1,
            connect: Some(ConnectRequest::default()),
            ..Default::default()
        })
        .into(),
    ));
    let Message::Binary(frame) = peer.next().await else {
        panic!("a binary frame");
    };
    let reply = Reply::decode_length_delimited(&frame[..]).unwrap();
    assert_eq!(reply.id, 1);
    let connect = reply.connect.expect("connect result");
    assert!(!connect.client.is_empty());
    assert_eq!((connect.ping, connect.pong), (1, true));

    // Two pings, each answered with an empty Command: the connection stays (pong timeout 1 s).
    for _ in 0..2 {
        let ping = peer.next().await;
        assert_eq!(ping, Message::Binary(vec![0u8].into()), "an empty Reply");
        peer.send(Message::Binary(vec![0u8].into()));
    }
    // A length past the frame's end.
    peer.send(Message::Binary(vec![5u8, 1, 2].into()));
    assert_eq!(peer.close_code().await, 3501);
}

#[tokio::test]
async fn protobuf_without_pong_closes_with_3012() {
    let mut peer = start(Encoding::Protobuf).await;
    peer.send(Message::Binary(
        delimited(&Command {
            id: 1,
            connect: Some(ConnectRequest::default()),
            ..Default::default()
        })
        .into(),
    ));
    assert_eq!(peer.close_code().await, 3012);
}

#[tokio::test]
async fn json_session_answers_in_text_and_refuses_binary_with_3506() {
    let mut peer = start(Encoding::Json).await;
    peer.send(Message::Text(r#"{"id":1,"connect":{}}"#.into()));
    let Message::Text(text) = peer.next().await else {
        panic!("a text frame");
    };
    let reply: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
    assert_eq!(reply["id"], 1);
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    let ping = peer.next().await;
    assert_eq!(ping, Message::Text("{}".into()));
    peer.send(Message::Binary(vec![0u8].into()));
    assert_eq!(peer.close_code().await, 3506);
}

#[tokio::test]
async fn protobuf_session_refuses_text_with_3506_and_a_request_before_connect_with_3501() {
    let mut peer = start(Encoding::Protobuf).await;
    peer.send(Message::Text("{}".into()));
    assert_eq!(peer.close_code().await, 3506);

    let mut peer = start(Encoding::Protobuf).await;
    peer.send(Message::Binary(
        delimited(&Command {
            id: 1,
            ping: Some(Default::default()),
            ..Default::default()
        })
        .into(),
    ));
    assert_eq!(peer.close_code().await, 3501);
}

/// A subscription at `offset` (the other fields at their defaults).
fn sub_at(offset: u64) -> super::SubState {
    super::SubState::at("", offset)
}

#[test]
fn subs_behave_as_a_map_below_and_above_the_few() {
    let mut subs = super::Subs::default();
    for i in 0..20u64 {
        assert!(subs.insert(format!("c{i}"), sub_at(i)).is_none());
        assert_eq!(subs.len(), i as usize + 1);
        if i as usize + 1 == super::Subs::FEW {
            assert!(matches!(subs, super::Subs::Few(_)));
        }
        for j in 0..=i {
            assert_eq!(subs.get_mut(&format!("c{j}")).map(|s| s.offset), Some(j));
        }
        assert!(!subs.contains_key("absent"));
    }
    assert!(matches!(subs, super::Subs::Many(_)));
    let replaced = subs.insert("c3".into(), sub_at(33)).map(|s| s.offset);
    assert_eq!(replaced, Some(3));
    assert_eq!(subs.len(), 20);
    assert_eq!(subs.remove("c3").map(|s| s.offset), Some(33));
    assert!(subs.remove("c3").is_none());
    let mut keys: Vec<&String> = subs.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 19);
    assert_eq!(
        subs.values().map(|s| s.offset).sum::<u64>(),
        (0..20).sum::<u64>() - 3
    );

    let mut few = super::Subs::default();
    few.insert("a".into(), sub_at(1));
    few.insert("b".into(), sub_at(2));
    assert_eq!(few.insert("a".into(), sub_at(5)).map(|s| s.offset), Some(1));
    assert_eq!(few.remove("a").map(|s| s.offset), Some(5));
    assert_eq!(
        few.iter()
            .map(|(c, s)| (c.as_str(), s.offset))
            .collect::<Vec<_>>(),
        [("b", 2)]
    );
}
