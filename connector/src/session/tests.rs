//! The session loop over a channel pair, without a socket or a database: what goes in and out of
//! the loop in each encoding (connect, ping/pong, refused frames and their close codes).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use prost::Message as _;
use relay_protocol::pb::messages::{Command, ConnectRequest, Reply};
use relay_protocol::reply::Encoding;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::edge::Edge;
use crate::metrics::Metrics;

/// An edge whose database is never reached (a lazy pool on a closed port) and whose presence is
/// in memory: enough for connect, pings and refused frames.
async fn state() -> Arc<Edge> {
    state_with(serde_json::json!({})).await
}

/// [`state`] with some configuration changed (`overrides` merged into the sections).
async fn state_with(overrides: serde_json::Value) -> Arc<Edge> {
    let mut config = serde_json::json!({
        "listen": "127.0.0.1:0",
        "database": {"url": "postgres://postgres@127.0.0.1:9/none", "pool_size": 1},
        "client": {"allow_anonymous": true, "ping_interval_secs": 1, "pong_timeout_secs": 1},
        "presence": {"engine": "memory"},
        "mappings": [],
        "rules": []
    });
    merge(&mut config, overrides);
    let config = crate::Config::from_json(&config.to_string()).unwrap();
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
        config: crate::node::NodeConfig::of(&config),
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
        crate::edge::EdgeConfig::of(&config),
        verifier,
        CancellationToken::new(),
        TaskTracker::new(),
    ))
}

/// Merges `overrides` into `config`: objects key by key, anything else replaced.
fn merge(config: &mut serde_json::Value, overrides: serde_json::Value) {
    match (config, overrides) {
        (serde_json::Value::Object(config), serde_json::Value::Object(overrides)) => {
            for (key, value) in overrides {
                merge(config.entry(key).or_insert(serde_json::Value::Null), value);
            }
        }
        (config, overrides) => *config = overrides,
    }
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

    /// The next message, a JSON text frame of one message.
    async fn json(&mut self) -> serde_json::Value {
        let Message::Text(text) = self.next().await else {
            panic!("a text frame");
        };
        serde_json::from_str(text.as_str()).unwrap()
    }

    fn send(&self, m: Message) {
        self.to_session.send(Ok(m)).unwrap();
    }

    /// Sends one JSON command.
    fn send_json(&self, command: &serde_json::Value) {
        self.send(Message::Text(command.to_string().into()));
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
    start_on(state().await, encoding, None)
}

/// Starts a session of `edge` on a channel pair (an emulated transport's with `emulated`).
fn start_on(edge: Arc<Edge>, encoding: Encoding, emulated: Option<super::Emulated>) -> Peer {
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
    tokio::spawn(super::serve_on(
        sink,
        stream,
        edge,
        std::net::IpAddr::from([127, 0, 0, 1]),
        encoding,
        emulated,
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

#[tokio::test]
async fn an_emulated_transports_connect_reply_names_its_session_and_node() {
    let emulated = super::Emulated {
        session: "s1".into(),
        node: "n1".into(),
    };
    let mut peer = start_on(state().await, Encoding::Json, Some(emulated.clone()));
    peer.send_json(&serde_json::json!({"id": 1, "connect": {}}));
    let reply = peer.json().await;
    assert_eq!(reply["connect"]["session"], "s1", "{reply}");
    assert_eq!(reply["connect"]["node"], "n1", "{reply}");

    let mut peer = start_on(state().await, Encoding::Protobuf, Some(emulated));
    let connect = Command {
        id: 1,
        connect: Some(ConnectRequest::default()),
        ..Default::default()
    };
    peer.send(Message::Binary(delimited(&connect).into()));
    let Message::Binary(frame) = peer.next().await else {
        panic!("a binary frame");
    };
    let connect = Reply::decode_length_delimited(&frame[..])
        .unwrap()
        .connect
        .expect("connect result");
    assert_eq!(
        (connect.session.as_str(), connect.node.as_str()),
        ("s1", "n1")
    );

    // A WebSocket's names neither.
    let mut peer = start(Encoding::Json).await;
    peer.send_json(&serde_json::json!({"id": 1, "connect": {}}));
    let reply = peer.json().await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    assert!(reply["connect"].get("session").is_none(), "{reply}");
    assert!(reply["connect"].get("node").is_none(), "{reply}");
}

// The timers on paused time: tokio's clock jumps to the next deadline when every task waits, so
// these tests check the moments the session acts at, to the millisecond, without waiting for them.

/// The HMAC key of the token tests.
const SECRET: &str = "the-session-tests-hmac-key-of-32-bytes-or-more";

/// Asserts that it is `at` now (tokio's timer rounds deadlines up to the millisecond).
fn assert_now(at: Instant, what: &str) {
    let now = Instant::now();
    assert!(
        now >= at && now - at < Duration::from_millis(5),
        "{what}: {:?} off",
        if now >= at { now - at } else { at - now }
    );
}

/// A connection token of alice expiring at Unix second `exp`.
fn token(exp: u64) -> String {
    crate::auth::verifier::mint_hs256(SECRET, &serde_json::json!({"sub": "alice", "exp": exp}))
        .unwrap()
}

/// An edge with HMAC tokens, `auth.expired_close_delay_secs` of 5 and pings far apart (60 s).
async fn token_state() -> Arc<Edge> {
    state_with(serde_json::json!({
        "client": {"allow_anonymous": false, "ping_interval_secs": 60, "pong_timeout_secs": 10},
        "auth": {"hmac_secret_key": SECRET, "expired_close_delay_secs": 5}
    }))
    .await
}

#[tokio::test(start_paused = true)]
async fn pings_go_out_at_the_interval_and_a_missed_pong_closes_with_3012_on_time() {
    let edge = state_with(serde_json::json!({
        "client": {"ping_interval_secs": 5, "pong_timeout_secs": 3}
    }))
    .await;
    let start = Instant::now();
    let mut peer = start_on(edge, Encoding::Json, None);
    peer.send_json(&serde_json::json!({"id": 1, "connect": {}}));
    let reply = peer.json().await;
    assert_eq!(reply["connect"]["ping"], 5, "{reply}");
    // The first ping at 5 s, answered at once (an empty command); the second at 10 s, unanswered:
    // the connection closes when the pong timeout (3 s) has passed.
    assert_eq!(peer.next().await, Message::Text("{}".into()));
    assert_now(start + Duration::from_secs(5), "first ping");
    peer.send_json(&serde_json::json!({}));
    assert_eq!(peer.next().await, Message::Text("{}".into()));
    assert_now(start + Duration::from_secs(10), "second ping");
    assert_eq!(peer.close_code().await, 3012);
    assert_now(start + Duration::from_secs(13), "no pong");
}

#[tokio::test(start_paused = true)]
async fn a_connection_without_connect_closes_with_3502_at_the_connect_timeout() {
    let edge = state_with(serde_json::json!({
        "client": {"connect_timeout_secs": 7, "ping_interval_secs": 60, "pong_timeout_secs": 10}
    }))
    .await;
    let start = Instant::now();
    let mut peer = start_on(edge, Encoding::Json, None);
    assert_eq!(peer.close_code().await, 3502);
    assert_now(start + Duration::from_secs(7), "stale");
}

#[tokio::test(start_paused = true)]
async fn an_unrefreshed_connection_closes_with_3005_at_expiry_plus_delay() {
    let edge = token_state().await;
    let exp = edge.clock.unix_now() + 3;
    let due = edge.clock.instant_at(exp + 5);
    let mut peer = start_on(edge, Encoding::Json, None);
    peer.send_json(&serde_json::json!({"id": 1, "connect": {"token": token(exp)}}));
    let reply = peer.json().await;
    // The SDK is told to refresh within the token's life (its ttl, counted on the wall clock).
    assert_eq!(reply["connect"]["expires"], true, "{reply}");
    let ttl = reply["connect"]["ttl"].as_u64().unwrap();
    assert!((2..=3).contains(&ttl), "{reply}");
    assert_eq!(peer.close_code().await, 3005);
    assert_now(due, "expiry + delay");
}

#[tokio::test(start_paused = true)]
async fn refresh_outlives_the_first_token_and_an_expired_refresh_closes_with_3005() {
    let edge = token_state().await;
    let first = edge.clock.unix_now() + 3;
    let mut peer = start_on(edge.clone(), Encoding::Json, None);
    peer.send_json(&serde_json::json!({"id": 1, "connect": {"token": token(first)}}));
    assert_eq!(peer.json().await["connect"]["expires"], true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = edge.clock.unix_now() + 3600;
    peer.send_json(&serde_json::json!({"id": 2, "refresh": {"token": token(later)}}));
    let reply = peer.json().await;
    assert_eq!(reply["refresh"]["expires"], true, "{reply}");
    assert!(reply["refresh"]["ttl"].as_u64().unwrap() > 3500, "{reply}");
    // Past the first token's expiry and delay: nothing was sent (no close), and the session
    // still answers.
    tokio::time::sleep_until(edge.clock.instant_at(first + 5) + Duration::from_secs(5)).await;
    assert!(
        peer.from_session.try_recv().is_err(),
        "nothing sent meanwhile"
    );
    peer.send_json(&serde_json::json!({"id": 3, "ping": {}}));
    assert_eq!(peer.json().await["id"], 3);
    // A refresh with an expired token (of 1970) closes at once.
    peer.send_json(&serde_json::json!({"id": 4, "refresh": {"token": token(1_000_000)}}));
    assert_eq!(peer.close_code().await, 3005);
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
