//! Becoming and staying the leader: the leader lock (a session-level advisory lock on a dedicated
//! connection), the replication connection to the slot, and the first start under the lock
//! ([`ensure_started`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::slot::prepare_slot;
use super::{APPLICATION_NAME, Leader};
use crate::capture::CaptureStatus;

/// A connection for the leader lock, named [`APPLICATION_NAME`].
async fn lock_connection(lock_url: &str) -> anyhow::Result<PgConnection> {
    let options: PgConnectOptions = lock_url.parse().context("leader lock URL")?;
    PgConnection::connect_with(&options.application_name(APPLICATION_NAME))
        .await
        .context("leader lock connection")
}

/// The advisory lock key (hashed by `hashtext`) of `slot`'s leader.
fn lock_key(slot: &str) -> String {
    format!("relay.wal_leader:{slot}")
}

/// On a database where wal capture never started (no stored position): creates the slot and hands
/// capture over before this node serves, so nothing committed after start-up is missed (the leader
/// task would do it too, but only after the node is ready). Takes the leader lock for it, so nodes
/// starting together do it once.
pub async fn ensure_started(
    pool: &PgPool,
    lock_url: &str,
    slot: &str,
    status: &CaptureStatus,
) -> anyhow::Result<()> {
    let started: bool = sqlx::query_scalar("SELECT lsn IS NOT NULL FROM relay.wal_state")
        .fetch_one(pool)
        .await?;
    if started {
        return Ok(());
    }
    let mut lock = lock_connection(lock_url).await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
            .bind(lock_key(slot))
            .execute(&mut lock),
    )
    .await
    .context("waiting 60 s for the wal leader lock")??;
    let result = prepare_slot(pool, slot, status).await;
    let _ = lock.close().await;
    result.map(|_| ())
}

/// Fails when the leader lock connection is gone or does not answer within 3 s: the lock may be
/// another node's by now.
pub(super) async fn check_lock(lock: &mut PgConnection) -> anyhow::Result<()> {
    tokio::time::timeout(
        Duration::from_secs(3),
        sqlx::query("SELECT 1").execute(&mut *lock),
    )
    .await
    .context("leader lock connection timed out")?
    .context("leader lock connection lost")?;
    Ok(())
}

impl Leader<'_> {
    /// One attempt: returns `Ok(false)` when another node leads, `Ok(true)` after leading until
    /// shutdown, `Err` when leading broke.
    pub(super) async fn lead(&mut self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        let mut lock = lock_connection(&self.cap.lock_url).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(lock_key(&self.slot))
            .fetch_one(&mut lock)
            .await?;
        if !got {
            let _ = lock.close().await;
            return Ok(false);
        }
        // Relation messages come again on every new stream.
        self.relations.clear();
        self.table_columns.clear();

        let start = prepare_slot(&self.cap.pool, &self.slot, &self.cap.status).await?;
        let mut client = ReplicationClient::connect(self.replication_config(start)?)
            .await
            .context("replication connection")?;
        // Leading from here: the slot is ready and streaming.
        self.cap.status.leader.store(true, Ordering::Relaxed);
        self.cap.status.leaderships.inc();
        tracing::info!(slot = %self.slot, start = %start, "wal capture leader: streaming from the slot");

        let result = self.stream(&mut client, &mut lock, shutdown).await;
        client.abort();
        let _ = lock.close().await;
        result.map(|()| true)
    }

    /// The replication connection's settings: the slot and publication, streaming from `start`.
    fn replication_config(&self, start: Lsn) -> anyhow::Result<ReplicationConfig> {
        let t = parse_target(&self.cap.replication_url)?;
        let mut cfg = ReplicationConfig::new(
            t.host,
            t.user,
            t.password,
            t.database,
            self.slot.clone(),
            self.cap.config.publication.clone(),
        )
        .with_port(t.port)
        .with_start_lsn(start)
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1))
        .with_buffer_size(8192);
        cfg.application_name = Some(APPLICATION_NAME.to_owned());
        Ok(cfg)
    }
}

/// The replication connection's target, from a `postgres://` URL.
struct Target {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
}

fn parse_target(url: &str) -> anyhow::Result<Target> {
    let u = reqwest::Url::parse(url).context("replication URL")?;
    for (k, v) in u.query_pairs() {
        if k == "sslmode" && !matches!(&*v, "disable" | "allow" | "prefer") {
            bail!(
                "the wal replication connection does not support TLS (sslmode={v}); set \
                 capture.replication_url to a URL with sslmode=disable on a trusted network path, \
                 or use capture.mode \"trigger\""
            );
        }
    }
    let decode = |s: &str| {
        percent_decode(s).with_context(|| format!("replication URL: bad escape in {s:?}"))
    };
    Ok(Target {
        host: u.host_str().unwrap_or("localhost").to_owned(),
        port: u.port().unwrap_or(5432),
        user: decode(u.username())?,
        password: decode(u.password().unwrap_or(""))?,
        database: decode(u.path().trim_start_matches('/'))?,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_urls() {
        let t =
            parse_target("postgres://us%40er:p%2Fw@db.example:6543/app?sslmode=disable").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_str(),
                t.password.as_str(),
                t.database.as_str()
            ),
            ("db.example", 6543, "us@er", "p/w", "app")
        );
        let e = parse_target("postgres://u@h/db?sslmode=verify-full")
            .err()
            .unwrap();
        assert!(e.to_string().contains("TLS"), "{e}");
    }
}
