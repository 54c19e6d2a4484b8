//! Replication events into committed transactions: pgoutput messages decoded into row changes, the
//! `relay.publish()` logical messages into publications, the tables' descriptions kept for the
//! batch ([`Leader::handle`]).

use anyhow::{Context as _, bail};
use pgwire_replication::{Lsn, ReplicationEvent};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Leader;
use crate::capture::pgoutput::{self, Message, OldKind, Relation, Tuple};
use crate::config::Operation;

/// Prefix of the logical messages `relay.publish()` emits in `wal` mode.
const PUBLISH_PREFIX: &str = "relay";

/// A row change of a published table.
pub(super) struct RowChange {
    pub(super) relation: u32,
    pub(super) op: Operation,
    pub(super) new: Option<Tuple>,
    pub(super) old: Option<(OldKind, Tuple)>,
}

/// One change of a committed transaction.
pub(super) enum Change {
    /// A row of a published table.
    Row(RowChange),
    /// A `relay.publish()` call.
    Publish {
        channel: String,
        data: Box<RawValue>,
        info: Option<Box<RawValue>>,
    },
}

/// A committed transaction.
pub(super) struct Txn {
    pub(super) end_lsn: Lsn,
    pub(super) commit_micros: i64,
    pub(super) changes: Vec<Change>,
}

/// A table as the stream described it, and the mappings that capture it.
pub(super) struct RelationInfo {
    pub(super) columns: Vec<String>,
    /// Mapping indices, in the order their triggers would fire (by trigger name).
    pub(super) mappings: Vec<usize>,
}

#[derive(Deserialize)]
struct PublishMessage {
    channel: String,
    data: Box<RawValue>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

/// What the stream received and no batch has taken yet.
#[derive(Default)]
pub(super) struct Received {
    /// The transaction being received (after its Begin).
    current: Option<Txn>,
    /// Committed transactions, in commit order.
    pub(super) pending: Vec<Txn>,
    /// Their changes (a transaction without any counts as one).
    pub(super) changes: usize,
}

impl Leader<'_> {
    /// Takes one replication event into `received`.
    pub(super) fn handle(
        &mut self,
        ev: ReplicationEvent,
        received: &mut Received,
    ) -> anyhow::Result<()> {
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                received.current = Some(Txn {
                    end_lsn: Lsn::ZERO,
                    commit_micros: commit_time_micros,
                    changes: Vec::new(),
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let mut txn = received
                    .current
                    .take()
                    .context("commit without a transaction")?;
                txn.end_lsn = end_lsn;
                received.changes += txn.changes.len().max(1);
                received.pending.push(txn);
            }
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                ..
            } => {
                if !transactional || prefix != PUBLISH_PREFIX {
                    return Ok(());
                }
                let Some(txn) = received.current.as_mut() else {
                    bail!("transactional message outside a transaction");
                };
                if let Some(change) = publish_change(&content) {
                    txn.changes.push(change);
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                if let Some(change) = self.row_change(pgoutput::decode(&data)?) {
                    received
                        .current
                        .as_mut()
                        .context("row change outside a transaction")?
                        .changes
                        .push(change);
                }
            }
            ReplicationEvent::KeepAlive { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// The change a pgoutput message carries, if any; a table description is kept instead.
    fn row_change(&mut self, msg: Message) -> Option<Change> {
        let row = match msg {
            Message::Relation(r) => {
                self.describe(r);
                return None;
            }
            Message::Insert { relation, new } => RowChange {
                relation,
                op: Operation::Insert,
                new: Some(new),
                old: None,
            },
            Message::Update { relation, old, new } => RowChange {
                relation,
                op: Operation::Update,
                new: Some(new),
                old,
            },
            Message::Delete { relation, old } => RowChange {
                relation,
                op: Operation::Delete,
                new: None,
                old: Some(old),
            },
            Message::Truncate | Message::Other => return None,
        };
        Some(Change::Row(row))
    }

    /// Keeps a table's description: its columns, and the mappings that capture it in the order
    /// their triggers would fire. Its current columns are read again for the next batch.
    fn describe(&mut self, r: Relation) {
        let mut mappings: Vec<usize> = self
            .sqls
            .iter()
            .enumerate()
            .filter(|(_, m)| m.schema == r.schema && m.table == r.name)
            .map(|(i, _)| i)
            .collect();
        mappings.sort_by(|a, b| self.sqls[*a].trigger_name.cmp(&self.sqls[*b].trigger_name));
        self.table_columns.remove(&r.id);
        self.relations.insert(
            r.id,
            RelationInfo {
                columns: r.columns,
                mappings,
            },
        );
    }
}

/// The publication a `relay.publish()` message carries; a malformed one, or one without a channel,
/// is logged and skipped.
fn publish_change(content: &[u8]) -> Option<Change> {
    match serde_json::from_slice::<PublishMessage>(content) {
        Ok(m) if !m.channel.is_empty() => Some(Change::Publish {
            channel: m.channel,
            data: m.data,
            info: m.info.filter(|i| i.get() != "null"),
        }),
        Ok(_) => {
            tracing::warn!("relay message with an empty channel skipped");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "malformed relay message skipped");
            None
        }
    }
}
