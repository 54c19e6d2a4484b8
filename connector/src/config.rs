//! The connector's configuration: `config.json`, overridden by environment variables, validated once at
//! start-up. Every limit of the server lives here.
//!
//! Environment overrides: `DATABASE_URL` (database.url), `RELAY_LISTEN` (listen), and any key as
//! `RELAY__SECTION__KEY` (for example `RELAY__CLIENT__PING_INTERVAL_SECS=5`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use relay_protocol::channel::{ChannelPattern, validate_channel};
use serde::Deserialize;

use crate::error::ConfigError;

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
    /// Channel pattern → publish target rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Token verification: JWT keys, audience, issuer.
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    /// Channel permissions by pattern (first match wins; when non-empty, unmatched channels are refused).
    #[serde(default)]
    pub channels: Vec<crate::auth::ChannelRule>,
    /// Seconds given to sessions to close on shutdown (default 10).
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// History retention: per channel pattern, by count and by age (first match wins).
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Presence: which channels have it, member caps, the node heartbeat.
    #[serde(default)]
    pub presence: crate::presence::PresenceConfig,
    /// The HTTP server API (`/api`); off without a key.
    #[serde(default)]
    pub api: crate::api::ApiConfig,
    /// The demo token endpoint (off by default; never in production).
    #[serde(default)]
    pub demo: crate::demo::DemoConfig,
    /// Change capture: `trigger` (default) or `wal` (logical replication).
    #[serde(default)]
    pub capture: crate::capture::CaptureConfig,
}

/// History retention and its pruning task.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Seconds between pruning passes (default 30).
    #[serde(default = "default_prune_interval")]
    pub prune_interval_secs: u64,
    /// Rules by channel pattern; the first match wins; channels that match none use the last resort
    /// of 100000 publications and 1 day.
    #[serde(default)]
    pub rules: Vec<RetentionRule>,
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
    /// Oldest publication kept, in seconds (default 86400).
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            prune_interval_secs: default_prune_interval(),
            rules: Vec::new(),
        }
    }
}

impl RetentionConfig {
    /// The rule for `channel`.
    pub fn rule_for(&self, channel: &str) -> RetentionRule {
        self.rules
            .iter()
            .find(|r| ChannelPattern::new(&r.channel).matches(channel))
            .cloned()
            .unwrap_or_else(|| RetentionRule {
                channel: "*".to_owned(),
                max_publications: default_max_publications(),
                max_age_secs: default_max_age(),
            })
    }
}

impl RetentionRule {
    /// A short text that changes whenever the rule's limits change (stored with each channel, so a
    /// changed rule gives the channel a new epoch).
    pub fn signature(&self) -> String {
        format!("max={};age={}", self.max_publications, self.max_age_secs)
    }
}

fn default_prune_interval() -> u64 {
    30
}
fn default_max_publications() -> u64 {
    100_000
}
fn default_max_age() -> u64 {
    86_400
}

/// Database settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connection URL for queries (may go through a pooler in session or transaction mode).
    pub url: String,
    /// Direct connection URL for LISTEN (never through a transaction-mode pooler); default `url`.
    #[serde(default)]
    pub listen_url: Option<String>,
    /// Query pool size (default 10).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Seconds to wait for a connection (default 5).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
}

/// Change-stream settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Safety-net poll interval in milliseconds (default 250): bounds the delay when a NOTIFY is lost.
    #[serde(default = "default_poll_interval")]
    pub poll_interval_ms: u64,
    /// Changes moved or read per query (default 1000).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// The sequencer's poll interval in milliseconds while changes flow (default 2). Writers do not
    /// NOTIFY while the sequencer polls, so this bounds the delay a change waits to be sequenced.
    #[serde(default = "default_active_poll")]
    pub active_poll_ms: u64,
    /// Seconds between checks that this node's capture triggers are still in place as it installed
    /// them (default 5; also the period of its entry in the capture-owner registry, which lives 3×
    /// this, at least 15 s). A node whose capture was changed is not ready until it is back.
    #[serde(default = "default_capture_check")]
    pub capture_check_secs: u64,
}

/// Client-connection settings and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Accept connections without a token (default true; JWT arrives in a later release).
    #[serde(default = "yes")]
    pub allow_anonymous: bool,
    /// Clients may publish on channels that have neither a rule nor a table mapping (default false).
    #[serde(default)]
    pub allow_publish: bool,
    /// Server ping interval in seconds (default 25).
    #[serde(default = "default_ping")]
    pub ping_interval_secs: u64,
    /// Seconds to wait for a pong before disconnecting with 3012 (default 10).
    #[serde(default = "default_pong")]
    pub pong_timeout_secs: u64,
    /// Largest accepted WebSocket message in bytes (default 65536); larger closes with 1009.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Pushes buffered per connection before it counts as slow and is disconnected with 3008
    /// (default 16384: a safety net; `outbound_queue_bytes` is the limit that normally counts, so a
    /// client that keeps up is not cut off by one large transaction's burst).
    #[serde(default = "default_outbound_queue")]
    pub outbound_queue: usize,
    /// The connection's outbound byte budget (default 16 MiB): pushes waiting in its mailbox plus
    /// replies being written. Pushes over it close the connection as slow (3008); the replies to one
    /// frame may use what pushes leave of it, less an eighth kept for the pushes that arrive while
    /// they are written: a reply that does not fit is an error (106) or, for a recovery,
    /// `recovered: false`.
    #[serde(default = "default_outbound_queue_bytes")]
    pub outbound_queue_bytes: usize,
    /// Bytes of large replies (history, presence, recovery) held by all connections of the process
    /// at once, from their read until their write completes (default 256 MiB). A reply that would
    /// pass it is error 111 (temporary: the SDK retries), so many connections asking for large
    /// replies at once, or not reading them, cannot add up to more memory than this.
    #[serde(default = "default_replies_in_flight")]
    pub replies_in_flight_bytes: usize,
    /// Most publications returned by one history call (default 300).
    #[serde(default = "default_history_limit")]
    pub history_max_limit: u32,
    /// Most publications a recovery returns; more means `recovered: false` (default 1000000: the
    /// byte budget, `outbound_queue_bytes`, is what normally bounds a recovery).
    #[serde(default = "default_recovery_max")]
    pub recovery_max_publications: u32,
    /// Most channels one connection may subscribe to (default 128).
    #[serde(default = "default_max_channels")]
    pub max_channels_per_connection: usize,
    /// Most publishes of one connection waiting for their target at once (default 16).
    #[serde(default = "default_max_pending")]
    pub max_pending_publishes: usize,
    /// Seconds a new connection has to send `connect` (default 15).
    #[serde(default = "default_connect_timeout_client")]
    pub connect_timeout_secs: u64,
    /// Seconds a write to the socket may take before the connection counts as dead (default 10).
    #[serde(default = "default_write_timeout")]
    pub write_timeout_secs: u64,
    /// Publishes per second one connection may sustain (token bucket; default 10); over → error 111.
    #[serde(default = "default_publish_rate")]
    pub publish_rate_per_sec: u32,
    /// Publishes one connection may send in a burst (bucket size; default 20).
    #[serde(default = "default_publish_burst")]
    pub publish_burst: u32,
    /// Most WebSocket connections this process serves (default 10000); over → HTTP 503 before upgrade.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Browser origins allowed to open WebSockets (`https://app.example.com`, `*` globs allowed, `"*"`
    /// = any). Unset: same origin only (the `Origin` must match `Host`). Requests without an `Origin`
    /// (non-browser clients) always pass. Disallowed → HTTP 403 before upgrade.
    #[serde(default)]
    pub allowed_origins: Option<Vec<String>>,
    /// Seconds a TCP connection has to send a complete HTTP request head (default 10): a connection
    /// that sends nothing, or half a header, is closed. It also closes idle HTTP keep-alive
    /// connections. An upgraded WebSocket is no longer subject to it.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// Most TCP connections that are not (yet) WebSockets at once (default 1024). A new one over it
    /// closes the oldest of them, so health checks and new clients always get through while idle
    /// sockets cost at most this many file descriptors.
    #[serde(default = "default_max_pending_connections")]
    pub max_pending_connections: usize,
    /// Subscribes per second one connection may sustain (token bucket; default 10); over → error
    /// 111. An unsubscribe always succeeds but spends a token too.
    #[serde(default = "default_subscribe_rate")]
    pub subscribe_rate_per_sec: u32,
    /// Subscribes one connection may send in a burst (default 160: a first frame subscribing to
    /// every allowed channel passes).
    #[serde(default = "default_subscribe_burst")]
    pub subscribe_burst: u32,
    /// Publishes per second from one client IP, over all its connections (default 50); over → 111.
    #[serde(default = "default_ip_publish_rate")]
    pub publish_rate_per_ip_per_sec: u32,
    /// Burst of publishes from one client IP (default 100).
    #[serde(default = "default_ip_publish_burst")]
    pub publish_burst_per_ip: u32,
    /// Publishes per second of one authenticated user, over all its connections and nodes' local
    /// share (per process; default 20); over → 111.
    #[serde(default = "default_user_publish_rate")]
    pub publish_rate_per_user_per_sec: u32,
    /// Burst of publishes of one authenticated user (default 40).
    #[serde(default = "default_user_publish_burst")]
    pub publish_burst_per_user: u32,
    /// Proxies whose `X-Forwarded-For` is believed (IPs or CIDRs, e.g. the load balancer's subnet
    /// `10.0.0.0/16`); default none: the client IP is the socket's peer. From a trusted peer, the
    /// client IP is the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// An operation a mapping captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    /// Row inserted.
    Insert,
    /// Row updated.
    Update,
    /// Row deleted.
    Delete,
}

impl Operation {
    /// The SQL keyword.
    pub fn sql(self) -> &'static str {
        match self {
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
        }
    }
}

/// A table mapping: changes of `table` (for `operations`) are published on `channel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Schema of the table (default `public`).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// The table.
    pub table: String,
    /// The operations captured.
    pub operations: Vec<Operation>,
    /// A fixed channel (`incoming-chat`) or a template filled from the row (`room:{room_id}`).
    pub channel: String,
    /// Only these columns leave the database (default: all).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

/// A publish rule: client publications on matching channels go to `target`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Channel pattern (`*` matches any run of characters).
    pub channel: String,
    /// Where publications go.
    pub target: Target,
    /// Milliseconds the whole delivery may take, retries included (default 4000: below the SDKs'
    /// 5 s publish timeout).
    #[serde(default = "default_rule_timeout")]
    pub timeout_ms: u64,
    /// Retries after a failure a retry can cure (unreachable, timeout, throttled, 5xx); default 2.
    #[serde(default = "default_rule_retries")]
    pub retries: u32,
    /// Milliseconds before the first retry, doubling after each (default 100).
    #[serde(default = "default_retry_backoff")]
    pub retry_backoff_ms: u64,
    /// Most deliveries to this rule's target at once, from this process (default 32). A publish
    /// that finds them all busy waits for a free one within `timeout_ms`, else error 111.
    #[serde(default = "default_rule_concurrency")]
    pub max_concurrency: u32,
}

/// A publish target.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// An AWS Lambda function, invoked through the Lambda Invoke API: in AWS (signed with the standard
    /// credential chain: environment, profile, web identity, ECS task role, EC2 instance role), or at
    /// `endpoint` (the local writer).
    Lambda {
        /// Function name, partial ARN or ARN (optionally with a `:qualifier`).
        function: String,
        /// Base URL of an Invoke API endpoint (the local writer: `http://127.0.0.1:9000`); when absent,
        /// the real AWS Lambda is invoked.
        #[serde(default)]
        endpoint: Option<String>,
        /// AWS region of the function (default: the standard chain, `AWS_REGION` and the AWS profile);
        /// only without `endpoint`.
        #[serde(default)]
        region: Option<String>,
    },
    /// An HTTP webhook: the envelope is POSTed as JSON; any 2xx is success.
    Http {
        /// The webhook URL.
        url: String,
    },
}

/// A part of a channel template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// Literal text.
    Literal(String),
    /// A column whose value is inserted.
    Column(String),
}

fn default_listen() -> String {
    "0.0.0.0:8000".to_owned()
}
fn default_shutdown_grace() -> u64 {
    10
}
fn default_pool_size() -> u32 {
    10
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_poll_interval() -> u64 {
    250
}
fn default_capture_check() -> u64 {
    5
}
fn default_batch_size() -> u32 {
    1000
}
fn default_active_poll() -> u64 {
    2
}
fn yes() -> bool {
    true
}
fn default_ping() -> u64 {
    25
}
fn default_pong() -> u64 {
    10
}
fn default_max_message() -> usize {
    65536
}
fn default_outbound_queue_bytes() -> usize {
    16 << 20
}
fn default_replies_in_flight() -> usize {
    256 << 20
}
fn default_recovery_max() -> u32 {
    1_000_000
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_max_pending_connections() -> usize {
    1024
}
fn default_subscribe_rate() -> u32 {
    10
}
fn default_subscribe_burst() -> u32 {
    160
}
fn default_ip_publish_rate() -> u32 {
    50
}
fn default_ip_publish_burst() -> u32 {
    100
}
fn default_user_publish_rate() -> u32 {
    20
}
fn default_user_publish_burst() -> u32 {
    40
}
fn default_rule_concurrency() -> u32 {
    32
}
fn default_outbound_queue() -> usize {
    16_384
}
fn default_history_limit() -> u32 {
    300
}
fn default_max_channels() -> usize {
    128
}
fn default_max_pending() -> usize {
    16
}
fn default_connect_timeout_client() -> u64 {
    15
}
fn default_write_timeout() -> u64 {
    10
}
fn default_publish_rate() -> u32 {
    10
}
fn default_publish_burst() -> u32 {
    20
}
fn default_max_connections() -> usize {
    10_000
}
fn default_schema() -> String {
    "public".to_owned()
}
fn default_rule_timeout() -> u64 {
    4_000
}
fn default_rule_retries() -> u32 {
    2
}
fn default_retry_backoff() -> u64 {
    100
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: default_poll_interval(),
            batch_size: default_batch_size(),
            active_poll_ms: default_active_poll(),
            capture_check_secs: default_capture_check(),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            allow_publish: false,
            ping_interval_secs: default_ping(),
            pong_timeout_secs: default_pong(),
            max_message_bytes: default_max_message(),
            outbound_queue: default_outbound_queue(),
            outbound_queue_bytes: default_outbound_queue_bytes(),
            history_max_limit: default_history_limit(),
            recovery_max_publications: default_recovery_max(),
            replies_in_flight_bytes: default_replies_in_flight(),
            max_channels_per_connection: default_max_channels(),
            max_pending_publishes: default_max_pending(),
            connect_timeout_secs: default_connect_timeout_client(),
            write_timeout_secs: default_write_timeout(),
            publish_rate_per_sec: default_publish_rate(),
            publish_burst: default_publish_burst(),
            max_connections: default_max_connections(),
            allowed_origins: None,
            handshake_timeout_secs: default_handshake_timeout(),
            max_pending_connections: default_max_pending_connections(),
            subscribe_rate_per_sec: default_subscribe_rate(),
            subscribe_burst: default_subscribe_burst(),
            publish_rate_per_ip_per_sec: default_ip_publish_rate(),
            publish_burst_per_ip: default_ip_publish_burst(),
            publish_rate_per_user_per_sec: default_user_publish_rate(),
            publish_burst_per_user: default_user_publish_burst(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl Config {
    /// Loads the file at `path`, applies environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Json))
            .add_source(
                config::Environment::with_prefix("RELAY")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .set_override_option("database.url", std::env::var("DATABASE_URL").ok())
            .and_then(|b| b.set_override_option("listen", std::env::var("RELAY_LISTEN").ok()))
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let config: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates configuration from a JSON string (no environment overrides).
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Config =
            serde_json::from_str(json).map_err(|e| ConfigError::Load(e.to_string()))?;
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
        let url = &self.database.url;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if let Some(l) = &self.database.listen_url
            && !(l.starts_with("postgres://") || l.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.listen_url",
                "must start with postgres:// or postgresql://",
            ));
        }
        check_range(
            "database.pool_size",
            self.database.pool_size.into(),
            1,
            1000,
        )?;
        check_range(
            "database.connect_timeout_secs",
            self.database.connect_timeout_secs,
            1,
            300,
        )?;
        check_range(
            "stream.poll_interval_ms",
            self.stream.poll_interval_ms,
            10,
            60_000,
        )?;
        check_range(
            "stream.active_poll_ms",
            self.stream.active_poll_ms,
            1,
            1_000,
        )?;
        check_range(
            "stream.capture_check_secs",
            self.stream.capture_check_secs,
            1,
            3600,
        )?;
        check_range(
            "stream.batch_size",
            self.stream.batch_size.into(),
            1,
            100_000,
        )?;
        let c = &self.client;
        check_range("client.ping_interval_secs", c.ping_interval_secs, 1, 3600)?;
        check_range("client.pong_timeout_secs", c.pong_timeout_secs, 1, 3600)?;
        if c.pong_timeout_secs >= c.ping_interval_secs + 10 {
            return Err(invalid(
                "client.pong_timeout_secs",
                "must be less than ping_interval_secs + 10 (the SDKs' own ping watchdog slack)",
            ));
        }
        check_range(
            "client.max_message_bytes",
            c.max_message_bytes as u64,
            1024,
            16 << 20,
        )?;
        check_range(
            "client.outbound_queue",
            c.outbound_queue as u64,
            8,
            1_000_000,
        )?;
        check_range(
            "client.outbound_queue_bytes",
            c.outbound_queue_bytes as u64,
            64 << 10,
            1 << 30,
        )?;
        check_range(
            "client.history_max_limit",
            c.history_max_limit.into(),
            1,
            100_000,
        )?;
        check_range(
            "client.recovery_max_publications",
            c.recovery_max_publications.into(),
            1,
            100_000_000,
        )?;
        check_range(
            "client.replies_in_flight_bytes",
            c.replies_in_flight_bytes as u64,
            64 << 10,
            1 << 40,
        )?;
        check_range(
            "client.handshake_timeout_secs",
            c.handshake_timeout_secs,
            1,
            600,
        )?;
        check_range(
            "client.max_pending_connections",
            c.max_pending_connections as u64,
            1,
            10_000_000,
        )?;
        for (field, value) in [
            ("client.subscribe_rate_per_sec", c.subscribe_rate_per_sec),
            ("client.subscribe_burst", c.subscribe_burst),
            (
                "client.publish_rate_per_ip_per_sec",
                c.publish_rate_per_ip_per_sec,
            ),
            ("client.publish_burst_per_ip", c.publish_burst_per_ip),
            (
                "client.publish_rate_per_user_per_sec",
                c.publish_rate_per_user_per_sec,
            ),
            ("client.publish_burst_per_user", c.publish_burst_per_user),
        ] {
            check_range(field, value.into(), 1, 1_000_000)?;
        }
        for (i, proxy) in c.trusted_proxies.iter().enumerate() {
            if crate::limits::Cidr::parse(proxy).is_none() {
                return Err(invalid(
                    &format!("client.trusted_proxies[{i}]"),
                    format!("{proxy:?} is not an IP address or CIDR like 10.0.0.0/16"),
                ));
            }
        }
        check_range(
            "client.max_channels_per_connection",
            c.max_channels_per_connection as u64,
            1,
            100_000,
        )?;
        check_range(
            "client.max_pending_publishes",
            c.max_pending_publishes as u64,
            1,
            10_000,
        )?;
        check_range(
            "client.connect_timeout_secs",
            c.connect_timeout_secs,
            1,
            600,
        )?;
        check_range("shutdown_grace_secs", self.shutdown_grace_secs, 0, 600)?;
        check_range(
            "client.publish_rate_per_sec",
            c.publish_rate_per_sec.into(),
            1,
            1_000_000,
        )?;
        check_range("client.publish_burst", c.publish_burst.into(), 1, 1_000_000)?;
        check_range(
            "client.max_connections",
            c.max_connections as u64,
            1,
            10_000_000,
        )?;
        if let Some(origins) = &c.allowed_origins
            && let Some(bad) = origins.iter().find(|o| o.is_empty() || o.ends_with('/'))
        {
            return Err(invalid(
                "client.allowed_origins",
                format!(
                    "{bad:?} is not an origin like https://app.example.com (no path, no trailing /)"
                ),
            ));
        }
        crate::auth::validate_config(self).map_err(|(field, problem)| invalid(&field, problem))?;
        self.presence
            .validate()
            .map_err(|(field, problem)| invalid(&field, problem))?;
        self.api
            .validate()
            .map_err(|(field, problem)| invalid(&field, problem))?;
        self.capture
            .validate()
            .map_err(|(field, problem)| invalid(&field, problem))?;
        check_range(
            "retention.prune_interval_secs",
            self.retention.prune_interval_secs,
            1,
            86_400,
        )?;
        for (i, r) in self.retention.rules.iter().enumerate() {
            if r.channel.is_empty()
                || r.channel.len() > 255
                || !r.channel.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    &format!("retention.rules[{i}].channel"),
                    "must be 1-255 printable ASCII characters without spaces",
                ));
            }
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

        for (i, m) in self.mappings.iter().enumerate() {
            let field = |f: &str| format!("mappings[{i}].{f}");
            check_ident(&field("schema"), &m.schema)?;
            check_ident(&field("table"), &m.table)?;
            if m.operations.is_empty() {
                return Err(invalid(
                    &field("operations"),
                    "must name at least one of INSERT, UPDATE, DELETE",
                ));
            }
            let mut seen = HashSet::new();
            for op in &m.operations {
                if !seen.insert(op) {
                    return Err(invalid(
                        &field("operations"),
                        format!("{} is listed twice", op.sql()),
                    ));
                }
            }
            parse_template(&m.channel).map_err(|p| invalid(&field("channel"), p))?;
            if let Some(cols) = &m.columns {
                if cols.is_empty() {
                    return Err(invalid(
                        &field("columns"),
                        "must not be empty (omit it to publish every column)",
                    ));
                }
                let mut seen = HashSet::new();
                for (j, col) in cols.iter().enumerate() {
                    check_ident(&format!("mappings[{i}].columns[{j}]"), col)?;
                    if !seen.insert(col) {
                        return Err(invalid(
                            &field("columns"),
                            format!("{col:?} is listed twice"),
                        ));
                    }
                }
            }
        }
        // A mapping listed twice would capture every change twice (one trigger, or two on one
        // channel); a fixed mapping channel that a rule also binds could never be published on.
        for (i, m) in self.mappings.iter().enumerate() {
            fn def(m: &Mapping) -> (&str, &str, Vec<&str>, &str, Option<&[String]>) {
                let mut ops: Vec<&str> = m.operations.iter().map(|o| o.sql()).collect();
                ops.sort_unstable();
                (&m.schema, &m.table, ops, &m.channel, m.columns.as_deref())
            }
            if let Some(j) = self.mappings[..i].iter().position(|o| def(o) == def(m)) {
                return Err(invalid(
                    &format!("mappings[{i}]"),
                    format!(
                        "duplicates mappings[{j}] (same table, operations, channel and columns)"
                    ),
                ));
            }
            let fixed = parse_template(&m.channel)
                .is_ok_and(|parts| parts.iter().all(|p| matches!(p, TemplatePart::Literal(_))));
            if fixed
                && let Some(j) = self
                    .rules
                    .iter()
                    .position(|r| ChannelPattern::new(&r.channel).matches(&m.channel))
            {
                return Err(invalid(
                    &format!("mappings[{i}].channel"),
                    format!(
                        "{:?} is also bound by rules[{j}]: a table-fed channel cannot be published on, \
                         so the rule would never run; use another channel",
                        m.channel
                    ),
                ));
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let field = |f: &str| format!("rules[{i}].{f}");
            if r.channel.is_empty()
                || r.channel.len() > 255
                || !r.channel.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    &field("channel"),
                    "must be 1-255 printable ASCII characters without spaces",
                ));
            }
            check_range(&field("timeout_ms"), r.timeout_ms, 1, 900_000)?;
            check_range(&field("retries"), r.retries.into(), 0, 10)?;
            check_range(&field("retry_backoff_ms"), r.retry_backoff_ms, 1, 60_000)?;
            check_range(
                &field("max_concurrency"),
                r.max_concurrency.into(),
                1,
                100_000,
            )?;
            match &r.target {
                Target::Lambda {
                    function,
                    endpoint,
                    region,
                } => {
                    let ok = !function.is_empty()
                        && function.len() <= 140
                        && function
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b));
                    if !ok {
                        return Err(invalid(
                            &field("target.function"),
                            "must be a Lambda function name or ARN",
                        ));
                    }
                    if let Some(e) = endpoint {
                        check_url(&field("target.endpoint"), e)?;
                    }
                    if let Some(region) = region {
                        if endpoint.is_some() {
                            return Err(invalid(
                                &field("target.region"),
                                "applies only to AWS Lambda: remove it, or remove target.endpoint",
                            ));
                        }
                        if !is_region(region) {
                            return Err(invalid(
                                &field("target.region"),
                                format!("{region:?} is not an AWS region like us-east-1"),
                            ));
                        }
                        if let Some(arn_region) = arn_region(function)
                            && arn_region != region
                        {
                            return Err(invalid(
                                &field("target.region"),
                                format!(
                                    "{region:?} differs from the function ARN's region {arn_region:?}"
                                ),
                            ));
                        }
                    }
                }
                Target::Http { url } => check_url(&field("target.url"), url)?,
            }
        }
        Ok(())
    }

    /// The compiled rules, in configuration order (the first match wins).
    pub fn rule_for(&self, channel: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| ChannelPattern::new(&r.channel).matches(channel))
    }

    /// Whether `channel` is fed by a table mapping (such channels are never publishable by clients).
    pub fn is_table_channel(&self, channel: &str) -> bool {
        self.mappings
            .iter()
            .any(|m| mapping_pattern(&m.channel).matches(channel))
    }
}

/// The channel pattern a mapping's template covers: every `{column}` becomes `*`.
pub fn mapping_pattern(template: &str) -> ChannelPattern {
    let parts = parse_template(template).unwrap_or_default();
    let glob: String = parts
        .iter()
        .map(|p| match p {
            TemplatePart::Literal(s) => s.as_str(),
            TemplatePart::Column(_) => "*",
        })
        .collect();
    ChannelPattern::new(&glob)
}

/// Parses a channel template: literal text with `{column}` placeholders.
pub fn parse_template(template: &str) -> Result<Vec<TemplatePart>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(open) => {
                if open > 0 {
                    parts.push(TemplatePart::Literal(rest[..open].to_owned()));
                }
                let after = &rest[open + 1..];
                let close = after.find('}').ok_or("has a '{' without a matching '}'")?;
                let col = &after[..close];
                if !is_ident(col) {
                    return Err(format!("placeholder {{{col}}} is not a column name"));
                }
                parts.push(TemplatePart::Column(col.to_owned()));
                rest = &after[close + 1..];
            }
            None => {
                parts.push(TemplatePart::Literal(rest.to_owned()));
                rest = "";
            }
        }
    }
    if parts.is_empty() {
        return Err("must not be empty".to_owned());
    }
    for p in &parts {
        if let TemplatePart::Literal(s) = p {
            if s.contains('}') {
                return Err("has a '}' without a matching '{'".to_owned());
            }
            let sample = s.as_str();
            if validate_channel(sample).is_err() {
                return Err(format!(
                    "literal {sample:?} has characters not allowed in channel names"
                ));
            }
        }
    }
    Ok(parts)
}

/// Whether `s` is a plain SQL identifier: a letter or `_`, then letters, digits or `_`, at most 63.
pub fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `s` looks like an AWS region: lowercase words and a number joined by `-` (`us-east-1`,
/// `us-gov-west-1`, `eu-central-2`).
fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    s.len() <= 50
        && parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The region of a function ARN (`arn:aws:lambda:us-east-1:123456789012:function:name`).
fn arn_region(function: &str) -> Option<&str> {
    let mut parts = function.split(':');
    (parts.next() == Some("arn"))
        .then(|| parts.nth(2))
        .flatten()
        .filter(|r| !r.is_empty())
}

fn check_ident(field: &str, value: &str) -> Result<(), ConfigError> {
    if is_ident(value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{value:?} is not a plain identifier (letters, digits, _; not starting with a digit; at most 63)"
            ),
        ))
    }
}

fn check_url(field: &str, value: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(invalid(field, format!("{value:?} is not an http(s) URL"))),
    }
}

fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} is out of range {min}..={max}"),
        ))
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        problem: problem.into(),
    }
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
        assert!(c.rule_for("outgoing-chat").is_some());
        assert!(c.is_table_channel("incoming-chat"));
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
        assert!(is_region("ap-southeast-5") && is_region("cn-north-1"));
        assert!(!is_region("us-east") && !is_region("-east-1") && !is_region("us--1"));
    }

    #[test]
    fn templates() {
        assert_eq!(
            parse_template("room:{room_id}").unwrap(),
            vec![
                TemplatePart::Literal("room:".into()),
                TemplatePart::Column("room_id".into())
            ]
        );
        assert!(parse_template("room:{room id}").is_err());
        assert!(parse_template("x}").is_err());
        assert!(parse_template("a b").is_err());
        assert!(mapping_pattern("room:{room_id}").matches("room:7"));
        assert!(!mapping_pattern("room:{room_id}").matches("rooms"));
    }
}
