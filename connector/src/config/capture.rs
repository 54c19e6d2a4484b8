//! `capture`: how changes reach the history (`trigger` or `wal`) and the settings of the `wal` mode.
//! Used by [`crate::capture`].

use std::time::Duration;

use serde::Deserialize;

use super::mappings::is_ident;
use crate::error::ConfigError;

/// Which capture runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum CaptureMode {
    /// Generated triggers write the changelog (any PostgreSQL).
    #[default]
    Trigger,
    /// Logical replication (pgoutput) read by a leader node; needs `wal_level = logical`.
    Wal,
}

impl TryFrom<String> for CaptureMode {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "trigger" => Ok(Self::Trigger),
            "wal" => Ok(Self::Wal),
            _ => Err(format!(
                "{s:?} is not a capture mode; valid values: \"trigger\", \"wal\""
            )),
        }
    }
}

impl CaptureMode {
    /// The value stored in `relay.settings` (`capture.mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trigger => "trigger",
            Self::Wal => "wal",
        }
    }
}

/// The `capture` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// `trigger` (default) or `wal`.
    #[serde(default)]
    pub mode: CaptureMode,
    /// `wal`: the logical replication slot (default `relay_<database>`; slots are per cluster, so
    /// two relays on one cluster need different names).
    #[serde(default)]
    pub slot: Option<String>,
    /// `wal`: the publication of the mapped tables (default `relay`).
    #[serde(default = "default_publication")]
    pub publication: String,
    /// `wal`: URL of the replication connection (default `database.listen_url`, else `database.url`);
    /// must reach PostgreSQL directly (no pooler, no RDS Proxy), with a role that has `REPLICATION`.
    #[serde(default)]
    pub replication_url: Option<String>,
    /// `wal`: time between heartbeats (a logical message that moves the slot forward on an idle
    /// database and proves the stream alive); key `heartbeat_secs`, default 10 s.
    #[serde(
        rename = "heartbeat_secs",
        alias = "heartbeat",
        default = "default_heartbeat",
        deserialize_with = "super::duration::secs"
    )]
    pub heartbeat: Duration,
    /// `wal`: most publications written per history transaction (default 5000).
    #[serde(default = "default_batch")]
    pub batch_max_publications: u32,
    /// `wal`: set `REPLICA IDENTITY FULL` on mapped tables that publish UPDATE or DELETE (default
    /// true). Without it PostgreSQL logs only the key of an old row, so `old`, a DELETE's row and a
    /// template column outside the key cannot match trigger mode; with false the connector only warns.
    #[serde(default = "yes")]
    pub set_replica_identity: bool,
}

fn default_publication() -> String {
    "relay".to_owned()
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_batch() -> u32 {
    5000
}
fn yes() -> bool {
    true
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            mode: CaptureMode::default(),
            slot: None,
            publication: default_publication(),
            replication_url: None,
            heartbeat: default_heartbeat(),
            batch_max_publications: default_batch(),
            set_replica_identity: true,
        }
    }
}

impl CaptureConfig {
    /// Checks the section; the error names the field and the problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |f: &str, p: String| Err(ConfigError::new(format!("capture.{f}"), p));
        if let Some(slot) = &self.slot
            && !is_slot_name(slot)
        {
            return bad(
                "slot",
                format!("{slot:?} is not a slot name (lowercase letters, digits, _; at most 63)"),
            );
        }
        if !is_ident(&self.publication) {
            return bad(
                "publication",
                format!("{:?} is not a plain identifier", self.publication),
            );
        }
        if let Some(u) = &self.replication_url {
            super::database::check_url("capture.replication_url", u)?;
        }
        super::duration::check(
            "capture.heartbeat_secs",
            self.heartbeat,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        if !(1..=100_000).contains(&self.batch_max_publications) {
            return bad(
                "batch_max_publications",
                format!("{} is out of range 1..=100000", self.batch_max_publications),
            );
        }
        Ok(())
    }
}

/// Whether `s` is a valid replication slot name (PostgreSQL allows lowercase letters, digits and `_`).
pub fn is_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
