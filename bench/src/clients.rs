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
use tokio_tungstenite::connect_async_with_config;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::harness::Relay;

/// The subscribers' read buffer. tungstenite zero-fills the free part of its read buffer (128 KiB
/// by default) before every read; with 100 subscribers reading thousands of small frames a second
/// that memset was 9 % of this process's CPU, on the cores the relay is measured on. The subscribers
/// stand for clients on other machines, so the harness keeps its own cost low.
const CLIENT_READ_BUFFER: usize = 8 * 1024;

/// Opens a subscriber's WebSocket with [`CLIENT_READ_BUFFER`].
async fn open_websocket<R>(request: R) -> Result<WebSocket>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
    let (ws, _) = connect_async_with_config(request, Some(config), false).await?;
    Ok(ws)
}

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
    let mut ws = open_websocket(&url).await?;
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
        let msg = handshake_frame(&mut ws).await?;
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
    Ok(spawn_reader(ws, || Message::Text("{}".into()), scan_json))
}

/// The next frame while the connect and subscribe replies are awaited (10 s at most).
async fn handshake_frame(ws: &mut WebSocket) -> Result<Message> {
    Ok(tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .context("no reply to connect/subscribe")?
        .context("connection closed")??)
}

/// A subscriber's reading state: the sink it fills, the last publication offset, and the frame
/// being read (its arrival and the message ids of its publications).
struct Reader {
    sink: Arc<Sink>,
    last_offset: Option<u64>,
    now: Instant,
    got: Vec<(String, Instant)>,
}

impl Reader {
    /// A publication at `offset`: a gap unless it follows the previous one.
    fn offset(&mut self, offset: u64) {
        if let Some(prev) = self.last_offset
            && offset != prev + 1
        {
            self.sink.offset_gaps.fetch_add(1, Ordering::Relaxed);
        }
        self.last_offset = Some(offset);
    }

    /// A publication with message id `id`, arrived with the frame.
    fn id(&mut self, id: &str) {
        self.got.push((id.to_owned(), self.now));
    }
}

/// The task that reads `ws` into a new sink: `scan` reads one frame's publications into the reader
/// and says whether the frame held a ping, answered with `pong()`.
fn spawn_reader(
    mut ws: WebSocket,
    pong: fn() -> Message,
    scan: fn(Message, &mut Reader) -> Result<bool>,
) -> (Arc<Sink>, JoinHandle<Result<()>>) {
    let sink = Arc::new(Sink::default());
    let mut reader = Reader {
        sink: sink.clone(),
        last_offset: None,
        now: Instant::now(),
        got: Vec::new(),
    };
    let task = tokio::spawn(async move {
        while let Some(msg) = ws.next().await {
            reader.now = Instant::now();
            let ping = scan(msg?, &mut reader)?;
            let got = std::mem::take(&mut reader.got);
            reader.sink.rows.lock().unwrap().extend(got);
            if ping {
                ws.send(pong()).await?;
            }
        }
        Ok(())
    });
    (sink, task)
}

/// A JSON-protocol frame (newline-delimited replies; the ping is `{}`).
fn scan_json(msg: Message, reader: &mut Reader) -> Result<bool> {
    let Message::Text(t) = msg else {
        return Ok(false);
    };
    let mut ping = false;
    for line in t.as_str().split('\n') {
        if line == "{}" {
            ping = true;
            continue;
        }
        // A cheap scan instead of a JSON parse: with 100 subscribers at thousands of rows/s this
        // process must not become the bottleneck it measures.
        if !line.contains("\"pub\":") {
            continue;
        }
        if let Some(off) = field_u64(line, "\"offset\":") {
            reader.offset(off);
        }
        if let Some(id) = field_str(line, "\"msg_id\":") {
            reader.id(id);
        }
    }
    Ok(ping)
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
    let mut ws = open_websocket(request).await?;
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
        let msg = handshake_frame(&mut ws).await?;
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
    let ws = protobuf_connect(relay, channel).await?;
    Ok(spawn_reader(
        ws,
        || Message::Binary(vec![0u8].into()),
        scan_protobuf,
    ))
}

/// A Protobuf-protocol frame (length-delimited replies; the ping is an empty `Reply`).
fn scan_protobuf(msg: Message, reader: &mut Reader) -> Result<bool> {
    use prost::Message as _;
    use relay_protocol::pb::messages::Reply;
    let Message::Binary(b) = msg else {
        return Ok(false);
    };
    let mut ping = false;
    let mut rest = &b[..];
    while !rest.is_empty() {
        let reply = Reply::decode_length_delimited(&mut rest)?;
        let Some(publication) = reply.push.and_then(|p| p.r#pub) else {
            ping |= reply.id == 0 && reply.error.is_none();
            continue;
        };
        reader.offset(publication.offset);
        // The data is the JSON of the row: the same cheap scan as the JSON client's.
        if let Ok(text) = std::str::from_utf8(&publication.data)
            && let Some(id) = field_str(text, "\"msg_id\":")
        {
            reader.id(id);
        }
    }
    Ok(ping)
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
