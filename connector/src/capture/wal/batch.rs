//! Committed transactions into the batch statement's parameters ([`Leader::prepare`]): every row as
//! record literals of its table's current row type, for each mapping that captures it, and the
//! `relay.publish()` messages, each with its order key.

use anyhow::Context as _;
use pgwire_replication::Lsn;

use super::events::{Change, RowChange, Txn};
use super::{Leader, status_add_seconds};
use crate::capture::pgoutput::{OldKind, Tuple, Value};

/// A mapping's rows of one batch: the parameters of its part of the batch statement.
#[derive(Default)]
pub(super) struct RowsInput {
    pub(super) k: Vec<i64>,
    pub(super) lsn: Vec<String>,
    pub(super) micros: Vec<i64>,
    pub(super) op: Vec<&'static str>,
    pub(super) new: Vec<Option<String>>,
    pub(super) old: Vec<Option<String>>,
}

/// The `relay.publish()` messages of one batch.
#[derive(Default)]
pub(super) struct PublishInput {
    pub(super) k: Vec<i64>,
    pub(super) lsn: Vec<String>,
    pub(super) micros: Vec<i64>,
    pub(super) channel: Vec<String>,
    pub(super) data: Vec<String>,
    pub(super) info: Vec<Option<String>>,
}

/// A batch of committed transactions, ready for the batch statement.
pub(super) struct Batch {
    /// End LSN of the last transaction: the position stored with it, and confirmed after it.
    pub(super) upto: Lsn,
    /// Changes in it.
    pub(super) changes: usize,
    /// Transactions in it.
    pub(super) txns: usize,
    pub(super) publish: PublishInput,
    /// Per mapping, in mapping order.
    pub(super) rows: Vec<RowsInput>,
}

/// Where a change sits: its index in the batch (its publications' order key, with the mapping's
/// rank), and its transaction's end LSN and commit time.
#[derive(Clone, Copy)]
struct At<'a> {
    k: i64,
    lsn: &'a str,
    micros: i64,
}

impl Leader<'_> {
    /// Turns `txns` into the batch statement's parameters (record literals of every row, per
    /// mapping that captures it).
    pub(super) async fn prepare(&mut self, txns: Vec<Txn>) -> anyhow::Result<Batch> {
        let started = std::time::Instant::now();
        self.load_table_columns(&txns).await?;
        let batch = self.parameters(txns)?;
        status_add_seconds(&self.cap.status.prepare_seconds, started.elapsed());
        Ok(batch)
    }

    /// Reads the current columns of every table in `txns` whose columns are not known yet (once
    /// per table and stream, and again after the stream describes the table anew).
    async fn load_table_columns(&mut self, txns: &[Txn]) -> anyhow::Result<()> {
        let pool = &self.cap.pool;
        for txn in txns {
            for c in &txn.changes {
                if let Change::Row(RowChange { relation, .. }) = c
                    && !self.table_columns.contains_key(relation)
                {
                    let cols: Vec<String> = sqlx::query_scalar(
                        "SELECT attname::text FROM pg_attribute
                         WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped
                         ORDER BY attnum",
                    )
                    .bind(i64::from(*relation))
                    .fetch_all(pool)
                    .await?;
                    self.table_columns.insert(*relation, cols);
                }
            }
        }
        Ok(())
    }

    /// The batch of `txns`, whose tables' columns are loaded.
    fn parameters(&self, txns: Vec<Txn>) -> anyhow::Result<Batch> {
        let upto = txns.last().map_or(Lsn::ZERO, |t| t.end_lsn);
        let count = txns.len();
        let mut rows: Vec<RowsInput> = (0..self.sqls.len()).map(|_| RowsInput::default()).collect();
        let mut publish = PublishInput::default();
        let mut toast_unavailable = 0u64;
        let mut k = 0i64;
        for txn in txns {
            let lsn = txn.end_lsn.to_string();
            for c in txn.changes {
                let at = At {
                    k,
                    lsn: &lsn,
                    micros: txn.commit_micros,
                };
                match c {
                    Change::Publish {
                        channel,
                        data,
                        info,
                    } => {
                        publish.k.push(at.k);
                        publish.lsn.push(at.lsn.to_owned());
                        publish.micros.push(at.micros);
                        publish.channel.push(channel);
                        publish.data.push(data.get().to_owned());
                        publish.info.push(info.map(|i| i.get().to_owned()));
                    }
                    Change::Row(row) => {
                        self.push_row(&mut rows, &mut toast_unavailable, at, row)?;
                    }
                }
                k += 1;
            }
        }
        if toast_unavailable > 0 {
            self.cap.status.toast_unavailable.inc_by(toast_unavailable);
            tracing::warn!(
                values = toast_unavailable,
                "unchanged TOASTed values without an old row (table not REPLICA IDENTITY FULL) \
                 published as null"
            );
        }
        Ok(Batch {
            upto,
            changes: usize::try_from(k).unwrap_or(usize::MAX),
            txns: count,
            publish,
            rows,
        })
    }

    /// Adds `row` to the parameters of every mapping that captures its operation: its new and old
    /// record literals, built once for all of them.
    fn push_row(
        &self,
        rows: &mut [RowsInput],
        toast_unavailable: &mut u64,
        at: At<'_>,
        row: RowChange,
    ) -> anyhow::Result<()> {
        let RowChange {
            relation,
            op,
            new,
            old,
        } = row;
        // pgoutput describes every table before its first change in a stream.
        let info = self
            .relations
            .get(&relation)
            .with_context(|| format!("row of relation {relation} before its description"))?;
        let cols = &self.table_columns[&relation];
        let old_tuple = old.as_ref().map(|(_, t)| t);
        let old_full = old
            .as_ref()
            .filter(|(kind, _)| *kind == OldKind::Full)
            .map(|(_, t)| t);
        let new_lit = new
            .as_ref()
            .map(|t| record_literal(cols, &info.columns, t, old_full, toast_unavailable));
        let old_lit =
            old_tuple.map(|t| record_literal(cols, &info.columns, t, None, toast_unavailable));
        for &m in &info.mappings {
            if !self.sqls[m].operations.contains(&op) {
                continue;
            }
            let input = &mut rows[m];
            input.k.push(at.k);
            input.lsn.push(at.lsn.to_owned());
            input.micros.push(at.micros);
            input.op.push(op.sql());
            input.new.push(new_lit.clone());
            input.old.push(old_lit.clone());
        }
        Ok(())
    }
}

/// A record literal (`record_in` syntax) of `columns`, taking each value by name from the stream's
/// tuple: every value double-quoted with `"` and `\` escaped; NULL is an empty field.
fn record_literal(
    columns: &[String],
    wal_columns: &[String],
    tuple: &Tuple,
    old: Option<&Tuple>,
    toast_unavailable: &mut u64,
) -> String {
    let mut out = String::from("(");
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let Some(pos) = wal_columns.iter().position(|w| w == c) else {
            continue;
        };
        let mut value = tuple.get(pos);
        if value == Some(&Value::UnchangedToast) {
            value = old.and_then(|o| o.get(pos));
            if !matches!(value, Some(Value::Text(_))) {
                *toast_unavailable += 1;
                continue;
            }
        }
        if let Some(Value::Text(s)) = value {
            out.push('"');
            for ch in s.chars() {
                if ch == '"' || ch == '\\' {
                    out.push('\\');
                }
                out.push(ch);
            }
            out.push('"');
        }
    }
    out.push(')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_literals_quote_every_value() {
        let cols = vec![
            "a".to_owned(),
            "b".to_owned(),
            "c".to_owned(),
            "d".to_owned(),
        ];
        let wal = vec!["b".to_owned(), "a".to_owned(), "d".to_owned()];
        let t = vec![
            Value::Text(r#"x"y\z,(1)"#.into()),
            Value::Null,
            Value::Text(String::new()),
        ];
        let mut toast = 0;
        assert_eq!(
            record_literal(&cols, &wal, &t, None, &mut toast),
            r#"(,"x\"y\\z,(1)",,"")"#
        );
        let new = vec![Value::UnchangedToast, Value::Null, Value::Null];
        let old = vec![Value::Text("big".into()), Value::Null, Value::Null];
        assert_eq!(
            record_literal(&cols, &wal, &new, Some(&old), &mut toast),
            r#"(,"big",,)"#
        );
        assert_eq!(toast, 0);
        record_literal(&cols, &wal, &new, None, &mut toast);
        assert_eq!(toast, 1);
    }
}
