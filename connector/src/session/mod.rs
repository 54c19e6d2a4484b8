//! One task per WebSocket connection: commands in, replies and pushes out, the ping timer, and the
//! close code that tells the SDK what to do next.
//!
//! Commands of a frame are handled in order (centrifuge-js sends `connect` and its `subscribe`s in one
//! frame), and their replies go out together in one frame. Pushes arrive from the hub through a
//! bounded mailbox; each subscription remembers the offset it has delivered, so a publication that
//! was already part of a subscribe reply is not sent twice, and a gap is never passed over silently
//! (the client is told to resubscribe and recover). Publishes to a rule's target run concurrently
//! with the session, so a slow writer does not hold back pushes.
//!
//! Authorization happens here, once per command ([`crate::auth`]): the connection's identity at
//! `connect` (and `refresh`), channel permissions and subscription tokens at `subscribe`, `publish`,
//! `history` and `presence`, never per delivered publication. A connection or subscription whose
//! token expired and was not refreshed within `auth.expired_close_delay_secs` is closed with 3005, or
//! unsubscribed with 2501 (the SDK resubscribes with a new token).
//!
//! A session is an adapter over the [`crate::node::Node`]: it parses a command, authorizes it, calls
//! the node and encodes the result; what a publish, a history read, a recovery or a presence query
//! does is the node's (the server API calls the same methods).
//!
//! # Layout
//! - this file: the session's state, [`serve`] and the loop: [`Session::run`] waits for the next
//!   event (shutdown, kick, timer, publish reply, client message, hub delivery) and hands it to
//!   its step (`on_timer`, `on_message`, `on_delivery`), then [`Session::finish`] closes;
//! - [`crate::clock::Clock`] (outside this folder): Unix time on tokio's clock, for token expiry;
//! - `subs`: the session's subscriptions by channel (a vector while few, a map beyond);
//! - `commands`: the dispatch of a frame's commands, and the channel commands (unsubscribe,
//!   publish, rpc, history, presence), each building a typed [`relay_protocol::Reply`] and encoding
//!   it once in the connection's encoding;
//! - `connect`: the connection's identity: `connect` (with its server-side subscriptions),
//!   `refresh`, `sub_refresh`, and the expiry of connection and subscription tokens;
//! - `subscriptions`: `subscribe` and the delivery of hub publications, with the pure offset/gap
//!   logic ([`subscriptions::SubState::accept`]) unit-tested without a socket or a database;
//! - `encode`: frames on the wire (JSON text frames of lines, Protobuf binary frames of
//!   length-delimited messages) and the timed writes;
//! - `tests`: the loop over a channel pair ([`serve_on`] takes any message sink and stream), with no
//!   socket and no database: connect, ping/pong and the close codes of refused frames, per encoding,
//!   and the timers (ping, pong, connect, token expiry and refresh) on paused time.

mod commands;
mod connect;
mod encode;
mod subs;
mod subscriptions;
#[cfg(test)]
mod tests;

use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::time::Instant;

use relay_protocol::channel::validate_channel;
use relay_protocol::command::{
    ChannelRequest, ConnectRequest, HistoryRequest, PublishRequest, RefreshRequest,
    SubRefreshRequest, SubscribeRequest,
};
use relay_protocol::reply::{
    self, ClientInfo, ConnectResult, Encoding, HistoryResult, Publication, Push, RefreshResult,
    Reply, ReplyBody, SubRefreshResult, SubscribeResult,
};
use relay_protocol::{Command, CommandError, Disconnect, ErrorCode, ReplyError, Request, pb};

use crate::auth::{self, ConnectError, Identity, Op, SubscriptionError};
use crate::edge::Edge;
use crate::hub::{Delivery, DeltaFrames, Frames, Mailbox, Subscriber};
use crate::limits::TokenBucket;
use crate::node::{Node, NodeError};

use encode::{feed_all, send_lines};
use subs::Subs;
use subscriptions::SubState;

/// WebSocket close code for a message over the size limit (the SDKs treat it as terminal).
pub(super) const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

/// What the handling of a frame asks the loop to do.
enum Flow {
    Continue,
    Close(Disconnect),
}

impl Flow {
    /// The loop's next step: go on, or close with the disconnect's code.
    fn step(self) -> Step {
        match self {
            Self::Continue => Continue(()),
            Self::Close(d) => Break(Some(code(d))),
        }
    }
}

/// The close frame a session ends with: its code and reason (none: the connection is gone).
type Close = Option<(u16, Utf8Bytes)>;

/// What the loop does after an event: go on, or end with a close.
type Step = ControlFlow<Close>;

/// A write's outcome as the loop's next step: a failed write means the peer is gone.
fn written(result: Result<(), axum::Error>) -> Step {
    match result {
        Ok(()) => Continue(()),
        Err(_) => Break(None),
    }
}

/// A session's state.
struct Session {
    edge: Arc<Edge>,
    id: u64,
    client: String,
    identity: Identity,
    connected: bool,
    publish_bucket: TokenBucket,
    /// Subscribes and unsubscribes of this connection.
    subscribe_bucket: TokenBucket,
    /// The client's IP (the socket's peer, or the trusted proxies' `X-Forwarded-For`).
    ip: String,
    /// Bytes the replies of the frame being handled may still take.
    reply_budget: usize,
    /// The process-wide allowance its large replies hold until they are written.
    held: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// The earliest moment a token expiry (connection or subscription) must be acted on.
    next_expiry: Option<Instant>,
    subs: Subs,
    /// Pushes from the hub; it counts the bytes waiting (and the replies being written), refuses
    /// more than the limit, and carries the slow mark.
    mailbox: Arc<Mailbox>,
    pending: Pending,
    pong_deadline: Option<Instant>,
    /// Its registration with the node (made at `connect`): fired by a `disconnect` order, from
    /// the server API of any node; dropped with the session.
    kick: Option<Arc<crate::hub::Registration>>,
    /// JSON or Protobuf, chosen at the upgrade: every message in and out uses it.
    encoding: Encoding,
    /// The names of an emulated transport, for its connect reply (none on a WebSocket).
    emulated: Option<Box<Emulated>>,
}

/// What the connect reply of an emulated transport (HTTP-streaming, SSE) names: the session id the
/// client addresses its `/emulation` requests to, and the node serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Emulated {
    /// The session id (128 random bits, in hex).
    pub(crate) session: String,
    /// The node's id.
    pub(crate) node: String,
}

/// Encoded messages (replies, pushes) waiting to be joined into one frame.
type Out = Vec<Vec<u8>>;

/// The session's deadlines other than those kept in [`Session`] (pong, token expiry), and the
/// periods they are set from (`client.*` of the configuration).
struct Timers {
    /// A connection that has not sent `connect` by then is closed ([`Disconnect::STALE`]).
    connect_by: Instant,
    /// When the next ping is sent.
    next_ping: Instant,
    ping_every: Duration,
    /// How long a client has to answer a ping.
    pong_timeout: Duration,
    /// How long a write to the socket may take before the peer counts as dead.
    write_timeout: Duration,
}

impl Timers {
    /// The timers of a session starting now.
    fn new(cfg: &crate::config::ClientConfig) -> Self {
        let start = Instant::now();
        Self {
            connect_by: start + cfg.connect_timeout(),
            next_ping: start + cfg.ping_interval(),
            ping_every: cfg.ping_interval(),
            pong_timeout: cfg.pong_timeout(),
            write_timeout: cfg.write_timeout(),
        }
    }

    /// The earliest deadline in force.
    fn next(&self, session: &Session) -> Instant {
        let mut due = self.next_ping;
        if !session.connected {
            due = due.min(self.connect_by);
        }
        for at in [session.pong_deadline, session.next_expiry]
            .into_iter()
            .flatten()
        {
            due = due.min(at);
        }
        due
    }
}

/// The replies of publishes in flight, made when the first one starts (most sessions never
/// publish, and an empty `FuturesUnordered` already takes two allocations).
#[derive(Default)]
struct Pending(Option<FuturesUnordered<BoxFuture<'static, Reply<'static>>>>);

impl Pending {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesUnordered::len)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, reply: BoxFuture<'static, Reply<'static>>) {
        self.0.get_or_insert_with(FuturesUnordered::new).push(reply);
    }

    /// The next reply to be ready (None if there is none in flight).
    async fn next(&mut self) -> Option<Reply<'static>> {
        match &mut self.0 {
            Some(pending) => pending.next().await,
            None => None,
        }
    }
}

/// Serves one upgraded WebSocket, from the client at `ip`, in `encoding`, until it closes.
///
/// Not an `async fn`: the socket is split before the session's future is made, so that future does
/// not keep room for the whole socket, which the split halves already hold (this future is what an
/// idle connection costs).
pub fn serve(
    socket: WebSocket,
    edge: Arc<Edge>,
    ip: std::net::IpAddr,
    encoding: Encoding,
) -> impl Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    serve_on(sink, stream, edge, ip, encoding, None)
}

/// The session over any message sink and stream: the halves of axum's socket, the adapter of an
/// emulated transport (with its names), or a channel pair in tests.
pub(crate) async fn serve_on<K, R>(
    sink: K,
    stream: R,
    edge: Arc<Edge>,
    ip: std::net::IpAddr,
    encoding: Encoding,
    emulated: Option<Emulated>,
) where
    K: futures_util::Sink<Message, Error = axum::Error> + Unpin,
    R: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let mailbox = Arc::new(Mailbox::new(
        edge.config.client.outbound_queue,
        edge.config.client.outbound_queue_bytes,
        encoding,
    ));
    let mut session = Session {
        id: edge.node.next_session_id(),
        client: uuid::Uuid::new_v4().to_string(),
        identity: Identity::default(),
        connected: false,
        publish_bucket: TokenBucket::new(
            edge.config.client.publish_rate_per_sec,
            edge.config.client.publish_burst,
        ),
        subscribe_bucket: TokenBucket::new(
            edge.config.client.subscribe_rate_per_sec,
            edge.config.client.subscribe_burst,
        ),
        ip: ip.to_string(),
        reply_budget: 0,
        held: Vec::new(),
        next_expiry: None,
        subs: Subs::default(),
        mailbox,
        pending: Pending::default(),
        pong_deadline: None,
        kick: None,
        encoding,
        emulated: emulated.map(Box::new),
        edge,
    };
    let metrics = session.node().metrics().clone();
    metrics.connections.inc();
    session.run(sink, stream).await;
    // Out of the hub first (a fan-out holds the hub's read lock, which the removal waits for), so
    // nothing is offered to the mailbox once it is closed, its own leave pushes included.
    for channel in session.subs.keys() {
        session.edge.node.remove_subscriber(channel, session.id);
    }
    session.mailbox.close();
    metrics.connections.dec();
    // Its memberships leave presence now (join/leave pushes announce it on every node); on shutdown
    // the node removes all of its members at once.
    // Boxed, like the other closing steps: not carried by an idle session's task.
    Box::pin(
        session
            .node()
            .leave_all(&session.client, session.edge.shutdown.is_cancelled()),
    )
    .await;
}

impl Session {
    /// The node this session's commands act on.
    fn node(&self) -> &Node {
        &self.edge.node
    }

    /// The loop: the first of a shutdown, a slow mark, a server-API `disconnect`, a timer, the
    /// reply of a publish, a client message and a hub delivery is acted on, until one of them ends
    /// the session; then the socket is closed.
    async fn run<K, R>(&mut self, mut sink: K, mut stream: R)
    where
        K: futures_util::Sink<Message, Error = axum::Error> + Unpin,
        R: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin,
    {
        let mut timers = Timers::new(&self.edge.config.client);
        // One timer for all of the session's deadlines (connect, pong, token expiry, ping), set to
        // the earliest: an idle session carries one timer entry instead of four.
        let timer = tokio::time::sleep_until(timers.next(self));
        tokio::pin!(timer);
        let shutdown = self.edge.shutdown.clone();
        let mailbox = self.mailbox.clone();

        let close: Close = loop {
            let due = timers.next(self);
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            let kick = self.kick.clone();
            let kicked = async move {
                match kick {
                    Some(k) => {
                        k.kicked().await;
                        k.advice()
                    }
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Break(Some(code(Disconnect::SHUTDOWN))),
                _ = mailbox.slow() => Break(Some(code(Disconnect::SLOW))),
                (kick_code, reason) = kicked => Break(Some((kick_code, Utf8Bytes::from(reason)))),
                // The timer fired at its deadline: the earliest of them is due.
                _ = &mut timer => self.on_timer(&mut sink, &mut timers, timer.deadline()).await,
                Some(reply) = self.pending.next(), if !self.pending.is_empty() => {
                    let line = [reply.encode(self.encoding)];
                    written(send_lines(&mut sink, self.encoding, &line, timers.write_timeout).await)
                }
                message = stream.next() => {
                    self.on_message(&mut sink, message, timers.write_timeout).await
                }
                delivery = mailbox.recv() => {
                    self.on_delivery(&mut sink, &delivery, timers.write_timeout).await
                }
            };
            if let Break(close) = step {
                break close;
            }
        };
        // Boxed: the closing steps' futures (timed writes within a timed drain) would otherwise
        // be part of every idle session's task.
        Box::pin(self.finish(&mut sink, close, timers.write_timeout)).await;
    }

    /// The timer fired at `now`: acts on the deadline due (the first of connect, pong, token
    /// expiry and ping when several are).
    async fn on_timer<K>(&mut self, sink: &mut K, timers: &mut Timers, now: Instant) -> Step
    where
        K: futures_util::Sink<Message, Error = axum::Error> + Unpin,
    {
        if !self.connected && timers.connect_by <= now {
            return Break(Some(code(Disconnect::STALE)));
        }
        if self.pong_deadline.is_some_and(|at| at <= now) {
            return Break(Some(code(Disconnect::NO_PONG)));
        }
        if self.next_expiry.is_some_and(|at| at <= now) {
            let mut out = Vec::new();
            let flow = self.expire(&mut out);
            if !out.is_empty() {
                written(send_lines(sink, self.encoding, &out, timers.write_timeout).await)?;
            }
            return flow.step();
        }
        // The ping is due. Missed pings are sent at once, one per period (as
        // `tokio::time::Interval` does by default).
        timers.next_ping += timers.ping_every;
        let ping = [self.encoding.ping()];
        written(send_lines(sink, self.encoding, &ping, timers.write_timeout).await)?;
        if self.connected && self.pong_deadline.is_none() {
            self.pong_deadline = Some(Instant::now() + timers.pong_timeout);
        }
        Continue(())
    }

    /// A message from the client: a frame of commands (in text frames for JSON, binary ones for
    /// Protobuf), or the end of the connection.
    async fn on_message<K>(
        &mut self,
        sink: &mut K,
        message: Option<Result<Message, axum::Error>>,
        write_timeout: Duration,
    ) -> Step
    where
        K: futures_util::Sink<Message, Error = axum::Error> + Unpin,
    {
        let frame: Bytes = match (self.encoding, message) {
            (Encoding::Json, Some(Ok(Message::Text(text)))) => Bytes::from(text),
            (Encoding::Protobuf, Some(Ok(Message::Binary(bytes)))) => bytes,
            (_, Some(Ok(Message::Text(_) | Message::Binary(_)))) => {
                return Break(Some(code(Disconnect::INAPPROPRIATE_PROTOCOL)));
            }
            (_, Some(Ok(Message::Close(_))) | None) => return Break(None),
            (_, Some(Ok(_))) => return Continue(()),
            (_, Some(Err(e))) => {
                if is_capacity_error(e) {
                    let reason = Utf8Bytes::from_static("message size limit");
                    return Break(Some((CLOSE_MESSAGE_TOO_BIG, reason)));
                }
                return Break(None);
            }
        };
        let mut out = Vec::new();
        // Boxed: handling a command (subscribe, history, presence: database queries) needs a large
        // future, which an idle session need not carry.
        let flow = Box::pin(self.handle_frame(&frame, &mut out)).await;
        self.schedule_expiry();
        // The replies count against the outbound budget while they are written, so the pushes that
        // arrive meanwhile cannot take a whole budget more.
        let bytes: usize = out.iter().map(|l| l.len() + 1).sum();
        self.mailbox.hold(bytes);
        let sent = out.is_empty()
            || send_lines(sink, self.encoding, &out, write_timeout)
                .await
                .is_ok();
        self.mailbox.release(bytes);
        drop(out);
        self.held.clear();
        if !sent {
            return Break(None);
        }
        flow.step()
    }

    /// A hub delivery, with what else waits in the mailbox, written with one flush.
    async fn on_delivery<K>(
        &mut self,
        sink: &mut K,
        delivery: &Delivery,
        write_timeout: Duration,
    ) -> Step
    where
        K: futures_util::Sink<Message, Error = axum::Error> + Unpin,
    {
        let mut out = Vec::new();
        let mut flow = self.deliver(delivery, &mut out);
        while matches!(flow, Flow::Continue) && out.len() < 256 {
            match self.mailbox.try_recv() {
                Some(d) => flow = self.deliver(&d, &mut out),
                None => break,
            }
        }
        written(feed_all(sink, out, write_timeout).await)?;
        flow.step()
    }

    /// Closes the socket: the replies of publishes in flight first on a shutdown, then the close
    /// frame with `close`'s code (none: the connection is already gone).
    async fn finish<K>(&mut self, sink: &mut K, close: Close, write_timeout: Duration)
    where
        K: futures_util::Sink<Message, Error = axum::Error> + Unpin,
    {
        if close
            .as_ref()
            .is_some_and(|(c, _)| *c == Disconnect::SHUTDOWN.code)
            && !self.pending.is_empty()
        {
            // Publishes already handed to their target get their reply before the shutdown close, so
            // the client knows whether they were written (it would otherwise retry with a new id).
            let grace = Duration::from_secs(self.edge.config.shutdown_grace_secs / 2)
                .min(Duration::from_secs(5));
            let drain = async {
                while let Some(reply) = self.pending.next().await {
                    let line = reply.encode(self.encoding);
                    if send_lines(sink, self.encoding, &[line], write_timeout)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(grace, drain).await;
        }
        if let Some((code, reason)) = close {
            tracing::debug!(client = %self.client, code, reason = reason.as_str(), "closing connection");
            let frame = CloseFrame { code, reason };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(Message::Close(Some(frame))),
            )
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    }
}

/// Seconds from now until `expires_at` (at least 1), for `expires`/`ttl` in replies: on the wall
/// clock, as the token's `exp` was checked, since the SDK waits that long before it refreshes.
pub(super) fn ttl(expires_at: Option<u64>) -> Option<u32> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    expires_at.map(|at| u32::try_from(at.saturating_sub(now).max(1)).unwrap_or(u32::MAX))
}

pub(super) fn boxed(raw: &RawValue) -> Box<RawValue> {
    raw.to_owned()
}

pub(super) fn code(d: Disconnect) -> (u16, Utf8Bytes) {
    (d.code, Utf8Bytes::from_static(d.reason))
}

pub(super) fn is_capacity_error(e: axum::Error) -> bool {
    matches!(
        e.into_inner()
            .downcast_ref::<tokio_tungstenite::tungstenite::Error>(),
        Some(tokio_tungstenite::tungstenite::Error::Capacity(_))
    )
}
