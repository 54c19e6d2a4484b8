//! The node's one LISTEN connection: a task that owns a [`PgListener`] on every channel the node
//! listens to (`relay_changes` and `relay_publications` for the change stream, `relay_presence`
//! for presence events and disconnect orders) and hands typed [`ListenEvent`]s to its subscribers.
//!
//! It connects with the same [`PgConnectOptions`] as the pool (`database.listen_url`, else
//! `database.url`), so `sslmode`, `sslrootcert` and the rest of the URL mean what they mean for
//! every other connection: one TLS configuration. When the connection is lost it backs off (one
//! policy: [`Backoff::reconnect`]) and connects again; after every (re)connect — once it LISTENs again — each
//! subscriber gets [`ListenEvent::Connected`], which is a gap: whatever was notified meanwhile is
//! gone, and the subscriber reads what it missed (the stream from the changelog; presence queries
//! stay exact and only join/leave pushes are missed, as before).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

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
    options: PgConnectOptions,
    connect_timeout: Duration,
    subscribers: Vec<Subscriber>,
}

impl Listener {
    /// A listener that connects with `options`, giving up an attempt after `connect_timeout`.
    pub(crate) fn new(options: PgConnectOptions, connect_timeout: Duration) -> Self {
        Self {
            options,
            connect_timeout,
            subscribers: Vec::new(),
        }
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
        let mut backoff = Backoff::reconnect();
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.connect(&channels) => r,
            };
            match connected {
                Ok(mut listener) => {
                    backoff.reset();
                    if !self.broadcast(&ListenEvent::Connected) {
                        return;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = self.receive(&mut listener) => {}
                    }
                    if !self.broadcast(&ListenEvent::Lost) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %super::error_text(&e), "LISTEN connection failed")
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

    /// A connection that LISTENs on `channels`.
    async fn connect(&self, channels: &[String]) -> Result<PgListener, sqlx::Error> {
        // A pool of one, for this listener only: it is how `PgListener` opens its connection.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.connect_timeout)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(self.options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.ignore_pool_close_event(true);
        // Reconnects are this task's (with its backoff), so each one is seen as a gap; the
        // listener is dropped on a loss, so it need not know its channels.
        listener.eager_reconnect(false);
        // On the listener's connection, so notifications that arrive with the reply are kept.
        execute(&mut listener, &listen_sql(channels)).await?;
        Ok(listener)
    }

    /// Routes notifications until the connection is lost.
    async fn receive(&self, listener: &mut PgListener) {
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => self.route(n.channel(), n.payload()),
                Ok(None) => {
                    tracing::warn!("LISTEN connection lost");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %super::error_text(&e), "LISTEN connection failed");
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

/// Runs `sql` (no parameters: the simple query protocol, several statements allowed) on the
/// listener's connection. Boxed so the future is `Send` for one concrete lifetime (sqlx's
/// `Executor` impls otherwise trip the compiler's higher-ranked `Send` check in spawned tasks).
fn execute<'a>(
    listener: &'a mut PgListener,
    sql: &'a str,
) -> futures_util::future::BoxFuture<'a, Result<(), sqlx::Error>> {
    Box::pin(async move { sqlx::Executor::execute(listener, sql).await.map(drop) })
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
}
