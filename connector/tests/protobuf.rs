//! End-to-end tests of the Protobuf protocol: a real connector on port 0, a fresh database, and a
//! raw client that speaks only Protobuf (binary frames of varint-delimited `Command`s and
//! `Reply`s, with the generated types of `relay_protocol::pb::messages`).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use relay_protocol::pb::messages::{
    Command, ConnectRequest, HistoryRequest, PresenceRequest, PresenceStatsRequest, PublishRequest,
    Reply, SubscribeRequest, SubscribeResult,
};
use serde_json::{Value, json};
use support::{Server, TestDb, config_json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// How the client asks for Protobuf.
enum Select {
    /// The `centrifuge-protobuf` subprotocol (what the Protobuf SDKs send).
    Subprotocol,
    /// `?cf_protocol=protobuf`, no subprotocol.
    Query,
}

/// A raw Protobuf protocol client.
struct PbClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<Reply>,
    next_id: u32,
    /// Whether an empty Reply (the server ping) was seen.
    pings: usize,
}

impl PbClient {
    async fn open(base: &str, select: Select) -> Self {
        let (ws, response) = match select {
            Select::Subprotocol => {
                let mut request = base.into_client_request().unwrap();
                request.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    "centrifuge-protobuf".parse().unwrap(),
                );
                connect_async(request).await.unwrap()
            }
            Select::Query => connect_async(format!("{base}?cf_protocol=protobuf"))
                .await
                .unwrap(),
        };
        let echoed = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_owned());
        match select {
            Select::Subprotocol => assert_eq!(echoed.as_deref(), Some("centrifuge-protobuf")),
            Select::Query => assert_eq!(echoed, None),
        }
        Self {
            ws,
            pending: VecDeque::new(),
            next_id: 1,
            pings: 0,
        }
    }

    /// Opens and sends `connect`; returns the client and its connection id.
    async fn connected(base: &str, select: Select) -> (Self, String) {
        let mut c = Self::open(base, select).await;
        let reply = c
            .call(Command {
                connect: Some(ConnectRequest {
                    name: "rust-test".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        let result = reply.connect.expect("connect result");
        assert!(!result.client.is_empty());
        assert!(result.pong && result.ping > 0, "{result:?}");
        (c, result.client)
    }

    async fn send_frame(&mut self, commands: &[Command]) {
        let mut frame = Vec::new();
        for c in commands {
            c.encode_length_delimited(&mut frame).unwrap();
        }
        self.ws.send(Message::Binary(frame.into())).await.unwrap();
    }

    /// Subscribes with `request`; the subscribe result (a reply without one fails the test).
    async fn subscribed(&mut self, request: SubscribeRequest) -> SubscribeResult {
        self.call(Command {
            subscribe: Some(request),
            ..Default::default()
        })
        .await
        .subscribe
        .expect("subscribe result")
    }

    async fn call(&mut self, mut command: Command) -> Reply {
        let id = self.next_id;
        self.next_id += 1;
        command.id = id;
        self.send_frame(&[command]).await;
        let mut kept = Vec::new();
        loop {
            let m = self.next_message().await;
            if m.id == id {
                for k in kept.into_iter().rev() {
                    self.pending.push_front(k);
                }
                return m;
            }
            kept.push(m);
        }
    }

    /// The next reply or push (pings are counted and skipped), within 20 s.
    async fn next_message(&mut self) -> Reply {
        loop {
            if let Some(m) = self.pending.pop_front() {
                if m == Reply::default() {
                    self.pings += 1;
                    continue;
                }
                return m;
            }
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("no message within 20 s");
            match msg {
                Some(Ok(Message::Binary(frame))) => {
                    let mut rest = &frame[..];
                    assert!(!rest.is_empty(), "empty binary frame");
                    while !rest.is_empty() {
                        let reply = Reply::decode_length_delimited(&mut rest).unwrap();
                        self.pending.push_back(reply);
                    }
                }
                Some(Ok(Message::Text(t))) => panic!("text frame on a Protobuf connection: {t}"),
                Some(Ok(Message::Close(f))) => panic!("connection closed: {f:?}"),
                Some(Ok(_)) => {}
                other => panic!("connection failed: {other:?}"),
            }
        }
    }

    /// The next publication push on `channel`, its data parsed as JSON.
    async fn next_pub(&mut self, channel: &str) -> (u64, Value) {
        let (offset, data) = self.next_pub_bytes(channel).await;
        (offset, serde_json::from_slice(&data).unwrap())
    }

    /// The next publication push on `channel`: its offset and its data's bytes, as sent.
    async fn next_pub_bytes(&mut self, channel: &str) -> (u64, Bytes) {
        loop {
            let m = self.next_message().await;
            if let Some(push) = m.push
                && push.channel == channel
                && let Some(p) = push.r#pub
            {
                return (p.offset, p.data);
            }
        }
    }

    /// Waits for the server's close frame; returns its code.
    async fn closed(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("no close within 20 s")
            {
                Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return 0,
                Some(Ok(_)) => {}
            }
        }
    }
}

fn subscribe(channel: &str) -> SubscribeRequest {
    SubscribeRequest {
        channel: channel.into(),
        recoverable: true,
        positioned: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn protobuf_subscribers_receive_in_order_and_read_history() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;

    let (mut c, _) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;
    let sub = c.subscribed(subscribe("incoming-chat")).await;
    assert!(sub.recoverable && sub.positioned);
    assert_eq!(sub.offset, 0);
    let epoch = sub.epoch.clone();
    assert!(!epoch.is_empty());

    db.insert_chat("m1", "hello").await;
    db.insert_chat("m2", "world").await;
    let (o1, d1) = c.next_pub("incoming-chat").await;
    let (o2, d2) = c.next_pub("incoming-chat").await;
    assert_eq!((o1, o2), (1, 2), "in order");
    assert_eq!(d1["type"], "INSERT");
    assert_eq!(d1["row"]["msg_data"], "hello");
    assert_eq!(d2["row"]["msg_data"], "world");

    let history = c
        .call(Command {
            history: Some(HistoryRequest {
                channel: "incoming-chat".into(),
                limit: 10,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .history
        .expect("history result");
    assert_eq!(history.offset, 2);
    assert_eq!(history.epoch, epoch);
    let offsets: Vec<u64> = history.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [1, 2]);
    let first: Value = serde_json::from_slice(&history.publications[0].data).unwrap();
    assert_eq!(first["row"]["msg_data"], "hello");
    server.stop().await;
    db.drop_db().await;
}

/// A Protobuf client subscribed to `incoming-chat` (recoverable, positioned) that received two
/// inserted rows (`m1`, `m2`) and went away; the channel's epoch.
async fn two_received_then_away(db: &TestDb, server: &Server) -> String {
    let (mut c, _) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;
    let sub = c.subscribed(subscribe("incoming-chat")).await;
    db.insert_chat("m1", "hello").await;
    db.insert_chat("m2", "world").await;
    c.next_pub("incoming-chat").await;
    c.next_pub("incoming-chat").await;
    sub.epoch
}

#[tokio::test]
async fn protobuf_resubscribe_recovers_what_was_missed() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let epoch = two_received_then_away(&db, &server).await;

    // Missed while away, recovered on resubscribe (this time Protobuf chosen by the query).
    db.insert_chat("m3", "away 1").await;
    db.insert_chat("m4", "away 2").await;
    // Rows written by SQL are in the history a sequencing pass after their commit: wait for it, so
    // the resubscribe below recovers them (rather than getting them live).
    for _ in 0..500 {
        let top: Option<i64> = sqlx::query_scalar(
            "SELECT top_offset FROM relay.channels WHERE name = 'incoming-chat'",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if top == Some(4) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (mut c, _) = PbClient::connected(&server.ws_url(), Select::Query).await;
    let r = c
        .subscribed(SubscribeRequest {
            recover: true,
            offset: 2,
            epoch: epoch.clone(),
            ..subscribe("incoming-chat")
        })
        .await;
    assert!(r.was_recovering && r.recovered, "{r:?}");
    let offsets: Vec<u64> = r.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [3, 4]);
    let away: Value = serde_json::from_slice(&r.publications[1].data).unwrap();
    assert_eq!(away["row"]["msg_data"], "away 2");
    db.insert_chat("m5", "live").await;
    assert_eq!(c.next_pub("incoming-chat").await.0, 5);

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn protobuf_unrecoverable_position_with_the_error_flag_is_112() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let (mut c, _) = PbClient::connected(&server.ws_url(), Select::Query).await;
    // A position that cannot be recovered, with the flag that asks for an error: 112.
    let r = c
        .call(Command {
            subscribe: Some(SubscribeRequest {
                recover: true,
                offset: 1,
                epoch: "another epoch".into(),
                flag: 2,
                ..subscribe("other")
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(r.error.expect("error").code, 112);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn json_and_protobuf_subscribers_get_the_same_publication() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let (mut p, _) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;
    p.call(Command {
        subscribe: Some(subscribe("incoming-chat")),
        ..Default::default()
    })
    .await;
    let mut j = support::Client::connected(&server.ws_url()).await;
    j.call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    db.insert_chat("m1", "both").await;
    let (offset, data) = p.next_pub("incoming-chat").await;
    let json_pub = j.next_pub("incoming-chat").await;
    assert_eq!(offset, 1);
    assert_eq!(json_pub["offset"], 1);
    assert_eq!(data, json_pub["data"], "the same payload in both encodings");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn presence_join_push_and_stats() {
    let db = TestDb::new().await;
    let config = config_json(
        &db.url,
        json!({"presence": {"engine": "postgres", "channels": [{"channel": "room:*"}]}}),
    );
    let server = Server::start(&config).await;
    let (mut a, a_client) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;
    let (mut b, b_client) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;
    let join_leave = |channel: &str| SubscribeRequest {
        join_leave: true,
        ..subscribe(channel)
    };
    a.subscribed(join_leave("room:1")).await;
    b.subscribed(join_leave("room:1")).await;
    let join = loop {
        let m = a.next_message().await;
        if let Some(push) = m.push
            && push.channel == "room:1"
            && let Some(join) = push.join
        {
            let info = join.info.unwrap();
            if info.client == b_client {
                break info;
            }
        }
    };
    assert_eq!(join.client, b_client);

    let presence = a
        .call(Command {
            presence: Some(PresenceRequest {
                channel: "room:1".into(),
            }),
            ..Default::default()
        })
        .await
        .presence
        .expect("presence result");
    assert!(presence.presence.contains_key(&a_client), "{presence:?}");
    assert_eq!(presence.presence[&b_client].client, b_client);
    let stats = a
        .call(Command {
            presence_stats: Some(PresenceStatsRequest {
                channel: "room:1".into(),
            }),
            ..Default::default()
        })
        .await
        .presence_stats
        .expect("presence_stats result");
    assert_eq!(stats.num_clients, 2);
    // No presence on this channel: 108, as in JSON.
    let r = a
        .call(Command {
            presence: Some(PresenceRequest {
                channel: "other".into(),
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(r.error.expect("error").code, 108);
    server.stop().await;
    db.drop_db().await;
}

/// Envelopes the fake rule target received.
type Seen = Arc<Mutex<Vec<Value>>>;

async fn fake_target() -> (String, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Seen>, body: String| async move {
                    seen.lock()
                        .unwrap()
                        .push(serde_json::from_str(&body).unwrap());
                    r#"{"ok":true}"#
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), seen)
}

#[tokio::test]
async fn publish_through_a_rule() {
    let db = TestDb::new().await;
    let (url, seen) = fake_target().await;
    let config = config_json(
        &db.url,
        json!({
            "client": {"allow_publish": false},
            "rules": [{"channel": "outgoing-chat", "target": {"type": "http", "url": url}}]
        }),
    );
    let server = Server::start(&config).await;
    let (mut c, client) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;
    let data = json!({"name": "chatMsg", "data": {"content": "hi from protobuf"}});
    let r = c
        .call(Command {
            publish: Some(PublishRequest {
                channel: "outgoing-chat".into(),
                data: Bytes::from(data.to_string()),
            }),
            ..Default::default()
        })
        .await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.publish.is_some(), "{r:?}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let m = &seen[0]["messages"][0];
        assert_eq!(m["name"], "chatMsg");
        assert_eq!(m["connectionId"], json!(client));
        let payload: Value = serde_json::from_str(m["data"].as_str().unwrap()).unwrap();
        assert_eq!(payload["content"], "hi from protobuf");
    }
    // Data that is not JSON: a bad-request reply, the target is not called, the connection stays.
    let r = c
        .call(Command {
            publish: Some(PublishRequest {
                channel: "outgoing-chat".into(),
                data: Bytes::from_static(&[0xff, 0x00, 0x01]),
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(r.error.expect("error").code, 107);
    assert_eq!(seen.lock().unwrap().len(), 1);
    // Not allowed without a rule or allow_publish: 103.
    let r = c
        .call(Command {
            publish: Some(PublishRequest {
                channel: "elsewhere".into(),
                data: Bytes::from_static(b"{}"),
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(r.error.expect("error").code, 103);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn ping_is_an_empty_reply_and_an_empty_command_is_the_pong() {
    let db = TestDb::new().await;
    let config = config_json(
        &db.url,
        json!({"client": {"ping_interval_secs": 1, "pong_timeout_secs": 1}}),
    );
    let server = Server::start(&config).await;
    let (mut answers, _) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;
    let (mut silent, _) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;

    // The client that answers every ping with an empty Command stays connected for 4 intervals.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        let before = answers.pings;
        let frame = tokio::time::timeout(Duration::from_secs(3), answers.ws.next())
            .await
            .expect("a ping within 3 s")
            .unwrap()
            .unwrap();
        match frame {
            Message::Binary(b) => {
                assert_eq!(
                    &b[..],
                    [0],
                    "the ping is an empty Reply: one zero length byte"
                );
                answers.pings = before + 1;
                answers.send_frame(&[Command::default()]).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(answers.pings >= 3, "pings: {}", answers.pings);
    let r = answers
        .call(Command {
            presence_stats: Some(PresenceStatsRequest {
                channel: "x".into(),
            }),
            ..Default::default()
        })
        .await;
    assert!(r.error.is_some(), "still connected and answered: {r:?}");

    // The one that never answers is closed with 3012 (no pong).
    assert_eq!(silent.closed().await, 3012);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn malformed_frames_close_with_bad_request() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let url = server.ws_url();

    // A length prefix that points past the end of the frame.
    let (mut c, _) = PbClient::connected(&url, Select::Subprotocol).await;
    c.ws.send(Message::Binary(vec![5, 1, 2].into()))
        .await
        .unwrap();
    assert_eq!(c.closed().await, 3501);

    // A varint that never ends.
    let (mut c, _) = PbClient::connected(&url, Select::Subprotocol).await;
    c.ws.send(Message::Binary(vec![0xff; 12].into()))
        .await
        .unwrap();
    assert_eq!(c.closed().await, 3501);

    // A well-framed message that is not a Command (field 1 with wire type 7).
    let (mut c, _) = PbClient::connected(&url, Select::Subprotocol).await;
    c.ws.send(Message::Binary(vec![1, 0x0f].into()))
        .await
        .unwrap();
    assert_eq!(c.closed().await, 3501);

    // A request without an id, as in JSON.
    let (mut c, _) = PbClient::connected(&url, Select::Subprotocol).await;
    c.send_frame(&[Command {
        subscribe: Some(subscribe("incoming-chat")),
        ..Default::default()
    }])
    .await;
    assert_eq!(c.closed().await, 3501);

    // A text frame on a Protobuf connection: the wrong protocol.
    let (mut c, _) = PbClient::connected(&url, Select::Subprotocol).await;
    c.ws.send(Message::Text("{}".into())).await.unwrap();
    assert_eq!(c.closed().await, 3506);

    // Over the message size limit: 1009, as for text frames.
    let (mut c, _) = PbClient::connected(&url, Select::Subprotocol).await;
    c.ws.send(Message::Binary(vec![0u8; 1 << 20].into()))
        .await
        .unwrap();
    assert_eq!(c.closed().await, 1009);

    // Commands before connect are refused as in JSON.
    let mut c = PbClient::open(&url, Select::Subprotocol).await;
    c.send_frame(&[Command {
        id: 1,
        subscribe: Some(subscribe("incoming-chat")),
        ..Default::default()
    }])
    .await;
    assert_eq!(c.closed().await, 3501);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn connect_and_subscribe_in_one_frame() {
    // The Protobuf SDKs batch like centrifuge-js: connect and the subscribes in one frame.
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let mut c = PbClient::open(&server.ws_url(), Select::Subprotocol).await;
    c.send_frame(&[
        Command {
            id: 1,
            connect: Some(ConnectRequest::default()),
            ..Default::default()
        },
        Command {
            id: 2,
            subscribe: Some(subscribe("incoming-chat")),
            ..Default::default()
        },
    ])
    .await;
    let first = c.next_message().await;
    let second = c.next_message().await;
    assert_eq!(first.id, 1);
    assert!(first.connect.is_some(), "{first:?}");
    assert_eq!(second.id, 2);
    assert!(second.subscribe.is_some(), "{second:?}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn publication_data_comes_back_byte_for_byte() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let (mut p, _) = PbClient::connected(&server.ws_url(), Select::Subprotocol).await;
    let r = p
        .call(Command {
            subscribe: Some(subscribe("news")),
            ..Default::default()
        })
        .await;
    assert!(r.error.is_none(), "{r:?}");
    let mut j = support::Client::connected(&server.ws_url()).await;
    let r = j.call(json!({"subscribe": {"channel": "news"}})).await;
    assert!(r.get("error").is_none(), "{r}");

    // What centrifuge-js's Protobuf suite checks: the bytes it published, back unchanged.
    let publish = |data: &'static [u8]| Command {
        publish: Some(PublishRequest {
            channel: "news".into(),
            data: Bytes::from_static(data),
        }),
        ..Default::default()
    };
    let r = p.call(publish(br#"{"my":"data"}"#)).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(
        p.next_pub_bytes("news").await,
        (1, Bytes::from_static(br#"{"my":"data"}"#))
    );
    assert_eq!(j.next_pub("news").await["data"], json!({"my": "data"}));

    // A JSON client's data keeps its key order and spacing too.
    j.send_raw(r#"{"id":900,"publish":{"channel":"news","data":{"b":1, "a":[2,3],"b2":{}}}}"#)
        .await;
    assert_eq!(
        p.next_pub_bytes("news").await,
        (2, Bytes::from_static(br#"{"b":1, "a":[2,3],"b2":{}}"#))
    );

    // Data over several lines is put on one (JSON-protocol frames are newline-delimited): the JSON
    // subscriber still reads a well-formed frame.
    let r = p
        .call(publish(b"{\n  \"x\": 1,\r\n  \"y\": [true]\n}"))
        .await;
    assert!(r.error.is_none(), "{r:?}");
    let (offset, data) = p.next_pub_bytes("news").await;
    assert_eq!(offset, 3);
    assert!(!data.contains(&b'\n') && !data.contains(&b'\r'), "{data:?}");
    let seen: Value = serde_json::from_slice(&data).unwrap();
    assert_eq!(seen, json!({"x": 1, "y": [true]}));
    let mut from_json = Vec::new();
    for _ in 0..2 {
        from_json.push(j.next_pub("news").await["data"].clone());
    }
    assert_eq!(from_json[0], json!({"b": 1, "a": [2, 3], "b2": {}}));
    assert_eq!(from_json[1], json!({"x": 1, "y": [true]}), "{from_json:?}");

    // History hands out the same bytes.
    let h = p
        .call(Command {
            history: Some(HistoryRequest {
                channel: "news".into(),
                limit: 10,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .history
        .unwrap();
    let datas: Vec<Bytes> = h.publications.into_iter().map(|p| p.data).collect();
    assert_eq!(datas[0], Bytes::from_static(br#"{"my":"data"}"#));
    assert_eq!(
        datas[1],
        Bytes::from_static(br#"{"b":1, "a":[2,3],"b2":{}}"#)
    );
    assert_eq!(datas[2], data);
    server.stop().await;
    db.drop_db().await;
}
