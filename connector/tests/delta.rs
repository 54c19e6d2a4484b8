//! Fossil delta compression end to end: a real connector on port 0 and a fresh database; raw JSON
//! and raw Protobuf clients subscribe with `delta: "fossil"` on a channel whose `channels[]` entry
//! allows it, get `delta: true` in the subscribe reply, a full first publication, then deltas that
//! an applier written here (from the format description) turns back into the full payloads. A
//! subscriber without delta gets full payloads; recovery returns full publications; a channel
//! without `allowed_delta_types` declines; a subscribe `type` the relay does not serve is refused.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use relay_protocol::pb::messages::{Command, ConnectRequest, Reply, SubscribeRequest};
use serde_json::{Value, json};
use support::{Client, Server, TestDb, config_json};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

/// Applies a fossil delta to `base` (written from the format description: a base-64 length
/// header and `\n`, then `N@O,` copies from the base, `N:` literal inserts, and `C;` with the
/// checksum of the result: the sum of its big-endian 32-bit words, zero-padded).
fn apply(base: &[u8], delta: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";
    let mut at = 0usize;
    let int = |at: &mut usize| -> usize {
        let mut v = 0usize;
        while let Some(d) = delta
            .get(*at)
            .and_then(|c| DIGITS.iter().position(|x| x == c))
        {
            v = v * 64 + d;
            *at += 1;
        }
        v
    };
    let size = int(&mut at);
    assert_eq!(delta[at], b'\n', "header");
    at += 1;
    let mut out = Vec::with_capacity(size);
    loop {
        let n = int(&mut at);
        let op = delta[at];
        at += 1;
        match op {
            b'@' => {
                let from = int(&mut at);
                assert_eq!(delta[at], b',');
                at += 1;
                out.extend_from_slice(&base[from..from + n]);
            }
            b':' => {
                out.extend_from_slice(&delta[at..at + n]);
                at += n;
            }
            b';' => {
                let sum = out.chunks(4).fold(0u32, |s, c| {
                    let mut w = [0u8; 4];
                    w[..c.len()].copy_from_slice(c);
                    s.wrapping_add(u32::from_be_bytes(w))
                });
                assert_eq!(n as u32, sum, "checksum");
                assert_eq!(out.len(), size, "size");
                assert_eq!(at, delta.len(), "trailing bytes");
                return out;
            }
            other => panic!("bad delta command {:?}", other as char),
        }
    }
}

fn payload(n: u32) -> Value {
    json!({
        "title": "a document that changes a little between publications",
        "body": "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor — ünïcödé",
        "tags": ["alpha", "beta", "gamma", "delta"],
        "n": n,
    })
}

async fn server(db: &TestDb) -> Server {
    let config = config_json(
        &db.url,
        json!({"channels": [
            {"channel": "delta:*", "subscribe": "anyone", "publish": "anyone", "history": "anyone",
             "allowed_delta_types": ["fossil"]},
            {"channel": "plain:*", "subscribe": "anyone", "publish": "anyone"}
        ]}),
    );
    Server::start(&config).await
}

/// A JSON delta subscriber's view of a publication: (offset, was a delta, the payload).
fn json_apply(publication: &Value, prev: &mut Vec<u8>) -> (u64, bool, Value) {
    let text = publication["data"]
        .as_str()
        .expect("in delta mode data is a JSON string");
    let delta = publication["delta"] == json!(true);
    *prev = if delta {
        apply(prev, text.as_bytes())
    } else {
        text.as_bytes().to_vec()
    };
    (
        publication["offset"].as_u64().unwrap(),
        delta,
        serde_json::from_slice(prev).unwrap(),
    )
}

struct Pb {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pending: std::collections::VecDeque<Reply>,
}

impl Pb {
    async fn send(&mut self, command: Command) {
        let mut frame = Vec::new();
        command.encode_length_delimited(&mut frame).unwrap();
        self.ws.send(Message::Binary(frame.into())).await.unwrap();
    }

    async fn next(&mut self) -> Reply {
        loop {
            if let Some(r) = self.pending.pop_front() {
                if r != Reply::default() {
                    return r;
                }
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("no message within 20 s")
            {
                Some(Ok(Message::Binary(b))) => {
                    let mut rest = &b[..];
                    while !rest.is_empty() {
                        self.pending
                            .push_back(Reply::decode_length_delimited(&mut rest).unwrap());
                    }
                }
                Some(Ok(Message::Close(f))) => panic!("closed: {f:?}"),
                Some(Ok(_)) => {}
                other => panic!("failed: {other:?}"),
            }
        }
    }
}

/// A JSON client subscribed to `ch` with fossil deltas (recoverable, positioned), and the epoch of
/// the stream.
async fn json_delta_subscriber(url: &str, ch: &str) -> (Client, String) {
    let mut json_delta = Client::connected(url).await;
    let reply = json_delta
        .call(json!({"subscribe": {"channel": ch, "delta": "fossil", "recoverable": true, "positioned": true}}))
        .await;
    assert_eq!(reply["subscribe"]["delta"], json!(true), "{reply}");
    let epoch = reply["subscribe"]["epoch"]
        .as_str()
        .unwrap_or("")
        .to_owned();

    (json_delta, epoch)
}

/// A Protobuf client subscribed to `ch` with fossil deltas.
async fn protobuf_delta_subscriber(url: &str, ch: &str) -> Pb {
    let (ws, _) = connect_async(format!("{url}?cf_protocol=protobuf"))
        .await
        .unwrap();
    let mut pb = Pb {
        ws,
        pending: Default::default(),
    };
    pb.send(Command {
        id: 1,
        connect: Some(ConnectRequest::default()),
        ..Default::default()
    })
    .await;
    assert!(pb.next().await.connect.is_some());
    pb.send(Command {
        id: 2,
        subscribe: Some(SubscribeRequest {
            channel: ch.into(),
            delta: "fossil".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let sub = pb.next().await.subscribe.expect("subscribe result");
    assert!(sub.delta, "{sub:?}");

    pb
}

/// Publishes `payload(1..=4)` on `ch`; the publisher.
async fn publish_four(url: &str, ch: &str) -> Client {
    let mut publisher = Client::connected(url).await;
    for n in 1..=4 {
        let reply = publisher
            .call(json!({"publish": {"channel": ch, "data": payload(n)}}))
            .await;
        assert!(reply["publish"].is_object(), "{reply}");
    }

    publisher
}

#[tokio::test]
async fn json_delta_subscribers_get_a_full_publication_then_deltas_that_apply() {
    let db = TestDb::new().await;
    let server = server(&db).await;
    let url = server.ws_url();
    let ch = "delta:doc";
    let (mut json_delta, _epoch) = json_delta_subscriber(&url, ch).await;
    let mut plain = Client::connected(&url).await;
    let reply = plain.call(json!({"subscribe": {"channel": ch}})).await;
    assert!(reply["subscribe"].is_object(), "{reply}");
    assert!(reply["subscribe"].get("delta").is_none(), "{reply}");

    let _publisher = publish_four(&url, ch).await;

    let mut prev = Vec::new();
    let mut deltas = 0;
    for n in 1..=4 {
        let p = json_delta.next_pub(ch).await;
        let (offset, was_delta, data) = json_apply(&p, &mut prev);
        assert_eq!(offset, u64::from(n));
        assert_eq!(data, payload(n), "JSON delta subscriber, publication {n}");
        if n == 1 {
            assert!(!was_delta, "the first publication after subscribe is full");
        } else {
            assert!(was_delta, "publication {n} comes as a delta: {p}");
            assert!(
                p["data"].as_str().unwrap().len()
                    < serde_json::to_string(&payload(n)).unwrap().len() / 2,
                "the delta is much smaller than the payload: {p}"
            );
            deltas += 1;
        }
        let full = plain.next_pub(ch).await;
        assert!(full.get("delta").is_none(), "{full}");
        assert_eq!(full["data"], payload(n), "subscriber without delta");
    }
    assert_eq!(deltas, 3);

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_channel_whose_entry_does_not_allow_deltas_declines_them() {
    let db = TestDb::new().await;
    let server = server(&db).await;
    let url = server.ws_url();
    let ch = "delta:doc";
    let (mut json_delta, _epoch) = json_delta_subscriber(&url, ch).await;
    // A channel whose entry does not allow deltas declines (full payloads, no delta: true).
    let reply = json_delta
        .call(json!({"subscribe": {"channel": "plain:doc", "delta": "fossil"}}))
        .await;
    assert!(reply["subscribe"].is_object(), "{reply}");
    assert!(reply["subscribe"].get("delta").is_none(), "{reply}");

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn protobuf_delta_subscribers_get_deltas_that_apply() {
    let db = TestDb::new().await;
    let server = server(&db).await;
    let url = server.ws_url();
    let ch = "delta:doc";
    let mut pb = protobuf_delta_subscriber(&url, ch).await;
    let _publisher = publish_four(&url, ch).await;

    let mut prev = Vec::new();
    for n in 1..=4u32 {
        let publication = loop {
            if let Some(p) = pb.next().await.push.and_then(|p| p.r#pub) {
                break p;
            }
        };
        assert_eq!(publication.offset, u64::from(n));
        assert_eq!(publication.delta, n > 1, "Protobuf publication {n}");
        prev = if publication.delta {
            apply(&prev, &publication.data)
        } else {
            publication.data.to_vec()
        };
        assert_eq!(
            serde_json::from_slice::<Value>(&prev).unwrap(),
            payload(n),
            "Protobuf delta subscriber, publication {n}"
        );
    }

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn recovery_in_delta_mode_is_full_publications_then_live_ones() {
    let db = TestDb::new().await;
    let server = server(&db).await;
    let url = server.ws_url();
    let ch = "delta:doc";
    let (mut json_delta, epoch) = json_delta_subscriber(&url, ch).await;
    let mut publisher = publish_four(&url, ch).await;
    // The long-running subscriber has seen the four.
    for _ in 1..=4 {
        json_delta.next_pub(ch).await;
    }

    // Recovery: the missed publications come full (data strings), then the next live one full.
    let mut again = Client::connected(&url).await;
    let reply = again
        .call(
            json!({"subscribe": {"channel": ch, "delta": "fossil", "recover": true,
            "offset": 2, "epoch": epoch, "recoverable": true, "positioned": true}}),
        )
        .await;
    let result = &reply["subscribe"];
    assert_eq!(result["recovered"], json!(true), "{reply}");
    assert_eq!(result["delta"], json!(true), "{reply}");
    let recovered = result["publications"].as_array().unwrap();
    assert_eq!(recovered.len(), 2, "{reply}");
    for (p, n) in recovered.iter().zip(3..) {
        assert!(p.get("delta").is_none(), "{p}");
        let text = p["data"].as_str().expect("a JSON string in delta mode");
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), payload(n));
    }
    publisher
        .call(json!({"publish": {"channel": ch, "data": payload(5)}}))
        .await;
    let mut prev = Vec::new();
    let live = again.next_pub(ch).await;
    let (offset, was_delta, data) = json_apply(&live, &mut prev);
    assert_eq!((offset, was_delta, data), (5, false, payload(5)));
    // …while the long-running subscriber gets it as a delta.
    let p = json_delta.next_pub(ch).await;
    assert_eq!(p["delta"], json!(true), "{p}");

    server.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn subscription_types_the_relay_does_not_serve_are_refused() {
    let db = TestDb::new().await;
    let server = server(&db).await;
    let mut c = Client::connected(&server.ws_url()).await;
    for kind in [1, 2] {
        let reply = c
            .call(json!({"subscribe": {"channel": "delta:map", "type": kind}}))
            .await;
        assert_eq!(reply["error"]["code"], json!(108), "type {kind}: {reply}");
    }
    let reply = c
        .call(json!({"subscribe": {"channel": "delta:map", "type": 0}}))
        .await;
    assert!(
        reply["subscribe"].is_object(),
        "a stream is still served: {reply}"
    );
    server.stop().await;
    db.drop_db().await;
}
