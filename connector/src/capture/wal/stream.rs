//! The leader's loop ([`Leader::stream`]): receives from the slot, writes batches with one batch
//! statement in flight at a time, confirms the slot once a batch's commit is flushed, checks the
//! lock connection and sends heartbeats.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::FutureExt as _;
use pgwire_replication::{Lsn, ReplicationClient};
use sqlx::PgConnection;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::apply::{Applied, HistoryConn, apply_batch, wal_positions};
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

/// How often an idle leader asks whether the WAL of its last written batches is flushed yet.
/// PostgreSQL's WAL writer flushes asynchronous commits within `wal_writer_delay` (200 ms by
/// default), so a written batch is confirmed to the slot within a few hundred milliseconds.
const FLUSH_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Written batches whose commit may not be on disk yet: the slot is confirmed up to a batch only
/// once its commit is durable, so a crash that loses a history commit (they do not wait for the
/// flush) finds the batch still in the slot and replays it.
#[derive(Default)]
struct Unconfirmed {
    /// In commit order: the batch's position, and a WAL position at or after its commit record
    /// once known (from the next statement on the history connection).
    batches: std::collections::VecDeque<(Lsn, Option<Lsn>)>,
}

impl Unconfirmed {
    /// Records a batch just written, with the positions its statement read: `insert` is at or after
    /// the previous batch's commit, `flush` what was durable. Returns the position the slot may be
    /// confirmed up to, if it moved.
    fn written(&mut self, upto: Lsn, insert: Lsn, flush: Lsn) -> Option<Lsn> {
        let confirm = self.positions(insert, flush);
        self.batches.push_back((upto, None));
        confirm
    }

    /// Positions read after the newest written batch committed (`insert` is at or after its commit
    /// record): that batch gets `insert` as its bound, and the batches durable at `flush` are
    /// dropped; the newest of them is what the slot may confirm.
    fn positions(&mut self, insert: Lsn, flush: Lsn) -> Option<Lsn> {
        if let Some(last) = self.batches.back_mut()
            && last.1.is_none()
        {
            last.1 = Some(insert);
        }
        let mut upto = None;
        while let Some(&(lsn, Some(bound))) = self.batches.front() {
            if bound > flush {
                break;
            }
            upto = Some(lsn);
            self.batches.pop_front();
        }
        upto
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
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
    /// soon as the previous one has committed, with everything received meanwhile (up to
    /// `capture.batch_max_publications` changes). So batches grow with the load and at most one
    /// history transaction is open at a time, in commit order. History commits do not wait for
    /// their WAL flush; the slot is confirmed up to a batch once its commit is on disk
    /// ([`Unconfirmed`]).
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
        let mut unconfirmed = Unconfirmed::default();
        let mut flush_check = interval(FLUSH_CHECK_INTERVAL);
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
                    // Only what is durable: the slot may release what those batches held.
                    let a = &applied;
                    if let Some(upto) = unconfirmed.written(a.upto, a.wal_insert, a.wal_flush) {
                        client.update_applied_lsn(upto);
                    }
                    self.count(&applied);
                }
                _ = flush_check.tick(), if !writer.busy() && !unconfirmed.is_empty() => {
                    let conn = writer.conn.as_mut().context("history connection in use")?;
                    let (insert, flush) = wal_positions(conn).await?;
                    if let Some(upto) = unconfirmed.positions(insert, flush) {
                        client.update_applied_lsn(upto);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Lsn {
        Lsn::from_u64(n)
    }

    #[test]
    fn a_batch_is_confirmed_only_once_its_commit_is_flushed() {
        let mut u = Unconfirmed::default();
        // Batch 1 written; its commit's end is not known yet: nothing to confirm, whatever the flush.
        assert_eq!(u.written(at(100), at(50), at(50)), None);
        // Batch 2's statement saw the WAL inserted up to 120 (past batch 1's commit), flushed to 110.
        assert_eq!(u.written(at(200), at(120), at(110)), None);
        // Idle: inserted up to 220 (past batch 2's commit), flushed to 130: batch 1 only.
        assert_eq!(u.positions(at(220), at(130)), Some(at(100)));
        assert_eq!(u.positions(at(220), at(219)), None);
        assert!(!u.is_empty());
        assert_eq!(u.positions(at(220), at(220)), Some(at(200)));
        assert!(u.is_empty());
    }

    #[test]
    fn several_durable_batches_confirm_the_newest() {
        let mut u = Unconfirmed::default();
        assert_eq!(u.written(at(10), at(5), at(5)), None);
        assert_eq!(u.written(at(20), at(15), at(5)), None);
        assert_eq!(u.written(at(30), at(25), at(5)), None);
        // Flushed past batch 2's commit bound (25) but batch 3's bound is unknown yet.
        assert_eq!(u.written(at(40), at(35), at(30)), Some(at(20)));
        assert_eq!(u.positions(at(50), at(50)), Some(at(40)));
        assert!(u.is_empty());
    }
}
