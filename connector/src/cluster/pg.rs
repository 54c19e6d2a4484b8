//! The cluster in PostgreSQL (`presence.engine = "postgres"`, the default): the node registry is
//! `relay.nodes` (migration 0006), and events travel by `pg_notify('relay_presence', …)`: joins and
//! leaves from the presence SQL functions, disconnect orders from [`PgCluster::disconnect`]. A node
//! hears them on its one LISTEN connection (`db::listener`, given with
//! `PgCluster::with_listener`); a cluster store made with [`PgCluster::new`] alone (the
//! conformance tests) runs a listener of its own. Events sent while the connection is down are
//! missed: join/leave pushes are best-effort, the tables stay exact.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ClusterEvent, ClusterStore, DisconnectOrder, NodeInfo};
use crate::db::listener::{ListenEvent, Listener};
use crate::error::Result;
use crate::presence::{Announcement, Member};

/// The notification channel of presence events and disconnect orders.
pub const CHANNEL: &str = "relay_presence";

/// The node registry and event bus in PostgreSQL.
#[derive(Debug)]
pub struct PgCluster {
    pool: PgPool,
    events: Source,
}

/// Where a cluster store hears its events.
#[derive(Debug)]
enum Source {
    /// Its own LISTEN connection to this URL.
    Own(String),
    /// The node's listener (taken by the first `listen`).
    Node(Mutex<Option<mpsc::UnboundedReceiver<ListenEvent>>>),
}

impl PgCluster {
    /// A cluster store on `pool` that hears events on a LISTEN connection of its own to
    /// `listen_url`.
    pub fn new(pool: PgPool, listen_url: String) -> Self {
        Self {
            pool,
            events: Source::Own(listen_url),
        }
    }

    /// A cluster store on `pool` that hears events from the node's listener (subscribed to
    /// [`CHANNEL`]).
    pub(crate) fn with_listener(
        pool: PgPool,
        events: mpsc::UnboundedReceiver<ListenEvent>,
    ) -> Self {
        Self {
            pool,
            events: Source::Node(Mutex::new(Some(events))),
        }
    }
}

impl ClusterStore for PgCluster {
    fn heartbeat<'a>(&'a self, node: &'a NodeInfo, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let inserted: bool = sqlx::query_scalar(
                "INSERT INTO relay.nodes AS n (id, name, version, expires_at, stats)
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5::text::jsonb)
                 ON CONFLICT (id) DO UPDATE
                    SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at, stats = EXCLUDED.stats
                 RETURNING (xmax = 0)",
            )
            .bind(&node.id)
            .bind(&node.name)
            .bind(&node.version)
            .bind(ttl.as_secs_f64())
            .bind(node.stats.to_string())
            .fetch_one(&self.pool)
            .await?;
            Ok(inserted)
        })
    }

    fn expire(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let gone: i32 = sqlx::query_scalar("SELECT relay.presence_expire()")
                .fetch_one(&self.pool)
                .await?;
            Ok(u64::try_from(gone).unwrap_or(0))
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Value>>> {
        Box::pin(async move {
            let rows: Vec<(String, String, String, String)> = sqlx::query_as(
                "SELECT id, name, version, stats::text FROM relay.nodes WHERE expires_at > now()
                 ORDER BY started_at",
            )
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(uid, name, version, stats)| {
                    super::node_json(&uid, &name, &version, serde_json::from_str(&stats).ok())
                })
                .collect())
        })
    }

    fn remove_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(
                "SELECT relay.presence_leave(client) FROM
                   (SELECT DISTINCT client FROM relay.presence WHERE node = $1) c",
            )
            .bind(node)
            .execute(&self.pool)
            .await?;
            sqlx::query("DELETE FROM relay.nodes WHERE id = $1")
                .bind(node)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn disconnect<'a>(&'a self, order: &'a DisconnectOrder) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let payload = json!({"k": "disconnect", "d": order}).to_string();
            if payload.len() > 7900 {
                return Err(crate::Error::Io(std::io::Error::other(
                    "disconnect order too large for NOTIFY",
                )));
            }
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn listen(
        self: Arc<Self>,
        sink: mpsc::UnboundedSender<ClusterEvent>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            match &self.events {
                Source::Node(events) => {
                    let Some(events) = events.lock().take() else {
                        tracing::error!("presence events: the node's listener was taken already");
                        return;
                    };
                    forward(events, &sink, &shutdown).await;
                }
                Source::Own(url) => {
                    let mut listener = match Listener::new(url, Duration::from_secs(5)) {
                        Ok(listener) => listener,
                        Err(e) => {
                            tracing::error!(error = %e, "presence events: bad LISTEN URL");
                            return;
                        }
                    };
                    let events = listener.subscribe(&[CHANNEL]);
                    tokio::select! {
                        () = listener.run(shutdown.clone()) => {}
                        () = forward(events, &sink, &shutdown) => {}
                    }
                }
            }
        })
    }
}

/// Hands the listener's presence notifications to `sink` until shutdown or either side is gone.
async fn forward(
    mut events: mpsc::UnboundedReceiver<ListenEvent>,
    sink: &mpsc::UnboundedSender<ClusterEvent>,
    shutdown: &CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            None => return,
            Some(ListenEvent::Notification { payload, .. }) => match parse(&payload) {
                Some(event) => {
                    if sink.send(event).is_err() {
                        return;
                    }
                }
                None => tracing::debug!(payload, "presence: unreadable event"),
            },
            Some(ListenEvent::Lost) => {
                tracing::warn!(
                    "presence events: LISTEN connection lost (join/leave pushes missed meanwhile)"
                );
            }
            Some(ListenEvent::Connected) => {}
        }
    }
}

/// A NOTIFY payload of `relay_presence` (see `relay.presence_event()`).
#[derive(Deserialize)]
struct Payload {
    k: String,
    #[serde(default)]
    c: String,
    #[serde(default)]
    i: Option<Info>,
    #[serde(default)]
    d: Option<DisconnectOrder>,
}

#[derive(Deserialize)]
struct Info {
    #[serde(default)]
    user: String,
    #[serde(default)]
    client: String,
    #[serde(default)]
    conn_info: Option<Box<RawValue>>,
    #[serde(default)]
    chan_info: Option<Box<RawValue>>,
}

fn parse(payload: &str) -> Option<ClusterEvent> {
    let p: Payload = serde_json::from_str(payload).ok()?;
    let member = |i: Info| Member {
        user: i.user,
        client: i.client,
        conn_info: i.conn_info.map(Arc::from),
        chan_info: i.chan_info.map(Arc::from),
    };
    match (p.k.as_str(), p.i, p.d) {
        ("join", Some(i), _) => Some(ClusterEvent::Presence(Announcement::Join {
            channel: p.c,
            member: member(i),
        })),
        ("leave", Some(i), _) => Some(ClusterEvent::Presence(Announcement::Leave {
            channel: p.c,
            member: member(i),
        })),
        ("disconnect", _, Some(order)) => Some(ClusterEvent::Disconnect(order)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse() {
        let e = parse(r#"{"k":"join","c":"ch","i":{"user":"u","client":"c","chan_info":{"a":1}}}"#);
        assert!(
            matches!(e, Some(ClusterEvent::Presence(Announcement::Join { ref channel, ref member }))
            if channel == "ch" && member.client == "c" && member.chan_info.as_deref().map(RawValue::get) == Some(r#"{"a":1}"#))
        );
        let e = parse(
            r#"{"k":"disconnect","d":{"user":"u","client":null,"whitelist":[],"code":3503,"reason":"x"}}"#,
        );
        assert!(matches!(e, Some(ClusterEvent::Disconnect(ref o)) if o.user == "u"));
        assert!(parse("{}").is_none() && parse("nope").is_none());
    }
}
