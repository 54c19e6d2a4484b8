//! Channel names and channel patterns.
//!
//! A channel name is 1–255 bytes of printable ASCII without spaces; rules and permissions select
//! channels with glob patterns where `*` matches any run of characters (`room:*`, `outgoing-chat`).

use thiserror::Error;

/// The longest channel name accepted.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a channel name is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChannelError {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name is longer than [`MAX_CHANNEL_LEN`].
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    /// The name contains a character outside printable ASCII, or a space.
    #[error("channel name contains a character that is not allowed")]
    BadCharacter,
}

/// Checks a channel name sent by a client.
pub fn validate_channel(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ChannelError::BadCharacter);
    }
    Ok(())
}

/// A glob pattern over channel names: `*` matches any (possibly empty) run of characters; every
/// other character matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPattern {
    parts: Vec<String>,
    raw: String,
}

impl ChannelPattern {
    /// Parses a pattern. Any string is a valid pattern.
    pub fn new(pattern: &str) -> Self {
        Self {
            parts: pattern.split('*').map(str::to_owned).collect(),
            raw: pattern.to_owned(),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `channel` matches the pattern.
    pub fn matches(&self, channel: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return channel.is_empty(),
        };
        let Some(mut remaining) = channel.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return remaining.is_empty();
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(at) => remaining = &remaining[at + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(ChannelPattern::new("outgoing-chat").matches("outgoing-chat"));
        assert!(!ChannelPattern::new("outgoing-chat").matches("outgoing-chat2"));
        assert!(ChannelPattern::new("room:*").matches("room:42"));
        assert!(ChannelPattern::new("room:*").matches("room:"));
        assert!(!ChannelPattern::new("room:*").matches("rooms:1"));
        assert!(ChannelPattern::new("*").matches("anything"));
        assert!(ChannelPattern::new("a*b*c").matches("aXXbYYc"));
        assert!(!ChannelPattern::new("a*b*c").matches("aXXbYY"));
        assert!(ChannelPattern::new("*:x").matches("a:x"));
        assert!(!ChannelPattern::new("ab*ba").matches("aba"));
    }

    #[test]
    fn names() {
        assert_eq!(validate_channel(""), Err(ChannelError::Empty));
        assert_eq!(validate_channel("a b"), Err(ChannelError::BadCharacter));
        assert_eq!(validate_channel("é"), Err(ChannelError::BadCharacter));
        assert_eq!(
            validate_channel(&"x".repeat(256)),
            Err(ChannelError::TooLong)
        );
        assert_eq!(validate_channel("room:1';drop-table-x;--"), Ok(()));
    }
}
