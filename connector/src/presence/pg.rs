//! The PostgreSQL presence store (`presence.engine = "postgres"`, the default): shared by every node.
//!
//! Members are rows of `relay.presence` (migration 0006), visible while their node's row in
//! `relay.nodes` is fresh (`cluster::pg` keeps those). Joins with `announce` and leaves
//! send `pg_notify('relay_presence', …)` from the transaction that changes the table (the SQL
//! functions `relay.presence_join` / `relay.presence_leave`); `cluster::pg` hears them.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use sqlx::PgPool;

use super::{FailedLeave, Join, Member, PresenceStore};
use crate::error::Result;

/// Presence in PostgreSQL.
#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// A store on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// Members are visible while their node's heartbeat is fresh.
const LIVE: &str = "JOIN relay.nodes n ON n.id = p.node AND n.expires_at > now()";

impl PresenceStore for PgStore {
    fn join<'a>(&'a self, j: Join<'a>) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let joined: bool = sqlx::query_scalar(
                "SELECT relay.presence_join($1, $2, $3, $4::text::jsonb, $5::text::jsonb, $6, $7, $8, $9)",
            )
            .bind(j.channel)
            .bind(&j.member.client)
            .bind(&j.member.user)
            .bind(j.member.conn_info.as_deref().map(RawValue::get))
            .bind(j.member.chan_info.as_deref().map(RawValue::get))
            .bind(j.node)
            .bind(j.id)
            .bind(i32::try_from(j.max_members).unwrap_or(i32::MAX))
            .bind(j.announce)
            .fetch_one(&self.pool)
            .await?;
            Ok(joined)
        })
    }

    fn leave<'a>(
        &'a self,
        client: &'a str,
        membership: Option<(&'a str, &'a str)>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (channel, id) = membership.unzip();
            sqlx::query("SELECT relay.presence_leave($1, $2, $3)")
                .bind(client)
                .bind(channel)
                .bind(id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn leave_many<'a>(&'a self, leaves: &'a [FailedLeave]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // One statement for the batch: a mass disconnect costs a few round trips, not thousands.
            let clients: Vec<&str> = leaves.iter().map(|(c, _)| c.as_str()).collect();
            let channels: Vec<Option<&str>> = leaves
                .iter()
                .map(|(_, m)| m.as_ref().map(|(ch, _)| ch.as_str()))
                .collect();
            let ids: Vec<Option<&str>> = leaves
                .iter()
                .map(|(_, m)| m.as_ref().map(|(_, id)| id.as_str()))
                .collect();
            sqlx::query(
                "SELECT relay.presence_leave(l.client, l.channel, l.member)
                 FROM unnest($1::text[], $2::text[], $3::text[]) AS l(client, channel, member)",
            )
            .bind(&clients)
            .bind(&channels)
            .bind(&ids)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }

    fn node_members<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String, String)>>> {
        Box::pin(async move {
            Ok(
                sqlx::query_as(
                    "SELECT channel, client, member FROM relay.presence WHERE node = $1",
                )
                .bind(node)
                .fetch_all(&self.pool)
                .await?,
            )
        })
    }

    fn members<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>>> {
        Box::pin(async move {
            let rows: Vec<(String, String, Option<String>, Option<String>)> =
                sqlx::query_as(&format!(
                    r#"SELECT p.client, p."user", p.conn_info::text, p.chan_info::text
                       FROM relay.presence p {LIVE} WHERE p.channel = $1 ORDER BY p.joined_at"#
                ))
                .bind(channel)
                .fetch_all(&self.pool)
                .await?;
            Ok(rows
                .into_iter()
                .map(|(client, user, conn, chan)| Member {
                    client,
                    user,
                    conn_info: conn.and_then(raw),
                    chan_info: chan.and_then(raw),
                })
                .collect())
        })
    }

    fn stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(u64, u64)>> {
        Box::pin(async move {
            let (clients, users): (i64, i64) = sqlx::query_as(&format!(
                r#"SELECT count(*), count(DISTINCT p."user") FROM relay.presence p {LIVE}
                   WHERE p.channel = $1"#
            ))
            .bind(channel)
            .fetch_one(&self.pool)
            .await?;
            Ok((clients.unsigned_abs(), users.unsigned_abs()))
        })
    }

    fn channel_counts(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>>> {
        Box::pin(async move {
            let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
                "SELECT p.channel, count(*) FROM relay.presence p {LIVE} GROUP BY p.channel"
            ))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(c, n)| (c, n.unsigned_abs()))
                .collect())
        })
    }
}

fn raw(text: String) -> Option<Arc<RawValue>> {
    RawValue::from_string(text).ok().map(Arc::from)
}
