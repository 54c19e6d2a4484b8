//! The connector's configuration: `config.json`, overridden by environment variables, parsed into
//! ready-to-use types and validated once at start-up. Every limit of the server lives here.
//!
//! Environment overrides: `DATABASE_URL` (database.url), `RELAY_LISTEN` (listen), and any key as
//! `RELAY__SECTION__KEY` (for example `RELAY__CLIENT__PING_INTERVAL_SECS=5`).
//!
//! This module is a leaf: it imports `relay_protocol` and [`crate::error`] and no feature of the
//! connector; the features take their section. One file per section:
//! - [`client`], [`database`] (with `stream`), [`mappings`] (the channel-template parser),
//!   [`rules`], [`retention`], [`presence`], [`channels`] (permissions), [`auth`] (keys loaded
//!   here), [`api`], [`demo`], [`capture`];
//! - [`channel_rules`]: [`ChannelRules`], the one first-match-wins list by channel pattern
//!   (permissions, presence, retention and publish rules), compiled at load;
//! - [`duration`]: `*_secs` / `*_ms` keys as [`Duration`](std::time::Duration)s (numbers in the
//!   key's unit, or humantime text such as `"250ms"`).
//!
//! Errors are one [`ConfigError`] with the field's path and a problem that names the valid values.

pub(crate) mod api;
pub(crate) mod auth;
pub(crate) mod capture;
pub(crate) mod channel_rules;
pub(crate) mod channels;
pub(crate) mod client;
pub(crate) mod database;
pub(crate) mod demo;
pub(crate) mod duration;
pub(crate) mod mappings;
pub(crate) mod presence;
pub(crate) mod retention;
pub(crate) mod rules;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use self::api::ApiConfig;
pub use self::auth::{AuthConfig, AuthKeys};
pub use self::capture::{CaptureConfig, CaptureMode, is_slot_name};
pub use self::channel_rules::{ChannelRules, PatternEntry};
pub use self::channels::{Access, ChannelRule, DeltaType, Level};
pub use self::client::{Cidr, ClientConfig};
pub use self::database::{DatabaseConfig, StreamConfig};
pub use self::demo::DemoConfig;
pub use self::mappings::{
    ChannelTemplate, Mapping, Operation, TemplatePart, is_ident, is_table_channel, mapping_pattern,
    parse_template,
};
pub use self::presence::{Engine, PresenceConfig, PresenceRule};
pub use self::retention::{RetentionConfig, RetentionRule};
pub use self::rules::{Rule, Target};
pub use crate::error::ConfigError;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP/WebSocket listener (default `0.0.0.0:8000`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The database.
    pub database: DatabaseConfig,
    /// The change stream.
    #[serde(default)]
    pub stream: StreamConfig,
    /// Client connections and their limits.
    #[serde(default)]
    pub client: ClientConfig,
    /// Table → channel mappings; a trigger is generated for each.
    #[serde(default)]
    pub mappings: Vec<Mapping>,
    /// Channel pattern → publish target rules (first match wins).
    #[serde(default)]
    pub rules: ChannelRules<Rule>,
    /// Method pattern → target rules for client `rpc` calls (first match wins; key `method`
    /// instead of `channel`); a method without a rule is answered 108 "not available".
    #[serde(default)]
    pub rpc: ChannelRules<Rule>,
    /// Token verification: JWT keys, audience, issuer.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Channel permissions by pattern (first match wins; when non-empty, unmatched channels are refused).
    #[serde(default)]
    pub channels: ChannelRules<ChannelRule>,
    /// Seconds given to sessions to close on shutdown (default 10).
    #[serde(
        default = "default_shutdown_grace",
        deserialize_with = "duration::whole_secs"
    )]
    pub shutdown_grace_secs: u64,
    /// History retention: per channel pattern, by count and by age (first match wins).
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Presence: which channels have it, member caps, the node heartbeat.
    #[serde(default)]
    pub presence: PresenceConfig,
    /// The HTTP server API (`/api`); off without a key.
    #[serde(default)]
    pub api: ApiConfig,
    /// The demo token endpoint (off by default; never in production).
    #[serde(default)]
    pub demo: DemoConfig,
    /// Change capture: `trigger` (default) or `wal` (logical replication).
    #[serde(default)]
    pub capture: CaptureConfig,
}

fn default_listen() -> String {
    "0.0.0.0:8000".to_owned()
}

fn default_shutdown_grace() -> u64 {
    10
}

impl Config {
    /// Loads the file at `path`, applies environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let env = config::Environment::with_prefix("RELAY")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        Self::load_with(path, env)
    }

    /// [`Config::load`] with the `RELAY__…` variables from `env`.
    fn load_with(path: &Path, env: config::Environment) -> Result<Self, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Json))
            .add_source(env)
            .set_override_option("database.url", std::env::var("DATABASE_URL").ok())
            .and_then(|b| b.set_override_option("listen", std::env::var("RELAY_LISTEN").ok()))
            .map_err(ConfigError::load)?
            .build()
            .map_err(ConfigError::load)?;
        let config: Config = serde_path_to_error::deserialize(raw).map_err(at_path)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates configuration from a JSON string (no environment overrides).
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let mut de = serde_json::Deserializer::from_str(json);
        let config: Config = serde_path_to_error::deserialize(&mut de).map_err(at_path)?;
        de.end().map_err(ConfigError::load)?;
        config.validate()?;
        Ok(config)
    }

    /// The listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!("{:?} is not an address like 0.0.0.0:8000", self.listen),
            )
        })
    }

    /// How long sessions get to close on shutdown (`shutdown_grace_secs`).
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Checks every field; the error names the field and the problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if self.demo.token_endpoint && self.auth.hmac_secret_key.is_none() {
            return Err(invalid(
                "demo.token_endpoint",
                "needs auth.hmac_secret_key: the endpoint mints HS256 connection tokens",
            ));
        }
        check_range("demo.token_ttl_secs", self.demo.ttl(), 60, 7 * 86_400)?;
        self.database.validate()?;
        self.stream.validate()?;
        self.client.validate()?;
        check_range("shutdown_grace_secs", self.shutdown_grace_secs, 0, 600)?;
        self.auth.check()?;
        channels::check(&self.channels)?;
        self.presence.validate()?;
        self.api.validate()?;
        self.capture.validate()?;
        self.retention.validate()?;
        for (i, m) in self.mappings.iter().enumerate() {
            m.check(&format!("mappings[{i}]"))?;
        }
        self.check_mappings_against_rules()?;
        rules::validate(&self.rules, "rules")?;
        rules::validate(&self.rpc, "rpc")
    }

    /// A mapping listed twice would capture every change twice (one trigger, or two on one
    /// channel); a fixed mapping channel that a rule also binds could never be published on.
    fn check_mappings_against_rules(&self) -> Result<(), ConfigError> {
        for (i, m) in self.mappings.iter().enumerate() {
            if let Some(j) = self.mappings[..i]
                .iter()
                .position(|o| o.identity() == m.identity())
            {
                return Err(invalid(
                    &format!("mappings[{i}]"),
                    format!(
                        "duplicates mappings[{j}] (same table, operations, channel and columns)"
                    ),
                ));
            }
            if m.channel.is_fixed()
                && let Some(j) = self.rules.position(&m.channel)
            {
                return Err(invalid(
                    &format!("mappings[{i}].channel"),
                    format!(
                        "{:?} is also bound by rules[{j}]: a table-fed channel cannot be published on, \
                         so the rule would never run; use another channel",
                        m.channel.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A deserialization error, with the path of the field it happened at.
fn at_path<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ConfigError {
    let path = e.path().to_string();
    let field = if path == "." { String::new() } else { path };
    ConfigError::new(field, e.inner().to_string())
}

pub(crate) fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} is out of range {min}..={max}"),
        ))
    }
}

pub(crate) fn invalid(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::new(field, problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"{"database":{"url":"postgres://u@h/db"}}"#;

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::from_json(MIN).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8000");
        assert_eq!(c.client.ping_interval_secs, 25);
    }

    #[test]
    fn shipped_config_is_valid() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config.json"))
            .unwrap();
        let c = Config::from_json(&text).unwrap();
        assert!(c.rules.first_match("outgoing-chat").is_some());
        assert!(is_table_channel(&c.mappings, "incoming-chat"));
    }

    fn err(json: &str) -> String {
        Config::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(r#"{"database":{"url":"mysql://x"}}"#);
        assert!(e.contains("database.url"), "{e}");
        let e = err(
            r#"{"database":{"url":"postgres://x"},"mappings":[{"table":"t; drop","operations":["INSERT"],"channel":"c"}]}"#,
        );
        assert!(e.contains("mappings[0].table"), "{e}");
        let e = err(
            r#"{"database":{"url":"postgres://x"},"mappings":[{"table":"t","operations":[],"channel":"c"}]}"#,
        );
        assert!(e.contains("mappings[0].operations"), "{e}");
        let e = err(
            r#"{"database":{"url":"postgres://x"},"mappings":[{"table":"t","operations":["INSERT"],"channel":"room:{id"}]}"#,
        );
        assert!(e.contains("mappings[0].channel"), "{e}");
        let e = err(
            r#"{"database":{"url":"postgres://x"},"rules":[{"channel":"a","target":{"type":"http","url":"ftp://x"}}]}"#,
        );
        assert!(e.contains("rules[0].target.url"), "{e}");
        let e = err(r#"{"database":{"url":"postgres://x"},"client":{"ping_interval_secs":0}}"#);
        assert!(e.contains("client.ping_interval_secs"), "{e}");
        let e = err(r#"{"database":{"url":"postgres://x"},"bogus":1}"#);
        assert!(e.contains("bogus"), "{e}");
        let e = err(
            r#"{"database":{"url":"postgres://x"},"rpc":[{"method":"a","target":{"type":"http","url":"ftp://x"}}]}"#,
        );
        assert!(e.contains("rpc[0].target.url"), "{e}");
        let e = err(
            r#"{"database":{"url":"postgres://x"},"channels":[{"channel":"a","allowed_delta_types":["xdelta"]}]}"#,
        );
        assert!(
            e.contains("allowed_delta_types") && e.contains("fossil"),
            "{e}"
        );
    }

    #[test]
    fn rpc_rules_and_delta_channels() {
        let c = Config::from_json(
            r#"{"database":{"url":"postgres://x"},
                "rpc":[{"method":"app.*","target":{"type":"http","url":"http://127.0.0.1:1/rpc"}}],
                "channels":[{"channel":"d:*","subscribe":"anyone","allowed_delta_types":["fossil"]},
                            {"channel":"*","subscribe":"anyone"}]}"#,
        )
        .unwrap();
        assert_eq!(c.rpc.first_match("app.echo").unwrap().channel, "app.*");
        assert!(c.rpc.first_match("other").is_none());
        assert!(
            c.rules.first_match("app.echo").is_none(),
            "rpc rules are not publish rules"
        );
        assert!(c.channels.delta_allowed("d:1", DeltaType::Fossil));
        assert!(!c.channels.delta_allowed("e:1", DeltaType::Fossil));
    }

    #[test]
    fn lambda_targets_without_endpoint_invoke_aws() {
        let rule = |target: &str| {
            format!(
                r#"{{"database":{{"url":"postgres://x"}},"rules":[{{"channel":"outgoing-chat","target":{target}}}]}}"#
            )
        };
        let c = Config::from_json(&rule(r#"{"type":"lambda","function":"chat-writer"}"#)).unwrap();
        assert!(matches!(
            &c.rules[0].target,
            Target::Lambda {
                endpoint: None,
                region: None,
                ..
            }
        ));
        let c = Config::from_json(&rule(
            r#"{"type":"lambda","function":"arn:aws:lambda:eu-west-1:123456789012:function:chat-writer:live","region":"eu-west-1"}"#,
        ))
        .unwrap();
        assert!(matches!(
            &c.rules[0].target,
            Target::Lambda { region: Some(r), .. } if r == "eu-west-1"
        ));
        Config::from_json(&rule(
            r#"{"type":"lambda","function":"chat-writer","region":"us-gov-west-1"}"#,
        ))
        .unwrap();
        let e = err(&rule(
            r#"{"type":"lambda","function":"chat-writer","region":"US East"}"#,
        ));
        assert!(e.contains("rules[0].target.region"), "{e}");
        let e = err(&rule(
            r#"{"type":"lambda","function":"arn:aws:lambda:eu-west-1:123456789012:function:f","region":"us-east-1"}"#,
        ));
        assert!(
            e.contains("rules[0].target.region") && e.contains("eu-west-1"),
            "{e}"
        );
        let e = err(&rule(
            r#"{"type":"lambda","function":"f","endpoint":"http://127.0.0.1:9000","region":"us-east-1"}"#,
        ));
        assert!(e.contains("rules[0].target.region"), "{e}");
        let e = err(&rule(
            r#"{"type":"lambda","function":"f","regoin":"us-east-1"}"#,
        ));
        assert!(e.contains("regoin"), "{e}");
        assert!(rules::is_region("ap-southeast-5") && rules::is_region("cn-north-1"));
        assert!(
            !rules::is_region("us-east")
                && !rules::is_region("-east-1")
                && !rules::is_region("us--1")
        );
    }

    #[test]
    fn durations_take_the_old_keys_and_humantime() {
        let c = Config::from_json(
            r#"{"database":{"url":"postgres://x","connect_timeout_secs":7},
                "stream":{"poll_interval_ms":100,"active_poll":"5ms","capture_check_secs":"1m"},
                "retention":{"prune_interval_secs":"2m","rules":[{"channel":"a:*","max_age_secs":"1h"}]},
                "rules":[{"channel":"out","target":{"type":"http","url":"http://127.0.0.1:1/x"},"timeout":"3s"}],
                "client":{"ping_interval_secs":"30s"}}"#,
        )
        .unwrap();
        assert_eq!(c.database.connect_timeout, Duration::from_secs(7));
        assert_eq!(c.stream.poll_interval, Duration::from_millis(100));
        assert_eq!(c.stream.active_poll, Duration::from_millis(5));
        assert_eq!(c.stream.capture_check, Duration::from_secs(60));
        assert_eq!(c.retention.prune_interval, Duration::from_secs(120));
        assert_eq!(c.retention.rule_for("a:1").max_age_secs, 3600);
        assert_eq!(
            c.rules.first_match("out").unwrap().timeout,
            Duration::from_secs(3)
        );
        assert_eq!(c.client.ping_interval_secs, 30);
        let e = err(r#"{"database":{"url":"postgres://x"},"stream":{"poll_interval_ms":5}}"#);
        assert!(
            e.contains("stream.poll_interval_ms") && e.contains("10ms..=1m"),
            "{e}"
        );
    }

    #[test]
    fn load_errors_name_the_field_and_the_valid_values() {
        let e = Config::from_json(
            r#"{"database":{"url":"postgres://x"},"channels":[{"channel":"a","subscribe":"everyone"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "channels[0].subscribe");
        assert!(e.problem.contains("\"authenticated\""), "{e}");
        let e = Config::from_json(
            r#"{"database":{"url":"postgres://x"},"client":{"trusted_proxies":["10.0.0.0/99"]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "client.trusted_proxies[0]");
        let e = Config::from_json("{").unwrap_err();
        assert!(e.to_string().starts_with("config: "), "{e}");
    }

    #[test]
    fn environment_overrides_keep_their_names() {
        let dir = std::env::temp_dir().join(format!("relay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, MIN).unwrap();
        // The `config` crate reads the process environment; this test's keys are its own.
        let source = config::Environment::with_prefix("RELAY")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(
                [
                    (
                        "RELAY__CLIENT__PING_INTERVAL_SECS".to_owned(),
                        "5".to_owned(),
                    ),
                    (
                        "RELAY__STREAM__POLL_INTERVAL_MS".to_owned(),
                        "40".to_owned(),
                    ),
                    (
                        "RELAY__PRESENCE__NODE_TTL_SECS".to_owned(),
                        "20s".to_owned(),
                    ),
                ]
                .into_iter()
                .collect(),
            ));
        let c = Config::load_with(&path, source).unwrap();
        assert_eq!(c.client.ping_interval_secs, 5);
        assert_eq!(c.stream.poll_interval, Duration::from_millis(40));
        assert_eq!(c.presence.node_ttl, Duration::from_secs(20));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
