//! The connection's identity: `connect` (with its server-side subscriptions), `refresh`,
//! `sub_refresh`, and the expiry of connection and subscription tokens.

#[allow(clippy::wildcard_imports)]
use super::*;

use super::subscriptions::Opened;
use crate::node::{NodeResult, Start};

impl Session {
    pub(super) async fn connect(
        &mut self,
        id: u32,
        request: ConnectRequest,
        out: &mut Out,
    ) -> Flow {
        match auth::connect(
            self.edge.config.client.allow_anonymous,
            &self.edge.verifier,
            &request.token,
        )
        .await
        {
            Ok(identity) => {
                let ttl = ttl(identity.expires_at);
                self.identity = identity;
                self.connected = true;
                self.kick = Some(self.node().register_session(
                    self.id,
                    &self.client,
                    &self.identity.user,
                ));
                // Server-side subscriptions: opened before the reply, which carries them.
                let joined = match self.open_server_side(&request).await {
                    Ok(joined) => joined,
                    Err(NodeError::Reply(e)) => {
                        self.connected = false;
                        out.push(self.encode(&Reply::error(id, e)));
                        return Flow::Continue;
                    }
                    Err(NodeError::Disconnect(d)) => return Flow::Close(d),
                };
                let result = ConnectResult {
                    client: self.client.clone(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ping: u32::try_from(self.edge.config.client.ping_interval_secs)
                        .unwrap_or(u32::MAX),
                    pong: true,
                    expires: ttl.is_some(),
                    ttl,
                    subs: joined
                        .iter()
                        .map(|(o, _)| (o.channel.clone(), o.result()))
                        .collect(),
                    session: self.emulated.as_ref().map(|e| e.session.clone()),
                    node: self.emulated.as_ref().map(|e| e.node.clone()),
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

    /// Opens the server-side subscriptions of a connection that was just authenticated, from the
    /// positions its `connect` gives; all or none. Their presence memberships are made before the
    /// reply (a `presence` call after it sees them); a channel whose presence refuses the member is
    /// left out.
    async fn open_server_side(
        &mut self,
        request: &ConnectRequest,
    ) -> NodeResult<Vec<(Opened, (bool, Option<String>))>> {
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
                        self.node().remove_subscriber(&o.channel, self.id);
                    }
                    return Err(e);
                }
            }
        }
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
        Ok(joined)
    }

    /// `refresh`: a new connection token for the same user extends the connection.
    pub(super) async fn refresh(
        &mut self,
        id: u32,
        request: RefreshRequest,
        out: &mut Out,
    ) -> Flow {
        match auth::refresh(&self.edge.verifier, &self.identity.user, &request.token).await {
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
            &self.edge.verifier,
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
        if let Some(template) = &self.edge.config.client.personal_channel
            && !self.identity.user.is_empty()
        {
            let personal = template.replace("{user}", &self.identity.user);
            if validate_channel(&personal).is_ok() {
                channels.push(personal);
            }
        }
        channels.sort();
        channels.dedup();
        let max = self.edge.config.client.max_channels_per_connection;
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
            &self.edge.config.channels,
            channel,
            op,
            &self.identity,
            self.subs.contains_key(channel),
        )
    }

    /// Acts on expired tokens: closes an expired connection (3005), ends expired subscriptions (2501).
    pub(super) fn expire(&mut self, out: &mut Out) -> Flow {
        let now = self.edge.clock.unix_now();
        let delay = self.edge.config.auth.expired_close_delay_secs;
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
            self.edge.node.remove_subscriber(&channel, self.id);
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
        let delay = self.edge.config.auth.expired_close_delay_secs;
        let earliest = self
            .subs
            .values()
            .filter_map(|s| s.expires_at)
            .chain(self.identity.expires_at)
            .min();
        // On the edge's clock, which [`Self::expire`] reads too: a token expiring at second N is
        // acted on as second N + delay begins.
        let clock = self.edge.clock;
        self.next_expiry = earliest.map(|at| clock.instant_at(at.saturating_add(delay)));
    }
}
