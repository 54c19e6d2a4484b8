//! [`ChannelRules`]: a list of entries selected by channel pattern, where the first match wins. One
//! type serves permissions (`channels[]`), presence (`presence.channels[]`), retention
//! (`retention.rules[]`) and publish rules (`rules[]`); each pattern is compiled once, at load.

use std::ops::Deref;

use relay_protocol::channel::ChannelPattern;
use serde::{Deserialize, Deserializer};

use crate::error::ConfigError;

/// An entry of a [`ChannelRules`] list: it names the channel pattern it applies to.
pub trait PatternEntry {
    /// The pattern as written in the configuration (`*` matches any run of characters).
    fn channel(&self) -> &str;
}

/// Entries in configuration order, each with its compiled pattern; the first match wins.
#[derive(Debug, Clone)]
pub struct ChannelRules<T> {
    entries: Vec<T>,
    patterns: Vec<ChannelPattern>,
}

impl<T> Default for ChannelRules<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            patterns: Vec::new(),
        }
    }
}

impl<T: PatternEntry> ChannelRules<T> {
    /// Compiles the patterns of `entries`.
    pub fn new(entries: Vec<T>) -> Self {
        let patterns = entries
            .iter()
            .map(|e| ChannelPattern::new(e.channel()))
            .collect();
        Self { entries, patterns }
    }

    /// The first entry whose pattern matches `channel`.
    pub fn first_match(&self, channel: &str) -> Option<&T> {
        self.position(channel).map(|i| &self.entries[i])
    }

    /// The index of the first entry whose pattern matches `channel`.
    pub fn position(&self, channel: &str) -> Option<usize> {
        self.patterns.iter().position(|p| p.matches(channel))
    }

    /// Checks every pattern; `list` names the list in errors (`channels` → `channels[2].channel`).
    pub(crate) fn check_patterns(&self, list: &str) -> Result<(), ConfigError> {
        for (i, e) in self.entries.iter().enumerate() {
            check_pattern(&format!("{list}[{i}].channel"), e.channel())?;
        }
        Ok(())
    }
}

/// The entries, in configuration order.
impl<T> Deref for ChannelRules<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.entries
    }
}

impl<'de, T: PatternEntry + Deserialize<'de>> Deserialize<'de> for ChannelRules<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<T>::deserialize(d).map(Self::new)
    }
}

/// The one check of a channel pattern: 1–255 printable ASCII characters without spaces.
pub(crate) fn check_pattern(field: &str, pattern: &str) -> Result<(), ConfigError> {
    if pattern.is_empty() || pattern.len() > 255 || !pattern.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            field,
            "must be 1-255 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct E {
        channel: String,
        n: u32,
    }

    impl PatternEntry for E {
        fn channel(&self) -> &str {
            &self.channel
        }
    }

    #[test]
    fn first_match_wins_and_patterns_are_checked() {
        let r: ChannelRules<E> = serde_json::from_str(
            r#"[{"channel":"chat:vip","n":1},{"channel":"chat:*","n":2},{"channel":"*","n":3}]"#,
        )
        .unwrap();
        assert_eq!(r.first_match("chat:vip").unwrap().n, 1);
        assert_eq!(r.first_match("chat:7").unwrap().n, 2);
        assert_eq!(r.first_match("news").unwrap().n, 3);
        assert_eq!(r.position("chat:7"), Some(1));
        assert_eq!(r.len(), 3);
        assert!(r.check_patterns("x").is_ok());
        let bad: ChannelRules<E> =
            serde_json::from_str(r#"[{"channel":"ok","n":1},{"channel":"a b","n":2}]"#).unwrap();
        assert_eq!(bad.check_patterns("x").unwrap_err().field, "x[1].channel");
        assert!(ChannelRules::<E>::default().first_match("a").is_none());
    }
}
