//! Subscriptions: `subscribe` (authorization, hub registration, recovery from history,
//! presence) and the delivery of hub publications, where each subscription's position decides what
//! is passed on ([`SubState::accept`]).

#[allow(clippy::wildcard_imports)]
use super::*;

use super::encode::{frame, message};
use crate::node::{NodeResult, Position, Start};

/// The position a subscription has delivered up to.
#[derive(Debug)]
pub(super) struct SubState {
    /// The epoch of the delivered position ("" until known).
    pub(super) epoch: String,
    /// The offset delivered up to (in the subscribe reply or pushed since).
    pub(super) offset: u64,
    /// When the subscription token expires (Unix seconds).
    pub(super) expires_at: Option<u64>,
    /// Channel info from the subscription token.
    pub(super) chan_info: Option<Arc<RawValue>>,
    /// The subscription gets join/leave pushes.
    pub(super) join_leave: bool,
    /// Its membership in the channel's presence (the id the node's `leave` takes).
    pub(super) membership: Option<String>,
    /// A server-side subscription (made at connect): losing track of it closes the connection
    /// (3010, the client reconnects and recovers it) instead of unsubscribing it.
    pub(super) server_side: bool,
    /// Fossil delta compression, and whether the client holds the previous publication.
    pub(super) delta: Delta,
}

/// A subscription's fossil delta state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Delta {
    /// Not negotiated: full payloads.
    #[default]
    Off,
    /// Negotiated; the next publication goes full (the client has no base yet).
    First,
    /// Negotiated; the client holds the previous publication: deltas when the hub made one.
    Ready,
}

/// What a subscription does with a publication of its channel.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The next one: pass it on (the position advanced).
    Deliver,
    /// Already delivered (part of the subscribe reply): drop it.
    Duplicate,
    /// A gap or another epoch: the subscription lost track and must be recovered by the client.
    Lost,
}

impl SubState {
    /// Decides about the publication at `offset` of `epoch`, advancing the position when it is the
    /// next one. A subscription that knows no position yet (a fresh channel) adopts the epoch of its
    /// first publication.
    pub(super) fn accept(&mut self, epoch: &str, offset: u64) -> Verdict {
        if self.epoch.is_empty() && self.offset == 0 {
            epoch.clone_into(&mut self.epoch);
        }
        if epoch != self.epoch {
            return Verdict::Lost;
        }
        if offset <= self.offset {
            return Verdict::Duplicate;
        }
        if offset != self.offset + 1 {
            return Verdict::Lost;
        }
        self.offset = offset;
        Verdict::Deliver
    }
}

/// A subscription registered in the hub, with its read of the stream: what its reply says.
pub(super) struct Opened {
    pub(super) channel: String,
    /// Its position (and what a recovery read).
    position: Position,
    was_recovering: bool,
    /// The position the client recovers from.
    from: u64,
    grant: auth::SubscriptionGrant,
    /// Fossil deltas were negotiated.
    delta: bool,
    /// With deltas in JSON, every publication's data is a JSON string holding the JSON text: the
    /// recovered publications' data in that form.
    as_strings: Vec<Box<RawValue>>,
}

impl Opened {
    /// The subscribe result: the position, and the recovered publications.
    pub(super) fn result(&self) -> SubscribeResult<'_> {
        let Position {
            slice, recovered, ..
        } = &self.position;
        SubscribeResult {
            recoverable: true,
            positioned: true,
            epoch: &slice.epoch,
            offset: if *recovered { self.from } else { slice.top },
            was_recovering: self.was_recovering,
            recovered: *recovered,
            publications: if *recovered {
                slice
                    .publications
                    .iter()
                    .enumerate()
                    .map(|(i, p)| Publication {
                        data: self.as_strings.get(i).map_or(&*p.data, |s| &**s),
                        offset: p.offset,
                        info: p.info.as_deref(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            expires: self.grant.expires_at.is_some(),
            ttl: ttl(self.grant.expires_at),
            delta: self.delta,
        }
    }
}

impl Session {
    pub(super) async fn subscribe(
        &mut self,
        id: u32,
        req: SubscribeRequest,
    ) -> NodeResult<Vec<u8>> {
        let channel = req.channel.clone();
        validate_channel(&channel)
            .map_err(|e| ReplyError::with_message(ErrorCode::BadRequest, e.to_string()))?;
        // Map and shared-poll subscriptions (Centrifugo 6.8) are refused, never served as a stream.
        if req.r#type != 0 {
            return Err(ReplyError::with_message(
                ErrorCode::NotAvailable,
                "subscription type not supported",
            )
            .into());
        }
        // Fossil deltas where the channel's configuration allows them; otherwise declined (full
        // payloads, no `delta: true`), as Centrifugo does.
        let delta = req.delta == "fossil"
            && self
                .edge
                .config
                .channels
                .delta_allowed(&channel, crate::config::DeltaType::Fossil);
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
        let cfg = &self.edge.config.client;
        if self.subs.len() >= cfg.max_channels_per_connection {
            return Err(ReplyError::from(ErrorCode::LimitExceeded).into());
        }
        let grant = self.grant(&channel, &req.token).await?;
        let start = Start {
            recover: req.recover,
            offset: req.offset,
            epoch: req.epoch.clone(),
            reject_unrecovered: req.flag & 2 != 0,
            delta,
        };
        let opened = self.open(channel, &start, grant).await?;
        let body = self.encode(&Reply::new(id, ReplyBody::Subscribe(opened.result())));
        // Presence: the subscription becomes a member before the reply, so a `presence` call that
        // follows it sees the subscriber; its join push (to those who asked) follows the reply.
        let token_data = req.data.as_deref().filter(|_| req.token.is_empty());
        let presence = self
            .join_presence(&opened, token_data, req.join_leave)
            .await?;
        self.keep(opened, presence, false);
        Ok(body)
    }

    /// What a subscribe to `channel` with `token` is allowed: a subscription token is the
    /// application's explicit grant; without one, the permissions decide. A token for another
    /// channel, user or connection closes the connection.
    async fn grant(&mut self, channel: &str, token: &str) -> NodeResult<auth::SubscriptionGrant> {
        if token.is_empty() {
            if !self.allowed(channel, Op::Subscribe) {
                return Err(ErrorCode::PermissionDenied.into());
            }
            return Ok(auth::SubscriptionGrant::default());
        }
        let verified = auth::subscription(
            &self.edge.verifier,
            token,
            channel,
            &self.identity.user,
            &self.client,
        )
        .await;
        match verified {
            Ok(grant) => Ok(grant),
            Err(SubscriptionError::Expired) => Err(ErrorCode::TokenExpired.into()),
            Err(SubscriptionError::Invalid) => Err(ErrorCode::PermissionDenied.into()),
            Err(SubscriptionError::Mismatch) => Err(Disconnect::INVALID_TOKEN.into()),
            Err(SubscriptionError::Unavailable) => Err(ErrorCode::Internal.into()),
        }
    }

    /// Registers `channel` in the hub, then reads its position (and, for a recovery, what was
    /// missed) from history: registered first, so nothing committed after the read can be missed;
    /// what arrives twice is dropped by offset in `deliver`.
    pub(super) async fn open(
        &mut self,
        channel: String,
        start: &Start,
        grant: auth::SubscriptionGrant,
    ) -> NodeResult<Opened> {
        let node = self.edge.node.clone();
        node.add_subscriber(
            &channel,
            self.id,
            Subscriber::of(&self.mailbox),
            start.delta,
        );
        // A recovery is bounded by the reply budget, not by a count: the publications it would
        // return must fit in what is left of the connection's outbound budget.
        let position = match node
            .subscribe_position(&channel, start, &mut self.reply_budget)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                node.remove_subscriber(&channel, self.id);
                return Err(e);
            }
        };
        self.held.extend(position.permit);
        let position = position.value;
        let recovered = position.recovered;
        let as_strings = if start.delta && self.encoding == Encoding::Json && recovered {
            position
                .slice
                .publications
                .iter()
                .map(|p| json_string(p.data.get()))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Opened {
            delta: start.delta,
            as_strings,
            channel,
            position,
            was_recovering: start.recover,
            from: start.offset,
            grant,
        })
    }

    /// Makes an opened subscription a presence member where the channel has presence (with the
    /// subscribe `data` as its channel info where the channel takes it). Returns whether join/leave
    /// pushes go to it (it asked for them, or the channel forces them) and its membership. On an
    /// error the subscription is gone from the hub.
    pub(super) async fn join_presence(
        &mut self,
        opened: &Opened,
        data: Option<&RawValue>,
        ask_join_leave: bool,
    ) -> NodeResult<(bool, Option<String>)> {
        let node = self.edge.node.clone();
        let channel = &opened.channel;
        let Some(rule) = node.presence_rule(channel).cloned() else {
            return Ok((false, None));
        };
        let chan_info = match (&opened.grant.chan_info, data) {
            (Some(info), _) => Some(info.clone()),
            (None, Some(data)) if rule.info_from_subscribe_data => {
                if data.get().len() > 1024 || !data.get().starts_with('{') {
                    node.remove_subscriber(channel, self.id);
                    return Err(ReplyError::with_message(
                        ErrorCode::BadRequest,
                        "subscribe data must be a JSON object of at most 1024 bytes",
                    )
                    .into());
                }
                Some(Arc::from(data.to_owned()))
            }
            _ => None,
        };
        let member = crate::presence::Member {
            user: self.identity.user.clone(),
            client: self.client.clone(),
            conn_info: self.identity.conn_info.clone(),
            chan_info,
        };
        let membership = match node.join(channel, member, rule.join_leave).await {
            Ok(id) => id,
            Err(e) => {
                node.remove_subscriber(channel, self.id);
                return Err(e);
            }
        };
        // Pushes only to subscribers that may see presence, as Centrifugo does; to those that
        // asked, or to all where the channel forces them.
        let join_leave = (ask_join_leave || rule.force_push_join_leave)
            && rule.join_leave
            && auth::permissions::allowed(
                &self.edge.config.channels,
                channel,
                Op::Presence,
                &self.identity,
                true,
            );
        Ok((join_leave, Some(membership)))
    }

    /// Keeps an opened subscription: from now on its channel's publications are delivered to it.
    pub(super) fn keep(
        &mut self,
        opened: Opened,
        (join_leave, membership): (bool, Option<String>),
        server_side: bool,
    ) {
        self.subs.insert(
            opened.channel,
            SubState {
                epoch: opened.position.slice.epoch,
                offset: opened.position.delivered,
                expires_at: opened.grant.expires_at,
                chan_info: opened.grant.chan_info,
                join_leave,
                membership,
                server_side,
                delta: if opened.delta {
                    Delta::First
                } else {
                    Delta::Off
                },
            },
        );
    }

    /// Passes a hub delivery on: a publication if it is the next one of a subscription, a join or
    /// leave push if the subscription asked for them.
    pub(super) fn deliver(&mut self, delivery: &Delivery, out: &mut Vec<Message>) -> Flow {
        self.mailbox.release(delivery.frame_len(self.encoding));
        let frames = delivery.frames();
        let Some(sub) = self.subs.get_mut(&*frames.channel) else {
            return Flow::Continue; // unsubscribed meanwhile, or its subscribe has not been answered
        };
        let Delivery::Publication {
            offset,
            epoch,
            delta,
            ..
        } = delivery
        else {
            // A join or leave push.
            if sub.join_leave
                && let Some(frame) = frame(frames, self.encoding)
            {
                out.push(frame);
            }
            return Flow::Continue;
        };
        match sub.accept(epoch, *offset) {
            Verdict::Deliver => {}
            Verdict::Duplicate => return Flow::Continue,
            Verdict::Lost => return self.insufficient_state(&frames.channel.clone(), out),
        }
        let sent = match sub.delta {
            Delta::Off => frame(frames, self.encoding),
            mode => {
                sub.delta = Delta::Ready;
                delta_frame(frames, delta.as_ref(), self.encoding, mode == Delta::Ready)
            }
        };
        let Some(frame) = sent else {
            // Encoded for another kind of subscription of this session (a resubscribe raced
            // it): never skip a publication silently; the client recovers it.
            return self.insufficient_state(&frames.channel.clone(), out);
        };
        out.push(frame);
        self.node().metrics().publications_out.inc();
        Flow::Continue
    }

    /// The subscription lost track of its stream: tell the client to resubscribe and recover.
    pub(super) fn insufficient_state(&mut self, channel: &str, out: &mut Vec<Message>) -> Flow {
        tracing::warn!(client = %self.client, channel, "gap in a channel stream; client told to recover");
        if let Some(sub) = self.subs.remove(channel) {
            let server_side = sub.server_side;
            self.leave_later(channel, sub);
            if server_side {
                return Flow::Close(Disconnect::INSUFFICIENT_STATE);
            }
        }
        self.edge.node.remove_subscriber(channel, self.id);
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

/// The frame of a hub publication (`plain` its plain frames, `delta` those of delta mode) for a
/// delta subscription: the delta when the client holds the previous publication and the hub made
/// one, else the full frame of delta mode.
fn delta_frame(
    plain: &Frames,
    delta: Option<&DeltaFrames>,
    encoding: Encoding,
    ready: bool,
) -> Option<Message> {
    let frames = delta?;
    match encoding {
        Encoding::Json => frames
            .json_delta
            .as_ref()
            .filter(|_| ready)
            .or(frames.json_full.as_ref())
            .cloned()
            .map(Message::Text),
        Encoding::Protobuf => frames
            .protobuf_delta
            .as_ref()
            .filter(|_| ready)
            .or(plain.protobuf.as_ref())
            .cloned()
            .map(Message::Binary),
    }
}

/// A JSON string holding `text`.
fn json_string(text: &str) -> Box<RawValue> {
    serde_json::to_string(text)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok())
        .unwrap_or_else(|| RawValue::NULL.to_owned())
}

#[cfg(test)]
impl SubState {
    /// A plain stream subscription at `epoch`/`offset` (the other fields at their defaults), for the
    /// session's unit tests.
    pub(super) fn at(epoch: &str, offset: u64) -> Self {
        Self {
            epoch: epoch.to_owned(),
            offset,
            expires_at: None,
            chan_info: None,
            join_leave: false,
            membership: None,
            server_side: false,
            delta: Delta::Off,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SubState, Verdict};

    fn at(epoch: &str, offset: u64) -> SubState {
        SubState::at(epoch, offset)
    }

    #[test]
    fn the_next_offsets_are_delivered_in_order() {
        let mut s = at("e", 3);
        assert_eq!(s.accept("e", 4), Verdict::Deliver);
        assert_eq!(s.accept("e", 5), Verdict::Deliver);
        assert_eq!(s.offset, 5);
    }

    #[test]
    fn what_the_subscribe_reply_held_is_not_sent_twice() {
        // Registered before the history read: publications up to the reply's top arrive again.
        let mut s = at("e", 7);
        assert_eq!(s.accept("e", 6), Verdict::Duplicate);
        assert_eq!(s.accept("e", 7), Verdict::Duplicate);
        assert_eq!(s.accept("e", 8), Verdict::Deliver);
        assert_eq!(s.offset, 8);
    }

    #[test]
    fn a_gap_is_never_passed_over() {
        let mut s = at("e", 2);
        assert_eq!(s.accept("e", 4), Verdict::Lost);
        assert_eq!(s.offset, 2, "the position does not move past a gap");
    }

    #[test]
    fn another_epoch_means_the_stream_was_reset() {
        let mut s = at("e1", 2);
        assert_eq!(s.accept("e2", 3), Verdict::Lost);
        assert_eq!(s.epoch, "e1");
    }

    #[test]
    fn a_fresh_subscription_adopts_the_epoch_of_its_first_publication() {
        let mut s = at("", 0);
        assert_eq!(s.accept("e", 1), Verdict::Deliver);
        assert_eq!((s.epoch.as_str(), s.offset), ("e", 1));
        assert_eq!(s.accept("other", 2), Verdict::Lost);
    }
}
