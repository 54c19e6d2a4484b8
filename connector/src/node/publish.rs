//! Client publications and rpc calls: through the channel's (or method's) rule to its target — the
//! writer Lambda or a webhook, as an envelope ([`crate::rules`]) — or, on a channel without a rule,
//! into the history with `relay.publish_json()`. The answer waits for the publication to be in the
//! history (read-your-writes).

use relay_protocol::{ErrorCode, ReplyError};
use serde_json::value::RawValue;

use super::{Node, NodeResult};
use crate::config::Rule;
use crate::db::fence;
use crate::db::history::{self, Located};
use crate::rules::{self, NamedData};

/// Who publishes: the server API, or a client connection.
#[derive(Debug)]
pub(crate) enum Publisher {
    /// The server API (`clientId` / `connectionId` `"api"`); its idempotency key, when given, is
    /// the message id a rule's target sees.
    Api {
        /// The message id (a new one when `None`).
        message_id: Option<String>,
    },
    /// A client connection.
    Client {
        /// The sender: the connection's user, or its client id when anonymous.
        sender: String,
        /// The connection's client id.
        connection: String,
        /// The publisher's `ClientInfo` JSON, kept with a publication in the history.
        info: Box<RawValue>,
    },
}

impl Publisher {
    fn ids(&self) -> (&str, &str) {
        match self {
            Self::Api { .. } => ("api", "api"),
            Self::Client {
                sender, connection, ..
            } => (sender, connection),
        }
    }
}

/// A publication the node accepted for publishing ([`Node::publication`]), with where it goes.
#[derive(Debug)]
pub(crate) struct Publication {
    channel: String,
    data: Box<RawValue>,
    publisher: Publisher,
    /// The channel's publish rule: to its target; `None`: into the history.
    rule: Option<Rule>,
    /// The message name (with a rule).
    name: String,
}

/// A publication that could not be written: logged, answered with the generic internal error.
fn publish_failed(channel: &str, e: &crate::Error) -> ReplyError {
    tracing::warn!(channel, error = %e, "publish failed");
    ReplyError::new(ErrorCode::Internal)
}

impl Node {
    /// Whether `channel` has a publish rule (its publications go to the rule's target).
    pub(crate) fn has_rule(&self, channel: &str) -> bool {
        self.config.rules.first_match(channel).is_some()
    }

    /// Whether `channel` carries table changes (no client publishes there).
    pub(crate) fn is_table_channel(&self, channel: &str) -> bool {
        crate::config::is_table_channel(&self.config.mappings, channel)
    }

    /// Accepts `data` for publishing on `channel` (a valid name) by `publisher`: on a channel with
    /// a publish rule, `data` must be `{"name", "data"}`. Checked before anything is sent, so a
    /// connection answers a malformed publish at once.
    pub(crate) fn publication(
        &self,
        channel: String,
        data: Box<RawValue>,
        publisher: Publisher,
    ) -> NodeResult<Publication> {
        let rule = self.config.rules.first_match(&channel).cloned();
        let name = match &rule {
            Some(_) => {
                let named: NamedData<'_> = serde_json::from_str(data.get()).map_err(|_| {
                    ReplyError::with_message(
                        ErrorCode::BadRequest,
                        "publication data on a rule channel must be {\"name\": string, \"data\": any}",
                    )
                })?;
                named.name
            }
            None => String::new(),
        };
        Ok(Publication {
            channel,
            data,
            publisher,
            rule,
            name,
        })
    }

    /// Publishes: through the channel's rule to its target, or into the history with
    /// `relay.publish_json()`. Answers once the publication is in the history (read-your-writes,
    /// [`fence`]), so a history read after it sees it. For the server API on a channel without a
    /// rule, the answer is where the publication landed, when that can be told
    /// ([`history::publish_located`]); otherwise `None` (a writer may turn one publish into any
    /// number of rows, or none).
    pub(crate) async fn publish(&self, p: Publication) -> NodeResult<Option<Located>> {
        let located = match (&p.rule, &p.publisher) {
            (Some(rule), _) => {
                self.publish_to_target(&p, rule).await?;
                None
            }
            (None, Publisher::Api { .. }) => {
                history::publish_located(&self.pool, &p.channel, &p.data)
                    .await
                    .map_err(|e| publish_failed(&p.channel, &e))?
            }
            (None, Publisher::Client { info, .. }) => {
                history::publish(&self.pool, &p.channel, &p.data, info)
                    .await
                    .map_err(|e| publish_failed(&p.channel, &e))?;
                None
            }
        };
        self.metrics.publications_in.inc();
        Ok(located)
    }

    async fn publish_to_target(&self, p: &Publication, rule: &Rule) -> NodeResult<()> {
        let named = NamedData {
            name: p.name.clone(),
            data: serde_json::from_str::<NamedData<'_>>(p.data.get())
                .ok()
                .and_then(|n| n.data),
        };
        let message_id = match &p.publisher {
            Publisher::Api {
                message_id: Some(id),
            } => id.clone(),
            _ => uuid::Uuid::new_v4().to_string(),
        };
        let (sender, connection) = p.publisher.ids();
        let envelope = rules::envelope(&p.channel, sender, connection, &named, message_id);
        let delivered =
            rules::deliver_limited(&self.targets, &self.http, &self.lambda, rule, &envelope).await;
        match delivered {
            Ok(()) => {
                fence::settle(&self.pool).await;
                Ok(())
            }
            // A per-message refusal of the target is the publisher's error reply, with the
            // target's reason (codes 420-422).
            Err(rules::TargetError::Refused(r)) => {
                tracing::info!(channel = %p.channel, status = r.status.as_str(), reason = %r.reason, "publish refused by the target");
                Err(r.reply_error().into())
            }
            Err(e) => {
                tracing::warn!(channel = %p.channel, error = %e, "publish target failed");
                Err(e.reply_error("publish").into())
            }
        }
    }

    /// The `rpc[]` rule of `method`; 108 for a method without one.
    pub(crate) fn rpc_rule(&self, method: &str) -> NodeResult<Rule> {
        self.config
            .rpc
            .first_match(method)
            .cloned()
            .ok_or_else(|| ErrorCode::NotAvailable.into())
    }

    /// Calls the rpc `rule` with `method` and `data` as `sender` on `connection`: the data of the
    /// target's answer, or its refusal or failure as an error reply.
    pub(crate) async fn rpc(
        &self,
        rule: &Rule,
        method: &str,
        data: Option<&RawValue>,
        (sender, connection): (&str, &str),
    ) -> NodeResult<Option<Box<RawValue>>> {
        let named = NamedData {
            name: method.to_owned(),
            data,
        };
        let message_id = uuid::Uuid::new_v4().to_string();
        let envelope = rules::rpc_envelope(method, sender, connection, &named, message_id);
        let answer =
            rules::call_limited(&self.targets, &self.http, &self.lambda, rule, &envelope).await;
        match answer {
            Ok(data) => Ok(data),
            Err(rules::TargetError::Refused(r)) => {
                tracing::info!(method, status = r.status.as_str(), reason = %r.reason, "rpc refused by the target");
                Err(r.reply_error().into())
            }
            Err(e) => {
                tracing::warn!(method, error = %e, "rpc target failed");
                Err(e.reply_error("rpc").into())
            }
        }
    }
}
