//! Statistics and printing: medians, percentiles, the tables, and the machine the run is on.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use sqlx::PgPool;

use crate::cli::admin_url;

pub(crate) fn median(v: &[f64]) -> f64 {
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
pub(crate) fn pct(samples: &[u64], p: f64) -> u64 {
    // Sized to the largest sample (`saturating_record` on an auto-resizing histogram would clamp).
    let max = samples.iter().copied().max().unwrap_or(0).max(2);
    let mut h = hdrhistogram::Histogram::<u64>::new_with_max(max, 3)
        .expect("a maximum of 2 or more with 3 significant digits is valid");
    for &v in samples {
        h.saturating_record(v);
    }
    h.value_at_percentile(p)
}

pub(crate) fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(crate) fn epoch_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0)
}

/// Prints rows as an aligned table (first column left-aligned, the rest right-aligned).
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
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

/// Prints the CPU pressure at the end of a part of the benchmark.
pub(crate) fn print_part_pressure() {
    println!(
        "(CPU pressure, PSI some avg60, after this part: {})",
        cpu_pressure()
    );
}

/// The share of time some task waited for a CPU over the last minute (Linux PSI), if available.
pub(crate) fn cpu_pressure() -> String {
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

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// The durability and memory settings of the server at `url`, as one `name=value ...` line.
pub(crate) async fn settings_line(url: &str) -> Result<String> {
    let pool = PgPool::connect(url)
        .await
        .with_context(|| "connecting to read the server's settings")?;
    let mut settings = Vec::new();
    for s in [
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "shared_buffers",
        "max_wal_size",
    ] {
        let v: String = sqlx::query_scalar("SELECT current_setting($1)")
            .bind(s)
            .fetch_one(&pool)
            .await?;
        settings.push(format!("{s}={v}"));
    }
    pool.close().await;
    Ok(settings.join(" "))
}

pub(crate) async fn machine() -> Result<()> {
    let admin = PgPool::connect(&admin_url())
        .await
        .context("connecting to DATABASE_URL")?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&admin)
        .await?;
    let settings = settings_line(&admin_url()).await?;
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
    println!("settings: {settings}");
    println!(
        "load:     CPU pressure (PSI some, avg60) {} at start; loadavg {}",
        cpu_pressure(),
        loadavg()
    );
    Ok(())
}
