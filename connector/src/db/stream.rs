//! The change stream: turns committed changes into hub publications, gaplessly and in order.
//!
//! One task per connector node. It hears the node's LISTEN connection ([`super::listener`]) on
//! `relay_changes` (a writer committed a change) and `relay_publications` (some node sequenced
//! changes). On every wake-up, on every (re)connect and on a timer it:
//!
//! 1. calls `relay.sequence_changes()` until the changelog below the xid8 horizon is drained (any
//!    node may do this; the function serializes callers with an advisory lock);
//! 2. reads `relay.publications` with `seq > cursor` in `seq` order and hands each row to the hub.
//!
//! While changes flow, the sequencer's calls (`relay.sequence_batch_rows()`, migration 0021) return
//! the rows they moved, and the reader hands a batch that follows its cursor to the hub at once
//! instead of reading it back; any other batch (another node's came in between, the reader was busy)
//! is read from the history as before.
//!
//! `seq` is assigned under the sequencer's transaction lock, so `seq` order is commit order and the
//! cursor read never skips a row. A NOTIFY is only a hint: a lost one, a killed LISTEN backend or a
//! restart costs at most one poll interval, never a publication. While the LISTEN connection is down
//! the node is not ready (`/readyz`), and every reconnect is followed by a catch-up read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::value::RawValue;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::listener::ListenEvent;
use crate::backoff::Backoff;
use crate::config::StreamConfig;
use crate::hub::Hub;

/// A writer committed a change while the sequencer slept.
const CHANGES: &str = "relay_changes";
/// Some node sequenced changes into the history.
const PUBLICATIONS: &str = "relay_publications";

/// State shared with the HTTP endpoints; the counters are registered in [`crate::metrics::Metrics`].
#[derive(Debug)]
pub struct StreamStatus {
    /// The LISTEN connection is up and the last catch-up read succeeded.
    pub ready: AtomicBool,
    /// `seq` of the last publication handed to the hub.
    pub cursor: Gauge,
    /// Reconnects of the LISTEN connection.
    pub reconnects: Counter,
    /// Catch-up reads (after every (re)connect of the LISTEN connection).
    pub catch_ups: Counter,
    /// Calls of the sequencer (`relay.sequence_batch_rows()`) by this node.
    pub polls: Counter,
    /// Batches this node sequenced and handed to its hub without reading them back.
    pub handed: Counter,
    /// Time from a change being written to its publication being handed to the hub, in seconds
    /// (buckets: [`LAG_BUCKETS`]).
    pub lag: Histogram,
    /// Whether this node's capture triggers are in place (see [`crate::db::triggers::watch`]).
    pub capture: Arc<crate::db::triggers::CaptureStatus>,
}

impl Default for StreamStatus {
    fn default() -> Self {
        Self {
            ready: AtomicBool::default(),
            cursor: Gauge::default(),
            reconnects: Counter::default(),
            catch_ups: Counter::default(),
            polls: Counter::default(),
            handed: Counter::default(),
            lag: Histogram::new(LAG_BUCKETS),
            capture: Arc::default(),
        }
    }
}

/// Why the stream stopped for a while (it backs off and catches up again).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    /// A query failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A history row the stream cannot hand on (not JSON, a negative number).
    #[error("unreadable publication row: {0}")]
    Row(String),
}

/// A [`StreamError::Row`].
fn row(e: impl std::fmt::Display) -> StreamError {
    StreamError::Row(e.to_string())
}

type Result<T, E = StreamError> = std::result::Result<T, E>;

/// What the stream task needs.
pub struct Stream {
    /// Query pool.
    pub pool: PgPool,
    /// The events of `relay_changes` and `relay_publications` (see [`Stream::CHANNELS`]).
    pub(crate) events: mpsc::UnboundedReceiver<ListenEvent>,
    /// Settings.
    pub config: StreamConfig,
    /// Where publications go.
    pub hub: Arc<Hub>,
    /// Shared status.
    pub status: Arc<StreamStatus>,
}

/// Bucket upper bounds of the delivery lag histogram, in seconds.
pub const LAG_BUCKETS: [f64; 13] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Wakes {
    /// A writer committed a change while the sequencer slept (NOTIFY `relay_changes`).
    changes: Notify,
    /// New publications are in the history (this node's sequencer, or NOTIFY `relay_publications`).
    publications: Notify,
}

type Row = (i64, String, i64, String, String, Option<String>, f64);

/// What one `relay.sequence_batch_rows()` call returns: the counters, then the moved rows' columns
/// (NULL when it moved nothing).
type BatchRow = (
    i32,
    bool,
    bool,
    i64,
    Option<Vec<i64>>,
    Option<Vec<String>>,
    Option<Vec<i64>>,
    Option<Vec<String>>,
    Option<Vec<String>>,
    Option<Vec<Option<String>>>,
    Option<Vec<f64>>,
);

/// Batches the sequencer may hand to the reader before it falls back to waking it.
const HANDOFF_BATCHES: usize = 2;

/// One call of `relay.sequence_batch_rows()`.
#[derive(Debug)]
struct Batch {
    /// Changes moved, or -1 when another node was sequencing.
    moved: i32,
    /// A transaction of this database is running: more changes may be ready soon.
    busy: bool,
    /// The writers' wake-up is armed after the call.
    armed: bool,
    /// The global sequence number after the call (another node's work shows here).
    last_seq: i64,
    /// The rows moved, in `seq` order.
    rows: Vec<Row>,
}

/// Quiet polls (nothing moved, nothing running) before the sequencer arms the writers' wake-up and
/// sleeps; the delay doubles from `active_poll_ms` between them (2 + 4 + 8 ms by default). Keeping
/// them at the active pace instead measured the same latency (docs/benchmarks.md): at 500 rows/s the
/// sequencer is rarely quiet, and a row waits for the active poll itself.
const QUIET_POLLS: u32 = 3;
/// While only a running transaction keeps it awake, the sequencer polls at the active pace this many
/// times, then its delay grows up to `BUSY_BACKOFF` x `active_poll_ms`.
const BUSY_ACTIVE_POLLS: u32 = 8;
/// See `BUSY_ACTIVE_POLLS`.
const BUSY_BACKOFF: u32 = 16;

/// Why a stream session ended.
enum End {
    /// Shutdown, or the listener is gone.
    Stop,
    /// The LISTEN connection was lost: wait for it to come back, then catch up.
    Lost,
    /// The LISTEN connection came back (a gap): catch up at once.
    Gap,
}

impl Stream {
    /// The notification channels the stream listens to.
    pub const CHANNELS: [&'static str; 2] = [CHANGES, PUBLICATIONS];

    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (_, closed) = mpsc::unbounded_channel();
        let mut events = std::mem::replace(&mut self.events, closed);
        let mut backoff = Backoff::reconnect();
        let mut cursor: Option<u64> = None;
        let mut listening = false;
        loop {
            // Reads start once the LISTEN connection is up, so no wake-up is lost after them.
            while !listening {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => None,
                    e = events.recv() => e,
                };
                match event {
                    None => return self.stop(),
                    Some(ListenEvent::Connected) => listening = true,
                    Some(ListenEvent::Lost | ListenEvent::Notification { .. }) => {}
                }
            }
            match self.session(&mut events, &shutdown, &mut cursor).await {
                Ok(End::Stop) => return self.stop(),
                Ok(End::Gap) => {
                    self.interrupted(false);
                }
                Ok(End::Lost) => {
                    self.interrupted(true);
                    listening = false;
                }
                Err(e) => {
                    // A session that got as far as ready was a success: start backing off afresh.
                    if self.interrupted(false) {
                        backoff.reset();
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %super::error_text(&e), retry_in_ms = wait.as_millis() as u64, "change stream interrupted");
                    tokio::select! {
                        _ = shutdown.cancelled() => return self.stop(),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn stop(&self) {
        self.status.ready.store(false, Ordering::Relaxed);
    }

    /// Counts an interruption and marks the node not ready; whether it was ready.
    fn interrupted(&self, lost: bool) -> bool {
        if lost {
            tracing::warn!("change stream: LISTEN connection lost; catching up when it is back");
        }
        self.status.reconnects.inc();
        self.status.ready.swap(false, Ordering::Relaxed)
    }

    /// One catch-up and the loops that follow it, until the LISTEN connection drops or comes back
    /// (a gap), a query fails, or shutdown.
    async fn session(
        &self,
        events: &mut mpsc::UnboundedReceiver<ListenEvent>,
        shutdown: &CancellationToken,
        cursor: &mut Option<u64>,
    ) -> Result<End> {
        let wakes = Wakes::default();
        if cursor.is_none() {
            let last: i64 = sqlx::query_scalar("SELECT last_seq FROM relay.sequencer")
                .fetch_one(&self.pool)
                .await?;
            *cursor = Some(u64::try_from(last).unwrap_or(0));
        }
        // Catch up: whatever committed while no connection listened.
        self.status.catch_ups.inc();
        self.sequence_all().await?;
        self.read(cursor).await?;
        self.status.ready.store(true, Ordering::Relaxed);
        tracing::info!(cursor = cursor.unwrap_or(0), "change stream ready");

        // Sequencing and reading run side by side: the next batch is sequenced while the last one is
        // fanned out. The sequencer's NOTIFY carries `tag`, so this node's listener skips its own.
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let (handoff, mut handed) = mpsc::channel(HANDOFF_BATCHES);
        tokio::select! {
            _ = shutdown.cancelled() => Ok(End::Stop),
            end = wake_on(events, &wakes, &tag) => Ok(end),
            r = self.sequencer(&wakes, &handoff, &tag) => r.map(|()| End::Stop),
            r = self.reader(&wakes, &mut handed, cursor) => r.map(|()| End::Stop),
        }
    }

    /// The sequencer's loop: polls every `active_poll_ms` while changes flow (writers do not notify
    /// then), backs off while only a running transaction may still add changes, and after a quiet
    /// spell arms the writers' wake-up and sleeps until a NOTIFY or the `poll_interval_ms` safety net.
    /// Only one node sequences at a time; the others see its work and stay asleep. What it moves goes
    /// to the reader through `handoff` (or, when two batches wait there already, as a wake-up); after
    /// a full batch (a backlog) it asks for no rows, and the reader reads the history while the next
    /// batch is sequenced.
    async fn sequencer(
        &self,
        wakes: &Wakes,
        handoff: &mpsc::Sender<Vec<Row>>,
        tag: &str,
    ) -> Result<()> {
        let active = self.config.active_poll;
        let idle = self.config.poll_interval;
        let mut delay = Duration::ZERO;
        let mut quiet = 0u32;
        // Armed and asleep; `verify`: armed by the last call, one more look is due.
        let mut asleep = false;
        let mut verify = false;
        let mut seen_seq: Option<i64> = None;
        // Consecutive polls that found nothing ready while a transaction was running.
        let mut busy = 0u32;
        // The last call moved a full batch: more are waiting.
        let mut backlog = false;
        loop {
            if !delay.is_zero() {
                tokio::select! {
                    _ = wakes.changes.notified() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            let arm = asleep || quiet >= QUIET_POLLS;
            let b = self.sequence_batch(arm, tag, !backlog).await?;
            let others = seen_seq.is_some_and(|s| b.last_seq - i64::from(b.moved.max(0)) != s);
            seen_seq = Some(b.last_seq);
            if !b.busy || b.moved > 0 {
                busy = 0;
            }
            backlog = u32::try_from(b.moved).unwrap_or(0) >= self.config.batch_size;
            if b.moved > 0 {
                if b.rows.is_empty() || handoff.try_send(b.rows).is_err() {
                    wakes.publications.notify_one();
                }
                (quiet, asleep, verify) = (0, false, false);
                delay = if backlog { Duration::ZERO } else { active };
            } else if b.moved < 0 || others {
                // Another node is sequencing: its NOTIFY wakes this node's reader; this one naps.
                (quiet, asleep, verify) = (0, false, false);
                delay = idle;
            } else if b.busy {
                // Nothing ready, but a transaction of this database may still add changes: poll at
                // the active pace for a while (writers' transactions are short), then back off (a
                // long transaction must not make the sequencer spin).
                (quiet, asleep, verify) = (0, false, false);
                busy += 1;
                delay = if busy <= BUSY_ACTIVE_POLLS {
                    active
                } else {
                    (delay * 2).clamp(active, active * BUSY_BACKOFF)
                };
            } else if asleep || verify {
                // Armed, and nothing arrived since: sleep until a writer notifies (or the timer).
                (asleep, verify) = (true, false);
                delay = idle;
            } else if arm && b.armed {
                // Just armed: look once more, for a writer that read the flag before it was set.
                verify = true;
                delay = Duration::ZERO;
            } else {
                quiet += 1;
                delay = (delay * 2).clamp(active, idle);
            }
        }
    }

    /// The reader's loop: hands on this node's batches that follow its cursor; reads the history
    /// after any other (another node's came in between), every other node's NOTIFY, and every
    /// `poll_interval_ms`.
    async fn reader(
        &self,
        wakes: &Wakes,
        handed: &mut mpsc::Receiver<Vec<Row>>,
        cursor: &mut Option<u64>,
    ) -> Result<()> {
        let idle = self.config.poll_interval;
        loop {
            let batch = tokio::select! {
                b = handed.recv() => b,
                _ = wakes.publications.notified() => None,
                _ = tokio::time::sleep(idle) => None,
            };
            let next = cursor.unwrap_or(0).saturating_add(1);
            match batch {
                Some(rows) if rows.first().is_some_and(|r| r.0 == next as i64) => {
                    self.hand(rows, cursor)?;
                    self.status.handed.inc();
                }
                // Read already (the history read that followed another batch took it too).
                Some(rows) if rows.last().is_some_and(|r| r.0 < next as i64) => {}
                _ => self.read(cursor).await?,
            }
        }
    }

    /// One `relay.sequence_batch_rows()` call; the moved rows come back if `want_rows`.
    async fn sequence_batch(&self, arm: bool, tag: &str, want_rows: bool) -> Result<Batch> {
        let batch = i32::try_from(self.config.batch_size).unwrap_or(i32::MAX);
        let (moved, busy, armed, last_seq, seqs, channels, offsets, epochs, datas, infos, lags): BatchRow =
            sqlx::query_as(
                "SELECT moved, busy, armed, last_seq, seqs, channels, offsets, epochs, datas, infos, lags
                 FROM relay.sequence_batch_rows($1, $2, $3, $4)",
            )
            .bind(batch)
            .bind(arm)
            .bind(tag)
            .bind(want_rows)
            .fetch_one(&self.pool)
            .await?;
        self.status.polls.inc();
        let mut rows: Vec<Row> = seqs
            .unwrap_or_default()
            .into_iter()
            .zip(channels.unwrap_or_default())
            .zip(offsets.unwrap_or_default())
            .zip(epochs.unwrap_or_default())
            .zip(datas.unwrap_or_default())
            .zip(infos.unwrap_or_default())
            .zip(lags.unwrap_or_default())
            .map(|((((((seq, channel), offset), epoch), data), info), lag)| {
                (seq, channel, offset, epoch, data, info, lag)
            })
            .collect();
        if want_rows && rows.len() != usize::try_from(moved).unwrap_or(0) {
            return Err(row(format!(
                "relay.sequence_batch_rows() moved {moved} changes but returned {} rows",
                rows.len()
            )));
        }
        rows.sort_unstable_by_key(|r| r.0);
        Ok(Batch {
            moved,
            busy,
            armed,
            last_seq,
            rows,
        })
    }

    /// Moves every change below the horizon from the changelog into the history, waiting for its turn
    /// if another node is sequencing.
    async fn sequence_all(&self) -> Result<()> {
        let batch = i32::try_from(self.config.batch_size).unwrap_or(i32::MAX);
        loop {
            let moved: i32 = sqlx::query_scalar("SELECT relay.sequence_changes($1)")
                .bind(batch)
                .fetch_one(&self.pool)
                .await?;
            if moved < batch {
                return Ok(());
            }
        }
    }

    /// Hands every publication after the cursor to the hub, in `seq` order.
    async fn read(&self, cursor: &mut Option<u64>) -> Result<()> {
        let batch = i64::from(self.config.batch_size);
        loop {
            let from = cursor.unwrap_or(0);
            let rows: Vec<Row> = sqlx::query_as(
                r#"SELECT seq, channel, "offset", epoch, data::text, info::text,
                          extract(epoch FROM clock_timestamp() - written_at)::float8
                   FROM relay.publications WHERE seq > $1 ORDER BY seq LIMIT $2"#,
            )
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(batch)
            .fetch_all(&self.pool)
            .await?;
            let n = rows.len();
            self.hand(rows, cursor)?;
            if (n as i64) < batch {
                return Ok(());
            }
        }
    }

    /// Hands `rows` (in `seq` order, the first one right after the cursor) to the hub and moves the
    /// cursor past them.
    fn hand(&self, rows: Vec<Row>, cursor: &mut Option<u64>) -> Result<()> {
        for (seq, channel, offset, epoch, data, info, lag) in rows {
            self.status.lag.observe(lag.max(0.0));
            if self.hub.has_subscribers(&channel) {
                let data = RawValue::from_string(data).map_err(row)?;
                let info = info.map(RawValue::from_string).transpose().map_err(row)?;
                self.hub.publish(
                    &channel,
                    u64::try_from(offset).map_err(row)?,
                    &epoch,
                    &data,
                    info.as_deref(),
                );
            }
            let seq = u64::try_from(seq).map_err(row)?;
            *cursor = Some(seq);
            self.status
                .cursor
                .set(i64::try_from(seq).unwrap_or(i64::MAX));
        }
        Ok(())
    }
}

/// Turns the listener's notifications into wake-ups until the connection drops or comes back. A
/// `relay_publications` notification carrying `tag` is this node's own batch, handed over already.
async fn wake_on(
    events: &mut mpsc::UnboundedReceiver<ListenEvent>,
    wakes: &Wakes,
    tag: &str,
) -> End {
    loop {
        match events.recv().await {
            None => return End::Stop,
            Some(ListenEvent::Connected) => return End::Gap,
            Some(ListenEvent::Lost) => return End::Lost,
            Some(ListenEvent::Notification { channel, payload }) => {
                if channel == CHANGES {
                    wakes.changes.notify_one();
                } else if payload != tag {
                    wakes.publications.notify_one();
                }
            }
        }
    }
}
