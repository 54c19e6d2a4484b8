//! Part 2, end-to-end latency: commit-return to WebSocket-receive through a real connector, against
//! raw LISTEN/NOTIFY at the same rates.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use sqlx::Connection;

use crate::cli::Opts;
use crate::clients::{Sink, raw_listener, subscribe, subscribe_protobuf};
use crate::harness::{BenchDb, Relay, connect};
use crate::report::{epoch_millis, median, micros, ms, pct, print_part_pressure, table};
use crate::{CHANNEL, INSERT_NOTIFY, INSERT_ONE, TEXT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Path {
    /// Through the connector to a WebSocket client.
    Relay,
    /// Raw LISTEN/NOTIFY (payload = the row's id), the baseline.
    RawNotify,
}

/// `writers` connections insert single-row transactions at `rate` rows/s in total for `secs`;
/// returns each row's id and the instant its commit returned.
pub(crate) async fn drive(
    url: &str,
    (path, rate, writers): (Path, u32, usize),
    secs: f64,
    tag: &str,
) -> Result<Vec<(String, Instant)>> {
    let per_writer = Duration::from_secs_f64(writers as f64 / f64::from(rate));
    let mut conns = Vec::new();
    for _ in 0..writers {
        conns.push(connect(url).await?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (w, mut conn) in conns.into_iter().enumerate() {
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut next = start + per_writer.mul_f64(w as f64 / writers as f64);
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
pub(crate) struct Joined {
    /// Commit → receive, µs, per row, with the commit instant.
    pub(crate) lat: Vec<(Instant, u64)>,
    /// Commit and receive instants by row id.
    times: HashMap<String, (Instant, Instant)>,
    pub(crate) missing: usize,
    first_recv: Option<Instant>,
    last_recv: Option<Instant>,
}

pub(crate) async fn collect(
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

pub(crate) async fn latency_part(opts: &Opts) -> Result<()> {
    println!(
        "\n## 2. End-to-end latency: {} writers, single-row commits at fixed rates, {} WebSocket subscribers ({}), {} s per run, {} interleaved repetition(s)\n",
        opts.lat_writers,
        opts.subscribers,
        if opts.protobuf { "Protobuf" } else { "JSON" },
        opts.lat_secs,
        opts.lat_reps
    );
    let db = BenchDb::create().await?;
    let r = latency_part_in(&db, opts).await;
    db.drop_db().await;
    print_part_pressure();
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
                let a = agg.entry((path, rate)).or_default();
                latency_run(db, sinks, (path, rate), opts, &tag, rep, a).await?;
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
    print_latency(opts, &agg, gaps)
}

/// One run of repetition `rep` (run tag `tag`): writers at `rate` through `path` for `opts.lat_secs`, the
/// rows collected from `sinks` into `a`, one line printed.
async fn latency_run(
    db: &BenchDb,
    sinks: &[Arc<Sink>],
    (path, rate): (Path, u32),
    opts: &Opts,
    tag: &str,
    rep: usize,
    a: &mut LatAgg,
) -> Result<()> {
    for sink in sinks {
        sink.take();
    }
    let shape = (path, rate, opts.lat_writers);
    let commits = drive(&db.url, shape, opts.lat_secs, tag).await?;
    // One deadline for all subscribers: 10 s for everything to arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut j = collect(&sinks[0], &commits, tag, deadline).await;
    for sink in &sinks[1..] {
        let more = collect(sink, &commits, tag, deadline).await;
        j.lat.extend(more.lat);
        j.missing += more.missing;
        j.last_recv = j.last_recv.max(more.last_recv);
    }
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
        breakdown(db, tag, &j.times, &mut a.to_seq, &mut a.to_client).await?;
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
    Ok(())
}

/// The latency part's tables: both paths per rate with their ratios and differences, then the
/// relay's latency split at the sequencing.
fn print_latency(opts: &Opts, agg: &HashMap<(Path, u32), LatAgg>, gaps: u64) -> Result<()> {
    let mut out = Vec::new();
    let mut split = Vec::new();
    for &rate in &opts.rates {
        latency_rows(agg, rate, &mut out, &mut split)?;
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

/// The rows of `rate` in the latency table (`out`: raw, relay, their ratio and difference) and in
/// the split table (`split`).
fn latency_rows(
    agg: &HashMap<(Path, u32), LatAgg>,
    rate: u32,
    out: &mut Vec<Vec<String>>,
    split: &mut Vec<Vec<String>>,
) -> Result<()> {
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
    Ok(())
}
