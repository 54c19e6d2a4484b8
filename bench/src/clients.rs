//! The receivers whose arrival times the latency parts measure: WebSocket subscribers (JSON or
//! Protobuf) and a raw LISTEN connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::Relay;

/// A client WebSocket of the benchmark.
type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Deliveries seen by a receiver (WebSocket client or LISTEN connection): message id and arrival.
#[derive(Default)]
pub(crate) struct Sink {
    pub(crate) rows: Mutex<Vec<(String, Instant)>>,
    /// Publications whose offset was not the previous one + 1 (must stay 0).
    pub(crate) offset_gaps: AtomicU64,
}

impl Sink {
    pub(crate) fn take(&self) -> Vec<(String, Instant)> {
        std::mem::take(&mut *self.rows.lock().unwrap())
    }
    pub(crate) fn len(&self) -> usize {
        self.rows.lock().unwrap().len()
    }
}

/// Subscribes a raw Centrifugo-protocol client to `channel`; its task fills the sink.
pub(crate) async fn subscribe(
    relay: &Relay,
    channel: &str,
) -> Result<(Arc<Sink>, JoinHandle<Result<()>>)> {
    let url = format!("ws://{}/connection/websocket", relay.addr);
    let (mut ws, _) = connect_async(&url).await?;
    ws.send(Message::Text(r#"{"id":1,"connect":{}}"#.into()))
        .await?;
    ws.send(Message::Text(
        json!({"id": 2, "subscribe": {"channel": channel}})
            .to_string()
            .into(),
    ))
    .await?;
    // Wait for both replies.
    let mut replies = 0;
    while replies < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no reply to connect/subscribe")?
            .context("connection closed")??;
        if let Message::Text(t) = msg {
            for line in t.as_str().split('\n') {
                let v: Value = serde_json::from_str(line)?;
                if v.get("error").is_some() {
                    bail!("connect/subscribe failed: {v}");
                }
                if v.get("id").is_some() {
                    replies += 1;
                }
            }
        }
    }
    let sink = Arc::new(Sink::default());
    let s = sink.clone();
    let task = tokio::spawn(async move {
        let mut last_offset: Option<u64> = None;
        while let Some(msg) = ws.next().await {
            let Message::Text(t) = msg? else { continue };
            let now = Instant::now();
            let mut pong = false;
            let mut got = Vec::new();
            for line in t.as_str().split('\n') {
                if line == "{}" {
                    pong = true;
                    continue;
                }
                // A cheap scan instead of a JSON parse: with 100 subscribers at thousands of rows/s
                // this process must not become the bottleneck it measures.
                if !line.contains("\"pub\":") {
                    continue;
                }
                if let Some(off) = field_u64(line, "\"offset\":") {
                    if let Some(prev) = last_offset
                        && off != prev + 1
                    {
                        s.offset_gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    last_offset = Some(off);
                }
                if let Some(id) = field_str(line, "\"msg_id\":") {
                    got.push((id.to_owned(), now));
                }
            }
            s.rows.lock().unwrap().extend(got);
            if pong {
                ws.send(Message::Text("{}".into())).await?;
            }
        }
        Ok(())
    });
    Ok((sink, task))
}

/// A Protobuf-protocol WebSocket connected and subscribed to `channel` (both replies received).
async fn protobuf_connect(relay: &Relay, channel: &str) -> Result<WebSocket> {
    use prost::Message as _;
    use relay_protocol::pb::messages::{Command, ConnectRequest, Reply, SubscribeRequest};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/connection/websocket", relay.addr).into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "centrifuge-protobuf".parse()?);
    let (mut ws, _) = connect_async(request).await?;
    let mut frame = Vec::new();
    Command {
        id: 1,
        connect: Some(ConnectRequest::default()),
        ..Default::default()
    }
    .encode_length_delimited(&mut frame)?;
    Command {
        id: 2,
        subscribe: Some(SubscribeRequest {
            channel: channel.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_length_delimited(&mut frame)?;
    ws.send(Message::Binary(frame.into())).await?;
    let mut replies = 0;
    while replies < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no reply to connect/subscribe")?
            .context("connection closed")??;
        if let Message::Binary(b) = msg {
            let mut rest = &b[..];
            while !rest.is_empty() {
                let reply = Reply::decode_length_delimited(&mut rest)?;
                if let Some(e) = reply.error {
                    bail!("connect/subscribe failed: {e:?}");
                }
                if reply.id > 0 {
                    replies += 1;
                }
            }
        }
    }
    Ok(ws)
}

/// [`subscribe`] in the Protobuf protocol (`centrifuge-protobuf`: binary frames of length-delimited
/// `Command`s and `Reply`s; the ping is an empty `Reply`, answered with an empty `Command`).
pub(crate) async fn subscribe_protobuf(
    relay: &Relay,
    channel: &str,
) -> Result<(Arc<Sink>, JoinHandle<Result<()>>)> {
    use prost::Message as _;
    use relay_protocol::pb::messages::Reply;
    let mut ws = protobuf_connect(relay, channel).await?;
    let sink = Arc::new(Sink::default());
    let s = sink.clone();
    let task = tokio::spawn(async move {
        let mut last_offset: Option<u64> = None;
        while let Some(msg) = ws.next().await {
            let Message::Binary(b) = msg? else { continue };
            let now = Instant::now();
            let mut pong = false;
            let mut got = Vec::new();
            let mut rest = &b[..];
            while !rest.is_empty() {
                let reply = Reply::decode_length_delimited(&mut rest)?;
                let Some(publication) = reply.push.and_then(|p| p.r#pub) else {
                    pong |= reply.id == 0 && reply.error.is_none();
                    continue;
                };
                if let Some(prev) = last_offset
                    && publication.offset != prev + 1
                {
                    s.offset_gaps.fetch_add(1, Ordering::Relaxed);
                }
                last_offset = Some(publication.offset);
                // The data is the JSON of the row: the same cheap scan as the JSON client's.
                if let Ok(text) = std::str::from_utf8(&publication.data)
                    && let Some(id) = field_str(text, "\"msg_id\":")
                {
                    got.push((id.to_owned(), now));
                }
            }
            s.rows.lock().unwrap().extend(got);
            if pong {
                ws.send(Message::Binary(vec![0u8].into())).await?;
            }
        }
        Ok(())
    });
    Ok((sink, task))
}

/// The unsigned integer after `key` in `line`.
fn field_u64(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string value after `key` (`"name":`) in `line`: PostgreSQL's jsonb text puts a space after the
/// colon, the connector's own JSON does not.
fn field_str<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line[line.find(key)? + key.len()..]
        .trim_start()
        .strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// A raw LISTEN connection on `bench_raw`; its task fills the sink with the payloads.
pub(crate) async fn raw_listener(url: &str) -> Result<(Arc<Sink>, JoinHandle<Result<()>>)> {
    let mut l = PgListener::connect(url).await?;
    l.listen("bench_raw").await?;
    let sink = Arc::new(Sink::default());
    let s = sink.clone();
    let task = tokio::spawn(async move {
        loop {
            let n = l.recv().await?;
            let now = Instant::now();
            s.rows.lock().unwrap().push((n.payload().to_owned(), now));
        }
    });
    Ok((sink, task))
}
