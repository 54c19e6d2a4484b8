//! Reads of a channel's stream (position, history, recovery) and client publications.
//!
//! A channel's position and its publications are read in one statement, so they come from one
//! snapshot: a recovery never pairs a top offset with a history that does not reach it.

use serde_json::value::RawValue;
use sqlx::PgPool;

use crate::error::Result;

/// One publication read from history.
#[derive(Debug)]
pub struct StoredPublication {
    /// Offset in the channel.
    pub offset: u64,
    /// Payload (raw JSON, on one line).
    pub data: Box<RawValue>,
    /// Publisher info, for client publications.
    pub info: Option<Box<RawValue>>,
}

/// A channel's position and a slice of its history.
#[derive(Debug, Default)]
pub struct StreamSlice {
    /// The epoch ("" when the channel never had a publication).
    pub epoch: String,
    /// The offset of the newest publication (0 when none).
    pub top: u64,
    /// The publications asked for, in the order asked for.
    pub publications: Vec<StoredPublication>,
}

const FORWARD: &str = r#"
SELECT c.epoch, c.top_offset, p."offset", p.data::text, p.info::text
FROM (SELECT 1) AS one
LEFT JOIN relay.channels c ON c.name = $1
LEFT JOIN LATERAL (
    SELECT "offset", data, info FROM relay.publications
    WHERE channel = $1 AND "offset" > $2
    ORDER BY "offset" LIMIT $3
) p ON true
ORDER BY p."offset""#;

const BACKWARD: &str = r#"
SELECT c.epoch, c.top_offset, p."offset", p.data::text, p.info::text
FROM (SELECT 1) AS one
LEFT JOIN relay.channels c ON c.name = $1
LEFT JOIN LATERAL (
    SELECT "offset", data, info FROM relay.publications
    WHERE channel = $1 AND "offset" < $2
    ORDER BY "offset" DESC LIMIT $3
) p ON true
ORDER BY p."offset" DESC"#;

type Row = (
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// Reads the position of `channel` and up to `limit` publications after offset `after` (exclusive),
/// oldest first; with `reverse`, before offset `before` (exclusive), newest first.
pub async fn read(pool: &PgPool, channel: &str, bound: Bound, limit: u32) -> Result<StreamSlice> {
    let (sql, offset) = match bound {
        Bound::After(o) => (FORWARD, o),
        Bound::Before(o) => (BACKWARD, o),
    };
    let rows: Vec<Row> = sqlx::query_as(sql)
        .bind(channel)
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    let mut slice = StreamSlice::default();
    for (epoch, top, offset, data, info) in rows {
        slice.epoch = epoch.unwrap_or_default();
        slice.top = top.map_or(0, |t| u64::try_from(t).unwrap_or(0));
        if let (Some(offset), Some(data)) = (offset, data) {
            slice.publications.push(StoredPublication {
                offset: u64::try_from(offset).unwrap_or(0),
                data: raw(data),
                info: info.map(raw),
            });
        }
    }
    Ok(slice)
}

/// Where a history read starts.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    /// Publications with offsets greater than this, oldest first.
    After(u64),
    /// Publications with offsets less than this, newest first.
    Before(u64),
}

/// Gives `channel` its stream row (and so its epoch) if it has none yet, so that a subscriber gets
/// the epoch its first publication will carry. Returns the channel's epoch.
pub async fn ensure_channel(pool: &PgPool, channel: &str) -> Result<String> {
    let inserted: Option<String> = sqlx::query_scalar(
        "INSERT INTO relay.channels (name, epoch) VALUES ($1, relay.new_epoch())
         ON CONFLICT (name) DO NOTHING RETURNING epoch",
    )
    .bind(channel)
    .fetch_optional(pool)
    .await?;
    if let Some(epoch) = inserted {
        return Ok(epoch);
    }
    // Someone else (the sequencer, another subscriber) created it: read it with a fresh snapshot.
    let epoch: String = sqlx::query_scalar("SELECT epoch FROM relay.channels WHERE name = $1")
        .bind(channel)
        .fetch_one(pool)
        .await?;
    Ok(epoch)
}

/// PostgreSQL's jsonb text is valid JSON on one line; a value that somehow is not becomes `null`.
fn raw(text: String) -> Box<RawValue> {
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Records a client publication in the changelog and wakes the connectors; it is delivered once the
/// statement commits, through the same sequencer as table changes.
pub async fn publish(pool: &PgPool, channel: &str, data: &RawValue, info: &RawValue) -> Result<()> {
    sqlx::query("SELECT relay.publish($1, $2::text::jsonb, $3::text::jsonb)")
        .bind(channel)
        .bind(data.get())
        .bind(info.get())
        .execute(pool)
        .await?;
    Ok(())
}
