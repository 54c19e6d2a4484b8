//! Per-connection and per-process limits that are not part of the protocol itself: the publish rate
//! (a token bucket per connection) and the WebSocket `Origin` allow-list (cross-site WebSocket
//! hijacking: a page on another site must not ride on a user's cookies or network position).

use std::time::Instant;

use relay_protocol::channel::ChannelPattern;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token if one is available at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
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
}

/// Whether a WebSocket upgrade with these `Origin` and `Host` headers is allowed.
///
/// No `Origin` header: allowed (browsers always send one on WebSocket upgrades; other clients can
/// send any header they like, so the check protects browser users only). With `allowed` unset, the
/// origin's host and port must be the request's `Host` (same origin). Otherwise the origin must match
/// one of the patterns, case-insensitively (`*` matches any run of characters; `"*"` allows all).
pub fn origin_allowed(
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
