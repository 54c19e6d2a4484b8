//! Channel permissions: who may subscribe to, publish on, read the history of, and see the presence
//! of a channel, configured by channel pattern in `channels[]` (the first matching entry wins).
//!
//! Decided once per command — at subscribe, publish, history or presence time — never per delivered
//! publication: fan-out does no per-subscriber checks. Channels fed by table mappings are never
//! publishable by clients, whatever an entry says (checked by the session before this module).
//!
//! When `channels` is empty every channel is open (the behaviour of earlier releases, and what a
//! development setup wants); as soon as one entry exists, the list is an allow-list and a channel that
//! matches no entry is refused.
//!
//! A user-limited entry (`"user_limited": true`) follows Centrifugo's `#` user boundary: in channel
//! `notifications#alice` (or `dm:chat#alice,bob`) only the users listed after the last `#` may use
//! the channel, on top of the entry's access levels; anonymous connections never may.

pub use crate::config::{Access, ChannelRule, Level};

use super::Identity;
use crate::config::ChannelRules;

/// The operations a permission is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `subscribe` without a subscription token.
    Subscribe,
    /// `publish`.
    Publish,
    /// `history`.
    History,
    /// `presence` and `presence_stats`.
    Presence,
}

/// Whether `who` may do `op` on `channel`; `subscribed` says whether the connection is subscribed to
/// it (for the `subscriber` level).
pub fn allowed(
    rules: &ChannelRules<ChannelRule>,
    channel: &str,
    op: Op,
    who: &Identity,
    subscribed: bool,
) -> bool {
    if rules.is_empty() {
        return true;
    }
    let Some(rule) = rules.first_match(channel) else {
        return false;
    };
    if rule.user_limited && !user_boundary_allows(channel, &who.user) {
        return false;
    }
    let subscriber = Access::Level(Level::Subscriber);
    let access = match op {
        Op::Subscribe => &rule.subscribe,
        Op::Publish => &rule.publish,
        Op::History => rule.history.as_ref().unwrap_or(&subscriber),
        Op::Presence => rule.presence.as_ref().unwrap_or(&subscriber),
    };
    match access {
        Access::Level(Level::Anyone) => true,
        Access::Level(Level::Authenticated) => !who.user.is_empty(),
        Access::Level(Level::Subscriber) => subscribed,
        Access::Level(Level::Token | Level::Nobody) => false,
        Access::Users { users } => !who.user.is_empty() && users.contains(&who.user),
        Access::Claim { claim, value } => match who.claims.get(claim) {
            Some(serde_json::Value::String(s)) => s == value,
            Some(serde_json::Value::Array(items)) => {
                items.iter().any(|v| v.as_str() == Some(value.as_str()))
            }
            _ => false,
        },
    }
}

/// Centrifugo's user boundary: the users after the channel's last `#`, comma-separated.
fn user_boundary_allows(channel: &str, user: &str) -> bool {
    if user.is_empty() {
        return false;
    }
    match channel.rsplit_once('#') {
        Some((_, users)) => users.split(',').any(|u| u == user),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::channels::check as validate;
    use serde_json::json;

    fn rules(v: serde_json::Value) -> ChannelRules<ChannelRule> {
        let r: ChannelRules<ChannelRule> = serde_json::from_value(v).unwrap();
        validate(&r).unwrap();
        r
    }

    fn user(u: &str) -> Identity {
        Identity {
            user: u.into(),
            ..Default::default()
        }
    }

    #[test]
    fn levels_and_defaults() {
        let r = rules(json!([
            {"channel": "incoming-chat", "subscribe": "anyone", "history": "anyone"},
            {"channel": "outgoing-chat", "publish": "anyone"},
            {"channel": "staff:*", "subscribe": "authenticated", "publish": {"users": ["boss"]}},
            {"channel": "admin:*", "subscribe": {"claim": "roles", "value": "admin"}},
            {"channel": "notifications#*", "subscribe": "authenticated", "user_limited": true},
        ]));
        let anon = Identity::default();
        assert!(allowed(&r, "incoming-chat", Op::Subscribe, &anon, false));
        assert!(allowed(&r, "incoming-chat", Op::History, &anon, false));
        assert!(!allowed(&r, "incoming-chat", Op::Publish, &anon, true));
        assert!(allowed(&r, "outgoing-chat", Op::Publish, &anon, false));
        assert!(!allowed(&r, "outgoing-chat", Op::Subscribe, &anon, false));
        assert!(!allowed(&r, "outgoing-chat", Op::History, &anon, false));
        assert!(!allowed(
            &r,
            "unlisted",
            Op::Subscribe,
            &user("alice"),
            false
        ));
        assert!(!allowed(&r, "staff:1", Op::Subscribe, &anon, false));
        assert!(allowed(&r, "staff:1", Op::Subscribe, &user("alice"), false));
        assert!(!allowed(&r, "staff:1", Op::History, &user("alice"), false));
        assert!(allowed(&r, "staff:1", Op::History, &user("alice"), true));
        assert!(!allowed(&r, "staff:1", Op::Publish, &user("alice"), true));
        assert!(allowed(&r, "staff:1", Op::Publish, &user("boss"), false));
        let mut admin = user("root");
        admin.claims.insert("roles".into(), json!(["ops", "admin"]));
        assert!(allowed(&r, "admin:x", Op::Subscribe, &admin, false));
        assert!(!allowed(&r, "admin:x", Op::Subscribe, &user("root"), false));
        assert!(allowed(
            &r,
            "notifications#alice",
            Op::Subscribe,
            &user("alice"),
            false
        ));
        assert!(!allowed(
            &r,
            "notifications#alice",
            Op::Subscribe,
            &user("bob"),
            false
        ));
        assert!(!allowed(
            &r,
            "notifications#alice",
            Op::Subscribe,
            &anon,
            false
        ));
        assert!(allowed(
            &r,
            "notifications#bob,alice",
            Op::Subscribe,
            &user("alice"),
            false
        ));
        assert!(!allowed(
            &r,
            "notifications#alice",
            Op::Subscribe,
            &user("alic"),
            false
        ));
        // no entries at all: everything open
        assert!(allowed(
            &ChannelRules::default(),
            "anything",
            Op::Publish,
            &anon,
            false
        ));
    }

    #[test]
    fn invalid_entries() {
        let r: ChannelRules<ChannelRule> =
            serde_json::from_value(json!([{"channel": "a", "publish": "token"}])).unwrap();
        assert_eq!(validate(&r).unwrap_err().field, "channels[0].publish");
        let r: ChannelRules<ChannelRule> =
            serde_json::from_value(json!([{"channel": "a", "subscribe": "subscriber"}])).unwrap();
        assert_eq!(validate(&r).unwrap_err().field, "channels[0].subscribe");
        assert!(
            serde_json::from_value::<Vec<ChannelRule>>(
                json!([{"channel": "a", "subscribe": "everyone"}])
            )
            .is_err()
        );
    }
}
