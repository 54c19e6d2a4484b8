//! The node's one LISTEN connection: a task that owns a tokio-postgres connection listening on
//! every channel the node listens to (`relay_changes` and `relay_publications` for the change
//! stream, `relay_presence` for presence events and disconnect orders) and hands typed
//! [`ListenEvent`]s to its subscribers.
//!
//! tokio-postgres is the driver the project chose for this connection; this module is the one
//! place that uses it. It connects to `database.listen_url` (else `database.url`), the URL the
//! configuration checks and every other LISTEN-side connection uses, with TLS from [`super::tls`]:
//! `sslmode` and `sslrootcert` mean what they mean to libpq and to the query pool. When the
//! connection is lost it backs off (one policy: [`Backoff::reconnect`]) and connects again; after
//! every (re)connect — once it LISTENs again — each subscriber gets [`ListenEvent::Connected`],
//! which is a gap: whatever was notified meanwhile is gone, and the subscriber reads what it
//! missed (the stream from the changelog; presence queries stay exact and only join/leave pushes
//! are missed, as before).

use std::future::poll_fn;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Notification, Socket};
use tokio_util::sync::CancellationToken;

use super::tls::ListenTarget;
use crate::backoff::Backoff;
use crate::error::ConfigError;

/// The connection half of a LISTEN connection (the client half only sends the LISTEN statements).
type Connection = tokio_postgres::Connection<
    Socket,
    <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream,
>;

/// What a subscriber of the listener hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ListenEvent {
    /// The connection is up and LISTENs on every channel. Anything notified before it was missed:
    /// read to catch up.
    Connected,
    /// The connection was lost; notifications are missed until the next [`ListenEvent::Connected`].
    Lost,
    /// A notification on one of the subscriber's channels.
    Notification {
        /// The channel it was sent on.
        channel: String,
        /// Its payload.
        payload: String,
    },
}

struct Subscriber {
    channels: Vec<String>,
    events: mpsc::UnboundedSender<ListenEvent>,
}

/// The LISTEN task of a node; subscribe, then [`Listener::run`] it.
pub(crate) struct Listener {
    target: ListenTarget,
    connect_timeout: Duration,
    subscribers: Vec<Subscriber>,
}

impl Listener {
    /// A listener that connects to `url` (its `sslmode` and `sslrootcert` as libpq reads them),
    /// giving up an attempt (connect, TLS, authentication, LISTEN) after `connect_timeout`. The
    /// error is the URL's, for `database.listen_url` (else `database.url`), which it comes from.
    pub(crate) fn new(url: &str, connect_timeout: Duration) -> Result<Self, ConfigError> {
        let target = super::tls::listen_target(url).map_err(|e| {
            ConfigError::new(
                "database.listen_url",
                format!("the LISTEN connection cannot use it: {e:#}"),
            )
        })?;
        Ok(Self {
            target,
            connect_timeout,
            subscribers: Vec::new(),
        })
    }

    /// The events of `channels` (and every connect and loss), for one subscriber.
    pub(crate) fn subscribe(&mut self, channels: &[&str]) -> mpsc::UnboundedReceiver<ListenEvent> {
        let (events, rx) = mpsc::unbounded_channel();
        self.subscribers.push(Subscriber {
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
            events,
        });
        rx
    }

    /// Listens until `shutdown` is cancelled or every subscriber has gone.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut channels: Vec<&str> = self
            .subscribers
            .iter()
            .flat_map(|s| s.channels.iter().map(String::as_str))
            .collect();
        channels.sort_unstable();
        channels.dedup();
        let channels: Vec<String> = channels.into_iter().map(str::to_owned).collect();
        let sql = listen_sql(&channels);
        let mut backoff = Backoff::reconnect();
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.connect(&sql) => r,
            };
            match connected {
                Ok(Listening {
                    client,
                    mut connection,
                    early,
                }) => {
                    backoff.reset();
                    if !self.broadcast(&ListenEvent::Connected) {
                        return;
                    }
                    for n in &early {
                        self.route(n.channel(), n.payload());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = self.receive(&mut connection) => {}
                    }
                    drop(client);
                    if !self.broadcast(&ListenEvent::Lost) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %super::error_text(e.as_ref()), "LISTEN connection failed")
                }
            }
            let wait = backoff.next_delay();
            tracing::debug!(
                retry_in_ms = wait.as_millis() as u64,
                "LISTEN connection: reconnecting"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// A connection that has run `listen` (the LISTEN statements), within the connect timeout.
    async fn connect(&self, listen: &str) -> anyhow::Result<Listening> {
        match tokio::time::timeout(self.connect_timeout, self.try_connect(listen)).await {
            Ok(r) => r,
            Err(_) => anyhow::bail!(
                "no connection within {} ms",
                self.connect_timeout.as_millis()
            ),
        }
    }

    async fn try_connect(&self, listen: &str) -> anyhow::Result<Listening> {
        let (client, mut connection) = self.target.config.connect(self.target.tls.clone()).await?;
        // The connection only makes progress while it is polled: drive it while the LISTEN
        // statements run, keeping the notifications that arrive with their reply.
        let mut early = Vec::new();
        {
            let mut listening = std::pin::pin!(client.batch_execute(listen));
            loop {
                tokio::select! {
                    r = &mut listening => {
                        r?;
                        break;
                    }
                    m = poll_fn(|cx| connection.poll_message(cx)) => match m {
                        Some(Ok(AsyncMessage::Notification(n))) => early.push(n),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => anyhow::bail!("the connection closed during LISTEN"),
                    },
                }
            }
        }
        Ok(Listening {
            client,
            connection,
            early,
        })
    }

    /// Routes notifications until the connection is lost.
    async fn receive(&self, connection: &mut Connection) {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => self.route(n.channel(), n.payload()),
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    tracing::debug!(notice = %notice, "LISTEN connection: server notice")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %super::error_text(&e), "LISTEN connection failed");
                    return;
                }
                None => {
                    tracing::warn!("LISTEN connection lost");
                    return;
                }
            }
        }
    }

    fn route(&self, channel: &str, payload: &str) {
        for s in &self.subscribers {
            if s.channels.iter().any(|c| c == channel) {
                let _ = s.events.send(ListenEvent::Notification {
                    channel: channel.to_owned(),
                    payload: payload.to_owned(),
                });
            }
        }
    }

    /// Sends `event` to every subscriber; false when none is left.
    fn broadcast(&self, event: &ListenEvent) -> bool {
        let mut any = false;
        for s in &self.subscribers {
            any |= s.events.send(event.clone()).is_ok();
        }
        any
    }
}

/// A connection that LISTENs.
struct Listening {
    /// Kept so the connection stays open (dropping the client closes it).
    client: tokio_postgres::Client,
    connection: Connection,
    /// Notifications that arrived before the LISTEN statements' reply.
    early: Vec<Notification>,
}

/// `LISTEN a; LISTEN b; …`: plain identifiers as they are (so `pg_stat_activity` shows
/// `LISTEN relay_changes; …`, which the fault suite looks for), anything else quoted.
fn listen_sql(channels: &[String]) -> String {
    channels
        .iter()
        .map(|c| {
            if crate::config::is_ident(c) && c.bytes().all(|b| !b.is_ascii_uppercase()) {
                format!("LISTEN {c};")
            } else {
                format!("LISTEN \"{}\";", c.replace('"', "\"\""))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_statements_quote_what_is_not_a_plain_name() {
        let channels = ["relay_changes", "Odd\"Name"].map(str::to_owned);
        assert_eq!(
            listen_sql(&channels),
            r#"LISTEN relay_changes; LISTEN "Odd""Name";"#
        );
    }

    /// The next event, or a failure after 10 s.
    async fn next(events: &mut mpsc::UnboundedReceiver<ListenEvent>) -> ListenEvent {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("the listener is running")
    }

    async fn notify(pool: &sqlx::PgPool, channel: &str, payload: &str) {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(pool)
            .await
            .unwrap();
    }

    /// Against the local PostgreSQL (127.0.0.1:5432, user postgres), in a database of its own.
    #[tokio::test]
    async fn a_lost_connection_is_a_gap_and_is_listened_again() {
        let server = "postgres://postgres@127.0.0.1:5432";
        let name = format!(
            "relay_listener_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .unwrap();
        let url = format!("{server}/{name}?sslmode=disable");
        let db = sqlx::PgPool::connect(&url).await.unwrap();

        let mut listener = Listener::new(&url, Duration::from_secs(5)).unwrap();
        let mut changes = listener.subscribe(&["relay_changes"]);
        let mut presence = listener.subscribe(&["relay_presence"]);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(listener.run(shutdown.clone()));
        assert_eq!(next(&mut changes).await, ListenEvent::Connected);
        assert_eq!(next(&mut presence).await, ListenEvent::Connected);

        notify(&db, "relay_changes", "a").await;
        assert_eq!(
            next(&mut changes).await,
            ListenEvent::Notification {
                channel: "relay_changes".into(),
                payload: "a".into()
            }
        );
        // As the fault suite finds it: one backend whose statement starts `LISTEN relay_changes`.
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND query ILIKE 'LISTEN relay_changes%'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(killed, 1);
        // Presence heard nothing of `relay_changes`: its next events are the loss and the reconnect.
        for events in [&mut changes, &mut presence] {
            assert_eq!(next(events).await, ListenEvent::Lost);
            assert_eq!(next(events).await, ListenEvent::Connected);
        }
        notify(&db, "relay_presence", "b").await;
        assert_eq!(
            next(&mut presence).await,
            ListenEvent::Notification {
                channel: "relay_presence".into(),
                payload: "b".into()
            }
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the listener stops on shutdown")
            .unwrap();
        assert!(changes.recv().await.is_none(), "nothing after shutdown");
        db.close().await;
        sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
    }
}
