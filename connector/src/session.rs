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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, SplitSink};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
use crate::db::history::{self, Bound, StoredPublication};
use crate::hub::{Delivery, Subscriber};
use crate::limits::TokenBucket;
use crate::rules::{self, NamedData};
use crate::state::AppState;

/// WebSocket close code for a message over the size limit (the SDKs treat it as terminal).
const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

/// The error of a command whose reply would not fit in what is left of the connection's outbound
/// byte budget (`client.outbound_queue_bytes`).
/// The error of a command whose large reply would pass the process-wide allowance
/// (`client.replies_in_flight_bytes`): temporary, the SDK retries.
fn replies_busy() -> ReplyError {
    ReplyError::with_message(
        ErrorCode::TooManyRequests,
        "server busy with large replies: retry",
    )
}

fn reply_too_large() -> ReplyError {
    ReplyError::with_message(
        ErrorCode::LimitExceeded,
        "reply too large for the connection's byte budget: ask for fewer publications",
    )
}

/// The position a subscription has delivered up to.
#[derive(Debug)]
struct SubState {
    epoch: String,
    offset: u64,
    /// When the subscription token expires (Unix seconds).
    expires_at: Option<u64>,
    /// Channel info from the subscription token.
    chan_info: Option<Arc<RawValue>>,
    /// The subscription gets join/leave pushes.
    join_leave: bool,
    /// Its membership in the channel's presence (the id [`crate::presence::Presence::leave`] takes).
    membership: Option<String>,
}

/// What the handling of a frame asks the loop to do.
enum Flow {
    Continue,
    Close(Disconnect),
}

/// A session's state.
struct Session {
    state: Arc<AppState>,
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
    subs: HashMap<String, SubState>,
    mailbox: mpsc::Sender<Arc<Delivery>>,
    slow: CancellationToken,
    /// Bytes waiting in the mailbox (shared with the hub, which refuses more than the limit).
    queued: Arc<AtomicUsize>,
    pending: FuturesUnordered<BoxFuture<'static, Reply<'static>>>,
    pong_deadline: Option<Instant>,
    /// Fired by a server-API `disconnect` order (registered at `connect`).
    kick: Option<Arc<crate::presence::Kick>>,
    /// JSON or Protobuf, chosen at the upgrade: every message in and out uses it.
    encoding: Encoding,
}

/// Encoded messages (replies, pushes) waiting to be joined into one frame.
type Out = Vec<Vec<u8>>;

type Sink = SplitSink<WebSocket, Message>;

/// Serves one upgraded WebSocket, from the client at `ip`, in `encoding`, until it closes.
pub async fn serve(
    socket: WebSocket,
    state: Arc<AppState>,
    ip: std::net::IpAddr,
    encoding: Encoding,
) {
    let (mailbox, inbox) = mpsc::channel(state.config.client.outbound_queue);
    let mut session = Session {
        id: state.hub.next_session_id(),
        client: uuid::Uuid::new_v4().to_string(),
        identity: Identity::default(),
        connected: false,
        publish_bucket: TokenBucket::new(
            state.config.client.publish_rate_per_sec,
            state.config.client.publish_burst,
        ),
        subscribe_bucket: TokenBucket::new(
            state.config.client.subscribe_rate_per_sec,
            state.config.client.subscribe_burst,
        ),
        ip: ip.to_string(),
        reply_budget: 0,
        held: Vec::new(),
        next_expiry: None,
        subs: HashMap::new(),
        mailbox,
        slow: CancellationToken::new(),
        queued: Arc::new(AtomicUsize::new(0)),
        pending: FuturesUnordered::new(),
        pong_deadline: None,
        kick: None,
        encoding,
        state,
    };
    session
        .state
        .metrics
        .connections
        .fetch_add(1, Ordering::Relaxed);
    session.run(socket, inbox).await;
    session
        .state
        .metrics
        .connections
        .fetch_sub(1, Ordering::Relaxed);
    // Its memberships leave presence now (join/leave pushes announce it on every node); on shutdown
    // the node removes all of its members at once.
    session
        .state
        .presence
        .end_session(&session.client, session.state.shutdown.is_cancelled())
        .await;
    for channel in session.subs.keys() {
        session.state.hub.unsubscribe(channel, session.id);
    }
}

impl Session {
    async fn run(&mut self, socket: WebSocket, mut inbox: mpsc::Receiver<Arc<Delivery>>) {
        let (mut sink, mut stream) = socket.split();
        let cfg = self.state.config.clone();
        let cfg = &cfg.client;
        let ping_every = Duration::from_secs(cfg.ping_interval_secs);
        let write_timeout = Duration::from_secs(cfg.write_timeout_secs);
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        let connect_deadline = tokio::time::sleep(Duration::from_secs(cfg.connect_timeout_secs));
        tokio::pin!(connect_deadline);
        let shutdown = self.state.shutdown.clone();
        let slow = self.slow.clone();

        let close: Option<(u16, Utf8Bytes)> = loop {
            let pong_deadline = self.pong_deadline;
            let pong_timeout = async move {
                match pong_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
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
            let next_expiry = self.next_expiry;
            let expiry = async move {
                match next_expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Some(code(Disconnect::SHUTDOWN)),
                _ = slow.cancelled() => break Some(code(Disconnect::SLOW)),
                (kick_code, reason) = kicked => break Some((kick_code, Utf8Bytes::from(reason))),
                _ = &mut connect_deadline, if !self.connected => break Some(code(Disconnect::STALE)),
                _ = pong_timeout => break Some(code(Disconnect::NO_PONG)),
                _ = expiry => {
                    let mut out = Vec::new();
                    let flow = self.expire(&mut out);
                    if !out.is_empty() && send_lines(&mut sink, self.encoding, &out, write_timeout).await.is_err() {
                        break None;
                    }
                    if let Flow::Close(d) = flow {
                        break Some(code(d));
                    }
                }
                Some(reply) = self.pending.next(), if !self.pending.is_empty() => {
                    let line = reply.encode(self.encoding);
                    if send_lines(&mut sink, self.encoding, &[line], write_timeout).await.is_err() {
                        break None;
                    }
                }
                _ = ping.tick() => {
                    if send_lines(&mut sink, self.encoding, &[self.encoding.ping()], write_timeout).await.is_err() {
                        break None;
                    }
                    if self.connected && self.pong_deadline.is_none() {
                        self.pong_deadline = Some(Instant::now() + Duration::from_secs(cfg.pong_timeout_secs));
                    }
                }
                message = stream.next() => match message {
                    Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                        // JSON comes in text frames, Protobuf in binary ones.
                        let frame: Bytes = match (self.encoding, message) {
                            (Encoding::Json, Message::Text(text)) => Bytes::from(text),
                            (Encoding::Protobuf, Message::Binary(bytes)) => bytes,
                            _ => break Some(code(Disconnect::INAPPROPRIATE_PROTOCOL)),
                        };
                        let mut out = Vec::new();
                        // Boxed: handling a command (subscribe, history, presence: database
                        // queries) needs a large future, which an idle session need not carry.
                        let flow = Box::pin(self.handle_frame(&frame, &mut out)).await;
                        self.schedule_expiry();
                        // The replies count against the outbound budget while they are written, so
                        // the pushes that arrive meanwhile cannot take a whole budget more.
                        let bytes: usize = out.iter().map(|l| l.len() + 1).sum();
                        self.queued.fetch_add(bytes, Ordering::Relaxed);
                        let sent = out.is_empty() || send_lines(&mut sink, self.encoding, &out, write_timeout).await.is_ok();
                        self.queued.fetch_sub(bytes, Ordering::Relaxed);
                        drop(out);
                        self.held.clear();
                        if !sent {
                            break None;
                        }
                        if let Flow::Close(d) = flow {
                            break Some(code(d));
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if is_capacity_error(e) {
                            break Some((CLOSE_MESSAGE_TOO_BIG, Utf8Bytes::from_static("message size limit")));
                        }
                        break None;
                    }
                },
                Some(delivery) = inbox.recv() => {
                    let mut out = Vec::new();
                    let mut flow = self.deliver(&delivery, &mut out);
                    // Drain what else is waiting, to write it with one flush.
                    while matches!(flow, Flow::Continue) && out.len() < 256 {
                        match inbox.try_recv() {
                            Ok(d) => flow = self.deliver(&d, &mut out),
                            Err(_) => break,
                        }
                    }
                    if feed_all(&mut sink, out, write_timeout).await.is_err() {
                        break None;
                    }
                    if let Flow::Close(d) = flow {
                        break Some(code(d));
                    }
                }
            }
        };
        if close
            .as_ref()
            .is_some_and(|(c, _)| *c == Disconnect::SHUTDOWN.code)
            && !self.pending.is_empty()
        {
            // Publishes already handed to their target get their reply before the shutdown close, so
            // the client knows whether they were written (it would otherwise retry with a new id).
            let grace = Duration::from_secs(self.state.config.shutdown_grace_secs / 2)
                .min(Duration::from_secs(5));
            let drain = async {
                while let Some(reply) = self.pending.next().await {
                    let line = reply.encode(self.encoding);
                    if send_lines(&mut sink, self.encoding, &[line], write_timeout)
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

    /// Handles every command of a frame, in order, appending replies to `out`.
    async fn handle_frame(&mut self, frame: &[u8], out: &mut Out) -> Flow {
        let split: Result<Vec<&[u8]>, CommandError> = match self.encoding {
            // A text frame: valid UTF-8 (the WebSocket layer checked it).
            Encoding::Json => std::str::from_utf8(frame)
                .map_err(|_| CommandError::EmptyLine)
                .and_then(Command::split_frame)
                .map(|lines| lines.into_iter().map(str::as_bytes).collect()),
            Encoding::Protobuf => pb::split_frame(frame),
        };
        let Ok(lines) = split else {
            return Flow::Close(Disconnect::BAD_REQUEST);
        };
        // A frame holds at most a connect and a subscribe per allowed channel, plus some slack: this
        // bounds the work and the replies buffered for one frame.
        if lines.len() > self.state.config.client.max_channels_per_connection + 32 {
            return Flow::Close(Disconnect::BAD_REQUEST);
        }
        // The replies of this frame may take what the pushes waiting leave of the outbound budget,
        // less an eighth kept for the pushes that arrive while they are written.
        let budget = self.state.config.client.outbound_queue_bytes;
        self.reply_budget =
            (budget - budget / 8).saturating_sub(self.queued.load(Ordering::Relaxed));
        for line in lines {
            let parsed = match self.encoding {
                Encoding::Json => std::str::from_utf8(line)
                    .map_err(|_| CommandError::EmptyLine)
                    .and_then(Command::parse),
                Encoding::Protobuf => Command::parse_protobuf(line),
            };
            let command = match parsed {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(client = %self.client, error = %e, "bad command");
                    return Flow::Close(Disconnect::BAD_REQUEST);
                }
            };
            match command {
                Command::Pong => self.pong_deadline = None,
                Command::Send(_) => {}
                Command::Request { id, request } => {
                    let before = out.len();
                    let flow = self.handle_request(id, request, out).await;
                    let used: usize = out[before..].iter().map(|l| l.len() + 1).sum();
                    self.reply_budget = self.reply_budget.saturating_sub(used);
                    if let Flow::Close(d) = flow {
                        return Flow::Close(d);
                    }
                }
            }
        }
        Flow::Continue
    }

    async fn handle_request(&mut self, id: u32, request: Request, out: &mut Out) -> Flow {
        if !self.connected {
            return match request {
                Request::Connect(c) => self.connect(id, c, out).await,
                _ => Flow::Close(Disconnect::BAD_REQUEST),
            };
        }
        match request {
            Request::Refresh(r) => return self.refresh(id, r, out).await,
            Request::SubRefresh(r) => return self.sub_refresh(id, r, out).await,
            _ => {}
        }
        // Each handler encodes its reply itself (a subscribe or history result borrows the rows it
        // read), in the connection's encoding.
        let result = match request {
            Request::Connect(_) => return Flow::Close(Disconnect::BAD_REQUEST),
            Request::Subscribe(s) => match self.subscribe(id, s).await {
                Err(SubscribeError::Close(d)) => return Flow::Close(d),
                Err(SubscribeError::Reply(e)) => Err(e),
                Ok(encoded) => Ok(encoded),
            },
            Request::Unsubscribe(u) => Ok(self.unsubscribe(id, u).await),
            Request::Publish(p) => match self.publish(id, p) {
                Ok(()) => return Flow::Continue,
                Err(e) => Err(e),
            },
            Request::History(h) => self.history(id, h).await,
            Request::Presence(r) => self.presence(id, r, false).await,
            Request::PresenceStats(r) => self.presence(id, r, true).await,
            Request::Ping | Request::Refresh(_) | Request::SubRefresh(_) => {
                Err(ErrorCode::NotAvailable.into())
            }
            Request::Rpc(_) => Err(ErrorCode::MethodNotFound.into()),
            Request::Invalid { reason, .. } => {
                Err(ReplyError::with_message(ErrorCode::BadRequest, reason))
            }
        };
        match result {
            Ok(encoded) => out.push(encoded),
            Err(e) => out.push(self.encode(&Reply::error(id, e))),
        }
        Flow::Continue
    }

    /// The reply in the connection's encoding.
    fn encode(&self, reply: &Reply<'_>) -> Vec<u8> {
        reply.encode(self.encoding)
    }

    /// Appends an error reply.
    fn error(&self, id: u32, error: impl Into<ReplyError>, out: &mut Out) {
        out.push(self.encode(&Reply::error(id, error.into())));
    }

    async fn connect(&mut self, id: u32, request: ConnectRequest, out: &mut Out) -> Flow {
        match auth::connect(&self.state.config, &self.state.verifier, &request.token).await {
            Ok(identity) => {
                let ttl = ttl(identity.expires_at);
                self.identity = identity;
                self.connected = true;
                self.kick = Some(
                    self.state
                        .presence
                        .register_session(&self.client, &self.identity.user),
                );
                let result = ConnectResult {
                    client: self.client.clone(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ping: u32::try_from(self.state.config.client.ping_interval_secs)
                        .unwrap_or(u32::MAX),
                    pong: true,
                    expires: ttl.is_some(),
                    ttl,
                };
                out.push(self.encode(&Reply::new(id, ReplyBody::Connect(result))));
                Flow::Continue
            }
            // The SDK fetches a new token and reconnects; the connection stays unauthenticated.
            Err(ConnectError::Expired) => {
                self.error(id, ErrorCode::TokenExpired, out);
                Flow::Continue
            }
            // JWKS unreachable: temporary, the SDK reconnects with backoff.
            Err(ConnectError::Unavailable) => {
                self.error(id, ErrorCode::Internal, out);
                Flow::Continue
            }
            Err(ConnectError::Disconnect(d)) => Flow::Close(d),
        }
    }

    /// `refresh`: a new connection token for the same user extends the connection.
    async fn refresh(&mut self, id: u32, request: RefreshRequest, out: &mut Out) -> Flow {
        match auth::refresh(&self.state.verifier, &self.identity.user, &request.token).await {
            Ok(expires_at) => {
                self.identity.expires_at = expires_at;
                let ttl = ttl(expires_at);
                let result = RefreshResult {
                    client: self.client.clone(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    expires: ttl.is_some(),
                    ttl,
                };
                out.push(self.encode(&Reply::new(id, ReplyBody::Refresh(result))));
                Flow::Continue
            }
            Err(ConnectError::Expired) => Flow::Close(auth::CONNECTION_EXPIRED),
            Err(ConnectError::Unavailable) => {
                self.error(id, ErrorCode::Internal, out);
                Flow::Continue
            }
            Err(ConnectError::Disconnect(d)) => Flow::Close(d),
        }
    }

    /// `sub_refresh`: a new subscription token extends a subscription.
    async fn sub_refresh(&mut self, id: u32, request: SubRefreshRequest, out: &mut Out) -> Flow {
        if request.channel.is_empty() {
            return Flow::Close(Disconnect::BAD_REQUEST);
        }
        if !self.subs.contains_key(&request.channel) {
            self.error(id, ErrorCode::PermissionDenied, out);
            return Flow::Continue;
        }
        match auth::subscription(
            &self.state.verifier,
            &request.token,
            &request.channel,
            &self.identity.user,
            &self.client,
        )
        .await
        {
            Ok(grant) => {
                if let Some(sub) = self.subs.get_mut(&request.channel) {
                    sub.expires_at = grant.expires_at;
                    sub.chan_info = grant.chan_info;
                }
                let ttl = ttl(grant.expires_at);
                let result = SubRefreshResult {
                    expires: ttl.is_some(),
                    ttl,
                };
                out.push(self.encode(&Reply::new(id, ReplyBody::SubRefresh(result))));
                Flow::Continue
            }
            Err(SubscriptionError::Expired) => {
                self.error(id, ErrorCode::TokenExpired, out);
                Flow::Continue
            }
            Err(SubscriptionError::Unavailable) => {
                self.error(id, ErrorCode::Internal, out);
                Flow::Continue
            }
            Err(SubscriptionError::Invalid | SubscriptionError::Mismatch) => {
                Flow::Close(Disconnect::INVALID_TOKEN)
            }
        }
    }

    /// Whether this connection may do `op` on `channel` by the configured permissions.
    fn allowed(&self, channel: &str, op: Op) -> bool {
        auth::permissions::allowed(
            &self.state.config.channels,
            channel,
            op,
            &self.identity,
            self.subs.contains_key(channel),
        )
    }

    /// Acts on expired tokens: closes an expired connection (3005), ends expired subscriptions (2501).
    fn expire(&mut self, out: &mut Out) -> Flow {
        let now = unix_now();
        let delay = self.state.config.auth.expired_close_delay_secs;
        let overdue = |at: Option<u64>| at.is_some_and(|at| at.saturating_add(delay) <= now);
        if overdue(self.identity.expires_at) {
            return Flow::Close(auth::CONNECTION_EXPIRED);
        }
        let expired: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| overdue(s.expires_at))
            .map(|(c, _)| c.clone())
            .collect();
        for channel in expired {
            if let Some(sub) = self.subs.remove(&channel) {
                self.leave_later(&channel, sub);
            }
            self.state.hub.unsubscribe(&channel, self.id);
            out.push(
                Push::Unsubscribe {
                    channel: &channel,
                    code: 2501,
                    reason: "subscription expired",
                }
                .encode(self.encoding),
            );
        }
        self.schedule_expiry();
        Flow::Continue
    }

    /// Recomputes when the next token expiry is due.
    fn schedule_expiry(&mut self) {
        let delay = self.state.config.auth.expired_close_delay_secs;
        let earliest = self
            .subs
            .values()
            .filter_map(|s| s.expires_at)
            .chain(self.identity.expires_at)
            .min();
        self.next_expiry = earliest.map(|at| {
            let due = at.saturating_add(delay).saturating_sub(unix_now());
            // Whole seconds: a token expiring at second N is acted on just after N.
            Instant::now() + Duration::from_secs(due) + Duration::from_millis(50)
        });
    }

    async fn subscribe(
        &mut self,
        id: u32,
        req: SubscribeRequest,
    ) -> Result<Vec<u8>, SubscribeError> {
        let channel = req.channel.clone();
        validate_channel(&channel)
            .map_err(|e| ReplyError::with_message(ErrorCode::BadRequest, e.to_string()))?;
        if self.subs.contains_key(&channel) {
            return Err(ReplyError::from(ErrorCode::AlreadySubscribed).into());
        }
        if !self.subscribe_bucket.try_take(std::time::Instant::now()) {
            return Err(ReplyError::with_message(
                ErrorCode::TooManyRequests,
                "subscribe rate limit",
            )
            .into());
        }
        let cfg = &self.state.config.client;
        if self.subs.len() >= cfg.max_channels_per_connection {
            return Err(ReplyError::from(ErrorCode::LimitExceeded).into());
        }
        // A subscription token is the application's explicit grant; without one, the permissions.
        let grant = if req.token.is_empty() {
            if !self.allowed(&channel, Op::Subscribe) {
                return Err(ReplyError::from(ErrorCode::PermissionDenied).into());
            }
            auth::SubscriptionGrant::default()
        } else {
            match auth::subscription(
                &self.state.verifier,
                &req.token,
                &channel,
                &self.identity.user,
                &self.client,
            )
            .await
            {
                Ok(grant) => grant,
                Err(SubscriptionError::Expired) => {
                    return Err(ReplyError::from(ErrorCode::TokenExpired).into());
                }
                Err(SubscriptionError::Invalid) => {
                    return Err(ReplyError::from(ErrorCode::PermissionDenied).into());
                }
                Err(SubscriptionError::Mismatch) => {
                    return Err(SubscribeError::Close(Disconnect::INVALID_TOKEN));
                }
                Err(SubscriptionError::Unavailable) => {
                    return Err(ReplyError::from(ErrorCode::Internal).into());
                }
            }
        };
        // Register before reading, so nothing committed after the read can be missed; what arrives
        // twice is dropped by offset in `deliver`.
        self.state.hub.subscribe(
            &channel,
            self.id,
            Subscriber {
                mailbox: self.mailbox.clone(),
                slow: self.slow.clone(),
                queued: self.queued.clone(),
                max_bytes: self.state.config.client.outbound_queue_bytes,
                encoding: self.encoding,
            },
        );
        let limit = if req.recover {
            cfg.recovery_max_publications.saturating_add(1)
        } else {
            0
        };
        // A recovery is bounded by the reply budget, not by a count: the publications it would
        // return must fit in what is left of the connection's outbound budget.
        let slice = match history::read(
            &self.state.pool,
            &channel,
            Bound::After(req.offset),
            limit,
            self.reply_budget,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                self.state.hub.unsubscribe(&channel, self.id);
                tracing::warn!(error = %e, channel, "subscribe read failed");
                return Err(ReplyError::from(ErrorCode::Internal).into());
            }
        };
        if slice.bytes > 0 {
            match self.state.limits.reserve_reply(slice.bytes) {
                Some(permit) => self.held.push(permit),
                None => {
                    self.state.hub.unsubscribe(&channel, self.id);
                    return Err(replies_busy().into());
                }
            }
        }
        let mut recovered = false;
        let mut publications: Vec<&StoredPublication> = Vec::new();
        if req.recover {
            let epoch_ok = req.epoch.is_empty() || req.epoch == slice.epoch;
            let missed = slice.top.saturating_sub(req.offset);
            let complete = req.offset <= slice.top
                && !slice.overflow
                && slice.publications.len() as u64 == missed
                && slice
                    .publications
                    .first()
                    .is_none_or(|p| p.offset == req.offset + 1)
                && slice
                    .publications
                    .last()
                    .is_none_or(|p| p.offset == slice.top);
            recovered = epoch_ok && complete;
            if slice.overflow {
                self.reply_budget = 0;
            }
            if recovered {
                publications = slice.publications.iter().collect();
            }
            self.state.metrics.record_recovery(recovered);
            if !recovered && req.flag & 2 != 0 {
                self.state.hub.unsubscribe(&channel, self.id);
                return Err(ReplyError::from(ErrorCode::UnrecoverablePosition).into());
            }
        }
        let delivered = publications
            .last()
            .map_or(if recovered { req.offset } else { slice.top }, |p| p.offset);
        let result = SubscribeResult {
            recoverable: true,
            positioned: true,
            epoch: &slice.epoch,
            offset: if recovered { req.offset } else { slice.top },
            was_recovering: req.recover,
            recovered,
            publications: publications
                .iter()
                .map(|p| Publication {
                    data: &p.data,
                    offset: p.offset,
                    info: p.info.as_deref(),
                })
                .collect(),
            expires: grant.expires_at.is_some(),
            ttl: ttl(grant.expires_at),
        };
        let body = self.encode(&Reply::new(id, ReplyBody::Subscribe(result)));
        // Presence: the subscription becomes a member before the reply, so a `presence` call that
        // follows it sees the subscriber; its join push (to those who asked) follows the reply.
        let mut join_leave = false;
        let mut membership = None;
        if let Some(rule) = self.state.presence.rule_for(&channel).cloned() {
            let chan_info = match (&grant.chan_info, &req.data) {
                (Some(info), _) => Some(info.clone()),
                (None, Some(data)) if rule.info_from_subscribe_data && req.token.is_empty() => {
                    if data.get().len() > 1024 || !data.get().starts_with('{') {
                        self.state.hub.unsubscribe(&channel, self.id);
                        return Err(ReplyError::with_message(
                            ErrorCode::BadRequest,
                            "subscribe data must be a JSON object of at most 1024 bytes",
                        )
                        .into());
                    }
                    Some(Arc::from(data.clone()))
                }
                _ => None,
            };
            let member = crate::presence::Member {
                user: self.identity.user.clone(),
                client: self.client.clone(),
                conn_info: self.identity.conn_info.clone(),
                chan_info,
            };
            match self
                .state
                .presence
                .join(&channel, member, rule.join_leave)
                .await
            {
                Ok(id) => membership = Some(id),
                Err(e) => {
                    self.state.hub.unsubscribe(&channel, self.id);
                    return Err(match e {
                        crate::presence::JoinError::Full => ReplyError::with_message(
                            ErrorCode::LimitExceeded,
                            "channel presence is full (max_members)",
                        ),
                        crate::presence::JoinError::Store(e) => {
                            tracing::warn!(error = %e, channel, "presence join failed");
                            ReplyError::new(ErrorCode::Internal)
                        }
                    }
                    .into());
                }
            }
            // Pushes only to subscribers that may see presence, as Centrifugo does.
            join_leave = req.join_leave
                && rule.join_leave
                && auth::permissions::allowed(
                    &self.state.config.channels,
                    &channel,
                    Op::Presence,
                    &self.identity,
                    true,
                );
        }
        self.subs.insert(
            channel,
            SubState {
                epoch: slice.epoch.clone(),
                offset: delivered,
                expires_at: grant.expires_at,
                chan_info: grant.chan_info,
                join_leave,
                membership,
            },
        );
        Ok(body)
    }

    async fn unsubscribe(&mut self, id: u32, req: ChannelRequest) -> Vec<u8> {
        // Never refused (the SDKs reconnect on an unsubscribe error), but it spends a subscribe
        // token: a subscribe/unsubscribe loop runs at the subscribe rate.
        self.subscribe_bucket.take_forced(std::time::Instant::now());
        if let Some(sub) = self.subs.remove(&req.channel) {
            self.state.hub.unsubscribe(&req.channel, self.id);
            if let Some(id) = sub.membership {
                self.state
                    .presence
                    .leave(&req.channel, &self.client, &id)
                    .await;
            }
        }
        self.encode(&Reply::new(id, ReplyBody::Unsubscribe))
    }

    /// Removes a subscription's presence membership without waiting (from code that cannot wait);
    /// a later membership of the same channel is never touched by it.
    fn leave_later(&self, channel: &str, sub: SubState) {
        let Some(id) = sub.membership else {
            return;
        };
        let state = self.state.clone();
        let channel = channel.to_owned();
        let client = self.client.clone();
        self.state.tracker.spawn(async move {
            state.presence.leave(&channel, &client, &id).await;
        });
    }

    /// `presence` / `presence_stats`: the channel's members on every node.
    async fn presence(
        &mut self,
        id: u32,
        req: ChannelRequest,
        stats: bool,
    ) -> Result<Vec<u8>, ReplyError> {
        validate_channel(&req.channel)
            .map_err(|e| ReplyError::with_message(ErrorCode::BadRequest, e.to_string()))?;
        if !self.allowed(&req.channel, Op::Presence) {
            return Err(ErrorCode::PermissionDenied.into());
        }
        if self.state.presence.rule_for(&req.channel).is_none() {
            return Err(ErrorCode::NotAvailable.into());
        }
        let failed = |e: crate::Error| {
            tracing::warn!(error = %e, "presence read failed");
            ReplyError::new(ErrorCode::Internal)
        };
        if stats {
            let (clients, users) = crate::presence::stats(&self.state, &req.channel)
                .await
                .map_err(failed)?;
            let result = reply::PresenceStatsResult {
                num_clients: u32::try_from(clients).unwrap_or(u32::MAX),
                num_users: u32::try_from(users).unwrap_or(u32::MAX),
            };
            return Ok(self.encode(&Reply::new(id, ReplyBody::PresenceStats(result))));
        }
        let members = crate::presence::members(&self.state, &req.channel)
            .await
            .map_err(failed)?;
        let mut presence = reply::PresenceResult::default();
        let mut bytes = 0usize;
        for m in members {
            let info = m.client_info();
            bytes += m.client.len() + info_len(&info) + 8;
            if bytes > self.reply_budget {
                return Err(reply_too_large());
            }
            presence.presence.push(info);
        }
        self.held.push(
            self.state
                .limits
                .reserve_reply(bytes)
                .ok_or_else(replies_busy)?,
        );
        Ok(self.encode(&Reply::new(id, ReplyBody::Presence(presence))))
    }

    /// Starts a publish; its reply is written when the target or the database answered.
    fn publish(&mut self, id: u32, req: PublishRequest) -> Result<(), ReplyError> {
        validate_channel(&req.channel)
            .map_err(|e| ReplyError::with_message(ErrorCode::BadRequest, e.to_string()))?;
        let now = std::time::Instant::now();
        if !self.publish_bucket.try_take(now) {
            return Err(ReplyError::with_message(
                ErrorCode::TooManyRequests,
                "publish rate limit",
            ));
        }
        // Across connections: a new connection is not a new allowance.
        if !self.state.limits.publish_per_ip.try_take(&self.ip, now) {
            return Err(ReplyError::with_message(
                ErrorCode::TooManyRequests,
                "publish rate limit (client IP)",
            ));
        }
        if !self.identity.user.is_empty()
            && !self
                .state
                .limits
                .publish_per_user
                .try_take(&self.identity.user, now)
        {
            return Err(ReplyError::with_message(
                ErrorCode::TooManyRequests,
                "publish rate limit (user)",
            ));
        }
        if self.pending.len() >= self.state.config.client.max_pending_publishes {
            return Err(ErrorCode::TooManyRequests.into());
        }
        if self.state.config.is_table_channel(&req.channel)
            || !self.allowed(&req.channel, Op::Publish)
        {
            return Err(ErrorCode::PermissionDenied.into());
        }
        let state = self.state.clone();
        let sender = if self.identity.user.is_empty() {
            self.client.clone()
        } else {
            self.identity.user.clone()
        };
        let connection = self.client.clone();
        if let Some(rule) = state.config.rule_for(&req.channel).cloned() {
            let named: NamedData<'_> = serde_json::from_str(req.data.get()).map_err(|_| {
                ReplyError::with_message(
                    ErrorCode::BadRequest,
                    "publication data must be {\"name\": string, \"data\": any}",
                )
            })?;
            let name = named.name;
            self.pending.push(Box::pin(async move {
                let data = req.data;
                let named = NamedData {
                    name,
                    data: serde_json::from_str::<NamedData<'_>>(data.get())
                        .ok()
                        .and_then(|n| n.data),
                };
                let message_id = uuid::Uuid::new_v4().to_string();
                let envelope =
                    rules::envelope(&req.channel, &sender, &connection, &named, message_id);
                match rules::deliver_limited(
                    &state.limits.targets,
                    &state.http,
                    &state.lambda,
                    &rule,
                    &envelope,
                )
                .await
                {
                    Ok(()) => {
                        state
                            .metrics
                            .publications_in
                            .fetch_add(1, Ordering::Relaxed);
                        Reply::new(id, ReplyBody::Publish)
                    }
                    // A per-message refusal of the target is the publisher's error reply, with
                    // the target's reason (codes 420-422).
                    Err(rules::TargetError::Refused(r)) => {
                        tracing::info!(channel = %req.channel, status = r.status.as_str(), reason = %r.reason, "publish refused by the target");
                        Reply::error(id, r.reply_error())
                    }
                    Err(e) => {
                        tracing::warn!(channel = %req.channel, error = %e, "publish target failed");
                        let err = match e {
                            rules::TargetError::Refused(r) => r.reply_error(),
                            rules::TargetError::Unreachable(_) => ReplyError::with_message(
                                ErrorCode::Internal,
                                "publish target unavailable",
                            ),
                            rules::TargetError::Failed(_) => ReplyError::with_message(
                                ErrorCode::Internal,
                                "publish target failed",
                            ),
                            rules::TargetError::Busy(_) => ReplyError::with_message(
                                ErrorCode::TooManyRequests,
                                "publish target busy",
                            ),
                        };
                        Reply::error(id, err)
                    }
                }
            }));
            return Ok(());
        }
        if !state.config.client.allow_publish {
            return Err(ErrorCode::PermissionDenied.into());
        }
        let info = serde_json::to_string(&ClientInfo {
            user: self.identity.user.clone(),
            client: self.client.clone(),
            conn_info: self.identity.conn_info.as_deref().map(boxed),
            chan_info: self
                .subs
                .get(&req.channel)
                .and_then(|s| s.chan_info.as_deref())
                .map(boxed),
        })
        .map_err(|_| ReplyError::new(ErrorCode::Internal))?;
        self.pending.push(Box::pin(async move {
            let info = RawValue::from_string(info).unwrap_or_else(|_| RawValue::NULL.to_owned());
            match history::publish(&state.pool, &req.channel, &req.data, &info).await {
                Ok(()) => {
                    state
                        .metrics
                        .publications_in
                        .fetch_add(1, Ordering::Relaxed);
                    Reply::new(id, ReplyBody::Publish)
                }
                Err(e) => {
                    tracing::warn!(channel = %req.channel, error = %e, "publish failed");
                    Reply::error(id, ReplyError::new(ErrorCode::Internal))
                }
            }
        }));
        Ok(())
    }

    async fn history(&mut self, id: u32, req: HistoryRequest) -> Result<Vec<u8>, ReplyError> {
        validate_channel(&req.channel)
            .map_err(|e| ReplyError::with_message(ErrorCode::BadRequest, e.to_string()))?;
        if !self.allowed(&req.channel, Op::History) {
            return Err(ErrorCode::PermissionDenied.into());
        }
        let max = self.state.config.client.history_max_limit;
        let limit = match req.limit {
            0 => 0,
            n if n < 0 => max,
            n => u32::try_from(n).unwrap_or(u32::MAX).min(max),
        };
        if limit > 0 && self.reply_budget == 0 {
            return Err(reply_too_large());
        }
        let bound = match (&req.since, req.reverse) {
            (Some(since), true) if since.offset == 0 => {
                return Err(ReplyError::with_message(
                    ErrorCode::BadRequest,
                    "reverse history needs since.offset > 0",
                ));
            }
            (Some(since), true) => Bound::Before(since.offset),
            (Some(since), false) => Bound::After(since.offset),
            (None, true) => Bound::Before(u64::MAX),
            (None, false) => Bound::After(0),
        };
        let slice = history::read(
            &self.state.pool,
            &req.channel,
            bound,
            limit,
            self.reply_budget,
        )
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "history read failed");
            ReplyError::new(ErrorCode::Internal)
        })?;
        if slice.overflow {
            // The attempt used up the frame's budget: the frame's other large replies are refused
            // without reading (the database is never asked for more than the budget per frame).
            self.reply_budget = 0;
            return Err(reply_too_large());
        }
        self.held.push(
            self.state
                .limits
                .reserve_reply(slice.bytes)
                .ok_or_else(replies_busy)?,
        );
        if let Some(since) = &req.since
            && !since.epoch.is_empty()
            && since.epoch != slice.epoch
        {
            return Err(ErrorCode::UnrecoverablePosition.into());
        }
        let result = HistoryResult {
            publications: slice
                .publications
                .iter()
                .map(|p| Publication {
                    data: &p.data,
                    offset: p.offset,
                    info: p.info.as_deref(),
                })
                .collect(),
            epoch: &slice.epoch,
            offset: slice.top,
        };
        Ok(self.encode(&Reply::new(id, ReplyBody::History(result))))
    }

    /// Passes a hub publication on if it is the next one of a subscription.
    fn deliver(&mut self, delivery: &Delivery, out: &mut Vec<Message>) -> Flow {
        self.queued
            .fetch_sub(delivery.frame_len(self.encoding), Ordering::Relaxed);
        let Some(sub) = self.subs.get_mut(&*delivery.channel) else {
            return Flow::Continue; // unsubscribed meanwhile, or its subscribe has not been answered
        };
        if delivery.offset == 0 {
            // A join or leave push, not a publication.
            if sub.join_leave
                && let Some(frame) = frame(delivery, self.encoding)
            {
                out.push(frame);
            }
            return Flow::Continue;
        }
        if sub.epoch.is_empty() && sub.offset == 0 {
            sub.epoch = delivery.epoch.to_string();
        }
        if *delivery.epoch != *sub.epoch {
            return self.insufficient_state(&delivery.channel.clone(), out);
        }
        if delivery.offset <= sub.offset {
            return Flow::Continue; // already in the subscribe reply
        }
        if delivery.offset != sub.offset + 1 {
            return self.insufficient_state(&delivery.channel.clone(), out);
        }
        sub.offset = delivery.offset;
        if let Some(frame) = frame(delivery, self.encoding) {
            out.push(frame);
        }
        self.state
            .metrics
            .publications_out
            .fetch_add(1, Ordering::Relaxed);
        Flow::Continue
    }

    /// The subscription lost track of its stream: tell the client to resubscribe and recover.
    fn insufficient_state(&mut self, channel: &str, out: &mut Vec<Message>) -> Flow {
        tracing::warn!(client = %self.client, channel, "gap in a channel stream; client told to recover");
        if let Some(sub) = self.subs.remove(channel) {
            self.leave_later(channel, sub);
        }
        self.state.hub.unsubscribe(channel, self.id);
        let push = Push::Unsubscribe {
            channel,
            code: 2500,
            reason: "insufficient state",
        }
        .encode(self.encoding);
        out.push(message(self.encoding, push));
        Flow::Continue
    }
}

/// A subscribe that fails: an error reply, or (a token for another channel, user or connection) a
/// disconnect.
enum SubscribeError {
    Reply(ReplyError),
    Close(Disconnect),
}

impl From<ReplyError> for SubscribeError {
    fn from(e: ReplyError) -> Self {
        Self::Reply(e)
    }
}

/// Seconds from now until `expires_at` (at least 1), for `expires`/`ttl` in replies.
fn ttl(expires_at: Option<u64>) -> Option<u32> {
    expires_at.map(|at| u32::try_from(at.saturating_sub(unix_now()).max(1)).unwrap_or(u32::MAX))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn boxed(raw: &RawValue) -> Box<RawValue> {
    raw.to_owned()
}

fn code(d: Disconnect) -> (u16, Utf8Bytes) {
    (d.code, Utf8Bytes::from_static(d.reason))
}

fn is_capacity_error(e: axum::Error) -> bool {
    matches!(
        e.into_inner()
            .downcast_ref::<tokio_tungstenite::tungstenite::Error>(),
        Some(tokio_tungstenite::tungstenite::Error::Capacity(_))
    )
}

/// The frame of a hub delivery in `encoding` (the hub encoded it for every encoding its
/// subscribers use, so it is there).
fn frame(delivery: &Delivery, encoding: Encoding) -> Option<Message> {
    match encoding {
        Encoding::Json => delivery.json.clone().map(Message::Text),
        Encoding::Protobuf => delivery.protobuf.clone().map(Message::Binary),
    }
}

/// Encoded messages joined into one WebSocket message: a text frame of JSON lines, or a binary
/// frame of length-delimited Protobuf messages.
fn message(encoding: Encoding, messages: Vec<u8>) -> Message {
    match encoding {
        Encoding::Json => match String::from_utf8(messages) {
            Ok(text) => Message::Text(Utf8Bytes::from(text)),
            // The JSON encoders produce UTF-8 only.
            Err(_) => Message::Text(Utf8Bytes::from_static(reply::PING)),
        },
        Encoding::Protobuf => Message::Binary(Bytes::from(messages)),
    }
}

/// The length of a `ClientInfo`'s JSON, for the reply budget of a presence reply.
fn info_len(info: &ClientInfo) -> usize {
    serde_json::to_string(info).map_or(0, |j| j.len())
}

/// Writes replies as one frame. A socket that does not take the bytes within `limit` is a dead or
/// stalled peer: the write fails and the session ends (its mailbox stays bounded meanwhile).
async fn send_lines<B: AsRef<[u8]>>(
    sink: &mut Sink,
    encoding: Encoding,
    lines: &[B],
    limit: Duration,
) -> Result<(), axum::Error> {
    let frame = message(encoding, encoding.join(lines));
    match tokio::time::timeout(limit, sink.send(frame)).await {
        Ok(r) => r,
        Err(_) => Err(axum::Error::new(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        ))),
    }
}

/// Writes pushes (one frame each, shared bytes) with a single flush, within `limit`.
async fn feed_all(
    sink: &mut Sink,
    frames: Vec<Message>,
    limit: Duration,
) -> Result<(), axum::Error> {
    if frames.is_empty() {
        return Ok(());
    }
    let write = async {
        for frame in frames {
            sink.feed(frame).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r,
        Err(_) => Err(axum::Error::new(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        ))),
    }
}
