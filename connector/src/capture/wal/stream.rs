//! The leader's loop ([`Leader::stream`]): receives from the slot, writes batches with one batch
//! statement in flight at a time, confirms the slot after each commit, checks the lock connection
//! and sends heartbeats.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::FutureExt as _;
use pgwire_replication::ReplicationClient;
use sqlx::PgConnection;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::apply::{Applied, HistoryConn, apply_batch};
use super::batch::Batch;
use super::events::Received;
use super::leader::check_lock;
use super::{ELECTION_INTERVAL, Leader, status_add_seconds};

/// Prefix of the leader's heartbeat messages.
const HEARTBEAT_PREFIX: &str = "relay-heartbeat";
/// Batches of at most this many changes run the batch statement with a generic plan: planning it
/// (and the history write inside `relay.wal_apply_batch()`) for each small batch costs about as much
/// as executing it, and at a few rows a generic plan is as good. Larger batches get custom plans,
/// which see the arrays' lengths (hash joins instead of nested loops over thousands of rows).
const GENERIC_PLAN_MAX_CHANGES: usize = 64;

/// A batch write in flight: gives the connection back with the outcome.
type InFlight = std::pin::Pin<
    Box<dyn std::future::Future<Output = (HistoryConn, anyhow::Result<Applied>)> + Send>,
>;

/// The history writes while leading: one connection, so its prepared batch statement is reused
/// and no batch waits for the pool, and at most one batch write on it.
struct Writer {
    /// The connection, while no write has it.
    conn: Option<HistoryConn>,
    inflight: Option<InFlight>,
    /// The connection's plan_cache_mode: generic (true) or auto; unknown at first.
    generic: Option<bool>,
    sql: Arc<str>,
    slot: Arc<str>,
}

impl Writer {
    fn busy(&self) -> bool {
        self.inflight.is_some()
    }

    /// Starts writing `batch` (the connection must be free).
    fn start(&mut self, batch: Batch) -> anyhow::Result<()> {
        let want = batch.changes <= GENERIC_PLAN_MAX_CHANGES;
        let set_plan_mode = (self.generic != Some(want)).then_some(want);
        self.generic = Some(want);
        let conn = self.conn.take().context("history connection in use")?;
        self.inflight = Some(Box::pin(apply_batch(
            conn,
            self.sql.clone(),
            self.slot.clone(),
            batch,
            set_plan_mode,
        )));
        Ok(())
    }

    /// The outcome of the write in flight, the connection taken back (never ready without one).
    /// Cancel-safe: until it is ready, the write stays in flight.
    async fn finished(&mut self) -> anyhow::Result<Applied> {
        let Some(write) = self.inflight.as_mut() else {
            return std::future::pending().await;
        };
        let (conn, result) = write.await;
        self.inflight = None;
        self.conn = Some(conn);
        result
    }
}

fn interval(period: Duration) -> Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

impl Leader<'_> {
    /// Streams from the slot and writes the history, pipelined: while one batch's statement runs
    /// (conversion, history write, commit), the next batch is received and decoded; it is written as
    /// soon as the previous one has committed and the slot has been confirmed up to it, with
    /// everything received meanwhile (up to `capture.batch_max_publications` changes). So batches
    /// grow with the load and at most one history transaction is open at a time, in commit order.
    pub(super) async fn stream(
        &mut self,
        client: &mut ReplicationClient,
        lock: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut election = interval(ELECTION_INTERVAL);
        let mut heartbeat = interval(self.cap.config.heartbeat);
        let max = self.cap.config.batch_max_publications as usize;
        let conn = self
            .cap
            .pool
            .acquire()
            .await
            .context("history connection")?;
        let mut writer = Writer {
            conn: Some(conn),
            inflight: None,
            generic: None,
            sql: self.batch_sql.clone(),
            slot: self.slot.as_str().into(),
        };
        let mut received = Received::default();
        loop {
            if !writer.busy() && !received.pending.is_empty() {
                self.receive_ready(client, &mut received, max)?;
                let batch = self.prepare(std::mem::take(&mut received.pending)).await?;
                received.changes = 0;
                writer.start(batch)?;
            }
            // A full next batch waits for the write in flight (the stream backs up meanwhile).
            let receive = received.changes < max || !writer.busy();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                result = writer.finished(), if writer.busy() => {
                    let applied = result?;
                    // Only now, after the commit: the slot may release what this batch held.
                    client.update_applied_lsn(applied.upto);
                    self.count(&applied);
                }
                _ = election.tick() => check_lock(lock).await?,
                _ = heartbeat.tick() => self.heartbeat().await?,
                ev = client.recv(), if receive => {
                    let ev = ev?.context("replication stream ended")?;
                    self.handle(ev, &mut received)?;
                }
            }
        }
    }

    /// Takes what is already received (without waiting) into the batch about to be written, up to
    /// `max` changes.
    fn receive_ready(
        &mut self,
        client: &mut ReplicationClient,
        received: &mut Received,
        max: usize,
    ) -> anyhow::Result<()> {
        while received.changes < max {
            let Some(ev) = client.recv().now_or_never() else {
                break;
            };
            let ev = ev?.context("replication stream ended")?;
            self.handle(ev, received)?;
        }
        Ok(())
    }

    /// Counts a written batch in the status.
    fn count(&self, applied: &Applied) {
        let status = &self.cap.status;
        status.transactions.inc_by(applied.txns as u64);
        status
            .publications
            .inc_by(u64::try_from(applied.written).unwrap_or(0));
        status.batches.inc();
        status_add_seconds(&status.apply_seconds, applied.took);
    }

    /// A logical message that moves the slot forward on an idle database.
    async fn heartbeat(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT pg_logical_emit_message(true, $1, '')")
            .bind(HEARTBEAT_PREFIX)
            .execute(&self.cap.pool)
            .await
            .context("heartbeat")?;
        Ok(())
    }
}
