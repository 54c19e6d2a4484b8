//! Part 3, a long transaction: rows committed while a transaction holding an xid stays open are
//! delivered only when it ends (the documented cost of the xid8 horizon).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use sqlx::Connection;

use crate::CHANNEL;
use crate::cli::Opts;
use crate::clients::subscribe;
use crate::harness::{BenchDb, Relay, connect};
use crate::latency::{Joined, Path, collect, drive};
use crate::report::{median, micros, ms, pct, print_part_pressure, table};

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

pub(crate) async fn longtx_part(opts: &Opts) -> Result<()> {
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
    print_part_pressure();
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
    let commits = drive(
        &db.url,
        (Path::Relay, 100, crate::LAT_WRITERS),
        total.as_secs_f64(),
        "T",
    )
    .await?;
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
        out.push(window_row(&j, *h, *o, *c));
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

/// The row of the rows committed while the long transaction `h` was open (from `o` to `c`): their
/// latencies, how long the transaction still had to run, and the latency beyond that.
fn window_row(j: &Joined, h: Hold, o: Instant, c: Instant) -> Vec<String> {
    let inside: Vec<(u64, i64)> = j
        .lat
        .iter()
        .filter(|(at, _)| *at >= o && *at < c)
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
        .filter(|(at, _)| *at >= o && *at < c)
        .map(|(at, _)| c.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        .collect();
    vec![
        format!("{} ({:.1} s)", h.label(), (c - o).as_secs_f64()),
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
    ]
}
