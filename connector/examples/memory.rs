//! Memory per idle subscribed WebSocket connection, and fan-out speed, of connector binaries run as
//! separate processes (so the clients, in this process, are never counted). See
//! `docs/benchmarks.md` ("Memory per idle connection").
//!
//! ```text
//! cargo run --release -p connector --example memory -- \
//!     --connector target/release/connector [--connector other/connector] \
//!     [--n 10000] [--subs 1000] [--burst 1000] [--bursts 3] [--reps 2] [--port 56400]
//! ```
//!
//! For every repetition and every binary (interleaved, the order alternating between repetitions), in
//! one throwaway database (`memory_<random>`, dropped at the end):
//! 1. start the connector on a loopback port and wait for `/readyz`; read its RSS (`VmRSS`);
//! 2. open `--n` raw WebSocket clients that `connect` and `subscribe` to one channel, then stay idle;
//!    after 3 s, RSS again: **idle** = (RSS − RSS before) / n;
//! 3. insert one row, wait until every client got its publication, 3 s, RSS: **after traffic**;
//! 4. close every client; open `--subs` subscribers and insert `--burst` rows in one transaction,
//!    `--bursts` times: frames/s = subs × burst / (time from the INSERT to the last subscriber's last
//!    frame), and the connector's CPU time (user + system) per frame, medians over bursts. The clients
//!    share the machine, so frames/s may be bounded by them; CPU per frame is the connector's own cost.
//!
//! The file-descriptor limit must allow `n` sockets in each process (`ulimit -n`); the connector's
//! `client.max_connections` is raised above `n` for the run.
//!
//! A `--connector` path may end in `@protobuf`: that configuration's clients speak the Protobuf
//! protocol (subprotocol `centrifuge-protobuf`, binary frames) instead of JSON, so the fan-out cost
//! of both encodings is measured in one run (e.g. `--connector target/release/connector
//! --connector target/release/connector@protobuf`).

// A benchmark prints its report by design, and is a tool rather than library code.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The channel of the chat mapping.
const CHANNEL: &str = "incoming-chat";

const INSERT_ROWS: &str =
    "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
     SELECT $1 || '-' || g, 'memory', 'Hello from the memory benchmark: a chat line of about the usual length.',
            'memory-client', 0 FROM generate_series(1, $2) g";

/// One configuration: a connector binary and the protocol its clients speak (`true`: Protobuf).
type Configuration = (PathBuf, bool);

struct Opts {
    connectors: Vec<Configuration>,
    n: usize,
    subs: usize,
    burst: i32,
    bursts: usize,
    reps: usize,
    port: u16,
}

impl Opts {
    fn parse() -> Result<Self> {
        let mut o = Self {
            connectors: Vec::new(),
            n: 10_000,
            subs: 1000,
            burst: 1000,
            bursts: 3,
            reps: 2,
            port: 56400,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match a.as_str() {
                "--connector" => {
                    let v = value("--connector")?;
                    o.connectors.push(match v.strip_suffix("@protobuf") {
                        Some(path) => (path.into(), true),
                        None => (v.into(), false),
                    });
                }
                "--n" => o.n = value("--n")?.parse()?,
                "--subs" => o.subs = value("--subs")?.parse()?,
                "--burst" => o.burst = value("--burst")?.parse()?,
                "--bursts" => o.bursts = value("--bursts")?.parse()?,
                "--reps" => o.reps = value("--reps")?.parse()?,
                "--port" => o.port = value("--port")?.parse()?,
                other => bail!("unknown argument {other:?}"),
            }
        }
        if o.connectors.is_empty() {
            o.connectors
                .push(("target/release/connector".into(), false));
        }
        Ok(o)
    }
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// CPU time (user + system) the process has used, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// A connector process.
struct Node {
    child: Child,
}

impl Node {
    async fn start(bin: &Path, db_url: &str, port: u16, dir: &Path, max: usize) -> Result<Self> {
        let cfg = serde_json::json!({
            "listen": format!("127.0.0.1:{port}"),
            "database": {"url": db_url, "pool_size": 4},
            "stream": {"poll_interval_ms": 250, "batch_size": 1000},
            "client": {"allow_anonymous": true, "ping_interval_secs": 25,
                       "max_connections": max + 100},
            "mappings": [{"table": "chat_data", "operations": ["INSERT"], "channel": CHANNEL}],
            "rules": [],
            "shutdown_grace_secs": 2
        });
        let path = dir.join(format!("memory-{port}.json"));
        std::fs::write(&path, cfg.to_string())?;
        let log = std::fs::File::create(dir.join(format!("memory-{port}.log")))?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let node = Self { child };
        let url = format!("http://127.0.0.1:{port}/readyz");
        for _ in 0..600 {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return Ok(node);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{} not ready on port {port}", bin.display())
    }

    fn rss(&self) -> Result<u64> {
        rss_kib(self.child.id())
    }

    fn cpu(&self) -> Result<u64> {
        cpu_ticks(self.child.id())
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a client that connects and subscribes; its task counts the publications it receives.
async fn client(port: u16, received: Arc<AtomicU64>, protobuf: bool) -> Result<JoinHandle<()>> {
    if protobuf {
        return protobuf_client(port, received).await;
    }
    let url = format!("ws://127.0.0.1:{port}/connection/websocket");
    // Small client buffers: this process holds 10,000 of them too.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&url, Some(cfg), false).await?;
    ws.send(Message::Text(
        format!("{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":\"{CHANNEL}\"}}}}")
            .into(),
    ))
    .await?;
    let mut replies = 0;
    while replies < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no reply to connect/subscribe")?
            .context("connection closed")??;
        if let Message::Text(t) = msg {
            for line in t.as_str().split('\n') {
                if line.contains("\"error\"") {
                    bail!("connect/subscribe failed: {line}");
                }
                if line.starts_with("{\"id\":") {
                    replies += 1;
                }
            }
        }
    }
    Ok(tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let mut pong = false;
            let mut n = 0;
            for line in t.as_str().split('\n') {
                if line == "{}" {
                    pong = true;
                } else if line.contains("\"pub\":") {
                    n += 1;
                }
            }
            received.fetch_add(n, Ordering::Relaxed);
            if pong && ws.send(Message::Text("{}".into())).await.is_err() {
                break;
            }
        }
    }))
}

/// [`client`] speaking the Protobuf protocol: length-delimited `Command`s and `Reply`s in binary
/// frames; the ping is an empty `Reply`, answered with an empty `Command`.
async fn protobuf_client(port: u16, received: Arc<AtomicU64>) -> Result<JoinHandle<()>> {
    use prost::Message as _;
    use relay_protocol::pb::messages::{
        Command as PbCommand, ConnectRequest, Reply, SubscribeRequest,
    };
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request =
        format!("ws://127.0.0.1:{port}/connection/websocket").into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "centrifuge-protobuf".parse()?);
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(cfg), false).await?;
    let mut frame = Vec::new();
    PbCommand {
        id: 1,
        connect: Some(ConnectRequest::default()),
        ..Default::default()
    }
    .encode_length_delimited(&mut frame)?;
    PbCommand {
        id: 2,
        subscribe: Some(SubscribeRequest {
            channel: CHANNEL.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_length_delimited(&mut frame)?;
    ws.send(Message::Binary(frame.into())).await?;
    let mut replies = 0;
    while replies < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
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
    Ok(tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Binary(b) = msg else { continue };
            let mut pong = false;
            let mut n = 0;
            let mut rest = &b[..];
            while !rest.is_empty() {
                let Ok(reply) = Reply::decode_length_delimited(&mut rest) else {
                    return;
                };
                match reply.push {
                    Some(push) if push.r#pub.is_some() => n += 1,
                    Some(_) => {}
                    None => pong = reply.id == 0 && reply.error.is_none(),
                }
            }
            received.fetch_add(n, Ordering::Relaxed);
            if pong && ws.send(Message::Binary(vec![0u8].into())).await.is_err() {
                break;
            }
        }
    }))
}

/// Opens `n` clients, at most 256 handshakes at a time.
async fn clients(
    port: u16,
    n: usize,
    received: &Arc<AtomicU64>,
    protobuf: bool,
) -> Result<Vec<JoinHandle<()>>> {
    let opened = futures_util::stream::iter(0..n)
        .map(|_| client(port, received.clone(), protobuf))
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    opened.into_iter().collect()
}

async fn wait_for(received: &AtomicU64, target: u64, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    while received.load(Ordering::Relaxed) < target {
        if start.elapsed() > limit {
            bail!(
                "only {} of {target} publications within {limit:?}",
                received.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(start.elapsed())
}

struct Figures {
    base_kib: u64,
    idle_kib: f64,
    traffic_kib: f64,
    frames_per_sec: f64,
    cpu_us_per_frame: f64,
}

async fn run_one(
    bin: &Path,
    protobuf: bool,
    db_url: &str,
    pool: &PgPool,
    port: u16,
    opts: &Opts,
) -> Result<Figures> {
    let dir = std::env::temp_dir();
    let node = Node::start(bin, db_url, port, &dir, opts.n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = node.rss()?;
    let received = Arc::new(AtomicU64::new(0));
    let tasks = clients(port, opts.n, &received, protobuf).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = node.rss()?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    sqlx::query(INSERT_ROWS)
        .bind(format!("{tag}-one"))
        .bind(1_i32)
        .execute(pool)
        .await?;
    wait_for(&received, opts.n as u64, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let traffic = node.rss()?;
    for t in tasks {
        t.abort();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let received = Arc::new(AtomicU64::new(0));
    let tasks = clients(port, opts.subs, &received, protobuf).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rates = Vec::new();
    let mut cpu = Vec::new();
    for b in 0..opts.bursts {
        received.store(0, Ordering::Relaxed);
        let ticks = node.cpu()?;
        let start = Instant::now();
        sqlx::query(INSERT_ROWS)
            .bind(format!("{tag}-burst{b}"))
            .bind(opts.burst)
            .execute(pool)
            .await?;
        let target = opts.subs as u64 * u64::try_from(opts.burst)?;
        wait_for(&received, target, Duration::from_secs(120)).await?;
        rates.push(target as f64 / start.elapsed().as_secs_f64());
        // Connector CPU per frame (µs): independent of how fast this process reads.
        cpu.push((node.cpu()? - ticks) as f64 * 10_000.0 / target as f64);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for t in tasks {
        t.abort();
    }
    node.stop();
    rates.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let n = opts.n as f64;
    Ok(Figures {
        base_kib: base,
        idle_kib: (idle.saturating_sub(base)) as f64 / n,
        traffic_kib: (traffic.saturating_sub(base)) as f64 / n,
        frames_per_sec: rates[rates.len() / 2],
        cpu_us_per_frame: cpu[cpu.len() / 2],
    })
}

/// The size of the future an async fn returns, without calling it.
fn future_size<A, B, C, D, F: FnOnce(A, B, C, D) -> Fut, Fut>(_: F) -> usize {
    std::mem::size_of::<Fut>()
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = Opts::parse()?;
    // Of this build of the library (the harness's), not necessarily of the binaries measured.
    println!(
        "session future (this build): {} bytes",
        future_size(connector::session::serve)
    );
    println!(
        "tokio Sleep: {} bytes",
        std::mem::size_of::<tokio::time::Sleep>()
    );
    let admin = PgPool::connect(&admin_url())
        .await
        .context("connecting to DATABASE_URL")?;
    let name = format!("memory_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    let base = admin_url();
    let (prefix, _) = base
        .rsplit_once('/')
        .context("DATABASE_URL has no database name")?;
    let db_url = format!("{prefix}/{name}");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db_url)
        .await?;
    let result = async {
        connector::db::migrate(&pool).await?;
        println!(
            "n = {}, fan-out: {} subscribers × {} rows, {} bursts (median)",
            opts.n, opts.subs, opts.burst, opts.bursts
        );
        println!(
            "| binary | rep | RSS before | idle KiB/conn | after traffic KiB/conn | frames/s | CPU µs/frame |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut port = opts.port;
        for rep in 0..opts.reps {
            let mut order: Vec<&Configuration> = opts.connectors.iter().collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for (bin, protobuf) in order {
                // A port can be taken meanwhile (by an ephemeral port of this run's own clients):
                // a connector that cannot start is retried on the next ports.
                let mut attempt = 0;
                let f = loop {
                    let result = run_one(bin, *protobuf, &db_url, &pool, port, &opts).await;
                    port += 1;
                    match result {
                        Err(e) if attempt < 3 && e.to_string().contains("not ready") => {
                            attempt += 1;
                            eprintln!("{e}; retrying on port {port}");
                        }
                        other => break other?,
                    }
                };
                println!(
                    "| {}{} | {rep} | {:.1} MiB | {:.2} | {:.2} | {:.0} | {:.2} |",
                    bin.display(),
                    if *protobuf { " (Protobuf)" } else { "" },
                    f.base_kib as f64 / 1024.0,
                    f.idle_kib,
                    f.traffic_kib,
                    f.frames_per_sec,
                    f.cpu_us_per_frame
                );
            }
        }
        anyhow::Ok(())
    }
    .await;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    result
}
