//! Benchmark of the change stream's gapless algorithm (xid8 horizon + sequencer), against baselines
//! measured in the same run. Run it with `scripts/bench` (release build); see `docs/benchmarks.md`.
//! Its own crate (`relay-bench`), so the connector's library graph has none of its dependencies.
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
//!
//! # Files
//! `cli.rs` the flags; `harness.rs` the databases and the in-process connector; `clients.rs` the
//! receivers (WebSocket subscribers, a raw LISTEN connection); `write.rs`, `latency.rs`, `longtx.rs`
//! the three parts; `report.rs` statistics, tables and the machine's description.

// A benchmark prints its report by design, and is a tool rather than a library: panicking on an
// impossible state (a poisoned lock) is fine here.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

// The throwaway `wal_level = logical` cluster of the connector's tests, shared rather than copied.
#[path = "../../connector/tests/support/cluster.rs"]
#[allow(dead_code, clippy::expect_used, clippy::panic)]
mod cluster;

mod cli;
mod clients;
mod harness;
mod latency;
mod longtx;
mod report;
mod write;

use std::time::Instant;

use anyhow::Result;

use crate::cli::{Mode, Opts, set_target, shared_url};
use crate::latency::latency_part;
use crate::longtx::longtx_part;
use crate::report::{cpu_pressure, loadavg, machine, settings_line};
use crate::write::write_part;

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
                // fsync on, as on the server of DATABASE_URL and any real one (the test clusters
                // run with it off): with it off every configuration is bound by CPU alone.
                let c =
                    tokio::task::spawn_blocking(|| cluster::Cluster::start(&["fsync=on"])).await?;
                set_target(c.url("postgres"), mode);
                Some(c)
            }
        };
        let server = match &cluster {
            Some(c) => format!(
                " (a throwaway wal_level = logical cluster on port {}; settings: {})",
                c.port,
                settings_line(&c.url("postgres")).await?
            ),
            None => " (the server of DATABASE_URL)".into(),
        };
        println!("\n# Capture mode `{}`{server}", mode.name());
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
