//! The node: the channel operations that a client connection and the server API share, over the
//! services every part of a running connector uses (pool, hub, presence, cluster, publish targets,
//! metrics).
//!
//! A session ([`crate::session`]) and the server API ([`crate::api`]) are adapters over it: they
//! parse a request, authorize it (only a client connection is authorized; the API's key was
//! checked), call one method here and encode its result. So each rule of a channel operation (where
//! a publication goes, how a history read is bounded, what a recovery is, how large a reply may be,
//! what is counted) has one home.
//!
//! Publishing and rpc calls (through a rule's target, or into the history) are in `publish.rs`;
//! what a session registers with the node (its entry for `disconnect` orders, its hub
//! subscriptions, its presence memberships) in `sessions.rs`.
//!
//! Every method answers `Result<T, NodeError>`: a reply error fails the one command, a disconnect
//! closes the connection (as centrifuge's `Error` and `Disconnect`).

mod publish;
mod sessions;

use std::collections::HashMap;
use std::sync::Arc;

use relay_protocol::{Disconnect, ErrorCode, ReplyError};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::capture::CaptureStatus;
use crate::cluster::{Cluster, DisconnectOrder};
use crate::config::{ChannelRules, ClientConfig, Config, Mapping, RetentionConfig, Rule};
use crate::db::history::{self, Bound, Keep, StreamSlice};
use crate::db::stream::StreamStatus;
use crate::hub::Hub;
use crate::metrics::{self, Metrics};
use crate::presence::{Member, Presence};
use crate::rules::{Concurrency, LambdaClients};

/// Why an operation failed: an error reply to the one command, or the connection closed.
#[derive(Debug)]
pub(crate) enum NodeError {
    /// The command's error reply.
    Reply(ReplyError),
    /// Close the connection with this code.
    Disconnect(Disconnect),
}

impl NodeError {
    /// The error reply, where the caller has no connection to close (the server API) or the
    /// operation never asks for a close: a disconnect becomes an internal error.
    pub(crate) fn into_reply(self) -> ReplyError {
        match self {
            Self::Reply(e) => e,
            Self::Disconnect(d) => {
                tracing::warn!(code = d.code, "a disconnect where a reply was due");
                ReplyError::new(ErrorCode::Internal)
            }
        }
    }
}

impl From<ReplyError> for NodeError {
    fn from(e: ReplyError) -> Self {
        Self::Reply(e)
    }
}

impl From<ErrorCode> for NodeError {
    fn from(code: ErrorCode) -> Self {
        Self::Reply(code.into())
    }
}

impl From<Disconnect> for NodeError {
    fn from(d: Disconnect) -> Self {
        Self::Disconnect(d)
    }
}

/// The result of a node operation.
pub(crate) type NodeResult<T> = Result<T, NodeError>;

pub(crate) use publish::Publisher;

/// The error of a reply that would not fit in the caller's byte budget (a connection's:
/// `client.outbound_queue_bytes`, less what its pushes hold; the API's: the same size).
pub(crate) fn reply_too_large() -> ReplyError {
    ReplyError::with_message(
        ErrorCode::LimitExceeded,
        "reply too large for the byte budget (client.outbound_queue_bytes): ask for less",
    )
}

/// The error of a large reply that would pass the process-wide allowance
/// (`client.replies_in_flight_bytes`): temporary, the caller retries.
pub(crate) fn replies_busy() -> ReplyError {
    ReplyError::with_message(
        ErrorCode::TooManyRequests,
        "server busy with large replies: retry",
    )
}

/// A storage failure: logged, answered with the generic internal error.
fn internal(what: &str, e: &crate::Error) -> ReplyError {
    tracing::warn!(error = %e, "{what} failed");
    ReplyError::new(ErrorCode::Internal)
}

/// A value with the share of the large-reply allowance it holds until its reply is written.
#[derive(Debug)]
pub(crate) struct Held<T> {
    /// The value.
    pub(crate) value: T,
    /// Held until the reply is written (none for an empty one).
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

/// What a history read asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistoryQuery<'a> {
    /// 0: the position only; negative: as many as allowed (`client.history_max_limit`).
    pub(crate) limit: i64,
    /// From this position (offset, epoch; an empty epoch is not checked).
    pub(crate) since: Option<(u64, &'a str)>,
    /// Newest first.
    pub(crate) reverse: bool,
}

/// Where a subscription starts: recovering from a position the client had, or at the stream's top.
#[derive(Debug, Default)]
pub(crate) struct Start {
    /// Recover what was missed since `offset` in `epoch`.
    pub(crate) recover: bool,
    /// The offset of the client's position.
    pub(crate) offset: u64,
    /// The epoch of the client's position ("" when unknown).
    pub(crate) epoch: String,
    /// Answer an unrecoverable position with error 112 instead of `recovered: false` (flag 2).
    pub(crate) reject_unrecovered: bool,
    /// Fossil delta compression was negotiated.
    pub(crate) delta: bool,
}

/// A subscription's position, and what a recovery read of its stream found.
#[derive(Debug)]
pub(crate) struct Position {
    /// The channel's epoch and top, with the missed publications when recovered.
    pub(crate) slice: StreamSlice,
    /// The recovery filled the gap.
    pub(crate) recovered: bool,
    /// The offset the subscribe reply delivers up to.
    pub(crate) delivered: u64,
}

/// The sections of the configuration the node's operations read: the node takes these, never the
/// whole `Config`.
#[derive(Debug, Clone)]
pub(crate) struct NodeConfig {
    /// History and recovery limits and the reply allowance (`client`).
    pub(crate) client: ClientConfig,
    /// Where client publications go (`rules[]`).
    pub(crate) rules: ChannelRules<Rule>,
    /// Where rpc calls go (`rpc[]`, by method).
    pub(crate) rpc: ChannelRules<Rule>,
    /// The mapped tables (`mappings[]`): their channels take no client publications.
    pub(crate) mappings: Vec<Mapping>,
    /// History retention (`retention`).
    pub(crate) retention: RetentionConfig,
}

impl NodeConfig {
    /// The sections of `config` the node reads.
    pub(crate) fn of(config: &Config) -> Self {
        Self {
            client: config.client.clone(),
            rules: config.rules.clone(),
            rpc: config.rpc.clone(),
            mappings: config.mappings.clone(),
            retention: config.retention.clone(),
        }
    }
}

/// The services of a running connector and the channel operations over them.
#[derive(Debug)]
pub(crate) struct Node {
    config: NodeConfig,
    pool: PgPool,
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    cluster: Arc<Cluster>,
    /// Client for webhook and local-Lambda targets.
    http: reqwest::Client,
    /// AWS Lambda clients of the rules that invoke Lambda in AWS.
    lambda: LambdaClients,
    /// Deliveries in flight per rule (`rules[].max_concurrency`).
    targets: Concurrency,
    /// KiB of large replies held process-wide (`client.replies_in_flight_bytes`).
    replies_in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    stream: Arc<StreamStatus>,
    capture: Arc<CaptureStatus>,
}

/// What a node is built from.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) config: NodeConfig,
    pub(crate) pool: PgPool,
    pub(crate) hub: Arc<Hub>,
    pub(crate) presence: Arc<Presence>,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) http: reqwest::Client,
    pub(crate) lambda: LambdaClients,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) stream: Arc<StreamStatus>,
    pub(crate) capture: Arc<CaptureStatus>,
}

impl Node {
    /// A node over `parts`.
    pub(crate) fn new(parts: Parts) -> Self {
        let c = &parts.config;
        Self {
            targets: Concurrency::for_rules(&c.rules).with_rpc(&c.rpc),
            replies_in_flight: Arc::new(Semaphore::new(
                (c.client.replies_in_flight_bytes / 1024).min(Semaphore::MAX_PERMITS),
            )),
            config: parts.config,
            pool: parts.pool,
            hub: parts.hub,
            presence: parts.presence,
            cluster: parts.cluster,
            http: parts.http,
            lambda: parts.lambda,
            metrics: parts.metrics,
            stream: parts.stream,
            capture: parts.capture,
        }
    }

    /// The counters.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What a `/metrics` scrape reads now: this node's counts and the database's
    /// (`pending`: the accept loop's, when the HTTP layer serves).
    pub(crate) async fn scrape(&self, pending: Option<metrics::Pending>) -> metrics::Scrape {
        metrics::scrape(
            &self.pool,
            &self.hub,
            &self.presence,
            &self.capture,
            pending,
        )
        .await
    }

    /// The change stream's status.
    pub(crate) fn stream(&self) -> &StreamStatus {
        &self.stream
    }

    /// Reserves `bytes` of the process-wide allowance for large replies; `None` when it is used up.
    pub(crate) fn reserve_reply(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        self.replies_in_flight
            .clone()
            .try_acquire_many_owned(kib)
            .ok()
    }

    fn hold(&self, bytes: usize) -> Result<OwnedSemaphorePermit, ReplyError> {
        self.reserve_reply(bytes).ok_or_else(replies_busy)
    }

    /// A slice of `channel`'s history and its position, within `budget` bytes (the caller's; a
    /// read that overflows it uses it up, so the caller's other large replies are refused without
    /// reading). The reply holds its share of the large-reply allowance until it is written.
    pub(crate) async fn history(
        &self,
        channel: &str,
        query: HistoryQuery<'_>,
        budget: &mut usize,
    ) -> NodeResult<Held<StreamSlice>> {
        let max = self.config.client.history_max_limit;
        let limit = match query.limit {
            0 => 0,
            n if n < 0 => max,
            n => u32::try_from(n).unwrap_or(u32::MAX).min(max),
        };
        if limit > 0 && *budget == 0 {
            return Err(reply_too_large().into());
        }
        let bound = match (query.since, query.reverse) {
            (Some((0, _)), true) => {
                return Err(ReplyError::with_message(
                    ErrorCode::BadRequest,
                    "reverse history needs since.offset > 0",
                )
                .into());
            }
            (Some((offset, _)), true) => Bound::Before(offset),
            (Some((offset, _)), false) => Bound::After(offset),
            (None, true) => Bound::Before(u64::MAX),
            (None, false) => Bound::After(0),
        };
        let slice = history::read(
            &self.pool,
            channel,
            bound,
            limit,
            *budget,
            self.keep(channel),
        )
        .await
        .map_err(|e| internal("history read", &e))?;
        if slice.overflow {
            *budget = 0;
            return Err(reply_too_large().into());
        }
        let permit = self.hold(slice.bytes)?;
        if let Some((_, epoch)) = query.since
            && !epoch.is_empty()
            && epoch != slice.epoch
        {
            return Err(ErrorCode::UnrecoverablePosition.into());
        }
        Ok(Held {
            value: slice,
            permit: Some(permit),
        })
    }

    fn keep(&self, channel: &str) -> Keep {
        Keep::from(&self.config.retention.rule_for(channel))
    }

    /// The position a new subscription to `channel` starts at, read after its hub registration
    /// (nothing committed after the read can be missed); for a recovery, the publications missed
    /// since `start`, bounded by `budget` (a read that overflows it uses it up) and
    /// `client.recovery_max_publications`. An unrecoverable position is `recovered: false`, or
    /// error 112 when the subscriber asked for that.
    pub(crate) async fn subscribe_position(
        &self,
        channel: &str,
        start: &Start,
        budget: &mut usize,
    ) -> NodeResult<Held<Position>> {
        let limit = if start.recover {
            self.config
                .client
                .recovery_max_publications
                .saturating_add(1)
        } else {
            0
        };
        let slice = history::read(
            &self.pool,
            channel,
            Bound::After(start.offset),
            limit,
            *budget,
            self.keep(channel),
        )
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, channel, "subscribe read failed");
            ReplyError::from(ErrorCode::Internal)
        })?;
        let permit = if slice.bytes > 0 {
            Some(self.hold(slice.bytes)?)
        } else {
            None
        };
        let mut recovered = false;
        if start.recover {
            recovered = recovers(start, &slice);
            if slice.overflow {
                *budget = 0;
            }
            self.metrics.record_recovery(recovered);
            if !recovered && start.reject_unrecovered {
                return Err(ErrorCode::UnrecoverablePosition.into());
            }
        }
        let delivered = if recovered {
            slice.publications.last().map_or(start.offset, |p| p.offset)
        } else {
            slice.top
        };
        Ok(Held {
            value: Position {
                slice,
                recovered,
                delivered,
            },
            permit,
        })
    }

    /// The presence entry of `channel` (None: no presence there).
    pub(crate) fn presence_rule(&self, channel: &str) -> Option<&crate::config::PresenceRule> {
        self.presence.rule_for(channel)
    }

    /// The members of `channel` on every live node, as its presence entry lists them (one per
    /// user where `per_user` is set, at most `max_listed`, oldest first), within `budget` bytes
    /// (their `ClientInfo` JSON), holding their share of the large-reply allowance.
    pub(crate) async fn presence_members(
        &self,
        channel: &str,
        budget: usize,
    ) -> NodeResult<Held<Vec<Member>>> {
        let members = self
            .presence
            .members(channel)
            .await
            .map_err(|e| internal("presence read", &e))?;
        let mut bytes = 0usize;
        for m in &members {
            bytes += m.client.len() + m.to_json().to_string().len() + 8;
            if bytes > budget {
                return Err(reply_too_large().into());
            }
        }
        let permit = self.hold(bytes)?;
        Ok(Held {
            value: members,
            permit: Some(permit),
        })
    }

    /// (clients, distinct users) of `channel` on every live node.
    pub(crate) async fn presence_stats(&self, channel: &str) -> NodeResult<(u64, u64)> {
        self.presence
            .stats(channel)
            .await
            .map_err(|e| internal("presence read", &e).into())
    }

    /// Channels with subscribers and their counts: this node's subscriptions, and presence members
    /// of every node (the larger of the two per channel), by name.
    pub(crate) async fn channels(&self) -> NodeResult<Vec<(String, u64)>> {
        let mut counts: HashMap<String, u64> = self.hub.channel_counts().into_iter().collect();
        let stored = self
            .presence
            .channel_counts()
            .await
            .map_err(|e| internal("channels", &e))?;
        for (channel, n) in stored {
            let e = counts.entry(channel).or_default();
            *e = (*e).max(n);
        }
        let mut out: Vec<(String, u64)> = counts.into_iter().collect();
        out.sort();
        Ok(out)
    }

    /// The live nodes, as the server API's `info` shows them.
    pub(crate) async fn info(&self) -> NodeResult<Vec<Value>> {
        self.cluster
            .nodes()
            .await
            .map_err(|e| internal("info", &e).into())
    }

    /// Closes the connections `order` names, on every node (this one included).
    pub(crate) async fn disconnect(&self, order: &DisconnectOrder) -> NodeResult<()> {
        let mut order = order.clone();
        order.whitelist.truncate(100);
        self.cluster
            .disconnect(&order)
            .await
            .map_err(|e| internal("disconnect", &e).into())
    }

    /// Resets `channel`'s history: a new epoch; its subscribers are told to resubscribe.
    pub(crate) async fn remove_history(&self, channel: &str) -> NodeResult<()> {
        sqlx::query("SELECT relay.reset_channel($1)")
            .bind(channel)
            .execute(&self.pool)
            .await
            .map_err(|e| internal("history_remove", &crate::Error::from(e)).into())
            .map(|_| ())
    }
}

/// Whether a recovery read from `start` holds exactly what was missed: the same epoch (or none
/// given), every offset after the client's up to the top, nothing cut off.
fn recovers(start: &Start, slice: &StreamSlice) -> bool {
    let epoch_ok = start.epoch.is_empty() || start.epoch == slice.epoch;
    let missed = slice.top.saturating_sub(start.offset);
    let complete = start.offset <= slice.top
        && !slice.overflow
        && slice.publications.len() as u64 == missed
        && slice
            .publications
            .first()
            .is_none_or(|p| p.offset == start.offset + 1)
        && slice
            .publications
            .last()
            .is_none_or(|p| p.offset == slice.top);
    epoch_ok && complete
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::db::history::StoredPublication;

    fn slice(epoch: &str, top: u64, offsets: &[u64]) -> StreamSlice {
        StreamSlice {
            epoch: epoch.to_owned(),
            top,
            publications: offsets
                .iter()
                .map(|&offset| StoredPublication {
                    offset,
                    data: RawValue::NULL.to_owned(),
                    info: None,
                })
                .collect(),
            overflow: false,
            bytes: 0,
        }
    }

    fn from(offset: u64, epoch: &str) -> Start {
        Start {
            recover: true,
            offset,
            epoch: epoch.to_owned(),
            ..Start::default()
        }
    }

    #[test]
    fn a_recovery_holds_every_missed_offset_up_to_the_top() {
        assert!(recovers(&from(2, "e"), &slice("e", 4, &[3, 4])));
        assert!(
            recovers(&from(4, "e"), &slice("e", 4, &[])),
            "nothing missed"
        );
        assert!(
            recovers(&from(2, ""), &slice("e", 4, &[3, 4])),
            "no epoch given"
        );
    }

    #[test]
    fn a_gap_another_epoch_or_a_cut_read_is_not_recovered() {
        assert!(
            !recovers(&from(2, "e"), &slice("e", 5, &[3, 4])),
            "short of the top"
        );
        assert!(
            !recovers(&from(2, "e"), &slice("e", 4, &[4])),
            "first offset missing"
        );
        assert!(
            !recovers(&from(2, "old"), &slice("e", 4, &[3, 4])),
            "history reset"
        );
        assert!(
            !recovers(&from(9, "e"), &slice("e", 4, &[])),
            "ahead of the stream"
        );
        let mut cut = slice("e", 4, &[]);
        cut.overflow = true;
        assert!(!recovers(&from(2, "e"), &cut), "over the byte budget");
    }
}
