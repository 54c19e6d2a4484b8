//! `presence`: which channels have presence (by pattern, first match wins), member caps, the node
//! heartbeat and the reconciliation period. Used by [`crate::presence`].

use std::time::Duration;

use serde::Deserialize;

use super::channel_rules::{ChannelRules, PatternEntry};
use super::duration;
use crate::error::ConfigError;

/// The `presence` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// How long a node's members stay visible after its last heartbeat (key `node_ttl_secs`,
    /// default 15 s; heartbeats every third of it). The longest a dead node's members linger.
    #[serde(
        rename = "node_ttl_secs",
        alias = "node_ttl",
        deserialize_with = "duration::secs"
    )]
    pub node_ttl: Duration,
    /// Channels with presence, by pattern (first match wins); other channels answer presence with 108.
    pub channels: ChannelRules<PresenceRule>,
    /// Where members live: `postgres` (default; shared by every node) or `memory` (this process only).
    pub engine: Engine,
    /// How often this node's members in the store are reconciled with its live sessions (key
    /// `reconcile_interval_secs`, default 30 s): a membership whose leave failed (a pool timeout after
    /// thousands of clients vanished at once) is removed at the latest then, one the store lost is
    /// put back. 1 s–1 h.
    #[serde(
        rename = "reconcile_interval_secs",
        alias = "reconcile_interval",
        deserialize_with = "duration::secs"
    )]
    pub reconcile_interval: Duration,
}

/// The presence store of a deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// `relay.presence` in PostgreSQL, shared by every node.
    #[default]
    Postgres,
    /// This process's memory: a single node only.
    Memory,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            node_ttl: Duration::from_secs(15),
            channels: ChannelRules::default(),
            engine: Engine::default(),
            reconcile_interval: Duration::from_secs(30),
        }
    }
}

fn default_max_listed() -> u32 {
    1000
}

fn yes() -> bool {
    true
}

/// Presence settings of the channels that match `channel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceRule {
    /// Channel pattern (`*` matches any run of characters).
    pub channel: String,
    /// Subscriptions that ask for `join_leave` get join and leave pushes (default true).
    #[serde(default = "yes")]
    pub join_leave: bool,
    /// Join and leave pushes go to every subscriber that may see presence, whether or not its
    /// subscribe asked for `join_leave` (Centrifugo's `force_push_join_leave`; default false). Needs
    /// `join_leave`.
    #[serde(default)]
    pub force_push_join_leave: bool,
    /// Most members of one channel (0 = no cap, the default); a subscribe over it gets error 106.
    #[serde(default)]
    pub max_members: u32,
    /// Without a subscription token, the subscribe request's `data` (a JSON object of at most 1 KiB)
    /// becomes the member's `chan_info`: a display name that the client declares, as the chat page
    /// does for anonymous users (default false).
    #[serde(default)]
    pub info_from_subscribe_data: bool,
    /// `presence` lists one entry per user (a user's oldest connection; anonymous connections are
    /// each their own entry) instead of one per connection (default false). `presence_stats` still
    /// counts both.
    #[serde(default)]
    pub per_user: bool,
    /// Most entries a `presence` answer lists (default 1000, the oldest members first; 1–100000).
    /// `presence_stats` gives the full counts.
    #[serde(default = "default_max_listed")]
    pub max_listed: u32,
}

impl PatternEntry for PresenceRule {
    fn channel(&self) -> &str {
        &self.channel
    }
}

impl PresenceConfig {
    /// The entry for `channel`, if it has presence.
    pub fn rule_for(&self, channel: &str) -> Option<&PresenceRule> {
        self.channels.first_match(channel)
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration::check(
            "presence.node_ttl_secs",
            self.node_ttl,
            Duration::from_secs(3),
            Duration::from_secs(3600),
        )?;
        duration::check(
            "presence.reconcile_interval_secs",
            self.reconcile_interval,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        for (i, r) in self.channels.iter().enumerate() {
            if !(1..=100_000).contains(&r.max_listed) {
                return Err(ConfigError::new(
                    format!("presence.channels[{i}].max_listed"),
                    format!("{} is out of range 1..=100000", r.max_listed),
                ));
            }
        }
        self.channels.check_patterns("presence.channels")?;
        for (i, r) in self.channels.iter().enumerate() {
            if r.max_members > 1_000_000 {
                return Err(ConfigError::new(
                    format!("presence.channels[{i}].max_members"),
                    format!("{} is out of range 0..=1000000", r.max_members),
                ));
            }
        }
        Ok(())
    }
}
