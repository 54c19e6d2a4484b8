//! Benchmark of the change stream's gapless algorithm (xid8 horizon + sequencer), against baselines
//! measured in the same run. Run it with `scripts/bench` (release build); see `docs/benchmarks.md`.
//!
//! Three parts, each in a database of its own (`bench_<random>`, dropped at the end):
//!
//! 1. `write`: what writers pay. 8 connections commit single-row (and 10-row) INSERT transactions into
//!    `chat_data` for a fixed time, under: no trigger (the baseline); the relay's capture trigger; the
//!    trigger with `relay.wake()` made a no-op (isolates the NOTIFY commit lock); the trigger while a
//!    connector sequences the changelog; and "Algorithm B" (a per-channel counter row locked to commit
//!    by each writer), on 1 channel and on 64, with and without the wake-up. Interleaved repetitions,
//!    medians, ratios to the baseline. With a connector running, `drain s` is how long after the
//!    writers stop every row written is in the history (a connector that falls behind would make
//!    the writers' figure look better than it is).
//! 2. `latency`: commit-return → WebSocket-receive time through a real connector (in this process),
//!    at fixed rates from 4 writers, against raw LISTEN/NOTIFY (the same rates, the same server).
//! 3. `longtx`: the documented cost of the xid8 horizon: rows committed while another transaction
//!    that holds an xid stays open are delivered only when it ends.
//!
//! Every part runs per capture mode (`--capture trigger,wal`, both by default): `trigger` on the server
//! of `DATABASE_URL`; `wal` on a throwaway cluster with `wal_level = logical` (initdb + pg_ctl, as the
//! tests' `support/cluster.rs`), where the write part compares, interleaved on that one server, bare
//! INSERTs, the whole system in `wal` mode and the whole system in `trigger` mode (same `wal_level`).
//!
//! `--quick` is a short smoke run; `--only write,latency,longtx`, `--secs`, `--reps`, `--lat-reps`
//! and `--rates` narrow or stretch it; `--protocol protobuf` makes the latency part's subscribers
//! speak the Protobuf protocol (fan-out to Protobuf clients) instead of JSON. The machine it was written for is small and shared, so every
//! comparison is made within one run: configurations are interleaved in a fresh random order in every
//! repetition, and the report gives medians (and ranges) over repetitions.

// A benchmark prints its report by design, and is a tool rather than library code: panicking on an
// impossible state (a poisoned lock) is fine here.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

#[path = "../tests/support/cluster.rs"]
#[allow(dead_code, clippy::expect_used, clippy::panic)]
mod cluster;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

/// Writer connections of the write-path part.
const WRITERS: usize = 8;
/// Writer connections of the latency parts.
const LAT_WRITERS: usize = 4;
/// Channels of the spread Algorithm B variant.
const SPREAD_CHANNELS: u32 = 64;
/// The channel of the chat mapping.
const CHANNEL: &str = "incoming-chat";
/// About the size of a chat message.
const TEXT: &str =
    "Hello from the benchmark: a chat line of about the usual length, eighty-odd chars.";

const INSERT_ROWS: &str =
    "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
     SELECT $1 || '-' || g, $2, $3, 'bench-client', $4 FROM generate_series(1, $5) g";
const INSERT_ONE: &str =
    "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp)
     VALUES ($1, 'bench', $2, 'bench-client', $3)";
const INSERT_NOTIFY: &str = "WITH i AS (
         INSERT INTO chat_plain (msg_id, username, msg_data, client_id, created_at_timestamp)
         VALUES ($1, 'bench', $2, 'bench-client', $3) RETURNING msg_id)
     SELECT pg_notify('bench_raw', msg_id) FROM i";

/// Algorithm B: every writer increments its channel's counter row (the row lock is held until
/// commit, so writers of one channel commit one at a time) and records the change with that offset.
const ALGORITHM_B: &str = r#"
CREATE TABLE bench_b_channels (name text PRIMARY KEY, top_offset bigint NOT NULL);
CREATE TABLE bench_b_log (
    channel    text        NOT NULL,
    "offset"   bigint      NOT NULL,
    data       jsonb       NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (channel, "offset")
);
CREATE FUNCTION bench_b_capture() RETURNS trigger LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    ch text;
    off bigint;
BEGIN
    ch := 'room:' || NEW.username;
    INSERT INTO bench_b_channels AS c (name, top_offset) VALUES (ch, 1)
        ON CONFLICT (name) DO UPDATE SET top_offset = c.top_offset + 1
        RETURNING top_offset INTO off;
    INSERT INTO bench_b_log (channel, "offset", data) VALUES (ch, off,
        jsonb_build_object('type', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                           'row', to_jsonb(NEW)));
    IF TG_ARGV[0] = 'wake' THEN
        PERFORM relay.wake();
    END IF;
    RETURN NULL;
END
$$;
"#;

const WAKE_NOOP: &str = "CREATE OR REPLACE FUNCTION relay.wake() RETURNS void
     LANGUAGE plpgsql VOLATILE AS $$ BEGIN END $$";

// ---- options ----------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    parts: Vec<String>,
    /// Seconds per write-path run.
    secs: f64,
    /// Repetitions of the write-path runs (interleaved).
    reps: usize,
    /// Repetitions of the latency runs (interleaved).
    lat_reps: usize,
    /// Rates (rows/s) of the latency part.
    rates: Vec<u32>,
    /// WebSocket subscribers of the latency part.
    subscribers: usize,
    /// The latency part's subscribers speak Protobuf (`--protocol protobuf`) instead of JSON.
    protobuf: bool,
    /// Seconds per latency run.
    lat_secs: f64,
    /// How long the long transactions stay open.
    hold: Duration,
    /// Capture modes to measure, in order.
    modes: Vec<Mode>,
}

/// The capture mode a part runs in, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Triggers + sequencer, on the server of `DATABASE_URL`.
    Trigger,
    /// Logical replication, on a throwaway `wal_level = logical` cluster.
    Wal,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Trigger => "trigger",
            Self::Wal => "wal",
        }
    }
}

/// Where the parts being run create their databases, and the capture mode their connectors use.
struct Target {
    admin_url: String,
    mode: Mode,
}

static TARGET: Mutex<Option<Target>> = Mutex::new(None);

/// Points the following parts at `admin_url`, with connectors in `mode`.
fn set_target(admin_url: String, mode: Mode) {
    *TARGET.lock().unwrap() = Some(Target { admin_url, mode });
}

fn current_mode() -> Mode {
    TARGET
        .lock()
        .unwrap()
        .as_ref()
        .map_or(Mode::Trigger, |t| t.mode)
}

impl Opts {
    fn parse() -> Result<Self> {
        let mut args = std::env::args().skip(1);
        let mut quick = false;
        let mut parts = None;
        let mut secs = None;
        let mut reps = None;
        let mut lat_reps = None;
        let mut rates = None;
        let mut subscribers = None;
        let mut modes = None;
        let mut protobuf = false;
        while let Some(a) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match a.as_str() {
                "--quick" => quick = true,
                "--only" => {
                    parts = Some(
                        value("--only")?
                            .split(',')
                            .map(str::to_owned)
                            .collect::<Vec<_>>(),
                    );
                }
                "--secs" => secs = Some(value("--secs")?.parse::<f64>()?),
                "--reps" => reps = Some(value("--reps")?.parse::<usize>()?),
                "--lat-reps" => lat_reps = Some(value("--lat-reps")?.parse::<usize>()?),
                "--capture" => {
                    let mut m = Vec::new();
                    for name in value("--capture")?.split(',') {
                        m.push(match name {
                            "trigger" => Mode::Trigger,
                            "wal" => Mode::Wal,
                            other => {
                                bail!("unknown capture mode {other:?} (expected trigger, wal)")
                            }
                        });
                    }
                    modes = Some(m);
                }
                "--protocol" => {
                    protobuf = match value("--protocol")?.as_str() {
                        "json" => false,
                        "protobuf" => true,
                        other => bail!("--protocol {other:?}: json or protobuf"),
                    };
                }
                "--subscribers" => {
                    subscribers = Some(value("--subscribers")?.parse::<usize>()?);
                }
                "--rates" => {
                    rates = Some(
                        value("--rates")?
                            .split(',')
                            .map(str::parse::<u32>)
                            .collect::<Result<Vec<_>, _>>()?,
                    );
                }
                "-h" | "--help" => {
                    println!(
                        "bench [--quick] [--only write,latency,longtx] [--secs S] [--reps N] [--lat-reps N] [--rates R1,R2,..] [--subscribers N] [--capture trigger,wal] [--protocol json|protobuf]"
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (try --help)"),
            }
        }
        let parts =
            parts.unwrap_or_else(|| vec!["write".into(), "latency".into(), "longtx".into()]);
        for p in &parts {
            if !["write", "latency", "longtx"].contains(&p.as_str()) {
                bail!("unknown part {p:?} (expected write, latency, longtx)");
            }
        }
        let (d_secs, d_reps, d_lat_reps, d_rates, lat_secs, hold) = if quick {
            (1.0, 1, 1, vec![500, 1000], 1.5, Duration::from_secs(1))
        } else {
            (
                1.0,
                7,
                3,
                vec![500, 1000, 5000, 8000],
                2.0,
                Duration::from_secs(2),
            )
        };
        Ok(Self {
            quick,
            parts,
            secs: secs.unwrap_or(d_secs),
            reps: reps.unwrap_or(d_reps).max(1),
            lat_reps: lat_reps.unwrap_or(d_lat_reps).max(1),
            rates: rates.unwrap_or(d_rates),
            subscribers: subscribers.unwrap_or(if quick { 10 } else { 100 }).max(1),
            protobuf,
            lat_secs,
            hold,
            modes: modes.unwrap_or_else(|| vec![Mode::Trigger, Mode::Wal]),
        })
    }

    fn wants(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

// ---- databases, connector, client -----------------------------------------------------------------

fn admin_url() -> String {
    if let Some(t) = TARGET.lock().unwrap().as_ref() {
        return t.admin_url.clone();
    }
    shared_url()
}

/// The shared server's admin URL (`DATABASE_URL`).
fn shared_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database made for one part of the benchmark.
struct BenchDb {
    name: String,
    url: String,
    pool: PgPool,
}

impl BenchDb {
    /// Creates the database and applies the migrations.
    async fn create() -> Result<Self> {
        let admin = PgPool::connect(&admin_url())
            .await
            .context("connecting to DATABASE_URL")?;
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let base = admin_url();
        let (prefix, _) = base
            .rsplit_once('/')
            .context("DATABASE_URL has no database name")?;
        let url = format!("{prefix}/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        connector::db::migrate(&pool).await?;
        Ok(Self { name, url, pool })
    }

    async fn drop_db(self) {
        self.pool.close().await;
        match PgPool::connect(&admin_url()).await {
            Ok(admin) => {
                let r = sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .execute(&admin)
                .await;
                if let Err(e) = r {
                    println!("warning: could not drop database {}: {e}", self.name);
                }
                admin.close().await;
            }
            Err(e) => println!("warning: could not drop database {}: {e}", self.name),
        }
    }

    async fn exec(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .with_context(|| format!("running {sql:.60}"))?;
        Ok(())
    }
}

/// Opens a plain connection without statement logging.
async fn connect(url: &str) -> Result<PgConnection> {
    let opts: PgConnectOptions = url.parse()?;
    Ok(opts.disable_statement_logging().connect().await?)
}

fn config_json(db_url: &str, mode: Mode) -> String {
    json!({
        "capture": {"mode": mode.name(), "heartbeat_secs": 1},
        "listen": "127.0.0.1:0",
        "database": {"url": db_url, "pool_size": 4},
        "stream": {"poll_interval_ms": 250, "batch_size": 1000},
        "client": {"allow_anonymous": true, "ping_interval_secs": 25, "outbound_queue": 65536},
        "mappings": [{"table": "chat_data", "operations": ["INSERT"], "channel": CHANNEL}],
        "rules": [],
        "shutdown_grace_secs": 5
    })
    .to_string()
}

/// A connector running in this process.
struct Relay {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<connector::Result<()>>,
}

impl Relay {
    async fn start(db_url: &str) -> Result<Self> {
        Self::start_in(db_url, current_mode()).await
    }

    /// Starts a connector in capture `mode`; in `wal` mode, returns once it leads the slot.
    async fn start_in(db_url: &str, mode: Mode) -> Result<Self> {
        let config = connector::Config::from_json(&config_json(db_url, mode))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(connector::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let url = format!("http://{addr}/readyz");
        for _ in 0..400 {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                let relay = Self { addr, stop, task };
                if mode == Mode::Wal {
                    relay.wait_leader().await?;
                }
                return Ok(relay);
            }
            if task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        match task.await {
            Ok(Err(e)) => bail!("connector failed: {e}"),
            _ => bail!("connector not ready within 10 s"),
        }
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .context("connector did not stop")???;
        Ok(())
    }

    /// Waits until this connector leads the `wal` capture (its metric says so).
    async fn wait_leader(&self) -> Result<()> {
        let url = format!("http://{}/metrics", self.addr);
        for _ in 0..600 {
            let text = reqwest::get(&url).await?.text().await?;
            if text.lines().any(|l| l.trim() == "relay_wal_leader 1") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the connector did not take the wal leadership within 30 s")
    }
}

/// Forgets the `wal` capture's slot and position, so the next connector starts from the current WAL
/// instead of decoding what was written while none ran (the baseline runs of the write part).
async fn reset_wal(db: &BenchDb) -> Result<()> {
    db.exec(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
          WHERE database = current_database() AND active_pid IS NULL;
         UPDATE relay.wal_state SET slot_name = NULL, lsn = NULL;",
    )
    .await
}

/// Deliveries seen by a receiver (WebSocket client or LISTEN connection): message id and arrival.
#[derive(Default)]
struct Sink {
    rows: Mutex<Vec<(String, Instant)>>,
    /// Publications whose offset was not the previous one + 1 (must stay 0).
    offset_gaps: AtomicU64,
}

impl Sink {
    fn take(&self) -> Vec<(String, Instant)> {
        std::mem::take(&mut *self.rows.lock().unwrap())
    }
    fn len(&self) -> usize {
        self.rows.lock().unwrap().len()
    }
}

/// Subscribes a raw Centrifugo-protocol client to `channel`; its task fills the sink.
async fn subscribe(relay: &Relay, channel: &str) -> Result<(Arc<Sink>, JoinHandle<Result<()>>)> {
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

/// [`subscribe`] in the Protobuf protocol (`centrifuge-protobuf`: binary frames of length-delimited
/// `Command`s and `Reply`s; the ping is an empty `Reply`, answered with an empty `Command`).
async fn subscribe_protobuf(
    relay: &Relay,
    channel: &str,
) -> Result<(Arc<Sink>, JoinHandle<Result<()>>)> {
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
async fn raw_listener(url: &str) -> Result<(Arc<Sink>, JoinHandle<Result<()>>)> {
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

// ---- statistics and printing ------------------------------------------------------------------------

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    }
}

/// The `p`th percentile of `samples` (microseconds, in any order), by HdrHistogram: 3 significant
/// digits (the value returned is within 0.1 % of the sample at that rank); 0 when there are none.
fn pct(samples: &[u64], p: f64) -> u64 {
    // Sized to the largest sample (`saturating_record` on an auto-resizing histogram would clamp).
    let max = samples.iter().copied().max().unwrap_or(0).max(2);
    let mut h = hdrhistogram::Histogram::<u64>::new_with_max(max, 3)
        .expect("a maximum of 2 or more with 3 significant digits is valid");
    for &v in samples {
        h.saturating_record(v);
    }
    h.value_at_percentile(p)
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn epoch_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0)
}

/// Prints rows as an aligned table (first column left-aligned, the rest right-aligned).
fn table(header: &[&str], rows: &[Vec<String>]) {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            if i == 0 {
                let _ = write!(s, "{c}{}", " ".repeat(pad));
            } else {
                let _ = write!(s, "  {}{c}", " ".repeat(pad));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    println!(
        "{}",
        width
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

// ---- part 1: the write path ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteCfg {
    /// (a) no trigger.
    Baseline,
    /// (b) the relay's capture trigger (changelog insert + relay.wake()).
    Trigger,
    /// (c) the capture trigger with relay.wake() a no-op.
    TriggerNoWake,
    /// (b') the capture trigger while a connector sequences the changelog (the whole system).
    TriggerWithConnector,
    /// (b'') the same, with every writing transaction notifying (`relay.writer_notify = on`, the
    /// wake-up before issue 8).
    TriggerWithConnectorNotifyAll,
    /// (d/e) Algorithm B: per-channel counter row locked to commit.
    AlgB { channels: u32, wake: bool },
    /// (w) no trigger, while a connector in `wal` mode decodes the slot and writes the history.
    WalWithConnector,
}

impl WriteCfg {
    const ALL: [WriteCfg; 9] = [
        WriteCfg::Baseline,
        WriteCfg::Trigger,
        WriteCfg::TriggerNoWake,
        WriteCfg::TriggerWithConnector,
        WriteCfg::TriggerWithConnectorNotifyAll,
        WriteCfg::AlgB {
            channels: 1,
            wake: true,
        },
        WriteCfg::AlgB {
            channels: SPREAD_CHANNELS,
            wake: true,
        },
        WriteCfg::AlgB {
            channels: 1,
            wake: false,
        },
        WriteCfg::AlgB {
            channels: SPREAD_CHANNELS,
            wake: false,
        },
    ];

    /// What the write part compares in `mode`: on the `wal` cluster, bare INSERTs and the whole
    /// system in each mode, on one server with one `wal_level`.
    fn for_mode(mode: Mode) -> &'static [WriteCfg] {
        match mode {
            Mode::Trigger => &Self::ALL,
            Mode::Wal => &[
                WriteCfg::Baseline,
                WriteCfg::WalWithConnector,
                WriteCfg::TriggerWithConnector,
            ],
        }
    }

    fn label(self) -> String {
        match self {
            Self::Baseline => "(a)  no trigger (baseline)".into(),
            Self::WalWithConnector => "(w)  wal + connector (as shipped)".into(),
            Self::Trigger => "(b)  relay trigger: changelog + wake()".into(),
            Self::TriggerNoWake => "(c)  relay trigger, wake() no-op".into(),
            Self::TriggerWithConnector => "(b') trigger + connector (as shipped)".into(),
            Self::TriggerWithConnectorNotifyAll => {
                "(b\") trigger + connector, writer_notify=on".into()
            }
            Self::AlgB { channels, wake } => format!(
                "({})  Alg. B, {channels} channel{}, {}",
                if wake { "d" } else { "e" },
                if channels == 1 { "" } else { "s" },
                if wake { "+ wake" } else { "no wake" }
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct WriteRun {
    commits_per_s: f64,
    rows_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    retries: u64,
    /// With a connector: seconds from the writers' end until every row written is in the history
    /// (a connector that falls behind makes the writers' figure look better than it is).
    drain_s: Option<f64>,
    /// With a `wal` connector: where the leader's time went.
    leader: Option<LeaderProfile>,
}

/// Where the `wal` leader's time went in one write run (from the writers' start to the end of the
/// drain): its own metrics, and the CPU time of the server processes that serve it.
#[derive(Debug, Clone, Copy, Default)]
struct LeaderProfile {
    /// History transactions (batches) written.
    batches: f64,
    /// Publications written.
    rows: f64,
    /// Leader CPU building batches (record literals), s.
    prepare_s: f64,
    /// Batch statements in flight (conversion, history write, commit), s.
    apply_s: f64,
    /// CPU of the walsender (decoding the whole WAL), s.
    walsender_cpu_s: f64,
    /// CPU of the connector's database backends (the leader's batch statements, the stream reads), s.
    relay_cpu_s: f64,
}

/// CPU seconds (user + system) of this database's walsender and of the connector's backends, read
/// from `/proc` (PostgreSQL runs on this host).
async fn server_cpu(db: &BenchDb) -> Result<(f64, f64)> {
    let procs: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT pid, coalesce(backend_type, ''), coalesce(application_name, '')
         FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
    )
    .fetch_all(&db.pool)
    .await?;
    let tick = 100.0; // USER_HZ on Linux
    let (mut walsender, mut relay) = (0.0, 0.0);
    for (pid, kind, app) in procs {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command (which may hold spaces) end with ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let cpu = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        if kind == "walsender" {
            walsender += cpu / tick;
        } else if app == "pg-relay connector" || app == "relay-wal-leader" {
            relay += cpu / tick;
        }
    }
    Ok((walsender, relay))
}

/// The connector's `relay_wal_*` counters.
async fn wal_metrics(relay: &Relay) -> Result<HashMap<String, f64>> {
    let text = reqwest::get(format!("http://{}/metrics", relay.addr))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("relay_wal_"))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

/// Waits until every `chat_data` row is in the history; returns how long that took (at most 60 s).
async fn drain(db: &BenchDb) -> Result<f64> {
    let t = Instant::now();
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_data")
        .fetch_one(&db.pool)
        .await?;
    loop {
        let sequenced: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.publications")
            .fetch_one(&db.pool)
            .await?;
        if sequenced >= written || t.elapsed() > Duration::from_secs(60) {
            return Ok(t.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Puts the database in configuration `cfg`, from a clean state; returns the connector it started.
async fn apply(
    db: &BenchDb,
    cfg: WriteCfg,
    wake_sql: &str,
    mappings: &[connector::config::Mapping],
) -> Result<Option<Relay>> {
    db.exec("DROP TRIGGER IF EXISTS bench_b ON chat_data")
        .await?;
    db.exec(&format!(
        "ALTER DATABASE {} RESET relay.writer_notify",
        db.name
    ))
    .await?;
    connector::db::triggers::sync(&db.pool, &[], None).await?;
    db.exec(wake_sql).await?;
    db.exec(
        "TRUNCATE chat_data, relay.changelog, relay.publications, relay.channels, bench_b_channels,
                  bench_b_log;
         UPDATE relay.sequencer SET last_seq = 0;",
    )
    .await?;
    // A checkpoint now rather than in the middle of a run (needs superuser; skipped otherwise).
    let _ = sqlx::raw_sql("CHECKPOINT").execute(&db.pool).await;
    match cfg {
        WriteCfg::Baseline => {}
        WriteCfg::Trigger => {
            connector::db::triggers::sync(&db.pool, mappings, None).await?;
        }
        WriteCfg::TriggerNoWake => {
            connector::db::triggers::sync(&db.pool, mappings, None).await?;
            db.exec(WAKE_NOOP).await?;
        }
        WriteCfg::TriggerWithConnector => {
            return Ok(Some(Relay::start_in(&db.url, Mode::Trigger).await?));
        }
        WriteCfg::WalWithConnector => {
            reset_wal(db).await?;
            return Ok(Some(Relay::start_in(&db.url, Mode::Wal).await?));
        }
        WriteCfg::TriggerWithConnectorNotifyAll => {
            let relay = Relay::start_in(&db.url, Mode::Trigger).await?;
            db.exec(&format!(
                "ALTER DATABASE {} SET relay.writer_notify = 'on'",
                db.name
            ))
            .await?;
            return Ok(Some(relay));
        }
        WriteCfg::AlgB { wake, .. } => {
            db.exec(&format!(
                "CREATE TRIGGER bench_b AFTER INSERT ON chat_data FOR EACH ROW
                 EXECUTE FUNCTION bench_b_capture('{}')",
                if wake { "wake" } else { "none" }
            ))
            .await?;
        }
    }
    Ok(None)
}

/// 8 writers commit `rows`-row INSERT transactions for `secs` (after a short warm-up).
async fn write_run(
    db: &BenchDb,
    cfg: WriteCfg,
    rows: i32,
    sync: bool,
    secs: f64,
    run: usize,
) -> Result<WriteRun> {
    let channels = match cfg {
        WriteCfg::AlgB { channels, .. } => channels,
        _ => 1,
    };
    let mut conns = Vec::with_capacity(WRITERS);
    for _ in 0..WRITERS {
        let mut conn = connect(&db.url).await?;
        if !sync {
            sqlx::query("SET synchronous_commit = off")
                .execute(&mut conn)
                .await?;
        }
        conns.push(conn);
    }
    let warm = Duration::from_millis(250);
    let start = Instant::now() + Duration::from_millis(50);
    let from = start + warm;
    let until = from + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (w, mut conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut lat: Vec<u64> = Vec::new();
            let mut retries = 0u64;
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= until {
                    break;
                }
                let room = if channels == 1 {
                    0
                } else {
                    rand::random_range(0..channels)
                };
                n += 1;
                let r = sqlx::query(INSERT_ROWS)
                    .bind(format!("r{run}-w{w}-{n}"))
                    .bind(room.to_string())
                    .bind(TEXT)
                    .bind(epoch_millis())
                    .bind(rows)
                    .execute(&mut conn)
                    .await;
                let t1 = Instant::now();
                match r {
                    Ok(_) => {}
                    Err(sqlx::Error::Database(e))
                        if matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
                    {
                        retries += 1;
                        continue;
                    }
                    Err(e) => return Err(anyhow::Error::from(e).context("writer")),
                }
                if t0 >= from && t1 <= until {
                    lat.push(micros(t1 - t0));
                }
            }
            conn.close().await?;
            Ok::<_, anyhow::Error>((lat, retries))
        }));
    }
    let mut lat = Vec::new();
    let mut retries = 0;
    for t in tasks {
        let (l, r) = t.await??;
        lat.extend(l);
        retries += r;
    }
    let commits = lat.len() as f64;
    Ok(WriteRun {
        commits_per_s: commits / secs,
        rows_per_s: commits * f64::from(rows) / secs,
        p50_us: pct(&lat, 50.0),
        p99_us: pct(&lat, 99.0),
        retries,
        drain_s: None,
        leader: None,
    })
}

async fn write_part(opts: &Opts) -> Result<()> {
    println!(
        "\n## 1. Write path: {WRITERS} writers, {} s per run after 0.25 s warm-up, {} interleaved repetition(s), medians\n",
        opts.secs, opts.reps
    );
    let db = BenchDb::create().await?;
    let r = write_part_in(&db, opts).await;
    db.drop_db().await;
    println!(
        "(CPU pressure, PSI some avg60, after this part: {})",
        cpu_pressure()
    );
    r
}

async fn write_part_in(db: &BenchDb, opts: &Opts) -> Result<()> {
    let wake_sql: String =
        sqlx::query_scalar("SELECT pg_get_functiondef('relay.wake()'::regprocedure)")
            .fetch_one(&db.pool)
            .await?;
    db.exec(ALGORITHM_B).await?;
    let config = connector::Config::from_json(&config_json(&db.url, Mode::Trigger))?;
    let cfgs = WriteCfg::for_mode(current_mode());
    let mut results: HashMap<(usize, i32, bool), Vec<WriteRun>> = HashMap::new();
    let mut run = 0;
    for rep in 0..opts.reps {
        for sync in [true, false] {
            for rows in [1, 10] {
                let mut order: Vec<usize> = (0..cfgs.len()).collect();
                order.shuffle(&mut rand::rng());
                for i in order {
                    let cfg = cfgs[i];
                    run += 1;
                    let relay = apply(db, cfg, &wake_sql, &config.mappings).await?;
                    let before = match (&relay, cfg) {
                        (Some(relay), WriteCfg::WalWithConnector) => {
                            Some((wal_metrics(relay).await?, server_cpu(db).await?))
                        }
                        _ => None,
                    };
                    let mut r = write_run(db, cfg, rows, sync, opts.secs, run).await;
                    if let Some(relay) = relay {
                        if let Ok(run) = &mut r {
                            run.drain_s = Some(drain(db).await?);
                            if let Some((m0, (w0, r0))) = before {
                                let m1 = wal_metrics(&relay).await?;
                                let (w1, r1) = server_cpu(db).await?;
                                let d = |k: &str| {
                                    m1.get(k).copied().unwrap_or(0.0)
                                        - m0.get(k).copied().unwrap_or(0.0)
                                };
                                run.leader = Some(LeaderProfile {
                                    batches: d("relay_wal_batches_total"),
                                    rows: d("relay_wal_publications_total"),
                                    prepare_s: d("relay_wal_prepare_seconds_total"),
                                    apply_s: d("relay_wal_apply_seconds_total"),
                                    walsender_cpu_s: w1 - w0,
                                    relay_cpu_s: r1 - r0,
                                });
                            }
                        }
                        relay.stop().await?;
                    }
                    let r = r?;
                    println!(
                        "  rep {} sync {:<3} rows/tx {rows:>2} {:<42} {:>8.0} commits/s{}  (loadavg {})",
                        rep + 1,
                        if sync { "on" } else { "off" },
                        cfg.label(),
                        r.commits_per_s,
                        r.drain_s
                            .map_or(String::new(), |d| format!(", drain {d:.2} s")),
                        loadavg()
                    );
                    results.entry((i, rows, sync)).or_default().push(r);
                }
            }
        }
    }
    // Leave the real wake-up in place (the database is dropped anyway).
    db.exec(&wake_sql).await?;
    println!();
    for sync in [true, false] {
        for rows in [1, 10] {
            let med = |i: usize, f: fn(&WriteRun) -> f64| -> f64 {
                median(&results[&(i, rows, sync)].iter().map(f).collect::<Vec<_>>())
            };
            let base_c = med(0, |r| r.commits_per_s);
            let mut out = Vec::new();
            for (i, cfg) in cfgs.iter().enumerate() {
                let c = med(i, |r| r.commits_per_s);
                let rs = med(i, |r| r.rows_per_s);
                let runs = &results[&(i, rows, sync)];
                out.push(vec![
                    cfg.label(),
                    format!("{c:.0}"),
                    format!("{:.2}", c / base_c),
                    format!("{rs:.0}"),
                    format!("{:.2}", med(i, |r| r.p50_us as f64) / 1000.0),
                    format!("{:.2}", med(i, |r| r.p99_us as f64) / 1000.0),
                    format!(
                        "{:.0}-{:.0}",
                        runs.iter()
                            .map(|r| r.commits_per_s)
                            .fold(f64::INFINITY, f64::min),
                        runs.iter().map(|r| r.commits_per_s).fold(0.0, f64::max)
                    ),
                    runs.iter().map(|r| r.retries).sum::<u64>().to_string(),
                    {
                        let d: Vec<f64> = runs.iter().filter_map(|r| r.drain_s).collect();
                        if d.is_empty() {
                            "-".into()
                        } else {
                            format!("{:.2}", median(&d))
                        }
                    },
                ]);
            }
            println!(
                "{rows}-row transactions, synchronous_commit = {}:",
                if sync { "on" } else { "off" }
            );
            table(
                &[
                    "configuration",
                    "commits/s",
                    "x (a)",
                    "rows/s",
                    "commit p50 ms",
                    "p99 ms",
                    "commits/s range",
                    "retries",
                    "drain s",
                ],
                &out,
            );
            let mut prof = Vec::new();
            for (i, cfg) in cfgs.iter().enumerate() {
                let ps: Vec<LeaderProfile> = results[&(i, rows, sync)]
                    .iter()
                    .filter_map(|r| r.leader)
                    .collect();
                if ps.is_empty() {
                    continue;
                }
                let m =
                    |f: fn(&LeaderProfile) -> f64| median(&ps.iter().map(f).collect::<Vec<_>>());
                fn per_row(x: f64, r: f64) -> f64 {
                    if r > 0.0 { x * 1e6 / r } else { 0.0 }
                }
                prof.push(vec![
                    cfg.label(),
                    format!("{:.0}", m(|p| p.rows)),
                    format!("{:.0}", m(|p| p.batches)),
                    format!(
                        "{:.0}",
                        m(|p| if p.batches > 0.0 {
                            p.rows / p.batches
                        } else {
                            0.0
                        })
                    ),
                    format!(
                        "{:.2}",
                        m(|p| if p.batches > 0.0 {
                            p.apply_s * 1e3 / p.batches
                        } else {
                            0.0
                        })
                    ),
                    format!("{:.1}", m(|p| per_row(p.apply_s, p.rows))),
                    format!("{:.1}", m(|p| per_row(p.prepare_s, p.rows))),
                    format!("{:.1}", m(|p| per_row(p.relay_cpu_s, p.rows))),
                    format!("{:.1}", m(|p| per_row(p.walsender_cpu_s, p.rows))),
                ]);
            }
            if !prof.is_empty() {
                println!(
                    "where the wal leader's time went (medians of runs; per publication written):"
                );
                table(
                    &[
                        "configuration",
                        "publications",
                        "batches",
                        "rows/batch",
                        "statement ms/batch",
                        "statement us/row",
                        "prepare us/row",
                        "relay backends CPU us/row",
                        "walsender CPU us/row",
                    ],
                    &prof,
                );
            }
            println!();
        }
    }
    Ok(())
}

// ---- part 2: end-to-end latency ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Path {
    /// Through the connector to a WebSocket client.
    Relay,
    /// Raw LISTEN/NOTIFY (payload = the row's id), the baseline.
    RawNotify,
}

/// 4 writers insert single-row transactions at `rate` rows/s in total for `secs`; returns each row's
/// id and the instant its commit returned.
async fn drive(
    url: &str,
    path: Path,
    rate: u32,
    secs: f64,
    tag: &str,
) -> Result<Vec<(String, Instant)>> {
    let per_writer = Duration::from_secs_f64(LAT_WRITERS as f64 / f64::from(rate));
    let mut conns = Vec::new();
    for _ in 0..LAT_WRITERS {
        conns.push(connect(url).await?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (w, mut conn) in conns.into_iter().enumerate() {
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut next = start + per_writer.mul_f64(w as f64 / LAT_WRITERS as f64);
            let mut k = 0u64;
            while next < until {
                tokio::time::sleep_until(next.into()).await;
                let id = format!("{tag}-{w}-{k}");
                let q = match path {
                    Path::Relay => sqlx::query(INSERT_ONE),
                    Path::RawNotify => sqlx::query(INSERT_NOTIFY),
                };
                q.bind(&id)
                    .bind(TEXT)
                    .bind(epoch_millis())
                    .execute(&mut conn)
                    .await?;
                out.push((id, Instant::now()));
                k += 1;
                next += per_writer;
            }
            conn.close().await?;
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// Waits until the sink holds `n` rows (or 10 s passed), then joins them with the commits.
struct Joined {
    /// Commit → receive, µs, per row, with the commit instant.
    lat: Vec<(Instant, u64)>,
    /// Commit and receive instants by row id.
    times: HashMap<String, (Instant, Instant)>,
    missing: usize,
    first_recv: Option<Instant>,
    last_recv: Option<Instant>,
}

async fn collect(
    sink: &Sink,
    commits: &[(String, Instant)],
    tag: &str,
    deadline: Instant,
) -> Joined {
    while sink.len() < commits.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A little more for stragglers (and duplicates, which would be a bug).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let got: HashMap<String, Instant> = sink
        .take()
        .into_iter()
        .filter(|(id, _)| id.starts_with(tag) && id.as_bytes().get(tag.len()) == Some(&b'-'))
        .collect();
    let mut lat = Vec::with_capacity(commits.len());
    let mut times = HashMap::with_capacity(commits.len());
    let mut missing = 0;
    for (id, at) in commits {
        match got.get(id) {
            Some(r) => {
                lat.push((*at, micros(r.saturating_duration_since(*at))));
                times.insert(id.clone(), (*at, *r));
            }
            None => missing += 1,
        }
    }
    Joined {
        lat,
        times,
        missing,
        first_recv: got.values().min().copied(),
        last_recv: got.values().max().copied(),
    }
}

/// Wall-clock seconds since the Unix epoch of an instant (PostgreSQL runs on the same host, so its
/// `clock_timestamp()` is comparable to within clock-reading precision).
fn wall(at: Instant) -> f64 {
    static BASE: OnceLock<(Instant, f64)> = OnceLock::new();
    let (i0, w0) = *BASE.get_or_init(|| {
        let w = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        (Instant::now(), w)
    });
    if at >= i0 {
        w0 + (at - i0).as_secs_f64()
    } else {
        w0 - (i0 - at).as_secs_f64()
    }
}

/// Splits each relayed row's latency at the moment the sequencer moved it into the history
/// (`relay.publications.sequenced_at`): commit → sequenced, and sequenced → received by the client.
async fn breakdown(
    db: &BenchDb,
    tag: &str,
    times: &HashMap<String, (Instant, Instant)>,
    to_seq: &mut Vec<f64>,
    to_client: &mut Vec<f64>,
) -> Result<()> {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT data->'row'->>'msg_id', extract(epoch FROM sequenced_at)::float8
         FROM relay.publications WHERE channel = $1 AND data->'row'->>'msg_id' LIKE $2",
    )
    .bind(CHANNEL)
    .bind(format!("{tag}-%"))
    .fetch_all(&db.pool)
    .await?;
    for (id, sequenced) in rows {
        if let Some((commit, recv)) = times.get(&id) {
            to_seq.push((sequenced - wall(*commit)) * 1000.0);
            to_client.push((wall(*recv) - sequenced) * 1000.0);
        }
    }
    Ok(())
}

/// The `p`th percentile of `v` (milliseconds, in any order; NaN when empty), by [`pct`] on
/// microseconds. A split of a row's latency can be negative (the commit is timed on the client,
/// the sequencing in PostgreSQL), so the samples are shifted by their minimum into the histogram's
/// range and back.
fn pct_f(v: &[f64], p: f64) -> f64 {
    let Some(min) = v.iter().copied().min_by(f64::total_cmp) else {
        return f64::NAN;
    };
    let us: Vec<u64> = v
        .iter()
        .map(|x| ((x - min) * 1000.0).round() as u64)
        .collect();
    min + pct(&us, p) as f64 / 1000.0
}

#[derive(Default)]
struct LatAgg {
    samples: Vec<u64>,
    to_seq: Vec<f64>,
    to_client: Vec<f64>,
    achieved: Vec<f64>,
    delivered: Vec<f64>,
    missing: usize,
}

async fn latency_part(opts: &Opts) -> Result<()> {
    println!(
        "\n## 2. End-to-end latency: {LAT_WRITERS} writers, single-row commits at fixed rates, {} WebSocket subscribers ({}), {} s per run, {} interleaved repetition(s)\n",
        opts.subscribers,
        if opts.protobuf { "Protobuf" } else { "JSON" },
        opts.lat_secs,
        opts.lat_reps
    );
    let db = BenchDb::create().await?;
    let r = latency_part_in(&db, opts).await;
    db.drop_db().await;
    println!(
        "(CPU pressure, PSI some avg60, after this part: {})",
        cpu_pressure()
    );
    r
}

async fn latency_part_in(db: &BenchDb, opts: &Opts) -> Result<()> {
    db.exec("CREATE TABLE chat_plain (LIKE chat_data INCLUDING ALL)")
        .await?;
    let relay = Relay::start(&db.url).await?;
    // Every subscriber's every row is a sample: the p99 is the slow end of the whole fan-out.
    let mut ws = Vec::with_capacity(opts.subscribers);
    for _ in 0..opts.subscribers {
        ws.push(if opts.protobuf {
            subscribe_protobuf(&relay, CHANNEL).await?
        } else {
            subscribe(&relay, CHANNEL).await?
        });
    }
    let (raw_sink, raw_task) = raw_listener(&db.url).await?;
    let raw_sinks = [raw_sink];
    let ws_sinks: Vec<Arc<Sink>> = ws.iter().map(|(s, _)| s.clone()).collect();
    let mut agg: HashMap<(Path, u32), LatAgg> = HashMap::new();
    let mut run = 0;
    for rep in 0..opts.lat_reps {
        for &rate in &opts.rates {
            let paths = if rep % 2 == 0 {
                [Path::RawNotify, Path::Relay]
            } else {
                [Path::Relay, Path::RawNotify]
            };
            for path in paths {
                run += 1;
                let tag = format!("L{run}");
                let sinks: &[Arc<Sink>] = match path {
                    Path::Relay => &ws_sinks,
                    Path::RawNotify => &raw_sinks,
                };
                for sink in sinks {
                    sink.take();
                }
                let commits = drive(&db.url, path, rate, opts.lat_secs, &tag).await?;
                // One deadline for all subscribers: 10 s for everything to arrive.
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut j = collect(&sinks[0], &commits, &tag, deadline).await;
                for sink in &sinks[1..] {
                    let more = collect(sink, &commits, &tag, deadline).await;
                    j.lat.extend(more.lat);
                    j.missing += more.missing;
                    j.last_recv = j.last_recv.max(more.last_recv);
                }
                let a = agg.entry((path, rate)).or_default();
                let first = commits.iter().map(|c| c.1).min();
                let last = commits.iter().map(|c| c.1).max();
                if let (Some(f), Some(l)) = (first, last)
                    && l > f
                {
                    a.achieved
                        .push((commits.len() - 1) as f64 / (l - f).as_secs_f64());
                }
                if let (Some(f), Some(l)) = (j.first_recv, j.last_recv)
                    && l > f
                {
                    // Per subscriber: rows delivered to each, over the span of deliveries.
                    let per_sub = j.lat.len() / sinks.len();
                    a.delivered
                        .push(per_sub.saturating_sub(1) as f64 / (l - f).as_secs_f64());
                }
                a.missing += j.missing;
                if path == Path::Relay {
                    breakdown(db, &tag, &j.times, &mut a.to_seq, &mut a.to_client).await?;
                }
                let s: Vec<u64> = j.lat.iter().map(|x| x.1).collect();
                println!(
                    "  rep {} {:>5}/s {:<18} p50 {:>7} ms  p99 {:>7} ms  missing {}",
                    rep + 1,
                    rate,
                    match path {
                        Path::Relay => "relay (WebSocket)",
                        Path::RawNotify => "raw LISTEN/NOTIFY",
                    },
                    ms(pct(&s, 50.0)),
                    ms(pct(&s, 99.0)),
                    j.missing
                );
                a.samples.extend(s);
            }
        }
    }
    let gaps: u64 = ws_sinks
        .iter()
        .map(|s| s.offset_gaps.load(Ordering::Relaxed))
        .sum();
    for (_, task) in ws {
        task.abort();
    }
    raw_task.abort();
    relay.stop().await?;

    println!();
    let mut out = Vec::new();
    let mut split = Vec::new();
    for &rate in &opts.rates {
        // [raw, relay] × [p50, p95, p99]
        let mut p = [[0u64; 3]; 2];
        for (k, path) in [Path::RawNotify, Path::Relay].into_iter().enumerate() {
            let a = agg.get(&(path, rate)).context("no runs")?;
            let s = &a.samples;
            p[k] = [pct(s, 50.0), pct(s, 95.0), pct(s, 99.0)];
            out.push(vec![
                format!("{rate}/s"),
                match path {
                    Path::Relay => "relay -> WebSocket".into(),
                    Path::RawNotify => "raw LISTEN/NOTIFY".into(),
                },
                format!("{:.0}", median(&a.achieved)),
                format!("{:.0}", median(&a.delivered)),
                s.len().to_string(),
                ms(p[k][0]),
                ms(p[k][1]),
                ms(p[k][2]),
                ms(s.iter().max().copied().unwrap_or(0)),
                a.missing.to_string(),
            ]);
            if path == Path::Relay {
                split.push(vec![
                    format!("{rate}/s"),
                    format!("{:.2}", pct_f(&a.to_seq, 50.0)),
                    format!("{:.2}", pct_f(&a.to_seq, 99.0)),
                    format!("{:.2}", pct_f(&a.to_client, 50.0)),
                    format!("{:.2}", pct_f(&a.to_client, 99.0)),
                ]);
            }
        }
        let ratio = |i: usize| {
            if p[0][i] == 0 {
                "-".to_owned()
            } else {
                format!("x{:.0}", p[1][i] as f64 / p[0][i] as f64)
            }
        };
        let added = |i: usize| format!("+{}", ms(p[1][i].saturating_sub(p[0][i])));
        let blank = String::new;
        out.push(vec![
            blank(),
            "  relay / raw".into(),
            blank(),
            blank(),
            blank(),
            ratio(0),
            ratio(1),
            ratio(2),
            blank(),
            blank(),
        ]);
        out.push(vec![
            blank(),
            "  relay - raw".into(),
            blank(),
            blank(),
            blank(),
            added(0),
            added(1),
            added(2),
            blank(),
            blank(),
        ]);
    }
    table(
        &[
            "rate",
            "path",
            "written/s",
            "delivered/s",
            "rows",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "missing",
        ],
        &out,
    );
    println!(
        "\n(percentiles over all repetitions' rows; written/s and delivered/s are medians of runs; \
         offset gaps seen by the WebSocket client: {gaps})\n"
    );
    println!("Where the relay's time goes (sequenced = relay.publications.sequenced_at):");
    table(
        &[
            "rate",
            "commit->sequenced p50 ms",
            "p99 ms",
            "sequenced->client p50 ms",
            "p99 ms",
        ],
        &split,
    );
    Ok(())
}

// ---- part 3: a long transaction ---------------------------------------------------------------------

/// What the long transaction is.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// INSERT into another table of the same database, held open.
    WriterSameDb,
    /// INSERT in another database of the same cluster, held open.
    WriterOtherDb,
    /// A read-only REPEATABLE READ transaction (no xid), held open: should not delay anything.
    ReadOnly,
}

impl Hold {
    fn label(self) -> &'static str {
        match self {
            Self::WriterSameDb => "writer tx, same database",
            Self::WriterOtherDb => "writer tx, other database",
            Self::ReadOnly => "read-only tx (no xid)",
        }
    }
}

async fn hold_open(url: &str, hold: Hold, dur: Duration) -> Result<(Instant, Instant)> {
    let mut conn = connect(url).await?;
    let mut tx = conn.begin().await?;
    match hold {
        Hold::WriterSameDb | Hold::WriterOtherDb => {
            sqlx::query("INSERT INTO bench_other (note) VALUES ('long transaction')")
                .execute(&mut *tx)
                .await?;
        }
        Hold::ReadOnly => {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT count(*) FROM chat_data")
                .execute(&mut *tx)
                .await?;
        }
    }
    let opened = Instant::now();
    tokio::time::sleep(dur).await;
    tx.commit().await?;
    let closed = Instant::now();
    conn.close().await?;
    Ok((opened, closed))
}

async fn longtx_part(opts: &Opts) -> Result<()> {
    println!(
        "\n## 3. Long transactions: a 100/s stream through the connector while other transactions stay open {:.1} s\n",
        opts.hold.as_secs_f64()
    );
    let db = BenchDb::create().await?;
    let other = BenchDb::create().await;
    let r = match &other {
        Ok(other) => longtx_part_in(&db, other, opts).await,
        Err(e) => Err(anyhow::anyhow!("creating the second database: {e}")),
    };
    if let Ok(other) = other {
        other.drop_db().await;
    }
    db.drop_db().await;
    println!(
        "(CPU pressure, PSI some avg60, after this part: {})",
        cpu_pressure()
    );
    r
}

async fn longtx_part_in(db: &BenchDb, other: &BenchDb, opts: &Opts) -> Result<()> {
    let create = "CREATE TABLE bench_other (id bigint GENERATED ALWAYS AS IDENTITY, note text)";
    db.exec(create).await?;
    other.exec(create).await?;
    let relay = Relay::start(&db.url).await?;
    let (sink, task) = subscribe(&relay, CHANNEL).await?;
    let gap = Duration::from_millis(1000);
    let holds = [Hold::WriterSameDb, Hold::WriterOtherDb, Hold::ReadOnly];
    let total = gap + (opts.hold + gap) * holds.len() as u32;

    let phases = {
        let (url, other_url, hold) = (db.url.clone(), other.url.clone(), opts.hold);
        tokio::spawn(async move {
            let mut windows = Vec::new();
            tokio::time::sleep(gap).await;
            for h in holds {
                let url = match h {
                    Hold::WriterOtherDb => &other_url,
                    _ => &url,
                };
                windows.push((h, hold_open(url, h, hold).await?));
                tokio::time::sleep(gap).await;
            }
            Ok::<_, anyhow::Error>(windows)
        })
    };
    let commits = drive(&db.url, Path::Relay, 100, total.as_secs_f64(), "T").await?;
    let windows = phases.await??;
    let j = collect(
        &sink,
        &commits,
        "T",
        Instant::now() + Duration::from_secs(10),
    )
    .await;
    task.abort();
    relay.stop().await?;

    let mut out = Vec::new();
    let mut outside: Vec<u64> = j
        .lat
        .iter()
        .filter(|(at, _)| !windows.iter().any(|(_, (o, c))| at >= o && at < c))
        .map(|x| x.1)
        .collect();
    outside.sort_unstable();
    out.push(vec![
        "no long transaction open".into(),
        outside.len().to_string(),
        ms(pct(&outside, 50.0)),
        ms(pct(&outside, 95.0)),
        ms(outside.last().copied().unwrap_or(0)),
        "-".into(),
        "-".into(),
    ]);
    for (h, (o, c)) in &windows {
        let inside: Vec<(u64, i64)> = j
            .lat
            .iter()
            .filter(|(at, _)| at >= o && at < c)
            .map(|(at, l)| {
                // How long the long transaction still had to run when this row committed.
                let remaining = micros(c.saturating_duration_since(*at));
                (
                    *l,
                    i64::try_from(*l).unwrap_or(0) - i64::try_from(remaining).unwrap_or(0),
                )
            })
            .collect();
        let mut l: Vec<u64> = inside.iter().map(|x| x.0).collect();
        l.sort_unstable();
        let mut excess: Vec<f64> = inside.iter().map(|x| x.1 as f64 / 1000.0).collect();
        excess.sort_by(f64::total_cmp);
        let remaining: Vec<f64> = j
            .lat
            .iter()
            .filter(|(at, _)| at >= o && at < c)
            .map(|(at, _)| c.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            .collect();
        out.push(vec![
            format!("{} ({:.1} s)", h.label(), (*c - *o).as_secs_f64()),
            l.len().to_string(),
            ms(pct(&l, 50.0)),
            ms(pct(&l, 95.0)),
            ms(l.last().copied().unwrap_or(0)),
            format!("{:.0}", median(&remaining)),
            if matches!(h, Hold::ReadOnly) {
                "- (not held back)".into()
            } else {
                format!("{:.2}", median(&excess))
            },
        ]);
    }
    table(
        &[
            "rows committed while",
            "rows",
            "p50 ms",
            "p95 ms",
            "max ms",
            "median remaining open ms",
            "median latency - remaining ms",
        ],
        &out,
    );
    println!(
        "\n(missing rows: {}; offset gaps seen by the client: {})",
        j.missing,
        sink.offset_gaps.load(Ordering::Relaxed)
    );
    Ok(())
}

/// The share of time some task waited for a CPU over the last minute (Linux PSI), if available.
fn cpu_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("some"))
                .and_then(|l| l.split_whitespace().find(|f| f.starts_with("avg60=")))
                .map(|f| format!("{}%", f.trim_start_matches("avg60=")))
        })
        .unwrap_or_else(|| "n/a".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

// ---- main -------------------------------------------------------------------------------------------

async fn machine() -> Result<()> {
    let admin = PgPool::connect(&admin_url())
        .await
        .context("connecting to DATABASE_URL")?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&admin)
        .await?;
    let mut settings = Vec::new();
    for s in [
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "shared_buffers",
        "max_wal_size",
    ] {
        let v: String = sqlx::query_scalar(&format!("SELECT current_setting('{s}')"))
            .fetch_one(&admin)
            .await?;
        settings.push(format!("{s}={v}"));
    }
    admin.close().await;
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!("# Relay benchmark");
    println!("machine:  {cpus} CPUs ({model}); PostgreSQL and this process share them");
    println!("postgres: {version}");
    println!("settings: {}", settings.join(" "));
    println!(
        "load:     CPU pressure (PSI some, avg60) {} at start; loadavg {}",
        cpu_pressure(),
        loadavg()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = Opts::parse()?;
    let started = Instant::now();
    machine().await?;
    if opts.quick {
        println!("(--quick: a smoke run; the figures are not for publication)");
    }
    for &mode in &opts.modes {
        // The wal cluster lives as long as its parts run (stopped and removed on drop).
        let cluster = match mode {
            Mode::Trigger => {
                set_target(shared_url(), mode);
                None
            }
            Mode::Wal => {
                let c = tokio::task::spawn_blocking(|| cluster::Cluster::start(&[])).await?;
                set_target(c.url("postgres"), mode);
                Some(c)
            }
        };
        println!(
            "\n# Capture mode `{}`{}",
            mode.name(),
            match &cluster {
                Some(c) => format!(
                    " (a throwaway wal_level = logical cluster on port {}, default settings)",
                    c.port
                ),
                None => " (the server of DATABASE_URL)".into(),
            }
        );
        if opts.wants("write") {
            write_part(&opts).await?;
        }
        if opts.wants("latency") {
            latency_part(&opts).await?;
        }
        if opts.wants("longtx") {
            longtx_part(&opts).await?;
        }
        drop(cluster);
    }
    println!(
        "\ntotal time {:.0} s; CPU pressure (PSI some, avg60) {} at the end; loadavg {}",
        started.elapsed().as_secs_f64(),
        cpu_pressure(),
        loadavg()
    );
    Ok(())
}
