//! The `wal` capture leader: reads the pgoutput slot and writes committed transactions into the
//! history.
//!
//! Every node runs this task; one at a time leads. **Election**: a session-level advisory lock held
//! on a dedicated connection; the others retry every second, so a dead leader (its connections
//! closed) is replaced within about a second, and a leader that loses its lock connection stops.
//!
//! **Position and replay.** `relay.wal_state.lsn` is the end LSN of the last transaction whose
//! publications are in the history. The leader streams from it, and writes each batch of
//! transactions with one statement (`relay.wal_apply_batch()`, migration 0014), which drops the
//! publications of any transaction at or below the stored position and moves the position, in the
//! same transaction as the publications. That commit does not wait for its WAL flush (readers see
//! the batch at once); the slot is confirmed up to the batch only once the WAL holding the commit
//! is on disk. So a crash anywhere (PostgreSQL's included, which may lose the newest history
//! commits) replays from the slot what the history lacks, the replay writes nothing twice, and two
//! leaders that briefly overlap cannot both write a transaction. Offsets and `seq` come from the same `relay.channels` /
//! `relay.sequencer` as trigger mode, in commit order (the order pgoutput sends transactions), so
//! every node reads identical offsets.
//!
//! **Pipeline.** One batch statement is in flight at a time, on a connection the leader holds; while
//! it runs (conversion, history write, commit), the next batch is received and decoded, and it is
//! written with everything that arrived meanwhile. So batches grow with the load (up to
//! `capture.batch_max_publications` changes), and there are as many history transactions (and WAL
//! flushes) per second as the database can commit, not one per source transaction.
//!
//! **Rows.** Column values arrive in PostgreSQL's text format. The leader hands them back to
//! PostgreSQL as a record literal of the table's row type (`$n::text::"schema"."table"`) and builds
//! the channel and the JSON with the very expressions the capture trigger uses
//! ([`crate::db::triggers`]), so numbers, booleans, timestamps, JSON columns, channel templates and
//! `columns` projections come out byte-identical to trigger mode.
//!
//! **Hand-over.** The first node to start in `wal` mode creates the slot during start-up
//! ([`ensure_started`], under the leader lock), then, in one transaction, drops the capture
//! triggers, switches `relay.publish()` to logical messages and stores the position: with triggers,
//! the current WAL insert position (transactions at or below it went through the triggers, whose drop
//! waited for them; later ones have no trigger and come from the slot); without, the slot's
//! consistent point.
//!
//! **Slot safety.** A heartbeat message every `capture.heartbeat_secs` moves the slot forward on an
//! idle database. A slot that is gone while a position is stored, invalidated (`wal_status = 'lost'`)
//! or confirmed beyond the stored position is a gap the slot cannot replay: every channel gets a new
//! epoch (`relay.wal_slot_lost()`), so clients get `recovered: false`, and the slot is recreated.
//!
//! **Files**, in the order a change passes through them: this one (the task: election retries, the
//! per-mapping facts the leader keeps); `leader.rs` (taking the lock, the replication connection,
//! [`ensure_started`]); `slot.rs` (the slot's checks, creation, loss and the hand-over); `stream.rs`
//! (the pipelined loop: receive, lock checks, heartbeats, one batch write in flight); `events.rs`
//! (replication events into committed transactions); `batch.rs` (transactions into the batch
//! statement's parameters: record literals); `apply.rs` (the batch statement's text and its run).

mod apply;
mod batch;
mod events;
mod leader;
mod slot;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use self::events::RelationInfo;
use super::{CaptureConfig, CaptureStatus};
use crate::config::{Mapping, Operation};

pub use self::leader::ensure_started;

/// `application_name` of the leader's lock and replication connections.
pub const APPLICATION_NAME: &str = "relay-wal-leader";
/// How often a follower tries to become the leader, and the leader checks its lock connection.
const ELECTION_INTERVAL: Duration = Duration::from_secs(1);

/// What the leader task needs.
pub struct WalCapture {
    /// Pool for the history writes and heartbeats.
    pub pool: PgPool,
    /// Direct URL for the leader lock connection.
    pub lock_url: String,
    /// Direct URL for the replication connection.
    pub replication_url: String,
    /// The `capture` section.
    pub config: CaptureConfig,
    /// The table mappings.
    pub mappings: Arc<Vec<Mapping>>,
    /// Shared status (metrics).
    pub status: Arc<CaptureStatus>,
}

/// Precomputed per mapping.
struct MappingSql {
    operations: Vec<Operation>,
    schema: String,
    table: String,
    trigger_name: String,
}

impl WalCapture {
    /// Runs until `shutdown` is cancelled: tries to lead every second, leads while it can.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut leader = Leader::new(&self);
        while !shutdown.is_cancelled() {
            match leader.lead(&shutdown).await {
                Ok(true) => {}
                Ok(false) => {}
                Err(e) => {
                    self.status.stream_errors.inc();
                    tracing::warn!(error = %format!("{e:#}"), "wal capture interrupted");
                }
            }
            if self.status.leader.swap(false, Ordering::Relaxed) {
                tracing::info!("no longer the wal capture leader");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(ELECTION_INTERVAL) => {}
            }
        }
        self.status.leader.store(false, Ordering::Relaxed);
    }
}

/// The leader task's state across leaderships.
struct Leader<'a> {
    cap: &'a WalCapture,
    /// The batch statement ([`apply::batch_sql`]).
    batch_sql: Arc<str>,
    slot: String,
    sqls: Vec<MappingSql>,
    relations: HashMap<u32, RelationInfo>,
    /// The current columns of each table (the record type the literals are cast to).
    table_columns: HashMap<u32, Vec<String>>,
}

impl<'a> Leader<'a> {
    /// The leader of `cap`'s slot, with its mappings' trigger names and the batch statement.
    fn new(cap: &'a WalCapture) -> Self {
        let slot = cap.status.slot.get().cloned().unwrap_or_default();
        let sqls = cap
            .mappings
            .iter()
            .map(|m| MappingSql {
                operations: m.operations.clone(),
                schema: m.schema.clone(),
                table: m.table.clone(),
                trigger_name: crate::db::triggers::name_stem(m),
            })
            .collect::<Vec<_>>();
        let ranks = ranks(&sqls);
        Leader {
            cap,
            batch_sql: apply::batch_sql(&cap.mappings, &ranks).into(),
            slot,
            sqls,
            relations: HashMap::new(),
            table_columns: HashMap::new(),
        }
    }
}

/// Each mapping's rank: its place in the order its trigger would fire among all (by name).
fn ranks(sqls: &[MappingSql]) -> Vec<usize> {
    let mut by_name: Vec<usize> = (0..sqls.len()).collect();
    by_name.sort_by(|a, b| sqls[*a].trigger_name.cmp(&sqls[*b].trigger_name));
    let mut ranks = vec![0; sqls.len()];
    for (rank, i) in by_name.into_iter().enumerate() {
        ranks[i] = rank;
    }
    ranks
}

fn status_add_seconds(counter: &Counter<f64, AtomicU64>, d: Duration) {
    counter.inc_by(d.as_secs_f64());
}
