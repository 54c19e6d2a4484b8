//! Reads of a channel's stream (position, history, recovery) and client publications.
//!
//! A channel's position and its publications are read in one statement, so they come from one
//! snapshot: a recovery never pairs a top offset with a history that does not reach it.
//!
//! Reads are streamed with a byte cap: rows are taken one at a time and the read stops as soon as
//! what it holds passes the cap ([`StreamSlice::overflow`]), so a history of large rows never becomes
//! one large allocation, whatever the count asked for.
//!
//! Reads are bounded by the channel's retention ([`Keep`]): a publication beyond the count or the age
//! the channel keeps is never returned, even before the pruning task has deleted it, so recovery and
//! `since` answer as if the history had been trimmed at publish time (as Centrifugo's engines do).
//!
//! A channel that never had a publication has no row (subscribing writes nothing); its position is
//! offset 0 in the epoch its first publication will get, `relay.first_epoch(name)`.

use futures_util::TryStreamExt;
use serde_json::value::RawValue;
use sqlx::PgPool;

use super::fence;
use crate::config::RetentionRule;
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
    /// The publications asked for, in the order asked for (cut short when `overflow`).
    pub publications: Vec<StoredPublication>,
    /// The read stopped at the byte cap: more publications were asked for than it allows.
    pub overflow: bool,
    /// Bytes of publication data and info held (the size a reply will have, within a few bytes
    /// per publication).
    pub bytes: usize,
}

impl StoredPublication {
    /// Bytes this publication takes in a reply (data, info and the JSON around them).
    pub fn reply_bytes(&self) -> usize {
        self.data.get().len() + self.info.as_ref().map_or(0, |i| i.get().len() + 8) + 32
    }
}

/// The position and the publications of a read. `relay.read_history` (migration 0013) stops its scan
/// as soon as the rows' text passes the byte cap ($4), returning the row that crosses it, so
/// PostgreSQL neither reads nor sends more than the cap plus one row, whatever the count allows; it
/// returns nothing older than the channel keeps ($5 offsets, $6 seconds).
const FORWARD: &str = r#"
SELECT coalesce(c.epoch, relay.first_epoch($1)), c.top_offset, p."offset", p.data, p.info
FROM (SELECT 1) AS one
LEFT JOIN relay.channels c ON c.name = $1
LEFT JOIN LATERAL relay.read_history($1, $2, true, $3, $4, $5, $6) p ON true
ORDER BY p."offset""#;

const BACKWARD: &str = r#"
SELECT coalesce(c.epoch, relay.first_epoch($1)), c.top_offset, p."offset", p.data, p.info
FROM (SELECT 1) AS one
LEFT JOIN relay.channels c ON c.name = $1
LEFT JOIN LATERAL relay.read_history($1, $2, false, $3, $4, $5, $6) p ON true
ORDER BY p."offset" DESC"#;

type Row = (
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// Reads the position of `channel` and up to `limit` publications after offset `after` (exclusive),
/// oldest first; with `reverse`, before offset `before` (exclusive), newest first. The read stops
/// once the publications held pass `max_bytes` (see [`StreamSlice::overflow`]); what it holds then is
/// at most `max_bytes` plus one row. Nothing beyond what the channel `keep`s is returned.
pub async fn read(
    pool: &PgPool,
    channel: &str,
    bound: Bound,
    limit: u32,
    max_bytes: usize,
    keep: Keep,
) -> Result<StreamSlice> {
    let (sql, offset) = match bound {
        Bound::After(o) => (FORWARD, o),
        Bound::Before(o) => (BACKWARD, o),
    };
    let mut rows = sqlx::query_as::<_, Row>(sql)
        .bind(channel)
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(keep.publications).unwrap_or(i64::MAX))
        .bind(i64::try_from(keep.age_secs).unwrap_or(i64::MAX))
        .fetch(pool);
    let mut slice = StreamSlice::default();
    while let Some((epoch, top, offset, data, info)) = rows.try_next().await? {
        slice.epoch = epoch.unwrap_or_default();
        slice.top = top.map_or(0, |t| u64::try_from(t).unwrap_or(0));
        if let (Some(offset), Some(data)) = (offset, data) {
            let publication = StoredPublication {
                offset: u64::try_from(offset).unwrap_or(0),
                data: raw(data),
                info: info.map(raw),
            };
            slice.bytes += publication.reply_bytes();
            if slice.bytes > max_bytes {
                // Dropping the stream discards the rest of the result without keeping it.
                slice.overflow = true;
                slice.publications.clear();
                slice.publications.shrink_to_fit();
                break;
            }
            slice.publications.push(publication);
        }
    }
    Ok(slice)
}

/// How much of a channel's history a read may return: its retention rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// The newest this many offsets.
    pub publications: u64,
    /// Publications sequenced within this many seconds.
    pub age_secs: u64,
}

impl From<&RetentionRule> for Keep {
    fn from(rule: &RetentionRule) -> Self {
        Self {
            publications: rule.max_publications,
            age_secs: rule.max_age_secs,
        }
    }
}

/// Where a history read starts.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    /// Publications with offsets greater than this, oldest first.
    After(u64),
    /// Publications with offsets less than this, newest first.
    Before(u64),
}

/// PostgreSQL's jsonb text is valid JSON on one line; a value that somehow is not becomes `null`.
fn raw(text: String) -> Box<RawValue> {
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Records a client publication with `relay.publish_json()` (its data kept as written, migration
/// 0015) and returns once it is in the history (or
/// after [`fence::MAX_WAIT`], see [`fence`]); it is delivered through the same sequencer as table
/// changes.
pub async fn publish(pool: &PgPool, channel: &str, data: &RawValue, info: &RawValue) -> Result<()> {
    sqlx::query("SELECT relay.publish_json($1, $2::text::json, $3::text::jsonb)")
        .bind(channel)
        .bind(data.get())
        .bind(info.get())
        .execute(pool)
        .await?;
    fence::settle(pool).await;
    Ok(())
}

/// Where a publication landed: its offset in the channel's stream and the stream's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The publication's offset.
    pub offset: u64,
    /// The channel's epoch when it was sequenced.
    pub epoch: String,
}

/// Records a publication with `relay.publish_json()` (no client info), waits until it is in the history
/// (see [`fence`]), and returns where it landed, for answers that carry the offset (the server API).
///
/// Offsets are assigned after the commit, so the publication is found afterwards: it is the one on
/// the channel with the same data and an offset above the channel's top read before the write (the
/// write commits after that read, so it is sequenced after it). `None` when that does not name
/// exactly one publication (an identical publication sequenced on the channel at the same time, a
/// channel reset in between) or when sequencing did not finish within [`fence::MAX_WAIT`]: the write
/// is durable either way, only its position is not reported.
pub async fn publish_located(
    pool: &PgPool,
    channel: &str,
    data: &RawValue,
) -> Result<Option<Located>> {
    let top: i64 = sqlx::query_scalar(
        "SELECT coalesce((SELECT top_offset FROM relay.channels WHERE name = $1), 0)",
    )
    .bind(channel)
    .fetch_one(pool)
    .await?;
    sqlx::query("SELECT relay.publish_json($1, $2::text::json)")
        .bind(channel)
        .bind(data.get())
        .execute(pool)
        .await?;
    let sequenced = match fence::sequenced(pool, fence::MAX_WAIT).await {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(error = %e, "could not check that a publish was sequenced; acknowledged");
            false
        }
    };
    if !sequenced {
        return Ok(None);
    }
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT \"offset\", epoch FROM relay.publications \
         WHERE channel = $1 AND \"offset\" > $2 AND data::jsonb = $3::text::jsonb \
         ORDER BY \"offset\" LIMIT 2",
    )
    .bind(channel)
    .bind(top)
    .bind(data.get())
    .fetch_all(pool)
    .await?;
    Ok(match rows.as_slice() {
        [(offset, epoch)] => Some(Located {
            offset: u64::try_from(*offset).unwrap_or(0),
            epoch: epoch.clone(),
        }),
        _ => None,
    })
}
