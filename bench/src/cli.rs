//! The command line (the flags `scripts/bench` passes on) and where the parts being run create
//! their databases.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) parts: Vec<String>,
    /// Seconds per write-path run.
    pub(crate) secs: f64,
    /// Repetitions of the write-path runs (interleaved).
    pub(crate) reps: usize,
    /// Repetitions of the latency runs (interleaved).
    pub(crate) lat_reps: usize,
    /// Rates (rows/s) of the latency part.
    pub(crate) rates: Vec<u32>,
    /// WebSocket subscribers of the latency part.
    pub(crate) subscribers: usize,
    /// The latency part's subscribers speak Protobuf (`--protocol protobuf`) instead of JSON.
    pub(crate) protobuf: bool,
    /// Seconds per latency run.
    pub(crate) lat_secs: f64,
    /// Writer connections of the latency part (`--lat-writers`; default 4). Each commits 1-row
    /// transactions in turn, so on a server whose commits wait for the disk a high target rate
    /// needs more of them.
    pub(crate) lat_writers: usize,
    /// Channels the write part's rows are spread over (`--write-channels`; default 1). Above 1 the
    /// mapping's channel is `incoming-chat:{username}` and each transaction picks one at random,
    /// as writers of a chat with many rooms do.
    pub(crate) write_channels: u32,
    /// How long the long transactions stay open.
    pub(crate) hold: Duration,
    /// Capture modes to measure, in order.
    pub(crate) modes: Vec<Mode>,
}

/// The capture mode a part runs in, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Triggers + sequencer, on the server of `DATABASE_URL`.
    Trigger,
    /// Logical replication, on a throwaway `wal_level = logical` cluster.
    Wal,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
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

/// The target of the parts being run (set per capture mode by `main`).
static TARGET: Mutex<Option<Target>> = Mutex::new(None);

/// The values of the options not given: a full run's, or `--quick`'s.
struct Defaults {
    secs: f64,
    reps: usize,
    lat_reps: usize,
    rates: Vec<u32>,
    lat_secs: f64,
    hold: Duration,
}

impl Defaults {
    fn new(quick: bool) -> Self {
        let (secs, reps, lat_reps, rates, lat_secs, hold) = if quick {
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
        Self {
            secs,
            reps,
            lat_reps,
            rates,
            lat_secs,
            hold,
        }
    }
}

/// The modes of `--capture` (`trigger,wal`), in order.
fn parse_modes(list: &str) -> Result<Vec<Mode>> {
    let mut m = Vec::new();
    for name in list.split(',') {
        m.push(match name {
            "trigger" => Mode::Trigger,
            "wal" => Mode::Wal,
            other => {
                bail!("unknown capture mode {other:?} (expected trigger, wal)")
            }
        });
    }
    Ok(m)
}

/// Points the following parts at `admin_url`, with connectors in `mode`.
pub(crate) fn set_target(admin_url: String, mode: Mode) {
    *TARGET.lock().unwrap() = Some(Target { admin_url, mode });
}

pub(crate) fn current_mode() -> Mode {
    TARGET
        .lock()
        .unwrap()
        .as_ref()
        .map_or(Mode::Trigger, |t| t.mode)
}

impl Opts {
    pub(crate) fn parse() -> Result<Self> {
        let mut args = std::env::args().skip(1);
        let mut quick = false;
        let mut parts = None;
        let mut secs = None;
        let mut reps = None;
        let mut lat_reps = None;
        let mut lat_writers = None;
        let mut write_channels = None;
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
                "--lat-writers" => {
                    lat_writers = Some(value("--lat-writers")?.parse::<usize>()?);
                }
                "--write-channels" => {
                    let n = value("--write-channels")?.parse::<u32>()?;
                    if !(1..=100_000).contains(&n) {
                        bail!("--write-channels {n}: between 1 and 100000");
                    }
                    write_channels = Some(n);
                }
                "--capture" => modes = Some(parse_modes(&value("--capture")?)?),
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
                        "bench [--quick] [--only write,latency,longtx] [--secs S] [--reps N] [--lat-reps N] [--lat-writers N] [--write-channels N] [--rates R1,R2,..] [--subscribers N] [--capture trigger,wal] [--protocol json|protobuf]"
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
        let d = Defaults::new(quick);
        Ok(Self {
            quick,
            parts,
            secs: secs.unwrap_or(d.secs),
            reps: reps.unwrap_or(d.reps).max(1),
            lat_reps: lat_reps.unwrap_or(d.lat_reps).max(1),
            rates: rates.unwrap_or(d.rates),
            subscribers: subscribers.unwrap_or(if quick { 10 } else { 100 }).max(1),
            protobuf,
            lat_secs: d.lat_secs,
            lat_writers: lat_writers.unwrap_or(crate::LAT_WRITERS).max(1),
            write_channels: write_channels.unwrap_or(1),
            hold: d.hold,
            modes: modes.unwrap_or_else(|| vec![Mode::Trigger, Mode::Wal]),
        })
    }

    pub(crate) fn wants(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

pub(crate) fn admin_url() -> String {
    if let Some(t) = TARGET.lock().unwrap().as_ref() {
        return t.admin_url.clone();
    }
    shared_url()
}

/// The shared server's admin URL (`DATABASE_URL`).
pub(crate) fn shared_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}
