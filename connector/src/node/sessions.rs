//! What a session registers with the node while it lives: its entry for `disconnect` orders (a
//! [`Registration`] that leaves the hub's index when the session drops it), its subscriptions in the hub, and its
//! presence memberships. The session calls these; the hub and presence stay the node's.

use std::sync::Arc;

use relay_protocol::{ErrorCode, ReplyError};

use super::{Node, NodeError, NodeResult};
use crate::hub::{Registration, Subscriber};
use crate::presence::{JoinError, Member};

impl Node {
    /// A process-unique session number (the key of a session's subscriptions and registration).
    pub(crate) fn next_session_id(&self) -> u64 {
        self.hub.next_session_id()
    }

    /// Registers the connected session `session` (connection `client` of `user`): `disconnect`
    /// orders, from this node's API or another's, reach it while the registration lives.
    pub(crate) fn register_session(
        &self,
        session: u64,
        client: &str,
        user: &str,
    ) -> Arc<Registration> {
        self.hub.register_session(session, client, user)
    }

    /// Adds `session` as a subscriber of `channel` on this node; with `delta`, it also gets the
    /// fossil delta frames.
    pub(crate) fn add_subscriber(
        &self,
        channel: &str,
        session: u64,
        subscriber: Subscriber,
        delta: bool,
    ) {
        self.hub.subscribe_with(channel, session, subscriber, delta);
    }

    /// Removes `session` from `channel`'s subscribers on this node.
    pub(crate) fn remove_subscriber(&self, channel: &str, session: u64) {
        self.hub.unsubscribe(channel, session);
    }

    /// Makes `member` a presence member of `channel` (which has presence); returns its membership
    /// id. 109 when the channel is full.
    pub(crate) async fn join(
        &self,
        channel: &str,
        member: Member,
        announce: bool,
    ) -> NodeResult<String> {
        self.presence
            .join(channel, member, announce)
            .await
            .map_err(|e| match e {
                JoinError::Full => NodeError::Reply(ReplyError::with_message(
                    ErrorCode::LimitExceeded,
                    "channel presence is full (max_members)",
                )),
                JoinError::Store(e) => {
                    tracing::warn!(error = %e, channel, "presence join failed");
                    NodeError::Reply(ReplyError::new(ErrorCode::Internal))
                }
            })
    }

    /// Removes the presence membership `membership` of `client` in `channel` (a late call for an
    /// older membership of the same pair removes nothing); a failed leave is retried.
    pub(crate) async fn leave(&self, channel: &str, client: &str, membership: &str) {
        self.presence.leave(channel, client, membership).await;
    }

    /// Removes every presence membership of a connection that ended. During shutdown, the store's
    /// rows are left to the node's deregistration, one step for all.
    pub(crate) async fn leave_all(&self, client: &str, shutting_down: bool) {
        self.presence.leave_all(client, shutting_down).await;
    }
}
