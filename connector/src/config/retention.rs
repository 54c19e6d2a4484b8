//! `retention`: how much history each channel keeps (by pattern, first match wins) and how often it
//! is pruned. Used by [`crate::db::retention`] and the history writers.

use std::time::Duration;

use serde::Deserialize;

use super::channel_rules::{ChannelRules, PatternEntry};
use super::{check_range, duration};
use crate::error::ConfigError;

/// History retention and its pruning task.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Time between pruning passes (key `prune_interval_secs`, default 30 s).
    #[serde(
        rename = "prune_interval_secs",
        alias = "prune_interval",
        deserialize_with = "duration::secs"
    )]
    pub prune_interval: Duration,
    /// Rules by channel pattern; the first match wins; channels that match none use the last resort
    /// of 100000 publications and 1 day.
    pub rules: ChannelRules<RetentionRule>,
}

/// How much history a channel keeps.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Channel pattern (`*` matches any run of characters).
    pub channel: String,
    /// Most publications kept (default 100000: a busy channel keeps minutes of history to recover
    /// from).
    #[serde(default = "default_max_publications")]
    pub max_publications: u64,
    /// Oldest publication kept, in whole seconds (default 86400).
    #[serde(default = "default_max_age", deserialize_with = "duration::whole_secs")]
    pub max_age_secs: u64,
}

impl PatternEntry for RetentionRule {
    fn channel(&self) -> &str {
        &self.channel
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            prune_interval: Duration::from_secs(30),
            rules: ChannelRules::default(),
        }
    }
}

fn default_max_publications() -> u64 {
    100_000
}

fn default_max_age() -> u64 {
    86_400
}

impl RetentionConfig {
    /// The rule for `channel`.
    pub fn rule_for(&self, channel: &str) -> RetentionRule {
        self.rules
            .first_match(channel)
            .cloned()
            .unwrap_or_else(|| RetentionRule {
                channel: "*".to_owned(),
                max_publications: default_max_publications(),
                max_age_secs: default_max_age(),
            })
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration::check(
            "retention.prune_interval_secs",
            self.prune_interval,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )?;
        self.rules.check_patterns("retention.rules")?;
        for (i, r) in self.rules.iter().enumerate() {
            check_range(
                &format!("retention.rules[{i}].max_publications"),
                r.max_publications,
                1,
                100_000_000,
            )?;
            check_range(
                &format!("retention.rules[{i}].max_age_secs"),
                r.max_age_secs,
                1,
                10 * 365 * 86_400,
            )?;
        }
        Ok(())
    }
}

impl RetentionRule {
    /// A short text that changes whenever the rule's limits change (stored with each channel, so a
    /// changed rule gives the channel a new epoch).
    pub fn signature(&self) -> String {
        format!("max={};age={}", self.max_publications, self.max_age_secs)
    }
}
