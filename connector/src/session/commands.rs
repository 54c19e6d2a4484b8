//! The handlers of the requests: parse, authorize, act, encode the typed reply once.

#[allow(clippy::wildcard_imports)]
use super::*;

use super::encode::info_len;
use super::subscriptions::Start;

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
        if lines.len() > self.state.config.client.max_channels_per_connection + 32 {
            return Flow::Close(Disconnect::BAD_REQUEST);
        }
        // The replies of this frame may take what the pushes waiting leave of the outbound budget,
        // less an eighth kept for the pushes that arrive while they are written.
        let budget = self.state.config.client.outbound_queue_bytes;
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

    pub(super) async fn connect(
        &mut self,
        id: u32,
        request: ConnectRequest,
        out: &mut Out,
    ) -> Flow {
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
                // Server-side subscriptions: opened before the reply, which carries them.
                let mut opened = Vec::new();
                for channel in self.server_side_channels() {
                    let start = request
                        .subs
                        .get(&channel)
                        .map_or_else(Start::default, |p| Start {
                            recover: p.recover,
                            offset: p.offset,
                            epoch: p.epoch.clone(),
                            reject_unrecovered: false,
                            delta: false,
                        });
                    match self
                        .open(channel, &start, auth::SubscriptionGrant::default())
                        .await
                    {
                        Ok(o) => opened.push(o),
                        Err(e) => {
                            for o in &opened {
                                self.state.hub.unsubscribe(&o.channel, self.id);
                            }
                            return match e {
                                SubscribeError::Reply(e) => {
                                    self.connected = false;
                                    out.push(self.encode(&Reply::error(id, e)));
                                    Flow::Continue
                                }
                                SubscribeError::Close(d) => Flow::Close(d),
                            };
                        }
                    }
                }
                // Presence members before the reply (a `presence` call after it sees them); a
                // channel whose presence refuses the member is left out of the reply.
                let mut joined = Vec::with_capacity(opened.len());
                for o in opened {
                    match self.join_presence(&o, None, false).await {
                        Ok(presence) => joined.push((o, presence)),
                        Err(e) => tracing::warn!(
                            channel = %o.channel,
                            error = ?e,
                            "server-side subscription left out: presence refused it"
                        ),
                    }
                }
                let result = ConnectResult {
                    client: self.client.clone(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ping: u32::try_from(self.state.config.client.ping_interval_secs)
                        .unwrap_or(u32::MAX),
                    pong: true,
                    expires: ttl.is_some(),
                    ttl,
                    subs: joined
                        .iter()
                        .map(|(o, _)| (o.channel.clone(), o.result()))
                        .collect(),
                };
                out.push(self.encode(&Reply::new(id, ReplyBody::Connect(result))));
                for (o, presence) in joined {
                    self.keep(o, presence, true);
                }
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
    pub(super) async fn refresh(
        &mut self,
        id: u32,
        request: RefreshRequest,
        out: &mut Out,
    ) -> Flow {
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
    pub(super) async fn sub_refresh(
        &mut self,
        id: u32,
        request: SubRefreshRequest,
        out: &mut Out,
    ) -> Flow {
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

    /// The channels this connection is subscribed to server-side: the token's `channels` claim
    /// (the application's grant, each a valid channel name) and the user's personal channel
    /// (`client.personal_channel`), at most `client.max_channels_per_connection`.
    fn server_side_channels(&self) -> Vec<String> {
        let mut channels: Vec<String> = Vec::new();
        if let Some(serde_json::Value::Array(claimed)) = self.identity.claims.get("channels") {
            channels.extend(
                claimed
                    .iter()
                    .filter_map(serde_json::Value::as_str)
                    .filter(|c| validate_channel(c).is_ok())
                    .map(str::to_owned),
            );
        }
        if let Some(template) = &self.state.config.client.personal_channel
            && !self.identity.user.is_empty()
        {
            let personal = template.replace("{user}", &self.identity.user);
            if validate_channel(&personal).is_ok() {
                channels.push(personal);
            }
        }
        channels.sort();
        channels.dedup();
        let max = self.state.config.client.max_channels_per_connection;
        if channels.len() > max {
            tracing::warn!(
                client = %self.client,
                dropped = channels.len() - max,
                "more server-side channels than client.max_channels_per_connection"
            );
            channels.truncate(max);
        }
        channels
    }

    /// Whether this connection may do `op` on `channel` by the configured permissions.
    pub(super) fn allowed(&self, channel: &str, op: Op) -> bool {
        auth::permissions::allowed(
            &self.state.config.channels,
            channel,
            op,
            &self.identity,
            self.subs.contains_key(channel),
        )
    }

    /// Acts on expired tokens: closes an expired connection (3005), ends expired subscriptions (2501).
    pub(super) fn expire(&mut self, out: &mut Out) -> Flow {
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
    pub(super) fn schedule_expiry(&mut self) {
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

    pub(super) async fn unsubscribe(&mut self, id: u32, req: ChannelRequest) -> Vec<u8> {
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
    pub(super) fn leave_later(&self, channel: &str, sub: SubState) {
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
    pub(super) fn publish(&mut self, id: u32, req: PublishRequest) -> Result<(), ReplyError> {
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
                        // Read-your-writes: the reply follows the publication into the history.
                        fence::settle(&state.pool).await;
                        state
                            .metrics
                            .publications_in
                            .inc();
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
                        Reply::error(id, e.reply_error("publish"))
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
                    state.metrics.publications_in.inc();
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
        let Some(rule) = self.state.config.rpc_rule_for(&req.method).cloned() else {
            return Err(ErrorCode::NotAvailable.into());
        };
        // Calls share the publish allowances: rate, per IP, per user, in flight.
        let now = std::time::Instant::now();
        if !self.publish_bucket.try_take(now)
            || !self.state.limits.publish_per_ip.try_take(&self.ip, now)
            || (!self.identity.user.is_empty()
                && !self
                    .state
                    .limits
                    .publish_per_user
                    .try_take(&self.identity.user, now))
        {
            return Err(ReplyError::with_message(
                ErrorCode::TooManyRequests,
                "rpc rate limit",
            ));
        }
        if self.pending.len() >= self.state.config.client.max_pending_publishes {
            return Err(ErrorCode::TooManyRequests.into());
        }
        let state = self.state.clone();
        let sender = if self.identity.user.is_empty() {
            self.client.clone()
        } else {
            self.identity.user.clone()
        };
        let connection = self.client.clone();
        self.pending.push(Box::pin(async move {
            let named = NamedData {
                name: req.method.clone(),
                data: req.data.as_deref(),
            };
            let message_id = uuid::Uuid::new_v4().to_string();
            let envelope =
                rules::rpc_envelope(&req.method, &sender, &connection, &named, message_id);
            let answer = rules::call_limited(
                &state.limits.targets,
                &state.http,
                &state.lambda,
                &rule,
                &envelope,
            )
            .await;
            match answer {
                Ok(data) => Reply::new(id, ReplyBody::Rpc(data)),
                Err(rules::TargetError::Refused(r)) => {
                    tracing::info!(method = %req.method, status = r.status.as_str(), reason = %r.reason, "rpc refused by the target");
                    Reply::error(id, r.reply_error())
                }
                Err(e) => {
                    tracing::warn!(method = %req.method, error = %e, "rpc target failed");
                    Reply::error(id, e.reply_error("rpc"))
                }
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
        let keep = Keep::from(&self.state.config.retention.rule_for(&req.channel));
        let slice = history::read(
            &self.state.pool,
            &req.channel,
            bound,
            limit,
            self.reply_budget,
            keep,
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
}
