//! The handlers of the requests: parse, authorize, act, encode the typed reply once.

#[allow(clippy::wildcard_imports)]
use super::*;

use crate::node::{HistoryQuery, Publisher};
use crate::presence::Member;

impl Session {
    /// Handles every command of a frame, in order, appending replies to `out`.
    pub(super) async fn handle_frame(&mut self, frame: &[u8], out: &mut Out) -> Flow {
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
        if lines.len() > self.edge.config.client.max_channels_per_connection + 32 {
            return Flow::Close(Disconnect::BAD_REQUEST);
        }
        // The replies of this frame may take what the pushes waiting leave of the outbound budget,
        // less an eighth kept for the pushes that arrive while they are written.
        let budget = self.edge.config.client.outbound_queue_bytes;
        self.reply_budget = (budget - budget / 8).saturating_sub(self.mailbox.queued());
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

    pub(super) async fn handle_request(
        &mut self,
        id: u32,
        request: Request,
        out: &mut Out,
    ) -> Flow {
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
                Err(NodeError::Disconnect(d)) => return Flow::Close(d),
                Err(NodeError::Reply(e)) => Err(e),
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
            Request::Rpc(r) => match self.rpc(id, r) {
                Ok(()) => return Flow::Continue,
                Err(e) => Err(e),
            },
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
    pub(super) fn encode(&self, reply: &Reply<'_>) -> Vec<u8> {
        reply.encode(self.encoding)
    }

    /// Appends an error reply.
    pub(super) fn error(&self, id: u32, error: impl Into<ReplyError>, out: &mut Out) {
        out.push(self.encode(&Reply::error(id, error.into())));
    }

    pub(super) async fn unsubscribe(&mut self, id: u32, req: ChannelRequest) -> Vec<u8> {
        // Never refused (the SDKs reconnect on an unsubscribe error), but it spends a subscribe
        // token: a subscribe/unsubscribe loop runs at the subscribe rate.
        self.subscribe_bucket.take_forced(std::time::Instant::now());
        if let Some(sub) = self.subs.remove(&req.channel) {
            self.edge.node.remove_subscriber(&req.channel, self.id);
            if let Some(id) = sub.membership {
                self.node().leave(&req.channel, &self.client, &id).await;
            }
        }
        self.encode(&Reply::new(id, ReplyBody::Unsubscribe))
    }

    /// Removes a subscription's presence membership without waiting (from code that cannot wait);
    /// a later membership of the same channel is never touched by it.
    pub(super) fn leave_later(&self, channel: &str, sub: SubState) {
        let Some(id) = sub.membership else {
            return;
        };
        let node = self.edge.node.clone();
        let channel = channel.to_owned();
        let client = self.client.clone();
        self.edge.tracker.spawn(async move {
            node.leave(&channel, &client, &id).await;
        });
    }

    /// `presence` / `presence_stats`: the channel's members on every node.
    pub(super) async fn presence(
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
        if self.node().presence_rule(&req.channel).is_none() {
            return Err(ErrorCode::NotAvailable.into());
        }
        if stats {
            let (clients, users) = self
                .node()
                .presence_stats(&req.channel)
                .await
                .map_err(NodeError::into_reply)?;
            let result = reply::PresenceStatsResult {
                num_clients: u32::try_from(clients).unwrap_or(u32::MAX),
                num_users: u32::try_from(users).unwrap_or(u32::MAX),
            };
            return Ok(self.encode(&Reply::new(id, ReplyBody::PresenceStats(result))));
        }
        let members = self
            .node()
            .presence_members(&req.channel, self.reply_budget)
            .await
            .map_err(NodeError::into_reply)?;
        self.held.extend(members.permit);
        let presence = reply::PresenceResult {
            presence: members.value.iter().map(Member::client_info).collect(),
        };
        Ok(self.encode(&Reply::new(id, ReplyBody::Presence(presence))))
    }

    /// Takes one publish (or rpc) allowance of each scope: the connection's rate, its client
    /// IP's, its user's. The scope whose allowance is used up otherwise.
    fn take_publish(&mut self) -> Result<(), &'static str> {
        let now = std::time::Instant::now();
        if !self.publish_bucket.try_take(now) {
            return Err("");
        }
        // Across connections: a new connection is not a new allowance.
        if !self.edge.limits.publish_per_ip.try_take(&self.ip, now) {
            return Err(" (client IP)");
        }
        if !self.identity.user.is_empty()
            && !self
                .edge
                .limits
                .publish_per_user
                .try_take(&self.identity.user, now)
        {
            return Err(" (user)");
        }
        Ok(())
    }

    /// Whether `client.max_pending_publishes` publishes and calls are on their way.
    fn pending_full(&self) -> bool {
        self.pending.len() >= self.edge.config.client.max_pending_publishes
    }

    /// The sender of this connection's publications: its user, or its client id when anonymous.
    fn sender(&self) -> String {
        if self.identity.user.is_empty() {
            self.client.clone()
        } else {
            self.identity.user.clone()
        }
    }

    /// Starts a publish; its reply is written when the target or the database answered.
    pub(super) fn publish(&mut self, id: u32, req: PublishRequest) -> Result<(), ReplyError> {
        validate_channel(&req.channel)
            .map_err(|e| ReplyError::with_message(ErrorCode::BadRequest, e.to_string()))?;
        self.take_publish().map_err(|scope| {
            ReplyError::with_message(
                ErrorCode::TooManyRequests,
                format!("publish rate limit{scope}"),
            )
        })?;
        if self.pending_full() {
            return Err(ErrorCode::TooManyRequests.into());
        }
        let node = self.edge.node.clone();
        if node.is_table_channel(&req.channel) || !self.allowed(&req.channel, Op::Publish) {
            return Err(ErrorCode::PermissionDenied.into());
        }
        // Without a rule, into the history: where clients may publish, with who published.
        if !node.has_rule(&req.channel) && !self.edge.config.client.allow_publish {
            return Err(ErrorCode::PermissionDenied.into());
        }
        let info = self.publisher_info(&req.channel)?;
        let publisher = Publisher::Client {
            sender: self.sender(),
            connection: self.client.clone(),
            info,
        };
        let publication = node
            .publication(req.channel, req.data, publisher)
            .map_err(NodeError::into_reply)?;
        self.pending.push(Box::pin(async move {
            match node.publish(publication).await {
                Ok(_) => Reply::new(id, ReplyBody::Publish),
                Err(e) => Reply::error(id, e.into_reply()),
            }
        }));
        Ok(())
    }

    /// This connection's `ClientInfo` on `channel`, kept with its publications in the history.
    fn publisher_info(&self, channel: &str) -> Result<Box<RawValue>, ReplyError> {
        let info = serde_json::to_string(&ClientInfo {
            user: self.identity.user.clone(),
            client: self.client.clone(),
            conn_info: self.identity.conn_info.as_deref().map(boxed),
            chan_info: self
                .subs
                .get(channel)
                .and_then(|s| s.chan_info.as_deref())
                .map(boxed),
        })
        .map_err(|_| ReplyError::new(ErrorCode::Internal))?;
        Ok(RawValue::from_string(info).unwrap_or_else(|_| RawValue::NULL.to_owned()))
    }

    /// Starts an `rpc` through the method's `rpc[]` rule (108 without one); its reply is written
    /// when the target answered, with the target's data, or its refusal as for a publish.
    pub(super) fn rpc(
        &mut self,
        id: u32,
        req: relay_protocol::command::RpcRequest,
    ) -> Result<(), ReplyError> {
        if req.method.len() > 255 || req.method.chars().any(char::is_control) {
            return Err(ReplyError::with_message(
                ErrorCode::BadRequest,
                "rpc method must be at most 255 characters, no control characters",
            ));
        }
        let node = self.edge.node.clone();
        let rule = node.rpc_rule(&req.method).map_err(NodeError::into_reply)?;
        // Calls share the publish allowances: rate, per IP, per user, in flight.
        self.take_publish()
            .map_err(|_| ReplyError::with_message(ErrorCode::TooManyRequests, "rpc rate limit"))?;
        if self.pending_full() {
            return Err(ErrorCode::TooManyRequests.into());
        }
        let sender = self.sender();
        let connection = self.client.clone();
        self.pending.push(Box::pin(async move {
            let answer = node
                .rpc(
                    &rule,
                    &req.method,
                    req.data.as_deref(),
                    (&sender, &connection),
                )
                .await;
            match answer {
                Ok(data) => Reply::new(id, ReplyBody::Rpc(data)),
                Err(e) => Reply::error(id, e.into_reply()),
            }
        }));
        Ok(())
    }

    pub(super) async fn history(
        &mut self,
        id: u32,
        req: HistoryRequest,
    ) -> Result<Vec<u8>, ReplyError> {
        validate_channel(&req.channel)
            .map_err(|e| ReplyError::with_message(ErrorCode::BadRequest, e.to_string()))?;
        if !self.allowed(&req.channel, Op::History) {
            return Err(ErrorCode::PermissionDenied.into());
        }
        let query = HistoryQuery {
            limit: req.limit,
            since: req.since.as_ref().map(|s| (s.offset, s.epoch.as_str())),
            reverse: req.reverse,
        };
        let node = self.edge.node.clone();
        let slice = node
            .history(&req.channel, query, &mut self.reply_budget)
            .await
            .map_err(NodeError::into_reply)?;
        self.held.extend(slice.permit);
        let slice = slice.value;
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
}
