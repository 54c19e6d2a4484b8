//! End-to-end tests of the HTTP-streaming and SSE transports and the `/emulation` endpoint: a real
//! connector on port 0, a fresh database, and a raw HTTP client (reqwest) that reads the response
//! body as it streams and posts commands as centrifuge-js does.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use relay_protocol::pb::messages::{Command, ConnectRequest, Reply, SubscribeRequest};
use serde_json::{Value, json};
use support::{Server, TestDb, config_json};

/// Which transport a [`Stream`] uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `POST /connection/http_stream`, JSON lines.
    HttpStream,
    /// `GET /connection/sse?cf_connect=...`.
    Sse,
}

/// A JSON stream and the ids the connect reply gave it.
struct Stream {
    response: reqwest::Response,
    kind: Kind,
    buf: BytesMut,
    pending: VecDeque<Value>,
    base: String,
    session: String,
    node: String,
    next_id: u32,
}

impl Stream {
    /// Opens a stream with `connect` as its first command and reads the connect reply.
    async fn connect(server: &Server, kind: Kind) -> (Self, Value) {
        let base = format!("http://{}", server.addr);
        let connect = json!({"id": 1, "connect": {"name": "rust-test"}}).to_string();
        let http = reqwest::Client::new();
        let response = match kind {
            Kind::HttpStream => http
                .post(format!("{base}/connection/http_stream"))
                .header("Content-Type", "application/json")
                .body(connect)
                .send()
                .await
                .unwrap(),
            Kind::Sse => http
                .get(format!("{base}/connection/sse"))
                .query(&[("cf_connect", connect)])
                .send()
                .await
                .unwrap(),
        };
        assert_eq!(response.status(), 200);
        if kind == Kind::Sse {
            assert_eq!(
                response.headers()["content-type"],
                "text/event-stream; charset=utf-8"
            );
        }
        let mut s = Self {
            response,
            kind,
            buf: BytesMut::new(),
            pending: VecDeque::new(),
            base,
            session: String::new(),
            node: String::new(),
            next_id: 2,
        };
        let reply = s.reply_to(1).await;
        let connect = reply["connect"].clone();
        s.session = connect["session"].as_str().unwrap().to_owned();
        s.node = connect["node"].as_str().unwrap().to_owned();
        // 128 random bits, in hex.
        assert_eq!(s.session.len(), 32, "{connect}");
        (s, connect)
    }

    /// The next message of the stream (`None` when it ends).
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Some(v);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("stream silent for 10 s")
                .unwrap()?;
            self.buf.extend_from_slice(&chunk);
            self.parse();
        }
    }

    fn parse(&mut self) {
        let (sep, prefix): (&[u8], &str) = match self.kind {
            Kind::HttpStream => (b"\n", ""),
            Kind::Sse => (b"\n\n", "data: "),
        };
        while let Some(at) = self.buf.windows(sep.len()).position(|w| w == sep) {
            let item = self.buf.split_to(at + sep.len());
            let text = std::str::from_utf8(&item[..at]).unwrap().trim_start();
            if text.is_empty() {
                continue;
            }
            let json = text
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{text}"));
            self.pending.push_back(serde_json::from_str(json).unwrap());
        }
    }

    /// The reply with `id`; the pushes read meanwhile stay for later reads (pings are dropped).
    async fn reply_to(&mut self, id: u32) -> Value {
        let mut skipped = Vec::new();
        loop {
            let v = self.next().await.expect("stream ended");
            if v["id"] == json!(id) {
                for v in skipped.into_iter().rev() {
                    self.pending.push_front(v);
                }
                return v;
            }
            if v != json!({}) {
                skipped.push(v);
            }
        }
    }

    /// Posts commands (JSON lines) to `/emulation`; returns the HTTP status.
    async fn post(&self, session: &str, commands: &[Value]) -> u16 {
        let data: Vec<String> = commands.iter().map(Value::to_string).collect();
        reqwest::Client::new()
            .post(format!("{}/emulation", self.base))
            .header("Content-Type", "application/json")
            .body(
                json!({"session": session, "node": self.node, "data": data.join("\n")}).to_string(),
            )
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn call(&mut self, mut command: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = json!(id);
        let session = self.session.clone();
        assert_eq!(self.post(&session, &[command]).await, 204);
        self.reply_to(id).await
    }

    /// The next publication push on `channel`.
    async fn next_pub(&mut self, channel: &str) -> Value {
        loop {
            let v = self.next().await.expect("stream ended");
            if v["push"]["channel"] == channel && v["push"]["pub"].is_object() {
                return v["push"]["pub"].clone();
            }
        }
    }

    /// The disconnect push that ends the stream, and that the stream ends after it.
    async fn disconnected(&mut self) -> Value {
        loop {
            match self.next().await {
                Some(v) if v["push"]["disconnect"].is_object() => {
                    let d = v["push"]["disconnect"].clone();
                    assert!(self.next().await.is_none(), "stream goes on after {d}");
                    return d;
                }
                Some(_) => {}
                None => panic!("stream ended without a disconnect push"),
            }
        }
    }
}

async fn subscribe_and_receive_in_order(kind: Kind) {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let (mut s, connect) = Stream::connect(&server, kind).await;
    assert!(connect["client"].is_string());
    assert_eq!(connect["pong"], true);
    let r = s
        .call(json!({"subscribe": {"channel": "incoming-chat"}}))
        .await;
    assert!(r["subscribe"].is_object(), "{r}");
    for i in 0..5 {
        db.insert_chat(&format!("m{i}"), &format!("text {i}")).await;
    }
    let mut offsets = Vec::new();
    for i in 0..5 {
        let p = s.next_pub("incoming-chat").await;
        assert_eq!(p["data"]["row"]["msg_data"], format!("text {i}"), "{p}");
        offsets.push(p["offset"].as_u64().unwrap());
    }
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "{offsets:?}");
    // A history call goes through /emulation too.
    let h = s
        .call(json!({"history": {"channel": "incoming-chat", "limit": 10}}))
        .await;
    assert_eq!(h["history"]["publications"].as_array().unwrap().len(), 5);
    // Shutdown ends the stream with the reconnect advice (3001), as the WebSocket's close code.
    server.stop().await;
    let d = s.disconnected().await;
    assert_eq!(d["code"], 3001, "{d}");
    db.drop_db().await;
}

#[tokio::test]
async fn http_stream_subscribe_receive_in_order_and_shutdown() {
    subscribe_and_receive_in_order(Kind::HttpStream).await;
}

#[tokio::test]
async fn sse_subscribe_receive_in_order_and_shutdown() {
    subscribe_and_receive_in_order(Kind::Sse).await;
}

#[tokio::test]
async fn publish_through_emulation_reaches_subscribers() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let (mut a, _) = Stream::connect(&server, Kind::Sse).await;
    let (mut b, _) = Stream::connect(&server, Kind::HttpStream).await;
    assert_ne!(a.session, b.session);
    for s in [&mut a, &mut b] {
        let r = s.call(json!({"subscribe": {"channel": "room"}})).await;
        assert!(r["subscribe"].is_object(), "{r}");
    }
    let r = a
        .call(json!({"publish": {"channel": "room", "data": {"text": "hi"}}}))
        .await;
    assert!(r["publish"].is_object(), "{r}");
    for s in [&mut a, &mut b] {
        let p = s.next_pub("room").await;
        assert_eq!(p["data"]["text"], "hi");
    }
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn emulation_refuses_unknown_sessions_and_bad_bodies() {
    let db = TestDb::new().await;
    let config = config_json(&db.url, json!({"client": {"max_message_bytes": 4096}}));
    let server = Server::start(&config).await;
    let (mut s, _) = Stream::connect(&server, Kind::HttpStream).await;
    let http = reqwest::Client::new();
    let url = format!("{}/emulation", s.base);
    // A guessed session: 204 as from Centrifugo, and its commands reach no session (the stream
    // gets no reply to them). Another node's: 500 (the SDK closes the stream and reconnects).
    let guessed = json!({"id": 77, "subscribe": {"channel": "guessed"}});
    assert_eq!(
        s.post("00000000000000000000000000000000", &[guessed]).await,
        204
    );
    let other_node = json!({"session": s.session, "node": "elsewhere", "data": "{}"}).to_string();
    let r = http.post(&url).body(other_node).send().await.unwrap();
    assert_eq!(r.status(), 500);
    // Not JSON, or data that is not the string of commands: 400.
    let r = http.post(&url).body("nonsense").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body = json!({"session": s.session, "node": s.node, "data": {"id": 9}}).to_string();
    assert_eq!(
        http.post(&url).body(body).send().await.unwrap().status(),
        400
    );
    // Over the message size limit: 413, and the session is untouched.
    let big = json!({"session": s.session, "node": s.node, "data": "x".repeat(5000)}).to_string();
    assert_eq!(
        http.post(&url).body(big).send().await.unwrap().status(),
        413
    );
    let r = s.call(json!({"subscribe": {"channel": "room"}})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    assert!(
        s.pending.iter().all(|m| m["id"] != 77),
        "the guessed session's command was run: {:?}",
        s.pending
    );
    // A malformed command through /emulation closes the session as on a WebSocket: 3501 bad
    // request (no reconnect), as a disconnect push.
    let session = s.session.clone();
    let malformed = json!({"session": session, "node": s.node, "data": "{not json"}).to_string();
    assert_eq!(
        http.post(&url)
            .body(malformed)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let d = s.disconnected().await;
    assert_eq!(d["code"], 3501, "{d}");
    // The session is gone: its commands are dropped (204), nothing runs them.
    assert_eq!(s.post(&session, &[json!({})]).await, 204);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn streams_take_connection_slots_and_need_a_connect() {
    let db = TestDb::new().await;
    let config = config_json(&db.url, json!({"client": {"max_connections": 1}}));
    let server = Server::start(&config).await;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    // SSE without cf_connect: 400; http_stream with an empty body: 400.
    let r = http
        .get(format!("{base}/connection/sse"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{base}/connection/http_stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (s, _) = Stream::connect(&server, Kind::Sse).await;
    // The one slot is taken: the next stream (and WebSocket) is refused with 503.
    let connect = json!({"id": 1, "connect": {}}).to_string();
    let r = http
        .post(format!("{base}/connection/http_stream"))
        .body(connect.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // The client goes away: the session ends and frees its slot.
    drop(s);
    let mut freed = false;
    for _ in 0..100 {
        let r = http
            .post(format!("{base}/connection/http_stream"))
            .body(connect.clone())
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "the slot of a dropped stream was not freed");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn stale_stream_without_connect_is_closed_3502() {
    let db = TestDb::new().await;
    let config = config_json(&db.url, json!({"client": {"connect_timeout_secs": 1}}));
    let server = Server::start(&config).await;
    // The first command is not a connect: the session waits for one and closes as stale.
    let r = reqwest::Client::new()
        .post(format!("http://{}/connection/http_stream", server.addr))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut s = Stream {
        response: r,
        kind: Kind::HttpStream,
        buf: BytesMut::new(),
        pending: VecDeque::new(),
        base: String::new(),
        session: String::new(),
        node: String::new(),
        next_id: 1,
    };
    let d = s.disconnected().await;
    assert_eq!(d["code"], 3502, "{d}");
    server.stop().await;
    db.drop_db().await;
}

/// Length-delimited Protobuf messages of a stream.
fn split(buf: &mut BytesMut) -> Vec<Reply> {
    let mut out = Vec::new();
    loop {
        let Ok(len) = prost::decode_length_delimiter(&buf[..]) else {
            return out;
        };
        let head = prost::length_delimiter_len(len);
        if buf.len() < head + len {
            return out;
        }
        let msg = buf.split_to(head + len);
        out.push(Reply::decode(&msg[head..]).unwrap());
    }
}

#[tokio::test]
async fn http_stream_protobuf() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let connect = Command {
        id: 1,
        connect: Some(ConnectRequest {
            name: "rust-test".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut response = http
        .post(format!("{base}/connection/http_stream"))
        .header("Content-Type", "application/octet-stream")
        .body(connect.encode_length_delimited_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut buf = BytesMut::new();
    let mut replies = VecDeque::new();
    let mut next = async || -> Reply {
        loop {
            if let Some(r) = replies.pop_front() {
                return r;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
                .await
                .unwrap()
                .unwrap()
                .expect("stream ended");
            buf.extend_from_slice(&chunk);
            replies.extend(split(&mut buf));
        }
    };
    let first = next().await;
    let result = first.connect.expect("connect reply");
    assert_eq!(result.session.len(), 32);
    assert!(!result.node.is_empty());
    // The Protobuf EmulationRequest: node 1, session 2, data 3 (length-delimited commands).
    let subscribe = Command {
        id: 2,
        subscribe: Some(SubscribeRequest {
            channel: "incoming-chat".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut request = Vec::new();
    prost::encoding::string::encode(1, &result.node, &mut request);
    prost::encoding::string::encode(2, &result.session, &mut request);
    prost::encoding::bytes::encode(
        3,
        &Bytes::from(subscribe.encode_length_delimited_to_vec()),
        &mut request,
    );
    let status = http
        .post(format!("{base}/emulation"))
        .header("Content-Type", "application/octet-stream")
        .body(request)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 204);
    let reply = loop {
        let r = next().await;
        if r.id == 2 {
            break r;
        }
    };
    assert!(reply.subscribe.is_some(), "{reply:?}");
    db.insert_chat("p1", "over protobuf").await;
    let publication = loop {
        let r = next().await;
        if let Some(p) = r.push.and_then(|p| p.r#pub) {
            break p;
        }
    };
    let data: Value = serde_json::from_slice(&publication.data).unwrap();
    assert_eq!(data["row"]["msg_data"], "over protobuf");
    server.stop().await;
    let disconnect = loop {
        let r = next().await;
        if let Some(d) = r.push.and_then(|p| p.disconnect) {
            break d;
        }
    };
    assert_eq!(disconnect.code, 3001);
    db.drop_db().await;
}

#[tokio::test]
async fn pings_are_answered_through_emulation_or_the_stream_closes_3012() {
    let db = TestDb::new().await;
    let config = config_json(
        &db.url,
        json!({"client": {"ping_interval_secs": 1, "pong_timeout_secs": 1}}),
    );
    let server = Server::start(&config).await;
    let (mut answering, _) = Stream::connect(&server, Kind::Sse).await;
    let (mut silent, _) = Stream::connect(&server, Kind::HttpStream).await;
    // The answering client posts the pong (an empty command) for every ping ({}) it reads.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while tokio::time::Instant::now() < until {
        let next = tokio::time::timeout(Duration::from_millis(300), answering.next()).await;
        if let Ok(Some(m)) = next
            && m == json!({})
        {
            pings += 1;
            let session = answering.session.clone();
            assert_eq!(answering.post(&session, &[json!({})]).await, 204);
        }
    }
    assert!(pings >= 2, "pings: {pings}");
    // The silent one was closed with 3012 (no pong) meanwhile; the answering one still works.
    let d = silent.disconnected().await;
    assert_eq!(d["code"], 3012, "{d}");
    let r = answering
        .call(json!({"subscribe": {"channel": "room"}}))
        .await;
    assert!(r["subscribe"].is_object(), "{r}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn origins_cors_and_an_oversized_connect() {
    let db = TestDb::new().await;
    let config = config_json(
        &db.url,
        json!({"client": {"allowed_origins": ["https://app.example"], "max_message_bytes": 4096}}),
    );
    let server = Server::start(&config).await;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let connect = json!({"id": 1, "connect": {}}).to_string();
    // An Origin that is not allowed: 403 before any session, as for the WebSocket upgrade.
    for path in ["/connection/http_stream", "/emulation"] {
        let r = http
            .post(format!("{base}{path}"))
            .header("Origin", "https://evil.example")
            .body(connect.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    let r = http
        .get(format!("{base}/connection/sse"))
        .header("Origin", "https://evil.example")
        .query(&[("cf_connect", connect.clone())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The preflight of an allowed origin, and the stream itself: CORS headers echo it.
    let r = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{base}/connection/http_stream"),
        )
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(r.headers()["access-control-allow-headers"], "content-type");
    let mut r = http
        .post(format!("{base}/connection/http_stream"))
        .header("Origin", "https://app.example")
        .body(connect.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    let first = tokio::time::timeout(Duration::from_secs(10), r.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let reply: Value = serde_json::from_slice(first.strip_suffix(b"\n").unwrap()).unwrap();
    assert!(reply["connect"]["session"].is_string(), "{reply}");
    drop(r);
    // A connect body over client.max_message_bytes: 413, no session.
    let r = http
        .post(format!("{base}/connection/http_stream"))
        .body(format!(
            "{{\"id\":1,\"connect\":{{\"name\":\"{}\"}}}}",
            "x".repeat(5000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    server.stop().await;
    db.drop_db().await;
}
