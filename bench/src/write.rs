//! Part 1, the write path: what writers pay for the capture, against baselines in the same run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::seq::SliceRandom;
use sqlx::{Connection, PgConnection};

use crate::cli::{Mode, Opts, current_mode};
use crate::harness::{BenchDb, Relay, config_json, connect, reset_wal};
use crate::report::{epoch_millis, loadavg, median, micros, pct, print_part_pressure, table};
use crate::{ALGORITHM_B, CHANNEL, INSERT_ROWS, SPREAD_CHANNELS, TEXT, WAKE_NOOP, WRITERS};

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

/// The channels the write part's rows go to: how many, the mapping's channel template, and the
/// mapping it makes (for the trigger configurations without a connector).
struct Spread {
    channels: u32,
    template: String,
    mappings: Vec<connector::config::Mapping>,
}

impl Spread {
    /// `--write-channels n`: one channel (the latency part's) or `n` rooms by `username`.
    fn new(db: &BenchDb, channels: u32) -> Result<Self> {
        let template = if channels > 1 {
            format!("{CHANNEL}:{{username}}")
        } else {
            CHANNEL.to_owned()
        };
        let config = connector::Config::from_json(&config_json(&db.url, Mode::Trigger, &template))?;
        Ok(Self {
            channels,
            template,
            mappings: config.mappings,
        })
    }
}

/// Puts the database in configuration `cfg`, from a clean state; returns the connector it started
/// (mapping `chat_data` to the spread's channel template).
async fn apply(
    db: &BenchDb,
    cfg: WriteCfg,
    wake_sql: &str,
    spread: &Spread,
) -> Result<Option<Relay>> {
    let (mappings, channel) = (&spread.mappings, spread.template.as_str());
    db.exec("DROP TRIGGER IF EXISTS bench_b ON chat_data")
        .await?;
    db.exec(&format!(
        "ALTER DATABASE {} RESET relay.writer_notify",
        db.name
    ))
    .await?;
    connector::db::triggers::sync(&db.pool, &[], None).await?;
    db.exec(wake_sql).await?;
    // The writers' wake-up starts disarmed, as a running sequencer keeps it while changes flow: a
    // connector of an earlier run may have armed it before it stopped, and (b) would then notify on
    // every commit.
    db.exec(
        "TRUNCATE chat_data, relay.changelog, relay.publications, relay.channels, bench_b_channels,
                  bench_b_log;
         UPDATE relay.sequencer SET last_seq = 0;
         SELECT setval('relay.wakeup_armed', 0);",
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
            return Ok(Some(
                Relay::start_in(&db.url, Mode::Trigger, channel).await?,
            ));
        }
        WriteCfg::WalWithConnector => {
            reset_wal(db).await?;
            return Ok(Some(Relay::start_in(&db.url, Mode::Wal, channel).await?));
        }
        WriteCfg::TriggerWithConnectorNotifyAll => {
            let relay = Relay::start_in(&db.url, Mode::Trigger, channel).await?;
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

/// When the writers of one run start, when their commits start counting (after the warm-up), and
/// when they stop.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    from: Instant,
    until: Instant,
}

/// 8 writers commit `rows`-row INSERT transactions for `secs` (after a short warm-up), each to one
/// of `spread` channels (Algorithm B: its own number of channels).
async fn write_run(
    db: &BenchDb,
    cfg: WriteCfg,
    (rows, sync): (i32, bool),
    spread: u32,
    secs: f64,
    run: usize,
) -> Result<WriteRun> {
    let channels = match cfg {
        WriteCfg::AlgB { channels, .. } => channels,
        _ => spread,
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
    let window = Window { start, from, until };
    let mut tasks = Vec::new();
    for (w, conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(writer(conn, w, run, channels, rows, window)));
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

/// Writer `w` of run `run`: commits until `window.until`; the commit times (microseconds) of the
/// transactions inside the counted window, and the serialization retries.
async fn writer(
    mut conn: PgConnection,
    w: usize,
    run: usize,
    channels: u32,
    rows: i32,
    window: Window,
) -> Result<(Vec<u64>, u64)> {
    let Window { start, from, until } = window;
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
}

pub(crate) async fn write_part(opts: &Opts) -> Result<()> {
    println!(
        "\n## 1. Write path: {WRITERS} writers, {} s per run after 0.25 s warm-up, {} interleaved repetition(s), medians\n",
        opts.secs, opts.reps
    );
    let db = BenchDb::create().await?;
    let r = write_part_in(&db, opts).await;
    db.drop_db().await;
    print_part_pressure();
    r
}

/// The runs of every configuration: (configuration index, rows per transaction,
/// synchronous_commit) → one result per repetition.
type Results = HashMap<(usize, i32, bool), Vec<WriteRun>>;

async fn write_part_in(db: &BenchDb, opts: &Opts) -> Result<()> {
    let wake_sql: String =
        sqlx::query_scalar("SELECT pg_get_functiondef('relay.wake()'::regprocedure)")
            .fetch_one(&db.pool)
            .await?;
    db.exec(ALGORITHM_B).await?;
    let spread = Spread::new(db, opts.write_channels)?;
    if spread.channels > 1 {
        println!(
            "Rows spread over {} channels ({}), one picked at random per transaction\n",
            spread.channels, spread.template
        );
    }
    let cfgs = WriteCfg::for_mode(current_mode());
    let mut results: Results = HashMap::new();
    let mut run = 0;
    for rep in 0..opts.reps {
        for sync in [true, false] {
            for rows in [1, 10] {
                let mut order: Vec<usize> = (0..cfgs.len()).collect();
                order.shuffle(&mut rand::rng());
                for i in order {
                    let cfg = cfgs[i];
                    run += 1;
                    let r =
                        measure(db, cfg, &wake_sql, &spread, (rows, sync), opts.secs, run).await?;
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
            print_commits(cfgs, &results, rows, sync);
            print_leader_profile(cfgs, &results, rows, sync);
            println!();
        }
    }
    Ok(())
}

/// One run of `cfg` with `(rows, sync)`: the configuration applied, the writers' figures, and with a
/// connector running, its drain time (and in `wal` mode the leader's profile); the connector stopped.
async fn measure(
    db: &BenchDb,
    cfg: WriteCfg,
    wake_sql: &str,
    spread: &Spread,
    (rows, sync): (i32, bool),
    secs: f64,
    run: usize,
) -> Result<WriteRun> {
    let relay = apply(db, cfg, wake_sql, spread).await?;
    let before = match (&relay, cfg) {
        (Some(relay), WriteCfg::WalWithConnector) => {
            Some((wal_metrics(relay).await?, server_cpu(db).await?))
        }
        _ => None,
    };
    let mut r = write_run(db, cfg, (rows, sync), spread.channels, secs, run).await;
    if let Some(relay) = relay {
        if let Ok(run) = &mut r {
            run.drain_s = Some(drain(db).await?);
            if let Some((m0, (w0, r0))) = before {
                let m1 = wal_metrics(&relay).await?;
                let (w1, r1) = server_cpu(db).await?;
                let d =
                    |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
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
    r
}

/// The writers' table of `(rows, sync)`: medians of every configuration, ratios to the baseline.
fn print_commits(cfgs: &[WriteCfg], results: &Results, rows: i32, sync: bool) {
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
}

/// Where the `wal` leader's time went in the runs of `(rows, sync)` that profiled it (none in
/// `trigger` mode: nothing printed).
fn print_leader_profile(cfgs: &[WriteCfg], results: &Results, rows: i32, sync: bool) {
    fn per_row(x: f64, r: f64) -> f64 {
        if r > 0.0 { x * 1e6 / r } else { 0.0 }
    }
    let mut prof = Vec::new();
    for (i, cfg) in cfgs.iter().enumerate() {
        let ps: Vec<LeaderProfile> = results[&(i, rows, sync)]
            .iter()
            .filter_map(|r| r.leader)
            .collect();
        if ps.is_empty() {
            continue;
        }
        let m = |f: fn(&LeaderProfile) -> f64| median(&ps.iter().map(f).collect::<Vec<_>>());
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
        println!("where the wal leader's time went (medians of runs; per publication written):");
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
}
