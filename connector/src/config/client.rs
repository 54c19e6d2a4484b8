//! `client`: client connections and their limits. Read by the session, the accept loop and
//! [`crate::limits`]. The `*_secs` keys stay whole seconds (`u64`, the session reads them so); each
//! has a [`Duration`] accessor.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::duration::check as check_duration;
use super::{check_range, invalid};
use crate::error::ConfigError;

/// Client-connection settings and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Accept connections without a token (default true; JWT arrives in a later release).
    pub allow_anonymous: bool,
    /// Clients may publish on channels that have neither a rule nor a table mapping (default false).
    pub allow_publish: bool,
    /// Server ping interval in seconds (default 25).
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub ping_interval_secs: u64,
    /// Seconds to wait for a pong before disconnecting with 3012 (default 10).
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub pong_timeout_secs: u64,
    /// Largest accepted WebSocket message in bytes (default 65536); larger closes with 1009.
    pub max_message_bytes: usize,
    /// Pushes buffered per connection before it counts as slow and is disconnected with 3008
    /// (default 16384: a safety net; `outbound_queue_bytes` is the limit that normally counts, so a
    /// client that keeps up is not cut off by one large transaction's burst).
    pub outbound_queue: usize,
    /// The connection's outbound byte budget (default 16 MiB): pushes waiting in its mailbox plus
    /// replies being written. Pushes over it close the connection as slow (3008); the replies to one
    /// frame may use what pushes leave of it, less an eighth kept for the pushes that arrive while
    /// they are written: a reply that does not fit is an error (106) or, for a recovery,
    /// `recovered: false`.
    pub outbound_queue_bytes: usize,
    /// Bytes of large replies (history, presence, recovery) held by all connections of the process
    /// at once, from their read until their write completes (default 256 MiB). A reply that would
    /// pass it is error 111 (temporary: the SDK retries), so many connections asking for large
    /// replies at once, or not reading them, cannot add up to more memory than this.
    pub replies_in_flight_bytes: usize,
    /// Most publications returned by one history call (default 300).
    pub history_max_limit: u32,
    /// Most publications a recovery returns; more means `recovered: false` (default 1000000: the
    /// byte budget, `outbound_queue_bytes`, is what normally bounds a recovery).
    pub recovery_max_publications: u32,
    /// Most channels one connection may subscribe to (default 128).
    pub max_channels_per_connection: usize,
    /// Every authenticated connection is subscribed server-side to this channel at connect, with
    /// `{user}` replaced by its user id (Centrifugo's personal channel, e.g. `"#{user}"`; default
    /// none). It appears in the connect reply's `subs`, with recovery on reconnect.
    pub personal_channel: Option<String>,
    /// Most publishes of one connection waiting for their target at once (default 16).
    pub max_pending_publishes: usize,
    /// Seconds a new connection has to send `connect` (default 15).
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub connect_timeout_secs: u64,
    /// Seconds a write to the socket may take before the connection counts as dead (default 10).
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub write_timeout_secs: u64,
    /// Publishes per second one connection may sustain (token bucket; default 10); over → error 111.
    pub publish_rate_per_sec: u32,
    /// Publishes one connection may send in a burst (bucket size; default 20).
    pub publish_burst: u32,
    /// Most WebSocket connections this process serves (default 10000); over → HTTP 503 before upgrade.
    pub max_connections: usize,
    /// Browser origins allowed to open WebSockets (`https://app.example.com`, `*` globs allowed, `"*"`
    /// = any). Unset: same origin only (the `Origin` must match `Host`). Requests without an `Origin`
    /// (non-browser clients) always pass. Disallowed → HTTP 403 before upgrade.
    pub allowed_origins: Option<Vec<String>>,
    /// Seconds a TCP connection has to send a complete HTTP request head (default 10): a connection
    /// that sends nothing, or half a header, is closed. It also closes idle HTTP keep-alive
    /// connections. An upgraded WebSocket is no longer subject to it.
    #[serde(deserialize_with = "super::duration::whole_secs")]
    pub handshake_timeout_secs: u64,
    /// Most TCP connections that are not (yet) WebSockets at once (default 1024). A new one over it
    /// closes the oldest of them, so health checks and new clients always get through while idle
    /// sockets cost at most this many file descriptors.
    pub max_pending_connections: usize,
    /// Subscribes per second one connection may sustain (token bucket; default 10); over → error
    /// 111. An unsubscribe always succeeds but spends a token too.
    pub subscribe_rate_per_sec: u32,
    /// Subscribes one connection may send in a burst (default 160: a first frame subscribing to
    /// every allowed channel passes).
    pub subscribe_burst: u32,
    /// Publishes per second from one client IP, over all its connections (default 50); over → 111.
    pub publish_rate_per_ip_per_sec: u32,
    /// Burst of publishes from one client IP (default 100).
    pub publish_burst_per_ip: u32,
    /// Publishes per second of one authenticated user, over all its connections and nodes' local
    /// share (per process; default 20); over → 111.
    pub publish_rate_per_user_per_sec: u32,
    /// Burst of publishes of one authenticated user (default 40).
    pub publish_burst_per_user: u32,
    /// Proxies whose `X-Forwarded-For` is believed (IPs or CIDRs, e.g. the load balancer's subnet
    /// `10.0.0.0/16`); default none: the client IP is the socket's peer. From a trusted peer, the
    /// client IP is the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub trusted_proxies: Vec<Cidr>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            allow_publish: false,
            ping_interval_secs: 25,
            pong_timeout_secs: 10,
            max_message_bytes: 65536,
            outbound_queue: 16_384,
            outbound_queue_bytes: 16 << 20,
            history_max_limit: 300,
            recovery_max_publications: 1_000_000,
            replies_in_flight_bytes: 256 << 20,
            max_channels_per_connection: 128,
            personal_channel: None,
            max_pending_publishes: 16,
            connect_timeout_secs: 15,
            write_timeout_secs: 10,
            publish_rate_per_sec: 10,
            publish_burst: 20,
            max_connections: 10_000,
            allowed_origins: None,
            handshake_timeout_secs: 10,
            max_pending_connections: 1024,
            subscribe_rate_per_sec: 10,
            subscribe_burst: 160,
            publish_rate_per_ip_per_sec: 50,
            publish_burst_per_ip: 100,
            publish_rate_per_user_per_sec: 20,
            publish_burst_per_user: 40,
            trusted_proxies: Vec::new(),
        }
    }
}

impl ClientConfig {
    /// `ping_interval_secs`.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }

    /// `pong_timeout_secs`.
    pub fn pong_timeout(&self) -> Duration {
        Duration::from_secs(self.pong_timeout_secs)
    }

    /// `connect_timeout_secs`.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }

    /// `write_timeout_secs`.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }

    /// `handshake_timeout_secs`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_timers()?;
        self.check_sizes()?;
        self.check_rates()?;
        if let Some(template) = &self.personal_channel
            && (template.matches("{user}").count() != 1
                || relay_protocol::channel::validate_channel(&template.replace("{user}", "u"))
                    .is_err())
        {
            return Err(invalid(
                "client.personal_channel",
                format!(
                    "{template:?} must be a channel name with {{user}} once, like \"#{{user}}\""
                ),
            ));
        }
        if let Some(origins) = &self.allowed_origins
            && let Some(bad) = origins.iter().find(|o| o.is_empty() || o.ends_with('/'))
        {
            return Err(invalid(
                "client.allowed_origins",
                format!(
                    "{bad:?} is not an origin like https://app.example.com (no path, no trailing /)"
                ),
            ));
        }
        Ok(())
    }

    fn check_timers(&self) -> Result<(), ConfigError> {
        let secs = Duration::from_secs;
        for (field, value, max) in [
            ("client.ping_interval_secs", self.ping_interval(), 3600),
            ("client.pong_timeout_secs", self.pong_timeout(), 3600),
            (
                "client.handshake_timeout_secs",
                self.handshake_timeout(),
                600,
            ),
            ("client.connect_timeout_secs", self.connect_timeout(), 600),
        ] {
            check_duration(field, value, secs(1), secs(max))?;
        }
        if self.pong_timeout_secs >= self.ping_interval_secs + 10 {
            return Err(invalid(
                "client.pong_timeout_secs",
                "must be less than ping_interval_secs + 10 (the SDKs' own ping watchdog slack)",
            ));
        }
        Ok(())
    }

    fn check_sizes(&self) -> Result<(), ConfigError> {
        let n = |v: usize| v as u64;
        for (field, value, min, max) in [
            (
                "client.max_message_bytes",
                n(self.max_message_bytes),
                1024,
                16 << 20,
            ),
            (
                "client.outbound_queue",
                n(self.outbound_queue),
                8,
                1_000_000,
            ),
            (
                "client.outbound_queue_bytes",
                n(self.outbound_queue_bytes),
                64 << 10,
                1 << 30,
            ),
            (
                "client.history_max_limit",
                self.history_max_limit.into(),
                1,
                100_000,
            ),
            (
                "client.recovery_max_publications",
                self.recovery_max_publications.into(),
                1,
                100_000_000,
            ),
            (
                "client.replies_in_flight_bytes",
                n(self.replies_in_flight_bytes),
                64 << 10,
                1 << 40,
            ),
            (
                "client.max_pending_connections",
                n(self.max_pending_connections),
                1,
                10_000_000,
            ),
            (
                "client.max_channels_per_connection",
                n(self.max_channels_per_connection),
                1,
                100_000,
            ),
            (
                "client.max_pending_publishes",
                n(self.max_pending_publishes),
                1,
                10_000,
            ),
            (
                "client.max_connections",
                n(self.max_connections),
                1,
                10_000_000,
            ),
        ] {
            check_range(field, value, min, max)?;
        }
        Ok(())
    }

    fn check_rates(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("client.subscribe_rate_per_sec", self.subscribe_rate_per_sec),
            ("client.subscribe_burst", self.subscribe_burst),
            (
                "client.publish_rate_per_ip_per_sec",
                self.publish_rate_per_ip_per_sec,
            ),
            ("client.publish_burst_per_ip", self.publish_burst_per_ip),
            (
                "client.publish_rate_per_user_per_sec",
                self.publish_rate_per_user_per_sec,
            ),
            ("client.publish_burst_per_user", self.publish_burst_per_user),
            ("client.publish_rate_per_sec", self.publish_rate_per_sec),
            ("client.publish_burst", self.publish_burst),
        ] {
            check_range(field, value.into(), 1, 1_000_000)?;
        }
        Ok(())
    }
}

/// An IP network: an address and a prefix length (`10.0.0.0/16`, `fd00::/8`; a bare address is a /32
/// or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr` or `addr/prefix`.
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { addr, prefix })
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not an IP address or CIDR like 10.0.0.0/16"
            ))
        })
    }
}
