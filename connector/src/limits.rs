//! Per-connection and per-process limits that are not part of the protocol itself: the publish and
//! subscribe rates (token buckets per connection), the publish rates per client IP and per user
//! across connections ([`KeyedLimiter`]), the client IP behind trusted proxies ([`client_ip`]) and
//! the WebSocket `Origin` allow-list (cross-site WebSocket hijacking: a page on another site must not
//! ride on a user's cookies or network position).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use parking_lot::Mutex;
use relay_protocol::channel::ChannelPattern;

/// The limits shared by every connection of the process.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Publishes per client IP (`client.publish_rate_per_ip_per_sec`).
    pub publish_per_ip: KeyedLimiter,
    /// Publishes per authenticated user (`client.publish_rate_per_user_per_sec`).
    pub publish_per_user: KeyedLimiter,
    /// Peers whose `X-Forwarded-For` is believed (`client.trusted_proxies`).
    pub trusted_proxies: Vec<Cidr>,
}

/// Most keys (IPs, users) a [`KeyedLimiter`] of [`Shared`] tracks at once.
const MAX_KEYS: usize = 100_000;

impl Shared {
    /// The limits of a validated `client` section.
    pub(crate) fn new(c: &crate::config::ClientConfig) -> Self {
        Self {
            publish_per_ip: KeyedLimiter::new(
                c.publish_rate_per_ip_per_sec,
                c.publish_burst_per_ip,
                MAX_KEYS,
            ),
            publish_per_user: KeyedLimiter::new(
                c.publish_rate_per_user_per_sec,
                c.publish_burst_per_user,
                MAX_KEYS,
            ),
            trusted_proxies: c.trusted_proxies.clone(),
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate_per_sec: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token if one is available at `now`.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Spends a token even when none is left (down to minus one burst): for what must not be
    /// refused but must slow down what follows.
    pub(crate) fn take_forced(&mut self, now: Instant) {
        if !self.try_take(now) {
            self.tokens = (self.tokens - 1.0).max(-self.burst);
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// Token buckets by key (a client IP, a user), shared by every connection of the process. The map
/// holds at most `max_keys` buckets: when it is full, buckets that have refilled completely (they
/// carry no state) are dropped; if none has, the key is refused, which fails safe.
#[derive(Debug)]
pub(crate) struct KeyedLimiter {
    rate: u32,
    burst: u32,
    max_keys: usize,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl KeyedLimiter {
    /// `rate` per second and `burst` per key, for at most `max_keys` keys at once.
    pub(crate) fn new(rate: u32, burst: u32, max_keys: usize) -> Self {
        Self {
            rate,
            burst,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `key`'s bucket if one is available.
    pub(crate) fn try_take(&self, key: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock();
        if let Some(b) = buckets.get_mut(key) {
            return b.try_take(now);
        }
        if buckets.len() >= self.max_keys {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= self.max_keys {
                return false;
            }
        }
        let mut bucket = TokenBucket::new(self.rate, self.burst);
        let taken = bucket.try_take(now);
        buckets.insert(key.to_owned(), bucket);
        taken
    }

    /// Keys tracked at the moment.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().len()
    }
}

pub(crate) use crate::config::Cidr;

/// The client's IP: the socket's peer, unless the peer is a trusted proxy; then the rightmost
/// `X-Forwarded-For` entry (over all such headers) that is not itself a trusted proxy. Entries a
/// client put further left are never believed.
pub(crate) fn client_ip(peer: IpAddr, trusted: &[Cidr], forwarded_for: &[&str]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut ip = peer;
    for entry in forwarded_for
        .iter()
        .rev()
        .flat_map(|h| h.rsplit(','))
        .map(str::trim)
    {
        match entry.parse::<IpAddr>() {
            Ok(hop) => {
                ip = hop;
                if !is_trusted(hop) {
                    break;
                }
            }
            // A malformed entry ends what can be believed: the last trusted hop is the client.
            Err(_) => break,
        }
    }
    ip
}

/// Whether a WebSocket upgrade with these `Origin` and `Host` headers is allowed.
///
/// No `Origin` header: allowed (browsers always send one on WebSocket upgrades; other clients can
/// send any header they like, so the check protects browser users only). With `allowed` unset, the
/// origin's host and port must be the request's `Host` (same origin). Otherwise the origin must match
/// one of the patterns, case-insensitively (`*` matches any run of characters; `"*"` allows all).
pub(crate) fn origin_allowed(
    allowed: Option<&[String]>,
    origin: Option<&str>,
    host: Option<&str>,
) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let origin = origin.trim().to_ascii_lowercase();
    match allowed {
        Some(patterns) => patterns
            .iter()
            .any(|p| ChannelPattern::new(&p.to_ascii_lowercase()).matches(&origin)),
        None => same_origin(&origin, host),
    }
}

fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let (Ok(url), Some(host)) = (reqwest::Url::parse(origin), host) else {
        return false;
    };
    let (Some(o_host), Some(o_port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    let (h_host, h_port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || host.starts_with('[') => match p.parse::<u16>() {
            Ok(port) => (h.to_owned(), port),
            Err(_) => (host.clone(), default_port(url.scheme())),
        },
        _ => (host.clone(), default_port(url.scheme())),
    };
    o_host == h_host && o_port == h_port
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, 3);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(500)));
        assert!(!b.try_take(t0 + Duration::from_millis(500)));
        // refills to the burst, never beyond
        let later = t0 + Duration::from_secs(60);
        assert!(b.try_take(later) && b.try_take(later) && b.try_take(later));
        assert!(!b.try_take(later));
    }

    #[test]
    fn keyed_buckets_and_forced_takes() {
        let t0 = Instant::now();
        let l = KeyedLimiter::new(1, 2, 2);
        assert!(l.try_take("a", t0) && l.try_take("a", t0));
        assert!(!l.try_take("a", t0));
        assert!(l.try_take("b", t0));
        // full map, no refilled bucket: a third key is refused
        assert!(!l.try_take("c", t0));
        // later both refilled: they are dropped to make room
        assert!(l.try_take("c", t0 + Duration::from_secs(10)));
        assert_eq!(l.len(), 1);
        let mut b = TokenBucket::new(1, 2);
        for _ in 0..5 {
            b.take_forced(t0);
        }
        assert!(!b.try_take(t0 + Duration::from_secs(2)));
        assert!(b.try_take(t0 + Duration::from_secs(3)));
    }

    #[test]
    fn client_ip_behind_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted = [Cidr::parse("10.0.0.0/16").unwrap()];
        // untrusted peer: its header is ignored
        assert_eq!(
            client_ip(ip("203.0.113.9"), &trusted, &["1.2.3.4"]),
            ip("203.0.113.9")
        );
        // trusted peer: the rightmost untrusted entry; a spoofed left entry is not believed
        assert_eq!(
            client_ip(
                ip("10.0.1.5"),
                &trusted,
                &["6.6.6.6, 198.51.100.7, 10.0.2.2"]
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(ip("10.0.1.5"), &trusted, &["6.6.6.6", "198.51.100.7"]),
            ip("198.51.100.7")
        );
        assert_eq!(client_ip(ip("10.0.1.5"), &trusted, &[]), ip("10.0.1.5"));
        assert_eq!(
            client_ip(ip("10.0.1.5"), &trusted, &["junk"]),
            ip("10.0.1.5")
        );
        assert!(Cidr::parse("::ffff:0:0/96").is_some());
        assert!(Cidr::parse("10.0.0.0/33").is_none() && Cidr::parse("x").is_none());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(
            Cidr::parse("127.0.0.1")
                .unwrap()
                .contains(ip("::ffff:127.0.0.1"))
        );
    }

    #[test]
    fn origins() {
        assert!(origin_allowed(None, None, Some("x:1")));
        assert!(origin_allowed(
            None,
            Some("http://127.0.0.1:8000"),
            Some("127.0.0.1:8000")
        ));
        assert!(origin_allowed(
            None,
            Some("https://app.example"),
            Some("app.example")
        ));
        assert!(origin_allowed(
            None,
            Some("https://APP.example:443"),
            Some("app.example")
        ));
        assert!(!origin_allowed(
            None,
            Some("https://evil.example"),
            Some("app.example")
        ));
        assert!(!origin_allowed(
            None,
            Some("http://127.0.0.1:9999"),
            Some("127.0.0.1:8000")
        ));
        assert!(!origin_allowed(None, Some("null"), Some("127.0.0.1:8000")));
        let list = vec![
            "https://app.example".to_owned(),
            "https://*.example.org".to_owned(),
        ];
        assert!(origin_allowed(
            Some(&list),
            Some("https://app.example"),
            None
        ));
        assert!(origin_allowed(
            Some(&list),
            Some("https://a.example.org"),
            None
        ));
        assert!(!origin_allowed(
            Some(&list),
            Some("https://app.example.evil"),
            None
        ));
        assert!(!origin_allowed(
            Some(&list),
            Some("http://app.example"),
            None
        ));
        assert!(origin_allowed(
            Some(&["*".to_owned()]),
            Some("https://x"),
            None
        ));
    }
}
